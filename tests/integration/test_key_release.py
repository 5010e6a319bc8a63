"""Issue 2 end to end: seal through the local KMS, release the key only to an attested enclave.

Everything is real: the local KMS is an HTTP server that unmodified boto3 talks
to, the attestation documents come from the simulated NSM in the exact Nitro
format, and the package is opened by the same code the enclave server runs.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from ansible_collections.confidential_ml.nitro.enclave_local.kms import LocalKms, LocalKmsServer, load_credentials
from ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim import LocalCA, SimulatedNsm
from ansible_collections.confidential_ml.nitro.enclave_server import kms_recipient
from ansible_collections.confidential_ml.nitro.plugins.module_utils import package_open, package_seal
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import KmsError, PackageError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import render_policy
from ansible_collections.confidential_ml.nitro.plugins.module_utils.policy_lint import lint

ACCOUNT = "111122223333"
OWNER = "owner"  # access key ids name the two parties to the local KMS
USER = "enclave-host"
PCR0_GOOD = hashlib.sha384(b"the owner's enclave image").digest()
PCR0_EVIL = hashlib.sha384(b"an image the host operator built").digest()


def tree_digest(root: Path) -> dict:
    """Every file and directory under root with its content hash: equal dicts mean identical trees."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def cloud(tmp_path):
    ca = LocalCA.load_or_create(tmp_path / "ca-state")
    server = LocalKmsServer(LocalKms(tmp_path / "kms", trusted_roots=[ca.root_certificate])).start()
    yield ca, server
    server.stop()


def kms(server, principal):
    return boto3.client(
        "kms", endpoint_url=server.endpoint_url, region_name="us-east-1", **server.kms.credentials(principal)
    )


