"""Loading the parts of a Stable Diffusion pipeline, for training and for generation.

Every loader here turns a path that does not hold what it should (a missing folder, a truncated
file, a checkpoint of another architecture) into an InputError that names the flag and the
problem in one line, instead of a library traceback.

What differs between model families (the denoiser's folder and class, the tokenizers and text
encoders) the family says (sdpo.families); the loaders take it as `family`, SD1.5 by default (SDXL
has the same UNet class and folder).
"""

from __future__ import annotations

import logging
import os
import re

import torch

from sdpo import families
from sdpo.errors import InputError, first_line

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# Precision names (train.py's --mixed_precision, eval's --dtype) and the dtype each means.
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


SD15 = families.get("sd15")


def policy_source(args) -> str:
    """Where the policy UNet starts: --unet_init, else the base pipeline's UNet ("base")."""
    return args.unet_init or "base"


def reference_source(args) -> str | None:
    """Where the reference UNet comes from: --ref_unet, else --unet_init (as the reference), else
    the base; None for sft, which has no reference."""
    if args.train_method == "sft":
        return None
    return args.ref_unet or args.unet_init or "base"


def reference_role(args) -> str | None:
    """What computes the reference prediction: None (sft has none); "adapters-off" (LoRA: the
    policy UNet with its adapters switched off, when the reference starts where the policy does: no
    second UNet); "copy" (a frozen copy of the policy's starting UNet); "unet" (another UNet, --ref_unet)."""
    source = reference_source(args)
    if source is None:
        return None
    if source == policy_source(args):
        return "adapters-off" if getattr(args, "use_lora", False) else "copy"
    return "unet"


class _DropEmptyFloat32Warning(logging.Filter):
    """diffusers warns at every `.to(dtype)` of a model that "modules ... should be kept in float32:
    []", about an empty list: noise at every cast of a frozen model, dropped here."""

    def filter(self, record):
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropEmptyFloat32Warning())


def cast_frozen(model, dtype: torch.dtype):
    """`model.to(dtype)` for a frozen model; a diffusers model as `from_pretrained(torch_dtype=dtype)`
    leaves it: the tensors whose name holds a name its class keeps in fp32 (`_keep_in_fp32_modules`:
    Wan2.1's norms, time embedder, rotary embedding and modulation tables) stay in fp32, as the
    pipeline runs them. Cast before moving a model to the GPU: it moves at its final size."""
    from diffusers import ModelMixin

    # (transformers keeps its own list only under fp16 and in from_pretrained: its models are cast whole)
    keep = (getattr(model, "_keep_in_fp32_modules", None) if isinstance(model, ModelMixin) else None) or []
    if not keep:
        return model.to(dtype=dtype)
    for full_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or any(m in full_name.split(".") for m in keep):
            continue
        path, _, key = full_name.rpartition(".")
        module = model.get_submodule(path)
        if key in module._parameters:
            tensor.data = tensor.data.to(dtype)
        else:
            module._buffers[key] = tensor.to(dtype)
    return model


def check_source(source: str, flag: str) -> None:
    """A pipeline or model source must be a folder or look like a hub id ("owner/name")."""
    if os.path.isdir(source):
        return
    if os.path.exists(source):
        raise InputError(f"{flag} {source}: a file, not a folder in the hub layout (model_index.json, unet/, ...)")
    if not HUB_ID.fullmatch(source):
        raise InputError(f"{flag} {source!r}: no such folder, and not a hub id (owner/name)")


def check_base(source: str, sdxl: bool, flag: str = "--pretrained_model_name_or_path", **hub):
    """A base pipeline source must exist (see check_source), be of a family we train, and be SDXL
    exactly when --sdxl says so; returns its family (sdpo.families.resolve)."""
    check_source(source, flag)
    return families.resolve(source, sdxl, flag, **hub)


def pretrained(cls, source: str, flag: str, subfolder: str | None = None, **kwargs):
    """`cls.from_pretrained(source, subfolder=...)`, or an InputError naming the flag."""
    try:
        if subfolder is None:
            return cls.from_pretrained(source, **kwargs)
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except Exception as err:  # hub, file-system and format errors come in many types; all mean "unusable"
        where = os.path.join(source, subfolder) if subfolder else source
        raise InputError(f"{flag}: cannot load the {cls.__name__} from {where}: {first_line(err)}") from None


