"""Training loop: exact resume after SIGKILL, non-finite steps, checkpoint retention."""
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT
from space.checkpoint import read_checkpoint
from space.config import ModelConfig, TrainConfig
from space.schedules import final_priors, priors_at
from space.training import Trainer, TrainingError, find_checkpoints

TINY_MODEL = dict(image_size=32, G=4, glimpse_size=16, fg_width=0.25, bg_width=0.25, K=2, z_pres_start_step=2,
                  z_pres_end_step=8, tau_end_step=10, tau_end_value=1.0)
TINY_TRAIN = dict(seed=3, batch_size=4, max_steps=13, save_every=1, max_ckpt=3, print_every=5, eval_on=False,
                  fg_optim="Adam", fg_lr=1e-3, bg_optim="Adam", bg_lr=1e-3, device="cpu", plot_every=1)


class RandomImages(torch.utils.data.Dataset):
    """Fixed random images (10 of them, so an epoch has 3 batches of 4, 4 and 2)."""

    def __init__(self, n=10, size=32):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


SCRIPT = textwrap.dedent(f"""
    import sys, torch
    sys.path.insert(0, {str(ROOT)!r})
    sys.path.insert(0, {str(ROOT / 'tests')!r})
    from test_training import RandomImages, TINY_MODEL, TINY_TRAIN
    from space.config import ModelConfig, TrainConfig
    from space.training import Trainer
    torch.set_num_threads(1)
    trainer = Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**TINY_TRAIN), RandomImages(), sys.argv[1],
                      plots_path=sys.argv[1] + "/plot.csv", progress=False)
    model = trainer.fit()
    torch.save(model.state_dict(), sys.argv[1] + "/final.pt")
""")


def test_sigkill_three_times_then_resume_equals_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(straight)], check=True, timeout=300)
    rng = random.Random(1)
    kills = 0
    for target in sorted(rng.sample(range(2, 12), 3)):
        process = subprocess.Popen([sys.executable, str(script), str(killed)])
        deadline = time.time() + 120
        # wait until the checkpoint of step `target` exists, plus a random fraction of a step
        while time.time() < deadline and not (killed / f"model_{target + 1:09d}.pth").exists():
            if process.poll() is not None:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.2))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills == 3
    subprocess.run([sys.executable, str(script), str(killed)], check=True, timeout=300)
    a, b = torch.load(straight / "final.pt"), torch.load(killed / "final.pt")
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit on the CPU
    # the optimiser states and the plot rows match too
    last_a, last_b = find_checkpoints(straight)[-1], find_checkpoints(killed)[-1]
    assert last_a.name == last_b.name == "model_000000014.pth"
    ca, cb = read_checkpoint(last_a), read_checkpoint(last_b)
    for state_a, state_b in zip(ca["optimizer_bg"]["state"].values(), cb["optimizer_bg"]["state"].values()):
        assert torch.equal(state_a["exp_avg_sq"], state_b["exp_avg_sq"])
    assert (straight / "plot.csv").read_text() == (killed / "plot.csv").read_text()
    assert len(find_checkpoints(killed)) == 3  # max_ckpt


class BoxedImages(RandomImages):
    """Random images with one ground-truth box each: a validation set that gets AP and counts."""

    has_boxes = True

    def boxes(self, index):
        return np.array([[0.25, 0.5, 0.25, 0.5]], dtype=np.float32)


