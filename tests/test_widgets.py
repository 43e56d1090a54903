"""The notebook panels, driven without a kernel: set values, click, check the chain."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from healthlab import errors
from healthlab.ledger import Codes, Ledger, Status
from healthlab.widgets import Catalogue, OwnerInbox, RequestForm, eth
from tests.conftest import ETHER, content_hash

DAY = 24 * 3600


def register(
    ledger: Ledger,
    owner: str,
    uri: str,
    *,
    fee_wei: int = ETHER // 100,
    terms: str = "HMB|NCU",
    active: bool = True,
) -> int:
    ds = ledger.register_dataset(
        uri,
        content_hash(),
        fee_wei=fee_wei,
        grant_seconds=30 * DAY,
        terms=terms,
        sender=owner,
    )
    if not active:
        ledger.set_active(ds, False, sender=owner)
    return ds


@pytest.fixture
def catalogue_chain(ledger: Ledger, owner: str, stranger: str) -> dict[str, int]:
    """Four datasets of two owners: HMB|NCU, GRU, POA (closed), DS|IRB."""
    return {
        "cohort": register(ledger, owner, "https://hospital.example/cohort.csv"),
        "registry": register(
            ledger, stranger, "ipfs://bafyregistry", fee_wei=0, terms="GRU"
        ),
        "ancestry": register(
            ledger,
            owner,
            "https://genomes.example/ancestry.csv",
            terms="POA",
            active=False,
        ),
        "diabetes": register(
            ledger,
            stranger,
            "https://clinic.example/diabetes.csv",
            fee_wei=3 * ETHER // 2,
            terms="DS|IRB",
        ),
    }


# ------------------------------------------------------------------ helpers
@pytest.mark.parametrize(
    ("wei", "shown"),
    [
        (0, "0"),
        (ETHER // 100, "0.01"),
        (3 * ETHER // 2, "1.5"),
        (1, "0.000000000000000001"),
    ],
)
def test_eth_formats_wei_exactly(wei: int, shown: str) -> None:
    assert eth(wei) == shown


# ---------------------------------------------------------------- catalogue
def test_catalogue_lists_datasets_with_fee_in_eth_duration_and_term_names(
    ledger: Ledger, owner: str, catalogue_chain: dict[str, int]
) -> None:
    panel = Catalogue(ledger, active_only=False)
    cohort = catalogue_chain["cohort"]
    assert list(panel.table.index) == sorted(catalogue_chain.values())
    row = panel.table.loc[cohort]
    assert row["owner"] == owner
    assert row["pointer"] == "https://hospital.example/cohort.csv"
    assert row["fee (ETH)"] == "0.01"
    assert row["grant (days)"] == 30
    assert row["terms"] == "HMB|NCU"
    assert not row["auto-approve"]
    assert row["active"]
    assert panel.table.loc[catalogue_chain["diabetes"], "fee (ETH)"] == "1.5"
    assert not panel.table.loc[catalogue_chain["ancestry"], "active"]
    assert panel.selected == cohort, "the first row is selected by default"
    assert "hospital.example/cohort.csv" in panel.table_html.value


@pytest.mark.parametrize(
    ("text", "use", "active_only", "expected"),
    [
        ("", "", False, ["cohort", "registry", "ancestry", "diabetes"]),
        ("", "", True, ["cohort", "registry", "diabetes"]),
        ("EXAMPLE", "", False, ["cohort", "ancestry", "diabetes"]),
        ("ipfs://", "", True, ["registry"]),
        # purposes: GRU permits everything, HMB permits DS
        ("", "HMB", True, ["cohort", "registry"]),
        ("", "DS", True, ["cohort", "registry", "diabetes"]),
        ("", "POA", False, ["registry", "ancestry"]),
        ("", "POA", True, ["registry"]),
        # requirements: the terms set them
        ("", "IRB", True, ["diabetes"]),
        ("", "NCU", True, ["cohort"]),
        ("", "COL", False, []),
        ("clinic", "DS", True, ["diabetes"]),
    ],
)
def test_catalogue_filters_reduce_rows(
    ledger: Ledger,
    catalogue_chain: dict[str, int],
    text: str,
    use: str,
    active_only: bool,
    expected: list[str],
) -> None:
    panel = Catalogue(ledger, active_only=False)
    assert len(panel.table) == 4
    panel.text.value = text
    panel.use.value = use
    panel.active_only.value = active_only
    ids = sorted(catalogue_chain[name] for name in expected)
    assert list(panel.table.index) == ids, (text, use, active_only)
    assert [value for _label, value in panel.select.options] == ids
    assert panel.selected == (ids[0] if ids else None)
    if not ids:
        assert "no dataset matches" in panel.table_html.value


def test_catalogue_owner_filter_matches_address_case_insensitively(
    ledger: Ledger, stranger: str, catalogue_chain: dict[str, int]
) -> None:
    panel = Catalogue(ledger)
    panel.text.value = stranger.lower()[2:12]
    assert list(panel.table.index) == [
        catalogue_chain["registry"],
        catalogue_chain["diabetes"],
    ]


def test_catalogue_refresh_button_shows_new_datasets_and_keeps_selection(
    ledger: Ledger, owner: str, catalogue_chain: dict[str, int]
) -> None:
    panel = Catalogue(ledger)
    panel.select.value = catalogue_chain["diabetes"]
    new = register(ledger, owner, "https://hospital.example/new.csv")
    assert new not in panel.table.index, "the table changes only on refresh"
    panel.refresh_button.click()
    assert new in panel.table.index
    assert panel.selected == catalogue_chain["diabetes"]
    assert panel.message == "5 datasets on chain, 4 shown"


# ------------------------------------------------------------- request form
def test_request_form_shows_fee_read_from_chain_when_dataset_changes(
    ledger: Ledger, catalogue_chain: dict[str, int], researcher: str
) -> None:
    form = RequestForm(ledger, researcher)
    options = [value for _label, value in form.dataset.options]
    assert catalogue_chain["ancestry"] not in options, "closed datasets are not offered"
    for name in ("diabetes", "registry", "cohort"):
        form.dataset.value = catalogue_chain[name]
        fee = ledger.dataset(catalogue_chain[name]).fee_wei
        assert form.fee_wei == fee, name
        assert f"{eth(fee)} ETH" in form.fee.value
        assert f"({fee} wei)" in form.fee.value


def test_request_form_creates_pending_request_with_chosen_codes_paying_fee_shown(
    ledger: Ledger, catalogue_chain: dict[str, int], researcher: str, owner: str
) -> None:
    ds = catalogue_chain["cohort"]
    form = RequestForm(ledger, researcher)
    form.dataset.value = ds
    shown = form.fee_wei
    escrow, wallet = ledger.balance(ledger.address), ledger.balance(researcher)
    form.codes.value = ("HMB", "NCU")
    form.purpose.value = "cardiovascular risk in adults"
    form.request_button.click()

    assert form.error is None, form.message
    [made] = ledger.requests(researcher=researcher)
    assert made.dataset_id == ds
    assert made.status is Status.PENDING
    assert made.codes == Codes.HMB | Codes.NCU
    assert shown == made.amount_wei == ledger.dataset(ds).fee_wei == ETHER // 100
    assert ledger.balance(ledger.address) - escrow == shown
    gas = ledger.last_receipt["gasUsed"] * ledger.last_receipt["effectiveGasPrice"]
    assert wallet - ledger.balance(researcher) == shown + gas
    assert ledger.verify_purpose(
        made.id, "cardiovascular risk in adults", ledger.purpose_of(made.id).salt
    )
    assert form.message == (
        f"request #{made.id} on dataset #{ds}: PENDING; paid 0.01 ETH into escrow"
    )
    assert f"request #{made.id}" in form.status.value
    assert list(form.table.index) == [made.id]
    assert form.table.loc[made.id, "status"] == "PENDING"
    assert form.table.loc[made.id, "codes"] == "HMB|NCU"


def test_request_form_status_table_follows_owner_decision_on_refresh(
    ledger: Ledger, dataset: int, researcher: str, owner: str
) -> None:
    form = RequestForm(ledger, researcher)
    form.codes.value = ("DS", "NCU")
    form.purpose.value = "type 2 diabetes"
    request_id = form.request()
    assert request_id is not None, form.message
    ledger.approve(request_id, sender=owner)
    assert form.table.loc[request_id, "status"] == "PENDING"
    form.refresh_button.click()
    assert form.table.loc[request_id, "status"] == "APPROVED"
    assert form.table.loc[request_id, "expires"] != ""


@pytest.mark.parametrize(
    ("codes", "purpose", "error", "text"),
    [
        (("POA", "NCU"), "ancestry", errors.PurposeNotPermitted, "PurposeNotPermitted"),
        (("HMB",), "no NCU attested", errors.PurposeNotPermitted, "attest"),
        ((), "no codes", errors.InvalidInput, "choose at least one purpose code"),
        (("HMB", "NCU"), "   ", errors.InvalidInput, "state the purpose"),
    ],
)
def test_request_form_error_is_shown_and_printed_and_changes_nothing(
    ledger: Ledger,
    dataset: int,
    researcher: str,
    capsys: pytest.CaptureFixture[str],
    codes: tuple[str, ...],
    purpose: str,
    error: type[Exception],
    text: str,
) -> None:
    form = RequestForm(ledger, researcher)
    escrow, wallet = ledger.balance(ledger.address), ledger.balance(researcher)
    block = ledger.w3.eth.block_number
    capsys.readouterr()
    form.codes.value = codes
    form.purpose.value = purpose
    form.request_button.click()

    assert isinstance(form.error, error), form.message
    assert text in form.message
    assert text in form.status.value
    assert error.__name__ in form.status.value
    assert f"error: {form.message}" in capsys.readouterr().out
    assert ledger.requests() == []
    assert ledger.access(dataset, researcher).status is Status.NONE
    assert ledger.balance(ledger.address) == escrow
    assert ledger.balance(researcher) == wallet
    assert ledger.w3.eth.block_number == block, "no transaction was mined"


def test_request_form_refuses_when_fee_changed_after_it_was_shown(
    ledger: Ledger, dataset: int, researcher: str, owner: str
) -> None:
    form = RequestForm(ledger, researcher)
    assert form.fee_wei == ETHER // 100
    ledger.update_dataset(dataset, fee_wei=ETHER // 10, sender=owner)
    escrow = ledger.balance(ledger.address)
    form.codes.value = ("HMB", "NCU")
    form.purpose.value = "CVD risk"
    form.request_button.click()
    assert isinstance(form.error, errors.FeeChanged), form.message
    assert str(ETHER // 10) in form.status.value
    assert ledger.requests() == []
    assert ledger.balance(ledger.address) == escrow
    form.refresh_button.click()
    assert form.fee_wei == ETHER // 10, "refresh reads the new fee"
    assert "0.1 ETH" in form.fee.value


def test_request_form_follows_catalogue_selection(
    ledger: Ledger, catalogue_chain: dict[str, int], researcher: str
) -> None:
    catalogue = Catalogue(ledger)
    form = RequestForm(ledger, researcher, catalogue=catalogue)
    catalogue.select.value = catalogue_chain["diabetes"]
    assert form.dataset.value == catalogue_chain["diabetes"]
    assert form.fee_wei == 3 * ETHER // 2


# -------------------------------------------------------------- owner inbox
def _request(ledger: Ledger, ds: int, researcher: str, codes: str = "HMB|NCU") -> int:
    return ledger.request_access(ds, "CVD risk", codes, sender=researcher)


def test_owner_inbox_lists_pending_requests_with_codes_fee_and_history(
    ledger: Ledger, owner: str, researcher: str, stranger: str, dataset: int
) -> None:
    other = register(ledger, stranger, "https://clinic.example/other.csv", fee_wei=0)
    first = _request(ledger, other, researcher)
    ledger.approve(first, sender=stranger)
    second = _request(
        ledger, register(ledger, stranger, "ipfs://x", fee_wei=0), researcher
    )
    ledger.decline(second, sender=stranger)
    pending = _request(ledger, dataset, researcher, codes="DS|NCU")
    newcomer = ledger.accounts[4]
    fresh = _request(ledger, dataset, newcomer)

    inbox = OwnerInbox(ledger, owner)
    assert list(inbox.pending.index) == [pending, fresh], "only the owner's datasets"
    row = inbox.pending.loc[pending]
    assert row["dataset"] == dataset
    assert row["researcher"] == researcher
    assert row["codes"] == "DS|NCU"
    assert row["purpose"] == "CVD risk"
    assert row["fee (ETH)"] == "0.01"
    assert (row["earlier requests"], row["earlier grants"]) == (2, 1)
    assert (
        inbox.pending.loc[fresh, "earlier requests"],
        inbox.pending.loc[fresh, "earlier grants"],
    ) == (0, 0)
    assert inbox.pending_select.value == pending
    assert inbox.grants.empty
    assert OwnerInbox(ledger, stranger).pending.empty, "stranger's requests are decided"


def test_owner_inbox_approve_grants_access_and_pays_owner(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    request_id = _request(ledger, dataset, researcher)
    inbox = OwnerInbox(ledger, owner)
    assert not ledger.has_access(dataset, researcher)
    inbox.pending_select.value = request_id
    before = ledger.balance(owner)
    inbox.approve_button.click()
    assert inbox.error is None, inbox.message
    receipt = ledger.last_receipt
    gas = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert ledger.has_access(dataset, researcher)
    assert ledger.request(request_id).status is Status.APPROVED
    assert ledger.balance(owner) == before + ETHER // 100 - gas  # paid in the call
    assert ledger.credit(owner) == inbox.credit_wei == 0
    assert inbox.pending.empty
    assert list(inbox.grants.index) == [request_id]
    assert inbox.message.startswith(f"approved request #{request_id}")
    assert inbox.message.endswith("; 0.01 ETH paid to you")


def _auto_dataset(ledger: Ledger, owner: str) -> int:
    """An auto-approving dataset: its grants credit the owner (a pull payment)."""
    return ledger.register_dataset(
        "https://hospital.example/open.csv",
        content_hash(),
        fee_wei=ETHER // 100,
        terms="HMB|NCU",
        auto_approve=True,
        sender=owner,
    )


def test_owner_inbox_decline_refunds_researcher(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    request_id = _request(ledger, dataset, researcher)
    inbox = OwnerInbox(ledger, owner)
    inbox.decline_button.click()
    assert inbox.error is None, inbox.message
    assert ledger.request(request_id).status is Status.DECLINED
    assert ledger.credit(researcher) == ETHER // 100
    assert ledger.credit(owner) == inbox.credit_wei == 0
    assert not ledger.has_access(dataset, researcher)
    assert inbox.pending.empty
    assert inbox.message == (
        f"declined request #{request_id} on dataset #{dataset}; 0.01 ETH credited "
        f"back to {researcher}"
    )


def test_owner_inbox_revoke_ends_selected_grant_only(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    other = ledger.accounts[4]
    kept = _request(ledger, dataset, other)
    ledger.approve(kept, sender=owner)
    revoked = _request(ledger, dataset, researcher)
    ledger.approve(revoked, sender=owner)
    inbox = OwnerInbox(ledger, owner)
    assert list(inbox.grants.index) == [kept, revoked]
    inbox.grant_select.value = revoked
    inbox.revoke_button.click()
    assert inbox.error is None, inbox.message
    assert not ledger.has_access(dataset, researcher)
    assert ledger.has_access(dataset, other)
    assert ledger.request(revoked).status is Status.REVOKED
    assert list(inbox.grants.index) == [kept]


def test_owner_inbox_withdraw_pays_owner_exactly_the_credit(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    auto = _auto_dataset(ledger, owner)
    for who in (researcher, ledger.accounts[4]):
        _request(ledger, auto, who)  # granted at once: the fee is credited
    inbox = OwnerInbox(ledger, owner)
    assert inbox.credit_wei == 2 * ETHER // 100
    before = ledger.balance(owner)
    inbox.withdraw_button.click()
    assert inbox.error is None, inbox.message
    receipt = ledger.last_receipt
    gas = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert ledger.balance(owner) == before + 2 * ETHER // 100 - gas
    assert ledger.credit(owner) == inbox.credit_wei == 0
    assert inbox.message == f"withdrew 0.02 ETH ({2 * ETHER // 100} wei) to {owner}"


@pytest.mark.parametrize(
    ("button", "error", "text"),
    [
        ("approve_button", errors.InvalidInput, "select a pending request first"),
        ("decline_button", errors.InvalidInput, "select a pending request first"),
        ("revoke_button", errors.InvalidInput, "select a live grant first"),
        ("withdraw_button", errors.NothingToWithdraw, "NothingToWithdraw"),
    ],
)
def test_owner_inbox_errors_are_shown_and_printed(
    ledger: Ledger,
    owner: str,
    dataset: int,
    capsys: pytest.CaptureFixture[str],
    button: str,
    error: type[Exception],
    text: str,
) -> None:
    inbox = OwnerInbox(ledger, owner)
    block = ledger.w3.eth.block_number
    capsys.readouterr()
    getattr(inbox, button).click()
    assert isinstance(inbox.error, error), inbox.message
    assert text in inbox.message
    assert text in inbox.status.value
    assert f"error: {inbox.message}" in capsys.readouterr().out
    assert ledger.w3.eth.block_number == block, "no transaction was mined"


def test_owner_inbox_shows_refusal_when_request_was_decided_elsewhere(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    request_id = _request(ledger, dataset, researcher)
    inbox = OwnerInbox(ledger, owner)
    ledger.decline(request_id, sender=owner)  # e.g. from another browser tab
    inbox.approve_button.click()
    assert isinstance(inbox.error, errors.NotPending), inbox.message
    assert "NotPending" in inbox.status.value
    assert not ledger.has_access(dataset, researcher)
    assert ledger.credit(owner) == 0


def test_panels_show_addresses_never_keys(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    ledger.approve(_request(ledger, dataset, researcher), sender=owner)
    key = re.compile(r"(0x)?[0-9a-fA-F]{64}")
    panels = [
        Catalogue(ledger),
        RequestForm(ledger, researcher),
        OwnerInbox(ledger, owner),
    ]
    seen = 0
    stack = [panel.widget for panel in panels]
    while stack:
        widget = stack.pop()
        stack.extend(getattr(widget, "children", ()))
        value = getattr(widget, "value", None)
        if isinstance(value, str):
            seen += 1
            assert not key.search(value), f"{type(widget).__name__}: {value[:80]}"
    assert seen > 10, "the walk reached the panels' text widgets"


# --------------------------------------------------- presets, quotes, display
def test_request_form_fill_presets_the_form_without_sending(
    ledger: Ledger, catalogue_chain: dict[str, int], researcher: str
) -> None:
    form = RequestForm(ledger, researcher)
    block = ledger.w3.eth.block_number
    done = form.fill(
        dataset=catalogue_chain["diabetes"], codes=["ds", "IRB", "DS"], purpose="T2D"
    )
    assert done is form
    assert form.dataset.value == catalogue_chain["diabetes"]
    assert form.codes.value == ("DS", "IRB"), "names are upper-cased, kept once"
    assert form.purpose.value == "T2D"
    assert form.fee_wei == 3 * ETHER // 2, "the fee follows the preset dataset"
    assert ledger.w3.eth.block_number == block, "fill sent a transaction"
    assert ledger.requests() == []


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"codes": ["HMB", "XYZ"]}, r"unknown purpose code\(s\) \['XYZ'\]"),
        ({"dataset": 99}, "dataset #99 is not open for requests; open ones: #1, #2"),
    ],
)
def test_request_form_fill_refuses_unknown_codes_and_closed_datasets(
    ledger: Ledger,
    catalogue_chain: dict[str, int],
    researcher: str,
    kwargs: dict[str, object],
    text: str,
) -> None:
    form = RequestForm(ledger, researcher)
    with pytest.raises(errors.InvalidInput, match=text):
        form.fill(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidInput, match="not open for requests"):
        form.fill(dataset=catalogue_chain["ancestry"])


@pytest.mark.parametrize(
    ("name", "codes", "permitted"),
    [
        ("cohort", ("HMB", "NCU"), True),
        ("cohort", ("HMB",), False),  # NCU not attested
        ("cohort", ("POA", "NCU"), False),
        ("registry", ("POA",), True),  # GRU permits every purpose
        ("diabetes", ("DS", "IRB"), True),
    ],
)
def test_request_form_quote_shows_fee_and_terms_before_paying(
    ledger: Ledger,
    catalogue_chain: dict[str, int],
    researcher: str,
    name: str,
    codes: tuple[str, ...],
    permitted: bool,
) -> None:
    ds = catalogue_chain[name]
    form = RequestForm(ledger, researcher).fill(dataset=ds, codes=codes)
    block = ledger.w3.eth.block_number
    quote = form.quote()
    record = ledger.dataset(ds)
    assert quote.index.tolist() == [ds]
    row = quote.loc[ds]
    assert row["fee (wei)"] == str(record.fee_wei) == str(form.fee_wei)
    assert row["fee (ETH)"] == eth(record.fee_wei)
    assert (row["owner"], row["pointer"]) == (record.owner, record.pointer)
    assert row["grant (days)"] == 30
    assert row["your codes"] == "|".join(codes)
    assert bool(row["permitted"]) is permitted
    assert ledger.w3.eth.block_number == block


def test_catalogue_filter_sets_the_controls_and_refuses_unknown_codes(
    ledger: Ledger, stranger: str, catalogue_chain: dict[str, int]
) -> None:
    panel = Catalogue(ledger, active_only=False)
    kept = panel.filter(contains=stranger, use="ds")
    assert (panel.text.value, panel.use.value, panel.active_only.value) == (
        stranger,
        "DS",
        True,
    )
    assert kept.index.tolist() == [
        catalogue_chain["registry"],
        catalogue_chain["diabetes"],
    ]
    with pytest.raises(errors.InvalidInput, match="unknown use code 'XYZ'"):
        panel.filter(use="XYZ")
    assert panel.use.value == "DS", "a refused filter changes nothing"


def test_owner_inbox_select_picks_pending_requests_and_grants(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    granted = _request(ledger, dataset, researcher)
    ledger.approve(granted, sender=owner)
    pending = _request(ledger, dataset, ledger.accounts[4])
    inbox = OwnerInbox(ledger, owner)
    assert inbox.select(granted).grant_select.value == granted
    assert inbox.select(pending).pending_select.value == pending
    with pytest.raises(errors.InvalidInput, match=r"#99 is neither pending"):
        inbox.select(99)


def test_owner_inbox_earnings_follow_approvals_and_withdrawals(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    inbox = OwnerInbox(ledger, owner)
    assert inbox.earnings().loc[owner].to_dict() == {
        "credit (ETH)": "0",
        "credit (wei)": "0",
        "live grants": 0,
        "pending": 0,
        "paid out (ETH)": "0",
    }
    inbox.refresh()
    ledger.approve(_request(ledger, dataset, researcher), sender=owner)
    inbox.refresh()
    paid = inbox.earnings().loc[owner]
    assert (paid["credit (wei)"], paid["paid out (ETH)"]) == ("0", "0.01")
    _request(ledger, _auto_dataset(ledger, owner), ledger.accounts[4])
    inbox.refresh()
    assert inbox.earnings().loc[owner, "credit (wei)"] == str(ETHER // 100)
    inbox.withdraw()
    after = inbox.earnings().loc[owner]
    assert (after["credit (wei)"], after["paid out (ETH)"]) == ("0", "0.02")
    assert after["live grants"] == 2


def test_inbox_and_form_show_each_step_under_its_own_key(
    ledger: Ledger,
    owner: str,
    researcher: str,
    dataset: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import IPython.display

    from healthlab.notebooks import TABLE_MIMETYPE

    shown: list[dict[str, object]] = []
    monkeypatch.setattr(
        IPython.display, "display", lambda obj, raw=False: shown.append(obj)
    )
    form = RequestForm(ledger, researcher)
    form.fill(codes=["HMB", "NCU"], purpose="CVD").request()
    form.show("after asking")
    inbox = OwnerInbox(ledger, owner)
    inbox.show("at start")
    keys = [b[TABLE_MIMETYPE]["key"] for b in shown]  # type: ignore[index]
    assert keys == [
        "my_requests-after-asking",
        "pending_requests-at-start",
        "live_grants-at-start",
        "earnings-at-start",
    ]
    assert "Pending requests (at start)" in str(shown[1]["text/plain"])


def test_panels_display_live_with_a_static_note_for_reports(
    ledger: Ledger, owner: str, researcher: str, dataset: int
) -> None:
    _request(ledger, dataset, researcher)
    notes = {
        Catalogue(ledger): "Datasets: 1 on chain, 1 shown",
        RequestForm(ledger, researcher): f"Request form of {researcher}: 1 request",
        OwnerInbox(ledger, owner): f"Inbox of {owner}: 1 pending request(s), 0 live",
    }
    for panel, note in notes.items():
        bundle = panel._repr_mimebundle_()
        view = bundle["application/vnd.jupyter.widget-view+json"]
        assert view["model_id"] == panel.widget.model_id
        assert bundle["text/plain"].startswith(note), bundle["text/plain"]
        assert "interactive panel" in bundle["text/html"]
        assert note.split(":")[0] in bundle["text/html"]


def test_buttons_are_disabled_while_an_action_runs_and_restored_after(
    ledger: Ledger,
    dataset: int,
    researcher: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    form = RequestForm(ledger, researcher).fill(codes=["HMB", "NCU"], purpose="CVD")
    seen: list[tuple[bool, bool, str]] = []
    original = ledger.request_access

    def watched(*args: object, **kwargs: object) -> int:
        seen.append(
            (
                form.request_button.disabled,
                form.refresh_button.disabled,
                form.status.value,
            )
        )
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger, "request_access", watched)
    form.request_button.click()
    assert seen == [(True, True, seen[0][2])] and "working" in seen[0][2]
    assert not form.request_button.disabled and not form.refresh_button.disabled
    assert "PENDING" in form.status.value, "the outcome replaced 'working'"
    form.request_button.click()  # refused: a request is open already
    assert isinstance(form.error, errors.RequestAlreadyOpen), form.message
    assert not form.request_button.disabled, "an error left the button disabled"
    assert "RequestAlreadyOpen" in form.status.value
    status = form.status.value
    form.refresh_button.click()
    assert "working" not in form.status.value
    assert form.status.value == status, "a quiet refresh keeps the last message"


# ------------------------------------------------------------ downloads (issue 7)
@pytest.fixture
def stored_cohort(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> tuple[object, object, pd.DataFrame]:
    """An encrypted cohort in a LocalStore under $HEALTHLAB_HOME, its key in the
    owner's keyring (the default locations the panels use)."""
    from pathlib import Path

    from healthlab import storage

    home = Path(str(tmp_path))
    monkeypatch.setenv("HEALTHLAB_HOME", str(home))
    frame = pd.DataFrame({"age": [54, 61, 47, 70], "sbp": [132.0, 141.5, 120.0, 150.5]})
    keyring = storage.Keyring()
    stored = storage.put(frame, storage.default_store(), keyring=keyring)
    return stored, keyring, frame


