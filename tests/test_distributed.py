"""Scale-out with torch.distributed (DDP under torchrun, gloo on the CPU): equivalence with one
process at the global batch, rank-0-only writes, a killed worker, resume, the stage's relaunch."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT
from space.checkpoint import read_checkpoint
from space.config import ModelConfig, TrainConfig
from space.training import find_checkpoints, rank_batches, run_id

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

# tiny model (tests/test_training.py's) and 11 images: global batches of 4, 4 and 3 per epoch, so
# the last one is split unevenly (2 + 1) between two processes
SCRIPT = textwrap.dedent(f"""
    import json, os, sys, torch
    sys.path.insert(0, {str(ROOT)!r})
    sys.path.insert(0, {str(ROOT / 'tests')!r})
    from test_training import RandomImages, TINY_MODEL, TINY_TRAIN
    from space.config import ModelConfig, TrainConfig
    from space.training import Trainer, dist_env, shutdown_distributed
    torch.set_num_threads(1)
    out, overrides = sys.argv[1], json.loads(sys.argv[2])
    rank = dist_env().rank
    os.makedirs(out, exist_ok=True)
    with open(f"{{out}}/pid{{rank}}", "w") as f:
        f.write(str(os.getpid()))
    cfg = TrainConfig(**{{**TINY_TRAIN, **overrides}})
    trainer = Trainer(ModelConfig(**TINY_MODEL), cfg, RandomImages(n=11), out + "/run", log_dir=out + "/tb",
                      plots_path=out + "/plot.csv", progress=False)
    model = trainer.fit()
    if trainer.env.is_main:
        torch.save(model.state_dict(), out + "/final.pt")
        resumed = trainer.resumed_from.name if trainer.resumed_from else ""
        with open(out + "/resumed", "a") as f:
            f.write(resumed + "\\n")
    shutdown_distributed()
