"""Consortium scale (issue 16): sums over a thousand sites, and through dropouts.

The secure-sum layer (:mod:`healthlab.encrypted.secagg`) is SecAgg+: a sparse mask
graph and double masking with Shamir-shared seeds. These tests check that the
statistics stay exact (against pandas on the pooled rows) over many sites and when
sites drop at each step, and attack it as a server would: claiming a live site
dropped, showing sites different survivor lists or different holder
announcements, holding a contribution back and unmasking it later.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest

from healthlab import Site, encrypted
from healthlab.encrypted import KeyHolder, secagg
from healthlab.encrypted.encoding import DIGITS
from healthlab.encrypted.keys import IntegrityError
from healthlab.encrypted.protocol import (
    Contribution,
    HolderFlags,
    Relay,
    Reveal,
    using_relay,
)
from healthlab.errors import (
    AccessDenied,
    DataRefused,
    DisclosureRefused,
    HeldByTooFewSites,
    TooManyDropouts,
)
from healthlab.sites import log_query

COLUMNS = ["age", "sbp"]


FRAMES: dict[str, pd.DataFrame] = {}


def cohort(n: int, rows: int = 25, seed: int = 0) -> tuple[list[Site], pd.DataFrame]:
    """``n`` ungated sites of ``rows`` rows each, and their pooled rows."""
    rng = np.random.default_rng(seed)
    frames = [
        pd.DataFrame(
            {
                "age": rng.normal(55, 12, rows).round(1),
                "sbp": rng.normal(130, 18, rows).round(1),
                "sex": rng.choice(["F", "M"], rows),
            }
        )
        for _ in range(n)
    ]
    sites = [Site(f"s{i:04d}", f) for i, f in enumerate(frames)]
    for site, f in zip(sites, frames, strict=True):
        FRAMES[site.participant] = f
    return sites, pd.concat(frames, ignore_index=True)


def pool(sites: Sequence[Site], leave_out: Sequence[str] = ()) -> pd.DataFrame:
    """The pooled rows of ``sites`` but those named."""
    return pd.concat(
        [FRAMES[s.participant] for s in sites if s.name not in leave_out],
        ignore_index=True,
    )


def receipt_of(table: Any) -> Any:
    return table.receipt


def assert_matches(table: pd.DataFrame, pooled: pd.DataFrame) -> None:
    """Counts exact; moments to ~1e-13 relative, as over few sites."""
    for column in COLUMNS:
        assert table.loc["count", column] == pooled[column].count()
        for stat in ("mean", "std", "sum"):
            want = getattr(pooled[column], stat)()
            got = table.loc[stat, column]
            assert abs(got - want) <= 1e-12 * abs(want), (column, stat, got, want)


def names_in(table: Any) -> list[str]:
    return sorted(s["name"] for s in receipt_of(table)["sites"])


class Drops(Relay):
    """Sites that go offline at a step (and stay offline)."""

    def __init__(self, **at: Sequence[str]) -> None:
        self.at = {step: set(names) for step, names in at.items()}

    def drops(self, step: str) -> set[str]:
        return set(self.at.get(step, ()))


# ---------------------------------------------------------------- the scheme
def test_any_t_shares_rebuild_a_seed_and_fewer_do_not() -> None:
    secret = bytes(range(16))
    shares = secagg.split(secret, 4, range(1, 8))
    for chosen in itertools.combinations(range(7), 4):
        assert secagg.combine({i + 1: shares[i] for i in chosen}, 4) == secret
    with pytest.raises(ValueError, match="3 shares, 4 needed"):
        secagg.combine({i + 1: shares[i] for i in range(3)}, 4)
    # three shares with any fourth value point at other secrets, never this one
    wrong = {
        1: shares[0],
        2: shares[1],
        3: shares[2],
        4: (shares[3] + 1) % secagg.PRIME,
    }
    with contextlib.suppress(ValueError):  # or not even a 16-byte secret
        assert secagg.combine(wrong, 4) != secret


def test_one_share_is_uniform_whatever_the_secret() -> None:
    """A single share of a fixed secret, over many splits, fills the field evenly:
    it says nothing of the secret (χ² over 16 buckets of each limb)."""
    secret = b"\x00" * 16
    draws = np.array([secagg.split(secret, 3, [1, 2, 3])[0] for _ in range(2000)])
    buckets = np.bincount((draws.ravel() * 16) // secagg.PRIME, minlength=16)
    expected = draws.size / 16
    chi2 = float(np.sum((buckets - expected) ** 2 / expected))
    assert chi2 < 50, buckets.tolist()


def test_the_mask_graph_is_sparse_symmetric_and_drawn_from_the_query() -> None:
    members = [f"s{i:04d}" for i in range(1000)]
    graph = secagg.neighbours(members, b"query-1")
    k = secagg.degree(1000)
    assert 100 <= k <= 200, "O(log n) neighbours, not n − 1"
    assert all(len(near) == k for near in graph.values())
    assert all(a in graph[b] for a in graph for b in graph[a]), "symmetric"
    assert graph != secagg.neighbours(members, b"query-2"), "each query its own"
    # cost about constant: ten times the sites, well under twice the neighbours
    assert secagg.degree(10_000) < 1.5 * k
    # small studies mask with every other site, as before
    small = secagg.neighbours(members[:12], b"q")
    assert all(len(near) == 11 for near in small.values())


def test_the_mask_modulus_grows_with_the_sites_and_stays_exact() -> None:
    assert secagg.modulus(16) == 1 << 16
    for n in (17, 100, 1000, secagg.MAX_SITES):
        assert secagg.modulus(n) > n * 4095, "a digit sum of n sites fits"
        assert secagg.modulus(n) <= 4 * n * 4096, "and not much more"
    assert secagg.threshold(164) == 83 and 2 * secagg.threshold(10, 3) > 13


# ----------------------------------------------------------------- at scale
@pytest.fixture(scope="module")
def keys() -> KeyHolder:
    return KeyHolder()


def test_describe_over_a_thousand_sites_equals_pandas(keys: KeyHolder) -> None:
    sites, pooled = cohort(1000, rows=8)
    table = encrypted.describe(sites, COLUMNS, keys=keys)
    assert_matches(table, pooled)
    assert len(receipt_of(table)["sites"]) == 1000


def test_every_statistic_is_exact_over_a_sparse_graph(keys: KeyHolder) -> None:
    """60 sites: beyond the complete graph (42 neighbours each)."""
    sites, pooled = cohort(60, rows=20, seed=3)
    assert secagg.degree(60) < 59
    assert_matches(encrypted.describe(sites, COLUMNS, keys=keys), pooled)
    table = encrypted.crosstab(sites, "sex", "sex", keys=keys)
    counts = pooled["sex"].value_counts()
    assert {k: int(table.loc[k, k]) for k in ("F", "M")} == counts.to_dict()
    corr = encrypted.corr(sites, COLUMNS, keys=keys)
    assert abs(corr.loc["age", "sbp"] - pooled["age"].corr(pooled["sbp"])) < 1e-12
    fit = encrypted.ols(sites, "sbp", ["age"], keys=keys)
    slope = np.polyfit(pooled["age"], pooled["sbp"], 1)[0]
    assert abs(fit.params["age"] - slope) < 1e-10 * abs(slope)


# ------------------------------------------------------------------ dropouts
@pytest.mark.parametrize("step", ["announce", "contribute"])
def test_a_third_of_the_sites_drop_and_the_sum_is_exact_over_the_rest(
    keys: KeyHolder, step: str
) -> None:
    sites, _ = cohort(12, seed=5)
    gone = [s.name for s in sites[::3]]  # 4 of 12
    with using_relay(Drops(**{step: gone})):
        table = encrypted.describe(sites, COLUMNS, keys=keys)
    assert_matches(table, pool(sites, gone))
    assert names_in(table) == sorted(s.name for s in sites if s.name not in gone)
    assert receipt_of(table)["dropped"] == sorted(gone)


def test_sites_that_drop_after_contributing_are_still_summed(keys: KeyHolder) -> None:
    """Their self masks come back from their neighbours' shares."""
    sites, pooled = cohort(12, seed=6)
    with using_relay(Drops(reveal=[s.name for s in sites[:4]])):
        table = encrypted.describe(sites, COLUMNS, keys=keys)
    assert_matches(table, pooled)
    assert len(names_in(table)) == 12


