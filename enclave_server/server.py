"""The enclave server: the share, attestation and the job runner behind one wire endpoint.

It runs inside the enclave (a Nitro Enclave, or a local enclave started by
the local runtime) and is the only code there that the host can talk to.
Every handler takes hostile arguments; the share and the job runner check
them, this module only routes. Same code on both backends: the NSM is
/dev/nsm or the local runtime's socket, the listener AF_VSOCK or AF_UNIX.
"""

import errno
import logging
import stat
import sys
import threading

from ..plugins.module_utils import receipt
from ..plugins.module_utils.endpoints import Endpoint
from ..plugins.module_utils.errors import WireError
from ..plugins.module_utils.wire_frames import MAX_FRAME
from ..plugins.module_utils.wire_server import MAX_BUFFERED, Server, error_for
from . import kms_recipient
from .jobs import JobRunner
from .share import Share, split_path

log = logging.getLogger(__name__)

SERVER_NAME = "confidential-ml-nitro-enclave"
INLINE_OPS = frozenset(
    {"health", "share.stat", "share.list", "share.statfs", "share.mkdir", "share.rmdir", "share.unlink",
     "share.rename", "share.create", "share.read", "share.write", "share.truncate", "share.chmod", "share.utimens",
     "share.put", "job.status", "job.cancel"}
)  # fmt: skip
"""Ops answered on the connection's reader thread (docs/PROTOCOL.md section 7): one file system call each,
microseconds to a MiB copy, or a look at the running job (so a cancel never waits for a busy pool). job.run,
attest (the NSM), share.manifest and share.sha256 (they hash) and share.batch (up to BATCH_MAX_OPS calls)
stay on the pool."""
MAX_NONCE = 512
# share.batch (docs/PROTOCOL.md section 4): what one request may hold. Its frame is bounded by max_frame and
# the wire's memory budget already; these bound the work and the reply (every result fits in one frame).
BATCH_OPS = ("mkdir", "put", "create", "write", "truncate", "chmod", "utimens", "unlink", "rmdir", "rename",
             "stat", "read", "sha256")  # fmt: skip
BATCH_MAX_OPS = 1024
BATCH_MAX_READ = 3 << 20  # bytes all of a batch's reads may ask for together
BATCH_MAX_MESSAGE = 200  # an error's message in a batch result is cut to this many characters


def _bytes_arg(args: dict, name: str, limit: int) -> bytes | None:
    value = args.get(name)
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) > limit:
        raise OSError(errno.EINVAL, f"{name} must be at most {limit} bytes")
    return value


