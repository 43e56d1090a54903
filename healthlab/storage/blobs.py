"""``put`` a dataset encrypted under a fresh key; ``fetch`` it back, checked."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from healthlab.errors import InvalidInput
from healthlab.storage.bounds import Deadline, blob_limit, bounded
from healthlab.storage.cid import UnixFSHasher, parse_cid
from healthlab.storage.encryption import (
    KEY_SIZE,
    check_key,
    decrypt_stream,
    encrypt_stream,
)
from healthlab.storage.errors import (
    BlobCorrupted,
    CidMismatch,
    ContentHashMismatch,
    MissingDependency,
    ReadOnlyStore,
    WrongKey,
)
from healthlab.storage.stores import BlobStore, default_store

if TYPE_CHECKING:
    from healthlab.storage.keyring import Keyring

__all__ = [
    "OCTET_STREAM",
    "PARQUET",
    "Stored",
    "fetch",
    "fetch_file",
    "fetch_frame",
    "put",
]

PARQUET = "application/vnd.apache.parquet"
OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True)
class Stored:
    """What :func:`put` stored: the pointer and hash to register, and the data key.

    ``key`` is secret: it is left out of ``repr`` and ``str``; keep it in a
    :class:`~healthlab.storage.Keyring` and release it with
    :func:`~healthlab.storage.seal_key`.
    """

    cid: str
    content_hash: bytes
    size: int
    encrypted_size: int
    media_type: str
    key: bytes = field(repr=False)

    @property
    def uri(self) -> str:
        """The pointer an owner registers: ``ipfs://CID``."""
        return f"ipfs://{self.cid}"

    @property
    def content_hash_hex(self) -> str:
        """``content_hash`` as ``0x`` and 64 hex digits."""
        return "0x" + self.content_hash.hex()


def _require_pyarrow() -> None:
    try:
        importlib.import_module("pyarrow")
    except ImportError:
        raise MissingDependency(
            "DataFrames are stored as Parquet, which needs the pyarrow package: "
            "run `pip install pyarrow` (or store the bytes of a file instead)"
        ) from None


@contextlib.contextmanager
def _source(data: object) -> Iterator[tuple[Callable[[int], bytes], str]]:
    """``read(n)`` over the plaintext, and its media type."""
    if isinstance(data, bytes | bytearray | memoryview):
        yield io.BytesIO(bytes(data)).read, OCTET_STREAM
    elif isinstance(data, os.PathLike):
        path = Path(data)
        if not path.is_file():
            raise InvalidInput(f"{path} is not a file: give the dataset file's path")
        kind = PARQUET if path.suffix.lower() == ".parquet" else OCTET_STREAM
        with path.open("rb") as handle:
            yield handle.read, kind
    elif isinstance(data, pd.DataFrame):
        _require_pyarrow()
        buffer = io.BytesIO()
        data.to_parquet(buffer, engine="pyarrow")
        buffer.seek(0)
        yield buffer.read, PARQUET
    elif isinstance(data, str):
        raise InvalidInput(
            "put() takes bytes, a pandas DataFrame or a file as a pathlib.Path; a "
            "str is ambiguous: pass Path(name) for a file or text.encode() for text"
        )
    else:
        raise InvalidInput(
            f"put() takes bytes, a pandas DataFrame or a pathlib.Path, not "
            f"{type(data).__name__}"
        )


def put(
    data: bytes | os.PathLike[str] | pd.DataFrame,
    store: BlobStore | None = None,
    *,
    keyring: Keyring | None = None,
) -> Stored:
    """Encrypt ``data`` under a fresh key and keep the blob in ``store`` by its CID.

    Parameters
    ----------
    data:
        The dataset: bytes, a file (``pathlib.Path``) or a DataFrame (stored as
        Parquet). Files are read in 1 MiB pieces, never whole.
    store:
        Where the blob goes (default: :func:`default_store`).
    keyring:
        Where the data key is kept too (recommended: ``Keyring()``).

    Returns
    -------
    Stored
        ``uri`` and ``content_hash`` to register, ``key`` to keep secret.

    Examples
    --------
    >>> import tempfile
    >>> from healthlab.storage import LocalStore, fetch
    >>> store = LocalStore(tempfile.mkdtemp())
    >>> stored = put(b"id,age\\n1,54\\n", store)
    >>> fetch(stored.uri, stored.key, content_hash=stored.content_hash, store=store)
    b'id,age\\n1,54\\n'
    """
    store = default_store() if store is None else store
    if store.read_only is not None:
        raise ReadOnlyStore(store.read_only)
    key = os.urandom(KEY_SIZE)
    plain, hasher, size = hashlib.sha256(), UnixFSHasher(), 0
    with _source(data) as (read, media_type):

        def tee(n: int) -> bytes:
            nonlocal size
            piece = read(n)
            plain.update(piece)
            size += len(piece)
            return piece

        staging = store.staging_dir()
        if staging is not None:
            staging.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=staging, prefix=".put-", delete=False
        ) as handle:
            temp = Path(handle.name)
            try:
                for piece in encrypt_stream(tee, key):
                    hasher.update(piece)
                    handle.write(piece)
            except BaseException:
                handle.close()
                temp.unlink(missing_ok=True)
                raise
    try:
        stored = Stored(
            cid=hasher.cid(),
            content_hash=plain.digest(),
            size=size,
            encrypted_size=temp.stat().st_size,
            media_type=media_type,
            key=key,
        )
        store.add_file(temp, stored.cid)
    finally:
        temp.unlink(missing_ok=True)
    if keyring is not None:
        keyring.add(stored)
    return stored


