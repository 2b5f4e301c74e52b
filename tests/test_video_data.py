"""Video preference pairs (sdpo/video.py): mp4 clips decode with PyAV to the frames they hold,
both clips of a pair are sampled at the same frame indices and cropped alike, an undecodable or
too short clip is refused with a message, and the synthetic video dataset loads with `datasets`."""

import os
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


def test_the_converter_writes_pairs_train_py_reads(tmp_path, tiny_video, capsys):
    """scripts/convert_video_pairs.py on a VideoGen-RewardBench-style CSV: labels A/B/same become
    1/0/0.5, a row with a missing video is left out, paths are stored absolute (or the bytes with
    --embed), and train.py's check accepts the result for a video model."""
    import sys

    import pyarrow.parquet as pq

    from conftest import ROOT
    from sdpo.video import encode_mp4

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import convert_video_pairs

    videos = tmp_path / "videos"
    (videos / "m1").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (videos / "m1" / f"{name}.mp4").write_bytes(
            encode_mp4(np.full((7, 32, 32, 3), ord(name), np.uint8)))
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("path_A,path_B,A_model,B_model,prompt,VQ,MQ,TA,Overall,num_frames_A,num_frames_B\n"
                        "m1/a.mp4,m1/b.mp4,x,y,a cat,A,B,A,A,7,7\n"
                        "m1/b.mp4,m1/c.mp4,x,y,a dog,B,B,B,B,7,7\n"
                        "m1/a.mp4,m1/c.mp4,x,y,a cow,A,A,A,same,7,3\n"
                        "m1/a.mp4,m1/gone.mp4,x,y,a pig,A,A,A,A,7,7\n")
    out = tmp_path / "pairs"
    summary = convert_video_pairs.main(["--csv", str(csv_path), "--videos", str(videos), "--out", str(out),
                                        "--rows_per_shard", "2"])
    assert summary == {"pairs": 3, "ties": 1, "missing": 1, "short": 0, "shards": 2, "folder": str(out)}
    table = pq.read_table(sorted((out / "data").iterdir())[0]).to_pylist() + \
        pq.read_table(sorted((out / "data").iterdir())[1]).to_pylist()
    assert [r["label_0"] for r in table] == [1.0, 0.0, 0.5] and [r["caption"] for r in table] == ["a cat", "a dog", "a cow"]
    assert table[0]["video_0"] == str(videos / "m1" / "a.mp4")
    embedded = convert_video_pairs.main(["--csv", str(csv_path), "--videos", str(videos), "--out", str(tmp_path / "e"),
                                         "--label", "VQ", "--embed"])
    rows = pq.read_table(next((tmp_path / "e" / "data").iterdir())).to_pylist()
    assert embedded["ties"] == 0 and rows[0]["video_0"] == (videos / "m1" / "a.mp4").read_bytes()
    short = convert_video_pairs.main(["--csv", str(csv_path), "--videos", str(videos), "--out", str(tmp_path / "s"),
                                      "--min_frames", "5"])
    assert (short["pairs"], short["short"], short["missing"]) == (2, 1, 1)
    (tmp_path / "latin1.csv").write_bytes("prompt,path_A,path_B,Overall\nun caf\xe9,a,b,A\n".encode("latin-1"))
    with pytest.raises(SystemExit):
        convert_video_pairs.main(["--csv", str(tmp_path / "latin1.csv"), "--videos", str(videos), "--out",
                                  str(tmp_path / "l")])
    assert "not a UTF-8 text file" in capsys.readouterr().err
    from test_train import run_in_process
    from test_video_train import video_args

    run_in_process(video_args(tiny_video, "wan21", tmp_path / "run", "--check_only", "--train_batch_size", "1",
                              data=str(out)))
    with pytest.raises(SystemExit):
        convert_video_pairs.main(["--csv", str(csv_path), "--videos", str(videos), "--out", str(out), "--label", "X"])
    assert "has no column 'X'" in capsys.readouterr().err
