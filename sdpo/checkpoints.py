"""Training checkpoints that are complete or absent, never half-written.

`output_dir/checkpoint-N/` holds everything a run needs to continue exactly:
- `unet/`: the policy UNet (diffusers folder, safetensors);
- `optimizer.pt`, `lr_scheduler.pt`: state dicts (tensors and numbers only, loaded with
  `weights_only=True`);
- `rng-<rank>.safetensors`: each process's torch CPU (and CUDA) generator state;
- `trainer_state.json`: the global step and the run's settings, written last.

A checkpoint is written into `checkpoint-N.tmp/` and renamed into place only when complete, so a
process killed mid-write leaves a `.tmp` folder that `latest` never picks up (and the next save
of that step replaces). A checkpoint is deleted (pruned, or replaced by a new save of the same
step) by first renaming it to `checkpoint-N.deleting/`, so a kill in the middle of a deletion
never leaves a half-deleted folder under a checkpoint's name. `clean_output_dir` removes what
killed runs left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from sdpo.errors import InputError
from sdpo.models import check_same_shapes

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LEFTOVER_RE = re.compile(r"^(checkpoint-\d+|unet)\.(tmp|deleting)$")
STATE_FILE = "trainer_state.json"
REQUIRED_FILES = (STATE_FILE, "optimizer.pt", "lr_scheduler.pt", "rng-0.safetensors", os.path.join("unet", "config.json"))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in output_dir as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def missing_files(path: str) -> list[str]:
    """What a checkpoint folder lacks of the files a resume reads."""
    return [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(path, name))]


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: `latest` (None if there is none yet) or a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            return None
        path = found[-1][1]
    else:
        path = resume if os.path.isdir(resume) else os.path.join(output_dir, resume)
    missing = missing_files(path)
    if missing:
        raise InputError(f"--resume_from_checkpoint {resume!r}: {path} is not a complete checkpoint "
                         f"(missing {', '.join(missing)})")
    return path


def read_state(path: str) -> dict:
    """A checkpoint's trainer_state.json, or one line saying it is damaged."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        int(state["global_step"]), int(state["seed"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"--resume_from_checkpoint: {path}/{STATE_FILE} is damaged ({type(err).__name__}: {err}); "
                         f"resume from another checkpoint or start afresh") from None


def check_readable(path: str) -> None:
    """The optimizer and schedule state of a checkpoint must load (memory-mapped: nothing is read
    but the file's index); a truncated one is reported before any model loads."""
    for name in ("optimizer.pt", "lr_scheduler.pt"):
        try:
            torch.load(os.path.join(path, name), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise InputError(f"--resume_from_checkpoint: {path}/{name} is damaged or truncated "
                             f"({type(err).__name__}); resume from another checkpoint") from None


def remove_tree(path: str) -> None:
    """Delete a folder so that a kill half-way leaves nothing under its name: rename, then delete."""
    doomed = path + ".deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def clean_output_dir(output_dir: str) -> list[str]:
    """Remove the half-written and half-deleted folders that killed runs leave; return their names."""
    if not os.path.isdir(output_dir):
        return []
    removed = sorted(name for name in os.listdir(output_dir) if LEFTOVER_RE.match(name))
    for name in removed:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return removed


def weights_are_finite(model) -> bool:
    """Whether every parameter of a model is finite (one host sync)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(accelerator, output_dir, step, unet, optimizer, lr_scheduler, state: dict, total_limit=None):
    """Write checkpoint-<step> atomically. Every process writes its RNG state; the main process
    writes the rest, renames the folder into place and prunes old checkpoints."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    save_file(rng_state(), os.path.join(tmp, f"rng-{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(unet).save_pretrained(os.path.join(tmp, "unet"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(lr_scheduler.state_dict(), os.path.join(tmp, "lr_scheduler.pt"))
        if getattr(accelerator, "scaler", None) is not None:  # fp16: the gradient scaler's scale
            torch.save(accelerator.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"global_step": step, **state}, f, indent=2)
        _fsync_tree(tmp)
        if os.path.exists(final):
            remove_tree(final)
        os.replace(tmp, final)
        if total_limit:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path, accelerator, unet, optimizer, lr_scheduler) -> None:
    """Restore the policy weights, optimizer, lr schedule and this process's RNG."""
    from diffusers import UNet2DConditionModel

    from sdpo.models import pretrained

    saved = pretrained(UNet2DConditionModel, path, "--resume_from_checkpoint", "unet")
    model = accelerator.unwrap_model(unet)
    check_same_shapes(saved, model, f"checkpoint {path}", "the model being trained")
    model.load_state_dict(saved.state_dict())
    del saved
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(os.path.join(path, "lr_scheduler.pt"), weights_only=True))
    scaler_file = os.path.join(path, "scaler.pt")
    if getattr(accelerator, "scaler", None) is not None and os.path.isfile(scaler_file):
        accelerator.scaler.load_state_dict(torch.load(scaler_file, weights_only=True))
    rng_file = os.path.join(path, f"rng-{accelerator.process_index}.safetensors")
    if not os.path.isfile(rng_file):
        raise InputError(f"{path} was written by fewer processes than this run has ({rng_file} is missing)")
    set_rng_state(load_file(rng_file))
