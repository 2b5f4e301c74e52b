"""Every wrong value given to an entry point ends the same way: exit status 2, a last stderr line
`error: ...` that names the flag (or the launcher's variable), no traceback, and no model loaded
first. One table: bench.py, demo.py, python -m sdpo.cache (and scripts/cache_latents.sh),
scripts/plot_run.py, scripts/loss_precision.py, scripts/compare_reference.py and the train
launchers' environment."""

import importlib.util
import os
import subprocess
import sys

import pytest

import bench
import demo
import sdpo.cache
import sdpo.tiny
from conftest import ROOT
from sdpo import architectures, models


def script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAINS = {"bench.py": bench.main, "demo.py": demo.main, "python -m sdpo.cache": sdpo.cache.main,
         "scripts/plot_run.py": script("plot_run").main, "scripts/loss_precision.py": script("loss_precision").main,
         "scripts/compare_reference.py": script("compare_reference").main}
LAUNCH_VARIABLES = ("MODEL_NAME", "DATASET_NAME", "OUTPUT_DIR", "NUM_GPUS", "VAE_NAME")
# What the placeholders name: {file} a plain file, {missing} a path that does not exist, {empty} an
# empty folder, {tmp} a fresh folder, {run} a folder holding a metrics.jsonl, {sd15} {sdxl} {data} the tiny ones.
CACHE = ["--pretrained_model_name_or_path", "{sd15}", "--dataset_name", "{data}", "--output_dir", "{tmp}/cache",
         "--resolution", "32"]
EMPTY = "is empty: give a value"