def test_drops_at_two_steps_of_one_query(keys: KeyHolder) -> None:
    """One site drops before contributing and a neighbour of it after: the
    pairwise mask they shared is rebuilt from the dropped site's key shares."""
    sites, _ = cohort(12, seed=7)
    edges = [0, 50, 60, 200]
    with using_relay(Drops(contribute=["s0001", "s0002"], reveal=["s0003", "s0004"])):
        table = encrypted.histogram(sites, "age", edges, keys=keys)
    expected, _ = np.histogram(pool(sites, ["s0001", "s0002"])["age"], edges)
    assert [int(c) for c in table["count"]] == expected.tolist()


def test_a_site_back_after_dropping_at_reveal_refuses_a_query_without_the_dropped(
    keys: KeyHolder,
) -> None:
    """A site that dropped at the reveal never learned which sites' contributions
    were summed, so it keeps the signed set as the query's: a ``describe``'s
    second query, over the first one's survivors, leaves out sites that may hold
    its earlier patterns, and it refuses (stricter, never weaker). Asked again of
    every site, the statistic is answered exactly."""
    sites, pooled = cohort(12, seed=17)
    with (
        using_relay(Drops(contribute=["s0001", "s0002"], reveal=["s0003", "s0004"])),
        pytest.raises(HeldByTooFewSites, match=r"site s000[34]: together with"),
    ):
        encrypted.describe(sites, COLUMNS, keys=keys)
    assert_matches(encrypted.describe(sites, COLUMNS, keys=keys), pooled)


