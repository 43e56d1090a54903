"""Sites: the grant and signature check before any computation, the owner's disclosure
policy (small subsets, model size, differencing, minimum sites) and value-free logs.

Gated tests build one study on the embedded chain: three owners each register one
third of ``load_diabetes`` and approve one researcher. Disclosure tests use ``Site``
objects directly (ungated) so each site's memory of answered subsets persists.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from sklearn.datasets import load_diabetes

from healthlab import DisclosurePolicy, Site, encrypted
from healthlab.errors import (
    AccessDenied,
    DataRefused,
    DisclosureRefused,
    HealthLabError,
    InvalidInput,
    SignatureInvalid,
    TooFewSites,
)
from healthlab.ledger import Ledger
from healthlab.ledger.signing import SignedQuery, query_typed_data
from tests.conftest import Chain

GRANT_SECONDS = 24 * 3600
PURPOSE = "Pooled Table 1 of the diabetes progression cohort, study HL-7731"
QUERY_HASH = "0x" + "5a" * 32


# ---------------------------------------------------------------------- data
@cache
def diabetes() -> pd.DataFrame:
    """The 442 rows of scikit-learn's diabetes data, in original units."""
    return load_diabetes(as_frame=True, scaled=False).frame


def thirds(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Three sites' shares of ``frame`` (contiguous row ranges)."""
    return {"a": frame.iloc[:150], "b": frame.iloc[150:300], "c": frame.iloc[300:]}


# --------------------------------------------------------------- gated study
@dataclass(frozen=True)
class Grants:
    """What the chain holds for a study: datasets, their owners, approved requests."""

    researcher: str
    owners: tuple[str, ...]
    datasets: tuple[int, ...]
    requests: tuple[int, ...]


def grant_study(ledger: Ledger, frames: Mapping[str, pd.DataFrame]) -> Grants:
    """Register each frame under its own owner and grant all of them to one researcher.

    Owners are ``accounts[1..]``, the researcher ``accounts[4]``; each dataset is
    registered with the content hash of its site's data.
    """
    researcher = ledger.accounts[4]
    owners = ledger.accounts[1 : 1 + len(frames)]
    datasets, requests = [], []
    for owner, (name, frame) in zip(owners, frames.items(), strict=True):
        ds = ledger.register_dataset(
            f"https://{name}.hospital.example/cohort.parquet",
            Site(name, frame).content_hash,
            fee_wei=0,
            grant_seconds=GRANT_SECONDS,
            terms="HMB|NCU",
            sender=owner,
        )
        req = ledger.request_access(ds, PURPOSE, "HMB|NCU", sender=researcher)
        ledger.approve(req, sender=owner)
        datasets.append(ds)
        requests.append(req)
    return Grants(researcher, tuple(owners), tuple(datasets), tuple(requests))


@dataclass
class Study:
    """Gated sites (fresh: no memory, no nonces) over granted datasets."""

    ledger: Ledger
    researcher: str
    owners: tuple[str, ...]
    sites: list[Site]
    frames: dict[str, pd.DataFrame]
    datasets: tuple[int, ...]
    requests: tuple[int, ...]

    @classmethod
    def open(
        cls, ledger: Ledger, frames: Mapping[str, pd.DataFrame], grants: Grants
    ) -> Study:
        sites = [
            Site(name, frame, dataset_id=ds, ledger=ledger)
            for (name, frame), ds in zip(frames.items(), grants.datasets, strict=True)
        ]
        return cls(
            ledger,
            grants.researcher,
            grants.owners,
            sites,
            dict(frames),
            grants.datasets,
            grants.requests,
        )


@pytest.fixture(scope="module")
def granted(chain: Chain) -> Iterator[tuple[Any, Grants]]:
    """Grant the diabetes thirds once; yield the snapshot, restore the chain after."""
    clean = chain.tester.take_snapshot()
    try:
        grants = grant_study(chain.ledger(), thirds(diabetes()))
        yield chain.tester.take_snapshot(), grants
    finally:
        chain.tester.revert_to_snapshot(clean)


@pytest.fixture
def study(chain: Chain, granted: tuple[Any, Grants]) -> Iterator[Study]:
    """The granted study on a fresh client; chain changes are rolled back after."""
    snapshot, grants = granted
    try:
        yield Study.open(chain.ledger(), thirds(diabetes()), grants)
    finally:
        chain.tester.revert_to_snapshot(snapshot)


def dev_key(ledger: Ledger, address: str) -> bytes:
    """The embedded chain's private key of ``address`` (test accounts only)."""
    tester = ledger.w3.provider.ethereum_tester  # type: ignore[attr-defined]
    for key in tester.backend.account_keys:
        if key.public_key.to_checksum_address() == address:
            return bytes(key.to_bytes())
    raise AssertionError(f"{address} is not a dev account")


def sign_as(
    ledger: Ledger,
    signer: str,
    *,
    researcher: str,
    query_hash: str = QUERY_HASH,
    nonce: int = 7,
    issued_at: int | None = None,
    chain_id: int | None = None,
    registry: str | None = None,
) -> SignedQuery:
    """A SignedQuery naming ``researcher`` but signed with ``signer``'s key."""
    fields = {
        "researcher": researcher,
        "query_hash": query_hash,
        "nonce": nonce,
        "issued_at": ledger.now() if issued_at is None else issued_at,
        "chain_id": ledger.chain_id if chain_id is None else chain_id,
        "registry": ledger.address if registry is None else registry,
    }
    typed = query_typed_data(**fields)  # type: ignore[arg-type]
    signed = Account.from_key(dev_key(ledger, signer)).sign_message(
        encode_typed_data(full_message=typed)
    )
    return SignedQuery(**fields, signature="0x" + bytes(signed.signature).hex())  # type: ignore[arg-type]


def assert_matches_pandas(table: pd.DataFrame, frame: pd.DataFrame) -> None:
    """count exact; mean, std, var within 1e-9 relative of pandas."""
    cols = list(table.columns)
    assert table.loc["count"].tolist() == [float(len(frame))] * len(cols)
    for stat in ("mean", "std", "var"):
        expected = frame[cols].agg(stat)
        error = ((table.loc[stat] - expected) / expected).abs().max()
        assert error <= 1e-9, f"{stat}: relative error {error:.3g}"


COLUMNS = ["age", "bmi", "bp", "s1", "target"]


# ------------------------------------------------------------ authorization
def test_gated_sites_give_the_same_results_as_ungated_ones(study: Study) -> None:
    gated = encrypted.describe(study.sites, COLUMNS, researcher=study.researcher)
    ungated = encrypted.describe(study.frames, COLUMNS)
    pd.testing.assert_frame_equal(gated, ungated, check_exact=True)
    assert_matches_pandas(gated, diabetes())
    assert [len(s.log) for s in study.sites] == [2, 2, 2], "two rounds answered"
    assert {e.researcher for s in study.sites for e in s.log} == {study.researcher}


def test_gated_sites_ask_for_the_researcher(study: Study) -> None:
    with pytest.raises(InvalidInput, match="researcher="):
        encrypted.describe(study.sites, ["age"])


def test_revoked_grant_is_refused_at_the_site(study: Study) -> None:
    ledger = study.ledger
    ledger.revoke(study.datasets[1], study.researcher, sender=study.owners[1])
    with pytest.raises(AccessDenied, match=r"site b:.*no live grant") as caught:
        encrypted.describe(study.sites, ["age"], researcher=study.researcher)
    assert type(caught.value) is AccessDenied
    assert [len(s.log) for s in study.sites] == [0, 0, 0], "no site contributed"


def test_expired_grant_is_refused_at_the_site(study: Study) -> None:
    ledger = study.ledger
    expiries = [ledger.access(ds, study.researcher).expires_at for ds in study.datasets]
    ledger.mine(min(expiries) - 60)
    table = encrypted.describe(study.sites, ["age"], researcher=study.researcher)
    assert table.loc["count", "age"] == 442.0, "still live a minute before expiry"
    ledger.mine(max(expiries) + 1)
    with pytest.raises(AccessDenied, match="3 sites refused") as caught:
        encrypted.describe(study.sites, ["age"], researcher=study.researcher)
    assert type(caught.value) is AccessDenied
    for name in "abc":
        assert f"site {name}: " in str(caught.value)


def test_researcher_without_grants_is_refused(study: Study) -> None:
    outsider = study.ledger.accounts[5]
    with pytest.raises(AccessDenied, match="holds no live grant") as caught:
        encrypted.describe(study.sites, ["age"], researcher=outsider)
    assert type(caught.value) is AccessDenied


Forgery = Callable[[Study], SignedQuery | None]

FORGERIES: dict[str, Forgery] = {
    # the researcher's name on another account's signature
    "signed by another account": lambda s: dataclasses.replace(
        s.ledger.sign_query(s.ledger.accounts[5], QUERY_HASH, nonce=1),
        researcher=s.researcher,
    ),
    "signed with another key, researcher named": lambda s: sign_as(
        s.ledger, s.ledger.accounts[5], researcher=s.researcher
    ),
    "signature over another query": lambda s: sign_as(
        s.ledger, s.researcher, researcher=s.researcher, query_hash="0x" + "11" * 32
    ),
    "signed for another registry": lambda s: sign_as(
        s.ledger,
        s.researcher,
        researcher=s.researcher,
        registry="0x" + "22" * 20,
    ),
    "signed for another chain": lambda s: sign_as(
        s.ledger, s.researcher, researcher=s.researcher, chain_id=1
    ),
    "query hash changed after signing": lambda s: dataclasses.replace(
        sign_as(
            s.ledger, s.researcher, researcher=s.researcher, query_hash="0x" + "11" * 32
        ),
        query_hash=QUERY_HASH,
    ),
    "nonce changed after signing": lambda s: dataclasses.replace(
        s.ledger.sign_query(s.researcher, QUERY_HASH, nonce=1), nonce=2
    ),
    "issued in the future": lambda s: sign_as(
        s.ledger,
        s.researcher,
        researcher=s.researcher,
        issued_at=s.ledger.now() + 120,
    ),
    "unsigned": lambda s: None,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_query_not_signed_by_the_named_researcher_is_refused(
    study: Study, forgery: str
) -> None:
    site = study.sites[0]
    signed = FORGERIES[forgery](study)
    with pytest.raises(SignatureInvalid, match="site a"):
        site.authorize(signed, query_hash=QUERY_HASH)
    genuine = study.ledger.sign_query(study.researcher, QUERY_HASH, nonce=99)
    assert site.authorize(genuine, query_hash=QUERY_HASH) == study.researcher


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param("0x1234", id="2 bytes"),
        pytest.param("", id="empty"),
        pytest.param("0x" + "00" * 65, id="r and s zero"),
        pytest.param("0x" + "ff" * 65, id="r and s beyond the curve order"),
        pytest.param("0x" + "11" * 64 + "05", id="v neither 27 nor 28"),
        pytest.param("0xzz", id="not hex"),
    ],
)
def test_malformed_signature_is_refused_as_invalid(
    study: Study, signature: str
) -> None:
    site = study.sites[0]
    signed = dataclasses.replace(
        study.ledger.sign_query(study.researcher, QUERY_HASH, nonce=1),
        signature=signature,
    )
    try:
        site.authorize(signed, query_hash=QUERY_HASH)
    except SignatureInvalid:
        pass
    except Exception as exc:  # a crash would stop every other site's work too
        pytest.fail(
            "a malformed signature must be refused with SignatureInvalid, not "
            f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        )
    else:
        pytest.fail("a malformed signature was accepted")


