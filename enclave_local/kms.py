"""The local KMS: AWS KMS's JSON 1.1 protocol on loopback, for the local backend and CI.

Unmodified boto3 talks to it with ``endpoint_url``. It keeps symmetric keys,
aliases and key policies in a state directory, evaluates every key operation
against the key's policy (with the same condition keys AWS KMS sets, including
``kms:RecipientAttestation:*`` from a verified attestation document), and answers
attested requests with ``CiphertextForRecipient``, a CMS EnvelopedData in the
shape AWS KMS sends. It is a development stand-in, so:

* Callers authenticate as in AWS: every request is SigV4-signed, and the signature is
  recomputed with botocore's own signer from the request as received, with the secret
  of the access key it names. Unknown keys are UnrecognizedClientException, wrong
  signatures and dates more than 5 minutes off InvalidSignatureException. The keys
  are issued on first start into ``credentials`` in the state directory (0600 in a
  0700 directory), an AWS shared-credentials file with one profile per principal
  (owner, enclave-host, admin; random AKIA key ids and 40-character secrets): point
  AWS_SHARED_CREDENTIALS_FILE at it and choose AWS_PROFILE. Profile ``<name>`` is
  ``arn:aws:iam::<account>:role/<name>``, unless it sets ``principal_arn``: the local cloud
  (enclave_local/cloud.py) issues the parties as the threat model wants them, the owner and
  its administrator in the owner's account, the parent host in an account of its own.
* Accounts as in AWS: a key belongs to the account of the principal that created it (its
  ARN, its default policy's root statement); a key id or alias name means one of the
  caller's own account, another account's key is named by its ARN, and then only the
  cross-account operations work (Decrypt, Encrypt, GenerateDataKey*, ReEncrypt*,
  DescribeKey, GetPublicKey, Sign, Verify, ...); the key policy cannot grant the others
  (PutKeyPolicy, ScheduleKeyDeletion, ...) to another account. Aliases and ListKeys are
  per account. The caller's own IAM policy, which AWS also requires for a cross-account
  call, is not modelled: there is no IAM here.
* CreateKey, ListKeys, ListAliases and GenerateRandom are IAM-only permissions
  in AWS; there is no IAM here, so any authenticated caller may make them. Everything done to
  a key is checked against that key's policy only.
* One server per state directory: state is read at start and written
  atomically (0600, directory 0700) after every change.
* Key management is complete enough for ``amazon.aws.kms_key`` to run the same
  tasks here as against AWS: descriptions, tags (also as ``aws:ResourceTag/*``,
  ``aws:RequestTag/*`` and ``aws:TagKeys`` condition keys), the rotation flag and
  period (recorded and reported; like deletion, rotation never comes due here, so
  the key material is never rotated), key policy names, and each operation
  refused in the key states where AWS refuses it.
* Grants are not implemented. ListGrants and ListRetirableGrants answer an empty
  list; CreateGrant, RetireGrant and RevokeGrant answer
  UnsupportedOperationException. A grant is a second way into a key that the key
  policy (and its lint, which checks the attestation conditions) never shows;
  here, everything that may use a key is written in its key policy.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal, overload

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ansible_collections.confidential_ml.nitro.nitro_api.recipient_cms import KEY_ENCRYPTION_ALGORITHM, build_envelope
from ansible_collections.confidential_ml.nitro.plugins.module_utils import attestation, policy_eval
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import (
    AttestationError,
    KmsApiError,
    PolicyError,
)

log = logging.getLogger(__name__)

STATE_FILE = "kms-state.json"
CREDENTIALS_FILE = "credentials"
PRINCIPALS = ("owner", "enclave-host", "admin")  # the key owner, the parent host, a key administrator
# The operations another account may call with a key its policy shares (the KMS Developer Guide's "Cross-account
# use: Yes"); a key policy's grant of any other action to another account has no effect.
_CROSS_ACCOUNT = frozenset(
    {"CreateGrant", "Decrypt", "DescribeKey", "Encrypt", "GenerateDataKey", "GenerateDataKeyPair",
     "GenerateDataKeyPairWithoutPlaintext", "GenerateDataKeyWithoutPlaintext", "GenerateMac", "GetKeyRotationStatus",
     "GetPublicKey", "ListGrants", "ReEncryptFrom", "ReEncryptTo", "RetireGrant", "RevokeGrant", "Sign", "Verify",
     "VerifyMac", "DeriveSharedSecret"}
)  # fmt: skip
SIGNATURE_SKEW = timedelta(minutes=5)  # how far X-Amz-Date may be from now, as in AWS
ATTESTATION_MAX_AGE_S = 300
MAX_REQUEST_BYTES = 1 << 20  # an attestation document is at most 256 KiB, 4/3 of that in base64
MAX_POLICY_BYTES = 32768  # AWS's key policy size limit
SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
# The one asymmetric kind made here: the owner's package-signing key (AWS's ECC_NIST_P384, SIGN_VERIFY).
ECC_P384, SIGN_VERIFY, ECDSA_SHA_384 = "ECC_NIST_P384", "SIGN_VERIFY", "ECDSA_SHA_384"
_BLOB_VERSION = 1
_BLOB_HEADER = 1 + 16  # version byte, key id (UUID bytes); then a 12-byte nonce and AES-256-GCM output
_ALIAS_NAME = re.compile(r"^alias/[a-zA-Z0-9/_-]{1,250}$")
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/\s,]+)/(?P<scope>[^\s,]+), ?"
    r"SignedHeaders=(?P<headers>[^\s,]+), ?Signature=(?P<signature>[0-9a-f]{64})$"
)
_MUST_SIGN = ("host", "x-amz-date", "x-amz-target")  # what a request means: its operation, its time, its target
MAX_TAGS = 50  # AWS's quota of tags per KMS key
ROTATION_PERIOD_DAYS = 365  # AWS's default for EnableKeyRotation
# Key states in which AWS refuses an operation on a key (the key-state table of the KMS Developer Guide);
# an operation named in neither set works in every state. Encrypt, Decrypt and GenerateDataKey have their
# own rule (_require_usable), EnableKey, DisableKey and the deletion operations theirs (_set_state).
_REFUSED_WHEN_DISABLED = frozenset({"EnableKeyRotation", "DisableKeyRotation"})
_REFUSED_PENDING_DELETION = _REFUSED_WHEN_DISABLED | {
    "CreateAlias",
    "TagResource",
    "UntagResource",
    "UpdateKeyDescription",
}
_NO_GRANTS = (
    "the local KMS does not implement grants (CreateGrant, RetireGrant, RevokeGrant): it authorises every use "
    "of a key through the key policy alone, so that the policy shows everyone who can use the key. Put the "
    "permission in the key policy instead (key_policy.merge_statements, by Sid), or use AWS KMS for grants"
)
_POLL_S = 0.05  # how soon stop() takes effect
_TLS_HANDSHAKE_S = 10


# ---------------------------------------------------------------- credentials


def issue_credentials(
    state_dir: str | os.PathLike, principals: Sequence[str] | Mapping[str, str | None] = PRINCIPALS
) -> Path:
    """state_dir/credentials, written once with a random access key and secret per principal; kept after.

    An AWS shared-credentials file (one [profile] per principal), 0600 in a 0700 directory. Created under a
    temporary name and linked into place, so two first starts cannot both write it. principals may map each
    profile to its principal ARN (written as principal_arn); a file from before that lacks one gets it added."""
    state_dir = Path(state_dir)
    path = state_dir / CREDENTIALS_FILE
    arns = {name: arn for name, arn in principals.items() if arn} if isinstance(principals, Mapping) else {}
    if path.exists():
        _add_principal_arns(path, arns)
        return path
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    lines = [
        "# Credentials of the local KMS's principals, issued by `enclave local up`; use one profile:",
        f"#   AWS_SHARED_CREDENTIALS_FILE={path.absolute()} AWS_PROFILE=owner",
    ]
    for name in principals:
        key_id = "AKIA" + base64.b32encode(os.urandom(10)).decode()  # 20 characters, like AWS's
        secret = base64.b64encode(os.urandom(30)).decode()  # 40 characters, like AWS's
        lines += [f"[{name}]", f"aws_access_key_id = {key_id}", f"aws_secret_access_key = {secret}"]
        lines += [f"principal_arn = {arns[name]}", ""] if name in arns else [""]
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".credentials.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines))
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another first start won: its credentials stand
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _add_principal_arns(path: Path, arns: Mapping[str, str]) -> None:
    """Name the principal of each profile in arns that the file does not name yet (a file issued before profiles
    had their own accounts), rewriting it atomically; keys and secrets stay."""
    text = path.read_text()
    profiles = load_credentials(path)
    missing = {name: arn for name, arn in arns.items() if name in profiles and "principal_arn" not in profiles[name]}
    if not missing:
        return
    lines = []
    for line in text.splitlines():
        lines.append(line)
        section = line.strip()[1:-1] if line.strip().startswith("[") and line.strip().endswith("]") else None
        if section in missing:
            lines.append(f"principal_arn = {missing[section]}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".credentials.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_credentials(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """{profile: {profile, aws_access_key_id, aws_secret_access_key[, principal_arn]}} of a credentials file."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, configparser.Error) as err:
        raise ValueError(
            f"cannot read the local KMS credentials {path} ({err}): delete it to issue new ones on the next start"
        ) from err
    profiles = {}
    for name in parser.sections():
        entry = {"profile": name, **parser[name]}
        if not entry.get("aws_access_key_id") or not entry.get("aws_secret_access_key"):
            raise ValueError(f"profile [{name}] of {path} lacks aws_access_key_id or aws_secret_access_key")
        profiles[name] = entry
    return profiles


