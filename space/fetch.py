"""``python -m space.fetch NAME``: download and extract one of the original archives where the
pipeline looks for it, and print the folder: the pretrained models into ``pretrained/``, a dataset
into ``data/`` (the data stage does that itself). See :func:`space.data.download.fetch_archive`
for the checks, the resumed downloads and the manual route."""
from __future__ import annotations

import argparse
import sys

from .data.download import ARCHIVES, DEFAULT_ARCHIVE_DIR, ArchiveError, fetch_archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m space.fetch",
        description="Download and extract one of the original archives: the pretrained models into "
                    "pretrained/, a dataset into data/ (as the data stage does).")
    parser.add_argument("name", choices=sorted(ARCHIVES))
    parser.add_argument("--dest", help="folder to extract into (default: pretrained for the models, data for a dataset)")
    parser.add_argument("--archive-dir", help="where a hand-placed archive is looked for and the download goes "
                                              f"(default: the destination for the models, {DEFAULT_ARCHIVE_DIR} for a dataset)")
    parser.add_argument("--url", help="download from this URL instead of Google Drive (a mirror)")
    args = parser.parse_args(argv)
    models = args.name == "pretrained"
    dest = args.dest or ("pretrained" if models else "data")
    archive_dir = args.archive_dir or (dest if models else DEFAULT_ARCHIVE_DIR)
    try:
        target = fetch_archive(args.name, dest, archive_dir=archive_dir, url=args.url)
    except ArchiveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
