"""The encrypted blob format: AES-256-GCM in 1 MiB segments (the STREAM construction).

A blob is a header followed by one or more segments::

    header (61 bytes)
      0   4  magic          b"HLEB" (HealthLab Encrypted Blob)
      4   1  version        1
      5   1  log2 segment   20: 1 MiB of plaintext per segment (12..26 accepted)
      6  16  salt           random
     22   7  nonce prefix   random
     29  32  commitment     HKDF-SHA256(data key, salt, "healthlab blob v1 commitment")

    segment i (i = 0, 1, ...; n >= 1 segments)
      AES-256-GCM(segment key, nonce, plaintext_i, associated data = the header)
      = ciphertext_i (as long as plaintext_i) + 16-byte tag
      segment key = HKDF-SHA256(data key, salt, "healthlab blob v1 segment key")
      nonce       = nonce prefix (7) + i (4, big-endian) + last (1: 0x01 on the
                    last segment, else 0x00)

Every segment but the last holds exactly ``2**log2`` plaintext bytes; the last holds
1 to ``2**log2`` bytes (0 only for empty content, which is one empty segment). So a
blob of *m* plaintext bytes is ``61 + m + 16 * max(1, ceil(m / 2**log2))`` bytes.

What this detects, segment by segment and in bounded memory (one segment at a
time): a changed byte anywhere (the tags; the header is associated data of every
segment), reordered or duplicated segments (the counter is in the nonce), a blob
cut at a segment boundary (the new last segment was sealed with ``last = 0``) or
extended (the old last one was sealed with ``last = 1``), and segments spliced from
another blob (another salt gives another key). The commitment tells a wrong data key
from an altered blob (GCM alone cannot) and commits the blob to one key. The data
key is fresh and random for every blob; the salt and nonce prefix keep segment keys
and nonces unique even if a key were ever reused. Like age and Tink's streaming AEAD,
a reader that stops early has seen only authenticated segments, but it has not seen
the end: callers release plaintext only after the last segment (and the content
hash) checked out.
"""

from __future__ import annotations

import hmac
import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from healthlab.storage.errors import BlobCorrupted, InvalidKey, WrongKey

__all__ = [
    "HEADER_SIZE",
    "KEY_SIZE",
    "SEGMENT_SIZE",
    "TAG_SIZE",
    "check_key",
    "decrypt",
    "decrypt_stream",
    "encrypt",
    "encrypt_stream",
    "encrypted_size",
]

MAGIC = b"HLEB"
VERSION = 1
KEY_SIZE = 32
TAG_SIZE = 16
SEGMENT_LOG2 = 20
#: Plaintext bytes per segment.
SEGMENT_SIZE = 1 << SEGMENT_LOG2
_SALT, _PREFIX, _COMMIT = 16, 7, 32
HEADER_SIZE = len(MAGIC) + 2 + _SALT + _PREFIX + _COMMIT
_MAX_SEGMENTS = 1 << 32
_COMMIT_INFO = b"healthlab blob v1 commitment"
_KEY_INFO = b"healthlab blob v1 segment key"


def check_key(key: object) -> bytes:
    """The data key as bytes, or a clear error that never shows it."""
    if not isinstance(key, bytes | bytearray | memoryview):
        raise InvalidKey(
            f"a data key is 32 bytes (got {type(key).__name__}); take it from "
            "`Stored.key`, a `Keyring` or `open_key`"
        )
    key = bytes(key)
    if len(key) != KEY_SIZE:
        raise InvalidKey(
            f"a data key is 32 bytes, this one has {len(key)}; take it from "
            "`Stored.key`, a `Keyring` or `open_key`"
        )
    return key


