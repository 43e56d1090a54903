"""Site keys on chain: a dataset's owner binds its site's mask key and node key.

The registry stores the X25519 mask key, keccak256 of the SuperNode's P-384 key and
the time; the 97-byte node key is only logged. ``Ledger.site_keys`` returns a node
key only when a log's key hashes to the stored hash, so a node that serves altered or
incomplete logs cannot make a client use a substituted key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from eth_abi import encode as abi_encode
from eth_utils import keccak
from hexbytes import HexBytes
from web3.datastructures import AttributeDict
from web3.logs import DISCARD

from healthlab import errors
from healthlab.ledger import Ledger, SiteKeys
from tests.conftest import content_hash, mask_key, node_key

MASK_A, NODE_A = mask_key(1), node_key(1)
MASK_B, NODE_B = mask_key(2), node_key(2)
MASK_C = mask_key(3)
MASK_EVIL, NODE_EVIL = mask_key(66), node_key(666)  # the attacker's site
TOPIC = keccak(text="SiteKeysBound(uint256,bytes32,bytes32,bytes)")
ZERO32 = bytes(32)
GAS = 300_000


# ------------------------------------------------------------------- helpers
def stored(ledger: Ledger, dataset_id: int) -> tuple[bytes, bytes, int]:
    """What the registry's storage holds: (maskKey, nodeKeyHash, boundAt)."""
    mask, node_hash, bound_at = ledger.contract.functions.siteKeys(dataset_id).call()
    return mask, node_hash, bound_at


def bound_logs(ledger: Ledger, dataset_id: int) -> list[dict[str, Any]]:
    """Every SiteKeysBound of ``dataset_id``, read without the client."""
    event = ledger.contract.events.SiteKeysBound()
    found = event.get_logs(from_block=0, argument_filters={"datasetId": dataset_id})
    return [dict(entry["args"]) for entry in found]


def block_time(ledger: Ledger, receipt: Any) -> int:
    return int(ledger.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


def serve_logs(
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    alter: Callable[[list[Any]], list[Any]],
) -> None:
    """Make the node answer ``eth_getLogs`` with ``alter``(the true answer)."""
    honest = ledger.w3.eth.get_logs

    def lying(params: Any) -> list[Any]:
        return alter(list(honest(params)))

    monkeypatch.setattr(ledger.w3.eth, "get_logs", lying)


def is_binding(log: Any) -> bool:
    return bytes(log["topics"][0]) == TOPIC


# ------------------------------------------------------------------ binding
def test_owner_binds_site_keys_and_reads_them_back_exactly(
    ledger: Ledger, owner: str, dataset: int
) -> None:
    keys = ledger.bind_site_keys(dataset, MASK_A, NODE_A, sender=owner)

    at = block_time(ledger, ledger.last_receipt)
    assert keys == SiteKeys(dataset, MASK_A, NODE_A, at)
    assert ledger.site_keys(dataset) == keys
    assert stored(ledger, dataset) == (MASK_A, keccak(NODE_A), at)
    found = ledger.contract.events.SiteKeysBound().process_receipt(
        ledger.last_receipt, errors=DISCARD
    )
    assert [dict(e["args"]) for e in found] == [
        {
            "datasetId": dataset,
            "maskKey": MASK_A,
            "nodeKeyHash": keccak(NODE_A),
            "nodeKey": NODE_A,
        }
    ], "the log must carry the full node key and its hash"


def test_rebinding_replaces_the_keys_and_the_latest_binding_is_read(
    ledger: Ledger, owner: str, dataset: int
) -> None:
    first = ledger.bind_site_keys(dataset, MASK_A, NODE_A, sender=owner)
    ledger.advance_time(60)
    second = ledger.bind_site_keys(dataset, MASK_B, NODE_B, sender=owner)

    assert second.bound_at >= first.bound_at + 60
    assert ledger.site_keys(dataset) == SiteKeys(
        dataset, MASK_B, NODE_B, second.bound_at
    )
    assert stored(ledger, dataset) == (MASK_B, keccak(NODE_B), second.bound_at)

    # rotate the mask key only, back to the first node key: its latest log is read
    ledger.advance_time(60)
    third = ledger.bind_site_keys(dataset, MASK_C, NODE_A, sender=owner)
    assert ledger.site_keys(dataset) == SiteKeys(
        dataset, MASK_C, NODE_A, third.bound_at
    )
    assert [(e["maskKey"], e["nodeKey"]) for e in bound_logs(ledger, dataset)] == [
        (MASK_A, NODE_A),
        (MASK_B, NODE_B),
        (MASK_C, NODE_A),
    ]


def test_keys_are_bound_per_dataset(
    ledger: Ledger, owner: str, stranger: str, dataset: int
) -> None:
    mine = ledger.register_dataset("ipfs://bafy-second", content_hash(), sender=owner)
    theirs = ledger.register_dataset(
        "ipfs://bafy-third", content_hash(), sender=stranger
    )
    ledger.bind_site_keys(dataset, MASK_A, NODE_A, sender=owner)
    ledger.bind_site_keys(theirs, MASK_B, NODE_B, sender=stranger)

    assert ledger.site_keys(mine) is None
    assert stored(ledger, mine) == (ZERO32, ZERO32, 0)
    found = ledger.site_keys(dataset)
    assert found is not None and (found.mask_key, found.node_key) == (MASK_A, NODE_A)
    found = ledger.site_keys(theirs)
    assert found is not None and (found.mask_key, found.node_key) == (MASK_B, NODE_B)


def test_site_keys_of_a_never_bound_dataset_is_none(
    ledger: Ledger, dataset: int
) -> None:
    assert ledger.site_keys(dataset) is None
    assert ledger.site_keys(99) is None, "no such dataset: nothing was bound"
    assert stored(ledger, dataset) == (ZERO32, ZERO32, 0)


# ---------------------------------------------------------------- refusals
INVALID_KEYS = [
    pytest.param(ZERO32, NODE_B, id="zero-mask-key"),
    pytest.param(MASK_B, b"", id="empty-node-key"),
    pytest.param(MASK_B, NODE_B[:96], id="node-key-96-bytes"),
    pytest.param(MASK_B, NODE_B + b"\x00", id="node-key-98-bytes"),
    pytest.param(
        MASK_B,
        ec.derive_private_key(7, ec.SECP384R1())
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.CompressedPoint),
        id="compressed-point-49-bytes",
    ),
    pytest.param(MASK_B, b"\x02" + NODE_B[1:], id="prefix-0x02"),
    pytest.param(MASK_B, b"\x00" + NODE_B[1:], id="prefix-0x00"),
    pytest.param(
        MASK_B,
        ec.derive_private_key(7, ec.SECP256K1())
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
        id="secp256k1-point-65-bytes",
    ),
]


