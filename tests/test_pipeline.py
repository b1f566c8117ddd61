"""Each original experiment runs through its stages on a CPU with a smoke override (few steps,
a few generated images in its data layout), and the default experiment's params are valid."""
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ORIGINAL_NAMES, ROOT, synthesise_original
from space.config import ORIGINAL_CONFIGS, ModelConfig, TrainConfig
from space.experiment import active_experiments, build_dataset, load_experiment

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def run_stage(stage: str, name: str, cwd: Path, params: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", name, "--params", str(params)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def smoke_params(name: str, tmp_path: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    entry = params["exp"][name]
    if entry["data"]["source"] == "ATARI":
        pytest.importorskip("ale_py")
        entry["data"] = {"source": "ale", "root": "data/atari", "games": entry["data"]["games"][:1],
                         "num_train": 3, "num_val": 2, "num_test": 2}
    else:
        entry["data"] = {"source": "rooms", "root": "data/rooms", "num_train": 3, "num_val": 2, "num_test": 2}
    entry["train"].update(max_steps=1, batch_size=2, val_num_images=2, print_every=1, save_every=1,
                          eval_every=1, device="cpu")
    params["evaluate"].update(batch_size=2, device="cpu")
    params["demo"]["indices"] = [0, 1]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("name", ORIGINAL_NAMES)
def test_original_experiment_runs_through_its_stages(name, tmp_path):
    params = smoke_params(name, tmp_path)
    for stage in ("data", "train", "evaluate", "demo"):
        result = run_stage(stage, name, tmp_path, params)
        assert result.returncode == 0, f"{stage}: {result.stderr[-3000:]}"
    metrics = json.loads((tmp_path / "metrics" / f"{name}.json").read_text())
    assert metrics["num_images"] == 2
    if name.startswith("3d_room"):
        assert {"ap_50", "ap_avg", "ap_by_iou", "count_error_rate", "count_accuracy", "perfect", "overcount",
                "undercount", "mse"} <= set(metrics)
    else:
        assert metrics["has_ground_truth"] is False and "ap_50" not in metrics and "mse" in metrics
    for path in (f"models/{name}.pth", f"plots/demo/{name}.png", f"plots/curves/{name}.png",
                 f"plots/train/{name}.csv", f"data/manifests/{name}.json"):
        assert (tmp_path / path).is_file(), path
    # the trained model carries the original's configuration
    import space
    assert space.load(tmp_path / "models" / f"{name}.pth").cfg == ModelConfig(**ORIGINAL_CONFIGS[name]["model"])


def test_a_pretrained_original_checkpoint_is_evaluated_and_drawn_without_training(tmp_path):
    """exp.<name>.pretrained: the train stage imports the file (original format, under any name:
    the experiment's model settings are its configuration) instead of training, and evaluate, demo
    and export run on it."""
    params_path = smoke_params("3d_room_small", tmp_path)
    (tmp_path / "pretrained").mkdir()
    state = synthesise_original("3d_room_small", tmp_path / "pretrained" / "renamed.pth")
    params = yaml.safe_load(params_path.read_text())
    params["exp"]["3d_room_small"]["pretrained"] = "pretrained/renamed.pth"
    params["exp"]["3d_room_small"]["train"]["max_steps"] = 10 ** 9  # would not end if it trained
    params_path.write_text(yaml.safe_dump(params))
    out = {}
    for stage in ("data", "train", "evaluate", "demo", "export"):
        result = run_stage(stage, "3d_room_small", tmp_path, params_path)
        assert result.returncode == 0, f"{stage}: {result.stderr[-3000:]}"
        out[stage] = result.stdout
    assert not (tmp_path / "checkpoints").exists()
    import space
    model = space.load(tmp_path / "models" / "3d_room_small.pth")
    assert model.cfg == ModelConfig(**ORIGINAL_CONFIGS["3d_room_small"]["model"])
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value.to(loaded[key].dtype)) for key, value in state.items())
    metrics = json.loads((tmp_path / "metrics" / "3d_room_small.json").read_text())
    assert metrics["num_images"] == 2 and metrics["mse"] is not None and "not finite" not in out["evaluate"]
    assert metrics["bg_failure"]  # random weights: the remedy is not to reseed a training that never ran
    assert "the model is the pretrained file pretrained/renamed.pth, not trained here" in out["evaluate"]
    assert "train.seed" not in out["evaluate"]
    assert (tmp_path / "plots" / "demo" / "3d_room_small.png").is_file()
    assert (tmp_path / "exports" / "3d_room_small.parquet").is_file()


