"""LoRA adapters on the UNet (through peft), and the reference as a role.

With LoRA the base UNet is frozen and only low-rank adapters train. The base is then its own
reference: the reference prediction is the same UNet with its adapters switched off, so no second
UNet is loaded. Adapters start with lora_B = 0, so at the first step the policy computes exactly
what the base computes (x + 0 = x, bitwise) and the Diffusion-DPO loss is exactly log 2.

Default targets: the attention projections to_q, to_k, to_v and to_out.0 of every attention block,
as diffusers' Diffusion-DPO example (examples/research_projects/diffusion_dpo) sets them, with its
Gaussian initialisation of lora_A and alpha = rank (scale 1).

Files:
- the final output is diffusers' LoRA format: `pytorch_lora_weights.safetensors` (keys
  `unet.<module>.lora_A.weight`, ...) with the adapter's config as metadata, what
  `pipe.load_lora_weights(folder)` reads;
- a training checkpoint holds `lora/adapter_model.safetensors`: peft's own state dict of the
  adapters (no base weights).
"""

from __future__ import annotations

import contextlib
import os

import torch

from sdpo.errors import InputError, first_line

DEFAULT_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name, what load_lora_weights looks for
ADAPTER_FILE = "adapter_model.safetensors"  # in a checkpoint's lora/ folder


def lora_config(rank: int, alpha: float | None, dropout: float, targets):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                      init_lora_weights="gaussian", target_modules=list(targets))


def targeted_modules(model: torch.nn.Module, targets) -> list[str]:
    """The module names a target list selects, as peft matches them: a name equal to a target, or
    ending in '.' + target."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and any(name == t or name.endswith("." + t) for t in targets)]


def check_targets(model: torch.nn.Module, targets) -> None:
    """An InputError if one of --lora_target_modules matches nothing in the model."""
    for target in targets:
        if not targeted_modules(model, [target]):
            raise InputError(f"--lora_target_modules {target!r} matches no Linear or Conv2d module of the UNet (the "
                             f"attention projections are to_q, to_k, to_v, to_out.0; others: proj_in, proj_out, "
                             f"ff.net.2, ...)")


def add_adapters(unet: torch.nn.Module, rank: int, alpha: float | None, dropout: float, targets) -> None:
    """Freeze the UNet and add trainable fp32 LoRA adapters to the target modules."""
    check_targets(unet, targets)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, dropout, targets))
    for p in unet.parameters():  # adapters train in fp32 whatever the frozen base's dtype
        if p.requires_grad:
            p.data = p.data.float()


def has_adapters(model) -> bool:
    """Whether a UNet carries peft adapters (add_adapters ran on it)."""
    return bool(getattr(model, "peft_config", None))


def adapter_config(model) -> dict:
    """The adapters' peft config as JSON-ready values (a record beside the checkpoint's weights)."""
    config = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(unet):
    """The UNet without its adapters inside the block; they are on again after it, even when the
    block raises."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def adapter_state(unet) -> dict[str, torch.Tensor]:
    """The adapters' weights, peft's names (no base weights)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_adapter_state(unet, state: dict[str, torch.Tensor], where: str) -> None:
    """Put saved adapter weights into the UNet's adapters; an InputError when they do not fit (other
    targets or another rank)."""
    from peft.utils import set_peft_model_state_dict

    from sdpo.models import first_shape_mismatch

    mismatch = first_shape_mismatch(state, adapter_state(unet))
    if mismatch:
        key, got, expected = mismatch
        raise InputError(f"{where} holds other LoRA adapters than this run's (another rank, targets or base): "
                         f"{key} is {got} there, {expected} here")
    set_peft_model_state_dict(unet, state)


def save_diffusers_lora(model, folder: str, family) -> str:
    """The adapters in diffusers' LoRA format (what `pipe.load_lora_weights(folder)` loads; keys
    `unet.` or, for SD3, `transformer.`), with the adapter config as metadata so that alpha and the
    targets load back as trained."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    key = family.denoiser_folder
    getattr(diffusers, family.pipeline_class).save_lora_weights(
        folder, **{f"{key}_lora_layers": convert_state_dict_to_diffusers(adapter_state(model)),
                   f"{key}_lora_adapter_metadata": adapter_config(model)})
    return os.path.join(folder, LORA_WEIGHTS)


def merged(unet):
    """The UNet with its adapters merged into the base weights and removed (in place): a plain
    UNet, in the base's dtype."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def is_lora_folder(path: str) -> bool:
    """A folder that holds diffusers-format LoRA weights (a train.py --use_lora output)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, LORA_WEIGHTS))


def load_diffusers_lora(model, folder: str, flag: str = "--lora_path", prefix: str = "unet", name: str = "UNet") -> None:
    """Load a diffusers-format LoRA folder into a denoiser (its keys start with `prefix`: unet, or
    transformer for SD3), as `pipe.load_lora_weights` does; an InputError when the folder holds none
    or its adapters do not fit this model (another base)."""
    from safetensors import safe_open

    path = os.path.join(folder, LORA_WEIGHTS)
    if not os.path.isfile(path):
        raise InputError(f"{flag} {folder}: no {LORA_WEIGHTS} in it (a train.py --use_lora output folder holds one)")
    try:
        with safe_open(path, "pt") as f:
            keys = [k for k in f.keys() if k.startswith(prefix + ".")]
    except Exception as err:
        raise InputError(f"{flag} {path}: not a readable .safetensors file ({first_line(err)})") from None
    if not keys:
        raise InputError(f"{flag} {path}: holds no adapters for this model (no key starts with '{prefix}.')")
    try:
        model.load_lora_adapter(folder, prefix=prefix, weight_name=LORA_WEIGHTS, adapter_name="default")
    except Exception as err:  # size mismatches and unknown modules come as several error types
        raise InputError(f"{flag} {folder}: its adapters do not fit this {name} (another base?): "
                         f"{first_line(err)}") from None
    loaded = sum(1 for name, _ in model.named_parameters() if ".lora_" in name)
    if loaded != len(keys):
        raise InputError(f"{flag} {folder}: {len(keys)} adapter tensors in the file, {loaded} found a place in "
                         f"this {name} (a LoRA for another base?)")


# ---- the reference's prediction -------------------------------------------------------------------


class FrozenReference:
    """A reference UNet of its own, frozen: a copy of the policy's start, or --ref_unet."""

    def __init__(self, unet):
        self.unet = unet

    def modules(self) -> list[torch.nn.Module]:
        """The modules this role owns (to cast and move), beside the policy's."""
        return [self.unet]

    def compile(self) -> None:
        self.unet.compile()

    def __call__(self, *args, **inputs):  # the denoiser's keyword inputs (sdpo.families), or (sample, t, ...)
        return self.unet(*args, **inputs).sample


class AdaptersOff:
    """The policy itself with its LoRA adapters switched off: the base UNet, no second copy.

    It runs the UNet class's own forward on the bare (not DDP-wrapped) policy: under no_grad nothing
    needs the DDP wrapper, and under mixed precision accelerator.prepare puts an autocast wrapper on
    the module's forward, which would decide the reference's numerics. Without it the caller decides
    them, as for a frozen copy (MicroBatchLoss: pure weight dtype for --loss_precision reference)."""

    def __init__(self, policy):
        self.policy = policy
        self.forward = type(policy).forward.__get__(policy)

    def modules(self) -> list[torch.nn.Module]:
        return []

    def compile(self) -> None:
        self.forward = torch.compile(self.forward)

    def __call__(self, *args, **inputs):
        with adapters_disabled(self.policy):
            return self.forward(*args, **inputs).sample
