"""`enclave sync` (FUSE over the wire) beside its limits.

    python benchmarks/bench_fuse.py [--size-mib 1024] [--files 2000] [--repeat 2] [--json]

Starts an enclave server the way tests/integration/conftest.py does (a subprocess on
a unix socket, the simulated NSM on a socket beside it; the share on a tmpfs, as in
an enclave), mounts its share with `fusefs.mount` (attested, in the background, as
`enclave sync -d DIR` does), and measures, each beside its limit:

- sequential write and read of --size-mib through the mount with dd bs=1M, beside
  a plain tmpfs (/dev/shm), an in-process FUSE memory file system (the minimal
  mfusepy file system below: the same libfuse, options and Python, no RPC), an
  in-process FUSE passthrough to a tmpfs directory (the same, plus the tmpfs
  write the enclave's share pays) and a raw AF_UNIX socket stream of the same
  bytes in 1 MiB chunks;
- `cp -r` of --files files of 4 KiB, then `ls -lR` and `rm -r` of them, beside the
  same on tmpfs and on the two in-process file systems, and beside the floor of the
  mount's design: the in-process memory file system plus what the wire alone costs
  for the same files (the same requests the mount sends, one after another on a
  connection of this process: a create carrying the data per file, a listing, an
  unlink per file). A close or an unlink through the mount waits for its answer
  (an error must reach the program that caused it, and a job started after `cp`
  returns must find every file), so one round trip per file is the floor.

Targets (issue 13): `cp -r` and `rm -r` of 1,000 x 4 KiB within 1.5x of the
in-process memory file system, `ls -lR` no slower than before (a given ratio: it was
measured before that work, not in this run); mount write >= 60% of the in-process
FUSE write and >= 250 MB/s; the
small-file copy <= 0.27 s per 1,000 files of 4 KiB. That bound is a quarter of the
1.08 s per 1,000 files given for the original AWS sample's FUSE client, a figure
from elsewhere that this run does not measure: it is printed as given, never as a
measurement or a ratio. Reads are measured with the file's page cache dropped first. The server
runs with glibc keeping freed MiB buffers (docs/PROTOCOL.md section 9), as the
mount process does; --server-default-malloc shows the difference. --repeat N keeps
the best of N runs of each measurement (the machine's cores are shared).

The in-process references load libfuse 3 as the product does (fusefs picks it even
where libfuse 2 is installed) and must really be FUSE mounts: if one fails to mount,
or what is at its mount point is not a fuse file system, the benchmark stops with a
non-zero exit rather than time a plain directory under its name.
"""

import argparse
import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import checkout

checkout.use()  # the imports below come from this tree

from ansible_collections.confidential_ml.nitro.cli import fusefs  # noqa: E402
from ansible_collections.confidential_ml.nitro.plugins.module_utils import mounts  # noqa: E402

MIB = 1 << 20
# Given, not measured here: the original AWS sample's FUSE client, 1,000 files of 4 KiB.
GIVEN_ORIGINAL_S_PER_1000_FILES = 1.08
TARGET_WRITE_RATIO = 0.60
TARGET_WRITE_MBS = 250
TARGET_SMALL_CP_S_PER_1000_FILES = 0.27  # a quarter of the given figure above
TARGET_SMALL_VS_MEMFS = 1.5  # cp -r and rm -r of the small files, mount / in-process memory file system
# Given, not measured here: ls -lR mount / memfs before issue 13's work (bench_fuse, this machine, 1,000 files).
GIVEN_LS_VS_MEMFS_BEFORE = 1.5
SMALL = ("cp", "ls", "rm")


# ---------------------------------------------------------------- the in-process FUSE limit


