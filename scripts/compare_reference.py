"""Our train.py against the reference's own (AIDC-AI/Diffusion-SDPO), side by side on the same work.

    .venv/bin/python scripts/compare_reference.py --reference /path/to/Diffusion-SDPO
        [--arch sd15|sdxl|tiny] [--resolution 256] [--pairs 60] [--steps 10] [--skip 2] [--runs 3]
        [--work DIR] [--latent_cache] [--ours_flags="--compile"] [--only ours|reference]
        [--reference_host_memory release|reuse] [--json out.json]

Builds once under --work: the real architecture's pipeline with random weights (sdpo/configs; about
4 GB for SD1.5) and --pairs synthetic Pick-a-Pic pairs at --resolution, a parquet folder that both
codes read. Then it trains with the two codes one after the other, alternating, --runs times each,
each run a fresh process with the same settings: Diffusion-DPO, beta 5000, the winner-preserving
safeguard at mu 0.9, --batch_size pairs (1) per micro-batch x 2 accumulation, fp32 (or
--mixed_precision bf16 on a GPU), AdamW
with a gradient-norm clip of 1.0, --steps optimizer steps, no validation and no checkpoint, seed 0,
TensorBoard logging in both. --latent_cache trains our runs from a latent cache (built first,
untimed); extra flags for our runs (--ours_flags) measure another option, e.g. --compile.

Both codes are timed the same way, from outside their code: a small wrapper process records a
timestamp at every optimizer step (AdamW.step) and the first logged loss, then runs the training
script. Seconds per optimizer step are the gaps between consecutive steps, the first --skip of each
run left out. Peak memory is the process's peak RSS, from the kernel. The same wrapper times the
phases of each step by wrapping the library calls both codes make (the dataloader, the VAE's encode,
the text encoders, the UNet's forward with and without gradients, autograd's backward, the gradient
clip, the optimizer step): wall, user and system CPU seconds and minor page faults per step, and
the memory at the end of each step; it prints them as a table.

The reference runs as the given clone holds it, with the one change it needs on a CPU, made at run
time by the wrapper: its train.py refuses to start without xformers (an attention library for NVIDIA
GPUs), so the wrapper reports xformers as present and makes `enable_xformers_memory_efficient_attention`
do nothing: its UNet keeps PyTorch's own attention, the one our code uses. (For --arch sdxl on a CPU,
its SDXL prompt encoder moves token ids to 'cuda' by name; the wrapper sends those to the CPU.) No
code of the reference is copied into this project.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sdpo.errors import ArgumentParser, InputError, reports_input_errors  # noqa: E402
from sdpo.files import check_output_dir, write_json_atomic  # noqa: E402
from sdpo.flags import image_size, no_empty_values, output_file  # noqa: E402

# Runs in each timed process before the training script; argv: [out.json, reference|ours, this project's
# root, script, args...].
WRAPPER = r'''
import atexit, json, os, resource, runpy, sys, time, types
out, code, root, script = sys.argv[1:5]
sys.argv = [script, *sys.argv[5:]]
stamps, first = [], {}
import torch
from transformers.optimization import Adafactor
def stepping(cls):
    step = cls.step
    def timed_step(self, *args, **kwargs):
        start = now()
        result = step(self, *args, **kwargs)
        add("optimizer", start)
        stamps.append(time.perf_counter())
        close_step()
        return result
    cls.step = timed_step
# Phases, timed the same way in both codes by wrapping the library functions both call: seconds and
# minor page faults per optimizer step; "other" is the rest of the step (loss, safeguard, logging...).
def now():  # wall seconds, minor page faults, user and system CPU seconds
    if torch.cuda.is_initialized():  # on a GPU, a phase ends when its kernels do
        torch.cuda.synchronize()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return [time.perf_counter(), usage.ru_minflt, usage.ru_utime, usage.ru_stime]
def add(key, start):
    phases[key] = [a + b - c for a, b, c in zip(phases.get(key, [0.0, 0, 0.0, 0.0]), now(), start)]
sys.path.append(root)  # after the training code's own paths: only for sdpo.host_memory.heap_info
from sdpo.host_memory import heap_info
def rss():
    with open("/proc/self/status") as f:
        found = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}
    return {**found, **heap_info()}  # and glibc's view: the main heap, and the blocks mapped on their own
phases, per_step, mark = {}, [], [now()]
def phase(owner, name, label):
    original = getattr(owner, name)
    def timed(*args, **kwargs):
        key = label(*args) if callable(label) else label
        if phases.get("_inside"):  # a phase inside another counts as the outer one
            return original(*args, **kwargs)
        phases["_inside"] = True
        start = now()
        try:
            return original(*args, **kwargs)
        finally:
            phases["_inside"] = False
            add(key, start)
    setattr(owner, name, timed)
import diffusers, torch.utils.data.dataloader as loader_module, transformers
phase(loader_module._BaseDataLoaderIter, "__next__", "data")
phase(diffusers.AutoencoderKL, "encode", "vae encode")
phase(transformers.CLIPTextModel, "forward", "text encoder")
phase(transformers.CLIPTextModelWithProjection, "forward", "text encoder")
phase(diffusers.UNet2DConditionModel, "forward",
      lambda *a: "policy forward" if torch.is_grad_enabled() else "reference forward")
phase(torch.autograd, "backward", "backward")
phase(torch.nn.utils, "clip_grad_norm_", "gradient clip")
def close_step():
    end = now()
    step = {k: v for k, v in phases.items() if not k.startswith("_")}
    step["total"] = [b - a for a, b in zip(mark[0], end)]
    step["rss"] = rss()
    per_step.append(step)
    phases.clear()
    mark[0] = end
import accelerate
log = accelerate.Accelerator.log
def logged(self, values, *args, **kwargs):
    for key in ("loss", "train_loss"):
        if key in values and "loss" not in first:
            first["loss"] = float(values[key])
    return log(self, values, *args, **kwargs)
accelerate.Accelerator.log = logged
stepping(torch.optim.AdamW)
stepping(Adafactor)
if code == "reference":  # the one change the reference needs on a CPU: no xformers
    import importlib.machinery, diffusers, diffusers.utils.import_utils as import_utils
    available = import_utils.is_xformers_available
    here = os.path.abspath(script)
    # "Available" to the reference's train.py alone; diffusers itself still knows it is not there.
    import_utils.is_xformers_available = lambda: os.path.abspath(sys._getframe(1).f_code.co_filename) == here or available()
    stub = types.ModuleType("xformers")
    stub.__version__, stub.__spec__ = "0.0.20", importlib.machinery.ModuleSpec("xformers", None)
    sys.modules["xformers"] = stub
    diffusers.ModelMixin.enable_xformers_memory_efficient_attention = lambda self, *a, **k: None
    if not torch.cuda.is_available():  # its SDXL prompt encoder names 'cuda'
        to = torch.Tensor.to
        torch.Tensor.to = lambda self, *a, **k: to(self, *("cpu" if x == "cuda" else x for x in a), **k)
def report():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(out, "w") as f:
        json.dump({"step_times": [b - a for a, b in zip(stamps, stamps[1:])], "first_loss": first.get("loss"),
                   "peak_rss_bytes": usage.ru_maxrss * 1024, "user_seconds": usage.ru_utime,
                   "system_seconds": usage.ru_stime, "minor_faults": usage.ru_minflt, "phases": per_step[1:],
                   "threads": torch.get_num_threads()}, f)
atexit.register(report)
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
os.chdir(os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
'''


# glibc's allocator told, before the process starts, what train.py tells it on a CPU: large blocks
# from the heap (no mappings of their own), and the heap never trimmed (a threshold of 64 GiB of free
# top, where train.py's mallopt says "never").
REUSE_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def build_inputs(args) -> tuple[str, str]:
    """(pipeline folder, dataset folder) under --work, built once."""
    from sdpo import architectures
    from sdpo.tiny import build_tiny_pickapic, build_tiny_pipeline

    pipeline = os.path.join(args.work, f"pipeline-{args.arch}")
    if not os.path.isfile(os.path.join(pipeline, "model_index.json")):
        print(f"building the {args.arch} pipeline with random weights in {pipeline} (once)", flush=True)
        if args.arch == "tiny":
            build_tiny_pipeline(pipeline)
        else:
            architectures.save_pipeline(args.arch, pipeline)
    data = os.path.join(args.work, f"pairs-{args.pairs}-{args.resolution}px")
    if not os.path.isdir(os.path.join(data, "data")):
        build_tiny_pickapic(data, num_rows=args.pairs, size=(args.resolution, args.resolution), tie_fraction=0.0)
    return pipeline, data


def common_flags(args, pipeline: str, data: str, out: str) -> list[str]:
    """The settings both codes train with (flag names are the same in both)."""
    flags = ["--pretrained_model_name_or_path", pipeline, "--dataset_name", data, "--output_dir", out,
             "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
             "--gradient_accumulation_steps", "2",
             "--max_train_steps", str(args.steps), "--learning_rate", "1e-8", "--lr_scheduler", "constant",
             "--lr_warmup_steps", "0", "--train_method", "diffusion-dpo", "--beta_dpo", "5000",
             "--use_winner_preserving", "--winner_preserving_mu", "0.9", "--mixed_precision", args.mixed_precision,
             "--max_grad_norm", "1.0", "--checkpointing_steps", str(10 * args.steps), "--seed", "0",
             "--dataloader_num_workers", "0", "--report_to", "tensorboard"]
    if args.arch == "sdxl":  # both codes then use Adafactor and gradient checkpointing, as the reference forces
        flags.append("--sdxl")
    return flags


def run_once(args, code: str, pipeline: str, data: str, number: int) -> dict:
    out = os.path.join(args.work, "runs", f"{code}-{number}")
    report = out + ".json"
    for path in (report,):
        if os.path.exists(path):
            os.remove(path)
    script = os.path.join(args.reference, "train.py") if code == "reference" else os.path.join(ROOT, "train.py")
    flags = common_flags(args, pipeline, data, out)
    if code == "ours":
        flags += args.ours_flags
        if args.cache:
            flags += ["--latent_cache", args.cache]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": ROOT if code == "ours" else args.reference}
    if code == "reference" and args.reference_host_memory == "reuse":  # what sdpo/host_memory.py sets, from outside
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), REUSE_TUNABLES]))
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    print(f"run {number}: {code} ...", flush=True)
    result = subprocess.run([sys.executable, "-c", WRAPPER, report, code, ROOT, script, *flags], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0 or not os.path.isfile(report):
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise InputError(f"the {code} run failed (exit status {result.returncode}):\n{tail}")
    with open(report) as f:
        measured = json.load(f)
    times = measured["step_times"][max(0, args.skip - 1):]  # gap i is step i+2's time
    measured["phases"] = measured["phases"][max(0, args.skip - 1):]
    print(f"  {code}: {statistics.median(times):.2f} s/step (median of {len(times)}), first loss "
          f"{measured['first_loss']}, peak RSS {measured['peak_rss_bytes'] / 2**30:.1f} GiB; whole process: user "
          f"{measured['user_seconds']:.0f} s, system {measured['system_seconds']:.0f} s, "
          f"{measured['minor_faults'] / 1e6:.2f} M minor page faults", flush=True)
    return {**measured, "timed": times}


def build_cache(args, pipeline: str, data: str) -> str:
    """A latent cache of the pairs for --ours_flags=--latent_cache, built once (untimed)."""
    cache = os.path.join(args.work, f"cache-{args.arch}-{args.pairs}-{args.resolution}px-{args.mixed_precision}")
    subprocess.run([sys.executable, "-m", "sdpo.cache", "--pretrained_model_name_or_path", pipeline,
                    "--dataset_name", data, "--resolution", str(args.resolution), "--mixed_precision", args.mixed_precision,
                    "--output_dir", cache, "--encode_batch_size", "2", *(["--sdxl"] if args.arch == "sdxl" else [])],
                   check=True, env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return cache


def summary(results: dict[str, list[dict]]) -> dict:
    rows = {}
    for code, runs in results.items():
        times = [t for r in runs for t in r["timed"]]
        rows[code] = {"min": min(times), "median": statistics.median(times), "max": max(times),
                      "run_medians": [statistics.median(r["timed"]) for r in runs],
                      "peak_rss_gib": [r["peak_rss_bytes"] / 2**30 for r in runs],
                      "first_losses": [r["first_loss"] for r in runs]}
        steps = [step for r in runs for step in r["phases"]]
        names = sorted({name for step in steps for name in step if name != "rss"},
                       key=lambda n: PHASES.index(n) if n in PHASES else 99)
        fields = ("seconds", "minor_faults", "user_seconds", "system_seconds")
        rows[code]["phases"] = {name: {field: statistics.median(step.get(name, [0.0, 0, 0.0, 0.0])[i] for step in steps)
                                       for i, field in enumerate(fields)} for name in names}
        total = rows[code]["phases"]["total"]
        rows[code]["phases"]["other"] = {field: total[field] - sum(v[field] for k, v in rows[code]["phases"].items()
                                                                  if k != "total") for field in fields}
        rows[code]["rss_at_step_end"] = {kind: statistics.median(step["rss"][kind] for step in steps)
                                         for kind in ("RssAnon", "RssFile", "heap", "mapped_chunks", "mapped_bytes")}
    if len(rows) == 2:
        rows["ratio"] = rows["reference"]["median"] / rows["ours"]["median"]  # > 1: ours is faster
    return rows


PHASES = ["data", "vae encode", "text encoder", "policy forward", "reference forward", "backward", "gradient clip",
          "optimizer", "other", "total"]


def phase_table(table: dict, codes: list[str]) -> str:
    """Per optimizer step, by phase, for each code: median wall seconds, user and system CPU seconds
    and minor page faults ("other" is the total's median less the phases' medians)."""
    lines = ["| phase | " + " | ".join(f"{c}: s (user + sys) | faults (k)" for c in codes) + " |",
             "|---|" + "---|---|" * len(codes)]
    for name in PHASES:
        cells = []
        for code in codes:
            v = table[code]["phases"].get(name)
            cells += ["-", "-"] if v is None else [
                f"{v['seconds']:.2f} ({v['user_seconds']:.2f} + {v['system_seconds']:.2f})", f"{v['minor_faults'] / 1e3:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for code in codes:
        r = table[code]["rss_at_step_end"]
        lines.append(f"{code}: at the end of a step {r['RssAnon'] / 2**30:.1f} GiB anonymous, "
                     f"{r['RssFile'] / 2**30:.1f} GiB file-backed resident; malloc's heap {r['heap'] / 2**30:.2f} GiB, "
                     f"{r['mapped_chunks']:.0f} chunks mapped on their own ({r['mapped_bytes'] / 2**30:.2f} GiB)")
    return "\n".join(lines)


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/compare_reference.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="a clone of AIDC-AI/Diffusion-SDPO (its train.py is run)")
    p.add_argument("--arch", choices=["sd15", "sdxl", "tiny"], default="sd15",
                   help="the real SD1.5/SDXL architecture with random weights, or the tiny test pipeline")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--pairs", type=int, default=60, help="synthetic pairs in the dataset")
    p.add_argument("--batch_size", type=int, default=1, help="pairs per micro-batch (2 micro-batches per step)")
    p.add_argument("--mixed_precision", choices=["no", "bf16"], default="no",
                   help="no (fp32) on a CPU; bf16 on a GPU (fp16 is left out: a step its loss scaler skips would "
                        "not be timed as a step)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=2, help="steps left out at the start of each run")
    p.add_argument("--runs", type=int, default=3, help="runs of each code, alternating")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "compare-reference"),
                   help="where the pipeline, the data and the runs go (reused)")
    p.add_argument("--ours_flags", default="", help="extra train.py flags for our runs, e.g. '--compile'")
    p.add_argument("--latent_cache", action="store_true", help="our runs train from a latent cache (built first)")
    p.add_argument("--reference_host_memory", choices=["release", "reuse"], default="release",
                   help="release: the reference as it runs (glibc's default); reuse: its process keeps freed memory "
                        "as ours does on a CPU (train.py --host_memory), set from outside through GLIBC_TUNABLES, "
                        "to see what else differs")
    p.add_argument("--only", choices=["ours", "reference"], default=None, help="run one code only")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    no_empty_values(args, allowed=("ours_flags",))
    image_size(args.resolution, "--resolution")
    for flag, low in (("pairs", 2), ("batch_size", 1), ("steps", 2), ("skip", 0), ("runs", 1)):
        if getattr(args, flag) < low:
            raise InputError(f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    if args.pairs < 2 * args.batch_size:
        raise InputError(f"--pairs {args.pairs} is less than one step's two micro-batches of --batch_size {args.batch_size}")
    if args.skip >= args.steps - 1:
        raise InputError(f"--skip {args.skip} leaves no step of {args.steps} to time")
    if args.only != "ours" and not os.path.isfile(os.path.join(args.reference, "train.py")):
        raise InputError(f"--reference {args.reference}: no train.py there (give a clone of AIDC-AI/Diffusion-SDPO)")
    check_output_dir(args.work, "--work")
    if args.json:
        output_file(args.json, "--json")
    args.ours_flags = args.ours_flags.split()
    return args


@reports_input_errors
def main(argv=None):
    args = parse_args(argv)
    pipeline, data = build_inputs(args)
    args.cache = build_cache(args, pipeline, data) if args.latent_cache else None
    codes = [args.only] if args.only else ["reference", "ours"]
    results = {code: [] for code in codes}
    for number in range(args.runs):
        for code in codes:
            results[code].append(run_once(args, code, pipeline, data, number))
    table = summary(results)
    print(f"\n{args.arch} at {args.resolution} px, {args.steps} steps per run (first {args.skip} left out), "
          f"{args.runs} runs each, ours with {' '.join(args.ours_flags + (['--latent_cache'] if args.cache else [])) or 'the same settings'}"
          f"{', the reference keeping freed memory (GLIBC_TUNABLES)' if args.reference_host_memory == 'reuse' else ''}:")
    for code in codes:
        row = table[code]
        print(f"  {code:9s} s/step min {row['min']:.2f}  median {row['median']:.2f}  max {row['max']:.2f}  "
              f"(run medians {', '.join(f'{m:.2f}' for m in row['run_medians'])}); peak RSS "
              f"{', '.join(f'{g:.1f}' for g in row['peak_rss_gib'])} GiB; first loss {row['first_losses']}")
    if "ratio" in table:
        print(f"  reference / ours: {table['ratio']:.3f} (above 1: ours is faster)")
    print("\nwhere a step's time goes (medians per optimizer step; 'other': the loss, the safeguard, logging, "
          "checks):\n" + phase_table(table, codes))
    if args.json:
        write_json_atomic({"settings": {k: v for k, v in vars(args).items()}, "results": table}, args.json)
    return table


if __name__ == "__main__":
    main()
