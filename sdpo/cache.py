"""A latent cache: each image of each pair encoded by the VAE once, so that training needs neither
the VAE nor image decoding.

    python -m sdpo.cache --pretrained_model_name_or_path M --dataset_name D --resolution R --output_dir C \\
        [--sdxl] [--no_t5] [--pretrained_vae_model_name_or_path V] [--mixed_precision bf16] [--split train] ...
    accelerate launch train.py ... (the same flags) --latent_cache C

For every pair with a decided label (ties are never trained on) it stores, in the VAE's dtype, the
VAE posterior's mean and std of both images at the training crop (the center crop: a random crop
cannot be cached), or of both clips of a video pair at their middle window of --num_frames frames
(train with --frame_window middle: a random window cannot be cached), each unflipped and flipped, the caption's token ids for every tokenizer, each
image's original size (for `--sdxl_true_time_ids`) and whether the pair is readable. Training
then draws exactly what it draws from the images: each image's flip and the empty caption from
the same per-row generator, and `latent_dist.sample()` as mean + std * randn on the same random
stream. On a CPU the result is bitwise the weights of training from the images when the VAE sees
the same number of images per call in both (an image and its mirror per call here with
`--encode_batch_size 2`, a pair per call in training at `--train_batch_size 1`): convolution
kernels choose their arithmetic by batch size.

Files: `shard-NNNNN.safetensors` (written whole, then renamed), `progress.json` (the settings and
the shards done, so that a killed build resumes where it stopped) and `manifest.json` (written last:
a cache without it is incomplete). A cache is refused, in one line, by a run whose dataset,
resolution, crop, VAE, dtype or tokenizers differ from those it was built with.
"""

from __future__ import annotations

if not __package__:  # run as a file (python sdpo/cache.py): the repository root in this folder's place
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import glob
import hashlib
import json
import logging
import os
import random

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdpo import families, models
from sdpo.conditioning import PromptEncoder
from sdpo.data import (RowPairs, UnreadableImage, center_crop, dataset_identity, mirrored_left,
                       resized_size)
from sdpo.errors import ArgumentParser, InputError, first_line, reports_input_errors
from sdpo.files import (atomic_path, check_output_dir, file_identity, first_difference, remove_stale_temps,
                        write_json_atomic)

logger = logging.getLogger(__name__)

FORMAT = "sdpo-latent-cache/1"
MANIFEST, PROGRESS = "manifest.json", "progress.json"


