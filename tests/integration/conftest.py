"""A real enclave server for integration tests, without namespaces: the local KMS
(HTTP, boto3), the simulated NSM served on a socket as the local runtime serves it,
and the enclave server as a subprocess on a unix socket. An owner key whose policy
allows LOCAL_PCR0 only, and a sealed app package (APP) ready to push.
"""

import hashlib
import json
import subprocess
import sys
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


def wait_for_socket(path: Path, proc: subprocess.Popen) -> None:
    for _attempt in range(500):
        if path.exists():
            return
        assert proc.poll() is None, "the enclave server exited during start-up"
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


@pytest.fixture
def enclave(tmp_path, monkeypatch):
    """A served enclave (dict: tmp, sock, endpoint, pcr0, sealed, server, work, share, kms_url).

    ENCLAVE_ENDPOINT points at it and the AWS variables name the user's principal."""
    home = tmp_path / "home"
    monkeypatch.setenv("ENCLAVE_HOME", str(home))
    ca = LocalCA.load_or_create(home)
    kms_server = LocalKmsServer(LocalKms(tmp_path / "kms", trusted_roots=[ca.root_certificate])).start()
    owner = boto3.client("kms", endpoint_url=kms_server.endpoint_url, region_name="us-east-1",
                         aws_access_key_id="owner", aws_secret_access_key="x")  # fmt: skip
    key_id = owner.create_key()["KeyMetadata"]["KeyId"]
    policy = render_policy(
        account_id=ACCOUNT,
        user_principals=[f"arn:aws:iam::{ACCOUNT}:role/enclave-host"],
        admin_principals=[f"arn:aws:iam::{ACCOUNT}:role/owner"],
        pcr0=[LOCAL_PCR0.hex()],
    )
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    app = tmp_path / "app"
    app.mkdir()
    for name, body in APP.items():
        (app / name).write_text(textwrap.dedent(body))
    sealed = tmp_path / "published" / "app.pkg"
    sealed.parent.mkdir()
    package.seal(app, sealed, kms_client=owner, key_id=key_id, name="app", version="1.0")

    nsm = NsmService(SimulatedNsm(ca, {0: LOCAL_PCR0, 1: bytes(48), 2: bytes(48)}), tmp_path / "nsm.sock").start()
    sock = tmp_path / "vsock" / "16_5000.sock"
    sock.parent.mkdir()
    (tmp_path / "work").mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.enclave_server",
         "--listen", f"unix://{sock}", "--share", str(tmp_path / "share"), "--work", str(tmp_path / "work"),
         "--nsm", f"unix://{tmp_path / 'nsm.sock'}", "--kms-endpoint-url", kms_server.endpoint_url],
    )  # fmt: skip
    wait_for_socket(sock, server)
    monkeypatch.setenv("ENCLAVE_ENDPOINT", f"unix://{sock}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "enclave-host")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield {
        "tmp": tmp_path,
        "sock": sock,
        "endpoint": f"unix://{sock}",
        "pcr0": LOCAL_PCR0.hex(),
        "sealed": sealed,
        "server": server,
        "work": tmp_path / "work",
        "share": tmp_path / "share",
        "kms_url": kms_server.endpoint_url,
    }
    if server.poll() is None:
        server.terminate()
        server.wait(timeout=10)
    nsm.stop()
    kms_server.stop()
