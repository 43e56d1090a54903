"""What one fetch may cost: at most the blob's size, and an overall deadline.

Every fetch, whatever the store, passes the bytes served through :func:`bounded`:

* **Size.** A blob is read up to its known size and no further: a raw CID names one
  block of at most 262,144 bytes; a dag-pb CID's root block (asked of the store
  first, and accepted only if its sha2-256 is the CID's) states the file size. A
  store that serves no blocks (a static web host) is held to ``max_size``
  (:data:`DEFAULT_MAX_SIZE` unless given). One byte more stops the fetch with
  :class:`~healthlab.storage.errors.BlobTooLarge`; what was in flight is at most
  one 1 MiB piece.
* **Time.** The whole fetch (root block, connection, headers, body) has one
  deadline (:data:`DEFAULT_DEADLINE` seconds, or ``$HEALTHLAB_FETCH_DEADLINE``, or
  ``deadline=``). Network stores arm a watchdog that shuts their sockets down at
  the deadline, so a read blocked on a stalled or trickling server returns at once;
  the fetch then stops with :class:`~healthlab.storage.errors.FetchDeadlineExceeded`.

Decryption (:func:`healthlab.storage.encryption.decrypt_stream`) stops at the first
segment that fails authentication, before reading the next one.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from healthlab.errors import ConfigurationError, InvalidInput
from healthlab.storage.cid import CHUNK_SIZE, file_size_of_root, is_raw
from healthlab.storage.errors import (
    BlobTooLarge,
    CidMismatch,
    FetchDeadlineExceeded,
)

if TYPE_CHECKING:
    from healthlab.storage.stores import BlobStore

__all__ = [
    "DEADLINE_VARIABLE",
    "DEFAULT_DEADLINE",
    "DEFAULT_MAX_SIZE",
    "Deadline",
    "Limit",
    "blob_limit",
    "bounded",
]

#: Seconds a whole fetch may take unless ``deadline=`` or the variable says.
DEFAULT_DEADLINE = 600.0
#: The environment variable that overrides :data:`DEFAULT_DEADLINE`.
DEADLINE_VARIABLE = "HEALTHLAB_FETCH_DEADLINE"
#: Bytes a blob may have when its store serves no root block to tell its size.
DEFAULT_MAX_SIZE = 4 << 30


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInput(f"{what} is a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise InvalidInput(
            f"{what} must be a positive number of seconds, got {value!r}"
        )
    return seconds


class Deadline:
    """The moment a fetch must be over, on the monotonic clock.

    ``Deadline(None)`` takes ``$HEALTHLAB_FETCH_DEADLINE`` or
    :data:`DEFAULT_DEADLINE`.
    """

    def __init__(self, seconds: float | None = None) -> None:
        if seconds is None:
            text = os.environ.get(DEADLINE_VARIABLE)
            if text is None:
                seconds = DEFAULT_DEADLINE
            else:
                try:
                    seconds = _seconds(text, DEADLINE_VARIABLE)
                except InvalidInput:
                    raise ConfigurationError(
                        f"{DEADLINE_VARIABLE}={text!r} is not a positive number of "
                        "seconds: set it like 600, or unset it"
                    ) from None
        self.seconds = _seconds(seconds, "deadline")
        self._end = time.monotonic() + self.seconds

    def __repr__(self) -> str:
        return f"Deadline({self.seconds:g} s, {self.remaining():.3f} s left)"

    def remaining(self) -> float:
        """Seconds left (0 once passed)."""
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self._end

    def timeout(self, per_read: float) -> float:
        """A per-read timeout that never reaches past the deadline."""
        return max(0.001, min(per_read, self.remaining()))

    def error(self, source: str) -> FetchDeadlineExceeded:
        return FetchDeadlineExceeded(
            f"{source} had not delivered the blob when the fetch's {self.seconds:g} s "
            "deadline passed; it was stopped and nothing was returned: fetch from "
            f"another store, or allow longer with deadline= (or {DEADLINE_VARIABLE}) "
            "for a large dataset on a slow link"
        )

    def check(self, source: str) -> None:
        if self.expired():
            raise self.error(source)

    @contextlib.contextmanager
    def watchdog(self, cut: Callable[[], None]) -> Iterator[None]:
        """Call ``cut`` (from another thread) if the block is still running at the
        deadline: a network store shuts its sockets down, which wakes a blocked read.
        """
        timer = threading.Timer(self.remaining(), _quietly(cut))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()


def _quietly(cut: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with contextlib.suppress(Exception):  # the transfer may already be over
            cut()

    return run


@dataclass(frozen=True)
class Limit:
    """The most bytes a blob may have, and where that number comes from."""

    size: int
    source: str


def blob_limit(
    cid: str, store: BlobStore, deadline: Deadline, max_size: int | None = None
) -> Limit:
    """The blob's size bound: from the CID (raw: one block), its root block (asked
    of the store, checked against the CID), or ``max_size``."""
    if max_size is None:
        max_size = DEFAULT_MAX_SIZE
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
        raise InvalidInput(f"max_size is a number of bytes >= 0, got {max_size!r}")
    if is_raw(cid):
        return Limit(min(CHUNK_SIZE, max_size), "a raw CID is a single block")
    block = store.root_block(cid, deadline=deadline)
    if block is None:
        return Limit(
            max_size,
            "max_size: the store serves no root block to tell the blob's size; "
            "pass a larger max_size if the dataset is that large",
        )
    try:
        size = file_size_of_root(cid, block)
    except ValueError as exc:
        raise CidMismatch(
            f"{store!r} served a root block for {cid} that is not the CID's ({exc}): "
            "it was altered or swapped. Nothing was fetched; use another store"
        ) from None
    return Limit(size, "the size its CID's root block states")


def bounded(
    chunks: Iterable[bytes],
    limit: Limit,
    deadline: Deadline,
    store: BlobStore,
    cid: str,
) -> Iterator[bytes]:
    """``chunks`` as served, stopped at the first byte past ``limit`` or when the
    deadline passes."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > limit.size:
            raise BlobTooLarge(
                f"{store!r} sent more than the {limit.size:,} bytes blob {cid} may "
                f"have ({limit.source}); it was stopped and nothing was returned: "
                "fetch from another store"
            )
        deadline.check(repr(store))
        yield chunk
    deadline.check(repr(store))
