"""Chain connection, contract artifacts and the registry client."""

from __future__ import annotations

from healthlab.ledger.client import Ledger, Purpose, deploy_registry, sha256_of
from healthlab.ledger.codes import Codes, as_codes, permits
from healthlab.ledger.records import Access, Dataset, Request, SiteKeys, Status

__all__ = [
    "Access",
    "Codes",
    "Dataset",
    "Ledger",
    "Purpose",
    "Request",
    "SiteKeys",
    "Status",
    "as_codes",
    "deploy_registry",
    "permits",
    "sha256_of",
]
