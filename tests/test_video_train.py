"""Video preference training on the tiny Wan2.1 (rectified flow, UMT5, per-channel latent
normalisation) and CogVideoX (v-prediction DDPM, T5, frames-first latents with rotary embeddings)
pipelines, from mp4 pairs: the first Diffusion-DPO loss is exactly log 2, every objective trains
with the safeguard and every weighting mode, the safeguard's inequality holds on each transformer's
own outputs, a resume is bitwise, the output loads back into its pipeline and generates a video, an
undecodable clip skips its pair with a warning, both clips of a pair are read at the same frames,
and bad input stops in one line."""

import json
import logging
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import same_tensors, tiny_train_args
from test_train import run_in_process, unet_weights
from test_train_inputs import expect_one_line_error

LOG_2 = float(torch.tensor(math.log(2), dtype=torch.float32))
FRAMES = {"wan21": 5, "cogvideox": 9}  # 4k + 1: 2 and 3 latent frames


def video_args(tiny_video, name, out, *extra, data=None):
    """tiny_train_args for a tiny video pipeline: clips of FRAMES[name] frames at 32 x 32 (no --resolution)."""
    args = tiny_train_args(tiny_video[name], data or tiny_video["video_data"], str(out), "--num_frames",
                           str(FRAMES[name]), "--height", "32", "--width", "32", "--no-gradient_checkpointing",
                           "--no-use_adafactor", "--checkpointing_steps", "0", *extra)
    at = args.index("--resolution")
    return args[:at] + args[at + 2:]


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def transformer_weights(out):
    return unet_weights(os.path.join(out, "transformer"))


GRID = [(method, True, weighting) for method in ("diffusion-dpo", "dspo", "dmpo")
        for weighting in ("none", "clip-mask", "importance")]
GRID += [("diffusion-dpo", False, "none"), ("sft", False, "none"), ("sft", False, "importance")]