def test_a_third_drop_over_a_sparse_graph(keys: KeyHolder) -> None:
    sites, _ = cohort(60, rows=10, seed=8)
    gone = [s.name for s in sites[1::3]]  # 20 of 60
    with using_relay(Drops(contribute=gone)):
        table = encrypted.describe(sites, COLUMNS, keys=keys)
    assert_matches(table, pool(sites, gone))


def test_more_drops_than_the_threshold_release_nothing(keys: KeyHolder) -> None:
    sites, _ = cohort(12, seed=9)
    with (
        using_relay(Drops(contribute=[s.name for s in sites[:7]])),
        pytest.raises(TooManyDropouts, match="ask again"),
    ):
        encrypted.describe(sites, COLUMNS, keys=keys)


def test_a_group_held_by_few_sites_is_not_released_after_a_drop(
    keys: KeyHolder,
) -> None:
    """Two of six sites hold the group "F": with one of them gone, the pooled "F"
    totals would be the other's alone — refused, never sent as one site's."""
    sites, _ = cohort(6, seed=10)
    frames = [FRAMES[s.participant].assign(sex="M") for s in sites]
    for f in frames[:2]:
        f["sex"] = "F"
    rare = [Site(f"r{i}", f) for i, f in enumerate(frames)]
    with (
        using_relay(Drops(contribute=["r1"])),
        pytest.raises(TooManyDropouts, match="fewer than 2"),
    ):
        encrypted.describe(rare, COLUMNS, by="sex", keys=keys)


