"""Training checkpoints that are complete or absent, never half-written, and the record of the
run that wrote them (train_config.json, the settings a resume must match, the model card).

`output_dir/checkpoint-N/` holds everything a run needs to continue exactly:
- `unet/`: the policy UNet (diffusers folder, safetensors; SD3's transformer in `transformer/`),
  or with LoRA `lora/`: the adapters
  alone (`adapter_model.safetensors`, peft's names, and `adapter_config.json`), not the base;
- `optimizer.pt`, `lr_scheduler.pt`: state dicts (tensors and numbers only, loaded with
  `weights_only=True`);
- under FSDP, `sharded/` instead of `unet/` and `optimizer.pt`: the policy's and the optimizer's
  sharded state, written by every process with `torch.distributed.checkpoint` (each process its
  own shards; no process gathers the whole model);
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
import logging
import os
import re
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

from sdpo import families, lora
from sdpo.errors import InputError
from sdpo.files import write_text_atomic
from sdpo.models import DTYPES, HUB_ID, check_same_shapes, policy_source, reference_role, reference_source

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LEFTOVER_RE = re.compile(r"^(checkpoint-\d+|unet|transformer|lora)\.(tmp|deleting)$")
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"
logger = logging.getLogger(__name__)
REQUIRED_FILES = (STATE_FILE, "lr_scheduler.pt", "rng-0.safetensors")
# The model's state comes in one of these forms: a whole UNet (or transformer), LoRA adapters, or FSDP shards.
MODEL_FORMS = ((os.path.join("unet", "config.json"), "optimizer.pt"),
               (os.path.join("transformer", "config.json"), "optimizer.pt"),
               (os.path.join("lora", "adapter_model.safetensors"), "optimizer.pt"),
               (os.path.join("sharded", ".metadata"),))


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
    def absent(names):
        return [name for name in names if not os.path.isfile(os.path.join(path, name))]

    missing = absent(REQUIRED_FILES)
    gaps = [absent(form) for form in MODEL_FORMS]
    if all(gaps):  # no form of the model's state is complete
        started = [gap for gap, form in zip(gaps, MODEL_FORMS) if len(gap) < len(form)]
        if started:  # what the form that was begun lacks
            missing += min(started, key=len)
        else:
            missing.append(" or ".join(form[0] for form in MODEL_FORMS))
    return missing


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
        if name == "optimizer.pt" and not os.path.isfile(os.path.join(path, name)):
            continue  # a sharded checkpoint keeps the optimizer in sharded/
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


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: its shard under FSDP2 (a DTensor), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def is_sharded(accelerator) -> bool:
    """Whether the policy is sharded over the processes (accelerate's FSDP)."""
    return accelerator is not None and accelerator.distributed_type == "FSDP"  # a str enum


def weights_are_finite(model, accelerator=None) -> bool:
    """Whether every parameter of a model is finite (one host sync); sharded, over every process's shards."""
    finite = torch.stack([local(p.detach()).isfinite().all() for p in model.parameters()]).all()
    if is_sharded(accelerator):
        finite = accelerator.reduce(finite.float().reshape(1), reduction="sum") == accelerator.num_processes
    return bool(finite)


def sharded_state(unet, optimizer):
    """The policy's and the optimizer's sharded state dicts (torch.distributed.checkpoint's form)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(unet, getattr(optimizer, "optimizer", optimizer))


def full_state_dict(unet) -> dict:
    """The whole policy's state dict on the main process's CPU (gathered from the shards; every
    process must call this), empty on the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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


def _save_whole(model, optimizer, folder: str) -> None:
    """The policy (a UNet, or its LoRA adapters alone) and the optimizer's state, from one process."""
    if lora.has_adapters(model):
        os.makedirs(os.path.join(folder, "lora"))
        save_file(lora.adapter_state(model), os.path.join(folder, "lora", lora.ADAPTER_FILE))
        with open(os.path.join(folder, "lora", "adapter_config.json"), "w") as f:
            json.dump(lora.adapter_config(model), f, indent=2, default=str)
    else:
        model.save_pretrained(os.path.join(folder, families.denoiser_folder_of(model)))
    torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))


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
    if is_sharded(accelerator):  # every process writes its shards
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state = sharded_state(unet, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(tmp, "sharded"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not is_sharded(accelerator):
            _save_whole(accelerator.unwrap_model(unet), optimizer, tmp)
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
    """Restore the policy weights (or its LoRA adapters), optimizer, lr schedule and this process's RNG."""
    from sdpo.models import pretrained

    model = accelerator.unwrap_model(unet)
    shards = os.path.join(path, "sharded")
    if is_sharded(accelerator) != os.path.isdir(shards):
        held, trained = ("FSDP shards", "whole") if os.path.isdir(shards) else ("a whole model", "sharded (FSDP)")
        raise InputError(f"--resume_from_checkpoint: {path} holds {held}; this run's model is {trained}")
    adapters = os.path.join(path, "lora", lora.ADAPTER_FILE)
    if is_sharded(accelerator):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_state, optimizer_state = sharded_state(unet, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=shards)
        set_state_dict(unet, getattr(optimizer, "optimizer", optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    elif lora.has_adapters(model) != os.path.isfile(adapters):
        held, trained = ("LoRA adapters", "the whole UNet") if os.path.isfile(adapters) else ("a whole UNet", "LoRA")
        raise InputError(f"--resume_from_checkpoint: {path} holds {held}; this run trains {trained}")
    elif lora.has_adapters(model):
        try:
            state = load_file(adapters)
        except Exception as err:
            raise InputError(f"--resume_from_checkpoint: {adapters} is damaged or truncated "
                             f"({type(err).__name__})") from None
        lora.load_adapter_state(model, state, f"checkpoint {path}")
    else:
        saved = pretrained(type(model), path, "--resume_from_checkpoint", families.denoiser_folder_of(model))
        check_same_shapes(saved, model, f"checkpoint {path}", "the model being trained")
        model.load_state_dict(saved.state_dict())
        del saved
    if not is_sharded(accelerator):
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True,
                                             map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(os.path.join(path, "lr_scheduler.pt"), weights_only=True))
    scaler_file = os.path.join(path, "scaler.pt")
    if getattr(accelerator, "scaler", None) is not None and os.path.isfile(scaler_file):
        accelerator.scaler.load_state_dict(torch.load(scaler_file, weights_only=True))
    rng_file = os.path.join(path, f"rng-{accelerator.process_index}.safetensors")
    if not os.path.isfile(rng_file):
        raise InputError(f"{path} was written by fewer processes than this run has ({rng_file} is missing)")
    set_rng_state(load_file(rng_file))


# ---- the run record -------------------------------------------------------------------------------

# Libraries whose version can change a run's numbers (kernels, image decoding, resizing, data
# order, text encoding), recorded in train_config.json.
RESULT_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "datasets", "numpy", "pillow", "safetensors",
                    "open_clip_torch", "timm", "pyarrow")


def library_versions() -> dict[str, str | None]:
    """The installed versions of RESULT_LIBRARIES, torch with its build tag (+cpu, +cu130, ...), and
    the CUDA and cuDNN versions torch was built with."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in RESULT_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["torch"] = torch.__version__
    found["cuda"] = torch.version.cuda
    found["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return found


def run_config(args, num_processes: int, mixed_precision: str, timesteps: tuple[int, int],
               resume_path: str | None, total_steps: int | None) -> dict:
    """Every setting, plus what the run derives from them (train_config.json)."""
    world, accum = num_processes, args.gradient_accumulation_steps
    settings = {k: v for k, v in sorted(vars(args).items())
                if k not in ("local_rank", "image_column", "dry_run", "check_only")}
    derived = {
        "num_processes": world,
        "pairs_per_step": args.train_batch_size * accum * world,
        "total_steps": total_steps,
        "effective_lr": args.learning_rate * (args.train_batch_size * accum * world if args.scale_lr else 1),
        "optimizer": "Adafactor" if args.use_adafactor else "AdamW8bit" if args.use_8bit_adam else "AdamW",
        "gradient_clipping": f"clip at {float(args.max_grad_norm)}" if args.max_grad_norm > 0 else "off",
        "mixed_precision_used": mixed_precision,
        "weight_dtype": str(DTYPES[mixed_precision]).removeprefix("torch."),
        "loss_precision": args.loss_precision,
        "process_seeds": [args.seed + i for i in range(world)],  # seed + process index, as the reference
        "seed_of_process_0": args.seed,
        "timestep_range": list(timesteps),
        "policy_unet": policy_source(args),
        "reference_unet": reference_source(args),
        "reference_role": reference_role(args),
        "resumed_from": resume_path,
        "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
        "versions": library_versions(),
    }
    return {**settings, "derived": derived}


# Settings that a run may change when it resumes: where things go, how often it saves, logs or
# validates, how long it runs, and speed knobs with the same arithmetic. Every other setting
# changes the result, and a checkpoint written with another value of it is refused.
RESUMABLE_CHANGES = {
    "output_dir", "logging_dir", "report_to", "tracker_project_name", "checkpointing_steps",
    "checkpoints_total_limit", "resume_from_checkpoint", "cache_dir", "dataloader_num_workers",
    "max_train_steps", "num_train_epochs", "gradient_checkpointing", "max_skipped_steps", "validation_steps",
    "validation_timesteps", "validation_prompts", "num_validation_images", "validation_sampling_steps", "derived",
    "merge_lora", "push_to_hub", "hub_model_id", "hub_private_repo",
    "model_family",  # read from the base pipeline, itself a result setting
}
PATH_SETTINGS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "dataset_name", "unet_init",
                 "ref_unet", "latent_cache")


# Result-changing settings added after checkpoints were first written, with the value that gives
# the behaviour from before: a checkpoint that does not record one of them resumes with that value.
ADDED_LATER = {"use_lora": False, "use_8bit_adam": False, "no_t5": False, "weighting_scheme": "logit_normal",
               "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "num_frames": None, "height": None,
               "width": None, "frame_window": "random"}


def result_settings(config: dict) -> dict:
    """The settings that change a run's result (see RESUMABLE_CHANGES), JSON-normalised."""
    kept = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    if not kept.get("use_lora"):  # the LoRA settings mean nothing without --use_lora
        kept = {k: v for k, v in kept.items() if not k.startswith("lora_")}
    for key in PATH_SETTINGS:  # the same folder however it is spelled
        if kept.get(key) and os.path.exists(kept[key]):
            kept[key] = os.path.realpath(kept[key])
    kept["num_processes"] = config["derived"]["num_processes"]
    return json.loads(json.dumps(kept))


def check_same_settings(resume_path: str, recorded: dict | None, now: dict) -> None:
    """Refuse to resume a checkpoint whose run had other result-changing settings."""
    if recorded is None:  # written before checkpoints recorded their settings
        logger.warning("%s records no settings: cannot check that it matches this run", resume_path)
        return
    differ = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k)
                    and not (k not in recorded and ADDED_LATER.get(k, object()) == now.get(k)))
    if differ:
        shown = "; ".join(f"--{k} {recorded.get(k)!r} there, {now.get(k)!r} now" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise InputError(f"--resume_from_checkpoint: {resume_path} was written with other settings: {shown}{more}. "
                         f"Resume with the same settings, or start afresh with another --output_dir")


def check_resumable(resume_path: str | None, resume_state: dict | None, config: dict) -> None:
    """A run that resumes must have the result-changing settings of the checkpoint it resumes."""
    if resume_path:
        check_same_settings(resume_path, resume_state.get("settings"), result_settings(config))


def family_of(config: dict):
    """The family a run trained (a record from before families names it by --sdxl)."""
    return families.get(config.get("model_family") or ("sdxl" if config["sdxl"] else "sd15"))


def load_line(config: dict) -> str:
    """How to load what the run saved, for the model card."""
    family = family_of(config)
    load = f"`{family.denoiser_class_name}.from_pretrained(path, subfolder=\"{family.denoiser_folder}\")`"
    if config.get("use_lora"):
        line = ("Load the LoRA on its base pipeline with `pipe.load_lora_weights(path)` "
                f"(`{lora.LORA_WEIGHTS}`).")
        if config.get("merge_lora"):
            line += f" The merged UNet: {load}."
        return line
    return f"Load with {load}."


def card_metadata(config: dict, images: list[tuple[str, str]]) -> list[str]:
    """The model card's YAML front matter, as the hub reads it: library, base model (a hub id only: a
    local path is not a model the hub knows), tags, and the validation images as the widget."""
    c = config
    base = c["pretrained_model_name_or_path"]
    family = family_of(c)
    tags = ["text-to-image", "diffusers", family.card_tag,
            "preference-optimization", c["train_method"]] + (["lora"] if c.get("use_lora") else [])
    lines = ["---", "library_name: diffusers"]
    if HUB_ID.fullmatch(base) and not os.path.exists(base):
        lines.append(f"base_model: {json.dumps(base)}")
    lines.append("tags:")
    lines += [f"- {json.dumps(tag)}" for tag in tags]
    if images:
        lines.append("widget:")
        for prompt, image in images:
            lines += [f"- text: {json.dumps(prompt)}", "  output:", f"    url: {json.dumps(image)}"]
    return [*lines, "---"]


def write_model_card(config: dict, step: int, num_pairs, path: str, images: list[tuple[str, str]] = ()) -> None:
    """README.md beside the trained UNet: what was trained, on what, with which settings, and the
    last validation images ((prompt, path relative to the card) pairs)."""
    c, d = config, config["derived"]
    safeguard = (f"on (mu = {c['winner_preserving_mu']}, "
                 f"{'per pair' if c['winner_preserving_per_sample'] else 'per micro-batch'})"
                 if c["use_winner_preserving"] else "off")
    lines = [
        *card_metadata(c, list(images)), "",
        f"# {c['train_method']} {'LoRA' if c.get('use_lora') else 'fine-tune'} of {c['pretrained_model_name_or_path']}",
        "", f"Trained with this project's `train.py`. {load_line(c)} Every setting is in `{CONFIG_FILE}`.", "",
        "| setting | value |", "|---|---|",
        f"| base model | {c['pretrained_model_name_or_path']} |",
        f"| architecture | {family_of(c).label} |",
        f"| initial UNet / reference UNet | {d['policy_unet']} / {d['reference_unet']} |",
        f"| method | {c['train_method']} |",
        f"| beta | {c['beta_dpo']} |",
        f"| DMPO alpha | {c['dmpo_alpha']} |",
        f"| winner-preserving safeguard | {safeguard} |",
        f"| timestep weighting | {c['timestep_weighting']} |",
        f"| data | {c['dataset_name']} (split {c['split']}, {num_pairs if num_pairs is not None else 'streamed'} pairs) |",
        f"| resolution | {c['resolution']} |",
        f"| optimizer steps | {step} |",
        f"| pairs per step | {c['train_batch_size']} x {c['gradient_accumulation_steps']} accumulation x "
        f"{d['num_processes']} processes |",
        f"| learning rate | {d['effective_lr']:g} ({c['lr_scheduler']}, {c['lr_warmup_steps']} warmup steps) |",
        f"| optimizer | {d['optimizer']}, gradient clipping: {d['gradient_clipping']} |",
        f"| mixed precision | {d['mixed_precision_used']}, loss precision: {d['loss_precision']} |",
        f"| seed | {c['seed']} (+ process index) |",
    ]
    if c.get("use_lora"):
        lines.insert(lines.index("| setting | value |") + 2,
                     f"| LoRA | rank {c['lora_rank']}, alpha {c['lora_alpha'] or c['lora_rank']}, dropout "
                     f"{c['lora_dropout']}, on {', '.join(c['lora_target_modules'])}; reference: "
                     f"{d.get('reference_role')} |")
    if images:
        lines += ["", f"## Validation images at step {step}", ""]
        lines += [f"![{prompt}]({image})" for prompt, image in images]
    write_text_atomic("\n".join(lines) + "\n", path)
