"""playbooks/upgrade.yml (issue 15): after the owner publishes a new image (bound to a new signing key, so its PCR0
differs; the key policy keeps the old PCR0 too), the upgrade replaces the host's enclave with one of the new image,
checks it attests the new PCR0 and pushes the packages and the dataset again, so that run_job.yml finds them there;
a second upgrade changes nothing."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def play(env: dict, name: str, principal: str, *extra: str) -> str:
    done = subprocess.run([str(BIN / "ansible-playbook"), f"playbooks/{name}", *extra], cwd=ROOT,
                          env={**env, "AWS_PROFILE": principal}, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert done.returncode == 0, f"{name}: {done.stdout[-6000:]}{done.stderr[-2000:]}"
    return done.stdout


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
        play(env, "owner.yml", "owner", *common)
        play(env, "run_job.yml", "enclave-host", *common)
        (old,) = running(env)
        old_pcr0 = json.loads((release / "release.json").read_text())["image"]["measurements"]["pcr0"]

        play(env, "owner.yml", "owner", *common, "-e", "owner_pipeline_signing_key_alias=alias/next-signing")
        manifest = json.loads((release / "release.json").read_text())
        new_pcr0 = manifest["image"]["measurements"]["pcr0"]
        assert new_pcr0 != old_pcr0 and manifest["allowed_pcr0"] == [new_pcr0, old_pcr0]

        output = play(env, "upgrade.yml", "enclave-host", *common)
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
    finally:
        play(env, "cleanup.yml", "enclave-host", *common)
