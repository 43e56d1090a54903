"""The secure-sum protocol: signed query → sites → aggregator → key holder.

1. The researcher builds a :class:`Query` and signs its hash (EIP-712).
2. *Prepare*: every site authorizes the signed query (signature, freshness, replay,
   live grant on chain), selects its rows, checks every subset against its disclosure
   policy and computes its totals — all at the site. It answers only "ready" and the
   public key of its pairwise masks.
3. *Holders*: the sites count, among themselves, how many of them hold rows for the
   query and for each of its blocks (a ``by=`` group): each announces 0/1 flags under
   pairwise masks, tagged for every peer, and each sums every announcement itself
   (:class:`HolderFlags`) — so no server or researcher can make a site believe that
   others hold rows. A site refuses a query fewer than the pooling minimum of sites
   hold rows for (one site's totals next to an empty partner), and sends zeros for a
   block fewer hold; its rows there become *protected* by its auditor, so no
   combination of later answers ("all rows minus the released groups") gives them.
4. *Contribute*: once the participants are known, every site encodes its totals as
   exact fixed-point digits, adds masks that cancel across sites, encrypts them under
   the researcher's public context and tags the ciphertext with its fingerprint.
5. The :class:`Aggregator` holds only the public context; it rejects contributions
   made under another key or for another query, and adds the rest.
6. The key holder decrypts the aggregate — never a single site's ciphertext — and
   rebuilds the exact sums.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from healthlab.dp import gaussian_noise, moments_scales
from healthlab.encrypted import secagg
from healthlab.encrypted.encoding import (
    DIGITS,
    MODULUS,
    decode_sum,
    encode_totals,
    mask_digits,
    mask_vector,
)
from healthlab.encrypted.keys import IntegrityError, KeyHolder, PublicContext
from healthlab.errors import (
    AccessDenied,
    DataRefused,
    DisclosureRefused,
    HealthLabError,
    InvalidInput,
    TooFewSites,
    TooManyDropouts,
)
from healthlab.site_data import at_site
from healthlab.sites import LEFT_OUT, Site, log_query

if TYPE_CHECKING:
    from healthlab.ledger.signing import SignedQuery

__all__ = [
    "Aggregate",
    "Aggregator",
    "Block",
    "Check",
    "Contribution",
    "DroppedOut",
    "HolderFlags",
    "PreparedQuery",
    "Query",
    "Relay",
    "Reveal",
    "SiteWork",
    "StudyRun",
    "count_holders",
    "prepare_query",
    "run_query",
    "sign_query",
    "using_relay",
]


@dataclass(frozen=True)
class Block:
    """Totals ``[start, stop)`` of a site's answer that summarize one group of its
    rows (``mask``, over all the site's rows): released only when at least the
    pooling minimum of sites hold rows in the group, else sent as zeros by all."""

    start: int
    stop: int
    mask: np.ndarray = field(repr=False)
    #: A block no site holds is released as its zeros (a histogram's empty bin:
    #: it says only that no site holds rows there); else it is suppressed too.
    empty_released: bool = False
    #: A block the answer cannot do without (a model's dummy column: its totals are
    #: entangled with every other's): held by too few sites, the query is refused
    #: by every site rather than sent with the block as zeros.
    required: bool = False
    #: What a refusal for a required block says (no count, no site, no value).
    name: str = ""
    #: The entries of the answer's subsets that are this block's rows, as
    #: (subset key, index): withheld with it, and only they (another entry with
    #: the same rows here is another released cell). Empty: every entry with the
    #: block's rows.
    cells: tuple[tuple[str, int], ...] = ()


_CHECK_LIMIT = 1e25


@dataclass(frozen=True)
class Check:
    """A vector the sites sum among themselves, each checking the sum against its
    own ``tolerance`` before anything of the answer leaves it.

    A model's iteration uses it to verify that the coefficients asked for follow
    from what the sites answered before (a Newton step), so a researcher cannot
    evaluate the model at coefficients of its choosing. The sum travels with the
    holder count: masked pairwise and tagged for every peer, summed by each site
    itself; the key holder and the server never see it. ``on_pass`` runs at the
    site once the check holds.
    """

    values: np.ndarray = field(repr=False)
    tolerance: np.ndarray = field(repr=False)
    rule: str
    on_pass: Callable[[], None] | None = field(default=None, repr=False)
    #: at the site when the check fails, with the labels of what failed
    on_fail: Callable[[list[str]], None] | None = field(default=None, repr=False)
    #: per coordinate, the rule a failure there breaks (default: ``rule``); a
    #: site's 0/1 flag (its rows break a rule) summed this way is anonymous
    labels: tuple[str, ...] = ()


#: What a site computes from (its rows, the query): totals, its subsets by column,
#: and optionally the answer's blocks (a ``by=`` query's groups) and a check.
Totals = (
    tuple[list[float], dict[str, list[np.ndarray]]]
    | tuple[list[float], dict[str, list[np.ndarray]], list[Block]]
    | tuple[list[float], dict[str, list[np.ndarray]], list[Block], Check | None]
)
SiteComputation = Callable[[Site, "Query"], Totals]

#: Every site computation by the query kind it answers. A deployed site runs only
#: these (the installed package's code), chosen by the signed query's ``kind``:
#: no code travels with a query.
COMPUTATIONS: dict[str, SiteComputation] = {}


def computation(kind: str) -> Callable[[SiteComputation], SiteComputation]:
    """Register the site computation that answers queries of ``kind``."""

    def register(compute: SiteComputation) -> SiteComputation:
        if COMPUTATIONS.get(kind, compute) is not compute:
            raise HealthLabError(f"two site computations answer {kind!r} queries")
        COMPUTATIONS[kind] = compute
        return compute

    return register


def computation_for(kind: str) -> SiteComputation:
    """The registered computation of ``kind`` (a query of another kind is refused)."""
    import healthlab.encrypted  # noqa: F401 - every statistic registers its own

    try:
        return COMPUTATIONS[kind]
    except KeyError:
        raise DataRefused(
            f"no site computation answers {kind!r} queries in this HealthLab version"
        ) from None


@dataclass(frozen=True)
class Query:
    """A statistics query, identical for every site; its hash is what gets signed.

    ``kind`` names the computation; ``spec`` holds its public parameters (columns,
    centers, bins, levels…). ``min_sites`` may tighten, never loosen, the sites'
    policies. ``min_rows`` is the researcher's own reporting threshold, applied to
    the pooled result on the researcher's side (:func:`stats._own_threshold`): a
    site decides only by its policy, since a threshold the researcher chooses
    would make its refusals a count oracle (bisected: a site's exact n).
    """

    kind: str
    spec: Mapping[str, Any]
    n_totals: int
    min_rows: int = 0
    min_sites: int = 2
    nonce: int = field(default_factory=lambda: secrets.randbits(63))
    #: The sites the query pools (``Site.participant``), sorted; set by
    #: :func:`prepare_query`, signed with the rest and logged in the shared log.
    participants: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for hashing and receipts)."""
        return json.loads(json.dumps(asdict(self), default=_json_default))  # type: ignore[no-any-return]

    @functools.cached_property
    def hash(self) -> str:
        """``0x`` + sha256 of the canonical JSON of the query (computed once: the
        query is frozen)."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return "0x" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Contribution:
    """One site's encrypted, masked totals, tagged with the public key's fingerprint."""

    site: str
    query_hash: str
    fingerprint: str
    n_totals: int
    ciphertexts: tuple[bytes, ...] = field(repr=False)
    #: the mask modulus of the query's sum (:func:`secagg.modulus` of its sites)
    modulus: int = MODULUS
    #: per neighbour, an HMAC of the holder announcements this site counted
    #: (checked by each neighbour before it reveals any share)
    confirms: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes uploaded by the site."""
        return sum(len(c) for c in self.ciphertexts)


@dataclass(frozen=True)
class Aggregate:
    """The sum of every participating site's contribution (still encrypted)."""

    query_hash: str
    fingerprint: str
    n_totals: int
    sites: tuple[str, ...]
    ciphertexts: tuple[bytes, ...] = field(repr=False)
    modulus: int = MODULUS


class SiteWork:
    """A site's side of one query: authorized, checked and computed at the site.

    The plaintext totals stay inside this object; what leaves it is the masked,
    encrypted :class:`Contribution`.
    """

    def __init__(
        self,
        site: Site,
        query: Query,
        signed: SignedQuery | None,
        compute: SiteComputation,
    ) -> None:
        self.site = site
        self.query = query
        self.researcher = site.authorize(signed, query_hash=query.hash)
        if query.min_sites < site.policy.min_sites:
            raise TooFewSites(
                f"site {site.name} pools only over at least {site.policy.min_sites} "
                "sites; ask with that min_sites"
            )
        #: participants beyond distinct owners other than the researcher: they
        #: might claim to hold rows, so the holder count must exceed them
        self.untrusted, self._audited_set = site.check_participants(
            query.hash,
            query.participants,
            researcher=self.researcher,
            need=self.need,
        )
        # every step on the site's rows is wrapped: an error that leaves the site
        # names the site, the rule and the columns, never a value (site_data.at_site)
        columns = query_columns(query)
        what = f"the {query.kind} query"
        self._budget = site.privacy_budget
        self.noise_sd: np.ndarray | None = None
        if self._budget is not None:  # before computing: what one row can change
            scales = _noise_scales(site, query)
            self.noise_sd = self._budget.noise_multiplier * scales
            site.check_privacy(self.researcher, self._budget.noise_multiplier)
        with site.reads() as reads:
            totals, subsets, *rest = at_site(
                site.name, what, columns, compute, site, query
            )
        #: the columns the computation read: the auditor matches a row a data
        #: update made to an earlier one by these columns' values
        self._reads: frozenset[str] | None = frozenset(reads) if reads else None
        self._lift = functools.partial(site.auditor.lift, columns=self._reads)
        if len(totals) != query.n_totals:
            raise HealthLabError(
                f"site {site.name} computed {len(totals)} totals, expected "
                f"{query.n_totals}"
            )
        at_site(
            site.name,
            what,
            columns,
            site.check_subsets,
            subsets,
            researcher=self.researcher,
            differencing=self._budget is None,
            columns=self._reads,
        )
        if self.noise_sd is not None:  # the site's own noise, on every total
            totals = (
                np.asarray(totals, dtype=float)
                + gaussian_noise(len(totals), 1.0) * self.noise_sd
            ).tolist()
        try:  # a total the encoding cannot carry: refused now, and remembered
            _encode(site.name, totals)
        except DataRefused:
            site.refuse_subsets(
                subsets, researcher=self.researcher, columns=self._reads
            )
            raise
        self.__totals = [float(t) for t in totals]
        self._subsets = subsets
        self._blocks: list[Block] = list(cast("list[Block]", rest[0])) if rest else []
        self._check = cast("Check | None", rest[1]) if len(rest) > 1 else None
        if self._blocks and site.policy.is_citizen:  # whatever its rows
            site.refuse_subsets(
                subsets, researcher=self.researcher, columns=self._reads
            )
            raise DisclosureRefused(
                f"site {site.name} is a citizen's site: it answers no groups, bins "
                "or cells (a group's holder count is the number of citizens in it); "
                "ask for totals over all of the citizens' rows"
            )
        masks = [
            np.asarray(m, dtype=bool)
            for column, ms in subsets.items()
            if column != LEFT_OUT
            for m in ms
        ]
        # a partner with no rows takes part with zeros and its holder flag 0: the
        # holder count then refuses a "pooled" result that only one site holds,
        # without saying which site holds nothing (naming it said its count is 0)
        # the rows the query leaves out: their count (totals[0], released as
        # ``missing``) is counted among the sites too — when one site alone leaves
        # rows out, it would be that site's count (and all rows minus the complete
        # cases that site's totals), so every site then sends it as zero
        left = subsets.get(LEFT_OUT) or [np.zeros(site.n_rows, dtype=bool)]
        self._left = np.asarray(left[0], dtype=bool)
        self.__flags = (
            [int(any(m.any() for m in masks))]
            + [int(np.asarray(b.mask).any()) for b in self._blocks]
            + [int(self._left.any())]
        )
        self._n_flags = len(self.__flags)
        if self._check is not None:  # summed with the flags, digit by digit
            # beyond any tolerance, and within what the encoding carries
            values = np.nan_to_num(
                np.asarray(self._check.values, dtype=float), nan=_CHECK_LIMIT
            )
            values = np.clip(values, -_CHECK_LIMIT, _CHECK_LIMIT)
            self.__flags += [int(d) for d in _encode(site.name, list(values))]
        self._n_check = len(self.__flags) - self._n_flags
        # this site's patterns across the queries it answered (holders.py):
        # their table is counted with the flags, so no difference of answers is
        # fewer sites' own; a citizen's site claims none (its record is in every
        # query of its sites: the site-set audit covers it), with a table alike;
        # the researcher's own dataset counts its patterns but does not refuse
        # (nothing of it to protect from the researcher)
        citizen = site.policy.is_citizen
        self._holds_patterns = not citizen
        self._enforces = not (citizen or site.owned_by(self.researcher))
        self._patterns = site.holder_patterns.prepare(
            query.participants,
            query.hash,
            {} if citizen else subsets,
            []
            if citizen
            else [(f"block {i}", b.mask) for i, b in enumerate(self._blocks)],
            self._lift,
            site.auditor.n_rows,
            len(query.participants),
        )
        self.__flags += self._patterns.table.tolist()
        self.missing_withheld = False
        self._graph: dict[str, tuple[str, ...]] = {}
        self._modulus = MODULUS
        self._threshold = 0
        self._contributed = False
        #: the survivors this site revealed its shares for, and what it revealed
        self._revealed: tuple[frozenset[str], Reveal] | None = None
        self._listed = b""
        self._held: dict[str, np.ndarray] = {}
        self._announced: dict[str, HolderFlags] = {}
        self._peer_keys: dict[str, bytes] = {}
        self._pair: dict[str, _PairKeys] = {}
        self._peers: dict[str, bytes] | None = None
        self.holders: list[int] | None = None
        self.suppressed: list[int] = []

    @property
    def need(self) -> int:
        """Fewest sites a result of this query may pool: the query's, which every
        site uses alike (a site refuses a query asking fewer than its policy)."""
        return self.query.min_sites

    def _context(self, purpose: bytes) -> bytes:
        return bytes.fromhex(self.query.hash[2:]) + b"|" + purpose

    def _near(self, peers: Mapping[str, bytes]) -> dict[str, bytes]:
        """This site and its neighbours in the query's mask graph, with their keys."""
        me = self.site.name
        return {p: peers[p] for p in (*self._graph[me], me)}

    def announce(self, peers: Mapping[str, bytes]) -> HolderFlags:
        """This site's masked 0/1 flags — holds rows for the query, for each block —
        and the public half of its masks for this query, tagged for each neighbour
        in the mask graph (their pairwise tag key); with its two fresh mask seeds
        split among the neighbours (:mod:`~healthlab.encrypted.secagg`), each share
        sealed to its holder."""
        self._check_peers(peers)
        me = self.site.name
        if self._graph:  # fresh seeds twice would reuse the share boxes' nonces
            raise IntegrityError(f"site {me} already announced for this query")
        self._graph = secagg.neighbours(list(peers), self._context(b"graph"))
        self._modulus = secagg.modulus(len(peers))
        near = self._graph[me]
        around = self._near(peers)
        # one HKDF per neighbour: this query's holder-mask seed, tag, share-box and
        # confirmation keys with it
        derived = self.site.pairwise_keys(
            around, b"healthlab-query-keys", self._context(b"pairs"), length=128
        )
        self._pair = {
            v: _PairKeys(k[:32], k[32:64], k[64:96], k[96:]) for v, k in derived.items()
        }
        flags = np.asarray(self.__flags, dtype=np.int64)
        seeds = [(self._pair[v].mask, 1 if me < v else -1) for v in near]
        masked = tuple(
            mask_digits(
                flags, mask_vector(seeds, flags.size, self._modulus), self._modulus
            ).tolist()
        )
        # this query's own mask seeds: a self mask, and an X25519 key for the
        # pairwise masks; both split among the neighbours, any `t` rebuild them
        self.__self_seed = secrets.token_bytes(secagg.SECRET_BYTES)
        key_seed = secrets.token_bytes(secagg.SECRET_BYTES)
        self.__ephemeral = secagg.ephemeral_key(key_seed, self._context(b"ephemeral"))
        ephemeral = self.__ephemeral.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )
        self._threshold = secagg.threshold(len(near), self.untrusted)
        sealed: dict[str, bytes] = {}
        if near:
            shares = secagg.split(
                self.__self_seed + key_seed, self._threshold, range(1, len(near) + 1)
            )
            sealed = {
                v: _seal(self._pair[v].box, self.query.hash, me, v, shares[i])
                for i, v in enumerate(near)
            }
        announced = HolderFlags(
            me,
            self.query.hash,
            masked,
            {},
            participant=self.site.participant,
            ephemeral=ephemeral,
            threshold=self._threshold,
            commitment=secagg.commitment(self.__self_seed, self._context(b"self")),
            shares=sealed,
        )
        digest = announced.digest  # the tags cover the body by its SHA-256
        tags = {
            v: hmac.new(k.tag, digest, "sha256").hexdigest()
            for v, k in self._pair.items()
        }
        return replace(announced, tags=tags)

    def count_holders(
        self, peers: Mapping[str, bytes], announced: Sequence[HolderFlags]
    ) -> list[int]:
        """Sum every peer's announcement (each checked against its tag for this
        site) into how many sites hold rows for the query and for each block; refuse
        the query, or suppress a block, that fewer than the pooling minimum hold.

        Every honest site computes the same counts from the same announcements; a
        server that drops, changes or invents one is caught here (a tag does not
        verify, a peer is missing, or the masks do not cancel).
        """
        self._check_peers(peers)
        me = self.site.name
        if not self._graph:
            raise IntegrityError(f"site {me}: announce this site's flags first")
        if self.holders is not None:  # one count, one contribution per query
            raise IntegrityError(f"site {me} already counted the holders")
        near = set(self._graph[me])
        by_site = {a.site: a for a in announced}
        if set(by_site) != set(peers) or len(announced) != len(peers):
            raise IntegrityError(
                f"site {me}: the holder count needs one announcement from every site "
                "taking part, and only from them"
            )
        size = len(self.__flags)
        for name in sorted(by_site):
            flags = by_site[name]
            if flags.query_hash != self.query.hash or len(flags.masked) != size:
                raise IntegrityError(f"site {me}: {name} announced for another query")
            if not _digits_in(flags, self._modulus):
                raise IntegrityError(
                    f"site {me}: the holder flags from {name} are not masked digits"
                )
            # a neighbour's announcement is checked here; every other one by its
            # own neighbours, who confirm (with their contributions) the same list
            if name in near:
                expected = hmac.new(
                    self._pair[name].tag, flags.digest, "sha256"
                ).hexdigest()
                if not hmac.compare_digest(expected, flags.tags.get(me, "")):
                    raise IntegrityError(
                        f"site {me}: the holder flags from {name} do not carry its tag"
                    )
        own = by_site.get(me)
        if own is None or own.body != self._own_body(own):
            raise IntegrityError(f"site {me}: its own announcement was altered")
        # what the neighbours confirm: the list of announcements, by their digests
        self._listed = hashlib.sha256(
            b"".join(by_site[n].digest for n in sorted(by_site))
        ).digest()
        total = np.zeros(size, dtype=np.int64)
        for name in sorted(by_site):
            total += by_site[name].values
        summed = np.mod(total, self._modulus)
        counts = [int(c) for c in summed[: self._n_flags]]
        if any(c > len(peers) for c in counts):
            raise IntegrityError(
                f"site {me}: the holder flags do not cancel to counts (tampering?)"
            )
        self._verify(summed[self._n_flags : self._n_flags + self._n_check], len(peers))
        need = self.need + self.untrusted
        if counts[0] < need:
            raise TooFewSites(
                f"site {me}: only {counts[0]} site(s) of those taking part hold rows "
                f"for this query, fewer than the {need} a pooled result needs; "
                "add sites that hold these columns"
            )
        if self.site.policy.is_citizen and counts[0] < len(peers):
            # a citizen's contributors must be the logged sites: then the site-set
            # audit sees every set of citizens a result sums (which ones hold
            # nothing, nobody learns: every citizen refuses alike)
            raise TooFewSites(
                f"site {me} is a citizen's site: it takes part only when every site "
                "of the query holds rows for it, and some hold none; ask the "
                "citizens whose rows the query selects"
            )
        self.suppressed = [
            i
            for i, c in enumerate(counts[1:-1])
            if c < need and (c > 0 or not self._blocks[i].empty_released)
        ]
        required = [
            self._blocks[i].name for i in self.suppressed if self._blocks[i].required
        ]
        if required:
            raise TooFewSites(
                f"site {me}: {', '.join(required)} held by too few of the sites "
                "taking part to be pooled; merge or drop it"
            )
        self.missing_withheld = 0 < counts[-1] < need
        released = self._released()
        protected = self._protected()
        at_site(
            me,
            f"the {self.query.kind} query",
            query_columns(self.query),
            self.site.check_protected,
            released,
            protected,
            researcher=self.researcher,
            columns=self._reads,
        )
        # after the protected sets (whose refusal says more): the patterns
        if self._holds_patterns:
            at_site(
                me,
                f"the {self.query.kind} query",
                query_columns(self.query),
                self.site.holder_patterns.check,
                self._patterns,
                summed[self._n_flags + self._n_check :],
                self._withheld_labels(),
                need,
                me,
                self._lift,
                self._modulus,
                self._enforces,
            )
        self._held = self._open_shares(by_site)
        self._announced = by_site
        self._peers = dict(peers)
        self.holders = counts
        if self._check is not None and self._check.on_pass is not None:
            self._check.on_pass()  # every check passed: the answer will be sent
        return counts

    def _verify(self, digit_sums: np.ndarray, n_sites: int) -> None:
        """The sum of every site's check vector, against this site's tolerance."""
        check = self._check
        if check is None:
            return
        size = len(check.values)
        try:
            pooled = np.asarray(
                decode_sum(
                    digit_sums.astype(np.float64),
                    size,
                    n_sites,
                    modulus=self._modulus,
                ),
                dtype=float,
            )
        except (IntegrityError, InvalidInput):
            pooled = np.full(size, np.inf)
        failed = ~(np.abs(pooled) <= check.tolerance)
        if failed.any():
            labels = check.labels or (check.rule,) * size
            broken = list(dict.fromkeys(labels[i] for i in np.flatnonzero(failed)))
            if check.on_fail is not None:
                check.on_fail(broken)
            raise DisclosureRefused(f"site {self.site.name}: {'; '.join(broken)}")

    def _own_body(self, own: HolderFlags) -> bytes:
        """What this site announced (the server may not change it)."""
        return HolderFlags(
            own.site,
            self.query.hash,
            own.masked,
            {},
            participant=self.site.participant,
            ephemeral=self.__ephemeral.public_key().public_bytes(
                Encoding.Raw, PublicFormat.Raw
            ),
            threshold=self._threshold,
            commitment=secagg.commitment(self.__self_seed, self._context(b"self")),
        ).body

    def _open_shares(self, by_site: Mapping[str, HolderFlags]) -> dict[str, np.ndarray]:
        """The shares of each neighbour's mask seeds sealed to this site."""
        me = self.site.name
        held = {}
        for v in self._graph[me]:
            box = by_site[v].shares.get(me)
            share = (
                None
                if box is None
                else _open(self._pair[v].box, self.query.hash, v, me, box)
            )
            if share is None:
                raise IntegrityError(
                    f"site {me}: the shares of {v}'s mask seeds meant for it are "
                    "missing or altered"
                )
            held[v] = share
        return held

    def _protected(self) -> list[np.ndarray]:
        """The row sets this answer withholds: suppressed blocks, and the rows left
        out when too few sites leave rows out."""
        out = [np.asarray(self._blocks[i].mask, dtype=bool) for i in self.suppressed]
        if self.missing_withheld:
            out.append(self._left)
        return out

    def _withheld(self) -> tuple[set[tuple[str, int]], set[bytes]]:
        """The subset entries this answer withholds (the suppressed blocks' own
        entries, the rows left out when their count is withheld), and the row
        sets of suppressed blocks that do not name their entries."""
        entries: set[tuple[str, int]] = set()
        rows: set[bytes] = set()
        for i in self.suppressed:
            block = self._blocks[i]
            if block.cells:
                entries.update(block.cells)
            else:
                rows.add(np.packbits(np.asarray(block.mask, dtype=bool)).tobytes())
        if self.missing_withheld:
            left = self._subsets.get(LEFT_OUT, [])
            entries.update((LEFT_OUT, j) for j in range(len(left)))
        return entries, rows

    def _withheld_labels(self) -> list[str | np.ndarray]:
        """What the holder patterns leave out of this answer's cells: the labels
        of the withheld entries and blocks (:mod:`healthlab.holders`), and the
        rows of suppressed blocks that do not name their entries."""
        entries, _ = self._withheld()
        out: list[str | np.ndarray] = [f"{c}\x1e{j}" for c, j in sorted(entries)]
        out += [f"block {i}" for i in self.suppressed]
        out += [
            np.asarray(self._blocks[i].mask, dtype=bool)
            for i in self.suppressed
            if not self._blocks[i].cells
        ]
        return out

    def _released(self) -> dict[str, list[np.ndarray]]:
        """The subsets this site's answer releases: all but the suppressed blocks'
        (and the rows left out, when their count is withheld)."""
        if not self.suppressed and not self.missing_withheld:
            return self._subsets
        entries, rows = self._withheld()
        out = {
            column: [
                m
                for j, m in enumerate(masks)
                if (column, j) not in entries
                and np.packbits(np.asarray(m, dtype=bool)).tobytes() not in rows
            ]
            for column, masks in self._subsets.items()
        }
        return {column: masks for column, masks in out.items() if masks}

    def _check_peers(self, peers: Mapping[str, bytes]) -> None:
        self._peer_keys = dict(peers)
        self._check_peers_match(peers)

    def _check_peers_match(self, peers: Mapping[str, bytes]) -> None:
        if self.site.name not in peers or len(peers) != len(self.query.participants):
            raise IntegrityError(
                f"site {self.site.name}: the sites taking part are not the sites "
                "this query was logged and signed for"
            )
        if len(peers) < self.need:
            raise TooFewSites(
                f"site {self.site.name} contributes only to results pooled over at "
                f"least {self.need} sites ({len(peers)} taking part)"
            )

    def contribute(
        self, peers: Mapping[str, bytes], public: PublicContext
    ) -> Contribution:
        """Mask, encrypt and tag this site's totals for the sites in ``peers``
        (after :meth:`count_holders` with the same ``peers``)."""
        self._check_peers(peers)
        if self.holders is None or self._peers != dict(peers):
            raise IntegrityError(
                f"site {self.site.name}: count the holders among these sites first"
            )
        if self._contributed:  # the same masks twice: their difference is clear
            raise IntegrityError(f"site {self.site.name} already contributed")
        totals = list(self.__totals)
        for i in self.suppressed:  # a block too few sites hold: zeros from everyone
            block = self._blocks[i]
            totals[block.start : block.stop] = [0.0] * (block.stop - block.start)
        if self.missing_withheld:  # rows too few sites leave out: their count too
            totals[0] = 0.0
        if self._budget is not None:  # counted before anything leaves the site
            # checked again where it is spent: queries prepared together each
            # passed the check at prepare, before any of them was counted
            self.site.check_privacy(self.researcher, self._budget.noise_multiplier)
            self.site.record_privacy(self.researcher, self._budget.noise_multiplier)
        digits = _encode(self.site.name, totals)
        me = self.site.name
        context = bytes.fromhex(self.query.hash[2:])
        seeds = []
        for v in self._graph[me]:  # pairwise masks, from this query's own keys
            peer = X25519PublicKey.from_public_bytes(self._announced[v].ephemeral)
            shared = self.__ephemeral.exchange(peer)
            seeds.append(
                (secagg.pair_seed(shared, me, v, context), 1 if me < v else -1)
            )
        mask = mask_vector(seeds, digits.size, self._modulus) + secagg.self_mask(
            self.__self_seed, digits.size, self._modulus, self._context(b"self")
        )
        masked = mask_digits(digits, mask, self._modulus)
        loaded = public.load()
        slots = public.params.slots
        chunks = [masked[i : i + slots] for i in range(0, masked.size, slots)]
        ciphertexts = tuple(
            ts.ckks_vector(loaded, chunk.astype(np.float64)).serialize()
            for chunk in chunks
        )
        confirms = {
            v: hmac.new(k.confirm, self._listed, "sha256").hexdigest()
            for v, k in self._pair.items()
        }
        self._contributed = True
        self.site.remember(
            self._released(),
            query_hash=self.query.hash,
            kind=self.query.kind,
            researcher=self.researcher,
            protected=self._protected(),
            columns=self._reads,
        )
        self.site.holder_patterns.record(self._patterns)
        return Contribution(
            self.site.name,
            self.query.hash,
            public.fingerprint,
            self.query.n_totals,
            ciphertexts,
            modulus=self._modulus,
            confirms=confirms,
        )

    def reveal(self, survivors: Sequence[str], confirms: Mapping[str, str]) -> Reveal:
        """Once the contributions are in: check the sum over ``survivors`` (the
        sites the server says contributed) is one this site may release, and reveal,
        for each neighbour, a share of its self-mask seed if it is among them, else
        a share of its pairwise-mask key — never both.

        Refused (nothing revealed) when a neighbour among the survivors did not
        confirm the holder announcements this site counted (the server showed the
        sites different ones), when fewer neighbours than the threshold survived
        (a server declaring them dropped could else unmask this site), when so many
        sites dropped that a released group could come from fewer than the pooling
        minimum, or when the survivors' set fails the site-set audit.
        """
        me = self.site.name
        if not self._contributed or self.holders is None:
            raise IntegrityError(f"site {me}: contribute to this query first")
        if self._revealed is not None:  # once per query: else "dropped", then
            # "alive", would give both seeds of a neighbour away
            if set(survivors) != self._revealed[0]:
                raise IntegrityError(
                    f"site {me} already revealed its shares for this query, for "
                    "other survivors; it reveals once"
                )
            return self._revealed[1]
        alive = set(survivors)
        members = set(self._peer_keys)
        if me not in alive or not alive <= members or len(alive) != len(survivors):
            raise IntegrityError(
                f"site {me}: the survivors named are not sites of this query"
            )
        near = self._graph[me]
        for v in near:
            if v not in alive:
                continue
            expected = hmac.new(
                self._pair[v].confirm, self._listed, "sha256"
            ).hexdigest()
            if not hmac.compare_digest(expected, confirms.get(v, "")):
                raise IntegrityError(
                    f"site {me}: {v} did not confirm the holder announcements this "
                    "site counted (were the sites shown different ones?)"
                )
        kept = sum(v in alive for v in near)
        if kept < self._threshold:
            raise TooManyDropouts(
                f"site {me}: only {kept} of its {len(near)} neighbours in the mask "
                f"graph contributed; revealing needs {self._threshold}; ask again"
            )
        dropped = len(members) - len(alive)
        # the set of sites whose totals this sum releases is audited and
        # remembered now, when it is known: the survivors
        audited = self._check_survivors(alive, dropped) if dropped else None
        self.site.auditor.record_sites(self.researcher, audited or self._audited_set)
        shares = {}
        for v in near:
            row = self._held[v]
            if v in alive:  # its contribution is in the sum: its self mask goes
                shares[v] = ("self", row[: secagg.LIMBS])
            else:  # it dropped: the pairwise masks it left behind go
                shares[v] = ("key", row[secagg.LIMBS :])
        revealed = Reveal(me, self.query.hash, shares)
        self._revealed = (frozenset(alive), revealed)
        return revealed

    def _check_survivors(self, alive: set[str], dropped: int) -> list[str]:
        """The disclosure rules again, on the sites whose contributions are summed."""
        me = self.site.name
        assert self.holders is not None
        need = self.need + self.untrusted
        counts = self.holders
        released = [counts[0]] + [
            c for i, c in enumerate(counts[1:-1]) if i not in self.suppressed and c > 0
        ]
        if counts[-1] > 0 and not self.missing_withheld:
            released.append(counts[-1])
        if min(released) - dropped < need:
            raise TooManyDropouts(
                f"site {me}: {dropped} site(s) dropped out; a part of the answer "
                f"held by the fewest sites could then be pooled over fewer than "
                f"{need}; ask again"
            )
        participants = sorted(self._announced[n].participant for n in alive)
        if self._enforces:  # its patterns, as held by survivors
            try:
                self.site.holder_patterns.recheck(
                    self._patterns, need + dropped, me, participants
                )
            except DisclosureRefused:
                raise TooManyDropouts(
                    f"site {me}: {dropped} site(s) dropped out; this answer's cells, "
                    "with earlier ones, could then be fewer sites' own; ask again"
                ) from None
        _, audited = at_site(
            me,
            f"the {self.query.kind} query",
            query_columns(self.query),
            self.site.check_participants,
            self.query.hash,
            participants,
            researcher=self.researcher,
            need=self.need,
        )
        return list(audited)


@dataclass(frozen=True)
class HolderFlags:
    """One site's announcement for the holder count: its 0/1 flags (holds rows for
    the query, for each block) under pairwise masks — uniform noise alone — and an
    HMAC-SHA256 tag for every peer under the pair's tag key."""

    site: str
    query_hash: str
    masked: tuple[int, ...]
    tags: Mapping[str, str] = field(repr=False)
    #: how the site is named in the query's participant set
    participant: str = ""
    #: the X25519 public key of its pairwise masks for this query
    ephemeral: bytes = field(default=b"", repr=False)
    #: shares that rebuild its mask seeds
    threshold: int = 0
    #: sha256 commitment to its self-mask seed
    commitment: str = field(default="", repr=False)
    #: its mask seeds' shares, each sealed to the neighbour that holds it
    shares: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def body(self) -> bytes:
        """What the tags and the neighbours' confirmations cover."""
        return _holder_body(
            self.site,
            self.query_hash,
            self.masked,
            self.participant,
            self.ephemeral,
            self.threshold,
            self.commitment,
        )

    @functools.cached_property
    def digest(self) -> bytes:
        """SHA-256 of :attr:`body`: one entry of the list the neighbours confirm."""
        return hashlib.sha256(self.body).digest()

    @functools.cached_property
    def values(self) -> np.ndarray:
        """:attr:`masked` as a read-only array (read once per announcement)."""
        out = np.asarray(self.masked, dtype=np.int64)
        out.flags.writeable = False
        return out


def _digits_in(flags: HolderFlags, modulus: int) -> bool:
    """Whether every masked digit of an announcement lies in ``[0, modulus)``."""
    try:
        values = flags.values
    except (OverflowError, TypeError, ValueError):
        return False
    return bool(values.size == 0 or (values.min() >= 0 and values.max() < modulus))


def _holder_body(
    site: str,
    query_hash: str,
    masked: Sequence[int],
    participant: str = "",
    ephemeral: bytes = b"",
    threshold: int = 0,
    commitment: str = "",
) -> bytes:
    fields = [site, query_hash, len(masked), participant, ephemeral.hex()]
    header = json.dumps([*fields, threshold, commitment]).encode()
    # the masked digits as fixed-width integers (count_holders refuses a digit
    # outside the modulus before any body is read)
    values = np.asarray(masked, dtype=np.int64)
    return header + b"\n" + values.astype(">i8").tobytes()


@dataclass(frozen=True)
class _PairKeys:
    """What a site shares with one neighbour for one query (one HKDF output)."""

    mask: bytes  # the seed of the holder flags' pairwise mask
    tag: bytes  # the holder announcement's HMAC key
    box: bytes  # the AES-GCM key of the mask seeds' shares
    confirm: bytes  # the HMAC key of the confirmation of the announcements


@dataclass(frozen=True)
class Reveal:
    """One surviving site's shares for the key holder: per neighbour, a share of
    its self-mask seed (``"self"``: it contributed) or of its pairwise-mask key
    (``"key"``: it dropped out)."""

    site: str
    query_hash: str
    shares: Mapping[str, tuple[str, np.ndarray]] = field(repr=False)


def _seal(
    key: bytes, query_hash: str, sender: str, receiver: str, share: np.ndarray
) -> bytes:
    """A share for one neighbour, under the pair's key (AES-GCM; one message per
    direction and query, so the nonce names the direction)."""
    nonce = hashlib.sha256(f"{sender}>{receiver}".encode()).digest()[:12]
    aad = f"{query_hash}|{sender}>{receiver}".encode()
    return AESGCM(key).encrypt(nonce, np.asarray(share, dtype="<u4").tobytes(), aad)


def _open(
    key: bytes, query_hash: str, sender: str, receiver: str, box: bytes
) -> np.ndarray | None:
    nonce = hashlib.sha256(f"{sender}>{receiver}".encode()).digest()[:12]
    aad = f"{query_hash}|{sender}>{receiver}".encode()
    try:
        plain = AESGCM(key).decrypt(nonce, box, aad)
    except Exception:
        return None
    share = np.frombuffer(plain, dtype="<u4").astype(np.int64)
    if share.size != 2 * secagg.LIMBS or share.max(initial=0) >= secagg.PRIME:
        return None
    return share


def count_holders(work: Sequence[SiteWork], peers: Mapping[str, bytes]) -> list[int]:
    """The holder count among ``work``'s sites (each site counts for itself); the
    counts every site arrived at (the same for honest sites)."""
    announced = [w.announce(peers) for w in work]
    counts = [w.count_holders(peers, announced) for w in work]
    return counts[0]


def _noise_scales(site: Site, query: Query) -> np.ndarray:
    """Per total of ``query``: the noise's standard deviation per unit of noise
    multiplier (what one row can change in it, scaled; :mod:`healthlab.dp`)."""
    spec = query.spec
    if query.kind == "counts":  # a row is in one cell, or dropped, or outside
        return np.ones(query.n_totals)
    if query.kind == "moments":
        bounds = spec.get("bounds")
        if bounds is None:
            raise DisclosureRefused(
                f"site {site.name} answers under a privacy budget: give public "
                "bounds (bounds=) for every column; values beyond them are clipped"
            )
        scales = moments_scales(
            bounds,
            spec["center"],
            order=int(spec["order"]),
            cross=bool(spec["cross"]),
            groups=max(1, len(spec.get("groups") or ())),
        )
        if scales.size != query.n_totals:
            raise IntegrityError(
                f"site {site.name}: the query's layout does not match its spec"
            )
        return scales
    raise DisclosureRefused(
        f"site {site.name} answers under a privacy budget: {query.kind} queries "
        "have no noise calibration; use describe, histogram, crosstab, corr, cov or "
        "ols"
    )


def query_columns(query: Query) -> list[str]:
    """The columns a query reads (for error messages)."""
    spec = query.spec
    named = list(spec.get("columns") or ())
    if spec.get("column") is not None:
        named.append(spec["column"])
    by = spec.get("by")
    if by:
        named.extend([by] if isinstance(by, str) else list(by))
    return [str(c) for c in named]


def _encode(site: str, totals: list[float]) -> np.ndarray:
    """The site's totals as digits; a total the encoding cannot carry is refused."""
    reason = ""
    try:
        return encode_totals(totals)
    except InvalidInput as exc:  # a message of encode_totals: no value in it
        reason = str(exc)
    raise DataRefused(f"site {site}: {reason}") from None


class Aggregator:
    """The server side of a study: it holds only the public context.

    Examples
    --------
    >>> aggregator = Aggregator(keys.public_context())
    >>> aggregate = aggregator.add(contributions)
    """

    def __init__(self, public: PublicContext) -> None:
        self.public = public
        self._context = public.load()  # refuses a context with a secret key

    def add(self, contributions: Sequence[Contribution]) -> Aggregate:
        """Check and add contributions of one query from distinct sites."""
        if not contributions:
            raise TooFewSites("no site contributed")
        first = contributions[0]
        names = [c.site for c in contributions]
        if len(set(names)) != len(names):
            raise IntegrityError(f"a site contributed twice: {names}")
        if len(contributions) > secagg.MAX_SITES:
            raise InvalidInput(
                f"at most {secagg.MAX_SITES} sites can be summed exactly"
            )
        for c in contributions:
            if c.fingerprint != self.public.fingerprint:
                raise IntegrityError(
                    f"site {c.site} encrypted under another public key "
                    f"({c.fingerprint[:19]}…); it must use the study's public context"
                )
            if (c.query_hash, c.n_totals, len(c.ciphertexts), c.modulus) != (
                first.query_hash,
                first.n_totals,
                len(first.ciphertexts),
                first.modulus,
            ):
                raise IntegrityError(f"site {c.site} answered another query or layout")
        sums = []
        for i in range(len(first.ciphertexts)):
            total = None
            for c in contributions:
                try:
                    vector = ts.ckks_vector_from(self._context, c.ciphertexts[i])
                except Exception as exc:
                    raise IntegrityError(
                        f"site {c.site} sent a ciphertext that does not load under the "
                        "study's parameters"
                    ) from exc
                total = vector if total is None else total + vector
            assert total is not None
            sums.append(total.serialize())
        return Aggregate(
            first.query_hash,
            self.public.fingerprint,
            first.n_totals,
            tuple(names),
            tuple(sums),
            modulus=first.modulus,
        )


def unmask(
    aggregate: Aggregate,
    announced: Mapping[str, HolderFlags],
    reveals: Sequence[Reveal],
) -> np.ndarray:
    """The masks that do not cancel in ``aggregate`` (mod its modulus), rebuilt by
    the key holder from the survivors' revealed shares: every summed site's self
    mask, and the pairwise masks each dropped site shared with summed ones.

    Raises :class:`~healthlab.errors.TooManyDropouts` when too few shares of a
    seed came back, and :class:`IntegrityError` when a rebuilt seed does not match
    what its site announced (a wrong share)."""
    members = sorted(announced)
    summed = set(aggregate.sites)
    query_hash = aggregate.query_hash
    context = bytes.fromhex(query_hash[2:])

    def labelled(purpose: bytes) -> bytes:
        return context + b"|" + purpose

    graph = secagg.neighbours(members, labelled(b"graph"))
    size = aggregate.n_totals * DIGITS
    modulus = aggregate.modulus
    position = {v: {u: i + 1 for i, u in enumerate(near)} for v, near in graph.items()}
    got: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
    for r in reveals:
        if r.query_hash != query_hash:
            raise IntegrityError(f"{r.site} revealed shares of another query")
        for v, (kind, share) in r.shares.items():
            x = position.get(v, {}).get(r.site)
            if x is None:
                raise IntegrityError(f"{r.site} revealed a share it cannot hold")
            got.setdefault((v, kind), []).append((x, np.asarray(share)))

    def rebuild(site: str, kind: str) -> bytes:
        shares = got.get((site, kind), [])
        t = announced[site].threshold
        if len(shares) < t:
            raise TooManyDropouts(
                f"only {len(shares)} share(s) of {site}'s mask seed came back, "
                f"{t} needed: too many sites dropped out; nothing is released, ask "
                "again"
            )
        try:
            return secagg.combine(shares, t)
        except ValueError:
            raise IntegrityError(
                f"the shares of {site}'s mask seed do not agree"
            ) from None

    correction = np.zeros(size, dtype=np.int64)
    for w in sorted(summed):
        seed = rebuild(w, "self")
        if secagg.commitment(seed, labelled(b"self")) != announced[w].commitment:
            raise IntegrityError(f"a share of {w}'s self-mask seed is wrong")
        correction += secagg.self_mask(seed, size, modulus, labelled(b"self"))
    for w in members:
        if w in summed:
            continue
        left = [u for u in graph[w] if u in summed]
        if not left:
            continue
        key = secagg.ephemeral_key(rebuild(w, "key"), labelled(b"ephemeral"))
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if public != announced[w].ephemeral:
            raise IntegrityError(f"a share of {w}'s mask key is wrong")
        for u in left:
            shared = key.exchange(
                X25519PublicKey.from_public_bytes(announced[u].ephemeral)
            )
            seed = secagg.pair_seed(shared, u, w, context)
            sign = 1 if u < w else -1  # the sign u gave the pair's stream
            correction += sign * mask_vector([(seed, 1)], size, modulus)
    return np.mod(correction, modulus)


def decrypt_totals(
    keys: KeyHolder,
    aggregate: Aggregate,
    correction: np.ndarray,
) -> list[float]:
    """Decrypt an aggregate across at least two sites and rebuild the exact sums
    (``correction``: the masks that do not cancel, from :func:`unmask`)."""
    if len(aggregate.sites) < 2:
        raise TooFewSites("the key holder decrypts only sums across at least two sites")
    slots = [
        keys.decrypt(c, fingerprint=aggregate.fingerprint)
        for c in aggregate.ciphertexts
    ]
    flat = np.concatenate(slots) if slots else np.zeros(0)
    used = aggregate.n_totals * DIGITS
    capacity = keys.params.slots * len(slots)
    if used > capacity:
        raise IntegrityError("the aggregate is shorter than its layout")
    return decode_sum(
        flat,
        aggregate.n_totals,
        len(aggregate.sites),
        modulus=aggregate.modulus,
        correction=correction,
    )


@dataclass
class StudyRun:
    """What one query produced: exact pooled totals and who took part."""

    query: Query
    totals: list[float]
    sites: list[Site]
    refused: dict[str, str]
    signed: SignedQuery | None
    upload_bytes: dict[str, int]
    public_params: dict[str, Any] = field(default_factory=dict)
    #: How many sites hold rows for the query, then for each block (public counts).
    holders: list[int] = field(default_factory=list)
    #: The blocks too few sites hold: sent as zeros by every site.
    suppressed: list[int] = field(default_factory=list)
    #: The count of rows left out (``totals[0]``) was withheld: too few sites
    #: leave rows out, so it would be one site's (sent as zero by every site).
    missing_withheld: bool = False
    #: Standard deviation of the Gaussian noise each site under a DP budget added
    #: to each of its totals (sites without a budget are not listed).
    noise_sd: dict[str, list[float]] = field(default_factory=dict)
    #: Sites that dropped out of the masked sum (their rows are not in it).
    dropped: list[str] = field(default_factory=list)


def run_query(
    sites: Sequence[Site],
    query: Query,
    compute: SiteComputation,
    *,
    keys: KeyHolder,
    researcher: str | None = None,
    on_refusal: str = "raise",
) -> StudyRun:
    """Run one query across ``sites`` and return the pooled totals.

    ``on_refusal="raise"`` (default) stops when any site refuses, naming every
    reason; ``"skip"`` goes on without the refusing sites as long as enough remain.
    """
    asked = list(sites)
    dropped: list[str] = []
    while True:
        prepared = prepare_query(
            asked,
            query,
            compute,
            keys=keys,
            researcher=researcher,
            on_refusal=on_refusal,
        )
        try:
            run = prepared.finish(keys)
        except DroppedOut as exc:  # nothing was sent: ask the others anew
            dropped += exc.sites
            asked = [s for s in asked if s.name not in exc.sites]
            continue
        run.dropped = sorted({*dropped, *run.dropped})
        return run


def prepare_query(
    sites: Sequence[Site],
    query: Query,
    compute: SiteComputation,
    *,
    keys: KeyHolder,
    researcher: str | None = None,
    on_refusal: str = "raise",
) -> PreparedQuery:
    """Steps 1–2 of :func:`run_query`: sign, and let every site authorize and check.

    Every refusal (grant, signature, disclosure policy, too few sites) is raised
    here, before any site has encrypted or sent anything; :meth:`PreparedQuery.finish`
    does the cryptography. A caller may do other work between the two (every-value
    mode starts the sites' encryption once the checks have passed).
    """
    if on_refusal not in ("raise", "skip"):
        raise InvalidInput('on_refusal must be "raise" or "skip"')
    asked = list(sites)
    refused: dict[str, str] = {}
    while True:
        minimum = max([query.min_sites, *(s.policy.min_sites for s in asked)])
        if len(asked) < minimum:  # before logging: a query nobody could answer
            raise TooFewSites(
                f"only {len(asked)} site(s) can take part, fewer than the {minimum} "
                f"required; refusals: {refused or 'none'}"
            )
        # the participant set is part of the signed, logged query: with "skip", a
        # query some sites refused is asked again, anew, of the others
        members = tuple(sorted(s.participant for s in asked))
        # one minimum of sites for every site (the strictest policy's): each site
        # suppresses groups by it, so no site sends a group another holds back
        query = replace(
            query,
            participants=members,
            min_sites=minimum,
            nonce=secrets.randbits(63),
        )
        log_query(asked, query.hash, researcher)
        signed = sign_query(asked, query, researcher)
        work: list[SiteWork] = []
        errors: list[HealthLabError] = []
        now: dict[str, str] = {}
        for site, got in zip(
            asked, _prepare_all(asked, query, signed, compute), strict=True
        ):
            if isinstance(got, (AccessDenied, DisclosureRefused, DataRefused)):
                now[site.name] = str(got)
                errors.append(got)
            elif isinstance(got, BaseException):
                raise got
            else:
                work.append(got)
        refused.update(now)
        if now and on_refusal == "raise":
            raise _refusal(now, errors) from None
        minimum = max(
            [query.min_sites, *(w.site.policy.min_sites for w in work)], default=2
        )
        if len(work) < minimum:
            raise TooFewSites(
                f"only {len(work)} site(s) can take part, fewer than the {minimum} "
                f"required; refusals: {refused or 'none'}"
            )
        if not now:
            return PreparedQuery(query, signed, work, refused)
        asked = [w.site for w in work]


def _prepare_all(
    sites: Sequence[Site],
    query: Query,
    signed: SignedQuery | None,
    compute: SiteComputation,
) -> list[SiteWork | BaseException]:
    """Every site's :class:`SiteWork` for ``query``, or the error it refused with.

    A site in this process computes with ``compute``; a deployed site
    (:class:`~healthlab.sites.SiteProxy`) with the computation its own installed
    package registers for the query's kind (:data:`COMPUTATIONS`), all deployed
    sites asked at once."""
    proxies = [s for s in sites if s.remote is not None]
    if proxies:
        if len(proxies) != len(sites) or len({id(s.remote) for s in proxies}) > 1:
            raise InvalidInput(
                "a query pools the sites of one deployment, or sites in this "
                "process, not both"
            )
        if COMPUTATIONS.get(query.kind) is not compute:
            raise InvalidInput(
                f"deployed sites answer only the registered {query.kind!r} computation"
            )
        return proxies[0].remote.prepare(proxies, query, signed)  # type: ignore[no-any-return]
    out: list[SiteWork | BaseException] = []
    for site in sites:
        try:
            out.append(SiteWork(site, query, signed, compute))
        except (AccessDenied, DisclosureRefused, DataRefused) as exc:
            out.append(exc)
    return out


def each(
    work: Sequence[Any],
    step: str,
    args: Sequence[tuple[Any, ...]],
    then: Sequence[tuple[Any, ...] | None] | None = None,
) -> list[Any]:
    """``work[i].<step>(*args[i])`` for every site's work: in turn in this process,
    or as one message to every deployed site (their replies, in order; the first
    error raised).

    ``then``: the arguments of the step that follows for each site (``None``: it
    will not be asked). A deployed site may answer it in the same message (the
    caller asks it next as usual, and gets that answer); sites in this process
    ignore it."""
    if not work:
        return []
    remote = getattr(work[0], "remote", None)
    if remote is not None:
        return remote.step(list(work), step, list(args), then)  # type: ignore[no-any-return]
    return [getattr(w, step)(*a) for w, a in zip(work, args, strict=True)]


class DroppedOut(HealthLabError):
    """Sites went offline before the masks were set: nothing was sent; the query is
    asked again of the others (:func:`run_query`)."""

    def __init__(self, sites: Sequence[str]) -> None:
        super().__init__(
            f"{len(sites)} site(s) dropped out before the masks were set; ask again "
            "without them"
        )
        self.sites = list(sites)


class Relay:
    """The server's part of one query in this process: it carries every message
    between the sites and to the key holder, and decides nothing.

    The default delivers everything. A subclass models a real network or an
    attacking server: sites that go offline at a step (:meth:`drops`), messages
    dropped, altered or shown differently to different sites. The sites' checks,
    not the relay, make the result right.
    """

    def drops(self, step: str) -> set[str]:
        """Sites that go offline at ``step``: ``"announce"`` (before the masks are
        set), ``"contribute"`` (masks set, no contribution) or ``"reveal"``
        (contributed, reveals no share)."""
        return set()

    def announcements(
        self, site: str, announced: list[HolderFlags]
    ) -> list[HolderFlags]:
        """The holder announcements ``site`` receives."""
        return announced

    def contributions(self, received: list[Contribution]) -> list[Contribution]:
        """The contributions the server sums (the survivors are their sites)."""
        return received

    def survivors(self, site: str, survivors: list[str]) -> list[str]:
        """The survivors ``site`` is told of."""
        return survivors

    def confirms(self, site: str, confirms: dict[str, str]) -> dict[str, str]:
        """The survivors' confirmations ``site`` receives (sender -> its tag)."""
        return confirms

    def reveals(self, received: list[Reveal]) -> list[Reveal]:
        """The revealed shares the key holder receives."""
        return received


_RELAY: contextvars.ContextVar[Relay | None] = contextvars.ContextVar(
    "healthlab_relay", default=None
)


@contextlib.contextmanager
def using_relay(relay: Relay) -> Iterator[Relay]:
    """Run the queries inside the ``with`` block through ``relay`` (a simulated
    network: dropouts, an attacking server)."""
    token = _RELAY.set(relay)
    try:
        yield relay
    finally:
        _RELAY.reset(token)


@dataclass
class PreparedQuery:
    """A query every participating site has authorized and checked."""

    query: Query
    signed: SignedQuery | None
    work: list[SiteWork]
    refused: dict[str, str]

    @property
    def sites(self) -> list[Site]:
        """The participating sites."""
        return [w.site for w in self.work]

    def finish(self, keys: KeyHolder, relay: Relay | None = None) -> StudyRun:
        """Steps 3–5: announce, contribute, reveal, aggregate, decrypt the pooled
        totals — every message carried by ``relay`` (default: the one set by
        :func:`using_relay`, else one that delivers everything).

        A site that drops out before every announcement is in raises
        :class:`DroppedOut` (nothing was sent: ask again without it); one that drops
        later is recovered from its neighbours' shares (:mod:`secagg`)."""
        relay = relay or _RELAY.get() or Relay()
        public = keys.public_context()
        peers = {w.site.name: w.site.mask_public_key for w in self.work}
        gone = relay.drops("announce") & set(peers)
        announcing = [w for w in self.work if w.site.name not in gone]
        announced = each(announcing, "announce", [(peers,)] * len(announcing))
        if gone:
            raise DroppedOut(sorted(gone))
        late = relay.drops("contribute")
        counted = each(
            self.work,
            "count_holders",
            [(peers, relay.announcements(w.site.name, announced)) for w in self.work],
            then=[None if w.site.name in late else (peers, public) for w in self.work],
        )
        # a deployed site that did not answer (None) has dropped out
        gone |= {
            w.site.name for w, c in zip(self.work, counted, strict=True) if c is None
        }
        last = next((c for c in reversed(counted) if c is not None), None)
        if last is None:
            raise TooManyDropouts(
                "no site answered the holder count; nothing is released"
            )
        holders: list[int] = last
        gone |= late
        giving = [w for w in self.work if w.site.name not in gone]
        sent = [
            c
            for c in each(giving, "contribute", [(peers, public)] * len(giving))
            if c is not None
        ]
        kept = relay.contributions(sent)
        survivors = sorted(c.site for c in kept)
        dropped = sorted(set(peers) - set(survivors))
        if dropped:  # the released set is logged before any site reveals
            alive = [w.site for w in self.work if w.site.name in survivors]
            log_query(
                alive, self.query.hash, self.signed.researcher if self.signed else None
            )
        gone |= relay.drops("reveal")
        revealing = [
            w for w in self.work if w.site.name in survivors and w.site.name not in gone
        ]
        reveals = each(
            revealing,
            "reveal",
            [
                (
                    relay.survivors(w.site.name, survivors),
                    relay.confirms(
                        w.site.name,
                        {c.site: c.confirms.get(w.site.name, "") for c in kept},
                    ),
                )
                for w in revealing
            ],
        )
        reveals = [r for r in reveals if r is not None]
        aggregate = Aggregator(public).add(kept)
        correction = unmask(
            aggregate, {a.site: a for a in announced}, relay.reveals(reveals)
        )
        totals = decrypt_totals(keys, aggregate, correction)
        first = next(w for w in self.work if w.site.name in survivors)
        return StudyRun(
            query=self.query,
            totals=totals,
            sites=[w.site for w in self.work if w.site.name in survivors],
            dropped=dropped,
            refused=self.refused,
            signed=self.signed,
            upload_bytes={c.site: c.nbytes for c in kept},
            holders=holders,
            suppressed=list(first.suppressed),
            missing_withheld=first.missing_withheld,
            noise_sd={
                w.site.name: w.noise_sd.tolist()
                for w in self.work
                if w.noise_sd is not None
            },
            public_params={
                **public.params.as_dict(),
                "public_key_fingerprint": public.fingerprint,
            },
        )


def sign_query(
    sites: Sequence[Site], query: Query, researcher: str | None
) -> SignedQuery | None:
    """The researcher's signature of ``query`` when a site checks grants (else None)."""
    gated = [s for s in sites if s.gated]
    if not gated:
        return None
    if researcher is None:
        raise InvalidInput(
            "these sites check grants on chain: pass researcher=<your address>"
        )
    ledgers = {id(s.ledger) for s in gated}
    chains = {(s.ledger.chain_id, s.ledger.address) for s in gated if s.ledger}
    if len(chains) > 1:
        raise InvalidInput(
            f"the sites use {len(ledgers)} different registries; a study uses one"
        )
    ledger = gated[0].ledger
    assert ledger is not None
    return ledger.sign_query(researcher, query.hash, nonce=query.nonce)


def _refusal(
    refused: Mapping[str, str], errors: list[HealthLabError]
) -> HealthLabError:
    """One error of the first refusal's class, listing every site's reason."""
    if len(errors) == 1:
        return errors[0]
    lines = "; ".join(why for why in refused.values())
    return type(errors[0])(f"{len(refused)} sites refused the query: {lines}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    raise TypeError(f"cannot put {type(value).__name__} in a query")
