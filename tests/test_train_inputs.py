"""Nothing a user types, and no row of data, ends in a traceback or kills a training run: bad
settings and paths end in one line with exit status 2 (directly and through the launchers), bad
rows are skipped and counted, non-finite steps are skipped, a mismatched checkpoint is refused."""

import contextlib
import io
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import ROOT, accelerate_launch, same_tensors, tiny_train_args
from test_train import run_in_process, unet_weights


def expect_one_line_error(capsys, argv, *fragments, status=2):
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == status, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def write_rows(folder, rows, split="train"):
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64())])
    pq.write_table(pa.table(rows, schema=schema), os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))
    return str(folder)


def jpeg(value, size=(40, 48)):
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[0], size[1], 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def bomb_png(width=20000, height=20000):
    """A PNG whose header claims 400 M pixels: PIL refuses it as a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "a_file").write_text("not a folder")
    (root / "garbage.safetensors").write_bytes(b"\x00" * 64)
    buffer = io.BytesIO()
    torch.save({"conv_in.weight": torch.zeros(3, 3)}, buffer)
    (root / "truncated.pth").write_bytes(buffer.getvalue()[:40])
    empty = write_rows(root / "empty", {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []})
    ties = write_rows(root / "ties", {"caption": ["a", "b"], "jpg_0": [jpeg(1)] * 2, "jpg_1": [jpeg(2)] * 2,
                                      "label_0": [0.5, 0.5]})
    (root / "notparquet").mkdir()
    (root / "notparquet" / "train-00000-of-00001.parquet").write_text("hello")
    return {"root": root, "empty": empty, "ties": ties, "notparquet": str(root / "notparquet")}


BAD_SETTINGS = [
    (["--lr_scheduler", "bogus"], ["--lr_scheduler", "invalid choice"]),
    (["--timestep_range", "900", "100"], ["--timestep_range 900 100", "MIN < MAX"]),
    (["--timestep_range", "0", "2000"], ["--timestep_range", "<= 1000"]),
    (["--max_train_steps", "-3"], ["--max_train_steps must be >= 0"]),
    (["--resolution", "30"], ["--resolution must be a positive multiple of 8"]),
    (["--checkpointing_steps", "-1"], ["--checkpointing_steps must be >= 0"]),
    (["--beta_dpo", "0"], ["--beta_dpo must be > 0"]),
    (["--beta_dpo", "-5"], ["--beta_dpo must be > 0"]),
    (["--learning_rate=-1e-5"], ["--learning_rate must be >= 0"]),
    (["--seed", "-1"], ["--seed must lie in [0, 2**32)"]),
    (["--seed", "4294967296"], ["--seed must lie in [0, 2**32)"]),
    (["--beta_dpo", "inf"], ["--beta_dpo must be a finite number"]),
    (["--split", "nope"], ["--split nope: no parquet files"]),
    (["--validation_pairs", "2", "--validation_split", "nope"], ["--validation_split nope: no parquet files"]),
    (["--validation_pairs", "2", "--validation_split", "train"], ["--validation_split train is the training split"]),
    (["--train_batch_size", "0"], ["--train_batch_size must be >= 1"]),
    (["--dmpo_alpha", "1.5"], ["--dmpo_alpha must lie in [0, 1)"]),
    (["--use_winner_preserving", "--winner_preserving_mu", "2"], ["--winner_preserving_mu must lie in [0, 1]"]),
    (["--validation_pairs", "1000"], ["--validation_pairs 1000", "only"]),
    (["--resume_from_checkpoint", "checkpoint-99"], ["--resume_from_checkpoint", "not a complete checkpoint"]),
    (["--max_train_samples", "0"], ["--max_train_samples must be >= 1"]),
    # Settings that can only be wrong, found before anything slow starts.
    (["--validation_prompts", "a cat", "--validation_sampling_steps", "5000"],
     ["--validation_sampling_steps 5000", "1000 timesteps"]),
    (["--validation_pairs", "2", "--validation_timesteps", "2000"], ["--validation_timesteps 2000", "holds only 1000"]),
    (["--validation_pairs", "2", "--timestep_weighting", "importance", "--validation_timesteps", "901"],
     ["--validation_timesteps 901", "[100, 1000)"]),
    (["--validation_sampling_steps", "0"], ["--validation_sampling_steps must be >= 1"]),
    (["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps must be >= 1"]),
    (["--num_train_epochs", "0"], ["--num_train_epochs must be >= 1"]),
    (["--lr_warmup_steps", "-1"], ["--lr_warmup_steps must be >= 0"]),
    (["--dataloader_num_workers", "-1"], ["--dataloader_num_workers must be >= 0"]),
    (["--max_skipped_steps", "0"], ["--max_skipped_steps must be >= 1"]),
    (["--checkpoints_total_limit", "0"], ["--checkpoints_total_limit must be >= 1"]),
    (["--validation_timesteps", "0"], ["--validation_timesteps must be >= 1"]),
    (["--proportion_empty_prompts", "1.5"], ["--proportion_empty_prompts must lie in [0, 1]"]),
    (["--proportion_empty_prompts", "nan"], ["--proportion_empty_prompts must lie in [0, 1]"]),
    (["--is_clip_eps", "1"], ["--is_clip_eps must lie in [0, 1)"]),
    (["--is_mask_threshold", "-1"], ["--is_mask_threshold must be >= 0"]),
    (["--adam_beta1", "1"], ["--adam_beta1 and --adam_beta2 must lie in [0, 1)"]),
    (["--adam_epsilon", "0"], ["--adam_epsilon must be > 0"]),
    (["--max_grad_norm", "-1"], ["--max_grad_norm must be >= 0"]),
    (["--max_grad_norm", "nan"], ["--max_grad_norm must be >= 0"]),
    (["--resolution", "abc"], ["--resolution", "invalid int value"]),
    (["--mixed_precision", "fp8"], ["--mixed_precision", "invalid choice"]),
    (["--host_memory", "keep"], ["--host_memory", "invalid choice"]),
    (["--sdxl_true_time_ids"], ["--sdxl_true_time_ids needs --sdxl"]),
    (["--streaming", "--validation_pairs", "2"], ["--validation_pairs needs a map-style dataset"]),
    (["--latent_cache", "somewhere", "--random_crop"], ["--latent_cache cannot be combined with --random_crop"]),
    (["--train_method", "sft", "--use_winner_preserving"], ["--use_winner_preserving needs a loser branch"]),
    (["--train_method", "sft", "--ref_unet", "base"], ["--ref_unet needs a preference objective"]),
    (["--image_column", "image"], ["--image_column", "jpg_0 and jpg_1"]),
    (["--output_dir", ""], ["--output_dir is empty"]),
    (["--logging_dir", " "], ["--logging_dir is empty"]),
    (["--caption_column", ""], ["--caption_column is empty"]),
    (["--split", ""], ["--split is empty"]),
    (["--cache_dir", ""], ["--cache_dir is empty"]),
    (["--latent_cache", ""], ["--latent_cache is empty"]),
    (["--pretrained_vae_model_name_or_path", ""], ["--pretrained_vae_model_name_or_path is empty"]),
    (["--validation_pairs", "2", "--validation_split", ""], ["--validation_split is empty"]),
    (["--dataset_name", ""], ["--dataset_name is empty"]),
    (["--revision", ""], ["--revision is empty"]),
    (["--latent_cache", "{file}"], ["--latent_cache", "not a complete latent cache"]),
    (["--validation_steps", "-1"], ["--validation_steps must be >= 0"]),
    (["--num_validation_images", "-1"], ["--num_validation_images must be >= 0"]),
    (["--adam_weight_decay", "-1"], ["--adam_weight_decay must be >= 0"]),
    (["--adam_weight_decay", "nan"], ["--adam_weight_decay must be a finite number"]),
    (["--adam_beta2", "1"], ["--adam_beta1 and --adam_beta2 must lie in [0, 1)"]),
    (["--use_winner_preserving", "--winner_preserving_mu", "nan"], ["--winner_preserving_mu must lie in [0, 1]"]),
    (["--choice_model", "clip", "--choice_model_source", "nonsense"], ["--choice_model_source", "nonsense"]),
    (["--choice_model", "clip", "--choice_model_source", "clip.nofield=x"], ["--choice_model_source", "nofield"]),
    (["--report_to", "wandb"], ["--report_to wandb: wandb is not installed"]),
    (["--tracker_project_name", ""], ["--tracker_project_name is empty"]),
    (["--train_data_dir", ""], ["--train_data_dir is empty"]),
    (["--dataset_revision", ""], ["--dataset_revision is empty"]),
    (["--dataset_config_name", ""], ["--dataset_config_name is empty"]),
    (["--resolution", "16384"], ["--resolution must be at most 8192"]),
    # LoRA and memory options.
    (["--use_lora", "--lora_rank", "0"], ["--lora_rank must be >= 1, got 0"]),
    (["--use_lora", "--lora_rank", "-4"], ["--lora_rank must be >= 1, got -4"]),
    (["--use_lora", "--lora_alpha", "0"], ["--lora_alpha must be > 0"]),
    (["--use_lora", "--lora_dropout", "1"], ["--lora_dropout must lie in [0, 1)"]),
    (["--use_lora", "--lora_target_modules", "to_q", "no_such_layer"],
     ["--lora_target_modules 'no_such_layer' matches no Linear or Conv2d module"]),
    (["--use_lora", "--train_method", "sft", "--ref_unet", "base"], ["--ref_unet needs a preference objective"]),
    (["--merge_lora"], ["--merge_lora needs --use_lora"]),
    (["--use_8bit_adam", "--use_adafactor"], ["--use_8bit_adam and Adafactor exclude each other"]),
    (["--hub_model_id", "me/model"], ["--hub_model_id needs --push_to_hub"]),
    (["--hub_private_repo"], ["--hub_private_repo needs --push_to_hub"]),
]


@pytest.mark.parametrize("flags,fragments", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_bad_settings_end_in_one_line(tiny, tmp_path, capsys, flags, fragments):
    (tmp_path / "a_file").write_text("not a folder")
    flags = [f.replace("{file}", str(tmp_path / "a_file")) for f in flags]
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "out"), *flags),
                          *fragments)
    # --check_only finds the same problem, and writes nothing while doing so.
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "check"), *flags,
                                                  "--check_only"), *fragments)
    assert not (tmp_path / "check").exists()


def test_bad_paths_end_in_one_line(tiny, tmp_path, capsys, bad_files):
    root = bad_files["root"]
    cases = [
        ({"model": str(root / "no-such-model")}, [], ["--pretrained_model_name_or_path", "no such folder"]),
        ({"model": "someone/not-in-the-cache"}, [], ["--pretrained_model_name_or_path", "cannot load"]),
        ({"model": str(root / "a_file")}, [], ["--pretrained_model_name_or_path", "a file, not a folder"]),
        ({"out": str(root / "a_file")}, [], ["--output_dir", "a file is in the way"]),
        ({"out": str(root / "a_file" / "under")}, [], ["--output_dir", "lies under a file"]),
        ({}, ["--report_to", "tensorboard", "--logging_dir", str(root / "a_file")], ["--logging_dir", "a file"]),
        ({}, ["--cache_dir", str(root / "a_file")], ["--cache_dir", "a file is in the way"]),
        ({"data": str(root / "no-such-data")}, [], ["could not load dataset"]),
        ({"data": bad_files["empty"]}, [], ["is empty"]),
        ({"data": bad_files["ties"]}, [], ["no usable pair", "all ties"]),
        ({"data": bad_files["notparquet"]}, [], ["not a readable parquet file"]),
        ({}, ["--unet_init", str(root / "garbage.safetensors")], ["--unet_init", "not a readable .safetensors"]),
        ({}, ["--unet_init", str(root / "truncated.pth")], ["--unet_init", "refusing to load"]),
        ({}, ["--unet_init", str(root / "missing.pth")], ["--unet_init", "not found"]),
        ({}, ["--ref_unet", str(root / "garbage.safetensors")], ["--ref_unet", "not a readable .safetensors"]),
        ({}, ["--pretrained_vae_model_name_or_path", str(root / "no-vae")],
         ["--pretrained_vae_model_name_or_path", "not found"]),
    ]
    for where, flags, fragments in cases:
        argv = tiny_train_args(where.get("model", tiny["sd15"]), where.get("data", tiny["data"]),
                               where.get("out", str(tmp_path / "out")), "--max_train_steps", "1", *flags)
        expect_one_line_error(capsys, argv, *fragments)
        expect_one_line_error(capsys, [*argv, "--check_only"], *fragments)  # the launchers' check finds it too


def test_sdxl_unet_with_an_sd15_base_is_refused(tiny, tmp_path, capsys):
    unet = torch.nn.Module()
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny["sdxl"], subfolder="unet")
    torch.save(unet.state_dict(), tmp_path / "unet.pth")
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "out"), "--unet_init",
                                                  str(tmp_path / "unet.pth"), "--max_train_steps", "1"),
                          "--unet_init", "does not fit the UNet of")


@pytest.fixture(scope="module")
def sdxl_unet_pth(tiny, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    path = tmp_path_factory.mktemp("sdxl-unet") / "unet.pth"
    torch.save(UNet2DConditionModel.from_pretrained(tiny["sdxl"], subfolder="unet").state_dict(), path)
    return str(path)


@pytest.mark.parametrize("launcher,flags,fragment", [
    ("sd15_dspo", ["--beta_dpo=-1"], "--beta_dpo must be > 0"),
    ("sdxl_dmpo", ["--resolution=30"], "--resolution must be a positive multiple of 8"),
    ("sd15_dmpo", ["--unet_init={garbage}"], "not a readable .safetensors file"),
    ("sd15_diffusion_dpo", ["--unet_init={sdxl_pth}"], "does not fit the UNet of"),
])
def test_errors_survive_the_launchers(tiny, tmp_path, bad_files, sdxl_unet_pth, launcher, flags, fragment):
    flags = [f.format(garbage=bad_files["root"] / "garbage.safetensors", sdxl_pth=sdxl_unet_pth) for f in flags]
    arch = launcher.split("_")[0]
    env = {**os.environ, "NUM_GPUS": "1", "MODEL_NAME": tiny[arch], "VAE_NAME": os.path.join(tiny[arch], "vae"),
           "DATASET_NAME": tiny["data"], "OUTPUT_DIR": str(tmp_path)}
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train", f"{launcher}.sh"), *flags],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last and "Traceback" not in result.stderr


def test_missing_column_is_found_before_any_model_loads(tiny, tmp_path, capsys, monkeypatch):
    import train

    def no_models(args):
        raise AssertionError("models were loaded before the data was checked")

    monkeypatch.setattr(train, "load_models", no_models)
    data = write_rows(tmp_path / "data", {"caption": ["x"], "jpg_0": [jpeg(1)], "jpg_1": [jpeg(2)], "label_0": [1.0]})
    table = pq.read_table(os.path.join(data, "data", "train-00000-of-00001.parquet")).drop(["jpg_1"])
    pq.write_table(table, os.path.join(data, "data", "train-00000-of-00001.parquet"))
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], data, str(tmp_path / "out")), "no column 'jpg_1'")


def caption_data(folder, captions, caption_type):
    rows = {"caption": captions, "jpg_0": [jpeg(1 + i) for i in range(len(captions))],
            "jpg_1": [jpeg(100 + i) for i in range(len(captions))], "label_0": [1.0, 0.0] * (len(captions) // 2)}
    schema = pa.schema([("caption", caption_type), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64())])
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    pq.write_table(pa.table(rows, schema=schema), os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    return str(folder)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("bad-data")
    binary = caption_data(root / "binary", [b"a cat", b"a dog"] * 4, pa.binary())
    integers = caption_data(root / "integers", [1, 2] * 4, pa.int64())
    # Two files of one split that disagree: the second holds its captions as bytes.
    mixed = caption_data(root / "mixed", ["a cat", "a dog"] * 4, pa.string())
    shutil.copy(os.path.join(binary, "data", "train-00000-of-00001.parquet"),
                os.path.join(mixed, "data", "train-00001-of-00002.parquet"))
    os.rename(os.path.join(mixed, "data", "train-00000-of-00001.parquet"),
              os.path.join(mixed, "data", "train-00000-of-00002.parquet"))
    # ... or in their columns.
    missing = caption_data(root / "missing", ["a cat", "a dog"] * 4, pa.string())
    table = pq.read_table(os.path.join(missing, "data", "train-00000-of-00001.parquet"))
    pq.write_table(table.drop(["label_0"]), os.path.join(missing, "data", "train-00001-of-00001.parquet"))
    return {"binary": binary, "integers": integers, "mixed": mixed, "missing": missing}


BAD_DATA = [
    ("binary", "the caption column 'caption' holds binary, not text"),
    ("integers", "the caption column 'caption' holds int64, not text"),
    ("mixed", "train-00001-of-00002.parquet does not match train-00000-of-00002.parquet: column 'caption' is binary"),
    ("missing", "train-00001-of-00001.parquet does not match train-00000-of-00001.parquet: it has no column 'label_0'"),
]


@pytest.mark.parametrize("mode", ["run", "check_only", "streaming"])
@pytest.mark.parametrize("name,fragment", BAD_DATA, ids=[name for name, _ in BAD_DATA])
def test_bad_data_ends_in_one_line(tiny, tmp_path, capsys, bad_data, mode, name, fragment):
    extra = {"run": [], "check_only": ["--check_only"], "streaming": ["--streaming"]}[mode]
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], bad_data[name], str(tmp_path / "out"),
                                                  "--max_train_steps", "1", *extra), fragment)


def test_check_only_writes_nothing(tiny, tmp_path):
    """--check_only reads the data from its parquet files: no output folder, no `datasets` cache
    (for the full Pick-a-Pic that would be a conversion of the whole set)."""
    out, hf_home = tmp_path / "out", tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HOME": str(hf_home), "HF_DATASETS_CACHE": str(hf_home / "datasets")}
    args = tiny_train_args(tiny["sd15"], tiny["data"], str(out), "--validation_pairs", "4", "--report_to",
                           "tensorboard", "--check_only")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "are usable" in result.stdout
    assert not out.exists()
    written = [p for p in hf_home.rglob("*") if p.is_file()] if hf_home.exists() else []
    assert not any("parquet" in str(p) or p.suffix == ".arrow" for p in written), written
    # The same run without --check_only converts the data into that cache (so the check above can fail).
    args = tiny_train_args(tiny["sd15"], tiny["data"], str(out), "--dry_run")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(p.suffix == ".arrow" for p in hf_home.rglob("*"))


# ---- bad rows ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirty_data(tmp_path_factory, tiny):
    """The tiny dataset with bad rows mixed in: a decompression bomb, a truncated JPEG, a missing
    image, a label that is not 0, 0.5 or 1 (streaming), and a missing caption."""
    folder = tmp_path_factory.mktemp("dirty")
    table = pq.read_table(os.path.join(tiny["data"], "data", "train-00000-of-00001.parquet")).to_pydict()
    good = jpeg(100)
    bad_images = [bomb_png(), good[: len(good) // 3], None]
    for i, bad in enumerate(bad_images):
        table["jpg_1"][3 + 5 * i] = bad
        table["label_0"][3 + 5 * i] = 1.0
    table["caption"][20] = None
    return write_rows(folder, table)


@pytest.mark.parametrize("mode", ["map", "workers", "streaming"])
def test_bad_rows_are_skipped_and_counted(tiny, tmp_path, dirty_data, mode, caplog):
    flags = {"map": [], "workers": ["--dataloader_num_workers", "2"], "streaming": ["--streaming"]}[mode]
    args = tiny_train_args(tiny["sd15"], dirty_data, str(tmp_path), "--max_train_steps", "3",
                           "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
                           "--checkpointing_steps", "0", *flags)
    if mode == "workers":  # the warnings come from the worker processes: run in a subprocess to see them
        result = accelerate_launch(args)
        assert result.returncode == 0, result.stderr[-3000:]
        text = result.stderr
    else:
        with caplog.at_level("WARNING"):
            logs = run_in_process(args)
        assert math.isfinite(logs["loss"])
        text = caplog.text
    assert "DecompressionBombError" in text or "too large" in text
    assert "skipped so far" in text
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize("flags", [[], ["--streaming", "--max_train_steps", "1"], ["--dataloader_num_workers", "1"]],
                         ids=["map", "streaming", "workers"])
def test_no_readable_pair_ends_in_one_line(tiny, tmp_path, capsys, flags):
    data = write_rows(tmp_path / "data", {"caption": ["a", "b", "c"], "jpg_0": [b"x", b"y", b"z"],
                                          "jpg_1": [jpeg(1)] * 3, "label_0": [1.0, 0.0, 1.0]})
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], data, str(tmp_path / "out"), "--train_batch_size", "1",
                                                  *flags), "no usable pair" if "--streaming" in flags else
                          "has two readable images")


# ---- non-finite steps --------------------------------------------------------------------------


def poison_steps(monkeypatch, bad_steps):
    """Make the loss NaN on the given (1-based) optimizer steps (one micro-batch per step)."""
    import train

    calls = {"n": 0}
    original = train.MicroBatchLoss.__call__

    def poisoned(self, batch):
        calls["n"] += 1
        loss, stats = original(self, batch)
        if calls["n"] in bad_steps:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(train.MicroBatchLoss, "__call__", poisoned)


def test_a_nan_step_is_skipped_and_the_run_goes_on(tiny, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {2})
    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "4",
                                          "--checkpointing_steps", "2"))
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["skipped_steps"] for m in lines] == [0, 1, 1, 1] and math.isnan(lines[1]["loss"])
    assert logs["skipped_steps"] == 1 and math.isfinite(logs["loss"])
    weights = unet_weights(tmp_path / "unet")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The skipped step did not move the weights: a run without step 2's batch... is hard to build;
    # instead, the weights at the checkpoint after it are finite and differ from the base.
    base = unet_weights(os.path.join(tiny["sd15"], "unet"))
    assert any(not torch.equal(weights[k], base[k]) for k in base)


def test_a_skipped_step_leaves_the_weights_alone(tiny, tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, {2})
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "a"), "--max_train_steps", "2",
                                   "--checkpointing_steps", "1"))
    after_1, final = unet_weights(tmp_path / "a" / "checkpoint-1" / "unet"), unet_weights(tmp_path / "a" / "unet")
    assert same_tensors(after_1, final)  # step 2 changed nothing
    # A run in which no step could be applied saves nothing.
    poison_steps(monkeypatch, {1, 2, 3, 4})
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "b"),
                                                  "--max_train_steps", "1", "--checkpointing_steps", "0"),
                          "no update was made", status=1)
    assert not (tmp_path / "b" / "unet").exists()


def test_too_many_skipped_steps_stop_the_run(tiny, tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, set(range(1, 100)))
    line = expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path),
                                                         "--max_train_steps", "10", "--max_skipped_steps", "3"),
                                 "3 steps in a row", "--max_skipped_steps 3", status=1)
    assert "step 3" in line
    assert not (tmp_path / "unet").exists()


def test_non_finite_weights_are_never_saved(tiny, tmp_path, monkeypatch, capsys):
    original = torch.optim.AdamW.step

    def blow_up(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up)
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "2",
                                                  "--checkpointing_steps", "1"),
                          "not finite after step 1", status=1)
    assert not any(name.startswith("checkpoint") for name in os.listdir(tmp_path))
    assert not (tmp_path / "unet").exists()


# ---- resume --------------------------------------------------------------------------------------


def test_resume_refuses_a_checkpoint_with_other_settings(tiny, tmp_path, capsys):
    common = ["--max_train_steps", "1", "--checkpointing_steps", "1"]
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), *common))
    line = expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps",
                                                         "2", "--train_method", "dspo", "--beta_dpo", "0.5"),
                                 "checkpoint-1 was written with other settings", "--train_method 'diffusion-dpo' there",
                                 "'dspo' now", "--beta_dpo 5000.0 there, 0.5 now", "another --output_dir")
    assert "--max_train_steps" not in line
    # What may change on resume: how long it runs, how often it saves.
    logs = run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "2",
                                          "--checkpointing_steps", "5"))
    assert math.isfinite(logs["loss"])
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert config["derived"]["resumed_from"].endswith("checkpoint-1")


def test_damaged_checkpoints_and_a_fresh_start_beside_old_ones_are_refused(tiny, tmp_path, capsys):
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "2",
                                   "--checkpointing_steps", "1"))
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "3",
                                                  "--resume_from_checkpoint", ""),
                          "holds an earlier run's checkpoints (up to checkpoint-2)", "another --output_dir")
    optimizer = tmp_path / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "3"),
                          "checkpoint-2/optimizer.pt is damaged or truncated")
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1, "se')
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "3",
                                                  "--resume_from_checkpoint", "checkpoint-1"),
                          "trainer_state.json is damaged")


def test_resume_survives_a_torn_metrics_line(tiny, tmp_path):
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "2",
                                   "--checkpointing_steps", "1"))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.6')  # a line cut short by a kill or a full disk
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "3",
                                   "--checkpointing_steps", "1"))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3]


def test_killing_the_launcher_ends_the_training_process(tiny, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "train.py"),
           *tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "100000",
                            "--checkpointing_steps", "0")]
    launcher = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def children():
        found = []
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().split(b"\0")
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, ValueError, IndexError):
                continue
            if pid.isdigit() and int(pid) != launcher.pid and str(tmp_path).encode() in cmdline and state != "Z":
                found.append(int(pid))
        return found

    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (tmp_path / "metrics.jsonl").exists():
            time.sleep(0.5)
        assert (tmp_path / "metrics.jsonl").exists() and children(), "train.py did not start training"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and children():
            time.sleep(0.5)
        assert not children(), "train.py kept running after its launcher was killed"
    finally:  # never leave a 100000-step run behind, whatever failed
        launcher.kill()
        for pid in children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---- held-out progress -------------------------------------------------------------------------


def test_validation_is_logged_and_reproducible(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_pairs", "6",
              "--validation_steps", "2", "--validation_timesteps", "3", "--report_to", "tensorboard",
              "--validation_prompts", "a red cat", "--num_validation_images", "1", "--validation_sampling_steps", "2"]
    straight = tmp_path / "straight"
    result = accelerate_launch(tiny_train_args(tiny["sd15"], tiny["data"], str(straight), *common))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    validation = {m["step"]: m for m in lines if "val_implicit_acc" in m}
    assert sorted(validation) == [0, 2, 4]
    assert validation[0]["val_winner_minus_ref"] == 0.0 and validation[0]["val_logit"] == 0.0  # policy == reference
    assert validation[4]["val_winner_minus_ref"] != 0.0
    assert {"val_implicit_acc", "val_loser_minus_ref", "val_loss"} <= set(validation[4])
    assert validation[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-7)
    for step in (0, 2, 4):
        assert (straight / "validation" / f"step-{step}" / "0-0.png").exists()
    tags = set()
    for root, _, files in os.walk(straight / "logs"):
        if any(f.startswith("events.") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])
    assert {"val_implicit_acc", "val_logit", "validation"} <= tags
    # The same weights give the same numbers, bitwise: resume from step 2 in a new process.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    result = accelerate_launch(tiny_train_args(tiny["sd15"], tiny["data"], str(resumed), *common))
    assert result.returncode == 0, result.stderr[-3000:]
    again = {m["step"]: m for m in map(json.loads, open(resumed / "metrics.jsonl")) if "val_implicit_acc" in m}
    assert again[4] == validation[4]
    # Validation draws nothing from the training's random streams: the weights are those of a run
    # without it.
    plain = tmp_path / "plain"
    result = accelerate_launch(tiny_train_args(tiny["sd15"], tiny["data"], str(plain), "--max_train_steps", "4",
                                               "--checkpointing_steps", "2", "--validation_pairs", "6"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = unet_weights(straight / "unet"), unet_weights(plain / "unet")
    assert same_tensors(a, b)


def test_plot_run_draws_training_and_validation_curves(tiny, tmp_path):
    metrics = [{"step": 0, "val_implicit_acc": 0.0, "val_loss": 0.69}]
    metrics += [{"step": s, "loss": 0.7 - 0.01 * s, "implicit_acc": 0.5, "grad_norm": 1.0} for s in range(1, 6)]
    metrics += [{"step": 5, "val_implicit_acc": 0.6, "val_loss": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_run.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    pixels = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB")).reshape(-1, 3).astype(int)
    near = lambda rgb: int((np.abs(pixels - rgb).sum(axis=1) < 30).sum())  # noqa: E731
    assert near((31, 119, 180)) > 50 and near((255, 127, 14)) > 50  # validation (blue) and training (orange)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_run.py"), str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().startswith("error:")


def test_fp16_gradient_scaler_paths():
    """train_step under fp16's gradient scaler (a real torch GradScaler, on CPU): an overflow lowers
    the scale with no update and is not a failure; a non-finite loss with finite gradients skips
    the update and leaves the scaler ready for the next step; then a normal step updates."""
    import contextlib
    import types

    import train

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    class Accelerator:  # what train_step uses of accelerate's, with accelerate's scaler calls
        def __init__(self):
            self.scaler = scaler

        def no_sync(self, module):
            return contextlib.nullcontext()

        def backward(self, loss):
            scaler.scale(loss).backward()

        def clip_grad_norm_(self, params, max_norm):
            scaler.unscale_(sgd)
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

        def reduce(self, tensor, reduction):
            return tensor

    class Optimizer:  # accelerate's AcceleratedOptimizer.step under fp16
        def step(self):
            scaler.step(sgd)
            scaler.update()

        def zero_grad(self, set_to_none=True):
            sgd.zero_grad(set_to_none=set_to_none)

    losses = iter([lambda y: y.sum() * 1e36, lambda y: y.sum() + float("nan"), lambda y: y.sum()])
    run = types.SimpleNamespace(
        args=types.SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=1.0), accelerator=Accelerator(),
        unet=model, optimizer=Optimizer(), lr_scheduler=torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0),
        compute_loss=lambda batch: (next(losses)(model(torch.ones(2, 3))), {}))
    batches = iter(range(3))
    before = model.weight.detach().clone()
    _, status = train.train_step(run, batches)
    assert status == "overflow" and scaler.get_scale() == 2.0**15 and torch.equal(model.weight, before)
    _, status = train.train_step(run, batches)
    assert status == "skipped" and torch.equal(model.weight, before)
    _, status = train.train_step(run, batches)  # no "unscale_() has already been called"
    assert status == "stepped" and not torch.equal(model.weight, before)
