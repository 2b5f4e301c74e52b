"""Video preference pairs: mp4 clips decoded with PyAV to a fixed number of frames at a training size.

A video pair row has the Pick-a-Pic layout with `video_0` and `video_1` in place of `jpg_0` and
`jpg_1`: each an mp4 file's bytes, a path to one, or a `{"bytes": ..., "path": ...}` record (what
`datasets` stores). `label_0` and `caption` are as for images.

Both clips of a pair are sampled alike: the same frame indices (`num_frames` consecutive frames
from a start drawn once per pair within the shorter clip, or its middle without a generator) and
the same resize and center crop. A clip that cannot be decoded, or has fewer frames than asked
for, raises UnreadableVideo, and the pair is skipped and counted as an unreadable image pair is.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from sdpo.data import UnreadableImage

VIDEO_COLUMNS = ("video_0", "video_1")


class UnreadableVideo(UnreadableImage):
    """A clip that cannot be used: not a decodable video, or too short (skipped and counted as an
    unreadable image is)."""


def _source(data):
    """A file-like object or path for PyAV from a row's value."""
    if isinstance(data, dict):
        data = data.get("bytes") or data.get("path")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(data))
    if isinstance(data, str):
        return data
    raise UnreadableVideo(f"not a video: a value of type {type(data).__name__} (mp4 bytes or a path are expected)")


def read_frames(data) -> list[np.ndarray]:
    """Every frame of a clip as (H, W, 3) uint8 RGB arrays, in order."""
    import av

    try:
        with av.open(_source(data)) as container:
            if not container.streams.video:
                raise UnreadableVideo("the file has no video stream")
            # (a copy: the array can share memory with a buffer the decoder reuses for later frames)
            frames = [frame.to_ndarray(format="rgb24").copy() for frame in container.decode(video=0)]
    except UnreadableVideo:
        raise
    except Exception as err:  # av's FFmpeg errors, OSError for a missing path, ...
        raise UnreadableVideo(f"cannot decode the video ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not frames:
        raise UnreadableVideo("the video has no frames")
    return frames


def frame_indices(lengths: list[int], num_frames: int, rng: random.Random | None = None) -> list[int]:
    """The frame indices that every clip of a pair is sampled at: `num_frames` consecutive frames
    from a start drawn uniformly with `rng` (the middle of the clip without one) within the
    shortest clip."""
    shortest = min(lengths)
    if shortest < num_frames:
        raise UnreadableVideo(f"the clip has {shortest} frames, fewer than the {num_frames} asked for (--num_frames)")
    slack = shortest - num_frames
    start = rng.randint(0, slack) if rng is not None else slack // 2
    return list(range(start, start + num_frames))


def resize_and_crop_frames(frames: list[np.ndarray], height: int, width: int) -> torch.Tensor:
    """Frames resized (bilinear) so that they cover height x width, center-cropped to it, as a
    (T, 3, height, width) tensor in [-1, 1]."""
    h, w = frames[0].shape[:2]
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    out = []
    for frame in frames:
        image = Image.fromarray(frame).resize(size, Image.BILINEAR).crop((left, top, left + width, top + height))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1.0


def decode_pair(videos: list, num_frames: int, height: int, width: int, rng: random.Random | None = None):
    """Both clips of a pair as a (2, T, 3, height, width) tensor in [-1, 1], sampled at the same frame
    indices (returned too)."""
    clips = [read_frames(v) for v in videos]
    indices = frame_indices([len(c) for c in clips], num_frames, rng)
    return torch.stack([resize_and_crop_frames([c[i] for i in indices], height, width) for c in clips]), indices


def encode_mp4(frames: np.ndarray, fps: int = 8, crf: int = 18) -> bytes:
    """(T, H, W, 3) uint8 frames as an H.264 mp4 file's bytes (even H and W)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
