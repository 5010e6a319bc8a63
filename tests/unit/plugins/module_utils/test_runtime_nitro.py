"""The runtime interface and the nitro backend, against a strict fake nitro-cli on PATH.

tests/fixtures/fake-nitro-cli accepts only nitro-cli's own spelling of the
options this project uses, prints nitro-cli's JSON, keeps enclaves in a state
directory and records every call, so these tests check the exact command lines
NitroRuntime sends and how it reads the answers.
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.enclave_server import kms_forwarder
from ansible_collections.confidential_ml.nitro.plugins.module_utils import enclave_code, runtime, settings
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import (
    EnclaveError,
    EnclaveNotFoundError,
    EnclaveRuntimeError,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.runtime import (
    BuildResult,
    EnclaveInfo,
    LocalCliRuntime,
    Measurements,
    NitroRuntime,
    Runtime,
    get_runtime,
)
from ansible_collections.confidential_ml.nitro.tests.fixtures.sources import copy_enclave_sources

ROOT = Path(__file__).resolve().parents[4]
FAKE = ROOT / "tests" / "fixtures" / "fake-nitro-cli"
DOCKERFILE = ROOT / "enclave_server" / "Dockerfile"
REQUIREMENTS = ROOT / "enclave_server" / "requirements.txt"
REQUIREMENTS_IN = ROOT / "enclave_server" / "requirements.in"
SERVER_MODULE = "ansible_collections.confidential_ml.nitro.enclave_server"

P0, P1, P2, P8 = (f"{n:096x}" for n in (0xA0, 0xA1, 0xA2, 0xA8))


class FakeNitroCli:
    def __init__(self, state: Path):
        self.state = state

    def calls(self) -> list[dict]:
        log = self.state / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def argvs(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls()]

    def enclaves(self) -> list[dict]:
        path = self.state / "enclaves.json"
        return json.loads(path.read_text()) if path.exists() else []

    def seed(self, *enclaves: dict) -> None:
        (self.state / "enclaves.json").write_text(json.dumps(list(enclaves)))

    def set_console(self, enclave_id: str, text: str) -> None:
        (self.state / "console").mkdir(exist_ok=True)
        (self.state / "console" / f"{enclave_id}.log").write_text(text)

    def run(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["nitro-cli", *args], capture_output=True, text=True, check=False)

    def allocate(self, root: Path, config: str) -> subprocess.CompletedProcess:
        """Run the allocator service's program on root/etc/nitro_enclaves/allocator.yaml."""
        (root / "etc" / "nitro_enclaves").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "nitro_enclaves" / "allocator.yaml").write_text(config)
        env = dict(os.environ, NITRO_CLI_INSTALL_DIR=str(root))
        return subprocess.run(["nitro-enclaves-allocator"], capture_output=True, text=True, env=env, check=False)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake nitro-cli first on PATH, with its own state directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nitro-cli").symlink_to(FAKE)
    (bin_dir / "nitro-enclaves-allocator").symlink_to(FAKE)
    state = tmp_path / "nitro-state"
    state.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NITRO_CLI_STATE", str(state))
    monkeypatch.delenv("FAKE_NITRO_CLI_FAIL", raising=False)
    return FakeNitroCli(state)


@pytest.fixture
def eif(tmp_path):
    path = tmp_path / "enclave.eif"
    path.write_bytes(b"FAKE-EIF\0image")
    return path


def described(name, cid, *, state="RUNNING", flags="NONE", enclave_id=None):
    return {
        "EnclaveName": name,
        "EnclaveID": enclave_id or f"i-0123456789abcdef0-enc{cid:016x}",
        "ProcessID": 1000 + cid,
        "EnclaveCID": cid,
        "NumberOfCPUs": 2,
        "CPUIDs": [1, 3],
        "MemoryMiB": 1024,
        "State": state,
        "Flags": flags,
    }


# ---------------------------------------------------------------- data types


