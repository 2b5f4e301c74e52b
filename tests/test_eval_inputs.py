"""Bad input to the evaluation commands ends in one line that names the flag and the problem, with
exit status 2 and no traceback: in-process for every entry point (eval.generate, eval.score,
eval.versus, eval.evaluate, eval.prompts), and through each shell launcher, where the user's last
line must be our message."""

import glob
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT
from eval import evaluate, generate, prompts, score, versus
from eval.prompts import record, write_suite
from eval.scorers import METRICS

PROMPTS = ["a red cat", "a blue house on a hill", "a tiny robot"]


def run(main, argv, capsys):
    """(exit status, stdout, stderr) of an entry point called in-process."""
    try:
        main([str(a) for a in argv])
        status = 0
    except SystemExit as stop:
        status = stop.code
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A suite, bad JSON files of each kind, a complete manifest with its images, a file, a folder."""
    d = tmp_path_factory.mktemp("inputs")
    write_suite([record(p) for p in PROMPTS], str(d / "prompts" / "papv2.json"))
    (d / "truncated.json").write_text('[{"prompt": "a red cat"}, {"prom')
    (d / "garbage.json").write_bytes(b"\xff\xfe\x00garbage")
    (d / "empty.json").write_text("[]")
    (d / "object.json").write_text('{"prompt": "a red cat"}')
    (d / "no_prompt.json").write_text('[{"text": "a red cat"}]')
    (d / "a_file").write_text("not a folder")
    images = d / "run_seed0_8x8_1s_7.5cfg"
    images.mkdir()
    manifest = []
    for i, p in enumerate(PROMPTS):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(images / f"{i}_8x8.png")
        manifest.append({"prompt": p, "gen_image_path": str(images / f"{i}_8x8.png"), "raw_image_path": "",
                         "metadata": {}})
    json.dump(manifest, open(d / "run.json", "w"))
    json.dump(manifest[:2] + [{**manifest[2], "gen_image_path": str(images / "missing.png")}],
              open(d / "missing_image.json", "w"))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    json.dump([{**manifest[0], "gen_image_path": str(d / "broken.png")}], open(d / "broken_image.json", "w"))
    (d / "pairs").mkdir()  # the reference's pair files: one without labels, one truncated
    json.dump({"results": [{"prompt": "a red cat", "image_a": "a.png", "image_b": "b.png", "score_a": 1.0,
                            "score_b": 0.5, "winner": "A"}]}, open(d / "pairs" / "pair_clip.json", "w"))
    (d / "pairs" / "pair_hpsv2.json").write_text('{"model_a": "A", "model_b": "B", "results": [{"pro')
    return {k: str(v) for k, v in {
        "dir": d, "suite": d / "prompts" / "papv2.json", "prompts_dir": d / "prompts", "manifest": d / "run.json",
        "file": d / "a_file"}.items()}


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory):
    """Unusable UNet checkpoints: garbage .safetensors, a truncated .pth, an SDXL UNet as .pth."""
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("ckpts")
    (d / "garbage.safetensors").write_bytes(os.urandom(64))
    sd15 = load_file(os.path.join(tiny["sd15"], "unet", "diffusion_pytorch_model.safetensors"))
    torch.save(sd15, d / "full.pth")
    (d / "truncated.pth").write_bytes((d / "full.pth").read_bytes()[:4000])
    torch.save(load_file(os.path.join(tiny["sdxl"], "unet", "diffusion_pytorch_model.safetensors")), d / "sdxl.pth")
    (d / "empty_dir").mkdir()
    return {k: str(d / k) for k in ("garbage.safetensors", "truncated.pth", "sdxl.pth", "empty_dir")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from eval.tiny import build_tiny_scorers

    return build_tiny_scorers(str(tmp_path_factory.mktemp("scorers")))


def unwritable(tmp_path, monkeypatch):
    """A read-only folder; as root (who may write anywhere) the write is refused by a stand-in for
    the file system's EACCES."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)
    if os.access(folder, os.W_OK):
        import builtins
        import errno

        real_open = builtins.open

        def refusing_open(path, *args, **kwargs):
            if str(path).startswith(str(folder)) and args and "w" in args[0]:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    return str(folder)


