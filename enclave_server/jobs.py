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

Jobs are isolated from the server and from each other (docs/THREAT_MODEL.md,
"Jobs"): when the server is root, the script runs as a dedicated job uid/gid
with no capabilities and no_new_privs, so it cannot open the NSM, reach the
KMS forwarder, read or trace the server, or replace its socket; after the
job every process of that uid is killed (kill(-1) from a child that has
become the uid: exactly that uid's processes, with or without a PID
namespace) and its files in /tmp, /var/tmp and /dev/shm are removed, beside
its private TMPDIR. While a job runs the share refuses host changes to
/dataset, /model, /output and the package file; /output must be empty when
it starts (or cleared on request), so the receipt lists exactly what the job
wrote. Tracebacks show where a failure happened, not the owner's source.
"""

import contextlib
import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..plugins.module_utils import package_open
from ..plugins.module_utils.errors import JobError
from .share import TOP_LEVEL, Share, split_path

# -I: ignore PYTHON* variables and the user site, and put neither the cwd nor
# the script's directory on sys.path; the bootstrap then adds exactly the
# package root, so nothing in the share can shadow a module. It sets
# no_new_privs first (no set-uid program gives the job back a privilege), and
# unless the package allows full stderr it replaces the traceback printers:
# file, line, function and exception type reach the host, never source lines
# or exception messages (either can carry the owner's code or data).
_BOOTSTRAP = r"""# confidential_ml.nitro job bootstrap (a job's command line says so: ps and the tests find it by this)
import ctypes, io, os, sys
ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
stderr_mode, root, script = sys.argv[1:4]
sys.argv = sys.argv[3:]
sys.path.insert(0, root)
if stderr_mode != "full":
    import _thread, warnings
    def _name(path):
        return os.path.relpath(path, root) if path.startswith(root + os.sep) else path
    def _where(kind, value, tb):
        lines = ["Traceback (source lines and messages withheld; the package's enclave.json can allow them):"]
        while tb is not None:
            code = tb.tb_frame.f_code
            if not code.co_filename.startswith("<"):
                lines.append(f'  File "{_name(code.co_filename)}", line {tb.tb_lineno}, in {code.co_name}')
            tb = tb.tb_next
        if isinstance(value, SyntaxError) and value.filename:
            lines.append(f'  File "{_name(value.filename)}", line {value.lineno}')
        lines.append(kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}")
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
    sys.excepthook = _where
    # threading takes its excepthook from _thread when it is imported: set there, it holds for the script's
    # threads without importing threading here (a sixth of this interpreter's start); and if a .pth file
    # imported threading already, on threading itself.
    _thread._excepthook = lambda a: _where(a.exc_type, a.exc_value, a.exc_traceback)
    if "threading" in sys.modules:
        sys.modules["threading"].excepthook = _thread._excepthook
    warnings.formatwarning = lambda m, category, filename, lineno, line=None: (
        f"{_name(filename)}:{lineno}: {category.__name__} (message withheld)\n"
    )
# The script runs as __main__ from its source, as runpy.run_path would run it, without importing runpy
# and traceback (a third of this interpreter's start).
main = type(sys)("__main__")
main.__file__, main.__cached__, main.__loader__, main.__package__, main.__spec__ = script, None, None, "", None
sys.modules["__main__"] = main
with io.open_code(script) as source:
    code = compile(source.read(), script, "exec")