def test_catalogue_says_which_datasets_can_be_downloaded(
    ledger: Ledger, owner: str, stored_cohort: tuple[object, object, pd.DataFrame]
) -> None:
    stored, _, _ = stored_cohort
    compute = register(ledger, owner, "https://hospital.example/cohort.csv")
    download = ledger.register_dataset(
        stored.uri,  # type: ignore[attr-defined]
        stored.content_hash_hex,  # type: ignore[attr-defined]
        terms="HMB|DL",
        sender=owner,
    )
    table = Catalogue(ledger).table
    assert table.at[compute, "download"] == "compute only"
    assert table.at[download, "download"] == "yes"


def test_download_button_opens_once_the_owner_releases_the_key(
    ledger: Ledger,
    owner: str,
    researcher: str,
    stored_cohort: tuple[object, object, pd.DataFrame],
) -> None:
    stored, keyring, frame = stored_cohort
    ds = ledger.register_dataset(
        stored.uri,  # type: ignore[attr-defined]
        stored.content_hash_hex,  # type: ignore[attr-defined]
        fee_wei=ETHER // 100,
        terms="HMB|DL",
        sender=owner,
    )
    form = RequestForm(ledger, researcher).fill(
        dataset=ds, codes=["HMB", "DL"], purpose="re-analysis"
    )
    assert "downloadable" in form.terms.value
    assert form.download_button.disabled
    req = form.request()
    assert req is not None and ledger.request(req).download
    assert form.download_button.disabled, "pending: nothing to download yet"

    inbox = OwnerInbox(ledger, owner, keyring=keyring)  # type: ignore[arg-type]
    inbox.pending_select.value = req
    inbox.approve_button.click()
    assert "data key was released" in inbox.status.value
    assert ledger.key_envelope(req) is not None

    form.refresh_button.click()
    assert not form.download_button.disabled
    assert "key is released" in form.download_note.value
    form.download_button.click()
    assert isinstance(form.downloaded, pd.DataFrame)
    pd.testing.assert_frame_equal(form.downloaded, frame)
    assert "CID and content hash verified" in form.status.value

    ledger.revoke(ds, researcher, sender=owner)
    form.refresh_button.click()
    assert form.download_button.disabled, "a revoked grant cannot download"
    assert form.download() is None
    assert "no live grant" in form.status.value


def test_approving_a_download_without_the_key_says_what_to_do(
    ledger: Ledger,
    owner: str,
    researcher: str,
    stored_cohort: tuple[object, object, pd.DataFrame],
    tmp_path: object,
) -> None:
    from pathlib import Path

    from healthlab import storage

    stored, _, _ = stored_cohort
    ds = ledger.register_dataset(
        stored.uri,  # type: ignore[attr-defined]
        stored.content_hash_hex,  # type: ignore[attr-defined]
        terms="HMB|DL",
        sender=owner,
    )
    req = ledger.request_access(ds, "p", "HMB", download=True, sender=researcher)
    empty = storage.Keyring(Path(str(tmp_path)) / "other-keyring.json")
    inbox = OwnerInbox(ledger, owner, keyring=empty)
    inbox.pending_select.value = req
    inbox.approve_button.click()
    assert ledger.request(req).status is Status.APPROVED
    assert "not in your keyring" in inbox.status.value
    assert ledger.key_envelope(req) is None
    form = RequestForm(ledger, researcher).fill(dataset=ds)
    assert form.download_button.disabled
    assert "waiting for the owner" in form.download_note.value
