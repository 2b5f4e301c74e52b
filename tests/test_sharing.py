"""Launching and sharing as the ecosystem does it: the LoRA launchers, a user's accelerate config
winning over the launchers' own settings, --mixed_precision from accelerate, and --push_to_hub up
to the upload call (the hub cannot be reached here)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_train_args
from sdpo import hub, lora
from test_train import run_in_process


def launch(launcher, tiny, out, *flags, arch="sd15", **env_extra):
    env = {**os.environ, "NUM_GPUS": "1", "MODEL_NAME": tiny[arch], "VAE_NAME": os.path.join(tiny[arch], "vae"),
           "DATASET_NAME": tiny["data"], "OUTPUT_DIR": str(out), **env_extra}
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "train", f"{launcher}.sh"), *flags],
                          capture_output=True, text=True, env=env, timeout=600)


SMALL = ["--resolution=32", "--train_batch_size=1", "--gradient_accumulation_steps=1", "--dataloader_num_workers=0"]


@pytest.mark.parametrize("launcher", ["sd15_lora_dpo", "sdxl_lora_dpo"])
def test_lora_launchers_record_their_settings(tiny, tmp_path, launcher):
    arch = launcher.split("_")[0]
    result = launch(launcher, tiny, tmp_path, "--dry_run", *SMALL, arch=arch)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "train_config.json").read_text())
    expected = {"sd15_lora_dpo": (2500, 0.9, 10000, 2000), "sdxl_lora_dpo": (5000, 0.6, 2000, 500)}[launcher]
    assert (config["beta_dpo"], config["winner_preserving_mu"], config["max_train_steps"],
            config["checkpointing_steps"]) == expected
    assert config["use_lora"] and config["lora_rank"] == 8 and config["lora_alpha"] is None
    assert config["lora_target_modules"] == list(lora.DEFAULT_TARGETS)
    assert config["learning_rate"] == 1e-5 and not config["scale_lr"]
    assert config["lr_scheduler"] == "constant" and config["lr_warmup_steps"] == 0
    assert config["gradient_checkpointing"] and not config["use_adafactor"]
    assert config["derived"]["reference_role"] == "adapters-off" and config["derived"]["optimizer"] == "AdamW8bit"


def test_a_lora_launcher_trains_and_refuses_a_bad_rank(tiny, tmp_path):
    result = launch("sd15_lora_dpo", tiny, tmp_path / "run", *SMALL, "--max_train_steps=1", "--report_to=none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "16 pairs per GPU x 2 accumulation steps x 1 GPUs = 32 pairs per step" in result.stdout
    assert (tmp_path / "run" / lora.LORA_WEIGHTS).is_file()
    bad = launch("sd15_lora_dpo", tiny, tmp_path / "bad", *SMALL, "--lora_rank=0")
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last == "error: --lora_rank must be >= 1, got 0" and "Traceback" not in bad.stderr


def write_config(path, **settings):
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "num_machines": 1,
              "machine_rank": 0, "num_processes": 1, "mixed_precision": "no", "use_cpu": True,
              "dynamo_config": {}, **settings}
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()) + "\n")
    return str(path)


def test_the_users_accelerate_config_wins_over_the_launchers(tiny, tmp_path):
    """With ACCELERATE_CONFIG_FILE the launcher passes no process count, machine count, precision
    or dynamo setting of its own: the config's precision ('no' here, not the launchers' bf16)
    reaches train.py, which records it."""
    config = write_config(tmp_path / "cpu.yaml")
    result = launch("sd15_diffusion_dpo", tiny, tmp_path / "run", *SMALL, "--max_train_steps=1", "--report_to=none",
                    ACCELERATE_CONFIG_FILE=config)
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert recorded["mixed_precision"] == "no" and recorded["derived"]["mixed_precision_used"] == "no"


@pytest.mark.parametrize("settings,fragment", [
    ({"distributed_type": "FSDP", "num_processes": 1}, "an FSDP config with num_processes 1"),
    ({"num_processes": 0}, "num_processes must be a positive integer"),
    ({"mixed_precision": "fp8"}, "mixed_precision 'fp8'"),
])
def test_a_bad_accelerate_config_ends_in_one_line(tiny, tmp_path, settings, fragment):
    config = write_config(tmp_path / "bad.yaml", **settings)
    result = launch("sd15_lora_dpo", tiny, tmp_path / "run", *SMALL, ACCELERATE_CONFIG_FILE=config)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ACCELERATE_CONFIG_FILE") and fragment in last, last
    missing = launch("sd15_lora_dpo", tiny, tmp_path / "run", *SMALL, ACCELERATE_CONFIG_FILE=str(tmp_path / "no.yaml"))
    assert missing.returncode == 2 and "unreadable" in missing.stderr.strip().splitlines()[-1]


def test_the_launchers_refuse_what_fsdp_cannot_run_before_launching(tiny, tmp_path):
    """With an FSDP config the launchers' check refuses LoRA (and 8-bit AdamW) in one line, before
    accelerate starts any process; an unquoted `mixed_precision: no` (YAML's false) reads as no."""
    config = write_config(tmp_path / "fsdp.yaml", distributed_type="FSDP", num_processes=2)
    result = launch("sd15_lora_dpo", tiny, tmp_path / "run", *SMALL, ACCELERATE_CONFIG_FILE=config)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --use_lora with an FSDP accelerate config")
    result = launch("sd15_diffusion_dpo", tiny, tmp_path / "run", *SMALL, "--use_8bit_adam",
                    ACCELERATE_CONFIG_FILE=config)
    assert result.returncode == 2 and "--use_8bit_adam with an FSDP accelerate config" in result.stderr
    (tmp_path / "no.yaml").write_text("distributed_type: NO\nnum_processes: 1\nmixed_precision: no\n")
    checked = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train", "_check_env.py")],
                             capture_output=True, text=True,
                             env={**os.environ, "ACCELERATE_CONFIG_FILE": str(tmp_path / "no.yaml")})
    assert checked.stdout.split() == ["1", "no", "NO"], checked.stderr


