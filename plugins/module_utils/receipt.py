"""Job receipts: what the enclave signs at the end of a job, and how anyone checks it later.

The enclave server puts job_digest(summary) in the user_data of an attestation
document: RECEIPT_DOMAIN followed by the SHA-384 of the summary. The `attest`
operation signs a host's user_data only behind ATTEST_DOMAIN, so no request
can make the NSM sign something that passes for a receipt. The summary
names the package by content (its manifest digest), the script, the
arguments as given, the inputs' and outputs' SHA-256 and the exit status.
A receipt file is {"format": 2, "summary": ..., "document": base64}.
verify_receipt checks it offline against the owner's release manifest and the
outputs on disk: the document's signature and chain, PCR0 in the release, the
digest of the summary, the package in the release, each output's SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from . import attestation
from .errors import EnclaveError

try:
    import cbor2
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = attestation.IMPORT_ERROR  # and what attestation needs

FORMAT = 2  # 2: user_data is domain-separated (format 1 signed the bare digest)
RECEIPT_DOMAIN = b"confidential_ml.nitro job receipt v2\0"
ATTEST_DOMAIN = b"confidential_ml.nitro attest v1\0"


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


def make_receipt(summary: dict, document: bytes) -> dict:
    return {"format": FORMAT, "summary": summary, "document": base64.b64encode(document).decode()}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_receipt(receipt: dict, *, release: dict, trusted_roots, outputs_dir=None, allow_debug=False) -> dict:
    """Check a receipt; return what it proves, or raise EnclaveError naming the first thing that is wrong."""
    if not isinstance(receipt, dict) or receipt.get("format") != FORMAT:
        raise EnclaveError(f"not a receipt of format {FORMAT}: save the one `enclave run --receipt` wrote")
    summary = receipt.get("summary")
    try:
        document = base64.b64decode(receipt["document"], validate=True)
    except (KeyError, TypeError, ValueError) as err:
        raise EnclaveError(f"the receipt's document is not base64 ({err})") from err
    allowed = [p.lower() for p in release.get("allowed_pcr0") or [release["image"]["measurements"]["pcr0"]]]
    doc = attestation.verify_document(
        document, trusted_roots=trusted_roots, expected_pcrs={0: allowed}, max_age_s=None, allow_debug=allow_debug
    )
    check_receipt_user_data(doc.user_data, summary)
    packages = {p["manifest_digest"]: p for p in release.get("packages", [])}
    package = packages.get(summary.get("package_digest"))
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
    return {
        "pcr0": doc.pcr_hex(0),
        "module_id": doc.module_id,
        "signed_at": doc.timestamp,
        "package": f"{package['name']} {package['version']}",
        "script": summary.get("script"),
        "args": summary.get("args"),
        "rc": summary.get("rc"),
        "inputs": len(summary.get("inputs", [])),
        "outputs_checked": checked,
    }


def load_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise EnclaveError(f"cannot read {path}: {err}") from err
