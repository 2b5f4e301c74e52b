"""Compare two checkpoints' generations by per-prompt win rates, with their uncertainty.

    python -m eval.versus --json_a A.json --json_b B.json --label_a A --label_b B [--outdir DIR]

For each metric:
- scores come from X_<metric>.json files already computed, and only what is missing is scored;
- images pair by prompt, with duplicate prompts paired in order;
- wins, losses and ties are counted (a tie counts 0.5), and the win rate of A is reported;
- beyond the reference, a 95% bootstrap interval of that win rate (pairs resampled, fixed seed)
  and a two-sided sign test p-value (ties left out).

Score files are reused as eval.score reuses them (those without a record of the scorer and images,
such as the reference's X_image_reward_score.json, with a warning), and so are the per-image scores
in the reference's pair_<metric>.json files given with --scores_from (a file, or a folder searched
for them): a manifest without a usable score file takes them, unverified, with a warning, when they
hold every one of its images with its prompt. --recompute scores everything again.

Outputs in --outdir (each written atomically):
- pair_<metric>.json, and summary.json with the macro mean (unweighted over metrics) and the
  micro mean (weighted by pairs) of the win rates;
- the table, printed;
- winrates.png, a chart of the win rates with their intervals;
- index.html, the prompts with the largest score gaps per metric, A's and B's images side by side.
"""

from __future__ import annotations

if not __package__:  # run as a file (python eval/X.py): make the repository importable first
    import _as_file  # noqa: F401  (eval/_as_file.py)

import argparse
import html
import math
import os
from collections import defaultdict
from fractions import Fraction

import numpy as np

from eval import checks
from sdpo import flags
from sdpo.files import atomic_path, check_output_dir, remove_stale_temps, write_json_atomic, write_text_atomic
from eval.score import (add_scores_from_flag, add_scoring_flags, check_scoring_flags, collect_scores, load_manifest,
                        read_pair_scores, resolve_image)
from sdpo.errors import InputError, reports_input_errors

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0


# ---- statistics (pure) -------------------------------------------------------------------------


def pair_by_prompt(records_a: list[dict], records_b: list[dict]):
    """Pairs (a, b) of records with the same prompt: prompts in sorted order (as the reference),
    duplicates paired in their order of appearance. Returns (pairs, number of unpaired records)."""
    by_a, by_b = defaultdict(list), defaultdict(list)
    for r in records_a:
        by_a[r["prompt"]].append(r)
    for r in records_b:
        by_b[r["prompt"]].append(r)
    pairs, unpaired = [], 0
    for prompt in sorted(set(by_a) | set(by_b)):
        list_a, list_b = by_a.get(prompt, []), by_b.get(prompt, [])
        pairs += list(zip(list_a, list_b))
        unpaired += abs(len(list_a) - len(list_b))
    return pairs, unpaired


