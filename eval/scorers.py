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

import contextlib
import os
import re
import urllib.request

import torch
import torch.nn.functional as F

from eval.heads import AestheticMLP
from sdpo.errors import InputError, first_line
from sdpo.files import atomic_path, remove_stale_temps

METRICS = ("pickscore", "hpsv2", "aesthetics", "clip", "imagereward")
DEFAULT_AESTHETIC_MLP = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                         "sac%2Blogos%2Bava1-l14-linearMSE.pth")

# Every model source of every metric (--source METRIC.FIELD=VALUE), its default and what it may be:
#   pretrained: a local folder or a hub id (from_pretrained)
#   fetch: a local file, a local folder holding the released file name, a URL or a hub id
#   file: a local file        file_or_url: a local file or a URL        name: a name the library knows
#   tag: an open_clip pretrained tag (downloaded) or a local file
#   a tuple: one of these values        int: a positive integer
SOURCES = {
    "pickscore": {"model": ("yuvalkirstain/PickScore_v1", "pretrained"),
                  "processor": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "pretrained")},
    "hpsv2": {"arch": ("ViT-H-14", "name"), "checkpoint": ("xswu/HPSv2", "fetch"),
              "preprocess": ("open_clip", ("open_clip", "package")), "config": (None, "file")},
    "aesthetics": {"clip": ("openai/clip-vit-large-patch14", "pretrained"), "mlp": (DEFAULT_AESTHETIC_MLP, "file_or_url")},
    "clip": {"arch": ("ViT-H-14", "name"), "pretrained": ("laion2B-s32B-b79K", "tag"), "checkpoint": (None, "file"),
             "config": (None, "file")},
    "imagereward": {"checkpoint": ("THUDM/ImageReward", "fetch"), "med_config": ("THUDM/ImageReward", "fetch"),
                    "tokenizer": ("bert-base-uncased", "pretrained"), "vision_heads": ("16", "int")},
}
# The kinds of source that may be downloaded, and so fail without network.
DOWNLOADED = ("pretrained", "fetch", "file_or_url", "tag")
# A hub id: "owner/name", or a legacy one-part name such as "bert-base-uncased".
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_source(metric: str, field: str, value: str, flag: str = "--source") -> None:
    """One --source value, checked without loading anything: a known field, and a value of the
    field's kind (a local path that is not there fails here, not after other models loaded)."""
    fields = SOURCES[metric]
    where = f"{flag} {metric}.{field}={value}"
    if field not in fields:
        raise InputError(f"{flag} {metric}.{field}: {metric} has no source {field!r}; its sources are "
                         f"{', '.join(fields)}")
    if not value:
        raise InputError(f"{where}: an empty value")
    kind = fields[field][1]
    exists = os.path.exists(value)
    url = value.startswith(("http://", "https://"))
    if isinstance(kind, tuple):
        ok, need = value in kind, f"one of {', '.join(kind)}"
    elif kind == "int":
        ok, need = value.isdigit() and int(value) >= 1, "a positive integer"
    elif kind == "file":
        ok, need = os.path.isfile(value), "an existing file"
    elif kind == "file_or_url":
        ok, need = os.path.isfile(value) or url, "an existing file or a URL"
    elif kind == "fetch":
        ok, need = exists or url or HUB_NAME.fullmatch(value), \
            "an existing file (or a folder holding it), a URL or a hub id (owner/name)"
    elif kind == "pretrained":
        ok, need = os.path.isdir(value) or (not exists and HUB_NAME.fullmatch(value)), \
            "an existing folder or a hub id (owner/name)"
    else:
        ok, need = True, ""
    if not ok:
        if isinstance(kind, tuple) or kind == "int":
            raise InputError(f"{where}: expected {need}")
        got = "a folder" if os.path.isdir(value) else "a file" if exists else "not found"
        raise InputError(f"{where}: {got}; expected {need}")


def scorer_identity(metric: str, sources: dict[str, str] | None = None) -> dict:
    """What a score depends on besides the image and the prompt: the metric, its definition's
    version, and every model source (given or default), local ones with the size and mtime of
    their files (sdpo.files.path_identity). Two equal identities score alike."""
    from sdpo.files import path_identity

    given = with_defaults(metric, sources)
    return {"metric": metric, "version": SCORERS[metric].version,
            "sources": {field: None if value is None else path_identity(value) for field, value in given.items()}}


def with_defaults(metric: str, sources: dict[str, str] | None = None) -> dict:
    """Every model source of the metric: the given ones, and SOURCES' defaults for the others."""
    sources = sources or {}
    return {field: sources.get(field, default) for field, (default, _) in SOURCES[metric].items()}


@contextlib.contextmanager
def quiet_logging():
    """Silence the logging module (up to ERROR) for the duration, then restore its setting."""
    import logging

    before = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(before)