def test_measurements_round_trip_in_nitro_cli_shape():
    signed = Measurements(P0, P1, P2, P8)
    assert signed.to_json() == {"HashAlgorithm": "Sha384 { ... }", "PCR0": P0, "PCR1": P1, "PCR2": P2, "PCR8": P8}
    assert Measurements.from_json(signed.to_json()) == signed
    unsigned = Measurements(P0, P1, P2)
    assert "PCR8" not in unsigned.to_json()
    # The whole build-enclave output is accepted too, and upper-case hex is stored lowercase.
    wrapped = {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": P0.upper(), "PCR1": P1, "PCR2": P2}}
    assert Measurements.from_json(wrapped) == unsigned


@pytest.mark.parametrize(
    "fields, message",
    [
        ((P0[:-2], P1, P2), "PCR0 must be 96 lowercase hex"),
        ((P0.upper(), P1, P2), "PCR0 must be 96 lowercase hex"),
        ((P0, P1, "zz" * 48), "PCR2 must be 96 lowercase hex"),
        ((P0, P1, P2, "00"), "PCR8 must be 96 lowercase hex"),
    ],
)
def test_measurements_are_validated(fields, message):
    with pytest.raises(EnclaveRuntimeError, match=message):
        Measurements(*fields)


def test_measurements_from_json_refuses_other_shapes():
    with pytest.raises(EnclaveRuntimeError, match="lack PCR1, PCR2"):
        Measurements.from_json({"PCR0": P0})
    with pytest.raises(EnclaveRuntimeError, match="only SHA-384"):
        Measurements.from_json({"HashAlgorithm": "Sha256 { ... }", "PCR0": P0, "PCR1": P1, "PCR2": P2})


def test_enclave_info_round_trip_in_describe_shape():
    data = described("ml", 16, flags="DEBUG_MODE")
    info = EnclaveInfo.from_json(data, port=5005)
    assert info == EnclaveInfo(
        name="ml",
        enclave_id=data["EnclaveID"],
        cid=16,
        state="RUNNING",
        memory_mib=1024,
        cpu_count=2,
        debug_mode=True,
        endpoint="vsock://16:5005",
        process_id=1016,
        cpu_ids=(1, 3),
    )
    assert info.to_json() == {**data, "Endpoint": "vsock://16:5005"}
    # An explicit Endpoint (the local backend's unix socket) wins over the CID.
    local = EnclaveInfo.from_json({**data, "Endpoint": "unix:///run/enclave/16_5000.sock"})
    assert local.endpoint == "unix:///run/enclave/16_5000.sock"
    assert EnclaveInfo.from_json(local.to_json()) == local
    assert EnclaveInfo.from_json(described("x", 17)).debug_mode is False


def test_enclave_info_reports_a_missing_field():
    data = described("ml", 16)
    del data["EnclaveCID"]
    with pytest.raises(EnclaveRuntimeError, match="lacks EnclaveCID.*nitro-cli version"):
        EnclaveInfo.from_json(data)


def test_nitro_runtime_satisfies_the_protocol():
    assert isinstance(NitroRuntime(), Runtime)


# ---------------------------------------------------------------- the fake itself


def test_fake_refuses_what_nitro_cli_refuses(fake):
    def fake_run(*args):
        return subprocess.run(["nitro-cli", *args], capture_output=True, text=True, check=False)

    unknown = fake_run("describe-enclaves", "--json")
    assert unknown.returncode == 1 and "Found argument '--json' which wasn't expected" in unknown.stderr
    missing = fake_run("run-enclave", "--eif-path", "x.eif", "--cpu-count", "2")
    assert missing.returncode == 1 and "--memory <memory>" in missing.stderr
    both = fake_run("terminate-enclave", "--all", "--enclave-id", "i-1")
    assert both.returncode == 1 and "cannot be used with" in both.stderr
    typo = fake_run("run-enclave", "--eif-path", "x.eif", "--cpu-count", "two", "--memory", "512")
    assert typo.returncode == 1 and typo.stderr.startswith("[ E03 ]")
    assert [c["exit"] for c in fake.calls()] == [1, 1, 1, 1]


# ---------------------------------------------------------------- build


def owner_identity_file(path: Path, seed: bytes = b"owner") -> str:
    """An owner_identity.json with one P-384 key, as the enclave_image module writes it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity import OwnerIdentity, OwnerKey

    private = ec.derive_private_key(int.from_bytes(hashlib.sha384(seed).digest()), ec.SECP384R1())
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.write_bytes(OwnerIdentity((OwnerKey("arn:aws:kms:us-east-1:111122223333:key/signing", spki),)).dumps())
    return str(path)


def test_build_default_source_stages_the_project_image(fake, tmp_path):
    # The project's image is always bound to its owner (behaviour changed on purpose: owner_identity required).
    owner = owner_identity_file(tmp_path / "owner_identity.json")
    result = NitroRuntime().build(output=str(tmp_path / "out" / ".." / "enclave.eif"), owner_identity=owner)
    assert isinstance(result, BuildResult)
    assert result.image == str(tmp_path / "enclave.eif")
    (call,) = fake.calls()
    argv = call["argv"]
    assert argv[0] == "build-enclave"
    assert argv[1] == "--docker-uri" and re.fullmatch(r"confidential-ml-nitro-enclave:[0-9a-f]{20}", argv[2])
    assert argv[3] == "--docker-dir" and argv[5:] == ["--output-file", result.image]
    files = call["docker_dir_files"]
    app = "app/ansible_collections/confidential_ml/nitro/"
    assert "Dockerfile" in files and f"{app}enclave_server/server.py" in files and f"{app}owner_identity.json" in files
    assert f"{app}plugins/module_utils/endpoints.py" in files and f"{app}enclave_server/requirements.txt" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert not [f for f in files if f != "Dockerfile" and not f.startswith(app)]
    # Only the server's import closure: host-side module_utils stay out of the measured image.
    assert not {f"{app}plugins/module_utils/{name}" for name in ("runtime.py", "mounts.py", "module_options.py")} & set(
        files
    )
    assert not Path(argv[4]).exists(), "the staged context is removed after the build"
    # The fake's PCR0 is the SHA-384 of the EIF it wrote, as nitro-cli's is of the image.
    assert result.measurements.pcr0 == hashlib.sha384(Path(result.image).read_bytes()).hexdigest()
    assert result.measurements.pcr8 is None

    again = NitroRuntime().build(output=str(tmp_path / "again.eif"), owner_identity=owner)
    assert again.measurements == result.measurements, "the same sources give the same measurements"
    assert fake.argvs()[1][2] == argv[2], "and the same image tag"
    other = owner_identity_file(tmp_path / "other.json", b"another owner")
    assert (
        NitroRuntime().build(output=str(tmp_path / "o.eif"), owner_identity=other).measurements != result.measurements
    )


def test_project_image_without_an_owner_is_refused(fake, tmp_path):
    with pytest.raises(EnclaveRuntimeError, match="must be bound to its owner: give owner_identity"):
        NitroRuntime().build(output=str(tmp_path / "x.eif"))
    broken = tmp_path / "owner_identity.json"
    broken.write_text("{}")
    with pytest.raises(EnclaveError, match="is unusable: it is not in the format"):
        NitroRuntime().build(output=str(tmp_path / "x.eif"), owner_identity=str(broken))
    assert fake.calls() == []


def test_dockerfile_copies_the_staged_owner_identity_beside_enclave_server(tmp_path):
    staged = runtime.stage_image_context(tmp_path / "ctx", owner_identity_file(tmp_path / "owner.json"))
    # beside enclave_server/ in app/, which the Dockerfile copies to /opt/enclave/ (where the server looks)
    placed = staged / "app" / "ansible_collections/confidential_ml/nitro/owner_identity.json"
    assert placed.read_bytes() == (tmp_path / "owner.json").read_bytes()
    copies = [args.split() for op, args in _dockerfile_instructions() if op == "COPY"]
    assert ["app/", "/opt/enclave/"] in copies


def test_build_signed_image_reports_pcr8(fake, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("certificate")
    key.write_text("key")
    docker_dir = tmp_path / "app"
    docker_dir.mkdir()
    (docker_dir / "Dockerfile").write_text("FROM scratch\n")
    result = NitroRuntime().build(
        output=str(tmp_path / "signed.eif"),
        source=str(docker_dir),
        signing_certificate=str(cert),
        private_key=str(key),
    )
    assert result.measurements.pcr8 == hashlib.sha384(b"certificate").hexdigest()
    (argv,) = fake.argvs()
    assert argv[3:] == [
        "--docker-dir",
        str(docker_dir),
        "--output-file",
        str(tmp_path / "signed.eif"),
        "--signing-certificate",
        str(cert),
        "--private-key",
        str(key),
    ]


def test_build_signs_with_a_kms_key_arn(fake, tmp_path):
    """nitro-cli's --private-key is a PEM file or a KMS key ARN (it then signs through KMS)."""
    cert = tmp_path / "cert.pem"
    cert.write_text("certificate")
    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    result = NitroRuntime().build(
        output=str(tmp_path / "kms.eif"), source="acme/enclave:1", signing_certificate=str(cert), private_key=arn
    )
    assert result.measurements.pcr8 == hashlib.sha384(b"certificate").hexdigest()
    (call,) = fake.calls()
    assert call["argv"][-2:] == ["--private-key", arn] and call["signing_key"] == "kms"


@pytest.mark.parametrize(
    "key",
    [
        "arn:aws:kms:eu-west-1:111122223333:alias/release",  # an alias is not a key ARN
        "arn:aws:kms:eu-west-1:11112222333:key/1234abcd",  # 11-digit account
        "arn:aws:s3:eu-west-1:111122223333:key/1234abcd",
        "missing.pem",
    ],
)
def test_build_refuses_a_private_key_that_is_neither_a_file_nor_a_kms_key_arn(fake, tmp_path, key):
    cert = tmp_path / "cert.pem"
    cert.write_text("certificate")
    with pytest.raises(EnclaveRuntimeError, match="give a PEM file or a KMS key ARN"):
        NitroRuntime().build(
            output=str(tmp_path / "x.eif"), source="a:1", signing_certificate=str(cert), private_key=key
        )
    assert fake.calls() == []
    refused = fake.run("build-enclave", "--docker-uri", "a:1", "--output-file", str(tmp_path / "x.eif"),
                       "--signing-certificate", str(cert), "--private-key", key)  # fmt: skip
    assert refused.returncode == 1 and refused.stderr.startswith("[ E48 ]"), "the fake refuses it as nitro-cli does"


def test_build_from_an_image_uri(fake, tmp_path):
    result = NitroRuntime().build(output=str(tmp_path / "u.eif"), source="public.ecr.aws/acme/enclave:1.2")
    assert fake.argvs() == [
        ["build-enclave", "--docker-uri", "public.ecr.aws/acme/enclave:1.2", "--output-file", str(tmp_path / "u.eif")]
    ]
    assert Path(result.image).read_bytes() == b"FAKE-EIF\0public.ecr.aws/acme/enclave:1.2"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"signing_certificate": "c.pem"}, "both signing_certificate and private_key"),
        ({"source": "./no-such-dir"}, "is not a directory"),
        ({"output": "/no/such/dir/x.eif"}, "create the directory /no/such/dir first"),
    ],
)
def test_build_refuses_bad_arguments_before_calling_nitro_cli(fake, tmp_path, kwargs, message):
    kwargs = {"output": str(tmp_path / "x.eif"), **kwargs}
    with pytest.raises(EnclaveRuntimeError, match=message):
        NitroRuntime().build(**kwargs)
    assert fake.calls() == []


