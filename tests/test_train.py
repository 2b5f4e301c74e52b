"""train.py end to end on the tiny models: every objective, the safeguard, every timestep
weighting, SD1.5 and SDXL; exact resume; bad input stops with a one-line error."""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import accelerate_launch, same_tensors, tiny_train_args
from sdpo import checkpoints
from sdpo.errors import InputError

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
    first, second = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    if method != "sft":
        # Step 1: the policy is the reference, so every logit is 0 and the two MSEs are equal.
        assert first["implicit_acc"] == 0.0
        assert first["winner_minus_ref"] == 0.0 and first["loser_minus_ref"] == 0.0
        assert second["winner_minus_ref"] != 0.0  # step 1 moved the policy
        if not safeguard:
            assert first["loser_scale"] == second["loser_scale"] == 1.0
    if weighting != "none":
        # A weight is exactly 1 only for a perfect prediction: this one was computed from the model.
        assert logs["kept_fraction"] == 1.0 and math.isfinite(logs["importance_weight"])
        assert logs["importance_weight"] != 1.0
    trained = unet_weights(tmp_path / "unet")
    base = unet_weights(os.path.join(tiny[arch], "unet"))
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert f"| method | {method} |" in (tmp_path / "README.md").read_text()


def test_clip_mask_masks_everything_at_a_high_threshold(tiny, tmp_path):
    logs = run_in_process(tiny_train_args(
        tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "1", "--checkpointing_steps", "0",
        "--timestep_weighting", "clip-mask", "--is_mask_threshold", "10", "--adam_weight_decay", "0"))
    assert logs["kept_fraction"] == 0.0 and logs["loss"] == 0.0
    trained, base = unet_weights(tmp_path / "unet"), unet_weights(os.path.join(tiny["sd15"], "unet"))
    assert same_tensors(trained, base)  # zero gradients, no decay: the weights stay


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
    assert "should be kept in float32" not in result.stderr  # diffusers' warning about an empty list
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
    assert same_tensors(a, b)
    mid = unet_weights(straight / "checkpoint-2" / "unet")
    assert any(not torch.equal(a[k], mid[k]) for k in a)


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    complete = tmp_path / "checkpoint-3"
    for name in (*checkpoints.REQUIRED_FILES, *checkpoints.MODEL_FORMS[0]):  # a model form is required too
        (complete / name).parent.mkdir(parents=True, exist_ok=True)
        (complete / name).write_text("{}")
    (tmp_path / "checkpoint-5.tmp").mkdir()  # killed while writing
    (tmp_path / "checkpoint-6.deleting").mkdir()  # killed while pruning
    (tmp_path / "checkpoint-7").mkdir()  # no state file: a copy cut short
    assert checkpoints.resolve_resume("latest", str(tmp_path)) == str(complete)
    assert checkpoints.resolve_resume("latest", str(tmp_path / "nothing")) is None
    with pytest.raises(InputError, match="checkpoint-7 is not a complete checkpoint"):
        checkpoints.resolve_resume(str(tmp_path / "checkpoint-7"), str(tmp_path))
    with pytest.raises(InputError, match="not a complete checkpoint"):
        checkpoints.resolve_resume("checkpoint-6", str(tmp_path))  # its name is gone while it is deleted
    (complete / "optimizer.pt").unlink()
    with pytest.raises(InputError, match=r"missing optimizer.pt"):
        checkpoints.resolve_resume("latest", str(tmp_path))
    assert checkpoints.clean_output_dir(str(tmp_path)) == ["checkpoint-5.tmp", "checkpoint-6.deleting"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-7"]


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
    args = args[: args.index("--seed")] + args[args.index("--seed") + 2:]  # a seed drawn once, shared
    env = {**os.environ, "PYTHONPATH": ROOT, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", os.path.join(ROOT, "train.py"), *args],
                            capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 pairs per step (2 per process x 2 accumulation x 2 processes)" in result.stderr
    assert sorted(os.listdir(tmp_path / "checkpoint-2")) == sorted(
        ["lr_scheduler.pt", "optimizer.pt", "rng-0.safetensors", "rng-1.safetensors", "trainer_state.json", "unet"])
    # As the reference, process i is seeded with seed + i: the two draw different noise and timesteps.
    r0 = load_file(tmp_path / "checkpoint-2" / "rng-0.safetensors")["torch"]
    r1 = load_file(tmp_path / "checkpoint-2" / "rng-1.safetensors")["torch"]
    assert not torch.equal(r0, r1)
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert config["derived"]["num_processes"] == 2 and config["derived"]["pairs_per_step"] == 8
    seed = config["seed"]
    assert config["derived"]["process_seeds"] == [seed, seed + 1]  # what each process used
    assert json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["seed"] == seed


def test_streaming_trains(tiny, tmp_path):
    """A streamed dataset trains: the first loss is log 2 (policy == reference), the second is
    lower, and the saved weights moved from the base's."""
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--streaming",
                                   "--max_train_steps", "2", "--checkpointing_steps", "0"))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-7) and losses[1] < losses[0]
    trained, base = unet_weights(tmp_path / "unet"), unet_weights(os.path.join(tiny["sd15"], "unet"))
    assert trained.keys() == base.keys() and not same_tensors(trained, base)


