"""HealthLab: a research data collaboratory for health data, used from Jupyter."""

from __future__ import annotations

from healthlab import errors
from healthlab.ledger import Codes, Ledger, Status, sha256_of

__version__ = "0.1.0"

__all__ = ["Codes", "Ledger", "Status", "__version__", "errors", "sha256_of"]
