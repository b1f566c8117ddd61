"""Tests of archive downloads and safe extraction (space/data/download.py).

A local http.server on 127.0.0.1 stands in for Google Drive through
``fetch_archive``'s ``url`` override; nothing leaves the machine.
"""

from __future__ import annotations

import functools
import http.server
import io
import random
import socket
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from space.data.download import ArchiveError, fetch_archive
from space.fetch import main as fetch_main

OBJ3D_ID = "18Ta1sWCyprv0QPGMUOMMPFWac8KFICMN"


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with open-ended Range support (turn off with ``serves_ranges``,
    which makes it behave like plain ``python -m http.server``); with ``cut_after``
    set it hangs up after that many body bytes."""

    cut_after: int | None = None
    serves_ranges = True
    requests: list[dict] = []

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        type(self).requests.append({"path": self.path, "range": self.headers.get("Range")})
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        header = self.headers.get("Range")
        if header and self.serves_ranges:
            start = int(header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", self.date_time_string(int(path.stat().st_mtime)))
        self.end_headers()
        if self.cut_after is not None:
            self.wfile.write(body[: self.cut_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str, type]]:
    """A folder served over HTTP: (folder, base URL, handler class to tweak)."""
    folder = tmp_path / "server"
    folder.mkdir()
    handler = type("Handler", (RangeHandler,), {"requests": [], "cut_after": None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/OBJ3D_SMALL.tar.gz"


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_obj3d_archive(path: Path, extra: list[tuple[str, bytes]] = (), padding: int = 0) -> Path:
    """A small OBJ3D_SMALL.tar.gz, with ``padding`` incompressible bytes added.

    gdown writes in 512 KiB chunks and drops an incomplete one, so a partial
    download keeps bytes only if the archive is larger than that.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "val", "test"):
            add_file(tar, f"OBJ3D_SMALL/{split}/0-room.png", b"png")
            add_file(tar, f"OBJ3D_SMALL/{split}/bb/bb_0.txt", b"1,2,3,4\n")
        if padding:
            add_file(tar, "OBJ3D_SMALL/padding.bin", random.Random(0).randbytes(padding))
        for name, data in extra:
            add_file(tar, name, data)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_and_extract(served, tmp_path: Path) -> None:
    folder, base, handler = served
    make_obj3d_archive(folder / "OBJ3D_SMALL.tar.gz")
    data = tmp_path / "data"
    result = fetch_archive("OBJ3D_SMALL", data, url=f"{base}/OBJ3D_SMALL.tar.gz")
    assert result == data / "OBJ3D_SMALL"
    assert (result / "val" / "bb" / "bb_0.txt").read_text() == "1,2,3,4\n"
    assert leftovers(data) == ["OBJ3D_SMALL"], "the downloaded archive and temporary folders are removed"
    # Complete already: no second download.
    count = len(handler.requests)
    assert fetch_archive("OBJ3D_SMALL", data, url=closed_port_url()) == result
    assert len(handler.requests) == count


