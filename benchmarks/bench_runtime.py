"""Local runtime latency: enclave start and job start, each beside its limit in the same run.

    python benchmarks/bench_runtime.py [--runs 10] [--json] [--profile]

Needs root (the local runtime's namespaces). Works in a temporary ENCLAVE_HOME with its own
local cloud, removed at the end. Medians of --runs; the three job-start figures are taken
interleaved, run by run:

    python -c pass        the interpreter starting and exiting: the floor under every process
    run-enclave           `enclave local run-enclave` (a new process, as a user runs it) until the
                          enclave server answers its first request
    job start             EnclaveClient(endpoint, expect_pcr0).run of a hello-world package in this
                          (warm) process until its first line arrives: connect, attestation verified by
                          the client, job request, attestation by the enclave, local KMS Decrypt through
                          the forwarder and vsock-proxy, package opened, script started
    enclave run           the same through the `enclave run` command as a user runs it (the venv's
                          console script, a new process, credentials in the environment), from process
                          start to the script's first line; the enclave's attestation chain is in the
                          user's verified-chain cache (every run after the first with the same NSM leaf,
                          which AWS renews every few hours)
    enclave run, cold     the same with that cache emptied first: the chain verified in full (X.509 loaded)

Target (issue 13): `enclave run` at most 2x the in-process job start, and under 150 ms. The first
job of a fresh enclave server is shown apart (it imports boto3). The checkout's modules are compiled
to bytecode first, as an installed copy has them (pip compiles on install; with
PYTHONDONTWRITEBYTECODE set, every command would compile the project's modules again).
--profile breaks a job down, every part measured in this run: the CLI's interpreter start and
imports (fresh processes, wall and CPU time) beside the floor of any Python client that checks
attestation documents with cryptography (its imports alone), and a warm client's connect,
attestation, the server's work from the job request until it spawns the script (its summary's
start time; host and local enclave share one clock), and the script's interpreter start to its
first line. --agent measures a design that is not built (issue 13, option 4): a warm agent process
holding an attested connection, asked by a thin client (`python -S`, socket and json only) over a unix
socket; from the thin client's start to the script's first line, interleaved with the rest.
"""

import argparse
import compileall
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from functools import partial
from pathlib import Path

import checkout

checkout.use()  # the imports below come from this tree

import boto3  # noqa: E402

from ansible_collections.confidential_ml.nitro.enclave_local import cloud  # noqa: E402
from ansible_collections.confidential_ml.nitro.enclave_local.kms import load_credentials  # noqa: E402
from ansible_collections.confidential_ml.nitro.enclave_local.runtime import LocalRuntime  # noqa: E402
from ansible_collections.confidential_ml.nitro.plugins.module_utils import package_seal  # noqa: E402
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient  # noqa: E402
from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import render_policy  # noqa: E402

