"""Average the weights of several checkpoints of one run, and score each and the average.

Usage: .venv/bin/python benchmarks/average_checkpoints.py 'runs/tune/SWA1/checkpoints/model_*.pth'
           [--experiment rooms] [--each]

Every floating-point tensor of the state dicts (weights and BatchNorm statistics) becomes the mean
over the checkpoints; the average and, with ``--each``, every checkpoint are evaluated on the
validation and test splits of the experiment (deterministic mode, batch 32), printing AP50, mean AP,
count accuracy, over- and under-counted images. benchmarks/README.md has what it gave.
"""
from __future__ import annotations

import argparse
import copy
import glob
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

import space  # noqa: E402
from space.evaluation import evaluate  # noqa: E402
from space.experiment import build_dataset, load_experiment  # noqa: E402

KEYS = ("ap_50", "ap_avg", "count_accuracy", "overcount", "undercount")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", help="a glob of checkpoint files of one run")
    parser.add_argument("--experiment", default="rooms")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--each", action="store_true", help="score every checkpoint too")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = sorted(glob.glob(args.checkpoints))
    if not paths:
        parser.error(f"no file matches {args.checkpoints!r}")
    exp = load_experiment(args.params, args.experiment)
    splits = {split: build_dataset(exp, split) for split in ("val", "test")}

    def score(model, tag: str) -> None:
        row = []
        for split, dataset in splits.items():
            metrics = evaluate(model, dataset, 32, progress=False)
            row.append(f"{split} " + " ".join(f"{k} {metrics[k]:.3f}" if isinstance(metrics[k], float)
                                              else f"{k} {metrics[k]}" for k in KEYS))
        print(f"{tag}: " + "; ".join(row), flush=True)

    models = [space.load(path) for path in paths]
    if args.each:
        for path, model in zip(paths, models):
            score(model, Path(path).name)
    average = copy.deepcopy(models[0])
    state = average.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = torch.stack([model.state_dict()[key] for model in models]).mean(0)
    average.load_state_dict(state)
    score(average, f"average of {len(models)}")


if __name__ == "__main__":
    main()
