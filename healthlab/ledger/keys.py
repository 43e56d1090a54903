"""The one place HealthLab reads an Ethereum private key.

A key is exactly 32 bytes: as text, 64 hex digits with an optional ``0x`` prefix and
nothing else. eth-account alone accepts less: 63 digits are padded with a zero into
another key (another account, silently), and a key that is not a valid secp256k1
scalar fails with a message of its own. Here either is refused with
:class:`~healthlab.errors.InvalidPrivateKey`, naming where the key came from and
never the key or any part of it (nor is the original error chained).

Examples
--------
>>> account_from_key("0x" + "11" * 32, source="HEALTHLAB_PRIVATE_KEY").address
'0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A'
"""

from __future__ import annotations

import re

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_keys.constants import SECPK1_N

from healthlab.errors import InvalidPrivateKey

__all__ = ["KEY_BYTES", "account_from_key", "parse_private_key"]

#: A private key's size in bytes (64 hex digits).
KEY_BYTES = 32
_HEX_KEY = re.compile(r"(?:0[xX])?[0-9a-fA-F]{64}")
#: The order of secp256k1: a key is a scalar in [1, n - 1].
_ORDER = SECPK1_N


def parse_private_key(key: object, *, source: str) -> bytes:
    """``key`` (64 hex digits, ``0x`` optional, or 32 bytes) as its 32 bytes.

    ``source`` says where the key came from (``"HEALTHLAB_PRIVATE_KEY"``, a key file's
    line…) for the error message, which never shows the key.
    """
    raw: bytes | None = None
    if isinstance(key, str):
        if _HEX_KEY.fullmatch(key):
            raw = bytes.fromhex(key[2:] if key[:2] in ("0x", "0X") else key)
    elif isinstance(key, bytes | bytearray | memoryview) and len(key) == KEY_BYTES:
        raw = bytes(key)
    if raw is None:
        raise InvalidPrivateKey(
            f"the private key from {source} is not 32 bytes written as 64 hex digits "
            "(0-9, a-f; an optional 0x prefix; no spaces, quotes or line breaks inside "
            "it): copy the whole key again (it is not shown here)"
        )
    if not 0 < int.from_bytes(raw, "big") < _ORDER:
        raise InvalidPrivateKey(
            f"the private key from {source} is not a valid secp256k1 key (zero, or not "
            "below the curve's order): use the key your wallet exported"
        )
    return raw


def account_from_key(key: object, *, source: str) -> LocalAccount:
    """The account of ``key``, read by :func:`parse_private_key`."""
    return Account.from_key(parse_private_key(key, source=source))  # type: ignore[no-any-return]