# ---------------------------------------------------------------- helpers


def _read_json(path: Path, default: dict) -> dict:
    if not path.exists():
        return default
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): restore it from a backup, or move it away") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object: restore it from a backup, or move it away")
    return data


def _account_of(principal: str) -> str:
    parts = principal.split(":")
    return parts[4] if len(parts) > 5 and parts[0] == "arn" else ""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _canonical_context(context: Mapping[str, str]) -> bytes:
    return json.dumps(dict(sorted(context.items())), separators=(",", ":"), ensure_ascii=False).encode()


def _default_policy(account_id: str) -> str:
    """AWS's default key policy: the account (its IAM principals) may do anything with the key."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [
                {
                    "Sid": "Enable IAM User Permissions",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        },
        indent=2,
    )


class _Request:
    """Typed access to a request's parameters; wrong types and ranges are ValidationException, as in AWS."""

    def __init__(self, data: dict):
        self.data = data

    def typed(self, name: str, kind: type, required: bool):
        value = self.data.get(name)
        if value is None:
            if required:
                raise KmsApiError("ValidationException", f"1 validation error detected: {name} must not be null")
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise KmsApiError("ValidationException", f"{name} must be a {kind.__name__}")
        return value

    # A required parameter is never None: the overloads say so to the type checker.
    @overload
    def text(self, name: str, *, required: Literal[True], max_len: int = ..., min_len: int = ...) -> str: ...

    @overload
    def text(self, name: str, *, required: bool = ..., max_len: int = ..., min_len: int = ...) -> str | None: ...

    def text(self, name: str, *, required: bool = False, max_len: int = 2048, min_len: int = 1) -> str | None:
        value = self.typed(name, str, required)
        if value is not None and not min_len <= len(value) <= max_len:
            raise KmsApiError("ValidationException", f"{name} must be {min_len} to {max_len} characters long")
        return value

    def flag(self, name: str) -> bool:
        return bool(self.typed(name, bool, False))

    @overload
    def number(self, name: str, *, low: int, high: int, required: Literal[True]) -> int: ...

    @overload
    def number(self, name: str, *, low: int, high: int, required: bool = ...) -> int | None: ...

    def number(self, name: str, *, low: int, high: int, required: bool = False) -> int | None:
        value = self.typed(name, int, required)
        if value is not None and not low <= value <= high:
            raise KmsApiError("ValidationException", f"{name} must be between {low} and {high}, not {value}")
        return value

    @overload
    def blob(self, name: str, *, required: Literal[True], max_len: int = ...) -> bytes: ...

    @overload
    def blob(self, name: str, *, required: bool = ..., max_len: int = ...) -> bytes | None: ...

    def blob(self, name: str, *, required: bool = False, max_len: int = 6144) -> bytes | None:
        value = self.typed(name, str, required)
        if value is None:
            return None
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error as err:
            raise KmsApiError("ValidationException", f"{name} is not valid base64: {err}") from err
        if not 1 <= len(raw) <= max_len:
            raise KmsApiError("ValidationException", f"{name} must be 1 to {max_len} bytes long")
        return raw

    def tags(self, *, required: bool = False) -> list[dict[str, str]]:
        """Tags as AWS takes them: [{TagKey: 1-128 characters, TagValue: 0-256}], no aws: prefix, no key twice."""
        tags = self.typed("Tags", list, required) or []
        seen = set()
        for tag in tags:
            if not (
                isinstance(tag, dict)
                and isinstance(tag.get("TagKey"), str)
                and isinstance(tag.get("TagValue"), str)
                and 1 <= len(tag["TagKey"]) <= 128
                and len(tag["TagValue"]) <= 256
            ):
                raise KmsApiError(
                    "TagException",
                    f"{tag!r} is not a tag: each needs a TagKey of 1 to 128 characters and a TagValue of at most 256",
                )
            if tag["TagKey"].lower().startswith("aws:"):
                raise KmsApiError(
                    "TagException", f"the tag key {tag['TagKey']!r} uses the aws: prefix, reserved for AWS"
                )
            if tag["TagKey"] in seen:
                raise KmsApiError("TagException", f"the tag key {tag['TagKey']!r} appears twice: give each key once")
            seen.add(tag["TagKey"])
        return [{"TagKey": t["TagKey"], "TagValue": t["TagValue"]} for t in tags]

    def context(self) -> dict[str, str]:
        value = self.typed("EncryptionContext", dict, False) or {}
        if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()):
            raise KmsApiError("ValidationException", "EncryptionContext must map non-empty strings to strings")
        return value


# ---------------------------------------------------------------- the service