def serve_memfs(mountpoint: str) -> None:
    """A minimal memory file system on mfusepy: the FUSE cost without any RPC."""
    mfusepy = fusefs._load_mfusepy()  # libfuse 3, as the mount uses; stops if only libfuse 2 loads

    class Chunks:
        """File contents as 1 MiB chunks: an aligned 1 MiB write is kept as it came, never copied again;
        a partial chunk is only as long as what was written into it."""

        def __init__(self):
            self.chunks: dict[int, bytes | bytearray] = {}
            self.size = 0

        def write(self, offset, data):
            if offset % MIB == 0 and len(data) == MIB:
                self.chunks[offset // MIB] = data
            else:
                view, pos = memoryview(data), offset
                while view:
                    index, start = divmod(pos, MIB)
                    n = min(len(view), MIB - start)
                    chunk = self.chunks.get(index, b"")
                    if not isinstance(chunk, bytearray):
                        chunk = self.chunks[index] = bytearray(chunk)
                    if len(chunk) < start:
                        chunk.extend(bytes(start - len(chunk)))
                    chunk[start : start + n] = view[:n]
                    view, pos = view[n:], pos + n
            self.size = max(self.size, offset + len(data))

        def read(self, offset, size):
            end = min(offset + size, self.size)
            if offset % MIB == 0 and end - offset == MIB and len(self.chunks.get(offset // MIB, b"")) == MIB:
                return bytes(self.chunks[offset // MIB])
            out = bytearray()
            while offset < end:
                index, start = divmod(offset, MIB)
                n = min(end - offset, MIB - start)
                piece = self.chunks.get(index, b"")[start : start + n]
                out += piece + bytes(n - len(piece))
                offset += n
            return bytes(out)

        def truncate(self, length):
            self.size = length
            for index in [i for i in self.chunks if i * MIB >= length]:
                del self.chunks[index]
            tail = length % MIB
            if tail and length // MIB in self.chunks:
                self.chunks[length // MIB] = bytearray(self.chunks[length // MIB][:tail])

    class MemFS(mfusepy.Operations):
        use_ns = True

        def __init__(self):
            self.nodes = {"/": self._node(stat.S_IFDIR | 0o755)}
            self.children = {"/": set()}
            self.data = {}

        @staticmethod
        def _node(mode):
            now = time.time_ns()
            return {"st_mode": mode, "st_nlink": 1, "st_blksize": MIB, "st_atime": now, "st_mtime": now,
                    "st_ctime": now}  # fmt: skip

        def _add(self, path, mode):
            parent, name = path.rsplit("/", 1)
            self.children[parent or "/"].add(name)
            self.nodes[path] = self._node(mode)

        def _remove(self, path):
            parent, name = path.rsplit("/", 1)
            self.children[parent or "/"].discard(name)
            del self.nodes[path]

        def init_with_config(self, conn, config):
            conn.max_write = conn.max_readahead = conn.max_read = MIB  # as fusefs does
            threading.Thread(target=fusefs.raise_readahead, args=(mountpoint,), daemon=True).start()

        def getattr(self, path, fh=None):
            node = self.nodes.get(path)
            if node is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            return dict(node, st_size=self.data[path].size) if path in self.data else node

        def readdir(self, path, fh):
            return [".", "..", *self.children[path]]

        def mkdir(self, path, mode):
            self._add(path, stat.S_IFDIR | mode)
            self.children[path] = set()

        def rmdir(self, path):
            if self.children[path]:
                raise mfusepy.FuseOSError(errno.ENOTEMPTY)
            self._remove(path)
            del self.children[path]

        def create(self, path, mode, flags):
            self._add(path, stat.S_IFREG | mode)
            self.data[path] = Chunks()
            return 0

        def open(self, path, flags):
            if flags & os.O_TRUNC:
                self.data[path] = Chunks()
            return 0

        def read(self, path, size, offset, fh):
            return self.data[path].read(offset, size)

        def write(self, path, data, offset, fh):
            self.data[path].write(offset, data)
            return len(data)

        def truncate(self, path, length, fh=None):
            self.data[path].truncate(length)

        def unlink(self, path):
            self._remove(path)
            del self.data[path]

    options = dict(fusefs.FUSE_OPTIONS, fsname="memfs", subtype="memfs")
    mfusepy.FUSE(MemFS(), mountpoint, foreground=True, **options)


def serve_passthrough(mountpoint: str, backing: str) -> None:
    """A minimal mfusepy file system passing every call to a directory on tmpfs: the FUSE cost plus the
    tmpfs write the enclave's share also pays, without any RPC."""
    mfusepy = fusefs._load_mfusepy()  # libfuse 3, as the mount uses; stops if only libfuse 2 loads

    def real(path):
        return os.path.join(backing, path.lstrip("/"))

    class Passthrough(mfusepy.Operations):
        use_ns = True

        def init_with_config(self, conn, config):
            conn.max_write = conn.max_readahead = conn.max_read = MIB  # as fusefs does
            threading.Thread(target=fusefs.raise_readahead, args=(mountpoint,), daemon=True).start()

        def getattr(self, path, fh=None):
            st = os.lstat(real(path))
            attrs = {key: getattr(st, key) for key in ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid")}
            # use_ns: mfusepy takes st_atime and the others in nanoseconds
            return attrs | {key: getattr(st, key + "_ns") for key in ("st_atime", "st_mtime", "st_ctime")}

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(real(path))]

        def mkdir(self, path, mode):
            os.mkdir(real(path), mode)

        def rmdir(self, path):
            os.rmdir(real(path))

        def create(self, path, mode, flags):
            return os.open(real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

        def open(self, path, flags):
            return os.open(real(path), flags & ~os.O_CREAT)

        def read(self, path, size, offset, fh):
            return os.pread(fh, size, offset)

        def write(self, path, data, offset, fh):
            return os.pwrite(fh, data, offset)

        def truncate(self, path, length, fh=None):
            os.truncate(real(path), length)

        def release(self, path, fh):
            os.close(fh)

        def unlink(self, path):
            os.unlink(real(path))

    options = dict(fusefs.FUSE_OPTIONS, fsname="passthrough", subtype="passthrough")
    mfusepy.FUSE(Passthrough(), mountpoint, foreground=True, **options)


# ---------------------------------------------------------------- measurements


def timed(command: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, shell=True, check=True)
    return time.perf_counter() - start


def drop_page_cache(path: Path) -> None:
    # A read right after the write would come from the kernel's page cache, not the file system.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential(directory: Path, size_mib: int) -> dict:
    target = directory / "sequential.bin"
    write = timed(f"dd if=/dev/zero of='{target}' bs=1M count={size_mib} status=none")
    drop_page_cache(target)
    read = timed(f"dd if='{target}' of=/dev/null bs=1M status=none")
    target.unlink()
    total = size_mib * MIB
    return {"write_mbs": total / write / 1e6, "read_mbs": total / read / 1e6}


def small_files(directory: Path, source: Path) -> dict:
    copy = directory / "small"
    return {
        "cp_s": timed(f"cp -r '{source}' '{copy}'"),
        "ls_s": timed(f"ls -lR '{copy}' > /dev/null"),
        "rm_s": timed(f"rm -r '{copy}'"),
    }


def wire_small_files(endpoint: str, source: Path) -> dict:
    """The wire's share of the small-file commands: the requests the mount sends for them, one after
    another (as cp and rm issue them) on a connection of this process, without FUSE."""
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.wire_client import Connection

    files = [(f"/dataset/wire-floor/{p.name}", p.read_bytes()) for p in sorted(source.iterdir())]
    with Connection.open(endpoint) as connection:
        start = time.perf_counter()
        connection.call("share.mkdir", {"path": "/dataset/wire-floor", "mode": 0o755})
        for path, data in files:
            connection.call("share.create", {"path": path, "mode": 0o644, "exclusive": True, "data": data})
        cp = time.perf_counter() - start
        start = time.perf_counter()
        connection.call("share.list", {"path": "/dataset/wire-floor"})
        ls = time.perf_counter() - start
        start = time.perf_counter()
        for path, _data in files:
            connection.call("share.unlink", {"path": path})
        connection.call("share.rmdir", {"path": "/dataset/wire-floor"})
        rm = time.perf_counter() - start
    return {"cp_s": cp, "ls_s": ls, "rm_s": rm}


def raw_socket(size_mib: int) -> float:
    """MB/s of a raw AF_UNIX stream: 1 MiB sendall calls into a reused receive buffer."""
    a, b = socket.socketpair()
    chunk = os.urandom(MIB)

    def sink():
        buf = memoryview(bytearray(MIB))
        for _i in range(size_mib):
            view = buf
            while view:
                view = view[b.recv_into(view) :]
        b.sendall(b"k")

    thread = threading.Thread(target=sink)
    start = time.perf_counter()
    thread.start()
    for _i in range(size_mib):
        a.sendall(chunk)
    assert a.recv(1) == b"k"
    elapsed = time.perf_counter() - start
    thread.join()
    a.close()
    b.close()
    return size_mib * MIB / elapsed / 1e6


def best(runs: list[dict]) -> dict:
    """Per key, the best of the runs (highest rate, lowest time)."""
    return {key: (max if key.endswith("_mbs") else min)(run[key] for run in runs) for key in runs[0]}


# ---------------------------------------------------------------- set-up


def wait_until(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_fuse: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.02)


class Served(NamedTuple):
    endpoint: str
    pcr0: str  # hex


@contextlib.contextmanager
def enclave_server(base: Path, share: Path, *, tunables: bool):
    """The enclave server as the integration fixture starts it; yields its Served (endpoint, PCR0 hex)."""
    from ansible_collections.confidential_ml.nitro.enclave_local.nsm_service import NsmService
    from ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim import LocalCA, SimulatedNsm

    pcr0 = hashlib.sha384(b"bench_fuse enclave image").digest()
    ca = LocalCA.load_or_create(base / "home")
    nsm = NsmService(SimulatedNsm(ca, {0: pcr0, 1: bytes(48), 2: bytes(48)}), base / "nsm.sock").start()
    sock = base / "16_5000.sock"
    (base / "work").mkdir()
    env = dict(os.environ, GLIBC_TUNABLES=fusefs.MALLOC_TUNABLES) if tunables else None
    server = subprocess.Popen(
        [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.enclave_server", "--listen", f"unix://{sock}",
         "--share", str(share), "--work", str(base / "work"), "--nsm", f"unix://{base / 'nsm.sock'}",
         "--log-level", "WARNING"],
        env=env,
    )  # fmt: skip
    try:
        wait_until(lambda: sock.exists() or server.poll() is not None, "the enclave server's start")
        if server.poll() is not None:
            raise SystemExit("bench_fuse: the enclave server exited during start-up")
        yield Served(f"unix://{sock}", pcr0.hex())
    finally:
        server.terminate()
        server.wait(timeout=30)
        nsm.stop()


def fuse_fstype(path: Path) -> str | None:
    """The file system type of the mount exactly at path ("fuse.memfs", ...), from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            # The mount point is the fifth field (octal escapes); the type follows the " - " separator.
            # The last mount at a path is the one seen there.
            if fields[4].encode().decode("unicode_escape") == target:
                found = fields[fields.index("-") + 1]
    return found


def require_fuse_mount(path: Path, what: str) -> None:
    """Stop unless path is a FUSE mount point: a plain directory timed under a FUSE name would lie."""
    fstype = fuse_fstype(path)
    if not os.path.ismount(path) or not fstype or not fstype.startswith("fuse"):
        raise SystemExit(
            f"bench_fuse: {what} at {path} is not a FUSE mount (type {fstype or 'none'}): "
            "the reference cannot be measured; see the messages above (is libfuse 3 installed?)"
        )


@contextlib.contextmanager
def reference_mount(mountpoint: Path, backing: Path | None = None):
    """The in-process memory file system, or with backing the passthrough to that directory."""
    mountpoint.mkdir()
    env = dict(os.environ, GLIBC_TUNABLES=fusefs.MALLOC_TUNABLES)  # as the mount process runs
    serve = ["--serve-passthrough", str(mountpoint), "--backing", str(backing)] if backing else \
        ["--serve-memfs", str(mountpoint)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, __file__, *serve], env=env)
    try:
        wait_until(lambda: mounts.is_mounted(mountpoint) or proc.poll() is not None, f"the mount at {mountpoint}")
        if proc.poll() is not None:
            raise SystemExit(
                f"bench_fuse: the reference file system at {mountpoint} exited with status {proc.returncode} "
                "before mounting; see its messages above"
            )
        require_fuse_mount(mountpoint, "the reference file system")
        os.stat(mountpoint)
        yield mountpoint
    finally:
        if mounts.is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
        proc.wait(timeout=30)


@contextlib.contextmanager
def enclave_mount(endpoint: str, mountpoint: Path, pcr0: str):
    mountpoint.mkdir()
    fusefs.mount(endpoint, mountpoint, expect_pcr0=pcr0)
    require_fuse_mount(mountpoint, "the enclave mount")
    state = mounts.mount_state(mountpoint)
    report = {}
    try:
        yield report
    finally:
        with contextlib.suppress(Exception):
            mounts.unmount(mountpoint)
        if mounts.is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        with contextlib.suppress(OSError, ValueError):
            report.update(json.loads(Path(state["stats"]).read_text()))


# ---------------------------------------------------------------- report


def summarise_sizes(sizes: dict) -> str:
    total = sum(sizes.values())
    if not total:
        return "none"
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    return f"{total} requests: " + ", ".join(f"{count} of {int(size) // 1024} KiB" for size, count in top)


def print_report(r: dict) -> None:
    seq, small, o = r["sequential"], r["small_files"], r["options"]
    print(f"sequential {o['size_mib']} MiB, dd bs=1M (best of {o['repeat']})      write MB/s   read MB/s")
    for name, label in (("tmpfs", "tmpfs (/dev/shm)"), ("memfs", "in-process FUSE memory fs (no RPC)"),
                        ("passthrough", "in-process FUSE passthrough to tmpfs"),
                        ("mount", "enclave mount (FUSE + wire + server)")):  # fmt: skip
        print(f"  {label:<44} {seq[name]['write_mbs']:>10.0f} {seq[name]['read_mbs']:>11.0f}")
    print(f"  {'raw AF_UNIX socket stream (1 MiB sends)':<44} {r['raw_socket_mbs']:>10.0f} {'':>11}")
    ratios = r["ratios"]
    print(f"  mount / in-process FUSE: write {ratios['write_vs_memfs']:.2f} (target >= {TARGET_WRITE_RATIO}), "
          f"read {ratios['read_vs_memfs']:.2f}; mount write {seq['mount']['write_mbs']:.0f} MB/s "
          f"(target >= {TARGET_WRITE_MBS})")  # fmt: skip
    print(f"  mount / in-process FUSE passthrough to tmpfs: write {ratios['write_vs_passthrough']:.2f}")
    print(f"  mount / raw socket: write {ratios['write_vs_socket']:.2f}, read {ratios['read_vs_socket']:.2f}")
    print(f"  mount requests: writes {summarise_sizes(r['mount_requests']['write_sizes'])}; "
          f"reads {summarise_sizes(r['mount_requests']['read_sizes'])}")  # fmt: skip
    print(f"small files: {o['files']} x {o['file_kib']} KiB              cp -r s    ls -lR s    rm -r s")
    for name, label in (("tmpfs", "tmpfs (/dev/shm)"), ("memfs", "in-process FUSE memory fs"),
                        ("passthrough", "in-process FUSE passthrough"), ("wire", "the wire alone (mount's requests)"),
                        ("floor", "floor: memory fs + the wire"), ("mount", "enclave mount")):  # fmt: skip
        s = small[name]
        print(f"  {label:<36} {s['cp_s']:>9.2f} {s['ls_s']:>11.2f} {s['rm_s']:>10.2f}")
    print("  mount / memory fs (target), floor / memory fs:")
    for key, target in (("cp", f"<= {TARGET_SMALL_VS_MEMFS}"), ("rm", f"<= {TARGET_SMALL_VS_MEMFS}"),
                        ("ls", f"<= {GIVEN_LS_VS_MEMFS_BEFORE}, the ratio before, given")):  # fmt: skip
        print(f"    {key:<3} {ratios[f'small_{key}_vs_memfs']:.2f} (target {target}), "
              f"floor {ratios[f'floor_{key}_vs_memfs']:.2f}")  # fmt: skip
    print(
        f"  mount cp {r['mount_cp_s_per_1000_files']:.2f} s per 1,000 files (target <= "
        f"{TARGET_SMALL_CP_S_PER_1000_FILES}); mount cp / passthrough cp {ratios['small_cp_vs_passthrough']:.2f}"
    )
    print(f"  not measured here: the original sample's {r['given']['original_sample_cp_s_per_1000_files']} s per "
          "1,000 files, a figure from elsewhere (the target above is a quarter of it)")  # fmt: skip
    ops = r["mount_requests"]["ops"]
    print(f"  mount round trips: {json.dumps({k: v for k, v in sorted(ops.items()) if k.startswith('share.')})}")
    verdicts = r["targets"]
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in verdicts.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="MiB written and read sequentially (default 1024)")
    parser.add_argument("--files", type=int, default=1000, help="small files copied (default 1000)")
    parser.add_argument("--file-kib", type=int, default=4, help="size of each small file (default 4)")
    parser.add_argument("--repeat", type=int, default=2, help="keep the best of N runs of each measurement (default 2)")
    parser.add_argument("--server-default-malloc", action="store_true", help="run the server without the tunables")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve-memfs", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--serve-passthrough", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--backing", metavar="DIR", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    try:
        if opts.serve_memfs:
            serve_memfs(opts.serve_memfs)
            return 0
        if opts.serve_passthrough:
            serve_passthrough(opts.serve_passthrough, opts.backing)
            return 0
    except fusefs.EnclaveError as err:
        raise SystemExit(f"bench_fuse: the reference file system cannot start: {err}") from err
    if not os.path.isdir("/dev/shm"):
        raise SystemExit("bench_fuse: /dev/shm (a tmpfs) is needed for the baseline and the share")

    base = Path(tempfile.mkdtemp(prefix="bench-fuse-"))
    shm = Path(tempfile.mkdtemp(prefix="bench-fuse-", dir="/dev/shm"))
    os.environ["ENCLAVE_HOME"] = str(base / "home")
    try:
        source = shm / "source"
        source.mkdir()
        for i in range(opts.files):
            (source / f"file{i:05}.bin").write_bytes(os.urandom(opts.file_kib * 1024))
        (shm / "tmpfs").mkdir()
        (shm / "backing").mkdir()
        targets = {"tmpfs": shm / "tmpfs"}
        runs = {name: {"sequential": [], "small_files": []} for name in ("tmpfs", "memfs", "passthrough", "mount")}
        wire_runs = []
        with (
            enclave_server(base, shm / "share", tunables=not opts.server_default_malloc) as served,
            reference_mount(base / "memfs") as memfs,
            reference_mount(base / "passthrough", shm / "backing") as passthrough,
            # One name, not (endpoint, pcr0): pylint takes names unpacked in a with item as unset in the next.
            enclave_mount(served.endpoint, base / "synced_folder", served.pcr0) as mount_report,
        ):
            targets["memfs"] = memfs
            targets["passthrough"] = passthrough
            targets["mount"] = base / "synced_folder" / "dataset"
            for _i in range(opts.repeat):
                for name, directory in targets.items():
                    runs[name]["sequential"].append(sequential(directory, opts.size_mib))
                    runs[name]["small_files"].append(small_files(directory, source))
                wire_runs.append(wire_small_files(served.endpoint, source))
            raw = max(raw_socket(opts.size_mib) for _i in range(opts.repeat))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)

    seq = {name: best(run["sequential"]) for name, run in runs.items()}
    small = {name: best(run["small_files"]) for name, run in runs.items()}
    small["wire"] = best(wire_runs)
    # The design's floor: FUSE as the in-process memory file system pays it, plus the wire's round trips.
    small["floor"] = {key: small["memfs"][key] + small["wire"][key] for key in small["wire"]}
    mount_cp_per_1000 = small["mount"]["cp_s"] * 1000 / opts.files
    ratios = {
        "write_vs_memfs": seq["mount"]["write_mbs"] / seq["memfs"]["write_mbs"],
        "write_vs_passthrough": seq["mount"]["write_mbs"] / seq["passthrough"]["write_mbs"],
        "small_cp_vs_passthrough": small["mount"]["cp_s"] / small["passthrough"]["cp_s"],
        "read_vs_memfs": seq["mount"]["read_mbs"] / seq["memfs"]["read_mbs"],
        "write_vs_socket": seq["mount"]["write_mbs"] / raw,
        "read_vs_socket": seq["mount"]["read_mbs"] / raw,
        "write_vs_tmpfs": seq["mount"]["write_mbs"] / seq["tmpfs"]["write_mbs"],
        "small_cp_vs_tmpfs": small["mount"]["cp_s"] / small["tmpfs"]["cp_s"],
        **{
            f"small_{key}_vs_memfs": small["mount"][f"{key}_s"] / small["memfs"][f"{key}_s"]
            for key in ("cp", "ls", "rm")
        },
        **{
            f"floor_{key}_vs_memfs": small["floor"][f"{key}_s"] / small["memfs"][f"{key}_s"]
            for key in ("cp", "ls", "rm")
        },
    }
    results = {
        "sequential": seq,
        "raw_socket_mbs": raw,
        "small_files": small,
        "mount_cp_s_per_1000_files": mount_cp_per_1000,
        "ratios": ratios,
        # Not measured in this run: the targets, and a figure from elsewhere they derive from.
        "given": {
            "original_sample_cp_s_per_1000_files": GIVEN_ORIGINAL_S_PER_1000_FILES,
            "target_write_ratio_vs_memfs": TARGET_WRITE_RATIO,
            "target_write_mbs": TARGET_WRITE_MBS,
            "target_cp_s_per_1000_files": TARGET_SMALL_CP_S_PER_1000_FILES,
            "target_small_vs_memfs": TARGET_SMALL_VS_MEMFS,
            "ls_vs_memfs_before": GIVEN_LS_VS_MEMFS_BEFORE,
        },
        "mount_requests": mount_report,
        "targets": {
            "write >= 60% of in-process FUSE": ratios["write_vs_memfs"] >= TARGET_WRITE_RATIO,
            "write >= 250 MB/s": seq["mount"]["write_mbs"] >= TARGET_WRITE_MBS,
            f"small files cp <= {TARGET_SMALL_CP_S_PER_1000_FILES} s per 1,000": (
                mount_cp_per_1000 <= TARGET_SMALL_CP_S_PER_1000_FILES
            ),
            f"cp -r <= {TARGET_SMALL_VS_MEMFS}x memfs": ratios["small_cp_vs_memfs"] <= TARGET_SMALL_VS_MEMFS,
            f"rm -r <= {TARGET_SMALL_VS_MEMFS}x memfs": ratios["small_rm_vs_memfs"] <= TARGET_SMALL_VS_MEMFS,
            f"ls -lR <= {GIVEN_LS_VS_MEMFS_BEFORE}x memfs (as before)": (
                ratios["small_ls_vs_memfs"] <= GIVEN_LS_VS_MEMFS_BEFORE
            ),
        },
        "options": {
            "size_mib": opts.size_mib,
            "files": opts.files,
            "file_kib": opts.file_kib,
            "repeat": opts.repeat,
            "server_tunables": not opts.server_default_malloc,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
    }
    if opts.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
