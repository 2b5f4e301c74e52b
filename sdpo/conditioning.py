"""How a caption becomes UNet conditioning: the one place where SD1.5 and SDXL differ.

- SD1.5: the text encoder's last hidden state.
- SDXL: both text encoders' penultimate hidden states concatenated on the feature axis, the
  pooled (projected) embedding of the second encoder, and the micro-conditioning time ids
  (original_h, original_w, crop_top, crop_left, target_h, target_w), which the reference fixes
  to (res, res, 0, 0, res, res) for every image. We keep that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """UNet conditioning for a batch of captions."""

    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None  # SDXL pooled embedding
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning

    def repeat(self, n: int) -> "Conditioning":
        """The same conditioning for n stacked copies of the batch (winners, then losers)."""
        rep = lambda x: None if x is None else x.repeat(n, *([1] * (x.ndim - 1)))  # noqa: E731
        return Conditioning(rep(self.encoder_hidden_states), rep(self.text_embeds), rep(self.time_ids))

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return kwargs


class PromptEncoder:
    """Encodes captions with frozen tokenizers and text encoders (one of each for SD1.5, two for SDXL)."""

    def __init__(self, tokenizers, text_encoders, resolution: int):
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.sdxl = len(self.text_encoders) == 2
        self.resolution = resolution

    def token_ids(self, captions: list[str]) -> list[torch.Tensor]:
        """The captions' token ids, one (N, max_length) tensor per tokenizer (what the latent cache
        stores)."""
        return [tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                          return_tensors="pt").input_ids for tokenizer in self.tokenizers]

    @torch.no_grad()
    def __call__(self, captions: list[str] | None, device, dtype=None, size: tuple[int, int] | None = None,
                 ids: list[torch.Tensor] | None = None) -> Conditioning:
        """Conditioning for the captions, or for their token ids (`ids`, as token_ids gives them);
        `size` (h, w) sets SDXL's time ids (default: square at the resolution)."""
        ids = [i.to(device) for i in (ids if ids is not None else self.token_ids(captions))]
        if not self.sdxl:
            (encoder,) = self.text_encoders
            hidden = encoder(ids[0]).last_hidden_state
            return Conditioning(hidden if dtype is None else hidden.to(dtype))
        hidden_states, pooled = [], None
        for token_ids, encoder in zip(ids, self.text_encoders):
            out = encoder(token_ids, output_hidden_states=True)
            hidden_states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        h, w = size or (self.resolution, self.resolution)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=device).repeat(ids[0].shape[0], 1)
        hidden = torch.cat(hidden_states, dim=-1)
        dtype = dtype or hidden.dtype
        return Conditioning(hidden.to(dtype), pooled.to(dtype), time_ids.to(dtype))
