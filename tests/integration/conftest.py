"""A real enclave server for integration tests, without namespaces: the local KMS
(HTTP, boto3), the simulated NSM served on a socket as the local runtime serves it,
and the enclave server as a subprocess on a unix socket. An owner key whose policy
allows LOCAL_PCR0 only, and a sealed app package (APP) ready to push.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import boto3
import pytest

from ansible_collections.confidential_ml.nitro.enclave_local.kms import LocalKms, LocalKmsServer
from ansible_collections.confidential_ml.nitro.enclave_local.nsm_service import NsmService
from ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim import LocalCA, SimulatedNsm
from ansible_collections.confidential_ml.nitro.plugins.module_utils import package
from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import render_policy

ACCOUNT = "111122223333"
LOCAL_PCR0 = hashlib.sha384(b"enclave image under test").digest()

APP = {
    "ml_algorithm.py": """
        import argparse, os, sys
        from model import predict
        p = argparse.ArgumentParser()
        p.add_argument("-m"); p.add_argument("-d"); p.add_argument("-o")
        a = p.parse_args()
        weights = open(a.m).read().strip()
        with open(os.path.join(a.o, "results.csv"), "w") as out:
            for name in sorted(os.listdir(a.d)):
                label = predict(open(os.path.join(a.d, name)).read(), weights)
                out.write(f"{name},{label}\\n")
                print("classified", name, label, flush=True)
        print("done", file=sys.stderr)
    """,
    "model.py": "def predict(text, weights):\n    return 'long' if len(text) > int(weights) else 'short'\n",
    "model.h5": "5\n",
    "spin.py": "import time\nprint('spinning', flush=True)\nwhile True: time.sleep(0.05)\n",
}


BIN = Path(sys.executable).parent
# The job identity of the test servers (root only): no other process here runs as it, since each job's end
# kills all of its processes. The venv's interpreter is under /root (0700), so jobs run the system's.
JOB_UID = 40000 + os.getpid() % 20000 if os.geteuid() == 0 else None
JOB_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
CALLBACK_PLUGINS = Path(__file__).resolve().parent / "callback_plugins"
ENCLAVE = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main"]


def cli(*args, check=True):
    """The `enclave` command as a user runs it; with check, it must succeed."""
    result = subprocess.run([*ENCLAVE, *args], capture_output=True, text=True, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def owner_key(owner, pcr0: bytes = LOCAL_PCR0) -> str:
    """A package key of the owner's whose policy releases it to pcr0 only (render_policy)."""
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    policy = render_policy(
        account_id=ACCOUNT,
        user_principals=[f"arn:aws:iam::{ACCOUNT}:role/enclave-host"],
        admin_principals=[f"arn:aws:iam::{ACCOUNT}:role/owner"],
        pcr0=[pcr0.hex()],
    )
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    return key_id


