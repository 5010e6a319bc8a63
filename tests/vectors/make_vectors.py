"""Regenerate the package test vector: only when the format changes on purpose (then bump FORMAT_VERSION).

    PYTHONPATH=collections .venv/bin/python tests/vectors/make_vectors.py

Seals TREE with seal() and a stand-in KMS that returns the published DATA_KEY, so the vector exercises the
real sealing path. Tink draws a fresh salt and nonce prefix on every run, so the package bytes differ each
time while the header and the tree stay the same; tests/unit/test_package.py pins the committed file.
"""

import hashlib
import json
import tempfile
from pathlib import Path

from ansible_collections.confidential_ml.nitro.plugins.module_utils import package

HERE = Path(__file__).resolve().parent
VECTOR = HERE / "v1-tiny.cmlpkg"
EXPECTED = HERE / "v1-tiny.json"

# Published on purpose: this key protects nothing but the test vector.
DATA_KEY = hashlib.sha256(b"confidential_ml.nitro package format test vector v1 data key").digest()
KEY_ID = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-4000-8000-000000000001"
WRAPPED_KEY = b"test vector: stands in for the KMS CiphertextBlob of DATA_KEY"
NAME, VERSION = "test-vector", "1.0"
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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tree"
        src.mkdir()
        write_tree(src)
        header = package.seal(
            src, VECTOR, kms_client=VectorKms(), key_id=KEY_ID, name=NAME, version=VERSION,
            encryption_context=EXTRA_CONTEXT,
        )  # fmt: skip
        entries = package.build_manifest(src)
    data = VECTOR.read_bytes()
    expected = {
        "about": "Package format v1 test vector; see docs/PACKAGE_FORMAT.md. The data key is public.",
        "data_key_hex": DATA_KEY.hex(),
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "file_size": len(data),
        "header": header.to_json(),
        "header_raw_hex": header.raw.hex(),
        "manifest": [entry.__dict__ for entry in entries],
        "tree": {path: content.decode() if content is not None else None for path, (_mode, content) in TREE.items()},
    }
    EXPECTED.write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {VECTOR} ({len(data)} bytes) and {EXPECTED}")


if __name__ == "__main__":
    main()