# ------------------------------------------------------------------- attacks
class Withhold(Relay):
    """A server that keeps a live site's contribution out of the sum (claiming
    it dropped), keeps it for itself, and records what the sites reveal."""

    def __init__(self, victim: str) -> None:
        self.victim = victim
        self.kept: list[Contribution] = []
        self.announced: list[HolderFlags] = []
        self.revealed: list[Reveal] = []

    def announcements(
        self, site: str, announced: list[HolderFlags]
    ) -> list[HolderFlags]:
        self.announced = announced
        return announced

    def contributions(self, received: list[Contribution]) -> list[Contribution]:
        self.kept = [c for c in received if c.site == self.victim]
        return [c for c in received if c.site != self.victim]

    def reveals(self, received: list[Reveal]) -> list[Reveal]:
        self.revealed = received
        return received


def test_claiming_a_live_site_dropped_does_not_single_it_out(keys: KeyHolder) -> None:
    """The sum over everyone, then the same query with one site "dropped": the
    difference would be that site's totals. The sites audit the survivors' set
    against what they released before, and refuse."""
    sites, pooled = cohort(8, seed=11)
    assert_matches(encrypted.describe(sites, COLUMNS, keys=keys), pooled)
    with (
        using_relay(Withhold("s0003")),
        pytest.raises(
            DisclosureRefused,
            match=r"site-set differencing|could then be fewer sites' own",
        ),
    ):
        encrypted.describe(sites, COLUMNS, keys=keys)


def test_a_late_contribution_stays_masked(keys: KeyHolder) -> None:
    """The server holds a site's contribution back, gets its pairwise-mask key
    rebuilt from the survivors' shares, and strips those masks: the self mask,
    whose seed no honest site reveals for a "dropped" site, still hides it."""
    sites, _ = cohort(9, seed=12)
    server = Withhold("s0004")
    with using_relay(server):
        encrypted.histogram(sites, "age", bins=[0, 50, 100], keys=keys)
    (late,) = server.kept
    announced = {a.site: a for a in server.announced}
    graph = secagg.neighbours(list(announced), _label(late.query_hash, b"graph"))
    shares = [
        (graph[late.site].index(r.site) + 1, r.shares[late.site][1])
        for r in server.revealed
        if late.site in r.shares and r.shares[late.site][0] == "key"
    ]
    assert not any(
        r.shares.get(late.site, ("", None))[0] == "self" for r in server.revealed
    ), "no honest site reveals the self-mask seed of a site it was told dropped"
    key = secagg.ephemeral_key(
        secagg.combine(shares, announced[late.site].threshold),
        _label(late.query_hash, b"ephemeral"),
    )
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from healthlab.encrypted.encoding import mask_vector

    size = late.n_totals * DIGITS
    context = bytes.fromhex(late.query_hash[2:])
    pairwise = np.zeros(size, dtype=np.int64)
    for u in graph[late.site]:
        shared = key.exchange(X25519PublicKey.from_public_bytes(announced[u].ephemeral))
        seed = secagg.pair_seed(shared, late.site, u, context)
        sign = 1 if late.site < u else -1
        pairwise += sign * mask_vector([(seed, 1)], size, late.modulus)
    slots = keys.decrypt(late.ciphertexts[0], fingerprint=late.fingerprint)[:size]
    stripped = np.mod(np.rint(slots).astype(np.int64) - pairwise, late.modulus)
    # digits in the clear are 12-bit (< 4096); what is left is uniform mod 2^16
    above = float(np.mean(stripped >= 4096))
    assert above > 0.8, f"only {above:.0%} of the stripped digits are masked"


def _label(query_hash: str, purpose: bytes) -> bytes:
    return bytes.fromhex(query_hash[2:]) + b"|" + purpose


