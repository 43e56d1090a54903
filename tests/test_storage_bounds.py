"""A fetch is bounded, whatever the store: at most the blob's size (as its CID's DAG
states it, or ``max_size``), one deadline for the whole fetch, and nothing read past
the first segment that fails to authenticate.

Each attack runs against a real server on 127.0.0.1 (a port of its own, stopped
after the test) speaking both a web host's ``GET /{cid}`` and a kubo node's
``POST /api/v0/cat``; the server counts what it managed to send, so the tests see
that the client hung up early, not only that it raised.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from healthlab.errors import ConfigurationError, InvalidInput
from healthlab.storage import HTTPStore, IPFSStore, LocalStore, cid_of, fetch, put
from healthlab.storage.bounds import DEFAULT_MAX_SIZE, Deadline
from healthlab.storage.cid import CHUNK_SIZE, UnixFSHasher
from healthlab.storage.encryption import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    decrypt_stream,
    encrypt,
)
from healthlab.storage.errors import (
    BlobCorrupted,
    BlobTooLarge,
    CidMismatch,
    FetchDeadlineExceeded,
    StorageError,
)

MiB = 1 << 20
#: What a hostile server offers to send: far more than any bound here.
OFFER = 1 << 30
#: What may be in flight when the client stops: a 1 MiB piece and loopback socket
#: buffers (a few MiB); a bound "held" means well under OFFER.
SLACK = 16 * MiB
KINDS = ["http", "ipfs"]


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def root_block_of(blob: bytes) -> bytes | None:
    hasher = UnixFSHasher()
    hasher.update(blob)
    hasher.cid()
    return hasher.root_block()


class Hostile:
    """A store that serves ``pieces()`` (pausing ``pause`` s between them) for any
    blob, and ``root`` (if given) as the root block (``?format=raw`` with the raw
    media type, or ``/api/v0/block/get``). It records what it sent."""

    def __init__(
        self,
        pieces: Callable[[], Iterable[bytes]],
        *,
        root: bytes | None = None,
        pause: float = 0.0,
        trickle_headers: bool = False,
        stall: bool = False,
    ) -> None:
        self.pieces, self.root, self.pause = pieces, root, pause
        self.trickle_headers, self.stall = trickle_headers, stall
        self.sent = 0
        self.requests: list[str] = []
        self.client_left = False
        self.finished = threading.Event()  # the body's handler returned
        self.release = threading.Event()  # set at teardown: a stalled handler ends

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self) -> None:  # small send buffer: `sent` is nearly exact
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
                super().setup()

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.urlsplit(self.path).query
                raw = "format=raw" in query
                self.answer(raw and self.headers.get("Accept", "").endswith("raw"))

            def do_POST(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                self.answer(path == "/api/v0/block/get")

            def answer(self, block: bool) -> None:
                server.requests.append(self.path)
                if block:
                    if server.root is None:
                        self.send_error(404, "no block")
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "application/vnd.ipld.raw")
                    self.send_header("Content-Length", str(len(server.root)))
                    self.end_headers()
                    self.wfile.write(server.root)
                    return
                try:
                    self.body()
                except OSError:
                    server.client_left = True
                finally:
                    server.finished.set()

            def body(self) -> None:
                if server.trickle_headers:
                    self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                    give_up = time.monotonic() + 20  # a client that never stops fails
                    while not server.release.is_set() and time.monotonic() < give_up:
                        self.wfile.write(b"a")
                        server.sent += 1
                        server.release.wait(0.05)
                    return
                self.send_response(200)  # no Content-Length: read until close
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if server.stall:
                    server.release.wait(30)
                    return
                for piece in server.pieces():
                    self.wfile.write(piece)
                    server.sent += len(piece)
                    if server.pause:
                        server.release.wait(server.pause)

        return Handler

    @contextlib.contextmanager
    def serving(self, kind: str) -> Iterator[HTTPStore | IPFSStore]:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        thread = threading.Thread(target=httpd.serve_forever, args=(0.05,))
        thread.start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        try:
            yield HTTPStore(base) if kind == "http" else IPFSStore(base)
        finally:
            self.release.set()
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)


def then_endless(blob: bytes) -> Callable[[], Iterator[bytes]]:
    """The blob, then zeros up to OFFER bytes in all."""

    def pieces() -> Iterator[bytes]:
        yield blob
        zeros = bytes(256 * 1024)
        for _ in range((OFFER - len(blob)) // len(zeros)):
            yield zeros

    return pieces


def stored_blob(size: int, seed: int) -> tuple[bytes, bytes, bytes, bytes]:
    """(plaintext, key, blob, content hash)."""
    data = random_bytes(size, seed)
    key = os.urandom(32)
    return data, key, encrypt(data, key), hashlib.sha256(data).digest()


def assert_client_stopped(server: Hostile, bound: int) -> None:
    assert server.finished.wait(10), "the server was still sending after 10 s"
    assert server.client_left, "the server ran out of bytes: the client read them all"
    assert server.sent < bound + SLACK < OFFER, (server.sent, bound)


def assert_no_secret(exc: BaseException, *secrets: bytes) -> None:
    text = f"{exc} {exc!r}"
    for secret in secrets:
        assert secret.hex() not in text
        assert repr(secret)[2:-1] not in text


# ------------------------------------------------------------------ (a) size
@pytest.mark.parametrize("kind", KINDS)
def test_endless_bytes_after_a_raw_cid_stop_at_one_block(kind: str) -> None:
    data, key, blob, content_hash = stored_blob(1000, seed=1)
    cid = cid_of(blob)  # one raw block: at most 262,144 bytes
    server = Hostile(then_endless(blob))
    with server.serving(kind) as store, pytest.raises(BlobTooLarge) as caught:
        fetch(cid, key, content_hash=content_hash, store=store)
    assert "262,144 bytes" in str(caught.value)
    assert "fetch from another store" in str(caught.value)
    assert_no_secret(caught.value, key, data[:32])
    assert_client_stopped(server, CHUNK_SIZE)
    assert not any("format=raw" in r or "block/get" in r for r in server.requests)


@pytest.mark.parametrize("kind", KINDS)
def test_endless_bytes_stop_at_the_size_the_root_block_states(kind: str) -> None:
    data, key, blob, content_hash = stored_blob(3 * MiB, seed=2)
    server = Hostile(then_endless(blob), root=root_block_of(blob))
    with server.serving(kind) as store, pytest.raises(BlobTooLarge) as caught:
        fetch(cid_of(blob), key, content_hash=content_hash, store=store)
    assert f"{len(blob):,} bytes" in str(caught.value)
    assert "root block" in str(caught.value)
    assert_no_secret(caught.value, key, data[:32])
    assert_client_stopped(server, len(blob))


@pytest.mark.parametrize("kind", KINDS)
def test_a_store_without_blocks_is_held_to_max_size(kind: str) -> None:
    _, key, blob, content_hash = stored_blob(3 * MiB, seed=3)
    server = Hostile(then_endless(blob))  # serves no root block
    with server.serving(kind) as store, pytest.raises(BlobTooLarge) as caught:
        fetch(
            cid_of(blob), key, content_hash=content_hash, store=store, max_size=2 * MiB
        )
    assert "pass a larger max_size" in str(caught.value)
    assert_client_stopped(server, 2 * MiB)


def test_the_default_max_size_is_finite() -> None:
    assert 0 < DEFAULT_MAX_SIZE <= 4 << 30


@pytest.mark.parametrize("kind", KINDS)
def test_a_root_block_that_is_not_the_cids_is_refused(kind: str) -> None:
    _, key, blob, content_hash = stored_blob(3 * MiB, seed=4)
    other = root_block_of(random_bytes(2 * MiB, seed=5))
    server = Hostile(then_endless(blob), root=other)
    with server.serving(kind) as store, pytest.raises(CidMismatch, match="root block"):
        fetch(cid_of(blob), key, content_hash=content_hash, store=store)
    assert server.sent == 0  # refused before the blob was asked for


def test_a_local_file_past_its_cids_size_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "blobs")
    stored = put(b"rows of a small dataset", store)
    path = store.path(stored.cid)
    path.chmod(0o644)
    with path.open("ab") as handle:
        handle.write(bytes(CHUNK_SIZE))
    with pytest.raises(BlobTooLarge, match="262,144"):
        fetch(stored.uri, stored.key, content_hash=stored.content_hash, store=store)


# -------------------------------------------------------------- (b) deadline
@pytest.mark.parametrize("kind", KINDS)
def test_a_trickling_body_is_stopped_at_the_deadline(kind: str) -> None:
    _, key, blob, content_hash = stored_blob(3 * MiB, seed=6)

    def one_byte_at_a_time() -> Iterator[bytes]:
        for at in range(len(blob)):
            yield blob[at : at + 1]

    server = Hostile(one_byte_at_a_time, pause=0.05)
    with server.serving(kind) as store:
        started = time.monotonic()
        with pytest.raises(FetchDeadlineExceeded, match="1 s deadline") as caught:
            fetch(cid_of(blob), key, content_hash=content_hash, store=store, deadline=1)
        took = time.monotonic() - started
    assert 1.0 <= took < 2.5, took
    assert "deadline=" in str(caught.value)
    assert_client_stopped(server, 0)
    assert server.sent < 200  # about 20 bytes a second


@pytest.mark.parametrize("kind", KINDS)
def test_trickling_headers_are_stopped_at_the_deadline(kind: str) -> None:
    _, key, blob, content_hash = stored_blob(1000, seed=7)
    server = Hostile(lambda: [], trickle_headers=True)
    with server.serving(kind) as store:
        started = time.monotonic()
        with pytest.raises(FetchDeadlineExceeded):
            fetch(cid_of(blob), key, content_hash=content_hash, store=store, deadline=1)
        took = time.monotonic() - started
    assert 1.0 <= took < 2.5, took


def test_a_silent_server_is_stopped_at_the_deadline_not_the_read_timeout() -> None:
    _, key, blob, content_hash = stored_blob(1000, seed=8)
    server = Hostile(lambda: [], stall=True)
    with server.serving("http") as store:
        assert isinstance(store, HTTPStore) and store.timeout == 30
        started = time.monotonic()
        with pytest.raises(FetchDeadlineExceeded):
            fetch(cid_of(blob), key, content_hash=content_hash, store=store, deadline=1)
        took = time.monotonic() - started
    assert took < 2.5, took


def test_the_deadline_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEALTHLAB_FETCH_DEADLINE", raising=False)
    assert Deadline().seconds == 600
    monkeypatch.setenv("HEALTHLAB_FETCH_DEADLINE", "2.5")
    assert Deadline().seconds == 2.5
    assert Deadline(7).seconds == 7
    monkeypatch.setenv("HEALTHLAB_FETCH_DEADLINE", "soon")
    with pytest.raises(ConfigurationError, match="HEALTHLAB_FETCH_DEADLINE"):
        Deadline()
    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(InvalidInput, match="deadline"):
            Deadline(bad)


# ------------------------------------------------ (c) stop at the first failure
@pytest.mark.parametrize("kind", KINDS)
def test_a_tampered_first_segment_stops_the_reading(kind: str) -> None:
    data, key, blob, content_hash = stored_blob(3 * MiB, seed=9)
    cid = cid_of(blob)
    tampered = bytearray(blob)
    tampered[HEADER_SIZE + 100] ^= 0x01
    # no root block: only the failed segment, not the size bound, can stop it
    server = Hostile(then_endless(bytes(tampered)))
    with server.serving(kind) as store, pytest.raises(BlobCorrupted) as caught:
        fetch(cid, key, content_hash=content_hash, store=store)
    assert "segment 0" in str(caught.value) and cid in str(caught.value)
    assert_no_secret(caught.value, key, data[:32])
    assert_client_stopped(server, SEGMENT_SIZE)


def test_decryption_reads_nothing_past_a_failed_segment() -> None:
    _, key, blob, _ = stored_blob(3 * SEGMENT_SIZE, seed=10)
    size = SEGMENT_SIZE + TAG_SIZE
    for bad in range(3):
        tampered = bytearray(blob)
        tampered[HEADER_SIZE + bad * size + 5] ^= 0x01
        pieces = [bytes(tampered[:HEADER_SIZE])] + [
            bytes(tampered[HEADER_SIZE + i * size : HEADER_SIZE + (i + 1) * size])
            for i in range(3)
        ]
        taken: list[int] = []

        def served(pieces: list[bytes] = pieces, taken: list[int] = taken) -> Any:
            for index, piece in enumerate(pieces):
                taken.append(index)
                yield piece

        with pytest.raises(BlobCorrupted, match=f"segment {bad} "):
            list(decrypt_stream(served(), key))
        assert taken == list(range(bad + 2)), (bad, taken)  # header + 0..bad


# ---------------------------------------------------- the honest fetch still works
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "size", [0, 1000, CHUNK_SIZE, 2 * SEGMENT_SIZE, 2 * SEGMENT_SIZE + 7]
)
def test_an_honest_store_with_root_blocks_serves_in_full(kind: str, size: int) -> None:
    data, key, blob, content_hash = stored_blob(size, seed=11)
    server = Hostile(lambda: [blob], root=root_block_of(blob))
    with server.serving(kind) as store:
        got = fetch(cid_of(blob), key, content_hash=content_hash, store=store)
    assert got == data
    asked_block = any("format=raw" in r or "block/get" in r for r in server.requests)
    assert asked_block == (root_block_of(blob) is not None)


@pytest.mark.parametrize("kind", KINDS)
def test_an_honest_slow_store_within_the_deadline_serves_in_full(kind: str) -> None:
    data, key, blob, content_hash = stored_blob(SEGMENT_SIZE + 5, seed=12)
    pieces = [blob[i : i + 256 * 1024] for i in range(0, len(blob), 256 * 1024)]
    server = Hostile(lambda: pieces, pause=0.05)
    with server.serving(kind) as store:
        got = fetch(
            cid_of(blob),
            key,
            content_hash=content_hash,
            store=store,
            max_size=len(blob),  # exactly the blob: not one byte too few
            deadline=5,
        )
    assert got == data


def test_bounds_are_storage_errors() -> None:
    assert issubclass(BlobTooLarge, StorageError)
    assert issubclass(FetchDeadlineExceeded, StorageError)
    assert issubclass(FetchDeadlineExceeded, TimeoutError)
