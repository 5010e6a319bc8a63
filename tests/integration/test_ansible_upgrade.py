"""playbooks/upgrade.yml (issue 15) on the SSH test fleet: three hosts (tests/fixtures/ssh_fleet.py) that see
neither the checkout nor the owner's release on the controller. First run_job.yml runs the job on the fresh hosts
(--forks 3): each installs the project from the wheel, gets the release, starts its own enclave, and its outputs and
receipt, signed by that enclave, come back to the controller and verify there. After the owner publishes a new
image (bound to a new signing key, so its PCR0 differs; the key policy keeps the old PCR0 too), a job started over
SSH on each host in its old enclave before the upgrade completes with a receipt that verifies on the controller
against the old release (before the upgrade, run_job.yml --check reports on each host the enclave it would restart
and changes nothing); the upgrade replaces the enclaves upgrade_serial hosts at a time (one batch after the other,
as its output shows), checks each new enclave attests the new PCR0 and pushes the packages and the dataset again,
so that run_job.yml finds them there and its receipts name the new enclaves; a second upgrade changes nothing; once
the owner drops the old PCR0 (window of one), an enclave of the old image gets no package key; cleanup.yml leaves
no enclave running."""

import json
import re
import shutil
import subprocess
import time

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import file_digests
from ansible_collections.confidential_ml.nitro.tests.fixtures.ssh_fleet import (
    ADDRESSES,
    BIN,
    ROOT,
    assert_no_enclaves_left,
    describe_enclaves,
    on_host,
    recap,
    run_playbook,
    ssh_command,
    timed_playbook,
    verify_receipt,
)

# A second package beside the demo's: a job long enough to be running when the upgrade starts.
SLEEPER = """\
import os, sys, time
time.sleep(6)
with open(os.path.join(sys.argv[1], "slept.txt"), "w") as out:  # the job sees /output through its argument
    out.write("slept")
print("slept")
"""


def packages(owner) -> list[str]:
    """owner.yml's packages (its own list) plus the sleeper, as extra vars."""
    (owner / "sleeper").mkdir(parents=True, exist_ok=True)
    (owner / "sleeper" / "sleep.py").write_text(SLEEPER)
    app = f"{owner}/app"
    listed = [
        {"name": "digits-classifier", "version": "1.0.0", "src": app,
         "build": ["{{ ansible_playbook_python }}", str(ROOT / "examples" / "train_model.py"), app]},
        {"name": "sleeper", "version": "1.0.0", "src": str(owner / "sleeper")},
    ]  # fmt: skip
    return ["-e", f"owner_pipeline_workdir={owner}", "-e", json.dumps({"owner_pipeline_packages": listed})]


def enclaves(env: dict) -> dict[str, dict]:
    """The local enclaves by name."""
    described = describe_enclaves(env)
    assert described.returncode == 0, described.stderr
    return {e["EnclaveName"]: e for e in json.loads(described.stdout)}


def assert_the_fleet_ran_the_job(run, env: dict, fleet, described: dict[str, dict], release, jobs) -> None:
    """run_job.yml on fresh hosts over SSH (--forks 3): each host installed the project from the wheel, got the
    release though it sees neither the checkout nor the controller's release, started its own enclave (the name and
    CID the inventory gives it), and its outputs and receipt, signed by its own enclave, came back to the controller
    and verify offline against the release."""
    counters = recap(run.stdout)
    assert len(described) == 3 and all(e["State"] == "RUNNING" for e in described.values()), described
    module_ids = set()
    for i, host in enumerate(ADDRESSES):
        assert counters.get(host, {}).get("failed") == 0 and counters[host]["changed"] > 0, counters
        seen = on_host(fleet, host, f"ls -A {ROOT}; test -e {release} || echo no-release-here;"
                                    f" ls /var/lib/confidential-ml/confidential-ml-{host[-1]}/release")  # fmt: skip
        assert seen.stdout.split() == [".venv", "no-release-here", "enclave.img", "packages", "release.json"], (
            seen.stdout + seen.stderr
        )
        job_dir = jobs / host
        metrics = json.loads((job_dir / "output" / "metrics.json").read_text())
        assert metrics["accuracy"] > 0.9, f"{host}'s job reports {metrics}"
        assert (job_dir / "output" / "results.csv").read_text().count("\n") == metrics["rows"] + 1
        enclave = described[f"confidential-ml-{host[-1]}"]  # its own enclave, with the name and CID it was given
        assert enclave["EnclaveCID"] == 16 + i
        proved = verify_receipt(env, job_dir, release)
        assert proved["rc"] == 0 and proved["script"] == "ml_algorithm.py", proved
        assert proved["module_id"] == enclave["EnclaveID"], f"{host}'s receipt is not its own enclave's: {proved}"
        module_ids.add(proved["module_id"])
    assert len(module_ids) == 3 and len({e["Endpoint"] for e in described.values()}) == 3, described
    assert run.stdout.count("Verify the receipt on the controller") == 1  # one task, three hosts


