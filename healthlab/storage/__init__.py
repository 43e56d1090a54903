"""Encrypted, content-addressed dataset storage, and data keys sealed to researchers.

An owner ``put``s a dataset: it is encrypted with AES-256-GCM under a fresh random
32-byte data key (in 1 MiB authenticated segments, see
:mod:`healthlab.storage.encryption`) and the ciphertext is kept by its IPFS CID
(CIDv1, sha2-256, as ``ipfs add --cid-version=1`` computes it, see
:mod:`healthlab.storage.cid`). The owner registers ``ipfs://CID`` and the sha256 of
the *plaintext*; the key stays in the owner's :class:`Keyring`. To release it, the
owner seals the key to the researcher's Ethereum public key (:func:`seal_key`, ECIES
on secp256k1, see :mod:`healthlab.storage.envelope`); the researcher opens it
(:func:`open_key`) and fetches the blob from any store (:func:`fetch`): the CID,
every segment and the content hash are checked before anything is returned.

Examples
--------
>>> import tempfile
>>> import pandas as pd
>>> from eth_account import Account
>>> from healthlab import storage
>>> store = storage.LocalStore(tempfile.mkdtemp())
>>> cohort = pd.DataFrame({"age": [54, 61], "sbp": [132.0, 141.5]})
>>> stored = storage.put(cohort, store)  # register stored.uri, stored.content_hash
>>> researcher = Account.create()
>>> context = b"chain, registry, dataset, researcher, content hash"
>>> envelope = storage.seal_key(
...     stored.key, storage.public_key_of(researcher.key), context=context
... )
>>> key = storage.open_key(envelope, researcher.key, context=context)
>>> storage.fetch_frame(
...     stored.uri, key, content_hash=stored.content_hash, store=store
... ).equals(cohort)
True

On a chain, the owner approves a download request (``Codes.DL``) and
:func:`release_key` publishes the key sealed to the researcher, whose client then
:func:`download`\\ s (see :mod:`healthlab.storage.release`)::

    stored = storage.put(cohort, keyring=keyring)  # the owner
    ds = ledger.register_dataset(
        stored.uri, stored.content_hash_hex, terms="HMB|DL", sender=owner
    )
    req = ledger.request_access(
        ds, "CVD risk", "HMB", download=True, sender=researcher
    )  # the researcher
    ledger.approve(req, sender=owner)
    storage.release_key(ledger, req, keyring=keyring)  # the owner's client
    frame = storage.download_frame(ledger, ds, researcher=researcher)
"""

from __future__ import annotations

from healthlab.storage import errors
from healthlab.storage.blobs import (
    OCTET_STREAM,
    PARQUET,
    Stored,
    fetch,
    fetch_file,
    fetch_frame,
    put,
)
from healthlab.storage.cid import cid_of, cid_of_file, parse_cid
from healthlab.storage.encryption import decrypt, encrypt, encrypted_size
from healthlab.storage.envelope import (
    ENVELOPE_SIZE,
    address_of,
    open_key,
    public_key_of,
    seal_key,
)
from healthlab.storage.keyring import Keyring
from healthlab.storage.release import (
    download,
    download_frame,
    key_release_context,
    release_key,
    release_pending_keys,
)
from healthlab.storage.stores import (
    BlobStore,
    HTTPStore,
    IPFSStore,
    LocalStore,
    Store,
    default_store,
)

__all__ = [
    "ENVELOPE_SIZE",
    "OCTET_STREAM",
    "PARQUET",
    "BlobStore",
    "HTTPStore",
    "IPFSStore",
    "Keyring",
    "LocalStore",
    "Store",
    "Stored",
    "address_of",
    "cid_of",
    "cid_of_file",
    "decrypt",
    "default_store",
    "download",
    "download_frame",
    "encrypt",
    "encrypted_size",
    "errors",
    "fetch",
    "fetch_file",
    "fetch_frame",
    "key_release_context",
    "open_key",
    "parse_cid",
    "public_key_of",
    "put",
    "release_key",
    "release_pending_keys",
    "seal_key",
]
