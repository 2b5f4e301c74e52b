"""Score generation manifests with reward models, and tabulate the means.

    python -m eval.score out/papv2_seed0_512x512_50s_7.5cfg.json out/hpsv2_...json \
        [--metrics pickscore hpsv2 aesthetics clip] [--device cuda] [--batch_size 32] \
        [--source pickscore.model=/models/PickScore_v1 --source hpsv2.checkpoint=/models/HPS_v2_compressed.pt] \
        [--scores_from output/vs_eval] [--recompute]

For each manifest X.json and metric M it writes X_M.json:

    {"format": "sdpo-scores/1", "metric": M,
     "scorer": {"metric", "version", "sources": every model source, given or default, local files
                with their size and mtime},
     "images": [[size, mtime_ns] of each record's image],
     "records": the manifest's records, each with a "score"}

A score file is reused when its scorer, its records and its images are those of this run;
otherwise (another --source, regenerated images, an edited manifest) it is computed again, with a
line that says why. A score file without that record (our older format, a JSON list of the
manifest's records each with a "score"; or the reference's X_image_reward_score.json, whose
records carry "image_reward_score") is used when its prompts and image paths are the manifest's,
in order, and every record has a score, with a warning that it is unverified; otherwise it is
scored again. The reference's other files (X_pickscore.json, X_hpsv2score.json, X_aesscore.json,
X_clipscore.json) hold no per-image scores: those metrics are scored, unless --scores_from gives
the reference's pair_<metric>.json files (written by its test_vs.sh, one per comparison and metric,
with both images' scores for each pair) holding every image of the manifest with its prompt: those
scores are then used, also unverified, with a warning. --recompute scores everything again.

The table (suites by metrics, means) is printed and saved as markdown (--table, default
summary.md beside the first manifest) and as JSON beside it (summary.json).
"""

from __future__ import annotations

if not __package__:  # run as a file (python eval/X.py): make the repository importable first
    import _as_file  # noqa: F401  (eval/_as_file.py)

import argparse
import gc
import math
import os
import re
from dataclasses import dataclass

from PIL import Image

from eval import checks
from sdpo import flags
from sdpo.files import (check_output_dir, file_identity, first_difference,
                        remove_stale_temps, write_json_atomic, write_text_atomic)
from eval.scorers import METRICS, SOURCES, build_scorer, parse_sources, scorer_identity
from sdpo.errors import InputError, first_line, reports_input_errors

SCORE_FORMAT = "sdpo-scores/1"
# The score files the reference's tools (utils/*_utils.py) write for a manifest X.json: X_<name>.json,
# a copy of the manifest's records. Only ImageReward's tool stores each image's score (in the field
# named here); the other four printed their mean and saved the records without scores.
REFERENCE_FILES = {"pickscore": ("pickscore", None), "hpsv2": ("hpsv2score", None), "aesthetics": ("aesscore", None),
                   "clip": ("clipscore", None), "imagereward": ("image_reward_score", "image_reward_score")}
UNVERIFIED = ("scores used unverified: the file holds no record of the scorer or of the images behind them "
              "(--recompute scores again)")
NO_SCORES = "holds no per-image scores"
# What the reference's scripts/eval/test_vs.sh writes per comparison: <outdir>/<A>_vs_<B>_<MMDD-HHMMSS>/
# pair_<metric>.json, each with "results": [{"prompt", "image_a", "image_b", "score_a", "score_b", ...}].
PAIR_FILE = re.compile(r"pair_(?P<metric>.*)\.json")
PAIR_FIELDS = {"prompt": str, "image_a": str, "image_b": str, "score_a": float, "score_b": float}


def score_path(manifest_path: str, metric: str) -> str:
    return f"{os.path.splitext(manifest_path)[0]}_{metric}.json"


def reference_score_path(manifest_path: str, metric: str) -> str:
    return f"{os.path.splitext(manifest_path)[0]}_{REFERENCE_FILES[metric][0]}.json"


def load_manifest(path: str, flag: str = "manifest") -> list[dict]:
    """A generation manifest: a non-empty JSON list of records with a string 'prompt' and
    'gen_image_path'. An empty one is refused: a mean over no images is not a score."""
    return checks.read_records(path, flag, "manifest", ("prompt", "gen_image_path"))


