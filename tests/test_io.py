"""Atomic writes: a failure mid-write (an exception, a full disk) leaves the previous file intact."""
import errno
import json
from pathlib import Path

import pytest
import torch

from space.checkpoint import read_checkpoint, save_checkpoint
from space.config import ModelConfig
from space.io import atomic_write, write_json, write_text
from space.model import Space


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_json_and_text_survive_a_failed_write(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics" / "rooms.json"
    write_json(metrics, {"ap_50": 0.9})
    write_text(tmp_path / "plot.csv", "step,loss\n0,1\n")

    def half_written(tmp):
        tmp.write_text('{"ap_50": 0.')  # the disk fills up half-way
        disk_full()

    with pytest.raises(OSError, match="No space left"):
        atomic_write(metrics, half_written)
    with pytest.raises(ValueError):  # NaN is refused before anything is written
        write_json(metrics, {"ap_50": float("nan")})
    assert json.loads(metrics.read_text()) == {"ap_50": 0.9}
    assert (tmp_path / "plot.csv").read_text() == "step,loss\n0,1\n"
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["rooms.json"]  # no temporary left


def test_checkpoint_survives_a_full_disk_during_save(tmp_path, monkeypatch):
    model = Space(ModelConfig(image_size=32, G=4, glimpse_size=16, fg_width=0.25, bg_width=0.25, K=2))
    path = tmp_path / "model_000000001.pth"
    save_checkpoint(path, model, None, step=0, epoch=0)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 partial")
        disk_full()

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, None, step=5, epoch=0)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before and read_checkpoint(path)["global_step"] == 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_equal_checkpoints_are_equal_bytes(tmp_path):
    """DVC compares a stage's output by its bytes: a model written again with the same weights (a
    finished run re-run) must not make the stages after training run again."""
    model = Space(ModelConfig(image_size=32, G=4, glimpse_size=16, fg_width=0.25, bg_width=0.25, K=2))
    written = []
    for name in ("a.pth", "a.pth", "b.pth"):
        save_checkpoint(tmp_path / name, model, None, step=3, epoch=1)
        written.append((tmp_path / name).read_bytes())
    assert written[0] == written[1] == written[2]


def test_written_files_and_published_folders_get_the_umasks_permissions(tmp_path):
    """Outputs are written to temporary files and folders (which tempfile makes readable by their
    owner alone) and renamed into place: they must end with the permissions the umask gives."""
    import os
    import stat

    import numpy as np

    from space.data.download import publish_directory
    from space.data.rooms import generate_rooms
    from space.visualisation import save_png

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "metrics.json", {"ap_50": 0.9})
        save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "demo.png")
        save_checkpoint(tmp_path / "model.pth", Space(ModelConfig(image_size=32, G=4, K=2)), None, step=0, epoch=0)
        generate_rooms(tmp_path / "rooms", image_size=32, num_train=1, num_val=1, num_test=1, progress=False)
        staged = tmp_path / "staged"
        staged.mkdir(mode=0o700)
        publish_directory(staged, tmp_path / "published")
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode)
             for name in ("metrics.json", "demo.png", "model.pth", "rooms", "published")}
    assert modes == {"metrics.json": 0o640, "demo.png": 0o640, "model.pth": 0o640, "rooms": 0o750,
                     "published": 0o750}


def test_a_full_disk_is_named_as_such(tmp_path):
    """On a real full file system (a 64 KiB tmpfs: needs root), torch's own writer said only
    "unexpected pos 51328 vs 51216"; the checkpoint is now written from memory, so Python names ENOSPC."""
    import shutil
    import subprocess

    full = tmp_path / "full"
    full.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        model = Space(ModelConfig(image_size=32, G=4, glimpse_size=16, fg_width=0.25, bg_width=0.25, K=2))
        with pytest.raises(OSError, match="No space left on device"):
            save_checkpoint(full / "model.pth", model, None, step=0, epoch=0)
        assert list(full.iterdir()) == []  # no temporary file left behind
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    import os
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has ended
    left = tmp_path / f".rooms.json.{dead_pid}.x4j2w0s1.tmp"  # what SIGKILL mid-write leaves
    left.write_text('{"ap_')
    alive = tmp_path / f".rooms.json.{os.getppid()}.abcdefgh.tmp"  # a writer still running
    alive.write_text("")
    others = [tmp_path / name for name in (  # not temporaries of rooms.json
        f".rooms.json.bak.{dead_pid}.tmp", f".rooms.json.{dead_pid}.bak", ".rooms.json.20261205.bak",
        ".rooms.json.1733400000123.bak",  # a number os.kill cannot take
        f".rooms.json.{dead_pid}.bak.{dead_pid}.abcdefgh.tmp")]  # another target's (rooms.json.<n>.bak)
    for other in others:
        other.write_text("")
    write_json(tmp_path / "rooms.json", {"ap_50": 0.5})
    assert not left.exists() and alive.exists() and all(other.exists() for other in others)
    assert json.loads((tmp_path / "rooms.json").read_text()) == {"ap_50": 0.5}


def test_where_process_ids_cannot_be_probed_temporaries_are_left(tmp_path, monkeypatch):
    # On Windows os.kill(pid, 0) sends CTRL_C_EVENT to a process group (or fails with an OSError
    # that is no ProcessLookupError): no probe there, so no temporary is taken for stale.
    import subprocess
    import sys

    import space.io
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".rooms.json.{int(dead.stdout)}.x4j2w0s1.tmp"
    left.write_text('{"ap_')
    monkeypatch.setattr(space.io, "_POSIX", False)
    monkeypatch.setattr(space.io.os, "kill", lambda *args: pytest.fail("os.kill called"))
    write_json(tmp_path / "rooms.json", {"ap_50": 0.5})
    assert left.exists() and json.loads((tmp_path / "rooms.json").read_text()) == {"ap_50": 0.5}


def test_the_package_and_stages_import_without_fcntl(tmp_path):
    # Windows has no fcntl; the locks are then not taken (see test_training's unlocked run).
    import subprocess
    import sys
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import space, space.training, space.experiment, space.io\n"
            "import stages.data, stages.train, stages.evaluate, stages.demo, stages.export\n"
            "print(space.io.lock_exclusive(open(sys.argv[1], 'w')))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / ".lock")],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"no flock on {sys.platform}"


def test_an_unwritable_folder_is_named_not_a_temporary(tmp_path):
    (tmp_path / "metrics").write_text("a file where a folder is expected")
    with pytest.raises(OSError, match=r"cannot write .*metrics/rooms\.json: (File exists|Not a directory)"):
        write_json(tmp_path / "metrics" / "rooms.json", {"ap_50": 0.5})
