"""`enclave doctor` for real: the whole job on the local backend (local cloud, a real enclave in its
namespaces, the local KMS enforcing the throwaway key's policy), and the nitro backend's host checks
against the fake nitro-cli, a scratch root for /etc/nitro_enclaves and /dev, and a stand-in systemctl.
A broken step stops the doctor there, with what to do, and cleanup runs whatever happened.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.cli.doctor import read_allocator
from ansible_collections.confidential_ml.nitro.enclave_local import cloud
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import StepFailedError
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fixtures" / "fake-nitro-cli"
ENCLAVE = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main"]
HOST_ROLE = cloud.PRINCIPALS["enclave-host"]  # the host's role, in the user's own account
STEPS = ["nitro-cli", "services", "device", "allocator", "kms-access", "vsock-proxy", "build", "resources",
         "run", "attestation", "key-policy", "host-refused", "job", "cleanup"]  # fmt: skip
NITRO_ONLY = STEPS[:4]
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="local enclaves' namespaces and mounts need root")


def doctor(env: dict, *args: str) -> tuple[int, dict]:
    """Run `enclave doctor --json ARGS`: its exit status and report."""
    done = subprocess.run([*ENCLAVE, "doctor", "--json", *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"no JSON report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}") from None
    return done.returncode, report


def statuses(report: dict) -> dict[str, str]:
    return {step["step"]: step["status"] for step in report["steps"]}


def step(report: dict, name: str) -> dict:
    return next(s for s in report["steps"] if s["step"] == name)


def stopped_at(report: dict, failed: str) -> None:
    """The doctor ran the steps up to `failed`, which failed, none after it, then cleaned up."""
    names = [s["step"] for s in report["steps"]]
    assert names == [*STEPS[: STEPS.index(failed) + 1], "cleanup"], names
    assert [s["step"] for s in report["steps"] if s["status"] == "fail"] == [failed], report
    assert step(report, failed)["todo"], "a failed step says what to do"
    assert step(report, "cleanup")["status"] == "ok", step(report, "cleanup")
    assert report["ok"] is False


@pytest.fixture
def local_env():
    """The environment of a host user on the local backend, with a private short ENCLAVE_HOME; afterwards
    nothing of that home may still run."""
    work = Path(tempfile.mkdtemp(prefix="doc-", dir="/tmp"))
    # The host's credentials are the enclave-host profile the local KMS issues on `enclave local up` (the doctor
    # starts it); credentials in the environment would win over the profile.
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARIABLES}
    env.update(ENCLAVE_HOME=str(work / "home"), ENCLAVE_BACKEND="local", AWS_DEFAULT_REGION="us-east-1",
               AWS_SHARED_CREDENTIALS_FILE=str(work / "home" / "kms" / "credentials"), AWS_PROFILE="enclave-host",
               AWS_CONFIG_FILE=str(work / "no-aws-config"))  # fmt: skip
    env.pop("ENCLAVE_ENDPOINT", None)
    yield env
    cloud.down(home=work / "home")
    left = processes_mentioning(str(work))
    for pid in left:  # never leave anything behind, even when the assertion below fails
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(work, ignore_errors=True)
    assert not left, f"processes left behind: {left}"


def keys(env: dict) -> list[dict]:
    state = Path(env["ENCLAVE_HOME"]) / "kms" / "kms-state.json"
    return list(json.loads(state.read_text())["keys"].values()) if state.exists() else []


@needs_root
def test_the_doctor_proves_the_local_backend_and_leaves_nothing(local_env):
    code, report = doctor(local_env, "--cpu-count", "1")
    assert code == 0, report
    assert report["ok"] is True and report["backend"] == "local"
    assert [s["step"] for s in report["steps"]] == STEPS
    for name in NITRO_ONLY:
        assert step(report, name)["status"] == "skip" and "local backend" in step(report, name)["detail"]
    assert all(statuses(report)[name] == "ok" for name in STEPS[4:]), report
    assert all(isinstance(s["seconds"], float) and s["seconds"] >= 0 for s in report["steps"])

    pcr0 = step(report, "build")["detail"].rsplit("PCR0 ", 1)[1]
    assert len(pcr0) == 96
    assert "(started)" in step(report, "kms-access")["detail"]  # the doctor brought the local cloud up...
    assert cloud.status(local_env["ENCLAVE_HOME"]) is None  # ...and took it down again
    assert "AccessDeniedException" in step(report, "host-refused")["detail"]
    assert "Decrypt with Recipient" in step(report, "job")["detail"]
    # The job reported what it could reach of the server's: nothing (it runs as the job uid).
    assert "the job ran as uid 65534, refused the NSM, the KMS forwarder and /tmp" in step(report, "job")["detail"]
    # The image was bound to the doctor's throwaway signing key, and the package the enclave ran was signed by it.
    signer = step(report, "build")["detail"].split("bound to throwaway signing key ", 1)[1][:16]
    assert f"package signed by {signer}" in step(report, "job")["detail"]

    # The throwaway key allowed exactly the image the doctor built, and is now pending deletion (7 days).
    (key,) = keys(local_env)
    assert key["KeyState"] == "PendingDeletion"
    assert 6.9 * 86400 < key["DeletionDate"] - key["CreationDate"] < 7.1 * 86400
    policy = json.loads(key["Policy"])
    allow = next(s for s in policy["Statement"] if s["Effect"] == "Allow" and "Condition" in s)
    assert allow["Principal"] == {"AWS": [HOST_ROLE]}
    assert allow["Condition"]["StringEqualsIgnoreCase"]["kms:RecipientAttestation:ImageSha384"] == [pcr0]
    # The enclave was terminated, the scratch directory removed.
    described = subprocess.run([*ENCLAVE, "local", "describe-enclaves"], env=local_env, capture_output=True,
                               text=True, check=True)  # fmt: skip
    assert json.loads(described.stdout) == []
    scratch = step(report, "build")["detail"].split(" ", 1)[0]
    assert not Path(scratch).exists() and not Path(scratch).parent.exists()


@needs_root
def test_a_key_policy_without_the_image_stops_the_doctor_there(local_env, tmp_path):
    """The owner's policy template names another PCR0: the doctor stops at key-policy, says what to do,
    and still terminates the enclave and schedules the key's deletion; a local cloud it found running
    stays running."""
    running = cloud.up(home=local_env["ENCLAVE_HOME"])
    other = "ab" * 48
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "HostSealsAndDeletes", "Effect": "Allow", "Principal": {"AWS": "${USER}"},
             "Action": ["kms:GenerateDataKey", "kms:ScheduleKeyDeletion"], "Resource": "*"},
            {"Sid": "EnclaveDecryptWithAttestation", "Effect": "Allow", "Principal": {"AWS": "${USER}"},
             "Action": "kms:Decrypt", "Resource": "*",
             "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": [other]}}},
            {"Sid": "DenyDecryptWithoutAttestation", "Effect": "Deny", "Principal": "*",
             "Action": ["kms:Decrypt", "kms:ReEncrypt*"], "Resource": "*",
             "Condition": {"StringNotEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": [other]}}},
        ],
    }  # fmt: skip
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    code, report = doctor(local_env, "--cpu-count", "1", "--key-policy", str(tmp_path / "policy.json"))
    assert code == 1
    stopped_at(report, "key-policy")
    failed = step(report, "key-policy")
    assert other in failed["detail"] and "not this image's" in failed["detail"]
    assert "enclave policy render" in failed["todo"]
    (key,) = keys(local_env)
    assert key["KeyState"] == "PendingDeletion"
    assert "terminated enclave" in step(report, "cleanup")["detail"]
    assert cloud.status(local_env["ENCLAVE_HOME"])["process"] == running["process"]


@needs_root
def test_a_policy_pinning_a_pcr8_the_image_lacks_fails_the_job_in_the_enclave(local_env, tmp_path):
    """The policy allows the PCR0 and this host (lint finds it sound), but its Allow also wants a PCR8,
    which an unsigned image does not attest: only the enclave's own Decrypt with Recipient shows it."""
    other = "ab" * 48
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "HostSealsAndDeletes", "Effect": "Allow", "Principal": {"AWS": "${USER}"},
             "Action": ["kms:GenerateDataKey", "kms:ScheduleKeyDeletion"], "Resource": "*"},
            {"Sid": "EnclaveDecryptWithAttestation", "Effect": "Allow", "Principal": {"AWS": "${USER}"},
             "Action": "kms:Decrypt", "Resource": "*",
             "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": ["${PCR0}"],
                                                      "kms:RecipientAttestation:PCR8": [other]}}},
            {"Sid": "DenyDecryptWithoutAttestation", "Effect": "Deny", "Principal": "*",
             "Action": ["kms:Decrypt", "kms:ReEncrypt*"], "Resource": "*",
             "Condition": {"StringNotEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": ["${PCR0}"]}}},
        ],
    }  # fmt: skip
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    code, report = doctor(local_env, "--cpu-count", "1", "--key-policy", str(tmp_path / "policy.json"))
    assert code == 1
    stopped_at(report, "job")
    assert statuses(report)["key-policy"] == statuses(report)["host-refused"] == "ok"
    assert "AccessDeniedException" in step(report, "job")["detail"]
    assert "PCR8 only for signed images" in step(report, "job")["todo"]
    (key,) = keys(local_env)
    assert key["KeyState"] == "PendingDeletion"


