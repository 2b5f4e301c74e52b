"""Host memory on a CPU: what a step frees stays in the process (sdpo/host_memory.py).

The behaviour is measured in fresh processes (the setting is process-wide): a step's largest
buffer is served from the heap, and the next step's buffer reuses its pages instead of faulting in
new ones (whole training steps: the README's performance section). Page faults count the pages
the kernel maps in, not time, so load does not move them; huge pages are turned off for the probe.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import train
from tests.test_train import dry_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
ALLOCATOR_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                      "THP_MEM_ALLOC_ENABLE")  # the probe measures glibc's and torch's defaults, not a user's

PROBE = r"""
import ctypes, json, resource, sys
import torch
from sdpo import host_memory
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, however the host sets huge pages
applied = host_memory.keep_freed_memory() if sys.argv[1] == "reuse" else None
torch.ones(1024)  # anything torch sets up on its first allocation, before the counts
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))
before = host_memory.heap_info()
x = torch.ones(112 * 2**20 // 4)  # SD1.5's largest weight gradient: 112 MiB
held = host_memory.heap_info()
del x
freed_rss = rss_anon()
start = faults()
y = torch.ones(100 * 2**20 // 4)  # the next step's buffer, written in full
print(json.dumps({"applied": applied, "own_mappings": held["mapped_chunks"] - before["mapped_chunks"],
                  "heap_growth": held["heap"] - before["heap"],
                  "faults": faults() - start, "rss_freed": freed_rss, "rss_after": rss_anon()}))
"""


def probe(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**{k: v for k, v in os.environ.items() if k not in ALLOCATOR_SETTINGS},
                                        "PYTHONPATH": ROOT})
    return json.loads(out.stdout)


def glibc_with_mallinfo2():
    import ctypes

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="glibc's allocator (2.33 or newer, for mallinfo2)")
def test_freed_memory_is_reused_without_page_faults():
    page = os.sysconf("SC_PAGE_SIZE")
    default, reuse = probe("release"), probe("reuse")
    assert reuse["applied"] is True
    # glibc's default: the 112 MiB buffer is a mapping of its own, unmapped when freed, so the next
    # buffer is faulted in page by page.
    assert default["own_mappings"] == 1 and default["faults"] >= 0.9 * 100 * MIB / page
    assert default["rss_after"] - default["rss_freed"] >= 0.9 * 100 * MIB
    # Kept: it comes from the heap, freeing it hands nothing back, and the next buffer reuses it.
    assert reuse["own_mappings"] == 0 and reuse["heap_growth"] >= 112 * MIB
    assert reuse["faults"] < 0.02 * 100 * MIB / page
    assert reuse["rss_after"] - reuse["rss_freed"] < 4 * MIB


@pytest.mark.parametrize("mode", ["reuse", "release"])
def test_train_keeps_freed_memory_on_a_cpu_unless_told(tiny, tmp_path, monkeypatch, mode):
    calls = []
    monkeypatch.setattr(train.host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    dry_run_config(tiny, tmp_path / "out", "--host_memory", mode)
    expected = mode == "reuse" and not torch.cuda.is_available()  # a GPU run leaves host memory alone
    assert len(calls) == int(expected)
    config = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert config["host_memory"] == mode and config["derived"]["host_memory_reused"] is expected