def test_the_shipped_accelerate_configs_are_usable(tmp_path):
    """The multi-node DDP config passes the launchers' check, and names what each machine sets."""
    folder = os.path.join(ROOT, "scripts", "accelerate")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train", "_check_env.py")], capture_output=True,
                            text=True, env={**os.environ, "ACCELERATE_CONFIG_FILE": os.path.join(folder,
                                                                                                 "multi_node.yaml")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["16", "bf16", "MULTI_GPU"]


def test_mixed_precision_defaults_to_what_accelerate_launch_was_given(tiny, tmp_path, monkeypatch):
    import train

    argv = ["--pretrained_model_name_or_path", tiny["sd15"], "--dataset_name", tiny["data"]]
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert train.parse_args(argv).mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert train.parse_args(argv).mixed_precision == "bf16"
    assert train.parse_args([*argv, "--mixed_precision", "no"]).mixed_precision == "no"  # the flag wins
    # Through the real launcher: its --mixed_precision reaches train.py, which records it.
    args = tiny_train_args(tiny["sd15"], tiny["data"], str(tmp_path), "--dry_run")
    i = args.index("--mixed_precision")
    del args[i : i + 2]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", os.path.join(ROOT, "train.py"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "train_config.json").read_text())["mixed_precision"] == "bf16"


def test_push_to_hub_uploads_the_result_and_a_valid_card(tiny, tmp_path, monkeypatch):
    """Everything up to the upload call: the repository, the exact file list, and a model card that
    huggingface_hub parses, with its metadata and the validation images as the widget."""
    from huggingface_hub import HfApi, ModelCard

    calls = []

    class Repo:
        repo_id = "someone/lora-run"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, name, **kw: calls.append(("create", name, kw)) or Repo())
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    out = tmp_path / "lora-run"
    run_in_process(tiny_train_args(tiny["sd15"], tiny["data"], str(out), "--use_lora", "--lora_rank", "4",
                                   "--max_train_steps", "2", "--checkpointing_steps", "1", "--merge_lora",
                                   "--validation_prompts", "a red cat", "a dog", "--validation_sampling_steps", "2",
                                   "--push_to_hub", "--hub_private_repo"))
    (create, name, kw), (upload, up) = calls
    assert name == "lora-run" and kw == {"private": True, "exist_ok": True}
    assert up["repo_id"] == "someone/lora-run" and up["folder_path"] == str(out)
    assert up["allow_patterns"] == sorted([
        "README.md", "train_config.json", lora.LORA_WEIGHTS, "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "validation/step-2/0-0.png", "validation/step-2/1-0.png"])
    assert all(os.path.isfile(out / f) for f in up["allow_patterns"])  # checkpoints and logs stay local
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and "lora" in data["tags"] and "diffusion-dpo" in data["tags"]
    assert "base_model" not in data  # a local folder is not a hub model
    assert data["widget"] == [{"text": "a red cat", "output": {"url": "validation/step-2/0-0.png"}},
                              {"text": "a dog", "output": {"url": "validation/step-2/1-0.png"}}]
    assert "load_lora_weights" in card.text and "![a red cat](validation/step-2/0-0.png)" in card.text


def test_the_card_names_a_hub_base_model_and_a_failed_upload_says_where_the_files_are(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    from sdpo import checkpoints
    from sdpo.errors import RunStopped

    config = json.loads(json.dumps({
        "pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sdxl": False,
        "train_method": "dmpo", "use_lora": False, "winner_preserving_mu": 0.9, "winner_preserving_per_sample": False,
        "use_winner_preserving": True, "beta_dpo": 2000, "dmpo_alpha": 0.01, "timestep_weighting": "none",
        "dataset_name": "pairs", "split": "train", "resolution": 512, "train_batch_size": 8,
        "gradient_accumulation_steps": 32, "lr_scheduler": "constant", "lr_warmup_steps": 0, "seed": 0,
        "derived": {"policy_unet": "base", "reference_unet": "base", "num_processes": 8, "effective_lr": 1e-8,
                    "optimizer": "AdamW", "gradient_clipping": "clip at 1.0", "mixed_precision_used": "bf16",
                    "loss_precision": "reference"}}))
    checkpoints.write_model_card(config, 2000, 1000, str(tmp_path / "README.md"))
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and "lora" not in data["tags"]

    def offline(self, *args, **kwargs):
        raise ConnectionError("the hub cannot be reached")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(RunStopped, match=r"the upload to me/model failed \(the hub cannot be reached\).*hf upload"):
        hub.push(str(tmp_path), "me/model", False, ["README.md"])



def test_the_slurm_script_writes_a_config_for_the_job_and_starts_each_node(tmp_path):
    """With stand-ins for scontrol and srun: the job's accelerate config (every GPU of every node,
    node 0 as the main process) passes the launchers' check, and srun starts the launcher once
    per node with that node's rank."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\ngpu-c\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun $*" > "$SRUN_LOG"\n')
    for tool in ("scontrol", "srun"):
        os.chmod(bin_dir / tool, 0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "3", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(tmp_path / "submit"),
           "SRUN_LOG": str(tmp_path / "srun.log")}
    os.makedirs(tmp_path / "submit" / "scripts" / "train")
    for name in ("sd15_lora_dpo.sh", "_check_env.py"):
        os.symlink(os.path.join(ROOT, "scripts", "train", name), tmp_path / "submit" / "scripts" / "train" / name)
    (tmp_path / "submit" / "scripts" / "setup.sh").write_text("exit 0\n")
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train", "slurm_multi_node.sh"), "sd15_lora_dpo",
                             "--lora_rank=16"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    config = tmp_path / "submit" / "outputs" / "slurm-77" / "accelerate.yaml"
    text = config.read_text()
    assert "num_machines: 3\n" in text and "num_processes: 12\n" in text and "main_process_ip: gpu-a\n" in text
    srun = (tmp_path / "srun.log").read_text()
    assert "MACHINE_RANK=$SLURM_NODEID" in srun and srun.rstrip().endswith("sd15_lora_dpo.sh --lora_rank=16")
    checked = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train", "_check_env.py")], capture_output=True,
                             text=True, env={**os.environ, "ACCELERATE_CONFIG_FILE": str(config)})
    assert checked.stdout.split() == ["12", "bf16", "MULTI_GPU"], checked.stderr
    missing = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train", "slurm_multi_node.sh"), "nope"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "no launcher scripts/train/nope.sh" in missing.stderr
