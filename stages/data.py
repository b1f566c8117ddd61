"""Stage data: generate or download an experiment's images; write a small manifest."""
from space.cli import stage_main
from space.experiment import build_dataset, load_experiment, prepare_data
from space.io import write_json


def main(args):
    exp = load_experiment(args.params, args.experiment)
    root = prepare_data(exp)
    splits = {split: len(build_dataset(exp, split)) for split in ("train", "val", "test")}
    empty = [split for split, n in splits.items() if n == 0]
    if empty:
        raise ValueError(f"{root}: empty split(s) {', '.join(empty)}")
    write_json(f"data/manifests/{exp.name}.json", {"root": str(root), "source": exp.data.source, "splits": splits})


if __name__ == "__main__":
    stage_main(__doc__, main)
