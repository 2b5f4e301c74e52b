"""The evaluation prompt suites: shipped under prompts/, with builders that regenerate them.

    python -m eval.prompts --suite NAME [--source PATH_OR_ID] [--output FILE] [--force]

The three suites of the reference protocol (docs/methods.md, "Evaluation protocol") ship with the
project as prompts/<suite>.json. They are the reference implementation's own files
(AIDC-AI/Diffusion-SDPO, commit 84fb241, Apache-2.0; see NOTICE), unmodified, so evaluation
reads them and needs no network. The builders regenerate them from the upstream sources:

- papv2 (487): the `caption` column of the Pick-a-Pic v2 test split, de-duplicated in first-seen
  order. Source: the hub dataset `yuvalkirstain/pickapic_v2_no_images`, or a local copy (a folder
  holding data/test-*.parquet, or one parquet file).
- hpsv2 (3200): the HPDv2 benchmark, `benchmark/{anime,concept-art,paintings,photo}.json` (each a
  JSON list of prompt strings) concatenated in that order, duplicates kept. Source: the hub
  dataset `zhwang/HPDv2`, or a local folder holding those four files (directly or in benchmark/).
- partiprompts (1632): the `Prompt` column of Parti's PartiPrompts.tsv in file order, read as a
  tab-separated file with standard CSV quoting: the one quoted prompt loses its quotes.
  Source: its GitHub raw URL, or a local file.

Records and bytes are those of the shipped files: papv2 and hpsv2 records are
{"prompt", "gen_image_path": "", "raw_image_path": "", "metadata": {}}, partiprompts records
{"prompt", "neg_prompt": "", "raw_image_path": "", "metadata": {}}; JSON with indent 2 and no
final newline, non-ASCII characters written as UTF-8 in papv2 and escaped in the other two.

The command writes prompts/<suite>.json unless --output says otherwise, and it refuses to replace
a shipped file without --force. It reports whether the result has the shipped suite's fingerprint
(the sha256 of the prompts joined by newlines).
"""

from __future__ import annotations

if not __package__:  # run as a file (python eval/X.py): make the repository importable first
    import _as_file  # noqa: F401  (eval/_as_file.py)

import argparse
import csv
import hashlib
import io
import os
import urllib.request

from eval import checks
from sdpo import flags
from sdpo.files import write_json_atomic
from sdpo.errors import InputError, first_line, reports_input_errors

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prompts")
DEFAULT_SOURCES = {
    "papv2": "yuvalkirstain/pickapic_v2_no_images",
    "hpsv2": "zhwang/HPDv2",
    "partiprompts": "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv",
}
EXPECTED_SIZES = {"papv2": 487, "hpsv2": 3200, "partiprompts": 1632}
# sha256 of the shipped suites' prompts joined by "\n"
FINGERPRINTS = {
    "papv2": "b2fad8d9a1c532cff01e6883953075d09407a9d4db553c4e3c4b8d368d4fadf3",
    "hpsv2": "6bacc5f43dab0d8357e22486d2f35173bcb75787b4474dfa5ce56bc02543340a",
    "partiprompts": "75f9a6570ffb3ccbaefbe32c91606a87ca62ea60d5818232d83caff9bba63d80",
}
# The shipped files escape non-ASCII characters in hpsv2 and partiprompts, not in papv2.
ENSURE_ASCII = {"papv2": False, "hpsv2": True, "partiprompts": True}
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


def record(prompt: str, **metadata) -> dict:
    """A papv2/hpsv2 entry in the reference's layout; generation fills in gen_image_path.

    The builders pass no metadata (the shipped files have none); a hand-written suite may.
    """
    return {"prompt": prompt, "gen_image_path": "", "raw_image_path": "", "metadata": metadata}


def parti_record(prompt: str) -> dict:
    """A partiprompts entry in the reference's layout (neg_prompt in place of gen_image_path)."""
    return {"prompt": prompt, "neg_prompt": "", "raw_image_path": "", "metadata": {}}


def fingerprint(suite: list[dict]) -> str:
    """sha256 (hex) of the suite's prompts joined by newlines."""
    return hashlib.sha256("\n".join(r["prompt"] for r in suite).encode("utf-8")).hexdigest()