def test_resume_after_a_validation_step_equals_uninterrupted_run(tmp_path):
    # Validation runs between a step's checkpoint and the next step, and its data loader draws
    # from torch's global RNG: a checkpoint must hold the RNG state the next step starts from.
    cfg = dict(TINY_TRAIN, max_steps=7, save_every=2, eval_on=True, eval_every=2, val_num_images=4,
               val_batch_size=2, best_metric="ap_50")
    straight = Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**cfg), RandomImages(), tmp_path / "a",
                       val_set=BoxedImages(n=4), plots_path=tmp_path / "a.csv", progress=False).fit()
    Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**cfg, "max_steps": 4}), RandomImages(), tmp_path / "b",
            val_set=BoxedImages(n=4), progress=False).fit()  # stops after step 4: checkpoint, validation
    resumed = Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**cfg), RandomImages(), tmp_path / "b",
                      val_set=BoxedImages(n=4), plots_path=tmp_path / "b.csv", progress=False)
    assert resumed.position.step == 5
    resumed = resumed.fit()
    a, b = straight.state_dict(), resumed.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the resumed run's curves keep the validation rows written before the interruption
    rows_a, rows_b = (pd.read_csv(tmp_path / f"{n}.csv") for n in "ab")
    assert list(rows_a["step"]) == list(rows_b["step"])
    assert rows_a["val_ap_50"].notna().sum() == rows_b["val_ap_50"].notna().sum() == 4  # steps 0, 2, 4, 6
    # the periodic checkpoint keeps the training step's prior buffers, the best one the final
    # priors its validation set (as the original's checkpoints do)
    model_cfg = ModelConfig(**TINY_MODEL)
    periodic = read_checkpoint(tmp_path / "b" / "model_000000005.pth")["model"]
    assert periodic["fg_module.tau"].item() == pytest.approx(priors_at(model_cfg, 4).tau)
    best = read_checkpoint(tmp_path / "b" / "best_ap_50.pth")["model"]
    assert best["fg_module.tau"].item() == pytest.approx(final_priors(model_cfg).tau) != priors_at(model_cfg, 4).tau


def test_non_finite_steps_are_skipped_then_stop_training(tmp_path, monkeypatch):
    cfg = TrainConfig(**{**TINY_TRAIN, "max_bad_steps": 3, "max_steps": 20})
    trainer = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path, progress=False)
    original_forward = trainer.model.forward
    calls = {"n": 0}

    def forward(x, priors, mode="sample"):
        out = original_forward(x, priors, mode)
        calls["n"] += 1
        if calls["n"] == 3 or calls["n"] >= 6:  # one isolated bad step, then bad for good
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", forward)
    with pytest.raises(TrainingError) as error:
        trainer.fit()
    message = str(error.value)
    assert "training stopped at step 7: 3 consecutive steps had a non-finite loss" in message
    kept = find_checkpoints(tmp_path)
    # the last checkpoint (step 6) is named and kept; skipped steps left the weights of step 4
    assert kept[-1].name == "model_000000007.pth" and "model_000000007.pth" in message
    after_4, after_6 = (read_checkpoint(tmp_path / f"model_00000000{i}.pth")["model"] for i in (5, 7))
    assert all(torch.equal(after_4[k], after_6[k]) for k in after_4)
    assert all(torch.isfinite(v.float()).all() for v in after_6.values())


def test_ctrl_c_names_the_checkpoint_a_new_run_resumes_from(tmp_path, monkeypatch, caplog):
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 20, "save_every": 2})
    trainer = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path, progress=False)
    original_forward = trainer.model.forward
    calls = {"n": 0}

    def forward(x, priors, mode="sample"):
        calls["n"] += 1
        if calls["n"] == 6:  # Ctrl-C during step 5
            raise KeyboardInterrupt
        return original_forward(x, priors, mode)

    monkeypatch.setattr(trainer.model, "forward", forward)
    with caplog.at_level("WARNING", logger="space.training"), pytest.raises(KeyboardInterrupt):
        trainer.fit()
    # steps 0, 2 and 4 saved (model_<step+1>); nothing written for the interrupted step
    assert [p.name for p in find_checkpoints(tmp_path)][-1] == "model_000000005.pth"
    assert any("training interrupted at step 5; the last checkpoint" in r.message
               and "model_000000005.pth" in r.message for r in caplog.records)
    assert Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path, progress=False).position.step == 5