class Equivocate(Relay):
    """A server that tells half of a site's neighbours it dropped, the others that
    it survived: it would get shares of both of its seeds."""

    def __init__(self, victim: str, sites: list[Site], log: bool) -> None:
        self.victim = victim
        self.sites = sites
        self.log = log
        self.revealed: list[Reveal] = []
        self.lied_to: set[str] = set()
        self.query_hash = ""

    def announcements(
        self, site: str, announced: list[HolderFlags]
    ) -> list[HolderFlags]:
        self.query_hash = announced[0].query_hash
        return announced

    def survivors(self, site: str, survivors: list[str]) -> list[str]:
        if site < self.victim or site == self.victim:
            return survivors
        if self.log and not self.lied_to:  # the researcher's server logs its lie
            rest = [s for s in self.sites if s.name != self.victim]
            log_query(rest, self.query_hash, None)
        self.lied_to.add(site)
        return [s for s in survivors if s != self.victim]

    def reveals(self, received: list[Reveal]) -> list[Reveal]:
        self.revealed = received
        return received


def test_a_survivor_set_missing_from_the_shared_log_is_refused(
    keys: KeyHolder,
) -> None:
    sites, _ = cohort(10, seed=13)
    server = Equivocate("s0004", sites, log=False)
    with using_relay(server), pytest.raises(AccessDenied, match="query log"):
        encrypted.describe(sites, COLUMNS, keys=keys)
    assert server.lied_to and not server.revealed


def test_an_equivocating_server_gets_too_few_shares_of_either_seed(
    keys: KeyHolder,
) -> None:
    """Even with its lie logged, the server collects fewer than ``t`` shares of one
    of the two seeds: each honest neighbour reveals one, and ``2t > k``."""
    sites, _ = cohort(10, seed=13)
    server = Equivocate("s0004", sites, log=True)
    with using_relay(server), pytest.raises(TooManyDropouts, match="share"):
        encrypted.describe(sites, COLUMNS, keys=keys)
    got: dict[str, int] = {"self": 0, "key": 0}
    for r in server.revealed:
        if server.victim in r.shares:
            got[r.shares[server.victim][0]] += 1
    assert server.lied_to, "the attack ran"
    t = secagg.threshold(9)
    assert min(got.values()) < t, f"both seeds' shares reached the server: {got}"


class ForgeFar(Relay):
    """A server that shows one site a forged holder announcement of a site that is
    not its neighbour (no tag of theirs to check): the count it sees is inflated."""

    def __init__(self, target: str) -> None:
        self.target = target

    def announcements(
        self, site: str, announced: list[HolderFlags]
    ) -> list[HolderFlags]:
        if site != self.target:
            return announced
        graph = secagg.neighbours(
            [a.site for a in announced], _label(announced[0].query_hash, b"graph")
        )
        far = next(a for a in announced if a.site not in (*graph[site], site))
        forged = HolderFlags(
            far.site,
            far.query_hash,
            ((far.masked[0] - 1) % secagg.modulus(len(announced)), *far.masked[1:]),
            far.tags,
            participant=far.participant,
            ephemeral=far.ephemeral,
            threshold=far.threshold,
            commitment=far.commitment,
            shares=far.shares,
        )
        return [forged if a.site == far.site else a for a in announced]


def test_a_forged_far_announcement_is_caught_by_the_neighbours(
    keys: KeyHolder,
) -> None:
    sites, _ = cohort(40, rows=10, seed=14)
    with (
        using_relay(ForgeFar("s0007")),
        pytest.raises(IntegrityError, match="did not confirm the holder"),
    ):
        encrypted.describe(sites, COLUMNS, keys=keys)


class WrongShare(Relay):
    """A rogue site (or server) alters one revealed share."""

    def reveals(self, received: list[Reveal]) -> list[Reveal]:
        first = received[0]
        name, (kind, share) = next(iter(first.shares.items()))
        bad = dict(first.shares)
        bad[name] = (kind, (np.asarray(share) + 1) % secagg.PRIME)
        return [Reveal(first.site, first.query_hash, bad), *received[1:]]


def test_a_wrong_share_is_named_not_summed(keys: KeyHolder) -> None:
    sites, _ = cohort(6, seed=15)
    with using_relay(WrongShare()), pytest.raises(IntegrityError, match="share"):
        encrypted.describe(sites, COLUMNS, keys=keys)