def test_checkpoint_of_the_wrong_model_is_refused(tiny, tmp_path, capsys):
    """An SDXL UNet handed to an SD1.5 run, as --unet_init and as a checkpoint to resume."""
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "a"),
                                       "--unet_init", tiny["sdxl"], "--max_train_steps", "1"))
    assert exit_info.value.code == 2
    assert "does not fit the UNet of" in capsys.readouterr().err  # found before any weight loads
    ckpt = tmp_path / "b" / "checkpoint-1"
    shutil.copytree(os.path.join(tiny["sdxl"], "unet"), ckpt / "unet")
    for name in ("optimizer.pt", "lr_scheduler.pt"):
        torch.save({}, ckpt / name)
    save_file({"torch": torch.get_rng_state()}, ckpt / "rng-0.safetensors")
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


def test_choice_model_relabels_with_a_scorer(tiny, tmp_path, monkeypatch):
    import eval.scorers
    from eval.tiny import build_tiny_scorers
    from sdpo.data import decode_image, load_split

    sources = build_tiny_scorers(str(tmp_path / "scorers"))["clip"]
    flags = [x for k, v in sources.items() for x in ("--choice_model_source", f"clip.{k}={v}")]
    args = tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "out"), "--max_train_steps", "2",
                           "--checkpointing_steps", "0", "--choice_model", "clip", *flags)
    logs = run_in_process(args)
    assert math.isfinite(logs["loss"])
    saved = json.loads((tmp_path / "out" / "choices-clip.json").read_text())
    assert [part["rows"] for part in saved["record"]["data"]] == [42]
    chosen = saved["jpg_1_wins"][0]
    # Each choice is the scorer's: jpg_1 wins where it scores higher.
    scorer = eval.scorers.build_scorer("clip", **sources)
    data = load_split(tiny["data"], "train")

    for row in list(chosen)[:6]:
        item = data[int(row)]
        s0, s1 = scorer.score([decode_image(item["jpg_0"]), decode_image(item["jpg_1"])], [item["caption"]] * 2)
        assert chosen[row] == (s1 > s0)
    assert len(chosen) == 42  # every decided pair (48 rows, 6 ties)
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "labels"), "--max_train_steps", "2",
                                   "--checkpointing_steps", "0"))
    # Same seed, same data and noise: only the scorer's choice of winners differs.
    a, b = unet_weights(tmp_path / "out" / "unet"), unet_weights(tmp_path / "labels" / "unet")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    fewer = ["--max_train_samples", "20", "--choice_model", "clip", *flags, "--max_train_steps", "1",
             "--checkpointing_steps", "0", "--validation_pairs", "4"]
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "1"), *fewer, "--seed", "1"))
    assert [part["rows"] for part in json.loads((tmp_path / "1" / "choices-clip.json").read_text())["record"]["data"]] \
        == [20, 4]  # the training pairs and the held-out ones
    # A second run with the same scorer reuses the choices: no scorer is built.
    monkeypatch.setattr(eval.scorers, "build_scorer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scored")))
    args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    run_in_process([*args, "--resume_from_checkpoint", ""])
    # Other rows, the same number of them (another seed's shuffle), are scored again, not looked up.
    (tmp_path / "2").mkdir()
    shutil.copy(tmp_path / "1" / "choices-clip.json", tmp_path / "2")
    with pytest.raises(AssertionError, match="scored"):
        run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "2"), *fewer, "--seed", "2"))


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