def test_rerun_after_completion_does_no_work(tmp_path):
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 3})
    Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path, progress=False).fit()
    again = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path, progress=False)
    assert again.position.step == 4 and again.resumed_from.name == "model_000000004.pth"
    before = again.model.state_dict()["bg_module.z_mask_0"].clone()
    again.fit()
    assert torch.equal(before, again.model.state_dict()["bg_module.z_mask_0"])


def test_empty_training_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the training split is empty"):
        Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**TINY_TRAIN), RandomImages(n=0), tmp_path)


def test_the_initial_weights_are_never_the_best_checkpoint(tmp_path):
    # A run whose foreground collapses scores AP 0 at every validation after step 0, where random
    # boxes may hit by chance: the untrained model must not become the stage's output.
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 3, "best_metric": "ap_50"})
    trainer = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path, progress=False)
    position = trainer.position
    trainer._maybe_save_best({"ap_50": 0.002}, 0, position)
    assert trainer.best is None and not trainer.best_path.exists()
    trainer._maybe_save_best({"ap_50": 0.0}, 2, position)
    assert trainer.best.pop("date") and trainer.best == {"name": "ap_50", "value": 0.0, "global_step": 2}
    assert read_checkpoint(trainer.best_path)["global_step"] == 2


def test_bg_lr_warm_up_sets_the_background_learning_rate_of_every_step(tmp_path, monkeypatch):
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 4, "bg_lr_warmup_steps": 4, "bg_lr_warmup_factor": 0.2})
    trainer = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path, progress=False)
    seen = []
    bg_step = trainer.optimizers[1].step

    def step(*args, **kwargs):
        seen.append(trainer.optimizers[1].param_groups[0]["lr"])
        return bg_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizers[1], "step", step)
    trainer.fit()
    assert seen == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert trainer.optimizers[0].param_groups[0]["lr"] == 1e-3  # the foreground's is untouched


def test_lr_decay_sets_both_learning_rates_of_every_step(tmp_path, monkeypatch):
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 4, "fg_lr": 1e-3, "bg_lr": 2e-3, "lr_decay_start": 2,
                         "lr_decay_factor": 0.5})
    trainer = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path, progress=False)
    seen = []
    fg_step = trainer.optimizers[0].step

    def step(*args, **kwargs):
        seen.append([opt.param_groups[0]["lr"] for opt in trainer.optimizers])
        return fg_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizers[0], "step", step)
    trainer.fit()
    factors = [1.0, 1.0, 1.0, 0.75, 0.5]  # steps 0..4: flat to lr_decay_start, then down to 0.5 at max_steps
    assert seen == [pytest.approx([1e-3 * f, 2e-3 * f]) for f in factors]


def test_data_loader_workers_leave_the_trajectory_as_it_is(tmp_path):
    # train.num_workers > 0 loads batches in worker processes (a user's large photos); the batches, and
    # the random numbers the training draws, must be those of loading in the training process
    finals = []
    for workers in (0, 2):
        cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 4, "num_workers": workers})
        model = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path / f"w{workers}", progress=False).fit()
        finals.append(model.state_dict())
    for key, value in finals[0].items():
        assert torch.equal(value, finals[1][key]), key


def test_training_that_ends_at_max_epochs_before_max_steps_says_so(tmp_path, caplog):
    # 10 images in batches of 4 make 3 steps an epoch: 2 epochs end at step 5 of 13
    cfg = TrainConfig(**{**TINY_TRAIN, "max_epochs": 2})
    with caplog.at_level("WARNING", logger="space.training"):
        trainer = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path, progress=False)
        trainer.fit()
    assert trainer.position.step == 6
    assert ("training ended after 2 epochs (train.max_epochs) at step 5, before train.max_steps = 13: an epoch here "
            "is 3 steps; raise train.max_epochs") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="space.training"):
        Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**TINY_TRAIN), RandomImages(), tmp_path, progress=False).fit()
    assert "train.max_epochs" not in caplog.text  # raised back to 1000: the re-run resumes and reaches max_steps


