"""LoRA on the tiny models: the base with its adapters off is the reference (no second UNet), so
the first Diffusion-DPO loss is exactly log 2; only the adapters train and are saved; resume is
bitwise; the output loads with diffusers' `load_lora_weights` and reproduces the trained UNet."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import accelerate_launch, same_tensors, tiny_train_args
from sdpo import lora
from test_train import run_in_process, unet_weights

import train

LOG_2 = float(torch.nn.functional.softplus(torch.zeros(())))  # -log sigmoid(0) in fp32


def unet_inputs(unet, seed=0):
    """Fixed inputs for a tiny UNet (SD1.5 or SDXL conditioning)."""
    g = torch.Generator().manual_seed(seed)
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), kwargs


@torch.no_grad()
def unet_output(unet, inputs):
    sample, t, kwargs = inputs
    return unet(sample, t, **kwargs).sample


def base_unet(tiny, arch="sd15"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny[arch], subfolder="unet").eval()


def lora_args(tiny, out, *extra, arch="sd15"):
    flags = ["--use_lora", "--lora_rank", "4", "--checkpointing_steps", "0", *extra]
    if arch == "sdxl":
        flags += ["--sdxl", "--no-use_adafactor", "--no-gradient_checkpointing"]
    return tiny_train_args(tiny[arch], tiny["data"], str(out), *flags)


def test_adapters_off_is_the_base_bitwise_and_survives_an_error(tiny):
    unet, base = base_unet(tiny), base_unet(tiny)
    lora.add_adapters(unet, 4, None, 0.0, lora.DEFAULT_TARGETS)
    inputs = unet_inputs(unet)
    assert torch.equal(unet_output(unet, inputs), unet_output(base, inputs))  # lora_B starts at 0
    with torch.no_grad():
        for p in lora.trainable_parameters(unet):
            p.add_(0.05 * torch.randn_like(p))
    adapted = unet_output(unet, inputs)
    assert not torch.equal(adapted, unet_output(base, inputs))
    reference = lora.AdaptersOff(unet)
    assert torch.equal(reference(inputs[0], inputs[1], **inputs[2]), unet_output(base, inputs))
    with pytest.raises(RuntimeError, match="inside"):
        with lora.adapters_disabled(unet):
            raise RuntimeError("an error inside")
    assert torch.equal(unet_output(unet, inputs), adapted)  # the adapters are on again
    # Only the adapters train: 4 projections x (A + B) per attention, rank 4.
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_first_step_loss_is_exactly_log_2_and_only_adapters_are_saved(tiny, tmp_path, arch, monkeypatch):
    loaded = []
    original = train.load_models
    monkeypatch.setattr(train, "load_models", lambda args: loaded.append(original(args)) or loaded[-1])
    run_in_process(lora_args(tiny, tmp_path, "--max_train_steps", "2", arch=arch))
    assert loaded[0][4] is None  # no second UNet: the reference is the policy with its adapters off
    first, second = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert first["loss"] == LOG_2 and first["winner_minus_ref"] == 0.0 and first["loser_minus_ref"] == 0.0
    assert second["winner_minus_ref"] != 0.0
    assert not (tmp_path / "unet").exists()
    saved = load_file(tmp_path / lora.LORA_WEIGHTS)
    assert saved and all(k.startswith("unet.") and ".lora" in k for k in saved)
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert config["use_lora"] and config["derived"]["reference_role"] == "adapters-off"
    card = (tmp_path / "README.md").read_text()
    assert "load_lora_weights" in card


GRID = [("diffusion-dpo", True, "importance"), ("dspo", True, "clip-mask"), ("dmpo", False, "none"),
        ("sft", False, "importance")]


@pytest.mark.parametrize("method,safeguard,weighting", GRID)
def test_every_objective_trains_the_adapters_only(tiny, tmp_path, method, safeguard, weighting):
    extra = ["--train_method", method, "--max_train_steps", "2", "--timestep_weighting", weighting,
             "--is_mask_threshold", "0", "--beta_dpo", "0.5" if method == "dspo" else "50", "--dmpo_alpha", "0.01",
             "--learning_rate", "1e-2"]
    if safeguard:
        extra += ["--use_winner_preserving", "--winner_preserving_mu", "0.6"]
    logs = run_in_process(lora_args(tiny, tmp_path, *extra))
    assert math.isfinite(logs["loss"])
    if weighting != "none":
        assert logs["importance_weight"] != 1.0
    if safeguard:
        assert 0.0 <= logs["loser_scale"] <= 1.0
    saved = load_file(tmp_path / lora.LORA_WEIGHTS)
    assert any(".lora.up." in k and v.abs().max() > 0 for k, v in saved.items())  # lora_B (up) moved from 0


def test_load_lora_weights_reproduces_the_trained_unet(tiny, tmp_path, monkeypatch):
    """The diffusers pipeline, given the output folder, computes what the trained UNet computed;
    --merge_lora writes the same UNet merged."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    inputs = unet_inputs(base_unet(tiny))
    trained = {}
    original = train.save_final

    def spy(run):
        unet = run.accelerator.unwrap_model(run.unet).eval()
        trained["out"] = unet_output(unet, inputs)
        trained["off"] = run.reference(inputs[0], inputs[1], **inputs[2])
        original(run)

    monkeypatch.setattr(train, "save_final", spy)
    run_in_process(lora_args(tiny, tmp_path, "--max_train_steps", "2", "--learning_rate", "1e-2",
                             "--lora_alpha", "8", "--merge_lora"))
    base = base_unet(tiny)
    assert torch.equal(trained["off"], unet_output(base, inputs))  # the base never changed
    assert not torch.allclose(trained["out"], trained["off"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd15"], safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path))
    assert torch.equal(unet_output(pipe.unet, inputs), trained["out"])  # alpha 8 / rank 4 came back too
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    merged = UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet").eval()
    torch.testing.assert_close(unet_output(merged, inputs), trained["out"], rtol=1e-4, atol=1e-5)


def test_lora_resume_is_bitwise_exact(tiny, tmp_path):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--use_winner_preserving", "--winner_preserving_mu", "0.5", "--timestep_weighting", "importance",
              "--learning_rate", "1e-2", "--lora_dropout", "0.1"]
    straight = tmp_path / "straight"
    result = accelerate_launch(lora_args(tiny, straight, *common))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = straight / "checkpoint-2"
    assert (checkpoint / "lora" / lora.ADAPTER_FILE).is_file() and not (checkpoint / "unet").exists()
    # The checkpoint holds the adapters alone: a small fraction of the UNet's size.
    unet_bytes = os.path.getsize(os.path.join(tiny["sd15"], "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.getsize(checkpoint / "lora" / lora.ADAPTER_FILE) < unet_bytes / 5
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    result = accelerate_launch(lora_args(tiny, resumed, *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    a, b = load_file(straight / lora.LORA_WEIGHTS), load_file(resumed / lora.LORA_WEIGHTS)
    assert same_tensors(a, b)
    mid = load_file(checkpoint / "lora" / lora.ADAPTER_FILE)
    assert not same_tensors(mid, load_file(straight / "checkpoint-4" / "lora" / lora.ADAPTER_FILE))


def test_a_checkpoint_of_other_adapters_is_refused(tiny, tmp_path, capsys):
    from test_train_inputs import expect_one_line_error

    run_in_process(lora_args(tiny, tmp_path, "--max_train_steps", "1", "--checkpointing_steps", "1"))
    # Another rank: the recorded settings differ.
    expect_one_line_error(capsys, lora_args(tiny, tmp_path, "--max_train_steps", "2", "--lora_rank", "2"),
                          "--lora_rank 4 there, 2 now")
    # A full fine-tune resuming LoRA adapters.
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--max_train_steps", "2"),
                          "--use_lora True there, False now")
    # Adapters of another shape, put in place by hand: the shapes are checked at load.
    unet = base_unet(tiny)
    lora.add_adapters(unet, 2, None, 0.0, lora.DEFAULT_TARGETS)
    with pytest.raises(Exception, match="other LoRA adapters than this run's"):
        lora.load_adapter_state(unet, load_file(tmp_path / "checkpoint-1" / "lora" / lora.ADAPTER_FILE), "here")


def test_lora_from_the_latent_cache_equals_lora_from_the_images(tiny, tmp_path):
    from test_cache import build_cache

    build_cache(tiny["sd15"], tiny["data"], tmp_path / "cache")
    common = ["--max_train_steps", "2", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
              "--learning_rate", "1e-2", "--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    run_in_process(lora_args(tiny, tmp_path / "images", *common))
    run_in_process(lora_args(tiny, tmp_path / "cached", *common, "--latent_cache", str(tmp_path / "cache")))
    a, b = (load_file(tmp_path / run / lora.LORA_WEIGHTS) for run in ("images", "cached"))
    assert same_tensors(a, b)


def test_lora_compiles_and_trains_like_eager(tiny, tmp_path):
    """--compile with LoRA: the policy's graph runs with its adapters on and off (the reference),
    and trains as eager does within float tolerance."""
    common = ["--max_train_steps", "2", "--learning_rate", "1e-2"]
    eager = run_in_process(lora_args(tiny, tmp_path / "eager", *common))
    torch._dynamo.reset()
    compiled = run_in_process(lora_args(tiny, tmp_path / "compiled", *common, "--compile"))
    first = json.loads(open(tmp_path / "compiled" / "metrics.jsonl").readline())
    assert first["loss"] == pytest.approx(math.log(2), abs=2e-4)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-3)
    a, b = (load_file(tmp_path / run / lora.LORA_WEIGHTS) for run in ("eager", "compiled"))
    assert a.keys() == b.keys()
    update = lambda w: torch.cat([w[k].flatten() for k in sorted(w) if ".up." in k])  # noqa: E731  (B started at 0)
    assert torch.nn.functional.cosine_similarity(update(a), update(b), dim=0) > 0.999


def test_lora_with_validation_and_fp32_losses_under_bf16(tiny, tmp_path, monkeypatch):
    """The options around the loss work with LoRA: bf16 with fp32 losses, held-out validation and
    validation images; the base stays in bf16 and the adapters in fp32."""
    dtypes, validations = {}, []
    original = train.save_final

    def spy(run):
        for name, p in run.accelerator.unwrap_model(run.unet).named_parameters():
            dtypes.setdefault("adapters" if p.requires_grad else "base", set()).add(p.dtype)
        # Validation runs without LoRA's dropout: the same weights give the same numbers.
        validations.extend([run.validation(), run.validation()])
        assert run.unet.training
        original(run)

    monkeypatch.setattr(train, "save_final", spy)
    logs = run_in_process(lora_args(
        tiny, tmp_path, "--max_train_steps", "2", "--mixed_precision", "bf16", "--loss_precision", "fp32",
        "--validation_pairs", "4", "--validation_steps", "1", "--validation_prompts", "a cat",
        "--validation_sampling_steps", "2", "--use_winner_preserving", "--winner_preserving_mu", "0.9",
        "--lora_dropout", "0.5", "--learning_rate", "1e-2", "--merge_lora"))
    assert math.isfinite(logs["loss"])
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    val = [m for m in metrics if "val_implicit_acc" in m]
    assert val[0]["val_winner_minus_ref"] == 0.0  # before the first step the policy is the reference
    assert (tmp_path / "validation" / "step-2" / "0-0.png").is_file()
    assert dtypes == {"base": {torch.bfloat16}, "adapters": {torch.float32}}
    assert validations[0] == validations[1] and validations[0]["val_winner_minus_ref"] != 0.0
    # --merge_lora merges into a fresh fp32 copy of the base: the untouched weights are the base's, bitwise.
    merged, base = unet_weights(tmp_path / "unet"), unet_weights(os.path.join(tiny["sd15"], "unet"))
    assert all(v.dtype == torch.float32 for v in merged.values())
    untouched = [k for k in base if not any(f".{t}." in k for t in lora.DEFAULT_TARGETS)]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)
    assert any(not torch.equal(merged[k], base[k]) for k in base if k not in untouched)
    saved = load_file(tmp_path / lora.LORA_WEIGHTS)
    assert all(v.dtype == torch.float32 for v in saved.values())


@pytest.fixture(scope="module")
def trained_lora(tiny, tmp_path_factory):
    """A LoRA output folder whose adapters visibly change the images (a large learning rate)."""
    out = tmp_path_factory.mktemp("lora-out")
    run_in_process(lora_args(tiny, out, "--max_train_steps", "2", "--learning_rate", "0.1", "--lora_alpha", "8"))
    return str(out)


def test_generation_takes_a_lora_folder_and_records_it(tiny, trained_lora, tmp_path):
    from eval.generate import main as generate_main
    from eval.prompts import record, write_suite

    suite = str(tmp_path / "prompts" / "papv2.json")
    write_suite([record(p) for p in ("a red cat", "a blue house")], suite)
    common = ["--pretrain_path", tiny["sd15"], "--test_json", suite, "--height", "32", "--width", "32", "--steps", "3"]
    base = generate_main(["--unet_path", "base", "--output_path", str(tmp_path / "base"), *common])
    # A LoRA folder where a checkpoint goes: the base with the LoRA, images beside the LoRA.
    tuned = generate_main(["--unet_path", trained_lora, *common])
    assert tuned.startswith(trained_lora)
    pixels = lambda m: [np.asarray(Image.open(r["gen_image_path"])) for r in json.load(open(m))]  # noqa: E731
    assert not np.array_equal(pixels(base)[0], pixels(tuned)[0])
    record_file = os.path.join(tuned[: -len(".json")], "generation.json")
    provenance = json.load(open(record_file))["model"]
    assert provenance["unet_path"] == "base"
    assert provenance["lora_path"]["path"] == os.path.abspath(os.path.join(trained_lora, lora.LORA_WEIGHTS))
    # The same LoRA named with --lora_path: the record matches, every image is kept.
    again = generate_main(["--unet_path", "base", "--lora_path", trained_lora, "--output_path", trained_lora, *common])
    assert again == tuned and [a.tobytes() for a in pixels(again)] == [a.tobytes() for a in pixels(tuned)]


def test_generation_refuses_a_lora_of_another_base(tiny, tmp_path, capsys):
    from eval.generate import main as generate_main
    from eval.prompts import record, write_suite
    from sdpo.tiny import build_tiny_pipeline

    sdxl_lora = tmp_path / "sdxl-lora"
    run_in_process(lora_args(tiny, sdxl_lora, "--max_train_steps", "1", arch="sdxl"))
    suite = str(tmp_path / "papv2.json")
    write_suite([record("a red cat")], suite)
    os.remove(sdxl_lora / "train_config.json")  # a LoRA from elsewhere: only its shapes tell
    other = tmp_path / "other-sd15"
    build_tiny_pipeline(str(other), seed=1)  # the same shapes, other weights
    local_lora = tmp_path / "sd15-lora"
    run_in_process(lora_args(tiny, local_lora, "--max_train_steps", "1"))
    cases = [(["--unet_path", str(sdxl_lora)], tiny["sd15"], "its adapters do not fit this UNet"),
             (["--unet_path", "base", "--lora_path", str(sdxl_lora)], tiny["sd15"], "its adapters do not fit this UNet"),
             (["--unet_path", "base", "--lora_path", str(tmp_path)], tiny["sd15"], "not a folder holding"),
             # train.py's record beside the LoRA names the base it was trained on.
             (["--unet_path", str(local_lora)], str(other), f"was trained on {tiny['sd15']}, not on --pretrain_path"),
             (["--unet_path", os.path.join(tiny["sd15"], "unet"), "--lora_path", str(local_lora)], tiny["sd15"],
              "not on --unet_path")]
    for flags, base, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            generate_main([*flags, "--pretrain_path", base, "--test_json", suite, "--output_path",
                           str(tmp_path / "images"), "--height", "32", "--width", "32", "--steps", "2"])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and fragment in last, (fragment, last)


def test_8bit_adam_keeps_its_moments_in_8_bits_and_resumes_bitwise(tiny, tmp_path):
    """bitsandbytes' AdamW8bit (it runs on a CPU from 0.50): the moments of every tensor of at least
    4096 elements are stored as uint8 codes with block maxima; a resume continues bitwise."""
    common = ["--use_8bit_adam", "--max_train_steps", "2", "--checkpointing_steps", "1", "--learning_rate", "1e-3"]
    straight = tmp_path / "straight"
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(straight), *common))
    config = json.loads((straight / "train_config.json").read_text())
    assert config["derived"]["optimizer"] == "AdamW8bit"
    state = torch.load(straight / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    state = [s.get("__bnb_optimizer_quant_state__", s) for s in state.values()]  # how bitsandbytes saves it
    quantised = [s for s in state if s["state1"].dtype == torch.uint8]
    assert quantised and all(s["state2"].dtype == torch.uint8 and "absmax1" in s for s in quantised)
    weights = unet_weights(os.path.join(tiny["sd15"], "unet"))
    assert len(quantised) == sum(1 for v in weights.values() if v.numel() >= 4096)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(resumed), *common))
    assert same_tensors(unet_weights(straight / "unet"), unet_weights(resumed / "unet"))


