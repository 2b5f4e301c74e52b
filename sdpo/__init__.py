"""Shared code for preference training of diffusion models: the objectives and the safeguard
(`losses`), timestep weighting (`timesteps`), data (`data`), text conditioning
(`conditioning`), checkpoints (`checkpoints`) and the offline tiny models (`tiny`)."""
