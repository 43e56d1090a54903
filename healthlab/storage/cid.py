"""IPFS-compatible CIDs, computed the way ``ipfs add --cid-version=1`` does.

kubo's defaults for CIDv1 (and those of the JS importer behind Helia when set the
same way): the file is cut into 262,144-byte chunks; each chunk is a *raw* block
(codec ``raw``, 0x55) addressed by its sha2-256; a file of one chunk (or none) is
that raw block itself. More chunks are linked by a *balanced* DAG of dag-pb nodes
(codec 0x70) with at most 174 links each, every leaf at the same depth, filled left
to right: each group of 174 consecutive nodes gets a parent, until one root remains.

A parent is the dag-pb ``PBNode`` protobuf, links first::

    PBNode  = repeated Links (2) = PBLink, Data (1) = UnixFS bytes
    PBLink  = Hash (1) = binary CID, Name (2) = "" (always written), Tsize (3)
    UnixFS  = Type (1) = File (2), filesize (3), repeated blocksizes (4)

``Tsize`` is the bytes of every block under the link (a raw leaf: its length; a node:
its own encoding plus its children's ``Tsize``); ``blocksizes`` are the file bytes
under each link and ``filesize`` their sum. The CID is ``0x01`` (version) + codec
varint + multihash (``0x12 0x20`` + sha2-256 of the block), in multibase base32
(lowercase, no padding, prefix ``b``).

:class:`UnixFSHasher` also builds CIDv0 with dag-pb leaves and other chunk sizes and
link limits, only so the tests can check the layout against published vectors of
kubo's other import profiles; the blobs healthlab stores always use the defaults.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from healthlab.storage.errors import InvalidCid

__all__ = [
    "CHUNK_SIZE",
    "MAX_LINKS",
    "MAX_ROOT_BLOCK",
    "UnixFSHasher",
    "cid_of",
    "cid_of_file",
    "file_size_of_root",
    "is_raw",
    "parse_cid",
]

#: Bytes per leaf: kubo's ``size-262144`` chunker.
CHUNK_SIZE = 262_144
#: Links per dag-pb node of the balanced layout (kubo and the JS importer).
MAX_LINKS = 174

RAW = 0x55
DAG_PB = 0x70
_SHA2_256 = b"\x12\x20"  # multihash: sha2-256, 32 bytes
_READ = 1 << 20
#: Bytes a root block of the default layout never exceeds (174 links of about 50
#: bytes, and their block sizes: under 10 KiB); a longer answer is not one.
MAX_ROOT_BLOCK = 32_768


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _number(number: int, value: int) -> bytes:
    """A varint protobuf field."""
    return _varint(number << 3) + _varint(value)


def _base58btc(data: bytes) -> str:
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    value, text = int.from_bytes(data, "big"), ""
    while value:
        value, digit = divmod(value, 58)
        text = alphabet[digit] + text
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + text


def _base32(data: bytes) -> str:
    return "b" + base64.b32encode(data).decode("ascii").lower().rstrip("=")


@dataclass(frozen=True)
class _Link:
    cid: bytes  # binary CID
    tsize: int  # bytes of every block under the link
    filesize: int  # file bytes under the link


class UnixFSHasher:
    """The CID of a byte stream fed in pieces, in memory bounded by the DAG's width.

    Examples
    --------
    >>> hasher = UnixFSHasher()
    >>> hasher.update(b"hello ")
    >>> hasher.update(b"world")
    >>> hasher.cid()
    'bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e'
    """

    def __init__(
        self,
        *,
        chunk_size: int = CHUNK_SIZE,
        max_links: int = MAX_LINKS,
        raw_leaves: bool = True,
        cid_version: int = 1,
    ) -> None:
        if cid_version not in (0, 1) or (cid_version == 0 and raw_leaves):
            raise ValueError("CIDv0 exists only for dag-pb blocks (raw_leaves=False)")
        if chunk_size < 1 or max_links < 2:
            raise ValueError("chunk_size must be >= 1 and max_links >= 2")
        self._chunk_size = chunk_size
        self._max_links = max_links
        self._raw_leaves = raw_leaves
        self._version = cid_version
        self._pending = bytearray()
        self._levels: list[list[_Link]] = [[]]
        self._leaves = 0
        self._root: _Link | None = None
        self._block: bytes | None = None  # the last dag-pb node built

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the next bytes of the file."""
        if self._root is not None:
            raise ValueError("cid() was called: this hasher is finished")
        view = memoryview(data).cast("B")
        size = self._chunk_size
        if self._pending:
            take = min(len(view), size - len(self._pending))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < size:
                return
            self._leaf(bytes(self._pending))
            self._pending.clear()
        while len(view) >= size:
            self._leaf(view[:size])
            view = view[size:]
        self._pending += view

    def cid(self) -> str:
        """The file's CID (the hasher takes no more bytes after this)."""
        if self._root is None:
            if self._pending or not self._leaves:
                self._leaf(bytes(self._pending))
                self._pending.clear()
            self._root = self._finish()
        return self._text(self._root.cid)

    def root_block(self) -> bytes | None:
        """The root's block if it is a dag-pb node (None: the file is one raw block),
        as an IPFS node serves it for ``block/get``; call :meth:`cid` first."""
        if self._root is None:
            raise ValueError("call cid() first")
        raw_root = self._raw_leaves and self._leaves == 1
        return None if raw_root else self._block

    # ----------------------------------------------------------------- internals
    def _binary(self, codec: int, block: bytes | memoryview) -> bytes:
        digest = _SHA2_256 + hashlib.sha256(block).digest()
        if self._version == 0:
            return digest
        return b"\x01" + _varint(codec) + digest

    def _text(self, cid: bytes) -> str:
        return _base58btc(cid) if self._version == 0 else _base32(cid)

    def _leaf(self, chunk: bytes | memoryview) -> None:
        self._leaves += 1
        if self._raw_leaves:
            link = _Link(self._binary(RAW, chunk), len(chunk), len(chunk))
        else:
            unixfs = _number(1, 2) + (_field(2, bytes(chunk)) if len(chunk) else b"")
            block = _field(1, unixfs + _number(3, len(chunk)))
            link = _Link(self._binary(DAG_PB, block), len(block), len(chunk))
            self._block = block
        self._push(0, link)

    def _push(self, depth: int, link: _Link) -> None:
        # A full level becomes a parent only when another node arrives for it, so
        # that a level which ends full is the root rather than a parent's only child.
        if len(self._levels[depth]) == self._max_links:
            parent = self._parent(self._levels[depth])
            self._levels[depth] = []
            if depth + 1 == len(self._levels):
                self._levels.append([])
            self._push(depth + 1, parent)
        self._levels[depth].append(link)

    def _parent(self, links: list[_Link]) -> _Link:
        filesize = sum(link.filesize for link in links)
        unixfs = _number(1, 2) + _number(3, filesize)
        unixfs += b"".join(_number(4, link.filesize) for link in links)
        encoded = b"".join(
            _field(2, _field(1, link.cid) + _field(2, b"") + _number(3, link.tsize))
            for link in links
        )
        block = encoded + _field(1, unixfs)
        tsize = len(block) + sum(link.tsize for link in links)
        self._block = block
        return _Link(self._binary(DAG_PB, block), tsize, filesize)

    def _finish(self) -> _Link:
        depth = 0
        while True:
            level = self._levels[depth]
            top = depth == len(self._levels) - 1
            if top and len(level) == 1:
                return level[0]
            self._levels[depth] = []
            if top:
                self._levels.append([])
            self._push(depth + 1, self._parent(level))
            depth += 1


