"""Where the importance weight puts its mass: the mean importance weight against the timestep, for
pairs from the data (off-policy) and pairs the model samples itself (on-policy), the central figure
of the importance-sampled DPO paper, on our models and with our definition (docs/methods.md,
section 5).

    .venv/bin/python scripts/importance_weights.py --pretrained_model_name_or_path BASE \\
        --model OUTPUT_DIR --dataset_name DATA [--num_pairs 8] [--levels 20] [--out weights.png]

--model is a train.py output folder (or any checkpoint train.py's --unet_init takes, or `base`): the
policy whose weights are measured. For each of --levels noise levels evenly spaced over the
training grid, each image (or clip) of --num_pairs pairs is noised with fixed noise, the policy
predicts, and log w is computed as training computes it (sdpo.timesteps.log_weights, a fixed
posterior draw per level); the figure shows the mean of w per level. Off-policy: the dataset's pairs
(the first usable rows, center-cropped, the middle frames of a clip). On-policy: for the same
captions, two samples of the policy itself (seeds 0 and 1, the family's sampling protocol as
eval.generate runs it, --sampling_steps steps). Latents are the VAE posterior's means.

Writes the PNG and the numbers beside it (same name, .json). Video families take --num_frames,
--height and --width as train.py does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from sdpo.errors import ArgumentParser, InputError, reports_input_errors  # noqa: E402
from sdpo.flags import no_empty_values, output_file  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/importance_weights.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="the base pipeline (as train.py)")
    p.add_argument("--model", default="base", help="the policy: a train.py output folder, a checkpoint, or base")
    p.add_argument("--dataset_name", required=True, help="preference pairs (as train.py)")
    p.add_argument("--split", default="train")
    p.add_argument("--num_pairs", type=int, default=8, help="pairs of each kind")
    p.add_argument("--levels", type=int, default=20, help="noise levels, evenly spaced over the training grid")
    p.add_argument("--sampling_steps", type=int, default=20, help="steps of the on-policy samples")
    p.add_argument("--resolution", type=int, default=None, help="images: as train.py (default: the family's)")
    p.add_argument("--num_frames", type=int, default=None, help="video: as train.py")
    p.add_argument("--height", type=int, default=None, help="video: as train.py")
    p.add_argument("--width", type=int, default=None, help="video: as train.py")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--out", default="importance_weights.png", help="the figure (its numbers go beside it, .json)")
    args = p.parse_args(argv)
    no_empty_values(args)
    for flag in ("num_pairs", "levels", "sampling_steps"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    output_file(args.out, "--out")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def train_settings(args):
    """train.py's settings for the measurement: the policy as --unet_init, fp32 on a CPU, bf16 on a GPU."""
    import train

    argv = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--dataset_name", args.dataset_name,
            "--split", args.split, "--output_dir", tempfile.mkdtemp(prefix="weights-"), "--report_to", "none",
            "--seed", "0", "--train_method", "sft", "--unet_init", "" if args.model == "base" else args.model,
            "--mixed_precision", "bf16" if args.device.startswith("cuda") else "no", "--loss_precision", "fp32",
            "--no-gradient_checkpointing", "--no-use_adafactor"]
    for flag in ("resolution", "num_frames", "height", "width"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    settings = train.parse_args(argv)
    train.check_settings(settings)
    return train.Settings(settings)


def build_step(settings, device: str):
    """train.py's MicroBatchLoss for the policy (no optimizer step is ever taken)."""
    import train
    from sdpo import checkpoints

    accelerator = train.make_accelerator(settings, settings.mixed_precision, cpu=not device.startswith("cuda"))
    noise = train.load_noise(settings)
    timesteps = (0, noise.grid_size())
    inputs = train.Inputs(config=checkpoints.run_config(settings, 1, settings.mixed_precision, timesteps, None, 1),
                          noise=noise, timesteps=timesteps, dataloader=None, num_pairs=None, validation_pairs=None,
                          start_step=0, total_steps=1, resume_path=None)
    return train.setup(settings, accelerator, inputs).compute_loss


def data_pairs(settings, count: int):
    """The first `count` usable pairs of the split, seen as held-out pairs are (both images)."""
    from sdpo.data import PairDataset, collate_pairs, load_pairs, pair_transform, usable_rows

    data = load_pairs(settings, settings.split)
    rows = usable_rows(data["label_0"], settings.dataset_name, settings.split)[:count]
    transform = pair_transform(settings, training=False)
    transform.winners_only = False
    dataset = PairDataset(data, rows, transform, 0)
    return collate_pairs([dataset[(0, i)] for i in range(len(rows))])


def policy_pairs(settings, args, captions: list[str]):
    """Two samples of the policy per caption (seeds 0 and 1), as a PairBatch of pixels."""
    import numpy as np

    from eval.generate import Generator
    from sdpo import families, models
    from sdpo.data import PairBatch

    family = families.get(settings.model_family)
    spec = settings.unet_init or "base"
    dtype = models.DTYPES["bf16" if args.device.startswith("cuda") else "fp32"]
    generator = Generator(settings.pretrained_model_name_or_path, spec, family.name, False, None, args.device, dtype)
    height, width = (settings.height, settings.width) if family.video else (settings.resolution,) * 2
    samples = [generator(captions, height, width, args.sampling_steps, family.sampling_cfg, seed,
                         getattr(settings, "num_frames", None)) for seed in (0, 1)]
    del generator

    def pixels(sample):
        array = np.asarray(sample, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) or (F, H, W, 3)
        return torch.from_numpy(array).movedim(-1, -3)

    stacked = torch.stack([torch.stack([pixels(a), pixels(b)]) for a, b in zip(*samples)])
    return PairBatch(time_ids=torch.zeros(len(captions), 2, 6), captions=list(captions), pixels=stacked)


@torch.no_grad()
def mean_weights(step, batch, indices: list[int]) -> list[float]:
    """The mean importance weight over the batch's images at each grid index, with fixed noise and a
    fixed posterior draw per index."""
    from sdpo.timesteps import log_weights

    mean, _ = step.posterior(batch)
    latents = step.scale_latents(mean)
    out = []
    for n, index in enumerate(indices):
        g = torch.Generator().manual_seed(n)
        noise = torch.randn(latents.shape, generator=g).to(latents.device, latents.dtype)
        z = torch.randn(latents.shape, generator=g).to(latents.device)
        t = torch.full((latents.shape[0],), index, device=latents.device, dtype=torch.long)
        model_pred, _, target = step.predict(latents, noise, t, batch, with_grad=False)
        log_w = log_weights(model_pred.float(), target.float(), *step.noise.importance_terms(t), z)
        out.append(float(log_w.exp().mean()))
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label, color in (("off_policy", "off-policy (dataset pairs)", "tab:red"),
                              ("on_policy", "on-policy (the model's own samples)", "tab:blue")):
        ax.plot(result["timesteps"], result[key], "o-", color=color, label=label, markersize=3)
    ax.axhline(result["mask_threshold"], color="grey", linestyle="--", linewidth=1,
               label=f"mask threshold {result['mask_threshold']}")
    ax.axhspan(1 - result["clip_eps"], 1 + result["clip_eps"], color="grey", alpha=0.1,
               label=f"clip range [1 - {result['clip_eps']}, 1 + {result['clip_eps']}]")
    ax.set_xlabel("timestep (the denoiser's; larger is noisier)")
    ax.set_ylabel("mean importance weight w")
    ax.set_title(f"{result['family']}: {os.path.basename(os.path.normpath(result['model']))}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@reports_input_errors
def main(argv=None) -> dict:
    from sdpo.files import write_json_atomic

    args = parse_args(argv)
    settings = train_settings(args)
    step = build_step(settings, args.device)
    noise = step.noise
    levels = [(2 * i + 1) * noise.grid_size() // (2 * args.levels) for i in range(args.levels)]
    indices = [noise.index_at_level(level) for level in levels]
    timesteps = [float(noise.model_timesteps(torch.tensor([i]))[0]) for i in indices]
    off = data_pairs(settings, args.num_pairs)
    on = policy_pairs(settings, args, off.captions)
    result = {"family": settings.model_family, "model": args.model, "pairs": len(off), "levels": levels,
              "timesteps": timesteps, "off_policy": mean_weights(step, off, indices),
              "on_policy": mean_weights(step, on, indices), "mask_threshold": settings.is_mask_threshold,
              "clip_eps": settings.is_clip_eps}
    plot(result, args.out)
    write_json_atomic(result, os.path.splitext(args.out)[0] + ".json")
    print(f"figure: {args.out}\nnumbers: {os.path.splitext(args.out)[0] + '.json'}")
    for t, a, b in zip(timesteps, result["off_policy"], result["on_policy"]):
        print(f"t {t:7.1f}   off-policy w {a:.4f}   on-policy w {b:.4f}")
    return result


if __name__ == "__main__":
    main()
