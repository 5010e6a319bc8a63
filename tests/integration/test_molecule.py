"""The Molecule scenarios under extensions/molecule/, each run as `molecule test -s NAME` on this machine.

No Docker: the default driver, unmanaged, runs every step on localhost (see extensions/molecule/config.yml).

    local_job    owner.yml then run_job.yml on the local backend; idempotence; outputs, accuracy, receipt
    nitro_host   the enclave_host role for backend nitro in a scratch root with the fake nitro-cli;
                 idempotence; allocator.yaml, vsock-proxy.yaml, the run-enclave call

Each scenario gets its own short ephemeral directory (its ENCLAVE_HOME lives there: local sockets allow
107 bytes of path), must run every step of its test sequence successfully, and must leave no process behind.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MOLECULE_DIR = ROOT / "extensions" / "molecule"
SCENARIOS = sorted(p.parent.name for p in MOLECULE_DIR.glob("*/molecule.yml"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ENV_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
TIMEOUT = 480  # seconds for one whole scenario (each takes 1-3 minutes here); then it is stopped


def scenario_sequence(scenario: str) -> list[str]:
    """The scenario's test sequence: its molecule.yml over the shared config.yml, as molecule merges them."""
    shared = yaml.safe_load((MOLECULE_DIR / "config.yml").read_text())
    own = yaml.safe_load((MOLECULE_DIR / scenario / "molecule.yml").read_text())
    return (own.get("scenario") or {}).get("test_sequence") or shared["scenario"]["test_sequence"]


def processes_mentioning(text: str) -> list[int]:
    """PIDs of processes whose command line mentions text (the scenario's ephemeral directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def test_the_scenarios_are_found():
    assert {"local_job", "nitro_host"} <= set(SCENARIOS), f"scenarios under {MOLECULE_DIR}: {SCENARIOS}"
    for scenario in SCENARIOS:
        sequence = scenario_sequence(scenario)
        for step in ("converge", "idempotence", "verify", "destroy"):
            assert step in sequence, f"{scenario}'s test sequence {sequence} lacks {step}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario):
    ephemeral = Path(tempfile.mkdtemp(prefix="mol-", dir="/tmp"))
    env = {
        # Credentials in the environment would win over the AWS_PROFILE the scenarios choose.
        **{k: v for k, v in os.environ.items() if k not in ENV_CREDENTIALS},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MOLECULE_EPHEMERAL_DIRECTORY": str(ephemeral),
        "NO_COLOR": "1",
        "PY_COLORS": "0",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    env.pop("ENCLAVE_ENDPOINT", None)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [str(BIN / "molecule"), "test", "--scenario-name", scenario],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        output = ANSI.sub("", proc.stdout + proc.stderr)
        took = time.monotonic() - started
        assert proc.returncode == 0, (
            f"molecule test -s {scenario} exited {proc.returncode} after {took:.0f} s; its output ends:\n"
            + "\n".join(output.splitlines()[-80:])
        )
        for step in scenario_sequence(scenario):
            assert re.search(rf"{re.escape(scenario)} \S+ {step}: Executed: Successful", output), (
                f"molecule test -s {scenario} did not report the {step} step successful; its output ends:\n"
                + "\n".join(output.splitlines()[-60:])
            )
    finally:
        if (ephemeral / "home").is_dir():  # the scenario stopped early: stop its enclaves and local cloud
            subprocess.run(
                [str(BIN / "enclave"), "local", "down", "--json"],
                env={**env, "ENCLAVE_HOME": str(ephemeral / "home")},
                capture_output=True,
                timeout=60,
                check=False,
            )
        leftovers = processes_mentioning(str(ephemeral))
        for pid in leftovers:  # started by this scenario: stop them so nothing outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ephemeral, ignore_errors=True)
    assert not leftovers, f"molecule test -s {scenario} left processes running: {leftovers}"