def cid_of(blob: bytes | bytearray | memoryview) -> str:
    """The CIDv1 ``ipfs add --cid-version=1`` gives these bytes.

    Examples
    --------
    >>> cid_of(b"hello world")
    'bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e'
    """
    hasher = UnixFSHasher()
    hasher.update(blob)
    return hasher.cid()


def cid_of_file(path: str | os.PathLike[str]) -> str:
    """:func:`cid_of` a file's bytes, read in 1 MiB pieces."""
    hasher = UnixFSHasher()
    with Path(path).open("rb") as handle:
        while piece := handle.read(_READ):
            hasher.update(piece)
    return hasher.cid()


_BASE32 = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def parse_cid(pointer: str) -> str:
    """The CID in ``ipfs://CID``, ``/ipfs/CID`` or ``CID``, checked.

    Only CIDv1 in base32 with sha2-256 and the ``raw`` or ``dag-pb`` codec are
    accepted: what :func:`cid_of` produces (and so a safe file or URL name).
    """
    if not isinstance(pointer, str):
        raise InvalidCid(
            f"a CID is a string like 'ipfs://bafy…', not {type(pointer).__name__}"
        )
    text = pointer.strip()
    for prefix in ("ipfs://", "/ipfs/"):
        if text.startswith(prefix):
            text = text[len(prefix) :].rstrip("/")
            break
    hint = "use the `uri` or `cid` that `healthlab.storage.put` returned"
    if text.startswith("Qm"):
        raise InvalidCid(
            f"{text!r} is a CIDv0; healthlab stores blobs as CIDv1 (`ipfs cid base32` "
            f"converts it, but {hint})"
        )
    if not text.startswith("b") or not set(text[1:]) <= _BASE32 or len(text) < 2:
        raise InvalidCid(f"{pointer!r} is not a base32 CIDv1 (b…); {hint}")
    padded = text[1:].upper() + "=" * (-len(text[1:]) % 8)
    try:
        raw = base64.b32decode(padded)
    except ValueError as exc:
        raise InvalidCid(f"{pointer!r} is not valid base32; {hint}") from exc
    codecs = {bytes([0x01, RAW]), bytes([0x01, DAG_PB])}
    if len(raw) != 36 or raw[:2] not in codecs or raw[2:4] != _SHA2_256:
        raise InvalidCid(
            f"{pointer!r} is not a CIDv1 of a raw or dag-pb block hashed with "
            f"sha2-256; {hint}"
        )
    if _base32(raw) != text:  # non-canonical trailing bits
        raise InvalidCid(f"{pointer!r} is not in canonical base32; {hint}")
    return text