def test_build_failure_carries_stderr_and_hint(fake, tmp_path, monkeypatch):
    docker_dir = tmp_path / "app"
    docker_dir.mkdir()
    with pytest.raises(EnclaveRuntimeError, match="has no Dockerfile"):
        NitroRuntime().build(output=str(tmp_path / "x.eif"), source=str(docker_dir))
    assert fake.calls() == []
    (docker_dir / "Dockerfile").write_text("FROM scratch\n")
    monkeypatch.setenv("FAKE_NITRO_CLI_FAIL", "build-enclave:E49")
    with pytest.raises(EnclaveRuntimeError) as caught:
        NitroRuntime().build(output=str(tmp_path / "x.eif"), source=str(docker_dir))
    assert caught.value.code == "E49" and caught.value.returncode == 1
    assert caught.value.stderr.startswith("[ E49 ] Docker image build error")
    assert "What to do: docker could not build the image: is docker running" in str(caught.value)


# ---------------------------------------------------------------- run, describe


def test_run_passes_nitro_cli_options_and_reads_its_answer(fake, eif):
    info = NitroRuntime().run(str(eif), cpu_count=2, memory_mib=1024, cid=21, name="ml", debug_mode=True)
    assert fake.argvs() == [
        [
            "run-enclave",
            "--eif-path",
            str(eif),
            "--cpu-count",
            "2",
            "--memory",
            "1024",
            "--enclave-cid",
            "21",
            "--enclave-name",
            "ml",
            "--debug-mode",
        ]
    ]
    (stored,) = fake.enclaves()
    assert info == EnclaveInfo(
        name="ml",
        enclave_id=stored["EnclaveID"],
        cid=21,
        state="RUNNING",
        memory_mib=1024,
        cpu_count=2,
        debug_mode=True,
        endpoint="vsock://21:5000",
        process_id=stored["ProcessID"],
        cpu_ids=(1, 3),
    )


def test_run_prints_progress_on_stderr_and_only_json_on_stdout(fake, eif):
    """As nitro-cli does: the enclave process's progress lines go to stderr."""
    answer = fake.run("run-enclave", "--eif-path", str(eif), "--cpu-count", "2", "--memory", "512")
    assert answer.returncode == 0
    assert json.loads(answer.stdout)["MemoryMiB"] == 512, "stdout is one JSON object"
    assert answer.stderr.splitlines() == [
        "Start allocating memory...",
        f"Started enclave with enclave-cid: 16, memory: 512 MiB, cpu-ids: {[1, 3]}",
    ]


@pytest.mark.parametrize(
    "pages, asked, allocated",
    [
        # Plentiful pages of x86_64's sizes: whole 2 MiB pages.
        (None, 1025, 1026),
        (None, 1024, 1024),
        (None, 1537, 1538),
    ],
)
def test_run_and_describe_report_the_memory_allocated_in_hugepages(fake, eif, pages, asked, allocated):
    info = NitroRuntime().run(str(eif), memory_mib=asked)
    assert info.memory_mib == allocated
    (described_info,) = NitroRuntime().describe()
    assert described_info.memory_mib == allocated
    assert fake.argvs()[0][-2:] == ["--memory", str(asked)], "nitro-cli was asked for what the caller asked"


