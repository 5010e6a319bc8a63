"""The local cloud: what AWS provides on the nitro backend, on this host (`enclave local up/down`).

`up` starts the local KMS as a daemon on loopback, trusting the local CA's root (created
under state_home()/ca/ if missing; the simulated NSM of every local enclave signs with it)
and AWS's Nitro root, with its keys in state_home()/kms/. It listens twice, on one state:
over plain HTTP for the host's tools (boto3 and amazon.aws with endpoint_url), and over
HTTPS for enclaves, with a certificate for every kms.<region> hostname from the local TLS
CA (enclave_local/tls.py), as AWS KMS is reached from a Nitro enclave. It writes

    state_home()/cloud.json         where the KMS listens (kms_endpoint_url for the host;
                                    kms_tls_port for enclaves, tls_ca_bundle) and its process
    state_home()/vsock-proxy.yaml   the allowlist of the enclaves' vsock-proxies: the HTTPS
                                    listener only
    state_home()/kms/credentials    on first start: the credentials the KMS issued to its principals
                                    (owner, enclave-host, admin), an AWS shared-credentials file
                                    (kms_credentials; use it with AWS_SHARED_CREDENTIALS_FILE + AWS_PROFILE)

and is idempotent: when the cloud already runs, it says where. The KMS comes back on the port it had
(remembered in state_home()/kms/port), so the exports of `enclave local env` stay true across a down and
up. `down` unmounts the `enclave sync` folders of the local enclaves, terminates every local enclave
(supervisors, namespaces, mounts, sockets) and stops the KMS; keys and the CA stay. Both are idempotent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

from ..plugins.module_utils import settings
from ..plugins.module_utils.errors import EnclaveRuntimeError
from .daemons import CLOUD_FILE, VSOCK_PROXY_CONFIG, Proc, Ready, cloud_status, spawn_daemon, write_json
from .runtime import LocalRuntime

log = logging.getLogger(__name__)

MODULE = "ansible_collections.confidential_ml.nitro.enclave_local.cloud"
KMS_LOG = "kms.log"
KMS_HOST = "127.0.0.1"
KMS_PORT_FILE = "port"  # in kms/: the port the KMS had last, which it takes again when it is free
KMS_REGION = "us-east-1"  # the region the local KMS signs and answers for (LocalKms's default)
# The parties, in the accounts the threat model wants: the owner and its key administrator in the owner's account,
# the user's parent host in an account of its own (a user in the owner's account could be given kms:PutKeyPolicy
# by that account's IAM, through the key policy's root statement). The README's commands use these ARNs.
OWNER_ACCOUNT, USER_ACCOUNT = "111122223333", "444455556666"
PRINCIPALS = {
    "owner": f"arn:aws:iam::{OWNER_ACCOUNT}:role/owner",
    "enclave-host": f"arn:aws:iam::{USER_ACCOUNT}:role/enclave-host",
    "admin": f"arn:aws:iam::{OWNER_ACCOUNT}:role/admin",
}


def _home(home) -> Path:
    return Path(home) if home is not None else settings.state_home()


def status(home: str | Path | None = None) -> dict | None:
    """The running local cloud's description (cloud.json), or None when it is not running."""
    return cloud_status(_home(home))


def up(kms_port: int = 0, *, home: str | Path | None = None) -> dict:
    """Start the local cloud unless it runs; its description, with "started" telling which."""
    home = settings.private_dir(_home(home))
    with settings.locked(home / ".cloud.lock"):
        running = status(home)
        if running is not None:
            if kms_port and kms_port != running["kms_port"]:
                raise EnclaveRuntimeError(
                    f"the local cloud already runs with its KMS on port {running['kms_port']}, not {kms_port}: "
                    "run `enclave local down` first to move it"
                )
            return dict(running, started=False)
        report = spawn_daemon(
            [sys.executable, "-m", MODULE, "serve", "--home", str(home.absolute()), "--port", str(kms_port)],
            what="the local KMS",
            log_path=home / KMS_LOG,
        )
    return dict(report["cloud"], started=True)


def down(*, home: str | Path | None = None) -> dict:
    """Unmount the local enclaves' shares, terminate every local enclave and stop the local KMS. What was
    stopped; nothing to stop is no error."""
    home = _home(home)
    stopped: dict[str, object] = {"unmounted": unmount_shares(home)}
    stopped["enclaves"] = LocalRuntime(home).terminate(all=True)
    stopped["kms"] = None
    with settings.locked(home / ".cloud.lock"):
        running = status(home)
        process = Proc.from_json(running["process"]) if running is not None else None
        if running is not None and process is not None:  # status() answers only for a live process
            process.stop()
            stopped["kms"] = running["kms_endpoint_url"]
        for name in (CLOUD_FILE, VSOCK_PROXY_CONFIG):
            (home / name).unlink(missing_ok=True)
    return stopped