@pytest.mark.parametrize(("mask", "node"), INVALID_KEYS)
def test_invalid_keys_revert_with_invalid_site_keys_and_change_nothing(
    ledger: Ledger, owner: str, dataset: int, mask: bytes, node: bytes
) -> None:
    bound = ledger.bind_site_keys(dataset, MASK_A, NODE_A, sender=owner)
    before = (stored(ledger, dataset), bound_logs(ledger, dataset))
    block = ledger.w3.eth.block_number
    fn = ledger.contract.functions.bindSiteKeys(dataset, mask, node)

    with pytest.raises(errors.ContractError) as caught:
        ledger.transact(fn, owner)  # straight to the contract: no client checks
    assert type(caught.value) is errors.InvalidSiteKeys, (
        f"got {type(caught.value).__name__}: {caught.value}"
    )
    assert caught.value.values == {}
    assert ledger.w3.eth.block_number == block, "a refused binding was sent"

    # mined without estimation, it reverts on chain
    tx_hash = fn.transact({"from": owner, "gas": GAS})
    assert ledger.w3.eth.get_transaction_receipt(tx_hash)["status"] == 0
    assert (stored(ledger, dataset), bound_logs(ledger, dataset)) == before
    assert ledger.site_keys(dataset) == bound, "the previous binding must stand"


def test_unknown_dataset_and_other_accounts_are_refused_by_name(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    with pytest.raises(errors.UnknownDataset) as unknown:
        ledger.bind_site_keys(99, MASK_A, NODE_A, sender=owner)
    assert unknown.value.values == {"datasetId": 99}
    with pytest.raises(errors.NotDatasetOwner) as refused:
        ledger.bind_site_keys(dataset, MASK_EVIL, NODE_EVIL, sender=researcher)
    assert refused.value.values == {"datasetId": dataset, "caller": researcher}
    # ownership is checked before the keys: invalid keys from a stranger say so
    fn = ledger.contract.functions.bindSiteKeys(dataset, ZERO32, b"")
    with pytest.raises(errors.ContractError) as first:
        ledger.transact(fn, researcher)
    assert type(first.value) is errors.NotDatasetOwner
    assert ledger.site_keys(dataset) is None
    assert bound_logs(ledger, dataset) == []


BAD_INPUT = [
    pytest.param(MASK_A[:31], NODE_A, "mask_key must be .* 32 raw bytes", id="mask-31"),
    pytest.param(MASK_A + b"\x01", NODE_A, "not 33 bytes", id="mask-33"),
    pytest.param(ZERO32, NODE_A, "mask_key is all zeros", id="mask-zero"),
    pytest.param("0x" + MASK_A.hex(), NODE_A, "not str", id="mask-hex-text"),
    pytest.param(MASK_A, NODE_A[:96], "97-byte .* not 96 bytes", id="node-96"),
    pytest.param(MASK_A, NODE_A[:49], "not 49 bytes", id="node-49"),
    pytest.param(MASK_A, b"\x03" + NODE_A[1:], "starts with 0x03", id="node-0x03"),
    pytest.param(
        MASK_A, b"\x04" + b"\x01" * 96, "not a point on the P-384 curve", id="off-curve"
    ),
    pytest.param(
        MASK_A,
        ec.derive_private_key(5, ec.SECP384R1())
        .public_key()
        .public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH),
        "OpenSSH key line: load it with cryptography's load_ssh_public_key",
        id="node-openssh-line",
    ),
    pytest.param(MASK_A, NODE_A.hex(), "not str", id="node-hex-text"),
]


