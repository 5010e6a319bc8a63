"""The image is bound to its owner: an enclave server carrying the owner's signing keys runs only packages
the owner signed, and refuses every other one before it asks KMS or the NSM for anything.

Real parts: the local KMS over HTTP (boto3 signs with it: Sign, GetPublicKey), the simulated NSM on its
socket, the enclave server as a subprocess started with --owner-identity, the wire client. The KMS and the
NSM count the requests they answer, which is how "before" is proven: a refused package costs no call.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import boto3
import cbor2
import pytest

from ansible_collections.confidential_ml.nitro.enclave_local.kms import LocalKms, LocalKmsServer
from ansible_collections.confidential_ml.nitro.enclave_local.nsm_service import NsmService
from ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim import LocalCA, SimulatedNsm
from ansible_collections.confidential_ml.nitro.plugins.module_utils import package_format, package_seal
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import RemoteError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity import (
    KmsSigner,
    OwnerIdentity,
    owner_key_from_kms,
)
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import JOB_PYTHON, JOB_UID, owner_key

ACCOUNT = "111122223333"
LOCAL_PCR0 = hashlib.sha384(b"the owner's bound image").digest()
APP = {"hello.py": "print('the owner code ran')\n"}
EVIL = {"hello.py": "import os; print(sorted(os.listdir('/')))\n"}


def write_tree(root: Path, files: dict) -> Path:
    root.mkdir()
    for name, body in files.items():
        (root / name).write_text(textwrap.dedent(body))
    return root


def counting(calls: list, label, handle):
    def counted(*args, **kwargs):
        calls.append(label(*args, **kwargs))
        return handle(*args, **kwargs)

    return counted


@pytest.fixture
def bound(tmp_path):
    """The owner's KMS keys (package key for LOCAL_PCR0, signing key), the owner's package, and an enclave
    server bound to the signing key; kms_calls / nsm_calls list every request the two services answer."""
    ca = LocalCA.load_or_create(tmp_path / "home")
    kms = LocalKms(tmp_path / "kms", trusted_roots=[ca.root_certificate])
    kms_calls: list = []
    kms.handle = counting(kms_calls, lambda operation, request, principal: (operation, principal), kms.handle)
    kms_server = LocalKmsServer(kms).start()

    def client(who):
        return boto3.client("kms", endpoint_url=kms_server.endpoint_url, region_name="us-east-1",
                            **kms.credentials(who))  # fmt: skip

    owner = client("owner")
    key_id = owner_key(owner, LOCAL_PCR0)
    signing_id = owner.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    identity = OwnerIdentity((owner_key_from_kms(owner, signing_id),))
    (tmp_path / "owner_identity.json").write_bytes(identity.dumps())

    # Where the job uid can reach the share and work directories by path (as the enclave fixture does):
    # pytest's base directory is 0700.
    inside = Path(tempfile.mkdtemp(prefix="bound-", dir="/tmp"))
    inside.chmod(0o711)
    (inside / "work").mkdir()
    encrypted = inside / "share" / "encrypted"
    encrypted.mkdir(parents=True)
    header = package_seal.seal(write_tree(tmp_path / "app", APP), encrypted / "app.pkg", kms_client=owner,
                               key_id=key_id, name="app", version="1.0",
                               signer=KmsSigner(owner, signing_id))  # fmt: skip

    simulated = SimulatedNsm(ca, {0: LOCAL_PCR0, 1: bytes(48), 2: bytes(48)})
    nsm_calls: list = []
    simulated.handle = counting(nsm_calls, cbor2.loads, simulated.handle)
    nsm = NsmService(simulated, tmp_path / "nsm.sock").start()
    sock = tmp_path / "vsock" / "16_5000.sock"
    sock.parent.mkdir()
    job = ["--job-uid", str(JOB_UID), "--job-python", JOB_PYTHON] if JOB_UID is not None else []
    server = subprocess.Popen(
        [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.enclave_server",
         "--listen", f"unix://{sock}", "--share", str(inside / "share"), "--work", str(inside / "work"),
         "--nsm", f"unix://{tmp_path / 'nsm.sock'}", "--kms-endpoint-url", kms_server.endpoint_url,
         "--owner-identity", str(tmp_path / "owner_identity.json"), *job],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for _attempt in range(500):
        if sock.exists():
            break
        assert server.poll() is None, f"the enclave server exited during start-up: {server.stderr.read()}"
        time.sleep(0.02)
    yield {
        "tmp": tmp_path,
        "work": inside / "work",
        "sock": sock,
        "encrypted": encrypted,
        "client": client,
        "owner": owner,
        "key_id": key_id,
        "signing_id": signing_id,
        "identity": identity,
        "header": header,
        "kms_calls": kms_calls,
        "nsm_calls": nsm_calls,
        "host_kms": {"region": "us-east-1", **kms.credentials("enclave-host")},
    }
    server.terminate()
    server.wait(timeout=10)
    nsm.stop()
    kms_server.stop()
    shutil.rmtree(inside, ignore_errors=True)


def run(bound, name: str, script: str = "hello.py") -> dict:
    """Run a job with the host's credentials; every KMS and NSM request it causes is counted from here."""
    bound["kms_calls"].clear()
    bound["nsm_calls"].clear()
    with EnclaveClient(f"unix://{bound['sock']}", timeout=60) as client:
        return client.run(name, script, [], kms=bound["host_kms"])


