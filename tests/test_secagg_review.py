"""Attack review of the SecAgg+ secure sum (healthlab/encrypted/secagg.py and its
use in protocol.py): a researcher who holds the key *and* runs the server.

Each test is an attack the design stops; the first (a site asked to reveal twice,
for two survivor sets) broke it until a site revealed once per query.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from healthlab import Site, encrypted
from healthlab.encrypted import KeyHolder, secagg
from healthlab.encrypted.encoding import DIGITS, decode_sum, mask_vector
from healthlab.encrypted.keys import IntegrityError
from healthlab.encrypted.protocol import (
    HolderFlags,
    PreparedQuery,
    Relay,
    Reveal,
    using_relay,
)
from healthlab.errors import DisclosureRefused, TooManyDropouts
from healthlab.sites import log_query

COLUMNS = ["age", "sbp"]
FRAMES: dict[str, pd.DataFrame] = {}


@pytest.fixture(scope="module")
def keys() -> KeyHolder:
    return KeyHolder()


def cohort(n: int, rows: int = 20, seed: int = 0, prefix: str = "v") -> list[Site]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frame = pd.DataFrame(
            {
                "age": rng.normal(55, 12, rows).round(1),
                "sbp": rng.normal(130, 18, rows).round(1),
            }
        )
        FRAMES[f"{prefix}{i:03d}"] = frame
        out.append(Site(f"{prefix}{i:03d}", frame))
    return out


def _label(query_hash: str, purpose: bytes) -> bytes:
    return bytes.fromhex(query_hash[2:]) + b"|" + purpose


class Stolen(Exception):
    def __init__(self, recovered: list[float], truth: list[float]) -> None:
        super().__init__("one site's totals recovered")
        self.recovered = recovered
        self.truth = truth


def _unmask_one(
    keys: KeyHolder,
    victim: str,
    contribution: Any,
    announced: dict[str, Any],
    self_shares: list[tuple[int, np.ndarray]],
    key_shares: list[tuple[int, np.ndarray]],
) -> list[float]:
    """Decrypt ONE site's ciphertext (the key holder can) and strip its self mask
    and every pairwise mask from the two rebuilt seeds."""
    qh = contribution.query_hash
    t = announced[victim].threshold
    self_seed = secagg.combine(self_shares, t)
    key = secagg.ephemeral_key(secagg.combine(key_shares, t), _label(qh, b"ephemeral"))
    members = sorted(announced)
    graph = secagg.neighbours(members, _label(qh, b"graph"))
    size = contribution.n_totals * DIGITS
    modulus = contribution.modulus
    context = bytes.fromhex(qh[2:])
    seeds = []
    for u in graph[victim]:
        shared = key.exchange(X25519PublicKey.from_public_bytes(announced[u].ephemeral))
        seeds.append(
            (secagg.pair_seed(shared, victim, u, context), 1 if victim < u else -1)
        )
    correction = np.mod(
        mask_vector(seeds, size, modulus)
        + secagg.self_mask(self_seed, size, modulus, _label(qh, b"self")),
        modulus,
    )
    slots = np.concatenate(
        [
            keys.decrypt(c, fingerprint=contribution.fingerprint)
            for c in contribution.ciphertexts
        ]
    )
    return decode_sum(
        slots,
        contribution.n_totals,
        1,
        modulus=modulus,
        correction=correction,
    )


# ------------------------------------------------------------------ attack 1
def _double_reveal_finish(keys_: KeyHolder, victim_index: int = 1):  # type: ignore[no-untyped-def]
    """A server that runs the protocol honestly up to the reveal step, then asks
    every survivor to reveal twice: once told the victim dropped (it reveals its
    share of the victim's pairwise-mask key), once told everyone survived (its
    share of the victim's self-mask seed). SiteWork.reveal keeps no record that
    it already revealed for this query."""

    def finish(self: PreparedQuery, keys: KeyHolder, relay: Relay | None = None):  # type: ignore[no-untyped-def]
        public = keys.public_context()
        peers = {w.site.name: w.site.mask_public_key for w in self.work}
        announced = [w.announce(peers) for w in self.work]
        for w in self.work:
            w.count_holders(peers, announced)
        sent = {w.site.name: w.contribute(peers, public) for w in self.work}
        victim = sorted(peers)[victim_index]
        rest = [w for w in self.work if w.site.name != victim]
        everyone = sorted(peers)
        without = [n for n in everyone if n != victim]
        # the researcher logs its "dropped" survivor set itself (log_query)
        log_query([w.site for w in rest], self.query.hash, None)

        def confirms(me: str) -> dict[str, str]:
            return {n: c.confirms.get(me, "") for n, c in sent.items()}

        # dropped-first: the survivor audit sees only this set (nothing recorded
        # yet); the second reveal (no one dropped) is not audited at all
        as_dropped = [w.reveal(without, confirms(w.site.name)) for w in rest]
        as_alive = [w.reveal(everyone, confirms(w.site.name)) for w in rest]
        by = {a.site: a for a in announced}
        graph = secagg.neighbours(everyone, _label(self.query.hash, b"graph"))
        x = {u: i + 1 for i, u in enumerate(graph[victim])}

        def shares(reveals: list[Reveal], kind: str) -> list[tuple[int, np.ndarray]]:
            return [
                (x[r.site], np.asarray(r.shares[victim][1]))
                for r in reveals
                if r.shares.get(victim, ("", None))[0] == kind
            ]

        recovered = _unmask_one(
            keys,
            victim,
            sent[victim],
            by,
            shares(as_alive, "self"),
            shares(as_dropped, "key"),
        )
        truth = next(w for w in self.work if w.site.name == victim)
        raise Stolen(recovered, list(truth._SiteWork__totals))  # type: ignore[attr-defined]

    return finish


def test_a_second_reveal_for_other_survivors_is_refused(
    keys: KeyHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review found this attack (before the fix: the victim's 20 rows and its
    exact sum of ages came back): a site now reveals once per query, and a second
    request for other survivors is refused by name."""
    sites = cohort(6, seed=22)
    monkeypatch.setattr(PreparedQuery, "finish", _double_reveal_finish(keys))
    with pytest.raises(IntegrityError, match="it reveals once"):
        encrypted.describe(sites, COLUMNS, keys=keys)


# ------------------------------------------------------------------ attack 2
class DropAtAnnounce(Relay):
    """A site 'goes offline' before the masks are set: run_query asks P \\ {w}."""

    def __init__(self, victim: str) -> None:
        self.victim = victim

    def drops(self, step: str) -> set[str]:
        return {self.victim} if step == "announce" else set()


def test_retry_after_an_announce_drop_does_not_single_out_a_site(
    keys: KeyHolder,
) -> None:
    """Sum over P, then the same query with w 'dropped at announce': the retry
    over P \\ {w} would give w's totals by difference — refused by the site-set
    audit at prepare time."""
    sites = cohort(6, seed=23, prefix="a")
    encrypted.describe(sites, COLUMNS, keys=keys)
    with (
        using_relay(DropAtAnnounce("a002")),
        pytest.raises(DisclosureRefused, match="site-set differencing"),
    ):
        encrypted.describe(sites, COLUMNS, keys=keys)


def test_retry_first_then_the_full_set_is_refused_too(keys: KeyHolder) -> None:
    sites = cohort(6, seed=24, prefix="b")
    with using_relay(DropAtAnnounce("b002")):
        encrypted.describe(sites, COLUMNS, keys=keys)
    with pytest.raises(DisclosureRefused, match="site-set differencing"):
        encrypted.describe(sites, COLUMNS, keys=keys)


# ------------------------------------------------------------------ attack 3
class Equivocate(Relay):
    """Tell some neighbours the victim dropped, the rest it survived (lie logged)."""

    def __init__(self, victim: str, sites: list[Site], liars: set[str]) -> None:
        self.victim, self.sites, self.liars = victim, sites, liars
        self.revealed: list[Reveal] = []
        self.qh = ""
        self.logged = False

    def announcements(self, site: str, announced: list[Any]) -> list[Any]:
        self.qh = announced[0].query_hash
        return announced

    def survivors(self, site: str, survivors: list[str]) -> list[str]:
        if site not in self.liars:
            return survivors
        if not self.logged:
            log_query([s for s in self.sites if s.name != self.victim], self.qh, None)
            self.logged = True
        return [s for s in survivors if s != self.victim]

    def reveals(self, received: list[Reveal]) -> list[Reveal]:
        self.revealed = received
        return received


@pytest.mark.parametrize("n", [3, 4, 5])
def test_equivocation_over_few_sites_gets_too_few_shares(
    keys: KeyHolder, n: int
) -> None:
    """Small n: t = k//2 + 1 still exceeds half the neighbours (n=3: t=2 of 2,
    n=4: 2 of 3, n=5: 3 of 4), so no split of the neighbours yields t of each."""
    sites = cohort(n, seed=30 + n, prefix=f"e{n}")
    victim = sites[0].name
    others = [s.name for s in sites[1:]]
    liars = set(others[: (len(others) + 1) // 2])
    server = Equivocate(victim, sites, liars)
    with using_relay(server), pytest.raises((TooManyDropouts, DisclosureRefused)):
        encrypted.describe(sites, COLUMNS, keys=keys)
    got = {"self": 0, "key": 0}
    for r in server.revealed:
        if victim in r.shares:
            got[r.shares[victim][0]] += 1
    t = secagg.threshold(n - 1)
    assert min(got.values()) < t, got


# ------------------------------------------------------------------ attack 4
class HugeShare(Relay):
    """Forged share values beyond the field (int64 overflow in combine)."""

    def reveals(self, received: list[Reveal]) -> list[Reveal]:
        first = received[0]
        bad = {
            v: (kind, np.full_like(np.asarray(s), (1 << 62) + 12345))
            for v, (kind, s) in first.shares.items()
        }
        return [Reveal(first.site, first.query_hash, bad), *received[1:]]


def test_out_of_field_shares_are_caught_not_summed(keys: KeyHolder) -> None:
    sites = cohort(5, seed=40, prefix="h")
    with using_relay(HugeShare()), pytest.raises(IntegrityError, match="share"):
        encrypted.describe(sites, COLUMNS, keys=keys)


class ReplayOldReveals(Relay):
    """Reveals (and confirms) captured from a previous query, replayed."""

    def __init__(self) -> None:
        self.old: list[Reveal] = []

    def reveals(self, received: list[Reveal]) -> list[Reveal]:
        if not self.old:
            self.old = received
            return received
        return self.old


def test_replayed_reveals_from_another_query_are_refused(keys: KeyHolder) -> None:
    sites = cohort(5, seed=41, prefix="r")
    # describe runs two queries (means, then centred moments): the second gets
    # the first one's reveals
    with (
        using_relay(ReplayOldReveals()),
        pytest.raises(IntegrityError, match="another query"),
    ):
        encrypted.describe(sites, COLUMNS, keys=keys)


# ------------------------------------------------------------------ attack 8
class OutOfRangeDigits(Relay):
    """A server that shows every site one announcement with digits beyond the mask
    modulus: shifted by it (the sum mod the modulus would not change) or beyond
    int64."""

    def __init__(self, shift: int) -> None:
        self.shift = shift

    def announcements(
        self, site: str, announced: list[HolderFlags]
    ) -> list[HolderFlags]:
        first = announced[-1]
        forged = replace(
            first, masked=(first.masked[0] + self.shift, *first.masked[1:])
        )
        return [*announced[:-1], forged]


@pytest.mark.parametrize("shift", [1 << 16, 1 << 70, -(1 << 16)])
def test_holder_digits_outside_the_modulus_are_refused(
    keys: KeyHolder, shift: int
) -> None:
    sites = cohort(4, seed=42, prefix="o")
    with (
        using_relay(OutOfRangeDigits(shift)),
        pytest.raises(IntegrityError, match="not masked digits"),
    ):
        encrypted.describe(sites, COLUMNS, keys=keys)