# The console script a user runs (it imports this checkout: checkout.use() put it first on PYTHONPATH).
CONSOLE_SCRIPT = Path(sys.executable).parent / "enclave"
ENCLAVE_CLI = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main"]
USER_CLI = [sys.executable, str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.is_file() else ENCLAVE_CLI
# What any Python client that checks attestation documents with cryptography imports: the CLI's floor. With
# the chain remembered it checks the document's ES384 signature alone (ec, and the OpenSSL backend that
# ec.ECDSA() loads); verifying the chain adds X.509.
CLIENT_FLOOR = (
    "import argparse, json, socket, cbor2; from cryptography.hazmat.primitives.asymmetric import ec; "
    "from cryptography.hazmat.backends.openssl.backend import backend"
)
CLIENT_FLOOR_X509 = CLIENT_FLOOR + "; from cryptography import x509; from cryptography.x509 import verification"
# What `enclave run` imports before it connects: its parser, the client library and the endpoint's resolver.
CLI_IMPORTS = (
    "import ansible_collections.confidential_ml.nitro.cli.main as m; m._parser(['run']); "
    "import ansible_collections.confidential_ml.nitro.plugins.module_utils.client, "
    "ansible_collections.confidential_ml.nitro.plugins.module_utils.runtime, "
    "ansible_collections.confidential_ml.nitro.cli.local"
)
ACCOUNT = "111122223333"


def issued(principal: str) -> dict:
    """boto3 credentials the local KMS issued to principal (in $ENCLAVE_HOME/kms/credentials)."""
    entry = load_credentials(Path(os.environ["ENCLAVE_HOME"]) / "kms" / "credentials")[principal]
    return {"aws_access_key_id": entry["aws_access_key_id"], "aws_secret_access_key": entry["aws_secret_access_key"]}


def user_kms() -> dict:
    """The kms argument of job.run: the enclave host's region and credentials."""
    return {"region": "us-east-1", **issued("enclave-host")}


TARGET_JOB_START_MS = 150  # `enclave run` to the first line
TARGET_CLI_OVER_IN_PROCESS = 2.0  # `enclave run` over the in-process job start


def compile_checkout() -> None:
    """Bytecode for the checkout's modules, as an installed copy has (pip compiles them on install)."""
    for folder in ("cli", "plugins", "enclave_server", "enclave_local"):
        compileall.compile_dir(checkout.ROOT / folder, quiet=1)


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


def cli_env(tmp: Path, *, profile: bool = False) -> dict:
    """The environment of `enclave run`: the user's credentials in AWS_* variables and no shared AWS files, or
    (profile) in a shared credentials file named by AWS_PROFILE, which only boto3's credential chain reads."""
    user = issued("enclave-host")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(tmp / "no-aws-config"))
    if not profile:
        env.update(AWS_ACCESS_KEY_ID=user["aws_access_key_id"], AWS_SECRET_ACCESS_KEY=user["aws_secret_access_key"])
        return dict(env, AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"))
    credentials = tmp / "aws-credentials"
    credentials.write_text(f"[user]\naws_access_key_id = {user['aws_access_key_id']}\n"
                           f"aws_secret_access_key = {user['aws_secret_access_key']}\n")  # fmt: skip
    return dict(env, AWS_PROFILE="user", AWS_SHARED_CREDENTIALS_FILE=str(credentials))


def first_line(command: list[str], env: dict, what: str) -> float:
    """Seconds from starting command to the hello-world script's first line; exits if it fails."""
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, env=env) as proc:
        first = proc.stdout.readline()
        elapsed = time.perf_counter() - start
        proc.stdout.read()
    if proc.returncode != 0 or first != b"hello\n":
        raise SystemExit(f"{what} failed")
    return elapsed


def cli_job_start(endpoint: str, pcr0: str, env: dict) -> float:
    command = [*USER_CLI, "run", "-f", "hello.pkg", "-s", "hello.py", "--endpoint", endpoint, "--expect-pcr0", pcr0]
    return first_line(command, env, "`enclave run` of the hello-world package")


def cold_cli_job_start(endpoint: str, pcr0: str, env: dict) -> float:
    """cli_job_start with the user's verified-chain cache emptied: the first run, or the first after the NSM
    renewed its signing certificate."""
    shutil.rmtree(Path(env["ENCLAVE_HOME"]) / "verified-chains", ignore_errors=True)
    return cli_job_start(endpoint, pcr0, env)


# The thin client of the warm-agent design: what a user's command would be if an agent held the connection.
THIN_CLIENT = """
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
kms = {"region": os.environ["AWS_DEFAULT_REGION"], "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
       "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
s.sendall(json.dumps({"file": sys.argv[2], "script": sys.argv[3], "kms": kms}).encode() + b"\\n")
while data := s.recv(65536):
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
"""


class WarmAgent:
    """Measured, not built: a process that attested the enclave once and keeps the connection, running each
    job a thin client asks for on it and relaying the script's output (the job's own attestation by KMS, key
    release and isolation are unchanged: they happen in the enclave for every job)."""

    def __init__(self, endpoint: str, pcr0: str, path: str):
        self.client = EnclaveClient(endpoint, expect_pcr0=pcr0)
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        os.chmod(path, 0o600)
        self.listener.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _addr = self.listener.accept()
            with conn:
                request = json.loads(conn.makefile("rb").readline())
                self.client.run(request["file"], request["script"], kms=request["kms"],
                                on_output=lambda _name, data, conn=conn: conn.sendall(data))  # fmt: skip


def agent_job_start(agent: WarmAgent, env: dict) -> float:
    """The thin client's start to the script's first line."""
    command = [sys.executable, "-S", "-c", THIN_CLIENT, agent.path, "hello.pkg", "hello.py"]
    return first_line(command, env, "the warm agent's hello-world job")


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def process_start_args(args: list) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True)
    return time.perf_counter() - start


