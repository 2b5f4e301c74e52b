"""How much the reference's bf16 numerics move the preference logit u, per launcher, on tiny models.

    bash scripts/setup.sh && PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
        .venv/bin/python scripts/loss_precision.py [--out /tmp/loss-precision] [--pairs 128]

For each of the six launchers (its architecture, objective and beta), one optimizer step of
`train.py` runs on the tiny random pipeline of that architecture, in bf16 on CPU, once with
`--loss_precision reference` and once with `--loss_precision fp32`, on the same pairs, timesteps and
noise. The per-pair logits u of the two runs are compared:

- whole mode: everything that differs between the two modes (latents, noise, noisy latents and
  target rounded to bf16; the reference UNet in pure bf16 instead of under autocast; the reference
  losses computed and rounded in bf16);
- rounding alone: the reference mode's own tensors, with the per-sample losses computed in bf16
  (upcast=False) or in fp32 (upcast=True).

The policy starts equal to the reference (as at the first step of every run). The weights are tiny
and random, so the losses are larger than a trained model's; the printed MSE shows the scale.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sdpo.errors import ArgumentParser, InputError, reports_input_errors  # noqa: E402
from sdpo.files import check_output_dir  # noqa: E402
from sdpo.flags import no_empty_values  # noqa: E402

LAUNCHERS = {  # launcher: (architecture, objective, beta), as in scripts/train/
    "sd15_diffusion_dpo": ("sd15", "diffusion-dpo", 5000.0),
    "sd15_dspo": ("sd15", "dspo", 0.001),
    "sd15_dmpo": ("sd15", "dmpo", 2000.0),
    "sdxl_diffusion_dpo": ("sdxl", "diffusion-dpo", 5000.0),
    "sdxl_dspo": ("sdxl", "dspo", 5000.0),
    "sdxl_dmpo": ("sdxl", "dmpo", 6000.0),
}


def logits(model_pred, ref_pred, target, beta, upcast):
    from sdpo.losses import per_sample_mse, preference_logit

    policy = per_sample_mse(model_pred, target, upcast)
    reference = per_sample_mse(ref_pred, target, upcast)
    return preference_logit(*policy.chunk(2), *reference.chunk(2), beta).double()


def one_step(paths, arch, method, beta, precision, out, pairs):
    """The captured (model_pred, ref_pred, target) of every micro-batch of one optimizer step."""
    from accelerate.state import AcceleratorState

    import train

    captured = []
    loss_fn = train.preference_loss

    def capture(model_pred, ref_pred, target, **kwargs):
        captured.append((model_pred.detach(), ref_pred.detach(), target.detach()))
        return loss_fn(model_pred, ref_pred, target, **kwargs)

    batch = 8
    argv = ["--pretrained_model_name_or_path", paths[arch], "--dataset_name", paths["data"],
            "--output_dir", os.path.join(out, f"{arch}-{method}-{precision}"), "--resolution", "32",
            "--train_batch_size", str(batch), "--gradient_accumulation_steps", str(pairs // batch),
            "--max_train_steps", "1", "--learning_rate", "0", "--lr_warmup_steps", "0", "--seed", "0",
            "--report_to", "none", "--checkpointing_steps", "0", "--resume_from_checkpoint", "",
            "--mixed_precision", "bf16", "--loss_precision", precision, "--train_method", method,
            "--beta_dpo", str(beta), "--dmpo_alpha", "0.01"]
    if arch == "sdxl":
        argv += ["--sdxl", "--no-use_adafactor", "--no-gradient_checkpointing"]
    train.preference_loss = capture
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        train.main(argv)
    finally:
        train.preference_loss = loss_fn
    return captured


def parse_args(argv=None):
    parser = ArgumentParser(prog="scripts/loss_precision.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/loss-precision", help="where the tiny models and runs go")
    parser.add_argument("--pairs", type=int, default=128, help="pairs per measurement (a multiple of 8)")
    args = parser.parse_args(argv)
    no_empty_values(args)
    if args.pairs < 8 or args.pairs % 8:  # one_step's micro-batches hold 8 pairs
        raise InputError(f"--pairs must be a positive multiple of 8, got {args.pairs}")
    check_output_dir(args.out, "--out")
    return args


@reports_input_errors
def main(argv=None):
    args = parse_args(argv)

    from sdpo.tiny import build_all

    paths = build_all(os.path.join(args.out, "tiny"), num_rows=args.pairs + args.pairs // 4)
    print(f"{args.pairs} pairs per launcher, tiny random models, bf16 on CPU, first step (policy = reference)\n")
    print("| launcher | beta | whole mode: mean / max abs(delta u) | rounding alone: mean / max | mean ref MSE |")
    print("|---|---|---|---|---|")
    for launcher, (arch, method, beta) in LAUNCHERS.items():
        ref_mode = one_step(paths, arch, method, beta, "reference", args.out, args.pairs)
        fp32_mode = one_step(paths, arch, method, beta, "fp32", args.out, args.pairs)
        whole = torch.cat([logits(*a, beta, upcast=False) - logits(*b, beta, upcast=True)
                           for a, b in zip(ref_mode, fp32_mode)]).abs()
        rounding = torch.cat([logits(*a, beta, upcast=False) - logits(*a, beta, upcast=True)
                              for a in ref_mode]).abs()
        mse = torch.cat([(r.float() - t.float()).pow(2).flatten(1).mean(1) for _, r, t in ref_mode]).mean()
        print(f"| `{launcher}` | {beta:g} | {whole.mean():.3g} / {whole.max():.3g} "
              f"| {rounding.mean():.3g} / {rounding.max():.3g} | {mse:.3f} |", flush=True)


if __name__ == "__main__":
    main()