def test_describe_with_a_signature_by_someone_else_is_refused(
    study: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = study.ledger
    other = ledger.accounts[5]
    honest = ledger.sign_query

    def forged(researcher: str, query_hash: str, *, nonce: int) -> SignedQuery:
        signed = honest(other, query_hash, nonce=nonce)
        return dataclasses.replace(signed, researcher=researcher)

    monkeypatch.setattr(ledger, "sign_query", forged)
    with pytest.raises(SignatureInvalid, match="was not signed by"):
        encrypted.describe(study.sites, ["age"], researcher=study.researcher)
    assert [len(s.log) for s in study.sites] == [0, 0, 0]


def test_replayed_signed_query_is_refused(study: Study) -> None:
    site = study.sites[0]
    signed = study.ledger.sign_query(study.researcher, QUERY_HASH, nonce=5)
    assert site.authorize(signed, query_hash=QUERY_HASH) == study.researcher
    with pytest.raises(SignatureInvalid, match="already used"):
        site.authorize(signed, query_hash=QUERY_HASH)
    fresh = study.ledger.sign_query(study.researcher, QUERY_HASH, nonce=6)
    assert site.authorize(fresh, query_hash=QUERY_HASH) == study.researcher


@pytest.mark.parametrize(("age", "accepted"), [(900, True), (901, False)])
def test_signed_query_expires_after_max_query_age(
    study: Study, age: int, accepted: bool
) -> None:
    site = study.sites[0]
    assert site.policy.max_query_age == 900
    signed = study.ledger.sign_query(study.researcher, QUERY_HASH, nonce=3)
    study.ledger.mine(signed.issued_at + age)
    if accepted:
        assert site.authorize(signed, query_hash=QUERY_HASH) == study.researcher
    else:
        with pytest.raises(SignatureInvalid, match="signed 901 s ago"):
            site.authorize(signed, query_hash=QUERY_HASH)


def test_refusing_site_is_skipped_and_listed_in_the_receipt(study: Study) -> None:
    ledger = study.ledger
    ledger.revoke(study.datasets[2], study.researcher, sender=study.owners[2])
    table = encrypted.describe(
        study.sites, COLUMNS, researcher=study.researcher, on_refusal="skip"
    )
    assert_matches_pandas(table, diabetes().iloc[:300])
    receipt = table.receipt
    assert [s["name"] for s in receipt["sites"]] == ["a", "b"]
    assert list(receipt["refused"]) == ["c"]
    assert "no live grant" in receipt["refused"]["c"]
    assert len(study.sites[2].log) == 0


def test_too_few_sites_remain_after_refusals(study: Study) -> None:
    ledger = study.ledger
    for i in (1, 2):
        ledger.revoke(study.datasets[i], study.researcher, sender=study.owners[i])
    with pytest.raises(TooFewSites, match="only 1 site"):
        encrypted.describe(
            study.sites, ["age"], researcher=study.researcher, on_refusal="skip"
        )
    assert [len(s.log) for s in study.sites] == [0, 0, 0]


def test_study_asking_for_more_sites_than_remain_is_refused(study: Study) -> None:
    ledger = study.ledger
    ledger.revoke(study.datasets[0], study.researcher, sender=study.owners[0])
    with pytest.raises(TooFewSites, match="fewer than the 3 required"):
        encrypted.describe(
            study.sites,
            ["age"],
            researcher=study.researcher,
            on_refusal="skip",
            min_sites=3,
        )


# --------------------------------------------------------------- disclosure
def frame_of(n: int, *, start: float = 0.0) -> pd.DataFrame:
    """``n`` rows: x = start, start+1.5, …; y = x²/10; g alternating groups."""
    x = start + 1.5 * np.arange(n)
    return pd.DataFrame({"x": x, "y": x * x / 10.0, "g": np.arange(n) % 2})


def two_sites(n_a: int, n_b: int = 8) -> list[Site]:
    """Site a with ``n_a`` rows, site b with ``n_b``."""
    return [Site("a", frame_of(n_a)), Site("b", frame_of(n_b, start=100.0))]


@pytest.mark.parametrize(("n", "allowed"), [(1, False), (2, False), (3, True)])
def test_subset_below_three_rows_is_refused(n: int, allowed: bool) -> None:
    sites = two_sites(n)
    if allowed:
        table = encrypted.describe(sites, ["x"])
        assert table.loc["count", "x"] == n + 8
    else:
        with pytest.raises(DisclosureRefused, match=r"site a: a subset.*fewer than 3"):
            encrypted.describe(sites, ["x"])
        assert [len(s.log) for s in sites] == [0, 0]


@pytest.mark.parametrize(
    ("n", "refusal"),
    [(4, "no level of 'g' can be released"), (5, "'g' has a level held by"), (6, "")],
)
def test_group_below_three_rows_is_refused(n: int, refusal: str) -> None:
    # g alternates 0, 1, …: 4 rows make groups of 2 and 2, 5 rows 3 and 2; a level
    # held by fewer than 3 rows at a site is withheld, and a withheld level refuses
    # grouping by that column (without naming the site)
    sites = two_sites(n)
    if not refusal:
        table = encrypted.describe(sites, ["x"], by="g")
        assert table.loc["count"].tolist() == [3.0 + 4.0, 3.0 + 4.0]
    else:
        with pytest.raises(DisclosureRefused, match=f"^{refusal}") as caught:
            encrypted.describe(sites, ["x"], by="g")
        assert "site a" not in str(caught.value)


def histogram_sites(in_middle_bin: int) -> list[Site]:
    """Site a: 4 rows in [0, 10), ``in_middle_bin`` in [10, 20), 3 in [20, 30]."""
    a = [1.0, 2.0, 3.0, 4.0, *[15.0] * in_middle_bin, 21.0, 22.0, 30.0]
    b = [5.0, 6.0, 7.0, 11.0, 12.0, 13.0, 25.0, 26.0, 27.0]
    return [Site("a", pd.DataFrame({"x": a})), Site("b", pd.DataFrame({"x": b}))]


@pytest.mark.parametrize(
    ("count", "allowed"), [(0, True), (1, False), (2, False), (3, True)]
)
def test_histogram_bins_with_one_or_two_rows_are_refused(
    count: int, allowed: bool
) -> None:
    sites = histogram_sites(count)
    if allowed:
        result = encrypted.histogram(sites, "x", [0, 10, 20, 30])
        if count:
            assert result["count"].tolist() == [7, 3 + count, 6]
        else:  # only b holds [10, 20): its own count, so withheld by both
            assert result["count"].isna().tolist() == [False, True, False]
            assert result["count"].dropna().tolist() == [7, 6]
            assert result.suppressed == [(10.0, 20.0)]
    else:
        with pytest.raises(DisclosureRefused, match=r"site a: a subset.*cell"):
            encrypted.histogram(sites, "x", [0, 10, 20, 30])


@pytest.mark.parametrize(("count", "allowed"), [(1, False), (2, False), (3, True)])
def test_crosstab_cells_with_one_or_two_rows_are_refused(
    count: int, allowed: bool
) -> None:
    a = pd.DataFrame({"r": ["u"] * 5 + ["v"] * count, "c": ["p"] * (5 + count)})
    b = pd.DataFrame({"r": ["u"] * 6 + ["v"] * 6, "c": ["p", "q"] * 6})
    sites = [Site("a", a), Site("b", b)]
    if allowed:
        result = encrypted.crosstab(sites, "r", "c")
        # only b holds c == "q": those cells are b's counts, withheld by both
        assert result["p"].tolist() == [5 + 3, count + 3]
        assert result["q"].isna().all()
        assert result.suppressed == [("u", "q"), ("v", "q")]
    else:  # level v is rare at site a: withheld, so r cannot tabulate rows
        with pytest.raises(DisclosureRefused, match="'r' has a level held by") as e:
            encrypted.crosstab(sites, "r", "c")
        assert "site a" not in str(e.value)


@pytest.mark.parametrize(("n", "allowed"), [(9, False), (10, True)])
def test_regression_with_more_parameters_than_a_third_of_rows_is_refused(
    n: int, allowed: bool
) -> None:
    # 3 parameters: allowed while 3 <= 0.33 n, i.e. from n = 10 rows
    rng = np.random.default_rng(4)

    def rows(k: int) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "y": rng.normal(size=k),
                "x1": rng.normal(size=k),
                "x2": rng.normal(size=k),
            }
        )

    sites = [Site("a", rows(n)), Site("b", rows(40))]
    if allowed:
        fit = encrypted.ols(sites, "y", ["x1", "x2"])
        assert fit.nobs == n + 40
    else:
        with pytest.raises(DisclosureRefused, match="site a: 3 parameters exceed") as e:
            encrypted.ols(sites, "y", ["x1", "x2"])
        assert f"{n} rows" not in str(e.value)  # the site's own row count is its total


