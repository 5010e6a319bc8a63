"""Where this project's own enclave image is built from: enclave_code.collection_root(), not module_utils' own path.

Inside an AnsiballZ payload module_utils travels alone, without enclave_server/ or its Dockerfile."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import enclave_code, runtime
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveRuntimeError, ImageError
from ansible_collections.confidential_ml.nitro.tests.fixtures.sources import ROOT, copy_enclave_sources

PAYLOAD_MODULE_UTILS = "ansible_collections/confidential_ml/nitro/plugins/module_utils"


def _payload(tmp_path: Path) -> Path:
    """module_utils alone under its import path, as an AnsiballZ payload carries it."""
    payload = tmp_path / "payload"
    shutil.copytree(
        ROOT / "plugins/module_utils", payload / PAYLOAD_MODULE_UTILS, ignore=shutil.ignore_patterns("__pycache__")
    )
    for parent in Path(PAYLOAD_MODULE_UTILS).parents:
        if str(parent) != ".":
            (payload / parent / "__init__.py").touch()
    return payload


class _Installed:
    def __init__(self, root: Path):
        self.root = root

    def locate_file(self, path):
        return self.root / path


def test_in_a_checkout_the_root_is_the_checkout():
    assert enclave_code.collection_root() == ROOT


def test_module_utils_alone_builds_from_the_installed_package(tmp_path, monkeypatch):
    payload = _payload(tmp_path)
    installed = copy_enclave_sources(tmp_path / "site-packages" / enclave_code.PACKAGE_PATH)
    monkeypatch.setattr(enclave_code, "__file__", str(payload / PAYLOAD_MODULE_UTILS / "enclave_code.py"))
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: _Installed(tmp_path / "site-packages"))
    assert enclave_code.collection_root() == installed
    staged = runtime.stage_image_context(tmp_path / "context")
    assert (staged / "Dockerfile").read_bytes() == (ROOT / enclave_code.DOCKERFILE_PATH).read_bytes()


def test_module_utils_alone_without_the_package_says_what_to_do(tmp_path):
    """The real thing: a Python without site-packages (-S), so no installed distribution either."""
    payload = _payload(tmp_path)
    probe = (
        "from ansible_collections.confidential_ml.nitro.plugins.module_utils import runtime\n"
        "from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveRuntimeError\n"
        "import sys\n"
        "try:\n"
        "    runtime.stage_image_context(sys.argv[1])\n"
        "except EnclaveRuntimeError as err:\n"
        "    print(err)\n"
    )
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(payload)}
    result = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(tmp_path / "context")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "cannot stage the enclave image context" in result.stdout
    assert "enclave_server/Dockerfile" in result.stdout and "pip install confidential-ml-nitro" in result.stdout
    assert not (tmp_path / "context").exists()


def test_a_tree_without_its_dockerfile_is_refused_by_name(tmp_path):
    tree = copy_enclave_sources(tmp_path / "tree")
    (tree / enclave_code.DOCKERFILE_PATH).unlink()
    with pytest.raises(EnclaveRuntimeError, match=r"has no enclave_server/Dockerfile, which builds the image"):
        runtime.stage_image_context(tmp_path / "context", source=tree)
    with pytest.raises(ImageError):  # nor is it the collection's root
        _root_of(tree, tmp_path)


def _root_of(tree: Path, tmp_path: Path) -> Path:
    """collection_root() as if enclave_code lived in tree, with no installed package to fall back on."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(enclave_code, "__file__", str(tree / "plugins/module_utils/enclave_code.py"))
        patch.setattr(importlib.metadata, "distribution", _not_installed)
        return enclave_code.collection_root()


def _not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)
