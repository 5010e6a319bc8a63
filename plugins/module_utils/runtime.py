"""Enclave runtimes: build an image, run, describe, terminate and read the console of enclaves.

One interface (Runtime), two backends:

    nitro   NitroRuntime drives `nitro-cli` on a Nitro parent instance
    local   LocalRuntime (enclave_local/runtime.py) runs the same enclave server
            in its own namespaces, with a simulated NSM

Both speak nitro-cli's vocabulary: Measurements and EnclaveInfo serialise to
the JSON that `nitro-cli build-enclave` and `nitro-cli describe-enclaves`
print, so callers (CLI, modules, roles) handle one shape on either backend.
Ports are settings (the server port defaults to settings.DEFAULT_SERVER_PORT),
never constants baked into a code path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from . import settings
from .enclave_code import DOCKERFILE_PATH, PACKAGE_PATH, collection_root, enclave_sources
from .endpoints import DEFAULT_PORT, Endpoint
from .errors import EnclaveError, EnclaveNotFoundError, EnclaveRuntimeError, ImageError

HASH_ALGORITHM = "Sha384 { ... }"
LOCAL_CLI = "ansible_collections.confidential_ml.nitro.cli.main"
"""What nitro-cli prints as Measurements.HashAlgorithm."""

_PCR_HEX = re.compile(r"[0-9a-f]{96}")
# build-enclave signs through KMS when --private-key is a KMS key ARN (the pattern nitro-cli's EIF signer uses).
KMS_KEY_ARN = re.compile(r"arn:(?:aws|aws-cn|aws-us-gov):kms:[a-z0-9-]+:\d{12}:key[:/][a-zA-Z0-9-]+")
_ERROR_CODE = re.compile(r"\[\s*(E\d{2,3})\s*\]")
ERRORS_URL = "https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html"

DOCKERFILE = DOCKERFILE_PATH
OWNER_IDENTITY_FILE = "owner_identity.json"  # owner_identity.IDENTITY_FILE, beside enclave_server/ in the image
IMAGE_REPOSITORY = "confidential-ml-nitro-enclave"


# ------------------------------------------------------------------ data


@dataclass(frozen=True)
class Measurements:
    """An image's PCRs as lowercase hex (SHA-384: 96 characters). PCR8 is there for signed images."""

    pcr0: str
    pcr1: str
    pcr2: str
    pcr8: str | None = None

    def __post_init__(self):
        for name in ("pcr0", "pcr1", "pcr2", "pcr8"):
            value = getattr(self, name)
            if value is None and name == "pcr8":
                continue
            if not isinstance(value, str) or not _PCR_HEX.fullmatch(value):
                raise EnclaveRuntimeError(
                    f"{name.upper()} must be 96 lowercase hex characters (a SHA-384 digest), got {value!r}"
                )

    def to_json(self) -> dict:
        """nitro-cli's Measurements object."""
        out = {"HashAlgorithm": HASH_ALGORITHM, "PCR0": self.pcr0, "PCR1": self.pcr1, "PCR2": self.pcr2}
        if self.pcr8 is not None:
            out["PCR8"] = self.pcr8
        return out

    @classmethod
    def from_json(cls, data: dict) -> Measurements:
        """Read nitro-cli's Measurements, or the whole build-enclave output {"Measurements": {...}}."""
        if isinstance(data, dict) and isinstance(data.get("Measurements"), dict):
            data = data["Measurements"]
        if not isinstance(data, dict):
            raise EnclaveRuntimeError(f"expected a Measurements object such as nitro-cli prints, got {data!r}")
        algorithm = data.get("HashAlgorithm")
        if algorithm is not None and not str(algorithm).startswith("Sha384"):
            raise EnclaveRuntimeError(f"measurements use {algorithm!r}; only SHA-384 PCRs (Nitro's) are supported")
        missing = [k for k in ("PCR0", "PCR1", "PCR2") if not isinstance(data.get(k), str)]
        if missing:
            raise EnclaveRuntimeError(f"measurements lack {', '.join(missing)}: got {sorted(data)}")
        pcr8 = data.get("PCR8")
        # nitro-cli prints lowercase; key policies compare case-insensitively, we store lowercase.
        return cls(
            pcr0=data["PCR0"].lower(),
            pcr1=data["PCR1"].lower(),
            pcr2=data["PCR2"].lower(),
            pcr8=pcr8.lower() if isinstance(pcr8, str) else None,
        )