def test_memory_comes_from_the_hugepages_the_allocator_reserved(fake, eif, tmp_path):
    """The allocator reserves 2 GiB as two 1 GiB pages (largest first); a 1000 MiB enclave then gets a
    whole 1 GiB page, as nitro-cli allocates, and a second one the other; a third finds none left."""
    reserved = fake.allocate(tmp_path / "root", "---\nmemory_mib: 2048\ncpu_count: 4\n")
    assert reserved.returncode == 0, reserved.stdout
    assert "Successfully allocated Nitro Enclaves resources: 2048 MiB, 4 CPUs" in reserved.stdout
    assert json.loads((fake.state / "pool.json").read_text())["pages"] == {"1024": 2, "2": 0}
    rt = NitroRuntime()
    first = rt.run(str(eif), cpu_count=2, memory_mib=1000, name="a")
    assert first.memory_mib == 1024 and first.cpu_ids == (1, 3)
    assert rt.run(str(eif), cpu_count=2, memory_mib=64, name="b").memory_mib == 1024
    assert "_pages" not in fake.run("describe-enclaves").stdout, "the fake's bookkeeping stays private"
    rt.terminate("b")
    with pytest.raises(EnclaveRuntimeError, match=r"\[ E27 \] Insufficient memory available") as caught:
        rt.run(str(eif), cpu_count=2, memory_mib=1100, name="c")
    assert caught.value.code == "E27"


def test_allocator_rounds_to_the_smallest_page_and_refuses_while_an_enclave_runs(fake, eif, tmp_path):
    root = tmp_path / "root"
    assert fake.allocate(root, "---\nmemory_mib: 1025\ncpu_count: 2\n").returncode == 0
    # 1025 MiB rounds up to 1026: one 1 GiB page and one 2 MiB page.
    assert json.loads((fake.state / "pool.json").read_text())["pages"] == {"1024": 1, "2": 1}
    assert NitroRuntime().run(str(eif), memory_mib=1025).memory_mib == 1026
    refused = fake.allocate(root, "---\nmemory_mib: 4096\ncpu_count: 2\n")
    assert refused.returncode == 1
    assert "Could not re-online CPUs because there is at least one enclave currently running" in refused.stdout
    assert json.loads((fake.state / "pool.json").read_text())["memory_mib"] == 1025, "the old pool stays"
    NitroRuntime().terminate(all=True)
    assert fake.allocate(root, "---\nmemory_mib: 4096\ncpu_count: 2\n").returncode == 0
    assert fake.calls()[-1]["argv"] == ["nitro-enclaves-allocator"]


@pytest.mark.parametrize(
    "config, message",
    [
        ("memory_mib: 512\ncpu_count: 2\n", "missing memory reservation"),  # no ---: nothing is read
        ("---\nmemory_mib: 512\n", "missing CPU reservation"),
        ("---\nmemory_mib: 512\ncpu_count: 2\ncpu_pool: 1,3\n", "`cpu_count` conflicts with `cpu_pool`"),
        ("---\nmemory_mib: 512\ncpus: 2\n", "unexpected: cpus"),
    ],
)
def test_allocator_refuses_what_the_real_one_refuses(fake, tmp_path, config, message):
    refused = fake.allocate(tmp_path / "root", config)
    assert refused.returncode == 1 and message in refused.stdout
    assert not (fake.state / "pool.json").exists()


def test_run_refuses_less_than_four_times_the_image(fake, tmp_path):
    big = tmp_path / "big.eif"
    with big.open("wb") as f:
        f.truncate(40 * 2**20 + 1)
    with pytest.raises(EnclaveRuntimeError, match=r"\[ E26 \]") as caught:
        NitroRuntime().run(str(big), memory_mib=160)
    assert "minimum memory should be 164 MB" in caught.value.stderr
    assert NitroRuntime().run(str(big), memory_mib=161).memory_mib == 162


@pytest.mark.parametrize(
    "asked, reported, sizes, ok",
    [
        (1024, 1024, (2, 1024), True),
        (1025, 1026, (2, 1024), True),
        (1000, 1024, (2, 1024), True),  # served from a 1 GiB page
        (1025, 1025, (2, 1024), True),  # exactly as asked (the local backend)
        (1026, 1024, (2, 1024), False),  # less than asked: the enclave must restart
        (1000, 2048, (2, 1024), False),  # more than one largest page over: not this request
        (1000, 1001, (2, 1024), False),  # not whole pages
        (100, 128, (2, 32, 1024), True),
    ],
)
def test_memory_satisfies_compares_after_hugepage_rounding(asked, reported, sizes, ok):
    assert runtime.memory_satisfies(asked, reported, sizes) is ok


def test_hugepage_sizes_come_from_sysfs(tmp_path):
    for name in ("hugepages-2048kB", "hugepages-1048576kB", "hugepages-32768kB", "other"):
        (tmp_path / name).mkdir()
    assert runtime.hugepage_sizes_mib(str(tmp_path)) == (2, 32, 1024)
    assert runtime.hugepage_sizes_mib(str(tmp_path / "missing")) == (2, 1024)


def test_run_defaults_and_port_setting(fake, eif):
    info = NitroRuntime(port=6000).run(str(eif))
    assert fake.argvs() == [["run-enclave", "--eif-path", str(eif), "--cpu-count", "2", "--memory", "512"]]
    assert info.name == "enclave" and info.cid == 16 and info.debug_mode is False
    assert info.endpoint == "vsock://16:6000"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cpu_count": 0}, "cpu_count must be a positive integer"),
        ({"memory_mib": 16}, "memory_mib must be an integer of at least 64"),
        ({"cid": 3}, "0-3 are reserved"),
    ],
)
def test_run_refuses_bad_arguments_before_calling_nitro_cli(fake, eif, kwargs, message):
    with pytest.raises(EnclaveRuntimeError, match=message):
        NitroRuntime().run(str(eif), **kwargs)
    with pytest.raises(EnclaveRuntimeError, match="no enclave image at"):
        NitroRuntime().run(str(eif) + ".missing")
    assert fake.calls() == []


