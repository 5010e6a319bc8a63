"""The local runtime: enclaves on this host, without Nitro hardware (the embedded default).

Each enclave is three processes, started by `run`:

    supervisor   a daemon on the host (it outlives the CLI). It measures the image file,
                 holds the simulated NSM with those PCRs (served on the enclave's /dev/nsm)
                 and the host side of the enclave's vsock port 8000 (vsock-proxy to the
                 local KMS), launches the enclave and cleans up after it.
    init         PID 1 of the enclave, in new mount, network, PID, IPC and UTS namespaces
                 (`unshare`), doing what the EIF's init does and no more: a tmpfs root with the
                 image's code at /opt/enclave (read-only) as the Dockerfile copies it, read-only
                 binds of the interpreter and the libraries it needs (the image's base), /proc,
                 /dev with the NSM at /dev/nsm the only device beyond null, zero, random and
                 urandom, the enclave's vsock directory at /run/vsock; loopback left DOWN, no
                 /etc/hosts and no resolver. It pivots into it and runs the image's own command
                 (runtime.json "command": the Dockerfile's CMD under nitro-cli's rule) with the
                 image's environment, in /, then reaps.
    server       what that command starts: enclave_server.boot (tmpfs on the share and work
                 directories, loopback up, KMS hostnames mapped in /etc/hosts, its capabilities
                 dropped), then the server, as root without capabilities. It listens on
                 /run/vsock/<cid>_5000.sock, which is runtime_dir()/enclaves/<id>/vsock/<cid>_5000.sock
                 on the host, and reaches KMS at https://kms.<region>.amazonaws.com, which boot maps
                 to 127.0.0.1:443, relayed (kms_forwarder) to /run/vsock/3_8000.sock, where the
                 supervisor's vsock-proxy listens, to the local KMS's HTTPS listener: TLS end to end.

The command runs as the image gives it, with three substitutions for what this host lacks
(local_command), all made by the host side, so the image's code is the EIF's byte for byte:

  * the interpreter: the image names the base image's Python (IMAGE_PYTHON); the local image
    carries none and runs on this host's, whose identity and packages it measured and
    check_host verified, so argv[0] == IMAGE_PYTHON becomes sys.executable, and any other
    argv[0] is refused: the local image has no base image with other programs to run;
  * addresses: there is no AF_VSOCK between host and enclave here, so, after Firecracker's
    hybrid vsock, every argument vsock://CID:PORT becomes unix:///run/vsock/CID_PORT.sock
    (CID "any": the enclave's own), the path endpoints.local_socket_path names. Rewriting
    the command's addresses, rather than teaching Endpoint a second meaning of vsock://,
    keeps the image's code free of any local-backend branch a hostile host could steer;
  * trust and sizes: AWS_CA_BUNDLE names the local TLS CA (the one trust a local enclave
    has that the EIF has not: the local KMS's certificate comes from it, enclave_local/tls.py),
    and ENCLAVE_SHARE_SIZE / ENCLAVE_WORK_SIZE give the share and work tmpfs 60% and 30% of
    the enclave's memory (in the EIF, boot's percentages are of the enclave's own memory;
    here they would be of the host's).

When the server ends, init ends, and the kernel kills everything left in the enclave's PID
namespace; its mount namespace, and with it the share and the plaintext, goes with the last
process. When the supervisor dies, the kernel kills the enclave (parent-death signal); when
the enclave dies, the supervisor removes its sockets and state. Enclaves are found through
settings.runtime_dir()/enclaves/<id>/enclave.json; allocation (CIDs, the limit of MAX_ENCLAVES) is
serialised by a lock file there.

Without root there are no namespaces, so no boot either: init starts the server itself as a
plain process, with its share and plaintext in ordinary directories and KMS at
https://localhost:PORT (the local KMS's certificate names localhost too), and every run says
so loudly.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from ..plugins.module_utils import settings
from ..plugins.module_utils.enclave_code import IMAGE_PYTHON, INIT_PATH
from ..plugins.module_utils.endpoints import (
    DEFAULT_PORT,
    KMS_PROXY_PORT,
    PARENT_CID,
    VMADDR_CID_ANY,
    Endpoint,
    local_socket_path,
)
from ..plugins.module_utils.errors import EnclaveError, EnclaveNotFoundError, EnclaveRuntimeError
from ..plugins.module_utils.runtime import BuildResult, EnclaveInfo, discover_endpoint
from .daemons import (
    START_TIMEOUT,
    VSOCK_PROXY_CONFIG,
    Proc,
    Ready,
    cloud_status,
    log_tail,
    spawn_daemon,
    write_json,
)

log = logging.getLogger(__name__)

MODULE = "ansible_collections.confidential_ml.nitro.enclave_local.runtime"
MAX_ENCLAVES = 4
FIRST_CID = 16  # auto-assigned CIDs start here, as nitro-cli's do
MIN_CID = 4  # 0-2 are reserved, 3 is the parent
MAX_CID = 0xFFFFFFFE
MIN_MEMORY_MIB = 64
SHARE_PERCENT = 60  # of the enclave's memory: the share the host fills
WORK_PERCENT = 30  # decrypted packages
SYSTEM_PERCENT = 10  # the root (image, /tmp) and /dev/shm each, at least MIN_SYSTEM_MIB
MIN_SYSTEM_MIB = 16
NON_ROOT_WARNING = (
    "NOT ISOLATED: the local runtime is not running as root, so this enclave is a plain process: the host "
    "can read its share and the decrypted packages on disk, and it can reach the network. Run as root for "
    "namespaces and private memory."
)

# An enclave's processes in its enclave.json: when init is gone, so is everything in the enclave
# (the kernel empties a PID namespace before its init exits).
PROCESSES = ("supervisor", "enclave", "init")
ENCLAVE_FILE = "enclave.json"  # written once the enclave serves; marks it as running
LAUNCH_FILE = "launch.json"
SUPERVISOR_LOG = "supervisor.log"
CONSOLE_LOG = "console.log"

# Where things are inside an isolated enclave (the share and work directories are the image command's).
INSIDE = {
    "image": "/enclave/image",
    "app": "/opt/enclave",  # where the Dockerfile copies the code
    "vsock": "/run/vsock",
    "nsm": "/dev/nsm",
    "ca_bundle": "/etc/ssl/local-kms-ca.pem",  # the local TLS CA, named by AWS_CA_BUNDLE
}
# What a Debian base image's /etc holds that name lookup needs: /etc/hosts first (boot writes it).
NSSWITCH = "hosts: files dns\n"
# The host's directories the interpreter needs, bound read-only (plus sys.prefix and sys.base_prefix).
SYSTEM_DIRS = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin")
DEVICES = ("null", "zero", "random", "urandom")
# The capabilities an enclave's command starts with: what boot (enclave_server/boot.py) needs and
# drops before it becomes the server (sys_admin, net_admin, setpcap), and what the server keeps to
# listen on 127.0.0.1:443 for KMS (net_bind_service, in the enclave's own network namespace).
SERVER_CAPS = "+setuid,+setgid,+chown,+dac_override"
"""What the local server keeps (jobs.py): setuid/setgid to start a job as the job uid and to become it for
kill(-1) (no CAP_KILL: that child signals only its own uid); chown to hand the job its directory and /output
and take them back; dac_override to read, hash and remove what the job left with any mode. Not fowner: the
job's files are the server's again (chown) before the host touches them."""
ENCLAVE_CAPS = f"+sys_admin,+net_admin,+setpcap,+net_bind_service,{SERVER_CAPS}"


# ---------------------------------------------------------------- the runtime


def _info(record: dict) -> EnclaveInfo:
    return EnclaveInfo(
        name=record["name"],
        enclave_id=record["id"],
        cid=record["cid"],
        state="RUNNING",
        memory_mib=record["memory_mib"],
        cpu_count=len(record["cpu_ids"]),
        debug_mode=record["debug_mode"],
        endpoint=record["endpoint"],
        process_id=record["supervisor"]["pid"],
        cpu_ids=tuple(record["cpu_ids"]),
    )


class LocalRuntime:
    """The Runtime of the local backend (see plugins/module_utils/runtime.py); state under home."""

    backend = "local"

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home) if home is not None else settings.state_home()
        self.enclaves_dir = settings.runtime_dir(self.home) / "enclaves"  # short: socket paths fit in 107 bytes

    # -- build

    def build(
        self,
        *,
        output: str,
        source: str | None = None,
        signing_certificate: str | None = None,
        private_key: str | None = None,
        owner_identity: str | None = None,
    ) -> BuildResult:
        """A reproducible local image of the enclave server (see enclave_local/image.py), bound to the owner
        identity file if one is given."""
        if signing_certificate is not None or private_key is not None:
            raise EnclaveRuntimeError(
                "the local backend does not sign images (PCR8): build without a signing certificate, "
                "or sign on the nitro backend with nitro-cli"
            )
        from . import image

        return image.build(output, source=source, owner_identity=owner_identity)

    # -- bookkeeping

    def _lock(self):
        settings.private_dir(self.enclaves_dir)
        return settings.locked(self.enclaves_dir / ".lock")

    def _records(self) -> list[tuple[Path, dict | None]]:
        if not self.enclaves_dir.is_dir():
            return []
        out = []
        for path in sorted(self.enclaves_dir.iterdir()):
            if not path.is_dir():
                continue
            try:
                out.append((path, json.loads((path / ENCLAVE_FILE).read_text())))
            except (OSError, ValueError):
                out.append((path, None))
        return out

    @staticmethod
    def _alive(record: dict) -> bool:
        procs = [Proc.from_json(record.get(key)) for key in PROCESSES]
        return all(p is not None and p.alive() for p in procs)

    @staticmethod
    def _reap(path: Path, record: dict | None) -> None:
        """Stop whatever is left of an enclave and remove its state."""
        procs = {key: Proc.from_json((record or {}).get(key)) for key in PROCESSES}
        if procs["supervisor"]:
            procs["supervisor"].stop()  # it stops the enclave and cleans up
        for key in ("enclave", "init"):  # if it could not: terminate is abrupt, as on Nitro
            proc = procs[key]
            if proc:
                proc.kill()
        shutil.rmtree(path, ignore_errors=True)

    def _running(self) -> list[dict]:
        """The live enclaves' records; dead ones (and leftovers of failed starts) are reaped. Call under the lock."""
        live = []
        for path, record in self._records():
            if record is not None and self._alive(record):
                live.append(record)
            else:
                if record is not None:
                    log.warning("reaping local enclave %s: its supervisor or server has ended", path.name)
                self._reap(path, record)
        return sorted(live, key=lambda r: r["cid"])

    def _find(self, enclave: str, running: list[dict]) -> dict:
        for record in running:
            if record["id"] == enclave:
                return record
        named = [r for r in running if r["name"] == enclave]
        if len(named) == 1:
            return named[0]
        listed = ", ".join(f"{r['name']} ({r['id']})" for r in running) or "none"
        raise EnclaveNotFoundError(f"no local enclave has the ID or name {enclave!r}; running: {listed}")

    # -- Runtime

    def run(
        self,
        image: str,
        *,
        cpu_count: int = 2,
        memory_mib: int = 512,
        cid: int | None = None,
        name: str | None = None,
        debug_mode: bool = False,
    ) -> EnclaveInfo:
        """Start an enclave from a local image; returns once its server answers."""
        image_path = Path(image).absolute()
        if not image_path.is_file():
            raise EnclaveRuntimeError(f"no enclave image at {image_path}: build one with `enclave local build`")
        cpus = sorted(os.sched_getaffinity(0))
        if not isinstance(cpu_count, int) or isinstance(cpu_count, bool) or not 1 <= cpu_count <= len(cpus):
            raise EnclaveRuntimeError(
                f"cpu_count must be from 1 to {len(cpus)} (the CPUs this host can give an enclave), not {cpu_count!r}"
            )
        if not isinstance(memory_mib, int) or isinstance(memory_mib, bool) or memory_mib < MIN_MEMORY_MIB:
            raise EnclaveRuntimeError(f"memory_mib must be an integer of at least {MIN_MEMORY_MIB}, not {memory_mib!r}")
        if cid is not None and (not isinstance(cid, int) or isinstance(cid, bool) or not MIN_CID <= cid <= MAX_CID):
            raise EnclaveRuntimeError(f"an enclave CID is an integer from {MIN_CID} to {MAX_CID} (0-3 are reserved)")
        if os.geteuid() != 0:
            log.warning(NON_ROOT_WARNING)
        _require_tools(isolated=os.geteuid() == 0)
        with self._lock():
            running = self._running()
            if len(running) >= MAX_ENCLAVES:
                listed = ", ".join(f"{r['name']} ({r['id']}, CID {r['cid']})" for r in running)
                raise EnclaveRuntimeError(
                    f"this host already runs {MAX_ENCLAVES} local enclaves, the most it allows ({listed}): "
                    "terminate one with `enclave local terminate-enclave --enclave-id ID` first"
                )
            used = {r["cid"] for r in running}
            if cid is None:
                cid = next(c for c in range(FIRST_CID, FIRST_CID + MAX_ENCLAVES + 1) if c not in used)
            elif cid in used:
                raise EnclaveRuntimeError(
                    f"CID {cid} is taken by another local enclave: choose another or leave it out"
                )
            name = name or image_path.stem
            if any(r["name"] == name for r in running):
                raise EnclaveRuntimeError(
                    f"a local enclave named {name!r} is already running: choose another --enclave-name"
                )
            enclave_id = f"i-local-enc{secrets.token_hex(8)}"
            path = self.enclaves_dir / enclave_id
            vsock = path / "vsock"
            endpoint = Endpoint.unix(local_socket_path(vsock, cid, DEFAULT_PORT))  # checks the path's length
            start = len(running) * cpu_count  # spread enclaves over the CPUs
            launch = {
                "id": enclave_id,
                "name": name,
                "cid": cid,
                "cpu_ids": [cpus[(start + i) % len(cpus)] for i in range(cpu_count)],
                "memory_mib": memory_mib,
                "debug_mode": bool(debug_mode),
                "image": str(image_path),
                "home": str(self.home.absolute()),
                "endpoint": str(endpoint),
            }
            settings.private_dir(path)
            write_json(path / LAUNCH_FILE, launch)
            try:
                report = spawn_daemon(
                    [sys.executable, "-m", MODULE, "supervise", str(path)],
                    what=f"the supervisor of local enclave {name}",
                    log_path=path / SUPERVISOR_LOG,
                )
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
        for warning in report.get("warnings", ()):
            log.warning("%s", warning)
        return _info(report["enclave"])

    def describe(self) -> list[EnclaveInfo]:
        with self._lock():
            return [_info(r) for r in self._running()]

    def terminate(self, enclave: str | None = None, *, all: bool = False) -> list[str]:  # noqa: A002
        """Stop an enclave (ID or name), or all, with everything that belongs to it. The IDs stopped."""
        if all == (enclave is not None):
            raise EnclaveRuntimeError("terminate needs either an enclave (ID or name) or all=True")
        with self._lock():
            running = self._running()
            targets = running if enclave is None else [self._find(enclave, running)]  # None: all (checked above)
            for record in targets:
                self._reap(self.enclaves_dir / record["id"], record)
        return [r["id"] for r in targets]

    def console(self, enclave: str) -> str:
        with self._lock():
            record = self._find(enclave, self._running())
        if not record["debug_mode"]:
            raise EnclaveRuntimeError(
                f"enclave {record['name']} ({record['id']}) was not started in debug mode, so it keeps no console "
                "(as on Nitro): start it with --debug-mode to read its log (it then attests all-zero PCRs)"
            )
        try:
            return (self.enclaves_dir / record["id"] / CONSOLE_LOG).read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _require_tools(*, isolated: bool) -> None:
    tools = {"setpriv": "util-linux", "unshare": "util-linux"} if isolated else {"setpriv": "util-linux"}
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin:/sbin"])
    missing = sorted(
        {f"{tool} ({package})" for tool, package in tools.items() if shutil.which(tool, path=path) is None}
    )
    if missing:
        packages = " ".join(sorted({tools[m.split()[0]] for m in missing}))
        raise EnclaveRuntimeError(
            f"the local runtime needs {', '.join(missing)}, which this host lacks: apt-get install {packages}"
        )


