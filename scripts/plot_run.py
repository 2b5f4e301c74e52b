"""Draw a run's training and validation curves from its metrics.jsonl.

    .venv/bin/python scripts/plot_run.py OUTPUT_DIR [--out FILE]    (default OUTPUT_DIR/curves.png)

Training values are drawn faintly per step with a moving average over them; validation values
(held-out pairs at fixed timesteps and noise, `--validation_pairs`) as points joined by lines. The
training loss of a diffusion preference objective is dominated by the random timestep of each
step, so the validation panels are the ones to read for progress.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sdpo.errors import ArgumentParser, InputError, reports_input_errors  # noqa: E402
from sdpo.flags import no_empty_values, output_file  # noqa: E402

PANELS = [  # (training key, validation key, title)
    ("loss", "val_loss", "loss"),
    ("implicit_acc", "val_implicit_acc", "implicit accuracy"),
    ("winner_minus_ref", "val_winner_minus_ref", "winner MSE - reference MSE"),
    ("loser_minus_ref", "val_loser_minus_ref", "loser MSE - reference MSE"),
    (None, "val_logit", "mean logit u (validation)"),
    ("grad_norm", None, "gradient norm before clipping"),
]


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise InputError(f"{path} not found: give a train.py output folder")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    if not rows:
        raise InputError(f"{path} holds no metrics")
    return rows


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot(rows: list[dict], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(k in r for r in rows for k in p[:2] if k)]
    cols = 3
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(5 * cols, 3.4 * ((len(panels) + 2) // 3)),
                             squeeze=False)
    for ax, (train_key, val_key, name) in zip(axes.flat, panels):
        if train_key:
            x, y = series(rows, train_key)
            if x:
                ax.plot(x, y, color="tab:orange", alpha=0.25, linewidth=0.8)
                ax.plot(x, moving_average(y, max(1, len(y) // 20)), color="tab:orange", label="training (moving avg)")
        if val_key:
            x, y = series(rows, val_key)
            if x:
                ax.plot(x, y, "o-", color="tab:blue", label="validation")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    parser = ArgumentParser(prog="scripts/plot_run.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a train.py output folder (holding metrics.jsonl)")
    parser.add_argument("--out", default=None,
                        help="the image to write: .png, .pdf, .svg, ... (default OUTPUT_DIR/curves.png)")
    args = parser.parse_args(argv)
    no_empty_values(args, positional=("output_dir",))
    if not os.path.isdir(args.output_dir):
        raise InputError(f"output_dir {args.output_dir}: {'a file' if os.path.exists(args.output_dir) else 'no such folder'}"
                         f", not a train.py output folder")
    if args.out is None:
        args.out = os.path.join(args.output_dir, "curves.png")
    from matplotlib.backend_bases import FigureCanvasBase

    output_file(args.out, "--out", tuple(f".{ext}" for ext in FigureCanvasBase.get_supported_filetypes()))
    return args


@reports_input_errors
def main(argv=None):
    args = parse_args(argv)
    rows = read_metrics(os.path.join(args.output_dir, "metrics.jsonl"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(rows, args.out, os.path.basename(os.path.abspath(args.output_dir)))
    print(f"curves: {args.out}")


if __name__ == "__main__":
    main()
