"""Kill training at random moments with SIGKILL, resume each time, and compare with a run that was
never interrupted: the final weights and every logged number must be identical, bitwise.

    PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python scripts/kill_test_train.py [--kills 20]

Every run is the real `accelerate launch train.py` on the tiny SD1.5-style pipeline (CPU), with
a checkpoint every 2 steps and at most 2 kept, so that checkpoints are written and pruned all the
time. The kills come in three kinds, in turn: at a random moment of the launch (start-up included),
while a checkpoint is being written (as soon as a `checkpoint-N.tmp` folder appears), and while an
old checkpoint is being pruned or the final model saved (a `.deleting` or `unet.tmp` folder). Each
kill takes the launcher and train.py down together (SIGKILL to the process group). After each kill
the run is started again with `--resume_from_checkpoint latest`.

Not part of the test suite: it takes a few minutes. The README reports its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def command(model, data, out, steps):
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", os.path.join(ROOT, "train.py"),
            "--pretrained_model_name_or_path", model, "--dataset_name", data, "--output_dir", out,
            "--resolution", "32", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
            "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none",
            "--mixed_precision", "no", "--use_winner_preserving", "--winner_preserving_mu", "0.5",
            "--timestep_weighting", "importance", "--random_crop", "--proportion_empty_prompts", "0.3",
            "--resume_from_checkpoint", "latest"]


def phase(out: str) -> str:
    """What the run was doing, judged by the folders it had on disk at the moment of the kill."""
    names = os.listdir(out) if os.path.isdir(out) else []
    if "unet.tmp" in names:
        return "final save"
    if any(n.endswith(".deleting") for n in names):
        return "pruning"
    if any(n.endswith(".tmp") for n in names):
        return "checkpoint writing"
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        return "training"
    return "start-up"


def launch(cmd):
    """Start a launch in its own process group; its log goes to a file (a pipe nobody reads would
    fill up and stall it)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    process.log = log
    return process


def log_tail(process) -> str:
    process.log.seek(0)
    return process.log.read().decode(errors="replace")[-3000:]


def steps_done(out: str) -> int:
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def wait_then_kill(process, out, kind, rng, budget):
    """Kill the launch according to `kind`; returns the phase it was in, or None if it ended first.
    `budget` is how long the rest of the run would take: a random kill lands within it."""
    started = time.time()
    if kind == "random":
        deadline = started + rng.uniform(0.5, budget)
        while time.time() < deadline and process.poll() is None:
            time.sleep(0.01)
        trigger = None
    else:
        trigger = (lambda n: n.endswith(".tmp") and n.startswith("checkpoint")) if kind == "checkpoint" else \
            (lambda n: n.endswith(".deleting") or n == "unet.tmp")
        skip = rng.randint(0, 2)  # let a few such moments pass, so that the run makes progress
        seen = set()
        while process.poll() is None and time.time() - started < 4 * budget:
            names = os.listdir(out) if os.path.isdir(out) else []
            hits = {n for n in names if trigger(n)}
            if hits - seen:
                seen |= hits
                if skip == 0:
                    break
                skip -= 1
            time.sleep(0.001)
    if process.poll() is not None:
        return None
    where = phase(out)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return where


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from sdpo.tiny import build_all

    work = args.work or tempfile.mkdtemp(prefix="kill-train-")
    paths = build_all(os.path.join(work, "tiny"))
    started = time.time()
    reference = os.path.join(work, "straight")
    shutil.rmtree(reference, ignore_errors=True)
    process = launch(command(paths["sd15"], paths["data"], reference, args.steps))
    if process.wait() != 0:
        sys.exit(log_tail(process))
    elapsed = time.time() - started
    startup = min(12.0, elapsed / 2)  # about what a launch takes before its first step, on this machine
    per_step = (elapsed - startup) / args.steps
    print(f"uninterrupted run: {args.steps} steps in {elapsed:.0f} s", flush=True)

    rng = random.Random(args.seed)
    killed = os.path.join(work, "killed")
    shutil.rmtree(killed, ignore_errors=True)
    kinds = ["random", "checkpoint", "delete"]
    phases, launches, attempt = {}, 0, 0
    finished = False
    while sum(phases.values()) < args.kills:
        kind = kinds[attempt % len(kinds)]
        attempt += 1
        process = launch(command(paths["sd15"], paths["data"], killed, args.steps))
        launches += 1
        # A random kill lands within start-up and the next 20 steps: long before the run would end.
        budget = startup + per_step * min(20, max(1, args.steps - steps_done(killed)))
        where = wait_then_kill(process, killed, kind, rng, budget)
        if where is None:  # the run ended before the kill: the kills so far are all it got
            if process.returncode != 0:
                sys.exit(f"a resumed run failed:\n{log_tail(process)}")
            finished = True
            break
        phases[where] = phases.get(where, 0) + 1
        print(f"kill {sum(phases.values()):2d} ({kind:10s}) during {where}", flush=True)
    if not finished:
        process = launch(command(paths["sd15"], paths["data"], killed, args.steps))
        launches += 1
        if process.wait() != 0:
            sys.exit(f"the final resumed run failed:\n{log_tail(process)}")

    a = load_file(os.path.join(reference, "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(killed, "unet", "diffusion_pytorch_model.safetensors"))
    same_weights = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    def numbers(folder):
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        return [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]

    same_metrics = numbers(reference) == numbers(killed)
    leftovers = [n for n in os.listdir(killed) if n.endswith((".tmp", ".deleting"))]
    print(f"\n{sum(phases.values())} kills ({', '.join(f'{n} during {p}' for p, n in sorted(phases.items()))}), "
          f"{launches} launches, {time.time() - started:.0f} s in all")
    print(f"final weights bitwise equal to the uninterrupted run: {same_weights}")
    print(f"every logged number equal (step times aside): {same_metrics}")
    print(f"leftover .tmp/.deleting folders: {leftovers or 'none'}")
    if sum(phases.values()) < args.kills:
        print(f"only {sum(phases.values())} kills landed before the run ended: raise --steps")
    sys.exit(0 if same_weights and same_metrics and not leftovers and sum(phases.values()) >= args.kills else 1)


if __name__ == "__main__":
    main()
