"""The enclave_host role on the nitro backend, on this machine: the strict fake nitro-cli and allocator
(tests/fixtures/fake-nitro-cli) first on PATH, /etc/nitro_enclaves under a scratch root, a real
IMDSv2 server on loopback (a session token required, as on EC2) and moto's IAM on loopback.

The vsock-proxy service proxies kms.<the instance's region from IMDS>.amazonaws.com and exits if its
allowlist lacks it, so the role must allow-list exactly the region instance metadata names.
"""

import json
import re
import secrets
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fixtures" / "fake-nitro-cli"


class Imds(ThreadingHTTPServer):
    """IMDSv2: PUT /latest/api/token gives a token; the identity document needs it."""

    def __init__(self, region: str):
        super().__init__(("127.0.0.1", 0), ImdsHandler)
        self.region, self.token, self.requests = region, secrets.token_hex(16), []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ImdsHandler(BaseHTTPRequestHandler):
    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):  # noqa: N802
        self.server.requests.append(("PUT", self.path))
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._answer(200, self.server.token.encode())
        else:
            self._answer(400, b"")

    def do_GET(self):  # noqa: N802
        self.server.requests.append(("GET", self.path))
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            self._answer(401, b"")  # IMDSv2 only, as the project recommends for parent instances
        elif self.path == "/latest/dynamic/instance-identity/document":
            document = {"region": self.server.region, "instanceId": "i-0123456789abcdef0", "accountId": "444455556666"}
            self._answer(200, json.dumps(document).encode(), "application/json")
        else:
            self._answer(404, b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def imds():
    server = Imds("ap-southeast-2")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def host(tmp_path):
    """(play, env) for the role on a scratch Nitro parent: the fake nitro-cli and allocator on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("nitro-cli", "nitro-enclaves-allocator"):
        (bin_dir / name).symlink_to(FAKE)
    (tmp_path / "nitro-state").mkdir()
    image = tmp_path / "enclave.eif"
    image.write_bytes(b"FAKE-EIF\0" + b"\0" * 4096)
    env = {
        "PATH": f"{bin_dir}:{BIN}:/usr/bin:/bin",
        "FAKE_NITRO_CLI_STATE": str(tmp_path / "nitro-state"),
        "ENCLAVE_HOME": str(tmp_path / "home"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    role_vars = {
        "enclave_host_backend": "nitro",
        "enclave_host_image": str(image),
        "enclave_host_config_root": str(tmp_path / "root"),
        "enclave_host_manage_services": False,
        "enclave_host_wait_for_health": False,
        "enclave_host_memory_mib": 128,
    }
    playbook = tmp_path / "host.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Nitro parent",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "roles": [{"role": "confidential_ml.nitro.enclave_host"}],
                }
            ]  # fmt: skip
        )
    )
    return playbook, role_vars, env


def play(ansible_playbook, host, **overrides):
    playbook, role_vars, env = host
    return ansible_playbook(playbook, {**role_vars, **overrides}, env=env)


def play_failing(tmp_path, host, **overrides) -> str:
    """Run the play expecting it to fail; its output."""
    playbook, role_vars, env = host
    inventory = tmp_path / "fail-inventory.ini"
    inventory.write_text(f"localhost ansible_connection=local ansible_python_interpreter={BIN / 'python'}\n")
    done = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook),
         "-e", json.dumps({**role_vars, **overrides})],
        env={**env, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode != 0, done.stdout
    return done.stdout


def allowlist(role_vars) -> list:
    text = (Path(role_vars["enclave_host_config_root"]) / "etc/nitro_enclaves/vsock-proxy.yaml").read_text()
    return yaml.safe_load(text)["allowlist"]


def test_the_vsock_proxy_allows_the_region_instance_metadata_names(ansible_playbook, host, imds):
    stats, tasks = play(ansible_playbook, host, enclave_host_imds_url=imds.url)[:2]
    assert allowlist(host[1]) == [{"address": "kms.ap-southeast-2.amazonaws.com", "port": 443}]
    assert imds.requests[:2] == [("PUT", "/latest/api/token"), ("GET", "/latest/dynamic/instance-identity/document")]
    assert tasks["Decide the KMS region"]["ansible_facts"]["enclave_host_kms_region"] == "ap-southeast-2"
    again = play(ansible_playbook, host, enclave_host_imds_url=imds.url, enclave_host_region="ap-southeast-2")[0]
    assert again["changed"] == 0, "the same region given explicitly changes nothing"


def test_a_region_other_than_the_instances_is_refused(tmp_path, host, imds):
    output = play_failing(tmp_path, host, enclave_host_imds_url=imds.url, enclave_host_region="us-east-1")
    assert "enclave_host_region is us-east-1 but this instance runs in ap-southeast-2" in output
    assert not (Path(host[1]["enclave_host_config_root"]) / "etc/nitro_enclaves/vsock-proxy.yaml").exists()


def test_without_instance_metadata_the_region_is_required(tmp_path, host, imds, ansible_playbook):
    # A metadata service that gives no session token (no IMDSv2 there) counts as none.
    output = play_failing(tmp_path, host, enclave_host_imds_url=f"{imds.url}/nothing-here")
    assert imds.requests == [("PUT", "/nothing-here/latest/api/token")]
    assert re.search(r"Cannot tell this instance's region.*Set enclave_host_region", output, re.S), output
    play(ansible_playbook, host, enclave_host_imds_url="", enclave_host_region="eu-north-1")
    assert allowlist(host[1]) == [{"address": "kms.eu-north-1.amazonaws.com", "port": 443}]


def test_the_enclave_is_sized_from_the_release_image_it_copied(ansible_playbook, host, tmp_path):
    """With the release copied from the controller, the enclave is sized from the size the image's copy reports (no
    stat on the host): memory at least 4x the image, in allocator.yaml and in nitro-cli's run-enclave call."""
    release = tmp_path / "release"
    (release / "packages").mkdir(parents=True)
    with (release / "enclave.eif").open("wb") as image:
        image.write(b"FAKE-EIF\0")
        image.truncate(40 << 20)  # 40 MiB: 160 MiB of enclave memory, above enclave_host_memory_mib (128)
    (release / "packages" / "app.pkg").write_bytes(b"sealed")
    manifest = {"image": {"file": "enclave.eif"}, "packages": [{"file": "packages/app.pkg"}]}
    (release / "release.json").write_text(json.dumps(manifest))
    tasks = play(
        ansible_playbook,
        host,
        enclave_host_image="",
        enclave_host_release_src=str(release),
        enclave_host_dir=str(tmp_path / "host"),
        enclave_host_imds_url="",
        enclave_host_region="eu-north-1",
    )[1]
    sized = tasks["Size the enclave from the image (memory at least 4x the image)"]
    assert sized.get("skip_reason") == "Conditional result was False", sized  # no stat on the host
    allocator = Path(host[1]["enclave_host_config_root"]) / "etc/nitro_enclaves/allocator.yaml"
    assert yaml.safe_load(allocator.read_text())["memory_mib"] == 160
    calls = (Path(host[2]["FAKE_NITRO_CLI_STATE"]) / "calls.jsonl").read_text().splitlines()
    [run] = [argv for argv in (json.loads(c)["argv"] for c in calls) if argv[:1] == ["run-enclave"]]
    assert run[run.index("--memory") + 1] == "160" and run[run.index("--eif-path") + 1].endswith("/enclave.eif"), run


