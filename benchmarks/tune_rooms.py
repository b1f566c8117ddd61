"""Tuning run for the default `rooms` experiment: train with overrides, print validation AP.

Trains the experiment of params.yaml with `section.key=value` overrides (sections: data, model,
train of `exp.<experiment>`) into runs/tune/<name>/, validating every `train.eval_every` steps,
then prints each validation row (step, AP50, mean AP, count accuracy) and the best AP50.
The default experiment's settings were chosen from runs like these (seed 1, one run per
setting; benchmarks/README.md "Tuning the default experiment"), for example:

    .venv/bin/python benchmarks/tune_rooms.py Y1 --threads 2 data.walls=back data.root=data/rooms64vb \
        model.bl_off_step=1500 model.z_scale_mean_end_value=-2.0

Data overrides generate their images into ``data.root`` (as the data stage does), so give them a
root of their own, or they replace the default's images. A run that is started again resumes
from its last checkpoint; copying a checkpoint into ``runs/tune/<other>/checkpoints/`` continues
it there under other settings (a branch: e.g. switching the boundary loss off from step 1500).
``benchmarks/rooms_errors.py`` then says which errors remain.
"""
import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from space.config import load_params, load_yaml  # noqa: E402
from space.experiment import build_dataset, load_experiment, prepare_data  # noqa: E402
from space.evaluation import evaluate  # noqa: E402
from space.training import Trainer  # noqa: E402
import space  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="run name: runs/tune/<name>")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.G=8 train.fg_lr=1e-3")
    parser.add_argument("--experiment", default="rooms")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--test", action="store_true",
                        help="then evaluate the best checkpoint on the test split (as stages/evaluate.py)")
    args = parser.parse_intermixed_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    entry = params["exp"][args.experiment]
    for override in args.overrides:
        key, _, value = override.partition("=")
        section, _, name = key.partition(".")
        if section not in ("data", "model", "train") or not name or not _:
            parser.error(f"override {override!r}: expected data.<key>=<value>, model.<key>=<value> or train.<key>=<value>")
        entry.setdefault(section, {})[name] = load_yaml(value)
    out = ROOT / "runs" / "tune" / args.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    exp = load_experiment(str(out / "params.yaml"), args.experiment)
    prepare_data(exp)
    start = time.time()
    trainer = Trainer(exp.model, exp.train, build_dataset(exp, "train"), out / "checkpoints",
                      val_set=build_dataset(exp, "val"), log_dir=out / "logs", plots_path=out / "plots.csv")
    trainer.fit()
    rows = pd.read_csv(out / "plots.csv").dropna(subset=["val_ap_50"])
    print(rows[["step", "val_ap_50", "val_ap_avg", "val_count_accuracy"]].to_string(index=False))
    best = rows.loc[rows["val_ap_50"].idxmax()]
    print(f"{args.name}: best val AP50 {best['val_ap_50']:.3f} at step {int(best['step'])}; "
          f"last count accuracy {rows['val_count_accuracy'].iloc[-1]:.3f}; {time.time() - start:.0f} s")
    if args.test:
        result = evaluate(space.load(trainer.best_path), build_dataset(exp, "test"), batch_size=32)
        print(f"{args.name}: test AP50 {result['ap_50']:.3f}, mean AP {result['ap_avg']:.3f}, count accuracy "
              f"{result['count_accuracy']:.3f} (over {result['overcount']}, under {result['undercount']}) "
              f"with the best checkpoint")


if __name__ == "__main__":
    main()
