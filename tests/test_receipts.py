"""Receipts: built from the chain's records, anchored against every grant, verified
against the chain, and broken by any tampering; they hold no keys or purpose text.

The study is the one of ``tests/test_sites.py``: three owners each register one third
of ``load_diabetes`` and approve one researcher; it is built and described once, and
every test starts from that snapshot with its own copy of the result.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
import pytest

import healthlab
from healthlab import encrypted
from healthlab.errors import InvalidInput
from healthlab.receipts import Receipt, anchor_hash, result_hash, verify
from tests.conftest import Chain
from tests.test_sites import (
    PURPOSE,
    Study,
    dev_key,
    diabetes,
    grant_study,
    thirds,
)

COLUMNS = ["age", "bmi", "target"]


@pytest.fixture(scope="module")
def described(chain: Chain) -> Iterator[tuple[Any, Study, pd.DataFrame]]:
    """Grant the diabetes thirds and describe them once; restore the chain after.

    A describe reads the chain but changes nothing on it, so every test can start
    from the snapshot taken after it, with its own copy of the result.
    """
    clean = chain.tester.take_snapshot()
    try:
        ledger = chain.ledger()
        frames = thirds(diabetes())
        study = Study.open(ledger, frames, grant_study(ledger, frames))
        table = encrypted.describe(study.sites, COLUMNS, researcher=study.researcher)
        yield chain.tester.take_snapshot(), study, table
    finally:
        chain.tester.revert_to_snapshot(clean)


@pytest.fixture
def study(chain: Chain, described: tuple[Any, Study, pd.DataFrame]) -> Iterator[Study]:
    """The study that answered, on a fresh client; chain changes are rolled back."""
    snapshot, study, _ = described
    try:
        yield dataclasses.replace(study, ledger=chain.ledger())
    finally:
        chain.tester.revert_to_snapshot(snapshot)


@pytest.fixture
def table(described: tuple[Any, Study, pd.DataFrame]) -> pd.DataFrame:
    """The gated describe, with a receipt of its own."""
    result = described[2].copy()
    result.receipt = fresh(described[2].receipt)
    return result


def fresh(receipt: Receipt) -> Receipt:
    """An independent copy of a receipt."""
    return Receipt(copy.deepcopy(dict(receipt)))


def test_gated_receipt_names_every_site_with_its_chain_records(
    study: Study, table: pd.DataFrame
) -> None:
    receipt = table.receipt
    ledger = study.ledger
    assert receipt["kind"] == "describe"
    assert receipt["gated"] is True
    assert receipt["researcher"] == study.researcher
    assert receipt["chain"] == {"chain_id": ledger.chain_id, "registry": ledger.address}
    assert receipt["package"] == {"name": "healthlab", "version": healthlab.__version__}
    assert receipt["refused"] == {}
    assert [s["name"] for s in receipt["sites"]] == ["a", "b", "c"]
    for record, site, ds, req in zip(
        receipt["sites"], study.sites, study.datasets, study.requests, strict=True
    ):
        on_chain = ledger.request(req)
        assert record["dataset_id"] == ds
        assert record["content_hash"] == site.content_hash
        assert record["content_hash"] == ledger.dataset(ds).content_hash
        assert record["request_id"] == req
        assert record["request_tx"] == on_chain.request_tx
        assert record["grant_tx"] == on_chain.decision_tx
        assert record["grant_expires_at"] == on_chain.expires_at
        assert on_chain.researcher == study.researcher
    # both rounds, as the sites saw them (the same query hashes they logged)
    assert [q["kind"] for q in receipt["queries"]] == ["moments", "moments"]
    assert [q["spec"]["columns"] for q in receipt["queries"]] == [COLUMNS, COLUMNS]
    logged = [entry.query_hash for entry in study.sites[0].log]
    hashes = [encrypted.Query(**q).hash for q in receipt["queries"]]
    assert hashes == logged
    assert receipt["parameters"] == {
        "columns": COLUMNS,
        "by": None,
        "dropna": False,
        "population": [],
    }
    assert receipt["result_hash"] == result_hash(table)
    assert receipt["receipt_hash"] == receipt.hash


def test_anchored_receipt_verifies_against_the_chain(
    study: Study, table: pd.DataFrame
) -> None:
    receipt = table.receipt
    anchors = receipt.anchor(study.ledger, sender=study.researcher)
    assert [a["request_id"] for a in anchors] == list(study.requests)
    for request_id in study.requests:
        digest = anchor_hash(receipt["receipt_hash"], request_id)
        assert study.ledger.result_recorded(request_id, digest)
    report = verify(receipt, table, study.ledger)
    assert report.ok, report.problems
    assert report.problems == []
    names = [name for name, _, _ in report.checks]
    assert names == [
        "receipt hash",
        "result hash",
        "chain",
        "site a data",
        "site a request",
        "site b data",
        "site b request",
        "site c data",
        "site c request",
        *(f"anchor {r}" for r in study.requests),
    ]


def test_unanchored_gated_receipt_verifies_its_grants(
    study: Study, table: pd.DataFrame
) -> None:
    report = verify(table.receipt, table, study.ledger)
    assert report.ok, report.problems


Tamper = Callable[[Receipt, pd.DataFrame, Study], pd.DataFrame]


def change_result_number(r: Receipt, t: pd.DataFrame, s: Study) -> pd.DataFrame:
    changed = t.copy()
    changed.loc["mean", "bmi"] += 1e-12
    return changed


def change_body_field(r: Receipt, t: pd.DataFrame, s: Study) -> pd.DataFrame:
    r["sites"][1]["content_hash"] = "0x" + "ab" * 32
    return t


def change_researcher(r: Receipt, t: pd.DataFrame, s: Study) -> pd.DataFrame:
    r["researcher"] = s.ledger.accounts[5]
    return t


def change_receipt_hash(r: Receipt, t: pd.DataFrame, s: Study) -> pd.DataFrame:
    r["receipt_hash"] = "sha256:" + "0" * 64
    return t


def point_to_another_request(r: Receipt, t: pd.DataFrame, s: Study) -> pd.DataFrame:
    r["sites"][0]["request_id"] = s.requests[1]  # a real grant, of another dataset
    r["receipt_hash"] = r.hash  # and hide it from the hash check
    return t


def point_to_unknown_request(r: Receipt, t: pd.DataFrame, s: Study) -> pd.DataFrame:
    r["sites"][0]["request_id"] = 999
    r["receipt_hash"] = r.hash
    return t


def swap_grant_tx(r: Receipt, t: pd.DataFrame, s: Study) -> pd.DataFrame:
    r["sites"][0]["grant_tx"] = r["sites"][1]["grant_tx"]
    r["receipt_hash"] = r.hash
    return t


def rehash_changed_result(r: Receipt, t: pd.DataFrame, s: Study) -> pd.DataFrame:
    changed = t.copy()
    changed.loc["mean", "age"] = 50.0
    r["result_hash"] = result_hash(changed)
    r["receipt_hash"] = r.hash  # a consistent forgery: only the anchors disagree
    return changed


def claim_an_anchor(r: Receipt, t: pd.DataFrame, s: Study) -> pd.DataFrame:
    r["anchors"].append({"request_id": 999, "tx": r["anchors"][0]["tx"]})
    return t


TAMPERS: dict[str, tuple[Tamper, str]] = {
    "a number in the result": (change_result_number, "result hash"),
    "a site's content hash": (change_body_field, "receipt hash"),
    "the researcher": (change_researcher, "receipt hash"),
    "the receipt hash": (change_receipt_hash, "receipt hash"),
    "another dataset's request": (point_to_another_request, "site a request"),
    "an unknown request": (point_to_unknown_request, "site a request"),
    "another grant transaction": (swap_grant_tx, "site a request"),
    "result and hashes rewritten": (rehash_changed_result, "anchor"),
    "an anchor never recorded": (claim_an_anchor, "anchor 999"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampering_fails_verification(
    study: Study, table: pd.DataFrame, tamper: str
) -> None:
    original = table.receipt
    original.anchor(study.ledger, sender=study.researcher)
    assert verify(original, table, study.ledger).ok, "control: verifies untouched"
    change, failing = TAMPERS[tamper]
    receipt = fresh(original)
    result = change(receipt, table, study)
    report = verify(receipt, result, study.ledger)
    assert not report.ok
    assert any(p.startswith(failing) for p in report.problems), report.problems


def test_receipt_of_a_study_on_another_registry_fails(
    study: Study, table: pd.DataFrame
) -> None:
    receipt = fresh(table.receipt)
    receipt["chain"]["registry"] = "0x" + "22" * 20
    receipt["receipt_hash"] = receipt.hash
    report = verify(receipt, table, study.ledger)
    assert [p.split(":")[0] for p in report.problems] == ["chain"]


def test_ungated_receipt_verifies_hashes_but_has_no_grants(study: Study) -> None:
    table = encrypted.describe(thirds(diabetes()), COLUMNS)
    receipt = table.receipt
    assert receipt["gated"] is False
    assert receipt["researcher"] is None
    assert receipt["chain"] is None
    for record in receipt["sites"]:
        assert set(record) == {"name", "content_hash", "dataset_id"}
        assert record["dataset_id"] is None
    assert verify(receipt, table).ok
    changed = table.copy()
    changed.loc["count", "age"] = 441.0
    assert verify(receipt, changed).problems == ["result hash: result differs"]
    on_chain = verify(receipt, table, study.ledger)
    assert not on_chain.ok
    assert "site a: no grant recorded (ungated)" in on_chain.problems
    with pytest.raises(InvalidInput, match="no grant to anchor"):
        receipt.anchor(study.ledger, sender=study.researcher)


def test_receipt_json_round_trip(study: Study, table: pd.DataFrame) -> None:
    receipt = table.receipt
    receipt.anchor(study.ledger, sender=study.researcher)
    text = receipt.to_json()
    again = Receipt.from_json(text)
    assert again == receipt
    assert again.hash == receipt.hash == receipt["receipt_hash"]
    assert verify(again, table, study.ledger).ok
    assert Receipt.from_json(again.to_json(indent=None)) == receipt


HEX64 = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")


def test_receipt_holds_no_keys_or_purpose(study: Study, table: pd.DataFrame) -> None:
    receipt = table.receipt
    receipt.anchor(study.ledger, sender=study.researcher)
    text = receipt.to_json(indent=None)
    assert PURPOSE not in text
    assert "HL-7731" not in text
    for account in study.ledger.accounts:
        assert dev_key(study.ledger, account).hex() not in text.lower()
    # every 64-hex-digit string is a known public hash, none is a key
    known = {receipt["result_hash"], receipt["receipt_hash"]}
    known.add(receipt["encryption"]["public_key_fingerprint"])
    for record in receipt["sites"]:
        known |= {record["content_hash"], record["request_tx"], record["grant_tx"]}
    known |= {anchor["tx"] for anchor in receipt["anchors"]}
    known_hex = {h.split(":")[-1].removeprefix("0x").lower() for h in known}
    found = {h.lower() for h in HEX64.findall(text)}
    assert found == known_hex
    assert len(text) < 10_000


def test_receipt_with_data_other_than_registered_fails_verification(
    study: Study, table: pd.DataFrame
) -> None:
    forged = Receipt(table.receipt)
    forged["sites"] = [dict(s) for s in forged["sites"]]
    forged["sites"][0]["content_hash"] = "0x" + "ab" * 32
    forged["receipt_hash"] = forged.hash  # a consistent forgery of the body
    report = verify(forged, table, study.ledger)
    assert not report.ok
    assert report.problems == [
        "site a data: the site's data is not what its dataset registered on chain"
    ]


def test_anchoring_keeps_what_landed_when_a_grant_refuses(
    study: Study, table: pd.DataFrame
) -> None:
    receipt = Receipt(table.receipt)
    requests = sorted(study.requests)
    revoked = requests[-1]
    site = next(s for s in receipt["sites"] if s["request_id"] == revoked)
    owner = study.ledger.dataset(site["dataset_id"]).owner
    study.ledger.revoke(site["dataset_id"], receipt["researcher"], sender=owner)
    with pytest.raises(healthlab.errors.NoActiveGrant):
        receipt.anchor(study.ledger)
    assert [a["request_id"] for a in receipt["anchors"]] == requests[:-1]
    for request_id in requests[:-1]:
        digest = anchor_hash(receipt["receipt_hash"], request_id)
        assert study.ledger.result_recorded(request_id, digest)
    # anchoring again is safe: the landed anchors are recognised, not re-sent
    with pytest.raises(healthlab.errors.NoActiveGrant):
        receipt.anchor(study.ledger)
    assert [a["request_id"] for a in receipt["anchors"]] == requests[:-1]
