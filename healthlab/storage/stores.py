"""Where encrypted blobs live, named by their CID.

* :class:`LocalStore` — a folder of files named by CID (default
  ``$HEALTHLAB_HOME/blobs``). Its files can be copied as they are to any static web
  host, which then serves them to :class:`HTTPStore`.
* :class:`HTTPStore` — reads ``{base_url}/{cid}`` from any web host; an IPFS
  gateway works as ``HTTPStore("https://gateway.example/ipfs")``.
* :class:`IPFSStore` — a kubo node's HTTP RPC API: ``add`` (pinned, with the import
  settings :mod:`healthlab.storage.cid` assumes) and ``cat``.

Stores move bytes only; :func:`healthlab.storage.fetch` checks every blob's CID,
whichever store served it, and bounds its size and time
(:mod:`healthlab.storage.bounds`). A network store's part in that: it serves the
CID's root block when it can (so the size is known), yields bytes as they arrive,
and lets the fetch's deadline cut its sockets.
"""

from __future__ import annotations

import abc
import contextlib
import io
import json
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from healthlab._paths import home
from healthlab.errors import InvalidInput
from healthlab.storage.bounds import Deadline
from healthlab.storage.cid import CHUNK_SIZE, MAX_ROOT_BLOCK, parse_cid
from healthlab.storage.errors import (
    BlobNotFound,
    CidMismatch,
    ReadOnlyStore,
    StorageError,
    StoreRefused,
    StoreUnreachable,
)

__all__ = [
    "BlobStore",
    "HTTPStore",
    "IPFSStore",
    "LocalStore",
    "Store",
    "default_store",
]

_PIECE = 1 << 20


class BlobStore(abc.ABC):
    """A place that keeps blobs by CID."""

    #: Why :meth:`add_file` cannot work here (None: it can).
    read_only: ClassVar[str | None] = None

    def staging_dir(self) -> Path | None:
        """Where ``put`` writes a blob before :meth:`add_file` (None: the system's
        temp folder)."""
        return None

    @abc.abstractmethod
    def add_file(self, path: Path, cid: str) -> None:
        """Keep the blob in file ``path`` under ``cid`` (computed by the caller).

        The store may move the file away; the caller removes it if it is still there.
        """

    @abc.abstractmethod
    def open(
        self, cid: str, *, deadline: Deadline | None = None
    ) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        """The blob's bytes in pieces of at most 1 MiB as they arrive, unchecked.

        A network store never blocks past ``deadline``. Raises :class:`BlobNotFound`
        when the store has no such blob.
        """

    def root_block(self, cid: str, *, deadline: Deadline | None = None) -> bytes | None:
        """The raw bytes of the dag-pb root block of ``cid`` (at most
        ``MAX_ROOT_BLOCK`` bytes), unchecked; None if this store serves no blocks.
        The fetch reads the blob's size in it, once its hash is checked."""
        return None


#: Another name for :class:`BlobStore`.
Store = BlobStore


