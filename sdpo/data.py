"""Preference-pair data in the Pick-a-Pic v2 format: jpg_0, jpg_1 (encoded image bytes),
label_0 (1: jpg_0 preferred, 0: jpg_1 preferred, 0.5: tie) and caption.

Every random choice of an item (crop, flip, empty caption) comes from a generator seeded by
(seed, epoch, row), and the order of the rows from one seeded by (seed, epoch). So a run that
resumes at micro-batch m sees exactly the items a straight run sees, without loading any of
the m batches before it, whatever the number of dataloader workers.
"""

from __future__ import annotations

import glob
import io
import itertools
import logging
import os
import random
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image

from sdpo.errors import InputError, first_line
from sdpo.files import file_identity

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
LABEL_COLUMN = "label_0"


# ---- loading -------------------------------------------------------------------------------


def _parquet_files(folder: str, split: str, flag: str = "--split") -> list[str]:
    """The split's parquet files in a local copy laid out as on the hub (data/<split>-*.parquet)."""
    for pattern in (f"data/{split}-*.parquet", f"{split}-*.parquet", f"data/{split}/*.parquet", f"{split}/*.parquet"):
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        if files:
            return files
    raise InputError(f"{flag} {split}: no parquet files for it in {folder} (looked for data/{split}-*.parquet)")


def local_files(name: str, split: str, data_dir: str | None = None, config_name: str | None = None,
                flag: str = "--split") -> list[str] | None:
    """The parquet files of a split of a local copy (a folder in the hub's layout, where
    `data_dir` is a subfolder of it, or one parquet file); None for a hub id."""
    if not os.path.exists(name):
        return None
    if config_name:
        raise InputError(f"--dataset_config_name {config_name!r}: {name} is a local copy, which has no "
                         f"configurations (the flag selects a configuration of a hub dataset)")
    if os.path.isdir(name):
        return _parquet_files(os.path.join(name, data_dir) if data_dir else name, split, flag)
    if data_dir:
        raise InputError(f"--train_data_dir {data_dir!r}: {name} is a single file, not a folder")
    return [name]


def load_split(name: str, split: str, streaming: bool = False, revision: str | None = None,
               config_name: str | None = None, data_dir: str | None = None, cache_dir: str | None = None,
               flag: str = "--split"):
    """A `datasets` split from a hub id, a local folder in the hub's layout or one parquet file.

    `config_name`, `data_dir` and `cache_dir` mean what they mean to `datasets.load_dataset` (the
    reference's --dataset_config_name, --train_data_dir and --cache_dir); for a local folder,
    `data_dir` is a subfolder of it.
    """
    from datasets import load_dataset

    files = local_files(name, split, data_dir, config_name, flag)
    if files is not None:
        _check_parquet(files, name, split)
    try:
        if files is not None:
            return load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming,
                                cache_dir=cache_dir)
        return load_dataset(name, config_name, split=split, streaming=streaming, revision=revision,
                            data_dir=data_dir, cache_dir=cache_dir)
    except Exception as err:  # hub, file-system and format errors come in many types
        cause = f" ({first_line(err.__cause__)})" if err.__cause__ else ""
        raise InputError(f"could not load dataset {name!r} (split {split!r}): {first_line(err)}{cause}") from None


def _check_parquet(files: list[str], name: str, split: str) -> None:
    """Local parquet files must be readable, agree in their columns and types (else `datasets`
    ends in a traceback, "Couldn't cast ..."), and hold at least one row; all of it is read from
    the files' footers."""
    import pyarrow.parquet as pq

    rows, first = 0, None
    for path in files:
        try:
            metadata = pq.read_metadata(path)
        except Exception as err:
            raise InputError(f"dataset {name!r}: {path} is not a readable parquet file ({first_line(err)})") from None
        rows += metadata.num_rows
        schema = metadata.schema.to_arrow_schema()
        if first is None:
            first = (path, schema)
            continue
        difference = _schema_difference(first[1], schema)
        if difference:
            raise InputError(f"dataset {name!r} (split {split!r}): {os.path.basename(path)} does not match "
                             f"{os.path.basename(first[0])}: {difference}; every file of a split needs the same "
                             f"columns and types")
    if rows == 0:
        raise InputError(f"dataset {name!r} (split {split!r}) is empty: {len(files)} parquet file(s), no rows")


