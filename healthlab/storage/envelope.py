"""Key envelopes: a data key sealed to one Ethereum account (ECIES on secp256k1).

The owner seals a dataset's data key to the researcher's public key (the one their
address is derived from, recovered from a signature or a transaction); only that
account's private key opens it, and only for the same ``context``. The envelope is
102 bytes and safe to publish (on chain, in an event)::

    version (1) = 1
    recipient address (20)   keccak256(public key)[12:], to say whose it is
    ephemeral public key (33, compressed secp256k1 point)
    AES-256-GCM(data key) (32) + tag (16)

    shared = x coordinate of ECDH(ephemeral private key, recipient public key)
    key (32) + nonce (12) = HKDF-SHA256(shared,
        salt = ephemeral public key (33) + recipient public key (65, 0x04 + x + y),
        info = "healthlab key envelope v1")
    associated data = version + recipient address + ephemeral public key + context

A fresh ephemeral key per envelope makes every envelope different and its AES key
single-use. ``context`` (chain id, registry, dataset, researcher, content hash: the
caller decides) is authenticated, not stored: an envelope replayed for another
dataset, chain or registry does not open.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from eth_keys.constants import SECPK1_N
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from healthlab.errors import InvalidInput
from healthlab.storage.encryption import check_key
from healthlab.storage.errors import EnvelopeNotForYou, EnvelopeRejected, InvalidKey

__all__ = [
    "ENVELOPE_SIZE",
    "address_of",
    "open_key",
    "open_message",
    "public_key_of",
    "seal_key",
    "seal_message",
]

VERSION = 1
_CURVE = ec.SECP256K1()
_ORDER = SECPK1_N  # the order of secp256k1
_INFO = b"healthlab key envelope v1"
#: HKDF info of a sealed message (a request's purpose): keys never cross uses
_MESSAGE_INFO = b"healthlab sealed message v1"
_ADDRESS, _EPHEMERAL = 20, 33
_PREFIX = 1 + _ADDRESS + _EPHEMERAL
#: Bytes of an envelope.
ENVELOPE_SIZE = _PREFIX + 32 + 16


def _private(private_key: object) -> ec.EllipticCurvePrivateKey:
    if not isinstance(private_key, bytes | bytearray | memoryview):
        raise InvalidKey(
            f"a private key is 32 bytes (got {type(private_key).__name__}); pass "
            "`account.key` or bytes.fromhex(...)"
        )
    raw = bytes(private_key)
    if len(raw) != 32:
        raise InvalidKey(f"a private key is 32 bytes, this one has {len(raw)}")
    scalar = int.from_bytes(raw, "big")
    if not 0 < scalar < _ORDER:
        raise InvalidKey("this private key is not a valid secp256k1 key")
    return ec.derive_private_key(scalar, _CURVE)


def _public(public_key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(public_key, bytes | bytearray | memoryview):
        raise InvalidKey(
            f"a public key is 64 bytes (got {type(public_key).__name__}): the "
            "uncompressed x and y an Ethereum address is derived from"
        )
    raw = bytes(public_key)
    if len(raw) == 64:
        raw = b"\x04" + raw
    if len(raw) != 65 or raw[0] != 4:
        raise InvalidKey(
            f"a public key is 64 bytes (x and y), or 65 starting with 0x04; this one "
            f"has {len(bytes(public_key))}: recover it from the researcher's "
            "signature or transaction, or use `public_key_of(private_key)`"
        )
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, raw)
    except ValueError:
        raise InvalidKey("this public key is not a point on secp256k1") from None


def _uncompressed(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def public_key_of(private_key: bytes) -> bytes:
    """The 64-byte uncompressed public key (x, y) of a secp256k1 private key."""
    return _uncompressed(_private(private_key).public_key())[1:]


def address_of(public_key: bytes) -> str:
    """The checksummed Ethereum address of a public key (64 or 65 bytes)."""
    raw = _uncompressed(_public(public_key))[1:]
    return str(to_checksum_address(keccak(raw)[-_ADDRESS:]))


def _context(context: object) -> bytes:
    if not isinstance(context, bytes | bytearray | memoryview):
        raise InvalidInput(
            f"context must be bytes (got {type(context).__name__}): the chain id, "
            "registry, dataset, researcher and content hash the key is released for"
        )
    return bytes(context)


def _wrap_key(
    shared: bytes, ephemeral: bytes, recipient: bytes, info: bytes = _INFO
) -> tuple[AESGCM, bytes]:
    material = HKDF(hashes.SHA256(), 44, ephemeral + recipient, info).derive(shared)
    return AESGCM(material[:32]), material[32:]


def _seal(
    payload: bytes, recipient_public_key: bytes, bound: bytes, info: bytes
) -> bytes:
    recipient = _public(recipient_public_key)
    recipient_raw = _uncompressed(recipient)
    ephemeral = ec.generate_private_key(_CURVE)
    ephemeral_raw = ephemeral.public_key().public_bytes(
        Encoding.X962, PublicFormat.CompressedPoint
    )
    aead, nonce = _wrap_key(
        ephemeral.exchange(ec.ECDH(), recipient), ephemeral_raw, recipient_raw, info
    )
    prefix = bytes([VERSION]) + keccak(recipient_raw[1:])[-_ADDRESS:] + ephemeral_raw
    return prefix + aead.encrypt(nonce, payload, prefix + bound)


def _open(sealed: bytes, private_key: bytes, bound: bytes, info: bytes) -> bytes:
    """Open an envelope whose size the caller checked (>= prefix + tag)."""
    private = _private(private_key)
    mine = _uncompressed(private.public_key())
    recipient = sealed[1 : 1 + _ADDRESS]
    if recipient != keccak(mine[1:])[-_ADDRESS:]:
        raise EnvelopeNotForYou(
            f"this envelope was sealed for {to_checksum_address(recipient)}, not for "
            f"{to_checksum_address(keccak(mine[1:])[-_ADDRESS:])} (the account of this "
            "private key): open it with that account, or ask its sender for yours"
        )
    ephemeral_raw = sealed[1 + _ADDRESS : _PREFIX]
    altered = (
        "the envelope does not open: it was sealed for another context (chain, "
        "registry, dataset, researcher or content hash) than the one given, or it "
        "was altered; ask its sender to seal it again"
    )
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, ephemeral_raw)
    except ValueError:
        raise EnvelopeRejected(altered) from None
    aead, nonce = _wrap_key(
        private.exchange(ec.ECDH(), ephemeral), ephemeral_raw, mine, info
    )
    try:
        return aead.decrypt(nonce, sealed[_PREFIX:], sealed[:_PREFIX] + bound)
    except InvalidTag:
        raise EnvelopeRejected(altered) from None


def seal_key(data_key: bytes, recipient_public_key: bytes, *, context: bytes) -> bytes:
    """Seal a data key so only the holder of ``recipient_public_key`` opens it.

    Parameters
    ----------
    data_key:
        The 32-byte key of a blob (``Stored.key``).
    recipient_public_key:
        The researcher's 64-byte uncompressed secp256k1 public key (or 65 bytes with
        the 0x04 prefix), as recovered from their signature or transaction.
    context:
        Bytes bound to the envelope; :func:`open_key` needs the same bytes.

    Examples
    --------
    >>> from eth_account import Account
    >>> researcher = Account.create()
    >>> envelope = seal_key(
    ...     bytes(32), public_key_of(researcher.key), context=b"chain 1, dataset 7"
    ... )
    >>> open_key(envelope, researcher.key, context=b"chain 1, dataset 7") == bytes(32)
    True
    """
    key = check_key(data_key)
    return _seal(key, recipient_public_key, _context(context), _INFO)


def open_key(envelope: bytes, private_key: bytes, *, context: bytes) -> bytes:
    """The data key in ``envelope``, opened with the recipient's private key.

    Raises
    ------
    EnvelopeNotForYou
        The envelope was sealed for another account.
    EnvelopeRejected
        Not an envelope, another ``context`` (chain, registry, dataset, researcher or
        content hash), or altered.
    """
    bound = _context(context)
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise EnvelopeRejected(
            f"an envelope is {ENVELOPE_SIZE} bytes (got {type(envelope).__name__})"
        )
    sealed = bytes(envelope)
    if len(sealed) != ENVELOPE_SIZE or sealed[0] != VERSION:
        raise EnvelopeRejected(
            f"this is not a version-{VERSION} key envelope ({len(sealed)} bytes, "
            f"expected {ENVELOPE_SIZE}): take it from the owner's key-release event"
        )
    return _open(sealed, private_key, bound, _INFO)


#: Largest message :func:`seal_message` seals (a request's purpose and its salt).
MAX_MESSAGE = 900


def seal_message(
    message: bytes, recipient_public_key: bytes, *, context: bytes
) -> bytes:
    """Seal ``message`` (at most :data:`MAX_MESSAGE` bytes) so only the holder of
    ``recipient_public_key`` opens it: the key envelope's construction (ECIES on
    secp256k1, HKDF-SHA256, AES-256-GCM) under its own HKDF label, so an envelope
    of one use never opens as the other. ``context`` is authenticated, not stored.
    """
    if (
        not isinstance(message, bytes | bytearray)
        or not 0 < len(message) <= MAX_MESSAGE
    ):
        raise InvalidInput(
            f"a sealed message is 1 to {MAX_MESSAGE} bytes: shorten the purpose text"
        )
    return _seal(bytes(message), recipient_public_key, _context(context), _MESSAGE_INFO)


def open_message(envelope: bytes, private_key: bytes, *, context: bytes) -> bytes:
    """The message in a :func:`seal_message` envelope, opened with the recipient's
    private key (:class:`EnvelopeNotForYou`, :class:`EnvelopeRejected` as for keys)."""
    bound = _context(context)
    sealed = bytes(envelope) if isinstance(envelope, bytes | bytearray) else b""
    if len(sealed) <= _PREFIX + 16 or sealed[0] != VERSION:
        raise EnvelopeRejected(
            f"this is not a version-{VERSION} sealed message: take it from the "
            "request's transaction (requestAccess's sealedPurpose)"
        )
    return _open(sealed, private_key, bound, _MESSAGE_INFO)