def test_a_checkpoint_without_resume_state_is_skipped_and_leaves_the_model_alone(tmp_path, caplog):
    """A model file put among a run's checkpoints by hand (one of the original's, or a stage's
    output, which are named alike) holds no optimiser or data position: the run starts afresh from
    its seeded weights, saying why, instead of loading the weights and failing on the rest."""
    import space

    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 3})
    fresh = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path / "a", progress=False)
    other = space.Space(ModelConfig(**TINY_MODEL))
    with torch.no_grad():
        for value in other.parameters():
            value.add_(1.0)
    space.save_checkpoint(tmp_path / "b" / "model_000000002.pth", other, None, step=1, epoch=0)
    with caplog.at_level("WARNING", logger="space.training"):
        trainer = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path / "b", progress=False)
    assert trainer.resumed_from is None and trainer.position.step == 0
    assert "model_000000002.pth: it holds no resume, optimizer_fg, optimizer_bg to resume training from" in caplog.text
    mine, seeded = trainer.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(mine[key], seeded[key]) for key in seeded)


def test_a_lowered_max_steps_resumes_from_a_checkpoint_within_it_or_says_why_it_cannot(tmp_path, caplog):
    """The run id leaves max_steps out (raising it resumes the run): lowered below the step a run
    reached, training resumes from the last checkpoint within it, not from one past it, and a best
    checkpoint past it is set aside; with none within it, the error says what to do."""
    import shutil

    cfg = lambda steps: TrainConfig(**{**TINY_TRAIN, "max_steps": steps, "best_metric": "ap_50"})  # noqa: E731
    Trainer(ModelConfig(**TINY_MODEL), cfg(5), RandomImages(), tmp_path / "long", progress=False).fit()
    shutil.copy(tmp_path / "long" / "model_000000006.pth", tmp_path / "long" / "best_ap_50.pth")
    (tmp_path / "long" / "best_ap_50.json").write_text('{"name": "ap_50", "value": 0.5, "global_step": 5}')
    short = Trainer(ModelConfig(**TINY_MODEL), cfg(3), RandomImages(), tmp_path / "short", progress=False).fit()
    with caplog.at_level("WARNING", logger="space.training"):
        lowered = Trainer(ModelConfig(**TINY_MODEL), cfg(3), RandomImages(), tmp_path / "long", progress=False)
    assert lowered.resumed_from.name == "model_000000004.pth"  # of steps 3, 4 and 5 kept
    assert "this run reached step 5, past train.max_steps = 3" in caplog.text
    assert lowered.best is None and (tmp_path / "long" / "best_ap_50_step5.pth").is_file()
    model = lowered.fit().state_dict()
    assert all(torch.equal(model[key], value) for key, value in short.state_dict().items())
    with pytest.raises(TrainingError, match=r"holds this run's checkpoints of steps 3-5, all past train.max_steps = "
                                            r"2, and none before it \(train.max_ckpt = 3 are kept\)"):
        Trainer(ModelConfig(**TINY_MODEL), cfg(2), RandomImages(), tmp_path / "long", progress=False)


def test_the_plot_csv_holds_every_field_dvc_yaml_plots_even_without_validation(tmp_path):
    """`dvc plots show` dropped the whole training plot of a run without validation (eval_on false,
    as the Atari experiments and a folder without boxes): dvc.yaml names val_* fields it lacked."""
    import yaml

    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    fields = next(entry["plots/train"]["y"] for entry in plots if isinstance(entry, dict) and "plots/train" in entry)
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 2})
    Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path, plots_path=tmp_path / "plot.csv",
            progress=False).fit()
    frame = pd.read_csv(tmp_path / "plot.csv")
    assert set(fields) <= set(frame.columns) and frame["val_ap_50"].isna().all() and frame["loss"].notna().all()