def discover_local_endpoint() -> str:
    """The endpoint of the one running local enclave; an EnclaveError when there are none or several."""
    return discover_endpoint(LocalRuntime())


# ---------------------------------------------------------------- supervisor


def _start_kms_proxy(home: Path, listen: Path):
    """The enclave's vsock port 8000 on the host, relayed to the local KMS's HTTPS listener if the
    local cloud is up (the enclave's boto3 speaks TLS to it, through this proxy)."""
    from .vsock_proxy import VsockProxy, load_allowlist

    running = cloud_status(home)
    if running is None:
        return None, [
            f"the local cloud is not running, so this enclave cannot reach KMS: start it with `enclave local up` "
            f"(ENCLAVE_HOME={home}) and run the enclave again"
        ]
    allowlist = load_allowlist(home / VSOCK_PROXY_CONFIG)
    proxy = VsockProxy(Endpoint.unix(listen), running["kms_host"], running["kms_tls_port"], allowlist)
    return proxy.start(), []


def _wait_until_serving(endpoint: Endpoint, enclave: subprocess.Popen, deadline: float) -> None:
    from ..plugins.module_utils.wire_client import Connection

    while True:
        if enclave.poll() is not None:
            raise EnclaveRuntimeError(f"the enclave stopped during start-up (exit status {enclave.returncode})")
        if endpoint.path is not None and os.path.exists(endpoint.path):  # a local enclave listens on unix
            try:
                with Connection.open(endpoint, timeout=5) as connection:
                    connection.call("health", timeout=5)
                return
            except EnclaveError:
                pass  # listening, but not answering yet
        if time.monotonic() > deadline:
            raise EnclaveRuntimeError(f"the enclave server did not answer on {endpoint} within {START_TIMEOUT:g} s")
        time.sleep(0.005)


