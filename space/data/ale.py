"""Atari frames from the Arcade Learning Environment, in the original ATARI layout.

An offline way to get Atari data like the original archive's (SPEC 10.2): a
uniformly random agent plays each game through ale-py, whose wheel ships the
ROMs. The emulator is set up like gym's ``<Game>-v0`` environments in the
ways that matter for the frames: the minimal action set, sticky actions with
probability 0.25 (ALE's ``repeat_action_probability``), each agent action
repeated for ``frame_skip`` emulator frames, and a reset on game over.
Note that gym's ``-v0`` drew the frame skip uniformly from {2, 3, 4} at every
step; pass ``frame_skip=(2, 5)`` for that, or an int for a fixed skip.

Frames are sampled every ``spacing`` agent steps, after skipping the first
``warmup`` steps of each episode (title screens and the static start, during
which several games ignore the input); a sample equal to the last saved frame
(a pause after a lost life) is skipped, so consecutive samples differ. Each split of each game is played by its own
emulator and agent, seeded from ``(seed, game, split)``: the splits come from
different trajectories and the same arguments give identical files.

Written layout::

    <out_root>/<Game>-v0/{train,validation,test}/<i>.png

Frames are the raw 210 x 160 (or the game's own size) screens; the loader
resizes them. Each game folder is built in a temporary sibling and renamed
into place when complete.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from space.data.download import ATARI_GAMES, ATARI_SPLIT_DIRS, publish_directory
from space.io import remove_stale

log = logging.getLogger(__name__)

__all__ = ["ATARI_GAMES", "generate_atari", "rom_name"]

#: gym's -v0 sticky-action probability and a fixed version of its frame skip.
STICKY_PROB = 0.25
FRAME_SKIP = 4
#: Agent steps between saved frames, and steps skipped after every reset.
DEFAULT_SPACING = 8
DEFAULT_WARMUP = 60
#: Samples in a row equal to the last saved frame after which the game is
#: taken to be stuck and reset.
MAX_STATIC_SAMPLES = 50
#: Default frames per split and game.
DEFAULT_COUNTS = (1000, 100, 100)
GAME_MARKER = ".generated-by-space"  # in each game folder generate_atari makes (the ATARI archive's have none)
#: Offset that keeps the agent's random stream apart from the emulator's seed.
_POLICY_STREAM = 1


def rom_name(game: str) -> str:
    """ale-py's ROM id of a game folder name: 'MsPacman-v0' -> 'ms_pacman'."""
    game = game.removesuffix("-v0")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower()


def _import_ale():
    try:
        from ale_py import ALEInterface, LoggerMode, roms
    except ImportError as err:
        raise ImportError(
            f"Generating Atari frames needs ale-py ({err}); install it with `pip install ale-py==0.12.1`."
        ) from None
    return ALEInterface, LoggerMode, roms


def _play(
    game: str,
    num_frames: int,
    seed_sequence: np.random.SeedSequence,
    frame_skip: int | tuple[int, int],
    sticky_prob: float,
    spacing: int,
    warmup: int,
) -> Iterator[np.ndarray]:
    """Plays ``game`` with a random agent and yields ``num_frames`` RGB screens."""
    ALEInterface, LoggerMode, roms = _import_ale()
    ALEInterface.setLoggerMode(LoggerMode.Error)
    emulator_seed, policy_seed = seed_sequence.spawn(2)
    ale = ALEInterface()
    # ALE takes a non-negative 31-bit seed.
    ale.setInt("random_seed", int(emulator_seed.generate_state(1)[0] % (2**31 - 1)))
    ale.setFloat("repeat_action_probability", sticky_prob)
    ale.loadROM(roms.get_rom_path(rom_name(game)))
    actions = ale.getMinimalActionSet()
    rng = np.random.default_rng(policy_seed)

    produced = 0
    steps_in_episode = 0
    previous: np.ndarray | None = None
    static_samples = 0
    while produced < num_frames:
        action = actions[rng.integers(len(actions))]
        skip = frame_skip if isinstance(frame_skip, int) else int(rng.integers(*frame_skip))
        for _ in range(skip):
            ale.act(action)
        steps_in_episode += 1
        if ale.game_over() or static_samples >= MAX_STATIC_SAMPLES:
            ale.reset_game()
            steps_in_episode = static_samples = 0
            continue
        if steps_in_episode > warmup and (steps_in_episode - warmup) % spacing == 0:
            frame = ale.getScreenRGB()
            # Pauses (a lost life, a level change) freeze the screen: skip
            # exact repeats of the last saved frame.
            if previous is not None and np.array_equal(frame, previous):
                static_samples += 1
                continue
            static_samples = 0
            previous = frame
            produced += 1
            yield frame