def test_a_local_allowlist_without_the_kms_stops_the_doctor_there(local_env):
    cloud.up(home=local_env["ENCLAVE_HOME"])
    config = Path(local_env["ENCLAVE_HOME"]) / "vsock-proxy.yaml"
    config.write_text("allowlist:\n- {address: 127.0.0.1, port: 9}\n")
    code, report = doctor(local_env)
    assert code == 1
    stopped_at(report, "vsock-proxy")
    assert "127.0.0.1:9" in step(report, "vsock-proxy")["detail"]
    assert "enclave local up" in step(report, "vsock-proxy")["todo"]
    assert step(report, "cleanup")["detail"] == "nothing to clean up"
    assert keys(local_env) == []


def test_credentials_the_local_kms_did_not_issue_stop_the_doctor_at_kms_access(local_env):
    """Credentials in the environment win over the issued profile in boto3, and the local KMS refuses them:
    the doctor says which file and profile to use, and stops the local cloud it started."""
    local_env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    code, report = doctor(local_env)
    assert code == 1
    stopped_at(report, "kms-access")
    failed = step(report, "kms-access")
    assert "access key testing is not one the local KMS issued" in failed["detail"]
    assert "AWS_PROFILE=enclave-host" in failed["todo"] and "unset AWS_ACCESS_KEY_ID" in failed["todo"]
    assert step(report, "cleanup")["detail"] == "stopped the local cloud it started"
    assert cloud.status(local_env["ENCLAVE_HOME"]) is None


