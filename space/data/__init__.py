"""Data: datasets, procedural 3D rooms, Atari frames and archive downloads."""

from space.data.ale import generate_atari
from space.data.datasets import AtariDataset, FolderDataset, Obj3dDataset, load_image, read_box_file
from space.data.download import ARCHIVES, ATARI_GAMES, ArchiveError, drive_link, fetch_archive
from space.data.rooms import generate_rooms, render_room

__all__ = [
    "ARCHIVES",
    "ATARI_GAMES",
    "ArchiveError",
    "AtariDataset",
    "FolderDataset",
    "Obj3dDataset",
    "drive_link",
    "fetch_archive",
    "generate_atari",
    "generate_rooms",
    "load_image",
    "read_box_file",
    "render_room",
]