def load_tokenizers(base: str, family, flag: str = "--pretrained_model_name_or_path", no_t5: bool = False, **hub):
    """The family's tokenizers (SD3 without T5: its two CLIP ones)."""
    return [pretrained(family.tokenizer_class(name), base, flag, name, **hub) for name, _, _ in family.text_folders(no_t5)]


def load_text_side(base: str, family, flag: str = "--pretrained_model_name_or_path", no_t5: bool = False, **hub):
    """The family's tokenizers and text encoders."""
    import transformers

    encoders = [pretrained(getattr(transformers, cls), base, flag, name, **hub)
                for _, name, cls in family.text_folders(no_t5)]
    return load_tokenizers(base, family, flag, no_t5, **hub), encoders


def vae_class(family=SD15):
    import diffusers

    return getattr(diffusers, family.vae_class_name)


def load_vae(base: str, vae: str | None = None, vae_flag: str = "--pretrained_vae_model_name_or_path",
             flag: str = "--pretrained_model_name_or_path", family=SD15, **hub):
    """The VAE (the family's class: a video VAE for the video families): a separate one (a folder or
    hub id holding only the VAE) or the pipeline's own."""
    cls = vae_class(family)
    if vae:
        return pretrained(cls, vae, vae_flag, **hub)
    return pretrained(cls, base, flag, "vae", **hub)


def load_scheduler(cls, base: str, flag: str = "--pretrained_model_name_or_path", **hub):
    return pretrained(cls, base, flag, "scheduler", **hub)


def scheduler_config(base: str, flag: str = "--pretrained_model_name_or_path", **hub) -> dict:
    """The pipeline's scheduler config, as its file holds it (whatever scheduler class it names)."""
    from diffusers import DDPMScheduler  # (any ConfigMixin class reads the file as it is)

    try:
        return dict(DDPMScheduler.load_config(base, subfolder="scheduler", **hub))
    except Exception as err:
        raise InputError(f"{flag}: cannot load the scheduler config of {base}: {first_line(err)}") from None


def vae_config(base: str, vae: str | None = None, family=SD15, flag: str = "--pretrained_model_name_or_path",
               vae_flag: str = "--pretrained_vae_model_name_or_path", **hub):
    """The VAE's config with its defaults filled in (as `vae.config` reads), built on the meta
    device: no weights."""
    source, subfolder, which = (vae, None, vae_flag) if vae else (base, "vae", flag)
    cls = vae_class(family)
    try:
        config = cls.load_config(source, subfolder=subfolder, **hub)
        with torch.device("meta"):
            return cls.from_config(config).config
    except Exception as err:
        raise InputError(f"{which}: cannot read the VAE config of {source}: {first_line(err)}") from None


# ---- UNets -----------------------------------------------------------------------------------


def first_shape_mismatch(ours: dict, theirs: dict):
    """(name, our shape, their shape) of the first parameter that differs between two state
    dicts in presence or shape ('missing' where absent), or None if they fit each other."""
    for key in sorted(set(ours) | set(theirs)):
        a = tuple(ours[key].shape) if key in ours else "missing"
        b = tuple(theirs[key].shape) if key in theirs else "missing"
        if a != b:
            return key, a, b
    return None


def check_same_shapes(model, reference, name: str, reference_name: str) -> None:
    """Stop with a clear error if two models' parameters differ in names or shapes."""
    mismatch = first_shape_mismatch(model.state_dict(), reference.state_dict())
    if mismatch:
        key, a, b = mismatch
        raise InputError(f"{name} does not match {reference_name}: parameter {key} has shape {a} there and {b} here")


def base_unet_shapes(base: str, flag: str = "--pretrained_model_name_or_path", family=SD15, **hub):
    """The base pipeline's denoiser built from its config on the meta device: shapes, no weights."""
    return unet_from_config(base, flag, subfolder=family.denoiser_folder, family=family, **hub)