def _derive(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(key)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= _MAX_SEGMENTS:
        raise BlobCorrupted("a blob holds at most 2**32 segments (4 PiB)")
    return prefix + struct.pack(">IB", index, last)


def encrypted_size(size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """Bytes of the blob that ``size`` plaintext bytes become."""
    segments = max(1, -(-size // segment_size))
    return HEADER_SIZE + size + TAG_SIZE * segments


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    first = read(size)
    if len(first) == size or not first:
        return first
    parts, have = [first], len(first)
    while have < size:
        more = read(size - have)
        if not more:
            break
        parts.append(more)
        have += len(more)
    return b"".join(parts)


def encrypt_stream(
    read: Callable[[int], bytes], key: bytes, *, segment_log2: int = SEGMENT_LOG2
) -> Iterator[bytes]:
    """The blob of the plaintext ``read(n)`` returns, as header then segments."""
    key = check_key(key)
    if not 12 <= segment_log2 <= 26:
        raise ValueError("segment_log2 must be between 12 and 26")
    size = 1 << segment_log2
    salt, prefix = os.urandom(_SALT), os.urandom(_PREFIX)
    commitment = _derive(key, salt, _COMMIT_INFO)
    header = MAGIC + bytes([VERSION, segment_log2]) + salt + prefix + commitment
    aead = AESGCM(_derive(key, salt, _KEY_INFO))
    yield header
    current, index = _read_exactly(read, size), 0
    while True:
        following = _read_exactly(read, size) if len(current) == size else b""
        last = not following
        yield aead.encrypt(_nonce(prefix, index, last), current, header)
        if last:
            return
        current, index = following, index + 1


def encrypt(plaintext: bytes, key: bytes) -> bytes:
    """The blob of ``plaintext`` in memory (see :func:`encrypt_stream`)."""
    return b"".join(encrypt_stream(io.BytesIO(plaintext).read, key))


class _Chunks:
    """``read(n)`` over an iterable of byte strings of any sizes."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = bytearray()

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out


def decrypt_stream(chunks: Iterable[bytes], key: bytes) -> Iterator[bytes]:
    """The plaintext of a blob, one authenticated segment at a time.

    Raises
    ------
    WrongKey
        The key's commitment differs from the header's: another blob's key, or an
        altered header.
    BlobCorrupted
        Not a blob of this format, or a segment failed authentication.
    """
    key = check_key(key)
    read = _Chunks(chunks).read
    header = read(HEADER_SIZE)
    if len(header) < HEADER_SIZE or header[:4] != MAGIC:
        raise BlobCorrupted(
            "this is not a HealthLab encrypted blob (bad or missing header): the "
            "store served something else, or the blob was cut short"
        )
    if header[4] != VERSION:
        raise BlobCorrupted(
            f"blob format version {header[4]} is unknown to this healthlab "
            f"(it reads version {VERSION}): upgrade healthlab, or the header was "
            "altered"
        )
    log2 = header[5]
    if not 12 <= log2 <= 26:
        raise BlobCorrupted(f"segment size 2**{log2} is out of range: header altered")
    salt = header[6 : 6 + _SALT]
    prefix = header[6 + _SALT : 6 + _SALT + _PREFIX]
    commitment = header[6 + _SALT + _PREFIX :]
    if not hmac.compare_digest(commitment, _derive(key, salt, _COMMIT_INFO)):
        raise WrongKey(
            "this data key does not open this blob: the store served another blob "
            "(fetch it from another store), the key belongs to another dataset "
            "(check the CID and the key you were given), or the blob's header was "
            "altered"
        )
    aead = AESGCM(_derive(key, salt, _KEY_INFO))
    size = (1 << log2) + TAG_SIZE
    index = 0
    while True:
        # No read-ahead: a segment is authenticated before the next byte is read,
        # so a reader stops at the first one that fails. A full segment is tried
        # as not-last, then as last (then nothing may follow it).
        current = read(size)
        if not current:
            raise BlobCorrupted(
                "the blob has a header but no segment: it was cut short"
                if index == 0
                else f"the blob ends after segment {index - 1}, which was not "
                "sealed as the last: it was cut short"
            )
        if len(current) < TAG_SIZE:
            raise BlobCorrupted(
                f"segment {index} is shorter than its tag: the blob was cut short"
            )
        plain, last = _open_segment(aead, prefix, index, current, header, size)
        if not plain and index:
            raise BlobCorrupted(f"segment {index} is empty: the blob was altered")
        if last and len(current) == size and read(1):
            raise BlobCorrupted(
                f"bytes follow segment {index}, which was sealed as the last: the "
                "blob was extended; fetch it again from a store you trust"
            )
        yield plain
        if last:
            return
        index += 1


def _open_segment(
    aead: AESGCM, prefix: bytes, index: int, sealed: bytes, header: bytes, size: int
) -> tuple[bytes, bool]:
    """(plaintext, is the last) of segment ``index``; a short one can only be last."""
    tries = (False, True) if len(sealed) == size else (True,)
    for last in tries:
        try:
            return aead.decrypt(_nonce(prefix, index, last), sealed, header), last
        except InvalidTag:
            continue
    raise BlobCorrupted(
        f"segment {index} of the blob failed authentication: the blob was "
        "altered, cut short, extended or its segments reordered (nothing after it "
        "was read); fetch it again from a store you trust"
    )


def decrypt(blob: bytes, key: bytes) -> bytes:
    """The plaintext of a blob in memory (see :func:`decrypt_stream`)."""
    return b"".join(decrypt_stream([blob], key))
