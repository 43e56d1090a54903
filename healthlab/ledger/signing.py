"""EIP-712 signatures that prove a query comes from the researcher holding the grant.

A signed query names the researcher, the hash of the query, a nonce and the time it
was issued; the EIP-712 domain binds it to one chain id and one registry, so a
signature cannot be replayed on another chain or against another registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account._utils.legacy_transactions import (
    serializable_unsigned_transaction_from_dict,
)
from eth_account.messages import encode_typed_data
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_keys.datatypes import Signature

from healthlab.errors import SignatureInvalid

__all__ = [
    "QUERY_TYPES",
    "SignedQuery",
    "query_typed_data",
    "recover_signer",
    "transaction_public_key",
]

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


def transaction_public_key(tx: Mapping[str, Any]) -> bytes:
    """The 64-byte public key that signed a mined transaction, checked against ``from``.

    Rebuilds the transaction's signing hash from its fields (legacy EIP-155, EIP-2930
    and EIP-1559 transactions) and recovers the key from ``v, r, s`` — how an owner
    learns a researcher's public key from the request they sent, without asking.
    """
    kind = int(tx.get("type", 0))
    fields: dict[str, Any] = {
        "nonce": tx["nonce"],
        "gas": tx["gas"],
        "to": tx["to"],
        "value": tx["value"],
        "data": bytes(tx["input"]),
    }
    if kind == 0:
        chain_id = tx.get("chainId")
        fields["gasPrice"] = tx["gasPrice"]
        if chain_id is not None:
            fields["chainId"] = int(chain_id)
        unsigned = serializable_unsigned_transaction_from_dict(fields)
        v = int(tx["v"])
        parity = v - 35 - 2 * int(chain_id) if chain_id is not None else v - 27
        digest = unsigned.hash()
    elif kind in (1, 2):
        fields |= {
            "type": kind,
            "chainId": int(tx["chainId"]),
            "accessList": [dict(item) for item in tx.get("accessList", [])],
        }
        if kind == 1:
            fields["gasPrice"] = tx["gasPrice"]
        else:
            fields["maxFeePerGas"] = tx["maxFeePerGas"]
            fields["maxPriorityFeePerGas"] = tx["maxPriorityFeePerGas"]
        digest = TypedTransaction.from_dict(fields).hash()
        parity = int(tx.get("yParity", tx.get("y_parity", tx["v"])))
    else:
        raise SignatureInvalid(
            f"cannot recover a key from a type-{kind} transaction; send the request "
            "as a legacy, EIP-2930 or EIP-1559 transaction"
        )
    try:
        signature = Signature(
            vrs=(parity, int.from_bytes(tx["r"], "big"), int.from_bytes(tx["s"], "big"))
        )
        public = signature.recover_public_key_from_msg_hash(digest)
    except Exception as exc:  # eth-keys raises several kinds for bad signatures
        raise SignatureInvalid("the transaction's signature is malformed") from exc
    if public.to_checksum_address() != tx["from"]:
        raise SignatureInvalid(
            f"the key recovered from transaction {bytes(tx['hash']).hex()} is not its "
            "sender's; the node returned an inconsistent transaction"
        )
    return bytes(public.to_bytes())
