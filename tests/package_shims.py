"""Make the scorer packages' own model code importable here, for comparison tests only.

`image-reward` 1.5 and `hpsv2` 1.2.0 are installed without their dependencies (scripts/setup.sh).
Their package __init__ files import things we do not install (openai-clip, clint), so their model
modules are imported under bare parent packages. ImageReward's BERT needs a few names that
transformers 5 moved or removed; they are put back here with their old meaning.
"""

import importlib
import os
import site
import sys
import types

import torch


def _bare_package(name):
    if name in sys.modules:
        return sys.modules[name]
    root = next(os.path.join(p, name.split(".")[0]) for p in site.getsitepackages()
                if os.path.isdir(os.path.join(p, name.split(".")[0])))
    module = types.ModuleType(name)
    module.__path__ = [os.path.join(root, *name.split(".")[1:])]
    sys.modules[name] = module
    return module


def hpsv2_open_clip():
    """hpsv2's vendored copy of open_clip."""
    _bare_package("hpsv2")
    _bare_package("hpsv2.src")
    return importlib.import_module("hpsv2.src.open_clip")


def imagereward_modules():
    """(ImageReward.ImageReward, ImageReward.models.BLIP.blip_pretrain) from the image-reward package."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        setattr(mu, name, getattr(pu, name))
    mu.find_pruneable_heads_and_indices = lambda *a, **k: (set(), torch.arange(0))  # pruning is never used
    if not hasattr(mu.PreTrainedModel, "get_head_mask"):
        mu.PreTrainedModel.get_head_mask = lambda self, head_mask, num_layers, **k: [None] * num_layers
    if not hasattr(mu.PreTrainedModel, "invert_attention_mask"):
        def invert_attention_mask(self, mask):
            mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]
            return (1.0 - mask.to(self.dtype)) * torch.finfo(self.dtype).min
        mu.PreTrainedModel.invert_attention_mask = invert_attention_mask
    fairscale = types.ModuleType("fairscale.nn.checkpoint.checkpoint_activations")
    fairscale.checkpoint_wrapper = lambda module, **kwargs: module  # only used with gradient checkpointing
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["fairscale.nn.checkpoint.checkpoint_activations"] = fairscale
    _bare_package("ImageReward")
    _bare_package("ImageReward.models")
    med = importlib.import_module("ImageReward.models.BLIP.med")
    # transformers 5's init_weights reads the tied-weight map its own post_init builds; BLIP's BERT ties nothing.
    med.BertPreTrainedModel.all_tied_weights_keys = {}
    return (importlib.import_module("ImageReward.ImageReward"),
            importlib.import_module("ImageReward.models.BLIP.blip_pretrain"))