def wait_for_job(endpoint: str, job: subprocess.Popen) -> None:
    """Until the enclave at endpoint runs a job (the test's own readiness wait, not a timing assertion)."""
    while job.poll() is None:
        with EnclaveClient(endpoint) as client:
            if client.call("health")["job"]:
                return
        time.sleep(0.05)
    raise AssertionError(f"the job over SSH ended before it was seen running at {endpoint}: {job.communicate()}")


def batches(output: str) -> list[dict[str, str]]:
    """Per play batch (serial prints PLAY once per batch): how its hosts' "Run the enclave" task ended."""
    found = []
    for batch in re.split(r"^PLAY \[", output, flags=re.M)[1:]:
        task = re.search(r"TASK \[[^\]]*Run the enclave.*?(?=\nTASK |\nPLAY RECAP|\Z)", batch, re.S)
        assert task, batch[-3000:]
        found.append(dict((host, status) for status, host in re.findall(r"^(\w+): \[([\w-]+)\]", task[0], re.M)))
    return found


def task_statuses(output: str, task: str) -> dict[str, str]:
    """How task ended on each host, over all batches."""
    statuses = {}
    for block in re.findall(rf"TASK \[[^\]]*{re.escape(task)}.*?(?=\nTASK |\nPLAY |\Z)", output, re.S):
        statuses.update((host, status) for status, host in re.findall(r"^(\w+): \[([\w-]+)\]", block, re.M))
    return statuses