@pytest.fixture
def released(cloud, tmp_path):
    """The owner's side: a key whose policy allows PCR0_GOOD only, and a package sealed under it."""
    ca, server = cloud
    owner = kms(server, OWNER)
    key_id = owner.create_key(Description="package key")["KeyMetadata"]["KeyId"]
    policy = render_policy(
        account_id=ACCOUNT,
        user_principals=[f"arn:aws:iam::{ACCOUNT}:role/{USER}"],
        admin_principals=[f"arn:aws:iam::{ACCOUNT}:role/{OWNER}"],
        pcr0=[PCR0_GOOD.hex()],
    )
    assert lint(policy, user_principals=[f"arn:aws:iam::{ACCOUNT}:role/{USER}"]) == []
    owner.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))

    src = tmp_path / "app"
    (src / "model").mkdir(parents=True)
    (src / "ml_algorithm.py").write_text("print('confidential')\n")
    (src / "model" / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (src / "empty").write_bytes(b"")
    sealed = tmp_path / "app.pkg"
    header = package_seal.seal(src, sealed, kms_client=owner, key_id=key_id, name="app", version="1.0")
    return ca, server, src, sealed, header


def test_attested_enclave_opens_the_package(released, tmp_path):
    ca, server, src, sealed, _header = released
    nsm = SimulatedNsm(ca, {0: PCR0_GOOD, 1: bytes(48), 2: bytes(48)})
    user = kms(server, USER)

    def unwrap(header):
        return kms_recipient.decrypt(
            user, nsm, header.wrapped_key, encryption_context=header.encryption_context, key_id=header.key_id
        )

    target = tmp_path / "opened"
    package_open.open_package(sealed, target, unwrap_key=unwrap)
    assert tree_digest(target) == tree_digest(src)


def test_enclave_with_another_measurement_gets_access_denied(released, tmp_path):
    ca, server, _src, sealed, header = released
    nsm = SimulatedNsm(ca, {0: PCR0_EVIL, 1: bytes(48), 2: bytes(48)})
    user = kms(server, USER)
    with pytest.raises(KmsError) as caught:
        kms_recipient.decrypt(
            user, nsm, header.wrapped_key, encryption_context=header.encryption_context, key_id=header.key_id
        )
    # botocore's KMS model declares no AccessDeniedException class: the code is what boto3 users check.
    assert isinstance(caught.value.__cause__, ClientError)
    assert caught.value.__cause__.response["Error"]["Code"] == "AccessDeniedException"

    target = tmp_path / "opened"

    def unwrap(h):
        return kms_recipient.decrypt(user, nsm, h.wrapped_key, encryption_context=h.encryption_context)

    with pytest.raises((KmsError, PackageError)):
        package_open.open_package(sealed, target, unwrap_key=unwrap)
    assert not target.exists() or not any(target.iterdir())


def test_debug_mode_enclave_is_refused(released):
    ca, server, _src, _sealed, header = released
    nsm = SimulatedNsm(ca, {0: PCR0_GOOD}, debug=True)
    with pytest.raises(KmsError) as caught:
        kms_recipient.decrypt(kms(server, USER), nsm, header.wrapped_key, encryption_context=header.encryption_context)
    assert caught.value.__cause__.response["Error"]["Code"] == "AccessDeniedException"


# "admin": a third authenticated principal, named in no statement (an unknown key id is refused before any policy).
@pytest.mark.parametrize("party", [USER, OWNER, "admin"])
def test_decrypt_without_recipient_is_denied_by_the_policy(released, party):
    _ca, server, _src, _sealed, header = released
    client = kms(server, party)
    with pytest.raises(ClientError) as caught:
        client.decrypt(CiphertextBlob=header.wrapped_key, EncryptionContext=header.encryption_context)
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"


def test_cli_seal_inspect_and_lint(tmp_path):
    """The console script against a local KMS it starts itself, as a user would run them."""
    env = dict(os.environ, ENCLAVE_HOME=str(tmp_path / "home"))
    enclave = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main"]
    serve = subprocess.Popen(
        [*enclave, "kms", "serve", "--state", str(tmp_path / "kms")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        banner = serve.stdout.readline()
        assert "listening on http://127.0.0.1:" in banner, banner
        endpoint = banner.split("listening on ")[1].split()[0]
        # `enclave kms serve` issued the credentials into its state directory on start.
        env.update(
            AWS_ENDPOINT_URL_KMS=endpoint,
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "kms" / "credentials"),
            AWS_PROFILE=OWNER,
        )
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env.pop(name, None)  # they would win over the profile
        issued = load_credentials(env["AWS_SHARED_CREDENTIALS_FILE"])[OWNER]
        owner = boto3.client(
            "kms",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=issued["aws_access_key_id"],
            aws_secret_access_key=issued["aws_secret_access_key"],
        )
        key_id = owner.create_key()["KeyMetadata"]["KeyId"]
        src = tmp_path / "app"
        src.mkdir()
        (src / "run.py").write_text("print(1)\n")
        out = tmp_path / "app.pkg"
        run = subprocess.run(
            [*enclave, "package", "seal", str(src), "-o", str(out), "--key", key_id, "--version", "2.1", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        sealed = json.loads(run.stdout)
        inspected = json.loads(
            subprocess.run(
                [*enclave, "package", "inspect", str(out), "--json"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert inspected["name"] == "app" and inspected["version"] == "2.1"
        assert inspected["manifest_digest"] == sealed["manifest_digest"]
        assert inspected["key_id"].endswith(key_id)
    finally:
        serve.terminate()
        serve.wait(timeout=10)

    policy = subprocess.run(
        [
            *enclave,
            "policy",
            "render",
            "--account-id",
            ACCOUNT,
            "--pcr0",
            PCR0_GOOD.hex().upper(),
            "--user-principal",
            f"arn:aws:iam::{ACCOUNT}:role/{USER}",
            "--admin-principal",  # required now: the account root's unconditioned kms:* is what lint refuses
            f"arn:aws:iam::{ACCOUNT}:role/{OWNER}",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (tmp_path / "good.json").write_text(policy)
    lint_good = [
        *enclave,
        "policy",
        "lint",
        str(tmp_path / "good.json"),
        "--user-principal",
        f"arn:aws:iam::{ACCOUNT}:role/{USER}",
    ]
    assert subprocess.run(lint_good, env=env, check=False).returncode == 0

    unsound = json.loads(policy)
    unsound["Statement"] = [s for s in unsound["Statement"] if s.get("Effect") != "Deny"]
    (tmp_path / "bad.json").write_text(json.dumps(unsound))
    lint_bad = subprocess.run(
        [*enclave, "policy", "lint", str(tmp_path / "bad.json")], env=env, capture_output=True, text=True, check=False
    )
    assert lint_bad.returncode == 1
    assert "Deny" in lint_bad.stderr


def test_cli_attestation_verify(tmp_path):
    ca = LocalCA.load_or_create(tmp_path / "state")
    nonce = os.urandom(16)
    doc = tmp_path / "doc.cose"
    doc.write_bytes(SimulatedNsm(ca, {0: PCR0_GOOD}).attest(nonce=nonce))
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    enclave = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main", "attestation", "verify"]
    good = subprocess.run(
        [*enclave, str(doc), "--root", str(root), "--expect-pcr0", PCR0_GOOD.hex(), "--nonce", nonce.hex(), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["pcrs"]["0"] == PCR0_GOOD.hex()
    wrong = subprocess.run([*enclave, str(doc), "--root", str(root), "--expect-pcr0", PCR0_EVIL.hex()],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert wrong.returncode == 1 and PCR0_EVIL.hex() in wrong.stderr
    untrusted = subprocess.run([*enclave, str(doc)], capture_output=True, text=True, check=False)  # AWS root only
    assert untrusted.returncode == 1 and "error" in untrusted.stderr
