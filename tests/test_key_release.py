"""Download grants and key release (issue 7), end to end on a chain.

An owner stores a dataset encrypted (``healthlab.storage.put``), registers its
``ipfs://`` pointer and plaintext hash with terms that allow downloads, approves a
researcher's download request and releases the data key wrapped to the researcher's
public key (recovered from the request transaction). The researcher's client opens
the envelope, fetches the blob, checks CID and hash, and decrypts. Every way this can
go wrong is refused with a named error: a compute-only dataset, a compute grant, a
revoked or expired grant, a key not released yet, someone else's envelope, a wrong
key, a tampered blob.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from eth_keys import keys

from healthlab import errors
from healthlab.ledger import Codes, Ledger, Status
from healthlab.ledger.node import AnvilNode
from healthlab.storage import (
    Keyring,
    LocalStore,
    Stored,
    open_key,
    put,
    seal_key,
)
from healthlab.storage.release import (
    download,
    download_frame,
    key_release_context,
    release_key,
    release_pending_keys,
)
from tests.conftest import ETHER

FEE = ETHER // 100
GRANT = 30 * 24 * 3600


def cohort() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    return pd.DataFrame(
        {
            "age": rng.integers(30, 80, 500),
            "sbp": rng.normal(130, 15, 500).round(1),
            "smoker": rng.choice(["yes", "no"], 500),
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "blobs")


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring(tmp_path / "keyring.json")


def publish(
    ledger: Ledger,
    owner: str,
    store: LocalStore,
    keyring: Keyring,
    *,
    terms: str = "HMB|DL",
    auto_approve: bool = False,
    frame: pd.DataFrame | None = None,
) -> tuple[int, Stored]:
    stored = put(cohort() if frame is None else frame, store, keyring=keyring)
    ds = ledger.register_dataset(
        stored.uri,
        "0x" + stored.content_hash.hex(),
        fee_wei=FEE,
        grant_seconds=GRANT,
        terms=terms,
        auto_approve=auto_approve,
        sender=owner,
    )
    return ds, stored


def granted(ledger: Ledger, ds: int, owner: str, researcher: str) -> int:
    req = ledger.request_access(ds, "CVD risk", "HMB", download=True, sender=researcher)
    ledger.approve(req, sender=owner)
    return req


def test_dataframe_round_trip_through_the_chain(
    ledger: Ledger, owner: str, researcher: str, store: LocalStore, keyring: Keyring
) -> None:
    ds, stored = publish(ledger, owner, store, keyring)
    record = ledger.dataset(ds)
    assert record.downloadable and record.pointer == f"ipfs://{stored.cid}"
    req = granted(ledger, ds, owner, researcher)
    assert ledger.access(ds, researcher).download is True

    tx = release_key(ledger, req, keyring=keyring)
    envelope = ledger.key_envelope(req)
    assert envelope is not None and stored.key not in envelope
    # the key's release pays the owner the escrowed fee, in the same transaction
    assert list(ledger.events()["event"].iloc[-2:]) == ["KeyReleased", "FeePaid"]
    assert ledger.access(ds, researcher).key_released is True
    assert ledger.events().iloc[-1]["tx"] == tx

    got = download_frame(ledger, ds, researcher=researcher, store=store)
    pd.testing.assert_frame_equal(got, cohort())


def test_the_owner_encrypts_to_the_key_that_signed_the_request(
    ledger: Ledger, owner: str, researcher: str, store: LocalStore, keyring: Keyring
) -> None:
    ds, _ = publish(ledger, owner, store, keyring)
    req = granted(ledger, ds, owner, researcher)
    public = ledger.requester_public_key(req)
    assert keys.PublicKey(public).to_checksum_address() == researcher


def test_compute_only_dataset_refuses_a_download_request_and_keeps_the_fee(
    ledger: Ledger, owner: str, researcher: str, store: LocalStore, keyring: Keyring
) -> None:
    ds, _ = publish(ledger, owner, store, keyring, terms="HMB")
    before = ledger.balance(researcher)
    with pytest.raises(errors.DownloadNotPermitted, match="compute-only"):
        ledger.request_access(ds, "CVD risk", "HMB", download=True, sender=researcher)
    assert ledger.balance(researcher) == before, "a refused request cost ether"
    assert ledger.requests(dataset_id=ds) == []


def test_a_compute_grant_gets_no_key(
    ledger: Ledger, owner: str, researcher: str, store: LocalStore, keyring: Keyring
) -> None:
    ds, _stored = publish(ledger, owner, store, keyring)
    req = ledger.request_access(ds, "CVD risk", "HMB", sender=researcher)
    ledger.approve(req, sender=owner)
    assert ledger.has_access(ds, researcher)
    assert not ledger.access(ds, researcher).download
    with pytest.raises(errors.NotADownloadGrant):
        release_key(ledger, req, keyring=keyring)
    # the contract refuses it too, whatever the client does
    envelope = b"\x01" * 129
    with pytest.raises(errors.NotADownloadGrant):
        ledger.release_key(req, envelope, sender=owner)
    with pytest.raises(errors.NotADownloadGrant):
        download(ledger, ds, researcher=researcher, store=store)


@pytest.mark.parametrize("ending", ["revoked", "expired", "closed"])
def test_a_grant_that_ended_gets_no_new_envelope_and_no_download(
    ledger: Ledger,
    owner: str,
    researcher: str,
    store: LocalStore,
    keyring: Keyring,
    ending: str,
) -> None:
    ds, _stored = publish(ledger, owner, store, keyring)
    req = granted(ledger, ds, owner, researcher)
    release_key(ledger, req, keyring=keyring)
    if ending == "revoked":
        ledger.revoke(ds, researcher, sender=owner)
    elif ending == "expired":
        ledger.advance_time(GRANT)
    else:
        ledger.set_active(ds, False, sender=owner)
    with pytest.raises(errors.NoActiveGrant):
        ledger.release_key(req, b"\x01" * 129, sender=owner)
    with pytest.raises(errors.AccessDenied, match="no live grant"):
        download(ledger, ds, researcher=researcher, store=store)
    if ending != "closed":
        with pytest.raises(errors.NoActiveGrant):
            release_key(ledger, req, keyring=keyring)


def test_no_envelope_yet_says_to_wait_for_the_owner(
    ledger: Ledger, owner: str, researcher: str, store: LocalStore, keyring: Keyring
) -> None:
    ds, _ = publish(ledger, owner, store, keyring)
    granted(ledger, ds, owner, researcher)
    with pytest.raises(errors.KeyNotReleased, match="not released"):
        download(ledger, ds, researcher=researcher, store=store)


def test_an_envelope_for_someone_else_does_not_open(
    ledger: Ledger,
    owner: str,
    researcher: str,
    stranger: str,
    store: LocalStore,
    keyring: Keyring,
) -> None:
    ds, stored = publish(ledger, owner, store, keyring)
    req = granted(ledger, ds, owner, researcher)
    release_key(ledger, req, keyring=keyring)
    envelope = ledger.key_envelope(req)
    assert envelope is not None
    context = key_release_context(ledger, ledger.dataset(ds), req, researcher)
    theirs = ledger.private_key(stranger)
    mine = ledger.private_key(researcher)
    assert theirs is not None and mine is not None
    with pytest.raises(errors.HealthLabError) as caught:
        open_key(envelope, theirs, context=context)
    assert stored.key.hex() not in str(caught.value)
    # the right key in another context (another dataset, request or chain) fails too
    other = key_release_context(ledger, ledger.dataset(ds), req + 1, researcher)
    with pytest.raises(errors.HealthLabError):
        open_key(envelope, mine, context=other)
    assert open_key(envelope, mine, context=context) == stored.key
    # and the stranger's own download is refused: no grant of theirs
    with pytest.raises(errors.AccessDenied):
        download(ledger, ds, researcher=stranger, store=store)


def test_a_wrong_data_key_fails_at_decryption(
    ledger: Ledger, owner: str, researcher: str, store: LocalStore, keyring: Keyring
) -> None:
    ds, _stored = publish(ledger, owner, store, keyring)
    req = granted(ledger, ds, owner, researcher)
    release_key(ledger, req, data_key=bytes(32))
    with pytest.raises(errors.HealthLabError) as caught:
        download(ledger, ds, researcher=researcher, store=store)
    assert "key" in str(caught.value).lower()


def test_a_tampered_blob_is_rejected_after_a_valid_release(
    ledger: Ledger, owner: str, researcher: str, store: LocalStore, keyring: Keyring
) -> None:
    ds, stored = publish(ledger, owner, store, keyring)
    req = granted(ledger, ds, owner, researcher)
    release_key(ledger, req, keyring=keyring)
    path = store.path(stored.cid)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.chmod(0o600)
    path.write_bytes(bytes(blob))
    with pytest.raises(errors.HealthLabError, match=stored.cid):
        download(ledger, ds, researcher=researcher, store=store)


def test_auto_approved_download_grants_get_their_keys_on_the_owners_next_pass(
    ledger: Ledger,
    owner: str,
    researcher: str,
    stranger: str,
    store: LocalStore,
    keyring: Keyring,
) -> None:
    ds, stored = publish(ledger, owner, store, keyring, auto_approve=True)
    first = ledger.request_access(
        ds, "CVD risk", "HMB", download=True, sender=researcher
    )
    compute = ledger.request_access(ds, "CVD risk", "HMB", sender=stranger)
    assert ledger.request(first).status is Status.APPROVED
    assert release_pending_keys(ledger, owner, keyring=keyring) == [first]
    assert release_pending_keys(ledger, owner, keyring=keyring) == []
    assert ledger.key_envelope(compute) is None
    assert download(ledger, ds, researcher=researcher, store=store) == stored_bytes(
        store, stored
    )


def stored_bytes(store: LocalStore, stored: Stored) -> bytes:
    from healthlab.storage import fetch

    return fetch(stored.uri, stored.key, content_hash=stored.content_hash, store=store)


def test_dl_is_a_named_code(ledger: Ledger, owner: str) -> None:
    assert Codes.DL == 1 << 12
    assert int(ledger.contract.functions.DL().call()) == int(Codes.DL)


@pytest.mark.anvil
def test_round_trip_on_anvil_with_the_nodes_accounts(
    anvil: AnvilNode, tmp_path: Path
) -> None:
    """On a real node requests are signed by the node (EIP-1559 transactions); the
    owner still recovers the researcher's key, and the researcher's client opens the
    envelope with the dev account's published key."""
    ledger = Ledger.connect(anvil.url)
    owner, researcher = ledger.accounts[1], ledger.accounts[2]
    store, keyring = LocalStore(tmp_path / "blobs"), Keyring(tmp_path / "k.json")
    frame = cohort().head(50)
    ds, _stored = publish(ledger, owner, store, keyring, frame=frame)
    req = granted(ledger, ds, owner, researcher)
    tx = ledger.w3.eth.get_transaction(ledger.request(req).request_tx)  # type: ignore[arg-type]
    assert tx["type"] == 2
    public = ledger.requester_public_key(req)
    assert keys.PublicKey(public).to_checksum_address() == researcher
    release_key(ledger, req, keyring=keyring)
    pd.testing.assert_frame_equal(
        download_frame(ledger, ds, researcher=researcher, store=store), frame
    )
    # a second client (another process, say) sees the same envelope
    other = Ledger.connect(anvil.url)
    assert other.key_envelope(req) == ledger.key_envelope(req)


def test_an_envelope_to_a_dev_account_opens_and_fits_the_contracts_limit(
    ledger: Ledger,
) -> None:
    researcher = ledger.accounts[2]
    private = ledger.private_key(researcher)
    assert private is not None
    public = keys.PrivateKey(private).public_key.to_bytes()
    envelope = seal_key(b"k" * 32, public, context=b"ctx")
    assert open_key(envelope, private, context=b"ctx") == b"k" * 32
    assert len(envelope) <= int(ledger.contract.functions.MAX_ENVELOPE().call())