def _read_state_dict(path: str, flag: str, mmap: bool = False) -> dict:
    """A state dict of tensors from a .safetensors or a pickled (.pth/.pt/.bin) file, never
    running a pickle: torch.load runs with weights_only=True."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # SafetensorError, OSError: truncated or not safetensors
            raise InputError(f"{flag} {path}: not a readable .safetensors file ({first_line(err)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, BadZipFile, ...
        raise InputError(f"{flag} {path}: refusing to load it: not a plain state dict of tensors, or truncated "
                         f"(weights_only=True rejected it: {first_line(err)})") from None
    for key in ("state_dict", "module", "model"):  # common wrappers around the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{flag} {path}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def unet_folder(folder: str, family) -> str | None:
    """Where a diffusers denoiser lies in a folder: its unet/ (transformer/ for SD3: a train.py
    output dir or a pipeline), or the folder itself; None when neither has a config.json."""
    for candidate in (os.path.join(folder, family.denoiser_folder), folder):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    return None


def checkpoint_shapes(spec: str, flag: str, family=SD15, **hub) -> dict:
    """The parameter shapes a denoiser checkpoint holds, read without loading its weights (safetensors
    headers, a memory-mapped .pth, or a config), as meta tensors: a truncated or foreign file is
    found here, in seconds."""
    from safetensors import safe_open

    def from_safetensors(paths):
        shapes = {}
        for path in paths:
            try:
                with safe_open(path, "pt") as f:
                    shapes.update({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})
            except Exception as err:
                raise InputError(f"{flag} {path}: not a readable .safetensors file ({first_line(err)})") from None
        return shapes

    if os.path.isdir(spec):
        folder = unet_folder(spec, family)
        if folder:
            weights = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if weights:
                return from_safetensors([os.path.join(folder, f) for f in weights])
            return unet_from_config(folder, f"{flag} {spec}", family=family).state_dict()
        raise InputError(no_denoiser_message(spec, flag, family))
    if os.path.isfile(spec):
        if spec.endswith(".safetensors"):
            return from_safetensors([spec])
        return {k: torch.empty(v.shape, device="meta") for k, v in _read_state_dict(spec, flag, mmap=True).items()}
    if HUB_ID.fullmatch(spec):
        return unet_from_config(spec, flag, subfolder=family.denoiser_folder, family=family, **hub).state_dict()
    raise InputError(f"{flag} {spec!r}: not found (give 'base', a folder, a .safetensors or a .pth file, or a hub id)")


def no_denoiser_message(spec: str, flag: str, family) -> str:
    return (f"{flag} {spec}: a folder that holds no diffusers {family.denoiser_name} (no config.json, no "
            f"{family.denoiser_folder}/config.json)")


def unet_from_config(source: str, flag: str, subfolder: str | None = None, family=SD15, **hub):
    """A denoiser built from a config on the meta device: its shapes, no weights."""
    cls = family.denoiser_class()
    try:
        config = cls.load_config(source, subfolder=subfolder, **hub)
    except Exception as err:
        raise InputError(f"{flag}: cannot read the {family.denoiser_name} config of {source}: {first_line(err)}") from None
    with torch.device("meta"):
        return cls.from_config(config)


def meta_pipeline(base: str, family, flag: str = "--pretrained_model_name_or_path", **hub):
    """(tokenizers, text encoders, VAE, denoiser) of a pipeline built from its configs on the meta
    device: every shape, no weights (to count FLOPs at any size)."""
    import transformers
    from transformers import AutoConfig

    parts = [(getattr(transformers, cls), name) for _, name, cls in family.text_folders()]
    try:
        configs = [AutoConfig.from_pretrained(base, subfolder=name, **hub) for _, name in parts]
        vae_config = vae_class(family).load_config(base, subfolder="vae", **hub)
    except Exception as err:
        raise InputError(f"{flag}: cannot read the configs of {base}: {first_line(err)}") from None
    with torch.device("meta"):
        encoders = [cls(config) for (cls, _), config in zip(parts, configs)]
        vae = vae_class(family).from_config(vae_config)
    return (load_tokenizers(base, family, flag, **hub), encoders, vae,
            unet_from_config(base, flag, family.denoiser_folder, family, **hub))


def check_fits(state: dict, spec: str, flag: str, base: str, base_flag: str = "--pretrained_model_name_or_path",
               family=SD15, **hub) -> None:
    """A denoiser checkpoint's state dict (or its shapes) must have the base denoiser's names and shapes."""
    mismatch = first_shape_mismatch(state, base_unet_shapes(base, base_flag, family, **hub).state_dict())
    if mismatch:
        key, got, expected = mismatch
        raise InputError(f"{flag} {spec} does not fit the {family.denoiser_name} of {base}: parameter {key} is {got} "
                         f"there, {expected} in the model")


def check_unet(spec: str, base: str, flag: str, family=SD15, **hub) -> None:
    """A denoiser checkpoint must fit the base pipeline's; checked without loading either's weights."""
    if spec != "base":
        check_fits(checkpoint_shapes(spec, flag, family, **hub), spec, flag, base, family=family, **hub)


def check_pipeline(base: str, family, vae: str | None, flag: str = "--pretrained_model_name_or_path",
                   vae_flag: str = "--pretrained_vae_model_name_or_path", no_t5: bool = False, **hub) -> None:
    """The pipeline's parts must be there with readable configs (and the VAE's weights readable),
    found before any weight loads."""
    from transformers import AutoConfig

    base_unet_shapes(base, flag, family, **hub)
    for _, name, _ in family.text_folders(no_t5):
        try:
            AutoConfig.from_pretrained(base, subfolder=name, **hub)
        except Exception as err:
            raise InputError(f"{flag}: cannot read the {name} config of {base}: {first_line(err)}") from None
    vae_config(base, vae, family, flag, vae_flag, **hub)
    folder, which = (vae, vae_flag) if vae else (os.path.join(base, "vae"), flag)
    if os.path.isdir(folder):
        check_weight_files(folder, which)


def check_weight_files(folder: str, flag: str) -> None:
    """Every .safetensors file of a local model folder must have a readable header."""
    from safetensors import safe_open

    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(folder, name), "pt") as f:
                    f.keys()
            except Exception as err:
                raise InputError(f"{flag} {os.path.join(folder, name)}: not a readable .safetensors file "
                                 f"({first_line(err)})") from None


def load_unet(spec: str, base: str, flag: str = "--unet_path", base_flag: str = "--pretrained_model_name_or_path",
              family=SD15, **hub):
    """A UNet from any of the forms checkpoints come in, checked against the base pipeline's UNet:

    - "base": the base pipeline's own UNet;
    - a diffusers folder: a train.py output dir (holding unet/) or a unet/ folder itself;
    - a .safetensors state dict, or a reference-style .pth/.pt/.bin state dict. Pickled files
      are opened with weights_only=True, so one whose pickle would run code is refused.
    Every form must have the base UNet's parameter names and shapes (an SDXL UNet with an SD1.5
    base is refused, naming the first parameter that does not fit). The family's denoiser (SD3:
    the transformer, in transformer/) loads the same ways.
    """
    cls, sub = family.denoiser_class(), family.denoiser_folder
    if spec == "base":
        return pretrained(cls, base, base_flag, sub, **hub)
    unet = None
    if os.path.isdir(spec):
        folder = unet_folder(spec, family)
        if not folder:
            raise InputError(no_denoiser_message(spec, flag, family))
        unet = pretrained(cls, folder, f"{flag} {spec}")
    elif not os.path.exists(spec) and HUB_ID.fullmatch(spec):  # a hub repository with a unet/ folder
        unet = pretrained(cls, spec, flag, sub, **hub)
    if unet is not None:
        check_fits(unet.state_dict(), spec, flag, base, base_flag, family, **hub)
        return unet
    if not os.path.isfile(spec):
        raise InputError(f"{flag} {spec!r}: not found (give 'base', a folder, a .safetensors or a .pth file)")
    state = _read_state_dict(spec, flag)
    check_fits(state, spec, flag, base, base_flag, family, **hub)
    unet = pretrained(cls, base, base_flag, sub, **hub)
    unet.load_state_dict(state)
    return unet