def test_a_pretrained_file_that_does_not_fit_the_experiment_is_named(tmp_path):
    """An original-format file takes the experiment's model settings (which DVC tracks): one of
    another architecture is refused naming the keys and the settings; one of our checkpoints keeps
    its own configuration, with a warning naming each setting that differs from the experiment's."""
    import space

    params_path = smoke_params("3d_room_small", tmp_path)
    (tmp_path / "pretrained").mkdir()
    synthesise_original("atari_spaceinvaders", tmp_path / "pretrained" / "3d_room_small.pth")  # G 16 under G 8's name
    model = space.Space(dataclasses.replace(load_experiment(params_path, "3d_room_small").model, K=3))
    space.save_checkpoint(tmp_path / "pretrained" / "ours.pth", model, None, step=0, epoch=0)
    params = yaml.safe_load(params_path.read_text())
    entry = params["exp"]["3d_room_small"]

    def train_stage(**changes):
        entry.update(changes)
        params_path.write_text(yaml.safe_dump(params))
        return run_stage("train", "3d_room_small", tmp_path, params_path)

    result = train_stage(pretrained="pretrained/3d_room_small.pth")
    assert result.returncode == 1
    assert "fg_module.img_encoder.offset: checkpoint (2, 16, 16), model (2, 8, 8)" in result.stderr
    assert "an original-format file takes the settings of exp.3d_room_small.model" in result.stderr
    result = train_stage(pretrained="pretrained/ours.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pretrained/ours.pth was trained with other model settings than exp.3d_room_small.model, and is " \
           "evaluated with its own: K 3 (exp.3d_room_small.model: 5)" in result.stderr
    assert space.load(tmp_path / "models" / "3d_room_small.pth").cfg.K == 3
    result = train_stage(pretrained="pretrained/nothing_here.pth")
    assert result.returncode == 1
    assert "exp.3d_room_small.pretrained: no file pretrained/nothing_here.pth. `python -m space.fetch pretrained`" \
        in result.stderr
    result = train_stage(original="3d_room_small")
    assert result.returncode == 1 and "exp.3d_room_small.original is no longer read" in result.stderr
    del entry["original"]
    # One of ours trained at another image size is refused: the later stages read the data at the
    # experiment's size, and failed on the shapes.
    small = space.Space(dataclasses.replace(model.cfg, image_size=64))
    space.save_checkpoint(tmp_path / "pretrained" / "small.pth", small, None, step=0, epoch=0)
    result = train_stage(pretrained="pretrained/small.pth")
    assert result.returncode == 1
    assert ("pretrained/small.pth was trained at image_size 64, and exp.3d_room_small.model.image_size is 128, the "
            "size at which the data are read for it: set that to 64") in result.stderr
    # K is in no tensor's shape: an original-format file named after one of the original's
    # configurations is compared with that configuration's settings.
    synthesise_original("3d_room_small", tmp_path / "pretrained" / "3d_room_small.pth")
    entry["model"]["K"] = 3
    result = train_stage(pretrained="pretrained/3d_room_small.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("pretrained/3d_room_small.pth is named after the original's 3d_room_small configuration, whose model "
            "settings differ from exp.3d_room_small.model, which it is evaluated with: K 5 (exp.3d_room_small.model: "
            "3)") in result.stderr


def test_train_init_from_goes_on_from_an_original_checkpoint(tmp_path):
    """The top-level train.init_from (what `dvc exp run -S train.init_from=...` sets, the original's
    resume_ckpt): the train stage goes on from the file's step in a run folder of its own; with
    `pretrained` set as well it refuses, naming both."""
    params_path = smoke_params("3d_room_small", tmp_path)
    (tmp_path / "pretrained").mkdir()
    synthesise_original("3d_room_small", tmp_path / "pretrained" / "3d_room_small.pth")  # global_step 8000, epoch 3
    params = yaml.safe_load(params_path.read_text())
    params["train"]["init_from"] = "pretrained/3d_room_small.pth"
    params["exp"]["3d_room_small"]["train"].update(max_steps=8001, eval_on=False)
    params_path.write_text(yaml.safe_dump(params))
    for stage in ("data", "train"):
        result = run_stage(stage, "3d_room_small", tmp_path, params_path)
        assert result.returncode == 0, f"{stage}: {result.stderr[-3000:]}"
    assert "pretrained/3d_room_small.pth, going on at step 8001 (epoch 3)" in result.stderr
    (run,) = (tmp_path / "checkpoints" / "3d_room_small").iterdir()
    assert [path.name for path in run.glob("model_*.pth")] == ["model_000008002.pth"]
    params["exp"]["3d_room_small"]["pretrained"] = "pretrained/3d_room_small.pth"
    params_path.write_text(yaml.safe_dump(params))
    result = run_stage("train", "3d_room_small", tmp_path, params_path)
    assert result.returncode == 1
    assert "exp.3d_room_small.pretrained (pretrained/3d_room_small.pth) and train.init_from" in result.stderr
    # The stage's own output: DVC deletes it before the stage runs.
    params["exp"]["3d_room_small"]["pretrained"] = None
    params["train"]["init_from"] = "models/3d_room_small.pth"
    params_path.write_text(yaml.safe_dump(params))
    result = run_stage("train", "3d_room_small", tmp_path, params_path)
    assert result.returncode == 1
    assert "train.init_from is models/3d_room_small.pth, this stage's own output, which DVC deletes" in result.stderr


@pytest.mark.parametrize("name", ORIGINAL_NAMES)
def test_params_hold_the_originals_values(name):
    exp = load_experiment(PARAMS, name)
    assert exp.model == ModelConfig(**ORIGINAL_CONFIGS[name]["model"])
    original_train = TrainConfig(**ORIGINAL_CONFIGS[name]["train"])
    for key in ("seed", "batch_size", "max_steps", "max_ckpt", "clip_norm", "fg_optim", "fg_lr", "bg_optim",
                "bg_lr", "eval_on", "print_every", "save_every", "eval_every", "val_num_images", "val_mse_num_images",
                "best_metric", "output"):
        assert getattr(exp.train, key) == getattr(original_train, key), key


@pytest.mark.parametrize("name", sorted(PARAMS["exp"]))
def test_every_experiment_has_the_params_its_dvc_stages_declare(name):
    """DVC refuses to run a stage whose declared parameter is missing from params.yaml
    ("Parameters 'exp.<name>.model.image_size' are missing"), before any of our code runs, so
    every experiment must carry every key that dvc.yaml's stages list for it."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {key.replace("${item}", name) for stage in stages.values() for key in stage["do"].get("params", [])}
    assert "exp.%s.model.image_size" % name in declared  # the key that was missing once
    for key in sorted(declared):
        node = PARAMS
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"params.yaml lacks {key!r}, which dvc.yaml declares"
            node = node[part]


def test_top_level_sections_override_every_experiment_where_not_null():
    """`dvc exp run -S` cannot address exp.3d_room_large... (a key that starts with a digit), so the
    top-level 'model' and 'train' sections reach every experiment; 'model' only for how to compute."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert all(value is None for value in params["model"].values())  # the default changes nothing
    before = load_experiment(params, "3d_room_large")
    params["model"]["low_memory"] = True
    params["train"]["seed"] = 7
    for name in ("3d_room_large", "rooms"):
        exp = load_experiment(params, name)
        assert exp.model.low_memory and exp.train.seed == 7
    assert dataclasses.replace(before.model, low_memory=True) == load_experiment(params, "3d_room_large").model
    params["model"]["K"] = 3
    with pytest.raises(ValueError, match=r"top-level 'model' of params.yaml: K; allowed: fast_path, low_memory"):
        load_experiment(params, "rooms")
    del params["model"]["K"]
    for key, value, message in (("pretrained", 123, "invalid value for 'exp.rooms.pretrained': 123; allowed: null or "
                                                   "the path of a checkpoint file"),
                                ("model", [1], "invalid value for 'exp.rooms.model': [1]; allowed: a mapping")):
        broken = copy.deepcopy(params)
        broken["exp"]["rooms"][key] = value
        with pytest.raises(ValueError, match=re.escape(message)):
            load_experiment(broken, "rooms")
    params["train"]["bogus_key"] = 1  # what `-S +train.bogus_key=1` adds: named where it is, not in exp.rooms.train
    with pytest.raises(ValueError, match=r"unknown key\(s\) in the top-level 'train' of params.yaml \(which sets them "
                                         r"for every experiment\): bogus_key; allowed keys: amp, "):
        load_experiment(params, "rooms")


def test_default_experiments_run_offline():
    for name in active_experiments(PARAMS):
        assert load_experiment(PARAMS, name).data.source in ("rooms", "ale")


def test_unknown_experiment_and_key_give_one_clear_error(tmp_path):
    result = run_stage("train", "nope", tmp_path, ROOT / "params.yaml")
    assert result.returncode == 1
    assert "error: [nope] unknown experiment 'nope'; defined under 'exp' in params.yaml: rooms" in result.stderr
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["exp"]["rooms"]["model"]["G"] = 5
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    result = run_stage("train", "rooms", tmp_path, bad)
    assert result.returncode == 1
    assert "invalid value for 'exp.rooms.model.G': 5; allowed: one of (4, 8, 16)" in result.stderr
    assert not (tmp_path / "models").exists()
    # A value from the top-level section, which overrides every experiment, is named there.
    params["exp"]["rooms"]["model"]["G"] = 8
    params["train"]["seed"] = "two"
    bad.write_text(yaml.safe_dump(params))
    result = run_stage("train", "rooms", tmp_path, bad)
    assert result.returncode == 1
    assert ("invalid value for the top-level 'train.seed' of params.yaml (set for every experiment): 'two'; "
            "allowed: a value of type int") in result.stderr


def test_two_experiments_at_once_do_not_corrupt_each_other(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = params["exp"]["rooms"]
    for name, seed in (("a", 1), ("b", 2)):
        params["exp"][name] = {
            "data": {**base["data"], "root": f"data/rooms_{name}", "num_train": 6, "num_val": 2, "num_test": 2},
            "model": base["model"],
            "train": {**base["train"], "seed": seed, "max_steps": 3, "batch_size": 2, "save_every": 1,
                      "eval_every": 2, "val_num_images": 2, "plot_every": 1, "device": "cpu"},
        }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def both(stage):
        processes = [subprocess.Popen([sys.executable, "-m", f"stages.{stage}", name, "--params", str(path)],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for name in ("a", "b")]
        for process in processes:
            _, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-2000:]

    both("data")
    both("train")
    import space
    a, b = space.load(tmp_path / "models" / "a.pth"), space.load(tmp_path / "models" / "b.pth")
    assert not torch.equal(a.state_dict()["bg_module.z_mask_0"], b.state_dict()["bg_module.z_mask_0"])
    runs = sorted(p.parent.parent.name for p in (tmp_path / "checkpoints").glob("*/*/model_*.pth"))
    assert set(runs) == {"a", "b"}
    for name in ("a", "b"):
        rows = (tmp_path / "plots" / "train" / f"{name}.csv").read_text().splitlines()
        assert rows[0].startswith("step,") and len(rows) == 5  # header + steps 0..3
    assert not list(tmp_path.rglob(".*.tmp"))


def test_output_best_writes_the_best_validation_checkpoint(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    entry = params["exp"]["rooms"]
    entry["data"].update(root="data/rooms", num_train=4, num_val=2, num_test=2)
    entry["train"].update(max_steps=4, batch_size=2, val_num_images=2, save_every=1, eval_every=1, plot_every=1,
                          device="cpu", output="best", best_metric="count_error_rate")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    for stage in ("data", "train"):
        result = run_stage(stage, "rooms", tmp_path, path)
        assert result.returncode == 0, result.stderr[-2000:]
    best_json = next((tmp_path / "checkpoints" / "rooms").glob("*/best_count_error_rate.json"))
    best = json.loads(best_json.read_text())
    from space.checkpoint import read_checkpoint
    written = read_checkpoint(tmp_path / "models" / "rooms.pth")
    kept = read_checkpoint(best_json.with_suffix(".pth"))
    assert written["global_step"] == best["global_step"]
    assert all(torch.equal(written["model"][k], kept["model"][k]) for k in kept["model"])
    assert "output: the best checkpoint by validation count_error_rate" in result.stderr
    # Another best_metric resumes the finished run, whose validations kept no best checkpoint by it.
    entry["train"]["best_metric"] = "ap_50"
    path.write_text(yaml.safe_dump(params))
    result = run_stage("train", "rooms", tmp_path, path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train.output is 'best' but this run holds no best checkpoint by validation ap_50" in result.stderr
    assert "no validation ran" not in result.stderr
    assert read_checkpoint(tmp_path / "models" / "rooms.pth")["global_step"] == 4
    # A best checkpoint cut short (the machine went down as it was written) does not block the stage.
    entry["train"]["best_metric"] = "count_error_rate"
    path.write_text(yaml.safe_dump(params))
    best_pth = best_json.with_suffix(".pth")
    best_pth.write_bytes(best_pth.read_bytes()[:100])
    result = run_stage("train", "rooms", tmp_path, path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"best_count_error_rate\.pth: not a PyTorch checkpoint[^\n]*; writing the last step instead "
                     r"\(delete it and best_count_error_rate\.json", result.stderr)
    assert "holds no best checkpoint" not in result.stderr
    assert read_checkpoint(tmp_path / "models" / "rooms.pth")["global_step"] == 4


def test_dvc_repro_runs_an_original_experiment_and_then_nothing(tmp_path):
    """The stages under DVC itself (the tests above call them directly): DVC checks every declared
    parameter before a stage runs. A copy of the pipeline with 3d_room_small at smoke size runs to
    the end with `dvc repro`, a second `dvc status` finds nothing to do, and other data re-run it all."""
    import shutil
    for folder in ("stages", "space"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load(smoke_params("3d_room_small", tmp_path).read_text())
    params["experiments"] = ["3d_room_small"]
    params["export"].update(batch_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # the stages' `python` is this interpreter, as with the README's PATH="$PWD/.venv/bin:$PATH"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def dvc(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        return result.stdout

    dvc("init", "--no-scm", "-q")
    dvc("repro")
    metrics = json.loads((tmp_path / "metrics" / "3d_room_small.json").read_text())
    assert metrics["num_images"] == 2 and "ap_50" in metrics
    assert (tmp_path / "exports" / "3d_room_small.json").is_file()
    assert "up to date" in dvc("status")
    # Other data (here other rooms: another generator seed) re-runs every later stage: they depend on
    # the data stage's manifest, which holds the images' fingerprint. It held the split sizes only,
    # and DVC went on to skip training, evaluation, demo and export on the new images.
    params["exp"]["3d_room_small"]["data"]["seed"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = dvc("repro")
    for stage in ("data", "train", "evaluate", "demo", "export"):
        assert f"Running stage '{stage}@3d_room_small'" in out, out[-3000:]
    assert len(list((tmp_path / "checkpoints" / "3d_room_small").iterdir())) == 2  # a new training run
    assert "up to date" in dvc("status")


def folder_experiment(tmp_path: Path, sizes: list[tuple[int, int]], suffix: str, **model) -> tuple[Path, Path]:
    """A user's folder experiment 'mine' under tmp_path: image i of size sizes[i] (flat colours)
    with one box each, and a params.yaml holding only it; returns (folder, params path)."""
    from PIL import Image

    folder = tmp_path / "data" / "mine"
    (folder / "bb").mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (20 * i, 100, 50)).save(folder / f"img{i}.{suffix}", quality=95)
        (folder / "bb" / f"img{i}.txt").write_text("20,15,8,8\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["experiments"] = ["mine"]
    params["exp"]["mine"] = {"data": {"source": "folder", "root": "data/mine"}, "model": model, "train": {},
                             "pretrained": None}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return folder, path


def test_a_folder_experiments_new_images_start_a_new_training_run(tmp_path):
    """A user's folder does not follow from params.yaml: the data stage records a fingerprint of its
    images and boxes in the manifest, and it enters the training run id, so that changed images
    start a new run instead of resuming checkpoints trained on the old ones."""
    from PIL import Image
    from space.experiment import data_fingerprint, data_identity
    from space.training import run_id

    folder, path = folder_experiment(tmp_path, [(40, 30)] * 10, "png", image_size=64, G=8)
    manifest = tmp_path / "data" / "manifests" / "mine.json"

    def data_stage() -> str:
        result = run_stage("data", "mine", tmp_path, path)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(manifest.read_text())["content"]

    first = data_stage()
    exp, params = load_experiment(path, "mine"), yaml.safe_load(path.read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert first == data_fingerprint(exp) and data_stage() == first  # the same images, the same print
        # the same images split otherwise (another split seed) are other data
        assert data_fingerprint(load_experiment({**params, "exp": {"mine": {
            **params["exp"]["mine"], "data": {"source": "folder", "root": "data/mine", "seed": 1}}}}, "mine")) != first
    ids = [run_id(exp.model, exp.train, data_identity(exp.data, 64, first))]
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "img3.png")  # one image replaced
    second = data_stage()
    (folder / "bb" / "img4.txt").write_text("10,10,4,4\n")  # one box changed
    third = data_stage()
    ids += [run_id(exp.model, exp.train, data_identity(exp.data, 64, c)) for c in (second, third)]
    assert len({first, second, third}) == 3 and len(set(ids)) == 3
    # the same files elsewhere are the same data: a moved folder resumes its run
    moved = dataclasses.replace(exp.data, root="elsewhere/mine")
    assert run_id(exp.model, exp.train, data_identity(moved, 64, third)) == ids[-1]
    # a setting that changes how the files are read is in the manifest the later stages depend on
    manifest_identity = json.loads(manifest.read_text())["identity"]
    assert manifest_identity["content"] == third and "root" not in manifest_identity
    assert data_identity(dataclasses.replace(exp.data, bgr=True), 64, third) != data_identity(exp.data, 64, third)


def test_the_data_stage_names_every_image_and_box_file_it_cannot_use(tmp_path):
    """A truncated image or a malformed box line stops the data stage, naming each file, rather than
    a training run when a batch first needs the file; without them the stage passes."""
    folder, path = folder_experiment(tmp_path, [(60 + i, 45) for i in range(12)], "jpg", image_size=32, G=4)
    assert run_stage("data", "mine", tmp_path, path).returncode == 0
    whole = (folder / "img5.jpg").read_bytes()
    (folder / "img5.jpg").write_bytes(whole[:len(whole) * 2 // 3])  # its header intact, its end gone
    (folder / "bb" / "img9.txt").write_text("20,15,8,8\n1,2,3\n")
    result = run_stage("data", "mine", tmp_path, path)
    assert result.returncode == 1
    assert "2 of the 12 images of data/mine (or their box files) cannot be used" in result.stderr
    assert re.search(r"Cannot read image data/mine/img5\.jpg: [^\n]*\. The file is corrupt or truncated", result.stderr)
    assert "data/mine/bb/img9.txt, line 2: expected 'centre_x,centre_y,width,height' in pixels, got '1,2,3'" \
        in result.stderr
    assert "Traceback" not in result.stderr


def test_a_stage_prints_a_warning_once_on_its_own_line_above_the_progress_bar(tmp_path):
    # The stages log through tqdm.write: a plain stream handler wrote into the bar's line
    # ("train:  48%|...| 10/21 [...]WARNING space.training: ..."), and the trainer wrote each
    # warning a second time itself.
    script = tmp_path / "stage.py"
    script.write_text(
        "import logging\nfrom tqdm import tqdm\nfrom space.cli import stage_main\n\n"
        "def main(args):\n"
        "    for i in tqdm(range(3), desc='train'):\n"
        "        if i == 1:\n"
        "            logging.getLogger('space.training').warning('step 1: something to see')\n\n"
        "stage_main('a stage', main)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script), "rooms"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = re.split(r"[\r\n]", result.stderr)
    assert [line for line in lines if "something to see" in line] == ["WARNING space.training: step 1: something to see"]
    assert any(line.startswith("train: 100%") for line in lines)


def test_a_stage_stopped_with_ctrl_c_exits_130_with_one_line(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("from space.cli import stage_main\n\n"
                      "def main(args):\n    raise KeyboardInterrupt\n\n"
                      "stage_main('a stage', main)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script), "rooms"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (130, "error: [rooms] interrupted\n")


@pytest.mark.parametrize("section, key, value, message", [
    ("evaluate", "num_images", 0, "invalid value for 'evaluate.num_images': 0; allowed: null (the whole split) or an integer >= 1"),
    ("evaluate", "mode", "foo", "invalid value for 'evaluate.mode': 'foo'; allowed: 'deterministic' or 'sample'"),
    ("evaluate", "split", "tset", "invalid value for 'evaluate.split': 'tset'; allowed: 'train' or 'val' or 'test'"),
    ("evaluate", "batch_size", 0, "invalid value for 'evaluate.batch_size': 0; allowed: an integer >= 1"),
    ("export", "threshold", 1.5, "invalid value for 'export.threshold': 1.5; allowed: a presence probability in [0, 1)"),
    ("export", "num_images", True, "invalid value for 'export.num_images': True"),
    ("demo", "indices", [], "invalid value for 'demo.indices': []; allowed: a non-empty list of image indices"),
    ("demo", "indices", [0, -1], "invalid value for 'demo.indices': [0, -1]"),
    ("demo", "colour", "red", "'demo' in params.yaml: unknown key(s) colour; its keys: split, indices, mode"),
])
def test_stage_settings_name_the_key_at_fault(section, key, value, message):
    # num_images 0 used to evaluate nothing and write mse 0.0 with a background failure
    from space.experiment import stage_settings
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in ("evaluate", "export", "demo"):
        assert stage_settings(params, name) == params[name]
    params[section][key] = value
    with pytest.raises(ValueError) as error:
        stage_settings(params, section)
    assert message in str(error.value)
    del params[section]
    with pytest.raises(ValueError, match=f"params.yaml needs a '{section}' section"):
        stage_settings(params, section)


TRACE_DRIVER = '''
import json, runpy, sys, threading
root, stage, params = sys.argv[1:4]
files = set()
def record(frame, event, arg):
    if event == "call" and frame.f_code.co_flags & 0x0002:  # CO_NEWLOCALS: a function, not a module or class body
        files.add(frame.f_code.co_filename)
sys.setprofile(record)
threading.setprofile(record)
sys.argv = [stage, "rooms", "--params", params]
code = 0
try:
    runpy.run_module("stages." + stage, run_name="__main__")
except SystemExit as exit:
    code = exit.code
sys.setprofile(None)
print(json.dumps({"code": code, "files": sorted(f[len(root) + 1:] for f in files if f.startswith(root + "/space/"))}))
'''


def test_each_stage_lists_every_space_module_it_runs_among_its_dvc_deps(tmp_path):
    """DVC re-runs a stage when one of its deps changes, so a module a stage calls into but does not
    list would let a change to it go unseen. Each stage runs at smoke size under a profiler that
    records the file of every function called; each file of `space` must be a dep of the stage (a
    file, or a folder above it). space/cli.py parses the arguments and prints errors, and is exempt."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    entry = params["exp"]["rooms"]
    entry["data"].update(root="data/rooms", num_train=4, num_val=2, num_test=2)
    entry["train"].update(max_steps=2, batch_size=2, val_num_images=2, print_every=1, save_every=1, eval_every=1,
                          plot_every=1, device="cpu")
    params["evaluate"].update(batch_size=2, device="cpu")
    params["export"].update(batch_size=2)
    params["demo"]["indices"] = [0, 1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "driver.py").write_text(TRACE_DRIVER)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["data", "train", "evaluate", "demo", "export"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for stage, spec in stages.items():
        result = subprocess.run([sys.executable, "driver.py", str(ROOT), stage, "params.yaml"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        run = json.loads(result.stdout.strip().splitlines()[-1])
        assert run["code"] in (0, None), result.stderr[-3000:]
        deps = spec["do"]["deps"]
        unlisted = [f for f in run["files"] if f != "space/cli.py"
                    and not any(f == dep or f.startswith(dep.rstrip("/") + "/") for dep in deps)]
        assert not unlisted, f"stage {stage} runs code in {unlisted}, which dvc.yaml does not list among its deps"
        assert f"stages/{stage}.py" in deps


def test_generated_data_is_made_once_and_again_only_when_its_settings_change(tmp_path, monkeypatch):
    # The marker was compared with the settings as Python holds them: split_fractions is a tuple
    # there and a list once read back from JSON, so every data stage regenerated the images.
    import space.data as datasets
    from space.experiment import prepare_data

    monkeypatch.chdir(tmp_path)
    calls = []
    real = datasets.generate_rooms
    monkeypatch.setattr(datasets, "generate_rooms", lambda *a, **k: calls.append(k) or real(*a, **k))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["exp"]["rooms"]["data"].update(root="data/r", num_train=2, num_val=1, num_test=1)
    for _ in range(2):
        prepare_data(load_experiment(params, "rooms"), progress=False)
    assert len(calls) == 1
    params["exp"]["rooms"]["data"]["seed"] = 5
    prepare_data(load_experiment(params, "rooms"), progress=False)
    assert len(calls) == 2 and calls[-1]["seed"] == 5
    # A folder it did not generate (a user's images, or data/ itself) is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    params["exp"]["rooms"]["data"]["root"] = "mine"
    with pytest.raises(FileExistsError, match=r"mine \(exp.rooms.data.root\) holds files that were not generated "
                                              r"here \(it has no .generated-from.json\), and generating the 'rooms' "
                                              r"data there would replace them: point data.root at a new folder, or "
                                              r"set data.source: folder"):
        prepare_data(load_experiment(params, "rooms"), progress=False)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"] and len(calls) == 2
    # A downloaded dataset extracts to its archive's folder name: another root is named before fetching.
    params["exp"]["3d_room_small"]["data"]["root"] = "data/obj3d_small"
    with pytest.raises(ValueError, match=r"exp.3d_room_small.data.root 'data/obj3d_small' does not exist, and the "
                                         r"OBJ3D_SMALL archive extracts to a folder named OBJ3D_SMALL: name data.root "
                                         r".../OBJ3D_SMALL \(e.g. data/OBJ3D_SMALL\)"):
        prepare_data(load_experiment(params, "3d_room_small"), progress=False)


def test_generated_data_missing_in_a_copy_is_made_again_without_fcntl(tmp_path, monkeypatch, caplog):
    # ensure_data locks the manifest while it makes the data (torchrun's processes all come there);
    # where no lock can be taken (Windows, Lustre without flock) it makes them unlocked, and says so.
    import shutil
    import sys

    import space.io
    from space.experiment import data_fingerprint, ensure_data, prepare_data
    from space.io import write_json

    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["exp"]["rooms"]["data"].update(root="data/r", num_train=2, num_val=1, num_test=1)
    exp = load_experiment(params, "rooms")
    prepare_data(exp, progress=False)
    write_json("data/manifests/rooms.json", {"content": data_fingerprint(exp, progress=False)})
    shutil.rmtree("data/r")  # as in a copy holding what git tracks
    monkeypatch.setattr(space.io, "fcntl", None)
    with caplog.at_level("WARNING"):
        ensure_data(exp)
    assert f"cannot be locked (no flock on {sys.platform}): under torchrun" in caplog.text
    assert "data/r is missing though data/manifests/rooms.json is there" in caplog.text
    assert len(list((tmp_path / "data/r/train").glob("*.png"))) == 2


def test_two_experiments_generating_different_data_into_one_root_are_refused():
    from space.experiment import check_generated_root
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["exp"]["small"] = {**params["exp"]["rooms"], "data": {**params["exp"]["rooms"]["data"], "max_size": 0.2}}
    with pytest.raises(ValueError) as error:
        check_generated_root(params, "small")
    assert ("exp.small.data.root 'data/rooms64' is also where exp.rooms generates its data, with other settings "
            "(max_size 0.2 against 0.22)") in str(error.value)
    params["exp"]["small"]["data"]["root"] = "data/rooms64_small"
    check_generated_root(params, "small")  # its own root
    params["exp"]["same"] = params["exp"]["rooms"]  # the same settings share a root without harm
    check_generated_root(params, "same")


def test_stages_make_generated_data_again_where_a_copy_of_the_repository_lacks_it(tmp_path):
    """`dvc exp run --queue` and `--temp` run in a copy holding what git tracks: with dvc.lock
    committed, DVC skips the data stage there and the images (git-ignored) are missing. The later
    stages make generated data again, checked against the manifest; a user's folder is named."""
    import shutil

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    entry = params["exp"]["rooms"]
    entry["data"].update(root="data/rooms", num_train=4, num_val=2, num_test=2)
    entry["train"].update(max_steps=1, batch_size=2, val_num_images=2, eval_every=1, device="cpu")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert run_stage("data", "rooms", tmp_path, path).returncode == 0
    made = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data" / "rooms").rglob("*.png"))
    shutil.rmtree(tmp_path / "data" / "rooms")
    result = run_stage("train", "rooms", tmp_path, path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data/rooms is missing though data/manifests/rooms.json is there" in result.stderr
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data" / "rooms").rglob("*.png")) == made
    test = tmp_path / "data" / "rooms" / "test"  # an image added since the data stage ran
    shutil.copy(test / "0-room.png", test / "2-room.png")
    shutil.copy(test / "bb" / "bb_0.txt", test / "bb" / "bb_2.txt")
    result = run_stage("evaluate", "rooms", tmp_path, path)
    assert result.returncode == 1
    assert ("data/rooms holds other images than when the data stage wrote data/manifests/rooms.json: images per split "
            "test 3 (recorded 2); run `dvc repro --force data@rooms`") in result.stderr
    entry["data"] = {"source": "folder", "root": "data/mine"}
    path.write_text(yaml.safe_dump(params))
    result = run_stage("evaluate", "rooms", tmp_path, path)
    assert result.returncode == 1
    assert ("image folder data/mine (exp.rooms.data.root) does not exist here, though data/manifests/rooms.json "
            "does: a run of `dvc exp run --queue` or `--temp` works in a copy") in result.stderr


def test_generated_atari_frames_never_replace_the_archives_and_read_only_their_games(tmp_path, monkeypatch):
    """The ATARI archive's folders have the names generated games have: switching an experiment
    to `source: ale` at its root must not overwrite them. A run of other games reads only those,
    and a regeneration that stops part-way leaves no marker over a mix of old and new frames."""
    pytest.importorskip("ale_py")
    import space.data as datasets
    from space.experiment import GENERATED_MARKER, prepare_data

    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    entry = params["exp"]["atari_spaceinvaders"]
    (tmp_path / "data" / "ATARI" / "SpaceInvaders-v0" / "train").mkdir(parents=True)
    (tmp_path / "data" / "ATARI" / "SpaceInvaders-v0" / "train" / "0.png").write_bytes(b"the archive's")
    entry["data"] = {"source": "ale", "root": "data/ATARI", "games": ["SpaceInvaders"], "num_train": 1,
                     "num_val": 1, "num_test": 1}
    with pytest.raises(FileExistsError, match=r"data/ATARI \(exp.atari_spaceinvaders.data.root\) holds files that "
                                              r"were not generated here"):
        prepare_data(load_experiment(params, "atari_spaceinvaders"), progress=False)
    assert (tmp_path / "data" / "ATARI" / "SpaceInvaders-v0" / "train" / "0.png").read_bytes() == b"the archive's"
    entry["data"].update(root="data/ale", games=["Pong"])
    prepare_data(load_experiment(params, "atari_spaceinvaders"), progress=False)
    entry["data"]["games"] = ["Breakout"]
    prepare_data(load_experiment(params, "atari_spaceinvaders"), progress=False)
    dataset = build_dataset(load_experiment(params, "atari_spaceinvaders"), "train")
    assert len(dataset) == 1 and "Breakout-v0" in str(dataset.files()[0])  # not Pong's frame besides
    monkeypatch.setattr(datasets, "generate_atari", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    entry["data"]["seed"] = 5
    with pytest.raises(KeyboardInterrupt):
        prepare_data(load_experiment(params, "atari_spaceinvaders"), progress=False)
    assert not (tmp_path / "data" / "ale" / GENERATED_MARKER).exists()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    prepare_data(load_experiment(params, "atari_spaceinvaders"), progress=False)  # its own folders: made again
    assert (tmp_path / "data" / "ale" / GENERATED_MARKER).is_file()


def test_the_data_stage_names_what_a_folder_holds_that_it_does_not_read(tmp_path):
    """A user's folder: files PIL identifies but cannot decode here (its stub formats: HDF5, GRIB),
    subfolders, other files and box files without an image are named, not silently passed over;
    boxes the centre crop leaves out are counted, and all of them left out (boxes written as
    fractions of the image) stop the stage; a box file that is not UTF-8 is named."""
    folder, path = folder_experiment(tmp_path, [(60, 40 + i) for i in range(10)], "png", image_size=32, G=4)
    (folder / "scan.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(300))  # was a ZeroDivisionError traceback
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    (folder / "sub" / "deeper.png").write_bytes((folder / "img0.png").read_bytes())
    (folder / "bb" / "ghost.txt").write_text("1,1,1,1\n")
    (folder / "bb" / "img3.txt").write_text("20,15,8,8\n1,20,1,1\n")  # the second in the strip cropped off
    (folder / "bb" / "img4.txt").write_text("20,15,8,8\n20,15,0,0\n")  # a point: no box, but not cropped off
    (folder / "bb" / ".DS_Store").write_bytes(b"\0")  # hidden: not named
    result = run_stage("data", "mine", tmp_path, path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "INFO stages.data: data/mine: 8 train, 1 val, 1 test" in result.stderr
    assert ("data/mine: 4 entries not read (subfolders, files of no image format PIL decodes here, box files without "
            "an image): notes.txt, scan.h5, sub/, bb/ghost.txt") in result.stderr
    assert ("1 of the 11 boxes in data/mine/bb lie wholly outside the centre square their images are cropped to, and "
            "are left out (e.g. data/mine/bb/img3.txt)") in result.stderr

    for box in (folder / "bb").glob("img*.txt"):
        box.write_text("1,20,1,1\n")  # every box in the strip cropped off
    result = run_stage("data", "mine", tmp_path, path)
    assert result.returncode == 1
    assert re.search(r"10 of the 10 boxes in data/mine/bb lie wholly outside the centre square their images are cropped "
                     r"to, and are left out \(e\.g\. data/mine/bb/img\d\.txt\): all of them; box lines are "
                     r"'centre_x,centre_y,width,height' in pixels of the image as stored", result.stderr)
    for box in (folder / "bb").glob("img*.txt"):
        box.write_text("0.5,0.5,0.1,0.1\n")  # fractions, not pixels
    result = run_stage("data", "mine", tmp_path, path)
    assert result.returncode == 1
    assert "every number in the box files of data/mine/bb is at most 1: box lines are" in result.stderr

    for box in (folder / "bb").glob("img*.txt"):
        box.write_text("20,15,8,8\n")
    (folder / "bb" / "img0.txt").write_bytes("20,15,8,8\n".encode("utf-16"))  # PowerShell's '>'
    (folder / "bb" / "img1.txt").write_bytes("20,15,8,8\n".encode("utf-8-sig"))  # a byte-order mark: fine
    result = run_stage("data", "mine", tmp_path, path)
    assert "1 of the 10 images of data/mine (or their box files) cannot be used" in result.stderr
    assert "Box file data/mine/bb/img0.txt is not UTF-8 text (invalid start byte at byte 0; UTF-16" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_folder_names_the_queue_copy_when_its_path_is_relative(tmp_path, monkeypatch):
    # `dvc exp run --queue`/`--temp` run in a copy of the repository: a relative data.root names the
    # copy's folder, where the user's (git-ignored) images are not.
    from space.experiment import prepare_data
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["exp"]["mine"] = {"data": {"source": "folder", "root": "data/mine"}, "model": {"image_size": 32, "G": 4},
                             "train": {}, "pretrained": None}
    with pytest.raises(FileNotFoundError, match=r"image folder data/mine \(exp\.mine\.data\.root\) does not exist: .*"
                                                r"under `dvc exp run --queue` or `--temp`.*give an absolute one"):
        prepare_data(load_experiment(params, "mine"), progress=False)
    params["exp"]["mine"]["data"]["root"] = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"change the path in params\.yaml$"):
        prepare_data(load_experiment(params, "mine"), progress=False)


def test_generated_data_missing_a_file_is_made_again(tmp_path, monkeypatch, caplog):
    # An image deleted by hand from generated data: the data stage made nothing (its marker was
    # there), and the gap error's remedy, `dvc repro --force data@<experiment>`, could not help.
    from space.experiment import prepare_data, read_manifest
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["exp"]["rooms"]["data"].update(root="data/small", num_train=4, num_val=3, num_test=2)
    params["exp"]["rooms"]["model"].update(image_size=32, G=4)
    exp = load_experiment(params, "rooms")
    root = prepare_data(exp, progress=False)
    image = root / "val" / "1-room.png"
    before = image.read_bytes()
    image.unlink()
    with caplog.at_level("WARNING"):
        prepare_data(exp, progress=False)
    assert "data/small: val holds 2 of the 3 images made since it was generated; making it again" in caplog.text
    assert image.read_bytes() == before  # the seeded generator makes the same files
    (root / "test" / "bb" / "bb_0.txt").unlink()
    caplog.clear()
    with caplog.at_level("WARNING"):
        prepare_data(exp, progress=False)
    assert "data/small: test/bb holds 1 of the 2 box files made since it was generated" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        prepare_data(exp, progress=False)
    assert caplog.text == ""  # complete: nothing made again
    manifest = tmp_path / "data" / "manifests" / "rooms.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"root": "data/small", "spl')
    with pytest.raises(ValueError, match=r"data/manifests/rooms\.json is not valid JSON \(.*\); run `dvc repro --force "
                                         r"data@rooms` to write it again"):
        read_manifest(exp)


def test_ctrl_c_while_a_stage_imports_prints_one_line():
    # Importing torch takes seconds, most of a short stage's run: an interrupt then printed a
    # traceback through torch's import (and once numpy's "cannot load module more than once").
    # The stages package handles SIGINT until stage_main takes over; here the interrupt comes
    # right after it, before torch is imported.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as from a terminal, not `&`
            "import stages, os; os.kill(os.getpid(), signal.SIGINT); import torch; print('not interrupted')")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr, result.stdout) == (130, "error: interrupted\n", "")


def test_a_stage_error_names_the_experiment_in_the_command_it_suggests(monkeypatch, capsys):
    from space.cli import stage_main

    def main(args):
        raise ValueError("restore it (`dvc repro --force data@<experiment>` makes it again)")

    monkeypatch.setattr(sys, "argv", ["stages.data", "rooms"])
    with pytest.raises(SystemExit) as exit_:
        stage_main("test", main)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "error: [rooms] restore it (`dvc repro --force data@rooms` makes it again)\n"
