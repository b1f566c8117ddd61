"""Torch datasets for the 3D Room (OBJ3D) and Atari data, and for a plain folder.

Every dataset returns float32 images in [0, 1] of shape (3, S, S), S being
``image_size``. Ground-truth boxes, where there are any, come from
``dataset.boxes(i)`` in one convention, the one the evaluation uses
(SPEC 9.2 and 9.3): an ``(M, 4)`` array of ``[y_min, y_max, x_min, x_max]``
rows, normalised so that 1 is the image side.

Every mistake a user can make with the files (missing folder, empty split,
unreadable image, malformed or missing box file) raises an exception that
names the file and says what to do.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from space.data.download import ARCHIVES, ATARI_GAMES, ATARI_SPLIT_DIRS, DEFAULT_ARCHIVE_DIR, SPLITS, drive_link

__all__ = [
    "IMAGE_EXTENSIONS",
    "Obj3dDataset",
    "AtariDataset",
    "FolderDataset",
    "check_image",
    "load_image",
    "read_box_file",
    "to_rgb",
]

#: File extensions counted as images by the OBJ3D and Atari loaders.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: Pixel size the OBJ3D box files are written for; the original evaluator
#: divides by 128 (SPEC 9.3).
OBJ3D_BOX_PIXEL_SIZE = 128


def _check_split(split: str, allowed: Sequence[str] = SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"Unknown split {split!r}; expected one of {list(allowed)}")


def _missing_root_error(root: Path, what: str) -> FileNotFoundError:
    """The error for a dataset folder that does not exist, saying how to get it."""
    name = root.name
    if name in ARCHIVES:
        how = (
            f"run `dvc repro` (its data stage downloads it), or download {name}.tar.gz from "
            f"{drive_link(name)}, put it at {Path(DEFAULT_ARCHIVE_DIR) / (name + '.tar.gz')} (the data "
            f"stage's data.archive_dir) and run `dvc repro` or `python -m space.fetch {name}`, which extract it offline"
        )
    else:
        how = (
            "run `dvc repro` (its data stage downloads or generates it), or generate procedural rooms "
            "with space.data.rooms.generate_rooms / Atari frames with space.data.ale.generate_atari, "
            f"or download an original archive by hand (OBJ3D_SMALL: {drive_link('OBJ3D_SMALL')}, "
            f"ATARI: {drive_link('ATARI')}) and extract it into {root.parent}"
        )
    return FileNotFoundError(f"{what} folder {root} does not exist: {how}.")


def to_rgb(image: Image.Image, name: str = "the image") -> Image.Image:
    """``image`` as 8-bit RGB, its values scaled from its own bit depth.

    PIL's ``convert('RGB')`` clips deeper values to 255 instead of scaling them, so a 16-bit grey
    PNG or TIFF (common in microscopy and astronomy) comes out nearly white, and it truncates
    floats, so an image in [0, 1] comes out black. Here the integer modes ('I;16', 'I;16B', 'I',
    ...) are read as 16-bit values, 0..65535, as PNG and TIFF store them (65535 becomes 255), and
    the float mode 'F' as values in [0, 1]; values outside those ranges are refused, naming
    ``name``, rather than guessed at. Every other mode is PIL's conversion: alpha dropped without
    compositing (the original keeps channels [:3]), grey repeated, palette and CMYK converted.

    Raises:
        ValueError: For an integer image with values outside 0..65535, or a float image with
            values outside [0, 1] or not finite.
    """
    if _deeper_than_8_bits(image):
        values = np.asarray(image).astype(np.float64)
        lo, hi = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if image.mode == "F":
            if not np.isfinite(values).all() or lo < 0 or hi > 1:
                raise ValueError(f"{name} holds 32-bit float values {lo:g}..{hi:g}, outside [0, 1], the range "
                                 f"float images are read in; scale them to [0, 1] or save the image with 8 or 16 bits.")
            scaled = values * 255.0
        else:
            if lo < 0 or hi > 65535:
                raise ValueError(f"{name} holds integer values {lo:g}..{hi:g}, outside 0..65535, the 16-bit range "
                                 f"integer images are read in; save the image with 8 or 16 bits.")
            scaled = values / 257.0
        image = Image.fromarray(np.round(scaled).astype(np.uint8), "L")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image fully, turns it as its EXIF orientation says (as viewers do; the original's
    datasets have none) and converts it to 8-bit RGB with :func:`to_rgb`.

    Raises:
        ValueError: If the file is not a readable image (corrupt, truncated), or holds values
            :func:`to_rgb` refuses.
    """
    return to_rgb(turned_as_shown(_decoded(path)[0]), f"Image {path}")