def _digest_and_codec(cid: str) -> tuple[int, bytes]:
    text = parse_cid(cid)[1:]
    raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    return raw[1], raw[4:]


def is_raw(cid: str) -> bool:
    """Whether ``cid`` names one raw block: a file of at most :data:`CHUNK_SIZE`
    bytes (a longer file's CID is a dag-pb node's)."""
    return _digest_and_codec(cid)[0] == RAW


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, varint or bytes) of a protobuf message; ValueError if
    malformed (only wire types 0 and 2 occur in dag-pb and UnixFS)."""
    at = 0

    def varint() -> int:
        nonlocal at
        value = shift = 0
        while True:
            if at >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while at < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            length = varint()
            if at + length > len(data):
                raise ValueError("truncated field")
            yield number, data[at : at + length]
            at += length
        else:
            raise ValueError(f"wire type {wire}")


def file_size_of_root(cid: str, block: bytes) -> int:
    """The file size a dag-pb root block states, once the block is checked to be the
    one ``cid`` names (its sha2-256).

    Raises :class:`ValueError` if the block is not ``cid``'s or not a UnixFS file
    node: the caller decides what that means (a store that lies).

    Examples
    --------
    >>> hasher = UnixFSHasher()
    >>> hasher.update(bytes(300_000))
    >>> cid = hasher.cid()
    >>> file_size_of_root(cid, hasher.root_block())
    300000
    """
    codec, digest = _digest_and_codec(cid)
    if codec != DAG_PB:
        raise ValueError("not a dag-pb CID")
    if hashlib.sha256(block).digest() != digest:
        raise ValueError("the block's sha2-256 is not the CID's")
    unixfs = [value for number, value in _fields(block) if number == 1]
    if len(unixfs) != 1 or not isinstance(unixfs[0], bytes):
        raise ValueError("no UnixFS data in the node")
    fields = list(_fields(unixfs[0]))
    if (1, 2) not in fields:
        raise ValueError("not a UnixFS file node")
    sizes = [value for number, value in fields if number == 3]
    blocks = [value for number, value in fields if number == 4]
    if sizes and isinstance(sizes[0], int):
        return sizes[0]
    if blocks and all(isinstance(size, int) for size in blocks):
        return sum(size for size in blocks if isinstance(size, int))
    raise ValueError("the UnixFS node states no size")
