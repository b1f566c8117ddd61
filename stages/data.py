"""Stage data: generate or download an experiment's images; write a small manifest."""
import logging

from space.cli import stage_main
from space.config import load_params
from space.experiment import (build_dataset, check_data_files, check_generated_root, data_fingerprint, data_identity,
                              load_experiment, prepare_data)
from space.io import write_json

log = logging.getLogger("stages.data")


def main(args):
    params = load_params(args.params)
    exp = load_experiment(params, args.experiment)
    check_generated_root(params, args.experiment)
    root = prepare_data(exp)
    splits = {split: len(build_dataset(exp, split)) for split in ("train", "val", "test")}
    empty = [split for split, n in splits.items() if n == 0]
    if empty:
        raise ValueError(f"{root}: empty split(s) {', '.join(empty)}")
    log.info("%s: %s", root, ", ".join(f"{n} {split}" for split, n in splits.items()))
    check_data_files(exp)  # every image decodes and every box file parses, or the stage says which do not
    # The later stages depend on this file: the fingerprint of the images makes DVC re-run them
    # when the images change, and enters the training run id (stages/train.py).
    content = data_fingerprint(exp)
    manifest = {"root": str(root), "source": exp.data.source, "splits": splits, "content": content,
                # settings that change how the files are read (data.bgr) re-run the later stages too
                "identity": data_identity(exp.data, exp.model.image_size, content)}
    write_json(f"data/manifests/{exp.name}.json", manifest)


if __name__ == "__main__":
    stage_main(__doc__, main)
