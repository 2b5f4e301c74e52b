"""Bad input to the evaluation commands ends in one line that names the flag and the problem, with
exit status 2 and no traceback: in-process for every entry point (eval.generate, eval.score,
eval.versus, eval.evaluate, eval.prompts), and through each shell launcher, where the user's last
line must be our message."""

import json
import os
import stat
import subprocess

import pytest
import torch
from PIL import Image

from conftest import ROOT
from eval import evaluate, generate, prompts, score, versus
from eval.prompts import record, write_suite

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


def assert_refused(main, argv, capsys, *words):
    """Exit status 2, one `error:` line (the last one) holding each of `words`, no traceback."""
    status, _, err = run(main, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert status == 2, (argv, err[-2000:])
    assert len(errors) == 1 and lines[-1] == errors[0], (argv, err[-2000:])
    assert "Traceback" not in err
    for word in words:
        assert word in errors[0], (argv, errors[0])
    return errors[0]


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


def gen_argv(tiny, files, out, *extra):
    return ["--unet_path", "base", "--pretrain_path", tiny["sd15"], "--test_json", files["suite"],
            "--output_path", out, "--height", "32", "--width", "32", "--steps", "2", *extra]


# ---- eval.generate -------------------------------------------------------------------------------

GENERATE_VALUES = [  # (flags, the flag, the problem)
    (["--steps", "0"], "--steps", "at least 1"), (["--steps", "-2"], "--steps", "at least 1"),
    (["--steps", "x"], "--steps", "invalid int"), (["--batch_size", "0"], "--batch_size", "at least 1"),
    (["--max_prompts", "0"], "--max_prompts", "at least 1"),
    (["--height", "30"], "--height", "multiple of 8"), (["--height", "0"], "--height", "multiple of 8"),
    (["--width", "-8"], "--width", "multiple of 8"), (["--width", "36"], "--width", "multiple of 8"),
    (["--cfg", "-1"], "--cfg", "finite number >= 0"), (["--cfg", "nan"], "--cfg", "finite number >= 0"),
    (["--cfg", "inf"], "--cfg", "finite number >= 0"), (["--seed", "-1"], "--seed", "must lie in"),
    (["--device", "gpu0"], "--device", "not a device"), (["--device", "cuda:99"], "--device", "CUDA"),
    (["--device", "meta"], "--device", "not a device"), (["--dtype", "fp64"], "--dtype", "invalid choice"),
    (["--bogus", "1"], "--bogus", "unrecognized"),
]


def test_generate_refuses_bad_values(tiny, files, tmp_path, capsys):
    out = str(tmp_path / "out")
    for extra, flag, problem in GENERATE_VALUES:
        assert_refused(generate.main, gen_argv(tiny, files, out, *extra), capsys, flag, problem)
    assert not os.path.exists(out)  # refused before anything was made


def test_generate_refuses_bad_prompt_files(tiny, files, tmp_path, capsys):
    d = files["dir"]
    cases = [("nope.json", "no such file"), ("truncated.json", "not valid JSON"), ("garbage.json", "UTF-8"),
             ("empty.json", "empty"), ("object.json", "JSON list"), ("no_prompt.json", "record 0"),
             ("", "a folder")]
    for name, problem in cases:
        argv = gen_argv(tiny, files, str(tmp_path / "out"), "--test_json", os.path.join(d, name))
        assert_refused(generate.main, argv, capsys, "--test_json", problem)


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


def test_generate_refuses_unusable_output_paths(tiny, files, tmp_path, capsys, monkeypatch):
    file = files["file"]
    cases = [(file, "a file is in the way"), (os.path.join(file, "sub"), "under a file")]
    for path, problem in cases:
        assert_refused(generate.main, gen_argv(tiny, files, path), capsys, "--output_path", problem)
    read_only = unwritable(tmp_path, monkeypatch)
    assert_refused(generate.main, gen_argv(tiny, files, read_only), capsys, "--output_path", "cannot write")
    os.chmod(read_only, stat.S_IRWXU)


def test_generate_refuses_unusable_models(tiny, files, checkpoints, tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = [
        (["--pretrain_path", str(tmp_path / "no-such-model")], "--pretrain_path", "no such folder"),
        (["--pretrain_path", "nobody/no-such-model"], "--pretrain_path", "cannot load"),  # offline hub id
        (["--pretrain_path", files["file"]], "--pretrain_path", "a file"),
        (["--unet_path", str(tmp_path / "unet.pth")], "--unet_path", "not found"),
        (["--unet_path", checkpoints["garbage.safetensors"]], "--unet_path", ".safetensors"),
        (["--unet_path", checkpoints["truncated.pth"]], "--unet_path", "truncated"),
        (["--unet_path", checkpoints["sdxl.pth"]], "--unet_path", "does not fit"),
        (["--unet_path", os.path.join(tiny["sdxl"], "unet")], "--unet_path", "does not fit"),
        (["--unet_path", tiny["sdxl"]], "--unet_path", "does not fit"),
        (["--unet_path", checkpoints["empty_dir"]], "--unet_path", "no diffusers UNet"),
        (["--sdxl"], "--sdxl", "SD1.x pipeline"),
        (["--pretrain_path", tiny["sdxl"]], "--sdxl", "SDXL pipeline"),
        (["--vae_path", str(tmp_path / "no-vae")], "--vae_path", "no such folder"),
        (["--vae_path", tiny["sdxl"]], "--vae_path", "cannot load"),  # a pipeline, not a VAE folder
    ]
    for extra, flag, problem in cases:
        assert_refused(generate.main, gen_argv(tiny, files, out, *extra), capsys, flag, problem)


# ---- eval.score ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from eval.tiny import build_tiny_scorers

    return build_tiny_scorers(str(tmp_path_factory.mktemp("scorers")))


def clip_flags(sources, **override):
    return [x for k, v in {**sources["clip"], **override}.items() for x in ("--source", f"clip.{k}={v}")]


def test_score_refuses_bad_input(files, sources, capsys):
    d, manifest = files["dir"], files["manifest"]
    clip = ["--metrics", "clip", *clip_flags(sources)]
    cases = [
        ([os.path.join(d, "nope.json")], "manifest", "no such file"),
        ([os.path.join(d, "truncated.json")], "manifest", "not valid JSON"),
        ([os.path.join(d, "empty.json")], "manifest", "empty manifest"),
        ([os.path.join(d, "object.json")], "manifest", "JSON list"),
        ([os.path.join(d, "no_prompt.json")], "manifest", "record 0"),
        ([os.path.join(d, "missing_image.json"), *clip], "manifest", "record 2"),
        ([os.path.join(d, "broken_image.json"), *clip], "unreadable image", "broken.png"),
        ([manifest, "--metrics", "clip", "clip"], "--metrics", "twice"),
        ([manifest, "--metrics", "fid"], "--metrics", "invalid choice"),
        ([manifest, "--batch_size", "0"], "--batch_size", "at least 1"),
        ([manifest, "--device", "gpu0"], "--device", "not a device"),
        ([manifest, "--table", d], "--table", "a folder"),
        ([manifest, "--table", os.path.join(files["file"], "t.md")], "--table", "a file is in the way"),
    ]
    for argv, flag, problem in cases:
        assert_refused(score.main, argv, capsys, flag, problem)


def test_bad_sources_end_in_one_line(files, sources, tmp_path, capsys):
    manifest, d = files["manifest"], files["dir"]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(100))
    cases = [
        (["--source", "clip"], "--source", "METRIC.FIELD=VALUE"),
        (["--source", "fid.model=x"], "--source", "METRIC.FIELD=VALUE"),
        (["--source", "clip.modle=x"], "clip.modle", "its sources are"),
        (["--source", "hpsv2.pretrained=x"], "hpsv2.pretrained", "no source"),
        (["--source", "clip.pretrained="], "clip.pretrained", "empty"),
        (["--source", "hpsv2.preprocess=torch"], "hpsv2.preprocess", "open_clip, package"),
        (["--source", "imagereward.vision_heads=0"], "imagereward.vision_heads", "positive integer"),
        (["--source", f"pickscore.model={tmp_path}/nope"], "pickscore.model", "not found"),
        (["--source", f"aesthetics.mlp={d}"], "aesthetics.mlp", "a folder"),
        (["--source", "clip.pretrained=a", "--source", "clip.pretrained=b"], "clip.pretrained", "twice"),
        # Sources that pass the syntax check and fail when loaded: still one line, naming the source.
        (["--metrics", "clip", *clip_flags(sources, pretrained="no-such-tag")], "clip.pretrained=no-such-tag",
         "neither a file nor a pretrained tag"),
        (["--metrics", "clip", *clip_flags(sources, arch="ViT-Nope")], "clip.arch=ViT-Nope", "no architecture"),
        (["--metrics", "clip", *clip_flags(sources, pretrained=garbage)], "clip.pretrained", "cannot load"),
        (["--metrics", "hpsv2", "--source", "hpsv2.checkpoint=nobody/nothing"], "hpsv2.checkpoint", "could not fetch"),
        (["--metrics", "pickscore", "--source", f"pickscore.processor={sources['pickscore']['processor']}",
          "--source", "pickscore.model=nobody/nothing"], "pickscore.model=nobody/nothing", "cannot load"),
        (["--metrics", "aesthetics", "--source", f"aesthetics.clip={sources['aesthetics']['clip']}",
          "--source", f"aesthetics.mlp={sources['hpsv2']['checkpoint']}"], "aesthetics.mlp", "cannot load"),
        (["--metrics", "imagereward", *[x for k, v in sources["imagereward"].items() if k != "checkpoint"
                                        for x in ("--source", f"imagereward.{k}={v}")],
          "--source", f"imagereward.checkpoint={garbage}"], "imagereward.checkpoint", "cannot load"),
    ]
    for extra, where, problem in cases:
        assert_refused(score.main, [manifest, *extra], capsys, "--source", where, problem)


# ---- eval.versus, eval.evaluate, eval.prompts ----------------------------------------------------

def test_versus_refuses_bad_input(files, capsys):
    d, manifest = files["dir"], files["manifest"]
    other = os.path.join(d, "missing_image.json")
    cases = [
        (["--json_a", os.path.join(d, "nope.json"), "--json_b", manifest], "--json_a", "no such file"),
        (["--json_a", manifest, "--json_b", os.path.join(d, "empty.json")], "--json_b", "empty manifest"),
        (["--json_a", manifest, "--json_b", os.path.join(d, "truncated.json")], "--json_b", "not valid JSON"),
        (["--json_a", manifest, "--json_b", manifest], "--json_a and --json_b", "same manifest"),
        (["--json_a", manifest, "--json_b", other, "--outdir", files["file"]], "--outdir", "a file is in the way"),
        (["--json_a", manifest, "--json_b", other, "--label_a", " "], "--label_a", "empty"),
        (["--json_a", manifest, "--json_b", other, "--batch_size", "0"], "--batch_size", "at least 1"),
        (["--json_a", manifest, "--json_b", other, "--metrics", "clip", "clip"], "--metrics", "twice"),
        (["--json_a", manifest, "--json_b", other, "--device", "cuda:99"], "--device", "CUDA"),
        (["--json_a", manifest], "--json_b", "required"),
    ]
    for argv, flag, problem in cases:
        assert_refused(versus.main, argv, capsys, flag, problem)


def test_evaluate_refuses_bad_input_before_generating(tiny, files, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--unet_path", "base", "--pretrain_path", tiny["sd15"], "--prompts_dir", files["prompts_dir"],
              "--suites", "papv2", "--output_path", out, "--height", "32", "--width", "32", "--steps", "2"]
    cases = [
        (["--suites", "papv2", "papv2"], "--suites", "twice"),
        (["--suites", "hpsv2"], "--prompts_dir", "hpsv2.json"),
        (["--prompts_dir", tmp_path / "nope"], "--prompts_dir", "no such folder"),
        (["--score_batch_size", "0"], "--score_batch_size", "at least 1"),
        (["--batch_size", "0"], "--batch_size", "at least 1"),
        (["--height", "12"], "--height", "multiple of 8"),
        (["--metrics", "clip", "clip"], "--metrics", "twice"),
        (["--source", "clip.nope=1"], "--source", "no source"),
        (["--output_path", files["file"]], "--output_path", "a file is in the way"),
        (["--unet_path", tmp_path / "nope.pth"], "--unet_path", "not found"),
        (["--bogus"], "--bogus", "unrecognized"),
    ]
    for extra, flag, problem in cases:
        assert_refused(evaluate.main, [*common, *extra], capsys, flag, problem)
    assert not os.path.exists(out / "papv2_seed0_32x32_2s_7.5cfg")  # nothing generated


def test_prompts_refuses_bad_input(files, tmp_path, capsys):
    d = files["dir"]
    tsv = tmp_path / "header_only.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\n")
    benchmark = tmp_path / "hpdv2"
    benchmark.mkdir()
    (benchmark / "anime.json").write_text('["a fox", ')
    out = str(tmp_path / "suite.json")
    cases = [
        (["--suite", "partiprompts", "--source", os.path.join(d, "nope.tsv"), "--output", out], "--source", "neither"),
        (["--suite", "partiprompts", "--source", os.path.join(d, "garbage.json"), "--output", out], "--source", "UTF-8"),
        (["--suite", "partiprompts", "--source", str(tsv), "--output", out], "--source", "no prompts"),
        (["--suite", "partiprompts", "--source", d, "--output", out], "--source", "a folder"),
        (["--suite", "hpsv2", "--source", str(benchmark), "--output", out], "--source", "not valid JSON"),
        (["--suite", "papv2", "--source", str(benchmark), "--output", out], "--source", "no parquet files"),
        (["--suite", "partiprompts", "--source", str(tsv), "--output", d], "--output", "a folder"),
        (["--suite", "partiprompts", "--source", str(tsv), "--output", os.path.join(files["file"], "x.json")],
         "--output", "a file is in the way"),
        (["--suite", "nope"], "--suite", "invalid choice"),
    ]
    for argv, flag, problem in cases:
        assert_refused(prompts.main, argv, capsys, flag, problem)
    assert not os.path.exists(out)


# ---- through the shell launchers ----------------------------------------------------------------

def launch(script, *args):
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "eval", script), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("script, args, expected", [
    ("test_sd15.sh", ["base", "--steps", "0"], "error: --steps must be at least 1, got 0"),
    ("test_sdxl.sh", ["base", "--height", "1020"], "error: --height must be a positive multiple of 8"),
    ("test_vs.sh", ["--json_a", "/no/such/a.json", "--json_b", "/no/such/b.json"], "error: --json_a /no/such/a.json"),
])
def test_launchers_end_in_our_message_with_status_2(script, args, expected):
    result = launch(script, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