# ---- the table: every flag of every entry point and launcher, and what a wrong value does ----------

def gen(c, *extra):
    """eval.generate's arguments on the tiny SD1.5 pipeline, then `extra` (a later flag wins)."""
    return ["--unet_path", "base", "--pretrain_path", c["tiny"]["sd15"], "--test_json", c["files"]["suite"],
            "--output_path", c["out"], "--height", "32", "--width", "32", "--steps", "2", *extra]


def ev(c, *extra):
    """eval.evaluate's arguments on the tiny pipeline and the fixture's suite folder, then `extra`."""
    return ["--unet_path", "base", "--pretrain_path", c["tiny"]["sd15"], "--prompts_dir", c["files"]["prompts_dir"],
            "--suites", "papv2", "--output_path", c["out"], "--height", "32", "--width", "32", "--steps", "2", *extra]


def vs(c, *extra):
    """eval.versus on two manifests, then `extra`."""
    return ["--json_a", c["files"]["manifest"], "--json_b", os.path.join(c["d"], "missing_image.json"), *extra]


def sc(c, *extra):
    """eval.score on the fixture's manifest, then `extra`."""
    return [c["files"]["manifest"], *extra]


def src(c, metric, **override):
    """The tiny scorer's sources of `metric` as --source flags, with `override`, and --metrics metric."""
    fields = {**c["sources"][metric], **override}
    return ["--metrics", metric, *[x for k, v in fields.items() for x in ("--source", f"{metric}.{k}={v}")]]


def pr(c, suite, *extra):
    """eval.prompts building `suite` into a scratch file, then `extra`."""
    return ["--suite", suite, "--output", os.path.join(c["tmp"], "suite.json"), *extra]


def j(c, name):
    return os.path.join(c["d"], name)


