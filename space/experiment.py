"""Experiments from params.yaml: which data, which model, which training, and their datasets.

Layout of params.yaml::

    experiments: [rooms]          # active experiments (dvc.yaml foreach)
    model: {low_memory: null, ...}  # overrides applied to every active experiment where not null
    train: {seed: null, ...}      # likewise
    evaluate: {...}               # evaluation settings
    demo: {...}                   # demo figure settings
    exp:
      rooms:
        data: {source: rooms, root: data/rooms64, ...}
        model: {...}              # space.config.ModelConfig keys
        train: {...}              # space.config.TrainConfig keys
        pretrained: null          # or a checkpoint path: evaluate and demo it without training
                                  # (an original-format file takes this experiment's model settings)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch.utils.data import Dataset

from .io import lock_exclusive, write_json
from .config import (GLOBAL_MODEL_KEYS, InvalidValue, ModelConfig, TrainConfig, _bad, from_dict, is_int, is_number,
                     load_params)
from .data.ale import GAME_MARKER
from .data.download import DEFAULT_ARCHIVE_DIR, SPLITS

SOURCES = ("rooms", "ale", "OBJ3D_SMALL", "OBJ3D_LARGE", "ATARI", "folder")
log = logging.getLogger(__name__)

DOWNLOADED = ("OBJ3D_SMALL", "OBJ3D_LARGE", "ATARI")
GENERATED = ("rooms", "ale")  # made by the data stage from the data settings
GENERATED_MARKER = ".generated-from.json"  # in a generated dataset's root


@dataclass(frozen=True)
class DataConfig:
    """Where an experiment's images come from."""

    source: str = "rooms"
    root: str = "data/rooms"
    # generated sources (rooms, ale): images per split and seed
    num_train: int = 1000
    num_val: int = 100
    num_test: int = 100
    seed: int = 0
    # rooms
    min_objects: int = 1
    max_objects: int = 5
    min_size: float = 0.1
    max_size: float = 0.2
    shadows: bool = True
    palette: str = "full"  # 'full', 'vivid' or 'muted' (space.data.rooms.PALETTES)
    walls: str = "shaded"  # 'flat': one unshaded colour; 'back': no side walls in view (rooms.render_room)
    # Atari (ale and ATARI)
    games: tuple[str, ...] | None = None
    bgr: bool = False
    # downloads: where a manually placed archive is looked for, and an optional URL override
    archive_dir: str = DEFAULT_ARCHIVE_DIR
    url: str | None = None
    # user folders
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            _bad("data.source", self.source, f"one of {SOURCES}")
        for key in ("root", "archive_dir"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                _bad(f"data.{key}", getattr(self, key), "a path")
        if self.url is not None and not isinstance(self.url, str):
            _bad("data.url", self.url, "null or a URL")
        generated = self.source in GENERATED
        for key in ("num_train", "num_val", "num_test"):
            if not is_int(getattr(self, key)) or getattr(self, key) < (1 if generated else 0):
                _bad(f"data.{key}", getattr(self, key), "an integer >= 1 (the data stage generates every split)"
                     if generated else "an integer >= 0")
        for key in ("seed", "min_objects", "max_objects"):
            if not is_int(getattr(self, key)):
                _bad(f"data.{key}", getattr(self, key), "an integer")
        for key in ("min_size", "max_size"):
            if not is_number(getattr(self, key)):
                _bad(f"data.{key}", getattr(self, key), "a number")
        for key in ("shadows", "bgr"):
            if not isinstance(getattr(self, key), bool):
                _bad(f"data.{key}", getattr(self, key), "true or false")
        if self.games is not None and (isinstance(self.games, str) or not isinstance(self.games, (list, tuple))
                                       or not self.games or not all(isinstance(g, str) for g in self.games)):
            _bad("data.games", self.games, "null or a non-empty list of game names")
        if self.games is not None and len({g.removesuffix("-v0") for g in self.games}) < len(self.games):
            _bad("data.games", self.games, "a list that names each game once")
        fractions = self.split_fractions
        if not isinstance(fractions, (list, tuple)) or len(fractions) != 3 or not all(map(is_number, fractions)) \
                or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
            _bad("data.split_fractions", fractions, "three shares (train, val, test) > 0 summing to 1 (every split "
                 "needs images: validation picks the best checkpoint, the test split is evaluated)")
        if not 1 <= self.min_objects <= self.max_objects:
            _bad("data.max_objects", self.max_objects, f"an integer >= min_objects ({self.min_objects}) >= 1")
        if not 0 < self.min_size <= self.max_size < 1:
            _bad("data.max_size", self.max_size, "a fraction of the image side with 0 < min_size <= max_size < 1")
        from .data.rooms import PALETTES, WALL_STYLES

        if self.palette not in PALETTES:
            _bad("data.palette", self.palette, f"one of {tuple(PALETTES)}")
        if self.walls not in WALL_STYLES:
            _bad("data.walls", self.walls, f"one of {WALL_STYLES}")
        if self.games is not None:
            object.__setattr__(self, "games", tuple(self.games))
        object.__setattr__(self, "split_fractions", tuple(self.split_fractions))


@dataclass(frozen=True)
class Experiment:
    name: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    pretrained: str | None = None  # a checkpoint to evaluate and demo without training


def load_experiment(params: Mapping[str, Any] | str | Path, name: str) -> Experiment:
    """Resolve one experiment from params (a dict or a params.yaml path)."""
    if not isinstance(params, Mapping):
        params = load_params(params)
    experiments = params.get("exp") or {}
    if name not in experiments:
        raise ValueError(f"unknown experiment {name!r}; defined under 'exp' in params.yaml: "
                         f"{', '.join(experiments) or '(none)'}")
    entry = dict(experiments[name] or {})
    allowed = {"data", "model", "train", "pretrained"}
    if "original" in entry:  # an earlier key, which DVC did not track
        raise ValueError(f"exp.{name}.original is no longer read: an original-format pretrained file takes the "
                         f"experiment's own model settings (exp.{name}.model); delete the key")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) in 'exp.{name}': {', '.join(unknown)}; allowed keys: {', '.join(sorted(allowed))}")
    for section in ("data", "model", "train"):
        for where, value in ((f"exp.{name}.{section}", entry.get(section)), (section, params.get(section))):
            if value is not None and not isinstance(value, Mapping):
                _bad(where, value, "a mapping of keys to values")
    if entry.get("pretrained") is not None and not isinstance(entry["pretrained"], str):
        _bad(f"exp.{name}.pretrained", entry["pretrained"], "null or the path of a checkpoint file")
    data = _section_config(DataConfig, entry.get("data"), params, name, "data")
    model = _section_config(ModelConfig, _overridden(entry, params, "model"), params, name, "model")
    train = _section_config(TrainConfig, _overridden(entry, params, "train"), params, name, "train")
    return Experiment(name, data, model, train, entry.get("pretrained"))


