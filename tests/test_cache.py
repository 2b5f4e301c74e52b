"""The latent cache: training from it gives bitwise the weights of training from the images, a
killed build resumes, and a cache built for other settings is refused."""

import json

import pytest
import torch

from conftest import same_tensors, tiny_train_args
from test_train import run_in_process, unet_weights


def build_cache(model, data, out, *extra):
    from sdpo.cache import main

    return main(["--pretrained_model_name_or_path", model, "--dataset_name", data, "--output_dir", str(out),
                 "--resolution", "32", "--mixed_precision", "no", "--encode_batch_size", "2", "--shard_pairs", "16",
                 "--device", "cpu", *extra])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_training_from_the_cache_equals_training_from_the_images(tiny, tmp_path, monkeypatch, arch):
    import sdpo.data
    import sdpo.models

    extra = ["--sdxl"] if arch == "sdxl" else []
    build_cache(tiny[arch], tiny["data"], tmp_path / "cache", *extra)
    common = ["--max_train_steps", "3", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
              "--checkpointing_steps", "0", "--proportion_empty_prompts", "0.5", "--validation_pairs", "3",
              "--validation_steps", "3", "--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    if arch == "sdxl":
        common += ["--sdxl", "--no-use_adafactor", "--no-gradient_checkpointing", "--sdxl_true_time_ids"]
    run_in_process(tiny_train_args(tiny[arch], tiny["data"], str(tmp_path / "images"), *common))

    def forbidden(*args, **kwargs):
        raise AssertionError("training from the cache decoded an image or loaded the VAE")

    monkeypatch.setattr(sdpo.data, "decode_image", forbidden)
    monkeypatch.setattr(sdpo.models, "load_vae", forbidden)
    run_in_process(tiny_train_args(tiny[arch], tiny["data"], str(tmp_path / "cached"), *common,
                                   "--latent_cache", str(tmp_path / "cache")))
    a, b = unet_weights(tmp_path / "images" / "unet"), unet_weights(tmp_path / "cached" / "unet")
    assert same_tensors(a, b)
    metrics = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("images", "cached")]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]  # noqa: E731
    assert strip(metrics[0]) == strip(metrics[1])  # every loss, statistic and validation number
    assert any("val_implicit_acc" in r for r in metrics[0])


def test_a_killed_build_resumes_and_a_mismatch_is_refused(tiny, tmp_path, monkeypatch, capsys):
    import sdpo.cache

    straight = tmp_path / "straight"
    build_cache(tiny["sd15"], tiny["data"], straight)
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["pairs"] == sum(s["pairs"] for s in manifest["shards"]) and len(manifest["shards"]) >= 2
    # A build killed after its first shard: the shard and the progress file are there, no manifest.
    killed = tmp_path / "killed"
    killed.mkdir()
    first = manifest["shards"][0]["file"]
    (killed / first).write_bytes((straight / first).read_bytes())
    progress = json.dumps({"settings": manifest["settings"], "layout": manifest["layout"],
                           "shards": manifest["shards"][:1]})
    (killed / "progress.json").write_text(progress)
    (killed / "shard-00001.safetensors.tmp4999999").write_bytes(b"half a shard")  # by a process long gone
    # Resuming with another shard size would store other rows under the names done: refused.
    with pytest.raises(SystemExit) as exit_info:
        build_cache(tiny["sd15"], tiny["data"], killed, "--shard_pairs", "8")
    assert exit_info.value.code == 2 and "shard_pairs: was 16, now 8" in capsys.readouterr().err
    encoded = []
    original = sdpo.cache.encode_rows
    monkeypatch.setattr(sdpo.cache, "encode_rows", lambda data, rows, *a: encoded.append(rows) or original(data, rows, *a))
    build_cache(tiny["sd15"], tiny["data"], killed)
    assert len(encoded) == len(manifest["shards"]) - 1  # the first shard was not encoded again
    for shard in manifest["shards"]:
        assert (killed / shard["file"]).read_bytes() == (straight / shard["file"]).read_bytes()
    assert sorted(p.name for p in killed.iterdir()) == sorted(["manifest.json", *(s["file"] for s in manifest["shards"])])
    # A shard recorded as done that holds other rows (or none) is encoded again.
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / first).write_bytes((straight / manifest["shards"][1]["file"]).read_bytes())
    (swapped / "progress.json").write_text(progress)
    encoded.clear()
    build_cache(tiny["sd15"], tiny["data"], swapped)
    assert len(encoded) == len(manifest["shards"])
    assert (swapped / first).read_bytes() == (straight / first).read_bytes()

    def refused(flags, *fragments, cache=straight):
        with pytest.raises(SystemExit) as exit_info:
            run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path / "run"), "--dry_run",
                                           "--latent_cache", str(cache), *flags))
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err[-1].startswith("error: --latent_cache"), err
        for fragment in fragments:
            assert fragment in err[-1]

    refused(["--resolution", "40"], "resolution: was 32, now 40")
    refused(["--caption_column", "label_0"], "caption_column")
    refused(["--random_crop"], "--random_crop")
    # A manifest that counts more pairs than its shards hold.
    short = json.loads((swapped / "manifest.json").read_text())
    short["shards"] = short["shards"][:1]
    (swapped / "manifest.json").write_text(json.dumps(short))
    refused([], "its shards hold 16 distinct pairs, its manifest says 42", cache=swapped)
    (killed / "manifest.json").unlink()
    refused([], "not a complete latent cache", cache=killed)
    # Building into a folder that holds a cache for other settings is refused too.
    with pytest.raises(SystemExit) as exit_info:
        build_cache(tiny["sd15"], tiny["data"], straight, "--resolution", "40")
    assert exit_info.value.code == 2 and "other settings" in capsys.readouterr().err


def test_the_cache_stores_what_the_vae_computes(tiny, tmp_path):
    """Each image's mean and std, unflipped and flipped, equal the VAE's on the cropped image."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from sdpo.data import decode_image, load_split, resize_and_crop, to_tensor

    build_cache(tiny["sd15"], tiny["data"], tmp_path / "cache")
    shard = load_file(tmp_path / "cache" / "shard-00000.safetensors")
    row = int(shard["row"][1])
    data = load_split(tiny["data"], "train")
    image = to_tensor(resize_and_crop(decode_image(data[row]["jpg_1"]), 32)[0])
    vae = AutoencoderKL.from_pretrained(tiny["sd15"], subfolder="vae").eval()
    with torch.no_grad():
        dist = vae.encode(torch.stack([image, image.flip(-1)])).latent_dist
    assert torch.equal(shard["mean"][1, 1], dist.mean) and torch.equal(shard["std"][1, 1], dist.std)
    assert shard["label"][1] == data[row]["label_0"] and shard["original_size"][1, 1].tolist() == [40, 48]
