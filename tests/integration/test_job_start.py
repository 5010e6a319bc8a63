"""What `enclave run` does before a job starts, checked without timing it (issue 13).

The CLI's start is most of a job's start from the command line: importing boto3 and resolving credentials
alone took ~150 ms. With credentials in the environment `enclave run` must reach the script's first line
without importing boto3 or botocore, still attesting the enclave before it sends them. Loading X.509 to
verify the attestation's certificate chain cost ~20-45 ms more: a chain this user verified before is known by
its bytes (attestation.VerifiedChains, in the user's state), so later runs check the document without it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient

# `enclave run` in a fresh interpreter, reporting which AWS SDK modules it imported on the way.
RUN_AND_REPORT = """
import json, sys
from ansible_collections.confidential_ml.nitro.cli.main import main
rc = main(sys.argv[1:])
sdk = sorted(name for name in sys.modules if name.split(".")[0] in ("boto3", "botocore", "s3transfer"))
cli = "ansible_collections.confidential_ml.nitro.cli."
others = sorted(name.removeprefix(cli) for name in sys.modules if name.startswith(cli) and name[len(cli):] != "main")
runtime = "ansible_collections.confidential_ml.nitro.plugins.module_utils.runtime" in sys.modules
report = {"rc": rc, "sdk": sdk, "x509": "cryptography.x509" in sys.modules, "cli": others, "runtime": runtime}
report["refusals"] = sorted(set(sys.modules) & {"decimal", "fractions", "uuid", "ctypes"})
print(json.dumps(report), file=sys.stderr)
"""


def run_cli(enclave, tmp_path, *args, **env):
    """The CLI with the user's credentials in the environment and no shared AWS files."""
    environment = {
        **{k: v for k, v in os.environ.items() if k not in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")},
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        **env,
    }
    command = [sys.executable, "-c", RUN_AND_REPORT, "run", "-f", "app.pkg", "-s", "ml_algorithm.py", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False, timeout=120)
    report = json.loads(result.stderr.strip().splitlines()[-1]) if result.stderr.strip() else {}
    return result, report


def push_app(enclave):
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        client.push(enclave["sealed"].parent, "/encrypted")
        client.call("share.create", {"path": "/model/model.h5", "mode": 0o644, "data": b"5\n"})


def test_enclave_run_attests_and_runs_without_the_aws_sdk(enclave, tmp_path):
    push_app(enclave)
    args = ["-a", "-m /model/model.h5 -d /dataset -o /output", "--expect-pcr0", enclave["pcr0"]]
    result, report = run_cli(enclave, tmp_path, *args)
    assert report.get("rc") == 0, result.stderr
    assert report["sdk"] == [], "`enclave run` imported the AWS SDK to read credentials from the environment"
    # The wire imports these only to refuse their types in a message that is not plain data, and ctypes only
    # to tune malloc for a transfer of big files: neither happens on run's path.
    assert report["refusals"] == [], "`enclave run` imported modules it never uses"
    assert "done" in result.stderr  # the script ran, with the key KMS released for these credentials


def test_enclave_run_still_refuses_an_enclave_of_another_image_first(enclave, tmp_path):
    """The credentials go out only after attestation: the wrong PCR0 stops the CLI before the job request."""
    push_app(enclave)
    result, report = run_cli(enclave, tmp_path, "--expect-pcr0", "ab" * 48)
    assert report["rc"] == 1 and "failed attestation, nothing was sent" in result.stderr
    assert "done" not in result.stderr and not any((enclave["share"] / "output").iterdir())


def test_a_second_enclave_run_checks_the_attestation_without_loading_x509(enclave, tmp_path):
    """The first run verifies the chain in full and remembers it; the next skips only that part (a wrong PCR0
    is still refused, on the remembered chain)."""
    push_app(enclave)  # this process's client remembered the chain too: start without it
    shutil.rmtree(Path(os.environ["ENCLAVE_HOME"]) / "verified-chains")
    args = ["-a", "-m /model/model.h5 -d /dataset -o /output", "--expect-pcr0", enclave["pcr0"], "--clear-output"]
    first, report = run_cli(enclave, tmp_path, *args)
    assert report.get("rc") == 0 and report["x509"], first.stderr
    second, report = run_cli(enclave, tmp_path, *args)
    assert report.get("rc") == 0 and "done" in second.stderr, second.stderr
    assert not report["x509"], "`enclave run` loaded X.509 for a chain it verified in the previous run"
    refused, report = run_cli(enclave, tmp_path, "--expect-pcr0", "ab" * 48)
    assert report["rc"] == 1 and "failed attestation, nothing was sent" in refused.stderr
    assert not report["x509"]


def test_enclave_run_imports_no_other_command_and_with_an_endpoint_no_runtime(enclave, tmp_path):
    """`enclave run` builds its own parser alone, and an explicit --endpoint needs no discovery."""
    push_app(enclave)
    args = ["-a", "-m /model/model.h5 -d /dataset -o /output", "--expect-pcr0", enclave["pcr0"], "--clear-output"]
    result, report = run_cli(enclave, tmp_path, *args, "--endpoint", enclave["endpoint"])
    assert report.get("rc") == 0, result.stderr
    assert report["cli"] == ["options"] and not report["runtime"], report
