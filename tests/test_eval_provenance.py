"""Records of what produced each result, and reuse only when the record matches: generation
(generation.json), score files (scorer, images), --recompute; what a killed generation leaves;
evaluate's summary.json."""

import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from eval import evaluate, generate, score
from eval.prompts import record, write_suite

PROMPTS = ["a red cat", "a blue house on a hill", "a tiny robot", "an old boat"]
RUN = "papv2_seed0_32x32_2s_7.5cfg"


@pytest.fixture()
def suite(tmp_path):
    path = str(tmp_path / "prompts" / "papv2.json")
    write_suite([record(p) for p in PROMPTS], path)
    return path


def gen(base, suite, *extra, unet="base"):
    return generate.main(["--unet_path", unet, "--pretrain_path", base, "--test_json", suite, "--height", "32",
                          "--width", "32", "--steps", "2", "--batch_size", "4", *extra])


def pixels(manifest):
    return [np.asarray(Image.open(r["gen_image_path"])) for r in json.load(open(manifest))]


@pytest.fixture(scope="module")
def other_base(tiny, tmp_path_factory):
    """A second SD1.5-style base: the tiny one with other UNet weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = str(tmp_path_factory.mktemp("other") / "sd15")
    shutil.copytree(tiny["sd15"], folder)
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    torch.manual_seed(1)
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in load_file(weights).items()}, weights)
    return folder


def test_a_second_base_model_never_reuses_the_first_ones_images(tiny, other_base, suite, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = gen(tiny["sd15"], suite)
    second = gen(other_base, suite)
    # Without --output_path, each base has its own folder under outputs/base/.
    assert os.path.dirname(first) != os.path.dirname(second)
    assert os.path.dirname(os.path.dirname(os.path.abspath(first))) == str(tmp_path / "outputs" / "base")
    assert os.path.basename(os.path.dirname(first)).startswith("sd15-")
    assert "0 images kept, 4 generated" in capsys.readouterr().out.splitlines()[-1]
    a, b = pixels(first), pixels(second)
    assert not any(np.array_equal(x, y) for x, y in zip(a, b))
    # The same --output_path for both: the record tells them apart, and says what differs.
    shared = str(tmp_path / "shared")
    gen(tiny["sd15"], suite, "--output_path", shared)
    capsys.readouterr()
    manifest = gen(other_base, suite, "--output_path", shared)
    out = capsys.readouterr().out
    assert "made by another model or protocol (model.pretrain_path: was" in out and other_base in out
    assert "0 images kept, 4 generated" in out
    assert all(np.array_equal(x, y) for x, y in zip(pixels(manifest), b))
    record_ = json.load(open(os.path.join(shared, RUN, "generation.json")))
    assert record_["model"]["pretrain_path"]["path"] == other_base
    assert record_["images"] == {str(i): p for i, p in enumerate(PROMPTS)}
    assert record_["protocol"] == {"version": generate.PROTOCOL_VERSION, "scheduler": "EulerDiscreteScheduler",
                                   "seed": 0, "steps": 2, "cfg": 7.5, "height": 32, "width": 32, "dtype": "fp32",
                                   "device": "cpu"}


def test_a_rewritten_checkpoint_a_changed_prompt_and_recompute_make_images_again(tiny, suite, tmp_path, capsys):
    from safetensors.torch import load_file

    unet = str(tmp_path / "unet.pth")
    state = load_file(os.path.join(tiny["sd15"], "unet", "diffusion_pytorch_model.safetensors"))
    torch.save(state, unet)
    out = ["--output_path", str(tmp_path / "out")]
    manifest = gen(tiny["sd15"], suite, *out, unet=unet)
    before = pixels(manifest)
    capsys.readouterr()
    gen(tiny["sd15"], suite, *out, unet=unet)
    assert capsys.readouterr().out.splitlines()[-1].startswith("4 images kept, 0 generated")
    # Training wrote a new unet.pth at the same path: the images are made again.
    torch.save({k: v + 0.05 for k, v in state.items()}, unet)
    gen(tiny["sd15"], suite, *out, unet=unet)
    text = capsys.readouterr().out
    assert "model.unet_path.file: was" in text and "0 images kept, 4 generated" in text
    after = pixels(manifest)
    assert not any(np.array_equal(x, y) for x, y in zip(before, after))
    # One prompt of the suite changed: only its image is made again.
    write_suite([record(p) for p in PROMPTS[:2] + ["a green tree"] + PROMPTS[3:]], suite)
    gen(tiny["sd15"], suite, *out, unet=unet)
    text = capsys.readouterr().out
    assert "1 prompt(s) of the suite changed" in text and "3 images kept, 1 generated" in text
    # --recompute makes every image again (the same ones: generation is deterministic).
    gen(tiny["sd15"], suite, *out, "--recompute", unet=unet)
    text = capsys.readouterr().out
    assert "--recompute" in text and "0 images kept, 4 generated" in text
    assert all(np.array_equal(x, y) for x, y in zip(pixels(manifest)[:2], after[:2]))


def test_a_killed_generation_leaves_no_png_and_its_rerun_cleans_up(tiny, suite, tmp_path, capsys):
    """A real process killed (SIGKILL) between writing an image and renaming it into place."""
    out = tmp_path / "out"
    code = ("import os, signal, sys\n"
            "real = os.replace\n"
            "def replace(src, dst):\n"
            "    if dst.endswith('2_32x32.png'):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    real(src, dst)\n"
            "os.replace = replace\n"
            "from eval.generate import main\n"
            "main(sys.argv[1:])\n")
    argv = ["--unet_path", "base", "--pretrain_path", tiny["sd15"], "--test_json", suite, "--output_path", str(out),
            "--height", "32", "--width", "32", "--steps", "2", "--batch_size", "2"]
    killed = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = out / RUN
    leftovers = [n for n in os.listdir(folder) if ".tmp" in n]
    assert len(leftovers) == 1 and leftovers[0].startswith("2_32x32.png.tmp")  # the image being renamed
    assert os.path.getsize(folder / leftovers[0]) > 0
    assert sorted(os.path.basename(p) for p in glob.glob(str(folder / "*.png"))) == ["0_32x32.png", "1_32x32.png"]
    # What an earlier version left (`.tmpNNN.png`, globbed as a PNG) goes too; a live process's stays.
    (folder / f"3_32x32.png.tmp{ended_pid()}.png").write_bytes(b"")
    live = folder / f"1_32x32.png.tmp{os.getppid()}"
    live.write_bytes(b"")
    (out / f"{RUN}.json.tmp{ended_pid()}").write_text("[")
    capsys.readouterr()
    manifest = generate.main(argv)
    text = capsys.readouterr().out
    assert "removed 2 temporary file(s)" in text and "removed 1 temporary file(s)" in text
    assert "2 images kept, 2 generated" in text  # the first batch's images were in the record before the kill
    assert sorted(os.listdir(folder)) == sorted(["0_32x32.png", "1_32x32.png", "2_32x32.png", "3_32x32.png",
                                                 "generation.json", live.name])
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    straight = generate.main([*argv[:7], str(tmp_path / "straight"), *argv[8:]])
    assert all(np.array_equal(x, y) for x, y in zip(pixels(manifest), pixels(straight)))


def ended_pid():
    """The id of a process that is not running and cannot be reused before the test ends: one above
    the kernel's largest process id."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1


