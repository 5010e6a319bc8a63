"""Local runtime latency: enclave start and job start, side by side with `python -c pass`.

    python benchmarks/bench_runtime.py [--runs 10] [--json] [--profile]

Needs root (the local runtime's namespaces). Works in a temporary ENCLAVE_HOME with its own
local cloud, removed at the end. Medians of --runs:

    python -c pass        the interpreter starting and exiting: the floor under every figure
    run-enclave           `enclave local run-enclave` (a new process, as a user runs it) until the
                          enclave server answers its first request
    job start             EnclaveClient(endpoint, expect_pcr0).run of a hello-world package until its
                          first line arrives: connect, attestation verified by the client, job
                          request, attestation by the enclave, local KMS Decrypt through the
                          forwarder and vsock-proxy, package opened, script started
    enclave run           the same through the `enclave run` command (a new process), until the first line

The first job of a fresh enclave server is shown apart (it imports boto3). Target: job start <= 150 ms.
--profile prints where the enclave server's time goes in one job (py-spy is not needed: the
server's log timestamps and a client-side breakdown).
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import checkout

checkout.use()  # the imports below come from this tree

import boto3  # noqa: E402

from ansible_collections.confidential_ml.nitro.enclave_local import cloud  # noqa: E402
from ansible_collections.confidential_ml.nitro.enclave_local.kms import load_credentials  # noqa: E402
from ansible_collections.confidential_ml.nitro.enclave_local.runtime import LocalRuntime  # noqa: E402
from ansible_collections.confidential_ml.nitro.plugins.module_utils import package  # noqa: E402
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient  # noqa: E402
from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import render_policy  # noqa: E402

ENCLAVE_CLI = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main"]
ACCOUNT = "111122223333"


def issued(principal: str) -> dict:
    """boto3 credentials the local KMS issued to principal (in $ENCLAVE_HOME/kms/credentials)."""
    entry = load_credentials(Path(os.environ["ENCLAVE_HOME"]) / "kms" / "credentials")[principal]
    return {"aws_access_key_id": entry["aws_access_key_id"], "aws_secret_access_key": entry["aws_secret_access_key"]}


def user_kms() -> dict:
    """The kms argument of job.run: the enclave host's region and credentials."""
    return {"region": "us-east-1", **issued("enclave-host")}


TARGET_JOB_START_MS = 150


