"""A fleet reached over SSH (issue 15): three enclave hosts on this machine that cannot see the controller's files.

tests/fixtures/ssh_fleet.py starts them (sshd on 127.0.0.2-4, each in its own mount namespace with the checkout
and the controller's release and job folders masked), as the README's fleet section does. owner.yml runs on the
controller (once for the session: the owner_release fixture), run_job.yml on the three hosts with --forks 3.
Failures are contained: a host that fails does not stop the others, and a rerun finishes it; an SSH drop mid-job
likewise. Both tests run on one fleet, one after the other (each with a job folder of its own, and clear_output so
that either may come first); cleanup.yml then leaves no enclave running, and stopping the fleet no process of its
hosts.

That run_job.yml on fresh hosts installs the project from the wheel, brings the release to hosts that cannot see
it, starts each host's own enclave and brings back receipts signed by it is checked where the rolling upgrade's
test runs it on its own fleet (tests/integration/test_ansible_upgrade.py), so that it runs once per session.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.tests.fixtures.ssh_fleet import (
    assert_no_enclaves_left,
    describe_enclaves,
    recap,
    run_playbook,
    running,
    timed_playbook,
    verify_receipt,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def module_fleet(owner_release, fleet_wheel, tmp_path_factory):
    """(release, jobs, env, fleet) beside the session's owner release, for this file's tests, one after the other
    (starting three hosts and their enclaves once); cleanup.yml runs on it afterwards. Each test keeps its jobs in
    a folder of its own under jobs, hidden from the hosts as jobs is."""
    work, env = owner_release
    base = tmp_path_factory.mktemp("fleet")
    release, jobs = work / "owner" / "release", base / "jobs"  # the session's work folder is shared
    with running(base / "hosts", env, fleet_wheel, [work / "owner", jobs]) as (fleet, env):
        try:
            yield release, jobs, env, fleet
        finally:
            cleanup = run_playbook(env, fleet.inventory, "playbooks/cleanup.yml", principal="enclave-host")
            assert cleanup.returncode == 0, f"cleanup.yml failed:\n{cleanup.stdout[-3000:]}{cleanup.stderr[-2000:]}"
            assert_no_enclaves_left(env)


@pytest.mark.timeout(1500)  # several playbooks on three hosts, beyond the default 600 s under load
def test_a_failing_host_does_not_stop_the_others_and_a_rerun_finishes_it(module_fleet, tmp_path):
    """Failures are contained (issue 15): enclave-b's enclave cannot start (its image is not where its inventory
    says), yet enclave-a and enclave-c run their jobs to verified receipts; run_job.yml again, limited to the
    retry list Ansible wrote, with enclave-b fixed, finishes the job there and touches no other host."""
    release, jobs, env, fleet = module_fleet
    jobs = jobs / "failing-host"
    broken = yaml.safe_load(fleet.inventory.read_text())
    broken["all"]["children"]["enclave_hosts"]["hosts"]["enclave-b"]["enclave_host_image"] = str(tmp_path / "none.img")
    inventory = tmp_path / "broken.yml"
    inventory.write_text(yaml.safe_dump(broken))
    # clear_output: the other test of this file may have run a job in these enclaves first.
    common = ["--forks", "3", "-e", f"release_dir={release}", "-e", f"job_dir={jobs}/{{{{ inventory_hostname }}}}",
              "-e", "clear_output=true"]  # fmt: skip
    retry = tmp_path / "retry"
    first = run_playbook({**env, "ANSIBLE_RETRY_FILES_ENABLED": "1", "ANSIBLE_RETRY_FILES_SAVE_PATH": str(retry)},
                         inventory, "playbooks/run_job.yml", *common, principal="enclave-host")  # fmt: skip
    assert first.returncode == 2, first.stdout[-4000:]
    counters = recap(first.stdout)
    assert counters["enclave-b"]["failed"] == 1, counters
    message = "The enclave image " + str(tmp_path / "none.img") + " does not exist on enclave-b"
    assert message in first.stdout, first.stdout[-8000:]
    for host in ("enclave-a", "enclave-c"):
        assert counters[host]["failed"] == 0, f"{counters}\n{first.stdout[-8000:]}"
        verify_receipt(env, jobs / host, release)
    assert not (jobs / "enclave-b").exists()
    assert (retry / "run_job.retry").read_text().split() == ["enclave-b"]
    receipts = {h: (jobs / h / "receipt.json").read_bytes() for h in ("enclave-a", "enclave-c")}

    again, _seconds = timed_playbook(env, fleet.inventory, "playbooks/run_job.yml", "--limit",
                                     f"@{retry / 'run_job.retry'}", *common, principal="enclave-host")  # fmt: skip
    assert set(recap(again.stdout)) == {"enclave-b"}, again.stdout[-3000:]
    assert verify_receipt(env, jobs / "enclave-b", release)["rc"] == 0
    assert json.loads((jobs / "enclave-b" / "output" / "metrics.json").read_text())["accuracy"] > 0.9
    assert {h: (jobs / h / "receipt.json").read_bytes() for h in receipts} == receipts


@pytest.mark.timeout(1500)  # several playbooks on three hosts, beyond the default 600 s under load
def test_an_ssh_drop_mid_job_is_contained_and_the_same_command_finishes_it(module_fleet, tmp_path):
    """An SSH drop mid-run (issue 15): while enclave-b's enclave reports its job running, enclave-b's sshd and every
    SSH session there are killed (the host and its enclave stay up). enclave-a and enclave-c finish with verified
    receipts, the recap names enclave-b unreachable; once sshd is back, the same command again finishes the job on
    enclave-b (a new receipt that verifies) and changes nothing on the others (changed=0, receipts untouched).

    enclave-b's dataset is the example's rows many times over (the same labels, so the same accuracy), so that its
    job runs long enough to be caught running; the drop is made when the enclave itself says a job runs."""
    release, jobs, env, fleet = module_fleet
    jobs = jobs / "ssh-drop"
    big = tmp_path / "big-dataset"
    big.mkdir()
    rows = []
    for batch in sorted((ROOT / "examples" / "dataset").glob("*.csv")):
        header, *more = batch.read_text().splitlines(keepends=True)
        rows += more
    for i in range(4):
        (big / f"batch_{i}.csv").write_text(header + "".join(rows) * 20)
    # Play vars win over inventory vars, so enclave-b's dataset is chosen per host in an extra var.
    dataset = f"{{{{ '{big}' if inventory_hostname == 'enclave-b' else '{ROOT / 'examples' / 'dataset'}' }}}}"
    command = [str(BIN / "ansible-playbook"), "-i", str(fleet.inventory), "playbooks/run_job.yml",
               "--forks", "3", "-e", f"release_dir={release}", "-e", f"job_dir={jobs}/{{{{ inventory_hostname }}}}",
               "-e", f"dataset_dir={dataset}", "-e", "clear_output=true"]  # fmt: skip
    host_env = {**env, "AWS_PROFILE": "enclave-host"}

    log = tmp_path / "first-run.log"
    with log.open("w") as out:
        first = subprocess.Popen(command, cwd=ROOT, env=host_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        seen = wait_for_running_job(env, "confidential-ml-b", first, log)
        fleet.drop("enclave-b")
        first.wait(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    output = log.read_text()
    assert seen["script"] == "ml_algorithm.py", seen
    counters = recap(output)
    assert first.returncode == 4 and counters["enclave-b"]["unreachable"] == 1, f"{counters}\n{output[-6000:]}"
    for host in ("enclave-a", "enclave-c"):
        assert counters[host]["failed"] == 0 and counters[host]["unreachable"] == 0, counters
        assert verify_receipt(env, jobs / host, release)["rc"] == 0
    assert not (jobs / "enclave-b" / "receipt.json").exists()
    # The host is still up and its enclave runs: only SSH went.
    enclaves = {e["EnclaveName"]: e for e in json.loads(describe_enclaves(env).stdout)}
    assert enclaves["confidential-ml-b"]["State"] == "RUNNING", enclaves
    assert fleet.processes("enclave-b") and fleet.sshd("enclave-b") is None
    receipts = {h: (jobs / h / "receipt.json").read_bytes() for h in ("enclave-a", "enclave-c")}

    fleet.restore("enclave-b")
    again = subprocess.run(command, cwd=ROOT, env=host_env, capture_output=True, text=True, timeout=900, check=False)
    counters = recap(again.stdout)
    assert again.returncode == 0, f"{counters}\n{again.stdout[-6000:]}"
    assert counters["enclave-b"]["changed"] > 0 and counters["enclave-b"]["failed"] == 0, counters
    for host in ("enclave-a", "enclave-c"):
        assert counters[host]["changed"] == 0 and counters[host]["failed"] == 0, f"{host}: {counters}"
        assert (jobs / host / "receipt.json").read_bytes() == receipts[host]
    assert again.stdout.count("ran on enclave-") == 2, again.stdout[-6000:]  # "ml_algorithm.py ran on X before"
    proved = verify_receipt(env, jobs / "enclave-b", release)
    assert proved["rc"] == 0 and proved["inputs"] == 4, proved
    metrics = json.loads((jobs / "enclave-b" / "output" / "metrics.json").read_text())
    assert metrics["rows"] == 4 * 20 * len(rows) and metrics["accuracy"] > 0.9, metrics


def wait_for_running_job(env: dict, name: str, playbook: subprocess.Popen, log: Path) -> dict:
    """The job enclave name's server reports running (job.status), asked as `enclave status` does, while the
    playbook runs; fails when the playbook ends first."""
    endpoint = None
    while playbook.poll() is None:
        if endpoint is None:
            described = json.loads(describe_enclaves(env).stdout or "[]")
            endpoint = next((e["Endpoint"] for e in described if e["EnclaveName"] == name), None)
            # Each look is a process (`enclave local describe-enclaves`); back to back they took a core from the
            # playbook for the ~20 s the hosts take to start their enclaves.
            time.sleep(0.25)
            continue
        try:
            with EnclaveClient(endpoint, timeout=10) as client:
                job = client.call("job.status", timeout=10)["job"]
        except (EnclaveError, OSError):
            job = None  # the enclave is starting, or restarting
        if job is not None:
            return job
        time.sleep(0.05)
    raise AssertionError(f"run_job.yml ended before {name}'s job was seen running:\n{log.read_text()[-6000:]}")