def turned_as_shown(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says, as viewers show it (see :func:`_orientation`)."""
    turn = _TRANSPOSE.get(_orientation(image))
    return image if turn is None else image.transpose(turn)


#: How to turn stored pixels for display, by EXIF orientation (the table of ``PIL.ImageOps.exif_transpose``).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def load_square(path: str | os.PathLike, size: int) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, its shorter side scaled to ``size`` (bilinear) and
    centre-cropped to a square: :func:`_resize_shorter_and_crop` of :func:`load_image`, faster.

    A JPEG is decoded at the smallest of its reduced scales (1/2, 1/4, 1/8) that keeps at least
    ``size`` pixels on each side, several times faster for a photo far larger than the model's
    images (a 4000 x 3000 one for 128 pixels: 0.035 s instead of 0.14 s on a 2-core machine,
    ``benchmarks/bench_folder_loading.py``). The
    pixels differ slightly from a full decode's (the JPEG's own transform does part of the
    scaling); the geometry does not: the resize reads exactly the file's extent of the reduced
    image (its last row and column may reach past the file's edge), in the stored orientation,
    before the turn.
    """
    image, stored, extent = _decoded(path, size)
    orientation = _orientation(image)
    turn, quarter = _TRANSPOSE.get(orientation), orientation in _QUARTER_TURNS
    new_w, new_h, left, top = _square_transform(stored[::-1] if quarter else stored, size)
    target = (new_h, new_w) if quarter else (new_w, new_h)  # in the stored orientation
    image = to_rgb(image, f"Image {path}")
    if image.size != target or (extent is not None and extent[2:] != image.size):
        image = image.resize(target, Image.Resampling.BILINEAR, box=extent)
    if turn is not None:
        image = image.transpose(turn)
    if (new_w, new_h) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return image


def check_image(path: str | os.PathLike, size: int | None = None) -> None:
    """Decodes an image file to its end, raising :func:`load_image`'s errors.

    With ``size``, a JPEG is decoded at the smallest of its reduced scales that is still at least
    ``size`` pixels on each side: every byte of it is still read and entropy-decoded, so
    truncation and corruption still surface, in a fraction of the time.
    """
    image = _decoded(path, size)[0]
    if _deeper_than_8_bits(image):  # its values may lie outside the range to_rgb reads; 8-bit ones cannot
        to_rgb(image, f"Image {path}")


def _deeper_than_8_bits(image: Image.Image) -> bool:
    """Whether PIL holds the image's values as 16- or 32-bit integers ('I;16', 'I', ...) or floats ('F')."""
    return image.mode.startswith("I") or image.mode == "F"


def _decoded(path: str | os.PathLike, draft: int | None = None
             ) -> tuple[Image.Image, tuple[int, int], tuple[float, float, float, float] | None]:
    """The image at ``path`` decoded to its end (a JPEG at the smallest reduced scale that keeps
    ``draft`` pixels on each side), its stored size, and for a reduced JPEG the file's extent in
    the reduced image's pixels (``(0, 0, width / scale, height / scale)``), else None.
    """
    try:
        with Image.open(path) as image:
            _check_decodable(image, path)
            stored = image.size
            reduced = image.draft("RGB", (draft, draft)) if draft and image.format == "JPEG" else None
            extent = reduced[1] if reduced else None  # None too where PIL cannot reduce this JPEG
            image.load()  # decode now, so truncation surfaces here
            return image, stored, extent
    except _Undecodable:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(_unreadable(path, err)) from None


class _Undecodable(ValueError):
    """An image file PIL identifies but cannot decode here (its message is whole)."""


def _check_decodable(image: Image.Image, path: str | os.PathLike) -> None:
    """Refuse what PIL identifies but cannot decode here: its stub formats (HDF5, GRIB, BUFR, ...,
    which report a size of 0 x 0) without a handler installed, and images without pixels."""
    if _stub_without_handler(type(image)):
        raise _Undecodable(f"Cannot read image {path}: PIL identifies it as {image.format} but cannot decode that "
                         f"format here; convert it to PNG or JPEG, or move it out of the folder")
    if 0 in image.size:
        raise _Undecodable(f"Cannot read image {path}: it has no pixels ({image.size[0]} x {image.size[1]}); "
                         f"delete or replace it")


def _unreadable(path: str | os.PathLike, err: BaseException) -> str:
    if isinstance(err, Image.DecompressionBombError):  # a sound file, over PIL's limit on pixels
        return (f"Cannot read image {path}: {err} The file may be sound, but PIL refuses images this large; "
                f"save a smaller copy of it (the model sees it at its image_size anyway).")
    return (f"Cannot read image {path}: {err}. The file is corrupt or truncated, or in a variant PIL cannot "
            f"decode here; delete or replace it (re-download or regenerate the dataset, or convert it to PNG).")


def _square_transform(size: tuple[int, int], out: int) -> tuple[int, int, int, int]:
    """``(new_w, new_h, left, top)``: resize target and crop corner for an image of ``size``.

    The resize follows torchvision's ``Resize(out)`` on a PIL image, which the
    original used: the shorter side becomes ``out`` and the longer one
    ``int(out * long / short)``. The centre crop to a square is ours: the
    original assumed square images.
    """
    w, h = size
    new_w, new_h = (out, int(out * h / w)) if w <= h else (int(out * w / h), out)
    return new_w, new_h, (new_w - out) // 2, (new_h - out) // 2


def _resize_shorter_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Scales the shorter side to ``size`` (bilinear), then centre-crops to a square.

    An image that already has the target size is not resampled, as in torchvision.
    """
    new_w, new_h, left, top = _square_transform(image.size, size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if (new_w, new_h) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return image


@dataclass(frozen=True)
class SourceImage:
    """Which file an item came from, and how its pixels map to the file's.

    A point ``(x, y)`` in pixels of the model-size image lies at
    ``((x + left) * scale_x, (y + top) * scale_y)`` in pixels of the file (pixel edges at
    integers, as in the boxes).
    """

    path: str
    scale_x: float
    scale_y: float
    left: int = 0
    top: int = 0

    def box(self, x_min: float, y_min: float, x_max: float, y_max: float) -> tuple[float, float, float, float]:
        """A box ``(x_min, y_min, x_max, y_max)`` of the model-size image, in pixels of the file."""
        return ((x_min + self.left) * self.scale_x, (y_min + self.top) * self.scale_y,
                (x_max + self.left) * self.scale_x, (y_max + self.top) * self.scale_y)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as viewers show it (EXIF orientation applied), from its header."""
    try:
        with Image.open(path) as image:
            _check_decodable(image, path)
            w, h = image.size
            return (h, w) if _orientation(image) in _QUARTER_TURNS else (w, h)
    except _Undecodable:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(_unreadable(path, err)) from None


#: EXIF orientations (tag 0x0112) whose display turns the stored pixels by a quarter turn.
_QUARTER_TURNS = (5, 6, 7, 8)


def _orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1 (as stored) when it has none.

    Phone cameras store pixels as the sensor read them and record how to turn them for display;
    every viewer applies it, so box files measured in a viewer, and what users expect back, are
    in the turned image. A PNG may hold its eXIf chunk after its pixel data, where PIL finds it only
    by decoding them; for a PNG not yet decoded, its chunk headers are read to find out first.
    """
    if image.format == "PNG" and "exif" not in image.info:
        decoded = not image.tile  # PIL empties the tiles once it has read the pixels and the chunks after them
        if decoded or not _png_has_exif(image.filename):
            return 1
    return image.getexif().get(0x0112, 1)


def _png_has_exif(path: str | os.PathLike) -> bool:
    """Whether the PNG file at ``path`` has an eXIf chunk, from its chunk headers alone."""
    with open(path, "rb") as file:
        file.seek(8)  # the signature
        while len(head := file.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"eXIf", b"IEND"):
                return kind == b"eXIf"
            file.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return False


def _cropped_source(path: Path, size: int) -> SourceImage:
    """The geometry of :func:`_resize_shorter_and_crop` for the file at ``path``."""
    w, h = _image_size(path)
    new_w, new_h, left, top = _square_transform((w, h), size)
    return SourceImage(str(path), w / new_w, h / new_h, left, top)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], dividing in float32 as torchvision's ToTensor does."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return array.permute(2, 0, 1).contiguous().float().div(255)


def read_box_file(path: str | os.PathLike, pixel_size: float) -> np.ndarray:
    """Reads one ``cx,cy,w,h`` box file into normalised boxes.

    Each non-empty line holds centre x, centre y, width and height in pixels;
    an empty file means no objects. The conversion repeats the original
    evaluator's ``read_boxes`` operation for operation, in float64.

    Args:
        path: The box file.
        pixel_size: The image side the pixel values refer to.

    Returns:
        (M, 4) float64 ``[y_min, y_max, x_min, x_max]`` rows divided by ``pixel_size``.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If a line is not four comma-separated numbers, or holds a non-finite one or a
            negative width or height.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Box file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is no text
    except UnicodeDecodeError as err:
        raise ValueError(f"Box file {path} is not UTF-8 text ({err.reason} at byte {err.start}; UTF-16, say, "
                         f"which Windows PowerShell's '>' writes): save it as UTF-8 or ASCII.") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            cx, cy, w, h = (float(value) for value in line.split(","))
        except ValueError:
            raise ValueError(
                f"{path}, line {number}: expected 'centre_x,centre_y,width,height' in pixels, got {line!r}. "
                f"Fix or regenerate the box file."
            ) from None
        if not np.isfinite([cx, cy, w, h]).all() or w < 0 or h < 0:
            raise ValueError(
                f"{path}, line {number}: expected finite numbers with width and height >= 0, got {line!r}. "
                f"Fix or regenerate the box file."
            )
        rows.append([cy - h / 2.0, cy + h / 2.0, cx - w / 2.0, cx + w / 2.0])
    return np.array(rows, dtype=np.float64).reshape(-1, 4) / pixel_size


def readable_extensions() -> set[str]:
    """Extensions of the formats PIL decodes here: not save-only ones (.pdf), nor its stub formats
    (.h5, .grib, .bufr, ...), which it identifies but cannot read without a handler installed, nor
    MPEG video (.mpg), whose header it reads and whose frames it cannot."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items()
            if fmt in Image.OPEN and fmt != "MPEG" and not _stub_without_handler(Image.OPEN[fmt][0])}


def _stub_without_handler(factory: Any) -> bool:
    """Whether a PIL format's opener is a stub with no handler registered (a user may register one;
    Windows does for WMF). Pillow keeps it on the class, older versions in the plugin's module."""
    return (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)  # JPEG's is a function
            and getattr(factory, "_handler", None) is None
            and getattr(sys.modules.get(factory.__module__), "_handler", None) is None)


