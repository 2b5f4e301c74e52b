"""Generation: batch-size independence, resumability, checkpoint forms; the launchers."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, same_tensors
from eval.generate import main as generate_main
from eval.prompts import record, write_suite
from sdpo.models import load_unet
from sdpo.errors import InputError

PROMPTS = ["a red cat", "a blue house on a hill", "a tiny robot", "an old boat", "x"]


@pytest.fixture()
def suite(tmp_path):
    path = str(tmp_path / "prompts" / "papv2.json")
    write_suite([record(p) for p in PROMPTS], path)
    return path


def gen(tiny, suite, out, *extra):
    return generate_main(["--unet_path", extra[0] if extra else "base", "--pretrain_path", tiny["sd15"],
                          "--test_json", suite, "--output_path", str(out), "--height", "32", "--width", "32",
                          "--steps", "3", *extra[1:]])


def pixels(manifest):
    return [np.asarray(Image.open(r["gen_image_path"])) for r in json.load(open(manifest))]


def test_batch_size_does_not_change_images_and_reruns_skip(tiny, suite, tmp_path, capsys):
    m1 = gen(tiny, suite, tmp_path / "bs1", "base", "--batch_size", "1")
    m3 = gen(tiny, suite, tmp_path / "bs3", "base", "--batch_size", "3")
    assert os.path.basename(m1) == "papv2_seed0_32x32_3s_7.5cfg.json"
    a, b = pixels(m1), pixels(m3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])  # prompts matter
    records = json.load(open(m1))
    assert [r["prompt"] for r in records] == PROMPTS
    assert records[2]["gen_image_path"].endswith(os.path.join("papv2_seed0_32x32_3s_7.5cfg", "2_32x32.png"))
    assert Image.open(records[1]["gen_image_path"]).getexif()[270] == PROMPTS[1]
    # A second run keeps every image; a truncated one is made again.
    before = os.stat(records[0]["gen_image_path"]).st_ino  # an image written again gets a new inode
    with open(records[4]["gen_image_path"], "r+b") as f:
        f.truncate(20)
    capsys.readouterr()
    gen(tiny, suite, tmp_path / "bs1", "base", "--batch_size", "2")
    assert "4 images kept, 1 generated" in capsys.readouterr().out
    assert os.stat(records[0]["gen_image_path"]).st_ino == before
    assert np.array_equal(pixels(m1)[4], a[4])


def test_checkpoint_forms_load_the_same_weights(tiny, tmp_path):
    from safetensors.torch import save_file

    reference = load_unet(os.path.join(tiny["sd15"], "unet"), tiny["sd15"])
    state = {k: v + 0.01 for k, v in reference.state_dict().items()}  # a "trained" UNet
    torch.save(state, tmp_path / "unet.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    save_file(state, str(tmp_path / "unet.safetensors"))
    for path in ("unet.pth", "wrapped.pth", "unet.safetensors"):
        loaded = load_unet(str(tmp_path / path), tiny["sd15"]).state_dict()
        assert same_tensors(loaded, state), path
    with pytest.raises(InputError, match="does not fit the UNet"):
        torch.save({k: v[..., :1] if v.ndim else v for k, v in state.items()}, tmp_path / "bad.pth")
        load_unet(str(tmp_path / "bad.pth"), tiny["sd15"])


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused(tiny, tmp_path):
    evil = _RunsCode()
    _RunsCode.marker = str(tmp_path / "pwned")
    torch.save({"conv_in.weight": evil}, tmp_path / "unet.pth")
    with pytest.raises(InputError, match="refusing to load"):
        load_unet(str(tmp_path / "unet.pth"), tiny["sd15"])
    assert not os.path.exists(tmp_path / "pwned")


def launch(script, *args):
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "eval", script), *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})


def test_eval_launchers_end_to_end(tiny, suite, tmp_path):
    from eval.tiny import as_flags, build_tiny_scorers

    sources = as_flags(build_tiny_scorers(str(tmp_path / "scorers")))
    common = ["--pretrain_path", tiny["sd15"], "--prompts_dir", os.path.dirname(suite), "--suites", "papv2",
              "--height", "32", "--width", "32", "--steps", "2", "--max_prompts", "4", *sources]
    base = launch("test_sd15.sh", "base", "--output_path", str(tmp_path / "base"), *common)
    assert base.returncode == 0, base.stderr[-3000:]
    assert "| papv2_seed0_32x32_2s_7.5cfg |" in base.stdout
    manifest_b = str(tmp_path / "base" / "papv2_seed0_32x32_2s_7.5cfg.json")
    for metric in ("pickscore", "hpsv2", "aesthetics", "clip", "imagereward"):
        scored = json.load(open(manifest_b.replace(".json", f"_{metric}.json")))
        assert scored["metric"] == metric and len(scored["images"]) == 4
        assert len(scored["records"]) == 4 and all(isinstance(r["score"], float) for r in scored["records"])
    torch.manual_seed(0)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in load_unet("base", tiny["sd15"]).state_dict().items()}
    torch.save(state, tmp_path / "unet.pth")
    other = launch("test_sd15.sh", str(tmp_path / "unet.pth"), "--output_path", str(tmp_path / "other"), *common)
    assert other.returncode == 0, other.stderr[-3000:]
    vs = launch("test_vs.sh", "--json_a", str(tmp_path / "other" / "papv2_seed0_32x32_2s_7.5cfg.json"),
                "--json_b", manifest_b, "--label_a", "tuned", "--label_b", "base", "--outdir", str(tmp_path / "vs"),
                *sources)
    assert vs.returncode == 0, vs.stderr[-3000:]
    summary = json.load(open(tmp_path / "vs" / "summary.json"))
    assert [m["metric"] for m in summary["metrics"]] == ["pickscore", "hpsv2", "aesthetics", "clip", "imagereward"]
    assert all(m["total_pairs"] == 4 for m in summary["metrics"])
    assert "macro mean win rate" in vs.stdout and os.path.isfile(tmp_path / "vs" / "index.html")


def test_sdxl_eval_launcher(tiny, suite, tmp_path):
    from eval.tiny import as_flags, build_tiny_scorers

    sources = as_flags(build_tiny_scorers(str(tmp_path / "scorers")))
    result = launch("test_sdxl.sh", "base", "--pretrain_path", tiny["sdxl"], "--vae_path",
                    os.path.join(tiny["sdxl"], "vae"), "--prompts_dir", os.path.dirname(suite), "--suites", "papv2",
                    "--height", "32", "--width", "32", "--steps", "2", "--max_prompts", "2", "--metrics", "clip",
                    "--output_path", str(tmp_path / "xl"), *sources)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| papv2_seed0_32x32_2s_7.5cfg |" in result.stdout
    assert len(json.load(open(tmp_path / "xl" / "papv2_seed0_32x32_2s_7.5cfg_clip.json"))["records"]) == 2
