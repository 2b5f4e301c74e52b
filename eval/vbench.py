"""A hook for VBench on generated videos (eval.generate's mp4 files of a video model).

    python -m eval.vbench MANIFEST [--dimensions subject_consistency ...] [--output_path DIR] \\
        [--full_info_json PATH] [--device cuda]

VBench (Huang et al., "VBench: Comprehensive Benchmark Suite for Video Generative Models",
`pip install vbench`) is not installed with this project, and its dimensions need weights that it
downloads on first use (CLIP, DINO, RAFT, MUSIQ, AMT, ...): none of that can run offline, so it is
not part of the tests or the launchers. This hook runs it where it can: it reads the manifest's
videos and prompts and calls `VBench(device, full_info_json, output_path).evaluate(...)` in its
custom-input mode (your own prompts, as our suites are), with the dimensions that mode supports.
VBench writes its results under --output_path; the call's arguments are printed first.
"""

from __future__ import annotations

if not __package__:  # run as a file (python eval/X.py): make the repository importable first
    import _as_file  # noqa: F401  (eval/_as_file.py)

import argparse
import os

from eval import checks
from sdpo.errors import InputError, reports_input_errors

# The dimensions VBench evaluates on custom prompts (the others need its own prompt suite).
CUSTOM_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
                     "aesthetic_quality", "imaging_quality", "temporal_flickering", "temporal_style",
                     "overall_consistency", "human_action")


def parse_args(argv=None):
    p = checks.Parser(prog="python -m eval.vbench", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="a manifest eval.generate wrote for a video model (mp4 files)")
    p.add_argument("--dimensions", nargs="+", default=list(CUSTOM_DIMENSIONS), choices=CUSTOM_DIMENSIONS)
    p.add_argument("--output_path", default=None, help="VBench's results (default: <manifest>_vbench/)")
    p.add_argument("--full_info_json", default=None,
                   help="VBench's full-info json (default: VBench_full_info.json of the installed package)")
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def prompt_list(manifest: str) -> dict[str, str]:
    """{video path: prompt} of a manifest's records; every record must be an mp4 that exists."""
    from eval.score import load_manifest, resolve_image

    videos = {}
    for index, record in enumerate(load_manifest(manifest, "MANIFEST")):
        path = resolve_image(record["gen_image_path"], manifest)
        if not path.endswith(".mp4"):
            raise InputError(f"MANIFEST {manifest}: record {index} is {path}, not a video; VBench scores the mp4 files "
                             f"of a video model")
        if not os.path.isfile(path):
            raise InputError(f"MANIFEST {manifest}: record {index}: {path} not found (generate it with eval.generate)")
        videos[os.path.abspath(path)] = record["prompt"]
    return videos


def import_vbench():
    try:
        import vbench
    except ImportError:
        raise InputError("VBench is not installed (pip install vbench); its dimensions also download their weights "
                         "on first use, which needs the network") from None
    return vbench


@reports_input_errors
def main(argv=None):
    args = parse_args(argv)
    videos = prompt_list(args.manifest)
    vbench = import_vbench()
    output = args.output_path or os.path.splitext(args.manifest)[0] + "_vbench"
    os.makedirs(output, exist_ok=True)
    folder = os.path.dirname(next(iter(videos)))
    name = os.path.basename(os.path.splitext(args.manifest)[0])
    info = args.full_info_json or os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    print(f"VBench on {len(videos)} videos in {folder}: {', '.join(args.dimensions)} -> {output}")
    return vbench.VBench(args.device, info, output).evaluate(
        videos_path=folder, name=name, prompt_list=videos, dimension_list=list(args.dimensions), mode="custom_input")


if __name__ == "__main__":
    main()