class LocalStore(BlobStore):
    """A folder of blobs, one file per CID, written atomically.

    Examples
    --------
    >>> import tempfile
    >>> store = LocalStore(tempfile.mkdtemp())
    >>> store.cids()
    []
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def path(self, cid: str) -> Path:
        """The file that holds (or would hold) blob ``cid``."""
        return self.root / parse_cid(cid)

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, str) and self.path(cid).is_file()

    def cids(self) -> list[str]:
        """The CIDs of the blobs in the folder, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.name.startswith("b"))

    def staging_dir(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def add_file(self, path: Path, cid: str) -> None:
        target = self.path(cid)
        if target.is_file():  # same CID, same bytes: nothing to do
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if Path(path).parent.resolve() != self.root.resolve():
            with (
                Path(path).open("rb") as source,
                tempfile.NamedTemporaryFile(
                    dir=self.root, prefix=".put-", delete=False
                ) as copy,
            ):
                while piece := source.read(_PIECE):
                    copy.write(piece)
            path = Path(copy.name)
        os.chmod(path, 0o644)  # ciphertext, meant to be published
        os.replace(path, target)

    @contextlib.contextmanager
    def open(
        self, cid: str, *, deadline: Deadline | None = None
    ) -> Iterator[Iterator[bytes]]:
        path = self.path(cid)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise BlobNotFound(
                f"no blob {cid} in {self.root}: fetch it from the store the owner "
                "published it to (e.g. store=HTTPStore(...) or IPFSStore(...))"
            ) from None
        with handle:
            yield iter(lambda: handle.read(_PIECE), b"")


def default_store() -> LocalStore:
    """The local store in ``$HEALTHLAB_HOME/blobs`` (``~/.healthlab/blobs``)."""
    return LocalStore(home() / "blobs")


def _check_url(url: str, what: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InvalidInput(f"{what} must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


def _unreachable(
    url: str, exc: Exception, deadline: Deadline | None = None
) -> StorageError:
    if deadline is not None and deadline.expired():  # the watchdog cut the socket
        return deadline.error(url)
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError) or (
        "timed out" in str(exc).lower()
    ):
        why = "timed out"
    elif isinstance(
        exc,
        requests.exceptions.ChunkedEncodingError | urllib3.exceptions.ProtocolError,
    ):
        why = "the connection broke while sending the blob"
    else:
        why = f"could not connect ({type(exc).__name__})"
    return StoreUnreachable(
        f"{url}: {why}; check the address, that the host is up, and your network"
    )


def _cuttable_pool(
    pool: type[HTTPConnectionPool], connection: type[HTTPConnection], opened: list[Any]
) -> type[HTTPConnectionPool]:
    class Connection(connection):  # type: ignore[valid-type,misc]
        def _new_conn(self) -> socket.socket:
            sock: socket.socket = super()._new_conn()
            opened.append(sock)
            return sock

    class Pool(pool):  # type: ignore[valid-type,misc]
        ConnectionCls = Connection

    return Pool


class _CuttableAdapter(HTTPAdapter):
    """requests' adapter, remembering every socket it opens so that :meth:`cut`
    can shut them down from another thread (a read blocked on them returns)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.sockets: list[socket.socket] = []
        self.poolmanager.pool_classes_by_scheme = {
            "http": _cuttable_pool(HTTPConnectionPool, HTTPConnection, self.sockets),
            "https": _cuttable_pool(HTTPSConnectionPool, HTTPSConnection, self.sockets),
        }

    def cut(self) -> None:
        for sock in list(self.sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Transfer:
    """One store request (or two) under a fetch's deadline.

    Its own session (unless the caller gave one) opens sockets the deadline's
    watchdog can shut down, so a server that stalls or trickles its headers or body
    is stopped at the deadline; with a caller's session, the body is.
    """

    def __init__(self, given: requests.Session | None, deadline: Deadline | None):
        self.deadline = deadline
        self._own = given is None
        self.session = requests.Session() if given is None else given
        self._adapter: _CuttableAdapter | None = None
        if given is None:
            self._adapter = _CuttableAdapter()
            self.session.mount("http://", self._adapter)
            self.session.mount("https://", self._adapter)
        self._responses: list[requests.Response] = []

    def timeout(self, per_read: float) -> float:
        return per_read if self.deadline is None else self.deadline.timeout(per_read)

    def watch(self, response: requests.Response) -> requests.Response:
        self._responses.append(response)
        return response

    def cut(self) -> None:
        if self._adapter is not None:
            self._adapter.cut()
        for response in list(self._responses):
            with contextlib.suppress(Exception):
                response.raw.shutdown()

    def __enter__(self) -> _Transfer:
        self._watchdog = (
            contextlib.nullcontext()
            if self.deadline is None
            else self.deadline.watchdog(self.cut)
        )
        self._watchdog.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._watchdog.__exit__(None, None, None)
        finally:
            if self._own:
                self.session.close()


def _stream(
    response: requests.Response, url: str, deadline: Deadline | None
) -> Iterator[bytes]:
    """The body in pieces as they arrive (one read each, so a trickle is seen)."""
    raw = response.raw
    while True:
        try:
            piece = raw.read1(_PIECE, decode_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _unreachable(url, exc, deadline) from None
        if deadline is not None:
            deadline.check(url)  # a cut read ends like the body does: say why
        if not piece:
            return
        yield piece


def _root_block(
    response: requests.Response, url: str, deadline: Deadline | None
) -> bytes | None:
    """A CID's root block from ``response``, within the fetch's deadline (None
    when larger than :data:`MAX_ROOT_BLOCK`)."""
    try:
        block = _head(response, MAX_ROOT_BLOCK)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _unreachable(url, exc, deadline) from None
    if deadline is not None:
        deadline.check(url)  # cut short by the watchdog
    return block


def _head(response: requests.Response, limit: int) -> bytes | None:
    """The body if it has at most ``limit`` bytes, else None (read no further)."""
    data = b""
    while len(data) <= limit:
        piece = response.raw.read1(limit + 1 - len(data), decode_content=True)
        if not piece:
            return data
        data += piece
    return None


#: The media type of one raw block (the trustless gateway specification).
IPLD_RAW = "application/vnd.ipld.raw"


class HTTPStore(BlobStore):
    """Blobs on any web host at ``{base_url}/{cid}`` (read-only).

    Publish a :class:`LocalStore`'s files as they are; an IPFS gateway works too:
    ``HTTPStore("https://gateway.example/ipfs")``. A gateway also serves a CID's
    root block (``?format=raw``), which tells the fetch the blob's size; from a
    static host the fetch is held to its ``max_size``.
    """

    read_only = (
        "an HTTPStore only reads: put into a LocalStore (or an IPFSStore), then "
        "copy its files to your web host as they are (each is named by its CID)"
    )

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = _check_url(base_url, "base_url")
        self.timeout = timeout
        self._session = session

    def __repr__(self) -> str:
        return f"HTTPStore({self.base_url!r})"

    def add_file(self, path: Path, cid: str) -> None:
        raise ReadOnlyStore(str(self.read_only))

    def _get(self, transfer: _Transfer, url: str, **kwargs: Any) -> requests.Response:
        wait = transfer.timeout(self.timeout)
        try:
            return transfer.watch(
                transfer.session.get(url, stream=True, timeout=wait, **kwargs)
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _unreachable(url, exc, transfer.deadline) from None

    def root_block(self, cid: str, *, deadline: Deadline | None = None) -> bytes | None:
        url = f"{self.base_url}/{parse_cid(cid)}?format=raw"
        headers = {"Accept": IPLD_RAW, "Accept-Encoding": "identity"}
        with _Transfer(self._session, deadline) as transfer:
            response = self._get(transfer, url, headers=headers)
            with response:
                kind = response.headers.get("Content-Type", "")
                if response.status_code != 200 or not kind.startswith(IPLD_RAW):
                    return None  # a static host, or no such blob: the GET says
                return _root_block(response, url, deadline)

    @contextlib.contextmanager
    def open(
        self, cid: str, *, deadline: Deadline | None = None
    ) -> Iterator[Iterator[bytes]]:
        url = f"{self.base_url}/{parse_cid(cid)}"
        with _Transfer(self._session, deadline) as transfer:
            response = self._get(transfer, url, headers={"Accept-Encoding": "identity"})
            with response:
                yield _checked(response, url, cid, deadline)


def _checked(
    response: requests.Response, url: str, cid: str, deadline: Deadline | None
) -> Iterator[bytes]:
    """The body of a 200 answer in pieces, or the error its status means."""
    if response.status_code in (404, 410):
        raise BlobNotFound(
            f"{url} answered {response.status_code}: the host has no blob {cid}; "
            "check the pointer, or ask the owner where it is published"
        )
    if response.status_code != 200:
        raise StoreRefused(
            f"{url} answered HTTP {response.status_code} {response.reason}; try "
            "again later or ask the host's administrator"
        )
    return _stream(response, url, deadline)


class _Multipart:
    """A multipart/form-data body of one file, streamed with a Content-Length."""

    def __init__(self, path: Path, filename: str) -> None:
        self.boundary = uuid.uuid4().hex
        head = (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._size = len(head) + path.stat().st_size + len(tail)
        self._file = path.open("rb")
        self._parts: list[Any] = [io.BytesIO(head), self._file, io.BytesIO(tail)]

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        out = b""
        while self._parts and (size < 0 or len(out) < size):
            piece = self._parts[0].read(-1 if size < 0 else size - len(out))
            if not piece:
                self._parts.pop(0)
            out += piece
        return out

    def __iter__(self) -> Iterator[bytes]:
        return iter(lambda: self.read(_PIECE), b"")

    def close(self) -> None:
        self._file.close()


class IPFSStore(BlobStore):
    """A kubo node's HTTP RPC API (``ipfs daemon``; default ``127.0.0.1:5001``).

    ``add`` pins the blob with CIDv1, raw leaves and 256 KiB chunks, and checks the
    node computed the same CID as healthlab; ``cat`` reads it back (from the node,
    or through it from the IPFS network); ``block/get`` of the root tells the fetch
    the blob's size first.
    """

    def __init__(
        self,
        api_url: str = "http://127.0.0.1:5001",
        *,
        timeout: float = 60.0,
        session: requests.Session | None = None,
    ) -> None:
        self.api_url = _check_url(api_url, "api_url")
        self.timeout = timeout
        self._session = session

    def __repr__(self) -> str:
        return f"IPFSStore({self.api_url!r})"

    def _post(
        self,
        transfer: _Transfer,
        command: str,
        params: dict[str, str],
        **kwargs: Any,
    ) -> requests.Response:
        url = f"{self.api_url}/api/v0/{command}"
        try:
            response = transfer.watch(
                transfer.session.post(
                    url,
                    params=params,
                    stream=True,  # read on only within bounds
                    timeout=transfer.timeout(self.timeout),
                    **kwargs,
                )
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _unreachable(url, exc, transfer.deadline) from None
        if response.status_code != 200:
            with response:
                message = _node_message(response)
            if "not found" in message.lower():
                raise BlobNotFound(
                    f"the IPFS node at {self.api_url} cannot find {params.get('arg')}: "
                    f"{message}; check the pointer, or pin the blob on this node"
                )
            raise StoreRefused(
                f"the IPFS node at {self.api_url} refused `{command}` (HTTP "
                f"{response.status_code}): {message}"
            )
        return response

    def add_file(self, path: Path, cid: str) -> None:
        params = {
            "cid-version": "1",
            "raw-leaves": "true",
            "chunker": f"size-{CHUNK_SIZE}",
            "hash": "sha2-256",
            "pin": "true",
            "progress": "false",
        }
        body = _Multipart(Path(path), cid)
        kind = f"multipart/form-data; boundary={body.boundary}"
        with _Transfer(self._session, None) as transfer:
            try:
                response = self._post(
                    transfer, "add", params, data=body, headers={"Content-Type": kind}
                )
            finally:
                body.close()
            with response:
                lines = [ln for ln in response.text.splitlines() if ln.strip()]
        try:
            theirs = json.loads(lines[-1])["Hash"]
        except (IndexError, KeyError, ValueError):
            raise StoreRefused(
                f"the IPFS node at {self.api_url} gave no CID for the blob: is it a "
                "kubo RPC API (`ipfs daemon`)?"
            ) from None
        if theirs != cid:
            raise CidMismatch(
                f"the IPFS node at {self.api_url} computed {theirs} for the blob, "
                f"healthlab computed {cid}; the node ignored the import settings "
                "(cid-version=1, raw-leaves, size-262144 chunker): upgrade it to a "
                "recent kubo. Nothing was registered"
            )

    def root_block(self, cid: str, *, deadline: Deadline | None = None) -> bytes | None:
        url = f"{self.api_url}/api/v0/block/get"
        with _Transfer(self._session, deadline) as transfer:
            try:
                response = self._post(transfer, "block/get", {"arg": parse_cid(cid)})
            except (BlobNotFound, StoreRefused):
                return None  # `cat` says what is wrong (or is held to max_size)
            with response:
                return _root_block(response, url, deadline)

    @contextlib.contextmanager
    def open(
        self, cid: str, *, deadline: Deadline | None = None
    ) -> Iterator[Iterator[bytes]]:
        with _Transfer(self._session, deadline) as transfer:
            response = self._post(transfer, "cat", {"arg": parse_cid(cid)})
            with response:
                yield _stream(response, f"{self.api_url}/api/v0/cat", deadline)


def _node_message(response: requests.Response) -> str:
    try:
        body = _head(response, 65_536)  # an error message, not a stream
    except (urllib3.exceptions.HTTPError, OSError):
        body = None
    if body is None:
        return response.reason
    try:
        return str(json.loads(body)["Message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace").strip() or response.reason