def processes_mentioning(text: str) -> dict[int, str]:
    """Processes (but this one) whose command line holds text: what a test left running."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found[int(entry.name)] = cmdline
    return found


@pytest.fixture
def ansible_playbook(tmp_path):
    """Runs a test's own playbook on localhost; returns (stats, tasks by name, stdout) for a run that failed nothing.

    callback_plugins/record_results.py records each task's result as JSON; Ansible's temporary and async
    directories stay under tmp_path. The environment is read at each call, after other fixtures set theirs:
    ansible_playbook(playbook, extra_vars, *args, env={...}).
    """
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    results = tmp_path / "results.json"

    def run(playbook: Path, extra_vars: dict, *args: str, env: dict | None = None):
        # A profile given in env must not lose to the session's own environment credentials.
        profiled = env is not None and "AWS_PROFILE" in env
        environment = dict(
            {k: v for k, v in os.environ.items() if not (profiled and k in _ENV_CREDENTIALS)},
            ANSIBLE_CALLBACK_PLUGINS=str(CALLBACK_PLUGINS),
            ANSIBLE_CALLBACKS_ENABLED="record_results",
            TEST_RESULTS_FILE=str(results),
            ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-local"),
            ANSIBLE_REMOTE_TMP=str(tmp_path / "ansible-remote"),
            ANSIBLE_ASYNC_DIR=str(tmp_path / "ansible-async"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_RETRY_FILES_ENABLED="0",
            **(env or {}),
        )
        command = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook), "-e", json.dumps(extra_vars)]
        results.unlink(missing_ok=True)
        done = subprocess.run(
            [*command, *args], env=environment, capture_output=True, text=True, timeout=300, check=False
        )
        output = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert done.returncode == 0, output
        assert re.search(r"^localhost +: ok=\d+ +changed=\d+ +unreachable=0 +failed=0 ", done.stdout, re.M), output
        recorded = json.loads(results.read_text())
        stats = recorded["stats"]["localhost"]
        # The recap printed by the default callback says the same as the recorded one.
        assert re.search(rf"^localhost +: ok={stats['ok']} +changed={stats['changed']} ", done.stdout, re.M), output
        return stats, recorded["tasks"], done.stdout

    return run


_ENV_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture
def local_cloud():
    """(work, env) for running the project's playbooks and CLI against local enclaves of their own.

    work is a fresh directory (its ENCLAVE_HOME's enclaves and their sockets live in the home's own short
    runtime directory, settings.runtime_dir); env names it, puts this venv's tools first on PATH, sets a
    region and points AWS_SHARED_CREDENTIALS_FILE at the credentials the local KMS issues on `enclave local
    up` (each test chooses its principal with AWS_PROFILE). Afterwards whatever was started there is
    stopped and the directory removed.
    """
    work = Path(tempfile.mkdtemp(prefix="cloud-", dir="/tmp"))
    env = {
        **{k: v for k, v in os.environ.items() if k not in _ENV_CREDENTIALS},  # they would win over AWS_PROFILE
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ENCLAVE_HOME": str(work / "home"),
        "AWS_SHARED_CREDENTIALS_FILE": str(work / "home" / "kms" / "credentials"),
        "AWS_CONFIG_FILE": str(work / "no-aws-config"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    env.pop("ENCLAVE_ENDPOINT", None)  # each play finds its own enclave
    yield work, env
    subprocess.run([str(BIN / "enclave"), "local", "down", "--json"], env=env, capture_output=True, timeout=120,
                   check=False)  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


def wait_for_socket(path: Path, proc: subprocess.Popen) -> None:
    for _attempt in range(500):
        if path.exists():
            return
        assert proc.poll() is None, "the enclave server exited during start-up"
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


@pytest.fixture
def enclave(tmp_path, monkeypatch):
    """A served enclave (dict: tmp, sock, endpoint, pcr0, sealed, server, work, share, kms_url, kms, key_id, nsm).

    ENCLAVE_ENDPOINT points at it and the AWS variables hold the user's credentials (enclave-host's)."""
    home = tmp_path / "home"
    monkeypatch.setenv("ENCLAVE_HOME", str(home))
    ca = LocalCA.load_or_create(home)
    kms_server = LocalKmsServer(LocalKms(tmp_path / "kms", trusted_roots=[ca.root_certificate])).start()
    owner = boto3.client("kms", endpoint_url=kms_server.endpoint_url, region_name="us-east-1",
                         **kms_server.kms.credentials("owner"))  # fmt: skip
    key_id = owner_key(owner)
    app = tmp_path / "app"
    app.mkdir()
    for name, body in APP.items():
        (app / name).write_text(textwrap.dedent(body))
    sealed = tmp_path / "published" / "app.pkg"
    sealed.parent.mkdir()
    package.seal(app, sealed, kms_client=owner, key_id=key_id, name="app", version="1.0")

    # The enclave's parts are where the job uid can reach them by path, as in an enclave (so that only their
    # own modes keep a job out): not under pytest's base directory, which each pytest session resets to 0700.
    # tmp_path links to the share and the work directory.
    inside = Path(tempfile.mkdtemp(prefix="enclave-", dir="/tmp"))
    inside.chmod(0o711)
    for name in ("share", "work"):
        (inside / name).mkdir()
        (tmp_path / name).symlink_to(inside / name)
    nsm = NsmService(SimulatedNsm(ca, {0: LOCAL_PCR0, 1: bytes(48), 2: bytes(48)}), inside / "nsm.sock").start()
    sock = inside / "vsock" / "16_5000.sock"
    sock.parent.mkdir()
    job = ["--job-uid", str(JOB_UID), "--job-python", JOB_PYTHON] if JOB_UID is not None else []
    server = subprocess.Popen(
        [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.enclave_server",
         "--listen", f"unix://{sock}", "--share", str(inside / "share"), "--work", str(inside / "work"),
         "--nsm", f"unix://{inside / 'nsm.sock'}", "--kms-endpoint-url", kms_server.endpoint_url, *job],
    )  # fmt: skip
    wait_for_socket(sock, server)
    monkeypatch.setenv("ENCLAVE_ENDPOINT", f"unix://{sock}")
    user = kms_server.kms.credentials("enclave-host")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", user["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", user["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield {
        "tmp": tmp_path,
        "sock": sock,
        "endpoint": f"unix://{sock}",
        "pcr0": LOCAL_PCR0.hex(),
        "sealed": sealed,
        "server": server,
        "work": inside / "work",
        "share": inside / "share",
        "kms_url": kms_server.endpoint_url,
        "kms": kms_server.kms,
        "key_id": key_id,
        "nsm": inside / "nsm.sock",
    }
    if server.poll() is None:
        server.terminate()
        server.wait(timeout=10)
    nsm.stop()
    kms_server.stop()
    shutil.rmtree(inside, ignore_errors=True)
