"""The Python client: typed records, purposes, events, input checks, keys."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pandas as pd
import pytest
from eth_account import Account

from healthlab import errors
from healthlab.ledger import (
    Codes,
    Ledger,
    Purpose,
    Status,
    as_codes,
    deployments,
    sha256_of,
)
from healthlab.ledger.client import _signers_from_env
from tests.conftest import ETHER, content_hash


# ------------------------------------------------------------------------ codes
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("HMB|NCU", Codes.HMB | Codes.NCU),
        ("hmb, ncu", Codes.HMB | Codes.NCU),
        (["DS", "IRB"], Codes.DS | Codes.IRB),
        (Codes.GRU, Codes.GRU),
        (0x102, Codes.HMB | Codes.NCU),
    ],
)
def test_codes_parse_from_names_lists_and_ints(value: object, expected: Codes) -> None:
    assert as_codes(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["HMB|XYZ", 1 << 20, -1, ["GRU", "nope"]])
def test_unknown_codes_are_refused_with_the_known_list(value: object) -> None:
    with pytest.raises(errors.InvalidInput, match="code"):
        as_codes(value)  # type: ignore[arg-type]


# ------------------------------------------------------------------- datasets
def test_registered_dataset_reads_back_as_typed_record(
    ledger: Ledger, owner: str
) -> None:
    digest = sha256_of(b"age,sex\n54,F\n")
    ds = ledger.register_dataset(
        "ipfs://bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
        digest,
        fee_wei=123,
        grant_seconds=600,
        terms="HMB|IRB",
        auto_approve=True,
        sender=owner,
    )
    record = ledger.dataset(ds)
    assert (record.id, record.owner, record.content_hash) == (ds, owner, digest)
    assert (record.fee_wei, record.grant_seconds) == (123, 600)
    assert record.terms == Codes.HMB | Codes.IRB
    assert record.auto_approve and record.active
    table = ledger.datasets()
    assert list(table.index) == [ds]
    assert table.loc[ds, "terms"] == "HMB|IRB"


def test_update_dataset_changes_only_what_is_given(
    ledger: Ledger, owner: str, dataset: int
) -> None:
    before = ledger.dataset(dataset)
    after = ledger.update_dataset(dataset, fee_wei=7, sender=owner)
    assert after.fee_wei == 7
    assert (after.grant_seconds, after.terms, after.auto_approve) == (
        before.grant_seconds,
        before.terms,
        before.auto_approve,
    )


def test_request_at_a_stale_fee_says_the_new_fee_and_takes_nothing(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    seen = ledger.dataset(dataset).fee_wei
    ledger.update_dataset(dataset, fee_wei=2 * seen, sender=owner)
    held = ledger.balance(ledger.address)
    with pytest.raises(
        errors.FeeChanged, match=re.escape(f"fee_wei={2 * seen}")
    ) as caught:
        ledger.request_access(
            dataset, "CVD risk", "HMB|NCU", fee_wei=seen, sender=researcher
        )
    assert caught.value.values == {"agreedFee": seen, "currentFee": 2 * seen}
    assert ledger.balance(ledger.address) == held
    assert ledger.requests() == []


# ------------------------------------------------------------------- requests
def test_purpose_text_never_reaches_the_chain(
    ledger: Ledger, researcher: str, dataset: int
) -> None:
    text = "Sex differences in 10-year cardiovascular risk"
    req = ledger.request_access(dataset, text, "HMB|NCU", sender=researcher)
    tx = ledger.w3.eth.get_transaction(ledger.request(req).request_tx)
    assert text.encode() not in bytes(tx["input"])
    logs = ledger.w3.eth.get_transaction_receipt(tx["hash"])["logs"]
    assert all(text.encode() not in bytes(log["data"]) for log in logs)
    purpose = ledger.purpose_of(req)
    assert purpose.text == text
    assert ledger.request(req).purpose_hash == purpose.commitment
    assert ledger.verify_purpose(req, text, purpose.salt)
    assert not ledger.verify_purpose(req, text + ".", purpose.salt)
    assert not ledger.verify_purpose(req, text, Purpose.new(text).salt)


def test_request_record_follows_the_lifecycle(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    req = ledger.request_access(dataset, "study", "DS|NCU", sender=researcher)
    pending = ledger.request(req)
    assert pending.status is Status.PENDING
    assert (pending.dataset_id, pending.researcher) == (dataset, researcher)
    assert pending.codes == Codes.DS | Codes.NCU
    assert pending.amount_wei == ETHER // 100
    assert pending.decision_tx is None and pending.expires_at is None

    approved = ledger.approve(req, sender=owner)
    assert approved.status is Status.APPROVED
    assert approved.decision_tx == ledger.last_receipt["transactionHash"].to_0x_hex()
    grant_time = ledger.now()
    assert approved.expires_at == grant_time + 30 * 24 * 3600

    ledger.revoke(dataset, researcher, sender=owner)
    assert ledger.request(req).status is Status.REVOKED
    access = ledger.access(dataset, researcher)
    assert (access.request_id, access.status) == (req, Status.REVOKED)


def test_superseded_request_keeps_its_final_status(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    first = ledger.request_access(dataset, "a", "HMB|NCU", sender=researcher)
    ledger.decline(first, sender=owner)
    second = ledger.request_access(dataset, "b", "HMB|NCU", sender=researcher)
    ledger.approve(second, sender=owner)
    assert ledger.request(first).status is Status.DECLINED
    assert ledger.request(second).status is Status.APPROVED
    ledger.advance_time(31 * 24 * 3600)
    assert ledger.request(second).status is Status.EXPIRED


def test_requests_filter_by_dataset_and_researcher(
    ledger: Ledger, owner: str, researcher: str, stranger: str, dataset: int
) -> None:
    other = ledger.register_dataset(
        "https://b.example/x", content_hash(), terms="GRU", sender=owner
    )
    a = ledger.request_access(dataset, "a", "HMB|NCU", sender=researcher)
    b = ledger.request_access(other, "b", "MDS", sender=researcher)
    c = ledger.request_access(dataset, "c", "DS|NCU", sender=stranger)
    assert [r.id for r in ledger.requests()] == [a, b, c]
    assert [r.id for r in ledger.requests(dataset_id=dataset)] == [a, c]
    assert [r.id for r in ledger.requests(researcher=researcher)] == [a, b]
    assert [r.id for r in ledger.requests(dataset_id=other, researcher=stranger)] == []


def test_unknown_request_is_a_clear_not_found(ledger: Ledger, owner: str) -> None:
    with pytest.raises(errors.UnknownRequest, match=r"Ledger\.requests"):
        ledger.approve(42, sender=owner)
    with pytest.raises(errors.NotFound):
        ledger.request(42)


# ------------------------------------------------------------------- payments
def test_withdraw_pays_exactly_the_credit(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    # an auto-approved request credits the owner (a decision pays them directly)
    ds = ledger.register_dataset(
        "https://a.example/auto",
        content_hash(),
        fee_wei=ETHER // 100,
        terms="GRU",
        auto_approve=True,
        sender=owner,
    )
    ledger.request_access(ds, "s", "HMB", sender=researcher)
    assert ledger.credit(owner) == ETHER // 100
    before = ledger.balance(owner)
    paid = ledger.withdraw(sender=owner)
    receipt = ledger.last_receipt
    gas_cost = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert paid == ETHER // 100
    assert ledger.balance(owner) == before + paid - gas_cost
    assert ledger.credit(owner) == 0


def test_withdraw_to_another_address(
    ledger: Ledger, owner: str, researcher: str, stranger: str, dataset: int
) -> None:
    req = ledger.request_access(dataset, "s", "HMB|NCU", sender=researcher)
    ledger.decline(req, sender=owner)
    before = ledger.balance(stranger)
    assert ledger.withdraw(sender=researcher, to=stranger) == ETHER // 100
    assert ledger.balance(stranger) == before + ETHER // 100


# --------------------------------------------------------------------- events
def test_events_table_lists_the_flow_in_order_with_exact_amounts(
    ledger: Ledger, owner: str, researcher: str
) -> None:
    fee = 3 * 10**20  # beyond int64: must stay exact
    ds = ledger.register_dataset(
        "https://a.example/d", content_hash(), fee_wei=fee, terms="GRU", sender=owner
    )
    req = ledger.request_access(ds, "s", "HMB", sender=researcher)
    ledger.approve(req, sender=owner)
    ledger.revoke(ds, researcher, sender=owner)
    log = ledger.events()
    assert list(log["event"]) == [
        "DatasetRegistered",
        "AccessRequested",
        "AccessGranted",
        "FeePaid",
        "AccessRevoked",
    ]
    assert list(log["amount_wei"][:2]) == [fee, fee]
    assert log["amount_wei"][3] == fee and log["account"][3] == owner
    assert list(log["request"].dropna()) == [req] * 4
    assert log["block"].is_monotonic_increasing
    assert isinstance(log["time"].dtype, pd.DatetimeTZDtype)
    assert "codes=HMB" in log["details"][1]


def test_events_of_an_empty_registry_is_an_empty_table(ledger: Ledger) -> None:
    log = ledger.events()
    assert log.empty
    assert {"block", "event", "dataset", "request", "account"} <= set(log.columns)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda L, o: L.register_dataset("https://x", "0x12", sender=o), "32 bytes"),
        (lambda L, o: L.register_dataset("https://x", "zz" * 32, sender=o), "hex"),
        (
            lambda L, o: L.register_dataset(
                "https://x", content_hash(), fee_wei=-1, sender=o
            ),
            "fee_wei",
        ),
        (lambda L, o: L.register_dataset("https://x", content_hash()), "sender="),
        (lambda L, o: L.has_access(1, "0xabc"), "Ethereum address"),
        (lambda L, o: L.request_access(1, "  ", "HMB", sender=o), "purpose"),
    ],
)
def test_bad_input_is_refused_before_sending(
    ledger: Ledger, owner: str, call: object, message: str
) -> None:
    block = ledger.w3.eth.block_number
    with pytest.raises(errors.InvalidInput, match=message):
        call(ledger, owner)  # type: ignore[operator]
    assert ledger.w3.eth.block_number == block, "nothing may be mined"


def test_connect_without_a_node_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HEALTHLAB_RPC_URL", raising=False)
    with pytest.raises(errors.ConfigurationError, match="HEALTHLAB_RPC_URL"):
        Ledger.connect()


# ----------------------------------------------------------------------- keys
def test_local_signer_sends_signed_transactions(ledger: Ledger) -> None:
    account = Account.create()
    funder = ledger.accounts[0]
    ledger.w3.eth.send_transaction(
        {"from": funder, "to": account.address, "value": ETHER}
    )
    client = Ledger(ledger.w3, ledger.address, signers=[account])
    client.default_sender = account.address
    ds = client.register_dataset("https://k.example/d", content_hash(), terms="GRU")
    assert client.dataset(ds).owner == account.address
    assert client.accounts[0] == account.address


def test_private_keys_come_from_env_and_are_never_echoed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    account = Account.create()
    key = account.key.hex()
    monkeypatch.setenv("HEALTHLAB_PRIVATE_KEY", key)
    monkeypatch.delenv("HEALTHLAB_KEY_FILE", raising=False)
    assert [a.address for a in _signers_from_env()] == [account.address]

    monkeypatch.setenv("HEALTHLAB_PRIVATE_KEY", "0x1234" + key[6:-4])
    with pytest.raises(errors.ConfigurationError) as caught:
        _signers_from_env()
    assert key[6:-4] not in str(caught.value)

    monkeypatch.delenv("HEALTHLAB_PRIVATE_KEY")
    key_file = tmp_path / "keys"
    key_file.write_text(f"# researcher\n{key}\n")
    os.chmod(key_file, 0o644)
    monkeypatch.setenv("HEALTHLAB_KEY_FILE", str(key_file))
    with pytest.raises(errors.ConfigurationError, match="chmod 600"):
        _signers_from_env()
    os.chmod(key_file, stat.S_IRUSR | stat.S_IWUSR)
    assert [a.address for a in _signers_from_env()] == [account.address]


def test_deployment_records_are_kept_per_chain(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HEALTHLAB_HOME", str(tmp_path))
    a = deployments.chain_key(31337, b"\x01" * 32)
    b = deployments.chain_key(31337, b"\x02" * 32)
    deployments.record(a, "0x" + "aa" * 20, 5, "http://127.0.0.1:1")
    assert deployments.lookup(a) == {
        "address": "0x" + "aa" * 20,
        "block": 5,
        "rpc_url": "http://127.0.0.1:1",
    }
    assert deployments.lookup(b) is None


def test_chain_clock_moves_forward_exactly_or_refuses_clearly(ledger: Ledger) -> None:
    now = ledger.now()
    with pytest.raises(errors.InvalidInput, match="later timestamp"):
        ledger.mine(now)
    with pytest.raises(errors.InvalidInput, match="at least one second"):
        ledger.advance_time(0)
    moved = ledger.advance_time(5)
    assert moved >= now + 5
    assert ledger.mine(moved + 100) == moved + 100
    # the embedded chain never stamps a block before its pending block's time
    pending = int(
        ledger.w3.provider.ethereum_tester.get_block_by_number("pending")["timestamp"]
    )
    assert pending > moved + 100
    if pending > ledger.now() + 1:
        with pytest.raises(errors.InvalidInput, match="follows the wall clock"):
            ledger.mine(ledger.now() + 1)