def assert_refused_before_key_release(bound, name: str, *phrases: str) -> str:
    with pytest.raises(RemoteError) as refused:
        run(bound, name)
    message = str(refused.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert bound["kms_calls"] == [], "a refused package reached KMS"
    assert bound["nsm_calls"] == [], "a refused package reached the NSM"
    assert os.listdir(bound["work"]) == []  # nothing was opened
    return message


def test_the_owners_package_runs(bound):
    summary = run(bound, "app.pkg")
    assert summary["rc"] == 0 and summary["package_name"] == "app"
    assert ("Decrypt", f"arn:aws:iam::{ACCOUNT}:role/enclave-host") in bound["kms_calls"]
    assert any("Attestation" in request for request in bound["nsm_calls"])


def test_the_hosts_own_package_under_its_own_key_is_refused(bound, tmp_path):
    """The host makes its own KMS key (its policy its own), seals its own code under it, signs nothing."""
    host = bound["client"]("enclave-host")
    host_key = host.create_key(Description="the host's own")["KeyMetadata"]["KeyId"]
    package_seal.seal(write_tree(tmp_path / "evil", EVIL), bound["encrypted"] / "evil.pkg", kms_client=host,
                      key_id=host_key, name="evil", version="1")  # fmt: skip
    owner_key = bound["identity"].keys[0]
    assert_refused_before_key_release(
        bound, "evil.pkg", "package 'evil' 1 is not signed (package format 1)", owner_key.key_id,
        owner_key.fingerprint.hex(),
    )  # fmt: skip


def test_a_package_signed_by_another_kms_key_is_refused(bound, tmp_path):
    """The host's own signing key, and the owner's wrapped data key copied from the owner's package: KMS would
    release that key to this enclave, so the refusal must come first."""
    host = bound["client"]("enclave-host")
    host_signing = host.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    signer = KmsSigner(host, host_signing)
    owner_header = bound["header"]
    package_seal.write_package(
        bound["encrypted"] / "evil.pkg", name="app", version="1.0", key_id=owner_header.key_id,
        encryption_context=owner_header.encryption_context, wrapped_key=owner_header.wrapped_key,
        manifest_digest=owner_header.manifest_digest, data_key=os.urandom(32), body_chunks=[b"\0" * 10240],
        signer=signer,
    )  # fmt: skip
    assert_refused_before_key_release(
        bound, "evil.pkg", f"is signed by {signer.key.key_id} (public key SHA-256 {signer.key.fingerprint.hex()})",
        f"owner's key {bound['identity'].describe()}",
    )  # fmt: skip


def test_the_owners_signature_transplanted_onto_a_modified_header_is_refused(bound, tmp_path):
    """The host keeps the owner's signer fields and signature and changes the header under them."""
    original = (bound["encrypted"] / "app.pkg").read_bytes()
    header = bound["header"]
    fields = cbor2.loads(header.raw[12:]) | {"version": "1.0-evil"}
    body = cbor2.dumps(fields, canonical=True)
    raw = package_format.MAGIC + len(body).to_bytes(4, "big") + body
    signature_block = original[len(header.raw) : header.body_offset]
    (bound["encrypted"] / "evil.pkg").write_bytes(raw + signature_block + original[header.body_offset :])
    assert package_format.read_header(bound["encrypted"] / "evil.pkg").signature == header.signature
    assert_refused_before_key_release(bound, "evil.pkg", "its signature does not verify over its header")


def test_a_server_with_an_unusable_owner_identity_does_not_start(tmp_path):
    (tmp_path / "owner_identity.json").write_text('{"format": "something else"}')
    done = subprocess.run(
        [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.enclave_server",
         "--listen", f"unix://{tmp_path / 'x.sock'}", "--share", str(tmp_path / "share"), "--work", str(tmp_path),
         "--nsm", f"unix://{tmp_path / 'nsm.sock'}", "--owner-identity", str(tmp_path / "owner_identity.json")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "owner_identity.json is unusable: it is not in the format confidential-ml-nitro/owner-identity/1" in (
        done.stderr
    )


def test_a_local_image_carries_the_owner_identity_and_its_server_loads_it(bound, tmp_path):
    """enclave_local.image.build puts owner_identity.json beside enclave_server/ in the image, PCR0 measures
    it, and the server run from the image's own files (no --owner-identity) refuses an unsigned package."""
    import tarfile

    from ansible_collections.confidential_ml.nitro.enclave_local import image

    identity_file = bound["tmp"] / "owner_identity.json"
    tmp_path = tmp_path / "img"  # the bound fixture's server lives in tmp_path itself
    tmp_path.mkdir()
    unbound = image.build(tmp_path / "unbound.eif")
    bound_image = image.build(tmp_path / "bound.eif", owner_identity=identity_file)
    other = OwnerIdentity((owner_key_from_kms(bound["owner"], bound["owner"].create_key(
        KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]),))  # fmt: skip
    (tmp_path / "other.json").write_bytes(other.dumps())
    other_image = image.build(tmp_path / "other.eif", owner_identity=tmp_path / "other.json")
    assert len({unbound.measurements.pcr0, bound_image.measurements.pcr0, other_image.measurements.pcr0}) == 3
    parsed = image.Image.load(tmp_path / "bound.eif")
    assert parsed.app["ansible_collections/confidential_ml/nitro/owner_identity.json"] == identity_file.read_bytes()
    assert (
        "ansible_collections/confidential_ml/nitro/owner_identity.json"
        not in image.Image.load(tmp_path / "unbound.eif").app
    )

    root = tmp_path / "image"
    with tarfile.open(tmp_path / "bound.eif") as tar:
        tar.extractall(root, filter="data")
    sock, share = tmp_path / "16_5000.sock", tmp_path / "share"
    (share / "encrypted").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    host = bound["client"]("enclave-host")
    host_key = host.create_key()["KeyMetadata"]["KeyId"]
    package_seal.seal(write_tree(tmp_path / "evil", EVIL), share / "encrypted" / "evil.pkg", kms_client=host,
                      key_id=host_key, name="evil", version="1")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(root / "app"))
    server = subprocess.Popen(
        [sys.executable, "-s", "-P", "-m", "ansible_collections.confidential_ml.nitro.enclave_server",
         "--listen", f"unix://{sock}", "--share", str(share), "--work", str(tmp_path / "work"),
         "--nsm", f"unix://{tmp_path / 'no-nsm.sock'}"],
        env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        for _attempt in range(500):
            if sock.exists():
                break
            assert server.poll() is None, f"the server exited during start-up: {server.stderr.read()}"
            time.sleep(0.02)
        with EnclaveClient(f"unix://{sock}", timeout=60) as client, pytest.raises(RemoteError) as refused:
            client.run("evil.pkg", "hello.py", [], kms=bound["host_kms"])
        assert "is not signed (package format 1)" in str(refused.value)
        assert bound["identity"].keys[0].fingerprint.hex() in str(refused.value)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_cli_seals_signed_inspect_shows_the_signer_and_build_binds_the_owner_key(tmp_path):
    from ansible_collections.confidential_ml.nitro.enclave_local import image

    enclave = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main"]
    with LocalKmsServer(LocalKms(tmp_path / "kms")) as kms_server:
        issued = kms_server.kms.credentials("owner")
        env = dict(os.environ, ENCLAVE_HOME=str(tmp_path / "home"), AWS_ENDPOINT_URL_KMS=kms_server.endpoint_url,
                   AWS_ACCESS_KEY_ID=issued["aws_access_key_id"], AWS_SECRET_ACCESS_KEY=issued["aws_secret_access_key"],
                   AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
        owner = boto3.client("kms", endpoint_url=kms_server.endpoint_url, region_name="us-east-1", **issued)
        key_id = owner.create_key()["KeyMetadata"]["KeyId"]
        signing = owner.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
        expected = owner_key_from_kms(owner, signing["KeyId"])

        def cli(*args):
            return subprocess.run([*enclave, *args], env=env, capture_output=True, text=True, check=True, timeout=120)

        app = write_tree(tmp_path / "app", APP)
        sealed = cli("package", "seal", str(app), "-o", str(tmp_path / "app.pkg"), "--key", key_id,
                     "--signing-key", signing["KeyId"])  # fmt: skip
        assert f"signed by {signing['Arn']}" in sealed.stdout
        shown = cli("package", "inspect", str(tmp_path / "app.pkg")).stdout
        assert f"signer: {signing['Arn']} (public key SHA-256 {expected.fingerprint.hex()})" in shown
        assert "format_version: 2" in shown
        as_json = json.loads(cli("package", "inspect", str(tmp_path / "app.pkg"), "--json").stdout)
        assert as_json["signer"]["key_id"] == signing["Arn"]
        assert as_json["signer"]["fingerprint"] == expected.fingerprint.hex()

        cli("package", "seal", str(app), "-o", str(tmp_path / "unsigned.pkg"), "--key", key_id)
        assert "signer: none (format 1, unsigned" in cli("package", "inspect", str(tmp_path / "unsigned.pkg")).stdout

        built = cli("local", "build", "--output", str(tmp_path / "bound.eif"), "--owner-key", signing["KeyId"])
        assert "bound to the owner's signing keys" in built.stderr
        carried = image.Image.load(tmp_path / "bound.eif").app[
            "ansible_collections/confidential_ml/nitro/owner_identity.json"
        ]
        assert OwnerIdentity.loads(carried) == OwnerIdentity((expected,))
        assert OwnerIdentity.loads(carried).check_package(package_format.read_header(tmp_path / "app.pkg")) == expected


def test_cli_lints_the_signing_key_policy(tmp_path):
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import render_signing_policy

    owner_role = f"arn:aws:iam::{ACCOUNT}:role/owner"
    enclave = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main", "policy", "lint"]
    sound = render_signing_policy(account_id=ACCOUNT, owner_principals=[owner_role])
    (tmp_path / "sound.json").write_text(json.dumps(sound))
    ok = subprocess.run([*enclave, str(tmp_path / "sound.json"), "--signing-key", "--owner-principal", owner_role],
                        capture_output=True, text=True, check=False)  # fmt: skip
    assert ok.returncode == 0 and "sound" in ok.stdout
    account = {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
    sound["Statement"].append({"Sid": "HostSigns", "Effect": "Allow", "Principal": account, "Action": "kms:Sign",
                               "Resource": "*"})  # fmt: skip
    (tmp_path / "open.json").write_text(json.dumps(sound))
    bad = subprocess.run([*enclave, str(tmp_path / "open.json"), "--signing-key", "--owner-principal", owner_role],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert bad.returncode == 1 and "statement HostSigns allows kms:Sign" in bad.stderr
