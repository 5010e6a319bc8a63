"""The owner's build step: train the digits classifier and write the app to seal.

    python examples/train_model.py OUT_DIR

copies owner_app/ to OUT_DIR and writes OUT_DIR/model/digits.npz: a multinomial
logistic regression trained with scikit-learn on the digits data set that ships
with scikit-learn (no download). The model is stored as plain arrays (numpy's
npz, read back with allow_pickle=False), never as a pickle, so loading it
cannot run code. Training is deterministic: the same inputs give the same file.
"""

import argparse
import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
SEED = 7


def train() -> tuple[LogisticRegression, float, np.ndarray, np.ndarray]:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    model = LogisticRegression(max_iter=2000, C=0.5)
    model.fit(x_train / 16.0, y_train)
    return model, model.score(x_test / 16.0, y_test), x_test, y_test


def write_npz(path: Path, arrays: dict) -> None:
    """np.savez with fixed zip timestamps, so the same model gives the same bytes (and package manifest)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, buffer.getvalue())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the app (with its trained model) into")
    parser.add_argument("--dataset", help="also write a sample user dataset (CSV) from the held-out split here")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    shutil.copytree(HERE / "owner_app", out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    model, accuracy, x_test, y_test = train()
    (out / "model").mkdir(exist_ok=True)
    write_npz(
        out / "model" / "digits.npz",
        {"coef": model.coef_, "intercept": model.intercept_, "classes": model.classes_, "scale": np.array([16.0])},
    )
    card = {"model": "multinomial logistic regression", "trained_on": "sklearn digits", "holdout_accuracy": accuracy}
    (out / "model" / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    if args.dataset:
        write_dataset(Path(args.dataset), x_test, y_test)
    print(f"trained: hold-out accuracy {accuracy:.3f}; app written to {out}", file=sys.stderr)
    return 0


def write_dataset(directory: Path, x: np.ndarray, y: np.ndarray, per_file: int = 60) -> None:
    """The user's plaintext inputs: CSV files of 64 pixel values (0-16) and, for scoring, the true label."""
    directory.mkdir(parents=True, exist_ok=True)
    header = ",".join([f"p{i}" for i in range(64)] + ["label"])
    for start in range(0, 180, per_file):
        rows = [",".join(str(int(v)) for v in x[i]) + f",{int(y[i])}" for i in range(start, start + per_file)]
        (directory / f"batch_{start // per_file + 1}.csv").write_text(header + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
