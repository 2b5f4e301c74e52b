import os
import subprocess
import sys

import pytest
import torch

# Offline, whatever the shell exported: no hub request, and no package download by a launcher's
# set-up step (scripts/test.sh has installed everything before the tests start).
for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "PIP_NO_INDEX"):
    os.environ[name] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _pytest_keeps_glibc_defaults(monkeypatch):
    """train.py and bench.py run in this process keep glibc's default allocator (their
    --host_memory reuse would hold this process at its peak for the rest of the suite);
    tests/test_host_memory.py checks the setting in processes of its own, and launched runs apply it."""
    from sdpo import host_memory

    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny random SD1.5 and SDXL pipelines and a synthetic Pick-a-Pic dataset, built once."""
    from sdpo.tiny import build_all

    return build_all(str(tmp_path_factory.mktemp("tiny")), num_rows=48)


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory):
    """Tiny random Wan2.1 and CogVideoX pipelines and a synthetic video preference set, built once."""
    from sdpo.tiny import build_video

    return build_video(str(tmp_path_factory.mktemp("tiny-video")))


def tiny_train_args(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--dataset_name", data, "--output_dir", out,
            "--resolution", "32", "--train_batch_size", "2", "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
            "--seed", "0", "--report_to", "none", "--mixed_precision", "no", *extra]


def accelerate_launch(args, num_processes=1, timeout=600):
    """Run train.py under the real `accelerate launch` on CPU; returns the completed process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", os.path.join(ROOT, "train.py"), *args]
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def same_tensors(a: dict, b: dict) -> bool:
    """Two state dicts with the same names and bitwise the same tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