@dataclass(frozen=True)
class BuildResult:
    image: str  # path of the enclave image (the EIF on nitro)
    measurements: Measurements


@dataclass(frozen=True)
class EnclaveInfo:
    name: str
    enclave_id: str
    cid: int
    state: str  # "RUNNING" | "TERMINATING", as nitro-cli prints it
    memory_mib: int
    cpu_count: int
    debug_mode: bool
    endpoint: str  # where its enclave server listens: vsock://CID:PORT or unix:///...
    process_id: int | None = None
    cpu_ids: tuple[int, ...] = ()

    def to_json(self) -> dict:
        """nitro-cli describe-enclaves' object, plus "Endpoint"."""
        return {
            "EnclaveName": self.name,
            "EnclaveID": self.enclave_id,
            "ProcessID": self.process_id,
            "EnclaveCID": self.cid,
            "NumberOfCPUs": self.cpu_count,
            "CPUIDs": list(self.cpu_ids),
            "MemoryMiB": self.memory_mib,
            "State": self.state,
            "Flags": "DEBUG_MODE" if self.debug_mode else "NONE",
            "Endpoint": self.endpoint,
        }

    @classmethod
    def from_json(cls, data: dict, *, port: int = DEFAULT_PORT) -> EnclaveInfo:
        """Read a describe-enclaves (or completed run-enclave) object; the endpoint is
        data["Endpoint"] if present, else vsock://EnclaveCID:port."""
        if not isinstance(data, dict):
            raise EnclaveRuntimeError(f"expected an enclave description object, got {data!r}")
        missing = [
            k for k in ("EnclaveID", "EnclaveCID", "NumberOfCPUs", "MemoryMiB", "State", "Flags") if k not in data
        ]
        if missing:
            raise EnclaveRuntimeError(
                f"enclave description lacks {', '.join(missing)} (got {sorted(data)}): "
                "is this nitro-cli version supported? `nitro-cli --version` should be 1.2 or later"
            )
        try:
            cid = int(data["EnclaveCID"])
            process_id = data.get("ProcessID")
            return cls(
                # Old nitro-cli versions have no names: the ID is the name then.
                name=str(data.get("EnclaveName") or data["EnclaveID"]),
                enclave_id=str(data["EnclaveID"]),
                cid=cid,
                state=str(data["State"]),
                memory_mib=int(data["MemoryMiB"]),
                cpu_count=int(data["NumberOfCPUs"]),
                debug_mode="DEBUG" in str(data["Flags"]).upper(),
                endpoint=str(data.get("Endpoint") or Endpoint.vsock(cid, port)),
                process_id=int(process_id) if process_id is not None else None,
                cpu_ids=tuple(int(c) for c in data.get("CPUIDs") or ()),
            )
        except (TypeError, ValueError) as err:
            raise EnclaveRuntimeError(f"malformed enclave description {data!r}: {err}") from err


# ------------------------------------------------------------------ interface


@runtime_checkable
class Runtime(Protocol):
    def build(
        self,
        *,
        output: str,
        source: str | None = None,
        signing_certificate: str | None = None,
        private_key: str | None = None,
        owner_identity: str | None = None,
    ) -> BuildResult: ...

    def run(
        self,
        image: str,
        *,
        cpu_count: int = 2,
        memory_mib: int = 512,
        cid: int | None = None,
        name: str | None = None,
        debug_mode: bool = False,
    ) -> EnclaveInfo: ...

    def describe(self) -> list[EnclaveInfo]: ...

    def terminate(self, enclave: str | None = None, *, all: bool = False) -> list[str]: ...  # noqa: A002

    def console(self, enclave: str) -> str: ...


def get_runtime(backend: str | None = None, **options) -> Runtime:
    """The runtime of `backend` (default: settings.backend(), i.e. $ENCLAVE_BACKEND or "local").

    Both are driven through their command line, nitro-cli or `enclave local`, which speak the same
    options and JSON: enclaves outlive the calling process, and an Ansible module (which carries only
    module_utils) reaches the local backend through the installed `enclave` command as it reaches
    nitro-cli on a parent instance."""
    name = settings.backend(backend)
    return NitroRuntime(**options) if name == "nitro" else LocalCliRuntime(**options)