def _section_config(cls: type, values: Mapping[str, Any] | None, params: Mapping[str, Any], name: str, section: str):
    """``from_dict`` for one section of experiment ``name``: a value refused is named where it is set
    in params.yaml, under ``exp.<name>`` or in the top-level section that overrides every experiment."""
    try:
        return from_dict(cls, values, f"exp.{name}.{section}")
    except InvalidValue as error:
        prefix, key = f"{section}.", error.key
        if not key.startswith(prefix):
            raise
        key = key[len(prefix):]
        overridden = section != "data" and (params.get(section) or {}).get(key) is not None
        where = (f"the top-level '{section}.{key}' of params.yaml (set for every experiment)" if overridden
                 else f"'exp.{name}.{section}.{key}'")
        raise InvalidValue(error.key, error.value, error.allowed, where) from None


TRAIN_KEYS = frozenset(field.name for field in dataclasses.fields(TrainConfig))


def _overridden(entry: Mapping[str, Any], params: Mapping[str, Any], section: str) -> dict[str, Any]:
    """An experiment's ``section`` with the top-level section of the same name laid over it, key by
    key where not null. ``dvc exp run -S`` cannot address ``exp.3d_room_large...`` (Hydra's
    override grammar rejects a key that starts with a digit), so the top-level sections are how
    the command line reaches every experiment, e.g. ``-S model.low_memory=true``."""
    overrides = params.get(section) or {}
    if section == "model" and set(overrides) - GLOBAL_MODEL_KEYS:
        raise ValueError(f"unknown key(s) in the top-level 'model' of params.yaml: "
                         f"{', '.join(sorted(set(overrides) - GLOBAL_MODEL_KEYS))}; allowed: "
                         f"{', '.join(sorted(GLOBAL_MODEL_KEYS))} (how to compute, the same values; set "
                         f"what to compute under exp.<name>.model)")
    if section == "train" and set(overrides) - TRAIN_KEYS:  # else named as if in exp.<name>.train
        raise ValueError(f"unknown key(s) in the top-level 'train' of params.yaml (which sets them for every "
                         f"experiment): {', '.join(sorted(set(overrides) - TRAIN_KEYS))}; allowed keys: "
                         f"{', '.join(sorted(TRAIN_KEYS))}")
    values = dict(entry.get(section) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


#: The keys of the evaluate, export and demo sections of params.yaml.
STAGE_KEYS = {
    "evaluate": ("split", "mode", "batch_size", "num_images", "device"),
    "export": ("split", "threshold", "mode", "batch_size", "num_images"),
    "demo": ("split", "indices", "mode"),
}


def stage_settings(params: Mapping[str, Any], section: str) -> dict[str, Any]:
    """The ``evaluate``, ``export`` or ``demo`` section of params, checked key by key."""
    settings = params.get(section)
    if not isinstance(settings, Mapping):
        raise ValueError(f"params.yaml needs a '{section}' section with keys {', '.join(STAGE_KEYS[section])}")
    keys = STAGE_KEYS[section]
    unknown, missing = sorted(set(settings) - set(keys)), [k for k in keys if k not in settings]
    if unknown or missing:
        raise ValueError(f"'{section}' in params.yaml: " + "; ".join(
            ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
            + ([f"missing key(s) {', '.join(missing)}"] if missing else [])) + f"; its keys: {', '.join(keys)}")

    checks = {
        "split": (lambda v: v in SPLITS, " or ".join(repr(s) for s in SPLITS)),
        "mode": (lambda v: v in ("deterministic", "sample"), "'deterministic' or 'sample'"),
        "batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "num_images": (lambda v: v is None or is_int(v) and v >= 1, "null (the whole split) or an integer >= 1"),
        "device": (lambda v: isinstance(v, str), "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        "threshold": (lambda v: is_number(v) and 0 <= v < 1, "a presence probability in [0, 1), above which a "
                                                              "cell is an object (0: every cell)"),
        "indices": (lambda v: isinstance(v, list) and v and all(is_int(i) and i >= 0 for i in v),
                    "a non-empty list of image indices (integers >= 0)"),
    }
    for key in keys:
        ok, allowed = checks[key]
        if not ok(settings[key]):
            _bad(f"{section}.{key}", settings[key], allowed)
    return dict(settings)


def check_generated_root(params: Mapping[str, Any], name: str) -> None:
    """Refuse a generated dataset whose ``data.root`` another experiment generates with other settings:
    each data stage would replace the other's images under it."""
    exp = load_experiment(params, name)
    if exp.data.source not in GENERATED:
        return
    mine = data_identity(exp.data, exp.model.image_size)
    for other_name in params.get("exp") or {}:
        if other_name == name:
            continue
        try:
            other = load_experiment(params, other_name)
        except ValueError:  # its own stages will say what is wrong with it
            continue
        if other.data.source in GENERATED and Path(other.data.root) == Path(exp.data.root):
            theirs = data_identity(other.data, other.model.image_size)
            differ = [f"{key} {mine[key]!r} against {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]
            if differ:
                raise ValueError(f"exp.{name}.data.root {exp.data.root!r} is also where exp.{other_name} generates its "
                                 f"data, with other settings ({'; '.join(differ)}): each data stage would replace the "
                                 f"other's images; give one of them its own data.root")


def active_experiments(params: Mapping[str, Any]) -> list[str]:
    names = params.get("experiments") or []
    for name in names:
        load_experiment(params, name)  # validates
    return list(names)


def data_identity(data: DataConfig, image_size: int, content: str | None = None) -> dict[str, Any]:
    """What identifies an experiment's images (goes into the training run id): the data config
    and, from the data stage's manifest, the ``content`` fingerprint of the files
    (:func:`data_fingerprint`), so that other images start a new run instead of resuming
    checkpoints trained on the old ones, while the same files moved elsewhere resume it."""
    identity = {**dataclasses.asdict(data), "image_size": image_size}
    if content is not None:  # the files themselves are known: where they lie or came from is no longer part of it
        for key in LOCATION_KEYS:
            del identity[key]
        identity["content"] = content
    return identity


#: Data settings that say where the files are or come from, not what they hold.
LOCATION_KEYS = ("root", "archive_dir", "url")


def data_fingerprint(exp: Experiment, progress: bool = True) -> str:
    """SHA-256 over every file the three splits read (images, box files), with each file's split
    and name: what the data stage records in its manifest. The manifest is what the later stages
    depend on, so that DVC re-runs them when the images change (other data params, a generator
    that draws differently, a user's folder with new images) and not otherwise."""
    from tqdm import tqdm

    root = Path(exp.data.root)
    files = [(split, Path(path)) for split in SPLITS for path in build_dataset(exp, split).files()]
    total = sum(path.stat().st_size for _, path in files)
    digest = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc="fingerprint", disable=not progress or total < 1 << 28,
              dynamic_ncols=True) as bar:  # a bar from 256 MiB on (the downloaded datasets)
        for split, path in files:
            digest.update(f"{split}\0{path.relative_to(root)}\0".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                    bar.update(len(block))
            digest.update(b"\0")
    return digest.hexdigest()


def ensure_data(exp: Experiment) -> None:
    """Make the experiment's data again where the data stage's images are missing but its manifest
    is there: DVC runs ``dvc exp run --queue`` and ``--temp`` in a copy of the repository holding
    only what git tracks, and once dvc.lock is committed it skips the data stage there (its
    manifest and params are unchanged), so the later stages found no images. Generated data are
    made again and downloaded data fetched again, checked against the manifest's fingerprint; a
    user's folder cannot be, and the error says so. Data that are there must have the split sizes
    the manifest records (a folder's content may have changed since, unseen by DVC)."""
    root, manifest = Path(exp.data.root), Path(f"data/manifests/{exp.name}.json")
    if not manifest.is_file():
        return  # the data stage has not run (the dataset then says how to get it)
    if root.is_dir():
        _check_split_sizes(exp, manifest)
        return
    if exp.data.source not in GENERATED + DOWNLOADED:
        raise FileNotFoundError(
            f"image folder {root} (exp.{exp.name}.data.root) does not exist here, though {manifest} does: a "
            f"run of `dvc exp run --queue` or `--temp` works in a copy of the repository holding only what git "
            f"tracks; give data.root as an absolute path, or run `dvc exp run` without --queue/--temp")
    # Under torchrun every process comes here: one makes the data while the others wait for it.
    with open(manifest.with_name(f".{manifest.name}.lock"), "w") as lock:
        why_not = lock_exclusive(lock)
        if why_not is not None:
            log.warning("%s cannot be locked (%s): under torchrun, several processes may make the data at once",
                        lock.name, why_not)
        if root.is_dir():
            return  # made by another process meanwhile
        log.warning("%s is missing though %s is there (a copy of the repository, as `dvc exp run --queue` makes): "
                    "making the data again", root, manifest)
        prepare_data(exp)
    recorded = read_manifest(exp).get("content")
    if data_fingerprint(exp) != recorded:
        raise ValueError(f"the data made again in {root} differ from those that {manifest} records; run "
                         f"`dvc repro --force data@{exp.name}` and then the stages after it")


def read_manifest(exp: Experiment) -> dict[str, Any]:
    """The data stage's manifest of an experiment (``data/manifests/<name>.json``), {} where none is."""
    manifest = Path(f"data/manifests/{exp.name}.json")
    if not manifest.is_file():
        return {}
    try:
        recorded = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest} is not valid JSON ({err}); run `dvc repro --force data@{exp.name}` to write it "
                         f"again") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{manifest} holds no manifest; run `dvc repro --force data@{exp.name}` to write it again")
    return recorded


