"""Package open and seal beside the primitives they are built on, measured in the same run.

    python benchmarks/bench_package.py [--size-mib 1024] [--repeat 3] [--json]

Creates a directory of random files totalling --size-mib, seals it (in a child process, to read its peak RSS),
then runs --repeat rounds, each interleaving open with its limits on the same bytes:

- open: open_package() of the sealed package into the open directory (a tmpfs by default, as in an enclave),
  in a child process that reports its wall time, its CPU time (all threads) and its peak RSS; the opened tree
  is checked to hold every byte, or the benchmark stops with a non-zero exit;
- bare decrypt of the package's own body to nowhere, twice: with the segment decryption open uses
  (cryptography's AES-GCM on Tink's segment format) and with Tink's own decrypting stream;
- writing the same number of bytes into the open directory (1 MiB pieces, as open writes);
- SHA-256 of the same number of bytes, alone and on a second thread beside the write (how much a second core
  gave this run: open's worker thread decrypts ahead and hashes large files while its main thread writes).

Target (issue 13): open >= 0.5 of min(bare decrypt, write), the limit; the faster bare decrypt counts, so the
limit is the strictest. Open must also hash every byte (docs/PACKAGE_FORMAT.md section 5.1), so on one core it
cannot beat decrypt + SHA-256 + write one after another: that serial floor is printed beside it; open's CPU
time over its wall time shows how much of a second core it got, and its CPU time per thread (main, worker)
beside the write's what it would take with a free one. Seal is timed once per
round against bare Tink encryption of the same bytes. Peak RSS target: < 150 MiB for 1 GiB.

The cores are shared: ratios are the median over rounds of each round's ratio; rates are the best round's.
The data key comes from a stand-in for KMS: this measures the format, not KMS.
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import checkout

checkout.use()  # the imports below come from this tree

from ansible_collections.confidential_ml.nitro.plugins.module_utils import package_format, package_open, package_seal  # noqa: E402

CHUNK = 1 << 20
MIB = 1 << 20
TARGET_OPEN_OVER_LIMIT = 0.5
TARGET_PEAK_RSS_MIB_PER_GIB = 150


class StandInKms:
    """Hands out random data keys and 'wraps' them as themselves: for measuring the format only."""

    def generate_data_key(self, KeyId, KeySpec, EncryptionContext):  # noqa: N803 (boto3's argument names)
        key = os.urandom(32)
        return {"KeyId": f"arn:aws:kms:us-east-1:000000000000:key/{KeyId}", "CiphertextBlob": key, "Plaintext": key}


def make_tree(root: Path, size_mib: int) -> int:
    """Random files totalling size_mib: a few big ones carrying most bytes, and some small ones in subdirectories."""
    small = root / "src" / "small"
    small.mkdir(parents=True)
    for i in range(64):
        (small / f"f{i:02d}.py").write_bytes(os.urandom(4096))
    remaining = size_mib * MIB - 64 * 4096
    big = root / "models"
    big.mkdir()
    index = 0
    while remaining > 0:
        size = min(remaining, 256 * MIB)
        with open(big / f"part{index:03d}.bin", "wb") as out:
            for offset in range(0, size, CHUNK):
                out.write(os.urandom(min(CHUNK, size - offset)))
        remaining -= size
        index += 1
    return size_mib * MIB


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """Run one seal or open in this (fresh) process and print its wall and CPU time and peak RSS as JSON."""
    start, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
    if args.child == "seal":
        package_seal.seal(args.src, args.pkg, kms_client=StandInKms(), key_id="bench", name="bench", version="1")
    else:
        package_open.open_package(args.pkg, args.out, unwrap_key=lambda header: header.wrapped_key)
    seconds, cpu, main_cpu = time.perf_counter() - start, time.process_time() - cpu, time.thread_time() - main_cpu
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "main_thread_cpu_seconds": main_cpu,
                      "peak_rss_mib": peak_rss_mib()}))  # fmt: skip


def run_child(*argv: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *argv], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench_package: the {argv[1]} child failed (exit {result.returncode}): {result.stderr[-2000:]}")
    return json.loads(result.stdout)


def tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def references(pkg: Path, total: int, open_dir: Path) -> dict:
    """The primitives open is built on, each on total bytes: the named step -> a callable to time."""
    header = package_format.read_header(pkg)
    key = header.wrapped_key  # StandInKms wraps a key as itself
    scratch = open_dir / "reference.bin"
    piece = os.urandom(CHUNK)  # the same bytes over again: the cost of the step, not of producing its input
    pieces = total // CHUNK

    def decrypt():
        with open(pkg, "rb") as stream:
            stream.seek(header.body_offset)
            for _segment in package_open._decrypt_segments(stream, key, header.raw):
                pass

    def tink_decrypt():
        with open(pkg, "rb") as stream:
            stream.seek(header.body_offset)
            plaintext = package_seal._streaming_aead(key).new_decrypting_stream(stream, header.raw)
            while plaintext.read(package_format.IO_BYTES):  # open's former read size: Tink's best case here
                pass

    def write():
        with open(scratch, "wb") as out:
            for _i in range(pieces):
                out.write(piece)
        scratch.unlink()

    def sha256():
        digest = hashlib.sha256()
        for _i in range(pieces):
            digest.update(piece)

    def sha256_beside_write():
        hasher = threading.Thread(target=sha256)
        hasher.start()
        write()
        hasher.join()

    return {"decrypt": decrypt, "tink_decrypt": tink_decrypt, "write": write, "sha256": sha256,
            "sha256_beside_write": sha256_beside_write}  # fmt: skip


def tink_encrypt(src: Path, work: Path) -> float:
    """Bare Tink encryption of the tree's bytes (read from the files, as seal reads them) into one file."""
    aead = package_seal._streaming_aead(os.urandom(32))
    ciphertext = work / "bare.tink"

    def encrypt():
        with aead.new_encrypting_stream(open(ciphertext, "wb"), b"ad") as stream:
            for path in sorted(p for p in src.rglob("*") if p.is_file()):
                with open(path, "rb") as source:
                    while chunk := source.read(CHUNK):
                        stream.write(chunk)

    seconds = timed(encrypt)
    ciphertext.unlink()
    return seconds