def generate_atari(
    out_root: str | os.PathLike,
    games: Sequence[str] = ATARI_GAMES,
    num_train: int = DEFAULT_COUNTS[0],
    num_val: int = DEFAULT_COUNTS[1],
    num_test: int = DEFAULT_COUNTS[2],
    seed: int = 0,
    frame_skip: int | tuple[int, int] = FRAME_SKIP,
    sticky_prob: float = STICKY_PROB,
    spacing: int = DEFAULT_SPACING,
    warmup: int = DEFAULT_WARMUP,
    bgr: bool = False,
    progress: bool = True,
) -> Path:
    """Plays each game with a random agent and writes sampled frames.

    Args:
        out_root: Dataset folder, e.g. ``data/ATARI``; game folders already
            there and not in ``games`` are left alone.
        games: Game names, with or without '-v0' (default: the original 11).
        num_train: Frames per game in ``train``.
        num_val: Frames per game in ``validation``.
        num_test: Frames per game in ``test``.
        seed: Seed of everything; the same arguments give identical files.
        frame_skip: Emulator frames per agent action: an int, or ``(lo, hi)``
            to draw it from ``range(lo, hi)`` at each step as gym's -v0 did.
        sticky_prob: Probability that the emulator repeats the previous
            action instead of the new one (per frame).
        spacing: Agent steps between saved frames.
        warmup: Agent steps skipped after every reset.
        bgr: Write BGR files like the original archive (whose pretrained
            models expect that order, SPEC 10.2); default RGB.
        progress: Show a tqdm progress bar.

    Returns:
        ``out_root``.

    Raises:
        ImportError: If ale-py is not installed.
        ValueError: On an unknown game or invalid argument.
    """
    _, _, roms = _import_ale()
    if min(num_train, num_val, num_test) < 0 or spacing < 1 or warmup < 0:
        raise ValueError("frame counts and warmup must be >= 0 and spacing >= 1")
    if isinstance(frame_skip, int) and frame_skip < 1 or not isinstance(frame_skip, int) and (
        len(frame_skip) != 2 or not 1 <= frame_skip[0] < frame_skip[1]
    ):
        raise ValueError(f"frame_skip must be an int >= 1 or a range (lo, hi) with 1 <= lo < hi, got {frame_skip}")
    if isinstance(games, str):
        raise TypeError(f"games must be a list of names, got the string {games!r}")
    names = [g.removesuffix("-v0") for g in games]
    known = set(roms.get_all_rom_ids())
    unknown = [g for g in names if rom_name(g) not in known]
    if unknown:
        raise ValueError(f"Unknown game(s) {unknown}: ale-py has no ROM named {[rom_name(g) for g in unknown]}")

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    counts = dict(zip(ATARI_SPLIT_DIRS, (num_train, num_val, num_test)))
    bar = tqdm(total=len(names) * sum(counts.values()), desc=f"atari -> {out_root.name}", unit="frame",
               disable=not progress)
    for game in names:  # left by a generation that was killed
        remove_stale(out_root, f".{game}-v0.tmp-", r"-[a-z0-9_]{8}")
    left = sorted(out_root.glob(".*-v0.tmp-*"))
    if left:  # a generation stopped by SIGTERM or SIGKILL cannot clean up; another may be running now
        log.warning("%s: left by a generation that was stopped; unless one is running now, delete them",
                    ", ".join(map(str, left)))
    for game in names:
        stage = Path(tempfile.mkdtemp(prefix=f".{game}-v0.tmp-{os.getpid()}-", dir=out_root))
        try:
            for split_index, (split, count) in enumerate(counts.items()):
                split_dir = stage / ATARI_SPLIT_DIRS[split]
                split_dir.mkdir()
                # Keyed by the game's name, so a subset of games gives the same
                # frames as the full run.
                game_key = zlib.crc32(rom_name(game).encode())
                frames = _play(game, count, np.random.SeedSequence([seed, game_key, split_index]),
                               frame_skip, sticky_prob, spacing, warmup)
                for i, frame in enumerate(frames):
                    Image.fromarray(frame[:, :, ::-1] if bgr else frame).save(split_dir / f"{i}.png")
                    bar.update()
            (stage / GAME_MARKER).write_text("space.data.ale.generate_atari\n")
            publish_directory(stage, out_root / f"{game}-v0")
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    bar.close()
    return out_root
