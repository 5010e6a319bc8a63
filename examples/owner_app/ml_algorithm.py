"""Classify the user's digit images with the owner's confidential model.

    ml_algorithm.py -m model/digits.npz -d /dataset/ -o /output/

Reads every *.csv in the dataset directory (64 pixel values 0-16 per row, and
optionally a `label` column), writes results.csv (one prediction per row) and
metrics.json (counts, and accuracy when labels are present) to the output
directory. Runs inside the enclave with only numpy.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

from digits_model import load_model, predict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="classify digits with the owner's model")
    parser.add_argument("-m", "--model", required=True, help="model file inside the package (npz)")
    parser.add_argument("-d", "--dataset", required=True, help="directory of CSV inputs")
    parser.add_argument("-o", "--output", required=True, help="directory for results.csv and metrics.json")
    args = parser.parse_args(argv)

    model = load_model(args.model)
    inputs = sorted(Path(args.dataset).glob("*.csv"))
    if not inputs:
        print(f"no CSV files in {args.dataset}: copy the inputs to the share's /dataset first", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    total = correct = labelled = 0
    per_class = {}
    with open(out / "results.csv", "w", newline="") as results:
        writer = csv.writer(results)
        writer.writerow(["file", "row", "prediction", "label"])
        for path in inputs:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                for row_number, row in enumerate(reader, start=1):
                    pixels = [float(row[f"p{i}"]) for i in range(64)]
                    prediction = predict(model, pixels)
                    label = row.get("label")
                    writer.writerow([path.name, row_number, prediction, label if label is not None else ""])
                    per_class[prediction] = per_class.get(prediction, 0) + 1
                    total += 1
                    if label not in (None, ""):
                        labelled += 1
                        correct += int(int(label) == prediction)
            print(f"classified {path.name}", flush=True)
    metrics = {
        "inputs": [p.name for p in inputs],
        "rows": total,
        "predictions_per_class": {str(k): v for k, v in sorted(per_class.items())},
        "labelled_rows": labelled,
        "accuracy": round(correct / labelled, 4) if labelled else None,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(f"{total} rows classified" + (f", accuracy {metrics['accuracy']:.3f}" if labelled else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
