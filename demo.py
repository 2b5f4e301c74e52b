"""The built-in demo: the safeguard's effect on tiny random models, on CPU, in a few minutes.

It builds a tiny random SD1.5-style pipeline and a synthetic Pick-a-Pic dataset offline, trains
Diffusion-DPO, DSPO and DMPO each with and without the winner-preserving safeguard through the
real `accelerate launch train.py`, and plots the winner's and the loser's loss relative to the
reference over the steps: the paper's central claim (without the safeguard the winner's loss
can rise with the loser's; with it, it should not) made visible. Then the same for a tiny
flow-matching model (an SD3-style pipeline: MMDiT transformer, rectified flow, velocity target):
Diffusion-DPO with and without the safeguard, plotted alike (safeguard_flow.png).

It plots the mean importance weight against the timestep (the importance-sampled DPO paper's
central figure) for the trained SD1.5-style model, on dataset pairs and on its own samples
(importance_weights.png). It then generates with the base and a trained model, scores both with tiny random reward models,
and compares them (tables, a win-rate chart and an HTML page), exercising the evaluation harness.

The models and the reward models are random and the data synthetic: the curves illustrate the
mechanism and the tables show that the harness works; they say nothing about image quality.

    python demo.py --out demo_output        (scripts/demo.sh sets up the environment and runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from sdpo.errors import ArgumentParser, InputError, reports_input_errors
from sdpo.files import check_output_dir
from sdpo.flags import no_empty_values

ROOT = os.path.dirname(os.path.abspath(__file__))

# Per objective: its beta on this toy problem (the papers' values are for real models and data).
OBJECTIVES = {"diffusion-dpo": ["--beta_dpo", "5000"],
              "dspo": ["--beta_dpo", "1"],
              "dmpo": ["--beta_dpo", "5000", "--dmpo_alpha", "0.01"]}
MU = 0.9


def train_run(model, data, out, method, safeguard, steps, seed, lr="2e-4"):
    """One `accelerate launch train.py` on CPU; returns its metrics (one dict per step)."""
    metrics = os.path.join(out, "metrics.jsonl")
    if not any(os.path.exists(os.path.join(out, folder, "config.json")) for folder in ("unet", "transformer")):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", str(os.cpu_count() or 1), os.path.join(ROOT, "train.py"),
               "--pretrained_model_name_or_path", model, "--dataset_name", data, "--output_dir", out,
               "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", str(steps),
               "--learning_rate", lr, "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
               "--checkpointing_steps", "0", "--mixed_precision", "no", "--seed", str(seed),
               "--report_to", "tensorboard", "--resume_from_checkpoint", "",
               "--train_method", method, *OBJECTIVES.get(method, [])]
        if safeguard:
            cmd += ["--use_winner_preserving", "--winner_preserving_mu", str(MU)]
        if os.path.exists(metrics):
            os.remove(metrics)
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        if result.returncode != 0:
            sys.exit(f"training failed:\n{result.stderr[-4000:]}")
    with open(metrics) as f:
        return [json.loads(line) for line in f]


def warm_start(paths, out, steps, seed, family="sd15"):
    """A base that already denoises: the tiny pipeline with its denoiser fine-tuned (SFT) on the data.

    A random reference makes any step toward the data lower both losses, which hides what the
    objectives do; starting the preference runs from a trained denoiser shows it.
    """
    from sdpo import families

    folder = families.get(family).denoiser_folder
    base = os.path.join(out, "tiny", f"{family}-sft")
    if not os.path.exists(os.path.join(base, folder, "config.json")):
        sft = os.path.join(out, "runs", "sft-warm-start" if family == "sd15" else f"{family}-sft-warm-start")
        train_run(paths[family], paths["data"], sft, "sft", False, steps, seed, lr="1e-3")
        shutil.copytree(paths[family], base, ignore=shutil.ignore_patterns(folder), dirs_exist_ok=True)
        shutil.copytree(os.path.join(sft, folder), os.path.join(base, folder))
    return base


def smooth(values, weight=0.8):
    """Exponential moving average, as TensorBoard's smoothing slider."""
    out, last = [], values[0]
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot(results, path, steps, methods=tuple(OBJECTIVES), what="Tiny RANDOM models"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * max(len(methods), 2), 6.4), sharex=True, squeeze=False)
    for col, method in enumerate(methods):
        for row, (key, name) in enumerate([("winner_minus_ref", "winner"), ("loser_minus_ref", "loser")]):
            ax = axes[row][col]
            for safeguard, color, label in [(False, "tab:orange", "without safeguard"),
                                            (True, "tab:blue", f"with safeguard (mu = {MU})")]:
                series = results[(method, safeguard)]
                x = [m["step"] for m in series]
                y = [m[key] for m in series]
                ax.plot(x, y, color=color, alpha=0.2, linewidth=0.8)
                ax.plot(x, smooth(y), color=color, label=label, linewidth=2)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_title(f"{method}: {name} loss - reference")
            if row == 1:
                ax.set_xlabel("optimizer step")
            if col == 0:
                ax.set_ylabel(f"{name} MSE minus reference MSE")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{what} (briefly SFT-trained) on synthetic pairs, {steps} steps each:\n"
                 "an illustration of the mechanism, not a result", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = ArgumentParser(prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "demo_output"), help="where models, runs and the plot go")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warm_start_steps", type=int, default=150, help="SFT steps that make the base")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_flow", action="store_true", help="skip the flow-matching (SD3-style) part")
    args = parser.parse_args(argv)
    no_empty_values(args)
    for flag in ("steps", "warm_start_steps"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.seed < 2**32 - 1:  # train.py's range for one process
        raise InputError(f"--seed must lie in [0, 2**32 - 1), got {args.seed}")
    check_output_dir(args.out, "--out")
    return args


@reports_input_errors
def main(argv=None):
    args = parse_args(argv)

    from sdpo.tiny import build_all

    print("NOTE: every model in this demo is tiny and randomly initialised, and the data is synthetic.")
    print("      The numbers show how the objectives and the safeguard behave, not image quality.\n")
    paths = build_all(os.path.join(args.out, "tiny"), num_rows=96)
    print(f"tiny SD1.5-style pipeline: {paths['sd15']}\nsynthetic Pick-a-Pic data: {paths['data']}\n")
    started = time.time()
    base = warm_start(paths, args.out, args.warm_start_steps, args.seed)
    print(f"warm start: {args.warm_start_steps} SFT steps from random weights ({time.time() - started:.1f}s): {base}\n")
    results = preference_runs(base, paths["data"], args, OBJECTIVES)
    figure = os.path.join(args.out, "safeguard.png")
    plot(results, figure, args.steps, what="Tiny RANDOM SD1.5-style models")
    print(f"\nplot: {figure}")
    importance_figure(args.out, base, paths["data"], os.path.join(args.out, "runs", "diffusion-dpo-safeguard"))
    if not args.no_flow:
        started = time.time()
        flow_base = warm_start(paths, args.out, args.warm_start_steps, args.seed, family="sd3")
        print(f"\nflow matching: tiny SD3-style pipeline {paths['sd3']}; warm start "
              f"({time.time() - started:.1f}s): {flow_base}")
        flow = preference_runs(flow_base, paths["data"], args, ["diffusion-dpo"], prefix="sd3-")
        figure = os.path.join(args.out, "safeguard_flow.png")
        plot(flow, figure, args.steps, methods=["diffusion-dpo"],
             what="Tiny RANDOM SD3-style flow-matching models")
        print(f"plot: {figure}")
    print(f"runs (TensorBoard logs, metrics.jsonl, trained UNets): {os.path.join(args.out, 'runs')}")
    evaluate(args.out, base, os.path.join(args.out, "runs", "diffusion-dpo-safeguard"))


def importance_figure(out, base, data, trained):
    """The importance-sampled DPO paper's central figure on a trained tiny model: the mean importance
    weight against the timestep, for data pairs and for the model's own samples."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import importance_weights

    figure = os.path.join(out, "importance_weights.png")
    print("\nmean importance weight by timestep (Diffusion-DPO with the safeguard, the tiny SD1.5-style model):")
    importance_weights.main(["--pretrained_model_name_or_path", base, "--model", trained, "--dataset_name", data,
                             "--resolution", "32", "--num_pairs", "8", "--levels", "10", "--sampling_steps", "20",
                             "--device", "cpu", "--out", figure])


def preference_runs(base, data, args, methods, prefix=""):
    """Each objective with and without the safeguard from `base`; prints a line per run and
    returns {(method, safeguard): metrics}."""
    results = {}
    for method in methods:
        for safeguard in (False, True):
            name = f"{prefix}{method}{'-safeguard' if safeguard else ''}"
            started = time.time()
            series = train_run(base, data, os.path.join(args.out, "runs", name), method, safeguard, args.steps,
                               args.seed)
            results[(method, safeguard)] = series
            last = series[-10:]
            mean = lambda k: sum(m[k] for m in last) / len(last)  # noqa: E731
            print(f"{name:28s} {time.time() - started:5.1f}s   last 10 steps: winner-ref {mean('winner_minus_ref'):+.5f}"
                  f"  loser-ref {mean('loser_minus_ref'):+.5f}  implicit acc {mean('implicit_acc'):.2f}"
                  f"  loser scale {mean('loser_scale'):.3f}")
    return results


def evaluate(out, base, trained):
    """Generate with the base and a trained model, score with tiny random reward models, compare."""
    from eval.generate import main as generate
    from eval.prompts import record, write_suite
    from eval.score import markdown_table, score_all
    from eval.tiny import build_tiny_scorers
    from eval.versus import versus
    from sdpo.tiny import PLACES, THINGS, WORDS

    print("\n== evaluation ==")
    print("NOTE: the reward models below are tiny and RANDOM as well: their scores and win rates show that the\n"
          "      harness works end to end (generation, five-way scoring, pairing, intervals), nothing more.\n")
    from eval.scorers import METRICS

    sources = build_tiny_scorers(os.path.join(out, "tiny", "scorers"))
    metrics = [m for m in METRICS if m in sources]
    suite = os.path.join(out, "eval", "prompts", "papv2.json")
    write_suite([record(f"{w} {t} {p}") for w, t, p in zip(WORDS, THINGS, PLACES + PLACES)], suite)
    manifests = {}
    for label, ckpt in (("base", "base"), ("dpo-safeguard", trained)):
        manifests[label] = generate(["--unet_path", ckpt, "--pretrain_path", base, "--test_json", suite,
                                     "--output_path", os.path.join(out, "eval", label), "--height", "32",
                                     "--width", "32", "--steps", "20", "--batch_size", "8"])
    means = score_all(list(manifests.values()), metrics, "cpu", 16, sources)
    print("\nmean scores (rows: the two models' papv2-style manifests)\n")
    print(markdown_table({f"{label}: {os.path.basename(m)}": means[m] for label, m in manifests.items()}, metrics))
    versus(manifests["dpo-safeguard"], manifests["base"], "dpo-safeguard", "base", os.path.join(out, "eval", "versus"),
           metrics, "cpu", 16, sources)


if __name__ == "__main__":
    main()
