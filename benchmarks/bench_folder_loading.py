"""How long a folder dataset takes to load one large photo, against loading it whole.

Usage: .venv/bin/python benchmarks/bench_folder_loading.py [--width 4000] [--height 3000]
           [--image-size 128] [--images 4] [--repeats 3]

Writes ``--images`` JPEGs of ``--width`` x ``--height`` (smooth random content, quality 90) to a
temporary folder, then times, alternating image by image in one process: the full load
(``load_image``, decoding every pixel, then the bilinear resize and centre crop) and the folder
dataset's item (``FolderDataset[i]``: the JPEG decoded at the smallest reduced scale that keeps
``--image-size`` pixels a side). Prints the medians, their ratio, and the mean absolute difference
between the two images in levels of 255.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from space.data.datasets import FolderDataset, _resize_shorter_and_crop, load_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.images):
            coarse = rng.integers(0, 256, (args.height // 10, args.width // 10, 3)).astype(np.uint8)
            Image.fromarray(coarse).resize((args.width, args.height), Image.Resampling.BICUBIC).save(
                Path(folder) / f"photo{i}.jpg", quality=90)
        dataset = FolderDataset(folder, "all", image_size=args.image_size)
        full_times, fast_times, differences = [], [], []
        for _ in range(args.repeats):
            for i, path in enumerate(dataset.paths):
                start = time.perf_counter()
                full = _resize_shorter_and_crop(load_image(path), args.image_size)
                full_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                fast = dataset[i]
                fast_times.append(time.perf_counter() - start)
                full = torch.from_numpy(np.array(full)).permute(2, 0, 1).float() / 255
                differences.append(float((fast - full).abs().mean()) * 255)
    full_s, fast_s = statistics.median(full_times), statistics.median(fast_times)
    print(f"{args.images} JPEGs of {args.width} x {args.height} to {args.image_size} x {args.image_size}, "
          f"median of {len(full_times)} loads each, torch threads {torch.get_num_threads()}")
    print(f"full load        {full_s:.4f} s")
    print(f"folder dataset   {fast_s:.4f} s   {full_s / fast_s:.2f}x faster")
    print(f"mean absolute difference {statistics.mean(differences):.2f} levels of 255")


if __name__ == "__main__":
    main()
