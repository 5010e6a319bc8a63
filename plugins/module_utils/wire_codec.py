"""The wire's CBOR codec (docs/PROTOCOL.md): a frame body is one CBOR map of plain data.

No CBOR tags but bignums: nothing on the wire can name a type to build, which is
what made the original sample's pickle framing executable. Encoders refuse what
would become a tag; the decoder refuses every tag but bignums.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Mapping
from typing import Any

try:
    import cbor2
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

from .errors import ProtocolError, WireError

MAX_DEPTH = 64


def _refuse(encoder, value):
    raise TypeError(
        f"{type(value).__name__} cannot go on the wire: send plain data "
        "(maps, lists, str, bytes, int, float, bool, None)"
    )


def _encode_memoryview(encoder, value):
    # Left to cbor2, a memoryview becomes an array of ints.
    encoder.encode_bytes(value.tobytes())


@functools.cache
def _encoders() -> dict[type, Callable[[Any, Any], None]]:
    """Types cbor2 would otherwise send as CBOR tags, which the decoder refuses: failing here keeps a handler's
    mistake to its own request instead of killing the connection. Built at the first message that is not plain
    data: importing decimal, fractions, ipaddress and uuid only to name their types cost every command ~10 ms."""
    import datetime
    import decimal
    import fractions
    import ipaddress
    import re
    import uuid

    encoders: dict[type, Callable[[Any, Any], None]] = {
        t: _refuse
        for t in (
            datetime.datetime,
            datetime.date,
            decimal.Decimal,
            fractions.Fraction,
            uuid.UUID,
            re.Pattern,
            set,
            frozenset,
            complex,
            ipaddress.IPv4Address,
            ipaddress.IPv6Address,
            ipaddress.IPv4Network,
            ipaddress.IPv6Network,
            ipaddress.IPv4Interface,
            ipaddress.IPv6Interface,
        )
    }
    encoders[memoryview] = _encode_memoryview
    if IMPORT_ERROR is None:  # cbor2's own tag type; without cbor2 nothing is encoded at all
        encoders[cbor2.CBORTag] = _refuse
    return encoders


def _refuse_tag(decoder, *_args):
    raise cbor2.CBORDecodeError("CBOR tags are not allowed on this wire")


class _NoTags(dict):
    """Every semantic tag maps to a refusal, except bignums (2, 3), left to cbor2.

    A dict (empty, answering through __missing__), not a Mapping: cbor2 checks a Mapping
    argument with an isinstance that costs more than decoding a small frame."""

    def __missing__(self, tag):
        if tag in (2, 3):
            raise KeyError(tag)
        return _refuse_tag


_NO_TAGS = _NoTags()
_PLAIN = frozenset((str, bytes, int, float, bool, type(None)))


def _plain(value, depth: int = 0) -> bool:
    """Whether value holds nothing but dicts, lists, tuples and the exact types in _PLAIN.

    Such a message encodes to the same bytes with or without _encoders() (none of their types
    is in it), and cbor2 encodes several times faster without them: it looks every value up
    in an encoders mapping, and each miss raises and catches a KeyError."""
    kind = type(value)
    if kind is dict:
        if depth >= MAX_DEPTH:
            return False
        for key, item in value.items():
            if type(key) not in _PLAIN or (type(item) not in _PLAIN and not _plain(item, depth + 1)):
                return False
        return True
    if kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            return False
        for item in value:  # noqa: SIM110 (a loop: all() over a generator costs twice as much per item)
            if type(item) not in _PLAIN and not _plain(item, depth + 1):
                return False
        return True
    return kind in _PLAIN


def encode(msg: Mapping) -> bytes:
    """The CBOR body of a frame. Raises WireError if msg holds something other than plain data."""
    try:
        if _plain(msg):
            return cbor2.dumps(msg)
        return cbor2.dumps(msg, encoders=_encoders())
    except (TypeError, ValueError, cbor2.CBOREncodeError) as e:
        raise WireError(f"cannot encode a message: {e}") from e


def _cbor_decoder(fp, read_size: int, string_keys: bool):
    return cbor2.CBORDecoder(
        fp,
        read_size=read_size,
        semantic_decoders=_NO_TAGS,
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=string_keys,
    )


def _decoded(decoder, fp: io.BytesIO, length: int) -> dict:
    try:
        msg = decoder.decode()
    except Exception as e:  # hostile bytes may trip any error inside cbor2: all mean a bad frame
        raise ProtocolError(f"malformed CBOR in a frame of {length} bytes: {e}") from None
    if fp.tell() != length:
        raise ProtocolError(f"{length - fp.tell()} stray bytes after the CBOR map in a frame")
    if not isinstance(msg, dict):
        raise ProtocolError(f"a frame must hold a CBOR map, not {type(msg).__name__}")
    return msg


def decode(body: bytes, *, string_keys: bool = False) -> dict:
    """The message in a frame body; ProtocolError for anything but exactly one CBOR map.

    string_keys: refuse map keys other than text/byte strings (whose hashes are
    randomised), so a hostile peer cannot flood a dict with colliding int keys."""
    fp = io.BytesIO(body)
    # One read of the whole body: cbor2's default small reads are several times slower on MiB frames.
    return _decoded(_cbor_decoder(fp, max(len(body), 1), string_keys), fp, len(body))