@pytest.fixture
def moto_iam():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_the_host_role_gets_the_kms_decrypt_policy_for_the_owners_key(ansible_playbook, host, moto_iam):
    """KMS needs an IAM policy in the caller's own account besides the owner's key policy (cross-account)."""
    iam = boto3.client("iam", endpoint_url=moto_iam, region_name="us-east-1")
    iam.create_role(
        RoleName="enclave-host", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []})
    )
    key_arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    playbook, role_vars, env = host
    extra = {"enclave_host_imds_url": "", "enclave_host_region": "eu-west-1",
             "enclave_host_kms_key_arn": key_arn, "enclave_host_iam_role": "enclave-host"}  # fmt: skip
    ansible_playbook(playbook, {**role_vars, **extra}, env={**env, "AWS_URL": moto_iam})
    document = iam.get_role_policy(RoleName="enclave-host", PolicyName="confidential-ml-kms-decrypt")["PolicyDocument"]
    if isinstance(document, str):
        document = json.loads(document)
    assert document == {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "DecryptConfidentialMlPackages", "Effect": "Allow", "Action": "kms:Decrypt", "Resource": key_arn}
        ],
    }
    second = ansible_playbook(playbook, {**role_vars, **extra}, env={**env, "AWS_URL": moto_iam})[0]
    assert second["changed"] == 0


def test_a_key_alias_is_refused_for_the_iam_policy(tmp_path, host):
    output = play_failing(
        tmp_path, host, enclave_host_imds_url="", enclave_host_region="eu-west-1",
        enclave_host_kms_key_arn="alias/release", enclave_host_iam_role="enclave-host",
    )  # fmt: skip
    assert "enclave_host_kms_key_arn must be the key's ARN" in output