def _schema_difference(a, b) -> str | None:
    """How arrow schema `b` differs from `a` (column names and types), in words; None if alike."""
    types_a = {field.name: str(field.type) for field in a}
    types_b = {field.name: str(field.type) for field in b}
    for column in types_a:
        if column not in types_b:
            return f"it has no column {column!r}"
    for column, type_b in types_b.items():
        if column not in types_a:
            return f"it has a column {column!r} that the other lacks"
        if type_b != types_a[column]:
            return f"column {column!r} is {type_b} there, {types_a[column]} here"
    return None


TEXT_TYPES = ("string", "large_string", "null")  # null: a column of missing captions, each read as ""


def is_text_type(name: str) -> bool:
    """Whether a column type (as column_types names it) holds text: strings, dictionary-encoded
    strings (as some parquet writers store repeated captions), or only nulls."""
    return name in TEXT_TYPES or any(name.startswith(f"dictionary<values={t},") for t in TEXT_TYPES[:2])


def column_types(data) -> dict[str, str] | None:
    """{column: type name} of a `datasets` split or an arrow schema (e.g. 'string', 'binary',
    'int64', 'Image'); None when a stream does not know its features."""
    if hasattr(data, "names") and hasattr(data, "types"):  # an arrow schema
        return {field.name: str(field.type) for field in data}
    features = getattr(data, "features", None)
    if features is None:
        return None
    return {column: feature.dtype if type(feature).__name__ == "Value" else type(feature).__name__
            for column, feature in features.items()}


def pair_columns(args) -> tuple[tuple[str, str], str]:
    """(the pair's columns, the model's name): video_0 and video_1 for a video family, jpg_0 and
    jpg_1 for an image one."""
    from sdpo import families
    from sdpo.video import VIDEO_COLUMNS

    family = families.get(getattr(args, "model_family", "sd15"))
    return (VIDEO_COLUMNS if family.video else IMAGE_COLUMNS), family.label


def check_columns(column_names, name: str, caption_column: str = "caption", types: dict | None = None,
                  columns: tuple[str, str] = IMAGE_COLUMNS, model: str = "") -> None:
    """Stop at once, naming the column, if the dataset lacks one we read, or if its caption column
    does not hold text (bytes or numbers would be trained on as whatever str() makes of them).
    `columns`: the pair's columns (images or videos); video pairs given to an image model (`model`),
    or image pairs to a video model, are named as such."""
    from sdpo.video import VIDEO_COLUMNS

    if columns[0] not in column_names:
        if columns == IMAGE_COLUMNS and VIDEO_COLUMNS[0] in column_names:
            raise InputError(f"dataset {name!r} holds video pairs (video_0, video_1); {model or 'this model'} is an "
                             f"image model, which trains on image pairs (jpg_0, jpg_1)")
        if columns == VIDEO_COLUMNS and IMAGE_COLUMNS[0] in column_names:
            raise InputError(f"dataset {name!r} holds image pairs (jpg_0, jpg_1); {model or 'this model'} is a "
                             f"video model, which trains on video pairs (video_0, video_1: mp4 bytes or paths)")
    required = (*columns, LABEL_COLUMN, caption_column)
    for column in required:
        if column not in column_names:
            raise InputError(
                f"dataset {name!r} has no column {column!r} (it has: {', '.join(column_names)}); "
                f"preference data needs {', '.join(required)}"
            )
    found = (types or {}).get(caption_column)
    if found is not None and not is_text_type(found):
        raise InputError(f"dataset {name!r}: the caption column {caption_column!r} holds {found}, not text; "
                         f"convert it to strings, or name the text column with --caption_column")


def caption_text(value, column: str = "caption") -> str:
    """A row's caption as the text encoder sees it: a missing caption (None) is the empty one."""
    if value is None:
        return ""
    if not isinstance(value, str):  # a stream whose schema was not known up front
        raise InputError(f"the caption column {column!r} holds a {type(value).__name__}, not text; convert it to "
                         f"strings, or name the text column with --caption_column")
    return value


def decided_rows(labels) -> tuple[list[int], int]:
    """Indices of rows with a decided label (0 or 1) and the number of ties (0.5) dropped."""
    keep, ties = [], 0
    for row, label in enumerate(labels):
        if label == 0.5:
            ties += 1
        elif label in (0, 1):
            keep.append(row)
        else:
            raise InputError(f"row {row}: label_0 must be 0, 0.5 or 1, got {label!r}")
    return keep, ties


# ---- one item --------------------------------------------------------------------------------


class UnreadableImage(Exception):
    """An image that cannot be used: missing, undecodable, truncated, or too large (a clip that
    cannot be used is one too: sdpo.video.UnreadableVideo)."""