def test_resume_keeps_a_best_within_max_steps_ignores_other_model_files_and_prunes_only_its_own(tmp_path):
    """A best checkpoint newer than the checkpoint resumed from, but within max_steps, is of the
    same trajectory and stays; a model_final.pth put in the folder by hand is no periodic
    checkpoint; after a lowered max_steps, pruning leaves the checkpoints past it and keeps the
    one just written."""
    import shutil

    cfg = lambda steps, **kw: TrainConfig(**{**TINY_TRAIN, "max_steps": steps, "best_metric": "ap_50", **kw})  # noqa: E731
    run = tmp_path / "run"
    Trainer(ModelConfig(**TINY_MODEL), cfg(7), RandomImages(), run, progress=False).fit()  # keeps steps 5, 6, 7
    shutil.copy(run / "model_000000008.pth", run / "model_final.pth")
    assert [p.name for p in find_checkpoints(run)] == [f"model_00000000{i}.pth" for i in (6, 7, 8)]
    (run / "model_000000007.pth").unlink()  # resume from step 5, with a best of step 6
    shutil.copy(run / "model_000000006.pth", run / "best_ap_50.pth")
    (run / "best_ap_50.json").write_text('{"name": "ap_50", "value": 0.5, "global_step": 6}')
    trainer = Trainer(ModelConfig(**TINY_MODEL), cfg(6, max_ckpt=1), RandomImages(), run, progress=False)
    assert trainer.resumed_from.name == "model_000000006.pth" and trainer.best["global_step"] == 6
    trainer.fit()  # trains step 6 and saves it; step 7's checkpoint is past max_steps and stays
    assert [p.name for p in find_checkpoints(run)] == ["model_000000007.pth", "model_000000008.pth"]


def test_validation_mse_in_a_pass_of_its_own_at_the_current_step(tmp_path):
    # SPEC 9.5: the original's validation MSE covers the first num_samples.mse images at the
    # current step's priors (tau changes z_pres even in deterministic mode), its AP t = 1e8.
    import space
    from space.evaluation import evaluate
    cfg = dict(TINY_TRAIN, max_steps=2, save_every=2, eval_on=True, eval_every=2, val_num_images=4,
               val_batch_size=2, val_mse_num_images=2)
    Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**cfg), RandomImages(), tmp_path / "run", val_set=BoxedImages(n=4),
            plots_path=tmp_path / "plot.csv", progress=False).fit()
    row = pd.read_csv(tmp_path / "plot.csv").set_index("step").loc[2]
    model = space.load(tmp_path / "run" / "model_000000003.pth")  # the weights validated at step 2
    current = evaluate(model, BoxedImages(n=4), 2, num_images=2, priors=priors_at(model.cfg, 2))
    final = evaluate(model, BoxedImages(n=4), 2, num_images=4)
    assert row["val_mse"] == float(f"{current['mse']:.6g}")  # the plot CSV's six significant digits
    assert f"{current['mse']:.6g}" != f"{evaluate(model, BoxedImages(n=4), 2, num_images=2)['mse']:.6g}"
    assert row["val_ap_50"] == pytest.approx(final["ap_50"])


def test_validation_mse_pass_enters_the_run_id():
    from space.training import run_id
    model = ModelConfig(**TINY_MODEL)
    base = run_id(model, TrainConfig(**{**TINY_TRAIN, "eval_on": True}))
    assert run_id(model, TrainConfig(**{**TINY_TRAIN, "eval_on": True, "val_mse_num_images": 100})) != base
    # in deterministic mode the pass draws once whatever its size
    assert (run_id(model, TrainConfig(**{**TINY_TRAIN, "eval_on": True, "val_mse_num_images": 100}))
            == run_id(model, TrainConfig(**{**TINY_TRAIN, "eval_on": True, "val_mse_num_images": 200})))
    # without validation there is no pass
    assert run_id(model, TrainConfig(**{**TINY_TRAIN, "val_mse_num_images": 100})) == run_id(model, TrainConfig(**TINY_TRAIN))


