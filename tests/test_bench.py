"""bench.py on the tiny pipeline: the FLOP accounting adds up, the reference part is a forward of the
reference UNet on the step's own inputs, and every mode writes its JSON."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench


def bench_args(tiny, *extra):
    return bench.parse_args(["--pretrained", tiny["sd15"], "--resolution", "32", "--batch_size", "2", "--steps", "1",
                             "--warmup", "0", "--device", "cpu", *extra])


@pytest.mark.parametrize("latent_cache", [False, True])
def test_flop_accounting(tiny, latent_cache):
    args = bench_args(tiny, *(["--latent_cache"] if latent_cache else []))
    meta = torch.device("meta")  # as bench.py counts
    run, batches = bench.build_run(args, bench.model_parts(args, meta), meta, latent_cache=latent_cache)
    seen = []
    forward = run.reference.unet.forward

    def spy(*inputs, **kwargs):
        seen.append((inputs, kwargs))
        return forward(*inputs, **kwargs)

    run.reference.unet.forward = spy
    flops = bench.count_flops(run, batches)
    parts = {k: flops[k] for k in ("vae", "text", "policy", "reference", "optimizer")}
    assert flops["total"] == sum(parts.values()) > 0
    assert (parts["vae"] == 0) == latent_cache and parts["text"] > 0
    # The optimizer's part is estimated from AdamW's update rule and the gradient norm, per parameter.
    trainable = sum(p.numel() for p in run.unet.parameters() if p.requires_grad)
    assert parts["optimizer"] == (14 + 3) * trainable
    # The reference part is one forward of the reference UNet on the same inputs, counted apart.
    inputs, kwargs = seen[0]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward(*inputs, **kwargs)
    assert parts["reference"] == counter.get_total_flops()
    # The policy's forward alone (what gradient checkpointing recomputes) has the reference's shapes.
    assert flops["policy_forward"] == parts["reference"]
    # The policy runs forward and backward on the same shapes: about three forwards.
    assert 2.5 < parts["policy"] / parts["reference"] < 3.01


def test_lora_counts_the_adapters_off_forward_as_the_reference(tiny):
    """With LoRA there is no second UNet: the reference part is the policy's own forward with its
    adapters off, counted apart; only the adapters are trainable."""
    full = bench.main(["--pretrained", tiny["sd15"], "--resolution", "32", "--batch_size", "2", "--count_only"])
    lora = bench.main(["--pretrained", tiny["sd15"], "--resolution", "32", "--batch_size", "2", "--count_only",
                       "--use_lora", "--lora_rank", "4"])
    assert lora["use_lora"] and lora["lora_rank"] == 4
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] / 10
    assert lora["unet_parameters"] == full["unet_parameters"] + lora["trainable_parameters"]
    assert lora["flops"]["reference"] == full["flops"]["reference"] > 0  # the base UNet's forward, bitwise the count
    assert lora["flops"]["optimizer"] * 2 == (14 + 3) * lora["trainable_parameters"]  # per pair, batch 2
    eight_bit = bench.main(["--pretrained", tiny["sd15"], "--resolution", "32", "--batch_size", "2", "--count_only",
                            "--use_lora", "--lora_rank", "4", "--use_8bit_adam"])
    assert eight_bit["optimizer"] == "AdamW8bit"
    assert eight_bit["flops"]["optimizer"] * 2 == (20 + 3) * lora["trainable_parameters"]
    # The frozen base needs no weight gradients: the policy's backward costs about one forward, not two.
    assert 1.5 * lora["flops"]["reference"] < lora["flops"]["policy"] < 0.8 * full["flops"]["policy"]


def test_every_mode_writes_its_json(tiny, tmp_path):
    train_json, sample_json, loader_json = (str(tmp_path / f"{m}.json") for m in ("train", "sample", "loader"))
    bench.main(["--pretrained", tiny["sd15"], "--resolution", "32", "--batch_size", "2", "--steps", "1", "--warmup",
                "0", "--device", "cpu", "--json", train_json])
    result = json.load(open(train_json))
    for key in ("flops_per_pair", "flops", "step_seconds", "pairs_per_second", "peak_memory_bytes", "mfu"):
        assert key in result, key
    assert set(result["flops"]) == {"vae", "text", "policy", "reference", "optimizer"}
    assert result["mfu"] is None and result["step_times"] == [result["step_seconds"]]  # one timed step, no warm-up
    assert result["pairs_per_second"] == pytest.approx(2 / result["step_seconds"])
    assert result["flops_per_pair"] == pytest.approx(sum(result["flops"].values()))

    bench.main(["--pretrained", tiny["sd15"], "--resolution", "32", "--batch_size", "2", "--count_only", "--json",
                str(tmp_path / "count.json")])
    counted = json.load(open(tmp_path / "count.json"))
    assert counted["flops"] == result["flops"] and counted["step_seconds"] is None
    # Gradient checkpointing recomputes the policy's forward, here on the winners alone (sft): half
    # the reference forward of a DPO step on both images of each pair.
    bench.main(["--pretrained", tiny["sd15"], "--resolution", "32", "--batch_size", "2", "--count_only", "--json",
                str(tmp_path / "sft.json"), "--train_method", "sft", "--gradient_checkpointing"])
    sft = json.load(open(tmp_path / "sft.json"))
    assert sft["optimizer"] == "AdamW" and sft["flops"]["reference"] == 0
    assert 2 * sft["recompute_flops_per_pair"] == result["flops"]["reference"] > 0

    bench.main(["--pretrained", tiny["sd15"], "--mode", "sample", "--resolution", "32", "--batch_size", "2",
                "--steps", "1", "--warmup", "0", "--sample_steps", "3", "--device", "cpu", "--json", sample_json])
    sample = json.load(open(sample_json))
    assert sample["images_per_second"] == pytest.approx(2 / sample["batch_seconds"])
    # One more denoising step costs one UNet forward on the conditional and unconditional batch.
    counted = {steps: bench.main(["--pretrained", tiny["sd15"], "--mode", "sample", "--resolution", "32",
                                  "--batch_size", "2", "--sample_steps", str(steps), "--count_only"])
               for steps in (3, 4)}
    assert counted[3]["flops_per_image"] == sample["flops_per_image"]
    _, encoders, _, unet, _ = bench.model_parts(bench_args(tiny, "--train_method", "sft"), torch.device("meta"))
    with FlopCounterMode(display=False) as counter:
        unet(torch.zeros(4, 4, 4, 4, device="meta"), torch.zeros((), device="meta"),
             encoder_hidden_states=torch.zeros(4, 77, encoders[0].config.hidden_size, device="meta"))
    assert 2 * (counted[4]["flops_per_image"] - counted[3]["flops_per_image"]) == counter.get_total_flops() > 0

    bench.main(["--mode", "loader", "--resolution", "32", "--batch_size", "2", "--loader_pairs", "8",
                "--workers", "0", "--json", loader_json])
    loader = json.load(open(loader_json))
    rates = loader["pairs_per_second"]
    assert set(rates) == {"parquet", "cache"} and all(set(r) == {"0"} and r["0"] > 0 for r in rates.values())


@pytest.mark.parametrize("arch,frames", [("wan21", 5), ("cogvideox", 9)])
def test_video_architectures_are_counted_and_timed(tiny_video, arch, frames):
    """--arch wan21|cogvideox on the tiny video pipelines: the step's parts add up, the policy is
    about three reference forwards, a CPU step is timed, and one more sampling step costs one
    transformer forward on the conditional and unconditional clips."""
    common = ["--arch", arch, "--pretrained", tiny_video[arch], "--height", "32", "--width", "32", "--num_frames",
              str(frames), "--batch_size", "1", "--steps", "1", "--warmup", "0", "--device", "cpu",
              "--no-gradient_checkpointing"]
    result = bench.main(common)
    parts = result["flops"]
    assert result["flops_per_pair"] == pytest.approx(sum(parts.values())) and parts["vae"] > 0 and parts["text"] > 0
    assert 2.5 < parts["policy"] / parts["reference"] < 3.01
    assert result["step_seconds"] > 0 and result["unet_parameters"] == result["trainable_parameters"]
    counted = [bench.main([*common, "--mode", "sample", "--sample_steps", str(n), "--count_only"])["flops_per_image"]
               for n in (3, 4)]
    assert counted[1] > counted[0] > 0
    for bad in (["--arch", "sd15", "--num_frames", "5", "--count_only"],
                ["--arch", arch, "--mode", "sample", "--device", "cpu"],
                ["--arch", arch, "--resolution", "32", "--count_only"],
                ["--arch", arch, "--num_frames", "6", "--count_only"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(bad)
        assert exit_info.value.code == 2
