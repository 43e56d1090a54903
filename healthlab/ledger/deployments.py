"""Where the registry is deployed on each chain, so every process finds the same one.

Records live in ``$HEALTHLAB_HOME/deployments.json`` (default ``~/.healthlab``), keyed
by chain id and genesis hash: a fresh dev chain with the same id is another chain.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from healthlab._paths import home

__all__ = ["chain_key", "lookup", "record"]


def chain_key(chain_id: int, genesis_hash: bytes) -> str:
    """A key that tells chains apart even when they share a chain id."""
    return f"{chain_id}:{bytes(genesis_hash).hex()}"


def _path() -> Path:
    return home() / "deployments.json"


def lookup(key: str) -> dict[str, Any] | None:
    """The recorded deployment for chain ``key``, if any."""
    path = _path()
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(key)  # type: ignore[no-any-return]


def record(key: str, address: str, block: int, rpc_url: str) -> None:
    """Record a deployment atomically (concurrent notebooks never see half a file)."""
    path = _path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = {"address": address, "block": block, "rpc_url": rpc_url}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as handle:
        json.dump(data, handle, indent=1)
    os.replace(handle.name, path)
