"""Key release on approval: the owner wraps a dataset's data key for one researcher.

A dataset stored with :func:`healthlab.storage.put` is encrypted under a fresh data key
that only its owner holds (in their :class:`~healthlab.storage.Keyring`). When the
owner approves a *download* request (the request carries ``Codes.DL`` and the
dataset's terms allow it), the owner's client

1. recovers the researcher's public key from the signature of the request
   transaction (:meth:`Ledger.requester_public_key`) — nothing to exchange;
2. encrypts the data key to it with ECIES on secp256k1 (:func:`seal_key`), bound to
   this chain, registry, dataset, request, researcher and content hash;
3. publishes the envelope on chain (``KeyReleased``): small, and useless to anyone
   without the researcher's private key.

The researcher's client finds the envelope for its live grant, opens it with the
account's private key, fetches the blob by CID, checks the CID and the plaintext hash
registered on chain, and decrypts (:func:`download`). The contract refuses an
envelope for a revoked or expired grant, a compute-only grant or a dataset that no
longer allows downloads, so such a grant never gets a new key. A key released once
cannot be taken back: revoking stops new envelopes, not copies already made.

Examples
--------
>>> stored = put(frame, keyring=keyring)  # the owner
>>> ds = ledger.register_dataset(
...     stored.uri, stored.content_hash, terms="HMB|DL", sender=owner
... )
>>> req = ledger.request_access(ds, "CVD risk", "HMB", download=True, sender=researcher)
>>> ledger.approve(req, sender=owner)
>>> release_key(ledger, req, keyring=keyring)  # the owner's client
>>> download_frame(ledger, ds, researcher=researcher)  # the researcher's client
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from healthlab import errors
from healthlab.ledger.records import Dataset, Request, Status

if TYPE_CHECKING:
    from healthlab.ledger import Ledger
    from healthlab.storage.keyring import Keyring
    from healthlab.storage.stores import Store

__all__ = [
    "download",
    "download_frame",
    "key_release_context",
    "release_key",
    "release_pending_keys",
]

_DOMAIN = b"healthlab/key-release/v1"


def key_release_context(
    ledger: Ledger, dataset: Dataset, request_id: int, researcher: str
) -> bytes:
    """The bytes an envelope is bound to: chain, registry, dataset, grant, researcher
    and the registered content hash. An envelope opens only in this exact context."""
    return b"".join(
        (
            _DOMAIN,
            int(ledger.chain_id).to_bytes(32, "big"),
            bytes.fromhex(ledger.address[2:]),
            int(dataset.id).to_bytes(32, "big"),
            int(request_id).to_bytes(32, "big"),
            bytes.fromhex(researcher[2:]),
            bytes.fromhex(dataset.content_hash[2:]),
        )
    )


def _cid(pointer: str) -> str:
    if not pointer.startswith("ipfs://"):
        raise errors.InvalidInput(
            f"dataset pointer {pointer!r} is not an ipfs:// CID: only datasets stored "
            "with healthlab.storage.put() can be released as keys"
        )
    return pointer.removeprefix("ipfs://").split("/", 1)[0]


def release_key(
    ledger: Ledger,
    request_id: int,
    *,
    keyring: Keyring | None = None,
    data_key: bytes | None = None,
    sender: str | None = None,
) -> str:
    """Wrap the dataset's data key for the researcher of ``request_id`` and publish it.

    The owner's client calls this after approving a download request. The key comes
    from ``data_key`` or the owner's ``keyring`` (default: the keyring in
    ``$HEALTHLAB_HOME``). Returns the transaction hash of the ``KeyReleased`` event.
    A compute grant, a grant that is not live, or a dataset that does not allow
    downloads is refused before anything is sent (the contract refuses them too).
    """
    from healthlab.storage import Keyring, seal_key

    request = ledger.request(request_id)
    dataset = ledger.dataset(request.dataset_id)
    _check_releasable(dataset, request)
    if data_key is None:
        data_key = (keyring if keyring is not None else Keyring()).key(
            _cid(dataset.pointer)
        )
    public_key = ledger.requester_public_key(request_id)
    envelope = seal_key(
        data_key,
        public_key,
        context=key_release_context(ledger, dataset, request_id, request.researcher),
    )
    return ledger.release_key(request_id, envelope, sender=sender or dataset.owner)


def release_pending_keys(
    ledger: Ledger, owner: str, *, keyring: Keyring | None = None
) -> list[int]:
    """Release keys for every live download grant of ``owner``'s datasets that has no
    envelope yet (e.g. grants approved automatically); return their request ids."""
    released = []
    for request in ledger.requests():
        if request.status is not Status.APPROVED or not request.download:
            continue
        dataset = ledger.dataset(request.dataset_id)
        if dataset.owner != owner or not dataset.downloadable:
            continue
        if ledger.key_envelope(request.id) is not None:
            continue
        release_key(ledger, request.id, keyring=keyring, sender=owner)
        released.append(request.id)
    return released


def _check_releasable(dataset: Dataset, request: Request) -> None:
    if not dataset.downloadable:
        raise errors.DownloadNotPermitted(
            "DownloadNotPermitted", {"datasetId": dataset.id}
        )
    if not request.download:
        raise errors.NotADownloadGrant("NotADownloadGrant", {"requestId": request.id})
    if request.status is not Status.APPROVED:
        raise errors.NoActiveGrant(
            "NoActiveGrant",
            {"datasetId": dataset.id, "researcher": request.researcher},
        )


def _data_key(
    ledger: Ledger, dataset_id: int, researcher: str, private_key: bytes | None
) -> tuple[str, bytes, bytes]:
    """Open the envelope of ``researcher``'s live download grant: (pointer, data key,
    registered content hash)."""
    from healthlab.storage import open_key

    dataset = ledger.dataset(dataset_id)
    access = ledger.access(dataset_id, researcher)
    if not ledger.has_access(dataset_id, researcher):
        raise errors.AccessDenied(
            f"{researcher} holds no live grant on dataset {dataset_id} (status "
            f"{access.status.name.lower()}): request access with download=True"
        )
    if not access.download:
        raise errors.NotADownloadGrant(
            "NotADownloadGrant", {"requestId": access.request_id}
        )
    envelope = ledger.key_envelope(access.request_id)
    if envelope is None:
        raise errors.KeyNotReleased(
            f"the owner of dataset {dataset_id} has not released its key for request "
            f"{access.request_id} yet; their client does it after approving "
            "(healthlab.storage.release_key) — try again later"
        )
    key = private_key if private_key is not None else ledger.private_key(researcher)
    if key is None:
        raise errors.ConfigurationError(
            f"no private key for {researcher} here: set HEALTHLAB_PRIVATE_KEY or "
            "HEALTHLAB_KEY_FILE for that account"
        )
    context = key_release_context(ledger, dataset, access.request_id, access.researcher)
    data_key = open_key(envelope, key, context=context)
    return dataset.pointer, data_key, bytes.fromhex(dataset.content_hash[2:])


def download(
    ledger: Ledger,
    dataset_id: int,
    *,
    researcher: str,
    private_key: bytes | None = None,
    store: Store | None = None,
    max_size: int | None = None,
    deadline: float | None = None,
) -> bytes:
    """Fetch, verify and decrypt a dataset under ``researcher``'s live download grant.

    The data key comes from the envelope the owner released for this grant, opened
    with ``private_key`` (default: this client's key for ``researcher`` — environment
    keys or the development chain's published keys). The blob must match the CID of
    the registered pointer and its plaintext the registered content hash; it is read
    within ``max_size`` and ``deadline`` as :func:`~healthlab.storage.fetch` says.
    """
    from healthlab.storage import fetch

    pointer, key, content_hash = _data_key(ledger, dataset_id, researcher, private_key)
    return fetch(
        pointer,
        key,
        content_hash=content_hash,
        store=store,
        max_size=max_size,
        deadline=deadline,
    )


def download_frame(
    ledger: Ledger,
    dataset_id: int,
    *,
    researcher: str,
    private_key: bytes | None = None,
    store: Store | None = None,
    max_size: int | None = None,
    deadline: float | None = None,
) -> pd.DataFrame:
    """:func:`download` a dataset stored as a DataFrame (Parquet) and read it."""
    from healthlab.storage import fetch_frame

    pointer, key, content_hash = _data_key(ledger, dataset_id, researcher, private_key)
    return fetch_frame(
        pointer,
        key,
        content_hash=content_hash,
        store=store,
        max_size=max_size,
        deadline=deadline,
    )