def process_start(code: str, cpu: list | None = None) -> float:
    """Wall time of `python -c code`; its CPU time (user + system, which load on a shared machine inflates
    far less) is appended to cpu."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"python -c {code!r} failed")
    if cpu is not None:
        cpu.append(usage.ru_utime + usage.ru_stime)
    return elapsed


def profile_job(endpoint: str, pcr0: str) -> dict:
    """One warm job in parts: connect, attest, the server's work until it spawns the script (the summary's
    start, on the clock host and local enclave share), then the script's interpreter until its first line."""
    marks = {}
    kms = user_kms()
    start = time.perf_counter()
    with EnclaveClient(endpoint) as client:
        marks["connect + handshake"] = time.perf_counter() - start
        client.attest(expect_pcr0=pcr0)
        marks["attestation (enclave NSM + client verify)"] = time.perf_counter() - start
        first = []
        offset = time.time() - time.perf_counter()  # the summary's times are wall-clock
        summary = client.run("hello.pkg", "hello.py", kms=kms,
                             on_output=lambda n, d: first or first.append(time.perf_counter()))  # fmt: skip
        marks["server: checks, NSM, KMS key release, package open"] = summary["start"] - offset - start
        marks["script: interpreter start to first line"] = first[0] - start
    previous, out = 0.0, {}
    for name, at in marks.items():
        out[name] = (at - previous) * 1000
        previous = at
    return out


