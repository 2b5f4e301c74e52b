"""Tiny random SD1.5-style and SDXL-style pipelines and a synthetic Pick-a-Pic dataset, built
offline, for the demo and the tests.

The pipelines are the real diffusers/transformers classes saved in the hub layout
(unet/ vae/ text_encoder/ [text_encoder_2/] tokenizer/ [tokenizer_2/] scheduler/ model_index.json),
so every loader the training code uses on a real model is exercised. Only the weights are tiny
and random. The tokenizer is the real CLIP tokenizer, built from the BPE vocabulary open_clip ships.

    python -m sdpo.tiny --out /tmp/tiny     # writes sd15/, sdxl/, sd3/ and pickapic/ under /tmp/tiny
"""

from __future__ import annotations

if not __package__:  # run as a file (python sdpo/tiny.py): the repository root in this folder's place
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import gzip
import io
import json
import os
import random

import numpy as np
from PIL import Image

CLIP_VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ---- the CLIP tokenizer ----------------------------------------------------------------------


def byte_symbols() -> list[str]:
    """The 256 printable symbols of byte-level BPE, in byte order: printable Latin-1 bytes stand
    for themselves, the others map to code points from 256 upwards in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def ordered_byte_symbols() -> list[str]:
    """Byte symbols in CLIP's vocabulary order: the printable bytes first, then the rest."""
    symbols = byte_symbols()
    printable = [s for b, s in enumerate(symbols) if ord(s) == b]
    others = [s for b, s in enumerate(symbols) if ord(s) != b]
    return printable + others


def write_clip_tokenizer(folder: str, pad_token: str = EOS, model_max_length: int = 77) -> None:
    """Write vocab.json, merges.txt and the configs of the CLIP BPE tokenizer into `folder`.

    The vocabulary is the 256 byte symbols, the same with the end-of-word marker, one entry per
    merge of the first 48894 merges, then the two special tokens: 49408 entries.
    """
    import open_clip

    bpe_path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    base = ordered_byte_symbols()
    vocab = base + [s + "</w>" for s in base] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=2)


def load_clip_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


# ---- the tiny pipelines ----------------------------------------------------------------------


def _text_config(hidden: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
    )


def _vae():
    from diffusers import AutoencoderKL

    # Two blocks: one 2x downsampling (the real VAE has three, 8x).
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32,
    )


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    # Stable Diffusion's training noise schedule.
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
    )


def _unet(cross_attention_dim: int, sdxl: bool, pooled_dim: int = 0):
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    )
    if sdxl:
        time_dim = 8
        kwargs.update(
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=time_dim * 6 + pooled_dim, use_linear_projection=True,
        )
    return UNet2DConditionModel(**kwargs)


def build_tiny_pipeline(folder: str, sdxl: bool = False, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Build a tiny random SD1.5-style (or SDXL-style) pipeline and save it in the hub layout."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "_tokenizer_src")
    write_clip_tokenizer(tok_dir)
    tokenizer = load_clip_tokenizer(tok_dir)
    if not sdxl:
        from diffusers import StableDiffusionPipeline

        text_encoder = CLIPTextModel(_text_config(32, 32))
        pipe = StableDiffusionPipeline(
            vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=_unet(32, sdxl=False),
            scheduler=_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        from diffusers import StableDiffusionXLPipeline

        write_clip_tokenizer(tok_dir + "_2", pad_token="!")
        text_encoder = CLIPTextModel(_text_config(32, 32))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(32, 32))
        pipe = StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=load_clip_tokenizer(tok_dir + "_2"), unet=_unet(64, sdxl=True, pooled_dim=32),
            scheduler=_scheduler(prediction_type),
        )
    pipe.save_pretrained(folder)
    import shutil

    shutil.rmtree(tok_dir)
    shutil.rmtree(tok_dir + "_2", ignore_errors=True)
    return folder


T5_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"