def unmount_shares(home: str | Path) -> list[str]:
    """Unmount every `enclave sync` folder that serves a local enclave of this home (as `enclave sync --unmount`
    would), before the enclaves go: a FUSE mount whose server is gone leaves its folder answering "Transport
    endpoint is not connected". The folders unmounted.

    The mounts are found in the state files the mount processes keep (mounts.mount_state: state_home()/mounts/),
    and by their endpoint: a unix socket in this home's runtime directory. A folder still in use is detached
    lazily (fusermount3 -z), as the enclave behind it stops anyway."""
    from ..plugins.module_utils import mounts
    from ..plugins.module_utils.errors import EnclaveError

    ours = f"unix://{settings.runtime_dir(home)}/"
    unmounted = []
    for path in sorted((Path(home) / "mounts").glob("*.json")):
        try:
            state = json.loads(path.read_text())
            folder, endpoint = state["mountpoint"], state["endpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not str(endpoint).startswith(ours):
            continue
        if mounts.is_mounted(folder):
            try:
                mounts.unmount(folder)
            except EnclaveError as err:
                log.info("unmounting %s lazily: %s", folder, err)
                subprocess.run(["fusermount3", "-u", "-z", folder], capture_output=True, check=False)
            unmounted.append(folder)
        path.unlink(missing_ok=True)
    return unmounted


def env_exports(home: str | Path | None = None, profile: str = "enclave-host") -> list[tuple[str, str | None]]:
    """What points boto3, the AWS CLI and the `enclave` command at the running local cloud, as (name, value)
    pairs; value None means unset (credentials in the environment would win over the profile)."""
    home = _home(home)
    cloud = status(home)
    if cloud is None:
        raise EnclaveRuntimeError(
            f"the local cloud of {home} is not running: start it with `enclave local up` (same ENCLAVE_HOME), "
            "then run this again"
        )
    return [
        ("ENCLAVE_HOME", str(Path(home).absolute())),
        # The host's endpoint is plain HTTP on loopback, so no CA bundle; enclaves use the HTTPS one.
        ("AWS_ENDPOINT_URL_KMS", cloud["kms_endpoint_url"]),
        ("AWS_SHARED_CREDENTIALS_FILE", cloud["kms_credentials"]),
        ("AWS_PROFILE", profile),
        ("AWS_DEFAULT_REGION", KMS_REGION),
        ("AWS_REGION", KMS_REGION),
        ("AWS_ACCESS_KEY_ID", None),
        ("AWS_SECRET_ACCESS_KEY", None),
        ("AWS_SESSION_TOKEN", None),
    ]


def _kms_server(kms, home: Path, port: int):
    """The host's KMS listener: on port if given, else on the port it had last when that is free."""
    from .kms import LocalKmsServer

    remembered = home / "kms" / KMS_PORT_FILE
    if not port:
        with contextlib.suppress(OSError, ValueError):  # none yet, or taken meanwhile: any free port
            return LocalKmsServer(kms, host=KMS_HOST, port=int(remembered.read_text()))
    server = LocalKmsServer(kms, host=KMS_HOST, port=port)
    remembered.write_text(f"{server.port}\n")
    return server


def serve(home: Path, port: int, ready_fd: int) -> int:
    """The local KMS daemon: serve until SIGTERM or SIGINT."""
    ready = Ready(ready_fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s local-kms %(levelname)s %(message)s")
    # Every thread inherits this mask, so only sigwait below sees the stop signals.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    from ..plugins.module_utils.attestation import aws_nitro_root
    from .kms import LocalKms, LocalKmsServer
    from .nsm_sim import LocalCA
    from .tls import kms_server_context
    from .vsock_proxy import render_allowlist

    try:
        ca = LocalCA.load_or_create(home)
        roots = [aws_nitro_root(), ca.root_certificate]
        kms = LocalKms(home / "kms", trusted_roots=roots, account_id=OWNER_ACCOUNT, principals=PRINCIPALS)
        server = _kms_server(kms, home, port)
        tls_context, bundle = kms_server_context(home)
        tls_server = LocalKmsServer(kms, host=KMS_HOST, tls=tls_context)
        (home / VSOCK_PROXY_CONFIG).write_text(render_allowlist([(KMS_HOST, tls_server.port)]))
        cloud = {
            "kms_endpoint_url": server.endpoint_url,
            "kms_host": KMS_HOST,
            "kms_port": server.port,
            "kms_tls_port": tls_server.port,
            "tls_ca_bundle": str(bundle),
            "kms_state": str(home / "kms"),
            "kms_credentials": str(server.kms.credentials_file.absolute()),
            "ca_root": str(home / "ca" / "root.pem"),
            "vsock_proxy_config": str(home / VSOCK_PROXY_CONFIG),
            "process": Proc.current().to_json(),
        }
        write_json(home / CLOUD_FILE, cloud)
        server.start()
        tls_server.start()
    except Exception as err:
        log.exception("the local KMS did not start")
        ready.fail(f"the local KMS did not start: {err}")
        return 1
    ready.ok({"cloud": cloud})
    signal.sigwait(stop_signals)
    log.info("stopping the local KMS")
    server.stop()
    tls_server.stop()
    with contextlib.suppress(OSError, ValueError):
        if json.loads((home / CLOUD_FILE).read_text()).get("process") == cloud["process"]:
            (home / CLOUD_FILE).unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="(internal) the local KMS daemon")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve")
    serve_cmd.add_argument("--home", required=True)
    serve_cmd.add_argument("--port", type=int, default=0)
    serve_cmd.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    return serve(Path(args.home), args.port, args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
