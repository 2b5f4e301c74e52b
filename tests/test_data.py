"""The data rules: ties, winner order, unreadable images, missing columns, deterministic batches."""

import io
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdpo.data import PairBatchSampler, PairDataset, PairTransform, decided_rows, load_split, transform_image
from sdpo.errors import InputError
from sdpo.tiny import load_clip_tokenizer, write_clip_tokenizer


def png(value, size=(12, 10)):
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(folder, rows, split="train"):
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    pq.write_table(pa.table(rows), os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))
    return folder


def test_clip_tokenizer_gives_the_released_ids(tmp_path):
    write_clip_tokenizer(str(tmp_path))
    tok = load_clip_tokenizer(str(tmp_path))
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


def test_ties_dropped_and_winner_first(tmp_path):
    rows = {
        "caption": ["a", "b", "c", "d"],
        "jpg_0": [png(10), png(20), png(30), png(40)],
        "jpg_1": [png(200), png(210), png(220), png(230)],
        "label_0": [1.0, 0.5, 0.0, 1.0],
    }
    data = load_split(write_split(str(tmp_path), rows), "train")
    keep, ties = decided_rows(data["label_0"])
    assert keep == [0, 2, 3] and ties == 1
    ds = PairDataset(data, keep, PairTransform(8, hflip=False), seed=0)
    winner_values = [round((float(ds[(0, i)]["pixels"][0].mean()) + 1) * 127.5) for i in range(3)]
    loser_values = [round((float(ds[(0, i)]["pixels"][1].mean()) + 1) * 127.5) for i in range(3)]
    assert winner_values == [10, 220, 40] and loser_values == [200, 30, 230]
    with pytest.raises(InputError, match="label_0"):
        decided_rows([1.0, 0.7])


def test_unreadable_pair_is_skipped_with_a_warning(tmp_path, caplog):
    rows = {"caption": ["a", "b", "c"], "jpg_0": [png(10), b"not an image", png(30)],
            "jpg_1": [png(1), png(2), png(3)], "label_0": [1.0, 1.0, 1.0]}
    data = load_split(write_split(str(tmp_path), rows), "train")
    ds = PairDataset(data, [0, 1, 2], PairTransform(8, hflip=False), seed=0)
    with caplog.at_level(logging.WARNING):
        item = ds[(0, 1)]
    value = round((float(item["pixels"][0].mean()) + 1) * 127.5)
    assert value == 30  # the next readable pair took its place
    assert "row 1" in caplog.text and "1 skipped so far" in caplog.text


def test_missing_split_names_the_pattern(tmp_path):
    with pytest.raises(InputError, match="data/validation-"):
        load_split(str(tmp_path), "validation")


def test_transform_resizes_shorter_side_and_center_crops():
    image = Image.fromarray(np.arange(20 * 40 * 3, dtype=np.uint8).reshape(20, 40, 3) % 251)
    import random

    tensor, original, crop = transform_image(image, 10, random.Random(0), random_crop=False, hflip=False)
    assert tensor.shape == (3, 10, 10) and original == (20, 40) and crop == (0, 5)
    assert float(tensor.min()) >= -1 and float(tensor.max()) <= 1


def test_sampler_resumes_without_loading_and_shards_processes():
    straight = PairBatchSampler(10, 2, seed=3)
    it = iter(straight)
    first_seven = [next(it) for _ in range(7)]  # crosses into epoch 1 after 5 batches
    resumed = iter(PairBatchSampler(10, 2, seed=3, start=4))
    assert [next(resumed) for _ in range(3)] == first_seven[4:]
    assert first_seven[5][0][0] == 1  # epoch 1 keys
    # two processes split every global batch, nothing shared, nothing lost
    r0, r1 = PairBatchSampler(10, 2, 3, rank=0, world_size=2), PairBatchSampler(10, 2, 3, rank=1, world_size=2)
    a, b = iter(r0), iter(r1)
    keys = [k for _ in range(2) for k in next(a) + next(b)]
    assert sorted(i for _, i in keys) == sorted(PairBatchSampler(10, 4, 3).order(0)[:8])
    with pytest.raises(InputError, match="fewer than one global batch"):
        PairBatchSampler(3, 2, 0, world_size=2)


def test_time_ids_record_original_size_and_crop():
    import random

    image = Image.fromarray(np.zeros((40, 48, 3), np.uint8))  # h 40, w 48 -> resized to 32 x 38
    row = {"jpg_0": image, "jpg_1": image, "label_0": 1, "caption": "c"}
    item = PairTransform(32, random_crop=False, hflip=False)(row, random.Random(0))
    assert item["time_ids"].tolist() == [[40, 48, 0, 3, 32, 32]] * 2
    # A random crop at left = 1, mirrored by a flip, is recorded where it lies in the flipped image.
    rng = random.Random(0)
    _, original, crop = transform_image(image, 32, rng, random_crop=True, hflip=True)
    rng = random.Random(0)
    top, left = rng.randint(0, 0), rng.randint(0, 6)
    flipped = rng.random() < 0.5
    assert original == (40, 48) and crop == (top, 38 - left - 32 if flipped else left)


@pytest.mark.parametrize("seed,count", [(0, 5), (1234, 11), (7, 1)])
def test_max_train_samples_picks_the_reference_rows(seed, count):
    """The reference drops ties with select(), then shuffle(seed=seed).select(range(count)) in
    `datasets`; the same rows come out of first_samples."""
    from datasets import Dataset

    from sdpo.data import first_samples

    labels = [1.0, 0.5, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.0]
    data = Dataset.from_dict({"row": list(range(len(labels))), "label_0": labels})
    decided = [i for i, label in enumerate(data["label_0"]) if label in (0, 1)]
    reference = data.select(decided).shuffle(seed=seed).select(range(count))["row"]
    rows, _ = decided_rows(labels)
    assert first_samples(rows, count, seed) == reference
    assert len(set(first_samples(rows, count, seed))) == count
