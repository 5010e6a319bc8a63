"""The job runner: open an encrypted package privately, run one of its scripts, clean up.

What the host sends (package, script, arguments) is hostile input:
- the package must be a regular file under the share's /encrypted;
- the script must be a .py file inside the decrypted package (never a file in
  the share, never an interpreter flag);
- arguments are passed to the script, never to the interpreter; those naming
  /dataset, /model, /output or /encrypted map into the share, other absolute
  paths are refused, relative ones resolve inside the package (the cwd).
The package opens into a private directory outside the share, the script runs
in isolated mode with a clean environment and only the package's own
directory prepended to sys.path, and the decrypted tree is removed whatever
happens. One job at a time.
"""

import contextlib
import errno
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..plugins.module_utils import package as package_format
from .share import TOP_LEVEL, Share, split_path

# -I: ignore PYTHON* variables and the user site, and put neither the cwd nor
# the script's directory on sys.path; the bootstrap then adds exactly the
# package root, so nothing in the share can shadow a module.
_BOOTSTRAP = (
    "import runpy, sys; root, script = sys.argv[1], sys.argv[2]; "
    "sys.argv = sys.argv[2:]; sys.path.insert(0, root); runpy.run_path(script, run_name='__main__')"
)
_CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
_READ_CHUNK = 64 * 1024


class JobError(OSError):
    """A job request that cannot run; carries an errno for the wire."""


@dataclass
class Job:
    id: str
    package: str
    script: str
    args: list[str]
    started: float = field(default_factory=time.time)

    def describe(self) -> str:
        return f"job {self.id} ({self.script} from {self.package}, running for {time.time() - self.started:.0f}s)"


def parse_args(args) -> list[str]:
    """A list of strings as given, or one string split the way a shell would (never on bare spaces)."""
    if isinstance(args, str):
        try:
            return shlex.split(args)
        except ValueError as err:
            raise JobError(errno.EINVAL, f"cannot split arguments {args!r}: {err}") from None
    if not isinstance(args, list | tuple) or not all(isinstance(a, str) for a in args):
        raise JobError(errno.EINVAL, "arguments must be a string or a list of strings")
    return list(args)


class JobRunner:
    def __init__(self, share: Share, work_root, *, python: str = sys.executable):
        self.share = share
        self.work_root = os.fspath(work_root)
        self.python = python
        self._lock = threading.Lock()
        self.current: Job | None = None

    # -- validation

    def _package_path(self, package: str) -> str:
        parts = split_path(package)
        if not parts or parts[0] != "encrypted" or len(parts) < 2:
            raise JobError(errno.EPERM, f"package {package!r} must be a file under /encrypted in the share")
        return self.share.resolve_file("/" + "/".join(parts))

    @staticmethod
    def _script_parts(script: str) -> list[str]:
        if not isinstance(script, str) or script.startswith("-") or not script.endswith(".py"):
            raise JobError(errno.EPERM, f"script {script!r} must name a .py file inside the package")
        parts = split_path(script)
        if script.startswith("/") or not parts:
            raise JobError(errno.EPERM, f"script {script!r} must be a path relative to the package root")
        return parts

    def _map_arg(self, arg: str) -> str:
        """/dataset/x -> the share's real path; other absolute paths are refused (also in --opt=/path form)."""
        prefix, sep, value = arg.partition("=")
        if sep and prefix.startswith("-") and value.startswith("/"):
            return f"{prefix}={self._map_path(value)}"
        return self._map_path(arg) if arg.startswith("/") else arg

    def _map_path(self, path: str) -> str:
        parts = split_path(path)
        if not parts or parts[0] not in TOP_LEVEL:
            raise JobError(
                errno.EPERM,
                f"argument {path!r} is an absolute path outside the share; use /dataset, /model, /output or "
                "/encrypted, or a path relative to the package",
            )
        real = os.path.join(self.share.root, *parts)
        return real + "/" if path.endswith("/") else real

    # -- running

    def run(
        self,
        package: str,
        script: str,
        args,
        *,
        unwrap_key: Callable,
        emit: Callable[[dict], None],
        cancelled: threading.Event,
        timeout: float | None = None,
        check_package: Callable | None = None,
    ) -> dict:
        script_parts = self._script_parts(script)
        given = parse_args(args)
        argv = [self._map_arg(a) for a in given]
        package_file = self._package_path(package)
        job = Job(uuid.uuid4().hex[:12], package, script, argv)
        if not self._lock.acquire(blocking=False):
            running = self.current
            raise JobError(errno.EBUSY, f"busy: {running.describe() if running else 'a job'} is running; wait for it")
        self.current = job
        workdir = os.path.join(self.work_root, job.id)
        try:
            os.makedirs(workdir, mode=0o700)
            tree = os.path.join(workdir, "app")
            header = package_format.read_header(package_file)
            # check_package (the owner's signature) runs on the header open_package unwraps, before KMS or the NSM.
            package_format.open_package(package_file, tree, unwrap_key=unwrap_key, check_header=check_package)
            script_path = os.path.join(tree, *script_parts)
            if not os.path.isfile(script_path) or os.path.islink(script_path):
                raise JobError(errno.ENOENT, f"script {script!r} is not in package {package}")
            # What the receipt binds: which package (by content), how it was called, on what inputs.
            identity = {
                "package_name": header.name,
                "package_version": header.version,
                "package_digest": header.manifest_digest.hex(),
                "args": given,
                "inputs": self.digests("dataset") + self.digests("model"),
            }
            return identity | self._execute(job, tree, script_path, argv, emit, cancelled, timeout)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self.current = None
            self._lock.release()

    def _execute(self, job, tree, script_path, argv, emit, cancelled, timeout) -> dict:
        started = time.time()
        emit({"type": "started", "job": job.id})
        proc = subprocess.Popen(
            [self.python, "-I", "-B", "-c", _BOOTSTRAP, tree, script_path, *argv],
            cwd=tree,
            env=dict(_CLEAN_ENV, HOME=tree),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # so a timeout or cancel kills the script's children too
        )
        pumps = [
            threading.Thread(target=self._pump, args=(proc.stdout, "stdout", emit), daemon=True),
            threading.Thread(target=self._pump, args=(proc.stderr, "stderr", emit), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        deadline = started + timeout if timeout else None
        ended_by = None
        while proc.poll() is None:
            if cancelled.wait(0.05):
                ended_by = "cancelled"
            elif deadline and time.time() > deadline:
                ended_by = "timeout"
            if ended_by:
                self._kill(proc)
                break
        proc.wait()
        self._kill(proc)  # whatever the script left running in its session goes too, and releases the pipes
        for pump in pumps:
            pump.join()
        ended = time.time()
        return {
            "job": job.id,
            "package": job.package,
            "script": job.script,
            "rc": proc.returncode,
            "ended_by": ended_by or "exit",
            "start": started,
            "end": ended,
            "outputs": self.digests("output"),
        }

    @staticmethod
    def _pump(stream, name, emit) -> None:
        with stream:
            while chunk := stream.read1(_READ_CHUNK):
                emit({"type": name, "data": chunk})

    @staticmethod
    def _kill(proc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def digests(self, top: str) -> list[dict]:
        """Every regular file under a top-level share directory with its size and SHA-256 (links skipped)."""
        root = os.path.join(self.share.root, top)
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                rel = os.path.relpath(path, self.share.root)
                out.append({"path": "/" + rel, "size": os.path.getsize(path), "sha256": digest.hexdigest()})
        return out