@pytest.mark.parametrize(("mask", "node", "message"), BAD_INPUT)
def test_client_refuses_bad_keys_before_sending(
    ledger: Ledger, owner: str, dataset: int, mask: Any, node: Any, message: str
) -> None:
    block = ledger.w3.eth.block_number
    with pytest.raises(errors.InvalidInput, match=message):
        ledger.bind_site_keys(dataset, mask, node, sender=owner)
    assert ledger.w3.eth.block_number == block, "nothing may be sent"
    assert ledger.site_keys(dataset) is None


# ------------------------------------------------------------------ events
def test_events_table_shows_the_binding_with_the_full_node_key(
    ledger: Ledger, owner: str, dataset: int
) -> None:
    ledger.bind_site_keys(dataset, MASK_A, NODE_A, sender=owner)
    row = ledger.events().iloc[-1]
    assert row["event"] == "SiteKeysBound"
    assert row["dataset"] == dataset
    assert row["tx"] == ledger.last_receipt["transactionHash"].to_0x_hex()
    assert f"maskKey=0x{MASK_A.hex()[:12]}…" in row["details"]
    assert f"nodeKeyHash=0x{keccak(NODE_A).hex()[:12]}…" in row["details"]
    assert row["args"] == {
        "datasetId": dataset,
        "maskKey": "0x" + MASK_A.hex(),
        "nodeKeyHash": "0x" + keccak(NODE_A).hex(),
        "nodeKey": "0x" + NODE_A.hex(),
    }


# --------------------------------------------------------------- integrity
def test_a_stored_hash_with_no_matching_log_is_refused(
    ledger: Ledger, owner: str, dataset: int
) -> None:
    ledger.bind_site_keys(dataset, MASK_A, NODE_A, sender=owner)
    # a client that reads logs only from after the binding sees storage, no log
    late = Ledger(ledger.w3, ledger.address, from_block=ledger.w3.eth.block_number + 1)
    assert stored(late, dataset)[1] == keccak(NODE_A)
    with pytest.raises(errors.SiteKeysUnverified, match="No keys were returned"):
        late.site_keys(dataset)


def test_a_node_that_substitutes_the_node_key_in_its_log_is_refused(
    ledger: Ledger, owner: str, dataset: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.bind_site_keys(dataset, MASK_A, NODE_A, sender=owner)

    def substitute(logs: list[Any]) -> list[Any]:
        # a consistent forgery: the attacker's key and its own hash
        data = abi_encode(
            ["bytes32", "bytes32", "bytes"], [MASK_A, keccak(NODE_EVIL), NODE_EVIL]
        )
        return [
            AttributeDict({**log, "data": HexBytes(data)}) if is_binding(log) else log
            for log in logs
        ]

    serve_logs(ledger, monkeypatch, substitute)
    served = ledger.events().iloc[-1]["args"]
    assert served["nodeKey"] == "0x" + NODE_EVIL.hex(), "the forgery was not served"
    with pytest.raises(errors.SiteKeysUnverified):
        ledger.site_keys(dataset)


def test_a_node_that_hides_a_rotation_cannot_serve_the_old_key(
    ledger: Ledger, owner: str, dataset: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.bind_site_keys(dataset, MASK_A, NODE_A, sender=owner)
    rotated = ledger.bind_site_keys(dataset, MASK_B, NODE_B, sender=owner)
    assert ledger.site_keys(dataset) == rotated

    def hide_latest(logs: list[Any]) -> list[Any]:
        bindings = [log for log in logs if is_binding(log)]
        return [log for log in logs if not bindings or log is not bindings[-1]]

    serve_logs(ledger, monkeypatch, hide_latest)
    assert [e["nodeKey"] for e in bound_logs(ledger, dataset)] == [NODE_A]
    with pytest.raises(errors.SiteKeysUnverified):
        ledger.site_keys(dataset)