def test_checkpoint_epoch_is_the_epoch_of_its_step(tmp_path):
    # SPEC 11.1: 'epoch' is the epoch the saved step belongs to; resuming takes the position after it.
    # 10 images in batches of 4: steps 0-2 are epoch 0, step 3 opens epoch 1.
    Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**TINY_TRAIN, "max_steps": 3, "max_ckpt": 4}), RandomImages(),
            tmp_path, progress=False).fit()
    epochs = {path.name: read_checkpoint(path)["epoch"] for path in find_checkpoints(tmp_path)}
    assert epochs == {"model_000000001.pth": 0, "model_000000002.pth": 0, "model_000000003.pth": 0,
                      "model_000000004.pth": 1}
    resume = read_checkpoint(tmp_path / "model_000000003.pth")["resume"]
    assert (resume["epoch"], resume["batch"]) == (1, 0)


def test_a_run_trains_in_one_process_at_a_time(tmp_path):
    # A train stage left running by a killed `dvc`, and a new `dvc repro`, resumed the same run and
    # wrote the same checkpoints.
    from space.training import TrainingError, run_lock
    with run_lock(tmp_path / "run"):
        with pytest.raises(TrainingError, match=r"another training of this run is in progress \(pid \d+\), writing"):
            Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**TINY_TRAIN, "max_steps": 1}), RandomImages(),
                    tmp_path / "run", progress=False).fit()
    Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**TINY_TRAIN, "max_steps": 1}), RandomImages(), tmp_path / "run",
            progress=False).fit()  # once the other has ended
    assert find_checkpoints(tmp_path / "run")
    # held while resuming (which may set a best checkpoint aside) and while fitting, and only then:
    # a Trainer built and never fitted, or whose construction failed, keeps no other from its run
    make = lambda: Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**TINY_TRAIN, "max_steps": 2}),  # noqa: E731
                           RandomImages(), tmp_path / "run", progress=False)
    with run_lock(tmp_path / "run"):
        with pytest.raises(TrainingError, match="another training of this run is in progress"):
            make()
    first = make()
    second = make()
    with pytest.raises(TrainingError, match="another training of this run is in progress"):
        with run_lock(tmp_path / "run"):
            first.fit()
    second.fit()


def test_a_file_system_without_flock_trains_unlocked(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def unsupported(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", unsupported)  # Lustre mounted without -o flock
    with caplog.at_level("WARNING"):
        Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**TINY_TRAIN, "max_steps": 1}), RandomImages(),
                tmp_path / "run", progress=False).fit()
    assert "cannot be locked (Function not implemented): nothing stops two trainings of this run at once" in caplog.text
    assert find_checkpoints(tmp_path / "run")


def test_a_platform_without_fcntl_trains_unlocked(tmp_path, monkeypatch, caplog):
    import sys

    import space.io
    monkeypatch.setattr(space.io, "fcntl", None)  # Windows
    with caplog.at_level("WARNING"):
        Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**TINY_TRAIN, "max_steps": 1}), RandomImages(),
                tmp_path / "run", progress=False).fit()
    assert f"cannot be locked (no flock on {sys.platform}): nothing stops two trainings" in caplog.text
    assert find_checkpoints(tmp_path / "run")


def _original_style_checkpoint(path, steps=2, global_step=6, epoch=1):
    """A file as the original writes them (SPEC 11.1): PyTorch's legacy format, an RMSprop
    foreground and Adam background state with integer 'step's and torch 1.3's param-group keys."""
    import space

    torch.manual_seed(5)
    model = space.Space(ModelConfig(**TINY_MODEL))
    fg = torch.optim.RMSprop(model.fg_module.parameters(), lr=1e-5)
    bg = torch.optim.Adam(model.bg_module.parameters(), lr=1e-3)
    priors = priors_at(model.cfg, 0)
    for _ in range(steps):
        fg.zero_grad()
        bg.zero_grad()
        model(torch.rand(2, 3, 32, 32), priors).loss.backward()
        fg.step()
        bg.step()
    old_keys = {"RMSprop": {"lr", "alpha", "eps", "weight_decay", "momentum", "centered"},
                "Adam": {"lr", "betas", "eps", "weight_decay", "amsgrad"}}
    states = []
    for optimizer in (fg, bg):
        state = optimizer.state_dict()
        state["state"] = {i: {k: int(v) if k == "step" else v.clone() for k, v in s.items()}
                          for i, s in state["state"].items()}
        keep = old_keys[type(optimizer).__name__] | {"params"}
        state["param_groups"] = [{k: v for k, v in g.items() if k in keep} for g in state["param_groups"]]
        states.append(state)
    torch.save({"model": model.state_dict(), "optimizer_fg": states[0], "optimizer_bg": states[1], "epoch": epoch,
                "global_step": global_step}, path, _use_new_zipfile_serialization=False)
    return model, states


