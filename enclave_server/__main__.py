"""Start the enclave server: python -m ansible_collections.confidential_ml.nitro.enclave_server --listen ...

In the image, enclave_server.boot runs first (the Dockerfile's CMD) and execs this with the
same arguments. Tests and the unisolated local runtime start it directly, with unix://
addresses and --kms-endpoint-url."""

import argparse
import contextlib
import logging
import os
import stat
import sys
from pathlib import Path

from ..plugins.module_utils.endpoints import Endpoint
from ..plugins.module_utils.errors import EnclaveError
from ..plugins.module_utils.owner_identity import IDENTITY_FILE, OwnerIdentity
from ..plugins.module_utils.wire_frames import keep_freed_memory
from . import kms_forwarder
from .jobs import JOB_UID
from .nsm import NsmDevice, NsmSocket
from .server import EnclaveServer, serve


def _nsm(path: str):
    """The NSM at path: a device on Nitro; on the local backend, its socket, at /dev/nsm too."""
    if os.geteuid() == 0:  # the server alone may open the NSM: jobs run as another uid (jobs.py)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path.removeprefix("unix://"), 0o600)
    if path.startswith("unix://"):
        return NsmSocket(path.removeprefix("unix://"))
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        is_socket = False  # NsmDevice says what is missing
    return NsmSocket(path) if is_socket else NsmDevice(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="enclave-server", description="The server inside the enclave.")
    parser.add_argument("--listen", required=True, help="vsock://-1:PORT (any CID) or unix:///path/CID_PORT.sock")
    parser.add_argument("--share", required=True, help="the share's root (its own tmpfs)")
    parser.add_argument("--work", required=True, help="private directory for decrypted packages (outside the share)")
    parser.add_argument(
        "--nsm",
        default="/dev/nsm",
        help="/dev/nsm (the device, or the local runtime's NSM socket there), or unix:///path",
    )
    parser.add_argument(
        "--kms-endpoint-url",
        help="KMS endpoint as seen from inside the enclave (default: boto3's https://kms.<region>..., mapped by boot)",
    )
    parser.add_argument(
        "--kms-proxy", metavar="ENDPOINT", help="the parent's KMS proxy (vsock://3:8000, or the local unix socket)"
    )
    parser.add_argument(
        "--kms-listen",
        type=int,
        default=kms_forwarder.KMS_TLS_PORT,
        metavar="PORT",
        help="loopback port relayed to --kms-proxy",
    )
    parser.add_argument(
        "--owner-identity",
        metavar="FILE",
        help=f"the owner's signing keys (default: {IDENTITY_FILE} beside enclave_server/, where images carry it)",
    )
    parser.add_argument(
        "--job-uid",
        type=int,
        metavar="UID",
        help=f"the uid (and gid) jobs run as (default when root: {JOB_UID}; otherwise the server's own)",
    )
    parser.add_argument(
        "--job-python", default=sys.executable, metavar="PATH", help="the interpreter jobs run (default: this one)"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    # Every share.write and share.read moves a 1 MiB frame: with glibc's defaults each one is a fresh
    # mmap, page-faulted in and handed back, which halves bulk throughput (docs/PROTOCOL.md section 9).
    # The enclave's init does not set GLIBC_TUNABLES for us, so the server sets the same at start.
    keep_freed_memory()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        owner = _owner_identity(args.owner_identity)
        nsm = _nsm(args.nsm)
        server = EnclaveServer(
            share_dir=args.share, work_dir=args.work, nsm=nsm, kms_endpoint_url=args.kms_endpoint_url,
            owner=owner, job_uid=args.job_uid, job_python=args.job_python,
        )  # fmt: skip
        if args.kms_proxy:
            kms_forwarder.start(args.kms_proxy, port=args.kms_listen)
            if not args.kms_endpoint_url:  # boto3 will find KMS by name: fail now if it could not
                kms_forwarder.check_route(args.kms_listen)
        serve(Endpoint.parse(args.listen), server)
    except EnclaveError as err:
        print(f"enclave-server: error: {err}", file=sys.stderr)
        return 1
    return 0


def _owner_identity(path: str | None) -> OwnerIdentity | None:
    """The image's owner identity: the file named, else the one the image carries (none: an unbound image)."""
    built_in = Path(__file__).resolve().parents[1] / IDENTITY_FILE
    if path is None and not built_in.is_file():
        logging.warning("no %s in this image: it runs packages from anyone (a development image)", IDENTITY_FILE)
        return None
    owner = OwnerIdentity.load(path or built_in)
    logging.info("bound to the owner's signing keys: %s", owner.describe())
    return owner


if __name__ == "__main__":
    sys.exit(main())