def test_run_failure_carries_stderr_code_and_what_to_do(fake, eif, monkeypatch):
    monkeypatch.setenv("FAKE_NITRO_CLI_FAIL", "run-enclave:E26")
    with pytest.raises(EnclaveRuntimeError) as caught:
        NitroRuntime().run(str(eif), memory_mib=128)
    failure = caught.value
    assert failure.returncode == 1 and failure.code == "E26"
    assert failure.stderr.startswith("[ E26 ] Insufficient memory requested")
    assert failure.command[:2] == ["nitro-cli", "run-enclave"]
    message = str(failure)
    assert "`nitro-cli run-enclave` failed (exit 1): [ E26 ]" in message
    assert "What to do: memory_mib is too small" in message
    assert "nitro-cli explain --error-code E26" in message and "cli-errors.html#E26" in message
    assert fake.enclaves() == []


def test_run_reports_nitro_cli_refusals_from_its_own_checks(fake, eif, monkeypatch):
    monkeypatch.setenv("FAKE_NITRO_CLI_CPUS", "2")
    with pytest.raises(EnclaveRuntimeError, match=r"(?s)\[ E22 \].*What to do: not enough CPUs") as caught:
        NitroRuntime().run(str(eif), cpu_count=3)
    assert caught.value.code == "E22"


def test_missing_nitro_cli_says_what_to_install(tmp_path):
    with pytest.raises(EnclaveRuntimeError, match="not found: install the AWS Nitro Enclaves CLI"):
        NitroRuntime(nitro_cli=str(tmp_path / "nitro-cli")).describe()


def test_describe_lists_enclaves(fake, eif):
    rt = NitroRuntime()
    assert rt.describe() == []
    first = rt.run(str(eif), name="a")
    second = rt.run(str(eif), name="b", debug_mode=True)
    assert rt.describe() == [first, second]
    assert fake.argvs()[-1] == ["describe-enclaves"]


