"""The wire protocol beside a raw AF_UNIX socket doing the same work.

    python benchmarks/bench_wire.py [--calls 10000] [--bulk-mib 1024] [--json]

The server runs in a process of its own, as the enclave server does (client and
server in one process would share one GIL, which no deployment does); so does the
raw socket's echo peer.

small: request/reply round trips of a typical small request over one connection,
from 1 thread and from 4 threads sharing it, of an op the server runs on its pool
("small") and of an op it answers on the connection's reader thread ("small
inline", as it answers the mount's share.* requests); raw is a ping-pong of
messages of the same size with an echo process (4 threads: 4 raw sockets, since a
raw socket cannot multiplex). The measurements alternate between wire and raw,
--repeat times, and each keeps its best (the machine's cores are shared).
cpu: for the 1-thread runs, the CPU time (user and system, both processes) one
round trip costs, beside the raw ping-pong's: the per-request cost itself, which
waits for a core less than the wall clock does on a busy machine.
bulk: 1 MiB chunks; wire uploads with a request per chunk ("write") and downloads
with a reply per chunk ("read"), each once in sequence and once with 4 threads;
raw streams the same bytes with sendall / recv_into a preallocated buffer.

--mallopt keeps freed MiB buffers in the process (glibc mallopt, the same as
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=16777216:glibc.malloc.trim_threshold=268435456):
by default glibc hands them back to the kernel and every 1 MiB frame then
page-faults its memory in again, which costs more than the copying.
"""

import argparse
import ctypes
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import checkout

checkout.use()  # the imports below come from this tree

