"""Sharded full fine-tuning (accelerate's FSDP2) with two CPU processes over gloo.

accelerate turns FSDP on only for GPU-like processes; tests/fsdp_on_cpu.py changes that one
decision and nothing else, so accelerator.prepare takes its real FSDP2 path on CPU processes. The
FSDP settings are those accelerate derives from the shipped scripts/accelerate/fsdp.yaml."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, same_tensors, tiny_train_args
from test_train import unet_weights


def fsdp_env(num_processes=2):
    """The environment `accelerate launch --config_file scripts/accelerate/fsdp.yaml` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", os.path.join(ROOT, "scripts", "accelerate", "fsdp.yaml"),
                                               "--num_processes", str(num_processes), "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def run_two(args, sharded=True, timeout=600):
    """train.py on two CPU processes (torch.distributed.run, gloo), sharded or plain DDP."""
    script = os.path.join(ROOT, "tests", "fsdp_on_cpu.py") if sharded else os.path.join(ROOT, "train.py")
    env = {**os.environ, "PYTHONPATH": ROOT, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           **(fsdp_env() if sharded else {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def last_error(result):
    lines = [line for line in result.stderr.splitlines() if "error: " in line]
    return lines[-1] if lines else result.stderr[-2000:]


COMMON = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
          "--use_winner_preserving", "--winner_preserving_mu", "0.5", "--timestep_weighting", "importance",
          "--validation_pairs", "5", "--validation_steps", "2", "--validation_prompts", "a red cat",
          "--validation_sampling_steps", "2"]


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """A sharded run of 4 steps, the same run resumed from its step-2 checkpoint, and plain DDP."""
    import shutil

    root = tmp_path_factory.mktemp("fsdp")
    out = {name: root / name for name in ("straight", "resumed", "ddp")}
    results = {"straight": run_two(tiny_train_args(tiny["sd15"], tiny["data"], str(out["straight"]), *COMMON))}
    assert results["straight"].returncode == 0, results["straight"].stderr[-3000:]
    out["resumed"].mkdir()
    shutil.copytree(out["straight"] / "checkpoint-2", out["resumed"] / "checkpoint-2")
    results["resumed"] = run_two(tiny_train_args(tiny["sd15"], tiny["data"], str(out["resumed"]), *COMMON))
    results["ddp"] = run_two(tiny_train_args(tiny["sd15"], tiny["data"], str(out["ddp"]), *COMMON), sharded=False)
    for name in ("resumed", "ddp"):
        assert results[name].returncode == 0, results[name].stderr[-3000:]
    return out, results


def metrics(folder):
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    return [{k: v for k, v in row.items() if k != "step_seconds"} for row in rows]


def test_sharded_checkpoints_hold_each_process_shards(runs):
    out, _ = runs
    checkpoint = out["straight"] / "checkpoint-2"
    assert sorted(os.listdir(checkpoint)) == ["lr_scheduler.pt", "rng-0.safetensors", "rng-1.safetensors", "sharded",
                                              "trainer_state.json"]
    shards = sorted(os.listdir(checkpoint / "sharded"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shards
    # Each process wrote its own part of every weight and of AdamW's two moments: together they hold
    # each element once, and neither process holds the whole.
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint / "sharded")).read_metadata()
    held = {name: 0 for name in shards[1:]}
    for index, storage in metadata.storage_data.items():
        if not hasattr(metadata.state_dict_metadata[index.fqn], "chunks"):
            continue  # a pickled value (the optimizer's hyperparameters), not a tensor
        chunk = next(c for c in metadata.state_dict_metadata[index.fqn].chunks if c.offsets == index.offset)
        held[storage.relative_path] += chunk.sizes.numel()
    weights = sum(v.numel() for v in unet_weights(out["straight"] / "unet").values())
    tensors = {k: v for k, v in metadata.state_dict_metadata.items() if hasattr(v, "chunks")}
    counted = sum(v.size.numel() for k, v in tensors.items() if not k.endswith(".step"))
    assert counted == 3 * weights  # the weights, exp_avg, exp_avg_sq
    assert all(0.3 * counted < n < 0.7 * counted for n in held.values()), held


def test_sharded_resume_is_bitwise_exact(runs):
    out, results = runs
    assert "resumed from" in results["resumed"].stderr
    assert same_tensors(unet_weights(out["straight"] / "unet"), unet_weights(out["resumed"] / "unet"))
    straight, resumed = metrics(out["straight"]), metrics(out["resumed"])
    assert [r for r in straight if r["step"] > 2] == [r for r in resumed if r["step"] > 2]  # losses, validation
    a = (out["straight"] / "validation" / "step-4" / "0-0.png").read_bytes()
    assert a == (out["resumed"] / "validation" / "step-4" / "0-0.png").read_bytes()


def test_sharded_training_is_ddp_training(runs, tiny):
    """The same run sharded and replicated: the first loss is exactly log 2 in both, and the
    weights move the same way (the gradients are reduced in another order: float tolerance)."""
    from diffusers import UNet2DConditionModel

    out, _ = runs
    sharded, ddp = metrics(out["straight"]), metrics(out["ddp"])
    first = [r for r in sharded if r["step"] == 1][0]
    assert first["loss"] == [r for r in ddp if r["step"] == 1][0]["loss"]
    assert first["winner_minus_ref"] == 0.0
    assert math.isclose(sharded[-1]["val_loss"], ddp[-1]["val_loss"], rel_tol=1e-4)
    a, b = unet_weights(out["straight"] / "unet"), unet_weights(out["ddp"] / "unet")
    base = unet_weights(os.path.join(tiny["sd15"], "unet"))
    update_a = torch.cat([(a[k] - base[k]).flatten() for k in sorted(a)])
    update_b = torch.cat([(b[k] - base[k]).flatten() for k in sorted(a)])
    assert torch.nn.functional.cosine_similarity(update_a, update_b, dim=0) > 0.999
    # The final UNet is gathered whole and loads as a diffusers model.
    unet = UNet2DConditionModel.from_pretrained(str(out["straight"]), subfolder="unet")
    assert same_tensors({k: v for k, v in unet.state_dict().items()}, a)
    assert (out["straight"] / "validation" / "step-4" / "0-0.png").is_file()


def test_sharded_and_whole_checkpoints_do_not_mix_and_bad_combinations_end_in_one_line(runs, tiny, tmp_path):
    out, _ = runs
    # A sharded checkpoint resumed by a DDP run of two processes.
    result = run_two(tiny_train_args(tiny["sd15"], tiny["data"], str(out["straight"]), *COMMON,
                                     "--max_train_steps", "6"), sharded=False)
    assert result.returncode != 0
    assert "holds FSDP shards; this run's model is whole" in last_error(result)
    for flags, message in ((["--use_lora"], "--use_lora with an FSDP accelerate config"),
                           (["--use_adafactor"], "Adafactor with an FSDP accelerate config"),
                           (["--use_8bit_adam"], "--use_8bit_adam with an FSDP accelerate config")):
        result = run_two(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / flags[0]), "--max_train_steps",
                                         "1", *flags))
        assert result.returncode != 0 and message in last_error(result), result.stderr[-2000:]


def test_the_fsdp_config_passes_the_launchers_check():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train", "_check_env.py")],
                            capture_output=True, text=True,
                            env={**os.environ, "ACCELERATE_CONFIG_FILE": os.path.join(ROOT, "scripts", "accelerate",
                                                                                     "fsdp.yaml")})
    assert result.returncode == 0 and result.stdout.split() == ["8", "bf16", "FSDP"], result.stderr
    assert fsdp_env()["FSDP_VERSION"] == "2"