def test_init_from_an_original_checkpoint_goes_on_at_its_step_with_its_optimiser_states(tmp_path, caplog):
    """train.init_from, the original's resume_ckpt (SPEC 8.4): weights and both optimisers' states,
    then training goes on at global_step + 1 from the start of the file's epoch."""
    source = tmp_path / "original.pth"
    model, states = _original_style_checkpoint(source)
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 9, "fg_optim": "RMSprop", "fg_lr": 1e-5,
                         "init_from": str(source)})
    with caplog.at_level("INFO", logger="space.training"):
        trainer = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path / "run",
                          plots_path=tmp_path / "plot.csv", progress=False)
    assert "going on at step 7 (epoch 1)" in caplog.text
    assert (trainer.position.step, trainer.position.epoch, trainer.position.batch) == (7, 1, 0)
    assert trainer.initialised_from == source and trainer.resumed_from is None
    mine = trainer.model.state_dict()
    assert all(torch.equal(mine[key], value) for key, value in model.state_dict().items())
    for optimizer, state in zip(trainer.optimizers, states):
        loaded = optimizer.state_dict()["state"]
        assert set(loaded) == set(state["state"]) and len(loaded) > 100
        for index, held in state["state"].items():
            assert int(loaded[index]["step"]) == held["step"] == 2
            assert all(torch.equal(loaded[index][k], v) for k, v in held.items() if k != "step")
    trainer.fit()
    assert [path.name for path in find_checkpoints(tmp_path / "run")][-1] == "model_000000010.pth"
    assert pd.read_csv(tmp_path / "plot.csv")["step"].tolist() == [7, 8, 9]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # The loaded states went on: 2 updates in the file, 3 here (steps 7, 8 and 9).
    for optimizer in trainer.optimizers:
        counts = {int(held["step"]) for held in optimizer.state_dict()["state"].values()}
        assert counts == {5}
    # The run has checkpoints of its own now: a re-run resumes from them, not from the file.
    again = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path / "run", progress=False)
    assert again.resumed_from is not None and again.initialised_from is None and again.position.step == 10


def test_init_from_weights_alone_starts_fresh_optimisers_at_step_0(tmp_path, caplog):
    import space

    other = space.Space(ModelConfig(**TINY_MODEL))
    with torch.no_grad():
        for value in other.parameters():
            value.add_(0.5)
    torch.save({"model": other.state_dict()}, tmp_path / "weights.pth", _use_new_zipfile_serialization=False)
    cfg = TrainConfig(**{**TINY_TRAIN, "max_steps": 2, "init_from": str(tmp_path / "weights.pth")})
    with caplog.at_level("INFO", logger="space.training"):
        trainer = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(), tmp_path / "run", progress=False)
    assert "with fresh optimisers from step 0" in caplog.text
    assert trainer.position.step == 0 and not any(opt.state for opt in trainer.optimizers)
    mine = trainer.model.state_dict()
    assert all(torch.equal(mine[key], value) for key, value in other.state_dict().items())


