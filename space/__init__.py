"""SPACE (Lin et al., ICLR 2020): unsupervised object-oriented scene decomposition.

Public API:
    build_model(name_or_config) -> Space
    load(path, original=None, device="cpu") -> Space ready for inference
    Space.forward(x, priors, mode="sample" | "deterministic") -> SpaceOutput
    priors_at(cfg, step), final_priors(cfg)
    load_original_checkpoint(path, model), save_checkpoint(...), read_checkpoint(path)
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import (CheckpointError, checkpoint_configs, load_original_checkpoint, load_weights,
                         read_checkpoint, save_checkpoint)
from .config import ModelConfig, TrainConfig, original_config, ORIGINAL_CONFIGS
from .model import Space, SpaceOutput, build_model, build_optimizers
from .schedules import Priors, final_priors, priors_at

__all__ = ["CheckpointError", "ModelConfig", "ORIGINAL_CONFIGS", "Priors", "Space", "SpaceOutput", "TrainConfig",
           "build_model", "build_optimizers", "final_priors", "load", "load_original_checkpoint", "original_config",
           "priors_at", "read_checkpoint", "save_checkpoint"]


def load(path: str | Path, original: str | None = None, device: str | torch.device = "cpu") -> Space:
    """A model ready for inference from our checkpoint or one of the original's ``.pth`` files.

    Args:
        path: checkpoint file.
        original: for an original file, the name of its configuration (defaults to the file stem,
            as the published pretrained files are named after their configurations).
        device: where to put the model.
    """
    ckpt = read_checkpoint(path)
    model_cfg, _ = checkpoint_configs(ckpt, path, original)
    model = Space(model_cfg)
    load_weights(model, ckpt, str(path))
    return model.to(device).eval()