# (entry point or launcher, its arguments from the context c, the flag the error must name, the problem)
CASES = [
    # eval.generate: values out of range, of the wrong type, empty or missing
    ("generate", lambda c: gen(c, "--steps", "0"), "--steps", "at least 1"),
    ("generate", lambda c: gen(c, "--steps", "-2"), "--steps", "at least 1"),
    ("generate", lambda c: gen(c, "--steps", "1001"), "--steps", "at most 1000"),
    ("generate", lambda c: gen(c, "--steps", "x"), "--steps", "invalid int"),
    ("generate", lambda c: gen(c, "--steps"), "--steps", "expected one argument"),
    ("generate", lambda c: gen(c, "--batch_size", "0"), "--batch_size", "at least 1"),
    ("generate", lambda c: gen(c, "--max_prompts", "0"), "--max_prompts", "at least 1"),
    ("generate", lambda c: gen(c, "--max_prompts", "-1"), "--max_prompts", "at least 1"),
    ("generate", lambda c: gen(c, "--height", "30"), "--height", "multiple of 8"),
    ("generate", lambda c: gen(c, "--height", "0"), "--height", "multiple of 8"),
    ("generate", lambda c: gen(c, "--height", "8200"), "--height", "at most 8192"),
    ("generate", lambda c: gen(c, "--width", "-8"), "--width", "multiple of 8"),
    ("generate", lambda c: gen(c, "--width", "36"), "--width", "multiple of 8"),
    ("generate", lambda c: gen(c, "--width", "80000"), "--width", "at most 8192"),
    ("generate", lambda c: gen(c, "--cfg", "-1"), "--cfg", "finite number >= 0"),
    ("generate", lambda c: gen(c, "--cfg", "nan"), "--cfg", "finite number >= 0"),
    ("generate", lambda c: gen(c, "--cfg", "inf"), "--cfg", "finite number >= 0"),
    ("generate", lambda c: gen(c, "--cfg", ""), "--cfg", "invalid float"),
    ("generate", lambda c: gen(c, "--seed", "-1"), "--seed", "must lie in"),
    ("generate", lambda c: gen(c, "--seed", str(2**64)), "--seed", "must lie in"),
    ("generate", lambda c: gen(c, "--device", "gpu0"), "--device", "not a device"),
    ("generate", lambda c: gen(c, "--device", "cuda:99"), "--device", "CUDA"),
    ("generate", lambda c: gen(c, "--device", "meta"), "--device", "not a device"),
    ("generate", lambda c: gen(c, "--device", ""), "--device", "empty"),
    ("generate", lambda c: gen(c, "--dtype", "fp64"), "--dtype", "invalid choice"),
    ("generate", lambda c: gen(c, "--dtype", ""), "--dtype", "invalid choice"),
    ("generate", lambda c: gen(c, "--bogus", "1"), "--bogus", "unrecognized"),
    ("generate", lambda c: gen(c)[2:], "--unet_path", "required"),
    ("generate", lambda c: gen(c, "--unet_path"), "--unet_path", "expected one argument"),
    # eval.generate: prompt files
    ("generate", lambda c: gen(c, "--test_json", j(c, "nope.json")), "--test_json", "no such file"),
    ("generate", lambda c: gen(c, "--test_json", j(c, "truncated.json")), "--test_json", "not valid JSON"),
    ("generate", lambda c: gen(c, "--test_json", j(c, "garbage.json")), "--test_json", "UTF-8"),
    ("generate", lambda c: gen(c, "--test_json", j(c, "empty.json")), "--test_json", "empty"),
    ("generate", lambda c: gen(c, "--test_json", j(c, "object.json")), "--test_json", "JSON list"),
    ("generate", lambda c: gen(c, "--test_json", j(c, "no_prompt.json")), "--test_json", "record 0"),
    ("generate", lambda c: gen(c, "--test_json", c["d"]), "--test_json", "a folder"),
    ("generate", lambda c: gen(c, "--test_json", ""), "--test_json", "empty"),
    # eval.generate: output paths
    ("generate", lambda c: gen(c, "--output_path", c["files"]["file"]), "--output_path", "a file is in the way"),
    ("generate", lambda c: gen(c, "--output_path", os.path.join(c["files"]["file"], "sub")), "--output_path",
     "under a file"),
    ("generate", lambda c: gen(c, "--output_path", c["read_only"]), "--output_path", "cannot write"),
    ("generate", lambda c: gen(c, "--output_path", ""), "--output_path", "empty"),
    # eval.generate: models
    ("generate", lambda c: gen(c, "--pretrain_path", os.path.join(c["tmp"], "no-such-model")), "--pretrain_path",
     "no such folder"),
    ("generate", lambda c: gen(c, "--pretrain_path", "nobody/no-such-model"), "--pretrain_path", "cannot read"),
    ("generate", lambda c: gen(c, "--pretrain_path", c["files"]["file"]), "--pretrain_path", "a file"),
    ("generate", lambda c: gen(c, "--pretrain_path", os.path.join(c["tiny"]["sd15"], "unet")), "--pretrain_path",
     "cannot read"),  # a part of a pipeline, not a pipeline
    ("generate", lambda c: gen(c, "--pretrain_path", ""), "--pretrain_path", "empty"),
    ("generate", lambda c: gen(c, "--unet_path", os.path.join(c["tmp"], "unet.pth")), "--unet_path", "not found"),
    ("generate", lambda c: gen(c, "--unet_path", c["ckpt"]["garbage.safetensors"]), "--unet_path", ".safetensors"),
    ("generate", lambda c: gen(c, "--unet_path", c["ckpt"]["truncated.pth"]), "--unet_path", "truncated"),
    ("generate", lambda c: gen(c, "--unet_path", c["files"]["file"]), "--unet_path", "refusing to load it"),
    ("generate", lambda c: gen(c, "--unet_path", c["ckpt"]["sdxl.pth"]), "--unet_path", "does not fit"),
    ("generate", lambda c: gen(c, "--unet_path", os.path.join(c["tiny"]["sdxl"], "unet")), "--unet_path",
     "does not fit"),
    ("generate", lambda c: gen(c, "--unet_path", c["tiny"]["sdxl"]), "--unet_path", "does not fit"),
    ("generate", lambda c: gen(c, "--unet_path", c["ckpt"]["empty_dir"]), "--unet_path", "no diffusers UNet"),
    ("generate", lambda c: gen(c, "--unet_path", ""), "--unet_path", "empty"),
    ("generate", lambda c: gen(c, "--sdxl"), "--sdxl", "SD1.x pipeline"),
    ("generate", lambda c: gen(c, "--pretrain_path", c["tiny"]["sdxl"]), "--sdxl", "SDXL pipeline"),
    ("generate", lambda c: gen(c, "--vae_path", os.path.join(c["tmp"], "no-vae")), "--vae_path", "no such folder"),
    ("generate", lambda c: gen(c, "--vae_path", c["files"]["file"]), "--vae_path", "a VAE folder is needed"),
    ("generate", lambda c: gen(c, "--vae_path", c["tiny"]["sdxl"]), "--vae_path", "VAE config"),  # a pipeline
    ("generate", lambda c: gen(c, "--vae_path", ""), "--vae_path", "empty"),
    # eval.score: manifests and flags
    ("score", lambda c: [j(c, "nope.json")], "manifest", "no such file"),
    ("score", lambda c: [j(c, "truncated.json")], "manifest", "not valid JSON"),
    ("score", lambda c: [j(c, "empty.json")], "manifest", "empty manifest"),
    ("score", lambda c: [j(c, "object.json")], "manifest", "JSON list"),
    ("score", lambda c: [j(c, "no_prompt.json")], "manifest", "record 0"),
    ("score", lambda c: [c["d"]], "manifest", "a folder"),
    ("score", lambda c: [""], "manifests", "empty"),
    ("score", lambda c: [], "manifests", "required"),
    ("score", lambda c: [j(c, "missing_image.json"), *src(c, "clip")], "manifest", "record 2"),
    ("score", lambda c: [j(c, "broken_image.json"), *src(c, "clip")], "unreadable image", "broken.png"),
    ("score", lambda c: sc(c, "--metrics", "clip", "clip"), "--metrics", "twice"),
    ("score", lambda c: sc(c, "--metrics", "fid"), "--metrics", "invalid choice"),
    ("score", lambda c: sc(c, "--metrics"), "--metrics", "expected at least one"),
    ("score", lambda c: sc(c, "--batch_size", "0"), "--batch_size", "at least 1"),
    ("score", lambda c: sc(c, "--batch_size", ""), "--batch_size", "invalid int"),
    ("score", lambda c: sc(c, "--device", "gpu0"), "--device", "not a device"),
    ("score", lambda c: sc(c, "--device", ""), "--device", "empty"),
    ("score", lambda c: sc(c, "--table", c["d"]), "--table", "a folder"),
    ("score", lambda c: sc(c, "--table", os.path.join(c["files"]["file"], "t.md")), "--table",
     "a file is in the way"),
    ("score", lambda c: sc(c, "--table", ""), "--table", "empty"),
    # eval.score and eval.versus: the reference's pair files (--scores_from)
    ("score", lambda c: sc(c, "--scores_from", ""), "--scores_from", "empty"),
    ("score", lambda c: sc(c, "--scores_from", j(c, "pair_clip.json")), "--scores_from", "no such file"),
    ("score", lambda c: sc(c, "--scores_from", c["files"]["prompts_dir"]), "--scores_from",
     "no pair_<metric>.json file under"),
    ("score", lambda c: sc(c, "--scores_from", c["files"]["manifest"]), "--scores_from", "the name must be"),
    ("score", lambda c: sc(c, "--scores_from", j(c, "pairs")), "--scores_from", "no 'model_a' label"),
    ("versus", lambda c: vs(c, "--scores_from", j(c, "pairs/pair_hpsv2.json")), "--scores_from", "not valid JSON"),
    ("versus", lambda c: vs(c, "--scores_from"), "--scores_from", "expected one argument"),
    # eval.score: model sources, checked before loading
    ("score", lambda c: sc(c, "--source", "clip"), "--source", "METRIC.FIELD=VALUE"),
    ("score", lambda c: sc(c, "--source", "fid.model=x"), "--source", "METRIC.FIELD=VALUE"),
    ("score", lambda c: sc(c, "--source", ""), "--source", "empty"),
    ("score", lambda c: sc(c, "--source", "clip.modle=x"), "--source clip.modle", "its sources are"),
    ("score", lambda c: sc(c, "--source", "hpsv2.pretrained=x"), "--source hpsv2.pretrained", "no source"),
    ("score", lambda c: sc(c, "--source", "clip.pretrained="), "--source clip.pretrained", "empty"),
    ("score", lambda c: sc(c, "--source", "hpsv2.preprocess=torch"), "--source hpsv2.preprocess", "open_clip, package"),
    ("score", lambda c: sc(c, "--source", "imagereward.vision_heads=0"), "--source imagereward.vision_heads",
     "positive integer"),
    ("score", lambda c: sc(c, "--source", f"pickscore.model={c['tmp']}/nope"), "--source pickscore.model", "not found"),
    ("score", lambda c: sc(c, "--source", f"aesthetics.mlp={c['d']}"), "--source aesthetics.mlp", "a folder"),
    ("score", lambda c: sc(c, "--source", f"pickscore.model={c['files']['file']}"), "--source pickscore.model",
     "a file"),
    ("score", lambda c: sc(c, "--source", "clip.pretrained=a", "--source", "clip.pretrained=b"),
     "--source clip.pretrained", "twice"),
    # eval.score: sources that pass the syntax check and fail when loaded: still one line, naming the source
    ("score", lambda c: sc(c, *src(c, "clip", pretrained="no-such-tag")), "--source clip.pretrained=no-such-tag",
     "neither a file nor a pretrained tag"),
    ("score", lambda c: sc(c, *src(c, "clip", arch="ViT-Nope")), "--source clip.arch=ViT-Nope", "no architecture"),
    ("score", lambda c: sc(c, *src(c, "clip", pretrained=c["garbage"])), "--source clip.pretrained", "cannot load"),
    ("score", lambda c: sc(c, "--metrics", "hpsv2", "--source", "hpsv2.checkpoint=nobody/nothing"),
     "--source hpsv2.checkpoint", "could not fetch"),
    ("score", lambda c: sc(c, *src(c, "pickscore", model="nobody/nothing")), "--source pickscore.model=nobody/nothing",
     "cannot load"),
    ("score", lambda c: sc(c, *src(c, "aesthetics", mlp=c["sources"]["hpsv2"]["checkpoint"])),
     "--source aesthetics.mlp", "cannot load"),
    ("score", lambda c: sc(c, *src(c, "imagereward", checkpoint=c["garbage"])), "--source imagereward.checkpoint",
     "cannot load"),
    # eval.score: the default (hub) models, offline: one line that says to give a local path
    *[("score", lambda c, m=m: sc(c, "--metrics", m), f"--source {m}.",
       f"without network, pass a local path with --source {m}.") for m in METRICS],
    # eval.versus
    ("versus", lambda c: vs(c, "--json_a", j(c, "nope.json")), "--json_a", "no such file"),
    ("versus", lambda c: vs(c, "--json_b", j(c, "empty.json")), "--json_b", "empty manifest"),
    ("versus", lambda c: vs(c, "--json_b", j(c, "truncated.json")), "--json_b", "not valid JSON"),
    ("versus", lambda c: vs(c, "--json_a", c["d"]), "--json_a", "a folder"),
    ("versus", lambda c: vs(c, "--json_a", ""), "--json_a", "empty"),
    ("versus", lambda c: vs(c, "--json_b", c["files"]["manifest"]), "--json_a and --json_b", "same manifest"),
    ("versus", lambda c: ["--json_a", c["files"]["manifest"]], "--json_b", "required"),
    ("versus", lambda c: [], "--json_a", "required"),
    ("versus", lambda c: vs(c, "--json_a"), "--json_a", "expected one argument"),
    ("versus", lambda c: vs(c, "--outdir", c["files"]["file"]), "--outdir", "a file is in the way"),
    ("versus", lambda c: vs(c, "--outdir", os.path.join(c["files"]["file"], "x")), "--outdir", "under a file"),
    ("versus", lambda c: vs(c, "--outdir", ""), "--outdir", "empty"),
    ("versus", lambda c: vs(c, "--label_a", " "), "--label_a", "empty"),
    ("versus", lambda c: vs(c, "--label_b", ""), "--label_b", "empty"),
    ("versus", lambda c: vs(c, "--batch_size", "0"), "--batch_size", "at least 1"),
    ("versus", lambda c: vs(c, "--metrics", "clip", "clip"), "--metrics", "twice"),
    ("versus", lambda c: vs(c, "--metrics", "fid"), "--metrics", "invalid choice"),
    ("versus", lambda c: vs(c, "--source", "clip.nope=1"), "--source", "no source"),
    ("versus", lambda c: vs(c, "--device", "cuda:99"), "--device", "CUDA"),
    ("versus", lambda c: vs(c, "--device", ""), "--device", "empty"),
    # eval.evaluate: its own flags, and the generation and scoring flags it shares
    ("evaluate", lambda c: ev(c, "--suites", "papv2", "papv2"), "--suites", "twice"),
    ("evaluate", lambda c: ev(c, "--suites", "nope"), "--suites", "invalid choice"),
    ("evaluate", lambda c: ev(c, "--suites"), "--suites", "expected at least one"),
    ("evaluate", lambda c: ev(c, "--suites", "hpsv2"), "--prompts_dir", "hpsv2.json"),
    ("evaluate", lambda c: ev(c, "--prompts_dir", os.path.join(c["tmp"], "nope")), "--prompts_dir", "no such folder"),
    ("evaluate", lambda c: ev(c, "--prompts_dir", c["files"]["file"]), "--prompts_dir", "a file, not a folder"),
    ("evaluate", lambda c: ev(c, "--prompts_dir", ""), "--prompts_dir", "empty"),
    ("evaluate", lambda c: ev(c, "--score_batch_size", "0"), "--score_batch_size", "at least 1"),
    ("evaluate", lambda c: ev(c, "--score_batch_size", "x"), "--score_batch_size", "invalid int"),
    ("evaluate", lambda c: ev(c, "--batch_size", "0"), "--batch_size", "at least 1"),
    ("evaluate", lambda c: ev(c, "--height", "12"), "--height", "multiple of 8"),
    ("evaluate", lambda c: ev(c, "--steps", "5000"), "--steps", "at most 1000"),
    ("evaluate", lambda c: ev(c, "--metrics", "clip", "clip"), "--metrics", "twice"),
    ("evaluate", lambda c: ev(c, "--source", "clip.nope=1"), "--source", "no source"),
    ("evaluate", lambda c: ev(c, "--output_path", c["files"]["file"]), "--output_path", "a file is in the way"),
    ("evaluate", lambda c: ev(c, "--output_path", ""), "--output_path", "empty"),
    ("evaluate", lambda c: ev(c, "--unet_path", os.path.join(c["tmp"], "nope.pth")), "--unet_path", "not found"),
    ("evaluate", lambda c: ev(c, "--unet_path", ""), "--unet_path", "empty"),
    ("evaluate", lambda c: ev(c)[2:], "--unet_path", "required"),
    ("evaluate", lambda c: ev(c, "--vae_path", c["tiny"]["sd15"]), "--vae_path", "VAE config"),
    ("evaluate", lambda c: ev(c, "--device", "gpu0"), "--device", "not a device"),
    ("evaluate", lambda c: ev(c, "--bogus"), "--bogus", "unrecognized"),
    # eval.prompts
    ("prompts", lambda c: pr(c, "partiprompts", "--source", j(c, "nope.tsv")), "--source", "neither"),
    ("prompts", lambda c: pr(c, "partiprompts", "--source", j(c, "garbage.json")), "--source", "UTF-8"),
    ("prompts", lambda c: pr(c, "partiprompts", "--source", c["header_only"]), "--source", "no prompts"),
    ("prompts", lambda c: pr(c, "partiprompts", "--source", c["d"]), "--source", "a folder"),
    ("prompts", lambda c: pr(c, "partiprompts", "--source", ""), "--source", "empty"),
    ("prompts", lambda c: pr(c, "hpsv2", "--source", c["hpdv2"]), "--source", "not valid JSON"),
    ("prompts", lambda c: pr(c, "hpsv2", "--source", c["files"]["file"]), "--source", "a file; a folder"),
    ("prompts", lambda c: pr(c, "papv2", "--source", c["hpdv2"]), "--source", "no parquet files"),
    ("prompts", lambda c: pr(c, "papv2", "--source", c["files"]["file"]), "--source", "not a readable parquet"),
    ("prompts", lambda c: pr(c, "partiprompts", "--source", c["header_only"], "--output", c["d"]), "--output",
     "a folder"),
    ("prompts", lambda c: pr(c, "partiprompts", "--source", c["header_only"], "--output",
                             os.path.join(c["files"]["file"], "x.json")), "--output", "a file is in the way"),
    ("prompts", lambda c: pr(c, "partiprompts", "--output", ""), "--output", "empty"),
    ("prompts", lambda c: ["--suite", "nope"], "--suite", "invalid choice"),
    ("prompts", lambda c: ["--suite", ""], "--suite", "invalid choice"),
    ("prompts", lambda c: [], "--suite", "required"),
    # the launchers: the user's last line is our message
    ("test_sd15.sh", lambda c: [], "CKPT", "missing"),
    ("test_sd15.sh", lambda c: ["--steps", "0"], "CKPT", "missing"),
    ("test_sd15.sh", lambda c: ["base", "--steps", "0"], "--steps", "must be at least 1, got 0"),
    ("test_sdxl.sh", lambda c: [""], "CKPT", "missing"),
    ("test_sdxl.sh", lambda c: ["base", "--height", "1020"], "--height", "must be a positive multiple of 8"),
    ("test_vs.sh", lambda c: [], "--json_a", "required"),
    ("test_vs.sh", lambda c: ["--json_a", "/no/such/a.json", "--json_b", "/no/such/b.json"], "--json_a /no/such/a.json",
     "no such file"),
]
MAINS = {"generate": generate.main, "score": score.main, "versus": versus.main, "evaluate": evaluate.main,
         "prompts": prompts.main}


