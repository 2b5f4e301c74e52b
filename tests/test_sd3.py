"""SD3/SD3.5 (rectified flow, an MMDiT transformer, three text encoders) trained on the tiny SD3
pipeline: the first Diffusion-DPO loss is exactly log 2 with every objective and weighting, the
safeguard's inequality holds on the transformer's own outputs, a resume is bitwise, the latent
cache and --no_t5 work, the output loads into StableDiffusion3Pipeline, and bad input stops in
one line."""

import json
import math
import os
import shutil

import pytest
import torch

from conftest import accelerate_launch, same_tensors, tiny_train_args
from test_train import run_in_process, unet_weights

LOG_2 = float(torch.tensor(math.log(2), dtype=torch.float32))  # log 2 in fp32, as the loss is computed


def transformer_weights(folder):
    return unet_weights(os.path.join(folder, "transformer"))


def first_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


GRID = [(method, safeguard, weighting)
        for method in ("diffusion-dpo", "dspo", "dmpo")
        for safeguard in (False, True)
        for weighting in ("none", "clip-mask", "importance")]
GRID += [("sft", False, w) for w in ("none", "importance")]


@pytest.mark.parametrize("method,safeguard,weighting", GRID)
def test_every_objective_trains_sd3(tiny, tmp_path, method, safeguard, weighting):
    extra = ["--max_train_steps", "2", "--checkpointing_steps", "0", "--train_method", method,
             "--timestep_weighting", weighting, "--is_mask_threshold", "0.0"]
    if safeguard:
        extra += ["--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    run_in_process(tiny_train_args(tiny["sd3"], tiny["data"], str(tmp_path), *extra))
    rows = first_rows(tmp_path)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if method == "diffusion-dpo" and weighting != "importance":  # (importance weights are not 1 at step 0)
        assert rows[0]["loss"] == LOG_2  # policy = reference at step 0: u = 0 exactly
    if weighting != "none":
        assert 0.0 <= rows[0]["kept_fraction"] <= 1.0 and rows[0]["importance_weight"] > 0
    base = unet_weights(os.path.join(tiny["sd3"], "transformer"))
    trained = transformer_weights(tmp_path)
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
    assert not os.path.exists(tmp_path / "unet")


def test_sigmas_follow_the_flags_of_diffusers_examples(tiny, tmp_path, monkeypatch):
    """The grid indices a run draws are those of compute_density_for_timestep_sampling with the
    run's flags, and the transformer gets the scheduler's timesteps at them (sigma * 1000)."""
    import train

    seen = []
    predict = train.MicroBatchLoss.predict

    def spy(self, latents, noise, t, batch, with_grad=True):
        seen.append((self.noise.weighting, self.noise.logit_mean, t.clone(), self.noise.model_timesteps(t)))
        return predict(self, latents, noise, t, batch, with_grad)

    monkeypatch.setattr(train.MicroBatchLoss, "predict", spy)
    run_in_process(tiny_train_args(tiny["sd3"], tiny["data"], str(tmp_path), "--max_train_steps", "1",
                                   "--weighting_scheme", "mode", "--logit_mean", "0.3"))
    weighting, mean, t, timesteps = seen[0]
    assert (weighting, mean) == ("mode", 0.3)
    assert torch.equal(t[:2], t[2:])  # a pair shares its sigma
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny["sd3"], subfolder="scheduler")
    assert torch.equal(timesteps, scheduler.timesteps[t])