# ---- score files ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored_run(tiny, tmp_path_factory):
    """A generated manifest (4 images) and the tiny scorers' sources."""
    from eval.tiny import build_tiny_scorers

    d = tmp_path_factory.mktemp("scored")
    suite_path = str(d / "prompts" / "papv2.json")
    write_suite([record(p) for p in PROMPTS], suite_path)
    manifest = gen(tiny["sd15"], suite_path, "--output_path", str(d / "out"))
    return manifest, build_tiny_scorers(str(d / "scorers"))


def clip_flags(sources, **override):
    return [x for k, v in {**sources["clip"], **override}.items() for x in ("--source", f"clip.{k}={v}")]


def test_score_files_are_reused_only_when_their_record_matches(scored_run, capsys):
    manifest, sources = scored_run
    path = score.score_path(manifest, "clip")
    if os.path.exists(path):
        os.remove(path)
    first = score.main([manifest, "--metrics", "clip", *clip_flags(sources)])
    content = json.load(open(path))
    assert content["format"] == score.SCORE_FORMAT and content["metric"] == "clip"
    assert content["scorer"]["sources"]["pretrained"]["path"] == sources["clip"]["pretrained"]
    assert content["scorer"]["sources"]["pretrained"]["file"] == list(
        score.file_identity(sources["clip"]["pretrained"]))
    assert len(content["images"]) == len(content["records"]) == 4
    stamp = os.stat(path).st_ino  # every write replaces the file: a new inode
    capsys.readouterr()
    # The same scorer and images: reused, nothing said, nothing written.
    assert score.main([manifest, "--metrics", "clip", *clip_flags(sources)]) == first
    assert "scoring again" not in capsys.readouterr().out and os.stat(path).st_ino == stamp
    # clip pointed at another model: recomputed, with the reason.
    other = score.main([manifest, "--metrics", "clip", *clip_flags(sources, pretrained=sources["hpsv2"]["checkpoint"])])
    text = capsys.readouterr().out
    assert "made by another scorer (sources.pretrained: was" in text and "scoring again" in text
    assert other[manifest]["clip"] != pytest.approx(first[manifest]["clip"], abs=1e-4)
    assert json.load(open(path))["scorer"]["sources"]["pretrained"]["path"] == sources["hpsv2"]["checkpoint"]
    # --recompute recomputes; back on the first model, the first scores come back.
    again = score.main([manifest, "--metrics", "clip", "--recompute", *clip_flags(sources)])
    assert "--recompute; scoring again" in capsys.readouterr().out
    assert again == first
    # An image rewritten since: recomputed.
    image = json.load(open(manifest))[1]["gen_image_path"]
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))
    score.main([manifest, "--metrics", "clip", *clip_flags(sources)])
    assert "1 of 4 images changed since it was made" in capsys.readouterr().out


