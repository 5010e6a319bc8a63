"""The local backend's daemons (an enclave's supervisor, the local cloud's KMS): starting them so they
outlive the command that started them, and finding them again by the state files they leave.

Below both enclave_local/runtime.py and enclave_local/cloud.py: the cloud stops the runtime's enclaves,
and an enclave's supervisor looks up the running cloud's KMS, so neither imports the other for these.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..plugins.module_utils.errors import EnclaveRuntimeError

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
CLOUD_FILE = "cloud.json"  # the running local cloud's description, in ENCLAVE_HOME
VSOCK_PROXY_CONFIG = "vsock-proxy.yaml"  # its vsock-proxy allowlist, beside it


# ---------------------------------------------------------------- processes that are not our children


def _start_time(pid: int) -> int | None:
    """When a live process started (clock ticks since boot); None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22, starttime


@dataclass(frozen=True)
class Proc:
    """A process named by pid and start time, so a reused pid is never mistaken for it."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        started = _start_time(pid)
        return cls(pid, started) if started is not None else None

    @classmethod
    def current(cls) -> Proc:
        """This process, whose own /proc entry is always there to read."""
        own = cls.of(os.getpid())
        if own is None:
            raise EnclaveRuntimeError(
                f"cannot read /proc/{os.getpid()}/stat, this process's start time: is /proc mounted?"
            )
        return own

    @classmethod
    def from_json(cls, data) -> Proc | None:
        fields = (data.get("pid"), data.get("start_time")) if isinstance(data, dict) else (None,)
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in fields):
            return None
        return cls(data["pid"], data["start_time"])

    def to_json(self) -> dict:
        return {"pid": self.pid, "start_time": self.start_time}

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start_time

    def wait(self, timeout: float) -> bool:
        """True once the process has ended (within timeout)."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return True
        try:
            if not self.alive():
                return True
            # A pidfd becomes readable when its process ends, whoever its parent is.
            return bool(select.select([fd], [], [], timeout)[0]) or not self.alive()
        finally:
            os.close(fd)

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if it is still there after timeout."""
        self.signal(signal.SIGTERM)
        if not self.wait(timeout):
            self.kill(timeout)

    def kill(self, timeout: float = STOP_TIMEOUT) -> None:
        self.signal(signal.SIGKILL)
        self.wait(timeout)

    def children(self) -> list[Proc]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if entry.name.isdigit() and int(stat[stat.rindex(")") + 2 :].split()[1]) == self.pid:
                child = Proc.of(int(entry.name))
                found += [child] if child else []
        return found


# ---------------------------------------------------------------- daemons (the supervisor, the local KMS)


def _import_root() -> str:
    """The directory that holds ansible_collections/, for the daemons' PYTHONPATH."""
    return str(Path(__file__).absolute().parents[4])


def daemon_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_import_root(), env.get("PYTHONPATH")]))
    return env


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def spawn_daemon(argv: list[str], *, what: str, log_path: Path, timeout: float = START_TIMEOUT) -> dict:
    """Start argv as a daemon that reports on a pipe (see Ready); its final report, or an EnclaveRuntimeError.

    The daemon forks away from the process started here, so it outlives the caller and is
    nobody's zombie; it tells its pid first, so a daemon that hangs in start-up can be stopped."""
    read_fd, write_fd = os.pipe()
    try:
        with open(log_path, "ab") as log_file:
            first = subprocess.Popen(
                [*argv, "--ready-fd", str(write_fd)],
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                env=daemon_env(),
                cwd="/",
            )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    first.wait()
    reports, buffer, daemon = [], b"", None
    deadline = time.monotonic() + timeout
    try:
        while True:
            if not select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                if daemon:
                    daemon.stop()
                raise EnclaveRuntimeError(
                    f"{what} did not start within {timeout:g} s and was stopped; its log ({log_path}):\n"
                    f"{log_tail(log_path)}"
                )
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                report = json.loads(line)
                if "pid" in report:
                    daemon = Proc.from_json(report)
                reports.append(report)
    finally:
        os.close(read_fd)
    final = reports[-1] if reports and "pid" not in reports[-1] else None
    if final is None:
        raise EnclaveRuntimeError(f"{what} exited during start-up; its log ({log_path}):\n{log_tail(log_path)}")
    if "error" in final:
        if daemon and not daemon.wait(STOP_TIMEOUT):  # it exits after reporting: nothing may be left behind
            daemon.stop()
        raise EnclaveRuntimeError(final["error"])
    return final


class Ready:
    """The daemon's side of spawn_daemon: fork away, then report the pid, then success or failure."""

    def __init__(self, fd: int):
        if os.fork():
            os._exit(0)  # the process the caller started; the daemon is its child, now an orphan
        self._pipe = os.fdopen(fd, "w")
        self._send({"pid": os.getpid(), "start_time": _start_time(os.getpid())})

    def _send(self, report: dict) -> None:
        self._pipe.write(json.dumps(report) + "\n")
        self._pipe.flush()

    def ok(self, report: dict) -> None:
        self._send(report)
        self._pipe.close()

    def fail(self, message: str) -> None:
        self._send({"error": message})
        self._pipe.close()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def cloud_status(home: Path) -> dict | None:
    """The running local cloud's description (home/cloud.json), or None when it is not running."""
    try:
        cloud = json.loads((home / CLOUD_FILE).read_text())
    except (OSError, ValueError):
        return None
    process = Proc.from_json(cloud.get("process"))
    return cloud if process is not None and process.alive() else None