def resolve_image(path: str, manifest_path: str) -> str:
    """The image's path as written, else relative to the manifest (manifests travel with their folder)."""
    here = os.path.dirname(os.path.abspath(manifest_path))
    for candidate in (path, os.path.join(here, os.path.basename(os.path.dirname(path)), os.path.basename(path)),
                      os.path.join(here, path)):
        if path and os.path.isfile(candidate):
            return candidate
    raise InputError(f"{manifest_path}: image {path!r} not found")


def image_identities(records: list[dict], manifest_path: str, flag: str = "manifest") -> list[list[int]]:
    """[size, mtime_ns] of each record's image; every image must be there."""
    out = []
    for index, r in enumerate(records):
        try:
            out.append(file_identity(resolve_image(r["gen_image_path"], manifest_path)))
        except InputError:
            raise InputError(f"{flag} {manifest_path}: record {index}: image {r['gen_image_path']!r} not found "
                             f"(generate it again with eval.generate)") from None
    return out


def open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(f"unreadable image {path}: {first_line(err)} (generate it again with eval.generate)") from None


def is_video(path: str) -> bool:
    return path.lower().endswith(".mp4")


def open_frames(path: str) -> list[Image.Image]:
    """Every frame of a generated video (eval.generate writes mp4), as RGB images."""
    from sdpo.video import UnreadableVideo, read_frames

    try:
        return [Image.fromarray(frame) for frame in read_frames(path)]
    except UnreadableVideo as err:
        raise InputError(f"unreadable video {path}: {err} (generate it again with eval.generate)") from None


def chunk_scores(scorer, paths: list[str], prompts: list[str], batch: int) -> list[float]:
    """Scores of images; a video's score is the mean of its frames' scores (every frame, with the
    video's prompt)."""
    if not any(map(is_video, paths)):
        return [float(s) for s in scorer.score([open_image(p) for p in paths], prompts)]
    scores = []
    for path, prompt in zip(paths, prompts):
        frames = open_frames(path) if is_video(path) else [open_image(path)]
        per_frame = [float(s) for i in range(0, len(frames), batch)
                     for s in scorer.score(frames[i : i + batch], [prompt] * len(frames[i : i + batch]))]
        scores.append(sum(per_frame) / len(per_frame))
    return scores


