"""enclave_instance on the nitro backend, against the strict fake nitro-cli (tests/fixtures/fake-nitro-cli).

nitro-cli allocates enclave memory in whole hugepages and describe-enclaves reports what it
allocated, not the --memory asked for: the module must not restart an enclave (wiping its
share) on every play because the two differ, and must restart it when its resources change.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.plugins.modules import enclave_instance

FAKE = Path(__file__).resolve().parents[3] / "fixtures" / "fake-nitro-cli"


class Nitro:
    def __init__(self, state: Path, root: Path):
        self.state, self.root = state, root

    def argvs(self) -> list[list[str]]:
        log = self.state / "calls.jsonl"
        return [json.loads(line)["argv"] for line in log.read_text().splitlines()] if log.exists() else []

    def enclaves(self) -> list[dict]:
        path = self.state / "enclaves.json"
        return json.loads(path.read_text()) if path.exists() else []

    def reserve(self, memory_mib: int, cpu_count: int = 2) -> None:
        """What the allocator service does with allocator.yaml."""
        config = self.root / "etc" / "nitro_enclaves" / "allocator.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f"---\nmemory_mib: {memory_mib}\ncpu_count: {cpu_count}\n")
        env = dict(os.environ, NITRO_CLI_INSTALL_DIR=str(self.root))
        subprocess.run(["nitro-enclaves-allocator"], env=env, check=True, capture_output=True)


@pytest.fixture
def nitro(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("nitro-cli", "nitro-enclaves-allocator"):
        (bin_dir / name).symlink_to(FAKE)
    state = tmp_path / "nitro-state"
    state.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NITRO_CLI_STATE", str(state))
    monkeypatch.setenv("FAKE_NITRO_CLI_HUGEPAGES", "2,1024")
    monkeypatch.setenv("ENCLAVE_HOME", str(tmp_path / "home"))
    return Nitro(state, tmp_path / "root")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "enclave.eif"
    path.write_bytes(b"FAKE-EIF\0release 1")
    return path


def args(image, **overrides):
    return {"name": "ml", "image": str(image), "backend": "nitro", "cpu_count": 2, "memory_mib": 1025, **overrides}


def run_calls(nitro):
    return [a for a in nitro.argvs() if a[0] == "run-enclave"]


def test_hugepage_rounding_does_not_restart_the_enclave(nitro, image, run_module):
    started = run_module(enclave_instance.main, args(image))
    assert started["changed"] and started["action"] == "started"
    assert started["enclave"]["MemoryMiB"] == 1026, "nitro-cli allocated whole 2 MiB pages"
    again = run_module(enclave_instance.main, args(image), diff=True)
    assert again["changed"] is False and again["action"] == "none", again
    assert len(run_calls(nitro)) == 1
    assert not [a for a in nitro.argvs() if a[0] == "terminate-enclave"]


def test_without_its_record_an_enclave_is_judged_by_what_nitro_cli_could_have_allocated(
    nitro, image, run_module, tmp_path
):
    """The module's record of what it asked is gone (a new controller): 1026 MiB is what 1025 gets."""
    run_module(enclave_instance.main, args(image))
    (tmp_path / "home" / "instances" / "ml.json").unlink()
    # The image digest is unknown without the record, so the enclave restarts; the new record then holds.
    assert run_module(enclave_instance.main, args(image))["action"] == "restarted"
    record = json.loads((tmp_path / "home" / "instances" / "ml.json").read_text())
    assert record["memory_mib"] == 1025
    assert enclave_instance.matches({"memory_mib": 1026}, {"memory_mib": 1025}, recorded=False)
    assert not enclave_instance.matches({"memory_mib": 1026}, {"memory_mib": 1024}, recorded=True)


def test_an_enclave_served_from_a_1_gib_page_is_left_alone(nitro, image, run_module):
    nitro.reserve(2048)  # two 1 GiB pages, no 2 MiB ones
    first = run_module(enclave_instance.main, args(image, memory_mib=1000))
    assert first["enclave"]["MemoryMiB"] == 1024
    assert run_module(enclave_instance.main, args(image, memory_mib=1000))["changed"] is False
    assert len(run_calls(nitro)) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"memory_mib": 1100},  # more than it has: restart
        {"memory_mib": 512},  # much less than it has: restart to give memory back
        {"cpu_count": 4},
        {"debug_mode": True},
    ],
)
def test_a_resource_change_restarts_the_enclave(nitro, image, run_module, change):
    first = run_module(enclave_instance.main, args(image))
    check = run_module(enclave_instance.main, args(image, **change), check_mode=True)
    assert check["changed"] and check["action"] == "restarted"
    assert len(run_calls(nitro)) == 1, "check mode starts nothing"
    done = run_module(enclave_instance.main, args(image, **change))
    assert done["changed"] and done["action"] == "restarted"
    assert done["enclave"]["EnclaveID"] != first["enclave"]["EnclaveID"]
    assert run_calls(nitro)[-1][run_calls(nitro)[-1].index("--memory") + 1] == str(change.get("memory_mib", 1025))
    assert [e["EnclaveID"] for e in nitro.enclaves()] == [done["enclave"]["EnclaveID"]]


def test_a_new_image_restarts_the_enclave_and_absent_terminates_it(nitro, image, run_module):
    run_module(enclave_instance.main, args(image))
    image.write_bytes(b"FAKE-EIF\0release 2")
    assert run_module(enclave_instance.main, args(image))["action"] == "restarted"
    assert len(run_calls(nitro)) == 2
    gone = run_module(enclave_instance.main, {"name": "ml", "backend": "nitro", "state": "absent"})
    assert gone["changed"] and gone["action"] == "terminated"
    assert nitro.enclaves() == []
    assert run_module(enclave_instance.main, {"name": "ml", "backend": "nitro", "state": "absent"})["changed"] is False