def measure(args: argparse.Namespace, work: Path, open_dir: Path) -> tuple[int, list[dict]]:
    src, pkg, out = work / "tree", work / "bench.pkg", open_dir / "opened"
    total = make_tree(src, args.size_mib)
    rounds = []
    for _round in range(args.repeat):
        sealed = run_child("--child", "seal", "--src", str(src), "--pkg", str(pkg))
        seconds = {"seal": sealed["seconds"], "tink_encrypt": tink_encrypt(src, work)}
        opened = run_child("--child", "open", "--pkg", str(pkg), "--out", str(out))
        if tree_bytes(out) != total:
            sys.exit(f"bench_package: open wrote {tree_bytes(out)} bytes into {out}, not the {total} sealed")
        shutil.rmtree(out)
        seconds["open"] = opened["seconds"]
        for name, step in references(pkg, total, open_dir).items():
            cpu = time.process_time()
            seconds[name] = timed(step)
            if name == "write":
                write_cpu = time.process_time() - cpu
        rounds.append(
            {"seconds": seconds, "open_cpu_seconds": opened["cpu_seconds"],
             "open_main_thread_cpu_seconds": opened["main_thread_cpu_seconds"], "write_cpu_seconds": write_cpu,
             "seal_peak_rss_mib": sealed["peak_rss_mib"], "open_peak_rss_mib": opened["peak_rss_mib"]}
        )  # fmt: skip
    return total, rounds


def summarise(total: int, rounds: list[dict]) -> dict:
    def ratio(per_round) -> float:
        return round(statistics.median(per_round(r["seconds"]) for r in rounds), 2)

    def rate(name: str) -> float:
        return round(total / min(r["seconds"][name] for r in rounds) / 1e6, 1)

    def limit(s: dict) -> float:  # the slower (as a rate: min) of the faster bare decrypt and the write
        return max(min(s["decrypt"], s["tink_decrypt"]), s["write"])

    def serial_floor(s: dict) -> float:
        return s["decrypt"] + s["sha256"] + s["write"]

    return {
        "seal_mb_s": rate("seal"),
        "open_mb_s": rate("open"),
        "decrypt_mb_s": rate("decrypt"),
        "tink_decrypt_mb_s": rate("tink_decrypt"),
        "write_mb_s": rate("write"),
        "sha256_mb_s": rate("sha256"),
        "tink_encrypt_mb_s": rate("tink_encrypt"),
        "open_over_limit": ratio(lambda s: limit(s) / s["open"]),
        "open_over_limit_best_round": round(max(limit(r["seconds"]) / r["seconds"]["open"] for r in rounds), 2),
        "open_over_write": ratio(lambda s: s["write"] / s["open"]),
        "open_over_decrypt": ratio(lambda s: s["decrypt"] / s["open"]),
        "open_over_tink_decrypt": ratio(lambda s: s["tink_decrypt"] / s["open"]),
        "open_over_serial_floor": ratio(lambda s: serial_floor(s) / s["open"]),
        "serial_floor_over_limit": ratio(lambda s: limit(s) / serial_floor(s)),
        "tink_decrypt_over_decrypt": ratio(lambda s: s["decrypt"] / s["tink_decrypt"]),
        "sha256_beside_write_over_serial": ratio(lambda s: (s["sha256"] + s["write"]) / s["sha256_beside_write"]),
        "open_cpu_over_wall": round(statistics.median(r["open_cpu_seconds"] / r["seconds"]["open"] for r in rounds), 2),
        # CPU seconds (medians): what each thread of open cost, beside what the write alone cost. With a free
        # second core open's wall time would approach the larger of its two threads'.
        "open_main_thread_cpu_s": cpu_seconds(rounds, lambda r: r["open_main_thread_cpu_seconds"]),
        "open_worker_thread_cpu_s": cpu_seconds(
            rounds, lambda r: r["open_cpu_seconds"] - r["open_main_thread_cpu_seconds"]
        ),
        "write_cpu_s": cpu_seconds(rounds, lambda r: r["write_cpu_seconds"]),
        "seal_over_tink_encrypt": ratio(lambda s: s["tink_encrypt"] / s["seal"]),
        "seal_peak_rss_mib": round(max(r["seal_peak_rss_mib"] for r in rounds), 1),
        "open_peak_rss_mib": round(max(r["open_peak_rss_mib"] for r in rounds), 1),
    }


