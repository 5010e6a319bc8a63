"""enclave_image through main(): real builds with the local backend's builder, and the nitro backend's with a
stand-in nitro-cli on PATH (it writes a different EIF every time, as build-time metadata would, and prints the
measurements it is told to).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.enclave_local.image import Image
from ansible_collections.confidential_ml.nitro.plugins.modules import enclave_image
from ansible_collections.confidential_ml.nitro.tests.fixtures.sources import copy_enclave_sources

ROOT = Path(enclave_image.__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ENCLAVE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ENCLAVE_BACKEND", raising=False)


@pytest.fixture
def out(tmp_path):
    directory = tmp_path / "release"
    directory.mkdir()
    return directory / "enclave.img"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(directory):
    return [p.name for p in Path(directory).iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_local_build_then_unchanged(run_module, out):
    first = run_module(enclave_image.main, {"output": str(out), "backend": "local"}, diff=True)
    assert first["changed"] is True
    assert first["image"] == str(out) and first["backend"] == "local"
    assert first["measurements_file"] == f"{out}.json"
    measured = Image.load(out).measurements
    assert first["measurements"] == {"pcr0": measured.pcr0, "pcr1": measured.pcr1, "pcr2": measured.pcr2, "pcr8": None}
    assert first["measurements"]["pcr0"] == hashlib.sha384(out.read_bytes()).hexdigest()
    record = json.loads(Path(first["measurements_file"]).read_text())
    assert record["image_sha256"] == sha256(out) and record["measurements"] == first["measurements"]
    assert first["diff"]["before"] == "" and json.loads(first["diff"]["after"]) == first["measurements"]
    assert leftovers(out.parent) == []

    stat = out.stat()
    second = run_module(enclave_image.main, {"output": str(out)})  # backend from the default: local
    assert second["changed"] is False and second["backend"] == "local"
    assert second["measurements"] == first["measurements"]
    assert out.stat().st_mtime_ns == stat.st_mtime_ns and out.stat().st_ino == stat.st_ino
    assert leftovers(out.parent) == []


@pytest.mark.slow
def test_check_mode_reports_the_measurements_and_writes_nothing(run_module, out):
    check = run_module(enclave_image.main, {"output": str(out), "backend": "local"}, check_mode=True, diff=True)
    assert check["changed"] is True
    assert not out.exists() and not Path(check["measurements_file"]).exists()
    assert list(out.parent.iterdir()) == []
    built = run_module(enclave_image.main, {"output": str(out), "backend": "local"})
    assert built["measurements"] == check["measurements"]  # the local build is reproducible
    again = run_module(enclave_image.main, {"output": str(out), "backend": "local"}, check_mode=True)
    assert again["changed"] is False


@pytest.mark.slow
def test_a_changed_or_unrecorded_image_is_replaced(run_module, out):
    args = {"output": str(out), "backend": "local"}
    first = run_module(enclave_image.main, args)
    with open(out, "ab") as f:
        f.write(b"tampered")
    check = run_module(enclave_image.main, args, check_mode=True, diff=True)
    assert check["changed"] is True and check["diff"]["before"] == ""
    assert out.read_bytes().endswith(b"tampered")
    replaced = run_module(enclave_image.main, args)
    assert replaced["changed"] is True
    assert hashlib.sha384(out.read_bytes()).hexdigest() == first["measurements"]["pcr0"]

    Path(f"{out}.json").unlink()
    assert run_module(enclave_image.main, args)["changed"] is True
    assert run_module(enclave_image.main, args)["changed"] is False


@pytest.mark.slow
def test_changed_sources_give_a_new_pcr0(run_module, out, tmp_path):
    source = tmp_path / "source"
    copy_enclave_sources(source)
    args = {"output": str(out), "backend": "local", "source": str(source)}
    first = run_module(enclave_image.main, args)
    assert run_module(enclave_image.main, args)["changed"] is False
    with open(source / "enclave_server" / "jobs.py", "a") as f:
        f.write("\n# a change to the enclave code\n")
    second = run_module(enclave_image.main, args, diff=True)
    assert second["changed"] is True
    assert second["measurements"]["pcr0"] != first["measurements"]["pcr0"]
    assert second["measurements"]["pcr2"] != first["measurements"]["pcr2"]
    assert second["measurements"]["pcr1"] == first["measurements"]["pcr1"]
    assert json.loads(second["diff"]["before"]) == first["measurements"]


def test_failures_say_what_to_do(run_module, out, tmp_path):
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    signed = {"output": str(out), "backend": "local", "signing_certificate": str(tmp_path / "cert.pem"),
              "private_key": str(tmp_path / "key.pem")}  # fmt: skip
    result = run_module(enclave_image.main, signed)
    assert result["failed"] is True and "does not sign images" in result["msg"]
    assert list(out.parent.iterdir()) == []

    result = run_module(enclave_image.main, {"output": str(tmp_path / "missing" / "x.img")})
    assert result["failed"] is True and "create the directory" in result["msg"]
    result = run_module(enclave_image.main, {"output": str(out.parent)})
    assert result["failed"] is True and "is a directory" in result["msg"]
    result = run_module(enclave_image.main, {"output": str(out), "signing_certificate": str(tmp_path / "cert.pem")})
    assert result["failed"] is True and "private_key" in result["msg"]


FAKE_NITRO_CLI = """\
import json, os, sys

