"""Stage train: train SPACE (resuming from the last checkpoint), or import a pretrained file.

With ``train.nproc_per_node`` N > 1 the stage relaunches itself through torchrun
(``python -m torch.distributed.run --standalone --nproc_per_node N -m stages.train ...``), so that
``dvc repro`` trains with DistributedDataParallel on N GPUs (or N CPU processes). Started by
torchrun already (for example on several nodes, see README "Multi-GPU and multi-node"), it runs
as one of the processes; only rank 0 writes the model, the plots and the checkpoints.
"""
import logging
import subprocess
import sys
from pathlib import Path

import torch

import space
from space.allocator import flush_denormals, retain_freed_memory
from space.checkpoint import CheckpointError, checkpoint_configs, load_weights, read_checkpoint
from space.cli import stage_main
from space.config import GLOBAL_MODEL_KEYS, ORIGINAL_CONFIGS, original_config, to_dict
from space.evaluation import resolve_device
from space.experiment import build_dataset, data_identity, ensure_data, load_experiment, read_manifest
from space.training import Trainer, dist_env, run_id, shutdown_distributed, under_torchrun

log = logging.getLogger("stages.train")


def torchrun_command(nproc_per_node: int, experiment: str, params: str) -> list[str]:
    """The command that runs this stage in ``nproc_per_node`` processes on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node),
            "-m", "stages.train", experiment, "--params", params]


def relaunch(nproc_per_node: int, device: str, experiment: str, params: str) -> None:
    """Run the stage again under torchrun and wait for it; raise if any process failed."""
    if resolve_device(device).type == "cuda" and nproc_per_node > torch.cuda.device_count():
        raise ValueError(f"train.nproc_per_node = {nproc_per_node} processes, one per GPU, but this machine has "
                         f"{torch.cuda.device_count()} GPU(s)")
    command = torchrun_command(nproc_per_node, experiment, params)
    log.info("relaunching under torchrun: %s", " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    code = subprocess.run(command).returncode
    if code != 0:
        raise RuntimeError(f"distributed training with {nproc_per_node} processes failed (torchrun exit code "
                           f"{code}); the messages above name the failed rank. Re-running resumes from the last "
                           f"checkpoint")


def import_pretrained(exp) -> space.Space:
    """The experiment's ``pretrained`` file as a model. Our checkpoints carry the configuration
    they were trained with (a warning names where it differs from ``exp.<name>.model``); an
    original-format file carries none and takes the experiment's ``model`` settings, which DVC
    tracks (the five original experiments of params.yaml hold the original's values)."""
    path = exp.pretrained
    if not Path(path).is_file():
        raise FileNotFoundError(f"exp.{exp.name}.pretrained: no file {path}. `python -m space.fetch pretrained` puts "
                                f"the original's five models in pretrained/ (offline: put pretrained.tar.gz there "
                                f"first; README \"Pretrained checkpoints\")")
    ckpt = read_checkpoint(path)
    ours = "config" in ckpt
    model = space.Space(checkpoint_configs(ckpt, path)[0] if ours else exp.model)
    if model.cfg.image_size != exp.model.image_size:  # the later stages read the data at the experiment's size
        raise CheckpointError(f"{path} was trained at image_size {model.cfg.image_size}, and "
                              f"exp.{exp.name}.model.image_size is {exp.model.image_size}, the size at which the "
                              f"data are read for it: set that to {model.cfg.image_size}")
    if not ours and Path(path).stem in ORIGINAL_CONFIGS:
        # Tensor shapes tell G and the network widths, not K, the sigmas or the priors: a file named
        # after one of the original's configurations is compared with that configuration's settings.
        named = Path(path).stem
        _warn_differences(to_dict(original_config(named)[0]), to_dict(exp.model),
                          f"{path} is named after the original's {named} configuration, whose model settings "
                          f"differ from exp.{exp.name}.model, which it is evaluated with", exp.name)
    try:
        load_weights(model, ckpt, str(path))
    except CheckpointError as err:
        if ours:
            raise
        raise CheckpointError(f"{err}\n  an original-format file takes the settings of exp.{exp.name}.model; make them "
                              f"those it was trained with (the five original experiments in params.yaml hold the "
                              f"original's)") from None
    if ours:
        _warn_differences(to_dict(model.cfg), to_dict(exp.model), f"{path} was trained with other model settings "
                          f"than exp.{exp.name}.model, and is evaluated with its own", exp.name)
    return model


def _warn_differences(theirs: dict, mine: dict, what: str, name: str) -> None:
    """Warn ``what``, naming each model setting (but those of how it is computed) that differs."""
    differ = [f"{key} {theirs[key]!r} (exp.{name}.model: {mine[key]!r})" for key in theirs
              if key not in GLOBAL_MODEL_KEYS and theirs[key] != mine.get(key)]
    if differ:
        log.warning("%s: %s", what, "; ".join(differ))


def main(args):
    exp = load_experiment(args.params, args.experiment)
    out, curves = Path(f"models/{exp.name}.pth"), Path(f"plots/train/{exp.name}.csv")
    env = dist_env()
    if exp.pretrained and exp.train.init_from:
        raise ValueError(f"exp.{exp.name}.pretrained ({exp.pretrained}) and train.init_from "
                         f"({exp.train.init_from}) are both set: pretrained evaluates a file without training, "
                         f"init_from trains on from one; set one of them")
    if exp.train.init_from and Path(exp.train.init_from).resolve() == out.resolve():
        raise ValueError(f"train.init_from is {exp.train.init_from}, this stage's own output, which DVC deletes before "
                         f"running the stage: copy it elsewhere first and set train.init_from to the copy")
    if exp.pretrained:  # evaluate and demo a published checkpoint without training
        if env.is_main:
            model = import_pretrained(exp)
            space.save_checkpoint(out, model, None, step=0, epoch=0)
            curves.parent.mkdir(parents=True, exist_ok=True)
            curves.write_text("step,loss\n")
        return
    on_cpu = resolve_device(exp.train.device).type == "cpu"
    if on_cpu and exp.train.cpu_allocator == "heap":
        retain_freed_memory()  # no page faults for the large per-step tensors (space/allocator.py)
    if on_cpu and exp.train.flush_denormal:
        flush_denormals()  # before torch's worker threads start, which inherit it (space/allocator.py)
    if exp.train.nproc_per_node > 1 and not under_torchrun():
        ensure_data(exp)
        images = len(build_dataset(exp, "train"))
        if images < exp.train.nproc_per_node:  # said once here, not by every process under torchrun
            raise ValueError(f"the training split has {images} images, fewer than the {exp.train.nproc_per_node} "
                             f"processes of train.nproc_per_node: every process needs at least one")
        relaunch(exp.train.nproc_per_node, exp.train.device, args.experiment, args.params)
        return
    ensure_data(exp)  # the images the data stage recorded (a copy of the repository may lack them)
    content = read_manifest(exp).get("content")
    rid = run_id(exp.model, exp.train, data_identity(exp.data, exp.model.image_size, content), env.world_size)
    val = build_dataset(exp, "val") if exp.train.eval_on else None
    try:
        trainer = Trainer(exp.model, exp.train, build_dataset(exp, "train"), Path("checkpoints", exp.name, rid),
                          val_set=val, log_dir=Path("logs", exp.name, rid), plots_path=curves)
        if trainer.env.distributed and trainer.env.is_main:
            log.info("DDP: %d processes x batch %d = global batch %d", trainer.env.world_size, exp.train.batch_size,
                     trainer.env.world_size * exp.train.batch_size)
        model = trainer.fit()
        if trainer.env.is_main:
            step, epoch = trainer.position.step - 1, trainer.position.last_epoch
            best: dict | str | None = None
            if exp.train.output == "best" and trainer.best_path.exists():  # model selection on the val split
                try:
                    best = space.read_checkpoint(trainer.best_path)
                except CheckpointError as err:  # a truncated write (the machine went down, say)
                    best = str(err)
            if isinstance(best, dict):
                space.load_weights(model, best, str(trainer.best_path))
                step, epoch = best["global_step"], best["epoch"]
                log.info("output: the best checkpoint by validation %s (step %d)", exp.train.best_metric, step)
            elif best is not None:
                log.warning("%s; writing the last step instead (delete it and %s; the next validation that scores "
                            "better writes a new one)", best, trainer.best_path.with_suffix(".json").name)
            elif exp.train.output == "best" and not trainer.validates:
                log.warning("train.output is 'best' but no validation ran (eval_on false or no val split): "
                            "writing the last step")
            elif exp.train.output == "best":
                aside = sorted(trainer.best_path.parent.glob(f"{trainer.best_path.stem}_step*.pth"))
                why = (f"the best was past train.max_steps and set aside as {aside[-1].name}" if aside else
                       "one is kept for the train.best_metric in force when the validations ran, after step 0")
                log.warning("train.output is 'best' but this run holds no best checkpoint by validation %s (%s): %s; "
                            "writing the last step (the validation scores are in %s)", exp.train.best_metric,
                            trainer.best_path, why, curves)
            space.save_checkpoint(out, model.cpu(), None, step=step, epoch=epoch, train_cfg=exp.train)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    stage_main(__doc__, main)
