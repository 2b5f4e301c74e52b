"""--push_to_hub: the final folder of a run goes to the Hugging Face Hub, as diffusers' training
examples do it (`create_repo`, then `upload_folder`).

What goes up is the run's result, not its working files: the trained UNet (`unet/`) or the LoRA
(`pytorch_lora_weights.safetensors`, and `unet/` with --merge_lora), `train_config.json`, the model
card `README.md` and the validation images it shows. Checkpoints, logs and metrics stay local.
"""

from __future__ import annotations

import os

from sdpo.checkpoints import CONFIG_FILE
from sdpo.errors import RunStopped, first_line
from sdpo.lora import LORA_WEIGHTS


def validation_images(output_dir: str, step: int, prompts, per_prompt: int) -> list[tuple[str, str]]:
    """(prompt, path relative to output_dir) of the validation images saved at `step` that exist."""
    found = []
    for p, prompt in enumerate(prompts):
        for i in range(per_prompt):
            relative = f"validation/step-{step}/{p}-{i}.png"
            if os.path.isfile(os.path.join(output_dir, relative)):
                found.append((prompt, relative))
    return found


def upload_files(output_dir: str, images: list[tuple[str, str]], use_lora: bool, merge_lora: bool,
                 model_folder: str = "unet") -> list[str]:
    """The files of output_dir that go up, relative to it, sorted: this run's result only (not a
    LoRA file or a unet/ that an earlier run with other settings left in the folder). model_folder:
    the trained denoiser's folder (transformer/ for SD3)."""
    files = [CONFIG_FILE, "README.md", *(image for _, image in images)]
    if use_lora:
        files.append(LORA_WEIGHTS)
    unet = os.path.join(output_dir, model_folder)
    if (merge_lora or not use_lora) and os.path.isdir(unet):
        files += [f"{model_folder}/{name}" for name in os.listdir(unet)]
    return sorted(f for f in files if os.path.isfile(os.path.join(output_dir, f)))


def repo_id(output_dir: str, hub_model_id: str | None) -> str:
    """--hub_model_id, or the output folder's name (under the token's account), as diffusers does."""
    return hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(output_dir)))


def push(output_dir: str, hub_model_id: str | None, private: bool, files: list[str]) -> str:
    """Create the repository (or reuse it) and upload `files`; returns the repository id. A failure
    (no token, no network) stops with one line: the files stay in output_dir."""
    from huggingface_hub import HfApi

    api = HfApi()
    name = repo_id(output_dir, hub_model_id)
    try:
        name = api.create_repo(name, private=private, exist_ok=True).repo_id
        api.upload_folder(repo_id=name, folder_path=output_dir, allow_patterns=files,
                          commit_message="Upload the result of train.py")
    except Exception as err:  # HTTP, auth and offline errors come in many types
        raise RunStopped(f"--push_to_hub: the upload to {name} failed ({first_line(err)}); the trained model is in "
                         f"{output_dir}: upload it later with `hf upload {name} {output_dir}`") from None
    return name
