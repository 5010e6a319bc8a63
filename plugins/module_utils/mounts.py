"""The share mounts `enclave sync` makes on this host: the mount table, the state file each mount
process keeps under ENCLAVE_HOME/mounts/, and unmounting (fusermount3, then waiting for the process).

What the enclave_sync module, the CLI (`enclave sync --unmount`, `enclave status`) and `enclave local
down` read; the mount process itself (FUSE, mfusepy) is host code in cli/fusefs.py, which modules
start through the installed `enclave sync` command (mount_with_cli), never by importing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import settings
from .errors import EnclaveError
from .runtime import LOCAL_CLI

EXIT_TIMEOUT = 30.0  # for a mount process to exit once unmounted


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, MAJOR:MINOR, filesystem type) of every mount, from /proc/self/mountinfo."""
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.partition(" - ")[::2]
            fields = left.split()
            if len(fields) >= 5 and right:
                rows.append((_unescape(fields[4]), fields[2], right.split()[0]))
    return rows


def mount_table() -> dict[str, str]:
    """Mount point -> filesystem type (the last mount on a point wins)."""
    return {row[0]: row[2] for row in _mountinfo()}


def mount_devices() -> dict[str, str]:
    return {row[0]: row[1] for row in _mountinfo()}


def canonical(mountpoint) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(mountpoint)))


def is_mounted(mountpoint) -> bool:
    """Whether a filesystem is mounted exactly at mountpoint."""
    return canonical(mountpoint) in mount_table()


def state_paths(mountpoint: str) -> dict[str, Path]:
    key = hashlib.sha256(mountpoint.encode()).hexdigest()[:16]
    base = settings.state_home() / "mounts"
    return {"state": base / f"{key}.json", "log": base / f"{key}.log", "stats": base / f"{key}.stats.json"}


def mount_state(mountpoint) -> dict | None:
    """The state file of the mount at mountpoint (pid, endpoint, log, ...), if this host made one."""
    try:
        return json.loads(state_paths(canonical(mountpoint))["state"].read_text())
    except (OSError, ValueError):
        return None


def mounts() -> list[dict]:
    """The share mounts `enclave sync` made under this ENCLAVE_HOME (their state files), each with "mounted" (a
    FUSE mount is at its mount point) and "alive" (its process runs): both false once it is gone."""
    found = []
    base = settings.state_home() / "mounts"
    for path in sorted(base.glob("*.json")) if base.is_dir() else ():
        if path.name.endswith(".stats.json"):
            continue
        try:
            state = json.loads(path.read_text())
            mountpoint = state["mountpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        mounted = mount_table().get(mountpoint, "").split(".")[0] in ("fuse", "fuseblk")
        found.append(dict(state, mounted=mounted, alive=isinstance(state.get("pid"), int) and alive(state)))
    return found


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): tells a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def alive(state: dict) -> bool:
    ticks = start_ticks(state["pid"])
    return ticks is not None and ticks == state.get("start_ticks")


def write_state(paths: dict, state: dict) -> None:
    settings.private_dir(paths["state"].parent)
    tmp = paths["state"].with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(paths["state"])


def unmount(mountpoint, *, lazy: bool = False) -> None:
    """Unmount the share at mountpoint and wait for its mount process to exit.

    lazy detaches it even while in use (fusermount3 -z): the process then exits once nothing uses it."""
    mountpoint = canonical(mountpoint)
    paths = state_paths(mountpoint)
    state = mount_state(mountpoint)
    if not is_mounted(mountpoint):
        if state is not None and not alive(state):
            paths["state"].unlink(missing_ok=True)
        raise EnclaveError(f"nothing is mounted at {mountpoint}: there is nothing to unmount")
    if mount_table().get(mountpoint, "").split(".")[0] not in ("fuse", "fuseblk"):
        raise EnclaveError(
            f"{mountpoint} is a {mount_table()[mountpoint]} mount, not an enclave share: not touching it"
        )
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise EnclaveError("fusermount3 is not installed: apt-get install fuse3") from None
    if result.returncode != 0:
        why = result.stderr.strip() or f"exit status {result.returncode}"
        hint = (
            "a process still uses it (an open file or a shell inside it; `fuser -vm` shows which): "
            "close it and retry, or detach it now and let it go when unused (enclave sync --unmount --lazy)"
            if "busy" in why.lower()
            else "see the message"
        )
        raise EnclaveError(f"could not unmount {mountpoint}: {why}; {hint}")
    if state is not None and not lazy:  # lazily detached, the process serves what is still open, then exits
        # A mount namespace made while the share was mounted (unshare, a container) keeps a copy of the mount that
        # this unmount does not reach, and with it the kernel's connection: SIGTERM has the process end its
        # session as the kernel would (cli/fusefs.py serve), which also ends that copy. Else it is exiting already.
        if alive(state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(state["pid"], signal.SIGTERM)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while alive(state):
            if time.monotonic() > deadline:  # stuck: a second SIGTERM would change nothing
                with contextlib.suppress(ProcessLookupError):
                    os.kill(state["pid"], signal.SIGKILL)
                raise EnclaveError(
                    f"{mountpoint} is unmounted but its process {state['pid']} did not end its session within "
                    f"{EXIT_TIMEOUT:.0f} s of SIGTERM; it was killed (log: {state.get('log')})"
                )
            time.sleep(0.02)
        paths["state"].unlink(missing_ok=True)


def mount_with_cli(endpoint: str, mountpoint, *, expect_pcr0: str | None, allow_debug: bool = False) -> dict:
    """Mount the share at mountpoint through the installed `enclave sync` (which starts the mount process
    and returns once the mount works); its state (pid, endpoint, log). expect_pcr0 None: no attestation."""
    if expect_pcr0 is not None and not expect_pcr0:  # never "no check" by accident
        raise EnclaveError("expect_pcr0 is empty: give the image's PCR0, or None to mount without attestation")
    # The Python running this code has the project installed (a module's interpreter does too).
    command = [sys.executable, "-m", LOCAL_CLI, "sync", "-d", os.fspath(mountpoint), "--endpoint", endpoint, "--json"]
    command += ["--expect-pcr0", expect_pcr0] if expect_pcr0 else ["--no-attestation"]
    if allow_debug:
        command.append("--allow-debug")
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    except OSError as err:
        raise EnclaveError(f"cannot start `enclave sync`: {err}") from err
    if result.returncode != 0:
        why = result.stderr.strip().replace("enclave: error: ", "") or f"exit status {result.returncode}"
        raise EnclaveError(why)
    try:
        return json.loads(result.stdout)
    except ValueError as err:
        raise EnclaveError(f"`enclave sync` printed no mount state ({err}): {result.stdout[:200]!r}") from err
