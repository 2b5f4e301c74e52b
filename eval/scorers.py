"""Reward models behind one interface: `scorer.score(images, prompts) -> list[float]`.

Each scorer loads its model once, runs batched on the given device, and takes its model sources
as keyword arguments (hub ids or local paths), so clusters without internet can point at copies.
Definitions (docs/methods.md, section "Evaluation protocol"):

- pickscore:  cosine of the normalised text and image embeddings of PickScore_v1 (processor from
              laion/CLIP-ViT-H-14-laion2B-s32B-b79K); not multiplied by the logit scale.
- hpsv2:      open_clip ViT-H-14 with the HPS v2.0 checkpoint (HPS_v2_compressed.pt from xswu/HPSv2)
              loaded on top; image-text cosine. (v2.1 is a different, non-comparable checkpoint.)
- clip:       open_clip ViT-H-14 laion2B-s32B-b79K, image-text cosine.
- aesthetics: the LAION improved aesthetic predictor: an MLP 768-1024-128-64-16-1 (no activations)
              on the L2-normalised image embedding of openai/clip-vit-large-patch14.
- imagereward: ImageReward v1.0 (THUDM/ImageReward): BLIP ViT-L image tokens, a BERT that
              cross-attends to them, an MLP on its [CLS] state, standardised (eval/imagereward.py).
"""

from __future__ import annotations

import os
import urllib.request

import torch
import torch.nn.functional as F

from sdpo.errors import InputError

METRICS = ("pickscore", "hpsv2", "aesthetics", "clip", "imagereward")


def _features(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def fetch(source: str, hub_filename: str | None = None) -> str:
    """A local path for a file given as a path, a URL, or a hub repo id (with `hub_filename`)."""
    if os.path.isfile(source):
        return source
    if source.startswith(("http://", "https://")):
        cache = os.path.join(os.path.expanduser("~"), ".cache", "sdpo-eval")
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, os.path.basename(source).replace("%2B", "+"))
        if not os.path.isfile(path):
            try:
                urllib.request.urlretrieve(source, path + ".part")
            except OSError as err:
                raise InputError(f"could not download {source}: {err}; give a local copy") from err
            os.replace(path + ".part", path)
        return path
    if hub_filename:
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(source, hub_filename)
        except Exception as err:  # hub errors come in many types; all mean "not available"
            raise InputError(f"could not fetch {hub_filename} from {source}: {err}; give a local copy") from err
    raise InputError(f"{source} is not a file")