@pytest.mark.parametrize("method", ["sft", "dmpo"])
def test_the_reference_unet_is_a_copy_and_sft_has_none(tiny, tmp_path, monkeypatch, method):
    from diffusers import UNet2DConditionModel

    loads, seen = [], {}
    original = UNet2DConditionModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(counting))
    spy_step(monkeypatch, seen)
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--train_method", method,
                                   "--max_train_steps", "1", "--checkpointing_steps", "0"))
    assert len(loads) == 1  # the reference UNet is copied from the policy, not loaded again
    if method == "sft":
        assert seen["ref_unet"] is None
    else:
        ref, base = seen["ref_unet"].state_dict(), unet_weights(os.path.join(tiny["sd15"], "unet"))
        assert same_tensors(ref, base)
        assert not any(p.requires_grad for p in seen["ref_unet"].parameters())


def spy_step(monkeypatch, seen):
    """Record the UNets that train.py hands to its MicroBatchLoss (the reference's own UNet: a
    frozen copy or --ref_unet; None for sft)."""
    init = train.MicroBatchLoss.__init__

    def spy(self, args, accelerator, unet, reference, *rest, **kwargs):
        seen.update(unet=unet, ref_unet=None if reference is None else reference.unet)
        init(self, args, accelerator, unet, reference, *rest, **kwargs)

    monkeypatch.setattr(train.MicroBatchLoss, "__init__", spy)