from ansible_collections.confidential_ml.nitro.plugins.module_utils import (  # noqa: E402
    wire_client,
    wire_codec,
    wire_frames,
    wire_server,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.endpoints import Endpoint  # noqa: E402

CHUNK = 1024 * 1024
SMALL_ARGS = {"path": "dataset/train/part-0001.csv", "offset": 0, "size": 4096}


def _recv_exact_into(sock, buf):
    view = memoryview(buf)
    while view:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("peer closed")
        view = view[n:]


def _threads(n, target):
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


# --- raw AF_UNIX ------------------------------------------------------------------------------


ECHO = """
import socket, sys, threading

def echo(fd, size):
    sock = socket.socket(fileno=fd)
    buf = memoryview(bytearray(size))
    while True:
        view = buf
        while view:
            n = sock.recv_into(view)
            if not n:
                return
            view = view[n:]
        sock.sendall(buf)

size = int(sys.argv[1])
threads = [threading.Thread(target=echo, args=(int(fd), size)) for fd in sys.argv[2:]]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def cpu_seconds(pid=None):
    """CPU time (user + system) used so far by this process, or by process pid."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_pingpong(calls, threads, size):
    """(seconds, CPU seconds of both processes) for `calls` round trips of `size`-byte messages,
    spread over `threads` socket pairs to an echo process."""
    pairs = [socket.socketpair() for _i in range(threads)]
    fds = [b.fileno() for _a, b in pairs]
    peer = subprocess.Popen([sys.executable, "-c", ECHO, str(size), *map(str, fds)], pass_fds=fds)
    for _a, b in pairs:
        b.close()
    message = os.urandom(size)
    per_thread = calls // threads

    def client(i):
        sock = pairs[i][0]
        buf = bytearray(size)
        for _i in range(per_thread):
            sock.sendall(message)
            _recv_exact_into(sock, buf)

    for a, _b in pairs:  # the peer is up and answering before the clock starts
        a.sendall(message)
        _recv_exact_into(a, bytearray(size))
    cpu = cpu_seconds() + cpu_seconds(peer.pid)
    elapsed = _threads(threads, client)
    cpu = cpu_seconds() + cpu_seconds(peer.pid) - cpu
    for a, _b in pairs:
        a.close()
    if peer.wait(timeout=60) != 0:
        raise SystemExit(f"bench_wire: the raw echo process failed (exit status {peer.returncode})")
    return elapsed, cpu


def raw_stream(total):
    """Seconds to stream `total` bytes in 1 MiB sendall calls into a reused buffer, with a final ack."""
    a, b = socket.socketpair()
    chunk = os.urandom(CHUNK)

    def sink():
        buf = bytearray(CHUNK)
        for _i in range(total // CHUNK):
            _recv_exact_into(b, buf)
        b.sendall(b"k")

    t = threading.Thread(target=sink)
    start = time.perf_counter()
    t.start()
    for _i in range(total // CHUNK):
        a.sendall(chunk)
    assert a.recv(1) == b"k"
    elapsed = time.perf_counter() - start
    t.join()
    a.close()
    b.close()
    return elapsed


# --- wire -------------------------------------------------------------------------------------


def serve(path, mallopt):
    """The benchmark's server process: echo on the pool, echo_inline on the reader thread, bulk write and read."""
    if mallopt:
        keep_freed_memory()
    data = os.urandom(CHUNK)
    handlers = {
        "echo": lambda args, ctx: args,
        "echo_inline": lambda args, ctx: args,
        "write": lambda args, ctx: len(args["data"]),
        "read": lambda args, ctx: data,
    }
    server = wire_server.Server(Endpoint.unix(path).listen(), handlers, inline={"echo_inline"})
    print("ready", flush=True)
    server.serve_forever()


def start_server(sockdir, mallopt):
    path = os.path.join(sockdir, "bench.sock")
    command = [sys.executable, __file__, "--serve", path] + (["--mallopt"] if mallopt else [])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline() != "ready\n":
        proc.kill()
        raise SystemExit(f"bench_wire: the server process did not start (exit status {proc.wait()})")
    return Endpoint.unix(path), proc


def wire_calls(conn, calls, threads, op, args):
    per_thread = calls // threads

    def client(i):
        for _i in range(per_thread):
            conn.call(op, args)

    return _threads(threads, client)


def keep_freed_memory():
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 16 << 20) and libc.mallopt(m_trim_threshold, 256 << 20)):
        raise SystemExit("mallopt refused the settings (not glibc?)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10_000, help="small round trips per measurement")
    parser.add_argument("--bulk-mib", type=int, default=1024, help="MiB moved per bulk measurement")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--mallopt", action="store_true", help="keep freed memory in the process (see above)")
    parser.add_argument("--repeat", type=int, default=3, help="keep the best of N small measurements (default 3)")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.serve:
        serve(opts.serve, opts.mallopt)
        return
    if opts.mallopt:
        keep_freed_memory()
    total = opts.bulk_mib * CHUNK
    small_size = len(wire_codec.encode({"id": 1, "op": "echo", "args": SMALL_ARGS})) + wire_frames.HEADER.size
    results = {}

    def record(name, unit, wire_value, raw_value, higher_is_better):
        ratio = wire_value / raw_value if higher_is_better else raw_value / wire_value
        results[name] = {
            "unit": unit,
            "wire": round(wire_value, 1),
            "raw": round(raw_value, 1),
            "ratio": round(ratio, 3),
        }
        if not opts.json:
            print(f"{name:<26} wire {wire_value:>10.1f}  raw {raw_value:>10.1f}  {unit:<10} wire/raw speed {ratio:.2f}")

    with tempfile.TemporaryDirectory(prefix="bench-wire-") as sockdir:
        endpoint, server = start_server(sockdir, opts.mallopt)
        try:
            with wire_client.Connection.open(endpoint) as conn:
                # Warm up: threads, the pool and the allocator's handling of MiB buffers.
                wire_calls(conn, 200, 1, "echo", SMALL_ARGS)
                wire_calls(conn, 200, 1, "echo_inline", SMALL_ARGS)
                for _i in range(16):
                    conn.call("write", {"data": b"\0" * CHUNK})
                    conn.call("read")
                raw_stream(16 * CHUNK)

                for op, name in (("echo", "small"), ("echo_inline", "small inline")):
                    for threads in (1, 4):
                        w = r = w_cpu = r_cpu = float("inf")
                        for _i in range(opts.repeat):  # interleaved: both see the same load
                            cpu = cpu_seconds() + cpu_seconds(server.pid)
                            w = min(w, wire_calls(conn, opts.calls, threads, op, SMALL_ARGS))
                            w_cpu = min(w_cpu, cpu_seconds() + cpu_seconds(server.pid) - cpu)
                            elapsed, cpu = raw_pingpong(opts.calls, threads, small_size)
                            r, r_cpu = min(r, elapsed), min(r_cpu, cpu)
                        record(f"{name} x{threads} threads", "calls/s", opts.calls / w, opts.calls / r, True)
                        if threads == 1:
                            per_call = 1e6 / opts.calls
                            record(f"{name} cpu", "us/call", w_cpu * per_call, r_cpu * per_call, False)

                n = total // CHUNK
                chunk = os.urandom(CHUNK)
                raw = total / raw_stream(total) / 1e6
                for threads in (1, 4):
                    w = wire_calls(conn, n, threads, "write", {"data": chunk})
                    record(f"upload 1 MiB x{threads}", "MB/s", total / w / 1e6, raw, True)
                    w = wire_calls(conn, n, threads, "read", None)
                    record(f"download 1 MiB x{threads}", "MB/s", total / w / 1e6, raw, True)
        finally:
            server.terminate()
            server.wait()
            server.stdout.close()
    results["config"] = {
        "calls": opts.calls,
        "bulk_mib": opts.bulk_mib,
        "small_message_bytes": small_size,
        "mallopt": opts.mallopt,
        "repeat": opts.repeat,
    }
    if opts.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