def _features(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Unavailable(InputError):
    """A model source that could not be downloaded (no network, or not where it was looked for)."""


def fetch(source: str, hub_filename: str | None = None) -> str:
    """A local path for a file given as a path, a URL, or a hub repo id (with `hub_filename`)."""
    if os.path.isfile(source):
        return source
    if source.startswith(("http://", "https://")):
        cache = os.path.join(os.path.expanduser("~"), ".cache", "sdpo-eval")
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, os.path.basename(source).replace("%2B", "+"))
        if not os.path.isfile(path):
            remove_stale_temps(cache)
            try:
                with atomic_path(path) as part:  # a download cut short never lies under the file's name
                    urllib.request.urlretrieve(source, part)
            except OSError as err:
                raise Unavailable(f"could not download {source}: {first_line(err)}") from None
        return path
    if os.path.isdir(source):
        if hub_filename and os.path.isfile(os.path.join(source, hub_filename)):
            return os.path.join(source, hub_filename)
        raise InputError(f"{source} is a folder{f' without {hub_filename}' if hub_filename else ''}; give the file")
    if hub_filename and HUB_NAME.fullmatch(source):
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(source, hub_filename)
        except Exception as err:  # hub errors come in many types; all mean "not available"
            raise Unavailable(f"could not fetch {hub_filename} from {source}: {first_line(err)}") from None
    raise InputError(f"{source}: no such file")


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
    """A metric's models, loaded once; `score(images, prompts)` runs them in batches.

    Subclasses take their model sources as keyword-only arguments without defaults: the defaults
    live in SOURCES, and build_scorer fills them in."""

    name = ""  # the metric, as --source names it
    version = 1  # of the score's definition: a change that moves scores must bump it (old score files go stale)

    def __init__(self, *, device: str = "cpu", batch_size: int = 16, flag: str = "--source"):
        self.device, self.batch_size, self.flag = torch.device(device), batch_size, flag

    @contextlib.contextmanager
    def loading(self, field: str, value):
        """Turn any failure to load a model source into one line naming `--source metric.field=value`.
        When the source is to be downloaded (a hub id, a URL, an open_clip tag), which fails
        offline, the line also says how to give a local copy instead."""
        where = f"{self.flag} {self.name}.{field}={value}"
        hint = f"; without network, pass a local path with {self.flag} {self.name}.{field}=PATH"
        downloaded = SOURCES[self.name][field][1] in DOWNLOADED and not os.path.exists(str(value))
        try:
            yield
        except Unavailable as err:
            raise InputError(f"{where}: {err}{hint}") from None
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
        except Exception as err:  # hub, file-system, pickle and format errors come in many types
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
            text = lines[0] + (f" {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else "")
            raise InputError(f"{where}: cannot load it ({text[:400]}){hint if downloaded else ''}") from None

    def score(self, images, prompts) -> list[float]:
        out = []
        for i in range(0, len(images), self.batch_size):
            with torch.no_grad():
                out += self.score_batch(images[i : i + self.batch_size], prompts[i : i + self.batch_size]).tolist()
        return out

    def score_batch(self, images, prompts) -> torch.Tensor:
        raise NotImplementedError


class EmbeddingCosine(Scorer):
    """A score that is the cosine of an image embedding and a text embedding (PickScore, CLIP, HPSv2);
    subclasses say how they embed."""

    def embeddings(self, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def score_batch(self, images, prompts):
        image, text = self.embeddings(images, prompts)
        return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1).float().cpu()


class PickScore(EmbeddingCosine):
    name = "pickscore"

    def __init__(self, *, model, processor, **kw):
        super().__init__(**kw)
        from transformers import AutoModel, AutoProcessor

        with self.loading("processor", processor):
            self.processor = AutoProcessor.from_pretrained(processor)
        with self.loading("model", model):
            self.model = AutoModel.from_pretrained(model).to(self.device).eval()

    def embeddings(self, images, prompts):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        tokens = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image = _features(self.model.get_image_features(pixel_values=pixels))
        text = _features(self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()}))
        return image, text


class OpenClipCosine(EmbeddingCosine):
    """Image-text cosine of an open_clip model (the CLIP score, and HPSv2 with its checkpoint)."""

    name = "clip"

    def __init__(self, *, arch, pretrained, checkpoint, config, **kw):
        super().__init__(**kw)
        import open_clip

        if config:  # a model-config JSON for an architecture open_clip does not ship
            with self.loading("config", config):
                if not os.path.isfile(config):
                    raise InputError("no such file")
                open_clip.add_model_config(config)
        with self.loading("arch", arch):
            if open_clip.get_model_config(arch) is None:
                raise InputError(f"open_clip has no architecture {arch!r}; give its model-config JSON with "
                                 f"{self.flag} {self.name}.config=FILE")
        # The weights are open_clip's `pretrained` argument (a tag or a file), so that open_clip
        # loads them itself and does not report a randomly initialised model first.
        field, weights = ("checkpoint", checkpoint) if checkpoint else ("pretrained", pretrained)
        with self.loading(field, weights):
            if not os.path.isfile(weights) and not open_clip.get_pretrained_cfg(arch, weights):
                tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
                raise InputError(f"neither a file nor a pretrained tag of {arch} (its tags: {tags})")
            with quiet_logging():  # open_clip logs its failures, which the one-line error repeats
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=weights, device="cpu")
        self.model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)

    def embeddings(self, images, prompts):
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        image = self.model.encode_image(pixels)
        text = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        return image, text


