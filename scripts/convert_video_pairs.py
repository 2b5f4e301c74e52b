"""Convert a public video preference set to the video-pair layout train.py reads: the Pick-a-Pic
columns with video_0 and video_1 in place of jpg_0 and jpg_1 (caption, video_0, video_1, label_0).

    .venv/bin/python scripts/convert_video_pairs.py --csv videogen-rewardbench.csv --videos DIR \\
        --out data/videogen-rewardbench-pairs [--label Overall] [--embed]

The input is VideoGen-RewardBench's layout (KwaiVGI/VideoGen-RewardBench on the hub, Apache-2.0:
26.5k prompt / video A / video B triplets with expert labels, from 12 text-to-video models): a CSV
with the columns prompt, path_A, path_B and the labels VQ, MQ, TA and Overall, each A, B or same,
and the mp4 files (videos.zip, unzipped into --videos; path_A and path_B are relative to it).
label_0 is 1 where --label says A, 0 where it says B, 0.5 for same (a tie: train.py drops it).

Rows whose videos are missing are left out and counted. The videos are stored as absolute paths
(the parquet stays small; keep the files where they are), or with --embed as the mp4 bytes (a
self-contained set, as large as the videos). Written as data/<split>-NNNNN-of-NNNNN.parquet under
--out, in shards of --rows_per_shard rows, into a temporary folder that replaces --out's data/ at
the end (an interrupted run leaves no partial set).

Mind that VideoGen-RewardBench is published as a benchmark: a model trained on it should not be
evaluated on it, and its videos come from other models (off-policy pairs for the one you train).
Its clips last 4-6 s at their models' frame rates, so many hold fewer than the 81 (Wan2.1) or 49
(CogVideoX) frames the pipelines generate: --min_frames leaves those pairs out here (train.py would
skip them one by one), or train with a smaller --num_frames. train.py reads consecutive frames at
each file's own rate, so clips of different frame rates cover different lengths of time.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sdpo.errors import ArgumentParser, InputError, first_line, reports_input_errors  # noqa: E402
from sdpo.files import check_output_dir  # noqa: E402
from sdpo.flags import no_empty_values  # noqa: E402

LABELS = {"A": 1.0, "B": 0.0, "same": 0.5}
COLUMNS = ("prompt", "path_A", "path_B")


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/convert_video_pairs.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True, help="the pairs: prompt, path_A, path_B and the label columns")
    p.add_argument("--videos", required=True, help="the folder path_A and path_B are relative to")
    p.add_argument("--out", required=True, help="the dataset folder to write (its data/ is replaced)")
    p.add_argument("--label", default="Overall", help="the label column: Overall, VQ, MQ or TA")
    p.add_argument("--split", default="train", help="the split name of the parquet files")
    p.add_argument("--embed", action="store_true", help="store the mp4 bytes instead of absolute paths")
    p.add_argument("--rows_per_shard", type=int, default=2000)
    p.add_argument("--min_frames", type=int, default=None,
                   help="leave out pairs with a clip of fewer frames (the CSV's num_frames_A and num_frames_B): "
                        "train.py skips a pair whose clips are shorter than its --num_frames anyway, one by one")
    args = p.parse_args(argv)
    no_empty_values(args)
    if args.rows_per_shard < 1:
        raise InputError(f"--rows_per_shard must be >= 1, got {args.rows_per_shard}")
    if not os.path.isfile(args.csv):
        raise InputError(f"--csv {args.csv}: no such file")
    if not os.path.isdir(args.videos):
        raise InputError(f"--videos {args.videos}: no such folder (unzip videos.zip there)")
    if args.min_frames is not None and args.min_frames < 1:
        raise InputError(f"--min_frames must be >= 1, got {args.min_frames}")
    check_output_dir(args.out, "--out")
    return args


FRAME_COLUMNS = ("num_frames_A", "num_frames_B")


def read_rows(path: str, label: str, min_frames: int | None = None) -> tuple[list[dict], int]:
    """(the CSV's rows as caption, path_0, path_1, label_0; the number left out for a clip shorter
    than min_frames), refusing a missing column, a label that is not A, B or same, or a frame count
    that is not a number."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            for column in (*COLUMNS, label, *(FRAME_COLUMNS if min_frames else ())):
                if column not in fields:
                    raise InputError(f"--csv {path} has no column {column!r} (it has: {', '.join(fields)})")
            rows, short = [], 0
            for number, row in enumerate(reader, start=2):  # (line 1 is the header)
                value = (row[label] or "").strip()
                if value not in LABELS:
                    raise InputError(f"--csv {path}, line {number}: {label} is {value!r}, not A, B or same")
                if min_frames:
                    try:
                        frames = [float(row[c]) for c in FRAME_COLUMNS]
                    except (TypeError, ValueError):
                        raise InputError(f"--csv {path}, line {number}: num_frames_A/B are not numbers") from None
                    if min(frames) < min_frames:
                        short += 1
                        continue
                rows.append({"caption": row["prompt"] or "", "path_0": row["path_A"], "path_1": row["path_B"],
                             "label_0": LABELS[value]})
    except UnicodeDecodeError as err:
        raise InputError(f"--csv {path}: not a UTF-8 text file ({first_line(err)})") from None
    except csv.Error as err:
        raise InputError(f"--csv {path}: not a readable CSV ({first_line(err)})") from None
    return rows, short


def convert(args) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    rows, short = read_rows(args.csv, args.label, args.min_frames)
    kept, missing = [], 0
    for row in rows:
        paths = [os.path.abspath(os.path.join(args.videos, row[k])) for k in ("path_0", "path_1")]
        if not all(os.path.isfile(p) for p in paths):
            missing += 1
            continue
        kept.append({**row, "path_0": paths[0], "path_1": paths[1]})
    if not kept:
        raise InputError(f"none of the {len(rows)} pairs of {args.csv} has both videos under {args.videos}")
    video_type = pa.binary() if args.embed else pa.string()
    schema = pa.schema([("caption", pa.string()), ("video_0", video_type), ("video_1", video_type),
                        ("label_0", pa.float64())])
    final = os.path.join(args.out, "data")
    tmp = os.path.join(args.out, "data.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards = (len(kept) + args.rows_per_shard - 1) // args.rows_per_shard

    def video(path):
        if not args.embed:
            return path
        with open(path, "rb") as f:
            return f.read()

    for shard in tqdm(range(shards), desc="shards", unit="shard"):
        part = kept[shard * args.rows_per_shard : (shard + 1) * args.rows_per_shard]
        table = pa.table({"caption": [r["caption"] for r in part], "video_0": [video(r["path_0"]) for r in part],
                          "video_1": [video(r["path_1"]) for r in part], "label_0": [r["label_0"] for r in part]},
                         schema=schema)
        pq.write_table(table, os.path.join(tmp, f"{args.split}-{shard:05d}-of-{shards:05d}.parquet"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    ties = sum(r["label_0"] == 0.5 for r in kept)
    return {"pairs": len(kept), "ties": ties, "missing": missing, "short": short, "shards": shards,
            "folder": args.out}


@reports_input_errors
def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = convert(args)
    print(f"{summary['pairs']} pairs ({summary['ties']} ties, which train.py drops) in {summary['shards']} shard(s) "
          f"under {os.path.join(args.out, 'data')}; {summary['missing']} left out for a missing video, "
          f"{summary['short']} for a clip shorter than --min_frames")
    return summary


if __name__ == "__main__":
    main()
