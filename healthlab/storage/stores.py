"""Where encrypted blobs live, named by their CID.

* :class:`LocalStore` — a folder of files named by CID (default
  ``$HEALTHLAB_HOME/blobs``). Its files can be copied as they are to any static web
  host, which then serves them to :class:`HTTPStore`.
* :class:`HTTPStore` — reads ``{base_url}/{cid}`` from any web host; an IPFS
  gateway works as ``HTTPStore("https://gateway.example/ipfs")``.
* :class:`IPFSStore` — a kubo node's HTTP RPC API: ``add`` (pinned, with the import
  settings :mod:`healthlab.storage.cid` assumes) and ``cat``.

Stores move bytes only; :func:`healthlab.storage.fetch` checks every blob's CID,
whichever store served it.
"""

from __future__ import annotations

import abc
import contextlib
import io
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import requests

from healthlab._paths import home
from healthlab.errors import InvalidInput
from healthlab.storage.cid import CHUNK_SIZE, parse_cid
from healthlab.storage.errors import (
    BlobNotFound,
    CidMismatch,
    ReadOnlyStore,
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
    def open(self, cid: str) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        """The blob's bytes in pieces, unchecked.

        Raises :class:`BlobNotFound` when the store has no such blob.
        """


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
    def open(self, cid: str) -> Iterator[Iterator[bytes]]:
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


def _unreachable(url: str, exc: Exception) -> StoreUnreachable:
    if isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower():
        why = "timed out"
    elif isinstance(exc, requests.exceptions.ChunkedEncodingError):
        why = "the connection broke while sending the blob"
    else:
        why = f"could not connect ({type(exc).__name__})"
    return StoreUnreachable(
        f"{url}: {why}; check the address, that the host is up, and your network"
    )


@contextlib.contextmanager
def _session(given: requests.Session | None) -> Iterator[requests.Session]:
    """The caller's session, or a fresh one closed afterwards (no stray sockets)."""
    if given is not None:
        yield given
        return
    with requests.Session() as session:
        yield session


def _stream(response: requests.Response, url: str) -> Iterator[bytes]:
    try:
        yield from response.iter_content(_PIECE)
    except requests.RequestException as exc:
        raise _unreachable(url, exc) from None


class HTTPStore(BlobStore):
    """Blobs on any web host at ``{base_url}/{cid}`` (read-only).

    Publish a :class:`LocalStore`'s files as they are; an IPFS gateway works too:
    ``HTTPStore("https://gateway.example/ipfs")``.
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

    @contextlib.contextmanager
    def open(self, cid: str) -> Iterator[Iterator[bytes]]:
        url = f"{self.base_url}/{parse_cid(cid)}"
        with _session(self._session) as session:
            try:
                response = session.get(url, stream=True, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _unreachable(url, exc) from None
            with response:
                yield _checked(response, url, cid)


def _checked(response: requests.Response, url: str, cid: str) -> Iterator[bytes]:
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
    return _stream(response, url)


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
    or through it from the IPFS network).
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
        session: requests.Session,
        command: str,
        params: dict[str, str],
        **kwargs: Any,
    ) -> requests.Response:
        url = f"{self.api_url}/api/v0/{command}"
        try:
            response = session.post(url, params=params, timeout=self.timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _unreachable(url, exc) from None
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
        with _session(self._session) as session:
            try:
                response = self._post(
                    session, "add", params, data=body, headers={"Content-Type": kind}
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

    @contextlib.contextmanager
    def open(self, cid: str) -> Iterator[Iterator[bytes]]:
        with _session(self._session) as session:
            response = self._post(session, "cat", {"arg": parse_cid(cid)}, stream=True)
            with response:
                yield _stream(response, f"{self.api_url}/api/v0/cat")


def _node_message(response: requests.Response) -> str:
    try:
        return str(response.json()["Message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200].strip() or response.reason