def decode_image(data) -> Image.Image:
    """Encoded bytes (or a datasets Image dict, or a PIL image) to an RGB PIL image.

    Whatever goes wrong (no bytes, bytes PIL cannot decode, a truncated file, an image above PIL's
    decompression-bomb limit of Image.MAX_IMAGE_PIXELS pixels) becomes an UnreadableImage, so a
    bad row is skipped like any other unreadable one instead of stopping the run.
    """
    try:
        if isinstance(data, dict):
            data = data.get("bytes") or open(data["path"], "rb").read()
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        limit = Image.MAX_IMAGE_PIXELS
        if limit and image.size[0] * image.size[1] > limit:
            raise UnreadableImage(f"too large: {image.size[0]}x{image.size[1]} pixels, above {limit}")
        image.load()
        return image.convert("RGB")
    except UnreadableImage:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise UnreadableImage(f"{type(err).__name__}: {first_line(err)}") from None


def resized_size(w: int, h: int, resolution: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to `resolution`."""
    return (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)


def center_crop(w: int, h: int, resolution: int) -> tuple[int, int]:
    """(top, left) of the square center crop of an image of the resized size (w, h)."""
    return int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))


def mirrored_left(resized_w: int, left: int, resolution: int) -> int:
    """The crop's left edge as seen in the flipped image."""
    return resized_w - left - resolution


def resize_and_crop(image: Image.Image, resolution: int, rng: random.Random | None = None):
    """Resize the shorter side to `resolution` (bilinear) and crop a square: at the center, or at a
    random place drawn from `rng`. Returns (image, resized width, crop (top, left))."""
    w, h = image.size
    new_w, new_h = resized_size(w, h, resolution)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if rng is not None:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    else:
        top, left = center_crop(new_w, new_h, resolution)
    return image.crop((left, top, left + resolution, top + resolution)), new_w, (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image to a (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def transform_image(image: Image.Image, resolution: int, rng: random.Random, random_crop: bool, hflip: bool):
    """Resize the shorter side to `resolution` (bilinear), crop a square, maybe flip; to [-1, 1].

    Returns (tensor (3, res, res), original (h, w), crop (top, left)). The random draws, in order:
    the crop's top and left (with random_crop), then the flip (with hflip).
    """
    w, h = image.size
    image, new_w, (top, left) = resize_and_crop(image, resolution, rng if random_crop else None)
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = mirrored_left(new_w, left, resolution)
    return to_tensor(image), (h, w), (top, left)


class PairTransform:
    """A Pick-a-Pic row to a training item: winner first, each image transformed on its own
    (the two images of a pair flip independently, as in the reference).

    With `num_frames` (video families) the pair is video_0 and video_1: both clips are read at the
    same frames (a window whose start is drawn per pair with `random_start`, else the middle one)
    and resized and center-cropped to `size` (height, width); each clip flips as a whole. An item's
    pixels are then (k, F, 3, height, width)."""

    def __init__(self, resolution, random_crop=False, hflip=True, proportion_empty_prompts=0.0, winners_only=False,
                 caption_column="caption", num_frames: int | None = None, size: tuple[int, int] | None = None,
                 random_start: bool = True):
        self.resolution = resolution
        self.caption_column = caption_column
        self.random_crop = random_crop
        self.hflip = hflip
        self.proportion_empty_prompts = proportion_empty_prompts
        self.winners_only = winners_only
        self.num_frames, self.size, self.random_start = num_frames, size, random_start

    def __call__(self, row: dict, rng: random.Random, jpg_1_wins: bool | None = None) -> dict:
        """`jpg_1_wins` overrides label_0 (AI feedback: a reward model's choice)."""
        if jpg_1_wins is None:
            jpg_1_wins = row[LABEL_COLUMN] != 1
        if self.num_frames:
            return self.video_item(row, rng, jpg_1_wins)
        first, second = ("jpg_1", "jpg_0") if jpg_1_wins else ("jpg_0", "jpg_1")
        columns = (first,) if self.winners_only else (first, second)
        images = [decode_image(row[c]) for c in columns]
        done = [transform_image(im, self.resolution, rng, self.random_crop, self.hflip) for im in images]
        caption = caption_text(row[self.caption_column], self.caption_column)
        # SDXL micro-conditioning of each image: (original_h, original_w, crop_top, crop_left, res, res).
        time_ids = torch.tensor([[*original, *crop, self.resolution, self.resolution] for _, original, crop in done],
                                dtype=torch.float32)
        item = {"pixels": torch.stack([pixels for pixels, _, _ in done]), "time_ids": time_ids}
        item["caption"] = "" if rng.random() < self.proportion_empty_prompts else caption
        return item

    def video_item(self, row: dict, rng: random.Random, video_1_wins: bool) -> dict:
        """The random draws, in order: the window's start, each clip's flip, the empty caption."""
        from sdpo.video import decode_pair

        first, second = ("video_1", "video_0") if video_1_wins else ("video_0", "video_1")
        height, width = self.size
        # Both clips are read even for sft (winners only): the window is the pair's, as the cache's.
        pixels, _ = decode_pair([row[first], row[second]], self.num_frames, height, width,
                                rng if self.random_start else None)
        columns = (first,) if self.winners_only else (first, second)
        pixels = pixels[: len(columns)]
        if self.hflip:
            pixels = torch.stack([clip.flip(-1) if rng.random() < 0.5 else clip for clip in pixels])
        caption = caption_text(row[self.caption_column], self.caption_column)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(columns), dtype=torch.float32)
        item = {"pixels": pixels, "time_ids": time_ids}
        item["caption"] = "" if rng.random() < self.proportion_empty_prompts else caption
        return item


def pair_transform(args, training: bool = True) -> PairTransform:
    """The run's transform: for training, with its random choices; for held-out pairs, seen the same
    way every time (center crop, no flip, the middle frames, their captions)."""
    video = dict(num_frames=args.num_frames, size=(args.height, args.width)) if getattr(args, "num_frames", None) else {}
    return PairTransform(args.resolution, random_crop=args.random_crop and training,
                         hflip=not args.no_hflip and training,
                         proportion_empty_prompts=args.proportion_empty_prompts if training else 0.0,
                         winners_only=args.train_method == "sft", caption_column=args.caption_column,
                         random_start=training and getattr(args, "frame_window", "random") == "random", **video)


class NoUsablePairs(InputError):
    """Every pair was skipped. Raised in a dataloader worker; `next_batch` reports it in one line."""


def next_batch(batches):
    """The next batch. A NoUsablePairs raised in a worker process reaches the main process with
    the worker's traceback as its message; keep only the original one-line message."""
    try:
        return next(batches)
    except NoUsablePairs as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        message = lines[-1].split(": ", 1)[-1] if "Traceback" in str(err) else str(err)
        raise InputError(message) from None


class UnreadableCounter:
    """Warns once per unreadable pair with the row and a running count (per worker process)."""

    def __init__(self):
        self.count = 0

    def warn(self, row, err):
        self.count += 1
        logger.warning("skipping the pair at row %s: %s; %d skipped so far", row, err, self.count)


# ---- map-style dataset and its deterministic batches ----------------------------------------


class RowPairs(torch.utils.data.Dataset):
    """Map-style pairs over chosen rows, keyed (epoch, i); subclasses make a row's item.

    Each item's random choices come from a generator seeded by (seed, epoch, row). An unreadable
    pair (`item` raises UnreadableImage) is skipped with a warning and the next readable row takes
    its place, so batches keep their size and the substitution is the same in every run.
    """

    def __init__(self, rows: list[int], seed: int):
        self.rows, self.seed = rows, seed
        self.unreadable = UnreadableCounter()

    def __len__(self):
        return len(self.rows)

    def item(self, row: int, rng: random.Random) -> dict:
        raise NotImplementedError

    def __getitem__(self, key):
        epoch, index = key
        for attempt in range(len(self.rows)):
            row = self.rows[(index + attempt) % len(self.rows)]
            try:
                return self.item(row, random.Random(f"{self.seed}:{epoch}:{row}"))
            except UnreadableImage as err:
                self.unreadable.warn(row, err)
        raise NoUsablePairs(f"none of the {len(self.rows)} pairs of the dataset has two readable images (or clips)")


class PairDataset(RowPairs):
    """Pairs over the decided rows of a `datasets` split, through a PairTransform."""

    def __init__(self, hf_dataset, rows: list[int], transform: PairTransform, seed: int):
        super().__init__(rows, seed)
        self.data = hf_dataset
        self.transform = transform
        self.jpg_1_wins: dict[int, bool] = {}  # AI feedback: a reward model's choice per row, over label_0

    def item(self, row: int, rng: random.Random) -> dict:
        return self.transform(self.data[row], rng, self.jpg_1_wins.get(row))


class PairBatchSampler(torch.utils.data.Sampler):
    """Endless batches of (epoch, index) keys for one process, starting at micro-batch `start`.

    Epoch e visits a permutation seeded by (seed, e), cut into global batches of
    batch_size * world_size; process `rank` takes its slice of each. The last incomplete global
    batch of an epoch is dropped. Starting at micro-batch m costs nothing: no item is loaded.
    """

    def __init__(self, num_items, batch_size, seed, rank=0, world_size=1, shuffle=True, start=0):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.start = rank, world_size, shuffle, start
        self.batches_per_epoch = num_items // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise InputError(
                f"the dataset has {num_items} usable pairs, fewer than one global batch "
                f"({batch_size} per process x {world_size} processes)"
            )

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __iter__(self):
        epoch, offset = divmod(self.start, self.batches_per_epoch)
        for e in itertools.count(epoch):
            order = self.order(e)
            for b in range(offset if e == epoch else 0, self.batches_per_epoch):
                first = (b * self.world_size + self.rank) * self.batch_size
                yield [(e, i) for i in order[first : first + self.batch_size]]

    def __len__(self):
        return self.batches_per_epoch


# ---- streaming -------------------------------------------------------------------------------


class StreamingPairs(torch.utils.data.IterableDataset):
    """Pairs streamed from a `datasets` IterableDataset, epoch after epoch (shuffle buffer
    re-seeded each epoch). Ties, rows with a label other than 0, 0.5 or 1, and unreadable pairs
    are skipped as they go by (with a warning for the last two). Resuming skips the first
    `start_items` decided pairs without decoding their images; it is exact unless pairs before
    the resume point were skipped as unreadable. An epoch that yields no pair stops the run."""

    def __init__(self, hf_iterable, transform: PairTransform, seed: int, start_items: int = 0, buffer_size=1000):
        self.data = hf_iterable
        self.transform = transform
        self.seed = seed
        self.start_items = start_items
        self.buffer_size = buffer_size
        self.unreadable = UnreadableCounter()

    def __iter__(self):
        seen = 0
        for epoch in itertools.count():
            stream = self.data.shuffle(seed=self.seed + epoch, buffer_size=self.buffer_size)
            rows = ties = usable = 0
            for row_number, row in enumerate(stream):
                rows += 1
                label = row[LABEL_COLUMN]
                if label == 0.5:
                    ties += 1
                    continue
                if label not in (0, 1):
                    self.unreadable.warn(f"{row_number} of epoch {epoch}", f"label_0 is {label!r}, not 0, 0.5 or 1")
                    continue
                seen += 1
                if seen <= self.start_items:
                    usable += 1
                    continue
                rng = random.Random(f"{self.seed}:{epoch}:{row_number}")
                try:
                    item = self.transform(row, rng)
                except UnreadableImage as err:
                    self.unreadable.warn(f"{row_number} of epoch {epoch}", err)
                    continue
                usable += 1
                yield item
            if usable == 0:
                raise NoUsablePairs(f"the stream has no usable pair: {rows} rows, {ties} ties, the rest unreadable")


@dataclass
class PairBatch:
    """A micro-batch of B pairs, each with k images winner first (k = 2; k = 1 for sft), as the
    dataloader gives it to the training step. Images come as pixels, or, from the latent cache,
    as the VAE's posterior (mean and std) of each image; captions as text, or as token ids."""

    time_ids: torch.Tensor  # (B, k, 6): each image's SDXL micro-conditioning (orig h, w, crop top, left, res, res)
    captions: list[str] | None = None  # "" where the caption was dropped
    caption_ids: list[torch.Tensor] | None = None  # or the token ids, one (B, max_length) tensor per tokenizer
    pixels: torch.Tensor | None = None  # (B, k, 3, H, W) in [-1, 1]; clips (B, k, F, 3, H, W)
    latent_mean: torch.Tensor | None = None  # or, from the latent cache, (B, k, C, h, w) in the VAE's dtype
    latent_std: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions) if self.captions is not None else self.caption_ids[0].shape[0]

    @property
    def images_per_pair(self) -> int:
        """k: 2 (winner, loser), or 1 (sft: winners only)."""
        return (self.pixels if self.pixels is not None else self.latent_mean).shape[1]

    def pin_memory(self) -> "PairBatch":
        """Pinned host memory for the tensors (the DataLoader calls this with pin_memory=True)."""
        pin = lambda x: x.pin_memory() if isinstance(x, torch.Tensor) else x  # noqa: E731
        return PairBatch(**{f.name: ([pin(t) for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
                                     else pin(v)) for f in fields(self) for v in [getattr(self, f.name)]})


def collate_pairs(items: list[dict]) -> PairBatch:
    """Stack items (from the images or from the latent cache) into a PairBatch."""
    stack = lambda key: torch.stack([it[key] for it in items])  # noqa: E731
    batch = PairBatch(time_ids=stack("time_ids"))
    if "pixels" in items[0]:
        batch.pixels = stack("pixels")
    else:
        batch.latent_mean, batch.latent_std = stack("latent_mean"), stack("latent_std")
    if "caption" in items[0]:
        batch.captions = [it["caption"] for it in items]
    else:
        batch.caption_ids = [torch.stack([it["caption_ids"][n] for it in items]) for n in range(len(items[0]["caption_ids"]))]
    return batch


def first_samples(rows: list[int], count: int, seed: int) -> list[int]:
    """The rows the reference keeps for --max_train_samples: `datasets`' shuffle(seed=seed) of the
    decided rows (a permutation from numpy's default_rng(seed)), then the first `count`."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[:count].tolist()]


VALIDATION_SEED = 0  # held-out pairs do not depend on --seed, so runs with different seeds share them


def hold_out(rows: list[int], count: int) -> tuple[list[int], list[int]]:
    """(training rows, validation rows): `count` rows picked by a fixed permutation, the rest kept
    in their order. The pick depends only on the rows, never on the run's seed."""
    if count >= len(rows):
        raise InputError(f"--validation_pairs {count}: the dataset has only {len(rows)} usable pairs; "
                         f"hold out fewer so that some are left to train on")
    order = np.random.default_rng(VALIDATION_SEED).permutation(len(rows))
    held = set(order[:count].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def usable_rows(labels, name: str, split: str) -> list[int]:
    """The rows with a decided label (ties dropped and counted in the log); none is an error."""
    rows, ties = decided_rows(labels)
    if not rows:
        raise InputError(f"dataset {name!r} has no usable pair: its {ties} rows are all ties")
    logger.info("%s[%s]: %d rows, dropped %d ties, %d pairs left", name, split, len(rows) + ties, ties, len(rows))
    return rows


def split_rows(rows: list[int], args) -> tuple[list[int], list[int] | None]:
    """(training rows, held-out rows or None): --validation_pairs held out of the training split
    (unless they come from --validation_split), then --max_train_samples of the rest."""
    held = None
    if args.validation_pairs and not args.validation_split:
        rows, held = hold_out(rows, args.validation_pairs)
    if args.max_train_samples is not None and args.max_train_samples < len(rows):
        rows = first_samples(rows, args.max_train_samples, args.seed)
    return rows, held


def validation_split_rows(labels, args) -> list[int]:
    """The first --validation_pairs decided rows of --validation_split."""
    rows, _ = decided_rows(labels)
    if len(rows) < args.validation_pairs:
        raise InputError(f"--validation_pairs {args.validation_pairs}: --validation_split {args.validation_split} "
                         f"has only {len(rows)} usable pairs")
    return rows[: args.validation_pairs]


def load_pairs(args, split: str, streaming: bool = False, flag: str = "--split"):
    """A split with its columns checked (the stream's from its first row)."""
    data = load_split(args.dataset_name, split, streaming=streaming, revision=args.dataset_revision,
                      config_name=args.dataset_config_name, data_dir=args.train_data_dir, cache_dir=args.cache_dir,
                      flag=flag)
    column_names, types = data.column_names, column_types(data)
    if column_names is None or types is None:  # a stream whose features are unknown: look at its first row
        first = next(iter(data), None)
        if first is None:
            raise InputError(f"dataset {args.dataset_name!r} (split {split!r}) is empty")
        column_names = list(first.keys())
        check_columns(column_names, args.dataset_name, args.caption_column, None, *pair_columns(args))
        caption_text(first[args.caption_column], args.caption_column)  # text, or one line saying it is not
    check_columns(column_names, args.dataset_name, args.caption_column, types, *pair_columns(args))
    if not streaming and len(data) == 0:
        raise InputError(f"dataset {args.dataset_name!r} (split {split!r}) is empty")
    return data


def dataset_identity(args, split: str | None = None) -> dict:
    """Which data a split of --dataset_name is, as far as it can be told without reading it: the
    name and flags, and local parquet files by name, size and mtime (for the latent cache and the
    AI-feedback choices, which are reused only for the same data)."""
    name, split = args.dataset_name, split or args.split
    files = local_files(name, split, args.train_data_dir)
    return {"dataset_name": os.path.abspath(name) if os.path.exists(name) else name, "split": split,
            "dataset_config_name": args.dataset_config_name, "train_data_dir": args.train_data_dir,
            "dataset_revision": getattr(args, "dataset_revision", None), "caption_column": args.caption_column,
            "files": [[os.path.basename(f), *file_identity(f)] for f in files] if files else None}


def validation_transform(args) -> PairTransform:
    """Held-out pairs are seen the same way every time: center crop, no flip, their captions."""
    return pair_transform(args, training=False)


def plan_rows(args, labels, held_labels=None) -> tuple[list[int], list[int] | None]:
    """(training rows, held-out rows or None) of the split from its label column: ties dropped,
    --validation_pairs held out, then --max_train_samples; with --validation_split, the held-out
    rows are the first ones of that split (whose labels are `held_labels`)."""
    rows, held = split_rows(usable_rows(labels, args.dataset_name, args.split), args)
    if held_labels is not None:
        held = validation_split_rows(held_labels, args)
    return rows, held


def check_data(args, world_size: int, cache=None) -> None:
    """What build_dataloader finds wrong, found without building it and without writing anything
    (no `datasets` Arrow cache, which for the full Pick-a-Pic is a conversion of the whole set).

    A local copy is read from its parquet files alone (the footers and the label column), so
    everything is checked: columns, types, labels, the held-out pairs, at least one batch. A hub
    dataset is looked at through the first row of a stream: its columns and the caption's type;
    its labels and size are checked when the run loads it."""
    import pyarrow.parquet as pq

    def labels_of(split: str, flag: str):
        files = local_files(args.dataset_name, split, args.train_data_dir, args.dataset_config_name, flag)
        if files is None:
            load_pairs(args, split, streaming=True, flag=flag)  # the columns, from the first row
            return None
        _check_parquet(files, args.dataset_name, split)
        schema = pq.read_schema(files[0])
        check_columns(schema.names, args.dataset_name, args.caption_column, column_types(schema), *pair_columns(args))
        return [label for f in files for label in pq.read_table(f, columns=[LABEL_COLUMN])[LABEL_COLUMN].to_pylist()]

    if cache is not None:
        rows, _ = split_rows(cache.rows(), args)
    else:
        labels = labels_of(args.split, "--split")
        held = None
        if args.validation_pairs and args.validation_split:
            held = labels_of(args.validation_split, "--validation_split")
        if labels is None:
            return
        rows, _ = plan_rows(args, labels, held)
        if args.streaming:  # a stream makes its batches across epochs: any usable pair will do
            return
    PairBatchSampler(len(rows), args.train_batch_size, args.seed, 0, world_size)  # at least one batch


def build_dataloader(args, *, rank: int, world_size: int, start_micro_batch: int, cache=None):
    """The training dataloader for this process, positioned at micro-batch `start_micro_batch`,
    and the held-out validation pairs.

    Returns (dataloader, number of training pairs or None when streaming, validation dataset or
    None). --validation_pairs N holds N pairs out of the training split, or, with
    --validation_split, takes the first N usable pairs of that split. With a latent cache
    (sdpo.cache.LatentCache) the pairs come from it, with the same rows, order and random choices.
    """
    if cache is not None:
        return _cached_dataloader(args, cache, rank, world_size, start_micro_batch)
    transform = pair_transform(args)
    data = load_pairs(args, args.split, args.streaming)
    held_data = None
    if args.validation_pairs and args.validation_split:
        held_data = load_pairs(args, args.validation_split, flag="--validation_split")

    if args.streaming:
        from datasets.distributed import split_dataset_by_node

        data = split_dataset_by_node(data, rank=rank, world_size=world_size)
        if args.max_train_samples is not None:
            data = data.take(args.max_train_samples)
        dataset = StreamingPairs(data, transform, args.seed, start_items=start_micro_batch * args.train_batch_size)
        logger.info("streaming %s: ties are dropped as they go by", args.dataset_name)
        if args.dataloader_num_workers:
            # Workers would each read a share of the stream's files and resume at their own place;
            # one reader keeps the order, and a resume, exact.
            logger.warning("--streaming reads in the main process: --dataloader_num_workers %d is not used",
                           args.dataloader_num_workers)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=collate_pairs,
                                             num_workers=0,
                                             generator=torch.Generator().manual_seed(args.seed),
                                             pin_memory=torch.cuda.is_available())
        validation = None  # (--validation_pairs needs --validation_split when streaming)
        if held_data is not None:
            validation = PairDataset(held_data, validation_split_rows(held_data[LABEL_COLUMN], args),
                                     validation_transform(args), args.seed)
        return loader, None, validation

    rows, held_rows = plan_rows(args, data[LABEL_COLUMN], None if held_data is None else held_data[LABEL_COLUMN])
    validation = None
    if held_rows is not None:
        validation = PairDataset(data if held_data is None else held_data, held_rows, validation_transform(args),
                                 args.seed)
    dataset = PairDataset(data, rows, transform, args.seed)
    return _loader(args, dataset, rank, world_size, start_micro_batch), len(dataset), validation


def _loader(args, dataset, rank: int, world_size: int, start_micro_batch: int):
    sampler = PairBatchSampler(len(dataset), args.train_batch_size, args.seed, rank, world_size,
                               shuffle=args.split == "train", start=start_micro_batch)
    # A generator of its own keeps the loader from drawing on the global RNG (exact resume).
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pairs,
                                       num_workers=args.dataloader_num_workers,
                                       generator=torch.Generator().manual_seed(args.seed),
                                       pin_memory=torch.cuda.is_available())