def _content_hash(value: object) -> bytes:
    if isinstance(value, str):
        text = value.removeprefix("0x")
        try:
            value = bytes.fromhex(text)
        except ValueError:
            value = b""
    if not isinstance(value, bytes | bytearray | memoryview) or len(value) != 32:
        raise InvalidInput(
            "content_hash is the dataset's sha256 as registered: 32 bytes or 0x and "
            "64 hex digits (see `Stored.content_hash` or the ledger's dataset record)"
        )
    return bytes(value)


def _verified(
    uri_or_cid: str,
    key: bytes,
    content_hash: bytes | str,
    store: BlobStore | None,
    sink: Callable[[bytes], object],
    *,
    max_size: int | None,
    deadline: float | None,
) -> str:
    """Stream blob ``cid`` from the store, decrypt into ``sink``, check everything.

    The served bytes are bounded (:mod:`healthlab.storage.bounds`: the blob's size,
    the deadline); decryption stops at the first segment that fails, reading
    nothing more; the CID and the plaintext hash are checked after the last segment.
    """
    cid = parse_cid(uri_or_cid)
    key = check_key(key)
    expected = _content_hash(content_hash)
    store = default_store() if store is None else store
    clock = Deadline(deadline)
    hasher, plain = UnixFSHasher(), hashlib.sha256()

    def hashed(chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            hasher.update(chunk)
            yield chunk

    limit = blob_limit(cid, store, clock, max_size)
    with store.open(cid, deadline=clock) as chunks:
        try:
            for segment in decrypt_stream(
                hashed(bounded(chunks, limit, clock, store, cid)), key
            ):
                plain.update(segment)
                sink(segment)
        except (BlobCorrupted, WrongKey) as exc:  # say which blob, from where
            raise type(exc)(f"{cid} from {store!r}: {exc}") from None
    actual = hasher.cid()
    if actual != cid:
        raise CidMismatch(
            f"{store!r} served a blob whose CID is {actual}, not {cid}: it was "
            "altered or swapped. Nothing was returned; fetch from another store"
        )
    if plain.digest() != expected:
        raise ContentHashMismatch(
            f"the content of {cid} has sha256 0x{plain.hexdigest()}, not the "
            f"registered 0x{expected.hex()}: the owner registered another version, "
            "or this is another dataset's pointer. Nothing was returned"
        )
    return cid


def fetch(
    uri_or_cid: str,
    key: bytes,
    *,
    content_hash: bytes | str,
    store: BlobStore | None = None,
    max_size: int | None = None,
    deadline: float | None = None,
) -> bytes:
    """The dataset behind ``ipfs://CID``, checked and decrypted.

    The blob's CID must be the one asked for, every segment must authenticate under
    ``key``, and the plaintext's sha256 must be ``content_hash``; otherwise a
    :class:`~healthlab.storage.errors.BlobRejected` says which check failed and
    nothing is returned.

    At most the blob's size is read: a raw CID's block is at most 256 KiB, a dag-pb
    CID's root block (from an IPFS node or gateway) states it; a store that serves
    no blocks (a static web host) is held to ``max_size`` (bytes, default 4 GiB).
    ``deadline`` (seconds) bounds the whole fetch (default
    ``$HEALTHLAB_FETCH_DEADLINE`` or 600). A store that sends more stops the fetch
    with :class:`~healthlab.storage.errors.BlobTooLarge`, one too slow with
    :class:`~healthlab.storage.errors.FetchDeadlineExceeded`; a segment that fails
    to authenticate stops it before anything more is read.
    """
    parts: list[bytes] = []
    _verified(
        uri_or_cid,
        key,
        content_hash,
        store,
        parts.append,
        max_size=max_size,
        deadline=deadline,
    )
    return b"".join(parts)


def fetch_frame(
    uri_or_cid: str,
    key: bytes,
    *,
    content_hash: bytes | str,
    store: BlobStore | None = None,
    max_size: int | None = None,
    deadline: float | None = None,
) -> pd.DataFrame:
    """:func:`fetch` a dataset stored from a DataFrame, as a DataFrame (same checks
    and bounds)."""
    _require_pyarrow()
    data = fetch(
        uri_or_cid,
        key,
        content_hash=content_hash,
        store=store,
        max_size=max_size,
        deadline=deadline,
    )
    try:
        frame = pd.read_parquet(io.BytesIO(data), engine="pyarrow")
    except Exception as exc:  # pyarrow raises several kinds for non-Parquet bytes
        raise InvalidInput(
            f"{uri_or_cid} is not a Parquet table ({type(exc).__name__}); use "
            "fetch() for its bytes"
        ) from None
    return frame


def fetch_file(
    uri_or_cid: str,
    key: bytes,
    path: str | os.PathLike[str],
    *,
    content_hash: bytes | str,
    store: BlobStore | None = None,
    max_size: int | None = None,
    deadline: float | None = None,
) -> Path:
    """:func:`fetch` into file ``path`` in bounded memory; the file appears (renamed
    into place) only once every check passed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}-", delete=False
    ) as handle:
        temp = Path(handle.name)
        try:
            _verified(
                uri_or_cid,
                key,
                content_hash,
                store,
                handle.write,
                max_size=max_size,
                deadline=deadline,
            )
        except BaseException:
            handle.close()
            temp.unlink(missing_ok=True)
            raise
    os.replace(temp, target)
    return target