class LocalKms:
    """The KMS service logic, without HTTP: keys, aliases, policies, Recipient answers."""

    def __init__(
        self,
        state_dir: str | os.PathLike,
        *,
        trusted_roots: Sequence[x509.Certificate] = (),
        account_id: str = "111122223333",
        region: str = "us-east-1",
        principals: Sequence[str] | Mapping[str, str | None] = PRINCIPALS,
    ):
        self.state_dir = Path(state_dir)
        self.trusted_roots = list(trusted_roots)
        self.account_id = account_id
        self.region = region
        self._lock = threading.RLock()
        self._audit: dict[str, str] = {}
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        state_path = self.state_dir / STATE_FILE
        self._state = _read_json(state_path, {"keys": {}, "aliases": {}})
        # Aliases are kept by alias ARN (per account); a state from before named them in account_id only.
        self._state["aliases"] = {
            name if name.startswith("arn:") else self._arn("alias", name[len("alias/") :], account_id): entry
            for name, entry in self._state["aliases"].items()
        }
        self._caller_account = account_id  # the account of the principal whose request is being handled
        self.credentials_file = issue_credentials(self.state_dir, principals)
        self._keys = {entry["aws_access_key_id"]: entry for entry in load_credentials(self.credentials_file).values()}

    # ------------------------------------------------------------ identity and state

    def credentials(self, profile: str) -> dict[str, str]:
        """boto3 client arguments (aws_access_key_id, aws_secret_access_key) of one issued profile."""
        entry = load_credentials(self.credentials_file).get(profile)
        if entry is None:
            raise KeyError(f"{self.credentials_file} has no profile {profile!r}")
        return {name: entry[name] for name in ("aws_access_key_id", "aws_secret_access_key")}

    def authenticate(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> str:
        """The principal ARN of a correctly SigV4-signed request; KmsApiError with AWS's code otherwise."""
        authorization = headers.get("Authorization")
        if not authorization:
            raise KmsApiError(
                "MissingAuthenticationTokenException",
                "Request is missing Authentication Token: sign it with local credentials "
                f"(AWS_SHARED_CREDENTIALS_FILE={self.credentials_file}, AWS_PROFILE=<principal>)",
            )
        match = _AUTHORIZATION.match(authorization)
        if match is None:
            raise KmsApiError(
                "IncompleteSignatureException",
                "the Authorization header is not AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...",
            )
        entry = self._keys.get(match["key"])
        if entry is None or headers.get("X-Amz-Security-Token"):
            raise KmsApiError(
                "UnrecognizedClientException",
                "The security token included in the request is invalid: the access key id is not one this local "
                f"KMS issued; use a profile of {self.credentials_file}",
            )
        stamp = headers.get("X-Amz-Date") or ""
        try:
            when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            raise KmsApiError(
                "IncompleteSignatureException", "the request has no X-Amz-Date of the form YYYYMMDDTHHMMSSZ"
            ) from None
        signed = match["headers"].split(";")
        scope = f"{stamp[:8]}/{self.region}/kms/aws4_request"
        if match["scope"] != scope or not all(name in signed for name in _MUST_SIGN):
            raise KmsApiError(
                "InvalidSignatureException",
                f"Credential should be scoped to {scope} and sign {', '.join(_MUST_SIGN)}: "
                f"got {match['scope']} signing {match['headers']}",
            )
        now = datetime.now(UTC)
        if abs(now - when) > SIGNATURE_SKEW:  # AWS's own wording; the fix is the clock (NTP)
            bound, sign = (now - SIGNATURE_SKEW, "-") if when < now else (now + SIGNATURE_SKEW, "+")
            raise KmsApiError(
                "InvalidSignatureException",
                f"Signature {'expired' if sign == '-' else 'not yet current'}: {stamp} is "
                f"{'now earlier' if sign == '-' else 'still later'} than {bound:%Y%m%dT%H%M%SZ} "
                f"({now:%Y%m%dT%H%M%SZ} {sign} 5 min.)",
            )
        # botocore's signer recomputes the signature over the request as received: the signed headers only.
        request = AWSRequest(
            method=method,
            url=f"http://{headers.get('Host', '')}{path}",
            headers={name: headers[name] for name in signed if headers.get(name) is not None},
            data=body,
        )
        request.context["timestamp"] = stamp
        signer = SigV4Auth(Credentials(entry["aws_access_key_id"], entry["aws_secret_access_key"]), "kms", self.region)
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if signer.signed_headers(signer.headers_to_sign(request)) != match["headers"] or not hmac.compare_digest(
            expected, match["signature"]
        ):
            raise KmsApiError(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. Check your AWS "
                "Secret Access Key and signing method.",
            )
        return entry.get("principal_arn") or f"arn:aws:iam::{self.account_id}:role/{entry['profile']}"

    def _save(self) -> None:
        # Write a private temporary file beside the state and rename it over: readers never see half a file.
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".kms-state.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(self._state, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.state_dir / STATE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _arn(self, kind: str, name: str, account: str | None = None) -> str:
        """The ARN of a key or alias in account (default: the caller's)."""
        return f"arn:aws:kms:{self.region}:{account or self._caller_account}:{kind}/{name}"

    @staticmethod
    def _key_account(key: dict) -> str:
        return key["Arn"].split(":")[4]

    def _resolve(self, key_ref: str) -> dict:
        """The key a KeyId names: key id or alias name (of the caller's account), key ARN or alias ARN."""
        if key_ref.startswith("arn:"):
            parts = key_ref.split(":", 5)
            if len(parts) < 6 or parts[2] != "kms" or parts[3] != self.region:
                raise KmsApiError("NotFoundException", f"{key_ref} is not in this KMS (region {self.region})")
            account, ref = parts[4], parts[5]
        else:
            account, ref = self._caller_account, key_ref
        if ref.startswith("alias/"):
            alias = self._state["aliases"].get(self._arn("alias", ref[len("alias/") :], account))
            if alias is None:
                raise KmsApiError("NotFoundException", f"Alias {self._arn('alias', ref[6:], account)} is not found.")
            ref = alias["TargetKeyId"]
        key = self._state["keys"].get(ref.removeprefix("key/"))
        if key is None or self._key_account(key) != account:  # a bare key id names a key of the caller's account
            name = self._arn("key", ref.removeprefix("key/"), account)
            raise KmsApiError("NotFoundException", f"Key '{name}' does not exist")
        return key

    # ------------------------------------------------------------ authorisation

    def _authorize(self, key: dict, action: str, principal: str, context: Mapping | None = None) -> None:
        if _account_of(principal) != self._key_account(key) and action not in _CROSS_ACCOUNT:
            self._audit.update(key=key["KeyId"], decision="deny (not a cross-account operation)")
            raise KmsApiError(
                "AccessDeniedException",
                f"User: {principal} is not authorized to perform: kms:{action} on resource: {key['Arn']}: "
                f"kms:{action} is not a cross-account operation, so only principals of account "
                f"{self._key_account(key)} may call it, whatever the key policy says",
            )
        full_context = {
            "kms:CallerAccount": _account_of(principal),
            **{f"aws:ResourceTag/{tag['TagKey']}": tag["TagValue"] for tag in key.get("Tags", ())},
            **(context or {}),
        }
        try:
            decision = policy_eval.evaluate(
                key["Policy"], action=f"kms:{action}", principal=principal, context=full_context, resource=key["Arn"]
            )
        except PolicyError as err:
            raise KmsApiError(
                "KMSInternalException", f"the stored policy of {key['Arn']} is unusable: {err}", 500
            ) from err
        self._audit.update(key=key["KeyId"], decision=f"{'allow' if decision.allowed else 'deny'} ({decision.reason})")
        if not decision.allowed:
            why = (
                "with an explicit deny in a resource-based policy"
                if decision.effect == "ExplicitDeny"
                else f"because no resource-based policy allows the kms:{action} action"
            )
            raise KmsApiError(
                "AccessDeniedException",
                f"User: {principal} is not authorized to perform: kms:{action} on resource: {key['Arn']} {why} "
                f"({decision.reason})",
            )

    def _key(self, request: _Request, principal: str, action: str, context: Mapping | None = None) -> dict:
        """The key that KeyId names, once the key policy allows principal the action in the key's state."""
        key = self._resolve(request.text("KeyId", required=True))
        self._authorize(key, action, principal, context)
        self._check_state(key, action)
        return key

    @staticmethod
    def _check_state(key: dict, action: str) -> None:
        if key["KeyState"] == "Disabled" and action in _REFUSED_WHEN_DISABLED:
            raise KmsApiError("DisabledException", f"{key['Arn']} is disabled: enable it (EnableKey) first.")
        if key["KeyState"] == "PendingDeletion" and action in _REFUSED_PENDING_DELETION:
            raise KmsApiError(
                "KMSInvalidStateException",
                f"{key['Arn']} is pending deletion: cancel the deletion (CancelKeyDeletion) first.",
            )

    @staticmethod
    def _require_usable(key: dict) -> None:
        if key["KeyState"] == "Disabled":
            raise KmsApiError("DisabledException", f"{key['Arn']} is disabled.")
        if key["KeyState"] != "Enabled":
            raise KmsApiError("KMSInvalidStateException", f"{key['Arn']} is {key['KeyState']}.")

    def _recipient(self, request: _Request) -> tuple[bytes, dict[str, str]] | None:
        """(public key DER, policy condition keys) of a verified Recipient, or None without one."""
        recipient = request.typed("Recipient", dict, False)
        if recipient is None:
            return None
        algorithm = recipient.get("KeyEncryptionAlgorithm")
        if algorithm != KEY_ENCRYPTION_ALGORITHM:
            raise KmsApiError(
                "ValidationException",
                f"Recipient.KeyEncryptionAlgorithm must be {KEY_ENCRYPTION_ALGORITHM}, not {algorithm!r}",
            )
        document = _Request(recipient).blob("AttestationDocument", required=True, max_len=262144)
        if not self.trusted_roots:
            raise KmsApiError(
                "ValidationException",
                "this local KMS trusts no attestation root: restart it with the NSM's root CA (--trust-root)",
            )
        # Debug documents (all-zero PCRs) are valid here as in AWS KMS: refusing them is the key policy's job.
        # AWS does not document its answer to a bad document; a ValidationException names the problem.
        try:
            doc = attestation.verify_document(
                document, trusted_roots=self.trusted_roots, allow_debug=True, max_age_s=ATTESTATION_MAX_AGE_S
            )
        except AttestationError as err:
            raise KmsApiError("ValidationException", f"The attestation document is not valid: {err}") from err
        if not doc.public_key:
            raise KmsApiError(
                "ValidationException",
                "The attestation document carries no public_key: attest with the recipient's RSA public key",
            )
        try:
            public_key = serialization.load_der_public_key(doc.public_key)
        except ValueError as err:
            raise KmsApiError(
                "ValidationException", f"The attestation document's public_key is unreadable: {err}"
            ) from err
        if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < 2048:
            raise KmsApiError(
                "ValidationException",
                "The attestation document's public_key must be an RSA key of at least 2048 bits for RSAES_OAEP_SHA_256",
            )
        context = {f"kms:RecipientAttestation:PCR{index}": value.hex() for index, value in doc.pcrs.items()}
        if 0 in doc.pcrs:
            context["kms:RecipientAttestation:ImageSha384"] = doc.pcrs[0].hex()
        self._audit["pcr0"] = context.get("kms:RecipientAttestation:ImageSha384", "-")
        return doc.public_key, context

    @staticmethod
    def _context_keys(context: Mapping[str, str]) -> dict:
        keys: dict[str, str | list[str]] = {f"kms:EncryptionContext:{k}": v for k, v in context.items()}
        if context:
            keys["kms:EncryptionContextKeys"] = sorted(context)
        return keys

    def _validate_policy(self, text: str, principal: str, bypass: bool) -> None:
        """MalformedPolicyDocumentException for a policy policy_eval cannot read, or one that would lock out
        its author: like AWS, the caller must still be allowed kms:PutKeyPolicy under the new policy,
        unless BypassPolicyLockoutSafetyCheck is set."""
        if len(text.encode()) > MAX_POLICY_BYTES:
            raise KmsApiError(
                "MalformedPolicyDocumentException",
                f"The key policy is larger than {MAX_POLICY_BYTES} bytes: shorten it",
            )
        try:
            # evaluate() parses the whole policy before deciding, so it also rejects any malformed statement.
            decision = policy_eval.evaluate(
                text,
                action="kms:PutKeyPolicy",
                principal=principal,
                context={"kms:CallerAccount": _account_of(principal)},
            )
        except PolicyError as err:
            raise KmsApiError("MalformedPolicyDocumentException", f"The key policy is malformed: {err}") from err
        if not decision.allowed and not bypass:
            raise KmsApiError(
                "MalformedPolicyDocumentException",
                "The new key policy will not allow you to update the key policy in the future: "  # noqa: S608
                f"{principal} would not be allowed kms:PutKeyPolicy; make it a key administrator, or set "
                "BypassPolicyLockoutSafetyCheck if that is really meant",
            )

    # ------------------------------------------------------------ dispatch

    def handle(self, operation: str, request: dict, *, principal: str) -> dict:
        """Run one KMS operation for principal; raises KmsApiError with AWS's error code."""
        method = getattr(self, f"_op_{operation}", None) if operation.isalnum() else None
        with self._lock:
            self._audit = {"key": "-", "decision": "-", "pcr0": "-"}
            self._caller_account = _account_of(principal) or self.account_id
            try:
                if method is None:
                    raise KmsApiError("UnsupportedOperationException", f"the local KMS does not implement {operation}")
                if not isinstance(request, dict):
                    raise KmsApiError("SerializationException", "the request body must be a JSON object")
                response = method(_Request(request), principal)
            except KmsApiError as err:
                self._log(operation, principal, err.code)
                raise
            self._log(operation, principal, "ok")
            return response

    def _log(self, operation: str, principal: str, outcome: str) -> None:
        audit = self._audit
        log.info(
            "%s by %s on key %s (PCR0 %s): %s -> %s",
            operation,
            principal,
            audit["key"],
            audit["pcr0"],
            audit["decision"],
            outcome,
        )

    # ------------------------------------------------------------ keys

    def _metadata(self, key: dict) -> dict:
        metadata = {
            "AWSAccountId": self._key_account(key),
            "KeyId": key["KeyId"],
            "Arn": key["Arn"],
            "CreationDate": key["CreationDate"],
            "Enabled": key["KeyState"] == "Enabled",
            "Description": key["Description"],
            "KeyUsage": key.get("KeyUsage", "ENCRYPT_DECRYPT"),
            "KeyState": key["KeyState"],
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": key.get("KeySpec", SYMMETRIC_DEFAULT),
            "KeySpec": key.get("KeySpec", SYMMETRIC_DEFAULT),
            **self._algorithms(key),
            "MultiRegion": False,
        }
        if key.get("DeletionDate"):
            metadata["DeletionDate"] = key["DeletionDate"]
        return metadata

    @staticmethod
    def _algorithms(key: dict) -> dict:
        if key.get("KeyUsage") == SIGN_VERIFY:
            return {"SigningAlgorithms": [ECDSA_SHA_384]}
        return {"EncryptionAlgorithms": [SYMMETRIC_DEFAULT]}

    @staticmethod
    def _key_kind(request: _Request) -> tuple[str, str]:
        """(KeySpec, KeyUsage) of a CreateKey: SYMMETRIC_DEFAULT/ENCRYPT_DECRYPT or ECC_NIST_P384/SIGN_VERIFY."""
        spec, legacy = request.text("KeySpec"), request.text("CustomerMasterKeySpec")
        if spec is not None and legacy is not None:
            raise KmsApiError("ValidationException", "give KeySpec or its deprecated CustomerMasterKeySpec, not both")
        spec = spec or legacy or SYMMETRIC_DEFAULT
        if spec not in (SYMMETRIC_DEFAULT, ECC_P384):
            raise KmsApiError(
                "UnsupportedOperationException",
                f"the local KMS makes only {SYMMETRIC_DEFAULT} and {ECC_P384} keys, not {spec}",
            )
        usage = request.text("KeyUsage") or ("ENCRYPT_DECRYPT" if spec == SYMMETRIC_DEFAULT else None)
        allowed = "ENCRYPT_DECRYPT" if spec == SYMMETRIC_DEFAULT else SIGN_VERIFY
        if usage != allowed:
            # AWS: an ECC key needs KeyUsage named (SIGN_VERIFY or KEY_AGREEMENT); symmetric ones encrypt only.
            raise KmsApiError("ValidationException", f"KeyUsage {usage} is not valid for KeySpec {spec}: use {allowed}")
        if request.text("Origin") not in (None, "AWS_KMS"):
            raise KmsApiError("UnsupportedOperationException", "the local KMS makes only Origin AWS_KMS keys")
        return spec, usage

    def _op_CreateKey(self, request: _Request, principal: str) -> dict:
        spec, usage = self._key_kind(request)
        if request.data.get("CustomKeyStoreId") or request.data.get("MultiRegion"):
            raise KmsApiError("UnsupportedOperationException", "the local KMS has no custom key stores or replicas")
        policy = request.text("Policy", max_len=131072)
        if policy is None:
            policy = _default_policy(self._caller_account)
        else:
            self._validate_policy(policy, principal, request.flag("BypassPolicyLockoutSafetyCheck"))
        tags = request.tags()
        if len(tags) > MAX_TAGS:
            raise KmsApiError("LimitExceededException", f"a key may have at most {MAX_TAGS} tags, not {len(tags)}")
        description = request.text("Description", max_len=8192, min_len=0) or ""
        key_id = str(uuid.uuid4())
        key = {
            "KeyId": key_id,
            "Arn": self._arn("key", key_id),
            "CreationDate": time.time(),
            "Description": description,
            "KeyState": "Enabled",
            "Policy": policy,
            "Tags": tags,
            "Material": _b64(AESGCM.generate_key(bit_length=256)),
        }
        if spec == ECC_P384:
            private = ec.generate_private_key(ec.SECP384R1())
            der = private.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            key.update(KeySpec=spec, KeyUsage=usage, Material=_b64(der))
        self._state["keys"][key_id] = key
        self._save()
        self._audit.update(key=key_id, decision="creator")
        return {"KeyMetadata": self._metadata(key)}

    def _op_DescribeKey(self, request: _Request, principal: str) -> dict:
        key = self._resolve(request.text("KeyId", required=True))
        self._authorize(key, "DescribeKey", principal)
        return {"KeyMetadata": self._metadata(key)}

    def _op_ListKeys(self, request: _Request, principal: str) -> dict:
        keys = [
            {"KeyId": k["KeyId"], "KeyArn": k["Arn"]}
            for k in self._state["keys"].values()
            if self._key_account(k) == self._caller_account
        ]
        return self._page(request, sorted(keys, key=lambda k: k["KeyId"]), "Keys", default_limit=100)

    def _op_UpdateKeyDescription(self, request: _Request, principal: str) -> dict:
        description = request.text("Description", required=True, max_len=8192, min_len=0)
        self._key(request, principal, "UpdateKeyDescription")["Description"] = description
        self._save()
        return {}

    def _set_state(self, request: _Request, principal: str, action: str, new_state: str, **extra) -> dict:
        key = self._resolve(request.text("KeyId", required=True))
        self._authorize(key, action, principal)
        if key["KeyState"] == "PendingDeletion" and action != "CancelKeyDeletion":
            raise KmsApiError("KMSInvalidStateException", f"{key['Arn']} is pending deletion.")
        key.update(KeyState=new_state, **extra)
        self._save()
        return key

    def _op_EnableKey(self, request: _Request, principal: str) -> dict:
        self._set_state(request, principal, "EnableKey", "Enabled")
        return {}

    def _op_DisableKey(self, request: _Request, principal: str) -> dict:
        self._set_state(request, principal, "DisableKey", "Disabled")
        return {}

    def _op_ScheduleKeyDeletion(self, request: _Request, principal: str) -> dict:
        # Nothing is ever deleted here (the clock of a test does not run for days); the key only stops working.
        days = request.number("PendingWindowInDays", low=7, high=30) or 30
        key = self._set_state(
            request, principal, "ScheduleKeyDeletion", "PendingDeletion", DeletionDate=time.time() + days * 86400
        )
        return {
            "KeyId": key["Arn"],
            "DeletionDate": key["DeletionDate"],
            "KeyState": "PendingDeletion",
            "PendingWindowInDays": days,
        }

    def _op_CancelKeyDeletion(self, request: _Request, principal: str) -> dict:
        key = self._resolve(request.text("KeyId", required=True))
        if key["KeyState"] != "PendingDeletion":
            raise KmsApiError("KMSInvalidStateException", f"{key['Arn']} is not pending deletion.")
        key = self._set_state(request, principal, "CancelKeyDeletion", "Disabled", DeletionDate=None)
        return {"KeyId": key["Arn"]}

    # ------------------------------------------------------------ policies

    def _op_GetKeyPolicy(self, request: _Request, principal: str) -> dict:
        key = self._resolve(request.text("KeyId", required=True))
        self._authorize(key, "GetKeyPolicy", principal)
        name = request.text("PolicyName") or "default"
        if name != "default":
            raise KmsApiError("NotFoundException", f"Key policy {name!r} does not exist: the only name is 'default'")
        return {"Policy": key["Policy"], "PolicyName": "default"}

    def _op_PutKeyPolicy(self, request: _Request, principal: str) -> dict:
        key = self._resolve(request.text("KeyId", required=True))
        self._authorize(key, "PutKeyPolicy", principal)
        if (request.text("PolicyName") or "default") != "default":
            raise KmsApiError("NotFoundException", "PolicyName must be 'default', the only key policy name")
        policy = request.text("Policy", required=True, max_len=131072)
        self._validate_policy(policy, principal, request.flag("BypassPolicyLockoutSafetyCheck"))
        key["Policy"] = policy
        self._save()
        return {}

    def _op_ListKeyPolicies(self, request: _Request, principal: str) -> dict:
        self._key(request, principal, "ListKeyPolicies")
        return self._page(request, ["default"], "PolicyNames", default_limit=100)

    # ------------------------------------------------------------ tags

    def _op_ListResourceTags(self, request: _Request, principal: str) -> dict:
        key = self._key(request, principal, "ListResourceTags")
        return self._page(request, key["Tags"], "Tags", default_limit=50)

    def _op_TagResource(self, request: _Request, principal: str) -> dict:
        tags = request.tags(required=True)
        context = {f"aws:RequestTag/{t['TagKey']}": t["TagValue"] for t in tags}
        key = self._key(request, principal, "TagResource", {**context, "aws:TagKeys": [t["TagKey"] for t in tags]})
        merged = {t["TagKey"]: t["TagValue"] for t in key["Tags"]} | {t["TagKey"]: t["TagValue"] for t in tags}
        if len(merged) > MAX_TAGS:
            raise KmsApiError(
                "LimitExceededException",
                f"{key['Arn']} would have {len(merged)} tags, more than the {MAX_TAGS} allowed: remove some first",
            )
        key["Tags"] = [{"TagKey": k, "TagValue": v} for k, v in merged.items()]
        self._save()
        return {}

    def _op_UntagResource(self, request: _Request, principal: str) -> dict:
        names = request.typed("TagKeys", list, True)
        if not all(isinstance(name, str) and 1 <= len(name) <= 128 for name in names):
            raise KmsApiError("TagException", "TagKeys must list tag keys of 1 to 128 characters")
        key = self._key(request, principal, "UntagResource", {"aws:TagKeys": names})
        key["Tags"] = [t for t in key["Tags"] if t["TagKey"] not in names]  # absent keys are no error, as in AWS
        self._save()
        return {}

    # ------------------------------------------------------------ rotation

    @staticmethod
    def _symmetric_for_rotation(key: dict) -> None:
        if key.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":  # AWS rotates symmetric keys only
            raise KmsApiError(
                "UnsupportedOperationException", f"{key['Arn']} is an asymmetric KMS key: it has no automatic rotation"
            )

    def _op_GetKeyRotationStatus(self, request: _Request, principal: str) -> dict:
        key = self._key(request, principal, "GetKeyRotationStatus")
        self._symmetric_for_rotation(key)
        # While a key is pending deletion AWS reports rotation off; cancelling the deletion brings it back.
        period = key.get("RotationPeriodInDays") if key["KeyState"] != "PendingDeletion" else None
        status = {"KeyId": key["Arn"], "KeyRotationEnabled": period is not None}
        if period is not None:
            status.update(RotationPeriodInDays=period, NextRotationDate=key["RotationEnabledDate"] + period * 86400)
        return status

    def _op_EnableKeyRotation(self, request: _Request, principal: str) -> dict:
        period = request.number("RotationPeriodInDays", low=90, high=2560) or ROTATION_PERIOD_DAYS
        key = self._key(request, principal, "EnableKeyRotation", {"kms:RotationPeriodInDays": str(period)})
        self._symmetric_for_rotation(key)
        if key.get("RotationPeriodInDays") is None:
            key["RotationEnabledDate"] = time.time()
        key["RotationPeriodInDays"] = period
        self._save()
        return {}

    def _op_DisableKeyRotation(self, request: _Request, principal: str) -> dict:
        key = self._key(request, principal, "DisableKeyRotation")
        self._symmetric_for_rotation(key)
        key.update(RotationPeriodInDays=None, RotationEnabledDate=None)
        self._save()
        return {}

    # ------------------------------------------------------------ grants (none: see the module docstring)

    def _op_ListGrants(self, request: _Request, principal: str) -> dict:
        for name, max_len in (("GrantId", 128), ("GranteePrincipal", 256), ("GranteeServicePrincipal", 128)):
            request.text(name, max_len=max_len)
        self._key(request, principal, "ListGrants")
        return self._page(request, [], "Grants", default_limit=50)

    def _op_ListRetirableGrants(self, request: _Request, principal: str) -> dict:
        # An IAM-only permission in AWS, about no key in particular: anyone may ask, as for ListKeys.
        request.text("RetiringPrincipal", max_len=256)
        return self._page(request, [], "Grants", default_limit=50)

    def _op_CreateGrant(self, request: _Request, principal: str) -> dict:
        raise KmsApiError("UnsupportedOperationException", _NO_GRANTS)

    _op_RetireGrant = _op_RevokeGrant = _op_CreateGrant

    # ------------------------------------------------------------ aliases

    def _alias_name(self, request: _Request, name: str = "AliasName") -> str:
        alias = request.text(name, required=True, max_len=256)
        if not _ALIAS_NAME.match(alias):
            raise KmsApiError(
                "InvalidAliasNameException", f"{alias!r} is not an alias name: use alias/ followed by [a-zA-Z0-9/_-]"
            )
        if alias.startswith("alias/aws/"):
            raise KmsApiError("NotAuthorizedException", f"{alias}: the alias/aws/ prefix is reserved for AWS")
        return alias

    def _target_key(self, request: _Request) -> dict:
        target = request.text("TargetKeyId", required=True)
        if "alias/" in target:
            raise KmsApiError("ValidationException", "TargetKeyId must be a key id or key ARN, not an alias")
        key = self._resolve(target)
        if self._key_account(key) != self._caller_account:
            raise KmsApiError("NotFoundException", f"{target}: an alias can name a key of its own account only")
        return key

    def _op_CreateAlias(self, request: _Request, principal: str) -> dict:
        alias = self._alias_name(request)
        key = self._target_key(request)
        self._authorize(key, "CreateAlias", principal)
        self._check_state(key, "CreateAlias")
        if self._arn("alias", alias[6:]) in self._state["aliases"]:
            raise KmsApiError(
                "AlreadyExistsException",
                f"An alias with the name {self._arn('alias', alias[6:])} already exists: use UpdateAlias instead",
            )
        now = time.time()
        entry = {"TargetKeyId": key["KeyId"], "CreationDate": now, "LastUpdatedDate": now}
        self._state["aliases"][self._arn("alias", alias[6:])] = entry
        self._save()
        return {}

    def _existing_alias(self, request: _Request) -> tuple[str, dict]:
        alias = self._arn("alias", self._alias_name(request)[6:])
        if alias not in self._state["aliases"]:
            raise KmsApiError("NotFoundException", f"Alias {alias} is not found.")
        return alias, self._state["aliases"][alias]

    def _op_UpdateAlias(self, request: _Request, principal: str) -> dict:
        alias, entry = self._existing_alias(request)
        new_key = self._target_key(request)
        self._authorize(self._state["keys"][entry["TargetKeyId"]], "UpdateAlias", principal)
        self._authorize(new_key, "UpdateAlias", principal)
        entry.update(TargetKeyId=new_key["KeyId"], LastUpdatedDate=time.time())
        self._save()
        return {}

    def _op_DeleteAlias(self, request: _Request, principal: str) -> dict:
        alias, entry = self._existing_alias(request)
        self._authorize(self._state["keys"][entry["TargetKeyId"]], "DeleteAlias", principal)
        del self._state["aliases"][alias]
        self._save()
        return {}

    def _op_ListAliases(self, request: _Request, principal: str) -> dict:
        key_ref = request.text("KeyId")
        key_id = self._resolve(key_ref)["KeyId"] if key_ref else None
        ours = self._arn("alias", "")
        entries = [
            {"AliasName": "alias/" + arn[len(ours) :], "AliasArn": arn, **entry}
            for arn, entry in sorted(self._state["aliases"].items())
            if arn.startswith(ours) and (key_id is None or entry["TargetKeyId"] == key_id)
        ]
        return self._page(request, entries, "Aliases", default_limit=50)

    @staticmethod
    def _page(request: _Request, items: list, field: str, *, default_limit: int) -> dict:
        limit = request.number("Limit", low=1, high=1000) or default_limit
        marker = request.text("Marker", max_len=1024)
        try:
            start = int(marker) if marker else 0
        except ValueError:
            raise KmsApiError("InvalidMarkerException", f"Marker {marker!r} did not come from this KMS") from None
        page = items[start : start + limit]
        response = {field: page, "Truncated": start + limit < len(items)}
        if response["Truncated"]:
            response["NextMarker"] = str(start + limit)
        return response

    # ------------------------------------------------------------ cryptography

    def _seal(self, key: dict, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        """Our ciphertext blob: version, key id, nonce, AES-256-GCM(plaintext) with header and context as AAD."""
        if key.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
            raise KmsApiError(
                "InvalidKeyUsageException", f"{key['Arn']} has KeyUsage {key['KeyUsage']}: it cannot encrypt"
            )
        header = bytes((_BLOB_VERSION,)) + uuid.UUID(key["KeyId"]).bytes
        nonce = os.urandom(12)
        material = base64.b64decode(key["Material"])
        return header + nonce + AESGCM(material).encrypt(nonce, plaintext, header + _canonical_context(context))

    def _blob_key(self, blob: bytes) -> dict:
        if len(blob) < _BLOB_HEADER + 12 + 16 or blob[0] != _BLOB_VERSION:
            raise KmsApiError("InvalidCiphertextException", "the ciphertext blob was not made by this KMS")
        key = self._state["keys"].get(str(uuid.UUID(bytes=blob[1:_BLOB_HEADER])))
        if key is None:
            raise KmsApiError("InvalidCiphertextException", "the ciphertext blob names a key this KMS does not have")
        return key

    @staticmethod
    def _open(key: dict, blob: bytes, context: Mapping[str, str]) -> bytes:
        header, nonce, sealed = blob[:_BLOB_HEADER], blob[_BLOB_HEADER : _BLOB_HEADER + 12], blob[_BLOB_HEADER + 12 :]
        try:
            return AESGCM(base64.b64decode(key["Material"])).decrypt(
                nonce, sealed, header + _canonical_context(context)
            )
        except InvalidTag:
            raise KmsApiError(
                "InvalidCiphertextException",
                "the ciphertext blob does not decrypt under its key with this encryption context "
                "(edited blob, or a different EncryptionContext)",
            ) from None

    @staticmethod
    def _symmetric_only(request: _Request) -> None:
        algorithm = request.text("EncryptionAlgorithm")
        if algorithm not in (None, SYMMETRIC_DEFAULT):
            raise KmsApiError(
                "InvalidKeyUsageException", f"symmetric keys use {SYMMETRIC_DEFAULT}, not the {algorithm} algorithm"
            )

    @staticmethod
    def _dry_run(request: _Request) -> None:
        if request.flag("DryRun"):
            raise KmsApiError(
                "DryRunOperationException", "The request would have succeeded, but the DryRun flag is set."
            )

    def _release(self, plaintext: bytes, recipient: tuple[bytes, dict] | None) -> dict:
        """Plaintext, or with a Recipient only CiphertextForRecipient (AWS leaves Plaintext out)."""
        if recipient is None:
            return {"Plaintext": _b64(plaintext)}
        return {"CiphertextForRecipient": _b64(build_envelope(plaintext, recipient[0]))}

    def _op_Encrypt(self, request: _Request, principal: str) -> dict:
        key = self._resolve(request.text("KeyId", required=True))
        plaintext = request.blob("Plaintext", required=True, max_len=4096)
        context = request.context()
        self._symmetric_only(request)
        self._authorize(key, "Encrypt", principal, self._context_keys(context))
        self._require_usable(key)
        self._dry_run(request)
        return {
            "CiphertextBlob": _b64(self._seal(key, plaintext, context)),
            "KeyId": key["Arn"],
            "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
        }

    def _op_Decrypt(self, request: _Request, principal: str) -> dict:
        blob = request.blob("CiphertextBlob", required=True)
        context = request.context()
        self._symmetric_only(request)
        key = self._blob_key(blob)
        key_id = request.text("KeyId")
        if key_id and self._resolve(key_id)["KeyId"] != key["KeyId"]:
            raise KmsApiError(
                "IncorrectKeyException",
                "The key ID in the request does not identify the KMS key used to encrypt the ciphertext "
                f"({key['Arn']}): pass that key, or no KeyId",
            )
        recipient = self._recipient(request)
        self._authorize(
            key, "Decrypt", principal, {**self._context_keys(context), **(recipient[1] if recipient else {})}
        )
        self._require_usable(key)
        self._dry_run(request)
        plaintext = self._open(key, blob, context)
        return {"KeyId": key["Arn"], "EncryptionAlgorithm": SYMMETRIC_DEFAULT, **self._release(plaintext, recipient)}

    def _op_GenerateDataKey(self, request: _Request, principal: str) -> dict:
        key = self._resolve(request.text("KeyId", required=True))
        spec = request.text("KeySpec")
        count = request.number("NumberOfBytes", low=1, high=1024)
        if (spec is None) == (count is None):
            raise KmsApiError("ValidationException", "give exactly one of KeySpec (AES_256, AES_128) or NumberOfBytes")
        if count is None:
            if spec not in ("AES_256", "AES_128"):
                raise KmsApiError("ValidationException", f"KeySpec must be AES_256 or AES_128, not {spec!r}")
            count = 32 if spec == "AES_256" else 16
        context = request.context()
        recipient = self._recipient(request)
        self._authorize(
            key, "GenerateDataKey", principal, {**self._context_keys(context), **(recipient[1] if recipient else {})}
        )
        self._require_usable(key)
        self._dry_run(request)
        data_key = os.urandom(count)
        return {
            "CiphertextBlob": _b64(self._seal(key, data_key, context)),
            "KeyId": key["Arn"],
            **self._release(data_key, recipient),
        }

    def _op_GenerateRandom(self, request: _Request, principal: str) -> dict:
        count = request.number("NumberOfBytes", low=1, high=1024, required=True)
        if request.data.get("CustomKeyStoreId"):
            raise KmsApiError("UnsupportedOperationException", "the local KMS has no custom key stores")
        return self._release(os.urandom(count), self._recipient(request))

    # ------------------------------------------------------------ signing keys

    def _signing_key(self, request: _Request, principal: str, action: str) -> dict:
        key = self._resolve(request.text("KeyId", required=True))
        self._authorize(key, action, principal)
        self._require_usable(key)
        if key.get("KeyUsage") != SIGN_VERIFY:
            raise KmsApiError(
                "InvalidKeyUsageException",
                f"{key['Arn']} has KeyUsage {key.get('KeyUsage', 'ENCRYPT_DECRYPT')}: {action} needs a SIGN_VERIFY key",
            )
        return key

    @staticmethod
    def _signed_message(request: _Request) -> tuple[bytes, ec.EllipticCurveSignatureAlgorithm]:
        """The message and how to hash it: RAW is hashed with SHA-384; DIGEST must already be a SHA-384."""
        algorithm = request.text("SigningAlgorithm", required=True)
        if algorithm != ECDSA_SHA_384:
            raise KmsApiError(
                "InvalidKeyUsageException", f"{ECC_P384} keys here sign with {ECDSA_SHA_384}, not {algorithm}"
            )
        message = request.blob("Message", required=True, max_len=4096)
        message_type = request.text("MessageType") or "RAW"
        if message_type == "RAW":
            return message, ec.ECDSA(hashes.SHA384())
        if message_type != "DIGEST":
            raise KmsApiError(
                "ValidationException", f"MessageType must be RAW or DIGEST for {ECC_P384}, not {message_type}"
            )
        if len(message) != hashes.SHA384.digest_size:
            raise KmsApiError(
                "ValidationException", f"Digest is invalid length for algorithm {ECDSA_SHA_384}: {len(message)} bytes"
            )
        return message, ec.ECDSA(Prehashed(hashes.SHA384()))

    @staticmethod
    def _private_key(key: dict) -> ec.EllipticCurvePrivateKey:
        private_key = serialization.load_der_private_key(base64.b64decode(key["Material"]), password=None)
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):  # the only asymmetric spec it creates
            raise KmsApiError("KMSInternalException", f"key {key['KeyId']} holds no ECC private key", 500)
        return private_key

    def _op_Sign(self, request: _Request, principal: str) -> dict:
        key = self._signing_key(request, principal, "Sign")
        message, algorithm = self._signed_message(request)
        self._dry_run(request)
        signature = self._private_key(key).sign(message, algorithm)  # DER ECDSA-Sig-Value, as AWS returns
        return {"KeyId": key["Arn"], "Signature": _b64(signature), "SigningAlgorithm": ECDSA_SHA_384}

    def _op_Verify(self, request: _Request, principal: str) -> dict:
        key = self._signing_key(request, principal, "Verify")
        message, algorithm = self._signed_message(request)
        signature = request.blob("Signature", required=True)
        self._dry_run(request)
        try:
            self._private_key(key).public_key().verify(signature, message, algorithm)
        except InvalidSignature:
            raise KmsApiError("KMSInvalidSignatureException", "Signature verification failed.") from None
        return {"KeyId": key["Arn"], "SignatureValid": True, "SigningAlgorithm": ECDSA_SHA_384}

    def _op_GetPublicKey(self, request: _Request, principal: str) -> dict:
        key = self._resolve(request.text("KeyId", required=True))
        self._authorize(key, "GetPublicKey", principal)
        self._require_usable(key)
        if key.get("KeyUsage") != SIGN_VERIFY:
            raise KmsApiError("UnsupportedOperationException", f"{key['Arn']} is a symmetric key: it has no public key")
        public = (
            self._private_key(key)
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        return {
            "KeyId": key["Arn"],
            "PublicKey": _b64(public),
            "CustomerMasterKeySpec": ECC_P384,
            "KeySpec": ECC_P384,
            "KeyUsage": SIGN_VERIFY,
            "SigningAlgorithms": [ECDSA_SHA_384],
        }


# ---------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    server_version = "LocalKMS/1"

    def do_POST(self):  # noqa: N802 - http.server's naming
        kms: LocalKms = self.server.kms
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= MAX_REQUEST_BYTES:
                self.close_connection = True
                raise KmsApiError("ValidationException", f"the request body must be at most {MAX_REQUEST_BYTES} bytes")
            body = self.rfile.read(length)
            service, _dot, operation = (self.headers.get("X-Amz-Target") or "").partition(".")
            if service != "TrentService" or not operation:
                raise KmsApiError("UnknownOperationException", "X-Amz-Target must be TrentService.<Operation>")
            principal = kms.authenticate("POST", self.path, self.headers, body)
            try:
                request = json.loads(body or b"{}")
            except ValueError as err:
                raise KmsApiError("SerializationException", f"the request body is not JSON: {err}") from err
            self._answer(200, kms.handle(operation, request, principal=principal))
        except KmsApiError as err:
            self._answer(err.status, {"__type": err.code, "message": err.message})
        except Exception as err:  # noqa: BLE001 - answer like AWS would, and keep serving
            log.exception("local KMS failed on %s", self.headers.get("X-Amz-Target"))
            self._answer(500, {"__type": "KMSInternalException", "message": f"the local KMS failed: {err!r}"})

    def _answer(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, kms: LocalKms, family, tls: ssl.SSLContext | None = None):
        self.address_family = family
        self.kms = kms
        self.tls = tls
        super().__init__(address, _Handler)

    def finish_request(self, request, client_address):
        # The handshake runs in the connection's own thread, so a slow client stalls no one else.
        if self.tls is not None:
            request.settimeout(_TLS_HANDSHAKE_S)
            request = self.tls.wrap_socket(request, server_side=True)
            request.settimeout(None)
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        log.debug("local KMS: connection from %s failed", client_address, exc_info=True)


class LocalKmsServer:
    """The local KMS on a loopback address, as an HTTP endpoint for boto3 (``endpoint_url``); with tls
    (a server context, enclave_local/tls.py), HTTPS, as enclaves reach it through their vsock-proxy."""

    def __init__(self, kms: LocalKms, host: str = "127.0.0.1", port: int = 0, *, tls: ssl.SSLContext | None = None):
        try:
            address = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
        except ValueError:
            address = None
        if address is None or not address.is_loopback:
            raise ValueError(
                f"the local KMS listens only on a loopback address, not {host!r}: it speaks plain HTTP; "
                "use 127.0.0.1 (enclaves reach it through the local vsock-proxy)"
            )
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        self.kms = kms
        self._httpd = _HttpServer((str(address), port), kms, family, tls)
        bound = self._httpd.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.port = bound
        self.endpoint_url = (
            f"{scheme}://[{address}]:{bound}" if address.version == 6 else f"{scheme}://{address}:{bound}"
        )
        self._thread: threading.Thread | None = None
        self._serving = False

    def start(self) -> LocalKmsServer:
        """Serve in a background thread."""
        self._serving = True
        self._thread = threading.Thread(target=self.serve_forever, name="local-kms", daemon=True)
        self._thread.start()
        log.info("local KMS serving on %s (state %s)", self.endpoint_url, self.kms.state_dir)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until stop() (from another thread) or KeyboardInterrupt."""
        self._serving = True
        self._httpd.serve_forever(poll_interval=_POLL_S)

    def stop(self) -> None:
        if self._serving:
            self._httpd.shutdown()  # returns once serve_forever has left its loop
            self._serving = False
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> LocalKmsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
