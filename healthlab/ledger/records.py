"""Typed records read back from the registry."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from healthlab.ledger.codes import Codes

__all__ = [
    "Access",
    "Dataset",
    "LoggedQuery",
    "PrivacySpend",
    "Request",
    "SiteKeys",
    "Status",
]


class Status(enum.IntEnum):
    """A request's state on chain (``EXPIRED`` is derived from the grant's expiry)."""

    NONE = 0
    PENDING = 1
    APPROVED = 2
    DECLINED = 3
    CANCELLED = 4
    REVOKED = 5
    EXPIRED = 6


@dataclass(frozen=True)
class Dataset:
    """A registered dataset."""

    id: int
    owner: str
    pointer: str
    content_hash: str
    fee_wei: int
    grant_seconds: int
    terms: Codes
    auto_approve: bool
    active: bool
    #: requests waiting for the owner's decision, and the most that may
    pending: int = 0
    max_pending: int = 0
    #: download requests pending and download grants whose key is not released
    downloads_open: int = 0

    @property
    def downloadable(self) -> bool:
        """Whether the terms allow download grants (``Codes.DL``); else compute-only."""
        return bool(self.terms & Codes.DL)


@dataclass(frozen=True)
class Access:
    """The current request or grant of one researcher on one dataset."""

    dataset_id: int
    researcher: str
    request_id: int
    amount_wei: int
    created_at: int
    expires_at: int
    status: Status
    download: bool = False
    #: the grant's duration the researcher paid for (fixed at the request)
    grant_seconds: int = 0
    #: a download grant's key was released (and its fee paid to the owner)
    key_released: bool = False


@dataclass(frozen=True)
class Request:
    """An access request, with the transactions behind it.

    ``status`` is the state now: a request whose grant ran out reads ``EXPIRED``.
    """

    id: int
    dataset_id: int
    researcher: str
    codes: Codes
    purpose_hash: str
    amount_wei: int
    status: Status
    created_at: int
    expires_at: int | None
    request_tx: str
    decision_tx: str | None

    @property
    def download(self) -> bool:
        """Whether this request asks for (or its grant allows) a download."""
        return bool(self.codes & Codes.DL)


@dataclass(frozen=True)
class SiteKeys:
    """The public keys a dataset's owner bound to it on chain, verified.

    ``mask_key`` is the site's X25519 public key (32 raw bytes) for the pairwise masks
    of secure sums; ``node_key`` its Flower SuperNode's ECDSA P-384 public key as the
    97-byte uncompressed point ``0x04 || X || Y``; ``bound_at`` the binding's block
    time.
    """

    dataset_id: int
    mask_key: bytes
    node_key: bytes
    bound_at: int


@dataclass(frozen=True)
class LoggedQuery:
    """One ``QueryLogged`` event: a researcher's statistics query and the datasets it
    pools, as logged on chain before the sites answered it."""

    researcher: str
    query_hash: str
    dataset_ids: tuple[int, ...]
    block: int


@dataclass(frozen=True)
class PrivacySpend:
    """What one grant spent of its dataset's DP budget, as its site recorded it:
    answers given (each one decrypted aggregate) and ε spent."""

    request_id: int
    answers: int
    epsilon: float