def _is_utf8(name: str) -> bool:
    """Whether a file name (undecodable bytes come as surrogates) is valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` by extension, hidden files skipped."""
    return [
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    ]


class Obj3dDataset(Dataset):
    """The 3D Room datasets (OBJ3D_SMALL, OBJ3D_LARGE) and the procedural rooms.

    Layout (SPEC 10.1): ``<root>/<split>/<index>-<anything>.png|jpg``, and for
    evaluated splits ``<root>/<split>/bb/bb_<i>.txt`` (SPEC 9.3), box file i
    belonging to the i-th image in index order.

    Differences from the original loader, on purpose:

    * Images are found by extension (.png/.jpg/.jpeg, any case); the original
      tested whether the whole path *contains* 'png' or 'jpg' (SPEC 13.2 item
      10), which also picks up e.g. 'notes.png.txt' or any file under a folder
      named 'jpg'. Hidden files (such as macOS '._0-a.png') are skipped.
    * Non-square images are centre-cropped to a square after the resize; the
      original assumed square images. Boxes are not adjusted for the crop (the
      box files are defined on the square image).
    * A duplicate index is an error instead of an arbitrary order.

    Args:
        root: Dataset folder, e.g. ``data/OBJ3D_SMALL``.
        split: 'train', 'val' or 'test'.
        image_size: Output side in pixels.
        with_boxes: Whether boxes are expected; then ``<split>/bb`` must hold
            ``bb_<i>.txt`` for every image. Pass False for splits without boxes
            (the original train split may have none).
        box_pixel_size: The image side the box files are in pixels of. ``None``
            reads ``image_size`` from ``<root>/meta.json`` (written by the
            rooms generator) and otherwise uses 128, the original's value.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        image_size: int = 128,
        with_boxes: bool = True,
        box_pixel_size: float | None = None,
    ) -> None:
        _check_split(split)
        self.root, self.split, self.image_size = Path(root), split, image_size
        if not self.root.is_dir():
            raise _missing_root_error(self.root, "3D Room dataset")
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"Split folder {split_dir} does not exist; a 3D Room dataset needs {root}/{{train,val,test}}. "
                f"Re-extract or regenerate the dataset."
            )
        indexed = {}
        for path in _image_files(split_dir):
            try:
                index = int(path.name.split("-")[0])
            except ValueError:
                raise ValueError(
                    f"Image {path} does not start with '<index>-'; 3D Room images must be named like "
                    f"'0-room.png'. Rename or remove it."
                ) from None
            if index in indexed:
                raise ValueError(f"Images {indexed[index]} and {path} share index {index}; remove one.")
            indexed[index] = path
        if not indexed:
            raise ValueError(f"No images (.png/.jpg/.jpeg) in {split_dir}; re-extract or regenerate the dataset.")
        self.paths = [indexed[i] for i in sorted(indexed)]

        self.box_dir = split_dir / "bb"
        self._with_boxes = with_boxes
        self.box_pixel_size = box_pixel_size if box_pixel_size is not None else self._meta_pixel_size()
        if with_boxes:
            if not self.box_dir.is_dir():
                raise FileNotFoundError(
                    f"Box folder {self.box_dir} does not exist, but boxes are expected for split {split!r}. "
                    f"Pass with_boxes=False to load the images only, or regenerate the dataset."
                )
            first, last = min(indexed), max(indexed)
            gaps = sorted(set(range(first, last + 1)) - set(indexed))
            if gaps:  # the i-th image in index order takes bb_i.txt (SPEC 10.1): past a gap, another's boxes
                raise ValueError(
                    f"{split_dir} has no image of index {gaps[0]} ({len(gaps)} of indices {first}-{last} "
                    f"missing): the i-th image in index order takes box file bb_i.txt, so the images past the "
                    f"gap would take the boxes of others. Restore the missing image(s), or number images and "
                    f"box files 0..n-1 together (data the pipeline generated: `dvc repro --force data@<experiment>` "
                    f"makes it again).")
            present = {p.name for p in self.box_dir.iterdir()}
            missing = [f"bb_{i}.txt" for i in range(len(self.paths)) if f"bb_{i}.txt" not in present]
            if missing:
                raise FileNotFoundError(
                    f"Box file {self.box_dir / missing[0]} is missing ({len(missing)} of {len(self.paths)} "
                    f"missing in {self.box_dir}); box file i belongs to the i-th image. Regenerate the "
                    f"dataset or pass with_boxes=False."
                )

    def _meta_pixel_size(self) -> float:
        meta = self.root / "meta.json"
        if meta.is_file():
            try:
                return float(json.loads(meta.read_text())["image_size"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{meta} has no valid 'image_size' ({err}); fix or delete it.") from None
        return OBJ3D_BOX_PIXEL_SIZE

    @property
    def has_boxes(self) -> bool:
        """Whether ``boxes(i)`` is available."""
        return self._with_boxes

    def files(self) -> list[Path]:
        """Every file this split reads: images, box files and ``meta.json`` (the boxes' pixel size)."""
        files = list(self.paths)
        if self._with_boxes:
            files += [self.box_dir / f"bb_{i}.txt" for i in range(len(self.paths))]
        if (self.root / "meta.json").is_file():
            files.append(self.root / "meta.json")
        return files

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = _resize_shorter_and_crop(load_image(self.paths[index]), self.image_size)
        return _to_tensor(image)  # (3, S, S)

    def source(self, index: int) -> SourceImage:
        """The file of item ``index`` and the map from its pixels to the file's."""
        return _cropped_source(self.paths[index], self.image_size)

    def boxes(self, index: int, dtype: np.dtype = np.float64) -> np.ndarray:
        """Ground-truth boxes of image ``index``.

        Args:
            index: Image index in this dataset's order.
            dtype: Result dtype. The conversion runs in float64 like the
                original evaluator's, whose IoUs then take float32 predictions
                against these float64 boxes (SPEC 9.3): the default keeps that.

        Returns:
            (M, 4) ``[y_min, y_max, x_min, x_max]`` in [0, 1] units of the image side.
        """
        if not self._with_boxes:
            raise ValueError(f"Split {self.split!r} of {self.root} was opened with with_boxes=False.")
        if not 0 <= index < len(self.paths):
            raise IndexError(f"Box index {index} out of range for {len(self.paths)} images")
        return read_box_file(self.box_dir / f"bb_{index}.txt", self.box_pixel_size).astype(dtype)


class AtariDataset(Dataset):
    """The Atari frames (SPEC 10.2): ``<root>/<Game>-v0/{train,validation,test}/*``.

    The order is that of the original: the relative paths
    ``"<Game>-v0/<split dir>/<file>"`` sorted as plain strings, so with
    unpadded names '10.png' comes before '2.png'. Unlike the original, only
    image files are listed (stray files broke it, SPEC 13.2 item 11) and a
    requested game that is missing is an error instead of silently skipped.

    Frames are read as the original does: PIL ``convert('RGB')``, a forced
    square bilinear resize, then uint8 / 255 in float64 cast to float32.

    Args:
        root: Dataset folder, e.g. ``data/ATARI``.
        split: 'train', 'val' (stored as 'validation') or 'test'.
        games: Game folders to use, with or without '-v0' (e.g.
            ``['SpaceInvaders']``); ``None`` uses every game folder in ``root``.
        image_size: Output side in pixels.
        bgr: Swap the R and B channels. The original files are stored in the
            channel order the pretrained models expect (SPEC 10.2 BGR quirk);
            frames written in RGB by ``generate_atari`` need ``bgr=True`` to
            match them.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        games: Sequence[str] | None = None,
        image_size: int = 128,
        bgr: bool = False,
    ) -> None:
        _check_split(split)
        self.root, self.split, self.image_size, self.bgr = Path(root), split, image_size, bgr
        if not self.root.is_dir():
            raise _missing_root_error(self.root, "Atari dataset")
        available = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if games is None:
            if not available:
                raise ValueError(f"No game folders in {self.root}; expected e.g. {self.root / 'Pong-v0'}.")
            folders = available
        else:
            if isinstance(games, str):
                raise TypeError(f"games must be a list of names, got the string {games!r}")
            folders = [g if g.endswith("-v0") else f"{g}-v0" for g in games]
            missing = [g for g in folders if g not in available]
            if missing:
                raise FileNotFoundError(
                    f"Game folder{'s' if len(missing) > 1 else ''} {', '.join(str(self.root / m) for m in missing)} "
                    f"{'do' if len(missing) > 1 else 'does'} not exist (available: {available}). "
                    f"Known games: {', '.join(ATARI_GAMES)}; generate frames with space.data.ale.generate_atari."
                )
        split_dir_name = ATARI_SPLIT_DIRS[split]
        relative = []
        for game in folders:
            split_dir = self.root / game / split_dir_name
            if not split_dir.is_dir():
                raise FileNotFoundError(
                    f"Split folder {split_dir} does not exist; each game needs train/validation/test folders."
                )
            files = _image_files(split_dir)
            if not files:
                raise ValueError(f"No images (.png/.jpg/.jpeg) in {split_dir}; regenerate or re-extract it.")
            relative.extend(f"{game}/{split_dir_name}/{p.name}" for p in files)
        relative.sort()
        self.relative_paths = relative

    @property
    def has_boxes(self) -> bool:
        """Always False: there are no Atari ground-truth boxes (SPEC 10.2)."""
        return False

    def files(self) -> list[Path]:
        """Every file this split reads (its frames)."""
        return [self.root / relative for relative in self.relative_paths]

    def __len__(self) -> int:
        return len(self.relative_paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = load_image(self.root / self.relative_paths[index])
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        if self.bgr:
            array = array[:, :, ::-1]
        # float64 division then float32, exactly like the original.
        return torch.from_numpy(array / 255).permute(2, 0, 1).float().contiguous()  # (3, S, S)

    def source(self, index: int) -> SourceImage:
        """The file of item ``index`` and the map from its pixels to the file's (a plain resize)."""
        path = self.root / self.relative_paths[index]
        w, h = _image_size(path)
        return SourceImage(str(path), w / self.image_size, h / self.image_size)


class FolderDataset(Dataset):
    """A plain folder of a user's images, split deterministically.

    Any format and size PIL reads (non-recursive; hidden files skipped). Images
    are converted to RGB, their shorter side scaled to ``image_size`` and
    centre-cropped to a square. The split is a seeded permutation of the
    sorted file names cut by ``split_fractions``.

    Optional boxes: ``<root>/bb/<image stem>.txt`` with ``cx,cy,w,h`` lines in
    pixels of the *original* image. If ``bb/`` exists, every image needs a box
    file (an empty file means no objects). Boxes go through the same resize and
    crop, are clipped to the crop and dropped if nothing of them is left.

    Args:
        root: The folder.
        split: 'train', 'val', 'test', or 'all' (every image, sorted).
        image_size: Output side in pixels.
        seed: Seed of the split permutation.
        split_fractions: Shares of train, val and test; they must sum to 1.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        image_size: int = 128,
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    ) -> None:
        _check_split(split, SPLITS + ("all",))
        if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be three shares >= 0 summing to 1, got {split_fractions}")
        self.root, self.split, self.image_size = Path(root), split, image_size
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image folder {self.root} does not exist; check the path.")
        entries = sorted(p for p in self.root.iterdir() if not p.name.startswith("."))
        readable = readable_extensions()
        files = [p for p in entries if p.suffix.lower() in readable and p.is_file()]
        images = set(files)
        #: What the folder holds besides its images and bb/ (subfolders, other files): not read.
        self.skipped = [p for p in entries if p.name != "bb" and p not in images]
        if not files:
            subfolders = [p.name for p in self.skipped if p.is_dir()]
            raise ValueError(f"No image files in {self.root}; put your images directly in it"
                             + (f" (subfolders, such as {subfolders[0]}/, are not read)." if subfolders else "."))
        undecodable = [p for p in files if not _is_utf8(p.name)]
        if undecodable:
            raise ValueError(f"{len(undecodable)} image file name(s) in {self.root} are not UTF-8 (e.g. "
                             f"{ascii(undecodable[0].name)}, from an archive made elsewhere), which the manifests "
                             f"and exports cannot hold: rename them.")
        if split == "all":
            self.paths = files
        else:
            order = np.random.default_rng(seed).permutation(len(files))
            n_train = round(split_fractions[0] * len(files))
            n_val = round(split_fractions[1] * len(files))
            bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(files))}
            start, stop = bounds[split]
            self.paths = [files[i] for i in order[start:stop]]
            if not self.paths:
                raise ValueError(
                    f"Split {split!r} of {self.root} is empty ({len(files)} images, fractions {split_fractions}); "
                    f"add images or change split_fractions."
                )
        self.box_dir = self.root / "bb"
        if self.has_boxes:
            stems = {f.stem for f in files}
            self.skipped += [b for b in sorted(self.box_dir.iterdir())  # no image of theirs
                             if not b.name.startswith(".") and b.stem not in stems]
            by_stem: dict[str, list[str]] = {}
            for f in files:
                by_stem.setdefault(f.stem, []).append(f.name)
            shared = [names for names in by_stem.values() if len(names) > 1]
            if shared:
                raise ValueError(
                    f"Images {' and '.join(shared[0])} of {self.root} would share the box file "
                    f"{self.box_dir / (Path(shared[0][0]).stem + '.txt')}"
                    f"{f' (and {len(shared) - 1} more groups of images)' if len(shared) > 1 else ''}; "
                    f"box files are named by the image's name without its extension, so rename all but one."
                )
            missing = [p for p in self.paths if not (self.box_dir / f"{p.stem}.txt").is_file()]
            if missing:
                raise FileNotFoundError(
                    f"Box file {self.box_dir / (missing[0].stem + '.txt')} is missing for image {missing[0]} "
                    f"({len(missing)} missing); every image needs one once {self.box_dir} exists "
                    f"(an empty file means no objects)."
                )

    @property
    def has_boxes(self) -> bool:
        """Whether a ``bb/`` folder gives boxes."""
        return self.box_dir.is_dir()

    def files(self) -> list[Path]:
        """Every file this split reads: its images and, with ``bb/``, their box files."""
        return list(self.paths) + ([self.box_dir / f"{p.stem}.txt" for p in self.paths] if self.has_boxes else [])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        # A user's photos may be far larger than the model's size: a JPEG is decoded at a reduced scale.
        return _to_tensor(load_square(self.paths[index], self.image_size))  # (3, S, S)

    def source(self, index: int) -> SourceImage:
        """The file of item ``index`` and the map from its pixels to the file's."""
        return _cropped_source(self.paths[index], self.image_size)

    def boxes(self, index: int, dtype: np.dtype = np.float64) -> np.ndarray:
        """Boxes of image ``index`` as (M, 4) normalised ``[y_min, y_max, x_min, x_max]``."""
        return self._boxes(index)[0].astype(dtype)

    def box_stats(self, index: int) -> tuple[int, float]:
        """How many boxes (of positive size) of image ``index``'s file lie wholly outside the centre
        crop, and the largest number in the file, in pixels (at most 1: fractions, not pixels)."""
        kept, pixels = self._boxes(index)
        sized = int(((pixels[:, 1] > pixels[:, 0]) & (pixels[:, 3] > pixels[:, 2])).sum())
        return sized - len(kept), float(pixels.max()) if pixels.size else 0.0

    def _boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The boxes of image ``index`` kept after the crop, normalised, and its file's in pixels."""
        if not self.has_boxes:
            raise ValueError(f"{self.root} has no bb/ folder, so there are no boxes.")
        path = self.paths[index]
        size = _image_size(path)  # from the header, as viewers show the image
        # Pixel boxes of the original image, then through resize and crop.
        new_w, new_h, left, top = _square_transform(size, self.image_size)
        pixels = read_box_file(self.box_dir / f"{path.stem}.txt", 1.0)  # (M, 4)
        boxes = pixels.copy()
        boxes[:, 0:2] = (boxes[:, 0:2] * (new_h / size[1]) - top) / self.image_size
        boxes[:, 2:4] = (boxes[:, 2:4] * (new_w / size[0]) - left) / self.image_size
        boxes = np.clip(boxes, 0.0, 1.0)
        keep = (boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2])
        return boxes[keep], pixels

