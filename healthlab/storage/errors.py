"""Refusals of :mod:`healthlab.storage`, in the families of :mod:`healthlab.errors`.

Every message says what happened and what to do. No message ever contains a data
key, a private key or plaintext: only CIDs, hashes, addresses, sizes and paths.
"""

from __future__ import annotations

from healthlab.errors import ConfigurationError, HealthLabError, InvalidInput

__all__ = [
    "BlobCorrupted",
    "BlobNotFound",
    "BlobRejected",
    "BlobTooLarge",
    "CidMismatch",
    "ContentHashMismatch",
    "EnvelopeNotForYou",
    "EnvelopeRejected",
    "FetchDeadlineExceeded",
    "InvalidCid",
    "InvalidKey",
    "KeyNotInKeyring",
    "KeyringError",
    "MissingDependency",
    "ReadOnlyStore",
    "StorageError",
    "StoreRefused",
    "StoreUnreachable",
    "WrongKey",
]


class StorageError(HealthLabError):
    """A blob could not be stored, found, trusted or opened."""


class StoreUnreachable(StorageError, ConnectionError):
    """The store (web host, IPFS node) did not answer in time or refused the
    connection."""


class StoreRefused(StorageError):
    """The store answered with an error (an HTTP status, an IPFS node's message)."""


class FetchDeadlineExceeded(StorageError, TimeoutError):
    """The whole fetch outlasted its deadline (a slow, stalled or trickling store):
    it was stopped and nothing was returned."""


class BlobNotFound(StorageError, LookupError):
    """The store has no blob with this CID."""


class BlobRejected(StorageError):
    """Fetched bytes failed a check; nothing was returned."""


class CidMismatch(BlobRejected):
    """The bytes served (or the CID an IPFS node computed) differ from the CID asked
    for: the store swapped or altered the blob."""


class ContentHashMismatch(BlobRejected):
    """The decrypted content's sha256 differs from the content hash on chain."""


class BlobCorrupted(BlobRejected):
    """The encrypted blob is not well formed or a segment failed authentication:
    altered, truncated, extended or reordered."""


class BlobTooLarge(BlobRejected):
    """The store sent more bytes than the blob has (its size as the CID's DAG
    states it, or the fetch's ``max_size``): it was stopped, nothing returned."""


class WrongKey(BlobRejected):
    """The data key does not open this blob (another dataset's key, or an altered
    header)."""


class EnvelopeRejected(StorageError, PermissionError):
    """A key envelope does not open: another context, or it was altered."""


class EnvelopeNotForYou(EnvelopeRejected):
    """A key envelope was sealed for another account's public key."""


class InvalidCid(InvalidInput):
    """A CID or ``ipfs://`` pointer that healthlab cannot use."""


class InvalidKey(InvalidInput):
    """A data key, public key or private key of the wrong type, length or curve."""


class ReadOnlyStore(InvalidInput):
    """``put`` was given a store that can only be read (a web host)."""


class KeyringError(ConfigurationError):
    """The keyring file is unsafe (readable by others) or unreadable."""


class KeyNotInKeyring(KeyringError, LookupError):
    """The keyring holds no data key for this CID."""


class MissingDependency(ConfigurationError, ImportError):
    """An optional package this feature needs is not installed."""