def without_record(records, edit=None, field="score"):
    """A score file without a record: the manifest's records each with a score (1, 2, 3, ...) in
    `field`, then `edit` applied to the list."""
    content = [{**r, field: float(i + 1)} for i, r in enumerate(records)]
    if edit:
        edit(content)
    return content


# (name, the score file, what is in it, the extra flag, whether its scores are used, the line printed)
UNRECORDED = [
    ("ours, older format", "aesthetics", lambda r: without_record(r), [], True, "scores used unverified"),
    ("the reference's ImageReward", "image_reward_score",
     lambda r: without_record(r, field="image_reward_score"), [], True, "scores used unverified"),
    ("another prompt", "aesthetics", lambda r: without_record(r, lambda c: c[2].update(prompt="a dog")), [], False,
     "made for another manifest (record 2's prompt differs); scoring again"),
    ("another image path", "aesthetics",
     lambda r: without_record(r, lambda c: c[1].update(gen_image_path=c[1]["gen_image_path"] + ".old.png")), [],
     False, "made for another manifest (record 1's image path differs); scoring again"),
    ("a record fewer", "aesthetics", lambda r: without_record(r, lambda c: c.pop()), [], False,
     "made for another manifest (a different number of records); scoring again"),
    ("the records in another order", "aesthetics", lambda r: without_record(r, lambda c: c.reverse()), [], False,
     "made for another manifest (record 0's prompt differs); scoring again"),
    ("a score missing", "aesthetics", lambda r: without_record(r, lambda c: c[3].pop("score")), [], False,
     "record 3 has no numeric 'score'; scoring again"),
    ("a score that is not a number", "aesthetics", lambda r: without_record(r, lambda c: c[0].update(score="9")),
     [], False, "record 0 has no numeric 'score'; scoring again"),
    ("the reference's aesthetics (no scores)", "aesscore", lambda r: r, [], False,
     "holds no per-image scores (the reference's tool printed only the mean): scoring"),
    ("--recompute", "aesthetics", lambda r: without_record(r), ["--recompute"], False, "--recompute; scoring again"),
]


@pytest.mark.parametrize("name, suffix, content, extra, used, line", UNRECORDED, ids=[c[0] for c in UNRECORDED])
def test_a_score_file_without_a_record_is_used_only_when_it_fits(scored_run, tmp_path, capsys, monkeypatch,
                                                                 name, suffix, content, extra, used, line):
    """A score file that records neither scorer nor images is used, with one warning line, when its
    prompts and image paths are the manifest's, in order, each with a score; otherwise the metric is
    scored, with the reason."""
    manifest, sources = scored_run
    metric = "imagereward" if suffix == "image_reward_score" else "aesthetics"
    stem = os.path.splitext(manifest)[0]
    for old in {metric, suffix, "aesscore", "image_reward_score"}:  # no file of an earlier case
        if os.path.exists(f"{stem}_{old}.json"):
            os.remove(f"{stem}_{old}.json")
    path, written = f"{stem}_{suffix}.json", content(json.load(open(manifest)))
    with open(path, "w") as f:
        json.dump(written, f, indent=2)
    loaded = []
    build = score.build_scorer
    monkeypatch.setattr(score, "build_scorer", lambda m, **kw: loaded.append(m) or build(m, **kw))
    flags = [x for k, v in sources[metric].items() for x in ("--source", f"{metric}.{k}={v}")]
    means = score.main([manifest, "--metrics", metric, *flags, *extra, "--table", str(tmp_path / "t.md")])
    printed = [text for text in capsys.readouterr().out.splitlines() if path in text]
    assert printed == [f"warning: {path}: {score.UNVERIFIED}" if used else f"{path}: {line}"]
    assert (means[manifest][metric] == pytest.approx(2.5)) == used  # the mean of 1, 2, 3, 4 only if used
    assert loaded == ([] if used else [metric])
    if used:  # nothing written: no record could vouch for these scores
        assert json.load(open(path)) == written
        assert suffix == metric or not os.path.exists(score.score_path(manifest, metric))
    else:  # scored, and written with a record
        ours = json.load(open(score.score_path(manifest, metric)))
        assert ours["format"] == score.SCORE_FORMAT and len(ours["records"]) == 4