def _str_arg(args: dict, name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise OSError(errno.EINVAL, f"argument {name!r} must be a string")
    return value


def _int_arg(args: dict, name: str, default: int | None = None) -> int:
    value = args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise OSError(errno.EINVAL, f"argument {name!r} must be an integer")
    return value


def _warm_kms() -> None:
    """Import boto3 and load KMS's service model and endpoint rules into its default session, which every
    job's client comes from (the first job paid for both). The client is dropped: a job's carries the job's
    credentials. Nothing is sent."""
    import boto3

    boto3.client("kms", region_name="us-east-1", aws_access_key_id="warm-up", aws_secret_access_key="warm-up")  # noqa: S106


class EnclaveServer:
    def __init__(
        self,
        *,
        share_dir,
        work_dir,
        nsm,
        kms_endpoint_url: str | None = None,
        owner=None,
        job_uid=None,
        job_python=None,
    ):
        self.share = Share(share_dir)
        self._batch_handlers = {name: self.handlers()[f"share.{name}"] for name in BATCH_OPS}
        # owner_identity.OwnerIdentity built into the image: only packages its keys signed reach key release.
        # None (an image built without owner keys) runs any package: development images only.
        self.owner = owner
        self.jobs = JobRunner(self.share, work_dir, job_uid=job_uid, python=job_python or sys.executable)
        self.nsm = nsm
        self.kms_endpoint_url = kms_endpoint_url
        self._kms_cached: tuple[tuple, object] | None = None  # (region and credentials, client)
        # Off the first job's path: its single-use RSA key, boto3's ~300 ms import and KMS's service model.
        kms_recipient.prepare()
        self._kms_warm = threading.Thread(target=_warm_kms, name="warm-kms", daemon=True)
        self._kms_warm.start()

    # -- share

    def manifest(self, path: str, with_hash: bool = True) -> list[dict]:
        """Every file and directory under a share directory with size and SHA-256, for push/pull.

        Walks with the share's own confined listdir, so links and special files are
        reported as such and never followed. Without with_hash, files carry their size and mtime_ns
        only: a client hashes just the files whose size matches its own (share.sha256, share.batch)."""
        parts = split_path(path)
        out = []

        def walk(rel: list[str]) -> None:
            for entry in sorted(self.share.listdir("/" + "/".join(parts + rel)), key=lambda e: e["name"]):
                child = [*rel, entry["name"]]
                shown = "/".join(child)
                mode = entry["mode"]
                if stat.S_ISDIR(mode):
                    out.append({"path": shown, "type": "dir", "mode": mode & 0o777})
                    walk(child)
                elif stat.S_ISREG(mode):
                    item = {"path": shown, "type": "file", "mode": mode & 0o777, "size": entry["size"]}
                    if with_hash:
                        item["sha256"] = self.share.sha256("/" + "/".join(parts + child))
                    else:
                        item["mtime_ns"] = entry["mtime_ns"]
                    out.append(item)

        walk([])
        return out

    def handlers(self) -> dict:
        s = self.share
        return {
            "health": lambda a, c: self.health(),
            "attest": self.attest,
            "share.stat": lambda a, c: s.stat(_str_arg(a, "path")),
            "share.list": lambda a, c: s.listdir(_str_arg(a, "path")),
            "share.statfs": lambda a, c: s.statfs(),
            "share.mkdir": lambda a, c: s.mkdir(_str_arg(a, "path"), _int_arg(a, "mode", 0o755)),
            "share.rmdir": lambda a, c: s.rmdir(_str_arg(a, "path")),
            "share.unlink": lambda a, c: s.unlink(_str_arg(a, "path")),
            "share.rename": lambda a, c: s.rename(_str_arg(a, "old"), _str_arg(a, "new")),
            "share.create": lambda a, c: s.create(
                _str_arg(a, "path"),
                _int_arg(a, "mode", 0o644),
                bool(a.get("exclusive", False)),
                _bytes_arg(a, "data", MAX_FRAME),
            ),
            "share.read": lambda a, c: s.read(_str_arg(a, "path"), _int_arg(a, "offset"), _int_arg(a, "size")),
            "share.write": lambda a, c: s.write(
                _str_arg(a, "path"), _int_arg(a, "offset"), _bytes_arg(a, "data", MAX_FRAME) or b""
            ),
            "share.truncate": lambda a, c: s.truncate(_str_arg(a, "path"), _int_arg(a, "size")),
            "share.chmod": lambda a, c: s.chmod(_str_arg(a, "path"), _int_arg(a, "mode")),
            "share.utimens": lambda a, c: s.utimens(
                _str_arg(a, "path"), _int_arg(a, "atime_ns"), _int_arg(a, "mtime_ns")
            ),
            "share.put": lambda a, c: s.put(
                _str_arg(a, "path"), _int_arg(a, "mode", 0o644), _bytes_arg(a, "data", MAX_FRAME) or b""
            ),
            "share.sha256": lambda a, c: s.sha256(_str_arg(a, "path")),
            "share.manifest": lambda a, c: self.manifest(_str_arg(a, "path"), a.get("hash", True) is not False),
            "share.batch": self.batch,
            "job.run": self.run_job,
            "job.status": lambda a, c: {"job": self.jobs.status()},
            "job.cancel": lambda a, c: {"job": self.jobs.cancel(a.get("job"))},
        }

    def batch(self, args: dict, ctx) -> list[dict]:
        """share.batch: share operations applied in order, each answered {"ok": result} or {"error": ...}.

        Many small files cost one round trip instead of one each. An error stops nothing but its own
        operation (each is checked as if it came alone); a cancel fails the ones not yet applied."""
        ops = args.get("ops")
        if not isinstance(ops, list) or not 0 < len(ops) <= BATCH_MAX_OPS:
            raise OSError(errno.EINVAL, f"share.batch takes 'ops', a list of 1 to {BATCH_MAX_OPS} operations")
        asked = sum(
            op["size"] for op in ops
            if isinstance(op, dict) and op.get("op") == "read" and isinstance(op.get("size"), int)
            and not isinstance(op["size"], bool) and op["size"] > 0
        )  # fmt: skip
        if asked > BATCH_MAX_READ:
            raise OSError(errno.EINVAL, f"a batch's reads may ask for {BATCH_MAX_READ} bytes together, not {asked}")
        handlers = self._batch_handlers
        results = []
        with self.share.batch_folder():  # many files in one folder: it is walked to once
            for op in ops:
                try:
                    ctx.check_cancelled()
                    name = op.get("op") if isinstance(op, dict) else None
                    handler = handlers.get(name) if isinstance(name, str) else None
                    if handler is None:
                        raise OSError(
                            errno.EINVAL,
                            f"a batch operation is a map whose 'op' is one of {', '.join(BATCH_OPS)}, not {name!r:.40}",
                        )
                    results.append({"ok": handler(op, ctx)})
                except Exception as err:  # noqa: BLE001 - mapped as a request's error is, bugs logged there
                    error = error_for(err, "share.batch")
                    error["message"] = error["message"][:BATCH_MAX_MESSAGE]
                    results.append({"error": error})
        return results

    def health(self) -> dict:
        job = self.jobs.current
        return {"server": SERVER_NAME, "job": job.describe() if job else None, "share": self.share.statfs()}

    def attest(self, args: dict, ctx) -> dict:
        # The host's user_data is signed only inside the attest domain, so no request can make the NSM
        # sign what a receipt carries (receipt.py keeps the two domains apart).
        user_data = _bytes_arg(args, "user_data", MAX_NONCE)
        document = self.nsm.attest(
            nonce=_bytes_arg(args, "nonce", MAX_NONCE),
            user_data=None if user_data is None else receipt.attest_user_data(user_data),
        )
        return {"document": document}

    # -- jobs

    def _kms_client(self, kms: dict):
        self._kms_warm.join()  # botocore's session may not make two clients at once
        import boto3  # deferred: only jobs need it, and it costs ~100 ms to import

        if not isinstance(kms, dict):
            raise OSError(errno.EINVAL, "kms settings must be a map (region and credentials)")
        credentials = {
            key: kms[key] for key in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token") if kms.get(key)
        }
        if any(not isinstance(v, str) for v in credentials.values()):
            raise OSError(errno.EINVAL, "KMS credentials must be strings")
        region = kms.get("region")
        if not isinstance(region, str) or not region:
            raise OSError(errno.EINVAL, "the run request names no KMS region: pass --region or set AWS_REGION")
        # The last client is reused while region and credentials stay the same: making one costs 5-10 ms
        # of a job's start. Only one is kept, so rotated credentials don't pile up.
        key = (region, *sorted(credentials.items()))
        if self._kms_cached is None or self._kms_cached[0] != key:
            client = boto3.client("kms", region_name=region, endpoint_url=self.kms_endpoint_url, **credentials)
            self._kms_cached = (key, client)
        return self._kms_cached[1]

    def run_job(self, args: dict, ctx) -> dict:
        timeout = args.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise OSError(errno.EINVAL, "timeout must be a positive number of seconds")
        client = self._kms_client(args.get("kms", {}))

        def unwrap_key(header):
            return kms_recipient.decrypt(
                client, self.nsm, header.wrapped_key, encryption_context=header.encryption_context,
                key_id=header.key_id,
            )  # fmt: skip

        def emit(event):
            try:
                ctx.emit(event)
            except WireError:
                ctx.cancelled.set()  # the client is gone: stop the job rather than run it blind

        summary = self.jobs.run(
            _str_arg(args, "package"),
            _str_arg(args, "script"),
            args.get("args", []),
            unwrap_key=unwrap_key,
            emit=emit,
            cancelled=ctx.cancelled,
            timeout=timeout,
            clear_output=args.get("clear_output") is True,
            check_package=self.owner.check_package if self.owner is not None else None,
        )
        # The job's attestation binds what ran and what it produced (a receipt the user can keep).
        summary["attestation"] = self.nsm.attest(user_data=receipt.job_digest(summary))
        return summary


def buffer_budget(meminfo: str = "/proc/meminfo") -> int:
    """wire_server.Server's max_buffered here: MAX_BUFFERED, or a quarter of the memory this system has when that
    is less (inside a Nitro Enclave, MemTotal is the enclave's memory), but never below what one 4 MiB frame
    each way needs (docs/PROTOCOL.md section 7)."""
    smallest = 4 * Server.request_reservation(MAX_FRAME, MAX_FRAME)
    try:
        with open(meminfo) as f:
            total = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return MAX_BUFFERED
    return max(smallest, min(MAX_BUFFERED, total // 4))


def serve(endpoint: Endpoint, server: EnclaveServer, *, ready: threading.Event | None = None) -> None:
    """Listen on endpoint and serve until the process ends."""
    listener = endpoint.listen()
    wire_server = Server(listener, server.handlers(), name=SERVER_NAME, inline=INLINE_OPS, max_buffered=buffer_budget())
    log.info("enclave server listening on %s", endpoint)
    if ready is not None:
        ready.set()
    wire_server.serve_forever()