def write_t5_tokenizer(folder: str, model_max_length: int = 77) -> None:
    """A T5-style tokenizer (SentencePiece Unigram, '</s>' appended, '<pad>' = 0,
    '</s>' = 1, '<unk>' = 2) over single characters and word-initial characters, built offline
    with the tokenizers library and saved as tokenizer.json: what SD3's third tokenizer is, in
    miniature (the released one is T5's 32k-piece SentencePiece model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in T5_CHARACTERS] + [("\u2581" + c, -2.5) for c in T5_CHARACTERS]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                    extra_ids=0, model_max_length=model_max_length).save_pretrained(folder)


def build_tiny_sd3_pipeline(folder: str, seed: int = 0) -> str:
    """A tiny random SD3-style pipeline in the hub layout: SD3Transformer2DModel, two CLIP text
    encoders with projections and a T5 encoder (their embeddings concatenated and padded to T5's
    width, as SD3 does), a VAE with a shift factor, FlowMatchEulerDiscreteScheduler (shift 3).
    Loads with StableDiffusion3Pipeline, with or without its T5 (text_encoder_3=None)."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    sources = os.path.join(folder, "_tokenizer_src")
    write_clip_tokenizer(sources + "_1")
    write_clip_tokenizer(sources + "_2", pad_token="!")
    write_t5_tokenizer(sources + "_3")
    t5_tokenizer = AutoTokenizer.from_pretrained(sources + "_3")
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=32)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, shift_factor=0.1, scaling_factor=1.5)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=CLIPTextModelWithProjection(_text_config(32, 32)),
        tokenizer=load_clip_tokenizer(sources + "_1"),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32, 32)), tokenizer_2=load_clip_tokenizer(sources + "_2"),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(folder)
    for part in ("_1", "_2", "_3"):
        shutil.rmtree(sources + part)
    return folder


def _tiny_t5_encoder(cls_name: str, vocab_size: int, d_model: int = 32):
    """A tiny T5-family text encoder (T5EncoderModel or UMT5EncoderModel), random weights."""
    import transformers

    config_cls = transformers.UMT5Config if cls_name == "UMT5EncoderModel" else transformers.T5Config
    config = config_cls(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return getattr(transformers, cls_name)(config)


def build_tiny_wan_pipeline(folder: str, seed: int = 0) -> str:
    """A tiny random Wan2.1-style text-to-video pipeline in the hub layout: WanTransformer3DModel,
    a UMT5 encoder with a T5-style tokenizer built offline, AutoencoderKLWan (8x spatial, 4x
    temporal compression, per-channel latent mean and std) and the UniPC flow-matching scheduler
    the released pipeline ships (flow_shift 3). Loads with WanPipeline."""
    import shutil

    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    source = os.path.join(folder, "_tokenizer_src")
    write_t5_tokenizer(source, model_max_length=512)
    tokenizer = AutoTokenizer.from_pretrained(source)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    g = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=(0.2 * torch.randn(4, generator=g)).tolist(),
                           latents_std=(1.0 + 0.5 * torch.rand(4, generator=g)).tolist())
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    WanPipeline(tokenizer=tokenizer, text_encoder=_tiny_t5_encoder("UMT5EncoderModel", len(tokenizer)), vae=vae,
                scheduler=scheduler, transformer=transformer).save_pretrained(folder)
    shutil.rmtree(source)
    return folder


def build_tiny_cogvideox_pipeline(folder: str, seed: int = 0) -> str:
    """A tiny random CogVideoX-style text-to-video pipeline in the hub layout:
    CogVideoXTransformer3DModel (v-prediction, with rotary embeddings as CogVideoX-5B), a T5 encoder
    with a T5-style tokenizer built offline, AutoencoderKLCogVideoX (8x spatial, 4x temporal) and
    CogVideoXDDIMScheduler (v-prediction, zero terminal SNR). Loads with CogVideoXPipeline."""
    import shutil

    import torch
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    source = os.path.join(folder, "_tokenizer_src")
    write_t5_tokenizer(source, model_max_length=226)
    tokenizer = AutoTokenizer.from_pretrained(source)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, scaling_factor=0.7)
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                                       snr_shift_scale=1.0, timestep_spacing="trailing", clip_sample=False,
                                       set_alpha_to_one=True)
    CogVideoXPipeline(tokenizer=tokenizer, text_encoder=_tiny_t5_encoder("T5EncoderModel", len(tokenizer)), vae=vae,
                      transformer=transformer, scheduler=scheduler).save_pretrained(folder)
    shutil.rmtree(source)
    return folder


# ---- the synthetic preference data -----------------------------------------------------------

WORDS = ["a red", "a blue", "a green", "an old", "a shiny", "a tiny", "a giant", "a wooden"]
THINGS = ["cat", "house", "car", "tree", "robot", "boat", "castle", "flower"]
PLACES = ["at sunset", "in the snow", "on the moon", "under water", "in a forest", "in the city"]