exec(code, main.__dict__)
"""
_CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
_READ_CHUNK = 64 * 1024
_HASH_BLOCK = 1 << 20
SETTINGS_FILE = "enclave.json"
"""In the package root, written by the owner: {"stderr": "full"} lets tracebacks through whole."""
STDERR_MODES = ("where", "full")
JOB_UID = 65534
"""The job identity when the server is root (65534 is nobody's in most images; the enclave runs nothing
else as it). A server that is not root (the local backend for development) runs jobs as itself."""
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # where a job's leftovers are removed by owner uid


@dataclass
class Job:
    id: str
    package: str
    script: str
    args: list[str]
    started: float = field(default_factory=time.time)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)  # the request's: set to end it
    cancelled_by_host: bool = False  # job.cancel ended it (not its own client)

    def describe(self) -> str:
        return f"job {self.id} ({self.script} from {self.package}, running for {time.time() - self.started:.0f}s)"

    def to_json(self) -> dict:
        """What job.status and job.cancel tell anyone who can reach the server: the host's own request, as the
        host gave it (never the paths it maps to inside the enclave)."""
        return {
            "job": self.id,
            "package": self.package,
            "script": self.script,
            "started": self.started,
            "elapsed": max(0.0, time.time() - self.started),
        }


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
    def __init__(
        self,
        share: Share,
        work_root,
        *,
        python: str = sys.executable,
        job_uid: int | None = None,
        job_gid: int | None = None,
        scratch_dirs=SCRATCH_DIRS,
    ):
        """job_uid None: JOB_UID if the server is root, else the server's own identity (no isolation)."""
        self.share = share
        self.work_root = os.fspath(work_root)
        self.python = python
        if job_uid is None and os.geteuid() == 0:
            job_uid = JOB_UID
        self.job_uid = job_uid
        self.job_gid = job_gid if job_gid is not None else job_uid
        self.scratch_dirs = tuple(scratch_dirs)
        if self.job_uid is not None:
            if self.job_uid == 0:
                raise ValueError("the job uid must not be root's")
            # The job reaches its own directory by name, but cannot list the others (there are none); it
            # reaches /dataset, /model and /output through the share's root, which boot mounts 0700.
            os.chmod(self.work_root, 0o711)  # noqa: S103 - search only, no listing
            os.chmod(self.share.root, 0o711)  # noqa: S103 - search only, no listing
        self._lock = threading.Lock()
        self.current: Job | None = None

    # -- validation

    def _package_parts(self, package: str) -> str:
        parts = split_path(package)
        if not parts or parts[0] != "encrypted" or len(parts) < 2:
            raise JobError(errno.EPERM, f"package {package!r} must be a file under /encrypted in the share")
        return "/" + "/".join(parts)

    @staticmethod
    def _script_parts(script: str) -> list[str]:
        if not isinstance(script, str) or script.startswith("-") or not script.endswith(".py"):
            raise JobError(errno.EPERM, f"script {script!r} must name a .py file inside the package")
        parts = split_path(script)
        if script.startswith("/") or not parts:
            raise JobError(errno.EPERM, f"script {script!r} must be a path relative to the package root")
        return parts

    def _map_arg(self, arg: str) -> str:
        """/dataset/x -> the share's real path; other absolute paths are refused, also in the forms
        --opt=/path and -o/path (a short option with its value attached)."""
        prefix, sep, value = arg.partition("=")
        if sep and prefix.startswith("-") and value.startswith("/"):
            return f"{prefix}={self._map_path(value)}"
        if len(arg) > 2 and arg[0] == "-" and arg[1] != "-" and arg[2] == "/":
            return arg[:2] + self._map_path(arg[2:])
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
        clear_output: bool = False,
        check_package: Callable | None = None,
    ) -> dict:
        script_parts = self._script_parts(script)
        given = parse_args(args)
        argv = [self._map_arg(a) for a in given]
        package_path = self._package_parts(package)
        job = Job(uuid.uuid4().hex[:12], package, script, argv, cancelled=cancelled)
        deadline = time.monotonic() + timeout if timeout else None
        if not self._lock.acquire(blocking=False):
            running = self.current
            raise JobError(errno.EBUSY, f"busy: {running.describe() if running else 'a job'} is running; wait for it")
        self.current = job
        workdir = os.path.join(self.work_root, job.id)
        try:
            with self.share.open_package(package_path) as package_file:
                self.share.hold(f"job {job.id}", package_file.fileno())
                try:
                    self._kill_job_processes()  # nothing of an earlier job may see this one
                    self._prepare_output(clear_output)
                    # Taken before the key is released: a huge (sparse) input costs time, never plaintext.
                    try:
                        inputs = self._inputs(deadline, cancelled)
                    except JobError as err:
                        if err.errno != errno.ECANCELED or not job.cancelled_by_host:
                            raise
                        raise JobError(
                            errno.ECANCELED,
                            f"job {job.id} was cancelled from elsewhere (enclave job cancel) while its inputs were "
                            "hashed; the script did not start",
                        ) from None
                    os.makedirs(workdir, mode=0o700)
                    tree = os.path.join(workdir, "app")
                    opened = []  # the header the key was released for, read through package_file

                    def unwrap(header):
                        opened.append(header)
                        return unwrap_key(header)

                    # check_package (the owner's signature) runs on the header open_package unwraps, before
                    # KMS or the NSM.
                    package_open.open_package(package_file, tree, unwrap_key=unwrap, check_header=check_package)
                    header = opened[-1]
                    script_path = os.path.join(tree, *script_parts)
                    if not os.path.isfile(script_path) or os.path.islink(script_path):
                        raise JobError(errno.ENOENT, f"script {script!r} is not in package {package}")
                    stderr_mode = self._stderr_mode(tree, package)
                    # What the receipt binds: which package (by content), how it was called, on what inputs.
                    identity = {
                        "package_name": header.name,
                        "package_version": header.version,
                        "package_digest": header.manifest_digest.hex(),
                        "args": given,
                        "inputs": inputs,
                    }
                    self._hand_over(workdir)
                    try:
                        ran = self._execute(job, tree, script_path, argv, emit, cancelled, deadline, stderr_mode)
                    finally:
                        self._take_back(workdir)
                    return identity | ran | {"outputs": self.digests("output")}
                finally:
                    self.share.release()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self.current = None
            self._lock.release()

    # -- job control: for any client, not only the job's own (docs/THREAT_MODEL.md, "Job control")

    def status(self) -> dict | None:
        """The running job, or None."""
        job = self.current
        return job.to_json() if job is not None else None

    def cancel(self, job_id: str | None = None) -> dict | None:
        """End the running job as its own client's disconnect would (its process group and every process of the
        job uid are killed, its plaintext removed); returns it, or None when no job runs. job_id, if given, must
        name the running job, so a cancel aimed at one job never ends the next."""
        if job_id is not None and not isinstance(job_id, str):
            raise JobError(errno.EINVAL, "job must be a job id (a string), as job.status names it")
        job = self.current
        if job is None:
            return None
        if job_id is not None and job_id != job.id:
            raise JobError(errno.ESRCH, f"job {job_id} is not running ({job.describe()} is): nothing was cancelled")
        job.cancelled_by_host = True
        job.cancelled.set()
        return job.to_json()

    def _inputs(self, deadline, cancelled) -> list[dict]:
        if self.job_uid is not None:  # the job reads them as "others": say so now, not as a withheld traceback
            for top in ("dataset", "model"):
                for dirpath, dirnames, filenames in os.walk(os.path.join(self.share.root, top)):
                    for name, need in [(".", 0o005)] + [(d, 0o005) for d in dirnames] + [(f, 0o004) for f in filenames]:
                        path = os.path.normpath(os.path.join(dirpath, name))
                        mode = os.lstat(path).st_mode
                        if not stat.S_ISLNK(mode) and mode & need != need:
                            shown = "/" + os.path.relpath(path, self.share.root)
                            raise JobError(
                                errno.EACCES,
                                f"{shown} has mode {stat.S_IMODE(mode):04o}: the job runs as its own user and reads "
                                f"inputs as others do; make it readable (chmod o+r{'x' if need == 0o005 else ''}) "
                                "and run again",
                            )
        return self.digests("dataset", deadline, cancelled) + self.digests("model", deadline, cancelled)

    def _prepare_output(self, clear: bool) -> None:
        root = os.path.join(self.share.root, "output")
        left = sorted(os.listdir(root))
        if left and not clear:
            shown = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
            raise JobError(
                errno.EEXIST,
                f"/output holds {len(left)} entries from before ({shown}): pull them, then run again with "
                "clear_output (CLI: --clear-output) to remove them; a job's receipt lists exactly the files it "
                "wrote, so it starts on an empty /output",
            )
        for name in left:
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)

    @staticmethod
    def _stderr_mode(tree: str, package: str) -> str:
        path = os.path.join(tree, SETTINGS_FILE)
        if not os.path.isfile(path) or os.path.islink(path):
            return "where"
        try:
            with open(path, "rb") as f:
                settings = json.loads(f.read(1 << 16))
        except ValueError as err:
            raise JobError(errno.EINVAL, f"{SETTINGS_FILE} in package {package} is not valid JSON ({err})") from None
        mode = settings.get("stderr", "where") if isinstance(settings, dict) else None
        if mode not in STDERR_MODES:
            raise JobError(
                errno.EINVAL,
                f'{SETTINGS_FILE} in package {package} must be a JSON object whose "stderr" is one of '
                f"{', '.join(STDERR_MODES)}; the owner fixes it and seals again",
            )
        return mode

    # -- the job's identity

    def _chown_tree(self, path: str, uid: int, gid: int) -> None:
        os.lchown(path, uid, gid)
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.lchown(os.path.join(dirpath, name), uid, gid)

    def _hand_over(self, workdir: str) -> None:
        """The job's directory (its package and TMPDIR) and /output become the job's; nothing else does."""
        os.makedirs(os.path.join(workdir, "tmp"), mode=0o700)
        if self.job_uid is not None:
            assert self.job_gid is not None  # __init__ gives a job uid its gid
            self._chown_tree(workdir, self.job_uid, self.job_gid)
            os.chown(os.path.join(self.share.root, "output"), self.job_uid, self.job_gid)

    def _take_back(self, workdir: str) -> None:
        """After the script: kill what it left running, remove its scratch files, and own /output again."""
        self._kill_job_processes()
        if self.job_uid is None:
            return
        for scratch in self.scratch_dirs:
            with contextlib.suppress(FileNotFoundError), os.scandir(scratch) as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat(follow_symlinks=False).st_uid != self.job_uid:
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)
        self._chown_tree(os.path.join(self.share.root, "output"), os.geteuid(), os.getegid())
        shutil.rmtree(workdir, ignore_errors=True)

    def _kill_job_processes(self) -> None:
        """SIGKILL every process of the job uid: a child becomes that uid and calls kill(-1), which reaches
        exactly the processes it may signal (same real or saved uid), in or outside a PID namespace, setsid()
        or not. Linux walks the task list under its lock, so a forking job cannot slip a child past it."""
        if self.job_uid is None:
            return
        assert self.job_gid is not None  # __init__ gives a job uid its gid
        pid = os.fork()
        if pid == 0:  # only system calls until _exit: the server has threads
            try:
                os.setgroups([])
                os.setresgid(self.job_gid, self.job_gid, self.job_gid)
                os.setresuid(self.job_uid, self.job_uid, self.job_uid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(-1, signal.SIGKILL)
                os._exit(0)
            except BaseException:  # noqa: BLE001 - the child must never return into the server
                os._exit(1)
        _pid, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise JobError(errno.EPERM, f"cannot become the job uid {self.job_uid} to end the job's processes")

    def _identity(self) -> dict:
        if self.job_uid is None:
            return {}
        return {"user": self.job_uid, "group": self.job_gid, "extra_groups": []}

    def _execute(self, job, tree, script_path, argv, emit, cancelled, deadline, stderr_mode) -> dict:
        started = time.time()
        emit({"type": "started", "job": job.id})
        tmp = os.path.join(os.path.dirname(tree), "tmp")
        proc = subprocess.Popen(
            [self.python, "-I", "-B", "-c", _BOOTSTRAP, stderr_mode, tree, script_path, *argv],
            cwd=tree,
            env=dict(_CLEAN_ENV, HOME=tree, TMPDIR=tmp),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # so a timeout or cancel kills the script's children too
            umask=0o022,
            **self._identity(),
        )
        pumps = [
            threading.Thread(target=self._pump, args=(proc.stdout, "stdout", emit), daemon=True),
            threading.Thread(target=self._pump, args=(proc.stderr, "stderr", emit), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        ended_by = None
        while proc.poll() is None:
            if cancelled.wait(0.05):
                ended_by = "cancelled"
            elif deadline and time.monotonic() > deadline:
                ended_by = "timeout"
            if ended_by:
                self._kill(proc)
                break
        proc.wait()
        self._kill(proc)  # whatever the script left running in its session goes too, and releases the pipes
        self._kill_job_processes()  # and whatever left the session (setsid), which may hold the pipes
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

    def digests(self, top: str, deadline: float | None = None, cancelled: threading.Event | None = None) -> list[dict]:
        """Every regular file under a top-level share directory with its size and SHA-256 (links skipped).

        Stops with ETIMEDOUT or ECANCELED between blocks once the job's deadline passes or it is cancelled:
        a sparse file of a TiB costs the host nothing to make and would take minutes to hash."""
        root = os.path.join(self.share.root, top)
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                digest = hashlib.sha256()
                rel = "/" + os.path.relpath(path, self.share.root)
                with open(path, "rb") as f:
                    while block := f.read(_HASH_BLOCK):
                        digest.update(block)
                        if cancelled is not None and cancelled.is_set():
                            raise JobError(errno.ECANCELED, f"the job was cancelled while hashing its input {rel}")
                        if deadline is not None and time.monotonic() > deadline:
                            raise JobError(
                                errno.ETIMEDOUT,
                                f"the job's timeout passed while hashing its input {rel} "
                                f"({os.path.getsize(path)} bytes): remove it or raise the timeout",
                            )
                out.append({"path": rel, "size": os.path.getsize(path), "sha256": digest.hexdigest()})
        return out