def test_init_from_refuses_another_optimiser_a_passed_step_and_other_network_widths(tmp_path):
    from space.checkpoint import CheckpointError

    source = tmp_path / "original.pth"
    _original_style_checkpoint(source, global_step=6)
    base = {**TINY_TRAIN, "fg_optim": "RMSprop", "init_from": str(source)}
    with pytest.raises(CheckpointError, match=r"optimizer_bg holds \['exp_avg', 'exp_avg_sq', 'step'\] .* "
                                              r"train.bg_optim = RMSprop keeps \['square_avg', 'step'\]"):
        Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**base, "bg_optim": "RMSprop"}), RandomImages(),
                tmp_path / "a", progress=False)
    with pytest.raises(CheckpointError, match=r"optimizer_fg holds \['exp_avg', 'exp_avg_sq', 'step'\] .* "
                                              r"train.fg_optim = AdamW keeps \['square_avg', 'step'\]|"
                                              r"optimizer_fg holds \['square_avg', 'step'\] .* train.fg_optim = AdamW"):
        Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**base, "fg_optim": "AdamW"}), RandomImages(),
                tmp_path / "a2", progress=False)
    with pytest.raises(TrainingError, match="saved in epoch 1 .counted from 0., and train.max_epochs is 1"):
        Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**base, "max_epochs": 1}), RandomImages(), tmp_path / "e",
                progress=False)
    with pytest.raises(TrainingError, match="saved at step 6, and train.max_steps is 6: raise max_steps"):
        Trainer(ModelConfig(**TINY_MODEL), TrainConfig(**{**base, "max_steps": 6}), RandomImages(), tmp_path / "b",
                progress=False)
    with pytest.raises(CheckpointError, match="train.init_from: the model settings of this experiment must be"):
        Trainer(ModelConfig(**{**TINY_MODEL, "fg_width": 0.5}), TrainConfig(**base), RandomImages(), tmp_path / "c",
                progress=False)


def test_init_from_enters_the_run_id_by_the_file_content(tmp_path):
    from space.training import run_id

    model, plain = ModelConfig(**TINY_MODEL), TrainConfig(**TINY_TRAIN)
    path = tmp_path / "init.pth"
    path.write_bytes(b"one")
    first = run_id(model, TrainConfig(**{**TINY_TRAIN, "init_from": str(path)}))
    path.write_bytes(b"two")
    second = run_id(model, TrainConfig(**{**TINY_TRAIN, "init_from": str(path)}))
    assert len({run_id(model, plain), first, second}) == 3
    with pytest.raises(TrainingError, match="train.init_from: cannot read .*missing.pth"):
        run_id(model, TrainConfig(**{**TINY_TRAIN, "init_from": str(tmp_path / "missing.pth")}))


@pytest.mark.parametrize("saved, configured", [("AdamW", "Adam"), ("Adam", "AdamW"), ("SGD", "Adam"),
                                               ("SGD", "RMSprop"), ("RMSprop", "SGD")])
def test_init_from_refuses_an_optimiser_state_of_another_kind(saved, configured):
    """Adam and AdamW keep the same per-parameter state, and SGD without momentum keeps none: their
    settings tell them apart (loaded regardless, torch trained on as the file's kind, or failed at
    the first step with a KeyError)."""
    from space.checkpoint import CheckpointError
    from space.training import _check_optimizer_state

    weight = torch.nn.Parameter(torch.ones(3))
    file = getattr(torch.optim, saved)([weight], lr=0.1)
    weight.grad = torch.ones(3)
    file.step()
    mine = getattr(torch.optim, configured)([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    with pytest.raises(CheckpointError, match=f"train.fg_optim = {configured} (keeps|has) .*: set train.fg_optim"):
        _check_optimizer_state(mine, file.state_dict(), "file: optimizer_fg", configured, "fg")


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "SGD", "AdamW"])
def test_every_optimiser_accepts_its_own_state_for_init_from(name):
    from space.config import OPTIMIZERS
    from space.training import _check_optimizer_state

    assert name in OPTIMIZERS
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = getattr(torch.optim, name)([weight], lr=0.1)
    weight.grad = torch.ones(3)
    optimizer.step()
    _check_optimizer_state(optimizer, optimizer.state_dict(), "file", name, "fg")