def _smooth_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A smooth two-colour gradient: the kind of image the synthetic raters prefer."""
    h, w = size
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0, 1, w)[None, :, None]
    return np.broadcast_to(a + (b - a) * ramp, (h, w, 3))


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_tiny_pickapic(folder: str, num_rows: int = 64, seed: int = 0, tie_fraction: float = 0.1,
                        split: str = "train", size: tuple[int, int] = (40, 48)) -> str:
    """A synthetic Pick-a-Pic v2 split as data/<split>-00000-of-00001.parquet.

    The preferred image of each pair is a smooth gradient; the other is the same gradient with
    strong noise; label_0 says which column holds the preferred one; a fraction are ties.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    py_rng = random.Random(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for _ in range(num_rows):
        smooth = _smooth_image(rng, size)
        noisy = smooth + rng.normal(0, 60, smooth.shape)
        good_first = py_rng.random() < 0.5
        rows["caption"].append(f"{py_rng.choice(WORDS)} {py_rng.choice(THINGS)} {py_rng.choice(PLACES)}")
        rows["jpg_0"].append(_jpeg(smooth if good_first else noisy))
        rows["jpg_1"].append(_jpeg(noisy if good_first else smooth))
        rows["label_0"].append(0.5 if py_rng.random() < tie_fraction else (1.0 if good_first else 0.0))
    table = pa.table({
        "caption": pa.array(rows["caption"], pa.string()),
        "jpg_0": pa.array(rows["jpg_0"], pa.binary()),
        "jpg_1": pa.array(rows["jpg_1"], pa.binary()),
        "label_0": pa.array(rows["label_0"], pa.float64()),
    })
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    pq.write_table(table, os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))
    return folder


def build_tiny_video_pickapic(folder: str, num_rows: int = 16, seed: int = 0, frames: int = 12,
                              size: tuple[int, int] = (40, 48), split: str = "train") -> str:
    """A synthetic video preference split (the Pick-a-Pic layout with video_0 and video_1, mp4
    bytes) as data/<split>-00000-of-00001.parquet. The preferred clip is a smooth gradient that
    brightens over time; the other is the same clip with strong noise in every frame. Clip lengths
    vary by a few frames per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdpo.video import encode_mp4

    rng = np.random.default_rng(seed)
    py_rng = random.Random(seed)
    rows = {"caption": [], "video_0": [], "video_1": [], "label_0": []}
    for _ in range(num_rows):
        length = frames + py_rng.randint(0, 3)
        base = _smooth_image(rng, size)
        smooth = np.stack([base * (0.6 + 0.4 * t / length) for t in range(length)])
        noisy = smooth + rng.normal(0, 60, smooth.shape)
        clips = [np.clip(c, 0, 255).astype(np.uint8) for c in (smooth, noisy)]
        good_first = py_rng.random() < 0.5
        rows["caption"].append(f"{py_rng.choice(WORDS)} {py_rng.choice(THINGS)} {py_rng.choice(PLACES)}")
        rows["video_0"].append(encode_mp4(clips[0] if good_first else clips[1]))
        rows["video_1"].append(encode_mp4(clips[1] if good_first else clips[0]))
        rows["label_0"].append(1.0 if good_first else 0.0)
    table = pa.table({"caption": pa.array(rows["caption"], pa.string()), "video_0": pa.array(rows["video_0"], pa.binary()),
                      "video_1": pa.array(rows["video_1"], pa.binary()), "label_0": pa.array(rows["label_0"], pa.float64())})
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    pq.write_table(table, os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))
    return folder


def build_all(out: str, num_rows: int = 64) -> dict[str, str]:
    """Build (or reuse) the tiny SD1.5, SDXL and SD3 pipelines and the synthetic dataset under `out`."""
    paths = {name: os.path.join(out, name) for name in ("sd15", "sdxl", "sd3")}
    paths["data"] = os.path.join(out, "pickapic")
    if not os.path.exists(os.path.join(paths["sd15"], "model_index.json")):
        build_tiny_pipeline(paths["sd15"], sdxl=False)
    if not os.path.exists(os.path.join(paths["sdxl"], "model_index.json")):
        build_tiny_pipeline(paths["sdxl"], sdxl=True)
    if not os.path.exists(os.path.join(paths["sd3"], "model_index.json")):
        build_tiny_sd3_pipeline(paths["sd3"])
    if not os.path.exists(os.path.join(paths["data"], "data")):
        build_tiny_pickapic(paths["data"], num_rows=num_rows)
    return paths


def build_video(out: str, num_rows: int = 16) -> dict[str, str]:
    """Build (or reuse) the tiny Wan2.1 and CogVideoX pipelines and the synthetic video dataset under `out`."""
    paths = {name: os.path.join(out, name) for name in ("wan21", "cogvideox")}
    paths["video_data"] = os.path.join(out, "video-pickapic")
    for name, build in (("wan21", build_tiny_wan_pipeline), ("cogvideox", build_tiny_cogvideox_pipeline)):
        if not os.path.exists(os.path.join(paths[name], "model_index.json")):
            build(paths[name])
    if not os.path.exists(os.path.join(paths["video_data"], "data")):
        build_tiny_video_pickapic(paths["video_data"], num_rows=num_rows)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write sd15/, sdxl/, sd3/ and pickapic/ into")
    parser.add_argument("--num_rows", type=int, default=64, help="rows of the synthetic dataset")
    args = parser.parse_args()
    for name, path in build_all(args.out, args.num_rows).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