def is_score(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def same_records(scored, records: list[dict]) -> str | None:
    """Why the records of a score file are not those of the manifest (the same prompts and image
    paths, in the same order); None if they are."""
    if not isinstance(scored, list) or len(scored) != len(records):
        return "made for another manifest (a different number of records)"
    for index, (s, r) in enumerate(zip(scored, records)):
        if not isinstance(s, dict):
            return f"made for another manifest (record {index} is not an object)"
        for field, what in (("prompt", "prompt"), ("gen_image_path", "image path")):
            if s.get(field) != r[field]:
                return f"made for another manifest (record {index}'s {what} differs)"
    return None


def stale_reason(content, metric: str, records: list[dict], images: list, identity: dict) -> str | None:
    """Why a score file of our format cannot serve these records, images and scorer; None if it can."""
    if not isinstance(content, dict) or content.get("format") != SCORE_FORMAT:
        return "not a score file of this version"
    if content.get("metric") != metric:
        return f"made for metric {content.get('metric')!r}"
    diff = first_difference(content.get("scorer"), identity)
    if diff:
        return f"made by another scorer ({diff})"
    scored = content.get("records")
    other = same_records(scored, records)
    if other:
        return other
    for index, s in enumerate(scored):
        if not is_score(s.get("score")):
            return f"record {index} has no score"
    old = content.get("images")
    if not isinstance(old, list) or len(old) != len(images):
        return "no identity of the images it scored"
    changed = [i for i, (a, b) in enumerate(zip(old, images)) if a != b]
    if changed:
        return (f"{len(changed)} of {len(images)} images changed since it was made (size or modification time; "
                f"first: {records[changed[0]]['gen_image_path']})")
    return None


def unrecorded_scores(content: list, records: list[dict], field: str):
    """A score file without a record (a JSON list of scored records: our older format, or the
    reference's): (the manifest's records with their scores, None) when its records are the
    manifest's and each has a finite number in `field`; else (None, why not)."""
    other = same_records(content, records)
    if other:
        return None, other
    for index, s in enumerate(content):
        if not is_score(s.get(field)):
            return None, f"record {index} has no numeric {field!r}"
    return [{**r, "score": float(s[field])} for r, s in zip(records, content)], None


def found_score_file(manifest_path: str, metric: str) -> tuple[str, str | None] | None:
    """(path, score field) of this manifest's score file for the metric: ours, X_<metric>.json
    (whose older format keeps each score in "score"), else the reference's, with the field where
    its tool keeps the score (None: it kept none). None when there is neither."""
    for path, field in ((score_path(manifest_path, metric), "score"),
                        (reference_score_path(manifest_path, metric), REFERENCE_FILES[metric][1])):
        if os.path.exists(path):
            return path, field
    return None


def score_file_scores(path: str, field: str | None, manifest_path: str, metric: str, records: list[dict],
                      images: list, identity: dict) -> tuple[list[dict] | None, str | None]:
    """What one score file gives: (scored records, None) when it has our record of this scorer and
    these images; (scored records, a warning) when it has no record but its records are the
    manifest's, each with a score; else (None, why it cannot serve)."""
    try:
        content = checks.read_json(path, "score file")
    except InputError as err:
        return None, f"unreadable ({err})"
    if isinstance(content, list):
        if field is None or not any(isinstance(s, dict) and field in s for s in content):
            if path == reference_score_path(manifest_path, metric):
                return None, f"{NO_SCORES} (the reference's tool printed only the mean)"
            return None, NO_SCORES
        scored, why = unrecorded_scores(content, records, field)
        if scored is None:
            return None, why
        return scored, f"warning: {path}: {UNVERIFIED}"
    reason = stale_reason(content, metric, records, images, identity)
    return (None, reason) if reason else (content["records"], None)


def cached_scores(manifest_path: str, metric: str, records: list[dict], images: list, identity: dict,
                  recompute: bool = False, pair_scores: dict | None = None) -> tuple[list[dict] | None, str | None]:
    """(scored records, the lines to print about them), without scoring:
    - from this manifest's score file (see score_file_scores), when it can serve;
    - else from the reference's pair files (`pair_scores`, see read_pair_scores), when they hold
      every image of the manifest with its prompt, with a warning that they are unverified;
    - else (None, why the metric is scored); (None, None) when there is nothing to reuse.
    --recompute reuses nothing."""
    found = found_score_file(manifest_path, metric)
    if recompute:
        return None, f"{found[0]}: --recompute; scoring again" if found else None
    lines, action = [], "; scoring again"
    if found:
        scored, why = score_file_scores(*found, manifest_path, metric, records, images, identity)
        if scored is not None:
            return scored, why
        lines.append(f"{found[0]}: {why}")
        if found[0] == reference_score_path(manifest_path, metric) and why.startswith(NO_SCORES):
            action = ": scoring"  # it never held scores: nothing is scored "again"
    if pair_scores is not None:
        scored, why = scores_from_pairs(manifest_path, metric, records, pair_scores)
        if scored is not None:
            return scored, "\n".join(lines + [why])
        lines.append(f"{manifest_path}: {metric}: not taken from the reference's pair files (--scores_from): {why}")
        action = "; scoring"
    return None, "\n".join(lines) + action if lines else None


# ---- the reference's pair files as a score source -----------------------------------------------


@dataclass(frozen=True)
class PairScore:
    """One image's score in a pair file: the score, the prompt it was scored with, the file."""
    score: float
    prompt: str
    path: str


def image_key(path: str) -> str:
    """An image path as a key: the file's real path when it exists here, else the path as written."""
    return os.path.realpath(path) if os.path.isfile(path) else path


def pair_files(paths: list[str], flag: str = "--scores_from") -> list[str]:
    """The pair files named: each given file, and every pair_*.json under each given folder."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                            for name in names if name.startswith("pair_") and name.endswith(".json"))
            checks.check(bool(inside), f"{flag} {path}: no pair_<metric>.json file under this folder")
            found += inside
        else:
            found.append(path)
    return list({os.path.realpath(p): p for p in found}.values())  # a file given twice is read once


def read_pair_file(path: str, flag: str = "--scores_from") -> tuple[str, list[dict]]:
    """(metric, results) of one of the reference's pair_<metric>.json files; anything else is refused
    in one line."""
    name = PAIR_FILE.fullmatch(os.path.basename(path))
    checks.check(name is not None and name["metric"] in METRICS,
                 f"{flag} {path}: not a pair file of the reference's test_vs.sh (the name must be "
                 f"pair_<metric>.json, metric one of {', '.join(METRICS)})")
    content = checks.read_json(path, flag)

    def refuse(why):
        raise InputError(f"{flag} {path}: not a pair file of the reference's test_vs.sh ({why})")

    if not isinstance(content, dict):
        refuse(f"a JSON {type(content).__name__}, not an object")
    for key in ("model_a", "model_b"):
        if not isinstance(content.get(key), str):
            refuse(f"no {key!r} label")
    results = content.get("results")
    if not isinstance(results, list) or not results:
        refuse("no 'results' list of pairs")
    for index, r in enumerate(results):
        if not isinstance(r, dict):
            refuse(f"result {index} is not an object")
        for key, kind in PAIR_FIELDS.items():
            if not (is_score(r.get(key)) if kind is float else isinstance(r.get(key), str) and r[key]):
                refuse(f"result {index} has no {'numeric' if kind is float else 'text'} {key!r}")
    return name["metric"], results


# The same image scored in two of the reference's comparisons (a base model's, say) went through
# the scorer in other batches, and GPU arithmetic depends on the batch: scores this close are one.
PAIR_SCORE_TOLERANCE = 1e-3  # relative to max(1, |score|)


def read_pair_scores(paths: list[str], flag: str = "--scores_from") -> dict[str, dict[str, PairScore]] | None:
    """{metric: {image key: PairScore}} from the reference's pair files: both sides of every pair.
    An image scored in several files keeps the first file's score (in path order) when the others
    agree within PAIR_SCORE_TOLERANCE, with one line saying by how much they differed; an image given
    scores further apart, or two prompts, for one metric is refused in one line. None when no path
    is given."""
    if not paths:
        return None
    table: dict[str, dict[str, PairScore]] = {}
    largest = {}  # metric: the largest difference accepted
    for path in pair_files(paths, flag):
        metric, results = read_pair_file(path, flag)
        scores = table.setdefault(metric, {})
        for r in results:
            for side in ("a", "b"):
                image, new = r[f"image_{side}"], PairScore(float(r[f"score_{side}"]), r["prompt"], path)
                old = scores.setdefault(image_key(image), new)
                gap = abs(old.score - new.score)
                checks.check(gap <= PAIR_SCORE_TOLERANCE * max(1.0, abs(old.score)),
                             f"{flag}: image {image} has two {metric} scores: {old.score!r} in {old.path} and "
                             f"{new.score!r} in {new.path} (more than batch-to-batch rounding apart)")
                checks.check(old.prompt == new.prompt, f"{flag}: image {image} has two {metric} prompts: "
                                                       f"{old.prompt!r} in {old.path} and {new.prompt!r} in {new.path}")
                if gap:
                    largest[metric] = max(largest.get(metric, 0.0), gap)
    for metric, gap in sorted(largest.items()):
        print(f"{flag}: some images have {metric} scores in several pair files that differ by up to {gap:.3g} "
              f"(the scorer's batches differed); the first file's are used")
    return table


def scores_from_pairs(manifest_path: str, metric: str, records: list[dict],
                      pair_scores: dict[str, dict[str, PairScore]]) -> tuple[list[dict] | None, str]:
    """(the manifest's records with their scores from the pair files, a warning that they are
    unverified) when every record's image (as written, or resolved as resolve_image resolves it) has
    a score there, given with the record's prompt; else (None, why not)."""
    scores = pair_scores.get(metric, {})
    if not scores:
        return None, f"no pair_{metric}.json among them"
    found = []
    for index, r in enumerate(records):
        entry = scores.get(image_key(r["gen_image_path"]))
        if entry is None:
            try:
                entry = scores.get(os.path.realpath(resolve_image(r["gen_image_path"], manifest_path)))
            except InputError:
                pass
        if entry is None:
            return None, f"record {index}: image {r['gen_image_path']} is in none of them"
        found.append(entry)
    # The same test as for a score file without a record: the records' prompts and scores.
    scored, why = unrecorded_scores([{"prompt": e.prompt, "gen_image_path": r["gen_image_path"], "score": e.score}
                                     for r, e in zip(records, found)], records, "score")
    if scored is None:
        return None, why
    files = sorted({e.path for e in found})
    return scored, (f"warning: {manifest_path}: {metric} scores taken from the reference's pair "
                    f"file{'s' if len(files) > 1 else ''} {', '.join(files)}: {UNVERIFIED}")


def score_manifest(manifest_path: str, metric: str, scorer, records: list[dict], images: list,
                   identity: dict) -> list[dict]:
    """Score one manifest's records and write X_<metric>.json atomically, with what produced it."""
    from tqdm.auto import tqdm

    scored = []
    batch = max(1, getattr(scorer, "batch_size", 16))
    for i in tqdm(range(0, len(records), batch), desc=f"{metric}: {os.path.basename(manifest_path)}", unit="batch"):
        chunk = records[i : i + batch]
        scores = chunk_scores(scorer, [resolve_image(r["gen_image_path"], manifest_path) for r in chunk],
                              [r["prompt"] for r in chunk], batch)
        scored += [{**r, "score": float(s)} for r, s in zip(chunk, scores)]
    write_json_atomic(score_file(metric, identity, images, scored), score_path(manifest_path, metric))
    return scored


def score_file(metric: str, identity: dict, images: list, scored: list[dict]) -> dict:
    """A score file's content: the scored records with what produced them (see the module's doc)."""
    return {"format": SCORE_FORMAT, "metric": metric, "scorer": identity, "images": images, "records": scored}


def scorer_factory(metrics, device, batch_size, sources, flag="--source"):
    """Yield (metric, scorer) one at a time, freeing each model before loading the next."""
    for metric in metrics:
        scorer = build_scorer(metric, device=device, batch_size=batch_size, flag=flag, **sources.get(metric, {}))
        yield metric, scorer
        del scorer
        gc.collect()


def collect_scores(manifests, metrics, device, batch_size, sources, recompute: bool = False,
                   flag_names: dict[str, str] | None = None,
                   pair_scores: dict | None = None) -> dict[tuple[str, str], list[dict]]:
    """{(manifest, metric): scored records}. Every manifest and image is checked first; what
    cached_scores can reuse (score files, the reference's pair files in `pair_scores`) is reused,
    the rest is scored (with a line saying why), each model loaded once for every manifest that
    needs it. `flag_names` names the option that gave each manifest, for error messages."""
    flag_names = flag_names or {}
    records = {m: load_manifest(m, flag_names.get(m, "manifest")) for m in manifests}
    images = {m: image_identities(records[m], m, flag_names.get(m, "manifest")) for m in manifests}
    for folder in sorted({os.path.dirname(os.path.abspath(m)) for m in manifests}):
        removed = remove_stale_temps(folder)
        if removed:
            print(f"removed {len(removed)} temporary file(s) left in {folder} by an interrupted run")
    identities = {metric: scorer_identity(metric, sources.get(metric, {})) for metric in metrics}
    scored = {}
    for metric in metrics:
        for m in manifests:
            scored[(m, metric)], note = cached_scores(m, metric, records[m], images[m], identities[metric], recompute,
                                                      pair_scores)
            if note:
                print(note)
    missing = [metric for metric in metrics if any(scored[(m, metric)] is None for m in manifests)]
    for metric, scorer in scorer_factory(missing, device, batch_size, sources):
        for m in manifests:
            if scored[(m, metric)] is None:
                scored[(m, metric)] = score_manifest(m, metric, scorer, records[m], images[m], identities[metric])
    return scored


def score_all(manifests, metrics, device, batch_size, sources, recompute: bool = False,
              flag_names: dict[str, str] | None = None, pair_scores: dict | None = None) -> dict[str, dict[str, float]]:
    """Mean score per manifest and metric (every manifest holds at least one record)."""
    scored = collect_scores(manifests, metrics, device, batch_size, sources, recompute, flag_names, pair_scores)
    return {m: {metric: sum(r["score"] for r in scored[(m, metric)]) / len(scored[(m, metric)])
                for metric in metrics} for m in manifests}


def markdown_table(means: dict[str, dict[str, float]], metrics) -> str:
    lines = ["| suite | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for manifest, row in means.items():
        name = os.path.splitext(os.path.basename(manifest))[0]
        lines.append(f"| {name} | " + " | ".join(f"{row[m]:.4f}" if m in row else "-" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def table_json(means: dict[str, dict[str, float]], metrics) -> dict:
    """The table's numbers: per manifest (a row of the markdown table, in its order) the suite
    name, the manifest's absolute path, its number of images and the mean of each metric."""
    return {"metrics": list(metrics),
            "rows": [{"suite": os.path.splitext(os.path.basename(m))[0], "manifest": os.path.abspath(m),
                      "images": len(load_manifest(m)), "means": {metric: row[metric] for metric in metrics}}
                     for m, row in means.items()]}


def write_table(means: dict[str, dict[str, float]], metrics, path: str) -> str:
    """The table as markdown at `path` and as JSON (table_json) beside it, both written
    atomically; returns the JSON's path."""
    write_text_atomic(markdown_table(means, metrics), path)
    json_path = os.path.splitext(path)[0] + ".json"
    write_json_atomic(table_json(means, metrics), json_path)
    return json_path


def check_scoring_flags(metrics, batch_size: int, sources: list[str], batch_flag: str = "--batch_size"):
    """The scoring flags every command shares; returns the parsed sources."""
    checks.distinct(metrics, "--metrics")
    checks.at_least_one(batch_size, batch_flag)
    return parse_sources(sources)


def add_scores_from_flag(p) -> None:
    p.add_argument("--scores_from", action="append", default=[], metavar="PATH",
                   help="the reference's pair_<metric>.json files (test_vs.sh's output), or folders searched for "
                        "them: per-image scores for manifests without a usable score file, used unverified "
                        "(repeatable)")


def add_scoring_flags(p, batch_flag: str = "--batch_size") -> None:
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument(batch_flag, type=int, default=16, help="images per scoring batch")
    p.add_argument("--source", action="append", default=[], metavar="METRIC.FIELD=VALUE",
                   help="model source override, e.g. pickscore.model=/models/PickScore_v1 (repeatable); "
                        + "; ".join(f"{m}: {', '.join(fields)}" for m, fields in SOURCES.items()))


@reports_input_errors
def main(argv=None):
    p = checks.Parser(prog="python -m eval.score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifests", nargs="+", help="generation manifests (X.json)")
    add_scoring_flags(p)
    add_scores_from_flag(p)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--table", default=None, help="markdown table path (default: summary.md beside the first manifest)")
    p.add_argument("--recompute", action="store_true",
                   help="score everything again, reusing no score file (nor --scores_from)")
    args = p.parse_args(argv)
    sources = check_scoring_flags(args.metrics, args.batch_size, args.source)
    device = flags.device(args.device)
    pair_scores = read_pair_scores(args.scores_from)
    for m in args.manifests:
        load_manifest(m)  # before anything else is made or loaded
        check_output_dir(os.path.dirname(os.path.abspath(m)), "the manifest's folder (where score files go)")
    path = args.table or os.path.join(os.path.dirname(os.path.abspath(args.manifests[0])), "summary.md")
    flags.output_file(path, "--table")
    means = score_all(args.manifests, args.metrics, device, args.batch_size, sources, args.recompute,
                      pair_scores=pair_scores)
    print(markdown_table(means, args.metrics))
    json_path = write_table(means, args.metrics, path)
    print(f"table: {path} and {json_path}")
    return means


if __name__ == "__main__":
    main()