def _check_split_sizes(exp: Experiment, manifest: Path) -> None:
    """Refuse data whose split sizes differ from those the data stage recorded: images added to or
    removed from a folder since (DVC does not watch a folder's content; the data stage does)."""
    recorded = read_manifest(exp).get("splits") or {}
    now = {split: len(build_dataset(exp, split)) for split in recorded}
    if now != recorded:
        changed = ", ".join(f"{split} {now[split]} (recorded {recorded[split]})" for split in recorded
                            if now[split] != recorded[split])
        raise ValueError(f"{exp.data.root} holds other images than when the data stage wrote {manifest}: images per "
                         f"split {changed}; run `dvc repro --force data@{exp.name}` (then `dvc repro`), so that the "
                         f"later stages see the new images as new data")


def check_data_files(exp: Experiment, progress: bool = True, most: int = 10) -> None:
    """Decodes every image and reads every box file of the three splits, so that a corrupt or
    truncated image, or a malformed box line, stops the data stage and names each file at fault,
    instead of stopping a training run when a batch first needs the file (hours in, perhaps).

    Raises:
        ValueError: Listing up to ``most`` of the files at fault and how many there are.
    """
    from tqdm import tqdm

    from .data.datasets import check_image

    datasets = [build_dataset(exp, split) for split in SPLITS]
    problems: list[str] = []
    boxes = dropped = 0
    largest: float | None = None  # of the numbers in a user's box files
    dropped_from: list[str] = []
    with tqdm(total=sum(map(len, datasets)), desc="check", unit="image", disable=not progress,
              dynamic_ncols=True, mininterval=1.0) as bar:
        for dataset in datasets:
            for index in range(len(dataset)):
                try:
                    check_image(dataset.source(index).path, exp.model.image_size)
                    if dataset.has_boxes:
                        boxes += len(dataset.boxes(index))
                        if hasattr(dataset, "box_stats"):  # a user's folder
                            lost, most_in_file = dataset.box_stats(index)
                            largest = max(largest or 0.0, most_in_file)
                            if lost:
                                dropped += lost
                                dropped_from.append(str(dataset.box_dir / f"{dataset.paths[index].stem}.txt"))
                except (OSError, ValueError) as err:
                    problems.append(str(err))
                bar.update()
    if problems:
        shown = "".join(f"\n  {problem}" for problem in problems[:most])
        more = f"\n  ... and {len(problems) - most} more" if len(problems) > most else ""
        raise ValueError(f"{len(problems)} of the {sum(map(len, datasets))} images of {exp.data.root} (or their box "
                         f"files) cannot be used:{shown}{more}")
    pixels = ("box lines are 'centre_x,centre_y,width,height' in pixels of the image as stored, not fractions of "
              "its size (README \"Train on your own images\")")
    if boxes + dropped and largest is not None and largest <= 1.0:  # a user's boxes all in the first pixel
        raise ValueError(f"every number in the box files of {exp.data.root}/bb is at most 1: {pixels}")
    if dropped:  # a user's folder: boxes left out by the centre crop
        what = (f"{dropped} of the {boxes + dropped} boxes in {exp.data.root}/bb lie wholly outside the centre square "
                f"their images are cropped to, and are left out (e.g. {dropped_from[0]})")
        if not boxes:
            raise ValueError(f"{what}: all of them; {pixels}")
        log.warning("%s; an object there is not in the image the model sees", what)
    for dataset in datasets[:1]:  # the same folder for every split
        skipped = getattr(dataset, "skipped", [])
        if skipped:
            names = ", ".join(f"{p.relative_to(dataset.root)}{'/' if p.is_dir() else ''}" for p in skipped[:most])
            log.warning("%s: %d entries not read (subfolders, files of no image format PIL decodes here, box files "
                        "without an image): %s%s", exp.data.root, len(skipped), names,
                        f", ... ({len(skipped) - most} more)" if len(skipped) > most else "")