@pytest.mark.parametrize("name", ["wan21", "cogvideox"])
@pytest.mark.parametrize("method,safeguard,weighting", GRID)
def test_every_objective_trains_on_video_pairs(tiny_video, tmp_path, name, method, safeguard, weighting):
    extra = ["--max_train_steps", "2", "--train_method", method, "--timestep_weighting", weighting,
             "--is_mask_threshold", "0.0"]
    if safeguard:
        extra += ["--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    run_in_process(video_args(tiny_video, name, tmp_path, *extra))
    got = rows(tmp_path)
    assert len(got) == 2 and all(math.isfinite(r["loss"]) for r in got)
    if method == "diffusion-dpo" and weighting != "importance":  # policy = reference at step 0: u = 0 exactly
        assert got[0]["loss"] == LOG_2
    if safeguard:
        assert 0.0 <= got[0]["loser_scale"] <= 1.0
    base = unet_weights(os.path.join(tiny_video[name], "transformer"))
    trained = transformer_weights(tmp_path)
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
    config = json.load(open(tmp_path / "train_config.json"))
    assert config["model_family"] == name and config["num_frames"] == FRAMES[name]


def test_the_training_grids_are_the_pipelines(tiny_video):
    """Wan2.1 trains on the flow-matching grid shifted by its sampler's flow_shift; CogVideoX on the
    alphas of its CogVideoXDDIMScheduler (SNR shift and zero terminal SNR), with v-prediction."""
    from diffusers import CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler

    import train
    from sdpo.noise import DDPM, RectifiedFlow

    wan = train.load_noise(train.parse_args(video_args(tiny_video, "wan21", "/unused")))
    assert isinstance(wan, RectifiedFlow)
    expected = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert torch.equal(wan.sigmas, expected.sigmas.double())
    cog = train.load_noise(train.parse_args(video_args(tiny_video, "cogvideox", "/unused")))
    assert isinstance(cog, DDPM) and cog.prediction_type == "v_prediction"
    theirs = CogVideoXDDIMScheduler.from_pretrained(tiny_video["cogvideox"], subfolder="scheduler")
    assert torch.equal(cog.abar, theirs.alphas_cumprod.double()) and float(cog.abar[-1]) < 1e-6


@pytest.mark.parametrize("name", ["wan21", "cogvideox"])
def test_the_safeguard_inequality_holds_on_the_transformers_outputs(tiny_video, name):
    """With each tiny video transformer's own predictions on noised latents, the output-space step
    -gA + lambda gB does not increase the winners' loss to first order, per micro-batch and per pair."""
    import train
    from sdpo import families, models
    from sdpo.conditioning import Conditioning
    from sdpo.losses import winner_preserving_scale

    family = families.get(name)
    process = train.load_noise(train.parse_args(video_args(tiny_video, name, "/unused")))
    model = models.load_unet("base", tiny_video[name], family=family)
    g = torch.Generator().manual_seed(0)
    B = 2
    shape = (4, 2, 4, 4) if name == "wan21" else (3, 4, 4, 4)  # (C, F, H, W); CogVideoX frames first
    x0 = torch.randn(2 * B, *shape, generator=g)
    eps = torch.randn(B, *shape, generator=g).repeat(2, 1, 1, 1, 1)
    index = process.draw(B, 0, process.grid_size(), generator=g) if name == "wan21" else \
        torch.randint(0, 1000, (B,), generator=g)
    index = index.repeat(2)
    cond = Conditioning(torch.randn(B, 12, 32, generator=g).repeat(2, 1, 1))
    inputs = family.model_inputs(process.add_noise(x0, eps, index), process.model_timesteps(index), cond, model.config)
    with torch.no_grad():
        pred = model(**inputs).sample.double().requires_grad_()
    target = process.target(x0, eps, index).double()
    winners = (pred[:B] - target[:B]).pow(2).mean()
    losers = (pred[B:] - target[B:]).pow(2).mean()
    ga, gb = torch.autograd.grad(winners, pred)[0][:B], torch.autograd.grad(losers, pred)[0][B:]
    assert float(ga.abs().sum()) > 0 and float(gb.abs().sum()) > 0
    for mu in (0.0, 0.5, 0.9):
        lam = winner_preserving_scale(pred, target, mu)
        assert float(((-ga + lam * gb) * ga).sum()) <= -mu * float(ga.pow(2).sum()) * (1 - 1e-9)
        per_pair = winner_preserving_scale(pred, target, mu, per_sample=True)
        for i in range(B):
            a, b = ga[i] * B, gb[i] * B
            assert float(((-a + per_pair[i] * b) * a).sum()) <= -mu * float(a.pow(2).sum()) * (1 - 1e-9)


@pytest.mark.parametrize("name", ["wan21", "cogvideox"])
def test_resume_is_bitwise_exact(tiny_video, tmp_path, name):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--use_winner_preserving", "--winner_preserving_mu", "0.5", "--timestep_weighting", "importance",
              "--proportion_empty_prompts", "0.3", "--train_batch_size", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_in_process([*video_args(tiny_video, name, straight), *common])
    assert os.path.isfile(straight / "checkpoint-2" / "transformer" / "config.json")
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    run_in_process([*video_args(tiny_video, name, resumed), *common])
    assert same_tensors(transformer_weights(straight), transformer_weights(resumed))
    strip = lambda got: [{k: v for k, v in r.items() if k != "step_seconds"} for r in got]  # noqa: E731
    assert strip(rows(straight))[-2:] == strip(rows(resumed))[-2:]


@pytest.mark.parametrize("name", ["wan21", "cogvideox"])
def test_the_output_loads_into_its_pipeline_and_generates_a_video(tiny_video, tmp_path, name):
    import diffusers

    from sdpo import families

    family = families.get(name)
    run_in_process(video_args(tiny_video, name, tmp_path, "--max_train_steps", "2", "--validation_pairs", "2",
                              "--validation_steps", "1"))
    assert "val_implicit_acc" in rows(tmp_path)[0] or any("val_implicit_acc" in r for r in rows(tmp_path))
    transformer = getattr(diffusers, family.denoiser_class_name).from_pretrained(str(tmp_path), subfolder="transformer")
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(tiny_video[name], transformer=transformer)
    frames = pipe("a red cat", height=32, width=32, num_frames=FRAMES[name], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames[0]
    assert frames.shape == (FRAMES[name], 32, 32, 3) and np.isfinite(frames).all()
    assert family.card_tag in open(tmp_path / "README.md").read()


@pytest.mark.parametrize("name,method", [("wan21", "diffusion-dpo"), ("cogvideox", "diffusion-dpo"), ("wan21", "sft")])
def test_training_from_the_latent_cache_equals_training_from_the_clips(tiny_video, tmp_path, monkeypatch, name,
                                                                       method):
    """The cache stores each clip's middle window (and its mirror) through the video VAE, with the
    family's latent normalisation (Wan2.1's per channel): training from it with --frame_window
    middle gives bitwise the weights and numbers of training from the mp4 files."""
    import sdpo.models
    import sdpo.video
    from sdpo.cache import main as build

    build(["--pretrained_model_name_or_path", tiny_video[name], "--dataset_name", tiny_video["video_data"],
           "--output_dir", str(tmp_path / "cache"), "--num_frames", str(FRAMES[name]), "--height", "32", "--width",
           "32", "--mixed_precision", "no", "--encode_batch_size", "2", "--shard_pairs", "8", "--device", "cpu"])
    manifest = json.load(open(tmp_path / "cache" / "manifest.json"))
    assert manifest["settings"]["clips"] == {"num_frames": FRAMES[name], "height": 32, "width": 32, "window": "middle"}
    assert (manifest["latent_norm"]["shape"] == [1, 4, 1, 1, 1]) == (name == "wan21")
    common = ["--max_train_steps", "3", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
              "--frame_window", "middle", "--proportion_empty_prompts", "0.5", "--validation_pairs", "2",
              "--validation_steps", "3", "--timestep_weighting", "importance", "--train_method", method]
    if method != "sft":
        common += ["--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    else:  # two winners per VAE call, as the cache's clip and mirror: kernels choose their arithmetic by batch size
        common += ["--train_batch_size", "2", "--gradient_accumulation_steps", "1"]
    run_in_process(video_args(tiny_video, name, tmp_path / "clips", *common))

    def forbidden(*args, **kwargs):
        raise AssertionError("training from the cache decoded a clip or loaded the VAE")

    monkeypatch.setattr(sdpo.video, "decode_pair", forbidden)
    monkeypatch.setattr(sdpo.models, "load_vae", forbidden)
    run_in_process(video_args(tiny_video, name, tmp_path / "cached", *common, "--latent_cache", str(tmp_path / "cache")))
    assert same_tensors(transformer_weights(tmp_path / "clips"), transformer_weights(tmp_path / "cached"))
    strip = lambda got: [{k: v for k, v in r.items() if k != "step_seconds"} for r in got]  # noqa: E731
    assert strip(rows(tmp_path / "clips")) == strip(rows(tmp_path / "cached"))


# ---- data ------------------------------------------------------------------------------------


def write_video_rows(folder, rows_):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    schema = pa.schema([("caption", pa.string()), ("video_0", pa.binary()), ("video_1", pa.binary()),
                        ("label_0", pa.float64())])
    pq.write_table(pa.table(rows_, schema=schema), os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    return str(folder)


def clip(value, frames=7, size=(24, 24)):
    from sdpo.video import encode_mp4

    return encode_mp4(np.stack([np.full((*size, 3), (value + 20 * t) % 255, np.uint8) for t in range(frames)]))


def test_both_clips_of_a_pair_are_read_at_the_same_frames():
    """The window's start is drawn once per pair: the same clip as winner and loser gives the same
    pixels (no flip), and the start varies between pairs; held-out pairs read the middle frames."""
    from sdpo.data import PairTransform

    same = clip(0, frames=12)
    transform = PairTransform(32, hflip=False, num_frames=5, size=(16, 16))
    starts = set()
    for seed in range(8):
        item = transform({"video_0": same, "video_1": same, "label_0": 1.0, "caption": "x"}, random.Random(seed))
        assert item["pixels"].shape == (2, 5, 3, 16, 16) and torch.equal(item["pixels"][0], item["pixels"][1])
        starts.add(round(float(item["pixels"][0, 0].mean()), 3))
    assert len(starts) > 1
    middle = PairTransform(32, hflip=False, num_frames=5, size=(16, 16), random_start=False)
    a = middle({"video_0": same, "video_1": clip(40, frames=12), "label_0": 0.0, "caption": "x"}, random.Random(0))
    b = middle({"video_0": same, "video_1": clip(40, frames=12), "label_0": 0.0, "caption": "x"}, random.Random(1))
    assert torch.equal(a["pixels"], b["pixels"])  # the loser (video_0 here) comes second


def test_a_pair_with_an_undecodable_clip_is_skipped_with_a_warning(tiny_video, tmp_path, caplog):
    data = write_video_rows(tmp_path / "data", {
        "caption": ["good", "broken", "short", "good too"],
        "video_0": [clip(0), b"not an mp4 at all", clip(10, frames=3), clip(30)],
        "video_1": [clip(100), clip(110), clip(120), clip(130)],
        "label_0": [1.0, 1.0, 0.0, 1.0]})
    with caplog.at_level(logging.WARNING, logger="sdpo.data"):
        run_in_process(video_args(tiny_video, "wan21", tmp_path / "out", "--max_train_steps", "2",
                                  "--train_batch_size", "1", data=data))
    skipped = [r.getMessage() for r in caplog.records if "skipping the pair" in r.getMessage()]
    assert skipped and all("cannot decode" in m or "fewer than the 5" in m for m in skipped)
    assert len(rows(tmp_path / "out")) == 2


# ---- bad input -------------------------------------------------------------------------------


def test_bad_video_input_stops_in_one_line(tiny, tiny_video, tmp_path, capsys):
    out = str(tmp_path / "out")
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny_video["video_data"], out, "--check_only"),
                          "holds video pairs", "image model")
    expect_one_line_error(capsys, video_args(tiny_video, "wan21", out, "--check_only", data=tiny["data"]),
                          "holds image pairs", "Wan2.1 is a video model")
    expect_one_line_error(capsys, video_args(tiny_video, "cogvideox", out, "--check_only", "--num_frames", "8"),
                          "--num_frames 8", "4k + 1 frames")
    expect_one_line_error(capsys, video_args(tiny_video, "wan21", out, "--check_only", "--sdxl"),
                          "is a Wan2.1 pipeline: remove --sdxl")
    expect_one_line_error(capsys, video_args(tiny_video, "wan21", out, "--check_only", "--height", "40"),
                          "--height 40", "multiples of 16")
    expect_one_line_error(capsys, video_args(tiny_video, "wan21", out, "--check_only", "--width", "0"),
                          "--width 0", "multiples of 16")
    expect_one_line_error(capsys, video_args(tiny_video, "cogvideox", out, "--check_only", "--num_frames", "0"),
                          "--num_frames 0", "4k + 1 frames")
    expect_one_line_error(capsys, video_args(tiny_video, "wan21", out, "--check_only", "--resolution", "32"),
                          "--resolution", "--height and --width")
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], out, "--check_only", "--num_frames", "5"),
                          "--num_frames is for video models")
    expect_one_line_error(capsys, video_args(tiny_video, "wan21", out, "--check_only", "--latent_cache", out),
                          "--latent_cache holds the middle window", "--frame_window middle")
    expect_one_line_error(capsys, video_args(tiny_video, "wan21", out, "--check_only", "--choice_model", "clip"),
                          "--choice_model is not supported for video models yet")
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], out, "--check_only", "--frame_window",
                                                  "middle"), "--frame_window is for video models")