def test_a_slow_nitro_cli_is_stopped(tmp_path):
    slow = tmp_path / "nitro-cli"
    slow.write_text("#!/bin/sh\necho 'Start allocating memory...' >&2\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(EnclaveRuntimeError, match="did not finish within 0.5 s.*Start allocating memory"):
        NitroRuntime(nitro_cli=str(slow), timeout=0.5).describe()


# ---------------------------------------------------------------- terminate, console


def test_terminate_by_name_maps_to_the_enclave_id(fake):
    a, b = described("a", 16), described("b", 17)
    fake.seed(a, b)
    assert NitroRuntime().terminate("b") == [b["EnclaveID"]]
    assert fake.argvs() == [["describe-enclaves"], ["terminate-enclave", "--enclave-id", b["EnclaveID"]]]
    assert fake.enclaves() == [a]
    assert NitroRuntime().terminate(a["EnclaveID"]) == [a["EnclaveID"]]
    assert fake.argvs()[-1] == ["terminate-enclave", "--enclave-id", a["EnclaveID"]]


def test_terminate_all(fake):
    a, b = described("a", 16), described("b", 17)
    fake.seed(a, b)
    assert NitroRuntime().terminate(all=True) == [a["EnclaveID"], b["EnclaveID"]]
    assert fake.argvs() == [["terminate-enclave", "--all"]]
    assert NitroRuntime().terminate(all=True) == []


def test_terminate_all_prints_one_json_array_as_nitro_cli_does(fake):
    a, b = described("a", 16), described("b", 17)
    fake.seed(a, b)
    answer = fake.run("terminate-enclave", "--all")
    assert json.loads(answer.stdout) == [
        {"EnclaveName": "a", "EnclaveID": a["EnclaveID"], "Terminated": True},
        {"EnclaveName": "b", "EnclaveID": b["EnclaveID"], "Terminated": True},
    ]
    assert json.loads(fake.run("terminate-enclave", "--all").stdout) == []
    fake.seed(a)
    one = fake.run("terminate-enclave", "--enclave-id", a["EnclaveID"])
    assert json.loads(one.stdout) == {"EnclaveName": "a", "EnclaveID": a["EnclaveID"], "Terminated": True}
    assert one.stderr == f"Successfully terminated enclave {a['EnclaveID']}.\n"


def test_terminate_refuses_unknown_ambiguous_and_unclear_requests(fake):
    fake.seed(described("twin", 16), described("twin", 17))
    with pytest.raises(EnclaveNotFoundError, match="no enclave has the ID or name 'ghost'; running: twin"):
        NitroRuntime().terminate("ghost")
    with pytest.raises(EnclaveRuntimeError, match="2 enclaves are named 'twin': give its EnclaveID"):
        NitroRuntime().terminate("twin")
    with pytest.raises(EnclaveRuntimeError, match="either an enclave"):
        NitroRuntime().terminate()
    with pytest.raises(EnclaveRuntimeError, match="either an enclave"):
        NitroRuntime().terminate("twin", all=True)
    assert not [argv for argv in fake.argvs() if argv[0] == "terminate-enclave"]
    assert len(fake.enclaves()) == 2


def test_console_reads_a_debug_enclave_until_idle(fake):
    debug = described("dbg", 16, flags="DEBUG_MODE")
    fake.seed(debug)
    fake.set_console(debug["EnclaveID"], "[    0.000000] Linux version 4.14\nenclave-server: listening\n")
    text = NitroRuntime(console_timeout=3).console("dbg")
    assert text == "[    0.000000] Linux version 4.14\nenclave-server: listening\n"
    assert fake.argvs()[-1] == ["console", "--enclave-id", debug["EnclaveID"], "--disconnect-timeout", "3"]
    NitroRuntime().console(debug["EnclaveID"], disconnect_timeout=1)
    assert fake.argvs()[-1][-1] == "1"


def test_console_of_a_production_enclave_is_refused(fake):
    fake.seed(described("prod", 16))
    with pytest.raises(EnclaveRuntimeError, match="not started in debug mode"):
        NitroRuntime().console("prod")
    assert fake.argvs() == [["describe-enclaves"]]


# ---------------------------------------------------------------- selection and settings


def test_get_runtime_selects_the_backend(monkeypatch, tmp_path):
    rt = get_runtime("nitro", nitro_cli=str(tmp_path / "nitro-cli"), port=7000)
    assert isinstance(rt, NitroRuntime) and rt.nitro_cli == str(tmp_path / "nitro-cli") and rt.port == 7000
    monkeypatch.setenv("ENCLAVE_BACKEND", "nitro")
    assert isinstance(get_runtime(), NitroRuntime)
    monkeypatch.setenv("ENCLAVE_BACKEND", "qemu")
    with pytest.raises(EnclaveError, match=r"unknown enclave backend 'qemu' \(from \$ENCLAVE_BACKEND\)"):
        get_runtime()
    with pytest.raises(EnclaveError, match="unknown enclave backend 'sgx'"):
        get_runtime("sgx")


def test_get_runtime_local_is_the_default_and_drives_enclave_local(monkeypatch, tmp_path):
    monkeypatch.delenv("ENCLAVE_BACKEND", raising=False)
    assert isinstance(get_runtime(), LocalCliRuntime)
    local = get_runtime("local", home=str(tmp_path))
    assert isinstance(local, LocalCliRuntime) and local.home == tmp_path
    assert isinstance(local, Runtime)
    # The same nitro-cli style commands, through the installed `enclave local`, with its own state directory.
    assert local.describe() == []
    with pytest.raises(EnclaveRuntimeError, match="does not sign images"):
        local.build(output=str(tmp_path / "x.eif"), signing_certificate="c", private_key="k")
    with pytest.raises(EnclaveRuntimeError, match="no enclave has the ID or name 'nope'"):
        local.terminate("nope")


def test_settings_backend(monkeypatch):
    monkeypatch.delenv("ENCLAVE_BACKEND", raising=False)
    assert settings.backend() == "local"
    monkeypatch.setenv("ENCLAVE_BACKEND", "nitro")
    assert settings.backend() == "nitro"
    assert settings.backend("local") == "local"
    monkeypatch.setenv("ENCLAVE_BACKEND", "Nitro")
    with pytest.raises(EnclaveError, match='use "local".*or "nitro"'):
        settings.backend()


def test_resolve_endpoint_discovers_the_one_running_enclave(fake, monkeypatch):
    monkeypatch.delenv("ENCLAVE_ENDPOINT", raising=False)
    monkeypatch.setenv("ENCLAVE_BACKEND", "nitro")
    fake.seed(described("ml", 19), described("old", 20, state="TERMINATING"))
    assert runtime.resolve_endpoint() == "vsock://19:5000"
    assert runtime.resolve_endpoint(port=5100) == "vsock://19:5100"
    assert fake.argvs() == [["describe-enclaves"], ["describe-enclaves"]]


def test_resolve_endpoint_explicit_choices_do_not_ask_nitro_cli(fake, monkeypatch):
    monkeypatch.setenv("ENCLAVE_BACKEND", "nitro")
    monkeypatch.delenv("ENCLAVE_ENDPOINT", raising=False)
    fake.seed(described("a", 16), described("b", 17))
    assert runtime.resolve_endpoint("vsock://30:5000") == "vsock://30:5000"
    assert runtime.resolve_endpoint(cid=17) == "vsock://17:5000"
    monkeypatch.setenv("ENCLAVE_ENDPOINT", "vsock://31:5000")
    assert runtime.resolve_endpoint() == "vsock://31:5000"
    assert fake.calls() == []


def test_resolve_endpoint_with_no_running_enclave(fake, monkeypatch):
    monkeypatch.delenv("ENCLAVE_ENDPOINT", raising=False)
    monkeypatch.setenv("ENCLAVE_BACKEND", "nitro")
    with pytest.raises(EnclaveError, match="no running enclave found on the nitro backend: start one first"):
        runtime.resolve_endpoint()


def test_resolve_endpoint_with_two_running_enclaves_asks_for_cid(fake, monkeypatch):
    monkeypatch.delenv("ENCLAVE_ENDPOINT", raising=False)
    monkeypatch.setenv("ENCLAVE_BACKEND", "nitro")
    fake.seed(described("a", 16), described("b", 17))
    with pytest.raises(
        EnclaveError, match=r"2 enclaves are running \(a \(CID 16\), b \(CID 17\)\): choose one with --cid"
    ):
        runtime.resolve_endpoint()


def test_resolve_endpoint_passes_nitro_cli_failures_on(fake, monkeypatch):
    monkeypatch.delenv("ENCLAVE_ENDPOINT", raising=False)
    monkeypatch.setenv("ENCLAVE_BACKEND", "nitro")
    monkeypatch.setenv("FAKE_NITRO_CLI_FAIL", "describe-enclaves:E36")
    with pytest.raises(EnclaveRuntimeError, match=r"\[ E36 \]"):
        runtime.resolve_endpoint()


def test_instance_credentials_come_from_boto3s_chain(monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never reach for a real metadata service
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")
    creds = runtime.instance_credentials(region="eu-west-1")
    assert creds == {
        "region": "eu-west-1",
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": "secret",
        "aws_session_token": "token",
    }


# ---------------------------------------------------------------- the image


APP = Path("app/ansible_collections/confidential_ml/nitro")


def test_staged_context_is_fixed_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = runtime.stage_image_context(tmp_path / "one")
    second = runtime.stage_image_context(tmp_path / "two")
    assert (first / "Dockerfile").read_bytes() == DOCKERFILE.read_bytes()
    paths = sorted(p.relative_to(first).as_posix() for p in first.rglob("*"))
    assert f"{APP}/enclave_server/__main__.py" in paths and f"{APP}/plugins/module_utils/endpoints.py" in paths
    assert not [p for p in paths if "__pycache__" in p]
    assert {p.stat().st_mtime for p in first.rglob("*")} == {1700000000}
    assert (first / APP / "enclave_server" / "boot.py").stat().st_mode & 0o777 == 0o644
    assert (first / APP / "enclave_server").stat().st_mode & 0o777 == 0o755
    assert runtime.context_digest(first) == runtime.context_digest(second)
    (second / APP / "enclave_server" / "server.py").write_text("# changed\n")
    assert runtime.context_digest(first) != runtime.context_digest(second)
    with pytest.raises(EnclaveRuntimeError, match="is not empty"):
        runtime.stage_image_context(first)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#"))
    )
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_dockerfile_base_is_pinned_by_digest():
    froms = [args for op, args in _dockerfile_instructions() if op == "FROM"]
    assert froms, "the Dockerfile has a FROM"
    for image in froms:
        assert re.fullmatch(r"[a-z0-9./_-]+:[\w.-]+@sha256:[0-9a-f]{64}", image.split()[0]), image


def test_dockerfile_installs_only_hashed_pins_without_upgrades():
    instructions = _dockerfile_instructions()
    runs = [args for op, args in instructions if op == "RUN"]
    pip_installs = [r for r in runs if "pip install" in r]
    assert pip_installs, "the image installs its requirements with pip"
    for command in pip_installs:
        words = shlex.split(command)
        for option in ("--require-hashes", "--no-deps", "--only-binary=:all:", "--no-compile"):
            assert option in words, (option, command)
        assert "-r" in words and words[words.index("-r") + 1].endswith("requirements.txt")
        assert not {"-U", "--upgrade", "--pre", "--index-url", "--extra-index-url"} & set(words)
    everything = DOCKERFILE.read_text()
    for forbidden in (
        r"apt-get\s+(dist-)?upgrade",
        r"yum\s+(update|upgrade)",
        r"dnf\s+(update|upgrade)",
        r"apk\s+upgrade",
    ):
        assert not re.search(forbidden, everything), forbidden
    assert not re.search(r"\blatest\b", everything, re.IGNORECASE)
    assert "PYTHONDONTWRITEBYTECODE=1" in everything and "SOURCE_DATE_EPOCH" in everything


def test_dockerfile_copies_only_the_enclave_code():
    # The staged context's app/ is the enclave code's import closure (stage_image_context), and
    # nothing else of the context is copied in.
    copies = [args.split() for op, args in _dockerfile_instructions() if op in ("COPY", "ADD")]
    assert {op for op, _argument in _dockerfile_instructions()} & {"ADD"} == set()
    destinations = {words[0]: words[1] for words in copies}
    assert destinations == {f"{APP}/enclave_server/requirements.txt": "/opt/requirements.txt", "app/": "/opt/enclave/"}


def test_the_eif_runs_one_cmd_naming_python_by_its_path():
    # nitro-cli's rule: the image's Cmd if it has one, else its Entrypoint, never both; init
    # execvpe()s argv[0] with PATH=/sbin:/usr/sbin:/bin:/usr/bin, where the base image has no python3.
    assert "ENTRYPOINT" not in dict(_dockerfile_instructions())
    command = enclave_code.image_command(DOCKERFILE.read_text())
    argv = command["argv"]
    assert argv[:5] == [enclave_code.IMAGE_PYTHON, "-s", "-P", "-m", f"{SERVER_MODULE}.boot"]
    assert argv[5:] == [
        "--listen", "vsock://any:5000", "--nsm", "/dev/nsm", "--share", "/enclave/share", "--work", "/enclave/work",
        "--kms-proxy", "vsock://3:8000",
    ]  # fmt: skip
    assert "PYTHONPATH=/opt/enclave" in command["env"] and command["cwd"] == "/"
    usage = subprocess.run(
        [sys.executable, "-m", SERVER_MODULE, "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (word for word in argv[5:] if word.startswith("--")):
        assert flag in usage, f"the enclave server does not accept {flag}"


def test_image_command_follows_nitro_cli_and_docker():
    base = "FROM python@sha256:00\nENV A=1 B='two words'\n"
    split = base + 'ENTRYPOINT ["/bin/sh", "entry.sh"]\nCMD ["--listen", "vsock://any:5000"]\n'
    # The mistake this project once shipped: the EIF runs the Cmd alone, "--listen".
    assert enclave_code.image_command(split)["argv"] == ["--listen", "vsock://any:5000"]
    only_entrypoint = base + 'ENTRYPOINT ["/usr/local/bin/python3", "-m", "app"]\n'
    assert enclave_code.image_command(only_entrypoint)["argv"] == ["/usr/local/bin/python3", "-m", "app"]
    assert enclave_code.image_command(base)["argv"] == ["python3"], "the base image's Cmd"
    shell = enclave_code.image_command(base + "CMD exec server --flag\nWORKDIR /srv\nENV PATH=/x\n")
    assert shell["argv"] == ["/bin/sh", "-c", "exec server --flag"]
    assert shell["cwd"] == "/", "init runs the command in /, whatever WORKDIR says"
    assert shell["env"][:1] == ["PATH=/x"] and "A=1" in shell["env"] and "B=two words" in shell["env"]
    with pytest.raises(EnclaveError, match="not a JSON array"):
        enclave_code.image_command(base + 'CMD ["a",\n')
    with pytest.raises(EnclaveError, match="uses a variable"):
        enclave_code.image_command(base + 'ENV P=$PATH:/x\nCMD ["x"]\n')


def test_host_only_code_stays_out_of_the_eif_and_the_server_is_in(tmp_path):
    tree = tmp_path / "tree"
    copy_enclave_sources(tree)
    base = runtime.context_digest(runtime.stage_image_context(tmp_path / "base", source=tree))
    with open(tree / "plugins" / "module_utils" / "mounts.py", "a") as f:
        f.write("# host-only edit\n")
    assert runtime.context_digest(runtime.stage_image_context(tmp_path / "fuse", source=tree)) == base
    with open(tree / "enclave_server" / "server.py", "a") as f:
        f.write("# enclave edit\n")
    assert runtime.context_digest(runtime.stage_image_context(tmp_path / "server", source=tree)) != base
    (tree / "enclave_local").mkdir()
    (tree / "enclave_local" / "__init__.py").write_text("")
    (tree / "enclave_server" / "uses_host.py").write_text("from ..enclave_local import runtime\n")
    with pytest.raises(EnclaveRuntimeError, match="host-side code"):
        runtime.stage_image_context(tmp_path / "bad", source=tree)


def test_a_tree_missing_what_the_enclave_imports_is_refused_not_left_out(tmp_path):
    """A partial tree once built an image without the code the server imports (it failed at start, in the
    enclave): the closure now refuses it, naming the import."""
    tree = tmp_path / "tree"
    for part in ("enclave_server", "plugins/module_utils"):  # no nitro_api/
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    with pytest.raises(
        enclave_code.ImageError, match=r"imports .*nitro_api\.\w+, which is not in .*whole project tree"
    ):
        enclave_code.enclave_sources(tree)
    shutil.copytree(ROOT / "nitro_api", tree / "nitro_api", ignore=shutil.ignore_patterns("__pycache__"))
    assert {"nitro_api/kms_route.py", "nitro_api/recipient_cms.py"} <= set(enclave_code.enclave_sources(tree))


def _requirement_entries(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def test_every_requirement_is_pinned_with_hashes():
    entries = _requirement_entries(REQUIREMENTS)
    assert len(entries) >= 10
    for entry in entries:
        assert re.match(r"^[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+ ", entry), f"not pinned: {entry}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]+)", entry)
        assert hashes and all(len(h) == 64 for h in hashes), f"no sha256 hash: {entry}"
    pinned = {re.split(r"==", e)[0].lower().replace("_", "-") for e in entries}
    wanted = {re.split(r"[<>=!~\[ ]", e)[0].lower().replace("_", "-") for e in _requirement_entries(REQUIREMENTS_IN)}
    assert wanted <= pinned, wanted - pinned
    # What the server imports, and the example app's runtime; not the owner's seal side (Tink, tqdm).
    assert {"cbor2", "cryptography", "asn1crypto", "boto3", "numpy", "scikit-learn"} <= wanted
    assert not {"tink", "tqdm", "protobuf"} & pinned


# ---------------------------------------------------------------- boot

BOOT_PROBE = """
import json, os, socket, sys
from ansible_collections.confidential_ml.nitro.enclave_server import boot, kms_forwarder

hosts, args = sys.argv[1], sys.argv[2:]
listener = socket.create_server(("127.0.0.1", 0))
try:
    socket.create_connection(listener.getsockname(), timeout=5).close()
    lo_before = "up"
except OSError as err:
    lo_before = err.strerror
for _ in range(2):  # a restarted boot keeps the existing mounts
    boot.prepare(args, hosts=hosts)
mounts = [line.split() for line in open("/proc/mounts") if line.split()[2] == "tmpfs"]
socket.create_connection(listener.getsockname(), timeout=5).close()  # loopback carries traffic now
print(json.dumps({"lo_before": lo_before, "mounts": mounts, "hosts": open(hosts).read(),
                  "names": kms_forwarder.kms_hostnames()}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="boot needs root and unshare(1)")
def test_boot_mounts_brings_loopback_up_and_maps_kms(tmp_path):
    share, work, hosts = tmp_path / "share", tmp_path / "work", tmp_path / "hosts"
    args = ["--listen", "vsock://any:5000", "--share", str(share), f"--work={work}", "--nsm", "/dev/nsm"]
    env = {**os.environ, "ENCLAVE_SHARE_SIZE": "8m"}
    env.pop("ENCLAVE_WORK_SIZE", None)
    proc = subprocess.run(
        ["unshare", "--mount", "--net", "--propagation", "private", sys.executable, "-c", BOOT_PROBE, hosts, *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["lo_before"] == "Network is unreachable", "a new network namespace starts as the enclave: lo down"
    share_mounts = [m for m in seen["mounts"] if m[1] == str(share)]
    work_mounts = [m for m in seen["mounts"] if m[1] == str(work)]
    assert len(share_mounts) == 1 and len(work_mounts) == 1, seen["mounts"]
    assert "size=8192k" in share_mounts[0][3] and "mode=700" in share_mounts[0][3]
    assert "nosuid" in work_mounts[0][3] and "nodev" in work_mounts[0][3]
    lines = seen["hosts"].splitlines()
    assert "127.0.0.1 localhost" in lines and "127.0.0.1 kms.us-east-1.amazonaws.com" in lines
    assert {f"127.0.0.1 {name}" for name in seen["names"]} <= set(lines)
    assert not os.path.ismount(share), "the mounts stayed in the private namespace"


def test_kms_hostnames_are_the_names_boto3_calls():
    import boto3

    names = kms_forwarder.kms_hostnames()
    assert len(names) > 30 and len(set(names)) == len(names)
    for region in ("us-east-1", "eu-west-1", "ap-southeast-2", "cn-north-1", "us-gov-west-1"):
        client = boto3.client("kms", region_name=region, aws_access_key_id="a", aws_secret_access_key="b")
        assert client.meta.endpoint_url.removeprefix("https://") in names, region


def test_boot_fails_clearly_without_privileges(tmp_path):
    # As the server would be after boot: no CAP_SYS_ADMIN, so the share cannot be mounted.
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"] if os.geteuid() == 0 else []
    proc = subprocess.run(
        [*drop, sys.executable, "-m", f"{SERVER_MODULE}.boot", "--share", str(tmp_path / "s"),
         "--work", str(tmp_path / "w"), "--listen", "x"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("enclave boot: error: mount a tmpfs (size=50%) on ")


def enclave_cli(*args: str) -> subprocess.CompletedProcess:
    """The `enclave` command as a user runs it, in this test's environment (the fake nitro-cli first on PATH)."""
    result = subprocess.run([sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main", *args],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_status_on_nitro_shows_what_nitro_cli_describes(fake, tmp_path, monkeypatch):
    """On a Nitro parent the enclaves are `nitro-cli describe-enclaves`' (a fake nitro-cli here, which records
    its calls); one that cannot be reached is reported as such, and a failing nitro-cli does not hide the rest."""
    monkeypatch.setenv("ENCLAVE_BACKEND", "nitro")
    monkeypatch.setenv("ENCLAVE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ENCLAVE_ENDPOINT", raising=False)
    fake.seed(described("ml", 16, flags="DEBUG_MODE"))
    status = json.loads(enclave_cli("status", "--json").stdout)
    assert status["backend"] == "nitro" and status["runtime_error"] is None and status["mounts"] == []
    [seen] = status["enclaves"]
    assert (seen["EnclaveName"], seen["EnclaveCID"], seen["Endpoint"]) == ("ml", 16, "vsock://16:5000")
    assert seen["error"] and "job" not in seen  # no vsock to CID 16 from here: said, not raised
    text = enclave_cli("status").stdout
    assert "enclave ml (i-0123456789abcdef0-enc0000000000000010): CID 16, 2 CPUs, 1024 MiB, RUNNING, debug mode" in text
    assert "  endpoint: --endpoint vsock://16:5000\n  unreachable: " in text
    assert ["describe-enclaves"] in fake.argvs()
    monkeypatch.setenv("FAKE_NITRO_CLI_FAIL", "describe-enclaves:E36")
    failed = enclave_cli("status")
    assert "enclaves: cannot list them: `nitro-cli describe-enclaves` failed" in failed.stdout, failed.stdout
