"""Where the project keeps its state, and the settings every entry point shares.

Nothing here is a constant of the protocol: ports, CIDs, regions and paths are
settings with defaults, overridable by environment or flags.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

# The one directory that holds all local state (local KMS, local CA, enclaves).
ENV_HOME = "ENCLAVE_HOME"


def state_home() -> Path:
    """$ENCLAVE_HOME, else $XDG_STATE_HOME/confidential-ml-nitro, else ~/.local/state/confidential-ml-nitro."""
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "confidential-ml-nitro"


# Where the local backend keeps what lives only while it runs (its enclaves' records and unix sockets).
ENV_RUNTIME_DIR = "ENCLAVE_RUNTIME_DIR"
# The longest path the local runtime forms under runtime_dir(): enclaves/<id>/vsock/<cid>_<port>.sock.
LOCAL_SOCKET_SUFFIX = len("/enclaves/i-local-enc0123456789abcdef/vsock/4294967294_5000.sock")
UNIX_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL


def runtime_dir(home: str | os.PathLike | None = None) -> Path:
    """The local runtime's directory for the state home `home` (default state_home()), created 0700.

    A unix socket path must fit in 107 bytes, so the enclaves' sockets cannot live under a home of any
    depth: they live in a short directory named by a hash of the home instead, as nitro-cli keeps its
    enclaves' sockets in /run/nitro_enclaves. The base is $ENCLAVE_RUNTIME_DIR, else /run/cmlnitro
    for root, else /tmp/cmlnitro-UID (not $XDG_RUNTIME_DIR: logind removes it when the user logs out,
    and a local enclave outlives the session that started it)."""
    home = os.path.realpath(os.fspath(home) if home is not None else state_home())
    if os.environ.get(ENV_RUNTIME_DIR):
        base, source = os.path.abspath(os.path.expanduser(os.environ[ENV_RUNTIME_DIR])), f"${ENV_RUNTIME_DIR}"
    else:
        uid = os.geteuid()
        base = "/run/cmlnitro" if uid == 0 else f"/tmp/cmlnitro-{uid}"
        source = f"the default for uid {uid} (set {ENV_RUNTIME_DIR} to choose another)"
    path = os.path.join(base, hashlib.sha256(os.fsencode(home)).hexdigest()[:12])
    if len(os.fsencode(path)) + LOCAL_SOCKET_SUFFIX > UNIX_PATH_MAX:
        from .errors import EnclaveError

        raise EnclaveError(
            f"the local runtime directory {path} (from {source}) is too long for unix socket paths, which hold "
            f"at most {UNIX_PATH_MAX} bytes: set {ENV_RUNTIME_DIR} to a directory of at most "
            f"{UNIX_PATH_MAX - LOCAL_SOCKET_SUFFIX - 13} bytes (the length of {ENV_HOME} does not matter)"
        )
    yours = f"set {ENV_RUNTIME_DIR} to a directory of your own with mode 0700"
    _own_private_dir(base, yours if source.startswith("$") else f"remove it, or {yours}")
    _own_private_dir(path, f"remove it, or {yours}")
    return Path(path)


def _own_private_dir(path: str, remedy: str) -> None:
    """Create path 0700, or accept it only if it is a real directory of ours that nobody else can enter:
    under /tmp another user could have made it first, to read or replace our sockets."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        from .errors import EnclaveError

        raise EnclaveError(
            f"{path} must be a directory owned by uid {os.geteuid()} with mode 0700 (it holds the local enclaves' "
            f"sockets), but it is not: {remedy}"
        )


def private_dir(path: Path) -> Path:
    """Create path (and parents) with mode 0700 and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on a lock file in the state (created 0600, its directory 0700) while inside."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def aws_errors() -> Iterator[None]:
    """Turn botocore's configuration errors (no region, partial or no credentials, unknown profile) into one
    EnclaveError line that says what to set, instead of a traceback."""
    from botocore import exceptions

    from .errors import EnclaveError

    try:
        yield
    except exceptions.NoRegionError:
        raise EnclaveError(
            "no AWS region configured for KMS: set AWS_DEFAULT_REGION, e.g. us-east-1, pass "
            "--region (a module's region option), or use a profile that names one"
        ) from None
    except exceptions.PartialCredentialsError as err:
        provider, missing = err.kwargs.get("provider"), err.kwargs.get("cred_var")
        where = "the environment" if provider == "env" else f"the {provider} credentials"
        raise EnclaveError(
            f"incomplete AWS credentials in {where}: {missing} is not set: set it as well "
            "(AWS_ACCESS_KEY_ID needs AWS_SECRET_ACCESS_KEY), or unset the partial ones to use a profile "
            "or the instance role"
        ) from None
    except exceptions.NoCredentialsError:
        raise EnclaveError(
            "no AWS credentials found for KMS: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, choose a profile "
            "(--profile, AWS_PROFILE), or run on an instance with a role"
        ) from None
    except exceptions.ProfileNotFound as err:
        raise EnclaveError(
            f"the AWS profile {err.kwargs.get('profile')!r} is not in ~/.aws/config or ~/.aws/credentials: "
            "create it, or choose another with --profile (a module's profile option) or AWS_PROFILE"
        ) from None


def kms_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
):
    """A boto3 KMS client, for the CLI and the modules alike; boto3 finds whatever is left unset. Raises
    EnclaveError, saying what to set, when it has no region or no complete credentials."""
    import boto3
    from botocore.exceptions import NoCredentialsError

    from .errors import EnclaveError

    if bool(access_key) != bool(secret_key):
        given, missing = (
            ("access key id", "secret access key") if access_key else ("secret access key", "access key id")
        )
        raise EnclaveError(
            f"an AWS {given} was given without its {missing}: give both, or neither to let boto3 find credentials"
        )
    with aws_errors():
        session = boto3.session.Session(
            profile_name=profile,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token,
            region_name=region,
        )
        if session.get_credentials() is None:  # else botocore says so only at the first request
            raise NoCredentialsError()
        return session.client("kms", endpoint_url=endpoint_url)


DEFAULT_SERVER_PORT = 5000
ENV_ENDPOINT = "ENCLAVE_ENDPOINT"
ENV_BACKEND = "ENCLAVE_BACKEND"
BACKENDS = ("local", "nitro")


def backend(name: str | None = None) -> str:
    """The enclave backend: name if given, else $ENCLAVE_BACKEND, else "local" (the embedded default)."""
    chosen = name or os.environ.get(ENV_BACKEND) or "local"
    if chosen not in BACKENDS:
        from .errors import EnclaveError

        source = "backend" if name else f"${ENV_BACKEND}"
        raise EnclaveError(
            f'unknown enclave backend {chosen!r} (from {source}): use "local" (the default, no Nitro hardware) '
            'or "nitro" (a Nitro parent instance with nitro-cli)'
        )
    return chosen