@pytest.mark.parametrize("name", ["wan21", "cogvideox"])
def test_lora_on_a_video_transformer_loads_into_its_pipeline(tiny_video, tmp_path, name):
    """--use_lora: the first loss is exactly log 2 (the reference is the transformer with its
    adapters off), and the adapters load with the pipeline's load_lora_weights and generate."""
    import diffusers

    from sdpo import families

    run_in_process(video_args(tiny_video, name, tmp_path, "--max_train_steps", "2", "--use_lora"))
    assert rows(tmp_path)[0]["loss"] == LOG_2
    pipe = getattr(diffusers, families.get(name).pipeline_class).from_pretrained(tiny_video[name])
    pipe.load_lora_weights(str(tmp_path))
    frames = pipe("a red cat", height=32, width=32, num_frames=FRAMES[name], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames[0]
    assert frames.shape == (FRAMES[name], 32, 32, 3) and np.isfinite(frames).all()


@pytest.mark.parametrize("launcher,lora,expected", [
    ("wan21_diffusion_dpo", False, ("wan21", 20.0, 1e-8, False, "AdamW")),
    ("cogvideox_diffusion_dpo", False, ("cogvideox", 20.0, 1e-8, False, "AdamW")),
    ("cogvideox_diffusion_dpo", True, ("cogvideox", 20.0, 1e-5, True, "AdamW"))])
def test_the_video_launchers_record_their_settings(tiny_video, tmp_path, launcher, lora, expected):
    """The video launchers (a dry run on the tiny pipelines): importance weighting as the paper's
    SDPO, the documented beta and lr, gradient checkpointing, the family read from the pipeline."""
    import subprocess

    from conftest import ROOT

    name = expected[0]
    env = {**os.environ, "NUM_GPUS": "1", "MODEL_NAME": tiny_video[name], "DATASET_NAME": tiny_video["video_data"],
           "OUTPUT_DIR": str(tmp_path), **({"LORA": "1"} if lora else {})}
    overrides = ["--dry_run", "--height=32", "--width=32", f"--num_frames={FRAMES[name]}", "--train_batch_size=1",
                 "--gradient_accumulation_steps=1", "--dataloader_num_workers=0"]
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train", f"{launcher}.sh"), *overrides],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert (config["model_family"], config["beta_dpo"], config["learning_rate"], config["use_lora"],
            config["derived"]["optimizer"]) == expected
    assert config["timestep_weighting"] == "importance" and config["is_mask_threshold"] == 0.9
    assert config["is_clip_eps"] == 0.2 and config["gradient_checkpointing"] and config["mixed_precision"] == "bf16"
    assert config["use_winner_preserving"] and config["winner_preserving_mu"] == 0.6
    assert config["scale_lr"] != lora
