"""Score generation manifests with reward models, and tabulate the means.

    python -m eval.score out/papv2_seed0_512x512_50s_7.5cfg.json out/hpsv2_...json \
        [--metrics pickscore hpsv2 aesthetics clip] [--device cuda] [--batch_size 32] \
        [--source pickscore.model=/models/PickScore_v1 --source hpsv2.checkpoint=/models/HPS_v2_compressed.pt]

For each manifest X.json and metric M it writes X_M.json: the manifest's records, each with a
"score". A score file that already covers the manifest is reused, not recomputed. The table
(suites by metrics, means) is printed and saved as markdown (--table, default summary.md beside the
first manifest) and as JSON beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

from PIL import Image

from eval.files import write_json_atomic
from eval.scorers import METRICS, build_scorer
from sdpo.errors import InputError, reports_input_errors


def score_path(manifest_path: str, metric: str) -> str:
    return f"{os.path.splitext(manifest_path)[0]}_{metric}.json"


def load_manifest(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read manifest {path}: {err}") from err
    if not isinstance(records, list) or not all(isinstance(r, dict) and "prompt" in r and "gen_image_path" in r
                                                for r in records):
        raise InputError(f"{path}: expected a JSON list of records with 'prompt' and 'gen_image_path'")
    return records


def resolve_image(path: str, manifest_path: str) -> str:
    """The image's path as written, else relative to the manifest (manifests travel with their folder)."""
    here = os.path.dirname(os.path.abspath(manifest_path))
    for candidate in (path, os.path.join(here, os.path.basename(os.path.dirname(path)), os.path.basename(path)),
                      os.path.join(here, path)):
        if os.path.isfile(candidate):
            return candidate
    raise InputError(f"{manifest_path}: image {path} not found")


def open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as err:
        raise InputError(f"unreadable image {path}: {err}") from err


def cached_scores(manifest_path: str, metric: str, records: list[dict]) -> list[dict] | None:
    """The score file for this manifest, if it exists and covers the same prompts and images."""
    path = score_path(manifest_path, metric)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            scored = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    same = len(scored) == len(records) and all(
        s.get("prompt") == r["prompt"] and s.get("gen_image_path") == r["gen_image_path"] and "score" in s
        for s, r in zip(scored, records))
    return scored if same else None


def score_manifest(manifest_path: str, metric: str, scorer) -> list[dict]:
    """Score one manifest (or reuse its score file) and write X_<metric>.json atomically."""
    from tqdm.auto import tqdm

    records = load_manifest(manifest_path)
    cached = cached_scores(manifest_path, metric, records)
    if cached is not None:
        return cached
    scored = []
    batch = max(1, getattr(scorer, "batch_size", 16))
    for i in tqdm(range(0, len(records), batch), desc=f"{metric}: {os.path.basename(manifest_path)}", unit="batch"):
        chunk = records[i : i + batch]
        images = [open_image(resolve_image(r["gen_image_path"], manifest_path)) for r in chunk]
        scores = scorer.score(images, [r["prompt"] for r in chunk])
        scored += [{**r, "score": float(s)} for r, s in zip(chunk, scores)]
    write_json_atomic(scored, score_path(manifest_path, metric))
    return scored


def parse_sources(pairs: list[str]) -> dict[str, dict[str, str]]:
    """['pickscore.model=/x', ...] -> {'pickscore': {'model': '/x'}}."""
    sources: dict[str, dict[str, str]] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        metric, dot, field = key.partition(".")
        if not (sep and dot and metric in METRICS):
            raise InputError(f"--source {pair!r}: expected METRIC.FIELD=VALUE with METRIC in {', '.join(METRICS)}")
        sources.setdefault(metric, {})[field] = value
    return sources


def scorer_factory(metrics, device, batch_size, sources):
    """Yield (metric, scorer) one at a time, freeing each model before loading the next."""
    for metric in metrics:
        scorer = build_scorer(metric, device=device, batch_size=batch_size, **sources.get(metric, {}))
        yield metric, scorer
        del scorer
        gc.collect()


def collect_scores(manifests, metrics, device, batch_size, sources) -> dict[tuple[str, str], list[dict]]:
    """{(manifest, metric): scored records}: score files already there are reused; for what is
    missing, each model is loaded once and scores every manifest that needs it."""
    scored = {(m, metric): cached_scores(m, metric, load_manifest(m)) for m in manifests for metric in metrics}
    missing = [metric for metric in metrics if any(scored[(m, metric)] is None for m in manifests)]
    for metric, scorer in scorer_factory(missing, device, batch_size, sources):
        for m in manifests:
            if scored[(m, metric)] is None:
                scored[(m, metric)] = score_manifest(m, metric, scorer)
    return scored


def score_all(manifests, metrics, device, batch_size, sources) -> dict[str, dict[str, float]]:
    """Mean score per manifest and metric."""
    scored = collect_scores(manifests, metrics, device, batch_size, sources)
    return {m: {metric: sum(r["score"] for r in scored[(m, metric)]) / max(len(scored[(m, metric)]), 1)
                for metric in metrics} for m in manifests}


def markdown_table(means: dict[str, dict[str, float]], metrics) -> str:
    lines = ["| suite | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for manifest, row in means.items():
        name = os.path.splitext(os.path.basename(manifest))[0]
        lines.append(f"| {name} | " + " | ".join(f"{row[m]:.4f}" if m in row else "-" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


@reports_input_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifests", nargs="+", help="generation manifests (X.json)")
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--source", action="append", default=[], metavar="METRIC.FIELD=VALUE",
                   help="model source override, e.g. pickscore.model=/models/PickScore_v1 (repeatable)")
    p.add_argument("--table", default=None, help="markdown table path (default: summary.md beside the first manifest)")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    means = score_all(args.manifests, args.metrics, device, args.batch_size, parse_sources(args.source))
    table = markdown_table(means, args.metrics)
    print(table)
    path = args.table or os.path.join(os.path.dirname(os.path.abspath(args.manifests[0])), "summary.md")
    with open(path, "w") as f:
        f.write(table)
    write_json_atomic(means, os.path.splitext(path)[0] + ".json")
    print(f"table: {path}")
    return means


if __name__ == "__main__":
    main()
