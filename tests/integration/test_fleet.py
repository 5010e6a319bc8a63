"""A fleet: inventory/fleet.yml's three enclave hosts (all on this machine, local backend) run the job in parallel.

owner.yml runs once; run_job.yml then runs on enclave-a, enclave-b and enclave-c with --forks 3. Each host
must have started its own enclave (the name and CID the inventory gives it), brought back its own outputs
(job_dir is per host) and kept its own receipt, signed by its own enclave (module_id = that enclave's ID)
and verifying offline against the release and that host's outputs. cleanup.yml then leaves nothing running.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
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
        [str(BIN / "ansible-playbook"), "-i", str(FLEET), "playbooks/cleanup.yml", "-e", host_dir(work)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    left = describe_enclaves(env)
    assert cleanup.returncode == 0, f"cleanup.yml failed:\n{cleanup.stdout[-3000:]}{cleanup.stderr[-2000:]}"
    assert left.stdout.strip() in ("", "[]"), f"cleanup.yml left local enclaves running: {left.stdout}"


def host_dir(work: Path) -> str:
    """Each host's own directory (enclave_host_dir) under the test's work directory, not the shared default."""
    return f"enclave_host_dir={work / 'hosts'}/{{{{ inventory_hostname }}}}"


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
        "-e", host_dir(work),
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


# --- A fleet reached over SSH (issue 15) ------------------------------------------------------------------------
#
# Three enclave hosts, each an sshd on its own loopback address (127.0.0.2-4) in its own mount namespace, where
# this checkout and the controller's release and job directories are masked (empty tmpfs), the home directory is
# its own (tmpfs; only the interpreter's installation is bound back in) and so is /var/lib/confidential-ml. What
# a host shares with the controller is what a real fleet shares with AWS: the local cloud's state (ENCLAVE_HOME:
# the KMS that holds the owner's key and the root its simulated NSM signs with), and the Python environment the
# local image was measured in (this venv, copy-on-write through overlayfs, so that the role's pip install of the
# project's wheel stays in the host). The local runtime's directory under /run is shared too, so that the
# controller can see the hosts' enclaves.

SSHD = Path("/usr/sbin/sshd")
FLEET_ADDRESSES = {"enclave-a": "127.0.0.2", "enclave-b": "127.0.0.3", "enclave-c": "127.0.0.4"}

HOST_SETUP = """\
set -eu
stage=$1; shift
# Keep handles on what is bound back in, before masking: the venv (copy-on-write) and the interpreter.
mkdir -p "$stage/venv" "$stage/python" "$stage/overlay"
mount -t tmpfs tmpfs "$stage/overlay"
mkdir "$stage/overlay/upper" "$stage/overlay/work"
mount -t overlay overlay -o "lowerdir=$VENV,upperdir=$stage/overlay/upper,workdir=$stage/overlay/work" "$stage/venv"
mount --bind "$PYTHON_PREFIX" "$stage/python"
for dir in $MASK; do mount -t tmpfs -o mode=0755 tmpfs "$dir"; done
mount -t tmpfs -o mode=0700 tmpfs "$HOME_DIR"
# After the masks and the home (either may hold them): the venv and the interpreter, bound back at their paths.
mkdir -p "$VENV" && mount --bind "$stage/venv" "$VENV"
mkdir -p "$PYTHON_PREFIX" && mount --bind "$stage/python" "$PYTHON_PREFIX"
mkdir -p /var/lib/confidential-ml && mount -t tmpfs -o mode=0755 tmpfs /var/lib/confidential-ml
mkdir -p /run/sshd
exec "$SSHD" -D -e -f "$stage/sshd_config"
"""


def free_port(addresses) -> int:
    """A TCP port free on every one of addresses (loopback)."""
    for _attempt in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no TCP port is free on all of {addresses}")


def wait_for_ssh(address: str, port: int, proc: subprocess.Popen, log: Path) -> None:
    for _attempt in range(300):
        assert proc.poll() is None, f"sshd on {address} exited: {log.read_text()}"
        with socket.socket() as probe:
            probe.settimeout(1)
            if probe.connect_ex((address, port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"sshd on {address}:{port} never listened: {log.read_text()}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built on the controller as a user would (pip wheel; hatchling from the package index)."""
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                           capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("confidential_ml_nitro-*.whl")
    return found