def test_the_federated_masked_sum_takes_more_than_16_members() -> None:
    """The deployed study's masked sums (the sites sum them themselves) use the
    same modulus rule: 40 members, exact, through the relayed record."""
    from healthlab.federated.masked import (
        contribute,
        from_record,
        open_sum,
        server_sum,
        to_record,
    )

    rng = np.random.default_rng(16)
    members = [Site(f"m{i:02d}", pd.DataFrame({"x": [1.0]})) for i in range(40)]
    peers = {s.name: s.mask_public_key for s in members}
    totals = {s.name: (rng.normal(size=5) * 1e3).tolist() for s in members}
    sent = [contribute(s, peers, s.name, totals[s.name], "step-1") for s in members]
    assert max(int(c.digits.max()) for c in sent) >= 1 << 16, "a wider modulus"
    _, relayed = from_record(to_record("step-1", sent))
    exact = [math.fsum(col) for col in zip(*totals.values(), strict=True)]
    got = server_sum(relayed, 5)
    assert got == exact, "exact, correctly rounded"
    me = members[3]
    assert (
        open_sum(
            me, peers, me.name, relayed, "step-1", own_digest=sent[3].digest, n_totals=5
        )
        == got
    )


def test_each_step_of_a_site_runs_once_per_query(keys: KeyHolder) -> None:
    """Announcing twice would reuse the share boxes' nonces; counting and
    contributing twice would send the same masks over two counts (their
    difference in clear); revealing twice for other survivors would give both
    seeds of a neighbour. Each is refused by name; the honest order still works."""
    from dataclasses import replace

    from healthlab.encrypted.protocol import Query, SiteWork, count_holders

    sites, _ = cohort(4, seed=17)
    query = Query("custom", {"what": "once"}, 1)
    query = replace(query, participants=tuple(sorted(s.participant for s in sites)))
    log_query(sites, query.hash, None)

    def compute(
        site: Site, _: Query
    ) -> tuple[list[float], dict[str, list[np.ndarray]]]:
        return [float(site.n_rows)], {"x": [np.ones(site.n_rows, dtype=bool)]}

    work = [SiteWork(site, query, None, compute) for site in sites]
    peers = {s.name: s.mask_public_key for s in sites}
    with pytest.raises(IntegrityError, match="announce this site's flags first"):
        work[0].count_holders(peers, [])
    count_holders(work, peers)
    with pytest.raises(IntegrityError, match="already announced"):
        work[0].announce(peers)
    with pytest.raises(IntegrityError, match="already counted"):
        work[0].count_holders(peers, [])
    public = keys.public_context()
    sent = [w.contribute(peers, public) for w in work]
    with pytest.raises(IntegrityError, match="already contributed"):
        work[0].contribute(peers, public)
    names = sorted(peers)
    confirms = {c.site: c for c in sent}
    first = work[1].reveal(
        names, {n: confirms[n].confirms.get("s0001", "") for n in names}
    )
    assert work[1].reveal(names, {}) is first, "the same survivors: the same reveal"
    with pytest.raises(IntegrityError, match="it reveals once"):
        work[1].reveal(names[1:], {})


# ------------------------------------------------ federated sums, sparse graph
def _federated_members(n: int, seed: int) -> tuple[list[Site], dict[str, bytes]]:
    members = [Site(f"f{i:03d}", pd.DataFrame({"x": [1.0]})) for i in range(n)]
    return members, {s.name: s.mask_public_key for s in members}