def cpu_seconds(rounds: list[dict], pick) -> float:
    return round(statistics.median(pick(r) for r in rounds), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="total size of the random tree (default 1024)")
    parser.add_argument("--dir", default=None, help="where to put the tree and the package (default: system temp)")
    parser.add_argument(
        "--open-dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where open writes the tree (default /dev/shm: the enclave opens into a tmpfs)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds; ratios are medians over them (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--child", choices=["seal", "open"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--pkg", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="bench_package.", dir=args.dir))
    open_dir = Path(tempfile.mkdtemp(prefix="bench_package.", dir=args.open_dir))
    try:
        total, rounds = measure(args, work, open_dir)
    finally:
        shutil.rmtree(work)
        shutil.rmtree(open_dir)
    result = {
        "options": {"size_mib": args.size_mib, "repeat": args.repeat, "cpus": os.cpu_count()},  # settings
        # Not measured: the targets the figures are held to.
        "given": {
            "target_open_over_limit": TARGET_OPEN_OVER_LIMIT,
            "target_peak_rss_mib_per_gib": TARGET_PEAK_RSS_MIB_PER_GIB,
        },  # fmt: skip
        "open_dir": str(args.open_dir or tempfile.gettempdir()),
        **summarise(total, rounds),
    }
    if args.json:
        print(json.dumps(result))
        return
    r = result
    print(f"package format, {args.size_mib} MiB of random files, opened into {r['open_dir']}, {args.repeat} rounds")
    print("  (MB/s = 10^6 bytes of plaintext per second, wall clock, best round; ratios: median over rounds)")
    print(f"  {'seal':<40}{r['seal_mb_s']:>8} MB/s   peak RSS {r['seal_peak_rss_mib']} MiB")
    print(f"  {'open':<40}{r['open_mb_s']:>8} MB/s   peak RSS {r['open_peak_rss_mib']} MiB")
    print(f"  {'bare decrypt (AES-GCM segments, as open)':<40}{r['decrypt_mb_s']:>8} MB/s")
    print(f"  {'bare Tink decrypt':<40}{r['tink_decrypt_mb_s']:>8} MB/s")
    print(f"  {'write to the open directory':<40}{r['write_mb_s']:>8} MB/s")
    print(f"  {'SHA-256 (hashlib)':<40}{r['sha256_mb_s']:>8} MB/s")
    print(f"  {'bare Tink encrypt':<40}{r['tink_encrypt_mb_s']:>8} MB/s")
    print(f"  open / min(bare decrypt, write)   {r['open_over_limit']:>8}     (target >= {TARGET_OPEN_OVER_LIMIT}; "
          f"best round {r['open_over_limit_best_round']})")  # fmt: skip
    print(f"  open / write                      {r['open_over_write']:>8}")
    print(f"  open / bare decrypt               {r['open_over_decrypt']:>8}")
    print(f"  open / bare Tink decrypt          {r['open_over_tink_decrypt']:>8}")
    print(f"  open / (decrypt+SHA-256+write)    {r['open_over_serial_floor']:>8}     (> 1: the hash overlapped)")
    print(f"  serial floor / limit              {r['serial_floor_over_limit']:>8}     (the best one core can do)")
    print(f"  open CPU / open wall              {r['open_cpu_over_wall']:>8}     (how much of a second core it got)")
    print(f"  open CPU: main thread {r['open_main_thread_cpu_s']} s, worker (decrypt ahead, hash) "
          f"{r['open_worker_thread_cpu_s']} s; the write alone {r['write_cpu_s']} s (medians)")  # fmt: skip
    print(f"  SHA-256 beside write / serial     {r['sha256_beside_write_over_serial']:>8}     (2 = a free second core)")
    print(f"  bare Tink / bare AES-GCM decrypt  {r['tink_decrypt_over_decrypt']:>8}")
    print(f"  seal / bare Tink encrypt          {r['seal_over_tink_encrypt']:>8}")
    print(f"  peak RSS target: < {TARGET_PEAK_RSS_MIB_PER_GIB} MiB for 1 GiB")


if __name__ == "__main__":
    main()
