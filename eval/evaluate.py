"""Evaluate one checkpoint: generate the prompt suites, score them with every metric, print the table.

    python -m eval.evaluate --unet_path CKPT [--sdxl] [--suites papv2 hpsv2 partiprompts] \
        [--metrics ...] [--max_prompts N] [--batch_size 16] [--source METRIC.FIELD=VALUE ...]

The suites are the files shipped under prompts/ (eval.prompts; no network needed); only a
missing one is rebuilt from its upstream source. Generation flags
(--pretrain_path, --vae_path, --output_path, --height, --width, --seed, --steps, --cfg, --device,
--dtype) are those of eval.generate.
"""

from __future__ import annotations

import argparse
import os

import torch

from eval import generate as gen
from eval.prompts import BUILDERS, ensure_suite
from eval.score import markdown_table, parse_sources, score_all
from eval.scorers import METRICS, SCORERS
from sdpo.errors import InputError, reports_input_errors


@reports_input_errors
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", default=["papv2", "hpsv2", "partiprompts"], choices=sorted(BUILDERS))
    p.add_argument("--prompts_dir", default=None, help="where suite files live (default: prompts/)")
    p.add_argument("--metrics", nargs="+", default=list(SCORERS), choices=METRICS)
    p.add_argument("--score_batch_size", type=int, default=16)
    p.add_argument("--source", action="append", default=[], metavar="METRIC.FIELD=VALUE")
    args, rest = p.parse_known_args(argv)
    manifests = []
    for suite in args.suites:
        path = os.path.join(args.prompts_dir, f"{suite}.json") if args.prompts_dir else ensure_suite(suite)
        if not os.path.isfile(path):
            raise InputError(f"no suite file {path}; build it with python -m eval.prompts --suite {suite}")
        gen_args = gen.parse_args([*rest, "--test_json", path])
        manifests.append(gen.generate(gen_args))
    device = gen_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    means = score_all(manifests, args.metrics, device, args.score_batch_size, parse_sources(args.source))
    table = markdown_table(means, args.metrics)
    out = os.path.join(os.path.dirname(os.path.abspath(manifests[0])), "summary.md")
    with open(out, "w") as f:
        f.write(table)
    print("\n" + table + f"\ntable: {out}")
    return means


if __name__ == "__main__":
    main()
