"""Evaluation of the video families on the tiny Wan2.1 and CogVideoX pipelines: eval.generate
samples each pipeline with fixed per-prompt noise and saves every video as mp4 with its first,
middle and last frames as PNG; a metric scores a video as the mean of its frames' scores; versus
compares two checkpoints' videos by prompt; scripts/eval/test_video.sh runs it all."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from test_train import run_in_process
from test_video_train import FRAMES, video_args

PROMPTS = ("a red cat", "a blue house", "a tiny boat")


@pytest.fixture
def suite(tmp_path):
    from eval.prompts import record, write_suite

    path = tmp_path / "prompts" / "papv2.json"
    write_suite([record(p) for p in PROMPTS], str(path))
    return path


@pytest.mark.parametrize("name", ["wan21", "cogvideox"])
def test_generate_saves_each_video_as_mp4_and_three_frames_with_fixed_noise(tiny_video, suite, tmp_path, name):
    import diffusers

    from eval.generate import main as generate
    from sdpo import families
    from sdpo.video import read_frames

    family = families.get(name)
    common = ["--pretrain_path", tiny_video[name], "--unet_path", "base", "--test_json", str(suite), "--height", "32",
              "--width", "32", "--num_frames", str(FRAMES[name]), "--steps", "2", "--device", "cpu"]
    manifest = generate([*common, "--output_path", str(tmp_path / "a")])
    assert os.path.basename(manifest) == f"papv2_seed0_32x32_{FRAMES[name]}f_2s_{family.sampling_cfg}cfg.json"
    records = json.load(open(manifest))
    assert [r["prompt"] for r in records] == list(PROMPTS)
    first = records[0]["gen_image_path"]
    assert first.endswith("0_32x32.mp4")
    frames = np.stack(read_frames(first))
    assert frames.shape == (FRAMES[name], 32, 32, 3)
    stem = first.removesuffix(".mp4")
    for which in ("first", "middle", "last"):
        assert Image.open(f"{stem}_{which}.png").size == (32, 32)
    # The pipeline's own sampling, with guidance_scale = cfg + 1 and a generator seeded per prompt.
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(tiny_video[name])
    theirs = pipe(PROMPTS[0], negative_prompt="", height=32, width=32, num_frames=FRAMES[name], num_inference_steps=2,
                  guidance_scale=family.sampling_cfg + 1, generator=torch.Generator().manual_seed(0),
                  output_type="np").frames[0]
    last = np.asarray(Image.open(f"{stem}_last.png"))
    assert np.abs(last.astype(int) - (theirs[-1] * 255).round().astype(int)).max() <= 1
    # A video does not depend on the batch it is in, and a rerun keeps what is complete.
    # (The PNGs are exact; H.264 may encode the same frames to other bytes, within its loss.)
    again = generate([*common, "--output_path", str(tmp_path / "b"), "--batch_size", "1", "--max_prompts", "1"])
    other = json.load(open(again))[0]["gen_image_path"].removesuffix(".mp4")
    for which in ("first", "middle", "last"):
        assert np.array_equal(np.asarray(Image.open(f"{stem}_{which}.png")), np.asarray(Image.open(f"{other}_{which}.png")))
    mtime = os.stat(first).st_mtime_ns
    generate([*common, "--output_path", str(tmp_path / "a")])
    assert os.stat(first).st_mtime_ns == mtime


@pytest.mark.parametrize("name", ["wan21", "cogvideox"])
def test_videos_generate_in_bf16_with_the_vae_in_fp32(tiny_video, name):
    """The protocol's dtypes: the transformer and text encoder in bf16 (the default on a GPU), the
    VAE in fp32 (CogVideoXPipeline does not cast the latents for it; the generator does)."""
    from eval.generate import Generator

    generator = Generator(tiny_video[name], "base", name, False, None, "cpu", torch.bfloat16)
    assert generator.vae.dtype == torch.float32 and generator.unet.dtype == torch.bfloat16
    video = generator(["a red cat"], 32, 32, 2, 5.0, 0, FRAMES[name])[0]
    assert video.shape == (FRAMES[name], 32, 32, 3) and video.dtype == np.uint8


def test_a_video_scores_the_mean_of_its_frames(tiny_video, suite, tmp_path):
    from eval.generate import main as generate
    from eval.score import main as score
    from eval.scorers import build_scorer
    from eval.tiny import as_flags, build_tiny_scorers
    from sdpo.video import read_frames

    paths = build_tiny_scorers(str(tmp_path / "scorers"))
    manifest = generate(["--pretrain_path", tiny_video["wan21"], "--unet_path", "base", "--test_json", str(suite),
                         "--height", "32", "--width", "32", "--num_frames", "5", "--steps", "2", "--device", "cpu",
                         "--output_path", str(tmp_path / "out")])
    score([manifest, "--metrics", "clip", "--device", "cpu", *as_flags(paths)])
    scored = json.load(open(manifest.removesuffix(".json") + "_clip.json"))["records"]
    scorer = build_scorer("clip", device="cpu", **paths["clip"])
    frames = [Image.fromarray(f) for f in read_frames(scored[1]["gen_image_path"])]
    expected = float(np.mean([float(s) for s in scorer.score(frames, [scored[1]["prompt"]] * len(frames))]))
    assert scored[1]["score"] == pytest.approx(expected, rel=1e-6)


def test_the_video_eval_launcher_generates_scores_and_compares(tiny_video, suite, tmp_path):
    from eval.tiny import as_flags, build_tiny_scorers
    from test_generate import launch

    sources = as_flags(build_tiny_scorers(str(tmp_path / "scorers")))
    common = ["--pretrain_path", tiny_video["wan21"], "--prompts_dir", str(suite.parent), "--suites", "papv2",
              "--height", "32", "--width", "32", "--num_frames", "5", "--steps", "2", "--metrics", "clip", *sources]
    base = launch("test_video.sh", "base", "--output_path", str(tmp_path / "base"), *common)
    assert base.returncode == 0, base.stderr[-3000:]
    assert "| papv2_seed0_32x32_5f_2s_4.0cfg |" in base.stdout
    run_in_process(video_args(tiny_video, "wan21", tmp_path / "trained", "--max_train_steps", "2",
                              "--learning_rate", "1e-2"))
    other = launch("test_video.sh", str(tmp_path / "trained"), "--output_path", str(tmp_path / "trained"), *common)
    assert other.returncode == 0, other.stderr[-3000:]
    name = "papv2_seed0_32x32_5f_2s_4.0cfg.json"
    vs = launch("test_vs.sh", "--json_a", str(tmp_path / "trained" / name), "--json_b", str(tmp_path / "base" / name),
                "--metrics", "clip", "--outdir", str(tmp_path / "vs"), *sources)
    assert vs.returncode == 0, vs.stderr[-3000:]
    summary = json.load(open(tmp_path / "vs" / "summary.json"))
    assert [m["total_pairs"] for m in summary["metrics"]] == [3]


def test_the_vbench_hook_passes_the_videos_and_prompts(tiny_video, suite, tmp_path, monkeypatch, capsys):
    """eval.vbench: without VBench installed, one line saying so; with it (a stand-in module here),
    VBench's custom-input evaluation gets every video of the manifest with its prompt."""
    import sys
    import types

    from eval import vbench as hook
    from eval.generate import main as generate

    manifest = generate(["--pretrain_path", tiny_video["wan21"], "--unet_path", "base", "--test_json", str(suite),
                         "--height", "32", "--width", "32", "--num_frames", "5", "--steps", "2", "--device", "cpu",
                         "--output_path", str(tmp_path / "out")])
    monkeypatch.setitem(sys.modules, "vbench", None)  # not installed
    with pytest.raises(SystemExit) as exit_info:
        hook.main([manifest])
    assert exit_info.value.code == 2 and "VBench is not installed" in capsys.readouterr().err
    calls = []

    class VBench:
        def __init__(self, device, full_info, output):
            calls.append(("init", device, full_info, output))

        def evaluate(self, **kwargs):
            calls.append(("evaluate", kwargs))
            return "done"

    fake = types.ModuleType("vbench")
    fake.__file__ = str(tmp_path / "vbench" / "__init__.py")
    fake.VBench = VBench
    monkeypatch.setitem(sys.modules, "vbench", fake)
    assert hook.main([manifest, "--dimensions", "subject_consistency", "--device", "cpu"]) == "done"
    (_, device, info, output), (_, kwargs) = calls
    assert device == "cpu" and info.endswith("VBench_full_info.json") and output.endswith("_vbench")
    records = json.load(open(manifest))
    assert kwargs["prompt_list"] == {os.path.abspath(r["gen_image_path"]): r["prompt"] for r in records}
    assert kwargs["mode"] == "custom_input" and kwargs["dimension_list"] == ["subject_consistency"]