def differencing_sites(missing_y: int, at_b: int = 3) -> list[Site]:
    """Twelve rows per site; ``missing_y`` rows of y missing at site a, ``at_b`` at
    site b (with none at b, the rows a alone leaves out are a's own: protected)."""
    a = frame_of(12)
    a.loc[: missing_y - 1, "y"] = np.nan
    b = frame_of(12, start=50.0)
    if at_b:
        b.loc[: at_b - 1, "y"] = np.nan
    return [Site("a", a), Site("b", b)]


def test_rows_only_one_site_leaves_out_are_that_sites_and_withheld() -> None:
    """All rows, then the complete cases of y: the difference is site a's rows
    without y (b lacks none): one site's totals. Refused; alone, the complete-case
    query is answered with its missing count withheld (it would be a's)."""
    sites = differencing_sites(3, at_b=0)
    encrypted.describe(sites, ["x"])
    with pytest.raises(DisclosureRefused, match="rows that too few sites leave out"):
        encrypted.describe(sites, ["x", "y"], dropna=True)
    fresh = differencing_sites(3, at_b=0)
    table = encrypted.describe(fresh, ["x", "y"], dropna=True)
    assert table.loc["count", "x"] == 21.0
    assert table.loc["missing"].isna().all()
    with pytest.raises(DisclosureRefused, match="rows that too few sites leave out"):
        encrypted.describe(fresh, ["x"])