def build_dataset(exp: Experiment, split: str) -> Dataset:
    """The dataset of one split ('train', 'val' or 'test') of an experiment, at the model's size."""
    from . import data as datasets

    d, size = exp.data, exp.model.image_size
    if d.source in ("rooms", "OBJ3D_SMALL", "OBJ3D_LARGE"):
        # The original's train split may have no boxes; ours always carries them for rooms.
        with_boxes = split != "train" or (Path(d.root) / "train" / "bb").is_dir()
        return datasets.Obj3dDataset(d.root, split, image_size=size, with_boxes=with_boxes)
    if d.source in ("ale", "ATARI"):
        # Generated frames: the games generated, not every game folder there (a run of other games may
        # have left some).
        games = d.games or (datasets.ATARI_GAMES if d.source == "ale" else None)
        return datasets.AtariDataset(d.root, split, games=list(games) if games else None, image_size=size,
                                     bgr=d.bgr if d.source == "ATARI" else False)
    return datasets.FolderDataset(d.root, split, image_size=size, seed=d.seed, split_fractions=d.split_fractions)


def _generated_here(root: Path) -> bool:
    """Whether ``root`` is absent, empty or what a generation left before writing its marker:
    rooms publish their whole folder (with a meta.json naming the generator) and then the marker;
    Atari frames publish one <game>-v0 folder per game, each marked as generated (the ATARI
    archive's folders, of the same names, are not)."""
    if not root.is_dir():
        return True
    entries = [entry for entry in root.iterdir() if ".tmp-" not in entry.name]  # a game's folder being made
    meta = root / "meta.json"
    if meta.is_file():
        try:
            return str(json.loads(meta.read_text()).get("generator", "")).startswith("space.data.")
        except (ValueError, AttributeError):
            return False
    return all((entry / GAME_MARKER).is_file() for entry in entries)


