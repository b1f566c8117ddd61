"""Downloads and safe extraction of the original SPACE archives (SPEC 10.3).

``fetch_archive`` replaces the original ``scripts/download_*.sh``: it gets an
archive from Google Drive with gdown (or uses one the user placed by hand),
checks that the gzip stream is complete, extracts it into a temporary folder
next to the destination while refusing unsafe members (absolute paths, ``..``,
links leaving the folder, devices), checks the expected contents and only then
moves them into place. A failure at any step leaves no half dataset behind.

Where things go, as in the original README (``data_dir`` plays the role of
``tar -xzf <archive> -C <data_dir>``):

* ``OBJ3D_SMALL``, ``OBJ3D_LARGE``, ``ATARI``: the archive is
  ``data/archives/<NAME>.tar.gz`` (``DEFAULT_ARCHIVE_DIR``; the original's scripts put it in
  ``data/``); it extracts to ``data/<NAME>/``.
* ``pretrained``: the archive is ``pretrained/pretrained.tar.gz``; it extracts
  to the five ``pretrained/*.pth`` files.

From the command line, ``python -m space.fetch pretrained`` puts the five pretrained
models in ``pretrained/`` (the data stage fetches the datasets itself, into ``data/`` with hand-placed
archives looked for in ``data/archives/``; the command does the same for a dataset name).

Manual route (no network, or Drive refuses): download the archive in a
browser from the Drive link printed in the error and put it at the path above;
``fetch_archive`` then uses it without any network access and leaves it in
place (a downloaded archive is deleted after extraction, as the original did).
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..io import set_default_mode

log = logging.getLogger(__name__)

#: Where the data stage (``data.archive_dir``) and ``python -m space.fetch`` look for a hand-placed
#: dataset archive and download one to.
DEFAULT_ARCHIVE_DIR = "data/archives"

__all__ = [
    "DEFAULT_ARCHIVE_DIR",
    "ATARI_GAMES",
    "ATARI_SPLIT_DIRS",
    "SPLITS",
    "ARCHIVES",
    "ArchiveInfo",
    "ArchiveError",
    "drive_link",
    "fetch_archive",
    "publish_directory",
]

#: Split names of the original datasets (SPEC 10.1, 10.2), and the folder each
#: is stored in inside an Atari game folder ('val' is 'validation' there).
SPLITS = ("train", "val", "test")
ATARI_SPLIT_DIRS = {"train": "train", "val": "validation", "test": "test"}
#: The 11 games of the original ATARI archive (SPEC 10.2), without "-v0".
ATARI_GAMES = (
    "Asterix", "Atlantis", "Carnival", "DoubleDunk", "Kangaroo", "MontezumaRevenge",
    "MsPacman", "Pooyan", "Qbert", "Riverraid", "SpaceInvaders",
)

#: Seconds to wait for a connection and then between received bytes: an
#: unreachable host fails fast, a slow but live transfer does not.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
#: Read size when checking the gzip stream.
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ArchiveInfo:
    """One downloadable archive.

    Attributes:
        drive_id: Google Drive file id.
        folder: Sub-folder of ``data_dir`` the archive extracts to, or ``None``
            when its files land directly in ``data_dir`` (pretrained models).
        expected: Entries that must exist in the extracted folder.
    """

    drive_id: str
    folder: str | None
    expected: tuple[str, ...]


ARCHIVES: dict[str, ArchiveInfo] = {
    "OBJ3D_LARGE": ArchiveInfo("1gE3kr_ZLdsMRr263K2v1HhyfJehhW7Pi", "OBJ3D_LARGE", SPLITS),
    "OBJ3D_SMALL": ArchiveInfo("18Ta1sWCyprv0QPGMUOMMPFWac8KFICMN", "OBJ3D_SMALL", SPLITS),
    "ATARI": ArchiveInfo("1vzFVFhJZDZMkJ8liROtIyzOiUY42r4TZ", "ATARI", tuple(f"{g}-v0" for g in ATARI_GAMES)),
    "pretrained": ArchiveInfo(
        "1gUvLTfy5pKeLa6k3RT8GiEXWiGG8XzzD",
        None,
        tuple(f"{m}.pth" for m in (
            "3d_room_large", "3d_room_small", "atari_spaceinvaders", "atari_riverraid", "atari_joint")),
    ),
}


class ArchiveError(RuntimeError):
    """A download failed, or an archive is incomplete, corrupt or unsafe."""


def drive_link(name: str) -> str:
    """The Google Drive page of archive ``name``, for a manual download."""
    return f"https://drive.google.com/open?id={ARCHIVES[name].drive_id}"


def publish_directory(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves the finished folder ``src`` to ``target``, replacing any old ``target``.

    ``src`` must be on the same file system (a sibling), so each rename is
    atomic; an old ``target`` is first renamed aside and deleted afterwards.
    """
    src, target = Path(src), Path(target)
    set_default_mode(src)  # a tempfile.mkdtemp folder is its owner's alone
    if not (target.exists() or target.is_symlink()):
        os.replace(src, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, trash / target.name)
    os.replace(src, target)
    shutil.rmtree(trash, ignore_errors=True)