@pytest.mark.parametrize(("missing", "allowed"), [(1, False), (2, False), (3, True)])
def test_subset_differing_by_fewer_than_three_rows_is_refused(
    missing: int, allowed: bool
) -> None:
    sites = differencing_sites(missing)
    encrypted.describe(sites, ["x"])  # x over all 12 rows of each site
    # x again, now over the rows where y is present: `missing` rows fewer at site a
    if allowed:
        table = encrypted.describe(sites, ["x", "y"], dropna=True)
        assert table.loc["count", "x"] == 24 - missing - 3
        assert table.loc["missing", "x"] == missing + 3
    else:
        # refused: the rows left out (1 or 2) are a released count of so few
        # patients, and differ from the rows answered before by as few
        with pytest.raises(
            DisclosureRefused,
            match=r"site a: (together with.*differencing|the rows this query leaves)",
        ):
            encrypted.describe(sites, ["x", "y"], dropna=True)
    assert len(sites[0].log) == (4 if allowed else 2)


def test_moving_one_row_between_groups_is_refused() -> None:
    a = frame_of(12).assign(h=[0] * 6 + [1] * 6, k=[0] * 7 + [1] * 5)
    b = frame_of(12, start=50.0).assign(h=[0] * 6 + [1] * 6, k=[0] * 6 + [1] * 6)
    sites = [Site("a", a), Site("b", b)]
    first = encrypted.describe(sites, ["x"], by="h")
    assert first.loc["count"].tolist() == [12.0, 12.0]
    with pytest.raises(DisclosureRefused, match=r"site a: together with.*differencing"):
        encrypted.describe(sites, ["x"], by="k")