def load_state_dict(path: str) -> dict:
    """A checkpoint's state dict, never running a pickle (weights_only=True)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        return state["state_dict"]
    return state


class Scorer:
    name = ""

    def __init__(self, device: str = "cpu", batch_size: int = 16):
        self.device, self.batch_size = torch.device(device), batch_size

    def score(self, images, prompts) -> list[float]:
        out = []
        for i in range(0, len(images), self.batch_size):
            with torch.no_grad():
                out += self.score_batch(images[i : i + self.batch_size], prompts[i : i + self.batch_size]).tolist()
        return out

    def score_batch(self, images, prompts) -> torch.Tensor:
        raise NotImplementedError


class PickScore(Scorer):
    name = "pickscore"

    def __init__(self, model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", **kw):
        super().__init__(**kw)
        from transformers import AutoModel, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(processor)
        self.model = AutoModel.from_pretrained(model).to(self.device).eval()

    def embeddings(self, images, prompts):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        tokens = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image = _features(self.model.get_image_features(pixel_values=pixels))
        text = _features(self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()}))
        return image, text

    def score_batch(self, images, prompts):
        image, text = self.embeddings(images, prompts)
        return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1).float().cpu()


class OpenClipCosine(Scorer):
    """Image-text cosine of an open_clip model (the CLIP score, and HPSv2 with its checkpoint)."""

    name = "clip"

    def __init__(self, arch="ViT-H-14", pretrained="laion2B-s32B-b79K", checkpoint=None, config=None, **kw):
        super().__init__(**kw)
        import open_clip

        if config:  # a model-config JSON for an architecture open_clip does not ship
            open_clip.add_model_config(config)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=None if checkpoint else pretrained, device="cpu")
        if checkpoint:
            self.model.load_state_dict(load_state_dict(checkpoint))
        self.model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)

    def embeddings(self, images, prompts):
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        image = self.model.encode_image(pixels)
        text = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        return image, text

    def score_batch(self, images, prompts):
        image, text = self.embeddings(images, prompts)
        return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1).float().cpu()


class HPSv2(OpenClipCosine):
    """HPS v2.0. Preprocessing is open_clip's, as the reference's scorer (which calls open_clip
    itself); preprocess="package" reproduces the hpsv2 package instead, which converts to a
    tensor before the bicubic resize (scores differ in the third decimal)."""

    name = "hpsv2"

    def __init__(self, arch="ViT-H-14", checkpoint="xswu/HPSv2", preprocess="open_clip", **kw):
        kw.pop("pretrained", None)  # the HPS checkpoint replaces every weight
        super().__init__(arch=arch, checkpoint=fetch(checkpoint, "HPS_v2_compressed.pt"), **kw)
        if preprocess == "package":
            from torchvision import transforms as T

            size = self.model.visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
            self.preprocess = T.Compose([
                lambda im: im.convert("RGB"), T.ToTensor(),
                T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size),
                T.Normalize(self.model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073),
                            self.model.visual.image_std or (0.26862954, 0.26130258, 0.27577711)),
            ])
        elif preprocess != "open_clip":
            raise InputError(f"hpsv2.preprocess must be open_clip or package, not {preprocess!r}")


class AestheticMLP(torch.nn.Module):
    """The LAION improved aesthetic predictor's head: linear layers with dropout, no activations.
    Parameter names (layers.0, .2, .4, .6, .7) match its released checkpoint."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def load_aesthetic_mlp(source: str, input_size: int = 768) -> AestheticMLP:
    """The aesthetic head loaded from its checkpoint (a local path or a URL), in eval mode."""
    mlp = AestheticMLP(input_size)
    mlp.load_state_dict(load_state_dict(fetch(source)))
    return mlp.eval()


class Aesthetics(Scorer):
    name = "aesthetics"
    DEFAULT_MLP = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                   "sac%2Blogos%2Bava1-l14-linearMSE.pth")

    def __init__(self, clip="openai/clip-vit-large-patch14", mlp=DEFAULT_MLP, **kw):
        super().__init__(**kw)
        from transformers import CLIPImageProcessor, CLIPModel

        self.processor = CLIPImageProcessor.from_pretrained(clip)
        self.clip = CLIPModel.from_pretrained(clip).to(self.device).eval()
        self.mlp = load_aesthetic_mlp(mlp, self.clip.config.projection_dim).to(self.device)

    def score_batch(self, images, prompts):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        embedding = F.normalize(_features(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return self.mlp(embedding).squeeze(-1).float().cpu()


class ImageReward(Scorer):
    """ImageReward v1.0 (THUDM/ImageReward): see eval/imagereward.py for the model."""

    name = "imagereward"

    def __init__(self, checkpoint="THUDM/ImageReward", med_config="THUDM/ImageReward", tokenizer="bert-base-uncased",
                 vision_heads="16", **kw):
        super().__init__(**kw)
        from eval import imagereward as ir

        state = load_state_dict(fetch(checkpoint, "ImageReward.pt"))
        self.model = ir.ImageRewardModel(state, ir.load_med_config(fetch(med_config, "med_config.json")),
                                         vision_heads=int(vision_heads)).to(self.device).eval()
        self.preprocess = ir.preprocess(self.model.image_size)
        self.tokenizer = ir.blip_tokenizer(tokenizer)

    def score_batch(self, images, prompts):
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model(pixels, tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)).cpu()


SCORERS = {"pickscore": PickScore, "hpsv2": HPSv2, "aesthetics": Aesthetics, "clip": OpenClipCosine,
           "imagereward": ImageReward}


def build_scorer(metric: str, device: str = "cpu", batch_size: int = 16, **sources) -> Scorer:
    if metric not in SCORERS:
        raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return SCORERS[metric](device=device, batch_size=batch_size, **sources)
