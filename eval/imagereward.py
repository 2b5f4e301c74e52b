"""ImageReward (v1.0) without the `image-reward` package, which does not import with current
transformers and pins a timm that breaks open_clip.

The model is a BLIP image encoder (a ViT: timm's VisionTransformer, the same computation and
parameter names) whose patch tokens a BERT text encoder cross-attends to. The [CLS] state of the
text goes through an MLP head, and the result is standardised:

    reward = (mlp(bert(prompt, cross_attend=vit(image))[:, 0]) - 0.16717362830052426) / 1.0333394966054072

The BERT here is written for this purpose. It has absolute position embeddings, no token types,
bidirectional self-attention, cross-attention whose keys and values come from the vision width,
and post-norm residuals. Parameter names match the released checkpoint, so `ImageReward.pt`
loads directly. A test checks the scores against the package's own model code on random weights.
"""

from __future__ import annotations

import json
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from eval.heads import AestheticMLP  # the same MLP head architecture

REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MASK_VALUE = -10000.0  # the additive mask value BLIP's BERT uses


class BertAttention(nn.Module):
    """Multi-head attention + output projection + residual LayerNorm (post-norm)."""

    def __init__(self, hidden, heads, eps, kv_width=None):
        super().__init__()
        self.heads = heads
        kv_width = kv_width or hidden
        self.self = nn.Module()
        self.self.query = nn.Linear(hidden, hidden)
        self.self.key = nn.Linear(kv_width, hidden)
        self.self.value = nn.Linear(kv_width, hidden)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, context, additive_mask):
        B, T, H = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, H // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.self.query(x)), split(self.self.key(context)), split(self.self.value(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(H // self.heads)
        if additive_mask is not None:
            scores = scores + additive_mask
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H)
        return self.output.LayerNorm(self.output.dense(out) + x)


class BertLayer(nn.Module):
    def __init__(self, hidden, heads, intermediate, eps, encoder_width):
        super().__init__()
        self.attention = BertAttention(hidden, heads, eps)
        self.crossattention = BertAttention(hidden, heads, eps, kv_width=encoder_width)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, text_mask, image_tokens):
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image_tokens, None)  # every image token is attended to
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(x))) + x)


class CrossAttentionBert(nn.Module):
    """BLIP's multimodal BERT encoder (no pooler)."""

    def __init__(self, vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, layer_norm_eps=1e-12, encoder_width=1024,
                 pad_token_id=0, **_):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.embeddings.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(hidden_size, num_attention_heads, intermediate_size, layer_norm_eps, encoder_width)
            for _ in range(num_hidden_layers))

    def forward(self, input_ids, attention_mask, image_tokens):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embeddings.word_embeddings(input_ids) + self.embeddings.position_embeddings(positions)[None]
        x = self.embeddings.LayerNorm(x)
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * MASK_VALUE
        for layer in self.encoder.layer:
            x = layer(x, additive, image_tokens)
        return x


def vision_transformer(state: dict, heads: int):
    """timm's ViT shaped after a BLIP visual-encoder state dict (width, depth, patch and image size
    are read from the weights; the head count is not in them)."""
    from timm.models.vision_transformer import VisionTransformer

    width = state["pos_embed"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    image_size = patch * int(round(math.sqrt(state["pos_embed"].shape[1] - 1)))
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    vit = VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                            mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                            num_classes=0, global_pool="")
    return vit, image_size


def preprocess(image_size: int):
    """Bicubic resize of the shorter side, center crop, CLIP normalisation (as ImageReward)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
        lambda im: im.convert("RGB"), T.ToTensor(),
        T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])


def blip_tokenizer(source: str):
    """bert-base-uncased with BLIP's two added special tokens ([DEC] as bos, [ENC])."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_part(module: nn.Module, state: dict, what: str) -> None:
    """Load a part of the checkpoint: every parameter must be there; extras (buffers such as
    position_ids, BLIP's unused projection heads) are ignored, as the package's own loader does."""
    from sdpo.errors import InputError

    missing, _ = module.load_state_dict(state, strict=False)
    if missing:
        raise InputError(f"the ImageReward checkpoint lacks {what} weights: {', '.join(missing[:5])}")


class ImageRewardModel(nn.Module):
    def __init__(self, state: dict, med_config: dict, vision_heads: int = 16):
        super().__init__()

        vit_state = {k[len("blip.visual_encoder."):]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
        self.visual, self.image_size = vision_transformer(vit_state, vision_heads)
        load_part(self.visual, vit_state, "image-encoder")
        config = {**med_config, "encoder_width": vit_state["pos_embed"].shape[-1]}
        text_state = {k[len("blip.text_encoder."):]: v for k, v in state.items()
                      if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
        config["vocab_size"] = text_state["embeddings.word_embeddings.weight"].shape[0]
        self.text = CrossAttentionBert(**config)
        load_part(self.text, text_state, "text-encoder")
        self.mlp = AestheticMLP(config["hidden_size"])
        load_part(self.mlp, {k[len("mlp."):]: v for k, v in state.items() if k.startswith("mlp.")}, "MLP-head")

    def forward(self, pixels, input_ids, attention_mask):
        image_tokens = self.visual.forward_features(pixels)
        cls = self.text(input_ids, attention_mask, image_tokens)[:, 0, :].float()
        return ((self.mlp(cls) - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def load_med_config(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