def test_identical_or_clearly_different_subsets_are_answered_again() -> None:
    sites = differencing_sites(3)
    first = encrypted.describe(sites, ["x"])
    again = encrypted.describe(sites, ["x"])
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    narrower = encrypted.describe(sites, ["x", "y"], dropna=True)  # 3 + 3 fewer
    assert narrower.loc["count", "x"] == 18.0
    assert [len(s.log) for s in sites] == [6, 6]


def test_study_cannot_lower_the_minimum_rows() -> None:
    sites = two_sites(2)
    with pytest.raises(DisclosureRefused, match="fewer than 3 rows"):
        encrypted.describe(sites, ["x"], min_rows=1)


def test_study_cannot_lower_the_minimum_sites() -> None:
    with pytest.raises(TooFewSites, match="fewer than the 2 required"):
        encrypted.describe([Site("a", frame_of(10))], ["x"], min_sites=1)


def test_owner_minimum_sites_binds_a_study_asking_for_fewer() -> None:
    strict = DisclosurePolicy(min_sites=3)
    sites = [Site("a", frame_of(10), policy=strict), Site("b", frame_of(10))]
    with pytest.raises(TooFewSites, match="fewer than the 3 required"):
        encrypted.describe(sites, ["x"])


def test_owner_minimum_rows_binds_a_study_asking_for_fewer() -> None:
    sites = [
        Site("a", frame_of(4), policy=DisclosurePolicy(min_rows=5)),
        Site("b", frame_of(4)),
    ]
    with pytest.raises(DisclosureRefused, match=r"site a: a subset.*fewer than 5"):
        encrypted.describe(sites, ["x"], min_rows=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"min_rows": 9}, DisclosureRefused, "fewer than your min_rows=9"),
        ({"min_sites": 3}, TooFewSites, "fewer than the 3 required"),
    ],
)
def test_study_can_tighten_the_policy(
    kwargs: dict[str, int], error: type[HealthLabError], message: str
) -> None:
    sites = two_sites(4, 4)
    assert encrypted.describe(sites, ["x"]).loc["count", "x"] == 8.0
    with pytest.raises(error, match=message):
        encrypted.describe(two_sites(4, 4), ["x"], **kwargs)  # type: ignore[arg-type]


