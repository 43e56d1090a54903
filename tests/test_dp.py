"""Differential privacy, the owner's choice (issue 13, point 5).

Under a privacy budget a site clips to public bounds, adds its own Gaussian noise
to every total, accounts what it spent with prv-accountant and refuses once the
budget is spent; on chain the owner sets the budget and the site records each
grant's spend (the privacy ledger). Attacks: the four-query inclusion–exclusion
(answered under DP — the noise is what protects) yields the lone patient's count
and age sum only as noise of the scale the results state, measured over repeated
attacks; a budget spent is refused; site-set differencing is still refused (DP
protects patients, not a hospital's totals). Honest work: results within their
stated noise of pandas.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted, errors
from healthlab.dp import PrivacyBudget, epsilon_spent
from healthlab.errors import DisclosureRefused
from healthlab.ledger import Ledger
from healthlab.sites import DisclosurePolicy
from tests.conftest import Chain

BOUNDS = {"age": (0.0, 120.0), "sbp": (60.0, 260.0), "bmi": (10.0, 70.0)}


def cohort(seed: int, n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(55, 10, n).round(1),
            "sbp": rng.normal(130, 15, n).round(1),
            "bmi": rng.normal(27, 4, n).round(1),
            "glucose": rng.normal(5.5, 1.0, n).round(2),
        }
    )


def budgeted(frames: list[pd.DataFrame], budget: PrivacyBudget | None) -> list[Site]:
    policy = DisclosurePolicy(privacy=budget)
    return [Site(n, f, policy=policy) for n, f in zip("abc", frames, strict=False)]


def lone_patient_frames(seed: int = 0, *, both: bool = False) -> list[pd.DataFrame]:
    """Site a's row 19 lacks bmi and glucose; with ``both``, b's row 20 too (then
    the patients lacking both are not one site's rows)."""
    a = cohort(seed)
    a.loc[0:19, "bmi"] = np.nan
    a.loc[19:39, "glucose"] = np.nan  # row 19 lacks both
    b = cohort(seed + 1)  # b leaves rows out too (else a's left-out rows are a's)
    b.loc[0:9, "bmi"] = np.nan
    b.loc[10:19, "glucose"] = np.nan  # none lacks both: the lone patient is a's
    if both:
        b.loc[20, ["bmi", "glucose"]] = np.nan
    return [a, b]


def test_the_accountant_is_prv_accountants_composition() -> None:
    from prv_accountant import PRVAccountant
    from prv_accountant.privacy_random_variables import GaussianMechanism

    mixed = [2.0, 3.0, 5.0]
    accountant = PRVAccountant(
        prvs=[GaussianMechanism(noise_multiplier=z) for z in mixed],
        max_self_compositions=[1, 1, 1],
        eps_error=0.01,
        delta_error=1e-8,
    )
    direct = accountant.compute_epsilon(1e-5, [1, 1, 1])[2]
    assert epsilon_spent(mixed, 1e-5) == pytest.approx(direct, abs=0.02)
    # STACK.md's figures: σ = 1, δ = 1e-5, 10 steps -> ε = 17.857
    assert epsilon_spent([1.0] * 10, 1e-5) == pytest.approx(17.857, abs=0.02)
    assert epsilon_spent([], 1e-5) == 0.0


def test_honest_results_are_within_their_stated_noise() -> None:
    frames = [cohort(i, 3000) for i in range(3)]
    sites = budgeted(frames, PrivacyBudget(epsilon=10.0, noise_multiplier=3.0))
    pooled = pd.concat(frames, ignore_index=True)
    table = encrypted.describe(sites, ["age", "sbp"], bounds=BOUNDS)
    noise = table.noise
    # round 2's layout: [dropped, n, Σ(age-c), Σ(sbp-c), Σ(age-c)², Σ(sbp-c)²]
    sd_n, sd_age = noise["sd_per_total"][1][1], noise["sd_per_total"][1][2]
    assert sd_n > 0 and set(noise["sites"][1]) == {"a", "b", "c"}
    assert abs(table.loc["count", "age"] - len(pooled)) < 5 * sd_n
    mean_sd = np.hypot(sd_age, pooled["age"].mean() * 0 + sd_n) / len(pooled)
    assert abs(table.loc["mean", "age"] - pooled["age"].mean()) < 5 * max(
        mean_sd, sd_age / len(pooled)
    )
    hist = encrypted.histogram(sites, "age", [0, 50, 60, 120])
    expected, _ = np.histogram(pooled["age"], [0, 50, 60, 120])
    sd_cell = hist.noise["sd_per_total"][0][1]
    assert np.all(np.abs(hist["count"].to_numpy() - expected) < 5 * sd_cell + 1)


def test_under_a_budget_bounds_are_required_and_every_value_mode_is_refused() -> None:
    sites = budgeted([cohort(0), cohort(1)], PrivacyBudget(epsilon=5.0))
    with pytest.raises(DisclosureRefused, match="give public bounds"):
        encrypted.describe(sites, ["age"])
    with pytest.raises(DisclosureRefused, match="no noise calibration"):
        encrypted.describe_values(sites, ["age"], bound=120, workers=1)
    # nothing was spent by the refusals
    assert sites[0].privacy_spent(None) == (0, 0.0)


def test_a_spent_budget_is_refused_and_the_spend_is_accounted() -> None:
    budget = PrivacyBudget(epsilon=1.0, noise_multiplier=5.0)
    sites = budgeted([cohort(0), cohort(1)], budget)
    answered = 0
    refusal = ""
    for _ in range(50):
        try:
            encrypted.histogram(sites, "age", [0, 50, 60, 120])
        except DisclosureRefused as exc:
            refusal = str(exc)
            break
        answered += 1
    assert "privacy budget of this grant is spent" in refusal
    # exactly as many answers as the accountant allows at ε = 1
    allowed = max(k for k in range(1, 60) if budget.allows(k))
    assert answered == allowed
    answers, epsilon = sites[0].privacy_spent(None)
    assert answers == allowed and epsilon <= 1.0
    assert epsilon == pytest.approx(budget.spent(allowed))


def test_inclusion_exclusion_under_dp_gives_noise_of_the_stated_scale() -> None:
    """The four-query attack on the patients lacking both (one at each site: the
    combination is not one site's, so the sites answer under their budget; with
    the lone patient at one site it is refused, below), repeated on fresh
    budgets: the recovered count and age sum scatter with the standard deviation
    the results state (the sum of the four answers' noise variances), far wider
    than one patient."""
    frames = lone_patient_frames(both=True)
    lone_age = frames[0].loc[19, "age"] + frames[1].loc[20, "age"]
    queries = [
        (["age"], ["age"]),
        (["age", "bmi"], ["age", "bmi"]),
        (["age", "glucose"], ["age", "glucose"]),
        (["age", "bmi", "glucose"], ["age", "bmi", "glucose"]),
    ]
    bounds = {**BOUNDS, "glucose": (0.0, 30.0)}
    signs = [1, -1, -1, 1]
    counts, sums, predicted_n, predicted_sum = [], [], [], []
    for _ in range(40):
        sites = budgeted(frames, PrivacyBudget(epsilon=50.0, noise_multiplier=2.0))
        tables = [
            encrypted.describe(sites, cols, dropna=True, bounds=bounds)
            for cols, _ in queries
        ]
        counts.append(
            sum(s * t.loc["count", "age"] for s, t in zip(signs, tables, strict=True))
        )
        sums.append(
            sum(s * t.loc["sum", "age"] for s, t in zip(signs, tables, strict=True))
        )
        # round 2's n and Σ(age - c): totals 1 and 2 of the layout
        predicted_n.append(
            np.sqrt(sum(t.noise["sd_per_total"][1][1] ** 2 for t in tables))
        )
        predicted_sum.append(
            np.sqrt(sum(t.noise["sd_per_total"][1][2] ** 2 for t in tables))
        )
    error_n = np.asarray(counts) - 2.0  # two patients lack both
    ratio_n = np.std(error_n, ddof=1) / np.mean(predicted_n)
    assert 0.6 < ratio_n < 1.5, f"count noise {ratio_n:.2f}x the stated scale"
    assert abs(np.mean(error_n)) < 4 * np.mean(predicted_n) / np.sqrt(40)
    assert np.mean(predicted_n) > 3, "the noise hides whether the patient exists"
    # the age sum's noise is at least its stated Σ(age-c) part: far beyond one age
    error_sum = np.asarray(sums) - lone_age
    assert np.std(error_sum, ddof=1) > 0.6 * np.mean(predicted_sum)
    # one standard deviation spans several times any age the bounds allow (120)
    assert np.std(error_sum, ddof=1) > 3 * 120, "one patient's age is lost in it"


def test_inclusion_exclusion_onto_one_sites_patient_is_refused_under_dp() -> None:
    """With the patient lacking both at site a alone, the four answers' combination
    is a's own total: DP protects the patient, not the hospital's totals, so the
    sites' holder rule refuses the query that would complete it."""
    bounds = {**BOUNDS, "glucose": (0.0, 30.0)}
    sites = budgeted(
        lone_patient_frames(), PrivacyBudget(epsilon=50.0, noise_multiplier=2.0)
    )
    columns = [["age"], ["age", "bmi"], ["age", "glucose"], ["age", "bmi", "glucose"]]
    refused: DisclosureRefused | None = None
    for cols in columns:
        try:
            encrypted.describe(sites, cols, dropna=True, bounds=bounds)
        except DisclosureRefused as exc:
            refused = exc
            break
    assert refused is not None, "the four answers were all released"
    assert "one site's own" in str(refused)


def test_site_set_differencing_is_still_refused_under_dp() -> None:
    frames = [cohort(i) for i in range(3)]
    sites = budgeted(frames, PrivacyBudget(epsilon=20.0, noise_multiplier=2.0))
    encrypted.describe(sites, ["age"], bounds=BOUNDS)
    with pytest.raises(DisclosureRefused, match="site-set differencing"):
        encrypted.describe(sites[:2], ["age"], bounds=BOUNDS)


# ------------------------------------------------------------------ on chain
@pytest.fixture
def granted(chain: Chain) -> Iterator[tuple[Ledger, str, list[Site]]]:
    snapshot = chain.tester.take_snapshot()
    try:
        ledger = chain.ledger()
        researcher = ledger.accounts[4]
        sites = []
        for i, name in enumerate(["h1", "h2"]):
            owner = ledger.accounts[1 + i]
            frame = cohort(i)
            ds = ledger.register_dataset(
                f"https://{name}.example/cohort.parquet",
                Site(name, frame).content_hash,
                fee_wei=0,
                terms="HMB|NCU",
                sender=owner,
            )
            req = ledger.request_access(ds, "dp test", "HMB|NCU", sender=researcher)
            ledger.approve(req, sender=owner)
            ledger.set_privacy_budget(
                ds,
                PrivacyBudget(epsilon=2.0, delta=1e-6, noise_multiplier=4.0),
                sender=owner,
            )
            sites.append(Site(name, frame, dataset_id=ds, ledger=ledger))
        yield ledger, researcher, sites
    finally:
        chain.tester.revert_to_snapshot(snapshot)


def test_on_chain_the_owner_sets_the_budget_and_the_spend_is_recorded(
    granted: tuple[Ledger, str, list[Site]],
) -> None:
    ledger, researcher, sites = granted
    ds = sites[0].dataset_id
    assert ds is not None
    budget = ledger.privacy_budget(ds)
    assert budget == PrivacyBudget(epsilon=2.0, delta=1e-6, noise_multiplier=4.0)
    with pytest.raises(errors.NotDatasetOwner):
        ledger.set_privacy_budget(ds, None, sender=researcher)
    assert ledger.privacy_spent(ds, researcher).answers == 0
    table = encrypted.describe(sites, ["age"], bounds=BOUNDS, researcher=researcher)
    assert table.noise is not None
    spend = ledger.privacy_spent(ds, researcher)
    assert spend.answers == 2  # the two rounds of describe
    assert spend.epsilon == pytest.approx(budget.spent(2), abs=0.001)
    assert spend.request_id == ledger.access(ds, researcher).request_id
    # the recorded spend only grows: nobody can reset it
    with pytest.raises(errors.SpendDecreased):
        ledger.record_privacy_spend(
            ds, researcher, 1, 0.1, sender=ledger.dataset(ds).owner
        )
    # a budget on chain binds even a site whose own policy has none
    with pytest.raises(DisclosureRefused, match="give public bounds"):
        encrypted.describe(sites, ["age"], researcher=researcher)


def test_on_chain_a_budget_must_be_well_formed(
    granted: tuple[Ledger, str, list[Site]],
) -> None:
    ledger, _, sites = granted
    ds = sites[0].dataset_id
    assert ds is not None
    owner = ledger.dataset(ds).owner
    with pytest.raises(errors.InvalidInput, match="power of ten"):
        ledger.set_privacy_budget(ds, PrivacyBudget(1.0, delta=3e-5), sender=owner)
    fn = ledger.contract.functions.setPrivacyBudget(ds, 1000, 0, 5000)
    with pytest.raises(errors.InvalidPrivacyBudget):
        ledger.transact(fn, owner)
    ledger.set_privacy_budget(ds, None, sender=owner)
    assert ledger.privacy_budget(ds) is None


def test_the_owner_and_the_researcher_see_the_spend_in_their_panels(
    granted: tuple[Ledger, str, list[Site]],
) -> None:
    from healthlab.widgets import OwnerInbox, RequestForm

    ledger, researcher, sites = granted
    ds = sites[0].dataset_id
    assert ds is not None
    owner = ledger.dataset(ds).owner
    request = ledger.access(ds, researcher).request_id
    budget = ledger.privacy_budget(ds)
    assert budget is not None
    before = OwnerInbox(ledger, owner)
    assert before.grants.loc[request, "privacy spent"] == "ε 0 of 2 (0 answers)"
    encrypted.describe(sites, ["age"], bounds=BOUNDS, researcher=researcher)
    spent = ledger.privacy_spent(ds, researcher)
    assert spent.answers == 2 and spent.epsilon > 0
    shown = f"ε {spent.epsilon:.3g} of 2 (2 answers)"
    inbox = OwnerInbox(ledger, owner)
    assert inbox.grants.loc[request, "privacy spent"] == shown
    assert "privacy spent" in inbox.grants_html.value
    form = RequestForm(ledger, researcher=researcher)
    assert form.table.loc[request, "privacy spent"] == shown
    assert shown in form.table_html.value
    # a dataset without a budget says so, in both panels
    other = sites[1].dataset_id
    assert other is not None
    ledger.set_privacy_budget(other, None, sender=ledger.dataset(other).owner)
    plain = ledger.access(other, researcher).request_id
    again = RequestForm(ledger, researcher=researcher)
    assert again.table.loc[plain, "privacy spent"] == "no budget"
    assert again.table.loc[request, "privacy spent"] == shown
