"""Video preference pairs (sdpo/video.py): mp4 clips decode with PyAV to the frames they hold,
both clips of a pair are sampled at the same frame indices and cropped alike, an undecodable or
too short clip is refused with a message, and the synthetic video dataset loads with `datasets`."""

import random

import numpy as np
import pytest
import torch

from sdpo.video import UnreadableVideo, decode_pair, encode_mp4, frame_indices, read_frames


def counting_clip(length, height=40, width=48, offset=0):
    """A clip whose frame i is uniformly grey at level 10 * (i + offset): its frames tell their index."""
    return encode_mp4(np.stack([np.full((height, width, 3), 10 * (i + offset), np.uint8) for i in range(length)]))


def levels(frames: torch.Tensor):
    """The index each decoded frame shows, from its grey level ((T, 3, H, W) in [-1, 1])."""
    return [round(float((f.mean() + 1) * 127.5) / 10) for f in frames]


def test_a_clip_decodes_to_its_frames(tmp_path):
    data = counting_clip(12)
    frames = read_frames(data)
    assert len(frames) == 12 and frames[0].shape == (40, 48, 3) and frames[0].dtype == np.uint8
    assert [round(float(f.mean()) / 10) for f in frames] == list(range(12))  # H.264 at crf 18: within a grey level
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    for source in (str(path), {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}):
        assert len(read_frames(source)) == 12


@pytest.mark.parametrize("seed", range(5))
def test_both_clips_of_a_pair_get_the_same_frame_indices(seed):
    rng = random.Random(seed)
    a, b = counting_clip(14), counting_clip(10, height=48, width=40, offset=3)
    pair, indices = decode_pair([a, b], 6, 16, 24, rng)
    assert pair.shape == (2, 6, 3, 16, 24) and pair.min() >= -1 and pair.max() <= 1
    assert indices == list(range(indices[0], indices[0] + 6)) and 0 <= indices[0] <= 10 - 6
    assert levels(pair[0]) == indices and levels(pair[1]) == [i + 3 for i in indices]
    # The same generator state gives the same indices; without one, the middle of the shorter clip.
    assert decode_pair([a, b], 6, 16, 24, random.Random(seed))[1] == indices
    assert frame_indices([14, 10], 6) == [2, 3, 4, 5, 6, 7]


def test_the_crop_is_the_center_of_the_resized_frame():
    """A frame with a bright left half, resized to cover 16 x 16 and center-cropped: the crop's
    left half is bright, its right half dark, as the middle of the original frame."""
    frame = np.zeros((20, 40, 3), np.uint8)
    frame[:, :20] = 200
    (pair, _) = decode_pair([encode_mp4(np.stack([frame] * 4)), encode_mp4(np.stack([frame] * 4))], 2, 16, 16)
    first = (pair[0, 0].mean(0) + 1) * 127.5
    assert first[:, :6].mean() > 150 and first[:, 10:].mean() < 50


def test_an_undecodable_or_short_clip_is_refused_with_a_message():
    with pytest.raises(UnreadableVideo, match="cannot decode the video"):
        read_frames(b"not an mp4 file")
    with pytest.raises(UnreadableVideo, match="not a video: a value of type int"):
        read_frames(3)
    with pytest.raises(UnreadableVideo, match="fewer than the 8 asked for"):
        decode_pair([counting_clip(10), counting_clip(5)], 8, 16, 16)


def test_the_synthetic_video_dataset_loads(tmp_path):
    from datasets import load_dataset

    from sdpo.tiny import build_tiny_video_pickapic

    folder = build_tiny_video_pickapic(str(tmp_path / "videos"), num_rows=4)
    data = load_dataset("parquet", data_files=str(tmp_path / "videos" / "data" / "*.parquet"), split="train")
    assert data.column_names == ["caption", "video_0", "video_1", "label_0"] and len(data) == 4
    pair, indices = decode_pair([data[0]["video_0"], data[0]["video_1"]], 8, 40, 48, random.Random(0))
    assert pair.shape == (2, 8, 3, 40, 48) and folder
    # The preferred clip is the smooth one: neighbouring pixels differ far less than in the noisy one.
    smooth = 0 if data[0]["label_0"] == 1.0 else 1
    roughness = [float((clip[..., 1:] - clip[..., :-1]).abs().mean()) for clip in pair]
    assert 2 * roughness[smooth] < roughness[1 - smooth]