def test_a_studys_min_rows_applies_to_the_pooled_result_not_at_the_sites() -> None:
    """Each site holds 4 rows: min_rows=5 is met by the pooled 8, so answered (the
    sites decide by their policies only, or the threshold would be a count oracle
    on one site's n)."""
    table = encrypted.describe(two_sites(4, 4), ["x"], min_rows=5)
    assert table.loc["count", "x"] == 8.0


def test_policy_is_fixed_by_the_owner() -> None:
    site = Site("a", frame_of(5), policy=DisclosurePolicy(min_rows=4))
    with pytest.raises(AttributeError):
        site.policy = DisclosurePolicy(min_rows=1)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.policy.min_rows = 1  # type: ignore[misc]
    assert site.policy.min_rows == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_rows": 0},
        {"min_sites": 0},
        {"min_difference": 0},
        {"max_param_ratio": 0.0},
        {"max_param_ratio": 1.5},
        {"max_query_age": 0},
    ],
)
def test_invalid_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidInput):
        DisclosurePolicy(**kwargs)  # type: ignore[arg-type]


# -------------------------------------------------------------------- logs
#: Distinctive row values, as written and as %g would print them.
SECRET_VALUES = [
    "123.456789",
    "98765.4321",
    "4242.0421",
    "123.457",
    "98765.4",
    "4242.04",
]