# ---------------------------------------------------------------- nitro, against the fake nitro-cli


@pytest.fixture
def nitro(tmp_path):
    """A Nitro parent as files: the fake nitro-cli, a scratch root with the enclave_host role's
    configuration and the device, a systemctl that reports the services' states, and the env."""
    root = tmp_path / "root"
    (root / "etc" / "nitro_enclaves").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "dev" / "nitro_enclaves").touch()
    (root / "etc" / "nitro_enclaves" / "allocator.yaml").write_text("---\nmemory_mib: 2048\ncpu_count: 2\n")
    (root / "etc" / "nitro_enclaves" / "vsock-proxy.yaml").write_text(
        "allowlist:\n  - {address: kms.eu-west-1.amazonaws.com, port: 443}\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(
        '#!/bin/sh\n# is-active SERVICE: the state in $SERVICE_STATES_DIR/SERVICE, else "active"\n'
        'cat "$SERVICE_STATES_DIR/$2" 2>/dev/null || echo active\n'
    )
    (bin_dir / "systemctl").chmod(0o755)
    (tmp_path / "services").mkdir()
    state = tmp_path / "nitro-state"
    state.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_NITRO_CLI_STATE=str(state),
               SERVICE_STATES_DIR=str(tmp_path / "services"), AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
               AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="eu-west-1")  # fmt: skip
    env.pop("FAKE_NITRO_CLI_FAIL", None)
    args = ["--backend", "nitro", "--nitro-cli", str(FAKE), "--root", str(root), "--user-principal", HOST_ROLE,
            "--boot-timeout", "1"]  # fmt: skip
    return {"root": root, "state": state, "env": env, "args": args, "services": tmp_path / "services"}