def _generated_files_missing(exp: Experiment) -> str | None:
    """What a generated dataset lacks of the images and box files its settings make (a file deleted
    by hand, say), or None: it is then made again, as the seeded generator makes the same files."""
    from .data.download import ATARI_GAMES, ATARI_SPLIT_DIRS

    d, root = exp.data, Path(exp.data.root)
    counts = dict(zip(SPLITS, (d.num_train, d.num_val, d.num_test)))
    if d.source == "rooms":  # <root>/<split>/<i>-room.png and <root>/<split>/bb/bb_<i>.txt
        folders = [(root / split, n) for split, n in counts.items()]
        folders += [(root / split / "bb", n) for split, n in counts.items()]
    else:  # <root>/<Game>-v0/<split folder>/<i>.png
        games = [g.removesuffix("-v0") for g in (d.games or ATARI_GAMES)]
        folders = [(root / f"{game}-v0" / ATARI_SPLIT_DIRS[split], n) for game in games for split, n in counts.items()]
    for folder, n in folders:
        found = len(list(folder.glob("*.txt" if folder.name == "bb" else "*.png"))) if folder.is_dir() else 0
        if found != n:
            return f"{folder.relative_to(root)} holds {found} of the {n} {'box files' if folder.name == 'bb' else 'images'} made"
    return None