def test_errors_and_logs_never_contain_row_values() -> None:
    a = pd.DataFrame(
        {
            "x": [123.456789, 98765.4321, 4242.0421, 10.0, 11.0, 12.0, 13.0],
            "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, np.nan],
            "g": ["p", "p", "p", "p", "p", "q", "q"],
            "u": [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0],
            "v": [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0],
        }
    )
    b = pd.DataFrame(
        {"x": [20.0, 21.0, 22.0, 23.0], "y": 1.0, "g": "p", "u": 1.0, "v": 2.0}
    )
    sites = [Site("a", a), Site("b", b)]
    answered = encrypted.describe(sites, ["x"])  # 7 and 4 rows
    assert answered.loc["count", "x"] == 11.0
    attempts: list[Callable[[], object]] = [
        lambda: encrypted.describe(sites, ["x", "y"], dropna=True),  # differencing
        lambda: encrypted.describe(sites, ["x", "y"]),  # missing value
        lambda: encrypted.describe(sites, ["x"], by="g"),  # group of 2
        lambda: encrypted.histogram(sites, "x", [0, 100, 5000, 1e5]),  # bins of 1
        lambda: encrypted.crosstab(sites, "g", "y", dropna=True),  # cells of 1
        lambda: encrypted.describe(sites, ["nope"]),  # unknown column
        lambda: encrypted.ols(sites, "x", ["u", "v"]),  # 3 params, 7 rows
    ]
    messages = []
    for attempt in attempts:
        with pytest.raises((DisclosureRefused, DataRefused)) as caught:
            attempt()
        messages.append(str(caught.value))
    # one row left out: refused for its released count (it would also difference)
    assert "leaves out" in messages[0] or "differencing" in messages[0]
    assert "site a: 3 parameters exceed" in messages[-1]
    assert "7 rows" not in messages[-1]  # the site's row count is its own total
    logs = repr(sites[0].log) + repr(sites[1].log) + repr(sites)
    for text in [*messages, logs]:
        for value in SECRET_VALUES:
            assert value not in text, f"{value} leaked into: {text}"
    # the log holds counts only; the answered describe's two rounds come first
    entries = [(e.kind, e.subsets, e.rows) for e in sites[0].log]
    assert entries[:2] == [("moments", 1, 7)] * 2


