"""`enclave doctor`: prove that this host can run a job, one step at a time.

Each step checks one thing a job needs, with the project's own pieces (the runtime,
the client, attestation, key_policy, package_seal.seal), prints one line (ok / FAIL / skip,
what it checked, how long it took) and the doctor stops at the first failure with what
to do. Cleanup always runs: the throwaway enclave is terminated, the throwaway KMS key
scheduled for deletion with the shortest window KMS allows (7 days), the scratch files
removed, and on the local backend the local cloud stopped again if the doctor started it.

Steps, in order (the nitro-only ones are skipped on the local backend):

    nitro-cli     nitro-cli is installed and answers describe-enclaves         (nitro)
    services      nitro-enclaves-allocator and nitro-enclaves-vsock-proxy run   (nitro)
    device        /dev/nitro_enclaves exists and this user may use it (root, group ne)  (nitro)
    allocator     /etc/nitro_enclaves/allocator.yaml is well formed            (nitro)
    kms-access    this host's credentials and region (nitro: STS names the caller; local: the local
                  cloud runs, started if it did not)
    vsock-proxy   the vsock-proxy allowlist names the region's KMS (local: the local KMS)
    build         the enclave image builds, bound to a throwaway signing key (as the owner's image is bound
                  to the owner's); its PCR0
    resources     the enclave's memory is at least 4x the image; the allocator has it and the CPUs,
                  beside what running enclaves hold                                  (nitro)
    run           the enclave starts
    attestation   its server answers and attests the build's PCR0, verified against the AWS root
                  (local: the local root), with a fresh nonce, not in debug mode
    key-policy    a throwaway KMS key whose policy allows that PCR0 only (lint-clean); the host may make data
                  keys under it and delete it, never rewrite its policy
    host-refused  this host cannot Decrypt under it without an attestation
    job           a tiny package, sealed and signed with the throwaway signing key, runs: the enclave checks
                  its signature, unwraps its key with KMS Decrypt with Recipient, runs the script, and
                  signs the job's summary
    cleanup       always
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..plugins.module_utils import settings
from ..plugins.module_utils.errors import EnclaveError, StepFailedError

if TYPE_CHECKING:
    from ..plugins.module_utils.client import EnclaveClient
    from ..plugins.module_utils.runtime import EnclaveInfo

# The rest of the library is imported by the steps that use it, so `enclave --help` stays fast.

SERVICES = ("nitro-enclaves-allocator.service", "nitro-enclaves-vsock-proxy.service")
MIN_MEMORY_MIB = 256  # the default when 4x the image is less: room for the share and a package
# What the host does with its throwaway key once the policy is on: seal (and try to decrypt), then delete it.
DOCTOR_ACTIONS = ("kms:GenerateDataKey", "kms:ScheduleKeyDeletion")
KEY_DELETION_DAYS = 7  # the shortest PendingWindowInDays KMS accepts for ScheduleKeyDeletion
APP_NAME = "enclave-doctor"
SCRIPT = "doctor_check.py"
# The job proves that the script ran (it prints the token it was given) and reports what the job could
# reach of what only the server may: its uid, the NSM, the KMS forwarder (relayed bytes or a closed
# connection), /tmp. These rest on mechanisms not yet seen in a real Nitro enclave's kernel (THREAT_MODEL,
# Jobs), so the doctor checks them where the job really runs.
SCRIPT_SOURCE = """\
import json, os, socket, sys

def attempt(action):
    try:
        action()
        return "allowed"
    except OSError as err:
        return type(err).__name__

def forwarder():
    with socket.create_connection(("127.0.0.1", 443), timeout=10) as conn:
        conn.sendall(b"\\x16\\x03\\x01\\x00\\x00")
        if not conn.recv(1):
            raise ConnectionResetError