@pytest.fixture
def ssh_fleet(local_cloud, wheel):
    """(work, env, inventory): three sshd hosts in their own mount namespaces, stopped afterwards."""
    assert SSHD.exists(), f"{SSHD} is missing: install Debian's openssh-server (make deps)"
    work, env = local_cloud
    hosts_dir = work / "hosts"
    hosts_dir.mkdir()
    key = hosts_dir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    port = free_port(list(FLEET_ADDRESSES.values()))
    venv = Path(sys.prefix)
    # Whatever holds this checkout's venv scripts' interpreter (a shared venv's own checkout) is masked as well.
    shebang = Path((venv / "bin" / "pip").read_text().splitlines()[0].removeprefix("#!"))
    mask = sorted({str(ROOT), str(work / "owner"), str(work / "jobs"), str(shebang.parents[2])})
    for name in ("owner", "jobs"):
        (work / name).mkdir()
    home_dir = Path.home()
    host_env = {
        "ENCLAVE_HOME": env["ENCLAVE_HOME"],
        "AWS_SHARED_CREDENTIALS_FILE": env["AWS_SHARED_CREDENTIALS_FILE"],
        "AWS_CONFIG_FILE": env["AWS_CONFIG_FILE"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_PROFILE": "enclave-host",
        "AWS_EC2_METADATA_DISABLED": "true",
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    }
    procs = []
    try:
        for name, address in FLEET_ADDRESSES.items():
            stage = hosts_dir / name
            stage.mkdir()
            host_key = stage / "ssh_host_ed25519_key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
            (stage / "sshd_config").write_text(
                f"ListenAddress {address}:{port}\nHostKey {host_key}\nPidFile none\nUsePAM no\nStrictModes no\n"
                f"PermitRootLogin prohibit-password\nAuthorizedKeysFile {key}.pub\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nMaxStartups 30\n"
                f"SetEnv {' '.join(f'{k}={v}' for k, v in host_env.items())}\n"
            )
            log = stage / "sshd.log"
            proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", HOST_SETUP, "host-setup", str(stage)],
                env={**os.environ, "VENV": str(venv), "PYTHON_PREFIX": str(Path(sys.base_prefix).resolve()),
                     "MASK": " ".join(mask), "HOME_DIR": str(home_dir), "SSHD": str(SSHD)},
                stdout=log.open("w"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            procs.append(proc)
            wait_for_ssh(address, port, proc, log)
        inventory = {
            "all": {
                "children": {
                    "owner": {"hosts": {"localhost": {"ansible_connection": "local",
                                                      "ansible_python_interpreter": sys.executable}}},
                    "enclave_hosts": {
                        "hosts": {
                            name: {"ansible_host": address, "enclave_host_name": f"confidential-ml-{name[-1]}",
                                   "enclave_host_cid": str(16 + i)}
                            for i, (name, address) in enumerate(FLEET_ADDRESSES.items())
                        },
                        "vars": {
                            "ansible_connection": "ssh", "ansible_user": "root", "ansible_port": port,
                            "ansible_ssh_private_key_file": str(key),
                            "ansible_ssh_common_args": "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no",
                            "ansible_python_interpreter": str(venv / "bin" / "python"),
                            "enclave_host_cpu_count": 1, "enclave_host_memory_mib": 128,
                            "enclave_host_wheel": str(wheel),
                            # The host has the dependencies (the environment the image was measured in).
                            "enclave_host_pip_extra_args": "--no-deps --ignore-installed",
                        },
                    },
                }
            }
        }  # fmt: skip
        path = work / "ssh-fleet.yml"
        path.write_text(yaml.safe_dump(inventory))
        env = {**env, "ANSIBLE_SSH_CONTROL_PATH_DIR": str(work / "cp"), "ANSIBLE_HOST_KEY_CHECKING": "False"}
        yield work, env, path
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def timed_playbook(env: dict, inventory: Path, *args: str, principal: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), *args],
        cwd=ROOT, env={**env, "AWS_PROFILE": principal}, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"ansible-playbook {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    )
    return proc, time.monotonic() - start


def test_fleet_over_ssh_runs_the_job_on_hosts_that_cannot_see_the_controllers_files(ssh_fleet):
    work, env, inventory = ssh_fleet
    release = work / "owner" / "release"
    seconds = {}
    try:
        owner_workdir = f"owner_pipeline_workdir={work / 'owner'}"
        seconds["owner.yml"] = timed_playbook(env, inventory, "playbooks/owner.yml", "-e", owner_workdir,
                                              principal="owner")[1]  # fmt: skip
        run, seconds["run_job.yml"] = timed_playbook(
            env, inventory, "playbooks/run_job.yml", "--forks", "3", "-e", f"release_dir={release}",
            "-e", f"job_dir={work / 'jobs'}/{{{{ inventory_hostname }}}}", principal="enclave-host",
        )  # fmt: skip
        counters = recap(run.stdout)
        enclaves = {e["EnclaveName"]: e for e in json.loads(describe_enclaves(env).stdout)}
        for i, (host, address) in enumerate(FLEET_ADDRESSES.items()):
            assert counters.get(host, {}).get("failed") == 0 and counters[host]["changed"] > 0, counters
            # The host saw neither the checkout nor the release: the role copied the release there.
            seen = subprocess.run(
                ["ssh", "-i", str(work / "hosts" / "id_ed25519"), "-p", str(inventory_port(inventory)),
                 "-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no", f"root@{address}",
                 f"ls -A {ROOT}; test -e {release} || echo no-release-here;"
                 f" ls /var/lib/confidential-ml/confidential-ml-{host[-1]}/release"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert seen.stdout.split() == [".venv", "no-release-here", "enclave.img", "packages", "release.json"], (
                seen.stdout + seen.stderr
            )
            job_dir = work / "jobs" / host
            metrics = json.loads((job_dir / "output" / "metrics.json").read_text())
            assert metrics["accuracy"] > 0.9, f"{host}'s job reports {metrics}"
            enclave = enclaves[f"confidential-ml-{host[-1]}"]
            assert enclave["EnclaveCID"] == 16 + i
            verified = subprocess.run(
                [str(BIN / "enclave"), "receipt", "verify", str(job_dir / "receipt.json"),
                 "--release", str(release / "release.json"), "--outputs", str(job_dir / "output"), "--json"],
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert verified.returncode == 0, verified.stderr
            assert json.loads(verified.stdout)["module_id"] == enclave["EnclaveID"]
        assert run.stdout.count("Verify the receipt on the controller") == 1  # one task, three hosts
    finally:
        seconds["cleanup.yml"] = timed_playbook(env, inventory, "playbooks/cleanup.yml", principal="enclave-host")[1]
        print("ssh fleet:", ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items()))
    assert describe_enclaves(env).stdout.strip() in ("", "[]")


def inventory_port(inventory: Path) -> int:
    return yaml.safe_load(inventory.read_text())["all"]["children"]["enclave_hosts"]["vars"]["ansible_port"]


def test_a_failing_host_does_not_stop_the_others_and_a_rerun_finishes_it(fleet_env, tmp_path):
    """Failures are contained (issue 15): enclave-b's enclave cannot start (its image is not where its inventory
    says), yet enclave-a and enclave-c run their jobs to verified receipts; run_job.yml again, limited to the
    retry list Ansible wrote, with enclave-b fixed, finishes the job there and touches no other host."""
    work, env = fleet_env
    release = work / "owner" / "release"  # the session's owner.yml published it
    jobs = tmp_path / "jobs"  # the session's work folder is shared: another test's jobs may be there
    broken = yaml.safe_load(FLEET.read_text())
    broken["all"]["children"]["enclave_hosts"]["hosts"]["enclave-b"]["enclave_host_image"] = str(tmp_path / "none.img")
    inventory = tmp_path / "fleet.yml"
    inventory.write_text(yaml.safe_dump(broken))
    common = ["--forks", "3", "-e", f"release_dir={release}", "-e", host_dir(work),
              "-e", f"job_dir={jobs}/{{{{ inventory_hostname }}}}"]  # fmt: skip
    retry = tmp_path / "retry"
    first = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), "playbooks/run_job.yml", *common],
        cwd=ROOT, env={**env, "AWS_PROFILE": "enclave-host", "ANSIBLE_RETRY_FILES_ENABLED": "1",
                       "ANSIBLE_RETRY_FILES_SAVE_PATH": str(retry)},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert first.returncode == 2, first.stdout[-4000:]
    counters = recap(first.stdout)
    assert counters["enclave-b"]["failed"] == 1, counters
    assert "The enclave image " + str(tmp_path / "none.img") + " does not exist on enclave-b" in first.stdout
    for host in ("enclave-a", "enclave-c"):
        assert counters[host]["failed"] == 0 and (jobs / host / "receipt.json").is_file(), counters
    assert not (jobs / "enclave-b").exists()
    assert (retry / "run_job.retry").read_text().split() == ["enclave-b"]
    receipts = {h: (jobs / h / "receipt.json").read_bytes() for h in ("enclave-a", "enclave-c")}

    again = playbook(env, "playbooks/run_job.yml", "--limit", f"@{retry / 'run_job.retry'}", *common,
                     principal="enclave-host")  # fmt: skip
    assert set(recap(again.stdout)) == {"enclave-b"}, again.stdout[-3000:]
    assert json.loads((jobs / "enclave-b" / "output" / "metrics.json").read_text())["accuracy"] > 0.9
    assert {h: (jobs / h / "receipt.json").read_bytes() for h in receipts} == receipts
