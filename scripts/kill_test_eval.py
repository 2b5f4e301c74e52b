"""Kill generation and scoring at random moments (SIGKILL), run again, and check that the images
and scores are those of an uninterrupted run: the same files, pixel-identical images, equal
scores, and no temporary file left anywhere.

    PYTHONPATH=. .venv/bin/python scripts/kill_test_eval.py [--trials 20] [--seed 0] [--out DIR]

Everything runs offline on the CPU, on the tiny random models (sdpo.tiny, eval.tiny): one
`python -m eval.evaluate` process generates a 12-prompt suite (batch size 2, 20 steps, 32x32)
and scores it with the five metrics.

First come two uninterrupted runs: the reference, whose timeline is recorded (when each output
file appeared: generation.json, each PNG, the manifest, each score file, the table), and a
second one that must be identical to it. Then each trial starts the same command in a fresh
folder and kills it (SIGKILL), at a moment drawn from a seeded generator:

- in even trials, a moment stratified over the reference's whole duration, so that the kills
  spread over imports and model loading, generation, scoring and the writes between. It is
  replayed relative to the reference's last output before it (the trial waits for that output,
  then for the same delay scaled by the trial's speed), so a busy machine does not push every
  kill to the start;
- in odd trials, the moment one of the outputs appears (stratified over the outputs in their
  order), which lands between two writes: after a PNG is renamed into place and before the
  record that vouches for it, while the next PNG of the batch is being written, and so on.

In half of the trials the first rerun is killed too, after a random delay. A last rerun must then finish with exit
status 0. Where each kill landed is read from the files it left.

It takes several minutes (each run imports torch and loads eight small models), so it is not
part of the test suite (tests/).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eval.scorers import METRICS  # noqa: E402

RUN = "papv2_seed0_32x32_20s_7.5cfg"


def build(out: str) -> tuple[list[str], str, str]:
    """The tiny pipeline and scorers, and a 12-prompt suite; returns (command, pipeline, prompts dir)."""
    from eval.prompts import record, write_suite
    from eval.tiny import as_flags, build_tiny_scorers
    from sdpo.tiny import PLACES, THINGS, WORDS, build_tiny_pipeline

    models = os.path.join(out, "models")
    sd15 = os.path.join(models, "sd15")
    if not os.path.exists(os.path.join(sd15, "model_index.json")):
        build_tiny_pipeline(sd15)
    sources = as_flags(build_tiny_scorers(os.path.join(models, "scorers")))
    prompts_dir = os.path.join(out, "prompts")
    write_suite([record(f"{w} {t} {p}") for w, t, p in zip(WORDS + WORDS, THINGS[::-1] + THINGS, PLACES * 2)][:12],
                os.path.join(prompts_dir, "papv2.json"))
    command = [sys.executable, "-m", "eval.evaluate", "--unet_path", "base", "--pretrain_path", sd15,
               "--prompts_dir", prompts_dir, "--suites", "papv2", "--height", "32", "--width", "32", "--steps", "20",
               "--batch_size", "2", "--score_batch_size", "4", "--device", "cpu", *sources]
    return command, sd15, prompts_dir


ENV = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}


def start(command, folder):
    return subprocess.Popen([*command, "--output_path", folder], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=ROOT)


# The outputs of a run, in the order they appear; each marks a point of its timeline.
EVENTS = ([f"{RUN}/generation.json"] + [f"{RUN}/{i}_32x32.png" for i in range(12)] + [f"{RUN}.json"]
          + [f"{RUN}_{m}.json" for m in METRICS] + ["summary.md", "summary.json"])


def seen(folder: str, since_ns: int) -> set[str]:
    """The events whose file exists, written since `since_ns`."""
    out = set()
    for event in EVENTS:
        try:
            if os.stat(os.path.join(folder, event)).st_mtime_ns >= since_ns:
                out.add(event)
        except FileNotFoundError:
            pass
    return out


def timeline(command, folder) -> tuple[dict[str, float], float]:
    """Run to completion, polling: (seconds from the start at which each event was first seen, duration)."""
    began, began_ns = time.time(), time.time_ns()
    proc, times = start(command, folder), {}
    while proc.poll() is None:
        for event in seen(folder, began_ns) - set(times):
            times[event] = time.time() - began
        time.sleep(0.005)
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"the uninterrupted run failed:\n{stderr[-3000:]}")
    return times, time.time() - began


def kill_at(command, folder, anchor: str | None, anchor_time: float, delay: float):
    """Start a run; wait for the event `anchor` (None: the start), then for `delay` seconds scaled by
    this run's speed relative to the reference (anchor_time: when the reference saw it); SIGKILL.
    Returns a description of where the kill landed, or None if the run finished first."""
    began, began_ns = time.time(), time.time_ns()
    proc = start(command, folder)
    scale = 1.0
    if anchor is not None:
        while anchor not in seen(folder, began_ns):
            if proc.poll() is not None:
                return None
            time.sleep(0.002)
        scale = (time.time() - began) / max(anchor_time, 1e-3)
    try:
        proc.wait(timeout=delay * scale)
        return None
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL
        proc.wait()
        return phase(folder)


def phase(folder: str) -> str:
    """Where a killed run was, read from what it left on disk."""
    images = os.path.join(folder, RUN)
    names = os.listdir(images) if os.path.isdir(images) else []
    top = os.listdir(folder) if os.path.isdir(folder) else []
    if "generation.json" not in names:
        return "imports and model loading"
    if f"{RUN}.json" not in top:
        if any(".png.tmp" in n for n in names):
            return "writing a PNG"
        if any(".tmp" in n for n in names + top):
            return "writing a JSON file"
        return "generating"
    scored = sum(f"{RUN}_{m}.json" in top for m in METRICS)
    if scored < len(METRICS):
        if any(".tmp" in n for n in top):
            return "writing a score file"
        return "scoring"
    if "summary.json" not in top:
        return "writing the table"
    return "exiting"


def compare(reference: str, trial: str) -> list[str]:
    """What differs between a trial's outputs and the reference's (empty when nothing does)."""
    problems = []

    def listing(folder):
        return sorted(os.path.relpath(os.path.join(here, n), folder) for here, _, names in os.walk(folder) for n in names)

    ref_files, trial_files = listing(reference), listing(trial)
    if ref_files != trial_files:
        problems.append(f"files differ: only in the reference {sorted(set(ref_files) - set(trial_files))}, "
                        f"only in the trial {sorted(set(trial_files) - set(ref_files))}")
    stray = [n for n in trial_files if ".tmp" in n or "probe" in n]
    if stray:
        problems.append(f"temporary files left: {stray}")
    for name in ref_files:
        if name not in trial_files:
            continue
        a, b = os.path.join(reference, name), os.path.join(trial, name)
        if name.endswith(".png"):
            if not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))):
                problems.append(f"{name}: pixels differ")
        elif os.path.basename(name) == "generation.json":
            if json.load(open(a)) != json.load(open(b)):
                problems.append(f"{name} differs")
        elif name == f"{RUN}.json":
            if [r["prompt"] for r in json.load(open(a))] != [r["prompt"] for r in json.load(open(b))]:
                problems.append(f"{name}: prompts differ")
        elif name.startswith(f"{RUN}_"):
            sa = [(r["prompt"], r["score"]) for r in json.load(open(a))["records"]]
            sb = [(r["prompt"], r["score"]) for r in json.load(open(b))["records"]]
            if sa != sb:
                problems.append(f"{name}: scores differ")
        elif name == "summary.json":
            if [r["means"] for r in json.load(open(a))["rows"]] != [r["means"] for r in json.load(open(b))["rows"]]:
                problems.append(f"{name}: means differ")
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "sdpo-kill-test"),
                   help="models, the suite and the runs go here")
    args = p.parse_args()
    began = time.time()
    command, _, _ = build(args.out)
    runs = os.path.join(args.out, "runs")
    shutil.rmtree(runs, ignore_errors=True)
    # Two uninterrupted runs: the reference, whose timeline anchors the kills, and a second one
    # that must be identical to it (the whole check rests on runs being deterministic).
    reference = os.path.join(runs, "reference")
    times, full = timeline(command, reference)
    _, again = timeline(command, os.path.join(runs, "straight"))
    problems = compare(reference, os.path.join(runs, "straight"))
    print(f"uninterrupted runs: {full:.1f}s and {again:.1f}s; the second "
          f"{'is identical to the first' if not problems else f'DIFFERS: {problems}'}")
    if problems:
        sys.exit(1)
    marks = sorted((t, e) for e, t in times.items())

    rng = random.Random(args.seed)
    phases: dict[str, int] = {}
    kills = finished_early = removed = mismatched = failed = 0
    for trial in range(args.trials):
        folder = os.path.join(runs, f"trial{trial:02d}")
        half, stratum = (args.trials + 1) // 2, trial // 2
        if trial % 2 == 0:  # a moment stratified over the reference's duration
            moment = full * (stratum + rng.random()) / half
            before = [(t, e) for t, e in marks if t <= moment]
            anchor_time, anchor = before[-1] if before else (0.0, None)
            plan = [(anchor, anchor_time, moment - anchor_time, f"{moment:.1f}s of {full:.1f}s")]
        else:  # the moment an output appears (stratified over the outputs): between two writes
            anchor_time, anchor = marks[min(int(len(marks) * (stratum + rng.random()) / half), len(marks) - 1)]
            plan = [(anchor, anchor_time, 0.0, f"the appearance of {anchor}")]
        if rng.random() < 0.5:  # kill the first rerun too
            delay = full * rng.random()
            plan.append((None, 0.0, delay, f"{delay:.1f}s into the rerun"))
        landed = []
        for anchor, anchor_time, delay, when in plan:
            where = kill_at(command, folder, anchor, anchor_time, delay)
            if where is None:
                finished_early += 1
                landed.append(f"finished before {when}")
            else:
                kills += 1
                phases[where] = phases.get(where, 0) + 1
                landed.append(f"killed at {when} ({where})")
        proc = start(command, folder)
        stdout, stderr = proc.communicate()
        removed += sum(int(line.split()[1]) for line in stdout.splitlines() if line.startswith("removed "))
        if proc.returncode != 0:
            failed += 1
            print(f"trial {trial}: the rerun failed (exit {proc.returncode}): {stderr.strip().splitlines()[-1:]}")
            continue
        problems = compare(reference, folder)
        mismatched += bool(problems)
        print(f"trial {trial:2d}: {'; '.join(landed)}; rerun: {'identical' if not problems else problems}",
              flush=True)

    print(f"\n{args.trials} trials, {kills} kills (SIGKILL), {finished_early} runs finished before their kill time")
    for where, count in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  kills while {where}: {count}")
    print(f"temporary files removed by the reruns: {removed}")
    print(f"reruns that failed: {failed}; trials whose images or scores differ from the uninterrupted run: "
          f"{mismatched}")
    print(f"total time: {time.time() - began:.0f}s")
    sys.exit(1 if failed or mismatched else 0)


if __name__ == "__main__":
    main()