def prepare_data(exp: Experiment, progress: bool = True) -> Path:
    """Generate or download the experiment's data if it is not there yet; returns its root."""
    from . import data as datasets

    d = exp.data
    root = Path(d.root)
    marker = root / GENERATED_MARKER
    wanted = json.loads(json.dumps(data_identity(d, exp.model.image_size)))  # as read back (tuples become lists)
    fresh = d.source in GENERATED and not (marker.is_file() and json.loads(marker.read_text()) == wanted)
    if d.source in GENERATED and not fresh and (missing := _generated_files_missing(exp)):
        log.warning("%s: %s since it was generated; making it again", root, missing)
        fresh = True
    if fresh and not marker.is_file() and not _generated_here(root):
        # Generating replaces the folder: never one that this pipeline did not generate.
        own = ", or set data.source: folder to train on the images there" if d.source == "rooms" else ""
        raise FileExistsError(
            f"{root} (exp.{exp.name}.data.root) holds files that were not generated here (it has no "
            f"{GENERATED_MARKER}), and generating the '{d.source}' data there would replace them: point "
            f"data.root at a new folder{own}")
    if d.source == "rooms":
        if fresh:
            datasets.generate_rooms(root, image_size=exp.model.image_size, num_train=d.num_train,
                                    num_val=d.num_val, num_test=d.num_test, min_objects=d.min_objects,
                                    max_objects=d.max_objects, min_size=d.min_size, max_size=d.max_size,
                                    shadows=d.shadows, palette=d.palette, walls=d.walls,
                                    seed=d.seed, progress=progress)
    elif d.source == "ale":
        if fresh:
            # Games are published one at a time, in place: an interrupted run must not leave the old
            # marker over a mix of old and new frames.
            if marker.is_file():  # its game folders were made here, some maybe before they were marked so
                for game in root.glob("*-v0"):
                    (game / GAME_MARKER).touch()
            marker.unlink(missing_ok=True)
            datasets.generate_atari(root, games=d.games or datasets.ATARI_GAMES, num_train=d.num_train,
                                    num_val=d.num_val, num_test=d.num_test, seed=d.seed, bgr=d.bgr,
                                    progress=progress)
    elif d.source in DOWNLOADED:
        if not root.is_dir():
            folder = datasets.ARCHIVES[d.source].folder  # what the archive extracts to, beside the others
            if root.name != folder:
                raise ValueError(f"exp.{exp.name}.data.root {str(root)!r} does not exist, and the {d.source} archive "
                                 f"extracts to a folder named {folder}: name data.root .../{folder} (e.g. "
                                 f"{root.parent / folder}), or point it at a copy of the extracted dataset")
            datasets.fetch_archive(d.source, root.parent, archive_dir=d.archive_dir, url=d.url)
    elif not root.is_dir():
        queued = (" (under `dvc exp run --queue` or `--temp`, which run in a copy of the repository holding what git "
                  "tracks, a relative path names the copy's folder: give an absolute one)") if not root.is_absolute() else ""
        raise FileNotFoundError(f"image folder {root} (exp.{exp.name}.data.root) does not exist: "
                                f"put your images there or change the path in params.yaml{queued}")
    if fresh:  # generated data: remember what it was generated from, so a change regenerates it
        write_json(marker, wanted)
    return root
