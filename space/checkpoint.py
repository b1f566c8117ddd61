"""Checkpoints: the original's ``.pth`` files and our own, which carry their config.

Both formats are a dict with 'model', 'optimizer_fg', 'optimizer_bg', 'epoch' and
'global_step' (SPEC 11.1); ours adds 'config' (the model and train sections as plain dicts) and
'format', so that a later stage rebuilds exactly the model that was trained. Files are loaded
with ``weights_only=True``: a checkpoint is untrusted input, and one that carries pickled code
is refused.
"""
from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import ModelConfig, TrainConfig, from_dict, original_config, to_dict, ORIGINAL_CONFIGS
from .io import atomic_write

FORMAT = "space-dvc/1"
MAX_LISTED = 20  # keys listed per kind of misfit in a checkpoint error

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict safely (weights only, on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as file:
        head = file.read(4)
    # torch.save writes a zip archive, or (before PyTorch 1.6, as the original's files) a pickle
    # that opens with the PROTO opcode; anything else is not a checkpoint, and torch would call
    # it "pickled code" below.
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle: it starts "
                              f"with {head!r})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointError(
                f"{path}: refused: the file carries pickled code or objects other than tensors and "
                f"plain containers, and checkpoints are loaded with weights_only=True. Only load "
                f"files you trust by other means. Details: {str(error).splitlines()[0]}") from error
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({error})") from error
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for non-checkpoints
        raise CheckpointError(f"{path}: not a PyTorch checkpoint or truncated ({type(error).__name__}: {error})") from error
    if _is_bare_state_dict(ckpt):  # torch.save(model.state_dict(), path): weights without the wrapper
        log.warning("%s holds a bare state_dict (no 'model', 'global_step', ...): read as its 'model' weights", path)
        ckpt = {"model": ckpt}
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt["model"], Mapping):
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a SPACE checkpoint: expected a dict with a 'model' state_dict, got {keys}")
    return ckpt


def _is_bare_state_dict(ckpt: Any) -> bool:
    """Whether ``ckpt`` is a SPACE model's state_dict itself (every value a tensor, every key
    under the foreground or background module, or those behind DataParallel's ``module.``)."""
    return (isinstance(ckpt, Mapping) and len(ckpt) > 0 and "model" not in ckpt
            and all(torch.is_tensor(v) for v in ckpt.values())
            and all(_without_module_prefix(str(k)).split(".")[0] in ("fg_module", "bg_module") for k in ckpt))


def _without_module_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _unwrapped(state_dict: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """``state_dict`` without the ``module.`` that (Distributed)DataParallel puts before every key."""
    if state_dict and all(str(k).startswith("module.") for k in state_dict):
        log.info("%s: weights saved from (Distributed)DataParallel: read without their 'module.' prefix", source)
        return {_without_module_prefix(k): v for k, v in state_dict.items()}
    return state_dict


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one error listing every missing, unexpected and wrong-shape key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
                  for k, v in expected.items()
                  if k in state_dict and (not torch.is_tensor(state_dict[k]) or state_dict[k].shape != v.shape)]
    if missing or unexpected or mismatched:
        lines = [f"{source}: the checkpoint does not fit this model configuration "
                 f"(G={getattr(model, 'cfg', None) and model.cfg.G}, K={getattr(model, 'cfg', None) and model.cfg.K})"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {item}" for item in items[:MAX_LISTED]]
                if len(items) > MAX_LISTED:
                    lines.append(f"    ... and {len(items) - MAX_LISTED} more")
        raise CheckpointError("\n".join(lines))


def load_weights(model: nn.Module, ckpt: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Strictly load ``ckpt['model']`` into ``model`` after checking every key and shape (weights
    saved from DataParallel, every key behind ``module.``, are read without that prefix)."""
    state_dict = _unwrapped(ckpt["model"], source)
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)


def load_original_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load one of the original's ``.pth`` files into ``model``; returns the whole dict."""
    ckpt = read_checkpoint(path)
    load_weights(model, ckpt, str(path))
    return ckpt


def checkpoint_configs(ckpt: Mapping[str, Any], path: str | Path,
                       original: str | None = None) -> tuple[ModelConfig, TrainConfig | None]:
    """The configs a checkpoint was trained with.

    Ours carry them. For an original file, pass ``original`` (one of the five names); failing
    that, the file's stem is tried (the pretrained files are named after their configs).
    """
    if "config" in ckpt:
        config, fmt = ckpt["config"], ckpt.get("format")
        if fmt != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {fmt!r}; this version reads {FORMAT!r}")
        if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
            raise CheckpointError(f"{path}: its 'config' holds no 'model' settings (got {config!r:.200})")
        try:
            train = from_dict(TrainConfig, config["train"]) if config.get("train") else None
            return from_dict(ModelConfig, config["model"]), train
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: the settings stored in this checkpoint do not fit this version of the "
                                  f"code: {error}") from None
    if original is not None and original not in ORIGINAL_CONFIGS:
        raise CheckpointError(f"{path}: original={original!r} is not one of the original's configurations "
                              f"({', '.join(ORIGINAL_CONFIGS)})")
    name = original or Path(path).stem
    if name not in ORIGINAL_CONFIGS:
        raise CheckpointError(f"{path}: an original-format checkpoint carries no config; name its configuration "
                              f"(one of {', '.join(ORIGINAL_CONFIGS)}) or rename the file after it")
    return original_config(name)


def save_checkpoint(path: str | Path, model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...] | None,
                    step: int, epoch: int, train_cfg: TrainConfig | None = None,
                    extra: Mapping[str, Any] | None = None) -> None:
    """Write our checkpoint format atomically (temporary file, then rename)."""
    ckpt = {
        "model": model.state_dict(),
        "optimizer_fg": optimizers[0].state_dict() if optimizers else None,
        "optimizer_bg": optimizers[1].state_dict() if optimizers else None,
        "epoch": int(epoch),
        "global_step": int(step),
        "config": {"model": to_dict(model.cfg), "train": to_dict(train_cfg) if train_cfg else None},
        "format": FORMAT,
        **(extra or {}),
    }
    # Into memory, not to the temporary file's path: torch names the archive's folder after the
    # path, a random name, so equal weights gave other bytes each time (and DVC re-ran the stages
    # after training); and a full disk is then Python's OSError (ENOSPC) on the write below, where
    # torch's own writer said "unexpected pos 51328 vs 51216".
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
