"""Stage train: train SPACE (resuming from the last checkpoint), or import a pretrained file."""
from pathlib import Path

import space
from space.cli import stage_main
from space.experiment import build_dataset, data_identity, load_experiment
from space.training import Trainer, run_id


def main(args):
    exp = load_experiment(args.params, args.experiment)
    out, curves = Path(f"models/{exp.name}.pth"), Path(f"plots/train/{exp.name}.csv")
    if exp.pretrained:  # evaluate and demo a published checkpoint without training
        model = space.load(exp.pretrained, original=exp.original)
        space.save_checkpoint(out, model, None, step=0, epoch=0)
        curves.parent.mkdir(parents=True, exist_ok=True)
        curves.write_text("step,loss\n")
        return
    rid = run_id(exp.model, exp.train, data_identity(exp.data, exp.model.image_size))
    val = build_dataset(exp, "val") if exp.train.eval_on else None
    trainer = Trainer(exp.model, exp.train, build_dataset(exp, "train"), Path("checkpoints", exp.name, rid),
                      val_set=val, log_dir=Path("logs", exp.name, rid), plots_path=curves)
    model = trainer.fit()
    space.save_checkpoint(out, model.cpu(), None, step=trainer.position.step - 1, epoch=trainer.position.epoch,
                          train_cfg=exp.train)


if __name__ == "__main__":
    stage_main(__doc__, main)