def vae_identity(args) -> dict:
    """The VAE by its source (and hub revision) and its weight files' sizes and mtimes."""
    source = args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path
    folder = source if args.pretrained_vae_model_name_or_path else os.path.join(source, "vae")
    weights = sorted(glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.bin")))
    return {"source": os.path.abspath(source) if os.path.exists(source) else source,
            "subfolder": None if args.pretrained_vae_model_name_or_path else "vae", "revision": args.revision,
            "weights": [[os.path.basename(w), *file_identity(w)] for w in weights]}


def cache_settings(args, vae_dtype: torch.dtype, tokenizers) -> dict:
    """Everything that decides a cache's content; a run must match it to use the cache."""
    family = families.get(args.model_family)
    vocab = hashlib.sha256(json.dumps([sorted(t.get_vocab().items()) for t in tokenizers]).encode()).hexdigest()
    settings = {"format": FORMAT, "dataset": dataset_identity(args), "resolution": args.resolution, "crop": "center",
                **family.cache_identity(args.no_t5), "vae": vae_identity(args),
                "vae_dtype": str(vae_dtype).removeprefix("torch."),
                "tokenizers": {"count": len(tokenizers), "vocab_sha256": vocab,
                               "max_length": family.token_lengths(tokenizers)}}
    if family.video:  # a clip's middle window of --num_frames frames at --height x --width (no --resolution)
        del settings["resolution"]
        settings["clips"] = {"num_frames": args.num_frames, "height": args.height, "width": args.width,
                             "window": "middle"}
    return settings


def norm_record(latent_norm) -> dict:
    """The latent normalisation (scale, shift: numbers, or per-channel tensors) as JSON."""
    def plain(x):
        return x.flatten().tolist() if isinstance(x, torch.Tensor) else x

    scale = latent_norm[0]
    return {"scale": plain(scale), "shift": plain(latent_norm[1]),
            "shape": list(scale.shape) if isinstance(scale, torch.Tensor) else None}


def norm_from_record(record: dict):
    """(scale, shift) from norm_record's JSON."""
    if record["shape"] is None:
        return record["scale"], record["shift"]
    shape = record["shape"]
    shift = None if record["shift"] is None else torch.tensor(record["shift"]).view(shape)
    return torch.tensor(record["scale"]).view(shape), shift


# ---- building -----------------------------------------------------------------------------------


def pixels_of(item, args):
    """A row's two images (or clips) as training sees them unflipped, and their (h, w); None for an
    unreadable pair. Images: the center crop; clips: the middle window of --num_frames frames."""
    from sdpo.data import IMAGE_COLUMNS, decode_image, resize_and_crop, to_tensor

    if families.get(args.model_family).video:
        from sdpo.video import VIDEO_COLUMNS, decode_pair

        clips, _ = decode_pair([item[c] for c in VIDEO_COLUMNS], args.num_frames, args.height, args.width)
        return list(clips), [[args.height, args.width]] * 2
    pair = [decode_image(item[c]) for c in IMAGE_COLUMNS]
    return ([to_tensor(resize_and_crop(im, args.resolution)[0]) for im in pair],
            [[im.size[1], im.size[0]] for im in pair])


def encode_rows(data, rows, args, vae, prompt_encoder: PromptEncoder, encode_batch_size: int):
    """The tensors of one shard: for each row, both images (jpg_0, jpg_1) at the center crop, or
    both clips (video_0, video_1) at their middle window, unflipped and flipped, through the VAE."""
    from sdpo.data import LABEL_COLUMN, UnreadableImage, caption_text

    family = families.get(args.model_family)
    blank = ((args.num_frames, 3, args.height, args.width) if family.video else (3, args.resolution, args.resolution))
    readable, sizes, captions, pending, means, stds = [], [], [], [], [], []

    def encode(chunk):  # the VAE on a chunk of images (clips): at most encode_batch_size in memory
        with torch.no_grad():
            dist = vae.encode(family.vae_input(torch.stack(chunk)).to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())

    for row in rows:
        item = data[row]
        try:
            pair, size = pixels_of(item, args)
        except UnreadableImage as err:  # (an unreadable clip is one too)
            logger.warning("row %d: %s; the pair is stored as unreadable and skipped in training", row, err)
            pair, size = None, [[0, 0], [0, 0]]
        readable.append(pair is not None)
        sizes.append(size)
        for k in range(2):
            tensor = pair[k] if pair else torch.zeros(blank)
            pending += [tensor, tensor.flip(-1)]  # an image and its mirror, always in the same VAE call
            while len(pending) >= encode_batch_size:
                encode(pending[:encode_batch_size])
                pending = pending[encode_batch_size:]
        captions.append(caption_text(item[args.caption_column], args.caption_column))
    if pending:
        encode(pending)
    shape = (len(rows), 2, 2, *means[0].shape[1:])  # row, image (jpg_0, jpg_1), flip (no, yes), C, [f,] h, w
    tensors = {"row": torch.tensor(rows, dtype=torch.int64), "readable": torch.tensor(readable, dtype=torch.uint8),
               "label": torch.tensor([float(data[r][LABEL_COLUMN]) for r in rows], dtype=torch.float64),
               "original_size": torch.tensor(sizes, dtype=torch.int32),
               "mean": torch.cat(means).reshape(shape).contiguous(), "std": torch.cat(stds).reshape(shape).contiguous()}
    for n, ids in enumerate(prompt_encoder.token_ids(captions)):
        tensors[f"ids_{n}"] = ids.to(torch.int32)
    return tensors


def build(args) -> str:
    """Build (or finish) the cache in args.output_dir; returns the manifest's path."""
    from tqdm.auto import tqdm

    from sdpo.data import LABEL_COLUMN, decided_rows, load_pairs

    check_output_dir(args.output_dir, "--output_dir")
    models.check_source(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    hub = dict(revision=args.revision, cache_dir=args.cache_dir)
    family = families.get(args.model_family)
    tokenizers = models.load_tokenizers(args.pretrained_model_name_or_path, family, no_t5=args.no_t5, **hub)
    vae_dtype = family.vae_dtype(models.DTYPES[args.mixed_precision],
                                 bool(args.pretrained_vae_model_name_or_path))  # as in training
    settings = cache_settings(args, vae_dtype, tokenizers)
    # How the rows are cut into shards and batched through the VAE: a resumed build must do the same.
    layout = {"shard_pairs": args.shard_pairs, "encode_batch_size": args.encode_batch_size}
    manifest_path = os.path.join(args.output_dir, MANIFEST)
    progress_path = os.path.join(args.output_dir, PROGRESS)
    done = {}
    for path in (manifest_path, progress_path):
        if os.path.isfile(path):
            with open(path) as f:
                recorded = json.load(f)
            differ = first_difference(recorded["settings"], settings)
            if differ:
                raise InputError(f"--output_dir {args.output_dir} holds a cache built with other settings ({differ}); "
                                 f"use another folder")
            if path == manifest_path:
                print(f"{args.output_dir}: the cache is complete ({recorded['pairs']} pairs)")
                return manifest_path
            differ = first_difference(recorded.get("layout"), layout)
            if differ:
                raise InputError(f"--output_dir {args.output_dir} holds a cache begun with other settings ({differ}): "
                                 f"finish it with those, or use another folder")
            done = {s["file"]: s for s in recorded["shards"]}
    for name in remove_stale_temps(args.output_dir):
        logger.info("removed %s, left by a killed build", name)
    data = load_pairs(args, args.split)
    rows, ties = decided_rows(data[LABEL_COLUMN])
    if not rows:
        raise InputError(f"dataset {args.dataset_name!r} has no pair with a decided label (all {ties} are ties)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = models.load_vae(args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path, family=family,
                          **hub)
    vae = vae.to(device, vae_dtype).eval()
    shards = []
    stats = torch.zeros(4, dtype=torch.float64)  # sum of std, max std, sum of |mean|, count
    chunks = [rows[i : i + args.shard_pairs] for i in range(0, len(rows), args.shard_pairs)]
    for number, chunk in enumerate(tqdm(chunks, desc="latent cache", unit="shard")):
        name = f"shard-{number:05d}.safetensors"
        shard = {"file": name, "pairs": len(chunk)}
        if not (name in done and _holds_rows(os.path.join(args.output_dir, name), chunk)):
            tensors = encode_rows(data, chunk, args, vae, PromptEncoder(family, tokenizers, [], args.resolution),
                                  args.encode_batch_size)
            with atomic_path(os.path.join(args.output_dir, name)) as tmp:
                save_file(tensors, tmp)
            std, mean = tensors["std"].double(), tensors["mean"].double()
            shard["std"] = [float(std.sum()), float(std.max()), float(mean.abs().sum()), std.numel()]
        else:
            shard = done[name]
        stats[[0, 2, 3]] += torch.tensor([shard["std"][0], shard["std"][2], shard["std"][3]], dtype=torch.float64)
        stats[1] = max(float(stats[1]), shard["std"][1])
        shards.append(shard)
        write_json_atomic({"settings": settings, "layout": layout, "shards": shards}, progress_path)
    # How much the posterior's std matters: next to |mean|, a tiny std makes the draw nearly the mean.
    posterior = {"mean_std": float(stats[0] / stats[3]), "max_std": float(stats[1]),
                 "mean_abs_mean": float(stats[2] / stats[3])}
    manifest = {"settings": settings, "layout": layout, "shards": shards, "pairs": len(rows), "ties": ties,
                "scaling_factor": getattr(vae.config, "scaling_factor", None),
                "shift_factor": getattr(vae.config, "shift_factor", None),
                "latent_norm": norm_record(family.latent_norm(vae.config)), "posterior": posterior,
                "bytes_per_pair": sum(os.path.getsize(os.path.join(args.output_dir, s["file"])) for s in shards)
                / len(rows)}
    write_json_atomic(manifest, manifest_path)
    os.remove(progress_path)
    print(f"{args.output_dir}: {len(rows)} pairs in {len(shards)} shard(s), "
          f"{manifest['bytes_per_pair'] / 1024:.1f} KiB per pair; posterior std {posterior['mean_std']:.3g} on average "
          f"(max {posterior['max_std']:.3g}) against a mean |latent| of {posterior['mean_abs_mean']:.3g}")
    return manifest_path


def _holds_rows(path: str, rows: list[int]) -> bool:
    """Whether a shard a killed build left is there, readable, and holds exactly these rows."""
    try:
        with safe_open(path, "pt") as f:
            return f.get_tensor("row").tolist() == rows
    except Exception:  # noqa: BLE001 - missing or damaged: encode it again
        return False


# ---- reading ------------------------------------------------------------------------------------


class LatentCache:
    """A complete cache, checked against a run's settings; rows are read lazily from the shards."""

    def __init__(self, folder: str, args, vae_dtype: torch.dtype, tokenizers):
        manifest_path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise InputError(f"--latent_cache {folder}: not a complete latent cache (no {MANIFEST}; build it, or finish "
                             f"building it, with python -m sdpo.cache)")
        with open(manifest_path) as f:
            self.manifest = json.load(f)
        if args.random_crop:
            raise InputError("--latent_cache holds center crops only: drop --random_crop")
        differ = first_difference(self.manifest["settings"], cache_settings(args, vae_dtype, tokenizers))
        if differ:
            raise InputError(f"--latent_cache {folder} was built for other settings ({differ})")
        self.folder = folder
        # (scale, shift) as training normalises the latents; caches built before latent_norm was
        # recorded (SD1.x, SDXL, SD3) have the scaling and shift factors, and none before the shift.
        record = self.manifest.get("latent_norm")
        self.latent_norm = (norm_from_record(record) if record is not None else
                            (self.manifest["scaling_factor"], self.manifest.get("shift_factor")))
        clips = self.manifest["settings"].get("clips")
        self.size = (clips["height"], clips["width"]) if clips else None
        self.index, self.labels, self.readable, self.sizes = {}, {}, {}, {}
        for shard in self.manifest["shards"]:
            with safe_open(os.path.join(folder, shard["file"]), "pt") as f:
                rows = f.get_tensor("row").tolist()
                for offset, row in enumerate(rows):
                    self.index[row] = (shard["file"], offset)
                self.labels.update(zip(rows, f.get_tensor("label").tolist()))
                self.readable.update(zip(rows, f.get_tensor("readable").bool().tolist()))
                self.sizes.update(zip(rows, f.get_tensor("original_size").tolist()))
        if len(self.index) != self.manifest["pairs"]:
            raise InputError(f"--latent_cache {folder}: its shards hold {len(self.index)} distinct pairs, its manifest "
                             f"says {self.manifest['pairs']}; build it again")
        self.num_tokenizers = self.manifest["settings"]["tokenizers"]["count"]
        # The token ids of the empty caption, for --proportion_empty_prompts.
        encoder = PromptEncoder(families.get(args.model_family), tokenizers, [], args.resolution)
        self.empty_ids = [ids[0] for ids in encoder.token_ids([""])]
        self._open = {}

    def rows(self) -> list[int]:
        """The cached rows (every decided row of the split), in split order."""
        return sorted(self.index)

    def read(self, row: int) -> dict[str, torch.Tensor]:
        """One row's mean, std (2 images x 2 flips x C x h x w) and token ids."""
        name, offset = self.index[row]
        handle = self._open.get(name)
        if handle is None:  # one handle per shard and process (dataloader workers open their own)
            handle = self._open[name] = safe_open(os.path.join(self.folder, name), "pt")
        out = {key: handle.get_slice(key)[offset] for key in ("mean", "std")}
        out["ids"] = [handle.get_slice(f"ids_{n}")[offset].long() for n in range(self.num_tokenizers)]
        return out

    def pairs(self, rows: list[int], seed: int, resolution: int, *, hflip: bool, proportion_empty_prompts: float,
              winners_only: bool = False) -> CachedPairs:
        """These rows as a dataset that makes the random choices of sdpo.data.PairDataset."""
        return CachedPairs(self, rows, seed, resolution, hflip, proportion_empty_prompts, self.empty_ids, winners_only,
                           self.size)

    def __getstate__(self):  # dataloader workers reopen the shards
        return {**self.__dict__, "_open": {}}


class CachedPairs(RowPairs):
    """Pairs from a latent cache, keyed (epoch, i) like sdpo.data.PairDataset, with the same random
    choices: per image a flip (when hflip), then whether the caption is dropped, from a generator
    seeded by (seed, epoch, row); an unreadable pair is skipped and the next readable one used."""

    def __init__(self, cache: LatentCache, rows: list[int], seed: int, resolution: int, hflip: bool,
                 proportion_empty_prompts: float, empty_ids: list[torch.Tensor], winners_only: bool = False,
                 size: tuple[int, int] | None = None):
        super().__init__(rows, seed)
        self.cache = cache
        self.resolution, self.hflip, self.proportion_empty_prompts = resolution, hflip, proportion_empty_prompts
        self.empty_ids, self.winners_only = empty_ids, winners_only
        self.size = size  # clips: (height, width), whose time ids are fixed as sdpo.data's for clips

    def item(self, row: int, rng: random.Random) -> dict:
        if not self.cache.readable[row]:
            raise UnreadableImage("an image of the pair could not be read when the cache was built")
        cached = self.cache.read(row)
        order = (0, 1) if self.cache.labels[row] == 1 else (1, 0)  # winner first
        order = order[:1] if self.winners_only else order
        means, stds, time_ids = [], [], []
        for image in order:
            flip = int(self.hflip and rng.random() < 0.5)
            h, w = self.cache.sizes[row][image]
            new_w, new_h = resized_size(w, h, self.resolution)
            top, left = center_crop(new_w, new_h, self.resolution)
            left = mirrored_left(new_w, left, self.resolution) if flip else left
            means.append(cached["mean"][image, flip])
            stds.append(cached["std"][image, flip])
            if self.size:
                time_ids.append([*self.size, 0, 0, *self.size])
            else:
                time_ids.append([h, w, top, left, self.resolution, self.resolution])
        drop = rng.random() < self.proportion_empty_prompts
        return {"latent_mean": torch.stack(means), "latent_std": torch.stack(stds),
                "time_ids": torch.tensor(time_ids, dtype=torch.float32),
                "caption_ids": self.empty_ids if drop else cached["ids"]}


# ---- the command ----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m sdpo.cache", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--pretrained_model_name_or_path", required=True)
    a("--pretrained_vae_model_name_or_path", default=None)
    a("--revision", default=None)
    a("--cache_dir", default=None)
    a("--sdxl", action="store_true")
    a("--no_t5", action="store_true", help="SD3: the run trains without T5 (no T5 token ids stored)")
    a("--dataset_name", required=True)
    a("--dataset_revision", default=None)
    a("--dataset_config_name", default=None)
    a("--train_data_dir", default=None)
    a("--split", default="train")
    a("--caption_column", default="caption")
    a("--resolution", type=int, default=None, help="default 512, SDXL and SD3 1024")
    a("--num_frames", type=int, default=None, help="video: frames per clip, as train.py (the middle window is stored)")
    a("--height", type=int, default=None, help="video: as train.py")
    a("--width", type=int, default=None, help="video: as train.py")
    a("--random_crop", action="store_true", help="refused: a cache holds center crops")
    a("--no_hflip", action="store_true", help="accepted and ignored: both flips are always stored")
    a("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"], help="the VAE's dtype, as in training")
    a("--output_dir", required=True, help="the cache folder")
    a("--shard_pairs", type=int, default=None, help="pairs per shard file (default 1024; video models 16)")
    a("--encode_batch_size", type=int, default=None,
      help="images per VAE call (even: an image and its mirror; default 32; video models: clips, 2)")
    a("--device", default=None, help="default: cuda if available")
    args = p.parse_args(argv)
    family = families.resolve(args.pretrained_model_name_or_path, args.sdxl, strict=False, revision=args.revision,
                              cache_dir=args.cache_dir)
    args.model_family = family.name
    if family.video and args.resolution is not None:
        raise InputError(f"--resolution: {family.label} clips are sized with --height and --width")
    if args.resolution is None:
        args.resolution = family.resolution
    if family.video:  # (a shard of clips holds 64 clips' latents; the VAE takes a clip and its mirror at a time)
        args.height = family.size[0] if args.height is None else args.height
        args.width = family.size[1] if args.width is None else args.width
        args.num_frames = family.num_frames if args.num_frames is None else args.num_frames
    args.shard_pairs = (16 if family.video else 1024) if args.shard_pairs is None else args.shard_pairs
    args.encode_batch_size = (2 if family.video else 32) if args.encode_batch_size is None else args.encode_batch_size
    check_args(args)
    return args


def check_args(args) -> None:
    """Refuse a value the build cannot use, in one line that names the flag, before any model or data loads."""
    from sdpo.flags import device, image_size, no_empty_values

    no_empty_values(args)
    if args.random_crop:
        raise InputError("--random_crop: a latent cache holds one crop per image (the center crop); train from the "
                         "images for random crops")
    image_size(args.resolution, "--resolution")
    if args.shard_pairs < 1:
        raise InputError(f"--shard_pairs must be >= 1, got {args.shard_pairs}")
    if args.encode_batch_size < 2 or args.encode_batch_size % 2:
        raise InputError(f"--encode_batch_size must be an even number >= 2 (an image and its mirror go together), "
                         f"got {args.encode_batch_size}")
    if args.device is not None:
        device(args.device)
    check_output_dir(args.output_dir, "--output_dir", create=False)
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache_dir", create=False)
    family = models.check_base(args.pretrained_model_name_or_path, args.sdxl, revision=args.revision,
                               cache_dir=args.cache_dir)
    if args.resolution % family.size_multiple:
        raise InputError(f"--resolution {args.resolution}: {family.label} takes sizes that are multiples of "
                         f"{family.size_multiple}")
    if args.no_t5 and not family.optional_t5:
        raise InputError(f"--no_t5: {args.pretrained_model_name_or_path} is {family.article} {family.label} pipeline, which has no "
                         f"T5 encoder")
    vae = args.pretrained_vae_model_name_or_path
    source, subfolder, flag = ((vae, None, "--pretrained_vae_model_name_or_path") if vae else
                               (args.pretrained_model_name_or_path, "vae", "--pretrained_model_name_or_path"))
    models.check_source(source, flag)
    # The VAE's config now: without it the build would stop only after loading (or downloading) the dataset.
    try:
        models.vae_class(family).load_config(source, subfolder=subfolder, revision=args.revision,
                                             cache_dir=args.cache_dir)
    except Exception as err:  # hub, file-system and format errors come in many types
        raise InputError(f"{flag}: cannot read the VAE config of {source}: {first_line(err)}") from None
    if family.video:
        hub = dict(revision=args.revision, cache_dir=args.cache_dir)
        for flag, value in (("--height", args.height), ("--width", args.width)):
            if value < 1 or value % family.size_multiple:
                raise InputError(f"{flag} {value}: {family.label} takes sizes that are multiples of "
                                 f"{family.size_multiple}")
        try:
            family.check_num_frames(args.num_frames, models.vae_config(args.pretrained_model_name_or_path, vae, family,
                                                                       **hub),
                                    models.base_unet_shapes(args.pretrained_model_name_or_path, family=family,
                                                            **hub).config)
        except ValueError as err:
            raise InputError(f"--num_frames {args.num_frames}: {err}") from None
    else:
        for flag in ("num_frames", "height", "width"):
            if getattr(args, flag) is not None:
                raise InputError(f"--{flag} is for video models; {args.pretrained_model_name_or_path} is "
                                 f"{family.article} {family.label} pipeline")


@reports_input_errors
def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return build(parse_args(argv))


if __name__ == "__main__":
    main()
