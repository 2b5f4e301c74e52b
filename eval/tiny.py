"""Tiny random reward models, built offline, in the formats the real ones come in.

For the tests and the demo: the real loaders (transformers AutoModel/AutoProcessor, open_clip
with a registered config and a local checkpoint, the aesthetic MLP's .pth) on tiny random
weights. `tiny_sources(folder)` returns the --source overrides that point every scorer at them.
"""

from __future__ import annotations

import json
import os

import torch

from sdpo.tiny import write_clip_tokenizer

IMAGE_SIZE = 32
OPEN_CLIP_ARCH = "tiny-ViT-sdpo"
OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _hf_clip(folder: str, seed: int, projection_dim: int = 32) -> str:
    """A tiny transformers CLIPModel with a CLIPProcessor (real CLIP tokenizer) in `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sdpo.tiny import load_clip_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(folder)
    write_clip_tokenizer(os.path.join(folder, "_tok"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=load_clip_tokenizer(os.path.join(folder, "_tok"))
                  ).save_pretrained(folder)
    import shutil

    shutil.rmtree(os.path.join(folder, "_tok"))
    return folder


def _open_clip(folder: str, name: str, seed: int, wrap: bool) -> str:
    import open_clip

    config_path = os.path.join(folder, f"{OPEN_CLIP_ARCH}.json")
    with open(config_path, "w") as f:
        json.dump(OPEN_CLIP_CONFIG, f)
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(OPEN_CLIP_ARCH, pretrained=None)
    path = os.path.join(folder, name)
    torch.save({"state_dict": model.state_dict()} if wrap else model.state_dict(), path)
    return path


def build_tiny_scorers(folder: str) -> dict[str, dict[str, str]]:
    """Build (or reuse) every tiny scorer under `folder`; return the per-metric sources."""
    from eval.scorers import AestheticMLP

    os.makedirs(folder, exist_ok=True)
    done = os.path.join(folder, "sources.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    pick = _hf_clip(os.path.join(folder, "pickscore"), seed=1)
    aes_clip = _hf_clip(os.path.join(folder, "aesthetics-clip"), seed=2, projection_dim=48)
    torch.manual_seed(3)
    mlp = os.path.join(folder, "aesthetic-mlp.pth")
    torch.save(AestheticMLP(48).state_dict(), mlp)
    config = os.path.join(folder, f"{OPEN_CLIP_ARCH}.json")
    hps = _open_clip(folder, "hps-tiny.pt", seed=4, wrap=True)
    clip = _open_clip(folder, "clip-tiny.pt", seed=5, wrap=False)
    sources = {
        "pickscore": {"model": pick, "processor": pick},
        "aesthetics": {"clip": aes_clip, "mlp": mlp},
        "hpsv2": {"arch": OPEN_CLIP_ARCH, "config": config, "checkpoint": hps},
        "clip": {"arch": OPEN_CLIP_ARCH, "config": config, "pretrained": clip},
    }
    with open(done, "w") as f:
        json.dump(sources, f, indent=2)
    return sources


def as_flags(sources: dict[str, dict[str, str]]) -> list[str]:
    """The sources as repeated `--source METRIC.FIELD=VALUE` flags."""
    return [x for metric, fields in sources.items() for k, v in fields.items() for x in ("--source", f"{metric}.{k}={v}")]