args = sys.argv[1:]
with open(os.environ["FAKE_NITRO_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[0] != "build-enclave":
    sys.exit("[ E01 ] unexpected command")
with open(args[args.index("--output-file") + 1], "wb") as eif:
    eif.write(os.urandom(4096))  # like an EIF's build-time metadata: different bytes at every build
pcrs = {"PCR0": os.environ["FAKE_PCR0"], "PCR1": "b" * 96, "PCR2": "c" * 96}
if "--signing-certificate" in args:
    pcrs["PCR8"] = "d" * 96
print("Start building the Enclave Image...")
print(json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", **pcrs}}, indent=2))
"""


@pytest.fixture
def nitro_cli(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nitro-cli"
    script.write_text(f"#!{sys.executable}\n{FAKE_NITRO_CLI}")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NITRO_LOG", str(tmp_path / "nitro-cli.log"))
    monkeypatch.setenv("FAKE_PCR0", "a" * 96)
    return tmp_path / "nitro-cli.log"


def calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_nitro_keeps_an_image_whose_measurements_did_not_change(run_module, tmp_path, nitro_cli, monkeypatch):
    eif = tmp_path / "enclave.eif"
    args = {"output": str(eif), "backend": "nitro", "source": "registry.example/enclave:1.0"}
    first = run_module(enclave_image.main, args)
    assert first["changed"] is True and first["backend"] == "nitro"
    assert first["measurements"] == {"pcr0": "a" * 96, "pcr1": "b" * 96, "pcr2": "c" * 96, "pcr8": None}
    (build,) = calls(nitro_cli)
    assert build[build.index("--docker-uri") + 1] == "registry.example/enclave:1.0"
    assert build[build.index("--output-file") + 1] != str(eif)  # built beside it, then renamed
    assert Path(build[build.index("--output-file") + 1]).parent.parent == tmp_path
    image = eif.read_bytes()

    second = run_module(enclave_image.main, args)
    assert second["changed"] is False and eif.read_bytes() == image  # the new EIF's other bytes do not count
    assert len(calls(nitro_cli)) == 2

    monkeypatch.setenv("FAKE_PCR0", "e" * 96)
    third = run_module(enclave_image.main, args, diff=True)
    assert third["changed"] is True and third["measurements"]["pcr0"] == "e" * 96
    assert eif.read_bytes() != image
    assert json.loads(third["diff"]["before"])["pcr0"] == "a" * 96
    assert leftovers(tmp_path) == []


def test_nitro_signed_build_passes_the_key_and_returns_pcr8(run_module, tmp_path, nitro_cli):
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    args = {
        "output": str(tmp_path / "enclave.eif"),
        "backend": "nitro",
        "source": "registry.example/enclave:1.0",
        "signing_certificate": str(tmp_path / "cert.pem"),
        "private_key": str(tmp_path / "key.pem"),
    }
    result = run_module(enclave_image.main, args)
    assert result["measurements"]["pcr8"] == "d" * 96
    (build,) = calls(nitro_cli)
    assert build[build.index("--signing-certificate") + 1] == str(tmp_path / "cert.pem")
    assert build[build.index("--private-key") + 1] == str(tmp_path / "key.pem")


def test_nitro_without_nitro_cli_says_so(run_module, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = run_module(enclave_image.main, {"output": str(tmp_path / "e.eif"), "backend": "nitro", "source": "x:1"})
    assert result["failed"] is True and "nitro-cli not found" in result["msg"]
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_owner_signing_keys_bind_the_image_and_change_its_pcr0(run_module, out, owner, connection):
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity import OwnerIdentity

    signing = owner.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    unbound = run_module(enclave_image.main, {"output": str(out), "backend": "local"})
    assert unbound["owner_signing_keys"] == []
    bound = run_module(
        enclave_image.main,
        {"output": str(out), "backend": "local", "owner_signing_keys": [signing["KeyId"]], **connection},
    )
    assert bound["changed"] is True and bound["measurements"]["pcr0"] != unbound["measurements"]["pcr0"]
    (described,) = bound["owner_signing_keys"]
    assert described["key_id"] == signing["Arn"]
    carried = Image.load(out).app["ansible_collections/confidential_ml/nitro/owner_identity.json"]
    assert [key.to_json() for key in OwnerIdentity.loads(carried).keys] == [described]
    again = {"output": str(out), "backend": "local", "owner_signing_keys": [signing["Arn"]], **connection}
    assert run_module(enclave_image.main, again)["changed"] is False  # same key by ARN: same image


def test_owner_signing_key_that_cannot_sign_fails_clearly(run_module, out, key, connection):
    result = run_module(
        enclave_image.main, {"output": str(out), "backend": "local", "owner_signing_keys": [key["KeyId"]], **connection}
    )
    assert result["failed"] is True and "GetPublicKey" in result["msg"]
    assert not out.exists()