class HPSv2(OpenClipCosine):
    """HPS v2.0. Preprocessing is open_clip's, as the reference's scorer (which calls open_clip
    itself); preprocess="package" reproduces the hpsv2 package instead, which converts to a
    tensor before the bicubic resize (scores differ in the third decimal)."""

    name = "hpsv2"

    def __init__(self, *, arch, checkpoint, preprocess, config, **kw):
        self.flag = kw.get("flag", "--source")  # for self.loading, before Scorer.__init__ sets it
        with self.loading("checkpoint", checkpoint):
            path = fetch(checkpoint, "HPS_v2_compressed.pt")
        # The HPS checkpoint is every weight: no open_clip pretrained tag.
        super().__init__(arch=arch, pretrained=None, checkpoint=path, config=config, **kw)
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


def load_aesthetic_mlp(source: str, input_size: int = 768) -> AestheticMLP:
    """The aesthetic head loaded from its checkpoint (a local path or a URL), in eval mode."""
    mlp = AestheticMLP(input_size)
    mlp.load_state_dict(load_state_dict(fetch(source)))
    return mlp.eval()


class Aesthetics(Scorer):
    name = "aesthetics"

    def __init__(self, *, clip, mlp, **kw):
        super().__init__(**kw)
        from transformers import CLIPImageProcessor, CLIPModel

        with self.loading("clip", clip):
            self.processor = CLIPImageProcessor.from_pretrained(clip)
            self.clip = CLIPModel.from_pretrained(clip).to(self.device).eval()
        with self.loading("mlp", mlp):
            self.mlp = load_aesthetic_mlp(mlp, self.clip.config.projection_dim).to(self.device)

    def score_batch(self, images, prompts):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        embedding = F.normalize(_features(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return self.mlp(embedding).squeeze(-1).float().cpu()


class ImageReward(Scorer):
    """ImageReward v1.0 (THUDM/ImageReward): see eval/imagereward.py for the model."""

    name = "imagereward"

    def __init__(self, *, checkpoint, med_config, tokenizer, vision_heads, **kw):
        super().__init__(**kw)
        from eval import imagereward as ir

        with self.loading("vision_heads", vision_heads):
            heads = int(vision_heads)
        with self.loading("med_config", med_config):
            med = ir.load_med_config(fetch(med_config, "med_config.json"))
        with self.loading("checkpoint", checkpoint):
            state = load_state_dict(fetch(checkpoint, "ImageReward.pt"))
            self.model = ir.ImageRewardModel(state, med, vision_heads=heads).to(self.device).eval()
        self.preprocess = ir.preprocess(self.model.image_size)
        with self.loading("tokenizer", tokenizer):
            self.tokenizer = ir.blip_tokenizer(tokenizer)

    def score_batch(self, images, prompts):
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model(pixels, tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)).cpu()


SCORERS = {cls.name: cls for cls in (PickScore, HPSv2, Aesthetics, OpenClipCosine, ImageReward)}
assert set(SCORERS) == set(METRICS) == set(SOURCES)


def build_scorer(metric: str, device: str = "cpu", batch_size: int = 16, flag: str = "--source", **sources) -> Scorer:
    """The metric's scorer with its models loaded. `flag` is the option that set `sources`, named
    in the one-line error when a source is unusable."""
    if metric not in SCORERS:
        raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    for field, value in sources.items():
        check_source(metric, field, value, flag)
    return SCORERS[metric](device=device, batch_size=batch_size, flag=flag, **with_defaults(metric, sources))


def parse_sources(pairs: list[str], flag: str = "--source") -> dict[str, dict[str, str]]:
    """['pickscore.model=/x', ...] -> {'pickscore': {'model': '/x'}}, each checked (eval.scorers.check_source)."""
    sources: dict[str, dict[str, str]] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        metric, dot, field = key.partition(".")
        if not (sep and dot and metric in METRICS and field):
            raise InputError(f"{flag} {pair!r}: expected METRIC.FIELD=VALUE with METRIC in {', '.join(METRICS)}")
        check_source(metric, field, value, flag)
        if field in sources.get(metric, {}) and sources[metric][field] != value:
            raise InputError(f"{flag} {key}: given twice, as {sources[metric][field]!r} and {value!r}")
        sources.setdefault(metric, {})[field] = value
    return sources