def perturbed_unet(tiny, folder):
    """A UNet folder that differs from the tiny base's (as an SFT run's output would)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny["sd15"], subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(str(folder / "unet"))
    return str(folder)


def test_unet_init_is_also_the_reference(tiny, tmp_path, monkeypatch):
    """As the reference, --unet_init starts the policy and the reference (so DPO after SFT is
    measured against the SFT model); --ref_unet base measures it against the base instead."""
    init = perturbed_unet(tiny, tmp_path / "sft")
    seen = {}
    spy_step(monkeypatch, seen)
    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "a"), "--unet_init", init,
                                          "--max_train_steps", "1", "--checkpointing_steps", "0"))
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: u = 0
    init_weights = unet_weights(os.path.join(init, "unet"))
    assert all(torch.equal(seen["ref_unet"].state_dict()[k], init_weights[k]) for k in init_weights)

    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "b"), "--unet_init", init,
                                          "--ref_unet", "base", "--max_train_steps", "1", "--checkpointing_steps", "0"))
    base = unet_weights(os.path.join(tiny["sd15"], "unet"))
    assert all(torch.equal(seen["ref_unet"].state_dict()[k], base[k]) for k in base)
    assert abs(logs["loss"] - math.log(2)) > 1e-3
    config = json.loads((tmp_path / "b" / "train_config.json").read_text())["derived"]
    assert config["policy_unet"] == init and config["reference_unet"] == "base"


def test_choice_model_takes_the_reference_names():
    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d"]
    names = {"aes": "aesthetics", "hps": "hpsv2", "clip": "clip", "pickscore": "pickscore",
             "imagereward": "imagereward", "hpsv2": "hpsv2", "": None}
    for given, expected in names.items():
        assert train.parse_args([*base, "--choice_model", given]).choice_model == expected
    with pytest.raises(InputError, match="unknown choice model 'nope'"):
        train.parse_args([*base, "--choice_model", "nope"])


def dry_run_config(tiny, out, *flags):
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(out), "--dry_run", *flags))
    return json.loads((out / "train_config.json").read_text())


def test_train_config_records_every_setting_and_loads_no_model(tiny, tmp_path, monkeypatch):
    def no_models(args):
        raise AssertionError("a dry run must not load models")

    monkeypatch.setattr(train, "load_models", no_models)
    config = dry_run_config(tiny, tmp_path, "--gradient_accumulation_steps", "3", "--scale_lr",
                            "--learning_rate", "1e-6", "--use_adafactor", "--max_grad_norm", "0.5",
                            "--timestep_weighting", "importance")
    d = config["derived"]
    assert d["effective_lr"] == pytest.approx(1e-6 * 2 * 3) and d["pairs_per_step"] == 6
    assert d["num_processes"] == 1 and d["optimizer"] == "Adafactor"
    assert d["gradient_clipping"] == "clip at 0.5" and d["loss_precision"] == "reference"
    assert d["seed_of_process_0"] == 0 and d["process_seeds"] == [0]
    assert d["timestep_range"] == [100, 1000] and d["reference_unet"] == "base"
    assert config["max_train_steps"] == 2000 and config["beta_dpo"] == 5000.0 and config["seed"] == 0
    assert not (tmp_path / "unet").exists()
    assert dry_run_config(tiny, tmp_path / "off", "--max_grad_norm", "0")["derived"]["gradient_clipping"] == "off"


def test_reference_flags(tiny, tmp_path, capsys):
    """The reference's flags that users pass: each has its meaning, or a one-line refusal."""
    import pyarrow.parquet as pq

    # --train_data_dir: a subfolder of the dataset; --caption_column: another caption column.
    table = pq.read_table(os.path.join(tiny["data"], "data", "train-00000-of-00001.parquet"))
    (tmp_path / "copy" / "sub" / "data").mkdir(parents=True)
    pq.write_table(table.rename_columns(["text" if c == "caption" else c for c in table.column_names]),
                   tmp_path / "copy" / "sub" / "data" / "train-00000-of-00001.parquet")
    args = tiny_train_args(tiny["sd15"], str(tmp_path / "copy"), str(tmp_path / "a"), "--train_data_dir", "sub",
                           "--caption_column", "text", "--max_train_steps", "1", "--checkpointing_steps", "0",
                           "--cache_dir", str(tmp_path / "cache"), "--local_rank", "0",
                           "--tracker_project_name", "my-project", "--report_to", "tensorboard")
    logs = run_in_process(args)
    assert math.isfinite(logs["loss"])
    assert (tmp_path / "a" / "logs" / "my-project").is_dir()
    with pytest.raises(SystemExit) as exit_info:  # the caption column is 'text' now
        run_in_process(tiny_train_args(tiny["sd15"], str(tmp_path / "copy"), str(tmp_path / "b"),
                                       "--train_data_dir", "sub", "--dry_run"))
    assert exit_info.value.code == 2 and "no column 'caption'" in capsys.readouterr().err
    refused = [(["--dataset_config_name", "default"], "has no configurations"),
               (["--image_column", "image"], "rename your dataset's image columns to jpg_0 and jpg_1"),
               (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
               (["--train_method", "sft", "--ref_unet", "base"], "--ref_unet needs a preference objective")]
    for flags, message in refused:
        with pytest.raises(SystemExit) as exit_info:
            run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "c"), "--dry_run", *flags))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err


def test_gradient_clipping_applies_to_adafactor_and_the_norm_is_logged(tiny, tmp_path, monkeypatch):
    from transformers.optimization import Adafactor

    seen = []
    step = Adafactor.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Adafactor, "step", spy)
    common = ["--max_train_steps", "1", "--checkpointing_steps", "0", "--use_adafactor"]
    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "a"), *common,
                                          "--max_grad_norm", "0"))
    unclipped = seen[-1]
    assert logs["grad_norm"] == pytest.approx(unclipped, rel=1e-5) and unclipped > 1e-3
    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "b"), *common,
                                          "--max_grad_norm", "1e-3"))
    assert logs["grad_norm"] == pytest.approx(unclipped, rel=1e-5)  # logged before clipping
    assert seen[-1] == pytest.approx(1e-3, rel=1e-4)  # what Adafactor received


