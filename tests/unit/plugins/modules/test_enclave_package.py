"""enclave_package through main() against a real local KMS: seal, idempotence by content, check mode, diff."""

import socket
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_format import (
    CONTEXT_PACKAGE,
    CONTEXT_VERSION,
    manifest_digest,
    read_header,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_open import open_package
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_seal import build_manifest
from ansible_collections.confidential_ml.nitro.plugins.modules import enclave_package


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "app"
    (root / "models").mkdir(parents=True)
    (root / "ml_algorithm.py").write_text("print('training')\n")
    (root / "models" / "model.h5").write_bytes(bytes(range(256)) * 64)
    return root


@pytest.fixture
def args(src, tmp_path, key, connection):
    return {
        "src": str(src),
        "dest": str(tmp_path / "app.pkg"),
        "key_id": key["KeyId"],
        "name": "app",
        "version": "1.0",
        **connection,
    }


@pytest.fixture
def dead_endpoint():
    """A loopback URL where nothing listens: a module that calls KMS there fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_seal_writes_a_package_that_opens_to_src(run_module, args, src, key, owner, tmp_path):
    result = run_module(enclave_package.main, args)
    assert result["changed"] is True
    assert result["dest"] == args["dest"]
    digest = manifest_digest(build_manifest(src)).hex()
    assert result["manifest_digest"] == digest
    header = read_header(args["dest"])
    assert result["header"] == header.to_json()
    assert header.name == "app" and header.version == "1.0"
    assert header.key_id == key["Arn"]
    assert header.encryption_context == {CONTEXT_PACKAGE: "app", CONTEXT_VERSION: "1.0"}
    assert header.manifest_digest.hex() == digest

    def unwrap(h):
        return owner.decrypt(CiphertextBlob=h.wrapped_key, EncryptionContext=h.encryption_context)["Plaintext"]

    opened = tmp_path / "opened"
    open_package(args["dest"], opened, unwrap_key=unwrap)
    assert (opened / "ml_algorithm.py").read_bytes() == (src / "ml_algorithm.py").read_bytes()
    assert (opened / "models" / "model.h5").read_bytes() == (src / "models" / "model.h5").read_bytes()


def test_same_content_is_not_resealed_and_kms_is_not_called(run_module, args, dead_endpoint):
    first = run_module(enclave_package.main, args)
    package = Path(args["dest"]).read_bytes()
    # With a key id, the second run needs no KMS at all: point it where nothing answers.
    second = run_module(enclave_package.main, dict(args, kms_endpoint_url=dead_endpoint))
    assert second["changed"] is False
    assert second["header"] == first["header"]
    assert second["manifest_digest"] == first["manifest_digest"]
    assert Path(args["dest"]).read_bytes() == package
    # The key ARN names the same key.
    by_arn = run_module(
        enclave_package.main, dict(args, key_id=first["header"]["key_id"], kms_endpoint_url=dead_endpoint)
    )
    assert by_arn["changed"] is False


def test_a_changed_file_is_resealed(run_module, args, src):
    first = run_module(enclave_package.main, args)
    model = src / "models" / "model.h5"
    data = bytearray(model.read_bytes())
    data[1000] ^= 0x01
    model.write_bytes(bytes(data))
    second = run_module(enclave_package.main, args)
    assert second["changed"] is True
    assert second["manifest_digest"] != first["manifest_digest"]
    assert read_header(args["dest"]).manifest_digest.hex() == second["manifest_digest"]
    assert run_module(enclave_package.main, args)["changed"] is False


def test_a_new_file_or_mode_change_is_resealed(run_module, args, src):
    run_module(enclave_package.main, args)
    (src / "README").write_text("new\n")
    assert run_module(enclave_package.main, args)["changed"] is True
    (src / "ml_algorithm.py").chmod(0o755)
    assert run_module(enclave_package.main, args)["changed"] is True
    assert run_module(enclave_package.main, args)["changed"] is False


@pytest.mark.parametrize(
    "change",
    [{"name": "other"}, {"version": "1.1"}, {"encryption_context": {"customer": "acme"}}],
)
def test_other_header_fields_are_resealed(run_module, args, change):
    run_module(enclave_package.main, args)
    result = run_module(enclave_package.main, dict(args, **change))
    assert result["changed"] is True
    header = read_header(args["dest"])
    for field, value in change.items():
        if field == "encryption_context":
            assert header.encryption_context == {CONTEXT_PACKAGE: "app", CONTEXT_VERSION: "1.0", **value}
        else:
            assert getattr(header, field) == value
    assert run_module(enclave_package.main, dict(args, **change))["changed"] is False


def test_another_key_is_resealed(run_module, args, owner):
    run_module(enclave_package.main, args)
    other = owner.create_key()["KeyMetadata"]
    result = run_module(enclave_package.main, dict(args, key_id=other["KeyId"]))
    assert result["changed"] is True
    assert read_header(args["dest"]).key_id == other["Arn"]


def test_an_alias_is_resolved_with_describe_key(run_module, args, owner, key, dead_endpoint):
    owner.create_alias(AliasName="alias/packages", TargetKeyId=key["KeyId"])
    first = run_module(enclave_package.main, dict(args, key_id="alias/packages"))
    assert first["changed"] is True
    assert first["header"]["key_id"] == key["Arn"]
    assert run_module(enclave_package.main, dict(args, key_id="alias/packages"))["changed"] is False
    # Pointed at another key, the alias means a reseal.
    other = owner.create_key()["KeyMetadata"]
    owner.update_alias(AliasName="alias/packages", TargetKeyId=other["KeyId"])
    moved = run_module(enclave_package.main, dict(args, key_id="alias/packages"))
    assert moved["changed"] is True
    assert moved["header"]["key_id"] == other["Arn"]
    # Without KMS, an alias cannot be resolved: a clear failure, not a guess.
    failed = run_module(enclave_package.main, dict(args, key_id="alias/packages", kms_endpoint_url=dead_endpoint))
    assert failed["failed"] is True
    assert failed["msg"].startswith("KMS DescribeKey on alias/packages failed")


def test_check_mode_writes_nothing(run_module, args, src, tmp_path, dead_endpoint):
    new = run_module(enclave_package.main, args, check_mode=True)
    assert new["changed"] is True
    assert new["header"]["manifest_digest"] == manifest_digest(build_manifest(src)).hex()
    assert new["header"]["key_id"] == args["key_id"]
    assert "wrapped_key" not in new["header"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app", "kms-state"]

    run_module(enclave_package.main, args)
    package = Path(args["dest"]).read_bytes()
    (src / "ml_algorithm.py").write_text("print('changed')\n")
    # Check mode asks KMS for nothing with a key id.
    changed = run_module(enclave_package.main, dict(args, kms_endpoint_url=dead_endpoint), check_mode=True)
    assert changed["changed"] is True
    assert Path(args["dest"]).read_bytes() == package
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app", "app.pkg", "kms-state"]


def test_diff_summarises_the_header(run_module, args, src):
    new = run_module(enclave_package.main, args, diff=True)
    assert new["diff"]["before"] == ""
    assert '"name": "app"' in new["diff"]["after"]
    assert new["manifest_digest"] in new["diff"]["after"]
    assert "wrapped_key" not in new["diff"]["after"]
    assert new["diff"]["before_header"] == new["diff"]["after_header"] == args["dest"]

    same = run_module(enclave_package.main, args, diff=True)
    assert same["changed"] is False
    assert same["diff"]["before"] == same["diff"]["after"] == new["diff"]["after"]

    (src / "ml_algorithm.py").write_text("print('v2')\n")
    bumped = run_module(enclave_package.main, dict(args, version="2.0"), diff=True, check_mode=True)
    assert bumped["diff"]["before"] == new["diff"]["after"]
    assert '"version": "2.0"' in bumped["diff"]["after"]
    assert bumped["manifest_digest"] in bumped["diff"]["after"]
    assert bumped["manifest_digest"] != new["manifest_digest"]


def test_force_reseals_with_a_fresh_data_key(run_module, args):
    first = run_module(enclave_package.main, args)
    forced = run_module(enclave_package.main, dict(args, force=True))
    assert forced["changed"] is True
    assert forced["header"]["wrapped_key"] != first["header"]["wrapped_key"]
    assert forced["manifest_digest"] == first["manifest_digest"]


def test_dest_that_is_not_a_package_is_kept_unless_forced(run_module, args):
    with open(args["dest"], "w") as other:
        other.write("somebody's notes\n")
    refused = run_module(enclave_package.main, args)
    assert refused["failed"] is True
    assert "exists and is not a package" in refused["msg"]
    assert "force=true" in refused["msg"]  # the library's words, shared with the CLI (--force)
    assert Path(args["dest"]).read_text() == "somebody's notes\n"
    forced = run_module(enclave_package.main, dict(args, force=True))
    assert forced["changed"] is True
    assert read_header(args["dest"]).name == "app"


def test_bad_inputs_fail_clearly(run_module, args, src, tmp_path):
    missing = run_module(enclave_package.main, dict(args, src=str(tmp_path / "nope")))
    assert missing["failed"] is True
    assert "is not a directory; give the directory to seal" in missing["msg"]

    (src / "link").symlink_to("ml_algorithm.py")
    linked = run_module(enclave_package.main, args)
    assert linked["failed"] is True
    assert "link" in linked["msg"]
    (src / "link").unlink()

    reserved = run_module(enclave_package.main, dict(args, encryption_context={CONTEXT_VERSION: "9"}))
    assert reserved["failed"] is True
    assert "drop it from encryption_context" in reserved["msg"]

    nested = run_module(enclave_package.main, dict(args, encryption_context={"customer": {"id": 1}}))
    assert nested["failed"] is True
    assert "encryption_context maps ['customer'] to lists or dicts" in nested["msg"]

    nodir = run_module(enclave_package.main, dict(args, dest=str(tmp_path / "no" / "such" / "app.pkg")))
    assert nodir["failed"] is True
    assert "cannot seal" in nodir["msg"]

    wrong_key = run_module(enclave_package.main, dict(args, key_id="alias/does-not-exist"))
    assert wrong_key["failed"] is True
    assert "alias/does-not-exist" in wrong_key["msg"]
    assert not (tmp_path / "app.pkg").exists()


@pytest.mark.parametrize("variable", ["BOTO3_IMPORT_ERROR", "PACKAGE_IMPORT_ERROR"])
def test_a_missing_library_fails_the_task_and_names_it(run_module, args, monkeypatch, tmp_path, variable):
    # module_utils import their third-party libraries guarded; the module reports what one could not import.
    try:
        import tink_is_not_installed  # noqa: F401
    except ImportError as exc:
        monkeypatch.setattr(enclave_package, variable, exc)
    result = run_module(enclave_package.main, args)
    assert result["failed"] is True
    assert "Failed to import the required Python library (tink_is_not_installed)" in result["msg"]
    assert not (tmp_path / "app.pkg").exists()


def test_signing_key_seals_format_2_idempotently_and_reseals_for_another_signer(run_module, args, owner):
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity import (
        OwnerIdentity,
        owner_key_from_kms,
    )

    signing = owner.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    signed_args = dict(args, signing_key_id=signing["KeyId"])
    first = run_module(enclave_package.main, signed_args)
    assert first["changed"] is True
    header = read_header(args["dest"])
    assert (header.format_version, header.signer_key_id) == (2, signing["Arn"])
    identity = OwnerIdentity((owner_key_from_kms(owner, signing["KeyId"]),))
    assert identity.check_package(header).key_id == signing["Arn"]
    assert first["header"]["signer"]["fingerprint"] == identity.keys[0].fingerprint.hex()

    assert run_module(enclave_package.main, signed_args)["changed"] is False
    data = Path(args["dest"]).read_bytes()

    # Unsigned, or signed by another key, is not what was asked: sealed again (check mode only reports it).
    other = owner.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    check = run_module(enclave_package.main, dict(args, signing_key_id=other["KeyId"]), check_mode=True, diff=True)
    assert check["changed"] is True and check["header"]["signer"]["key_id"] == other["Arn"]
    assert Path(args["dest"]).read_bytes() == data
    assert run_module(enclave_package.main, args)["changed"] is True  # unsigned wanted now
    assert read_header(args["dest"]).signature is None


def test_a_symmetric_key_as_signing_key_fails_clearly(run_module, args, key):
    result = run_module(enclave_package.main, dict(args, signing_key_id=key["KeyId"]))
    assert result["failed"] is True
    assert "cannot read the public key of the owner's signing key" in result["msg"] and "GetPublicKey" in result["msg"]
    assert not Path(args["dest"]).exists()
