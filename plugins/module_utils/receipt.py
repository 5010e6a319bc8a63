"""Job receipts: what the enclave signs at the end of a job, and how anyone checks it later.

The enclave server puts job_digest(summary) in the user_data of an attestation
document: RECEIPT_DOMAIN followed by the SHA-384 of the summary. The `attest`
operation signs a host's user_data only behind ATTEST_DOMAIN, so no request
can make the NSM sign something that passes for a receipt. The summary
names the package by content (its manifest digest), the script, the
arguments as given, the inputs' and outputs' SHA-256 and the exit status.
A receipt file is {"format": 2, "summary": ..., "document": base64} (Receipt);
the owner's release.json says which images and packages are the owner's (Release).
verify_receipt is the one check of a receipt, for the enclave_run module right
after the job and for `enclave receipt verify` (run_job.yml's check on the
controller) later: the document's signature and chain, PCR0 (the one the
enclave attested before the job, or one the release allows), the digest of the
summary, the package in the release, each output's SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import attestation
from .errors import AttestationError, EnclaveError

try:
    import cbor2
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = attestation.IMPORT_ERROR  # and what attestation needs

FORMAT = 2  # 2: user_data is domain-separated (format 1 signed the bare digest)
RECEIPT_DOMAIN = b"confidential_ml.nitro job receipt v2\0"
ATTEST_DOMAIN = b"confidential_ml.nitro attest v1\0"
JUST_SIGNED_MAX_AGE_S = 300  # the age a job's document may have when it is checked as the job ends


def job_digest(summary: dict) -> bytes:
    """RECEIPT_DOMAIN + SHA-384 of the summary in canonical CBOR (RFC 8949 deterministic encoding): the
    user_data the NSM signs at the end of a job."""
    return RECEIPT_DOMAIN + hashlib.sha384(cbor2.dumps(summary, canonical=True)).digest()


def attest_user_data(user_data: bytes) -> bytes:
    """What the enclave asks the NSM to sign for a host's `attest` request: never a receipt's user_data."""
    return ATTEST_DOMAIN + user_data


def check_receipt_user_data(user_data: bytes | None, summary) -> None:
    """Raise EnclaveError unless user_data is a receipt's and binds summary."""
    if not (user_data or b"").startswith(RECEIPT_DOMAIN):
        raise EnclaveError(
            "the attestation document is not a job receipt (its user_data is not in the receipt domain; an "
            "`attest` answer, say): only the document a job.run returned proves what a job did"
        )
    if not isinstance(summary, dict) or user_data != job_digest(summary):
        raise EnclaveError("the job summary does not match what the enclave signed: the receipt was edited")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _load_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise EnclaveError(f"cannot read {path}: {err}") from err