@pytest.mark.parametrize("precision", ["reference", "fp32"])
def test_loss_precision_casts_under_bf16(tiny, tmp_path, monkeypatch, precision):
    """bf16 on CPU. reference: latents, noise and target in bf16, the reference UNet in pure bf16
    without autocast, its losses in bf16; the loss equals the reference's lines written out,
    bitwise. fp32: the same step with fp32 latents, noise, target and losses."""
    from diffusers import UNet2DConditionModel
    from test_losses import reference_loss_written_out

    captured, forwards = {}, []
    loss_fn = train.preference_loss

    def capture(model_pred, ref_pred, target, **kwargs):
        result = loss_fn(model_pred, ref_pred, target, **kwargs)
        captured.update(model_pred=model_pred.detach(), ref_pred=ref_pred, target=target, kwargs=kwargs,
                        loss=result[0].detach())
        return result

    forward = UNet2DConditionModel.forward

    def spy(self, sample, *args, **kwargs):
        trains = any(p.requires_grad for p in self.parameters())
        forwards.append((trains, sample.dtype, torch.is_autocast_enabled("cpu")))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(train, "preference_loss", capture)
    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "1",
                                          "--checkpointing_steps", "0", "--mixed_precision", "bf16",
                                          "--loss_precision", precision))
    latent_dtype = torch.bfloat16 if precision == "reference" else torch.float32
    assert captured["model_pred"].dtype == torch.float32 and captured["target"].dtype == latent_dtype
    assert captured["kwargs"]["upcast"] == (precision == "fp32")
    assert forwards == [(True, latent_dtype, True), (False, latent_dtype, precision == "fp32")]
    assert captured["ref_pred"].dtype == torch.bfloat16
    if precision == "reference":
        expected = reference_loss_written_out(captured["model_pred"], captured["ref_pred"], captured["target"],
                                              "diffusion-dpo", 5000.0)
        assert torch.equal(captured["loss"], expected)
    assert logs["loss"] == pytest.approx(float(captured["loss"]))


@pytest.mark.parametrize("launcher", ["sd15_diffusion_dpo", "sd15_dspo", "sd15_dmpo",
                                      "sdxl_diffusion_dpo", "sdxl_dspo", "sdxl_dmpo"])
def test_launchers_dry_run_record_the_reference_settings(tiny, tmp_path, launcher):
    import subprocess

    from conftest import ROOT

    arch = launcher.split("_")[0]
    env = {**os.environ, "NUM_GPUS": "1", "MODEL_NAME": tiny[arch], "VAE_NAME": os.path.join(tiny[arch], "vae"),
           "DATASET_NAME": tiny["data"], "OUTPUT_DIR": str(tmp_path)}
    overrides = ["--dry_run", "--resolution=32", "--train_batch_size=1", "--gradient_accumulation_steps=1",
                 "--dataloader_num_workers=0"]
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train", f"{launcher}.sh"), *overrides],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "train_config.json").read_text())
    d = config["derived"]
    assert d["gradient_clipping"] == "clip at 1.0" and d["loss_precision"] == "reference"
    assert d["process_seeds"] == [config["seed"]] and d["seed_of_process_0"] == config["seed"]
    assert d["optimizer"] == ("Adafactor" if arch == "sdxl" else "AdamW")
    assert config["gradient_checkpointing"] == (arch == "sdxl") and config["mixed_precision"] == "bf16"
    paper = {"sd15_diffusion_dpo": (5000, 0.9, 0.0, 1e-8), "sd15_dspo": (0.001, 0.2, 0.0, 1e-8),
             "sd15_dmpo": (2000, 0.9, 0.01, 1e-8), "sdxl_diffusion_dpo": (5000, 0.6, 0.0, 1e-9),
             "sdxl_dspo": (5000, 0.6, 0.0, 1e-9), "sdxl_dmpo": (6000, 0.6, 0.01, 1e-9)}[launcher]
    assert (config["beta_dpo"], config["winner_preserving_mu"], config["dmpo_alpha"], config["learning_rate"]) == paper
    assert config["use_winner_preserving"] and config["scale_lr"] and config["allow_tf32"]
    assert not (tmp_path / "unet").exists()