def test_the_safeguard_inequality_holds_on_the_transformers_outputs(tiny):
    """With the tiny SD3 transformer's own predictions on noised latents, the output-space step
    -gA + lambda gB does not increase the winners' loss to first order: (-gA + lambda gB) . gA <=
    -mu ||gA||^2, for one lambda per micro-batch and one per pair."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from sdpo.losses import winner_preserving_scale
    from sdpo.noise import RectifiedFlow

    model = SD3Transformer2DModel.from_pretrained(tiny["sd3"], subfolder="transformer")
    process = RectifiedFlow(FlowMatchEulerDiscreteScheduler.from_pretrained(tiny["sd3"], subfolder="scheduler"))
    g = torch.Generator().manual_seed(0)
    B = 3
    x0 = torch.randn(2 * B, 4, 16, 16, generator=g)
    eps = torch.randn(B, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)
    index = process.draw(B, generator=g).repeat(2)
    cond = torch.randn(B, 20, 64, generator=g).repeat(2, 1, 1)
    pooled = torch.randn(B, 64, generator=g).repeat(2, 1)
    pred = model(hidden_states=process.add_noise(x0, eps, index), timestep=process.model_timesteps(index),
                 encoder_hidden_states=cond, pooled_projections=pooled).sample.double().detach().requires_grad_()
    target = process.target(x0, eps, index).double()
    winners = (pred[:B] - target[:B]).pow(2).mean()
    losers = (pred[B:] - target[B:]).pow(2).mean()
    ga, gb = torch.autograd.grad(winners, pred)[0][:B], torch.autograd.grad(losers, pred)[0][B:]
    for mu in (0.0, 0.5, 0.9):
        lam = winner_preserving_scale(pred, target, mu)
        norm = float(ga.pow(2).sum())
        assert float(((-ga + lam * gb) * ga).sum()) <= -mu * norm * (1 - 1e-9)
        per_pair = winner_preserving_scale(pred, target, mu, per_sample=True)
        for i in range(B):
            a, b = ga[i] * B, gb[i] * B  # pair i's own gradients (its loss is a mean over one pair)
            assert float(((-a + per_pair[i] * b) * a).sum()) <= -mu * float(a.pow(2).sum()) * (1 - 1e-9)


def test_resume_is_bitwise_exact(tiny, tmp_path):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--use_winner_preserving", "--winner_preserving_mu", "0.5", "--timestep_weighting", "importance",
              "--proportion_empty_prompts", "0.3", "--train_batch_size", "1"]
    straight = tmp_path / "straight"
    result = accelerate_launch(tiny_train_args(tiny["sd3"], tiny["data"], str(straight), *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(straight / "checkpoint-2" / "transformer" / "config.json")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    result = accelerate_launch(tiny_train_args(tiny["sd3"], tiny["data"], str(resumed), *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    a, b = transformer_weights(straight), transformer_weights(resumed)
    assert same_tensors(a, b)
    assert first_rows(straight)[-1] == {**first_rows(resumed)[-1], "step_seconds": first_rows(straight)[-1]["step_seconds"]}


def test_training_from_the_cache_equals_training_from_the_images(tiny, tmp_path, monkeypatch):
    """The cache stores SD3's 16- (here 4-) channel posterior and T5's 77 token ids; the run
    shifts and scales the latents as from the images: bitwise the same weights and numbers."""
    import sdpo.data
    import sdpo.models
    from test_cache import build_cache

    build_cache(tiny["sd3"], tiny["data"], tmp_path / "cache")
    manifest = json.load(open(tmp_path / "cache" / "manifest.json"))
    assert manifest["shift_factor"] == 0.1 and manifest["settings"]["tokenizers"]["max_length"][2] == 77
    common = ["--max_train_steps", "3", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
              "--checkpointing_steps", "0", "--proportion_empty_prompts", "0.5", "--validation_pairs", "3",
              "--validation_steps", "3", "--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    run_in_process(tiny_train_args(tiny["sd3"], tiny["data"], str(tmp_path / "images"), *common))

    def forbidden(*args, **kwargs):
        raise AssertionError("training from the cache decoded an image or loaded the VAE")

    monkeypatch.setattr(sdpo.data, "decode_image", forbidden)
    monkeypatch.setattr(sdpo.models, "load_vae", forbidden)
    run_in_process(tiny_train_args(tiny["sd3"], tiny["data"], str(tmp_path / "cached"), *common,
                                   "--latent_cache", str(tmp_path / "cache")))
    assert same_tensors(transformer_weights(tmp_path / "images"), transformer_weights(tmp_path / "cached"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]  # noqa: E731
    assert strip(first_rows(tmp_path / "images")) == strip(first_rows(tmp_path / "cached"))


def test_without_t5_it_trains_validates_and_the_output_loads_into_the_pipeline(tiny, tmp_path):
    """--no_t5: no T5 is loaded, zeros stand in its place (as text_encoder_3=None); validation
    images are sampled; the output is a transformer/ folder that StableDiffusion3Pipeline loads."""
    import numpy as np
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    run_in_process(tiny_train_args(tiny["sd3"], tiny["data"], str(tmp_path), "--max_train_steps", "2", "--no_t5",
                                   "--validation_prompts", "a red cat", "--validation_steps", "2",
                                   "--validation_sampling_steps", "2"))
    assert first_rows(tmp_path)[0]["loss"] == LOG_2
    assert os.path.isfile(tmp_path / "validation" / "step-2" / "0-0.png")
    transformer = SD3Transformer2DModel.from_pretrained(str(tmp_path), subfolder="transformer")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny["sd3"], transformer=transformer, text_encoder_3=None,
                                                    tokenizer_3=None)
    image = pipe("a red cat", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    config = json.load(open(tmp_path / "train_config.json"))
    assert config["model_family"] == "sd3" and config["no_t5"] is True
    assert "stable-diffusion-3" in open(tmp_path / "README.md").read()


def test_the_prompt_encoding_is_the_pipelines(tiny):
    """Our SD3 conditioning equals StableDiffusion3Pipeline.encode_prompt's, with and without T5,
    at the pipeline's T5 length."""
    from diffusers import StableDiffusion3Pipeline

    from sdpo import families, models
    from sdpo.conditioning import PromptEncoder

    family = families.get("sd3")
    for no_t5 in (False, True):
        parts = {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny["sd3"], **parts)
        tokenizers, encoders = models.load_text_side(tiny["sd3"], family, no_t5=no_t5)
        ours = PromptEncoder(family, tokenizers, encoders, 32, pipe.transformer.config, sampling=True)(
            ["a red cat", ""], "cpu")
        with torch.no_grad():  # (attention picks other CPU kernels when gradients are wanted)
            embeds, _, pooled, _ = pipe.encode_prompt(["a red cat", ""], None, None, do_classifier_free_guidance=False)
        assert torch.equal(ours.encoder_hidden_states, embeds) and torch.equal(ours.pooled, pooled)