def fake_calls(nitro) -> list[list[str]]:
    log = nitro["state"] / "calls.jsonl"
    return [json.loads(line)["argv"] for line in log.read_text().splitlines()] if log.exists() else []


def test_nitro_host_checks_pass_and_a_fake_enclave_stops_the_doctor_at_attestation(nitro):
    """The fake nitro-cli starts no enclave (and vsock cannot loop back here): every host check and
    build and run pass, attestation fails saying what to do, and the enclave is terminated."""
    code, report = doctor(nitro["env"], *nitro["args"], "--cpu-count", "2")
    assert code == 1
    stopped_at(report, "attestation")
    assert report["backend"] == "nitro"
    assert "answers describe-enclaves" in step(report, "nitro-cli")["detail"]
    assert "nitro-enclaves-vsock-proxy.service active" in step(report, "services")["detail"]
    assert "memory_mib 2048, 2 CPU(s)" in step(report, "allocator")["detail"]
    assert "AWS KMS in eu-west-1" in step(report, "kms-access")["detail"]
    assert "kms.eu-west-1.amazonaws.com:443" in step(report, "vsock-proxy")["detail"]
    assert "of the allocator's 2048 MiB and 2" in step(report, "resources")["detail"]
    attestation = step(report, "attestation")
    assert "no enclave server answered" in attestation["detail"]
    assert "nitro-cli console" in attestation["todo"]

    calls = fake_calls(nitro)
    (build,) = [argv for argv in calls if argv[0] == "build-enclave"]
    (run,) = [argv for argv in calls if argv[0] == "run-enclave"]
    assert run[run.index("--cpu-count") + 1] == "2" and run[run.index("--memory") + 1] == "256"
    terminate = calls[-1]
    assert terminate[:2] == ["terminate-enclave", "--enclave-id"]
    assert json.loads((nitro["state"] / "enclaves.json").read_text()) == []
    assert f"terminated enclave {terminate[2]}" in step(report, "cleanup")["detail"]
    assert not Path(build[build.index("--output-file") + 1]).parent.exists()


def _no_allocator(nitro):
    (nitro["root"] / "etc" / "nitro_enclaves" / "allocator.yaml").unlink()
    return "allocator", "does not exist", "memory_mib: N"


def _allocator_without_dashes(nitro):
    (nitro["root"] / "etc" / "nitro_enclaves" / "allocator.yaml").write_text("memory_mib: 2048\ncpu_count: 2\n")
    return "allocator", "does not start with `---`", "memory_mib: N"


def _allocator_with_both_cpu_settings(nitro):
    path = nitro["root"] / "etc" / "nitro_enclaves" / "allocator.yaml"
    path.write_text("---\nmemory_mib: 2048\ncpu_count: 2\ncpu_pool: 1,3\n")
    return "allocator", "exactly one of cpu_count and cpu_pool", "not both"


def _no_credentials(nitro):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        nitro["env"].pop(name, None)
    nitro["env"].update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(nitro["root"] / "none"),
                        AWS_CONFIG_FILE=str(nitro["root"] / "none"))  # fmt: skip
    return "kms-access", "no AWS credentials on this host", "instance role"


def _allowlist_without_the_region(nitro):
    path = nitro["root"] / "etc" / "nitro_enclaves" / "vsock-proxy.yaml"
    path.write_text("allowlist:\n  - {address: kms.us-east-1.amazonaws.com, port: 443}\n")
    return "vsock-proxy", "not kms.eu-west-1.amazonaws.com:443", "{address: kms.eu-west-1.amazonaws.com, port: 443}"


