"""Shared test helpers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