def python_pass() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def run_enclave(image: str) -> float:
    """`enclave local run-enclave` until the first served request; the enclave is terminated afterwards."""
    start = time.perf_counter()
    out = subprocess.run(
        [*ENCLAVE_CLI, "local", "run-enclave", "--eif-path", image, "--cpu-count", "1", "--memory", "128"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info = json.loads(out)
    with EnclaveClient(info["Endpoint"]) as client:
        client.call("health")
    elapsed = time.perf_counter() - start
    LocalRuntime().terminate(info["EnclaveID"])
    return elapsed


def job_start(endpoint: str, pcr0: str) -> float:
    kms = user_kms()  # read before the clock starts
    start = time.perf_counter()
    first = []

    def on_output(name, data):
        if not first:
            first.append(time.perf_counter())

    with EnclaveClient(endpoint, expect_pcr0=pcr0) as client:
        summary = client.run("hello.pkg", "hello.py", kms=kms, on_output=on_output)
    if summary["rc"] != 0 or not first:
        raise SystemExit(f"the hello-world job failed: {summary}")
    return first[0] - start


def cli_job_start(endpoint: str, pcr0: str) -> float:
    user = issued("enclave-host")
    env = dict(os.environ, AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID=user["aws_access_key_id"],
               AWS_SECRET_ACCESS_KEY=user["aws_secret_access_key"])  # fmt: skip
    command = [*ENCLAVE_CLI, "run", "-f", "hello.pkg", "-s", "hello.py", "--endpoint", endpoint, "--expect-pcr0", pcr0]
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, env=env) as proc:
        proc.stdout.readline()
        elapsed = time.perf_counter() - start
        proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit("`enclave run` of the hello-world package failed")
    return elapsed


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def profile_job(endpoint: str, pcr0: str) -> dict:
    """Client-side breakdown of one warm job: connect, attest, then the job until its first line."""
    marks = {}
    kms = user_kms()
    start = time.perf_counter()
    with EnclaveClient(endpoint) as client:
        marks["connect + handshake"] = time.perf_counter() - start
        client.attest(expect_pcr0=pcr0)
        marks["attestation (enclave NSM + client verify)"] = time.perf_counter() - start
        first = []
        client.run("hello.pkg", "hello.py", kms=kms,
                   on_output=lambda n, d: first or first.append(time.perf_counter()))  # fmt: skip
        marks["job request to first line"] = first[0] - start
    previous, out = 0.0, {}
    for name, at in marks.items():
        out[name] = round((at - previous) * 1000, 1)
        previous = at
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="break one warm job down")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the local runtime's namespaces need it")

    with tempfile.TemporaryDirectory(prefix="bench-rt-") as tmp:
        home = Path(tmp) / "h"
        os.environ["ENCLAVE_HOME"] = str(home)
        try:
            running = cloud.up(home=home)
            built = LocalRuntime().build(output=str(Path(tmp) / "enclave.eif"))
            pcr0 = built.measurements.pcr0
            owner = boto3.client("kms", endpoint_url=running["kms_endpoint_url"], region_name="us-east-1",
                                 **issued("owner"))  # fmt: skip
            key_id = owner.create_key()["KeyMetadata"]["KeyId"]
            policy = render_policy(account_id=ACCOUNT, user_principals=[cloud.PRINCIPALS["enclave-host"]],
                                   admin_principals=[f"arn:aws:iam::{ACCOUNT}:role/owner"], pcr0=[pcr0])  # fmt: skip
            owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
            app, published = Path(tmp) / "app", Path(tmp) / "published"
            app.mkdir()
            published.mkdir()
            (app / "hello.py").write_text(textwrap.dedent("print('hello', flush=True)\n"))
            package.seal(app, published / "hello.pkg", kms_client=owner, key_id=key_id, name="hello", version="1")

            # Settings and the target: not measured, and kept apart from the figures (run_all.py).
            results = {"options": {"runs": args.runs}, "given": {"target_job_start_ms": TARGET_JOB_START_MS}}
            results["python_pass_ms"] = median_ms([python_pass() for _run in range(args.runs)])
            results["run_enclave_ms"] = median_ms([run_enclave(built.image) for _run in range(args.runs)])

            info = LocalRuntime().run(built.image, cpu_count=1, memory_mib=256)
            with EnclaveClient(info.endpoint, expect_pcr0=pcr0) as client:
                client.push(published, "/encrypted")
            results["first_job_start_ms"] = job_start(info.endpoint, pcr0) * 1000
            results["job_start_ms"] = median_ms([job_start(info.endpoint, pcr0) for _run in range(args.runs)])
            results["enclave_run_cli_ms"] = median_ms([cli_job_start(info.endpoint, pcr0) for _run in range(args.runs)])
            if args.profile:
                results["job_breakdown_ms"] = profile_job(info.endpoint, pcr0)
        finally:
            with contextlib.suppress(Exception):
                cloud.down(home=home)

    base = results["python_pass_ms"]
    for key in ("run_enclave_ms", "first_job_start_ms", "job_start_ms", "enclave_run_cli_ms"):
        results[key.replace("_ms", "_ratio")] = round(results[key] / base, 2)
    results["job_start_within_target"] = results["job_start_ms"] <= TARGET_JOB_START_MS
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"median of {args.runs}                          ms    x python -c pass")
    print(f"python -c pass                       {base:8.1f}")
    for label, key in (
        ("run-enclave to first served request", "run_enclave"),
        ("first job of a fresh server", "first_job_start"),
        ("job start (client, warm)", "job_start"),
        ("`enclave run` to first line (CLI)", "enclave_run_cli"),
    ):
        print(f"{label:36} {results[key + '_ms']:8.1f}  {results[key + '_ratio']:6.2f}")
    verdict = "within" if results["job_start_within_target"] else "MISSES"
    print(f"job start {verdict} the target of {TARGET_JOB_START_MS} ms")
    for name, ms in results.get("job_breakdown_ms", {}).items():
        print(f"  {name:44} {ms:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
