"""Stage export: every detected object of a split, with its box and latents, to a table and JSON."""
import space
from space.cli import stage_main
from space.config import load_params
from space.experiment import build_dataset, ensure_data, load_experiment, stage_settings
from space.objects import export_detections


def main(args):
    params = load_params(args.params)
    exp, settings = load_experiment(params, args.experiment), stage_settings(params, "export")
    model = space.load(f"models/{exp.name}.pth")
    ensure_data(exp)  # the images the data stage recorded (a copy of the repository may lack them)
    dataset = build_dataset(exp, settings["split"])
    summary = export_detections(model, dataset, f"exports/{exp.name}", settings["batch_size"],
                                settings["threshold"], settings["mode"], settings["num_images"],
                                split=settings["split"])
    print(summary)


if __name__ == "__main__":
    stage_main(__doc__, main)