def _is_complete(folder: Path, expected: tuple[str, ...]) -> bool:
    return folder.is_dir() and all((folder / entry).exists() for entry in expected)


def _manual_route(name: str, archive: Path, url: str | None = None) -> str:
    where = f"{url} (or from Google Drive, {drive_link(name)})" if url else drive_link(name)
    return (
        f"Download {archive.name} by hand from {where} and put it at {archive}, "
        f"then run again (it is then used without network access)."
    )


def _download(name: str, archive: Path, url: str | None) -> None:
    """Downloads into gdown's resumable ``<archive>XXXXXXXX.part`` file, then renames."""
    import gdown  # deferred: slow to import and only needed here
    import requests
    from gdown.exceptions import DownloadError, FileURLRetrievalError

    source = url or drive_link(name)

    def attempt(resume: bool) -> None:
        gdown.download(
            url=url, id=None if url else ARCHIVES[name].drive_id, output=str(archive), quiet=False,
            resume=resume, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
        )

    archive.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            attempt(resume=True)
        except DownloadError as err:
            # gdown 6.5 refuses to resume when the server ignores the Range
            # header; the partial file is then useless, so start over once.
            if "byte range" not in str(err):
                raise
            for part in _partial_files(archive):
                part.unlink()
            attempt(resume=False)
    except (requests.exceptions.RequestException, DownloadError, FileURLRetrievalError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        partial = _partial_files(archive)
        kept = f" The partial download {partial[0]} is kept; running again resumes it." if partial else ""
        raise ArchiveError(
            f"Could not download {archive.name} from {source}: {reason}.{kept}\n{_manual_route(name, archive, url)}"
        ) from None


def _partial_files(archive: Path) -> list[Path]:
    """gdown's partial files for ``archive``: its name + 8 random characters + '.part'."""
    if not archive.parent.is_dir():
        return []
    return sorted(
        p for p in archive.parent.iterdir()
        if p.name.startswith(archive.name) and p.name.endswith(".part")
        and len(p.name) == len(archive.name) + 8 + len(".part")
    )


def _check_gzip(archive: Path, progress: bool) -> None:
    """Reads the whole gzip stream, so truncation and CRC errors surface now."""
    with open(archive, "rb") as raw, tqdm.wrapattr(
        raw, "read", total=archive.stat().st_size, desc=f"checking {archive.name}", disable=not progress
    ) as counted, gzip.GzipFile(fileobj=counted) as stream:
        while stream.read(CHUNK_BYTES):
            pass


def _strict_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's 'data' filter, plus refusing absolute names.

    The 'data' filter alone would strip a leading '/' and extract the member
    inside the folder; an archive holding such names is not one of ours.
    """
    if member.name.startswith(("/", "\\")) or os.path.isabs(member.name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def _extract(archive: Path, dest: Path, progress: bool) -> None:
    with tarfile.open(archive, "r:gz", errorlevel=2) as tar:
        members = tqdm(tar, desc=f"extracting {archive.name}", unit=" files", disable=not progress)
        tar.extractall(dest, members=members, filter=_strict_filter)


def _content_root(stage: Path, expected: tuple[str, ...], folder: str | None) -> Path | None:
    """Where the expected entries sit: the stage itself or its single top folder."""
    if _is_complete(stage, expected):
        return stage
    candidates = [stage / folder] if folder else []
    children = [c for c in stage.iterdir() if c.is_dir()]
    if len(children) == 1:
        candidates.append(children[0])
    return next((c for c in candidates if _is_complete(c, expected)), None)


def fetch_archive(
    name: str,
    data_dir: str | os.PathLike,
    archive_dir: str | os.PathLike | None = None,
    url: str | None = None,
    progress: bool = True,
) -> Path:
    """Gets one of the original archives and extracts it safely into ``data_dir``.

    Does nothing if the extracted contents are already complete. Uses
    ``<archive_dir>/<name>.tar.gz`` if present (the manual route); otherwise
    downloads it (resuming a partial download), checks, extracts and verifies.

    Args:
        name: One of ``ARCHIVES``: ``OBJ3D_SMALL``, ``OBJ3D_LARGE``, ``ATARI``,
            ``pretrained``.
        data_dir: Folder the archive extracts into (``data`` for the datasets,
            ``pretrained`` for the models).
        archive_dir: Where the archive is looked for and downloaded to;
            defaults to ``data_dir``.
        url: Download from this URL instead of Google Drive (tests, mirrors).
        progress: Show progress bars for checking and extracting (gdown
            always shows its own download bar).

    Returns:
        The extracted folder: ``data_dir/<name>`` for datasets, ``data_dir``
        for the pretrained models.

    Raises:
        ValueError: If ``name`` is unknown.
        ArchiveError: If the download fails (the message gives the Drive link
            and the manual route), or the archive is truncated, corrupt,
            unsafe or lacks the expected contents, or ``data_dir/<name>``
            exists but is incomplete.
    """
    if name not in ARCHIVES:
        raise ValueError(f"Unknown archive {name!r}; expected one of {sorted(ARCHIVES)}")
    info = ARCHIVES[name]
    data_dir = Path(data_dir)
    target = data_dir / info.folder if info.folder else data_dir
    if _is_complete(target, info.expected):
        return target
    if info.folder and target.exists():
        raise ArchiveError(
            f"{target} exists but lacks some of {list(info.expected)}; it is not overwritten. "
            f"Move it away or delete it, then run again."
        )
    archive = Path(archive_dir if archive_dir is not None else data_dir) / f"{name}.tar.gz"

    # 1. Get the archive: a hand-placed one is used as is and never deleted.
    hand_placed = archive.is_file()
    if not hand_placed:
        _download(name, archive, url)

    def fail(problem: str) -> ArchiveError:
        if hand_placed:
            return ArchiveError(
                f"{archive} {problem}. It was placed by hand, so it is left alone: replace it with a "
                f"complete copy from {drive_link(name)} and run again."
            )
        archive.unlink(missing_ok=True)
        return ArchiveError(f"The downloaded {archive} {problem}; it was deleted. Run again to download it anew.")

    # 2. Complete gzip stream?
    with open(archive, "rb") as file:
        head = file.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        error = fail("is a web page, not a .tar.gz archive: the server answered with HTML (Google Drive does so "
                     "when the file's download quota is exceeded or it asks for a confirmation)")
        raise ArchiveError(f"{error}\n{_manual_route(name, archive, url)}" if not hand_placed else str(error))
    try:
        _check_gzip(archive, progress)
    except EOFError:
        raise fail("is truncated (the gzip stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as err:
        raise fail(f"is not a valid .tar.gz file ({err})") from None

    # 3. Extract into a temporary sibling, refusing unsafe members.
    data_dir.mkdir(parents=True, exist_ok=True)
    left = sorted(data_dir.glob(f".{name}.extract-*"))
    if left:  # a killed extraction (SIGKILL, out of memory) cannot clean up; another may be running now
        log.warning("%s: left by an extraction of %s that was stopped; unless one is running now, delete them to "
                    "free their space", ", ".join(map(str, left)), name)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.extract-", dir=data_dir))
    try:
        try:
            _extract(archive, stage, progress)
        except tarfile.FilterError as err:
            raise fail(f"holds an unsafe member, refused: {err}; nothing was extracted") from None
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise fail(f"could not be extracted ({err}); nothing was extracted") from None

        # 4. Expected contents, then move into place.
        root = _content_root(stage, info.expected, info.folder)
        if root is None:
            found = sorted(p.name for p in stage.iterdir())
            raise fail(f"does not hold the expected {list(info.expected)} (found {found})")
        if info.folder:
            publish_directory(root, target)
        else:
            for entry in info.expected:
                os.replace(root / entry, target / entry)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if not hand_placed:
        archive.unlink(missing_ok=True)  # as the original scripts did: 2.2 GB is not kept twice
    return target