def test_the_federated_masked_sum_masks_with_neighbours_only() -> None:
    """60 members: each masks with its O(log n) neighbours, not all 59 others (its
    vector minus those neighbours' pairwise masks is its digits), and the sum is
    still exact; every member still tags for every other."""
    from healthlab.encrypted.encoding import encode_totals, mask_vector
    from healthlab.federated.masked import (
        _digest,
        contribute,
        graph,
        open_sum,
        server_sum,
    )

    members, peers = _federated_members(60, 1)
    mesh = graph(peers, "step-1")
    assert all(len(v) == secagg.degree(60) < 59 for v in mesh.values())
    rng = np.random.default_rng(2)
    totals = {s.name: (rng.normal(size=4) * 1e3).tolist() for s in members}
    sent = [contribute(s, peers, s.name, totals[s.name], "step-1") for s in members]
    assert all(len(c.tags) == 32 * 59 for c in sent)
    me, mine = members[5], sent[5]
    near = {v: peers[v] for v in (*mesh[me.name], me.name)}
    seeds = me.pairwise_seeds(near, _digest("step-1") + b"|", me=me.name)
    unmasked = (mine.digits - mask_vector(seeds, mine.digits.size, mine.modulus)) % (
        mine.modulus
    )
    assert np.array_equal(unmasked, encode_totals([*totals[me.name], 1.0]))
    exact = [math.fsum(col) for col in zip(*totals.values(), strict=True)]
    assert server_sum(sent, 4) == exact
    for i in (0, 17, 59):
        me = members[i]
        got = open_sum(
            me, peers, me.name, sent, "step-1", own_digest=sent[i].digest, n_totals=4
        )
        assert got == exact


def test_a_vector_altered_for_one_site_is_refused_there_before_it_sums() -> None:
    """Over a sparse mask graph the server alters member j's vector only in the
    list it shows site x, a member j does not mask with (so that x's neighbours all
    see the honest list): x still checks j's tag and refuses before it computes
    anything from the sum — no refusal, or not, of x can then depend on its rows
    under a sum the server chose."""
    from healthlab.federated.masked import Contribution, contribute, graph, open_sum

    members, peers = _federated_members(60, 3)
    mesh = graph(peers, "step-1")
    x = members[0].name
    j = next(s.name for s in members[1:] if s.name not in mesh[x])
    rng = np.random.default_rng(4)
    first = {s.name: rng.normal(size=3).tolist() for s in members}
    sent = [contribute(s, peers, s.name, first[s.name], "step-1") for s in members]
    shifted = {c.member: c.digits.copy() for c in sent}
    # the first total's digits, not the check total's: the sum's check still holds
    shifted[j][:DIGITS] = (shifted[j][:DIGITS] + 7) % sent[0].modulus
    forged = [
        Contribution(c.member, shifted[j], c.tags, c.modulus) if c.member == j else c
        for c in sent
    ]
    with pytest.raises(DataRefused, match=f"{j}'s relayed contribution"):
        open_sum(
            members[0],
            peers,
            x,
            forged,
            "step-1",
            own_digest=sent[0].digest,
            n_totals=3,
        )


def test_members_keyed_to_other_lists_give_noise_that_every_site_refuses() -> None:
    """A member whose next step is keyed to another list than the others' (the
    chain of lists it opened differs): its masks do not cancel with its neighbours'
    — the server's sum is refused as noise, not read — and its tags do not verify
    anywhere."""
    from healthlab.federated.masked import chain, contribute, open_sum, server_sum

    members, peers = _federated_members(60, 5)
    rng = np.random.default_rng(6)
    totals = {s.name: rng.normal(size=3).tolist() for s in members}
    honest = chain(b"", "step-1", [])
    other = chain(b"", "step-1-forged", [])
    keyed = {s.name: other if s is members[0] else honest for s in members}
    step2 = [
        contribute(s, peers, s.name, totals[s.name], "step-2", chain=keyed[s.name])
        for s in members
    ]
    with pytest.raises(DataRefused, match="masks do not cancel"):
        server_sum(step2, 3)
    for i in (1, 30, 59):
        with pytest.raises(DataRefused, match=f"{members[0].name}'s relayed"):
            open_sum(
                members[i],
                peers,
                members[i].name,
                step2,
                "step-2",
                own_digest=step2[i].digest,
                n_totals=3,
                chain=honest,
            )
