"""The enclave image's start-up: what the enclave's init leaves undone, then the server.

The EIF's init (aws-nitro-enclaves-sdk-bootstrap) mounts /proc, /dev, /run, /tmp and
friends, then execvpe()s the image's command as root with every capability. It brings
up no network interface, not even loopback, and there is no DNS. The Dockerfile's CMD is
this module, which, with the server's own arguments:

  1. mounts a tmpfs on the --share and --work directories: the root file system is
     memory already, but separate mounts cap the share (the host fills it) and keep
     decrypted packages off the share's file system, so neither starves the other.
     Sizes are tmpfs size= values, ENCLAVE_SHARE_SIZE (default 50%) and
     ENCLAVE_WORK_SIZE (default 25%); an existing tmpfs (a restart) is kept;
  2. brings loopback up (SIOCSIFFLAGS; the kernel gives lo 127.0.0.1 as it comes up),
     where the KMS forwarder listens;
  3. writes /etc/hosts: localhost, and every KMS hostname boto3 builds mapped to the
     forwarder (kms_forwarder.hosts_file), so boto3 calls https://kms.<region>... with
     its certificate and hostname checks, whatever region the host's job names;
  4. gives up the capabilities it used (CAP_SYS_ADMIN, CAP_NET_ADMIN, and CAP_SETPCAP,
     which dropping needs) from its bounding set, and execs the server, which therefore
     can no longer mount, reconfigure the network or change capabilities; nor can the
     jobs it runs.

The local runtime runs this same command, in a network namespace whose loopback is down,
with no /etc/hosts or resolver of its own, so that a boot that skips a step fails there too.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import socket
import struct
import sys

from ..plugins.module_utils.errors import BootError
from . import kms_forwarder

SERVER_MODULE = "ansible_collections.confidential_ml.nitro.enclave_server"
HOSTS_FILE = "/etc/hosts"
SIZES = {"share": ("ENCLAVE_SHARE_SIZE", "50%"), "work": ("ENCLAVE_WORK_SIZE", "25%")}
MS_NOSUID, MS_NODEV = 0x2, 0x4
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
PR_CAPBSET_DROP = 24
# linux/capability.h: what boot needs, and drops before it becomes the server.
BOOT_CAPABILITIES = {"CAP_SYS_ADMIN": 21, "CAP_NET_ADMIN": 12, "CAP_SETPCAP": 8}

_libc = ctypes.CDLL(None, use_errno=True)


def _failed(what: str) -> BootError:
    code = ctypes.get_errno()
    return BootError(f"{what}: {os.strerror(code)}")


def mount_tmpfs(directory: str, size: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open("/proc/mounts", encoding="utf-8") as mounts:
        if any(line.split()[1:3] == [directory, "tmpfs"] for line in mounts):
            return  # a restarted server: keep the tmpfs and what the host put there
    options = f"size={size},mode=0700".encode()
    if _libc.mount(b"tmpfs", directory.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        raise _failed(f"mount a tmpfs (size={size}) on {directory}")


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack("16sh", b"lo", 0))
            flags = struct.unpack("16sh", answer)[1]
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
        except OSError as err:
            raise BootError(f"bring loopback up: {err.strerror or err}") from None


def write_hosts(path: str = HOSTS_FILE) -> None:
    try:
        with open(path, "w", encoding="ascii") as hosts:
            hosts.write(kms_forwarder.hosts_file())
    except OSError as err:
        raise BootError(f"write {path}: {err.strerror or err}") from None


def drop_boot_capabilities() -> None:
    # The effective set keeps them until the exec, which computes the server's from the bounding set.
    for name, number in BOOT_CAPABILITIES.items():
        if _libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0) != 0:
            raise _failed(f"drop {name} from the bounding set")


def prepare(argv: list[str], *, hosts: str = HOSTS_FILE) -> None:
    """Steps 1-3 for the server's arguments argv."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--share", required=True)
    parser.add_argument("--work", required=True)
    args, _rest = parser.parse_known_args(argv)
    for name, directory in (("share", args.share), ("work", args.work)):
        variable, default = SIZES[name]
        mount_tmpfs(os.path.abspath(directory), os.environ.get(variable) or default)
    loopback_up()
    write_hosts(hosts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        prepare(argv)
        drop_boot_capabilities()
    except BootError as err:
        print(f"enclave boot: error: {err}", file=sys.stderr, flush=True)
        return 1
    server = [sys.executable, "-s", "-P", "-m", SERVER_MODULE, *argv]  # no user site, no cwd on sys.path
    os.execv(sys.executable, server)  # noqa: S606 - boot becomes the server, as entrypoint.sh did
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
