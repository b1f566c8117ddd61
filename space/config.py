"""Typed, frozen configuration built from ``params.yaml`` sections.

Nothing here is global: a config object is built once and passed explicitly to the model, the
optimisers and the training loop. Key names of :class:`ModelConfig` are the original's ``arch``
keys (SPEC section 1.2), so users of the original recognise them; keys beyond the original
(``image_size``, ``fg_width``, ``bg_width``) default to values that give exactly the original
architecture.

Every user mistake raises a ``ValueError`` naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

ALLOWED_G = (4, 8, 16)
ALLOWED_WIDTHS = (0.25, 0.5, 1.0, 2.0)
ALLOWED_GLIMPSE_SIZES = (16, 32, 64)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and prior settings (the original's ``arch`` node, plus a few extensions)."""

    # Extensions beyond the original; their defaults give the original architecture.
    image_size: int = 128  # square images; a power of two and a multiple of 16
    fg_width: float = 1.0  # channel multiplier of the foreground networks
    bg_width: float = 1.0  # channel multiplier of the heavy background networks
    # The same mathematics computed without full-resolution maps per cell (space/fastpath.py);
    # False runs the SPEC-literal reference code. Not an architecture change: weights are shared.
    fast_path: bool = True
    # With the fast path, trade time for memory: keep fewer activations for the backward and
    # recompute them there (glimpse networks in chunks, composition windows, the background's mask
    # decoder, encoders and component decoder blocks). Same values and gradients.
    low_memory: bool = False
    # Foreground (SPEC 1.2).
    G: int = 8
    fg_sigma: float = 0.15
    glimpse_size: int = 32
    img_enc_dim_fg: int = 128
    z_what_dim: int = 32
    z_pres_start_step: int = 4000
    z_pres_end_step: int = 10000
    z_pres_start_value: float = 0.1
    z_pres_end_value: float = 0.01
    z_scale_mean_start_step: int = 10000
    z_scale_mean_end_step: int = 20000
    z_scale_mean_start_value: float = -1.0
    z_scale_mean_end_value: float = -2.0
    z_scale_std_value: float = 0.1
    tau_start_step: int = 0
    tau_end_step: int = 10000
    tau_start_value: float = 2.5
    tau_end_value: float = 2.5
    boundary_loss: bool = True
    bl_off_step: int = 100_000_000
    fix_alpha_steps: int = 0
    fix_alpha_value: float = 0.1
    # Beyond the original: the KL of z_what counts in the loss with a weight rising linearly from
    # z_what_kl_warmup_start at step 0 to 1 at step z_what_kl_warmup_steps (0: weight 1 throughout,
    # the original's). Every cell pays z_what's KL (SPEC 4.8); with a fast optimiser the encoder
    # can drop z_what to its prior for all cells in the first hundred steps, before the decoder has
    # learnt to use it, and the glimpses then decode one grey object for every cell. The ELBO
    # reported stays the true one.
    z_what_kl_warmup_steps: int = 0
    z_what_kl_warmup_start: float = 0.0
    # Beyond the original: the width in glimpse pixels of the boundary loss's ring (SPEC 4.6);
    # None: the original's 6 pixels of a 32-pixel glimpse, scaled to glimpse_size. While the loss
    # is on, objects stay off the ring, so boxes come out larger than the objects by about
    # glimpse_size / (glimpse_size - 2 * width) at most; a narrower ring allows tighter boxes.
    boundary_width: int | None = None
    # Beyond the original: how far, in cell widths, a box centre may move from its cell's centre
    # (SPEC 4.3: tanh of the sample times this). 1.0 is the original's (into the neighbouring
    # cells); 0.5 keeps the centre inside its own cell, as SPAIR does, so that a neighbouring cell
    # cannot centre a second box on an object whose centre lies in another cell.
    shift_range: float = 1.0
    # Background (SPEC 1.2).
    K: int = 5
    bg_sigma: float = 0.15
    img_enc_dim_bg: int = 64
    z_mask_dim: int = 32
    z_comp_dim: int = 32
    rnn_mask_hidden_dim: int = 64
    rnn_mask_prior_hidden_dim: int = 64
    predict_comp_hidden_dim: int = 64

    def __post_init__(self) -> None:
        _check_types(self)
        s = self.image_size
        if s < 8 * min(ALLOWED_G) or s % 16 or s & (s - 1):  # the smallest grid's cells are 8 pixels or more
            _bad("model.image_size", s, f"a power of two from {8 * min(ALLOWED_G)} on (32, 64, 128, 256, ...)")
        if self.G not in ALLOWED_G:
            _bad("model.G", self.G, f"one of {ALLOWED_G}")
        factor = s // self.G
        if s % self.G or factor not in (8, 16, 32):
            _bad("model.G", self.G,
                 f"a grid whose cells are 8, 16 or 32 pixels wide at image_size {s} "
                 f"(G in {[g for g in ALLOWED_G if s // g in (8, 16, 32) and s % g == 0]})")
        if self.glimpse_size not in ALLOWED_GLIMPSE_SIZES:
            _bad("model.glimpse_size", self.glimpse_size, f"one of {ALLOWED_GLIMPSE_SIZES}")
        for key in ("fg_width", "bg_width"):
            if getattr(self, key) not in ALLOWED_WIDTHS:
                _bad(f"model.{key}", getattr(self, key), f"one of {ALLOWED_WIDTHS}")
        if self.K < 1:
            _bad("model.K", self.K, "an integer >= 1")
        for key in ("fg_sigma", "bg_sigma", "z_scale_std_value", "tau_start_value", "tau_end_value"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                _bad(f"model.{key}", value, "a finite number > 0")
        for key in ("z_pres_start_value", "z_pres_end_value"):
            value = getattr(self, key)
            if not 0 < value < 1:
                _bad(f"model.{key}", value, "a probability strictly between 0 and 1")
        if not 0 <= self.fix_alpha_value <= 1:
            _bad("model.fix_alpha_value", self.fix_alpha_value, "a number in [0, 1]")
        for key in ("img_enc_dim_fg", "z_what_dim", "img_enc_dim_bg", "z_mask_dim", "z_comp_dim",
                    "rnn_mask_hidden_dim", "rnn_mask_prior_hidden_dim", "predict_comp_hidden_dim"):
            if getattr(self, key) < 1:
                _bad(f"model.{key}", getattr(self, key), "an integer >= 1")
        if self.img_enc_dim_fg % 16:
            _bad("model.img_enc_dim_fg", self.img_enc_dim_fg, "a multiple of 16 (GroupNorm(16, .))")
        for prefix in ("z_pres", "z_scale_mean", "tau"):
            start, end = getattr(self, f"{prefix}_start_step"), getattr(self, f"{prefix}_end_step")
            if start < 0 or end < start:
                _bad(f"model.{prefix}_end_step", end, f"an integer >= {prefix}_start_step ({start}) >= 0")
        if not 0 <= self.z_what_kl_warmup_start <= 1:
            _bad("model.z_what_kl_warmup_start", self.z_what_kl_warmup_start, "a weight in [0, 1]")
        if self.boundary_width is not None and not 0 <= self.boundary_width < self.glimpse_size / 2:
            _bad("model.boundary_width", self.boundary_width, f"null or an integer in [0, glimpse_size / 2 = {self.glimpse_size / 2:g})")
        if not (0 < self.shift_range <= 1):
            _bad("model.shift_range", self.shift_range, "a number in (0, 1] (cell widths; 1 is the original's)")
        for key in ("bl_off_step", "fix_alpha_steps", "z_what_kl_warmup_steps"):
            if getattr(self, key) < 0:
                _bad(f"model.{key}", getattr(self, key), "an integer >= 0")

    @property
    def num_cells(self) -> int:
        return self.G * self.G


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loop settings (the original's ``train`` node, SPEC 1.1 and 8)."""

    seed: int = 8848
    batch_size: int = 16
    max_steps: int = 1_000_000
    max_epochs: int = 1000
    clip_norm: float = 1.0  # 0 disables clipping
    fg_optim: str = "RMSprop"
    fg_lr: float = 1e-5
    bg_optim: str = "Adam"
    bg_lr: float = 1e-3
    max_ckpt: int = 5
    # Beyond the original: the background's learning rate rises linearly from
    # bg_lr * bg_lr_warmup_factor at step 0 to bg_lr at step bg_lr_warmup_steps (0: no warm-up).
    # A background that learns fast in the first steps can absorb the objects before the
    # foreground has learnt any (README "Background failures").
    bg_lr_warmup_steps: int = 0
    bg_lr_warmup_factor: float = 0.3
    # Beyond the original: both learning rates fall linearly from their value at step
    # lr_decay_start to lr_decay_factor times it at max_steps (0: no decay), so that the last steps
    # refine boxes and masks instead of moving them about.
    lr_decay_start: int = 0
    lr_decay_factor: float = 0.1
    print_every: int = 500
    save_every: int = 1000
    eval_every: int = 1000
    eval_on: bool = True
    device: str = "auto"
    num_workers: int = 0
    # Beyond the original.
    plot_every: int = 100  # rows of plot data (step, loss, KL terms, ...) for DVC
    val_num_images: int = 500  # validation subset for AP during training (SPEC 9.5)
    # The original's validation MSE (SPEC 9.5): a pass of its own over the first that many validation
    # images, at the current step's priors (tau changes the reconstruction), before the AP pass.
    # null: the MSE of the AP pass (final priors), without a pass of its own.
    val_mse_num_images: int | None = None
    val_batch_size: int = 12
    val_mode: str = "deterministic"  # or 'sample', the original's
    best_metric: str = "ap_avg"  # best checkpoint by this validation metric
    output: str = "last"  # the train stage's model: the 'last' step, or the 'best' validation checkpoint
    max_bad_steps: int = 20  # consecutive non-finite steps before training stops
    # Scale-out and speed (space/training.py, README "Multi-GPU and multi-node").
    # Under torchrun each process trains on batch_size images: the global batch is
    # batch_size x world size (WORLD_SIZE), taken from the same seeded epoch order as one process
    # with that batch would take it.
    nproc_per_node: int = 1  # > 1: the train stage relaunches itself through torchrun with N processes
    sync_batchnorm: bool = True  # under DDP, BatchNorm statistics over the global batch (no effect in one process)
    amp: str = "none"  # or 'bf16': autocast around the forward (changes numerics slightly)
    compile: bool = False  # torch.compile the forward (same maths, rounding may differ)
    cpu_allocator: str = "heap"  # on CPU, keep freed memory in the process (space/allocator.py); or 'default'
    flush_denormal: bool = False  # on CPU, flush denormal floats to zero (space/allocator.py; changes values slightly)
    latent_mode: str = "sample"  # the original's; 'deterministic' takes latents at their means (no noise)
    # The original's resume_ckpt: a run with no checkpoint of its own starts from this file's weights
    # (one of the original's .pth files, or ours); where the file also holds both optimisers' states
    # and its global_step, those too, and training goes on at that step + 1 (space/training.py).
    init_from: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        for key in ("fg_optim", "bg_optim"):
            if getattr(self, key) not in OPTIMIZERS:
                _bad(f"train.{key}", getattr(self, key), f"one of {sorted(OPTIMIZERS)}")
        for key in ("fg_lr", "bg_lr"):
            if not getattr(self, key) > 0:
                _bad(f"train.{key}", getattr(self, key), "a learning rate > 0")
        if self.bg_lr_warmup_steps < 0:
            _bad("train.bg_lr_warmup_steps", self.bg_lr_warmup_steps, "an integer >= 0 (0: no warm-up)")
        if not 0 < self.bg_lr_warmup_factor <= 1:
            _bad("train.bg_lr_warmup_factor", self.bg_lr_warmup_factor, "a number in (0, 1]")
        if self.lr_decay_start < 0:
            _bad("train.lr_decay_start", self.lr_decay_start, "an integer >= 0 (0: no decay)")
        if not 0 < self.lr_decay_factor <= 1:
            _bad("train.lr_decay_factor", self.lr_decay_factor, "a number in (0, 1]")
        if not self.clip_norm >= 0:  # NaN too, which clipped every gradient to NaN
            _bad("train.clip_norm", self.clip_norm, "a number >= 0 (0 disables clipping)")
        if not 0 <= self.seed < 2 ** 32:  # numpy's seeds
            _bad("train.seed", self.seed, "an integer in [0, 2**32 - 1]")
        if 0 < self.max_steps <= self.lr_decay_start:  # the decay would never start
            _bad("train.lr_decay_start", self.lr_decay_start,
                 f"0 (no decay) or a step before train.max_steps = {self.max_steps}")
        for key in ("batch_size", "max_ckpt", "print_every", "save_every", "eval_every", "max_epochs"):
            if getattr(self, key) < 1:
                _bad(f"train.{key}", getattr(self, key), "an integer >= 1")
        if self.val_mode not in ("deterministic", "sample"):
            _bad("train.val_mode", self.val_mode, "'deterministic' or 'sample'")
        if self.best_metric not in BEST_METRICS:
            _bad("train.best_metric", self.best_metric, f"one of {sorted(BEST_METRICS)}")
        if self.output not in ("last", "best"):
            _bad("train.output", self.output, "'last' or 'best' (the best validation checkpoint, by best_metric)")
        for key in ("plot_every", "val_num_images", "val_batch_size", "max_bad_steps"):
            if getattr(self, key) < 1:
                _bad(f"train.{key}", getattr(self, key), "an integer >= 1")
        if self.val_mse_num_images is not None and self.val_mse_num_images < 1:
            _bad("train.val_mse_num_images", self.val_mse_num_images, "an integer >= 1, or null (the MSE of the AP pass)")
        if self.max_steps < 0:
            _bad("train.max_steps", self.max_steps, "an integer >= 0")
        if self.init_from is not None and not self.init_from.strip():
            _bad("train.init_from", self.init_from, "a checkpoint's path, or null (train from the seeded weights)")
        if self.num_workers < 0:
            _bad("train.num_workers", self.num_workers, "an integer >= 0")
        if self.nproc_per_node < 1:
            _bad("train.nproc_per_node", self.nproc_per_node, "an integer >= 1")
        if self.amp not in AMP_MODES:
            _bad("train.amp", self.amp, " or ".join(repr(m) for m in AMP_MODES))
        if self.cpu_allocator not in CPU_ALLOCATORS:
            _bad("train.cpu_allocator", self.cpu_allocator, " or ".join(repr(m) for m in CPU_ALLOCATORS))
        if self.latent_mode not in ("sample", "deterministic"):
            _bad("train.latent_mode", self.latent_mode, "'sample' or 'deterministic'")


OPTIMIZERS = ("Adam", "RMSprop", "SGD", "AdamW")
AMP_MODES = ("none", "bf16")
CPU_ALLOCATORS = ("heap", "default")  # space/allocator.py
# Validation metric -> True when higher is better.
BEST_METRICS = {"ap_50": True, "ap_avg": True, "count_error_rate": False, "count_accuracy": True}


def is_int(value: Any) -> bool:
    """An integer, and not a bool (YAML's true is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class InvalidValue(ValueError):
    """A setting's value refused: ``key`` as the config names it, the ``value`` and what is ``allowed``,
    so that a caller that knows where in params.yaml the value came from can say so."""

    def __init__(self, key: str, value: Any, allowed: str, where: str | None = None):
        super().__init__(f"invalid value for {where or repr(key)}: {value!r}; allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def _bad(key: str, value: Any, allowed: str) -> None:
    raise InvalidValue(key, value, allowed)


def _check_types(cfg: Any) -> None:
    """Check each field's type (ints may stand for floats; bools are not ints; ``X | None``
    fields may be null)."""
    section = _SECTION[type(cfg).__name__]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        if type_name.endswith(" | None"):
            if value is None:
                continue
            type_name = type_name[:-len(" | None")]
        kind = {"int": int, "float": float, "bool": bool, "str": str}[type_name]
        ok = (isinstance(value, bool) if kind is bool else is_number(value) if kind is float else
              is_int(value) if kind is int else isinstance(value, kind))
        if not ok:
            _bad(f"{section}.{f.name}", value, f"a value of type {kind.__name__}")
        if kind is float:
            object.__setattr__(cfg, f.name, float(value))


_SECTION = {"ModelConfig": "model", "TrainConfig": "train"}


def from_dict(cls: type, values: Mapping[str, Any] | None, section: str | None = None):
    """Build a frozen config of type ``cls`` from a mapping, rejecting unknown keys."""
    values = dict(values or {})
    section = section or _SECTION[cls.__name__]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in '{section}': {', '.join(unknown)}; "
                         f"allowed keys: {', '.join(sorted(known))}")
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config (stored in our checkpoints)."""
    return dataclasses.asdict(cfg)


def replace(cfg: Any, **changes: Any):
    """A copy of a frozen config with some keys changed (validated like the original)."""
    return from_dict(type(cfg), {**to_dict(cfg), **changes})


#: Model keys that change how the model is computed, not its values: a run id, the data stage
#: and a checkpoint's settings compare without them, and the top-level 'model' section may set
#: them for every experiment.
GLOBAL_MODEL_KEYS = frozenset({"fast_path", "low_memory"})

# The five configurations of the original repository (SPEC section 2): model and train
# values that differ from the defaults above.
ORIGINAL_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "3d_room_large": {
        "model": dict(G=16, fg_sigma=0.15, z_pres_start_step=4000, z_pres_end_step=10000,
                      z_pres_start_value=0.1, z_pres_end_value=0.01,
                      z_scale_mean_start_step=10000, z_scale_mean_end_step=20000,
                      z_scale_mean_start_value=-1.0, z_scale_mean_end_value=-2.0,
                      tau_start_step=0, tau_end_step=20000, tau_start_value=2.5, tau_end_value=0.5,
                      boundary_loss=True, bl_off_step=100000, fix_alpha_steps=0, fix_alpha_value=0.1,
                      K=5, bg_sigma=0.15),
        "train": dict(seed=8848, batch_size=12, max_steps=160000, max_ckpt=4, eval_on=True, val_mse_num_images=100,
                      output="best"),
    },
    "3d_room_small": {
        "model": dict(G=8, fg_sigma=0.15, z_pres_start_step=4000, z_pres_end_step=10000,
                      z_pres_start_value=0.1, z_pres_end_value=0.01,
                      z_scale_mean_start_step=10000, z_scale_mean_end_step=20000,
                      z_scale_mean_start_value=-1.0, z_scale_mean_end_value=-2.0,
                      tau_start_step=0, tau_end_step=20000, tau_start_value=2.5, tau_end_value=0.5,
                      boundary_loss=True, bl_off_step=100000, fix_alpha_steps=0, fix_alpha_value=0.1,
                      K=5, bg_sigma=0.15),
        "train": dict(seed=1, batch_size=12, max_steps=160000, max_ckpt=4, eval_on=True, val_mse_num_images=200,
                      output="best"),
    },
    "atari_spaceinvaders": {
        "model": dict(G=16, fg_sigma=0.20, z_pres_start_step=4000, z_pres_end_step=10000,
                      z_pres_start_value=0.1, z_pres_end_value=0.01,
                      z_scale_mean_start_step=0, z_scale_mean_end_step=20000,
                      z_scale_mean_start_value=-2.2, z_scale_mean_end_value=-2.5,
                      z_scale_std_value=0.2,
                      tau_start_step=0, tau_end_step=20000, tau_start_value=2.5, tau_end_value=0.1,
                      boundary_loss=False, fix_alpha_steps=2000, fix_alpha_value=0.2,
                      K=3, bg_sigma=0.10),
        "train": dict(seed=1, batch_size=12, max_steps=100000, max_ckpt=4, eval_on=False),
    },
    "atari_riverraid": {
        "model": dict(G=16, fg_sigma=0.20, z_pres_start_step=4000, z_pres_end_step=10000,
                      z_pres_start_value=0.1, z_pres_end_value=0.01,
                      z_scale_mean_start_step=0, z_scale_mean_end_step=20000,
                      z_scale_mean_start_value=-2.0, z_scale_mean_end_value=-2.5,
                      tau_start_step=0, tau_end_step=20000, tau_start_value=2.5, tau_end_value=0.1,
                      boundary_loss=False, fix_alpha_steps=4000, fix_alpha_value=0.05,
                      K=4, bg_sigma=0.10),
        "train": dict(seed=3, batch_size=12, max_steps=100000, max_ckpt=4, eval_on=False),
    },
    "atari_joint": {
        "model": dict(G=16, fg_sigma=0.20, z_pres_start_step=10000, z_pres_end_step=15000,
                      z_pres_start_value=0.1, z_pres_end_value=1e-10,
                      z_scale_mean_start_step=0, z_scale_mean_end_step=20000,
                      z_scale_mean_start_value=-2.0, z_scale_mean_end_value=-2.5,
                      tau_start_step=0, tau_end_step=10000, tau_start_value=2.5, tau_end_value=2.5,
                      boundary_loss=False, fix_alpha_steps=4000, fix_alpha_value=0.1,
                      K=3, bg_sigma=0.10),
        "train": dict(seed=1, batch_size=12, max_steps=160000, max_ckpt=4, eval_on=False),
    },
}


def original_config(name: str) -> tuple[ModelConfig, TrainConfig]:
    """Model and train configs of one of the original's five experiments, by name."""
    if name not in ORIGINAL_CONFIGS:
        raise ValueError(f"unknown original configuration {name!r}; "
                         f"allowed: {', '.join(ORIGINAL_CONFIGS)}")
    entry = ORIGINAL_CONFIGS[name]
    return from_dict(ModelConfig, entry["model"]), from_dict(TrainConfig, entry["train"])


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot: ``1e-9`` and ``1E5`` are strings to it.
    DVC writes params with ruamel.yaml (YAML 1.2), so ``dvc exp run -S key=1e-9`` puts ``1e-09``
    in params.yaml, which a plain ``yaml.safe_load`` would hand on as the string '1e-09'.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`ParamsLoader` (``1e-9`` is a float)."""
    return yaml.load(text, Loader=ParamsLoader)


def load_params(path: str | Path) -> dict[str, Any]:
    """Read a params.yaml file into a dict, with a clear error naming the file when it is bad."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        params = load_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level, got {type(params).__name__}")
    return params
