"""Load the committed contract build artifacts (no compiler needed at run time)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from healthlab.errors import ConfigurationError

__all__ = ["load_artifact"]

_REPO_BUILD = Path(__file__).resolve().parents[2] / "contracts" / "build"


@cache
def load_artifact(name: str = "HealthLabRegistry") -> dict[str, Any]:
    """Return the artifact ``{abi, bytecode, compiler, …}`` of contract ``name``.

    Test-only contracts live under ``test/`` (e.g. ``"test/ReentrantPayee"``).
    Installed wheels carry the artifacts inside the package; a source checkout reads
    ``contracts/build`` directly.
    """
    packaged = resources.files("healthlab.ledger").joinpath(
        "_artifacts", f"{name}.json"
    )
    if packaged.is_file():
        return json.loads(packaged.read_text())  # type: ignore[no-any-return]
    path = _REPO_BUILD / f"{name}.json"
    if not path.is_file():
        raise ConfigurationError(
            f"contract artifact {name!r} not found at {path}; run `make contracts` "
            "in a source checkout, or reinstall healthlab"
        )
    return json.loads(path.read_text())  # type: ignore[no-any-return]
