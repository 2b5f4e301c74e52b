"""Evaluate one checkpoint: generate the prompt suites, score them with every metric, print the table.

    python -m eval.evaluate --unet_path CKPT [--sdxl] [--suites papv2 hpsv2 partiprompts] \
        [--metrics ...] [--max_prompts N] [--batch_size 16] [--source METRIC.FIELD=VALUE ...] [--recompute]

The suites are the files shipped under prompts/ (eval.prompts; no network needed); only a
missing one is rebuilt from its upstream source. Generation flags
(--pretrain_path, --vae_path, --output_path, --height, --width, --seed, --steps, --cfg,
--batch_size, --max_prompts, --device, --dtype) are those of eval.generate, scoring flags
(--metrics, --source) those of eval.score. Images and score files already made by the same
model, protocol and scorers are reused (see eval.generate and eval.score); --recompute makes
them all again. The table is written as summary.md and summary.json beside the manifests.

Every flag is checked, and the output folder made and proven writable, before any model loads.
"""

from __future__ import annotations

if not __package__:  # run as a file (python eval/X.py): make the repository importable first
    import _as_file  # noqa: F401  (eval/_as_file.py)

import argparse
import copy
import os

from eval import checks
from eval import generate as gen
from eval.prompts import BUILDERS, ensure_suite
from eval.score import add_scoring_flags, check_scoring_flags, markdown_table, score_all, write_table
from sdpo.errors import InputError, reports_input_errors


def parse_args(argv=None):
    p = checks.Parser(prog="python -m eval.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", default=["papv2", "hpsv2", "partiprompts"], choices=sorted(BUILDERS))
    p.add_argument("--prompts_dir", default=None, help="where suite files live (default: prompts/)")
    add_scoring_flags(p, "--score_batch_size")
    gen.add_generation_flags(p)
    p.add_argument("--recompute", action="store_true", help="make every image and every score again")
    return gen.finish_args(p.parse_args(argv))


def suite_args(args) -> list:
    """One eval.generate argument set per suite, each checked (no model is loaded)."""
    checks.distinct(args.suites, "--suites")
    if args.prompts_dir is not None:
        checks.folder(args.prompts_dir, "--prompts_dir")
    out = []
    for suite in args.suites:
        if args.prompts_dir:
            path = os.path.join(args.prompts_dir, f"{suite}.json")
            if not os.path.isfile(path):
                raise InputError(f"--prompts_dir {args.prompts_dir}: no suite file {suite}.json there; build it with "
                                 f"python -m eval.prompts --suite {suite} --output {path}")
        else:
            path = ensure_suite(suite)
        one = copy.copy(args)
        one.test_json = path
        gen.check_args(one)
        out.append(one)
    return out


@reports_input_errors
def main(argv=None):
    args = parse_args(argv)
    sources = check_scoring_flags(args.metrics, args.score_batch_size, args.source, "--score_batch_size")
    runs = suite_args(args)
    loaded = {}  # the models load once for all suites
    manifests = [gen.generate(one, loaded) for one in runs]
    means = score_all(manifests, args.metrics, runs[0].device, args.score_batch_size, sources, args.recompute)
    out = os.path.join(os.path.dirname(os.path.abspath(manifests[0])), "summary.md")
    json_path = write_table(means, args.metrics, out)
    print("\n" + markdown_table(means, args.metrics) + f"\ntable: {out} and {json_path}")
    return means


if __name__ == "__main__":
    main()