print("enclave-doctor", sys.argv[1], flush=True)
print("enclave-doctor-isolation", json.dumps({
    "uid": os.getuid(),
    "nsm": attempt(lambda: open("/dev/nsm", "rb").close()),
    "kms_forwarder": attempt(forwarder),
    "tmp": attempt(lambda: open("/tmp/enclave-doctor-probe", "w").close()),
}), flush=True)
"""

# What to do when a step fails with an error that carries no advice of its own.
ADVICE = {
    "nitro-cli": "install the AWS Nitro Enclaves CLI (the enclave_host role does), or pass --nitro-cli PATH",
    "kms-access": "configure this host's AWS credentials and region (on a parent instance: its instance role "
    "and --region), then run the doctor again",
    "build": "fix what the build reported (on nitro: is docker installed and running?) and run the doctor again",
    "run": "fix what the runtime reported and run the doctor again; `enclave doctor` cleans up after itself",
    "attestation": "the enclave runs but did not prove its image: check that its image is the one built here "
    "and that it is not in debug mode",
    "key-policy": "these credentials must be allowed kms:CreateKey and kms:PutKeyPolicy (IAM) for the doctor's "
    "throwaway key",
    "host-refused": "the key policy must allow these credentials kms:GenerateDataKey (the doctor's own policy "
    "does) to make a data key to try",
    "job": "read the error above: a KMS refusal names the key policy's condition, a script error its output",
    "cleanup": "remove what is listed by hand: `nitro-cli terminate-enclave --enclave-id ID` (local: "
    "`enclave local terminate-enclave`), `aws kms schedule-key-deletion --key-id ARN --pending-window-in-days 7`",
}


T = TypeVar("T")


def _made(value: T | None, step: str) -> T:
    """What an earlier step made: the doctor runs its steps in order and stops at the first that fails."""
    if value is None:
        raise StepFailedError(f"the {step} step has not run", "run the doctor's steps in order (`enclave doctor`)")
    return value


class Skipped(Exception):
    """A step that does not apply to this backend; the message says why."""


@dataclass
class Outcome:
    step: str
    status: str  # "ok" | "fail" | "skip"
    detail: str
    seconds: float
    todo: str | None = None


def _error_code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _describe(err: BaseException) -> str:
    code = _error_code(err)
    text = str(err) or type(err).__name__
    return f"{code}: {text}" if code and code not in text else text


def _cpu_pool_size(pool) -> int:
    """How many CPUs a cpu_pool such as "1,3" or "2-5,8" names (ValueError when it is unreadable)."""
    count = 0
    for part in str(pool).split(","):
        low, sep, high = part.strip().partition("-")
        first, last = int(low), int(high if sep else low)
        if last < first:
            raise ValueError(f"{part} is an empty range")
        count += last - first + 1
    return count


def read_allocator(path: Path) -> tuple[int, int]:
    """(memory_mib, CPUs) of an allocator.yaml, or StepFailedError saying what is wrong with it."""
    import yaml

    todo = (
        f"write {path} as the enclave_host role does: `---`, then `memory_mib: N` and `cpu_count: N` (or "
        "`cpu_pool: LIST`, not both); then `systemctl restart nitro-enclaves-allocator`"
    )
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StepFailedError(f"{path} does not exist: the allocator reserves nothing for enclaves", todo) from None
    if not text.startswith("---"):
        raise StepFailedError(f"{path} does not start with `---`, which the allocator service requires", todo)
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise StepFailedError(f"{path} is not valid YAML: {err}", todo) from None
    config = config if isinstance(config, dict) else {}
    memory = config.get("memory_mib")
    if not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0:
        raise StepFailedError(f"{path} has no positive memory_mib (got {memory!r})", todo)
    given = [k for k in ("cpu_count", "cpu_pool") if k in config]
    if len(given) != 1:
        raise StepFailedError(f"{path} must set exactly one of cpu_count and cpu_pool, not {given or 'neither'}", todo)
    try:
        cpus = int(config["cpu_count"]) if given == ["cpu_count"] else _cpu_pool_size(config["cpu_pool"])
    except (TypeError, ValueError):
        raise StepFailedError(f"{path} has an unreadable {given[0]}: {config[given[0]]!r}", todo) from None
    return memory, cpus


class ThrowawaySigner:
    """The doctor's package signer, like owner_identity.KmsSigner but with a P-384 key made for this run and
    never stored: the doctor's image is bound to it, so the job takes the path an owner's package takes (its
    signature checked against the image's owner identity before any key release) without the owner's key."""

    def __init__(self, label: str):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from ..plugins.module_utils.owner_identity import OwnerKey

        self._private = ec.generate_private_key(ec.SECP384R1())
        public = self._private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key = OwnerKey(label, public)

    def sign(self, message: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return self._private.sign(message, ec.ECDSA(hashes.SHA384()))  # ECDSA_SHA_384, as KMS Sign


class Doctor:
    """The steps, their shared state (work directory, enclave, key) and the cleanup.

    root: prefix of /etc/nitro_enclaves and /dev/nitro_enclaves (a scratch root in tests);
    key_policy_file: a key policy to try instead of the rendered one, with ${ACCOUNT},
    ${PCR0} and ${USER} replaced (the owner's own policy, proven against a real enclave)."""

    def __init__(
        self,
        *,
        backend: str | None = None,
        region: str | None = None,
        root: str = "/",
        nitro_cli: str = "nitro-cli",
        cpu_count: int = 2,
        memory_mib: int | None = None,
        boot_timeout: float = 120,
        key_policy_file: str | None = None,
        user_principal: str | None = None,
    ):
        self.backend = settings.backend(backend)
        self.nitro = self.backend == "nitro"
        self.region = region
        self.root = Path(root)
        self.nitro_cli = nitro_cli
        self.cpu_count = cpu_count
        self.memory_mib = memory_mib
        self.boot_timeout = boot_timeout
        self.key_policy_file = key_policy_file
        self.user_principal = user_principal
        from ..plugins.module_utils.runtime import LocalCliRuntime, NitroRuntime

        self.runtime = NitroRuntime(nitro_cli) if self.nitro else LocalCliRuntime()
        self.token = secrets.token_hex(8)
        self.enclave_name = f"{APP_NAME}-{self.token}"
        self.run_attempted = False
        self.work: Path | None = None
        self.cloud: dict | None = None
        self.cloud_started = False
        self.allocator: tuple[int, int] | None = None
        self.kms: Any = None  # a boto3 KMS client (boto3 ships no types)
        self.kms_settings: dict = {}
        self.issued_profile: dict = {}  # local: the profile of the local KMS's credentials these are
        self.signer: ThrowawaySigner | None = None
        self.image: str | None = None
        self.pcr0: str | None = None
        self.enclave: EnclaveInfo | None = None
        self.client: EnclaveClient | None = None  # the client of the throwaway enclave
        self.key_arn: str | None = None

    def steps(self) -> list[tuple[str, Callable[[], str]]]:
        return [
            ("nitro-cli", self.check_nitro_cli),
            ("services", self.check_services),
            ("device", self.check_device),
            ("allocator", self.check_allocator),
            ("kms-access", self.check_kms_access),
            ("vsock-proxy", self.check_vsock_proxy),
            ("build", self.build),
            ("resources", self.check_resources),
            ("run", self.run_enclave),
            ("attestation", self.attest),
            ("key-policy", self.make_key),
            ("host-refused", self.check_host_refused),
            ("job", self.run_job),
        ]

    def diagnose(self, report=lambda outcome: None) -> list[Outcome]:
        """Run the steps until one fails, then clean up; report(outcome) is called after each."""
        outcomes = []
        try:
            for name, step in self.steps():
                outcomes.append(self._timed(name, step))
                report(outcomes[-1])
                if outcomes[-1].status == "fail":
                    break
        finally:
            outcomes.append(self._timed("cleanup", self.cleanup))
            report(outcomes[-1])
        return outcomes

    @staticmethod
    def _timed(name: str, step) -> Outcome:
        start = time.monotonic()
        try:
            detail, status, todo = step(), "ok", None
        except Skipped as skip:
            detail, status, todo = str(skip), "skip", None
        except StepFailedError as err:
            detail, status, todo = str(err), "fail", err.todo
        except Exception as err:  # the runtime's, boto3's or the client's own error, which names what happened
            detail, sep, todo = _describe(err).partition("\nWhat to do: ")  # nitro-cli's hints (runtime._HINTS)
            status, todo = "fail", todo if sep else ADVICE.get(name, "fix what is reported and run again")
        return Outcome(name, status, detail, round(time.monotonic() - start, 3), todo)

    def _nitro_only(self) -> None:
        if not self.nitro:
            raise Skipped("local backend: there is no Nitro hardware to check")

    # ------------------------------------------------------------ the host (nitro)

    def check_nitro_cli(self) -> str:
        self._nitro_only()
        found = shutil.which(self.nitro_cli)
        if found is None:
            raise StepFailedError(f"{self.nitro_cli} is not installed (not found on PATH)", ADVICE["nitro-cli"])
        running = self.runtime.describe()
        return f"{found} answers describe-enclaves ({len(running)} enclave(s) running)"

    def check_services(self) -> str:
        self._nitro_only()
        states = {}
        for service in SERVICES:
            try:
                done = subprocess.run(
                    ["systemctl", "is-active", service], capture_output=True, text=True, timeout=30, check=False
                )
            except FileNotFoundError:
                raise StepFailedError(
                    "systemctl is not installed: cannot tell whether the Nitro Enclaves services run",
                    "run the doctor on the parent instance itself (Amazon Linux 2023 with systemd)",
                ) from None
            states[service] = done.stdout.strip() or f"unknown (exit {done.returncode})"
        down = {service: state for service, state in states.items() if state != "active"}
        if down:
            listed = ", ".join(f"{service} is {state}" for service, state in down.items())
            raise StepFailedError(
                listed,
                f"systemctl enable --now {' '.join(down)}; `journalctl -u SERVICE` says why one stopped (the "
                "vsock-proxy exits when its allowlist lacks the region's KMS, the allocator when it cannot "
                "reserve its memory)",
            )
        return ", ".join(f"{service} active" for service in SERVICES)

    def check_device(self) -> str:
        self._nitro_only()
        device = self.root / "dev" / "nitro_enclaves"
        if not device.exists():
            raise StepFailedError(
                f"{device} does not exist: the Nitro Enclaves driver is not loaded or enclaves are not enabled",
                "launch the instance with enclaves enabled (EnclaveOptions Enabled=true, a Nitro instance type "
                "with at least 4 vCPUs), then `modprobe nitro_enclaves`",
            )
        if os.geteuid() == 0:
            return f"{device} present; running as root"
        import grp

        try:
            ne = grp.getgrnam("ne").gr_gid
        except KeyError:
            ne = None
        if ne is None or ne not in os.getgroups():
            raise StepFailedError(
                f"this user is not in group ne, so nitro-cli cannot use {device}",
                "add the user to group ne (`usermod -aG ne USER`, the enclave_host role's enclave_host_users) "
                "and log in again",
            )
        return f"{device} present; this user is in group ne"

    def check_allocator(self) -> str:
        self._nitro_only()
        path = self.root / "etc" / "nitro_enclaves" / "allocator.yaml"
        self.allocator = read_allocator(path)
        return f"{path}: memory_mib {self.allocator[0]}, {self.allocator[1]} CPU(s)"

    # ------------------------------------------------------------ KMS

    def check_kms_access(self) -> str:
        import boto3

        from ..plugins.module_utils.client import host_kms_settings

        endpoint_url = None
        if not self.nitro:
            from ..enclave_local import cloud

            self.cloud = cloud.status()
            if self.cloud is None:
                self.cloud = cloud.up()
                self.cloud_started = True
            endpoint_url = self.cloud["kms_endpoint_url"]
        self.kms_settings = host_kms_settings(region=self.region)
        self.region = self.kms_settings["region"]
        self.kms = boto3.client(
            "kms",
            region_name=self.region,
            endpoint_url=endpoint_url,
            aws_access_key_id=self.kms_settings["aws_access_key_id"],
            aws_secret_access_key=self.kms_settings["aws_secret_access_key"],
            aws_session_token=self.kms_settings.get("aws_session_token"),
        )
        if self.nitro:
            if self.user_principal is None:
                self.user_principal = self._caller_principal()
        else:
            self.issued_profile = self._issued_profile()
            self.kms.list_keys(Limit=1)  # the local KMS checks every request's SigV4 signature, as AWS does
        who = self.user_principal or f"profile {self.issued_profile['profile']} of {self._cloud['kms_credentials']}"
        where = f"the local KMS at {endpoint_url}" + (" (started)" if self.cloud_started else "")
        return f"{where if endpoint_url else f'AWS KMS in {self.region}'}, as {who}"

    def _caller_principal(self) -> str | None:
        """Who these credentials are, as a key policy names them (STS GetCallerIdentity)."""
        import boto3

        arn = boto3.client(
            "sts",
            region_name=self.region,
            aws_access_key_id=self.kms_settings["aws_access_key_id"],
            aws_secret_access_key=self.kms_settings["aws_secret_access_key"],
            aws_session_token=self.kms_settings.get("aws_session_token"),
        ).get_caller_identity()["Arn"]
        # An instance role's session (arn:aws:sts::A:assumed-role/ROLE/i-...) is named by its role in a policy.
        prefix, sep, rest = arn.partition(":assumed-role/")
        if sep:
            return f"{prefix.replace(':sts:', ':iam:')}:role/{rest.split('/')[0]}"
        return arn

    @property
    def _cloud(self) -> dict:
        """The local cloud the kms-access step found or started (local backend)."""
        return _made(self.cloud, "kms-access")

    def _issued_profile(self) -> dict:
        """The profile of the local KMS's credentials file that holds these credentials."""
        from ..enclave_local.kms import load_credentials

        path = self._cloud["kms_credentials"]
        access_key = self.kms_settings["aws_access_key_id"]
        for entry in load_credentials(path).values():
            if entry["aws_access_key_id"] == access_key:
                return entry
        raise StepFailedError(
            f"access key {access_key} is not one the local KMS issued (in {path}), so it refuses every request",
            f"use the local KMS's credentials: AWS_SHARED_CREDENTIALS_FILE={path} AWS_PROFILE=enclave-host, and "
            "unset AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (credentials in the environment win over a profile)",
        )

    def _local_principal(self, account: str) -> str:
        """The local KMS's name for these credentials, by its rule (LocalKms.authenticate): the profile's
        principal_arn, else role/<profile> in the key's account."""
        entry = self.issued_profile
        return entry.get("principal_arn") or f"arn:aws:iam::{account}:role/{entry['profile']}"

    def check_vsock_proxy(self) -> str:
        from ..enclave_local.vsock_proxy import load_allowlist
        from ..plugins.module_utils.errors import VsockProxyError

        if self.nitro:
            path = self.root / "etc" / "nitro_enclaves" / "vsock-proxy.yaml"
            needed = (f"kms.{self.region}.amazonaws.com", 443)
        else:
            path = Path(self._cloud["vsock_proxy_config"])
            needed = (self._cloud["kms_host"], int(self._cloud["kms_tls_port"]))  # enclaves reach KMS over HTTPS
        todo = (
            f"add `- {{address: {needed[0]}, port: {needed[1]}}}` to the allowlist in {path} (the enclave_host "
            "role writes it from enclave_host_region), then `systemctl restart nitro-enclaves-vsock-proxy`"
            if self.nitro
            else "restart the local cloud: `enclave local down && enclave local up`"
        )
        try:
            allowed = load_allowlist(path)
        except VsockProxyError as err:
            raise StepFailedError(str(err), todo) from None
        if needed not in allowed:
            listed = ", ".join(f"{a}:{p}" for a, p in allowed) or "nothing"
            raise StepFailedError(
                f"{path} allows {listed}, not {needed[0]}:{needed[1]}, so the enclave cannot reach KMS", todo
            )
        return f"{path} allows {needed[0]}:{needed[1]}"

    # ------------------------------------------------------------ the enclave

    def build(self) -> str:
        from ..plugins.module_utils.owner_identity import IDENTITY_FILE, OwnerIdentity

        self.work = Path(tempfile.mkdtemp(prefix="enclave-doctor-"))
        self.signer = ThrowawaySigner(f"{APP_NAME}-{self.token} (throwaway signing key, never stored)")
        identity = self.work / IDENTITY_FILE
        identity.write_bytes(OwnerIdentity((self.signer.key,)).dumps())
        result = self.runtime.build(output=str(self.work / f"{APP_NAME}.eif"), owner_identity=str(identity))
        self.image, self.pcr0 = result.image, result.measurements.pcr0
        size = os.path.getsize(self.image)
        bound = f"bound to throwaway signing key {self.signer.key.fingerprint.hex()[:16]}"
        return f"{self.image} ({size / 2**20:.1f} MiB, {bound}), PCR0 {self.pcr0}"

    def check_resources(self) -> str:
        needed = math.ceil(4 * os.path.getsize(_made(self.image, "build")) / 2**20)  # nitro-cli's rule: 4x the image
        if self.memory_mib is None:
            self.memory_mib = max(MIN_MEMORY_MIB, needed)
        elif self.memory_mib < needed:
            raise StepFailedError(
                f"--memory {self.memory_mib} MiB is less than 4x the image ({needed} MiB)",
                f"give the enclave at least {needed} MiB (--memory)",
            )
        if not self.nitro:
            return (
                f"{self.memory_mib} MiB (at least 4x the image), {self.cpu_count} CPU(s); local backend: no allocator"
            )
        memory, cpus = _made(self.allocator, "allocator")
        allocator = self.root / "etc" / "nitro_enclaves" / "allocator.yaml"
        if memory < self.memory_mib:
            raise StepFailedError(
                f"the allocator reserves {memory} MiB, the enclave needs {self.memory_mib} MiB (4x the image is "
                f"{needed} MiB)",
                f"set memory_mib: {self.memory_mib} in {allocator} and `systemctl restart nitro-enclaves-allocator` "
                "(the enclave_host role sizes it from the image)",
            )
        if cpus < self.cpu_count:
            raise StepFailedError(
                f"the allocator reserves {cpus} CPU(s), the enclave asks for {self.cpu_count}",
                f"set cpu_count: {self.cpu_count} in {allocator} and restart nitro-enclaves-allocator, "
                "or pass a smaller --cpu-count",
            )
        running = self.runtime.describe()
        used_memory, used_cpus = sum(e.memory_mib for e in running), sum(e.cpu_count for e in running)
        if memory - used_memory < self.memory_mib or cpus - used_cpus < self.cpu_count:
            listed = ", ".join(f"{e.name} ({e.enclave_id}: {e.memory_mib} MiB, {e.cpu_count} CPUs)" for e in running)
            raise StepFailedError(
                f"running enclaves hold {used_memory} MiB and {used_cpus} CPU(s) of the allocator's {memory} MiB and "
                f"{cpus}, leaving less than the {self.memory_mib} MiB and {self.cpu_count} CPU(s) needed: {listed}",
                "terminate one (`nitro-cli terminate-enclave --enclave-id ID`), or raise the allocator's resources",
            )
        return f"{self.memory_mib} MiB and {self.cpu_count} CPU(s) of the allocator's {memory} MiB and {cpus}"

    def run_enclave(self) -> str:
        self.run_attempted = True
        self.enclave = enclave = self.runtime.run(
            _made(self.image, "build"),
            cpu_count=self.cpu_count,
            memory_mib=_made(self.memory_mib, "resources"),
            name=self.enclave_name,
        )
        return f"enclave {enclave.enclave_id} (CID {enclave.cid}) at {enclave.endpoint}"

    def _roots(self) -> list:
        from ..plugins.module_utils import attestation

        if self.nitro:
            return attestation.load_trusted_roots([], include_aws=True)
        return attestation.load_trusted_roots([self._cloud["ca_root"]], include_aws=False)

    def attest(self) -> str:
        from ..plugins.module_utils.client import EnclaveClient

        enclave, pcr0 = _made(self.enclave, "run"), _made(self.pcr0, "build")
        deadline = time.monotonic() + self.boot_timeout
        while True:
            try:
                self.client = client = EnclaveClient(enclave.endpoint, trusted_roots=self._roots(), timeout=30)
                break
            except (ConnectionError, OSError) as err:
                if time.monotonic() >= deadline:
                    raise StepFailedError(
                        f"enclave {enclave.enclave_id} runs, but no enclave server answered at "
                        f"{enclave.endpoint} within {self.boot_timeout:g} s: {err}",
                        "start the image in debug mode (`nitro-cli run-enclave --debug-mode ...`) and read "
                        "`nitro-cli console`; give it more time with --boot-timeout",
                    ) from None
                time.sleep(1)
        doc = client.attest(expect_pcr0=pcr0)
        root = "the AWS Nitro root" if self.nitro else "the local root"
        return f"{doc.module_id} attested PCR0 {pcr0[:16]}... with a fresh nonce, verified against {root}"

    # ------------------------------------------------------------ the key and the job

    def _policy(self, account: str) -> dict:
        from ..plugins.module_utils import key_policy

        user, pcr0 = _made(self.user_principal, "make-key"), _made(self.pcr0, "build")
        if self.key_policy_file is None:
            # The owner's policy, but the throwaway key has no administrator: the host (which must never be
            # able to rewrite the policy, it could drop the Deny) may only make data keys and delete the key.
            policy = key_policy.render_policy(
                account_id=account,
                user_principals=[user],
                admin_principals=[f"arn:aws:iam::{account}:root"],  # replaced below
                pcr0=[pcr0],
            )
            doctor = {"Sid": "DoctorSealsAndDeletes", "Effect": "Allow", "Principal": {"AWS": [self.user_principal]},
                      "Action": list(DOCTOR_ACTIONS), "Resource": "*"}  # fmt: skip
            policy["Statement"] = [doctor if s["Sid"] == key_policy.SID_ADMIN else s for s in policy["Statement"]]
            return policy
        try:
            text = Path(self.key_policy_file).read_text()
            for name, value in (("ACCOUNT", account), ("PCR0", pcr0), ("USER", user)):
                text = text.replace("${" + name + "}", value)
            return json.loads(text)
        except (OSError, ValueError) as err:
            raise StepFailedError(
                f"cannot read the key policy {self.key_policy_file}: {err}",
                "give --key-policy a JSON key policy (${ACCOUNT}, ${PCR0} and ${USER} are filled in)",
            ) from None

    def make_key(self) -> str:
        from ..plugins.module_utils import key_policy, policy_lint

        created = self.kms.create_key(
            Description=f"enclave doctor {self.token}: throwaway, scheduled for deletion when the doctor ends",
            Tags=[{"TagKey": "created-by", "TagValue": APP_NAME}],
        )
        self.key_arn = key_arn = created["KeyMetadata"]["Arn"]
        account = key_arn.split(":")[4]
        if self.user_principal is None:
            self.user_principal = self._local_principal(account)
        policy = self._policy(account)
        todo = (
            "render the key policy for this image: `enclave policy render --account-id ACCOUNT --pcr0 PCR0 "
            "--user-principal ARN` (or the enclave_key_policy module), and check it with `enclave policy lint`"
        )
        problems = policy_lint.lint(policy, user_principals=[self.user_principal])
        if problems:
            raise StepFailedError("the key policy is unsound: " + "; ".join(problems), todo)
        allowed = key_policy.allowed_pcr0(policy)
        if self.pcr0 not in allowed:
            raise StepFailedError(
                f"the key policy allows PCR0 {', '.join(allowed) or 'none'}, not this image's {self.pcr0}", todo
            )
        # The bypass: the policy leaves the host no kms:PutKeyPolicy, as the owner's policy leaves it none.
        self.kms.put_key_policy(
            KeyId=self.key_arn, PolicyName="default", Policy=json.dumps(policy), BypassPolicyLockoutSafetyCheck=True
        )
        return f"{self.key_arn} releases to PCR0 {self.pcr0[:16]}... only, for {self.user_principal}"

    def check_host_refused(self) -> str:
        context = {"purpose": APP_NAME}
        wrapped = self.kms.generate_data_key(KeyId=self.key_arn, KeySpec="AES_256", EncryptionContext=context)
        try:
            self.kms.decrypt(CiphertextBlob=wrapped["CiphertextBlob"], EncryptionContext=context)
        except Exception as err:
            if _error_code(err) == "AccessDeniedException":
                return "Decrypt without an attestation document: AccessDeniedException, as it must be"
            raise
        raise StepFailedError(
            "this host decrypted a data key of the throwaway key without any attestation: whoever runs the host "
            "could read every package sealed under such a key",
            "the key policy needs the Deny without attestation (`enclave policy render` writes it), and no grant "
            "or IAM policy may hand out kms:Decrypt on the owner's key",
        )

    def run_job(self) -> str:
        from ..plugins.module_utils import attestation, package_seal, receipt

        work, client, pcr0 = _made(self.work, "build"), _made(self.client, "attest"), _made(self.pcr0, "build")
        app, published = work / "app", work / "published"
        app.mkdir()
        published.mkdir()
        (app / SCRIPT).write_text(SCRIPT_SOURCE)
        sealed = published / f"{APP_NAME}-{self.token}.pkg"
        header = package_seal.seal(
            app,
            sealed,
            kms_client=self.kms,
            key_id=_made(self.key_arn, "make-key"),
            name=APP_NAME,
            version="1",
            signer=self.signer,
        )
        client.push(published, "/encrypted")
        printed = []
        try:
            summary = client.run(
                sealed.name, SCRIPT, [self.token], kms=self.kms_settings, timeout=300,
                on_output=lambda stream, data: printed.append(data.decode(errors="replace")),
            )  # fmt: skip
        except EnclaveError as err:
            if "KMS" not in str(err):
                raise
            raise StepFailedError(
                str(err),
                "the enclave's KMS Decrypt with Recipient was refused: the key policy must allow this host's role "
                "kms:Decrypt on this image's PCR0, with conditions only on PCRs the image has (PCR8 only for signed "
                "images); the vsock-proxy must reach KMS",
            ) from None
        output = "".join(printed)
        if summary["rc"] != 0 or f"enclave-doctor {self.token}" not in output:
            raise StepFailedError(
                f"the job ended by {summary['ended_by']} with status {summary['rc']}; it printed {output!r}",
                "run a debug-mode enclave and read its console; the enclave's Python must run a plain script",
            )
        isolation = self._check_job_isolation(output)
        signed = {k: v for k, v in summary.items() if k != "attestation"}
        doc = attestation.verify_document(
            summary["attestation"], trusted_roots=self._roots(), expected_pcrs={0: pcr0}, max_age_s=None
        )
        if doc.user_data != receipt.job_digest(signed):
            raise StepFailedError("the enclave signed a different job summary than it returned", ADVICE["job"])
        assert header.signer_fingerprint is not None  # sealed with self.signer above
        return (
            f"the enclave took the package signed by {header.signer_fingerprint.hex()[:16]}, unwrapped its key with "
            f"KMS Decrypt with Recipient, ran {SCRIPT} (status 0) and signed the job's receipt{isolation}"
        )

    def _check_job_isolation(self, output: str) -> str:
        """What the job could reach: nothing of the server's (a non-root local server runs jobs as itself)."""
        line = next((x for x in output.splitlines() if x.startswith("enclave-doctor-isolation ")), None)
        if line is None:
            raise StepFailedError(f"the job did not report what it could reach; it printed {output!r}", ADVICE["job"])
        seen = json.loads(line.split(" ", 1)[1])
        if not self.nitro and os.geteuid() != 0:
            return "; jobs are not isolated on a local backend run without root"
        reached = [what for what in ("nsm", "kms_forwarder", "tmp") if seen[what] == "allowed"]
        if seen["uid"] == 0 or reached:
            raise StepFailedError(
                f"the job ran as uid {seen['uid']} and could reach {', '.join(reached) or 'what root reaches'}: {seen}",
                "jobs are not isolated in this enclave: the server must run as root and the enclave's kernel must "
                "give it setuid, file modes and /proc/net/tcp (docs/THREAT_MODEL.md, Jobs); do not run owners' "
                "packages here until this passes",
            )
        return f"; the job ran as uid {seen['uid']}, refused the NSM, the KMS forwarder and /tmp"

    # ------------------------------------------------------------ cleanup

    def cleanup(self) -> str:
        done, problems = [], []

        def attempt(what: str, action) -> None:
            try:
                action()
                done.append(what)
            except Exception as err:
                problems.append(f"{what}: {_describe(err)}")

        if self.client is not None:
            attempt("closed the connection", self.client.close)
        if self.enclave is not None:
            attempt(
                f"terminated enclave {self.enclave.enclave_id}", lambda: self.runtime.terminate(self.enclave.enclave_id)
            )
        elif self.run_attempted:  # run failed, perhaps after the enclave started (a timeout): find it by name
            attempt(f"made sure no enclave {self.enclave_name} is left", self._terminate_by_name)
        if self.key_arn is not None:
            attempt(
                f"scheduled key {self.key_arn} for deletion in {KEY_DELETION_DAYS} days",
                lambda: self.kms.schedule_key_deletion(KeyId=self.key_arn, PendingWindowInDays=KEY_DELETION_DAYS),
            )
        if self.work is not None:
            attempt(f"removed {self.work}", lambda: shutil.rmtree(self.work))
        if self.cloud_started:
            attempt("stopped the local cloud it started", self._stop_cloud)
        if problems:
            raise StepFailedError("could not clean up: " + "; ".join(problems), ADVICE["cleanup"])
        return "; ".join(done) or "nothing to clean up"

    def _terminate_by_name(self) -> None:
        from ..plugins.module_utils.errors import EnclaveNotFoundError

        with contextlib.suppress(EnclaveNotFoundError):  # it never started
            self.runtime.terminate(self.enclave_name)

    def _stop_cloud(self) -> None:
        from ..enclave_local import cloud

        others = [e.enclave_id for e in self.runtime.describe()]
        if others:  # `down` would stop them too: leave the cloud to them
            raise StepFailedError(f"enclaves {others} came up meanwhile; the local cloud stays up", ADVICE["cleanup"])
        cloud.down()


# ---------------------------------------------------------------- command


def _print_line(outcome: Outcome) -> None:
    mark = {"ok": "ok  ", "fail": "FAIL", "skip": "skip"}[outcome.status]
    print(f"{mark}  {outcome.step:<12} {outcome.detail} ({outcome.seconds:.2f} s)", flush=True)
    if outcome.todo:
        print(f"      what to do: {outcome.todo}", flush=True)


def cmd_doctor(args) -> int:
    doctor = Doctor(
        backend=args.backend,
        region=args.region,
        root=args.root,
        nitro_cli=args.nitro_cli,
        cpu_count=args.cpu_count,
        memory_mib=args.memory,
        boot_timeout=args.boot_timeout,
        key_policy_file=args.key_policy,
        user_principal=args.user_principal,
    )
    if not args.json:
        print(f"enclave doctor: checking the {doctor.backend} backend step by step", flush=True)
    outcomes = doctor.diagnose(report=(lambda outcome: None) if args.json else _print_line)
    healthy = all(o.status != "fail" for o in outcomes)
    if args.json:
        json.dump({"backend": doctor.backend, "ok": healthy, "steps": [asdict(o) for o in outcomes]}, sys.stdout,
                  indent=2)  # fmt: skip
        sys.stdout.write("\n")
    else:
        print("this host can run jobs" if healthy else "this host cannot run jobs yet: see FAIL above")
    return 0 if healthy else 1


def register(commands) -> None:
    """Add `doctor` to the `enclave` parser's subcommands."""
    doctor = commands.add_parser(
        "doctor", help="prove this host can run a job: each step checked, stopping at the first failure"
    )
    doctor.add_argument("--backend", choices=settings.BACKENDS, help="default: $ENCLAVE_BACKEND or local")
    doctor.add_argument("--region", help="AWS region of KMS (default: boto3's, e.g. AWS_REGION)")
    doctor.add_argument("--cpu-count", type=int, default=2, help="CPUs for the throwaway enclave (default 2)")
    doctor.add_argument("--memory", type=int, metavar="MIB", help="its memory (default: 4x the image, at least 256)")
    doctor.add_argument(
        "--boot-timeout", type=float, default=120, metavar="SECONDS", help="wait this long for its server (default 120)"
    )
    doctor.add_argument(
        "--key-policy",
        metavar="FILE",
        help="try this key policy (JSON; ${ACCOUNT}, ${PCR0}, ${USER} replaced) instead of the rendered one",
    )
    doctor.add_argument(
        "--user-principal", metavar="ARN", help="this host's principal (default: STS, or the local KMS's)"
    )
    doctor.add_argument("--nitro-cli", default="nitro-cli", help="the nitro-cli executable (nitro)")
    doctor.add_argument("--root", default="/", help="where /etc/nitro_enclaves and /dev live (default /)")
    doctor.add_argument("--json", action="store_true", help="print every step as JSON at the end")
    doctor.set_defaults(func=cmd_doctor)