@pytest.mark.parametrize(
    "content, problem",
    [
        ("truncated", "is truncated"),
        ("corrupt", "not a valid .tar.gz"),
        ("html", "is a web page, not a .tar.gz archive: the server answered with HTML"),
        ("dotdot", "unsafe member"),
        ("absolute", "unsafe member"),
        ("symlink", "unsafe member"),
        ("wrong", "does not hold the expected"),
    ],
)
def test_bad_archives_are_refused_and_leave_nothing(served, tmp_path: Path, content: str, problem: str) -> None:
    folder, base, _ = served
    archive = folder / "OBJ3D_SMALL.tar.gz"
    if content == "truncated":
        good = make_obj3d_archive(tmp_path / "good.tar.gz").read_bytes()
        archive.write_bytes(good[: len(good) // 2])
    elif content == "corrupt":
        archive.write_bytes(b"this is not gzip at all" * 100)
    elif content == "html":  # what Google Drive serves, with status 200, when a file's quota is exceeded
        archive.write_bytes(b"\n<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head></html>")
    elif content == "dotdot":
        make_obj3d_archive(archive, extra=[("OBJ3D_SMALL/../../evil.txt", b"evil")])
    elif content == "absolute":
        make_obj3d_archive(archive, extra=[(str(tmp_path / "abs_evil.txt"), b"evil")])
    elif content == "symlink":
        make_obj3d_archive(archive)
        with tarfile.open(archive, "w:gz") as tar:  # a link pointing out of the folder, then the data
            link = tarfile.TarInfo("OBJ3D_SMALL/train/escape")
            link.type, link.linkname = tarfile.SYMTYPE, "../../../outside"
            tar.addfile(link)
            for split in ("train", "val", "test"):
                add_file(tar, f"OBJ3D_SMALL/{split}/0-room.png", b"png")
    else:
        with tarfile.open(archive, "w:gz") as tar:
            add_file(tar, "OBJ3D_SMALL/train/0-room.png")
    data = tmp_path / "data"
    with pytest.raises(ArchiveError, match=problem) as error:
        fetch_archive("OBJ3D_SMALL", data, url=f"{base}/OBJ3D_SMALL.tar.gz")
    assert "OBJ3D_SMALL.tar.gz" in str(error.value)
    assert leftovers(data) == [], "no dataset, no temporary folder, no bad archive"
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "abs_evil.txt").exists()
    assert not (tmp_path / "outside").exists()


def test_unreachable_host_fails_fast_with_manual_route(tmp_path: Path) -> None:
    data = tmp_path / "data"
    start = time.monotonic()
    url = closed_port_url()
    with pytest.raises(ArchiveError) as error:
        fetch_archive("OBJ3D_SMALL", data, url=url)
    assert time.monotonic() - start < 5.0
    message = str(error.value)
    assert f"https://drive.google.com/open?id={OBJ3D_ID}" in message
    assert str(data / "OBJ3D_SMALL.tar.gz") in message and "by hand" in message
    assert f"by hand from {url} (or from Google Drive" in message  # the mirror asked for first
    assert not (data / "OBJ3D_SMALL").exists()


def test_hand_placed_archive_is_used_without_network(tmp_path: Path, caplog) -> None:
    data = tmp_path / "data"
    archive = make_obj3d_archive(data / "OBJ3D_SMALL.tar.gz")
    (data / ".OBJ3D_SMALL.extract-k1ll3d").mkdir()  # what a killed extraction leaves
    result = fetch_archive("OBJ3D_SMALL", data, url=closed_port_url())
    assert ".OBJ3D_SMALL.extract-k1ll3d: left by an extraction of OBJ3D_SMALL that was stopped" in caplog.text
    (data / ".OBJ3D_SMALL.extract-k1ll3d").rmdir()
    assert (result / "test" / "0-room.png").read_bytes() == b"png"
    assert archive.is_file(), "a hand-placed archive is not deleted"
    assert leftovers(data) == ["OBJ3D_SMALL", "OBJ3D_SMALL.tar.gz"]


def test_hand_placed_corrupt_archive_is_reported_not_deleted(tmp_path: Path) -> None:
    archives = tmp_path / "archives"
    good = make_obj3d_archive(tmp_path / "good.tar.gz").read_bytes()
    archive = archives / "OBJ3D_SMALL.tar.gz"
    archives.mkdir()
    archive.write_bytes(good[:-100])
    data = tmp_path / "data"
    with pytest.raises(ArchiveError, match=r"truncated.*placed by hand.*replace it") as error:
        fetch_archive("OBJ3D_SMALL", data, archive_dir=archives, url=closed_port_url())
    assert OBJ3D_ID in str(error.value)
    assert archive.read_bytes() == good[:-100]
    assert leftovers(data) == []


def test_incomplete_existing_dataset_is_not_overwritten(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "OBJ3D_SMALL" / "train").mkdir(parents=True)
    make_obj3d_archive(data / "OBJ3D_SMALL.tar.gz")
    with pytest.raises(ArchiveError, match="exists but lacks"):
        fetch_archive("OBJ3D_SMALL", data)
    assert leftovers(data / "OBJ3D_SMALL") == ["train"]


def test_pretrained_files_land_in_the_folder(served, tmp_path: Path) -> None:
    folder, base, _ = served
    names = ["3d_room_large", "3d_room_small", "atari_spaceinvaders", "atari_riverraid", "atari_joint"]
    with tarfile.open(folder / "pretrained.tar.gz", "w:gz") as tar:
        for name in names:
            add_file(tar, f"{name}.pth", name.encode())
    target = tmp_path / "pretrained"
    assert fetch_archive("pretrained", target, url=f"{base}/pretrained.tar.gz") == target
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.pth" for n in names)
    assert (target / "atari_joint.pth").read_bytes() == b"atari_joint"


def test_fetch_command_puts_the_models_in_pretrained_or_says_where_to_put_them(served, tmp_path: Path,
                                                                               capsys, monkeypatch) -> None:
    """`python -m space.fetch pretrained`: into ./pretrained by default; on failure, exit status 1
    and the message with the Drive link and the path for a hand-placed archive."""
    folder, base, _ = served
    with tarfile.open(folder / "pretrained.tar.gz", "w:gz") as tar:
        for name in ["3d_room_large", "3d_room_small", "atari_spaceinvaders", "atari_riverraid", "atari_joint"]:
            add_file(tar, f"{name}.pth", name.encode())
    monkeypatch.chdir(tmp_path)
    assert fetch_main(["pretrained", "--url", f"{base}/pretrained.tar.gz"]) == 0
    assert capsys.readouterr().out.strip() == "pretrained"
    assert (tmp_path / "pretrained" / "3d_room_small.pth").read_bytes() == b"3d_room_small"
    assert not (tmp_path / "pretrained" / "pretrained.tar.gz").exists()  # a downloaded archive is not kept
    assert fetch_main(["pretrained", "--dest", "elsewhere", "--url", closed_port_url()]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: Could not download pretrained.tar.gz")
    assert "1gUvLTfy5pKeLa6k3RT8GiEXWiGG8XzzD" in error and "elsewhere/pretrained.tar.gz" in error


def test_fetch_command_extracts_a_hand_placed_dataset_where_the_data_stage_looks(tmp_path: Path, capsys,
                                                                                  monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    archive = make_obj3d_archive(tmp_path / "data" / "archives" / "OBJ3D_SMALL.tar.gz")
    assert fetch_main(["OBJ3D_SMALL", "--url", closed_port_url()]) == 0  # no network used
    assert capsys.readouterr().out.strip() == str(Path("data") / "OBJ3D_SMALL")
    assert (tmp_path / "data" / "OBJ3D_SMALL" / "train").is_dir() and archive.is_file()  # left in place


def test_unknown_archive_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown archive 'CLEVR'"):
        fetch_archive("CLEVR", tmp_path)


def test_interrupted_download_is_resumed(served, tmp_path: Path) -> None:
    folder, base, handler = served
    archive = make_obj3d_archive(folder / "OBJ3D_SMALL.tar.gz", padding=1_500_000)
    size = archive.stat().st_size
    data = tmp_path / "data"
    handler.cut_after = size // 2
    with pytest.raises(ArchiveError, match=r"partial download .* is kept; running again resumes it") as error:
        fetch_archive("OBJ3D_SMALL", data, url=f"{base}/OBJ3D_SMALL.tar.gz")
    assert "drive.google.com/open?id=" in str(error.value)
    parts = [p for p in data.iterdir() if p.name.endswith(".part")]
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < size

    handler.cut_after = None
    handler.requests.clear()
    result = fetch_archive("OBJ3D_SMALL", data, url=f"{base}/OBJ3D_SMALL.tar.gz")
    assert (result / "val" / "0-room.png").is_file()
    ranges = [r["range"] for r in handler.requests if r["range"]]
    assert ranges and ranges[0].startswith("bytes=") and ranges[0] != "bytes=0-"
    assert leftovers(data) == ["OBJ3D_SMALL"]


def test_resume_falls_back_when_server_ignores_ranges(served, tmp_path: Path) -> None:
    folder, base, handler = served
    archive = make_obj3d_archive(folder / "OBJ3D_SMALL.tar.gz")
    data = tmp_path / "data"
    data.mkdir()
    # A partial file as gdown leaves it: <archive name> + 8 characters + ".part".
    (data / "OBJ3D_SMALL.tar.gzABCDEFGH.part").write_bytes(archive.read_bytes()[:1000])
    handler.serves_ranges = False
    result = fetch_archive("OBJ3D_SMALL", data, url=f"{base}/OBJ3D_SMALL.tar.gz")
    assert (result / "train" / "bb" / "bb_0.txt").is_file()
    assert any(r["range"] for r in handler.requests), "gdown first tried to resume"
    assert leftovers(data) == ["OBJ3D_SMALL"]
