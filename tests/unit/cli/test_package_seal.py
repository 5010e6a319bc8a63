"""`enclave package seal` is idempotent, as the enclave_package module is: both ask package_seal.needs_seal.

The real command in a subprocess, against the local KMS as a real HTTP server (boto3 signs with the owner's
credentials it issued)."""

import json
from pathlib import Path

import boto3
import pytest

from ansible_collections.confidential_ml.nitro.enclave_local.kms import LocalKms, LocalKmsServer
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import cli


@pytest.fixture
def kms(tmp_path, monkeypatch):
    """The owner's boto3 KMS client; the environment points `enclave` at the same KMS with the same identity."""
    server = LocalKmsServer(LocalKms(tmp_path / "kms")).start()
    credentials = server.kms.credentials("owner")
    monkeypatch.setenv("ENCLAVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials["aws_secret_access_key"])
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield boto3.client("kms", endpoint_url=server.endpoint_url, region_name="us-east-1", **credentials)
    server.stop()


@pytest.fixture
def app(tmp_path):
    src = tmp_path / "app"
    src.mkdir()
    (src / "run.py").write_text("print(1)\n")
    return src


def seal(src: Path, out: Path, key: str, *extra: str) -> dict:
    return json.loads(cli("package", "seal", str(src), "-o", str(out), "--key", key, "--json", *extra).stdout)


def test_sealing_twice_leaves_the_package_alone(kms, app, tmp_path):
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    out = tmp_path / "app.pkg"
    first = seal(app, out, key)
    written = out.read_bytes()
    second = seal(app, out, key)
    assert first["changed"] is True and second["changed"] is False
    assert out.read_bytes() == written  # not even a fresh data key
    assert second["wrapped_key"] == first["wrapped_key"] and second["manifest_digest"] == first["manifest_digest"]
    said = cli("package", "seal", str(app), "-o", str(out), "--key", key).stdout
    assert "is up to date" in said and "nothing sealed" in said and "--force" in said


def test_a_changed_source_is_sealed_again(kms, app, tmp_path):
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    out = tmp_path / "app.pkg"
    first = seal(app, out, key)
    (app / "run.py").write_text("print(2)\n")
    second = seal(app, out, key)
    assert second["changed"] is True
    assert second["manifest_digest"] != first["manifest_digest"]
    assert seal(app, out, key)["changed"] is False


def test_another_key_or_version_is_sealed_again(kms, app, tmp_path):
    key, other = (kms.create_key()["KeyMetadata"] for _i in range(2))
    out = tmp_path / "app.pkg"
    seal(app, out, key["KeyId"])
    moved = seal(app, out, other["KeyId"])
    assert moved["changed"] is True and moved["key_id"] == other["Arn"]
    assert seal(app, out, other["Arn"])["changed"] is False  # the same key, named by its ARN
    assert seal(app, out, other["KeyId"], "--version", "2.0")["changed"] is True


def test_an_alias_is_resolved_and_follows_its_key(kms, app, tmp_path):
    key, other = (kms.create_key()["KeyMetadata"] for _i in range(2))
    kms.create_alias(AliasName="alias/app", TargetKeyId=key["KeyId"])
    out = tmp_path / "app.pkg"
    assert seal(app, out, "alias/app")["key_id"] == key["Arn"]
    assert seal(app, out, "alias/app")["changed"] is False
    kms.update_alias(AliasName="alias/app", TargetKeyId=other["KeyId"])
    moved = seal(app, out, "alias/app")
    assert moved["changed"] is True and moved["key_id"] == other["Arn"]


def test_force_seals_again_with_a_fresh_data_key(kms, app, tmp_path):
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    out = tmp_path / "app.pkg"
    first = seal(app, out, key)
    forced = seal(app, out, key, "--force")
    assert forced["changed"] is True
    assert forced["wrapped_key"] != first["wrapped_key"] and forced["manifest_digest"] == first["manifest_digest"]


def test_an_output_that_is_not_a_package_is_kept_unless_forced(kms, app, tmp_path):
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    out = tmp_path / "notes.txt"
    out.write_text("the owner's notes\n")
    refused = cli("package", "seal", str(app), "-o", str(out), "--key", key, check=False)
    assert refused.returncode != 0
    assert "exists and is not a package" in refused.stderr and "--force" in refused.stderr
    assert out.read_text() == "the owner's notes\n"
    assert seal(app, out, key, "--force")["changed"] is True
