"""ansible-doc renders every module of the collection, text and JSON, with the sections a user reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(f"confidential_ml.nitro.{path.stem}" for path in (ROOT / "plugins" / "modules").glob("enclave_*.py"))
OWNER_MODULES = {"confidential_ml.nitro.enclave_key_policy", "confidential_ml.nitro.enclave_package"}
# The modules that talk to an enclave server, and so verify its attestation first.
ATTESTING_MODULES = {"confidential_ml.nitro.enclave_info", "confidential_ml.nitro.enclave_run",
                     "confidential_ml.nitro.enclave_sync"}  # fmt: skip


def ansible_doc(module: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path))
    return subprocess.run(
        [str(BIN / "ansible-doc"), "-t", "module", *args, module],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_module_is_listed():
    assert len(MODULES) == 7 and set(MODULES) >= OWNER_MODULES | ATTESTING_MODULES


@pytest.mark.parametrize("module", MODULES)
def test_ansible_doc_renders(module, tmp_path):
    done = ansible_doc(module, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[ERROR]" not in done.stderr and "[WARNING]" not in done.stderr, done.stderr
    assert module in done.stdout
    for section in ("OPTIONS", "ATTRIBUTES", "EXAMPLES", "RETURN VALUES"):
        assert section in done.stdout, f"{section} missing from ansible-doc {module}"

    as_json = ansible_doc(module, tmp_path, "--json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)[module]
    assert doc["doc"]["attributes"]["check_mode"]["support"] in ("full", "partial")
    assert doc["return"] and doc["examples"]
    options = doc["doc"]["options"]
    if module in OWNER_MODULES:
        assert doc["doc"]["attributes"]["check_mode"]["support"] == "full"
        for option in ("key_id", "kms_endpoint_url", "secret_key"):
            assert option in options
        assert options["secret_key"]["type"] == "str"
    if module in ATTESTING_MODULES:
        assert options["expect_pcr0"]["type"] == "list" and options["allow_debug"]["default"] is False
