"""Where HealthLab keeps its state on this machine."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["home"]


def home() -> Path:
    """HealthLab's state folder (``$HEALTHLAB_HOME`` or ``~/.healthlab``)."""
    return Path(os.environ.get("HEALTHLAB_HOME", Path.home() / ".healthlab"))
