"""EIP-712 signatures that prove a query comes from the researcher holding the grant.

A signed query names the researcher, the hash of the query, a nonce and the time it
was issued; the EIP-712 domain binds it to one chain id and one registry, so a
signature cannot be replayed on another chain or against another registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data

from healthlab.errors import SignatureInvalid

__all__ = ["QUERY_TYPES", "SignedQuery", "query_typed_data", "recover_signer"]

QUERY_TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Query": [
        {"name": "researcher", "type": "address"},
        {"name": "queryHash", "type": "bytes32"},
        {"name": "nonce", "type": "uint256"},
        {"name": "issuedAt", "type": "uint256"},
    ],
}


@dataclass(frozen=True)
class SignedQuery:
    """What a site receives: the query hash, who signed it, when, with which nonce."""

    researcher: str
    query_hash: str
    nonce: int
    issued_at: int
    chain_id: int
    registry: str
    signature: str


def query_typed_data(
    *,
    researcher: str,
    query_hash: str,
    nonce: int,
    issued_at: int,
    chain_id: int,
    registry: str,
) -> dict[str, Any]:
    """The EIP-712 typed data a researcher signs for one query."""
    return {
        "types": QUERY_TYPES,
        "primaryType": "Query",
        "domain": {
            "name": "HealthLab",
            "version": "1",
            "chainId": chain_id,
            "verifyingContract": registry,
        },
        "message": {
            "researcher": researcher,
            "queryHash": bytes.fromhex(query_hash.removeprefix("0x")),
            "nonce": nonce,
            "issuedAt": issued_at,
        },
    }


def recover_signer(signed: SignedQuery) -> str:
    """The address that produced ``signed.signature`` over its typed data."""
    typed = query_typed_data(
        researcher=signed.researcher,
        query_hash=signed.query_hash,
        nonce=signed.nonce,
        issued_at=signed.issued_at,
        chain_id=signed.chain_id,
        registry=signed.registry,
    )
    try:
        return str(
            Account.recover_message(
                encode_typed_data(full_message=typed), signature=signed.signature
            )
        )
    except Exception as exc:  # eth-keys and eth-utils raise many kinds
        raise SignatureInvalid("the query's signature is malformed") from exc
