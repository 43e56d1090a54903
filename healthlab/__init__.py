"""HealthLab: a research data collaboratory for health data, used from Jupyter."""

from __future__ import annotations

from healthlab import errors
from healthlab.ledger import Codes, Ledger, Status, sha256_of
from healthlab.sites import DisclosurePolicy, Site

__version__ = "0.1.0"

__all__ = [
    "Codes",
    "DisclosurePolicy",
    "Ledger",
    "Site",
    "Status",
    "__version__",
    "errors",
    "sha256_of",
]
