"""Evaluation over a large generated set runs in bounded memory.

Generates N rooms images at 64 x 64 (once, into data/bench_eval), evaluates a small model on
them with a progress bar, and prints the peak resident memory of the process before and after
evaluation: the evaluation streams batches and keeps only per-image box summaries.

    .venv/bin/python benchmarks/bench_eval_memory.py --images 20000
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from space.config import ModelConfig  # noqa: E402
from space.data import Obj3dDataset, generate_rooms  # noqa: E402
from space.evaluation import evaluate  # noqa: E402
from space.model import Space  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--root", default="data/bench_eval")
    args = parser.parse_args()
    root = Path(args.root)
    if not (root / "test").is_dir() or len(list((root / "test").glob("*.png"))) != args.images:
        generate_rooms(root, image_size=64, num_train=0, num_val=0, num_test=args.images, seed=0)
    dataset = Obj3dDataset(root, "test", image_size=64)
    model = Space(ModelConfig(image_size=64, G=4, glimpse_size=16, fg_width=0.5, bg_width=0.25, K=3))
    before = peak_mib()
    start = time.time()
    metrics = evaluate(model, dataset, batch_size=32)
    print(f"{metrics['num_images']} images in {time.time() - start:.0f} s; peak RSS {before:.0f} MiB before "
          f"evaluation, {peak_mib():.0f} MiB after; ap_50 {metrics['ap_50']:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