def interleaved(runs: int, measures: dict) -> dict:
    """{name: median ms} of each measure, taken in turn run by run, so that load on a shared machine falls on
    all of them alike."""
    samples = {name: [] for name in measures}
    for _run in range(runs):
        for name, measure in measures.items():
            samples[name].append(measure())
    return {name: median_ms(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="break one warm job down")
    parser.add_argument("--agent", action="store_true", help="measure a warm agent's job start (a design not built)")
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
            package_seal.seal(app, published / "hello.pkg", kms_client=owner, key_id=key_id, name="hello", version="1")

            # Settings and the targets: not measured, and kept apart from the figures (run_all.py).
            results = {
                "options": {"runs": args.runs, "enclave_cpus": 1, "cli": " ".join(USER_CLI[1:]) + " run",
                            "cli_credentials": "environment (and a profile: boto3's chain)",
                            "bytecode": "compiled before measuring"},
                "given": {"target_enclave_run_ms": TARGET_JOB_START_MS,
                          "target_enclave_run_over_job_start": TARGET_CLI_OVER_IN_PROCESS},
            }  # fmt: skip
            compile_checkout()
            results["python_pass_ms"] = median_ms([python_pass() for _run in range(args.runs)])
            results["run_enclave_ms"] = median_ms([run_enclave(built.image) for _run in range(args.runs)])

            info = LocalRuntime().run(built.image, cpu_count=1, memory_mib=256)
            with EnclaveClient(info.endpoint, expect_pcr0=pcr0) as client:
                client.push(published, "/encrypted")
            results["first_job_start_ms"] = job_start(info.endpoint, pcr0) * 1000
            env, profile_env = cli_env(Path(tmp)), cli_env(Path(tmp), profile=True)
            measures = {}
            if args.agent:
                agent = WarmAgent(info.endpoint, pcr0, str(Path(tmp) / "agent.sock"))
                measures["warm_agent_thin_client_ms"] = lambda: agent_job_start(agent, env)
                measures["thin_client_start_ms"] = partial(process_start_args, ["-S", "-c", "import json, socket"])
            figures = interleaved(args.runs, measures | {
                "job_start_ms": lambda: job_start(info.endpoint, pcr0),
                "enclave_run_cli_ms": lambda: cli_job_start(info.endpoint, pcr0, env),
                "enclave_run_cli_cold_cache_ms": lambda: cold_cli_job_start(info.endpoint, pcr0, env),
                "enclave_run_cli_with_profile_ms": lambda: cli_job_start(info.endpoint, pcr0, profile_env),
            })  # fmt: skip
            results.update(figures)
            if args.profile:
                parts = [profile_job(info.endpoint, pcr0) for _run in range(args.runs)]
                results["job_breakdown_ms"] = {name: statistics.median(p[name] for p in parts) for name in parts[0]}
                starts = {
                    "interpreter start (python -c pass)": "pass",
                    "interpreter and the floor (argparse, cbor2, ES384 check)": CLIENT_FLOOR,
                    "interpreter and the floor with X.509 (chain verified)": CLIENT_FLOOR_X509,
                    "interpreter, `run`'s parser, client library, resolver": CLI_IMPORTS,
                }
                cpu = {name: [] for name in starts}
                results["cli_breakdown_ms"] = interleaved(
                    args.runs, {name: partial(process_start, code, cpu[name]) for name, code in starts.items()}
                )
                results["cli_breakdown_cpu_ms"] = {name: median_ms(samples) for name, samples in cpu.items()}
        finally:
            with contextlib.suppress(Exception):
                cloud.down(home=home)

    base = results["python_pass_ms"]
    for key in ("run_enclave_ms", "first_job_start_ms", "job_start_ms", "enclave_run_cli_ms"):
        results[key.replace("_ms", "_ratio")] = round(results[key] / base, 2)
    # The targets: `enclave run` over the in-process job start (limit 2), and `enclave run` in ms (limit 150).
    results["enclave_run_over_job_start_ratio"] = round(results["enclave_run_cli_ms"] / results["job_start_ms"], 2)
    # The same ratio for the first run (the chain verified in full) and for the warm agent (--agent, not built).
    results["enclave_run_cold_cache_over_job_start_ratio"] = round(
        results["enclave_run_cli_cold_cache_ms"] / results["job_start_ms"], 2
    )
    if "warm_agent_thin_client_ms" in results:
        results["warm_agent_over_job_start_ratio"] = round(
            results["warm_agent_thin_client_ms"] / results["job_start_ms"], 2
        )
    results["enclave_run_within_targets"] = (
        results["enclave_run_over_job_start_ratio"] <= TARGET_CLI_OVER_IN_PROCESS
        and results["enclave_run_cli_ms"] <= TARGET_JOB_START_MS
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"median of {args.runs} (job starts interleaved)      ms    x python -c pass")
    print(f"python -c pass                       {base:8.1f}")
    for label, key in (
        ("run-enclave to first served request", "run_enclave"),
        ("first job of a fresh server", "first_job_start"),
        ("job start (client, warm)", "job_start"),
        ("`enclave run` to first line (CLI)", "enclave_run_cli"),
    ):
        print(f"{label:36} {results[key + '_ms']:8.1f}  {results[key + '_ratio']:6.2f}")
    cold, cold_ratio = results["enclave_run_cli_cold_cache_ms"], results["enclave_run_cold_cache_over_job_start_ratio"]
    print(f"`enclave run`, chain cache emptied  {cold:8.1f}  {cold_ratio:6.2f} x job start")
    print(f"`enclave run`, credentials by profile {results['enclave_run_cli_with_profile_ms']:7.1f}")
    if "warm_agent_thin_client_ms" in results:
        agent, thin = results["warm_agent_thin_client_ms"], results["thin_client_start_ms"]
        print(f"warm agent (not built), thin client {agent:8.1f}  {results['warm_agent_over_job_start_ratio']:6.2f}"
              f" x job start  (the thin client's own start {thin:.1f})")  # fmt: skip
    ratio, cli_ms = results["enclave_run_over_job_start_ratio"], results["enclave_run_cli_ms"]
    print(f"target: `enclave run` / job start   {ratio:8.2f}  (limit {TARGET_CLI_OVER_IN_PROCESS:.2f})"
          f"  {'within' if ratio <= TARGET_CLI_OVER_IN_PROCESS else 'MISSES'}")  # fmt: skip
    print(f"target: `enclave run`               {cli_ms:8.1f}  (limit {TARGET_JOB_START_MS} ms)"
          f"  {'within' if cli_ms <= TARGET_JOB_START_MS else 'MISSES'}")  # fmt: skip
    for title, key in (("a warm job, in parts", "job_breakdown_ms"), ("the CLI's start", "cli_breakdown_ms"),
                       ("the CLI's start, CPU time", "cli_breakdown_cpu_ms")):  # fmt: skip
        if key in results:
            print(f"{title} (medians, ms):")
            for name, ms in results[key].items():
                print(f"  {name:56} {ms:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
