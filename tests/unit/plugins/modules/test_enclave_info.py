"""enclave_info through main(): health and verified attestation from a real served enclave, the enclaves of the
local runtime, and those of nitro-cli (a stand-in executable on PATH that prints what nitro-cli prints).
"""

import contextlib
import re
import sys
import time

import pytest

from ansible_collections.confidential_ml.nitro.enclave_server.server import SERVER_NAME
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient, host_kms_settings
from ansible_collections.confidential_ml.nitro.plugins.modules import enclave_info

DESCRIBE = [
    {
        "EnclaveName": "app",
        "EnclaveID": "i-0123456789abcdef0-enc0123456789abcdef",
        "ProcessID": 4242,
        "EnclaveCID": 16,
        "NumberOfCPUs": 2,
        "CPUIDs": [1, 3],
        "MemoryMiB": 2048,
        "State": "RUNNING",
        "Flags": "NONE",
    }
]


def test_health_and_attestation_of_the_served_enclave(run_module, enclave):
    for check_mode in (False, True):
        result = run_module(
            enclave_info.main,
            {"gather": ["health", "attestation"], "expect_pcr0": [enclave["pcr0"]]},
            check_mode=check_mode,
        )
        assert result["changed"] is False
        assert result["endpoint"] == enclave["endpoint"] and result["reachable"] is True
        assert "endpoint_error" not in result and "enclaves" not in result
        assert result["health"]["server"] == SERVER_NAME
        assert result["health"]["job"] is None
        assert result["health"]["share"]["bsize"] > 0
        claims = result["attestation"]
        assert claims["pcrs"]["0"] == enclave["pcr0"]
        assert re.fullmatch(r"[0-9a-f]{64}", claims["nonce"])
        assert claims["debug_mode"] is False and claims["module_id"]
        assert claims["root"]["subject"]


def test_attestation_without_expect_pcr0_is_still_verified(run_module, enclave, monkeypatch, tmp_path):
    result = run_module(enclave_info.main, {"gather": ["attestation"]})
    assert result["attestation"]["pcrs"]["0"] == enclave["pcr0"] and "health" not in result
    # With another state home, the local root is unknown: the document does not verify and the task fails.
    monkeypatch.setenv("ENCLAVE_HOME", str(tmp_path / "elsewhere"))
    result = run_module(enclave_info.main, {"gather": ["attestation"]})
    assert result["failed"] is True and "failed attestation" in result["msg"]


def test_wrong_expect_pcr0_fails(run_module, enclave):
    result = run_module(enclave_info.main, {"gather": ["health"], "expect_pcr0": "ab" * 48})
    assert result["failed"] is True
    assert "failed attestation, nothing was sent" in result["msg"]
    assert result["health"] is None


def test_health_names_the_running_job(run_module, enclave):
    with EnclaveClient(enclave["endpoint"]) as client:
        client.push(enclave["sealed"].parent, "/encrypted")
        request = {"package": "/encrypted/app.pkg", "script": "spin.py", "args": [], "kms": host_kms_settings()}
        events = []
        job = client.connection.submit("job.run", request, on_event=events.append)
        deadline = time.time() + 30
        while not any(e.get("type") == "stdout" for e in events):
            with contextlib.suppress(TimeoutError):
                job.result(timeout=0.1)
            assert time.time() < deadline, "the job never started"
        result = run_module(enclave_info.main, {"gather": ["health"]})
        assert re.match(r"job [0-9a-f]{12} \(spin.py from /encrypted/app.pkg, running for", result["health"]["job"])
    # Closing the client's connection stopped the job.
    deadline = time.time() + 30
    while run_module(enclave_info.main, {"gather": ["health"]})["health"]["job"] is not None:
        assert time.time() < deadline, "the job outlived its client"
        time.sleep(0.1)


def test_unreachable_or_unconfigured_enclave_is_reported_not_failed(run_module, enclave, monkeypatch, tmp_path):
    nobody = f"unix://{tmp_path / 'nobody.sock'}"
    result = run_module(enclave_info.main, {"gather": ["health", "attestation"], "endpoint": nobody})
    assert "failed" not in result and result["changed"] is False
    assert result["endpoint"] == nobody and result["reachable"] is False
    assert result["health"] is None and result["attestation"] is None
    assert "no enclave listens on" in result["endpoint_error"]

    monkeypatch.delenv("ENCLAVE_ENDPOINT")
    monkeypatch.setenv("ENCLAVE_BACKEND", "local")
    result = run_module(enclave_info.main, {"gather": ["health"]})
    assert result["endpoint"] is None and result["reachable"] is False and result["health"] is None
    assert "ENCLAVE_ENDPOINT" in result["endpoint_error"]


def test_enclaves_of_the_local_runtime(run_module, enclave, monkeypatch):
    monkeypatch.delenv("ENCLAVE_BACKEND", raising=False)
    result = run_module(enclave_info.main, {"gather": ["enclaves"]})
    assert result["backend"] == "local"
    assert result["enclaves"] == []  # the served enclave is a bare server process, not one the runtime started
    assert "health" not in result and "endpoint" not in result


@pytest.fixture
def nitro_cli(tmp_path, monkeypatch):
    """A stand-in nitro-cli on PATH that prints what describe-enclaves prints."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nitro-cli"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "if sys.argv[1:] != ['describe-enclaves']:\n"
        "    sys.exit(f'[ E01 ] unexpected arguments {sys.argv[1:]}')\n"
        f"print(json.dumps({DESCRIBE!r}, indent=2))\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return script


def test_enclaves_of_nitro_cli_and_everything_at_once(run_module, enclave, nitro_cli):
    result = run_module(enclave_info.main, {"backend": "nitro"})
    assert result["backend"] == "nitro"
    assert result["enclaves"] == [dict(DESCRIBE[0], Endpoint="vsock://16:5000")]
    assert result["health"]["job"] is None
    assert result["attestation"]["pcrs"]["0"] == enclave["pcr0"]


def test_a_failing_runtime_fails_the_task(run_module, nitro_cli):
    nitro_cli.write_text("#!/bin/sh\necho '[ E07 ] Sockets error.' >&2\nexit 1\n")
    result = run_module(enclave_info.main, {"backend": "nitro", "gather": ["enclaves"]})
    assert result["failed"] is True
    assert "cannot list the enclaves" in result["msg"] and "E07" in result["msg"]


def test_gather_choices_are_checked(run_module):
    result = run_module(enclave_info.main, {"gather": ["facts"]})
    assert result["failed"] is True and "gather" in result["msg"] and "enclaves" in result["msg"]
