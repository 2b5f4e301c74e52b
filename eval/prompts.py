"""Build the evaluation prompt suites from their upstream sources.

    python -m eval.prompts --suite partiprompts [--source PATH_OR_URL] [--output FILE]

Suites (METHODS.md section 8), each a JSON list of records
{"prompt", "neg_prompt": "", "gen_image_path": "", "raw_image_path": "", "metadata": {...}}:

- papv2 (487): the Pick-a-Pic v2 test captions, de-duplicated in first-seen order. Source: the hub
  dataset `yuvalkirstain/pickapic_v2_no_images` (test split), or a local parquet file or folder.
- hpsv2 (3200): the HPDv2 benchmark, anime, concept-art, paintings, photo (800 each, in that
  order, duplicates kept; the style goes into metadata). Source: the hub dataset `zhwang/HPDv2`
  (`benchmark/<style>.json`), or a local folder holding those four files.
- partiprompts (1632): the `Prompt` column of Parti's PartiPrompts.tsv in file order (category and
  challenge go into metadata). Source: its GitHub raw URL, or a local file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import urllib.request

from eval.files import write_json_atomic
from sdpo.errors import InputError, reports_input_errors

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prompts")
DEFAULT_SOURCES = {
    "papv2": "yuvalkirstain/pickapic_v2_no_images",
    "hpsv2": "zhwang/HPDv2",
    "partiprompts": "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv",
}
EXPECTED_SIZES = {"papv2": 487, "hpsv2": 3200, "partiprompts": 1632}
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


def record(prompt: str, **metadata) -> dict:
    """One suite entry in the reference's format (plus gen_image_path, filled in by generation)."""
    return {"prompt": prompt, "neg_prompt": "", "gen_image_path": "", "raw_image_path": "", "metadata": metadata}


def parse_parti_tsv(text: str) -> list[dict]:
    """PartiPrompts.tsv: a header (Prompt, Category, Challenge, Note), then one prompt per line.

    Fields are taken verbatim (no CSV quoting: one prompt begins with a double quote).
    """
    rows = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or rows[0][:1] != ["Prompt"]:
        raise InputError("not a PartiPrompts.tsv: the first line must start with the column 'Prompt'")
    header = rows[0]
    column = {name: header.index(name) for name in ("Prompt", "Category", "Challenge") if name in header}
    suite = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        if len(row) < len(column):
            raise InputError(f"PartiPrompts.tsv line {number}: expected {len(column)} tab-separated fields")
        meta = {k.lower(): row[i] for k, i in column.items() if k != "Prompt"}
        suite.append(record(row[column["Prompt"]], **meta))
    return suite


def _read_text(source: str) -> str:
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            return f.read()
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                return response.read().decode("utf-8")
        except OSError as err:
            raise InputError(f"could not download {source}: {err}; pass a local copy with --source") from err
    raise InputError(f"{source} is neither a file nor a URL")


def build_partiprompts(source: str) -> list[dict]:
    return parse_parti_tsv(_read_text(source))


def build_hpsv2(source: str) -> list[dict]:
    """The four HPDv2 benchmark styles, in order, each a JSON list of prompt strings."""
    suite = []
    for style in HPS_STYLES:
        if os.path.isdir(source):
            candidates = [os.path.join(source, f"{style}.json"), os.path.join(source, "benchmark", f"{style}.json")]
            path = next((p for p in candidates if os.path.isfile(p)), None)
            if path is None:
                raise InputError(f"no {style}.json in {source} (nor in {source}/benchmark)")
        else:
            from huggingface_hub import hf_hub_download

            try:
                path = hf_hub_download(source, f"benchmark/{style}.json", repo_type="dataset")
            except Exception as err:  # hub errors come in many types; all mean "not available"
                raise InputError(f"could not fetch benchmark/{style}.json from {source}: {err}; "
                                 f"pass a local folder with --source") from err
        with open(path, encoding="utf-8") as f:
            prompts = json.load(f)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"{path}: expected a JSON list of prompt strings")
        suite += [record(p, style=style) for p in prompts]
    return suite


def build_papv2(source: str, split: str = "test") -> list[dict]:
    """Unique captions of the Pick-a-Pic v2 test split, in first-seen order."""
    from sdpo.data import load_split

    data = load_split(source, split)
    if "caption" not in data.column_names:
        raise InputError(f"{source} has no column 'caption' (it has: {', '.join(data.column_names)})")
    seen, suite = set(), []
    for caption in data["caption"]:
        if caption not in seen:
            seen.add(caption)
            suite.append(record(caption))
    return suite


BUILDERS = {"papv2": build_papv2, "hpsv2": build_hpsv2, "partiprompts": build_partiprompts}


def write_suite(suite: list[dict], path: str) -> None:
    write_json_atomic(suite, path)


def suite_path(name: str) -> str:
    return os.path.join(PROMPTS_DIR, f"{name}.json")


def ensure_suite(name: str, source: str | None = None) -> str:
    """The suite's file under prompts/, built from its source first if it is missing."""
    path = suite_path(name)
    if not os.path.isfile(path):
        write_suite(BUILDERS[name](source or DEFAULT_SOURCES[name]), path)
    return path


def load_suite(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        suite = json.load(f)
    if not isinstance(suite, list) or not all(isinstance(r, dict) and "prompt" in r for r in suite):
        raise InputError(f"{path}: expected a JSON list of records with a 'prompt'")
    return suite


@reports_input_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--source", default=None, help="local file/folder, hub id or URL (default: the upstream)")
    parser.add_argument("--output", default=None, help="where to write (default: prompts/<suite>.json)")
    args = parser.parse_args(argv)
    suite = BUILDERS[args.suite](args.source or DEFAULT_SOURCES[args.suite])
    output = args.output or suite_path(args.suite)
    write_suite(suite, output)
    expected = EXPECTED_SIZES[args.suite]
    note = "" if len(suite) == expected else f" (the published suite has {expected}: check the source)"
    print(f"{args.suite}: {len(suite)} prompts -> {output}{note}")


if __name__ == "__main__":
    main()