def _enclave_paths(path: Path, isolated: bool) -> dict:
    """Where the server finds its parts: fixed paths inside an isolated enclave, host paths otherwise."""
    if isolated:
        return dict(INSIDE)
    root = path / "root"
    return {
        "image": str(root / "image"),
        "share": str(root / "share"),
        "work": str(root / "work"),
        "vsock": str(path / "vsock"),
        "nsm": str(path / "nsm.sock"),
        "ca_bundle": str(root / "local-kms-ca.pem"),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def supervise(path: Path, ready_fd: int) -> int:
    ready = Ready(ready_fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s %(message)s")
    from .image import Image
    from .nsm_service import NsmService
    from .nsm_sim import LocalCA, SimulatedNsm
    from .tls import LocalTlsCA

    launch = json.loads((path / LAUNCH_FILE).read_text())
    isolated = os.geteuid() == 0
    cleanup = contextlib.ExitStack()
    try:
        image = Image.load(launch["image"])
        image.check_host()
        measured = image.measurements
        pcrs = {0: measured.pcr0, 1: measured.pcr1, 2: measured.pcr2}
        nsm = SimulatedNsm(
            LocalCA.load_or_create(launch["home"]),
            {index: bytes.fromhex(value) for index, value in pcrs.items()},
            module_id=launch["id"],
            debug=launch["debug_mode"],  # all-zero PCRs, as on Nitro
        )
        vsock = settings.private_dir(path / "vsock")
        cleanup.callback(NsmService(nsm, path / "nsm.sock").start().stop)
        proxy, warnings = _start_kms_proxy(Path(launch["home"]), vsock / f"{PARENT_CID}_{KMS_PROXY_PORT}.sock")
        if proxy is not None:
            cleanup.callback(proxy.stop)
        if not isolated:
            warnings.append(NON_ROOT_WARNING)
            log.warning(NON_ROOT_WARNING)
        config = {
            "isolated": isolated,
            "root": str(path / "root"),
            "host_vsock": str(vsock),
            "host_nsm": str(path / "nsm.sock"),
            "console": str(path / CONSOLE_LOG) if launch["debug_mode"] else os.devnull,
            "paths": _enclave_paths(path, isolated),
            "cid": launch["cid"],
            "cpu_ids": launch["cpu_ids"],
            "memory_mib": launch["memory_mib"],
            "kms_port": None if isolated else _free_port(),
            "command": image.runtime["command"],  # from the measured bytes init unpacks
            "ca_bundle": LocalTlsCA.load_or_create(launch["home"]).bundle_path.read_text(),
        }
        (path / "root").mkdir(mode=0o700)
        argv = [sys.executable, "-m", MODULE, "init", json.dumps(config)]
        if isolated:
            namespaces = ["--mount", "--net", "--pid", "--ipc", "--uts", "--propagation", "private"]
            argv = ["unshare", *namespaces, "--fork", "--kill-child", *argv]
        # The enclave dies with its supervisor, however the supervisor ends.
        enclave = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", *argv], stdin=subprocess.PIPE, stdout=sys.stderr, stderr=sys.stderr
        )
        inits: list[Proc] = []

        def stop_enclave() -> None:
            enclave.kill()
            enclave.wait()
            for init_proc in inits:  # everything in the enclave is gone once its PID 1 is
                init_proc.kill()

        cleanup.callback(stop_enclave)
        assert enclave.stdin is not None  # stdin=PIPE
        with contextlib.suppress(BrokenPipeError):  # init failed: its log says why
            enclave.stdin.write(image.data)  # init unpacks these very bytes, the ones measured above
            enclave.stdin.close()
        endpoint = Endpoint.parse(launch["endpoint"])
        _wait_until_serving(endpoint, enclave, time.monotonic() + START_TIMEOUT)
        launched = Proc.of(enclave.pid)
        # Isolated, the enclave's PID 1 is the child of unshare; plain, init is the process launched.
        inits.extend((launched.children() if isolated else [launched]) if launched else [])
        if launched is None or len(inits) != 1:
            raise EnclaveRuntimeError("the enclave stopped during start-up (its init is gone)")
        record = dict(
            launch,
            measurements=measured.to_json(),
            supervisor=Proc.current().to_json(),
            enclave=launched.to_json(),
            init=inits[0].to_json(),
            isolated=isolated,
        )
        write_json(path / ENCLAVE_FILE, record)
    except Exception as err:
        log.exception("the enclave did not start")
        cleanup.close()
        message = str(err) if isinstance(err, EnclaveError | OSError) else f"{type(err).__name__}: {err}"
        tail = log_tail(path / SUPERVISOR_LOG)
        if launch["debug_mode"]:  # the enclave's own output, as `nitro-cli console` shows a debug-mode enclave's
            tail += f"\nenclave console:\n{log_tail(path / CONSOLE_LOG)}"
        else:
            tail += "\n(run it in debug mode to see the enclave's console)"
        ready.fail(f"local enclave {launch['name']} did not start: {message}\nsupervisor log:\n{tail}")
        return 1
    signal.signal(signal.SIGTERM, lambda *_: enclave.kill())
    log.info("enclave %s (CID %d) serving on %s", launch["id"], launch["cid"], endpoint)
    ready.ok({"enclave": record, "warnings": warnings})
    enclave.wait()
    log.info("enclave %s ended (status %s); cleaning up", launch["id"], enclave.returncode)
    cleanup.close()
    shutil.rmtree(path, ignore_errors=True)
    return 0


# ---------------------------------------------------------------- init: PID 1 of the enclave

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC = 0x20, 0x1000, 0x4000
MNT_DETACH = 0x2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    def c(text):
        return text.encode() if text is not None else None

    _check(_libc.mount(c(source), c(target), c(fstype), flags, c(data)), f"mount {source or fstype} on {target}")


def _bind(source: str, target: str, *, readonly: bool = True) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    if readonly:  # a bind mount takes its flags only from a remount
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _tmpfs(target: str, size_mib: int, mode: int, flags: int = MS_NOSUID | MS_NODEV) -> None:
    os.makedirs(target, exist_ok=True)
    _mount("tmpfs", target, "tmpfs", flags, f"size={size_mib}m,mode={mode:o}")


def _host_binds() -> list[str]:
    """The host paths the interpreter needs, outermost first, without ones inside another."""
    # A prefix may be a symbolic link (a shared virtual environment): its target is needed too.
    prefixes = [sys.base_prefix, sys.prefix]
    wanted = [*SYSTEM_DIRS, *prefixes, *map(os.path.realpath, prefixes), "/etc/ld.so.cache"]
    paths = []
    for path in wanted:
        if os.path.lexists(path) and not any(path.startswith(p.rstrip("/") + "/") for p in wanted if p != path):
            paths.append(path)
    return list(dict.fromkeys(paths))


def _build_root(config: dict) -> None:
    """Mount the enclave's world under config["root"] and make it the root."""
    root, paths, memory = config["root"], config["paths"], config["memory_mib"]
    system_mib = max(MIN_SYSTEM_MIB, memory * SYSTEM_PERCENT // 100)
    _tmpfs(root, system_mib, 0o755)
    binds = _host_binds()
    # The image's command names its own directories (the share, work): none may hide a host bind.
    named = [word for word in config["command"]["argv"][1:] if word.startswith("/")]
    for host in binds:
        for inside in [*paths.values(), *named]:
            if os.path.commonpath([host, inside]) in (host, inside):
                raise EnclaveError(
                    f"the enclave needs the host's {host} at the path where it keeps {inside}: install Python "
                    "(or its virtual environment) elsewhere"
                )
    for host in binds:
        target = root + host
        if os.path.islink(host):  # /bin -> usr/bin on merged-/usr systems
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(host), target)
            continue
        if os.path.isdir(host):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            Path(target).touch()
        _bind(host, target)
    # The host's installed copy of this project (if any) must not shadow the image's code.
    for site in {p for p in sys.path if p.startswith(sys.prefix) and p.endswith("site-packages")}:
        if os.path.isdir(os.path.join(site, "ansible_collections")):
            _mount("tmpfs", root + site + "/ansible_collections", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
    dev = root + "/dev"
    _tmpfs(dev, 1, 0o755, MS_NOSUID | MS_NOEXEC)
    for name in DEVICES:
        Path(dev, name).touch()
        _bind(f"/dev/{name}", f"{dev}/{name}", readonly=False)
    Path(root + paths["nsm"]).touch()
    _bind(config["host_nsm"], root + paths["nsm"], readonly=False)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{dev}/{name}")
    _tmpfs(dev + "/shm", system_mib, 0o1777)
    os.makedirs(root + paths["vsock"])
    _bind(config["host_vsock"], root + paths["vsock"], readonly=False)
    for name in ("proc", "tmp", "etc/ssl"):
        os.makedirs(f"{root}/{name}", exist_ok=True)
    # The image's base carries these; /etc/hosts is boot's to write, and there is no resolv.conf.
    Path(root, "etc/nsswitch.conf").write_text(NSSWITCH)
    Path(root, "etc/passwd").write_text("root:x:0:0:root:/tmp:/bin/sh\n")
    Path(root, "etc/group").write_text("root:x:0:\n")
    Path(root + paths["ca_bundle"]).write_text(config["ca_bundle"])
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise EnclaveError(f"the local runtime does not know pivot_root's system call number on {platform.machine()}")
    os.chdir(root)
    os.makedirs(".old-root")
    _check(_libc.syscall(number, b".", b".old-root"), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old-root", MNT_DETACH), "unmount the host's root")
    os.rmdir("/.old-root")
    # /proc of the enclave's own PID namespace: it sees only its own processes.
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def local_command(command: dict, *, cid: int, vsock_dir: str) -> list[str]:
    """The image's argv as this host runs it: the image's Python is this host's, and each
    vsock://CID:PORT argument is the hybrid-vsock socket for it (see the module's docstring)."""
    argv = list(command["argv"])
    if argv[0] == IMAGE_PYTHON:
        argv[0] = sys.executable
    for index, word in enumerate(argv):
        if word.startswith("vsock://"):
            endpoint = Endpoint.parse(word)
            assert endpoint.cid is not None and endpoint.port is not None  # a vsock endpoint has both
            target = cid if endpoint.cid == VMADDR_CID_ANY else endpoint.cid
            argv[index] = f"unix://{local_socket_path(vsock_dir, target, endpoint.port)}"
    return argv


def _image_environment(config: dict) -> dict:
    """The image's environment (runtime.json), and what only a local enclave gets (module docstring)."""
    env = dict(entry.split("=", 1) for entry in config["command"]["env"])
    memory, paths = config["memory_mib"], config["paths"]
    env["ENCLAVE_SHARE_SIZE"] = f"{max(1, memory * SHARE_PERCENT // 100)}m"
    env["ENCLAVE_WORK_SIZE"] = f"{max(1, memory * WORK_PERCENT // 100)}m"
    # Trust for the local KMS's TLS certificate: the EIF trusts the public roots of its certifi alone.
    env["AWS_CA_BUNDLE"] = paths["ca_bundle"]
    return env


def _unisolated_argv(config: dict) -> list[str]:
    """Without root there are no namespaces, so no boot: the server itself, on host paths."""
    paths, cid, port = config["paths"], config["cid"], config["kms_port"]
    vsock = paths["vsock"]
    return [
        sys.executable, "-s", "-P", "-m", "ansible_collections.confidential_ml.nitro.enclave_server",
        "--listen", f"unix://{vsock}/{cid}_{DEFAULT_PORT}.sock",
        "--share", paths["share"], "--work", paths["work"], "--nsm", f"unix://{paths['nsm']}",
        "--kms-proxy", f"unix://{vsock}/{PARENT_CID}_{KMS_PROXY_PORT}.sock",
        "--kms-listen", str(port), "--kms-endpoint-url", f"https://localhost:{port}",
    ]  # fmt: skip


def init(config: dict) -> int:
    """PID 1 of an enclave: build its root, unpack the image from stdin, run its command, reap orphans."""
    paths = config["paths"]
    console = os.open(config["console"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    if config["isolated"]:
        _build_root(config)
    else:
        for key in ("share", "work"):
            os.makedirs(paths[key], mode=0o700, exist_ok=True)
        Path(paths["ca_bundle"]).write_text(config["ca_bundle"])
    os.makedirs(paths["image"], mode=0o700, exist_ok=True)
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
        tar.extractall(paths["image"], filter="data")
    os.sched_setaffinity(0, config["cpu_ids"])
    env = _image_environment(config)
    if config["isolated"]:
        os.makedirs(paths["app"], exist_ok=True)
        _bind(f"{paths['image']}/app", paths["app"])  # the code, read-only, where the Dockerfile puts it
        program = config["command"]["argv"][0]
        if program != IMAGE_PYTHON:
            # The local image carries no base image, so there is nothing else it could run; in the EIF, init
            # would execvpe it on INIT_PATH, where the base image has no python3 (and no "--listen").
            print(f"enclave init: the image's command starts with {program!r}, not the image's Python "
                  f"{IMAGE_PYTHON}: the EIF's init would execvpe it with PATH={INIT_PATH}, and the local image "
                  f"has nothing else to run. Its command: {config['command']['argv']}",
                  file=sys.stderr, flush=True)  # fmt: skip
            return 1
        argv = local_command(config["command"], cid=config["cid"], vsock_dir=paths["vsock"])
    else:
        argv = _unisolated_argv(config)
        env["PYTHONPATH"] = f"{paths['image']}/app"
    if config["isolated"]:
        # Root with only ENCLAVE_CAPS, which boot narrows before the server starts, so that neither the
        # server nor its jobs can mount, create device nodes or otherwise reach past the namespaces.
        argv = ["setpriv", "--no-new-privs", "--inh-caps=-all", f"--bounding-set=-all,{ENCLAVE_CAPS}", *argv]
    else:
        argv = ["setpriv", "--pdeathsig", "KILL", *argv]  # without a PID namespace, tie the server to init
    server = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=console, stderr=console, cwd="/")
    os.close(console)
    while True:  # PID 1 reaps every orphan in the enclave
        pid, status = os.wait()
        if pid == server.pid:
            server.returncode = os.waitstatus_to_exitcode(status)
            print(f"enclave init: the server ended with status {server.returncode}", file=sys.stderr, flush=True)
            return 1 if server.returncode else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="The local runtime's own processes.")
    commands = parser.add_subparsers(dest="command", required=True)
    sup = commands.add_parser("supervise", help="(internal) supervise one enclave")
    sup.add_argument("path")
    sup.add_argument("--ready-fd", type=int, required=True)
    ini = commands.add_parser("init", help="(internal) PID 1 inside an enclave")
    ini.add_argument("config")
    args = parser.parse_args(argv)
    if args.command == "supervise":
        return supervise(Path(args.path), args.ready_fd)
    return init(json.loads(args.config))


if __name__ == "__main__":
    sys.exit(main())