ROWS = [
    # bench.py
    ("bench.py", ["--arch", "flux"], "argument --arch: invalid choice: 'flux'"),
    ("bench.py", ["--mode", "serve"], "argument --mode: invalid choice"),
    ("bench.py", ["--train_method", "ppo"], "argument --train_method: invalid choice"),
    ("bench.py", ["--mixed_precision", "fp8"], "argument --mixed_precision: invalid choice"),
    ("bench.py", ["--loss_precision", "fp16"], "argument --loss_precision: invalid choice"),
    ("bench.py", ["--compare", "base"], "argument --compare: invalid choice"),
    ("bench.py", ["--resolution", "abc"], "argument --resolution: invalid int value"),
    ("bench.py", ["--resolution", "0"], "--resolution must be a positive multiple of 8"),
    ("bench.py", ["--resolution", "-8"], "--resolution must be a positive multiple of 8"),
    ("bench.py", ["--resolution", "30"], "--resolution must be a positive multiple of 8"),
    ("bench.py", ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    ("bench.py", ["--steps", "-1"], "--steps must be >= 1, got -1"),
    ("bench.py", ["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    ("bench.py", ["--sample_steps", "0"], "--sample_steps must be >= 1, got 0"),
    ("bench.py", ["--loader_pairs", "0"], "--loader_pairs must be >= 1, got 0"),
    ("bench.py", ["--mode", "loader", "--loader_pairs", "4", "--batch_size", "8"], "--loader_pairs 4 is less than one batch"),
    ("bench.py", ["--workers", "0", "-1"], "--workers must be >= 0"),
    ("bench.py", ["--peak_tflops", "0"], "--peak_tflops must be a positive number"),
    ("bench.py", ["--peak_tflops", "nan"], "--peak_tflops must be a positive number"),
    ("bench.py", ["--device", "gpu"], "--device 'gpu': not a device"),
    ("bench.py", ["--mode", "sample", "--sample_steps", "5000"], "--sample_steps must be at most 1000"),
    ("bench.py", ["--resolution", "16384"], "--resolution must be at most 8192"),
    ("python -m sdpo.cache", [*CACHE, "--resolution", "16384"], "--resolution must be at most 8192"),
    ("bench.py", ["--device", "cuda:99"], "--device cuda:99: "),
    ("bench.py", ["--device", ""], f"--device {EMPTY}"),
    ("bench.py", ["--json", ""], f"--json {EMPTY}"),
    ("bench.py", ["--json", "{tmp}"], "a folder, not a file"),
    ("bench.py", ["--json", "{file}/out.json"], "a file is in the way"),
    ("bench.py", ["--pretrained", ""], f"--pretrained {EMPTY}"),
    ("bench.py", ["--pretrained", "{file}"], "a file, not a folder"),
    ("bench.py", ["--pretrained", "{missing}"], "no such folder, and not a hub id"),
    ("bench.py", ["--pretrained", "{sdxl}"], "is an SDXL pipeline: pass --arch sdxl"),
    ("bench.py", ["--pretrained", "{empty}", "--count_only"], "--pretrained: cannot read the configs"),
    ("bench.py", ["--mode", "loader", "--latent_cache"], "--latent_cache has no effect with --mode loader"),
    ("bench.py", ["--mode", "sample", "--compile"], "--compile has no effect with --mode sample"),
    ("bench.py", ["--mode", "sample", "--compare", "reference-settings"], "--compare has no effect with --mode sample"),
    ("bench.py", ["--mode", "loader", "--count_only"], "--count_only has no effect with --mode loader"),
    ("bench.py", ["--mode", "loader", "--pretrained", "{sd15}"], "--pretrained has no effect with --mode loader"),
    ("bench.py", ["--count_only", "--compare", "reference-settings"], "drop --count_only"),
    # demo.py
    ("demo.py", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("demo.py", ["--steps", "x"], "argument --steps: invalid int value"),
    ("demo.py", ["--warm_start_steps", "-5"], "--warm_start_steps must be >= 1, got -5"),
    ("demo.py", ["--seed", "-1"], "--seed must lie in [0, 2**32 - 1)"),
    ("demo.py", ["--out", ""], f"--out {EMPTY}"),
    ("demo.py", ["--out", "{file}"], "--out {file}: a file is in the way"),
    ("demo.py", ["--out", "{file}/demo"], "lies under a file"),
    # python -m sdpo.cache
    ("python -m sdpo.cache", CACHE[:4], "the following arguments are required: --output_dir"),
    ("python -m sdpo.cache", [*CACHE, "--resolution", "12"], "--resolution must be a positive multiple of 8"),
    ("python -m sdpo.cache", [*CACHE, "--resolution", "-8"], "--resolution must be a positive multiple of 8"),
    ("python -m sdpo.cache", [*CACHE, "--resolution", "0"], "--resolution must be a positive multiple of 8"),
    ("python -m sdpo.cache", [*CACHE, "--shard_pairs", "0"], "--shard_pairs must be >= 1, got 0"),
    ("python -m sdpo.cache", [*CACHE, "--encode_batch_size", "3"], "--encode_batch_size must be an even number >= 2"),
    ("python -m sdpo.cache", [*CACHE, "--mixed_precision", "fp8"], "argument --mixed_precision: invalid choice"),
    ("python -m sdpo.cache", [*CACHE, "--random_crop"], "--random_crop: a latent cache holds one crop"),
    ("python -m sdpo.cache", [*CACHE, "--device", "gpu"], "--device 'gpu': not a device"),
    ("python -m sdpo.cache", [*CACHE, "--device", "cuda:99"], "--device cuda:99: "),
    ("python -m sdpo.cache", [*CACHE, "--device", ""], f"--device {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--output_dir", ""], f"--output_dir {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--output_dir", "{file}"], "--output_dir {file}: a file is in the way"),
    ("python -m sdpo.cache", [*CACHE, "--output_dir", "{file}/cache"], "lies under a file"),
    ("python -m sdpo.cache", [*CACHE, "--cache_dir", "{file}"], "--cache_dir {file}: a file is in the way"),
    ("python -m sdpo.cache", [*CACHE, "--cache_dir", ""], f"--cache_dir {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--pretrained_model_name_or_path", ""], f"--pretrained_model_name_or_path {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--pretrained_model_name_or_path", "{file}"], "a file, not a folder"),
    ("python -m sdpo.cache", [*CACHE, "--pretrained_model_name_or_path", "{missing}"], "no such folder, and not a hub id"),
    ("python -m sdpo.cache", [*CACHE, "--pretrained_model_name_or_path", "{empty}"], "cannot read the VAE config"),
    ("python -m sdpo.cache", [*CACHE, "--sdxl"], "is an SD1.x pipeline: remove --sdxl"),
    ("python -m sdpo.cache", [*CACHE, "--pretrained_model_name_or_path", "{sdxl}"], "is an SDXL pipeline: add --sdxl"),
    ("python -m sdpo.cache", [*CACHE, "--pretrained_vae_model_name_or_path", ""],
     f"--pretrained_vae_model_name_or_path {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--pretrained_vae_model_name_or_path", "{missing}"], "no such folder"),
    ("python -m sdpo.cache", [*CACHE, "--pretrained_vae_model_name_or_path", "{file}"], "a file, not a folder"),
    ("python -m sdpo.cache", [*CACHE, "--pretrained_vae_model_name_or_path", "{empty}"],
     "--pretrained_vae_model_name_or_path: cannot read the VAE config"),
    ("python -m sdpo.cache", [*CACHE, "--dataset_name", ""], f"--dataset_name {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--dataset_name", "{missing}"], "could not load dataset '{missing}'"),
    ("python -m sdpo.cache", [*CACHE, "--dataset_name", "{file}"], "not a readable parquet file"),
    ("python -m sdpo.cache", [*CACHE, "--split", ""], f"--split {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--split", "nosplit"], "--split nosplit: no parquet files"),
    ("python -m sdpo.cache", [*CACHE, "--train_data_dir", ""], f"--train_data_dir {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--train_data_dir", "nodir"], "no parquet files for it in {data}/nodir"),
    ("python -m sdpo.cache", [*CACHE, "--caption_column", ""], f"--caption_column {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--caption_column", "nocol"], "has no column 'nocol'"),
    ("python -m sdpo.cache", [*CACHE, "--revision", ""], f"--revision {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--dataset_revision", ""], f"--dataset_revision {EMPTY}"),
    ("python -m sdpo.cache", [*CACHE, "--dataset_config_name", ""], f"--dataset_config_name {EMPTY}"),
    ("scripts/cache_latents.sh", [*CACHE, "--resolution", "12"], "--resolution must be a positive multiple of 8"),
    # scripts/plot_run.py
    ("scripts/plot_run.py", [], "the following arguments are required: output_dir"),
    ("scripts/plot_run.py", [""], f"output_dir {EMPTY}"),
    ("scripts/plot_run.py", ["{file}"], "output_dir {file}: a file"),
    ("scripts/plot_run.py", ["{missing}"], "output_dir {missing}: no such folder"),
    ("scripts/plot_run.py", ["{empty}"], "{empty}/metrics.jsonl not found"),
    ("scripts/plot_run.py", ["{run}", "--out", ""], f"--out {EMPTY}"),
    ("scripts/plot_run.py", ["{run}", "--out", "{tmp}"], "--out {tmp}: a folder, not a file"),
    ("scripts/plot_run.py", ["{run}", "--out", "{tmp}/curves.txt"], "the name must end in one of"),
    ("scripts/plot_run.py", ["{run}", "--out", "{file}/curves.png"], "a file is in the way"),
    # scripts/compare_reference.py ({tmp} holds no train.py: each row fails before the clone is looked at)
    ("scripts/compare_reference.py", [], "the following arguments are required: --reference"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}"], "--reference {tmp}: no train.py there"),
    ("scripts/compare_reference.py", ["--reference", "{missing}"], "--reference {missing}: no train.py there"),
    ("scripts/compare_reference.py", ["--reference", ""], f"--reference {EMPTY}"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--arch", "sd3"], "argument --arch: invalid choice"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--resolution", "30"],
     "--resolution must be a positive multiple of 8"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--resolution", "16384"], "--resolution must be at most 8192"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--pairs", "1"], "--pairs must be >= 2, got 1"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--pairs", "6", "--batch_size", "4"],
     "--pairs 6 is less than one step's two micro-batches of --batch_size 4"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--steps", "1"], "--steps must be >= 2, got 1"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--runs", "0"], "--runs must be >= 1, got 0"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--skip", "-1"], "--skip must be >= 0, got -1"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--steps", "4", "--skip", "3"],
     "--skip 3 leaves no step of 4 to time"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--mixed_precision", "fp8"],
     "argument --mixed_precision: invalid choice"),
    ("scripts/compare_reference.py", ["--reference", "{tmp}", "--reference_host_memory", "keep"],
     "argument --reference_host_memory: invalid choice"),
    ("scripts/compare_reference.py", ["--only", "ours", "--reference", "x", "--work", "{file}"],
     "--work {file}: a file is in the way"),
    ("scripts/compare_reference.py", ["--only", "ours", "--reference", "x", "--work", "{tmp}/w", "--json", ""], f"--json {EMPTY}"),
    ("scripts/compare_reference.py", ["--only", "ours", "--reference", "x", "--work", "{tmp}/w", "--json", "{tmp}"], "--json {tmp}: a folder, not a file"),
    # scripts/loss_precision.py
    ("scripts/loss_precision.py", ["--pairs", "0"], "--pairs must be a positive multiple of 8, got 0"),
    ("scripts/loss_precision.py", ["--pairs", "12"], "--pairs must be a positive multiple of 8, got 12"),
    ("scripts/loss_precision.py", ["--out", ""], f"--out {EMPTY}"),
    ("scripts/loss_precision.py", ["--out", "{file}"], "a file is in the way"),
    # the train launchers' environment (NAME=VALUE: set for the launcher)
    ("scripts/train/sd15_diffusion_dpo.sh", ["NUM_GPUS=abc"], "NUM_GPUS must be a positive integer, got 'abc'"),
    ("scripts/train/sd15_diffusion_dpo.sh", ["NUM_GPUS=0"], "NUM_GPUS must be a positive integer, got '0'"),
    ("scripts/train/sd15_diffusion_dpo.sh", ["NUM_GPUS=-1"], "NUM_GPUS must be a positive integer, got '-1'"),
    ("scripts/train/sdxl_dspo.sh", ["NUM_GPUS="], "NUM_GPUS must be a positive integer, got ''"),
    ("scripts/train/sdxl_dmpo.sh", ["MODEL_NAME="], "MODEL_NAME is empty"),
    ("scripts/train/sd15_dspo.sh", ["DATASET_NAME="], "DATASET_NAME is empty"),
    ("scripts/train/sd15_dmpo.sh", ["OUTPUT_DIR="], "OUTPUT_DIR is empty"),
    ("scripts/train/sdxl_diffusion_dpo.sh", ["VAE_NAME="], "VAE_NAME is empty"),
]