@dataclass(frozen=True)
class Receipt:
    """A job's receipt: the summary the enclave sent (times as epoch seconds) and the attestation document whose
    user_data binds it. Trust it only after verify_receipt."""

    summary: dict
    document: bytes

    @classmethod
    def from_job(cls, result: Mapping) -> Receipt:
        """From what job.run returned: the summary, with the document under "attestation"."""
        return cls({key: value for key, value in result.items() if key != "attestation"}, bytes(result["attestation"]))

    @classmethod
    def from_dict(cls, data) -> Receipt:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EnclaveError(f"not a receipt of format {FORMAT}: save the one `enclave run --receipt` wrote")
        if not isinstance(data.get("summary"), dict):
            raise EnclaveError("the receipt has no job summary: save the one `enclave run --receipt` wrote")
        try:
            document = base64.b64decode(data["document"], validate=True)
        except (KeyError, TypeError, ValueError) as err:
            raise EnclaveError(f"the receipt's document is not base64 ({err})") from err
        return cls(data["summary"], document)

    def to_dict(self) -> dict:
        """The receipt file's JSON (and the format, summary and document of enclave_run's attestation result)."""
        return {"format": FORMAT, "summary": self.summary, "document": base64.b64encode(self.document).decode()}

    @classmethod
    def load(cls, path) -> Receipt:
        return cls.from_dict(_load_json(path))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _text(data: Mapping, key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise EnclaveError(f"{where} has no {key} (got {value!r:.60}): give the release.json the owner published")
    return value


@dataclass(frozen=True)
class ReleasePackage:
    """A package of a release: a receipt names it by manifest_digest, the SHA-256 of its content's manifest."""

    name: str
    version: str
    manifest_digest: str
    file: str | None = None  # relative to the release folder
    sha256: str | None = None  # of the sealed file

    @classmethod
    def from_dict(cls, data, where: str) -> ReleasePackage:
        if not isinstance(data, dict):
            raise EnclaveError(f"{where} is not an object: give the release.json the owner published")
        name, version, digest = (_text(data, key, where) for key in ("name", "version", "manifest_digest"))
        file, sha256 = (None if data.get(key) is None else _text(data, key, where) for key in ("file", "sha256"))
        return cls(name, version, digest, file, sha256)

    def to_dict(self) -> dict:
        data = {"name": self.name, "version": self.version, "manifest_digest": self.manifest_digest}
        return data | {key: value for key, value in (("file", self.file), ("sha256", self.sha256)) if value}


@dataclass(frozen=True)
class Release:
    """What the owner's release.json holds (roles/owner_pipeline/templates/release.json.j2): the image and its
    measurements, the PCR0 values the key policy allows, the package key, the signing keys, the packages."""

    packages: tuple[ReleasePackage, ...]
    allowed_pcr0: tuple[str, ...] | None = None  # absent from releases older than the rotation window
    image: Mapping[str, Any] | None = None  # {"file": ..., "measurements": {"pcr0": ..., ...}}
    format: int | None = None
    backend: str | None = None
    key_arn: str | None = None
    signing_keys: Sequence[Mapping[str, Any]] | None = None
    source: str = field(default="the release", compare=False)  # how messages name it

    @classmethod
    def from_dict(cls, data, source: str = "the release") -> Release:
        if not isinstance(data, dict):
            raise EnclaveError(f"{source} is not a release manifest (a JSON object): give the owner's release.json")
        packages = data.get("packages", [])
        if not isinstance(packages, list):
            raise EnclaveError(f"{source} lists its packages as {type(packages).__name__}, not a list")
        allowed = data.get("allowed_pcr0")
        if allowed is not None and not (isinstance(allowed, list) and all(isinstance(p, str) for p in allowed)):
            raise EnclaveError(f"{source} has allowed_pcr0 {allowed!r:.80}, not a list of PCR0 hex strings")
        image = data.get("image")
        if image is not None and not isinstance(image, dict):
            raise EnclaveError(f"{source} has image {image!r:.80}, not an object")
        release = cls(
            packages=tuple(ReleasePackage.from_dict(p, f"{source}'s package {n}") for n, p in enumerate(packages)),
            allowed_pcr0=None if allowed is None else tuple(allowed),
            image=image,
            format=data.get("format"),
            backend=data.get("backend"),
            key_arn=data.get("key_arn"),
            signing_keys=data.get("signing_keys"),
            source=source,
        )
        release.accepted_pcr0()  # a release that names no image is no release
        return release

    def to_dict(self) -> dict:
        """release.json's JSON: what from_dict read, field for field."""
        data = {"packages": [p.to_dict() for p in self.packages]}
        optional = {
            "allowed_pcr0": None if self.allowed_pcr0 is None else list(self.allowed_pcr0),
            "image": self.image,
            "format": self.format,
            "backend": self.backend,
            "key_arn": self.key_arn,
            "signing_keys": self.signing_keys,
        }
        return data | {key: value for key, value in optional.items() if value is not None}

    @classmethod
    def load(cls, path) -> Release:
        return cls.from_dict(_load_json(path), source=str(path))

    @property
    def image_pcr0(self) -> str | None:
        measurements = (self.image or {}).get("measurements")
        pcr0 = measurements.get("pcr0") if isinstance(measurements, dict) else None
        return pcr0.lower() if isinstance(pcr0, str) else None

    def accepted_pcr0(self) -> list[str]:
        """The PCR0 values a job of this release may have run under: those the key policy allows (the image's and
        the rotation window's), or the image's alone in a release that predates allowed_pcr0."""
        values: list[str | None] = [p.lower() for p in self.allowed_pcr0] if self.allowed_pcr0 else [self.image_pcr0]
        accepted = [value for value in values if value]
        if len(accepted) != len(values):
            raise EnclaveError(
                f"{self.source} names no image PCR0 (neither allowed_pcr0 nor image.measurements.pcr0): give the "
                "release.json the owner published"
            )
        return accepted

    def package(self, manifest_digest) -> ReleasePackage | None:
        return next((p for p in self.packages if p.manifest_digest == manifest_digest), None)


@dataclass(frozen=True)
class VerifiedReceipt:
    """What a receipt proves, once verify_receipt has checked it."""

    receipt: Receipt
    document: attestation.AttestationDocument  # the verified claims
    package: ReleasePackage | None  # None when no release was given
    outputs_checked: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """What `enclave receipt verify --json` prints."""
        summary, package = self.receipt.summary, self.package
        return {
            "pcr0": self.document.pcr_hex(0),
            "module_id": self.document.module_id,
            "signed_at": self.document.timestamp,
            "package": f"{package.name} {package.version}" if package else summary.get("package"),
            "script": summary.get("script"),
            "args": summary.get("args"),
            "rc": summary.get("rc"),
            "inputs": len(summary.get("inputs", [])),
            "outputs_checked": list(self.outputs_checked),
        }


def verify_receipt(
    receipt: Receipt,
    *,
    trusted_roots,
    release: Release | None = None,
    expected_pcr0: str | Sequence[str] | None = None,
    outputs_dir=None,
    allow_debug: bool = False,
    max_age_s: float | None = None,
) -> VerifiedReceipt:
    """Check a receipt; return what it proves, or raise EnclaveError (AttestationError for the document) naming
    the first thing that is wrong.

    The document must be signed by a chain to trusted_roots, with a PCR0 the release accepts (later, offline)
    or expected_pcr0 (right after the job: the one the enclave attested before it), and its user_data must bind
    the summary in the receipt domain. With a release, the package must be one of its packages; with outputs_dir,
    each output the summary lists must be there with the SHA-256 the enclave reported. max_age_s: how old the
    document may be (None: any age, for a receipt checked long after the job)."""
    if release is not None and expected_pcr0 is not None:
        raise ValueError("give release or expected_pcr0, not both")  # a caller's mistake, not the user's
    allowed = release.accepted_pcr0() if release is not None else expected_pcr0
    doc = attestation.verify_document(
        receipt.document,
        trusted_roots=trusted_roots,
        expected_pcrs=None if allowed is None else {0: allowed},
        max_age_s=max_age_s,
        allow_debug=allow_debug,
    )
    summary = receipt.summary
    check_receipt_user_data(doc.user_data, summary)
    package = None
    if release is not None:
        package = release.package(summary.get("package_digest"))
        if package is None:
            raise EnclaveError(
                f"the job ran package content {summary.get('package_digest')}, which is not in this release: "
                "check that you verify against the release the job used"
            )
    checked = []
    if outputs_dir is not None:
        root = Path(outputs_dir)
        for output in summary.get("outputs", []):
            rel = output["path"].removeprefix("/output/")
            local = root.joinpath(*rel.split("/"))
            if not local.is_file():
                raise EnclaveError(f"output {output['path']} is missing from {root}: pull /output again")
            if _file_sha256(local) != output["sha256"]:
                raise EnclaveError(f"{local} differs from the {output['path']} the enclave produced")
            checked.append(str(local))
    return VerifiedReceipt(receipt, doc, package, tuple(checked))


def verify_job_receipt(
    result: Mapping, *, trusted_roots, attested: attestation.AttestationDocument | None = None, allow_debug=False
) -> VerifiedReceipt:
    """The receipt of a job that has just ended (what job.run returned), checked as enclave_run and `enclave run
    --receipt` check it: signed just now, with the PCR0 the enclave attested before the job when it was asked to
    attest. The error says the job ran and its results are not to be trusted."""
    try:
        return verify_receipt(
            Receipt.from_job(result),
            trusted_roots=trusted_roots,
            expected_pcr0=attested.pcr_hex(0) if attested is not None else None,
            allow_debug=allow_debug,
            max_age_s=JUST_SIGNED_MAX_AGE_S,
        )
    except EnclaveError as err:
        error = AttestationError if isinstance(err, AttestationError) else EnclaveError
        raise error(f"the job ran, but its receipt did not verify: {err}; do not trust its results") from err