def discover_endpoint(runtime: Runtime) -> str:
    """The endpoint of the one running enclave; an error naming the way out when there are none or several."""
    running = [e for e in runtime.describe() if e.state.upper() == "RUNNING"]
    where = getattr(runtime, "backend", "this")
    if not running:
        raise EnclaveError(
            f"no running enclave found on the {where} backend: start one first, "
            "or pass --endpoint vsock://CID:PORT (or unix:///PATH) or --cid, or set ENCLAVE_ENDPOINT"
        )
    if len(running) > 1:
        listed = ", ".join(f"{e.name} (CID {e.cid})" for e in running)
        # Each choice as the user types it: on the local backend only the unix socket reaches an enclave.
        choices = ", ".join(f"--endpoint {e.endpoint} for {e.name}" for e in running)
        how = "--cid CID or --endpoint" if where == "nitro" else "--endpoint"
        raise EnclaveError(
            f"{len(running)} enclaves are running ({listed}): choose one with {how} ({choices}), "
            "or set ENCLAVE_ENDPOINT to one of those endpoints"
        )
    return running[0].endpoint


def endpoint_of_cid(runtime: Runtime, cid: int) -> str:
    """The endpoint of the running enclave with this CID (the local backend's enclaves listen on unix sockets,
    so its --cid is looked up rather than dialled over vsock)."""
    running = [e for e in runtime.describe() if e.state.upper() == "RUNNING"]
    for info in running:
        if info.cid == cid:
            return info.endpoint
    listed = ", ".join(f"{e.name} (CID {e.cid})" for e in running) or "none"
    raise EnclaveError(
        f"no running enclave on the {getattr(runtime, 'backend', 'this')} backend has CID {cid} (running: {listed}): "
        "give the CID of one of those, or start one with that CID (run-enclave --enclave-cid)"
    )


def resolve_endpoint(
    endpoint: str | None = None, *, cid: int | None = None, port: int | None = None, local_runtime=None
) -> str:
    """Where the enclave server listens: an explicit endpoint, $ENCLAVE_ENDPOINT, a CID, or discovery.

    On the local backend discovery asks local_runtime() when given, else the installed `enclave local`
    command (all a module can reach); the CLI passes its own LocalRuntime and saves starting that process."""
    if endpoint:
        return endpoint
    if os.environ.get(settings.ENV_ENDPOINT):
        return os.environ[settings.ENV_ENDPOINT]
    port = port or settings.DEFAULT_SERVER_PORT
    if cid is not None and settings.backend() == "local":  # local enclaves listen on unix sockets: look the CID up
        return endpoint_of_cid(local_runtime() if local_runtime else LocalCliRuntime(), cid)
    if cid is not None:
        return f"vsock://{cid}:{port}"
    if settings.backend() == "nitro":
        # The one RUNNING enclave of `nitro-cli describe-enclaves`.
        return discover_endpoint(NitroRuntime(port=port))
    if settings.backend() == "local":
        # Through the installed `enclave local describe-enclaves`, as for nitro-cli: a module's AnsiballZ
        # payload carries module_utils only, never the local runtime's package.
        return discover_endpoint(local_runtime() if local_runtime else LocalCliRuntime())
    raise EnclaveError(
        "no enclave given: pass --endpoint unix:///PATH or vsock://CID:PORT, --cid, or set ENCLAVE_ENDPOINT"
    )


def instance_credentials(region: str | None = None, profile: str | None = None) -> dict:
    """Region and credentials of this host for the enclave's KMS calls.

    On a Nitro parent this is the instance role: boto3's default credential
    chain already speaks IMDSv2 (token PUT, then GET), so there is no metadata
    client here. client.host_kms_settings does exactly this; this is the same
    function, named for the runtime's callers. Keys: region,
    aws_access_key_id, aws_secret_access_key[, aws_session_token]."""
    from .client import host_kms_settings

    return host_kms_settings(region=region, profile=profile)


# ------------------------------------------------------------------ image context


