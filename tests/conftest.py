"""Shared test helpers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from space.model import build_model, build_optimizers

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference"
ORIGINAL_NAMES = ["3d_room_large", "3d_room_small", "atari_spaceinvaders", "atari_riverraid", "atari_joint"]


def reference_state_dict(name: str) -> dict:
    """The original's checkpoint description for one config; skips when ../shared is absent."""
    path = REFERENCE / f"original_state_dict_{name}.json"
    if not path.is_file():
        pytest.skip(f"reference file {path.name} not found: ../shared/reference is absent here")
    return json.loads(path.read_text())


def synthesise_original(name: str, path) -> dict:
    """An original-format checkpoint: random tensors with the reference keys and shapes."""
    ref = reference_state_dict(name)
    state = {}
    for key, shape in ref["state_dict"].items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(0, 1000, shape)
        elif key.endswith("running_var"):  # a variance: positive, or BatchNorm gives NaN
            state[key] = torch.rand(shape) + 0.5
        else:
            state[key] = torch.randn(shape)
    model = build_model(name)
    fg, bg = build_optimizers(model)
    ckpt = {"model": state, "optimizer_fg": fg.state_dict(), "optimizer_bg": bg.state_dict(),
            "epoch": 3, "global_step": 8000}
    # the original's files were written by PyTorch 1.3: the legacy (non-zip) format
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    return state


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