def test_8bit_adam_without_bitsandbytes_ends_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    import sys

    from test_train_inputs import expect_one_line_error

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: import raises ImportError
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--use_8bit_adam"),
                          "--use_8bit_adam: bitsandbytes cannot be used here", "pip install bitsandbytes")


def test_the_adapters_off_reference_has_the_reference_numerics_under_bf16(tiny, tmp_path, monkeypatch):
    """--loss_precision reference: the adapters-off reference runs in pure bf16 without autocast,
    as a frozen copy does (not under the autocast that accelerator.prepare puts on the policy)."""
    seen = []
    predict = train.MicroBatchLoss.predict

    def spy(self, *args, **kwargs):
        out = predict(self, *args, **kwargs)
        seen.append((out[0].dtype, out[1].dtype))
        return out

    monkeypatch.setattr(train.MicroBatchLoss, "predict", spy)
    run_in_process(lora_args(tiny, tmp_path, "--max_train_steps", "1", "--mixed_precision", "bf16"))
    assert seen[0] == (torch.float32, torch.bfloat16)  # the policy under autocast, the reference in bf16


def test_lora_under_ddp_with_two_processes_resumes_bitwise(tiny, tmp_path):
    """Two CPU processes (gloo): the adapters-off reference runs on the bare UNet beside DDP, the
    gradients of the adapters are reduced, and a resume is bitwise."""
    from test_fsdp import run_two

    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--learning_rate", "1e-2", "--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    straight = tmp_path / "straight"
    result = run_two(lora_args(tiny, straight, *common), sharded=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 pairs per step (2 per process x 2 accumulation x 2 processes)" in result.stderr
    first = json.loads(open(straight / "metrics.jsonl").readline())
    assert first["loss"] == LOG_2
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    result = run_two(lora_args(tiny, resumed, *common), sharded=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert same_tensors(load_file(straight / lora.LORA_WEIGHTS), load_file(resumed / lora.LORA_WEIGHTS))


def test_a_checkpoint_from_before_lora_resumes_without_it():
    """Checkpoints written before --use_lora existed record no LoRA settings: they resume as full
    fine-tunes, and are refused with --use_lora. Without --use_lora the lora_* values do not count."""
    from sdpo import checkpoints
    from sdpo.errors import InputError

    old = {"train_method": "diffusion-dpo", "beta_dpo": 5000.0, "num_processes": 1}
    now = checkpoints.result_settings({**old, "use_lora": False, "use_8bit_adam": False, "lora_rank": 16,
                                       "derived": {"num_processes": 1}})
    checkpoints.check_same_settings("checkpoint-1", old, now)
    lora_now = checkpoints.result_settings({**old, "use_lora": True, "use_8bit_adam": False, "lora_rank": 8,
                                            "derived": {"num_processes": 1}})
    with pytest.raises(InputError, match="--lora_rank None there, 8 now"):
        checkpoints.check_same_settings("checkpoint-1", old, lora_now)
