"""Stage demo: decomposition figure for a few fixed images of a split (demo.split, demo.indices), and
training curves as PNG."""
import torch

import space
from space.cli import stage_main
from space.config import load_params
from space.experiment import build_dataset, ensure_data, load_experiment, stage_settings
from space.visualisation import DEMO_MAX_ROWS, demo_figure, training_curves


def main(args):
    params = load_params(args.params)
    exp, settings = load_experiment(params, args.experiment), stage_settings(params, "demo")
    model = space.load(f"models/{exp.name}.pth")
    ensure_data(exp)  # the images the data stage recorded (a copy of the repository may lack them)
    dataset = build_dataset(exp, settings["split"])
    indices = [i for i in settings["indices"] if i < len(dataset)]
    beyond = [i for i in settings["indices"] if i >= len(dataset)]
    if not indices:
        raise ValueError(f"demo.indices {settings['indices']}: the {settings['split']} split has {len(dataset)} "
                         f"images (indices 0-{len(dataset) - 1})")
    if beyond:
        print(f"warning: demo.indices {beyond} left out: the {settings['split']} split has {len(dataset)} images")
    if len(indices) > DEMO_MAX_ROWS:
        print(f"warning: demo.indices {indices[DEMO_MAX_ROWS:]} left out: the figure has at most {DEMO_MAX_ROWS} rows")
        indices = indices[:DEMO_MAX_ROWS]
    x = torch.stack([dataset[i] for i in indices])
    with torch.no_grad():
        out = model(x, space.final_priors(model.cfg), settings["mode"])
    demo_figure(out, f"plots/demo/{exp.name}.png", title=f"{exp.name}: {settings['split']} images {indices}",
                labels=[f"#{i}" for i in indices])
    training_curves(f"plots/train/{exp.name}.csv", f"plots/curves/{exp.name}.png")


if __name__ == "__main__":
    stage_main(__doc__, main)