@pytest.fixture(scope="module")
def places(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("entry-flags")
    (root / "file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    return {**tiny, "file": str(root / "file"), "missing": str(root / "missing"), "empty": str(root / "empty"),
            "run": str(root / "run")}


def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded (or built) before the wrong value was reported")


@pytest.mark.parametrize("entry,args,fragment", ROWS, ids=[f"{e} {' '.join(a[-3:])}" for e, a, _ in ROWS])
def test_a_wrong_value_ends_in_one_error_line(entry, args, fragment, places, tmp_path, capsys, monkeypatch):
    fill = {**places, "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in args]
    fragment = fragment.format(**fill)
    if entry.endswith(".sh"):
        settings = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
        env.update({"NUM_GPUS": "1", "OUTPUT_DIR": str(tmp_path / "out"), **settings})
        flags = [a for a in args if a.startswith("-") or "=" not in a]
        result = subprocess.run(["bash", os.path.join(ROOT, entry), *flags], capture_output=True, text=True,
                                env=env, cwd=str(tmp_path), timeout=120)
        status, err = result.returncode, result.stderr
    else:
        for module, name in ((models, "load_vae"), (models, "load_unet"), (models, "load_text_side"),
                             (architectures, "build"), (sdpo.tiny, "build_all")):
            monkeypatch.setattr(module, name, refuse)
        with pytest.raises(SystemExit) as exit_info:
            MAINS[entry](args)
        status, err = exit_info.value.code, capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err[-2000:]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert fragment in lines[-1], (fragment, lines[-1])


def test_entry_points_run_as_files_from_anywhere(tmp_path):
    """`python path/to/X.py --help` from another folder without PYTHONPATH, as `python -m sdpo.X`
    works from the root (the eval commands have their own test in test_eval_inputs.py)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for path in ("train.py", "bench.py", "demo.py", "sdpo/cache.py", "sdpo/tiny.py", "scripts/plot_run.py",
                 "scripts/compare_reference.py"):
        result = subprocess.run([sys.executable, os.path.join(ROOT, path), "--help"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0 and "usage:" in result.stdout, (path, result.stderr[-2000:])
    result = subprocess.run([sys.executable, "-m", "sdpo.cache", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0 and "usage: python -m sdpo.cache" in result.stdout, result.stderr[-2000:]