def test_missing_values_are_refused_with_columns_never_counts() -> None:
    a = frame_of(6)
    a.loc[[1, 4], "x"] = [np.nan, np.inf]
    a.loc[2, "y"] = -np.inf
    sites = [Site("a", a), Site("b", frame_of(6))]
    with pytest.raises(DataRefused, match=r"site a .* in 'x', 'y';") as caught:
        encrypted.describe(sites, ["x", "y"])
    # counts below the threshold (2 and 1 rows) stay at the site
    assert not re.search(r"\b[12]\b", str(caught.value)), str(caught.value)


# ---------------------------------------- sites behind every pooled group
def _cities() -> dict[str, pd.DataFrame]:
    """coastal at three sites, inland only at site c (as in the city sample data)."""
    rng = np.random.default_rng(3)

    def frame(cities: list[str], n: int) -> pd.DataFrame:
        return pd.DataFrame(
            {"city": rng.choice(cities, n), "score": rng.normal(70, 8, n)}
        )

    return {
        "a": frame(["coastal"], 40),
        "b": frame(["coastal"], 30),
        "c": frame(["coastal", "inland"], 50),
    }


def test_a_group_held_by_one_site_is_not_released_as_pooled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    frames = _cities()
    with caplog.at_level("WARNING"):
        table = encrypted.describe(frames, ["score"], by="city")
    assert table.suppressed == ["inland"]
    assert "inland" not in table.columns.get_level_values(0)
    assert "inland" in caplog.text and "fewer sites" in caplog.text
    pooled = pd.concat(frames.values())
    coastal = pooled[pooled["city"] == "coastal"]["score"]
    assert table.loc["count", ("coastal", "score")] == len(coastal)
    assert table.loc["mean", ("coastal", "score")] == pytest.approx(
        coastal.mean(), rel=1e-12
    )
    assert table.loc["std", ("coastal", "score")] == pytest.approx(
        coastal.std(), rel=1e-12
    )


def test_an_owner_policy_of_three_sites_applies_to_every_group() -> None:
    frames = _cities()
    b = frames["b"]
    frames["b"] = b.assign(city=np.where(np.arange(len(b)) % 2, "inland", "coastal"))
    # coastal at a, b and c; inland at b and c
    strict = DisclosurePolicy(min_sites=3)
    sites = [Site(name, frame, policy=strict) for name, frame in frames.items()]
    table = encrypted.describe(sites, ["score"], by="city")
    assert table.suppressed == ["inland"]
    assert list(table.columns.get_level_values(0)) == ["coastal"]
    table2 = encrypted.describe(frames, ["score"], by="city")  # default: 2 sites
    assert table2.suppressed == []
    assert set(table2.columns.get_level_values(0)) == {"coastal", "inland"}


def test_no_group_held_by_enough_sites_refuses_the_query() -> None:
    frames = {
        "a": pd.DataFrame({"city": ["x"] * 5, "score": np.arange(5.0)}),
        "b": pd.DataFrame({"city": ["y"] * 5, "score": np.arange(5.0)}),
    }
    with pytest.raises(TooFewSites, match="no group of 'city'"):
        encrypted.describe(frames, ["score"], by="city")


def test_a_pooled_result_with_rows_at_only_one_site_is_refused() -> None:
    """Two sites take part, but with dropna only one has rows left: the 'pooled'
    mean would be that site's own."""
    frames = {
        "a": pd.DataFrame({"x": np.arange(10.0)}),
        "b": pd.DataFrame({"x": [np.nan] * 10}),
    }
    with pytest.raises(TooFewSites, match="only 1 site") as refusal:
        encrypted.describe(frames, ["x"], dropna=True)
    assert "site b" not in str(refusal.value)  # who holds nothing is not said
    with pytest.raises(TooFewSites, match="only 1 site"):
        encrypted.describe(frames, ["x"], dropna=True, on_refusal="skip")
    with pytest.raises(TooFewSites, match="only 1 site"):
        encrypted.corr(
            {n: f.assign(y=f["x"] * 2) for n, f in frames.items()},
            ["x", "y"],
            dropna=True,
            on_refusal="skip",
        )