def test_hpsv2_loads_its_checkpoint_without_claiming_random_weights(scored_run, caplog, monkeypatch):
    import contextlib

    import open_clip

    import eval.scorers
    from eval.scorers import build_scorer

    _, sources = scored_run
    # Let open_clip's own log lines through (the scorer quiets its failures), and see what it is asked.
    monkeypatch.setattr(eval.scorers, "quiet_logging", contextlib.nullcontext)
    calls = []
    create = open_clip.create_model_and_transforms
    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda *a, **k: calls.append(k.get("pretrained")) or create(*a, **k))
    with caplog.at_level("INFO"):
        build_scorer("hpsv2", **sources["hpsv2"])
        build_scorer("clip", **sources["clip"])
    # open_clip loads each checkpoint itself: no model is built with random weights first.
    assert calls == [sources["hpsv2"]["checkpoint"], sources["clip"]["pretrained"]]
    assert not [r for r in caplog.records if "random" in r.getMessage()]


def test_evaluate_writes_summary_json_with_the_numbers_of_summary_md(tiny, scored_run, tmp_path, capsys):
    _, sources = scored_run
    prompts_dir = tmp_path / "prompts"
    write_suite([record(p) for p in PROMPTS], str(prompts_dir / "papv2.json"))
    metrics = ["clip", "aesthetics"]
    flags = [x for m in metrics for k, v in sources[m].items() for x in ("--source", f"{m}.{k}={v}")]
    out = tmp_path / "out"
    means = evaluate.main(["--unet_path", "base", "--pretrain_path", tiny["sd15"], "--prompts_dir", str(prompts_dir),
                           "--suites", "papv2", "--output_path", str(out), "--height", "32", "--width", "32",
                           "--steps", "2", "--max_prompts", "3", "--metrics", *metrics, *flags])
    table = json.load(open(out / "summary.json"))
    markdown = (out / "summary.md").read_text().splitlines()
    assert table["metrics"] == metrics and len(table["rows"]) == 1
    row = table["rows"][0]
    assert row["suite"] == RUN and row["images"] == 3 and row["manifest"] == str(out / f"{RUN}.json")
    assert markdown[2] == f"| {RUN} | " + " | ".join(f"{row['means'][m]:.4f}" for m in metrics) + " |"
    assert row["means"] == pytest.approx(means[os.path.join(str(out), f"{RUN}.json")])
    for m in metrics:  # each mean is the mean of the scores in the metric's score file
        records = json.load(open(score.score_path(row["manifest"], m)))["records"]
        assert len(records) == 3 and row["means"][m] == pytest.approx(np.mean([r["score"] for r in records]))
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_evaluate_loads_the_models_once_for_all_suites(tiny, scored_run, tmp_path, monkeypatch):
    _, sources = scored_run
    prompts_dir = tmp_path / "prompts"
    for suite in ("papv2", "hpsv2"):
        write_suite([record(p) for p in PROMPTS], str(prompts_dir / f"{suite}.json"))
    built = []

    class Counted(generate.Generator):
        def __init__(self, *args):
            built.append(args)
            super().__init__(*args)

    monkeypatch.setattr(generate, "Generator", Counted)
    flags = [x for k, v in sources["clip"].items() for x in ("--source", f"clip.{k}={v}")]
    means = evaluate.main(["--unet_path", "base", "--pretrain_path", tiny["sd15"], "--prompts_dir", str(prompts_dir),
                           "--suites", "papv2", "hpsv2", "--output_path", str(tmp_path / "out"), "--height", "32",
                           "--width", "32", "--steps", "2", "--max_prompts", "2", "--metrics", "clip", *flags])
    assert len(means) == 2 and len(built) == 1
    # The same prompts and seed in both suites: the same images, from the one set of models.
    a, b = (sorted(glob.glob(str(tmp_path / "out" / f"{s}_seed0_32x32_2s_7.5cfg" / "*.png"))) for s in ("papv2", "hpsv2"))
    assert len(a) == len(b) == 2
    assert [np.asarray(Image.open(x)).tobytes() for x in a] == [np.asarray(Image.open(x)).tobytes() for x in b]
