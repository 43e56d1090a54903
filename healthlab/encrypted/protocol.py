"""The secure-sum protocol: signed query → sites → aggregator → key holder.

1. The researcher builds a :class:`Query` and signs its hash (EIP-712).
2. *Prepare*: every site authorizes the signed query (signature, freshness, replay,
   live grant on chain), selects its rows, checks every subset against its disclosure
   policy and computes its totals — all at the site. It answers only "ready" and the
   public key of its pairwise masks.
3. *Contribute*: once the participants are known, every site encodes its totals as
   exact fixed-point digits, adds masks that cancel across sites, encrypts them under
   the researcher's public context and tags the ciphertext with its fingerprint.
4. The :class:`Aggregator` holds only the public context; it rejects contributions
   made under another key or for another query, and adds the rest.
5. The key holder decrypts the aggregate — never a single site's ciphertext — and
   rebuilds the exact sums.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import tenseal as ts

from healthlab.encrypted.encoding import (
    DIGITS,
    MAX_SITES,
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
)
from healthlab.site_data import at_site
from healthlab.sites import Site

if TYPE_CHECKING:
    from healthlab.ledger.signing import SignedQuery

__all__ = [
    "Aggregate",
    "Aggregator",
    "Contribution",
    "PreparedQuery",
    "Query",
    "SiteWork",
    "StudyRun",
    "prepare_query",
    "run_query",
    "sign_query",
]

#: What a site computes from (its rows, the query): totals, and its subsets by column.
Totals = tuple[list[float], dict[str, list[np.ndarray]]]
SiteComputation = Callable[[Site, "Query"], Totals]


@dataclass(frozen=True)
class Query:
    """A statistics query, identical for every site; its hash is what gets signed.

    ``kind`` names the computation; ``spec`` holds its public parameters (columns,
    centers, bins, levels…). ``min_rows``/``min_sites`` may tighten, never loosen,
    the sites' policies.
    """

    kind: str
    spec: Mapping[str, Any]
    n_totals: int
    min_rows: int = 0
    min_sites: int = 2
    nonce: int = field(default_factory=lambda: secrets.randbits(63))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for hashing and receipts)."""
        return json.loads(json.dumps(asdict(self), default=_json_default))  # type: ignore[no-any-return]

    @property
    def hash(self) -> str:
        """``0x`` + sha256 of the canonical JSON of the query."""
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
        # every step on the site's rows is wrapped: an error that leaves the site
        # names the site, the rule and the columns, never a value (site_data.at_site)
        columns = query_columns(query)
        what = f"the {query.kind} query"
        totals, subsets = at_site(site.name, what, columns, compute, site, query)
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
            min_rows=query.min_rows,
            researcher=self.researcher,
        )
        self.__digits = _encode(site.name, totals)
        self._subsets = subsets

    def contribute(
        self, peers: Mapping[str, bytes], public: PublicContext
    ) -> Contribution:
        """Mask, encrypt and tag this site's totals for the sites in ``peers``."""
        need = max(self.site.policy.min_sites, self.query.min_sites)
        if len(peers) < need:
            raise TooFewSites(
                f"site {self.site.name} contributes only to results pooled over at "
                f"least {need} sites ({len(peers)} taking part)"
            )
        digits = self.__digits
        seeds = self.site.pairwise_seeds(peers, bytes.fromhex(self.query.hash[2:]))
        masked = mask_digits(digits, mask_vector(seeds, digits.size))
        context = public.load()
        slots = public.params.slots
        chunks = [masked[i : i + slots] for i in range(0, masked.size, slots)]
        ciphertexts = tuple(
            ts.ckks_vector(context, chunk.astype(np.float64)).serialize()
            for chunk in chunks
        )
        self.site.remember(
            self._subsets,
            query_hash=self.query.hash,
            kind=self.query.kind,
            researcher=self.researcher,
        )
        return Contribution(
            self.site.name,
            self.query.hash,
            public.fingerprint,
            self.query.n_totals,
            ciphertexts,
        )


def query_columns(query: Query) -> list[str]:
    """The columns a query reads (for error messages)."""
    spec = query.spec
    named = list(spec.get("columns") or ())
    if spec.get("column") is not None:
        named.append(spec["column"])
    if spec.get("by"):
        named.append(spec["by"])
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
        if len(contributions) > MAX_SITES:
            raise InvalidInput(f"at most {MAX_SITES} sites can be summed exactly")
        for c in contributions:
            if c.fingerprint != self.public.fingerprint:
                raise IntegrityError(
                    f"site {c.site} encrypted under another public key "
                    f"({c.fingerprint[:19]}…); it must use the study's public context"
                )
            if (c.query_hash, c.n_totals, len(c.ciphertexts)) != (
                first.query_hash,
                first.n_totals,
                len(first.ciphertexts),
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
        )


def decrypt_totals(keys: KeyHolder, aggregate: Aggregate) -> list[float]:
    """Decrypt an aggregate across at least two sites and rebuild the exact sums."""
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
    return decode_sum(flat, aggregate.n_totals, len(aggregate.sites))


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
    return prepare_query(
        sites, query, compute, keys=keys, researcher=researcher, on_refusal=on_refusal
    ).finish(keys)


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
    signed = sign_query(sites, query, researcher)
    work: list[SiteWork] = []
    refused: dict[str, str] = {}
    errors: list[HealthLabError] = []
    for site in sites:
        try:
            work.append(SiteWork(site, query, signed, compute))
        except (AccessDenied, DisclosureRefused, DataRefused) as exc:
            refused[site.name] = str(exc)
            errors.append(exc)
    if refused and on_refusal == "raise":
        raise _refusal(refused, errors) from None
    minimum = max(
        [query.min_sites, *(w.site.policy.min_sites for w in work)], default=2
    )
    if len(work) < minimum:
        raise TooFewSites(
            f"only {len(work)} site(s) can take part, fewer than the {minimum} "
            f"required; refusals: {refused or 'none'}"
        )
    return PreparedQuery(query, signed, work, refused)


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

    def finish(self, keys: KeyHolder) -> StudyRun:
        """Steps 3–5: contribute, aggregate, decrypt the pooled totals."""
        public = keys.public_context()
        peers = {w.site.name: w.site.mask_public_key for w in self.work}
        contributions = [w.contribute(peers, public) for w in self.work]
        aggregate = Aggregator(public).add(contributions)
        totals = decrypt_totals(keys, aggregate)
        return StudyRun(
            query=self.query,
            totals=totals,
            sites=self.sites,
            refused=self.refused,
            signed=self.signed,
            upload_bytes={c.site: c.nbytes for c in contributions},
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
