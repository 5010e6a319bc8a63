"""playbooks/upgrade.yml (issue 15): after the owner publishes a new image (bound to a new signing key, so its PCR0
differs; the key policy keeps the old PCR0 too), a job started in the old enclave before the upgrade completes with a
valid receipt; the upgrade then replaces the host's enclave with one of the new image, checks it attests the new PCR0
and pushes the packages and the dataset again, so that run_job.yml finds them there; a second upgrade changes
nothing; once the owner drops the old PCR0, an enclave of the old image gets no package key."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def play(env: dict, name: str, principal: str, *extra: str) -> str:
    done = subprocess.run([str(BIN / "ansible-playbook"), f"playbooks/{name}", *extra], cwd=ROOT,
                          env={**env, "AWS_PROFILE": principal}, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert done.returncode == 0, f"{name}: {done.stdout[-6000:]}{done.stderr[-2000:]}"
    return done.stdout


def enclave_cli(env: dict, *args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [str(BIN / "enclave"), *args]
    env = {**env, "AWS_PROFILE": "enclave-host"}
    if popen:
        return subprocess.Popen(command, env=env, text=True, **popen)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def wait_for_job(endpoint: str) -> None:
    """Until the enclave at endpoint runs a job (the test's own readiness wait, not a timing assertion)."""
    for _attempt in range(600):
        with EnclaveClient(endpoint) as client:
            if client.call("health")["job"]:
                return
        time.sleep(0.05)
    raise AssertionError(f"no job started in the enclave at {endpoint}")


# A second package beside the demo's: a job long enough to be running when the upgrade starts.
SLEEPER = """\
import os, sys, time
time.sleep(6)
with open(os.path.join(sys.argv[1], "slept.txt"), "w") as out:  # the job sees /output through its argument
    out.write("slept")
print("slept")
"""


def packages(tmp_path: Path) -> list[str]:
    """owner.yml's packages (its own list) plus the sleeper, as extra vars."""
    (tmp_path / "sleeper").mkdir(exist_ok=True)
    (tmp_path / "sleeper" / "sleep.py").write_text(SLEEPER)
    app = f"{tmp_path / 'owner'}/app"
    listed = [
        {"name": "digits-classifier", "version": "1.0.0", "src": app,
         "build": ["{{ ansible_playbook_python }}", str(ROOT / "examples" / "train_model.py"), app]},
        {"name": "sleeper", "version": "1.0.0", "src": str(tmp_path / "sleeper")},
    ]  # fmt: skip
    return ["-e", json.dumps({"owner_pipeline_packages": listed})]


def running(env: dict) -> list[dict]:
    described = subprocess.run([str(BIN / "enclave"), "local", "describe-enclaves"], env=env, capture_output=True,
                               text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(described.stdout)


def test_upgrade_replaces_the_enclave_with_the_new_image_and_pushes_the_inputs_again(tmp_path, local_cloud):
    work, env = local_cloud
    release = tmp_path / "owner" / "release"
    common = ["-e", f"owner_pipeline_workdir={tmp_path / 'owner'}", "-e", f"release_dir={release}",
              "-e", f"job_dir={tmp_path / 'job'}", "-e", f"enclave_host_dir={tmp_path / 'host'}"]  # fmt: skip
    try:
        play(env, "owner.yml", "owner", *common, *packages(tmp_path))
        play(env, "run_job.yml", "enclave-host", *common)
        (old,) = running(env)
        old_pcr0 = json.loads((release / "release.json").read_text())["image"]["measurements"]["pcr0"]
        shutil.copytree(release, tmp_path / "old-release")

        play(env, "owner.yml", "owner", *common, *packages(tmp_path),
             "-e", "owner_pipeline_signing_key_alias=alias/next-signing")  # fmt: skip
        manifest = json.loads((release / "release.json").read_text())
        new_pcr0 = manifest["image"]["measurements"]["pcr0"]
        assert new_pcr0 != old_pcr0 and manifest["allowed_pcr0"] == [new_pcr0, old_pcr0]

        # A job in the old enclave, running when the upgrade starts: the upgrade waits for it.
        inflight = enclave_cli(
            env, "run", "-f", "sleeper.pkg", "-s", "sleep.py", "-a", "/output/", "--clear-output",
            "--region", "us-east-1", "--receipt", str(tmp_path / "inflight.json"),
            "--endpoint", old["Endpoint"], "--expect-pcr0", old_pcr0,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for_job(old["Endpoint"])
        output = play(env, "upgrade.yml", "enclave-host", *common)
        stdout, stderr = inflight.communicate(timeout=120)
        assert inflight.returncode == 0 and stdout.strip() == "slept", stderr
        verified = enclave_cli(env, "receipt", "verify", str(tmp_path / "inflight.json"),
                               "--release", str(tmp_path / "old-release" / "release.json"), "--json")  # fmt: skip
        assert verified.returncode == 0, verified.stderr
        assert json.loads(verified.stdout)["module_id"] == old["EnclaveID"]
        (new,) = running(env)
        assert new["EnclaveID"] != old["EnclaveID"], "the enclave was not replaced"
        for task in ("Run the enclave", "Push the owner's packages into the new enclave",
                     "Push the user's dataset into the new enclave"):  # fmt: skip
            block = re.search(rf"TASK \[[^\]]*{re.escape(task)}.*?(?=\nTASK |\nPLAY RECAP)", output, re.S)
            assert block and "changed: [localhost]" in block[0], f"{task}: {output[-4000:]}"
        assert "Check that the enclave attests the new image's PCR0" in output

        # The new enclave has what the job needs: run_job.yml pushes nothing and its receipt names the new image.
        output = play(env, "run_job.yml", "enclave-host", *common, "-e", "clear_output=true")
        for task in ("Copy the owner's packages into the enclave's /encrypted",
                     "Copy the user's dataset into the enclave's /dataset"):  # fmt: skip
            block = re.search(rf"TASK \[{re.escape(task)}\].*?(?=\nTASK )", output, re.S)
            assert block and "ok: [localhost]" in block[0], f"{task}: {output[-4000:]}"
        receipt = subprocess.run(
            [str(BIN / "enclave"), "receipt", "verify", str(tmp_path / "job" / "receipt.json"),
             "--release", str(release / "release.json"), "--outputs", str(tmp_path / "job" / "output"), "--json"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert receipt.returncode == 0, receipt.stderr
        assert json.loads(receipt.stdout)["module_id"] == new["EnclaveID"]

        again = play(env, "upgrade.yml", "enclave-host", *common)
        assert re.search(r"^localhost +: ok=\d+ +changed=0 ", again, re.M), again[-3000:]
        assert running(env) == [new]

        # The owner drops the old PCR0: an enclave of the old image gets no key for the old package any more.
        play(env, "owner.yml", "owner", *common, *packages(tmp_path), "-e", "owner_pipeline_keep_pcr0=1",
             "-e", "owner_pipeline_signing_key_alias=alias/next-signing")  # fmt: skip
        assert json.loads((release / "release.json").read_text())["allowed_pcr0"] == [new_pcr0]
        started = enclave_cli(env, "local", "run-enclave", "--eif-path", str(tmp_path / "old-release" / "enclave.img"),
                              "--cpu-count", "1", "--memory", "128", "--enclave-name", "old-image")  # fmt: skip
        assert started.returncode == 0, started.stderr
        endpoint = json.loads(started.stdout)["Endpoint"]
        pushed = enclave_cli(env, "push", str(tmp_path / "old-release" / "packages"), "/encrypted",
                             "--endpoint", endpoint, "--expect-pcr0", old_pcr0)  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
        refused = enclave_cli(env, "run", "-f", "sleeper.pkg", "-s", "sleep.py", "-a", "/output/",
                              "--region", "us-east-1", "--endpoint", endpoint, "--expect-pcr0", old_pcr0)  # fmt: skip
        assert refused.returncode != 0, refused.stdout
        assert "AccessDenied" in refused.stderr or "not allowed" in refused.stderr, refused.stderr
    finally:
        play(env, "cleanup.yml", "enclave-host", *common)