def test_generation_samples_sd3_as_its_pipeline(tiny, tmp_path):
    """eval.generate on SD3: the pipeline's scheduler, steps and guidance; the same image as
    StableDiffusion3Pipeline given the same initial noise (guidance_scale = cfg + 1), and the
    batch size changes no image."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    from eval.generate import main
    from sdpo.sampling import initial_noise

    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt": p, "gen_image_path": "", "raw_image_path": "", "metadata": {}}
                                 for p in ("a red cat", "a blue house", "a tiny boat")]))
    common = ["--unet_path", "base", "--pretrain_path", tiny["sd3"], "--test_json", str(suite), "--height", "32",
              "--width", "32", "--steps", "3", "--device", "cpu"]
    one = main([*common, "--output_path", str(tmp_path / "one"), "--batch_size", "1"])
    three = main([*common, "--output_path", str(tmp_path / "three"), "--batch_size", "3"])
    images = [[np.asarray(Image.open(r["gen_image_path"])) for r in json.load(open(m))] for m in (one, three)]
    assert all(np.array_equal(a, b) for a, b in zip(*images))
    assert "_3s_6.0cfg" in one  # SD3's default guidance, in the reference's formula
    record = json.load(open(os.path.join(one[: -len(".json")], "generation.json")))
    assert record["protocol"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny["sd3"])
    latents = initial_noise(1, 4, 32, 32, 2, 0, "cpu", torch.float32)
    theirs = pipe("a blue house", num_inference_steps=3, guidance_scale=7.0, height=32, width=32, latents=latents,
                  output_type="np").images[0]
    ours = images[0][1].astype(np.float64) / 255
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6  # the pipeline's float image, rounded to 8 bits


def test_sd3_bad_input_stops_in_one_line(tiny, tmp_path, capsys):
    from test_train_inputs import expect_one_line_error

    cases = [
        (["--sdxl"], "is an SD3 pipeline: remove --sdxl"),
        (["--logit_std", "0"], "--logit_std must be > 0"),
        (["--resolution", "40"], "--resolution 40: SD3 takes sizes that are multiples of 16"),
    ]
    for extra, message in cases:
        expect_one_line_error(capsys, tiny_train_args(tiny["sd3"], tiny["data"], str(tmp_path / "o"), *extra), message)
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "o"), "--no_t5"),
                          "--no_t5: ", "which has no T5 encoder")
    expect_one_line_error(capsys, tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "o"),
                                                  "--weighting_scheme", "mode"),
                          "--weighting_scheme applies to rectified flow (SD3); SD1.x draws timesteps uniformly")
    # A pipeline of a family we do not train: the families we do are named.
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    expect_one_line_error(capsys, tiny_train_args(str(flux), tiny["data"], str(tmp_path / "o")),
                          "is a FluxPipeline (FluxTransformer2DModel)", "SD3/SD3.5 (StableDiffusion3Pipeline)")


def test_the_sd3_eval_launcher_generates_scores_and_compares(tiny, tmp_path):
    """scripts/eval/test_sd3.sh generates with SD3's defaults (28 steps, cfg 6) unless told
    otherwise, scores every image, and versus compares two SD3 checkpoints by prompt."""
    from eval.prompts import record, write_suite
    from eval.tiny import as_flags, build_tiny_scorers
    from test_generate import launch

    suite = tmp_path / "prompts" / "papv2.json"
    write_suite([record(p) for p in ("a red cat", "a blue house", "a tiny boat")], str(suite))
    sources = as_flags(build_tiny_scorers(str(tmp_path / "scorers")))
    common = ["--pretrain_path", tiny["sd3"], "--prompts_dir", str(suite.parent), "--suites", "papv2",
              "--height", "32", "--width", "32", "--steps", "2", "--metrics", "clip", "pickscore", *sources]
    base = launch("test_sd3.sh", "base", "--output_path", str(tmp_path / "base"), *common)
    assert base.returncode == 0, base.stderr[-3000:]
    assert "| papv2_seed0_32x32_2s_6.0cfg |" in base.stdout
    run_in_process(tiny_train_args(tiny["sd3"], tiny["data"], str(tmp_path / "trained"), "--max_train_steps", "2",
                                   "--learning_rate", "1e-2"))
    other = launch("test_sd3.sh", str(tmp_path / "trained"), "--output_path", str(tmp_path / "trained"), *common)
    assert other.returncode == 0, other.stderr[-3000:]
    name = "papv2_seed0_32x32_2s_6.0cfg.json"
    vs = launch("test_vs.sh", "--json_a", str(tmp_path / "trained" / name), "--json_b", str(tmp_path / "base" / name),
                "--metrics", "clip", "pickscore", "--outdir", str(tmp_path / "vs"), *sources)
    assert vs.returncode == 0, vs.stderr[-3000:]
    summary = json.load(open(tmp_path / "vs" / "summary.json"))
    assert [m["total_pairs"] for m in summary["metrics"]] == [3, 3]


def test_bench_counts_sd3(tiny):
    """bench.py --arch sd3 on the tiny pipeline: the transformer's parts add up, T5 counts as text."""
    import bench

    args = bench.parse_args(["--arch", "sd3", "--pretrained", tiny["sd3"], "--resolution", "32", "--batch_size", "2",
                             "--steps", "1", "--warmup", "0", "--device", "cpu", "--count_only"])
    assert (args.use_adafactor, args.gradient_checkpointing) == (True, True)  # the SD3 launchers' settings
    meta = torch.device("meta")
    flops = bench.count_flops(*bench.build_run(args, bench.model_parts(args, meta), meta))
    parts = {k: flops[k] for k in ("vae", "text", "policy", "reference", "optimizer")}
    assert flops["total"] == sum(parts.values()) and all(v > 0 for v in parts.values())
    assert 2.5 < parts["policy"] / parts["reference"] < 3.01 and flops["policy_forward"] == parts["reference"]