def test_compile_trains_like_eager(tiny, tmp_path, monkeypatch):
    """--compile (inductor on CPU) gives the same training within float tolerance, whatever the
    machine's load, and saves the UNet under its own parameter names.

    Inductor picks its CPU kernels' vector width by building and loading a probe, with a timeout;
    on a loaded machine the probe can fail, the kernels narrow (scalar here) and the arithmetic
    changes: the first loss was then 0.69292, not log 2, and the second 1.7e-4 away from eager.
    The probe is made to fail here (and inductor's on-disk caches are bypassed so that nothing
    compiled earlier hides it); train.py takes the width from the CPU's flags, so nothing changes."""
    import torch._inductor.config as inductor
    from torch._dynamo.utils import counters
    from torch._inductor import cpu_vec_isa

    common = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--use_winner_preserving",
              "--winner_preserving_mu", "0.5"]
    eager = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "eager"), *common))
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", lambda self, code: False)  # as a timed-out probe
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    cpu_vec_isa.VecISA._VecISA__bool__impl.cache_clear()
    # inductor's own patch(), which puts both settings back afterwards (monkeypatch's undo leaves
    # force_disable_caches undefined for later compiles in this process)
    try:
        with inductor.patch({"force_disable_caches": True,
                             "cpp.vec_isa_ok": None}):  # as a fresh process, before train.py sets it
            compiled = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "compiled"),
                                                      *common, "--compile"))
            picked = cpu_vec_isa.pick_vec_isa()  # what the kernels were built for, the probe failing
    finally:
        cpu_vec_isa.valid_vec_isa_list.cache_clear()
        cpu_vec_isa.VecISA._VecISA__bool__impl.cache_clear()
    assert counters["stats"]["unique_graphs"] >= 2  # the policy and the reference UNet went through dynamo
    # Without the fix a failed probe leaves no vector ISA (scalar kernels: a first loss of 0.69292).
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    if any(f" {isa}" in flags for isa in ("avx2", "avx512f", "asimd")):
        assert picked, "inductor fell back to scalar kernels when its probe failed"
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "compiled" / "metrics.jsonl")]
    # Policy == reference at the start, but the policy runs a compiled training graph and the
    # reference a compiled inference graph, fused apart: their last bits may differ, by CPU (exactly
    # log 2 on one AVX-512 machine, 0.69322 on an AMD EPYC with AVX-512).
    assert losses[0] == pytest.approx(math.log(2), abs=2e-4)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-3)
    a, b = unet_weights(tmp_path / "eager" / "unet"), unet_weights(tmp_path / "compiled" / "unet")
    assert a.keys() == b.keys()
    # The two steps moved the weights the same way: Adam's normalised update can flip on an element
    # whose gradient is near zero (one such element here differs by 2 lr), so the updates are
    # compared as wholes, not element by element.
    base = unet_weights(os.path.join(tiny["sd15"], "unet"))
    eager_update = torch.cat([(a[k] - base[k]).flatten() for k in sorted(a)])
    compiled_update = torch.cat([(b[k] - base[k]).flatten() for k in sorted(a)])
    assert torch.nn.functional.cosine_similarity(eager_update, compiled_update, dim=0) > 0.999
    assert compiled_update.norm() == pytest.approx(eager_update.norm().item(), rel=1e-3)
    assert (compiled_update - eager_update).abs().gt(1e-5).float().mean() < 1e-3  # all but a few elements agree
    saved = unet_weights(tmp_path / "compiled" / "checkpoint-2" / "unet")
    assert not any("_orig_mod" in k for k in saved)
