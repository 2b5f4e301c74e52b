"""How captions become the denoiser's conditioning. The family (sdpo.families) says how its text
encoders' outputs combine; this module holds the result and the frozen encoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """The denoiser's conditioning for a batch of captions (batch-first tensors)."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL's text_embeds, SD3's pooled_projections
    time_ids: torch.Tensor | None = None  # SDXL's micro-conditioning

    def repeat(self, n: int) -> "Conditioning":
        """The same conditioning for n stacked copies of the batch (winners, then losers)."""
        rep = lambda x: None if x is None else x.repeat(n, *([1] * (x.ndim - 1)))  # noqa: E731
        return Conditioning(rep(self.encoder_hidden_states), rep(self.pooled), rep(self.time_ids))

    def cat(self, other: "Conditioning") -> "Conditioning":
        """This batch, then the other's."""
        both = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return Conditioning(*(both(getattr(self, f), getattr(other, f))
                              for f in ("encoder_hidden_states", "pooled", "time_ids")))


class PromptEncoder:
    """Encodes captions with a family's frozen tokenizers and text encoders."""

    def __init__(self, family, tokenizers, text_encoders, resolution: int, denoiser_config=None,
                 sampling: bool = False):
        """sampling: the token lengths of the family's pipeline (SD3: 256 T5 tokens) instead of those
        of its training examples (SD3: 77); `denoiser_config` gives SD3 without T5 the width of the
        zeros in T5's place."""
        self.family = family
        self.denoiser_config = denoiser_config
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.resolution = resolution
        self.token_lengths = family.token_lengths(self.tokenizers, sampling)
        self.missing_context = family.missing_context(denoiser_config, sampling, len(self.text_encoders))

    def token_ids(self, captions: list[str]) -> list[torch.Tensor]:
        """The captions' token ids, one (N, max_length) tensor per tokenizer (what the latent cache
        stores)."""
        captions = [self.family.clean_caption(c) for c in captions]
        return [tokenizer(captions, max_length=length, padding="max_length", truncation=True,
                          return_tensors="pt").input_ids for tokenizer, length in zip(self.tokenizers, self.token_lengths)]

    @torch.no_grad()
    def __call__(self, captions: list[str] | None, device, dtype=None, size: tuple[int, int] | None = None,
                 ids: list[torch.Tensor] | None = None) -> Conditioning:
        """Conditioning for the captions, or for their token ids (`ids`, as token_ids gives them);
        `size` (h, w) sets SDXL's time ids (default: square at the resolution)."""
        ids = [i.to(device) for i in (ids if ids is not None else self.token_ids(captions))]
        return self.family.encode(self.text_encoders, ids, device, dtype, size or (self.resolution, self.resolution),
                                  self.missing_context)