@pytest.fixture()
def context(tiny, files, checkpoints, sources, tmp_path, monkeypatch):
    """Every path the cases name. No case may get as far as loading a pipeline: the generator is
    replaced by one that fails the test."""
    monkeypatch.chdir(tmp_path)  # a default output folder (versus/...) lands here
    monkeypatch.setattr(generate, "Generator", lambda *a: pytest.fail("a pipeline was loaded"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(100))
    header_only = tmp_path / "header_only.tsv"
    header_only.write_text("Prompt\tCategory\tChallenge\tNote\n")
    hpdv2 = tmp_path / "hpdv2"
    hpdv2.mkdir()
    (hpdv2 / "anime.json").write_text('["a fox", ')
    read_only = unwritable(tmp_path, monkeypatch)
    yield {"tiny": tiny, "files": files, "d": files["dir"], "ckpt": checkpoints, "sources": sources,
           "tmp": str(tmp_path), "out": str(tmp_path / "out"), "garbage": str(garbage),
           "header_only": str(header_only), "hpdv2": str(hpdv2), "read_only": read_only}
    os.chmod(read_only, stat.S_IRWXU)  # so that pytest can remove it


def launch(script, *args):
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "eval", script), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("entry, argv, flag, problem",
                         [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(CASES)])
def test_bad_input_ends_in_one_error_line_with_status_2(entry, argv, flag, problem, context, capsys):
    """Exit status 2, one `error:` line (the last one) naming the flag and the problem, no traceback,
    and nothing generated."""
    if entry.endswith(".sh"):
        result = launch(entry, *argv(context))
        status, err = result.returncode, result.stderr
    else:
        status, _, err = run(MAINS[entry], argv(context), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert status == 2, err[-2000:]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    assert "Traceback" not in err
    assert flag in errors[0] and problem in errors[0], errors[0]
    assert not glob.glob(os.path.join(context["tmp"], "**", "*.png"), recursive=True)


def test_every_entry_point_runs_as_a_file_from_anywhere(tmp_path):
    """`python eval/X.py` (not -m) from another folder, without PYTHONPATH: the file puts the
    repository on sys.path itself. Also `python -m eval.generate` from the root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name in ("generate", "score", "versus", "evaluate", "prompts"):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "eval", f"{name}.py"), "--help"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0 and "usage:" in result.stdout, (name, result.stderr[-2000:])
    result = subprocess.run([sys.executable, "-m", "eval.generate", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "guidance_scale is cfg + 1 (7.5 here is 8.5 there)" in " ".join(result.stdout.split())
    result = subprocess.run([sys.executable, "eval/generate.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
