"""The example app: a deterministic, pickle-free model that classifies the shipped dataset well."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow  # each trains or runs the example's model: seconds of CPU


def build(tmp_path, name):
    out = tmp_path / name
    subprocess.run([sys.executable, str(ROOT / "examples/train_model.py"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training for the tests that only run the app (each training is seconds of CPU)."""
    return build(tmp_path_factory.mktemp("trained"), "app")


def test_training_is_deterministic_and_pickle_free(tmp_path, trained):
    first, second = trained, build(tmp_path, "b")
    model = (first / "model/digits.npz").read_bytes()
    assert model == (second / "model/digits.npz").read_bytes()
    assert b"pickle" not in model and b"\x80\x04" not in model[:64]  # arrays only, no pickle stream
    assert hashlib.sha256(model).hexdigest()


def test_app_classifies_the_user_dataset(tmp_path, trained):
    app = trained
    out = tmp_path / "output"
    result = subprocess.run(
        [sys.executable, str(app / "ml_algorithm.py"), "-m", str(app / "model/digits.npz"),
         "-d", str(ROOT / "examples/dataset"), "-o", str(out)],
        cwd=app, capture_output=True, text=True, check=True,
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == 180 and metrics["labelled_rows"] == 180
    assert metrics["accuracy"] > 0.9
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0] == "file,row,prediction,label" and len(lines) == 181
    assert "180 rows classified" in result.stdout


def test_empty_dataset_is_a_clear_error(tmp_path, trained):
    app = trained
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, str(app / "ml_algorithm.py"), "-m", str(app / "model/digits.npz"),
         "-d", str(tmp_path / "empty"), "-o", str(tmp_path / "out")],
        cwd=app, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "no CSV files" in result.stderr
