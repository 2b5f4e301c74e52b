"""train.py end to end on the tiny models: every objective, the safeguard, every timestep
weighting, SD1.5 and SDXL; exact resume; bad input stops with a one-line error."""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch, tiny_train_args
from sdpo import checkpoints

import train


def run_in_process(argv):
    """train.main in this process (much faster than a launch; the launcher has its own tests)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return train.main(argv)


def unet_weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


GRID = [(method, safeguard, weighting)
        for method in ("diffusion-dpo", "dspo", "dmpo")
        for safeguard in (False, True)
        for weighting in ("none", "clip-mask", "importance")]
GRID += [("sft", False, w) for w in ("none", "importance")]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("method,safeguard,weighting", GRID)
def test_every_objective_trains(tiny, tmp_path, arch, method, safeguard, weighting):
    extra = ["--train_method", method, "--max_train_steps", "2", "--timestep_weighting", weighting,
             "--checkpointing_steps", "0", "--beta_dpo", "50" if method != "dspo" else "0.5",
             "--dmpo_alpha", "0.01"]
    if arch == "sdxl":
        extra += ["--sdxl", "--no-use_adafactor", "--no-gradient_checkpointing"]
    if safeguard:
        extra += ["--use_winner_preserving", "--winner_preserving_mu", "0.6"]
    if weighting != "none":
        extra += ["--is_mask_threshold", "0.0"]  # keep every pair so the step always moves the weights
    logs = run_in_process(tiny_train_args(tiny[arch], tiny["data"], str(tmp_path), *extra))
    assert math.isfinite(logs["loss"])
    if method != "sft":
        assert 0.0 <= logs["implicit_acc"] <= 1.0
        assert 0.0 <= logs["loser_scale"] <= 1.0
        if not safeguard:
            assert logs["loser_scale"] == 1.0
    if weighting != "none":
        assert logs["kept_fraction"] == 1.0 and logs["importance_weight"] > 0
    trained = unet_weights(tmp_path / "unet")
    base = unet_weights(os.path.join(tiny[arch], "unet"))
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert "method" in (tmp_path / "README.md").read_text()


def test_clip_mask_masks_everything_at_a_high_threshold(tiny, tmp_path):
    logs = run_in_process(tiny_train_args(
        tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "1", "--checkpointing_steps", "0",
        "--timestep_weighting", "clip-mask", "--is_mask_threshold", "10", "--adam_weight_decay", "0"))
    assert logs["kept_fraction"] == 0.0 and logs["loss"] == 0.0
    trained, base = unet_weights(tmp_path / "unet"), unet_weights(os.path.join(tiny["sd15"], "unet"))
    assert all(torch.equal(trained[k], base[k]) for k in base)  # zero gradients, no decay: the weights stay


def test_first_step_loss_is_log_2(tiny, tmp_path):
    """Policy == reference at step 0, so u = 0 and the DPO loss is exactly log 2."""
    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "1",
                                          "--checkpointing_steps", "0", "--gradient_accumulation_steps", "1"))
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-6) and logs["implicit_acc"] == 0.0


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_accelerate_launch_end_to_end(tiny, tmp_path, arch):
    from diffusers import UNet2DConditionModel

    extra = ["--max_train_steps", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "1",
             "--checkpoints_total_limit", "1", "--use_winner_preserving", "--winner_preserving_mu", "0.9",
             "--timestep_weighting", "importance"]
    if arch == "sdxl":
        extra.append("--sdxl")
    result = accelerate_launch(tiny_train_args(tiny[arch], tiny["data"], str(tmp_path), *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet")
    assert unet.config.cross_attention_dim == (64 if arch == "sdxl" else 32)
    assert [step for step, _ in checkpoints.list_checkpoints(str(tmp_path))] == [2]  # the limit pruned checkpoint-1


def test_resume_is_bitwise_exact(tiny, tmp_path):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--use_winner_preserving", "--winner_preserving_mu", "0.5", "--timestep_weighting", "importance",
              "--proportion_empty_prompts", "0.3", "--random_crop"]
    straight = tmp_path / "straight"
    result = accelerate_launch(tiny_train_args(tiny["sd15"], tiny["data"], str(straight), *common))
    assert result.returncode == 0, result.stderr[-3000:]
    # A second run that has only the step-2 checkpoint, as if the first had been killed after it.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / "checkpoint-4.tmp").mkdir()  # a half-written checkpoint that must be ignored
    args = tiny_train_args(tiny["sd15"], tiny["data"], str(resumed), *common)
    result = accelerate_launch(args[: args.index("--seed")] + args[args.index("--seed") + 2:])  # seed from checkpoint
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    a, b = unet_weights(straight / "unet"), unet_weights(resumed / "unet")
    assert all(torch.equal(a[k], b[k]) for k in a)
    mid = unet_weights(straight / "checkpoint-2" / "unet")
    assert any(not torch.equal(a[k], mid[k]) for k in a)


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / checkpoints.STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-5.tmp").mkdir()
    (tmp_path / "checkpoint-7").mkdir()  # no state file: a copy cut short
    assert checkpoints.resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoint-3")
    assert checkpoints.resolve_resume("latest", str(tmp_path / "nothing")) is None
    with pytest.raises(Exception, match="no complete checkpoint"):
        checkpoints.resolve_resume(str(tmp_path / "checkpoint-7"), str(tmp_path))


def test_missing_column_stops_with_one_line(tiny, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b""], "label_0": [1.0]}),
                   tmp_path / "data" / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(tiny_train_args(tiny["sd15"], str(tmp_path / "data"), str(tmp_path / "out")))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no column 'jpg_1'" in err and "Traceback" not in err


@pytest.mark.parametrize("flags,message", [
    (["--use_winner_preserving", "--winner_preserving_mu", "1.5"], "winner_preserving_mu must lie in [0, 1]"),
    (["--train_method", "sft", "--use_winner_preserving"], "needs a loser branch"),
    (["--sdxl"], "SD1.x pipeline: remove --sdxl"),
])
def test_bad_settings_stop_with_one_line(tiny, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), *flags))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("launcher,arch", [("sd15_dspo", "sd15"), ("sdxl_dmpo", "sdxl")])
def test_shell_launchers(tiny, tmp_path, launcher, arch):
    import subprocess

    from conftest import ROOT

    env = {**os.environ, "NUM_GPUS": "1", "MODEL_NAME": tiny[arch], "VAE_NAME": os.path.join(tiny[arch], "vae"),
           "DATASET_NAME": tiny["data"], "OUTPUT_DIR": str(tmp_path)}
    overrides = ["--max_train_steps=1", "--train_batch_size=1", "--gradient_accumulation_steps=1",
                 "--resolution=32", "--dataloader_num_workers=0", "--report_to=none"]
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train", f"{launcher}.sh"), *overrides],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 pairs per GPU x 32 accumulation steps x 1 GPUs = 256 pairs per step" in result.stdout
    card = (tmp_path / "README.md").read_text()
    expected = {"sd15_dspo": ["| method | dspo |", "| beta | 0.001 |", "mu = 0.2"],
                "sdxl_dmpo": ["| method | dmpo |", "| beta | 6000.0 |", "mu = 0.6", "| DMPO alpha | 0.01 |", "Adafactor"]}
    for line in expected[launcher]:
        assert line in card


def test_two_processes_on_cpu(tiny, tmp_path):
    """Data parallel with two CPU processes (gloo). `accelerate launch` starts several CPU
    processes only through mpirun, so this starts them with torch.distributed.run and lets
    accelerate pick the distributed setup up from the environment, as it does under launch."""
    import subprocess
    import sys

    from conftest import ROOT

    args = tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "2",
                           "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
                           "--use_winner_preserving", "--winner_preserving_mu", "0.5")
    env = {**os.environ, "PYTHONPATH": ROOT, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", os.path.join(ROOT, "train.py"), *args],
                            capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 pairs per step (2 per process x 2 accumulation x 2 processes)" in result.stderr
    assert sorted(os.listdir(tmp_path / "checkpoint-2")) == sorted(
        ["lr_scheduler.pt", "optimizer.pt", "rng-0.safetensors", "rng-1.safetensors", "trainer_state.json", "unet"])
    # As the reference, every process is seeded alike, so all draw the same noise and timesteps.
    r0 = load_file(tmp_path / "checkpoint-2" / "rng-0.safetensors")["torch"]
    r1 = load_file(tmp_path / "checkpoint-2" / "rng-1.safetensors")["torch"]
    assert torch.equal(r0, r1)


def test_streaming_trains(tiny, tmp_path):
    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--streaming",
                                          "--max_train_steps", "2", "--checkpointing_steps", "0"))
    assert math.isfinite(logs["loss"])


def test_checkpoint_of_the_wrong_model_is_refused(tiny, tmp_path, capsys):
    """An SDXL UNet handed to an SD1.5 run, as --unet_init and as a checkpoint to resume."""
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "a"),
                                       "--unet_init", tiny["sdxl"], "--max_train_steps", "1"))
    assert exit_info.value.code == 2
    assert "does not match the base UNet" in capsys.readouterr().err
    ckpt = tmp_path / "b" / "checkpoint-1"
    shutil.copytree(os.path.join(tiny["sdxl"], "unet"), ckpt / "unet")
    for name in ("optimizer.pt", "lr_scheduler.pt"):
        torch.save({}, ckpt / name)
    (ckpt / checkpoints.STATE_FILE).write_text('{"global_step": 1, "seed": 0}')
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "b"), "--max_train_steps", "2"))
    assert exit_info.value.code == 2
    assert "does not match the model being trained" in capsys.readouterr().err


def test_epochs_when_no_step_count(tiny, tmp_path):
    """--max_train_steps 0: --num_train_epochs passes over the data (42 pairs / 2 = 21 batches, 7 per step)."""
    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "0",
                                          "--num_train_epochs", "1", "--gradient_accumulation_steps", "7",
                                          "--checkpointing_steps", "0"))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3] and math.isfinite(logs["loss"])


def test_order_by_scores_swaps_where_jpg_1_wins():
    from sdpo.data import order_by_scores

    pixels = torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 2, 2)
    out = order_by_scores(pixels, [0.5, 0.1, 0.3], [0.2, 0.9, 0.3])  # jpg_0 wins, jpg_1 wins, tie
    assert torch.equal(out[0], pixels[0]) and torch.equal(out[1], pixels[1].flip(0)) and torch.equal(out[2], pixels[2])


def test_choice_model_relabels_with_a_scorer(tiny, tmp_path):
    from eval.tiny import build_tiny_scorers

    sources = build_tiny_scorers(str(tmp_path / "scorers"))["clip"]
    flags = [x for k, v in sources.items() for x in ("--choice_model_source", f"clip.{k}={v}")]
    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "out"), "--max_train_steps", "2",
                                          "--checkpointing_steps", "0", "--choice_model", "clip", *flags))
    assert math.isfinite(logs["loss"])
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "labels"), "--max_train_steps", "2",
                                   "--checkpointing_steps", "0"))
    # Same seed, same data and noise: only the scorer's choice of winners differs.
    a, b = unet_weights(tmp_path / "out" / "unet"), unet_weights(tmp_path / "labels" / "unet")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_scalars_and_metrics_file(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "2",
                                   "--checkpointing_steps", "0", "--report_to", "tensorboard",
                                   "--use_winner_preserving", "--winner_preserving_mu", "0.5",
                                   "--timestep_weighting", "importance", "--is_mask_threshold", "0"))
    event_dirs = {os.path.dirname(os.path.join(root, f)) for root, _, files in os.walk(tmp_path / "logs")
                  for f in files if f.startswith("events.")}
    tags = set()
    for folder in event_dirs:
        acc = EventAccumulator(folder)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    expected = {"loss", "implicit_acc", "model_mse", "ref_mse", "winner_minus_ref", "loser_minus_ref",
                "loser_scale", "kept_fraction", "importance_weight", "lr"}
    assert expected <= tags, expected - tags
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2] and expected <= set(lines[0])


def test_sdxl_true_time_ids_reach_the_unet(tiny, tmp_path, monkeypatch):
    """With --sdxl_true_time_ids the UNet sees each image's (orig_h, orig_w, top, left, res, res)."""
    from diffusers import UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, *args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs["time_ids"].detach().clone())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    run_in_process(tiny_train_args(tiny["sdxl"], tiny["data"], str(tmp_path), "--sdxl", "--no-use_adafactor",
                                   "--max_train_steps", "1", "--checkpointing_steps", "0", "--sdxl_true_time_ids"))
    # The synthetic images are 48 x 40 (w x h): resized to 38 x 32 and cropped to 32.
    ids = seen[0]
    assert ids.shape == (4, 6) and ids[:, :2].tolist() == [[40, 48]] * 4 and ids[:, 4:].tolist() == [[32, 32]] * 4
    assert set(ids[:, 3].tolist()) <= {3.0}  # centre crop: left 3 (or 38 - 3 - 32 = 3 when flipped)
    assert torch.equal(seen[1], ids)  # the reference UNet sees the same conditioning


def test_v_prediction_scheduler_trains(tiny, tmp_path):
    from sdpo.tiny import build_tiny_pipeline

    model = build_tiny_pipeline(str(tmp_path / "vpred"), prediction_type="v_prediction")
    logs = run_in_process(tiny_train_args(model, tiny["data"], str(tmp_path / "out"), "--max_train_steps", "1",
                                          "--checkpointing_steps", "0", "--timestep_weighting", "clip-mask",
                                          "--is_mask_threshold", "0"))
    # Policy == reference: u = 0, every pair kept with weight 1, so the loss is exactly log 2.
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-6) and logs["kept_fraction"] == 1.0


@pytest.mark.parametrize("method,expected_loads", [("sft", 1), ("dmpo", 2)])
def test_sft_loads_no_reference_unet(tiny, tmp_path, monkeypatch, method, expected_loads):
    from diffusers import UNet2DConditionModel

    loads = []
    original = UNet2DConditionModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(counting))
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--train_method", method,
                                   "--max_train_steps", "1", "--checkpointing_steps", "0"))
    assert len(loads) == expected_loads