def test_the_general_posterior_gives_the_ddpm_importance_weights():
    """Section 10's posterior, evaluated through sdpo.noise's general Gaussian form, gives the
    importance weights of section 5's DDPM closed forms (what SD1.5 and SDXL train with)."""
    from diffusers import DDPMScheduler

    from sdpo.noise import DDPM, GaussianProcess
    from sdpo.timesteps import log_weights

    for kind in ("epsilon", "v_prediction"):
        process = DDPM(DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012, prediction_type=kind))
        g = torch.Generator().manual_seed(0)
        t = torch.randint(0, 1000, (64,), generator=g)
        pred, target, z = (torch.randn(64, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
        closed = log_weights(pred, target, *process.importance_terms(t), z)
        general = log_weights(pred, target, *GaussianProcess.importance_terms(process, t), z)
        torch.testing.assert_close(general, closed, rtol=1e-9, atol=1e-12)


def test_compile_trains_sd3_like_eager(tiny, tmp_path):
    """--compile (inductor on a CPU) on the SD3 transformer and its reference copy: the first loss
    is exactly log 2 and the second follows eager's within 1e-3 (other kernels, other rounding;
    the runs drift apart further over more steps, 2.6e-3 at the third)."""
    common = ["--max_train_steps", "2", "--checkpointing_steps", "0"]
    run_in_process(tiny_train_args(tiny["sd3"], tiny["data"], str(tmp_path / "eager"), *common))
    run_in_process(tiny_train_args(tiny["sd3"], tiny["data"], str(tmp_path / "compiled"), *common, "--compile"))
    eager, compiled = first_rows(tmp_path / "eager"), first_rows(tmp_path / "compiled")
    assert compiled[0]["loss"] == eager[0]["loss"] == LOG_2
    for a, b in zip(eager[1:], compiled[1:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    assert transformer_weights(tmp_path / "compiled").keys() == transformer_weights(tmp_path / "eager").keys()


@pytest.mark.parametrize("launcher,expected", [("sd3_diffusion_dpo", ("diffusion-dpo", 5000.0, 0.6, 0.0, 1e-9)),
                                               ("sd3_dmpo", ("dmpo", 6000.0, 0.6, 0.01, 1e-9))])
def test_the_sd3_launchers_record_their_settings(tiny, tmp_path, launcher, expected):
    """The SD3 launchers (a dry run on the tiny SD3 pipeline): the documented settings, the SDXL
    launchers' memory savers, and the family read from the pipeline (no --sdxl)."""
    import subprocess

    from conftest import ROOT

    env = {**os.environ, "NUM_GPUS": "1", "MODEL_NAME": tiny["sd3"], "DATASET_NAME": tiny["data"],
           "OUTPUT_DIR": str(tmp_path)}
    overrides = ["--dry_run", "--resolution=32", "--train_batch_size=1", "--gradient_accumulation_steps=1",
                 "--dataloader_num_workers=0"]
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train", f"{launcher}.sh"), *overrides],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert (config["train_method"], config["beta_dpo"], config["winner_preserving_mu"], config["dmpo_alpha"],
            config["learning_rate"]) == expected
    assert config["model_family"] == "sd3" and not config["sdxl"] and config["weighting_scheme"] == "logit_normal"
    assert config["derived"]["optimizer"] == "Adafactor" and config["gradient_checkpointing"]
    assert config["use_winner_preserving"] and config["scale_lr"] and config["mixed_precision"] == "bf16"


def test_lora_on_sd3_trains_loads_into_the_pipeline_and_generates(tiny, tmp_path):
    """--use_lora on the SD3 transformer: the first loss is exactly log 2 (adapters start at 0, the
    reference is the transformer with its adapters off); the adapters load with the pipeline's
    load_lora_weights and give the merged transformer's output; eval.generate takes the LoRA folder."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from eval.generate import main as generate

    out = tmp_path / "lora"
    run_in_process(tiny_train_args(tiny["sd3"], tiny["data"], str(out), "--max_train_steps", "2",
                                   "--learning_rate", "1e-2", "--use_lora", "--merge_lora"))
    assert first_rows(out)[0]["loss"] == LOG_2
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny["sd3"])
    pipe.load_lora_weights(str(out))
    merged = SD3Transformer2DModel.from_pretrained(str(out), subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.full((2,), 500.0),
                  encoder_hidden_states=torch.randn(2, 20, 64, generator=g), pooled_projections=torch.randn(2, 64, generator=g))
    with torch.no_grad():
        adapted, fused = pipe.transformer(**inputs).sample, merged(**inputs).sample
        base = SD3Transformer2DModel.from_pretrained(tiny["sd3"], subfolder="transformer")(**inputs).sample
    torch.testing.assert_close(adapted, fused, rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3  # the adapters changed something
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt": "a red cat", "gen_image_path": "", "raw_image_path": "", "metadata": {}}]))
    manifest = generate(["--unet_path", str(out), "--pretrain_path", tiny["sd3"], "--test_json", str(suite),
                         "--height", "32", "--width", "32", "--steps", "2", "--device", "cpu",
                         "--output_path", str(tmp_path / "gen")])
    record = json.load(open(os.path.join(manifest[: -len(".json")], "generation.json")))
    assert "lora_path" not in record["model"]  # the folder holds transformer/: it is the merged model
    manifest = generate(["--unet_path", "base", "--lora_path", str(out), "--pretrain_path", tiny["sd3"],
                         "--test_json", str(suite), "--height", "32", "--width", "32", "--steps", "2",
                         "--device", "cpu", "--output_path", str(tmp_path / "gen-lora")])
    record = json.load(open(os.path.join(manifest[: -len(".json")], "generation.json")))
    assert record["model"]["lora_path"] and record["model"]["unet_path"] == "base"


def test_fsdp_shards_sd3_per_mmdit_block_and_resumes_bitwise(tiny, tmp_path):
    """scripts/accelerate/fsdp_sd3.yaml on two CPU processes (tests/fsdp_on_cpu.py, gloo): the
    transformer is sharded per JointTransformerBlock (AdamW: Adafactor cannot update shards), the
    checkpoints hold shards, the first loss is log 2, and a resume from step 2 is bitwise."""
    import subprocess
    import sys

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from conftest import ROOT

    parsed = launch_command_parser().parse_args(
        ["--config_file", os.path.join(ROOT, "scripts", "accelerate", "fsdp_sd3.yaml"), "--num_processes", "2",
         "train.py"])
    env = {k: v for k, v in prepare_multi_gpu_env(_validate_launch_command(parsed)[0]).items()
           if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "JointTransformerBlock"

    def run_two(out):
        args = tiny_train_args(tiny["sd3"], tiny["data"], str(out), "--max_train_steps", "4", "--checkpointing_steps",
                               "2", "--no-use_adafactor", "--use_winner_preserving", "--winner_preserving_mu", "0.5")
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 os.path.join(ROOT, "tests", "fsdp_on_cpu.py"), *args], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": ROOT, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                                     **env}, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run_two(tmp_path / "straight")
    assert os.path.isfile(tmp_path / "straight" / "checkpoint-2" / "sharded" / ".metadata")
    assert first_rows(tmp_path / "straight")[0]["loss"] == LOG_2
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert "resumed from" in run_two(tmp_path / "resumed").stderr
    assert same_tensors(transformer_weights(tmp_path / "straight"), transformer_weights(tmp_path / "resumed"))