""")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _command(script: Path, out: Path, overrides: dict, nproc: int) -> list[str]:
    import json
    args = [str(script), str(out), json.dumps(overrides)]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def _run(script, out, overrides, nproc):
    result = subprocess.run(_command(script, out, overrides, nproc), env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_rank_batches_split_each_global_batch_of_the_seeded_order():
    order = np.random.default_rng(0).permutation(11)
    single = rank_batches(order, 4)
    assert [part for part, _ in single] == [order[i:i + 4].tolist() for i in range(0, 11, 4)]
    for world in (2, 3, 4):
        parts = [rank_batches(order, 4 * world, world, rank) for rank in range(world)]
        together = [order[i:i + 4 * world].tolist() for i in range(0, 11, 4 * world)]
        if len(together[-1]) < world:
            together.pop()  # a last global batch with fewer images than processes is left out
        assert all(len(p) == len(together) for p in parts)
        for i, batch in enumerate(together):
            # the ranks' parts, in rank order, are the global batch of one process with batch 4 x world
            assert sum((p[i][0] for p in parts), []) == batch and all(p[i][1] == len(batch) for p in parts)
        assert [p[0][0] for p in parts] == [together[0][4 * r:4 * (r + 1)] for r in range(world)] or \
            len(together[0]) < 4 * world  # rank r gets [r*b, (r+1)*b)
    # 11 images, global batch 4 on 2 processes: 4, 4, then 3 split 2 + 1
    assert [[len(part) for part, _ in rank_batches(order, 4, 2, r)] for r in range(2)] == [[2, 2, 2], [2, 2, 1]]
    assert len(rank_batches(np.arange(9), 4, 4, 0)) == 2  # 4, 4, and 1 image for 4 processes: left out


def test_config_keys_and_run_id():
    cfg = TrainConfig()
    assert (cfg.nproc_per_node, cfg.sync_batchnorm, cfg.amp, cfg.compile, cfg.latent_mode) == \
        (1, True, "none", False, "sample")
    for key, value in (("amp", "fp16"), ("nproc_per_node", 0), ("latent_mode", "mean")):
        with pytest.raises(ValueError, match=f"train.{key}"):
            TrainConfig(**{key: value})
    model = ModelConfig()
    # the global batch defines the trajectory: 2 processes of 8 continue 1 process of 16
    assert run_id(model, TrainConfig(batch_size=8), world_size=2) == run_id(model, TrainConfig(batch_size=16))
    assert run_id(model, TrainConfig(batch_size=8), world_size=2) != run_id(model, TrainConfig(batch_size=8))
    assert run_id(model, TrainConfig(latent_mode="deterministic")) != run_id(model, TrainConfig())


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    """2 processes x batch 2 against 1 process x batch 4, same data order, SyncBatchNorm,
    deterministic latents. Plain SGD: Adam's and RMSprop's first updates are lr * sign(g), which
    turns rounding noise in gradients that are zero in exact arithmetic (conv biases before
    BatchNorm) into +-lr, hiding the comparison; their DDP use is checked bit for bit by the
    resume test below. Measured on CPU: plot columns (loss and every KL term, global-batch means)
    within 2e-5 relative, weights within 3e-5 absolute, the whole update within 1.5e-3 relative;
    one process with 2 threads instead of 1 differs from itself by 10x that, and DDP without
    SyncBatchNorm by 0.05 absolute in the weights and 0.3 relative in the plots."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    common = dict(max_steps=3, save_every=2, max_ckpt=5, latent_mode="deterministic", sync_batchnorm=True,
                  fg_optim="SGD", fg_lr=0.1, bg_optim="SGD", bg_lr=0.1)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(script, one, {**common, "batch_size": 4}, 1)
    _run(script, two, {**common, "batch_size": 2}, 2)

    a, b = pd.read_csv(one / "plot.csv"), pd.read_csv(two / "plot.csv")
    assert list(a.columns) == list(b.columns) and list(a["step"]) == list(b["step"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=5e-4, atol=0)

    wa, wb = torch.load(one / "final.pt"), torch.load(two / "final.pt")
    assert list(wa) == list(wb)
    from space.training import seed_everything
    from space.model import Space
    from test_training import TINY_MODEL
    seed_everything(3)
    w0 = Space(ModelConfig(**TINY_MODEL)).state_dict()
    num = den = 0.0
    for key in wa:
        if not wa[key].is_floating_point():
            assert torch.equal(wa[key], wb[key]), key  # num_batches_tracked
            continue
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=5e-4, msg=key)
        num += float((wb[key].double() - wa[key].double()).norm() ** 2)
        den += float((wa[key].double() - w0[key].double()).norm() ** 2)
    assert (num / den) ** 0.5 < 1e-2  # relative to the whole update of 4 steps

    # written once, by rank 0: the same files as one process, no temporaries, one TensorBoard file
    names = lambda d: sorted(p.name for p in d.iterdir() if p.name != ".lock")  # noqa: E731 (the run's lock, kept)
    assert names(two / "run") == names(one / "run") == ["model_000000001.pth", "model_000000003.pth",
                                                        "model_000000004.pth"]
    assert len(list((two / "tb").iterdir())) == 1
    assert not [p for p in two.rglob("*") if (p.name.startswith(".") or p.name.endswith(".tmp")) and p.name != ".lock"]
    # loadable by space.load (keys without 'module.'), with every rank's RNG state
    import space
    model = space.load(two / "run" / "model_000000004.pth")
    assert not [k for k in model.state_dict() if k.startswith("module.")]
    ckpt = read_checkpoint(two / "run" / "model_000000004.pth")
    assert ckpt["resume"]["world_size"] == 2 and len(ckpt["resume"]["rng_ranks"]) == 2
    assert not torch.equal(ckpt["resume"]["rng_ranks"][0]["torch"], ckpt["resume"]["rng_ranks"][1]["torch"])