def _proxy_stopped(nitro):
    (nitro["services"] / "nitro-enclaves-vsock-proxy.service").write_text("failed\n")
    return "services", "nitro-enclaves-vsock-proxy.service is failed", "systemctl enable --now"


def _no_device(nitro):
    (nitro["root"] / "dev" / "nitro_enclaves").unlink()
    return "device", "does not exist", "modprobe nitro_enclaves"


def _no_nitro_cli(nitro):
    nitro["args"][nitro["args"].index("--nitro-cli") + 1] = str(nitro["root"] / "no-such-nitro-cli")
    return "nitro-cli", "is not installed", "install the AWS Nitro Enclaves CLI"


def _allocator_too_small(nitro):
    (nitro["root"] / "etc" / "nitro_enclaves" / "allocator.yaml").write_text("---\nmemory_mib: 128\ncpu_pool: 1,3\n")
    return "resources", "the allocator reserves 128 MiB, the enclave needs 256 MiB", "set memory_mib: 256"


def _too_few_cpus(nitro):
    (nitro["root"] / "etc" / "nitro_enclaves" / "allocator.yaml").write_text("---\nmemory_mib: 512\ncpu_count: 1\n")
    return "resources", "reserves 1 CPU(s), the enclave asks for 2", "cpu_count: 2"


def _enclaves_hold_the_memory(nitro):
    (nitro["state"] / "enclaves.json").write_text(json.dumps([{
        "EnclaveName": "production", "EnclaveID": "i-0fa4e1c5d2b3a6978-enc0000000000000001", "ProcessID": 4000,
        "EnclaveCID": 16, "NumberOfCPUs": 2, "CPUIDs": [1, 3], "MemoryMiB": 1920, "State": "RUNNING", "Flags": "NONE",
    }]))  # fmt: skip
    return "resources", "running enclaves hold 1920 MiB and 2 CPU(s)", "nitro-cli terminate-enclave"


def _nitro_cli_refuses_to_run(nitro):
    nitro["env"]["FAKE_NITRO_CLI_FAIL"] = "run-enclave:E36"
    return "run", "[ E36 ]", "the enclave did not boot"


@pytest.mark.parametrize(
    "break_it",
    [_no_nitro_cli, _proxy_stopped, _no_device, _no_allocator, _allocator_without_dashes,
     _allocator_with_both_cpu_settings, _no_credentials, _allowlist_without_the_region, _allocator_too_small,
     _too_few_cpus, _enclaves_hold_the_memory, _nitro_cli_refuses_to_run],
)  # fmt: skip
def test_a_broken_nitro_host_stops_the_doctor_at_that_step(nitro, break_it):
    failed, detail, todo = break_it(nitro)
    code, report = doctor(nitro["env"], *nitro["args"])
    assert code == 1
    stopped_at(report, failed)
    assert detail in step(report, failed)["detail"]
    assert todo in step(report, failed)["todo"]
    assert not any(argv[0] == "run-enclave" for argv in fake_calls(nitro)) or failed == "run"
    if (nitro["state"] / "enclaves.json").exists():  # the doctor's own enclave is gone, others are left alone
        left = [e["EnclaveName"] for e in json.loads((nitro["state"] / "enclaves.json").read_text())]
        assert left == (["production"] if break_it is _enclaves_hold_the_memory else [])


def test_an_enclave_whose_start_could_not_be_read_is_still_terminated(nitro, tmp_path):
    """nitro-cli started the enclave but printed nothing the runtime can read (another version's output):
    the run step fails, and cleanup finds the doctor's enclave by its name and terminates it."""
    odd = tmp_path / "odd-nitro-cli"
    odd.write_text(f'#!/bin/sh\nif [ "$1" = run-enclave ]; then "{FAKE}" "$@" >/dev/null && echo Started.; exit; fi\n'
                   f'exec "{FAKE}" "$@"\n')  # fmt: skip
    odd.chmod(0o755)
    nitro["args"][nitro["args"].index("--nitro-cli") + 1] = str(odd)
    code, report = doctor(nitro["env"], *nitro["args"])
    assert code == 1
    stopped_at(report, "run")
    assert "printed 0 JSON dicts" in step(report, "run")["detail"]
    (run,) = [argv for argv in fake_calls(nitro) if argv[0] == "run-enclave"]
    name = run[run.index("--enclave-name") + 1]
    assert f"made sure no enclave {name} is left" in step(report, "cleanup")["detail"]
    assert fake_calls(nitro)[-1][:2] == ["terminate-enclave", "--enclave-id"]
    assert json.loads((nitro["state"] / "enclaves.json").read_text()) == []


