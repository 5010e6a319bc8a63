"""The real AWS vectors (tests/vectors/aws) and the encoding shapes that tests compare against them.

cbor_items and ber_items read the encoding itself, not the decoded value: definite or indefinite
lengths, major types and tags are exactly what a decoder's output hides, and what the simulators
must copy from AWS. Both are small readers for well-formed test data, not validators.
"""

from __future__ import annotations

import base64
from pathlib import Path

AWS = Path(__file__).resolve().parent / "aws"


def aws_vector(name: str) -> bytes:
    """A vector's bytes: the .b64 files decoded, the others as stored."""
    data = (AWS / name).read_bytes()
    return base64.b64decode(data, validate=False) if name.endswith(".b64") else data


# ---------------------------------------------------------------- CBOR

CBOR_MAJOR = ("uint", "nint", "bytes", "text", "array", "map", "tag", "simple")


class CborItem:
    """One CBOR data item as encoded: major type, whether its length was indefinite, its parts."""

    def __init__(self, major: str, indefinite: bool, value=None, items=()):
        self.major = major
        self.indefinite = indefinite
        self.value = value  # int for uint/nint/tag/simple, bytes for bytes/text (chunks joined)
        self.items = list(items)  # array elements, map keys and values alternating, a tag's content

    def pairs(self) -> list[tuple[CborItem, CborItem]]:
        return list(zip(self.items[::2], self.items[1::2], strict=True))

    def entry(self, key: str) -> CborItem:
        for k, v in self.pairs():
            if k.major == "text" and k.value == key.encode():
                return v
        raise KeyError(key)

    def __repr__(self):
        return f"CborItem({self.major}{'*' if self.indefinite else ''}, {self.value!r:.40})"


def cbor_item(data: bytes) -> CborItem:
    item, end = _cbor(data, 0)
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes after the CBOR item")
    return item


def _argument(data: bytes, at: int) -> tuple[int, int | None, int]:
    initial = data[at]
    major, info = initial >> 5, initial & 0x1F
    if info < 24:
        return major, info, at + 1
    if info == 31:
        return major, None, at + 1
    size = 1 << (info - 24)
    return major, int.from_bytes(data[at + 1 : at + 1 + size], "big"), at + 1 + size


def _cbor(data: bytes, at: int) -> tuple[CborItem, int]:
    major, argument, at = _argument(data, at)
    name = CBOR_MAJOR[major]
    indefinite = argument is None
    if name in ("uint", "nint", "simple"):
        return CborItem(name, False, argument), at
    if name in ("bytes", "text"):
        if not indefinite:
            return CborItem(name, False, data[at : at + argument]), at + argument
        chunks = []
        while data[at] != 0xFF:
            chunk, at = _cbor(data, at)
            chunks.append(chunk.value)
        return CborItem(name, True, b"".join(chunks)), at + 1
    if name == "tag":
        content, at = _cbor(data, at)
        return CborItem(name, False, argument, [content]), at
    items = []
    count = None if indefinite else argument * (2 if name == "map" else 1)
    while (data[at] != 0xFF) if indefinite else (len(items) < count):
        item, at = _cbor(data, at)
        items.append(item)
    return CborItem(name, indefinite, argument, items), at + (1 if indefinite else 0)


# ---------------------------------------------------------------- BER


def ber_items(data: bytes) -> list[tuple[int, str, bool, int | None, bytes | None]]:
    """Every TLV in document order, as (depth, tag, constructed, length or None if indefinite, content of a
    primitive). tag is "UNIVERSAL 16", "CONTEXT 0"... End-of-contents markers are not listed."""
    out: list = []
    end = _ber(data, 0, 0, out)
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes after the BER value")
    return out


_CLASSES = ("UNIVERSAL", "APPLICATION", "CONTEXT", "PRIVATE")


def _ber(data: bytes, at: int, depth: int, out: list) -> int:
    identifier = data[at]
    tag = f"{_CLASSES[identifier >> 6]} {identifier & 0x1F}"
    constructed = bool(identifier & 0x20)
    first = data[at + 1]
    at += 2
    if first == 0x80:
        length = None
    elif first < 0x80:
        length = first
    else:
        length = int.from_bytes(data[at : at + (first & 0x7F)], "big")
        at += first & 0x7F
    if not constructed:
        out.append((depth, tag, False, length, data[at : at + length]))
        return at + length
    out.append((depth, tag, True, length, None))
    if length is None:
        while data[at : at + 2] != b"\x00\x00":
            at = _ber(data, at, depth + 1, out)
        return at + 2
    stop = at + length
    while at < stop:
        at = _ber(data, at, depth + 1, out)
    return stop


def ber_shape(envelope: bytes) -> list:
    """ber_items with the content of primitives reduced to what must match AWS: OIDs, INTEGERs (versions)
    and NULLs as they are, other primitives (keys, IVs, ciphertext) by their length only."""
    kept = {"UNIVERSAL 2", "UNIVERSAL 5", "UNIVERSAL 6"}
    return [
        (depth, tag, constructed, length, content if tag in kept else None)
        for depth, tag, constructed, length, content in ber_items(envelope)
    ]
