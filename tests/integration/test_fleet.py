"""A fleet: inventory/fleet.yml's three enclave hosts (all on this machine, local backend) run the job in parallel.

owner.yml runs once; run_job.yml then runs on enclave-a, enclave-b and enclave-c with --forks 3. Each host
must have started its own enclave (the name and CID the inventory gives it), brought back its own outputs
(job_dir is per host) and kept its own receipt, signed by its own enclave (module_id = that enclave's ID)
and verifying offline against the release and that host's outputs. cleanup.yml then leaves nothing running.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FLEET = ROOT / "inventory" / "fleet.yml"


def fleet_hosts() -> dict[str, dict]:
    """{inventory name: its host vars} of the enclave_hosts group in inventory/fleet.yml."""
    inventory = yaml.safe_load(FLEET.read_text())
    group = inventory["all"]["children"]["enclave_hosts"]
    return {name: {**group.get("vars", {}), **(hostvars or {})} for name, hostvars in group["hosts"].items()}


def recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP counters per host."""
    return {
        host: {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", counters)}
        for host, counters in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, flags=re.MULTILINE)
    }


@pytest.fixture
def fleet_env(owner_release):
    work, env = owner_release  # owner.yml ran once for the session
    yield work, env
    cleanup = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(FLEET), "playbooks/cleanup.yml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    left = describe_enclaves(env)
    assert cleanup.returncode == 0, f"cleanup.yml failed:\n{cleanup.stdout[-3000:]}{cleanup.stderr[-2000:]}"
    assert left.stdout.strip() in ("", "[]"), f"cleanup.yml left local enclaves running: {left.stdout}"


def describe_enclaves(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "enclave"), "local", "describe-enclaves"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def playbook(env: dict, *args: str, principal: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(FLEET), *args],
        cwd=ROOT, env={**env, "AWS_PROFILE": principal}, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"ansible-playbook {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_fleet_runs_the_job_in_parallel_each_host_on_its_own_enclave(fleet_env):
    work, env = fleet_env
    hosts = fleet_hosts()
    assert len(hosts) == 3, f"inventory/fleet.yml should hold three enclave hosts, it holds {sorted(hosts)}"
    release = work / "owner" / "release"

    run = playbook(
        env,
        "playbooks/run_job.yml",
        "--forks", "3",
        "-e", f"release_dir={release}",
        "-e", f"job_dir={work / 'jobs'}/{{{{ inventory_hostname }}}}",
        principal="enclave-host",
    )  # fmt: skip
    counters = recap(run.stdout)
    for host in hosts:
        assert counters.get(host, {}).get("failed") == 0, f"{host} in the recap: {counters.get(host)}"
        assert counters[host]["changed"] > 0, f"{host} ran nothing: {counters[host]}"

    described = describe_enclaves(env)
    assert described.returncode == 0, described.stderr
    enclaves = {e["EnclaveName"]: e for e in json.loads(described.stdout)}
    assert len(enclaves) == 3, f"expected one enclave per host, the local runtime runs {sorted(enclaves)}"

    module_ids = {}
    for host, hostvars in hosts.items():
        enclave = enclaves.get(hostvars["enclave_host_name"])
        assert enclave is not None, f"{host}'s enclave {hostvars['enclave_host_name']} is not running: {enclaves}"
        assert enclave["EnclaveCID"] == int(hostvars["enclave_host_cid"]), f"{host}: {enclave}"
        assert enclave["State"] == "RUNNING"

        job_dir = work / "jobs" / host
        metrics = json.loads((job_dir / "output" / "metrics.json").read_text())
        assert metrics["accuracy"] > 0.9, f"{host}'s job reports {metrics}"
        assert (job_dir / "output" / "results.csv").read_text().count("\n") == metrics["rows"] + 1

        verified = subprocess.run(
            [str(BIN / "enclave"), "receipt", "verify", str(job_dir / "receipt.json"),
             "--release", str(release / "release.json"), "--outputs", str(job_dir / "output"), "--json"],
            env=env, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert verified.returncode == 0, f"{host}'s receipt does not verify: {verified.stderr}{verified.stdout}"
        receipt = json.loads(verified.stdout)
        assert receipt["rc"] == 0 and receipt["script"] == "ml_algorithm.py"
        assert receipt["module_id"] == enclave["EnclaveID"], (
            f"{host}'s receipt was signed by {receipt['module_id']}, not by its own enclave {enclave['EnclaveID']}"
        )
        module_ids[host] = receipt["module_id"]

    assert len(set(module_ids.values())) == 3, f"the hosts' receipts should come from three enclaves: {module_ids}"
    cids = {e["EnclaveCID"] for e in enclaves.values()}
    endpoints = {e["Endpoint"] for e in enclaves.values()}
    assert cids == {16, 17, 18} and len(endpoints) == 3, f"CIDs {cids}, endpoints {endpoints}"