def _cached_dataloader(args, cache, rank: int, world_size: int, start_micro_batch: int):
    rows = cache.rows()
    logger.info("latent cache %s: %d pairs (ties were dropped when it was built)", args.latent_cache, len(rows))
    sft = args.train_method == "sft"
    validation = None
    rows, held_rows = split_rows(rows, args)  # (--validation_split is refused with a cache)
    if held_rows is not None:
        validation = cache.pairs(held_rows, args.seed, args.resolution, hflip=False, proportion_empty_prompts=0.0,
                                 winners_only=sft)
    dataset = cache.pairs(rows, args.seed, args.resolution, hflip=not args.no_hflip,
                          proportion_empty_prompts=args.proportion_empty_prompts, winners_only=sft)
    return _loader(args, dataset, rank, world_size, start_micro_batch), len(dataset), validation


# ---- AI feedback --------------------------------------------------------------------------------


def choose_winners(args, accelerator, parts: list[tuple[str, PairDataset]]) -> None:
    """AI feedback: a reward model chooses each pair's winner, once, before training (as TRL
    computes reference log-probabilities up front), and the datasets put that image first.

    `parts` are (split, dataset) pairs: the training pairs and the held-out ones. As the reference:
    jpg_1 wins if it scores higher, else jpg_0; label_0 is ignored (ties in it are still dropped).
    The processes score a share of the pairs each; the choices are saved in
    output_dir/choices-<metric>.json with what produced them, and reused when that matches."""
    import hashlib
    import json

    from accelerate.utils import gather_object

    from eval.scorers import build_scorer, parse_sources, scorer_identity
    from sdpo.files import first_difference, write_json_atomic

    sources = parse_sources(args.choice_model_source, flag="--choice_model_source").get(args.choice_model, {})
    record = {"scorer": scorer_identity(args.choice_model, sources),
              "data": [{**dataset_identity(args, split), "rows": len(dataset.rows),
                        "rows_sha256": hashlib.sha256(json.dumps(sorted(dataset.rows)).encode()).hexdigest()}
                       for split, dataset in parts]}
    path = os.path.join(args.output_dir, f"choices-{args.choice_model}.json")
    saved = None
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        why = first_difference(saved.get("record"), record)
        if why:
            logger.info("%s was made by another scorer or other pairs (%s): choosing again", path, why)
            saved = None
    if saved is None:
        scorer = build_scorer(args.choice_model, device=str(accelerator.device), flag="--choice_model_source",
                              **sources)
        choices = []
        for _, dataset in parts:
            mine = {}
            for row in sorted(dataset.rows)[accelerator.process_index :: accelerator.num_processes]:
                item = dataset.data[row]
                try:
                    images = [decode_image(item[column]) for column in IMAGE_COLUMNS]
                except UnreadableImage:
                    continue  # skipped in training anyway
                caption = caption_text(item[args.caption_column], args.caption_column)
                score_0, score_1 = scorer.score(images, [caption] * 2)
                mine[row] = bool(score_1 > score_0)  # a tie keeps jpg_0 first, as the reference
            choices.append({row: wins for part in gather_object([mine]) for row, wins in part.items()})
        del scorer
        if accelerator.is_main_process:
            write_json_atomic({"record": record, "jpg_1_wins": [{str(r): w for r, w in sorted(chosen.items())}
                                                                for chosen in choices]}, path)
        logger.info("%s chose the winner of %d pairs; jpg_1 won %d", args.choice_model,
                    sum(map(len, choices)), sum(sum(chosen.values()) for chosen in choices))
    else:
        choices = [{int(row): wins for row, wins in chosen.items()} for chosen in saved["jpg_1_wins"]]
    for (_, dataset), chosen in zip(parts, choices):
        dataset.jpg_1_wins = chosen