def _walk_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def stage_image_context(
    dest: str | os.PathLike, owner_identity: str | os.PathLike | None = None, *, source: str | os.PathLike | None = None
) -> Path:
    """Lay out the enclave image's docker build context in dest (an empty directory).

    The Dockerfile goes to the top (where `nitro-cli build-enclave --docker-dir`
    looks for it) and app/ holds the enclave code at its import path: exactly
    enclave_code.enclave_sources, the files the local image measures, so host-only
    code never reaches the EIF. owner_identity (a file written by
    owner_identity.OwnerIdentity.dumps) goes beside enclave_server/ as
    owner_identity.json: the image is bound to its owner. Nothing else; every mode
    and mtime fixed, so the same sources give the same context, and the same image.
    source is the project tree (default: this one)."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise EnclaveRuntimeError(f"cannot stage the enclave image context in {dest}: the directory is not empty")
    try:
        root = Path(source) if source is not None else collection_root()
        files = enclave_sources(root)
    except ImageError as err:
        raise EnclaveRuntimeError(f"cannot stage the enclave image context: {err}") from None
    if DOCKERFILE not in files:
        raise EnclaveRuntimeError(
            f"cannot stage the enclave image context: {root} has no {DOCKERFILE}, which builds the image; restore it "
            "from the collection"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = dest / "app" / PACKAGE_PATH / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (dest / "Dockerfile").write_bytes(files[DOCKERFILE])
    if owner_identity is not None:
        (dest / "app" / PACKAGE_PATH / OWNER_IDENTITY_FILE).write_bytes(checked_owner_identity(owner_identity))
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    for path in sorted(dest.rglob("*"), reverse=True):
        path.chmod(0o644 if path.is_file() else 0o755)
        os.utime(path, (epoch, epoch), follow_symlinks=False)
    return dest


def checked_owner_identity(path: str | os.PathLike) -> bytes:
    """The bytes of an owner identity file, refused unless it parses (a broken one would stop the enclave)."""
    from .owner_identity import OwnerIdentity

    return OwnerIdentity.load(path).dumps()


def context_digest(path: str | os.PathLike) -> str:
    """SHA-256 over a directory's file names, executable bits and contents (not mtimes)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in _walk_files(root):
        rel = file.relative_to(root).as_posix()
        digest.update(f"{rel}\0{int(os.access(file, os.X_OK))}\0".encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------ nitro

# What to do about nitro-cli's error codes (the codes are nitro-cli's own, see ERRORS_URL).
_HINTS = {
    "E01": "nitro-cli rejected the arguments: check the nitro-cli version (`nitro-cli --version`, 1.2 or later)",
    "E02": "nitro-cli rejected the arguments: check the nitro-cli version (`nitro-cli --version`, 1.2 or later)",
    "E03": "a numeric argument is not a number: check cpu_count, memory_mib and cid",
    "E07": "the enclave sockets directory (/run/nitro_enclaves) is unreadable: run as root or a member of group "
    "`ne`, and make sure the nitro-enclaves-allocator service ran (the enclave_host role sets both up)",
    "E18": "the nitro-cli log file has the wrong owner: run as the user that owns /var/log/nitro_enclaves",
    "E19": "a file could not be opened or written: check the image path, the output path and their permissions",
    "E21": "a CPU is not in the enclave pool: change cpu_pool in /etc/nitro_enclaves/allocator.yaml "
    "and restart nitro-enclaves-allocator, or ask for other CPUs",
    "E22": "not enough CPUs in the enclave pool: lower cpu_count, or raise cpu_count in "
    "/etc/nitro_enclaves/allocator.yaml and restart nitro-enclaves-allocator",
    "E26": "memory_mib is too small for this image: give the enclave at least the minimum the message names "
    "(about four times the image size)",
    "E27": "the allocator reserved less memory than asked for: lower memory_mib, or raise memory_mib in "
    "/etc/nitro_enclaves/allocator.yaml and restart nitro-enclaves-allocator",
    "E28": "the Nitro Enclaves driver refused to create an enclave: is this an enclave-enabled Nitro instance "
    "(EnclaveOptions Enabled=true) with the nitro_enclaves module loaded?",
    "E29": "the Nitro Enclaves driver refused an ioctl: check that enclave support is enabled on the instance "
    "and that the nitro_enclaves module is loaded",
    "E35": "the image could not be loaded into enclave memory: restart nitro-enclaves-allocator so its "
    "hugepages are reserved, then retry",
    "E36": "the enclave did not boot: rebuild the image, give it more memory, or start it with debug_mode "
    "and read its console",
    "E39": "no enclave process answered: is the enclave still running (`nitro-cli describe-enclaves`)? "
    "Run as root or a member of group `ne`",
    "E44": "the console could not be reached: the console exists only for a running enclave started with debug_mode",
    "E45": "reading the console failed: the enclave may have stopped; check `nitro-cli describe-enclaves`",
    "E48": "building the enclave image failed: see the message above; check the Dockerfile builds with `docker build`",
    "E49": "docker could not build the image: is docker running and usable by this user (group `docker`)? "
    "Does the Dockerfile build with `docker build`?",
    "E50": "docker could not pull the image: check the image name, `docker login`, and the network",
    "E51": "nitro-cli has nowhere to keep build artifacts: set HOME or NITRO_CLI_ARTIFACTS to a writable directory",
    "E52": "nitro-cli's blobs are missing: install aws-nitro-enclaves-cli-devel (blobs in "
    "/usr/share/nitro_enclaves/blobs) or set NITRO_CLI_BLOBS",
    "E58": "no single enclave has that name: list them with `nitro-cli describe-enclaves`",
}


HUGEPAGES_DIR = "/sys/kernel/mm/hugepages"
DEFAULT_HUGEPAGE_SIZES_MIB = (2, 1024)
"""x86_64's hugepage sizes; Graviton (arm64, 4 KiB granule) has 2 MiB, 32 MiB and 1 GiB too."""


def hugepage_sizes_mib(directory: str = HUGEPAGES_DIR) -> tuple[int, ...]:
    """The host's hugepage sizes in MiB (from sysfs), smallest first; x86_64's when sysfs does not say."""
    try:
        names = os.listdir(directory)
    except OSError:
        return DEFAULT_HUGEPAGE_SIZES_MIB
    sizes = sorted({int(m.group(1)) // 1024 for n in names if (m := re.fullmatch(r"hugepages-(\d+)kB", n))} - {0})
    return tuple(sizes) or DEFAULT_HUGEPAGE_SIZES_MIB


def memory_satisfies(asked_mib: int, reported_mib: int, page_sizes_mib: tuple[int, ...] | None = None) -> bool:
    """Whether an enclave that describe-enclaves reports with reported_mib could be what nitro-cli
    allocated for --memory asked_mib. nitro-cli hands memory out in whole hugepages and reports what
    it allocated: at least what was asked, a multiple of the smallest page, short of one more of the
    largest (a 1000 MiB request from 1 GiB pages gets 1024). Exactly what was asked always satisfies."""
    if reported_mib == asked_mib:
        return True
    sizes = page_sizes_mib or hugepage_sizes_mib()
    return asked_mib < reported_mib < asked_mib + max(sizes) and reported_mib % min(sizes) == 0


def _json_values(text: str) -> list:
    """Every JSON value that starts a line of text: nitro-cli prints its progress on stderr and
    pretty-printed JSON on stdout, but old versions and wrappers mix lines into stdout too."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while pos < len(text):
        line_end = text.find("\n", pos)
        line_end = len(text) if line_end < 0 else line_end
        start = pos + len(text[pos:line_end]) - len(text[pos:line_end].lstrip())
        if start < line_end and text[start] in "{[":
            try:
                value, end = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                pass
            else:
                values.append(value)
                pos = end
                continue
        pos = line_end + 1
    return values


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source in (".", "..")


class NitroRuntime:
    """Enclaves on a Nitro parent instance, through nitro-cli.

    nitro_cli: the executable (default "nitro-cli", found on PATH);
    port: the enclave server's vsock port, for the endpoints it reports;
    timeout / build_timeout: seconds a nitro-cli call may take;
    console_timeout: seconds of console silence after which `console` returns."""

    backend = "nitro"

    def __init__(
        self,
        nitro_cli: str = "nitro-cli",
        *,
        port: int | None = None,
        timeout: float = 300,
        build_timeout: float = 3600,
        console_timeout: int = 10,
    ):
        self.nitro_cli = nitro_cli
        self.port = port if port is not None else settings.DEFAULT_SERVER_PORT
        self.timeout = timeout
        self.build_timeout = build_timeout
        self.console_timeout = console_timeout

    # -- running nitro-cli

    def _command(self, subcommand: str, args: list[str]) -> list[str]:
        return [self.nitro_cli, subcommand, *args]

    def _spawn(self, command: list[str]) -> subprocess.Popen:
        try:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
            )
        except FileNotFoundError as err:
            raise EnclaveRuntimeError(
                f"{self.nitro_cli} not found: install the AWS Nitro Enclaves CLI on this parent instance "
                "(the enclave_host role does), pass its path, or use the local backend (ENCLAVE_BACKEND=local)",
                command=command,
            ) from err
        except PermissionError as err:
            raise EnclaveRuntimeError(f"cannot execute {self.nitro_cli}: {err.strerror}", command=command) from err

    def _call(self, subcommand: str, args: list[str], *, timeout: float) -> str:
        """Run nitro-cli; its stdout, or an EnclaveRuntimeError with its stderr and what to do."""
        command = self._command(subcommand, args)
        proc = self._spawn(command)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise EnclaveRuntimeError(
                f"`{self.nitro_cli} {subcommand}` did not finish within {timeout:g} s and was stopped; "
                f"its output so far: {(stderr or stdout).strip() or 'none'}",
                command=command,
                stdout=stdout,
                stderr=stderr,
            ) from err
        if proc.returncode != 0:
            raise self._failure(subcommand, command, proc.returncode, stdout, stderr)
        return stdout

    def _failure(self, subcommand, command, returncode, stdout, stderr) -> EnclaveRuntimeError:
        match = _ERROR_CODE.search(stderr) or _ERROR_CODE.search(stdout)
        code = match.group(1) if match else None
        output = stderr.strip() or stdout.strip() or "no output"
        # The command as run (`enclave local` on the local backend), not always nitro-cli.
        message = f"`{os.path.basename(self.nitro_cli)} {subcommand}` failed (exit {returncode}): {output}"
        if code:
            hint = _HINTS.get(code, "see nitro-cli's explanation")
            message += f"\nWhat to do: {hint}. Explanation: `nitro-cli explain --error-code {code}`"
            if f"{ERRORS_URL}#{code}" not in output:
                message += f", {ERRORS_URL}#{code}"
        return EnclaveRuntimeError(
            message, command=command, returncode=returncode, stdout=stdout, stderr=stderr, code=code
        )

    def _one_json(self, subcommand: str, stdout: str, kind: type):
        values = [v for v in _json_values(stdout) if isinstance(v, kind)]
        if len(values) != 1:
            raise EnclaveRuntimeError(
                f"`nitro-cli {subcommand}` printed {len(values)} JSON {kind.__name__}s where one was expected: "
                f"{stdout.strip() or 'nothing'}; is this nitro-cli version supported (1.2 or later)?",
                stdout=stdout,
            )
        return values[0]

    # -- Runtime

    def build(
        self,
        *,
        output: str,
        source: str | None = None,
        signing_certificate: str | None = None,
        private_key: str | None = None,
        owner_identity: str | None = None,
    ) -> BuildResult:
        """`nitro-cli build-enclave`: an EIF at output from source (a directory with a Dockerfile,
        or a docker image URI; default: this project's enclave image, bound to the owner_identity file,
        which it then requires). Needs docker on the host."""
        if (signing_certificate is None) != (private_key is None):
            raise EnclaveRuntimeError("to sign the image give both signing_certificate and private_key, or neither")
        if signing_certificate is not None and not os.path.isfile(signing_certificate):
            raise EnclaveRuntimeError(f"the signing certificate {signing_certificate} does not exist")
        # The key is a PEM file, or a KMS key ARN (nitro-cli then signs through KMS with the host's credentials).
        if private_key is not None and not KMS_KEY_ARN.fullmatch(private_key) and not os.path.isfile(private_key):
            raise EnclaveRuntimeError(
                f"the private key {private_key} does not exist: give a PEM file or a KMS key ARN "
                "(arn:aws:kms:REGION:ACCOUNT:key/KEY-ID)"
            )
        output = os.path.abspath(output)
        if not os.path.isdir(os.path.dirname(output)):
            raise EnclaveRuntimeError(f"cannot write {output}: create the directory {os.path.dirname(output)} first")
        if source is None and owner_identity is None:
            raise EnclaveRuntimeError(
                "this project's enclave image must be bound to its owner: give owner_identity (the owner's "
                "package-signing keys; the enclave_image module's owner_signing_keys writes it)"
            )
        if source is not None and owner_identity is not None:
            raise EnclaveRuntimeError(
                "owner_identity is staged into this project's image only: with your own source, put "
                f"{OWNER_IDENTITY_FILE} into its context yourself"
            )
        with contextlib.ExitStack() as stack:
            if source is None:
                context = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="enclave-image-")))
                stage_image_context(context / "context", owner_identity)
                source_args = self._docker_dir_args(context / "context")
            elif os.path.isdir(source):
                if not os.path.isfile(os.path.join(source, "Dockerfile")):
                    raise EnclaveRuntimeError(f"{source} has no Dockerfile: nitro-cli builds the Dockerfile at the top")
                source_args = self._docker_dir_args(Path(source).resolve())
            elif _looks_like_path(source):
                raise EnclaveRuntimeError(f"{source} is not a directory: give a docker build directory or an image URI")
            else:
                source_args = ["--docker-uri", source]
            args = [*source_args, "--output-file", output]
            if signing_certificate is not None and private_key is not None:  # both or neither (checked above)
                args += ["--signing-certificate", signing_certificate, "--private-key", private_key]
            stdout = self._call("build-enclave", args, timeout=self.build_timeout)
        measurements = Measurements.from_json(self._one_json("build-enclave", stdout, dict))
        if signing_certificate is not None and measurements.pcr8 is None:
            raise EnclaveRuntimeError("nitro-cli signed nothing: the build printed no PCR8 for a signed image")
        return BuildResult(image=output, measurements=measurements)

    @staticmethod
    def _docker_dir_args(directory: Path) -> list[str]:
        # --docker-uri is required even with --docker-dir: it tags the image built there.
        tag = f"{IMAGE_REPOSITORY}:{context_digest(directory)[:20]}"
        return ["--docker-uri", tag, "--docker-dir", str(directory)]

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
        """`nitro-cli run-enclave`. debug_mode opens the console, and makes the enclave attest
        all-zero PCRs: KMS key policies keyed on PCR0 release nothing to it."""
        if not os.path.isfile(image):
            raise EnclaveRuntimeError(f"no enclave image at {image}: build one first")
        if not isinstance(cpu_count, int) or isinstance(cpu_count, bool) or cpu_count < 1:
            raise EnclaveRuntimeError(f"cpu_count must be a positive integer, not {cpu_count!r}")
        if not isinstance(memory_mib, int) or isinstance(memory_mib, bool) or memory_mib < 64:
            raise EnclaveRuntimeError(f"memory_mib must be an integer of at least 64, not {memory_mib!r}")
        if cid is not None and (not isinstance(cid, int) or isinstance(cid, bool) or not 4 <= cid < 0xFFFFFFFF):
            raise EnclaveRuntimeError(f"an enclave CID is an integer from 4 up (0-3 are reserved), not {cid!r}")
        args = ["--eif-path", os.path.abspath(image), "--cpu-count", str(cpu_count), "--memory", str(memory_mib)]
        if cid is not None:
            args += ["--enclave-cid", str(cid)]
        if name:
            args += ["--enclave-name", name]
        if debug_mode:
            args.append("--debug-mode")
        stdout = self._call("run-enclave", args, timeout=self.timeout)
        data = dict(self._one_json("run-enclave", stdout, dict))
        # run-enclave's object has no State or Flags: it has just started, in the mode asked for.
        data.setdefault("State", "RUNNING")
        data.setdefault("Flags", "DEBUG_MODE" if debug_mode else "NONE")
        return EnclaveInfo.from_json(data, port=self.port)

    def describe(self) -> list[EnclaveInfo]:
        """`nitro-cli describe-enclaves`."""
        stdout = self._call("describe-enclaves", [], timeout=self.timeout)
        if not stdout.strip():
            return []
        return [EnclaveInfo.from_json(d, port=self.port) for d in self._one_json("describe-enclaves", stdout, list)]

    def find(self, enclave: str) -> EnclaveInfo:
        """The enclave with this ID, else the one with this name."""
        enclaves = self.describe()
        for info in enclaves:
            if info.enclave_id == enclave:
                return info
        named = [info for info in enclaves if info.name == enclave]
        if len(named) == 1:
            return named[0]
        listed = ", ".join(f"{e.name} ({e.enclave_id})" for e in enclaves) or "none"
        if named:
            raise EnclaveRuntimeError(
                f"{len(named)} enclaves are named {enclave!r}: give its EnclaveID instead ({listed})"
            )
        raise EnclaveNotFoundError(f"no enclave has the ID or name {enclave!r}; running: {listed}")

    def terminate(self, enclave: str | None = None, *, all: bool = False) -> list[str]:  # noqa: A002
        """`nitro-cli terminate-enclave`: one enclave (ID or name), or all. The IDs terminated."""
        if all == (enclave is not None):
            raise EnclaveRuntimeError("terminate needs either an enclave (ID or name) or all=True")
        target = None
        if enclave is None:  # all (checked above)
            stdout = self._call("terminate-enclave", ["--all"], timeout=self.timeout)
        else:
            target = self.find(enclave).enclave_id
            stdout = self._call("terminate-enclave", ["--enclave-id", target], timeout=self.timeout)
        # One object for one enclave; `--all` prints one array of them (empty when none ran).
        answers = [a for v in _json_values(stdout) for a in (v if isinstance(v, list) else [v])]
        terminated = [a["EnclaveID"] for a in answers if isinstance(a, dict) and a.get("Terminated") is True]
        if not all and target not in terminated:
            raise EnclaveRuntimeError(
                f"nitro-cli did not confirm that enclave {target} terminated: {stdout.strip() or 'no output'}; "
                "check `nitro-cli describe-enclaves`",
                stdout=stdout,
            )
        return terminated

    def console(self, enclave: str, *, disconnect_timeout: int | None = None) -> str:
        """What the enclave wrote to its console (debug mode only), read until it has been
        silent for disconnect_timeout seconds (default: console_timeout)."""
        info = self.find(enclave)
        if not info.debug_mode:
            raise EnclaveRuntimeError(
                f"enclave {info.name} ({info.enclave_id}) was not started in debug mode, so it has no console: "
                "start it with debug_mode to read one (a debug enclave attests all-zero PCRs and gets no keys)"
            )
        idle = disconnect_timeout if disconnect_timeout is not None else self.console_timeout
        command = self._command("console", ["--enclave-id", info.enclave_id, "--disconnect-timeout", str(idle)])
        proc = self._spawn(command)
        try:
            # --disconnect-timeout ends an idle session; a console that never goes quiet is cut here.
            stdout, stderr = proc.communicate(timeout=max(idle * 6, idle + 30))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        else:
            if proc.returncode != 0:
                raise self._failure("console", command, proc.returncode, stdout, stderr)
        # Drop nitro-cli's own banner ("Connecting to the console...", "Successfully connected...").
        lines = stdout.splitlines(keepends=True)
        while lines and lines[0].startswith(("Connecting to the console", "Successfully connected to the console")):
            lines.pop(0)
        return "".join(lines)


class LocalCliRuntime(NitroRuntime):
    """The local backend through `enclave local`, driven exactly as NitroRuntime drives nitro-cli.

    home: the local state directory for the commands (default: $ENCLAVE_HOME / settings.state_home())."""

    backend = "local"

    def __init__(self, *, home: str | os.PathLike | None = None, **options):
        super().__init__(nitro_cli="enclave local", **options)
        self.home = Path(home) if home is not None else None

    def _command(self, subcommand: str, args: list[str]) -> list[str]:
        # The Python running this code has the project installed (a module's interpreter does too).
        return [sys.executable, "-m", LOCAL_CLI, "local", subcommand, *args]

    def _spawn(self, command: list[str]) -> subprocess.Popen:
        env = dict(os.environ, **({settings.ENV_HOME: str(self.home)} if self.home is not None else {}))
        try:
            return subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, errors="replace", env=env,
            )  # fmt: skip
        except OSError as err:
            raise EnclaveRuntimeError(f"cannot start `enclave local`: {err}", command=command) from err

    def build(
        self,
        *,
        output: str,
        source: str | None = None,
        signing_certificate: str | None = None,
        private_key: str | None = None,
        owner_identity: str | None = None,
    ) -> BuildResult:
        """`enclave local build`: a reproducible image of this installation (or of the project tree `source`)."""
        if signing_certificate is not None or private_key is not None:
            raise EnclaveRuntimeError(
                "the local backend does not sign images (PCR8 exists on nitro only): drop the key"
            )
        output = os.path.abspath(output)
        args = ["--output", output, *(["--source", str(source)] if source else [])]
        if owner_identity is not None:
            args += ["--owner-identity", os.path.abspath(owner_identity)]
        stdout = self._call("build", args, timeout=self.build_timeout)
        return BuildResult(image=output, measurements=Measurements.from_json(self._one_json("build", stdout, dict)))