def test_the_text_report_has_one_line_per_step_and_what_to_do(nitro):
    (nitro["root"] / "etc" / "nitro_enclaves" / "allocator.yaml").unlink()
    done = subprocess.run([*ENCLAVE, "doctor", *nitro["args"]], env=nitro["env"], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == "enclave doctor: checking the nitro backend step by step"
    marks = [line.split()[:2] for line in lines[1:-1] if not line.startswith(" ")]
    assert marks == [["ok", "nitro-cli"], ["ok", "services"], ["ok", "device"], ["FAIL", "allocator"],
                     ["ok", "cleanup"]]  # fmt: skip
    fail_at = next(i for i, line in enumerate(lines) if line.startswith("FAIL"))
    assert lines[fail_at].endswith(" s)")
    assert lines[fail_at + 1].startswith("      what to do: write ")
    assert lines[-1] == "this host cannot run jobs yet: see FAIL above"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("---\nmemory_mib: 4096\ncpu_count: 4\n", (4096, 4)), ("---\nmemory_mib: 512\ncpu_pool: 1,3\n", (512, 2)),
     ("---\nmemory_mib: 512\ncpu_pool: 2-5,8\n", (512, 5))],
)  # fmt: skip
def test_allocator_resources_are_read_as_the_allocator_reads_them(tmp_path, text, expected):
    (tmp_path / "allocator.yaml").write_text(text)
    assert read_allocator(tmp_path / "allocator.yaml") == expected


@pytest.mark.parametrize("pool", ["5-2", "one,two", ""])
def test_an_unreadable_cpu_pool_is_refused(tmp_path, pool):
    (tmp_path / "allocator.yaml").write_text(f"---\nmemory_mib: 512\ncpu_pool: '{pool}'\n")
    with pytest.raises(StepFailedError, match="unreadable cpu_pool") as failed:
        read_allocator(tmp_path / "allocator.yaml")
    assert "systemctl restart nitro-enclaves-allocator" in failed.value.todo


@pytest.mark.parametrize(
    "seen, reached",
    [
        ({"uid": 0, "nsm": "allowed", "kms_forwarder": "allowed", "tmp": "allowed"}, "nsm, kms_forwarder, tmp"),
        ({"uid": 65534, "nsm": "PermissionError", "kms_forwarder": "allowed", "tmp": "OSError"}, "kms_forwarder"),
        ({"uid": 0, "nsm": "PermissionError", "kms_forwarder": "ConnectionResetError", "tmp": "OSError"}, "what root"),
    ],
)
def test_a_job_that_reaches_what_only_the_server_may_fails_the_job_step(seen, reached):
    """On a kernel without what job isolation rests on, the doctor's job reports it and the step fails."""
    from types import SimpleNamespace

    from ansible_collections.confidential_ml.nitro.cli.doctor import Doctor

    output = f"enclave-doctor abc\nenclave-doctor-isolation {json.dumps(seen)}\n"
    with pytest.raises(StepFailedError, match=f"could reach {reached}") as failed:
        Doctor._check_job_isolation(SimpleNamespace(nitro=True), output)
    assert "jobs are not isolated in this enclave" in failed.value.todo
    isolated = {"uid": 65534, "nsm": "PermissionError", "kms_forwarder": "ConnectionResetError", "tmp": "OSError"}
    done = Doctor._check_job_isolation(SimpleNamespace(nitro=True), f"enclave-doctor-isolation {json.dumps(isolated)}")
    assert done == "; the job ran as uid 65534, refused the NSM, the KMS forwarder and /tmp"
