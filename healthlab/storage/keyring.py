"""The owner's data keys, by CID, in a file only the owner can read.

``$HEALTHLAB_HOME/keyring.json`` by default, written atomically with mode 600. Like
``HEALTHLAB_KEY_FILE``, a keyring that other users could read is refused rather than
used: its keys open the owner's datasets.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from healthlab._paths import home
from healthlab.storage.cid import parse_cid
from healthlab.storage.encryption import check_key
from healthlab.storage.errors import KeyNotInKeyring, KeyringError

if TYPE_CHECKING:
    from healthlab.storage.blobs import Stored

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["Keyring"]

_FORMAT = 1


class Keyring:
    """Data keys by CID, kept in a mode-600 JSON file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> ring = Keyring(pathlib.Path(tempfile.mkdtemp()) / "keyring.json")
    >>> len(ring)
    0
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).expanduser() if path else home() / "keyring.json"

    def __repr__(self) -> str:
        return f"Keyring({str(self.path)!r})"

    # ------------------------------------------------------------------- reading
    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        if self.path.stat().st_mode & 0o077:
            raise KeyringError(
                f"{self.path} is readable by other users; run `chmod 600 {self.path}`"
            )
        try:
            data = json.loads(self.path.read_text())
            keys = data["keys"]
            if data.get("format") != _FORMAT or not isinstance(keys, dict):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise KeyringError(
                f"{self.path} is not a healthlab keyring (format {_FORMAT}); move it "
                "away and restore it from your backup"
            ) from None
        return keys

    def key(self, cid: str) -> bytes:
        """The data key of blob ``cid`` (or ``ipfs://cid``)."""
        name = parse_cid(cid)
        entry = self._load().get(name)
        if entry is None:
            raise KeyNotInKeyring(
                f"{self.path} holds no data key for {name}: it was put with another "
                "keyring or on another machine; use that keyring, or put the data "
                "again and register the new pointer"
            )
        try:
            return bytes.fromhex(entry["key"])
        except (KeyError, ValueError, TypeError):
            raise KeyringError(
                f"the entry for {name} in {self.path} is damaged; restore the file "
                "from your backup"
            ) from None

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, str) and parse_cid(cid) in self._load()

    def __len__(self) -> int:
        return len(self._load())

    def cids(self) -> list[str]:
        """The CIDs this keyring holds keys for, sorted."""
        return sorted(self._load())

    # ------------------------------------------------------------------- writing
    def add(self, stored: Stored) -> None:
        """Keep ``stored.key`` under ``stored.cid`` (with its content hash and size)."""
        key = check_key(stored.key)
        entry = {
            "key": key.hex(),
            "content_hash": "0x" + stored.content_hash.hex(),
            "size": stored.size,
            "media_type": stored.media_type,
        }
        with self._locked():
            keys = self._load()
            keys[parse_cid(stored.cid)] = entry
            self._write({"format": _FORMAT, "keys": keys})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._parent()
        if fcntl is None:  # pragma: no cover
            yield
            return
        lock = self.path.with_name(self.path.name + ".lock")
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    def _parent(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            parent.mkdir(mode=0o700, parents=True)

    def _write(self, data: dict[str, Any]) -> None:
        descriptor, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".keyring-")
        try:
            with os.fdopen(descriptor, "w") as handle:  # mkstemp: mode 600
                json.dump(data, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
