"""Stage evaluate: AP, object counts and reconstruction on a split, to metrics/<experiment>.json."""
import pandas as pd

import space
from space.cli import stage_main
from space.config import load_params
from space.evaluation import RESEED_REMEDY, evaluate, resolve_device
from space.experiment import build_dataset, ensure_data, load_experiment, stage_settings
from space.io import nulls_for_non_finite, write_json, write_text


def main(args):
    params = load_params(args.params)
    exp, settings = load_experiment(params, args.experiment), stage_settings(params, "evaluate")
    device = resolve_device(settings["device"])
    model = space.load(f"models/{exp.name}.pth", device=device)
    ensure_data(exp)  # the images the data stage recorded (a copy of the repository may lack them)
    dataset = build_dataset(exp, settings["split"])
    results = evaluate(model, dataset, settings["batch_size"], settings["mode"], settings["num_images"], device)
    results = {"experiment": exp.name, "split": settings["split"], **results}
    if "ap_by_iou" in results:
        results["ap_by_iou"] = {f"{t:.2f}": ap for t, ap in results["ap_by_iou"].items()}
        curve = pd.DataFrame({"iou_threshold": [round(t, 2) for t in results["iou_thresholds"]], "ap": results["aps"]})
        write_text(f"plots/ap/{exp.name}.csv", curve.to_csv(index=False))
    else:
        write_text(f"plots/ap/{exp.name}.csv", "iou_threshold,ap\n")
    results, non_finite = nulls_for_non_finite(results)
    write_json(f"metrics/{exp.name}.json", results)
    if non_finite:
        print(f"warning: not finite, written as null to metrics/{exp.name}.json: {', '.join(non_finite)}; the "
              f"model computes NaN or infinity on these images (a diverged run or a corrupt checkpoint)")
    print({k: results[k] for k in ("ap_50", "ap_avg", "count_accuracy", "mse", "bg_failure") if k in results})
    if results["bg_failure"]:
        remedy = (f"the model is the pretrained file {exp.pretrained}, not trained here: check that its experiment's "
                  f"data and model settings are those it was trained with" if exp.pretrained else RESEED_REMEDY)
        print(f"warning: {results['bg_failure_reason']}; {remedy}")


if __name__ == "__main__":
    stage_main(__doc__, main)