@pytest.mark.timeout(1800)  # owner.yml thrice, run_job.yml thrice, upgrade.yml twice, on three hosts, under load
def test_upgrade_rolls_the_new_image_over_the_ssh_fleet_and_pushes_the_inputs_again(ssh_fleet):
    work, env, fleet = ssh_fleet
    inventory, owner, jobs = fleet.inventory, work / "owner", work / "jobs"
    release, old_release = owner / "release", owner / "old-release"  # on the controller only (masked on the hosts)
    common = ["--forks", "3", "-e", f"release_dir={release}", "-e", f"job_dir={jobs}/{{{{ inventory_hostname }}}}"]
    try:
        timed_playbook(env, inventory, "playbooks/owner.yml", *packages(owner), principal="owner")
        run, _seconds = timed_playbook(env, inventory, "playbooks/run_job.yml", *common, principal="enclave-host")
        old = enclaves(env)
        assert_the_fleet_ran_the_job(run, env, fleet, old, release, jobs)
        old_pcr0 = json.loads((release / "release.json").read_text())["image"]["measurements"]["pcr0"]
        shutil.copytree(release, old_release)

        timed_playbook(env, inventory, "playbooks/owner.yml", *packages(owner),
                       "-e", "owner_pipeline_signing_key_alias=alias/next-signing", principal="owner")  # fmt: skip
        manifest = json.loads((release / "release.json").read_text())
        new_pcr0 = manifest["image"]["measurements"]["pcr0"]
        assert new_pcr0 != old_pcr0 and manifest["allowed_pcr0"] == [new_pcr0, old_pcr0]

        # run_job.yml --check (issue 12) before the upgrade: each host reports the new image it would copy and the
        # enclave it would restart from it as changed, skips what needs the new enclave, and changes nothing.
        job_files = file_digests(jobs)
        checked, _seconds = timed_playbook(env, inventory, "playbooks/run_job.yml", *common, "--check", "--diff",
                                           principal="enclave-host")  # fmt: skip
        for task in ("Copy the release's image from the controller", "Run the enclave"):
            statuses = task_statuses(checked.stdout, task)
            assert statuses == dict.fromkeys(ADDRESSES, "changed"), f"{task}: {statuses}\n{checked.stdout[-6000:]}"
        restarts = checked.stdout.count("Check mode: the enclave would be restarted from enclave.img")
        assert restarts == 3, checked.stdout[-6000:]
        statuses = task_statuses(checked.stdout, "Copy the owner's packages into the enclave's /encrypted")
        assert statuses == dict.fromkeys(ADDRESSES, "skipping"), f"{statuses}\n{checked.stdout[-6000:]}"
        assert file_digests(jobs) == job_files and enclaves(env) == old

        # On each host, over SSH, a job in the old enclave, running when the upgrade starts: the upgrade waits for it.
        inflight = {}
        for host in ADDRESSES:
            name = f"confidential-ml-{host[-1]}"
            command = (f"enclave run -f sleeper.pkg -s sleep.py -a /output/ --clear-output --region us-east-1"
                       f" --receipt /var/lib/confidential-ml/{name}/inflight.json"
                       f" --endpoint {old[name]['Endpoint']} --expect-pcr0 {old_pcr0}")  # fmt: skip
            inflight[host] = subprocess.Popen(ssh_command(fleet, host, command), stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)  # fmt: skip
        for host, job in inflight.items():
            wait_for_job(old[f"confidential-ml-{host[-1]}"]["Endpoint"], job)

        upgrade, _seconds = timed_playbook(env, inventory, "playbooks/upgrade.yml", "-e", f"release_dir={release}",
                                           "-e", "upgrade_serial=2", principal="enclave-host")  # fmt: skip
        for host, job in inflight.items():
            stdout, stderr = job.communicate(timeout=300)
            assert job.returncode == 0 and stdout.strip() == "slept", f"{host}: {stdout}{stderr}"
            # The receipt comes back to the controller and verifies there against the release it ran under.
            name = f"confidential-ml-{host[-1]}"
            fetched = on_host(fleet, host, f"cat /var/lib/confidential-ml/{name}/inflight.json")
            assert fetched.returncode == 0, fetched.stderr
            (jobs / f"inflight-{host}").mkdir()
            (jobs / f"inflight-{host}" / "receipt.json").write_text(fetched.stdout)
            verified = subprocess.run(
                [str(BIN / "enclave"), "receipt", "verify", str(jobs / f"inflight-{host}" / "receipt.json"),
                 "--release", str(old_release / "release.json"), "--json"],
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert verified.returncode == 0, f"{host}: {verified.stderr}"
            assert json.loads(verified.stdout)["module_id"] == old[name]["EnclaveID"], verified.stdout

        # upgrade_serial=2: a batch of two hosts, then one; each batch replaced its own enclaves, and Ansible starts
        # a batch only once the one before it has ended, so at most two hosts were without an enclave at once.
        assert batches(upgrade.stdout) == [{"enclave-a": "changed", "enclave-b": "changed"}, {"enclave-c": "changed"}]
        for task in ("Check that the enclave attests the new image's PCR0",):
            assert set(task_statuses(upgrade.stdout, task).values()) == {"ok"}, upgrade.stdout[-6000:]
        for task in ("Push the owner's packages into the new enclave", "Push the user's dataset into the new enclave"):
            statuses = task_statuses(upgrade.stdout, task)
            assert statuses == dict.fromkeys(ADDRESSES, "changed"), f"{task}: {statuses}\n{upgrade.stdout[-6000:]}"
        new = enclaves(env)
        for name, enclave in new.items():
            assert enclave["EnclaveID"] != old[name]["EnclaveID"], f"{name} was not replaced"
            assert enclave["EnclaveCID"] == old[name]["EnclaveCID"] and enclave["State"] == "RUNNING", enclave
        assert new.keys() == old.keys()

        # The new enclaves have what the job needs: run_job.yml pushes nothing, and each host's receipt, back on the
        # controller, verifies against the new release and names that host's new enclave.
        rerun, _seconds = timed_playbook(env, inventory, "playbooks/run_job.yml", *common, "-e", "clear_output=true",
                                         principal="enclave-host")  # fmt: skip
        for task in ("Copy the owner's packages into the enclave's /encrypted",
                     "Copy the user's dataset into the enclave's /dataset"):  # fmt: skip
            statuses = task_statuses(rerun.stdout, task)
            assert statuses == dict.fromkeys(ADDRESSES, "ok"), f"{task}: {statuses}\n{rerun.stdout[-6000:]}"
        for host in ADDRESSES:
            proved = verify_receipt(env, jobs / host, release)
            assert proved["rc"] == 0 and proved["module_id"] == new[f"confidential-ml-{host[-1]}"]["EnclaveID"], proved

        again = run_playbook(
            env, inventory, "playbooks/upgrade.yml", "-e", f"release_dir={release}", principal="enclave-host"
        )
        counters = recap(again.stdout)
        assert again.returncode == 0 and all(counters[host]["changed"] == 0 for host in ADDRESSES), again.stdout[-4000:]
        assert enclaves(env) == new

        # The owner drops the old PCR0: an enclave of the old image gets no key for the old package any more.
        timed_playbook(env, inventory, "playbooks/owner.yml", *packages(owner), "-e", "owner_pipeline_keep_pcr0=1",
                       "-e", "owner_pipeline_signing_key_alias=alias/next-signing", principal="owner")  # fmt: skip
        assert json.loads((release / "release.json").read_text())["allowed_pcr0"] == [new_pcr0]
        host_env = {**env, "AWS_PROFILE": "enclave-host"}
        started = subprocess.run(
            [str(BIN / "enclave"), "local", "run-enclave", "--eif-path", str(old_release / "enclave.img"),
             "--cpu-count", "1", "--memory", "128", "--enclave-name", "old-image"],
            env=host_env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        endpoint = json.loads(started.stdout)["Endpoint"]
        pushed = subprocess.run(
            [str(BIN / "enclave"), "push", str(old_release / "packages"), "/encrypted", "--endpoint", endpoint,
             "--expect-pcr0", old_pcr0],
            env=host_env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
        refused = subprocess.run(
            [str(BIN / "enclave"), "run", "-f", "sleeper.pkg", "-s", "sleep.py", "-a", "/output/",
             "--region", "us-east-1", "--endpoint", endpoint, "--expect-pcr0", old_pcr0],
            env=host_env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert refused.returncode != 0, refused.stdout
        assert "AccessDenied" in refused.stderr or "not allowed" in refused.stderr, refused.stderr
    finally:
        timed_playbook(env, inventory, "playbooks/cleanup.yml", principal="enclave-host")
    assert_no_enclaves_left(env)
