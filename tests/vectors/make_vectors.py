"""Regenerate the package test vectors: only when the format changes on purpose (then bump FORMAT_VERSION).

    PYTHONPATH=collections .venv/bin/python tests/vectors/make_vectors.py [v1|v2]

Seals TREE with seal() and a stand-in KMS that returns the published DATA_KEY, so the vectors exercise the
real sealing path: v2-tiny signed by the published SIGNING_KEY (format 2), v1-tiny unsigned (format 1, which
unbound images still open). Tink draws a fresh salt and nonce prefix on every run, and ECDSA a fresh nonce,
so the package bytes differ each time while the header and the tree stay the same;
tests/unit/plugins/module_utils/test_package.py pins the committed files. Give a name to regenerate only that vector.
"""

import base64
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ansible_collections.confidential_ml.nitro.plugins.module_utils import package_seal
from ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity import OwnerKey

HERE = Path(__file__).resolve().parent

# Published on purpose: this key protects nothing but the test vector.
DATA_KEY = hashlib.sha256(b"confidential_ml.nitro package format test vector v1 data key").digest()
KEY_ID = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-4000-8000-000000000001"
WRAPPED_KEY = b"test vector: stands in for the KMS CiphertextBlob of DATA_KEY"
NAME, VERSION = "test-vector", "1.0"
# Published on purpose too: the owner's signing key of the v2 vector (a KMS key in real use, never exported).
SIGNING_KEY_D = int.from_bytes(
    hashlib.sha384(b"confidential_ml.nitro package format test vector v2 signing key").digest()
)
SIGNING_KEY_ID = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-4000-8000-000000000002"
EXTRA_CONTEXT = {"purpose": "test-vector"}

# path -> (mode, content) for files, or (mode, None) for directories
TREE = {
    "README.txt": (0o644, b"confidential_ml.nitro package test vector v1\n"),
    "bin": (0o755, None),
    "bin/run.py": (0o755, b"print('hello from the enclave')\n"),
    "data": (0o755, None),
    "data/empty": (0o644, b""),
    "donn\u00e9es": (0o755, None),
    "donn\u00e9es/na\u00efve.txt": (0o644, b"unicode names travel as PAX path records\n"),
}


class VectorKms:
    def generate_data_key(self, KeyId, KeySpec, EncryptionContext):  # noqa: N803 (boto3's argument names)
        assert KeySpec == "AES_256"
        return {"KeyId": KEY_ID, "CiphertextBlob": WRAPPED_KEY, "Plaintext": DATA_KEY}


def write_tree(root: Path) -> None:
    for path, (mode, content) in TREE.items():
        target = root / path
        if content is None:
            target.mkdir()
        else:
            target.write_bytes(content)
        target.chmod(mode)


class VectorSigner:
    """Signs as KMS Sign does with an ECC_NIST_P384 key and ECDSA_SHA_384: DER signature over SHA-384."""

    def __init__(self):
        self.private = ec.derive_private_key(SIGNING_KEY_D, ec.SECP384R1())
        self.public_der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key = OwnerKey(SIGNING_KEY_ID, self.public_der)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message, ec.ECDSA(hashes.SHA384()))


def make(name: str) -> None:
    vector, expected_path = HERE / f"{name}-tiny.cmlpkg", HERE / f"{name}-tiny.json"
    signer = VectorSigner() if name == "v2" else None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tree"
        src.mkdir()
        write_tree(src)
        header = package_seal.seal(
            src, vector, kms_client=VectorKms(), key_id=KEY_ID, name=NAME, version=VERSION,
            encryption_context=EXTRA_CONTEXT, signer=signer,
        )  # fmt: skip
        entries = package_seal.build_manifest(src)
    data = vector.read_bytes()
    signing = {}
    if signer is not None:
        signing = {
            "signing_key_d_hex": f"{SIGNING_KEY_D:096x}",
            "signing_public_key": base64.b64encode(signer.public_der).decode("ascii"),
        }
    expected = {
        "about": f"Package format {name} test vector; see docs/PACKAGE_FORMAT.md. The data and signing keys are "
        "public.",
        "data_key_hex": DATA_KEY.hex(),
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "file_size": len(data),
        "header": header.to_json(),
        "header_raw_hex": header.raw.hex(),
        "manifest": [entry.__dict__ for entry in entries],
        "tree": {path: content.decode() if content is not None else None for path, (_mode, content) in TREE.items()},
        **signing,
    }
    expected_path.write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {vector} ({len(data)} bytes) and {expected_path}")


def main() -> None:
    for name in sys.argv[1:] or ["v2"]:
        make(name)


if __name__ == "__main__":
    main()