def outcomes(scores_a, scores_b) -> np.ndarray:
    """Per pair: 1 if A wins, 0 if B wins, 0.5 for a tie."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def bootstrap_interval(results: np.ndarray, samples=BOOTSTRAP_SAMPLES, seed=BOOTSTRAP_SEED, level=0.95):
    """Percentile bootstrap interval of the mean outcome (the win rate), resampling pairs."""
    if len(results) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // len(results))  # bounded memory for large suites
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        means[start : start + n] = results[rng.integers(0, len(results), size=(n, len(results)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a result at least as lopsided | A and B equally likely to win).
    Ties are left out."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n))) if 2 * k != n else 1.0  # exact for any n


def compare(scored_a: list[dict], scored_b: list[dict], label_a: str, label_b: str) -> dict:
    """The pair_<metric>.json content for two score lists."""
    pairs, unpaired = pair_by_prompt(scored_a, scored_b)
    if not pairs:
        raise InputError("the two manifests have no prompt in common")
    sa = [a["score"] for a, _ in pairs]
    sb = [b["score"] for _, b in pairs]
    result = outcomes(sa, sb)
    wins_a, wins_b = int((result == 1).sum()), int((result == 0).sum())
    ties = len(pairs) - wins_a - wins_b
    low, high = bootstrap_interval(result)
    return {
        "model_a": label_a, "model_b": label_b, "total_pairs": len(pairs), "unpaired": unpaired,
        "wins_a": wins_a, "wins_b": wins_b, "ties": ties, "ties_policy": "half",
        "win_rate_a_over_b": float(result.mean()), "win_rate_ci95": [low, high],
        "sign_test_p": sign_test(wins_a, wins_b),
        "mean_score_a": float(np.mean(sa)), "mean_score_b": float(np.mean(sb)),
        "results": [{"pair_index": i, "prompt": a["prompt"], "image_a": a["gen_image_path"],
                     "image_b": b["gen_image_path"], "score_a": a["score"], "score_b": b["score"],
                     "winner": label_a if r == 1 else label_b if r == 0 else "tie"}
                    for i, ((a, b), r) in enumerate(zip(pairs, result))],
    }


def summarize(pair_results: dict[str, dict]) -> dict:
    rows = [{"metric": m, **{k: v for k, v in d.items() if k != "results"}} for m, d in pair_results.items()]
    total = sum(r["total_pairs"] for r in rows)
    return {
        "pair": {"model_a": rows[0]["model_a"], "model_b": rows[0]["model_b"], "ties_policy": "half"},
        "metrics": rows,
        "averages": {
            "macro_win_rate_a_over_b": sum(r["win_rate_a_over_b"] for r in rows) / len(rows),
            "micro_win_rate_a_over_b": sum(r["win_rate_a_over_b"] * r["total_pairs"] for r in rows) / total,
        },
    }


# ---- presentation ----------------------------------------------------------------------------


def table(summary: dict) -> str:
    pair = summary["pair"]
    lines = [f"{pair['model_a']} (A) vs {pair['model_b']} (B); a tie counts 0.5", "",
             "| metric | A mean | B mean | A win rate | 95% CI | sign-test p | A wins/ties/B wins | pairs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["metrics"]:
        low, high = r["win_rate_ci95"]
        lines.append(f"| {r['metric']} | {r['mean_score_a']:.4f} | {r['mean_score_b']:.4f} | "
                     f"{100 * r['win_rate_a_over_b']:.1f}% | [{100 * low:.1f}, {100 * high:.1f}] | "
                     f"{r['sign_test_p']:.3g} | {r['wins_a']}/{r['ties']}/{r['wins_b']} | {r['total_pairs']} |")
    avg = summary["averages"]
    lines += ["", f"macro mean win rate (unweighted over metrics): {100 * avg['macro_win_rate_a_over_b']:.1f}%",
              f"micro mean win rate (weighted by pairs):       {100 * avg['micro_win_rate_a_over_b']:.1f}%"]
    return "\n".join(lines) + "\n"


def chart(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["metrics"]
    rates = [100 * r["win_rate_a_over_b"] for r in rows]
    low = [rate - 100 * r["win_rate_ci95"][0] for rate, r in zip(rates, rows)]
    high = [100 * r["win_rate_ci95"][1] - rate for rate, r in zip(rates, rows)]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2.5, 3.8))
    ax.bar([r["metric"] for r in rows], rates, color="tab:blue", yerr=[low, high], capsize=6)
    ax.axhline(50, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"win rate of {summary['pair']['model_a']} (%)")
    ax.set_title(f"{summary['pair']['model_a']} vs {summary['pair']['model_b']} (95% bootstrap intervals)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def summary_html(summary: dict) -> str:
    """The summary table as HTML (the same numbers as `table`)."""
    head = ["metric", "A mean", "B mean", "A win rate", "95% CI", "sign-test p", "A wins / ties / B wins", "pairs"]
    rows = []
    for r in summary["metrics"]:
        low, high = r["win_rate_ci95"]
        cells = [r["metric"], f"{r['mean_score_a']:.4f}", f"{r['mean_score_b']:.4f}",
                 f"{100 * r['win_rate_a_over_b']:.1f}%", f"[{100 * low:.1f}, {100 * high:.1f}]",
                 f"{r['sign_test_p']:.3g}", f"{r['wins_a']} / {r['ties']} / {r['wins_b']}", str(r["total_pairs"])]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    avg = summary["averages"]
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"
            f"<p>A tie counts 0.5. Mean win rate over metrics: {100 * avg['macro_win_rate_a_over_b']:.1f}% "
            f"(macro), {100 * avg['micro_win_rate_a_over_b']:.1f}% (micro, weighted by pairs).</p>")


def html_page(pair_results: dict[str, dict], summary: dict, outdir: str, manifests: tuple[str, str], top=8) -> str:
    label_a, label_b = summary["pair"]["model_a"], summary["pair"]["model_b"]

    def img(path, manifest):
        try:
            rel = os.path.relpath(resolve_image(path, manifest), outdir)
        except InputError:
            return "<em>missing</em>"
        return f'<img src="{html.escape(rel)}" loading="lazy">'

    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(label_a)} vs {html.escape(label_b)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}"
             "img{width:256px;height:256px;object-fit:contain;image-rendering:pixelated}"
             "td{vertical-align:top;padding:4px}table{border-collapse:collapse}th,td{border-bottom:1px solid #ddd}"
             ".win{color:#1a7f37;font-weight:bold}</style>",
             f"<h1>{html.escape(label_a)} (A) vs {html.escape(label_b)} (B)</h1>",
             summary_html(summary), "<img src='winrates.png' style='width:auto;height:auto'>"]
    for metric, d in pair_results.items():
        rows = sorted(d["results"], key=lambda r: -abs(r["score_a"] - r["score_b"]))[:top]
        parts.append(f"<h2>{html.escape(metric)}: the {len(rows)} largest gaps</h2><table>"
                     f"<tr><th>prompt</th><th>A: {html.escape(label_a)}</th><th>B: {html.escape(label_b)}</th></tr>")
        for r in rows:
            ca = "win" if r["score_a"] > r["score_b"] else ""
            cb = "win" if r["score_b"] > r["score_a"] else ""
            parts.append(f"<tr><td>{html.escape(r['prompt'])}</td>"
                         f"<td>{img(r['image_a'], manifests[0])}<br><span class='{ca}'>{r['score_a']:.4f}</span></td>"
                         f"<td>{img(r['image_b'], manifests[1])}<br><span class='{cb}'>{r['score_b']:.4f}</span></td></tr>")
        parts.append("</table>")
    path = os.path.join(outdir, "index.html")
    write_text_atomic("\n".join(parts), path)
    return path


# ---- the command -------------------------------------------------------------------------------


def versus(json_a, json_b, label_a, label_b, outdir, metrics, device, batch_size, sources,
           recompute: bool = False, pair_scores: dict | None = None) -> dict:
    for path, flag in ((json_a, "--json_a"), (json_b, "--json_b")):
        load_manifest(path, flag)  # fail early, naming the flag and the file
    check_output_dir(outdir, "--outdir")
    remove_stale_temps(outdir)
    scored = collect_scores([json_a, json_b], metrics, device, batch_size, sources, recompute,
                            flag_names={json_a: "--json_a", json_b: "--json_b"}, pair_scores=pair_scores)
    pair_results = {}
    for metric in metrics:
        pair_results[metric] = compare(scored[(json_a, metric)], scored[(json_b, metric)], label_a, label_b)
        write_json_atomic(pair_results[metric], os.path.join(outdir, f"pair_{metric}.json"))
    summary = summarize(pair_results)
    write_json_atomic(summary, os.path.join(outdir, "summary.json"))
    print(table(summary))
    chart(summary, os.path.join(outdir, "winrates.png"))
    page = html_page(pair_results, summary, outdir, (json_a, json_b))
    print(f"summary: {os.path.join(outdir, 'summary.json')}\nchart: {os.path.join(outdir, 'winrates.png')}\npage: {page}")
    return summary


@reports_input_errors
def main(argv=None):
    p = checks.Parser(prog="python -m eval.versus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json_a", required=True, help="manifest of model A")
    p.add_argument("--json_b", required=True, help="manifest of model B")
    p.add_argument("--label_a", default=None)
    p.add_argument("--label_b", default=None)
    p.add_argument("--outdir", default=None, help="default: versus/<label_a>_vs_<label_b>")
    add_scoring_flags(p)
    add_scores_from_flag(p)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--recompute", action="store_true",
                   help="score everything again, reusing no score file (nor --scores_from)")
    args = p.parse_args(argv)
    sources = check_scoring_flags(args.metrics, args.batch_size, args.source)
    device = flags.device(args.device)
    for flag in ("--label_a", "--label_b"):
        value = getattr(args, flag[2:])
        checks.check(value is None or value.strip() != "", f"{flag}: an empty label")
    checks.check(os.path.abspath(args.json_a) != os.path.abspath(args.json_b),
                 f"--json_a and --json_b are the same manifest ({args.json_a}): compare two models' manifests")
    label_a = args.label_a or os.path.splitext(os.path.basename(args.json_a))[0] + "_A"
    label_b = args.label_b or os.path.splitext(os.path.basename(args.json_b))[0] + "_B"
    outdir = args.outdir or os.path.join("versus", f"{label_a}_vs_{label_b}".replace(os.sep, "_"))
    pair_scores = read_pair_scores(args.scores_from)
    return versus(args.json_a, args.json_b, label_a, label_b, outdir, args.metrics, device, args.batch_size,
                  sources, args.recompute, pair_scores)


if __name__ == "__main__":
    main()