def test_killed_worker_stops_the_run_and_a_rerun_resumes_exactly(tmp_path):
    """SIGKILL one of two workers: torchrun stops the other and exits non-zero naming the signal;
    the re-run resumes from the last checkpoint and ends bit for bit where an uninterrupted
    two-process run ends (sampled latents, the original's RMSprop and Adam: every rank's RNG
    state and both optimiser states are restored)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    overrides = dict(batch_size=2, max_steps=5, save_every=1, max_ckpt=2, latent_mode="sample",
                     fg_optim="RMSprop", fg_lr=1e-4, bg_optim="Adam", bg_lr=1e-3)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(script, straight, overrides, 2)

    process = subprocess.Popen(_command(script, killed, overrides, 2), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    target = killed / "run" / "model_000000003.pth"  # step 2
    while time.time() < deadline and not target.exists() and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before the kill"
    os.kill(int((killed / "pid1").read_text()), signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "Signal 9 (SIGKILL)" in err and "rank      : 1" in err, err[-3000:]
    assert not (killed / "final.pt").exists()
    last = find_checkpoints(killed / "run")[-1]
    step = read_checkpoint(last)["global_step"]
    assert 2 <= step < 5

    _run(script, killed, overrides, 2)
    assert (killed / "resumed").read_text().split() == [last.name]
    assert [p.name for p in find_checkpoints(killed / "run")][-1] == "model_000000006.pth"
    a, b = torch.load(straight / "final.pt"), torch.load(killed / "final.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (straight / "plot.csv").read_text() == (killed / "plot.csv").read_text()
    ca, cb = (read_checkpoint(d / "run" / "model_000000006.pth") for d in (straight, killed))
    for state_a, state_b in zip(ca["optimizer_fg"]["state"].values(), cb["optimizer_fg"]["state"].values()):
        assert torch.equal(state_a["square_avg"], state_b["square_avg"])


def test_train_stage_relaunches_itself_through_torchrun(tmp_path):
    """train.nproc_per_node: 2 makes `python -m stages.train` (what dvc runs) start two DDP
    processes; validation runs on rank 0 while the other waits; one model file comes out."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = params["exp"]["rooms"]
    params["experiments"] = ["tiny"]
    params["exp"]["tiny"] = {
        "data": {**base["data"], "root": "data/tiny", "num_train": 5, "num_val": 2, "num_test": 2},
        "model": {**base["model"], "image_size": 32, "G": 4, "fg_width": 0.25},
        "train": {**base["train"], "max_steps": 2, "batch_size": 2, "save_every": 1, "eval_every": 2,
                  "val_num_images": 2, "plot_every": 1, "device": "cpu", "nproc_per_node": 2},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    for stage in ("data", "train"):
        result = subprocess.run([sys.executable, "-m", f"stages.{stage}", "tiny", "--params", str(path)],
                                cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node 2" in result.stderr
    assert "DDP: 2 processes x batch 2 = global batch 4" in result.stderr
    import space
    model = space.load(tmp_path / "models" / "tiny.pth")
    assert model.cfg.image_size == 32
    rows = pd.read_csv(tmp_path / "plots" / "train" / "tiny.csv")
    assert list(rows["step"]) == [0, 1, 2] and "val_ap_avg" in rows.columns
    runs = list((tmp_path / "checkpoints" / "tiny").iterdir())
    assert len(runs) == 1 and (runs[0] / f"best_{base['train']['best_metric']}.pth").is_file()
    assert [p.name for p in find_checkpoints(runs[0])] == ["model_000000002.pth", "model_000000003.pth"]
    # 5 images in global batches of 4: the last, of 1 image, cannot be split between 2 processes
    assert "the last global batch of each epoch has 1 image(s), fewer than the 2 processes: it is left out" in \
        result.stderr
    params["exp"]["tiny"]["train"]["nproc_per_node"] = 6
    path.write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "stages.train", "tiny", "--params", str(path)],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "torch.distributed.run" not in result.stderr
    assert result.stderr == ("error: [tiny] the training split has 5 images, fewer than the 6 processes of "
                             "train.nproc_per_node: every process needs at least one\n")


def test_run_id_takes_later_model_keys_only_at_other_values():
    base = ModelConfig()
    # ids written before z_what_kl_warmup_* existed (computed with that version) stay the same
    assert run_id(base, TrainConfig()) == "d7cb935186"
    assert run_id(ModelConfig(G=4, image_size=64), TrainConfig(seed=3)) == "6664fb08ae"
    warm = run_id(ModelConfig(z_what_kl_warmup_steps=500), TrainConfig())
    assert warm != run_id(base, TrainConfig())
    assert run_id(ModelConfig(z_what_kl_warmup_steps=500, z_what_kl_warmup_start=0.5), TrainConfig()) != warm
    assert run_id(ModelConfig(boundary_width=None), TrainConfig()) == "d7cb935186"
    # validation draws from the generator training goes on from: its settings shape the trajectory
    ids = {run_id(base, TrainConfig(**kw)) for kw in ({}, {"eval_every": 250}, {"eval_on": False},
                                                      {"val_mode": "sample"}, {"val_mode": "sample", "val_num_images": 8})}
    assert len(ids) == 5
    assert run_id(base, TrainConfig(val_num_images=8)) == "d7cb935186"  # deterministic: one draw whatever the size
    assert run_id(base, TrainConfig(eval_on=False, eval_every=250)) == run_id(base, TrainConfig(eval_on=False))
    assert run_id(ModelConfig(boundary_width=6), TrainConfig()) not in ("d7cb935186", warm)