def parse_parti_tsv(text: str) -> list[dict]:
    """PartiPrompts.tsv: a header (Prompt, Category, Challenge, Note), then one prompt per line.

    Read with standard CSV quoting, as a TSV reader does by default: a field that begins with a
    double quote is a quoted field, so `"G I G G L E" painted ...` becomes `G I G G L E painted ...`
    (what the shipped suite holds). Quotes inside a field are kept.
    """
    reader = csv.reader(io.StringIO(text), delimiter="\t")
    header = next(reader, [])
    if header[:1] != ["Prompt"]:
        raise InputError("not a PartiPrompts.tsv: the first line must start with the column 'Prompt'")
    suite = []
    for row in reader:
        if not row or not row[0].strip():
            continue
        if len(row) != len(header):  # e.g. an unbalanced quote that swallowed the next lines
            raise InputError(f"PartiPrompts.tsv line {reader.line_num}: expected {len(header)} tab-separated "
                             f"fields, got {len(row)}")
        suite.append(parti_record(row[0]))
    return suite


def _read_text(source: str) -> str:
    if os.path.isfile(source):
        try:
            with open(source, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as err:
            raise InputError(f"not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise InputError(f"cannot read it ({err.strerror})") from None
    if os.path.isdir(source):
        raise InputError("a folder; a PartiPrompts.tsv file is needed")
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                return response.read().decode("utf-8")
        except OSError as err:
            raise InputError(f"could not download {source}: {first_line(err)}; "
                             f"pass a local copy with --source") from err
    raise InputError("neither a file nor a URL")


def build_partiprompts(source: str) -> list[dict]:
    return parse_parti_tsv(_read_text(source))


def build_hpsv2(source: str) -> list[dict]:
    """The four HPDv2 benchmark styles, in order, each a JSON list of prompt strings."""
    if os.path.isfile(source):
        raise InputError("a file; a folder holding the four benchmark files (anime.json, ...) or a hub dataset "
                         "id is needed")
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
                raise InputError(f"could not fetch benchmark/{style}.json from {source}: {first_line(err)}; "
                                 f"pass a local folder with --source") from err
        prompts = checks.read_json(path, "benchmark file")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"{path}: expected a JSON list of prompt strings")
        suite += [record(p) for p in prompts]
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


def write_suite(suite: list[dict], path: str, ensure_ascii: bool = False) -> None:
    """Write a suite as the reference does: indent 2, no final newline (see ENSURE_ASCII)."""
    write_json_atomic(suite, path, ensure_ascii=ensure_ascii)


def suite_path(name: str) -> str:
    return os.path.join(PROMPTS_DIR, f"{name}.json")


def is_shipped_path(path: str) -> bool:
    """Whether `path` is one of the suite files that ship under prompts/."""
    return os.path.realpath(path) in {os.path.realpath(suite_path(name)) for name in BUILDERS}


def ensure_suite(name: str, source: str | None = None) -> str:
    """The suite's shipped file under prompts/. Only when it is missing (a checkout that lacks
    it) is it built from its upstream source, which may need the network."""
    path = suite_path(name)
    if not os.path.isfile(path):
        write_suite(build(name, source or DEFAULT_SOURCES[name], f"suite {name}: building it from"), path,
                    ensure_ascii=ENSURE_ASCII[name])
    return path


def build(name: str, source: str, flag: str = "--source") -> list[dict]:
    """The suite built from `source`; any failure is one line that names the flag and the source."""
    try:
        suite = BUILDERS[name](source)
    except InputError as err:
        raise InputError(f"{flag} {source}: {err}") from None
    if not suite:
        raise InputError(f"{flag} {source}: no prompts in it")
    return suite


def load_suite(path: str, flag: str = "--test_json") -> list[dict]:
    """A prompt suite: a non-empty JSON list of records, each with a string 'prompt'."""
    return checks.read_records(path, flag, "suite", ("prompt",))


@reports_input_errors
def main(argv=None):
    parser = checks.Parser(prog="python -m eval.prompts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--source", default=None, help="local file/folder, hub id or URL (default: the upstream)")
    parser.add_argument("--output", default=None, help="where to write (default: prompts/<suite>.json)")
    parser.add_argument("--force", action="store_true", help="replace a shipped file under prompts/")
    args = parser.parse_args(argv)
    output = args.output or suite_path(args.suite)
    if os.path.exists(output) and is_shipped_path(output) and not args.force:
        raise InputError(f"{output} ships with the project; write elsewhere with --output FILE, "
                         f"or pass --force to replace it")
    flags.output_file(output, "--output")
    suite = build(args.suite, args.source or DEFAULT_SOURCES[args.suite])
    write_suite(suite, output, ensure_ascii=ENSURE_ASCII[args.suite])
    same = fingerprint(suite) == FINGERPRINTS[args.suite]
    expected = EXPECTED_SIZES[args.suite]
    note = "identical prompts to the shipped suite" if same else (
        f"NOT the shipped suite's prompts ({expected} prompts, sha256 {FINGERPRINTS[args.suite][:12]}...): "
        f"check the source")
    print(f"{args.suite}: {len(suite)} prompts -> {output}; {note}")


if __name__ == "__main__":
    main()
