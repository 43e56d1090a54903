"""A data holder: its rows, its disclosure policy, and the grant check before computing.

A :class:`Site` never hands rows to a caller: study code running *at the site* (the
encrypted statistics, the federated client) asks it to authorize a signed query, to
release the rows of the columns asked, and to check the subsets it is about to
summarize against the disclosure policy — which only the site's owner sets.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pandas.util import hash_array

from healthlab.audit import Auditor
from healthlab.datafiles import read_data_file
from healthlab.dp import PrivacyBudget, epsilon_spent
from healthlab.errors import (
    AccessDenied,
    DataRefused,
    DisclosureRefused,
    InvalidInput,
    SignatureInvalid,
    TooFewSites,
)
from healthlab.holders import HolderPatterns
from healthlab.ledger.signing import SignedQuery, recover_signer
from healthlab.relations import Relations, find_relations
from healthlab.site_data import at_site

if TYPE_CHECKING:
    from healthlab.ledger import Ledger

__all__ = [
    "DisclosurePolicy",
    "QueryLogEntry",
    "Site",
    "as_sites",
    "log_query",
    "logged_queries",
    "read_table",
]

_logger = logging.getLogger(__name__)


def _beta_key(beta: np.ndarray) -> bytes:
    return np.ascontiguousarray(beta, dtype="<f8").tobytes()


_DIGIT_EXAMPLES = {
    1: " (e.g. 20 or 0.5, not 25)",
    2: " (e.g. 18, 0.25 or 120, not 18.5)",
}


@dataclass(frozen=True)
class DisclosurePolicy:
    """What a site will answer; defaults follow DataSHIELD's disclosure filters.

    Attributes
    ----------
    min_rows:
        Smallest non-empty subset, group or table cell summarized (``nfilter.subset``,
        ``nfilter.tab``: 3). Empty cells are allowed: a zero reveals nobody.
    max_param_ratio:
        A model may have at most this many parameters per row (``nfilter.glm``: 0.33).
    min_sites:
        Fewest sites a pooled result may combine; a study can ask for more, never less.
    min_difference:
        No combination of the subsets answered at this site (differencing,
        inclusion–exclusion) may isolate fewer than this many rows
        (:mod:`healthlab.audit`); the auditor uses the larger of it and ``min_rows``.
    max_query_age:
        Seconds a signed query stays valid.
    collaboration:
        The id of an on-chain collaboration (:meth:`Ledger.create_collaboration`):
        a gated site then pools only with datasets whose owners are its members.
    privacy:
        A differential-privacy budget per researcher (:mod:`healthlab.dp`); a gated
        site uses its dataset's budget on chain (:meth:`Ledger.set_privacy_budget`)
        when there is one.
    grid:
        Per numeric column, the width of the only bin edges and clip bounds the site
        accepts (``{"age": 5}``: edges 30, 35, 40 …). Whether a site answers depends
        on its rows (a bin of 1 or 2 rows is refused, an empty one is not), so with
        edges anywhere a researcher can bisect a tail bin's edge and pin the oldest
        patient's age; on the grid, the most that reveals is the grid cell. Columns
        not named fall back on ``grid_digits``.
    grid_digits:
        For a numeric column without a ``grid``, the most significant digits a bin
        edge or clip bound may have (2: edges 18, 19, 120, 0.25, not 18.5 or 83.7),
        a grid the site can apply without knowing the column's units: a bisection
        then learns a value to within 1–10 % of it. ``None`` accepts any edge (a
        loud opt-out: the bisection then pins one patient's value).
    count_iterates:
        ``True`` (the default): a model's iterates count against the functions a
        set of this site's rows may carry. At every iterate of a GLM (but the
        Gaussian's) or a Cox model the weights change with β, so each iterate sums
        new functions of the rows' values; an honest Poisson path's seven iterates
        over a 6-row cell gave its true ages. So a small set of rows (a site of a
        few rows, a rare level) is refused once the iterates' functions reach its
        unknowns, and the fit stops with :class:`~healthlab.errors.TooFewRows`.
        ``False`` answers every iterate the Newton path needs (exact models on a
        site of 6 rows): a loud opt-in for an owner who accepts that the path's
        totals may determine a small set's values.
    min_contributors:
        ``None`` (the default, every hospital site): the per-site rules above. A
        number: this is a *citizen site* (one person's device, a few rows) — see
        :meth:`citizen`, the only way to build one; ``min_sites`` is then at least
        this number.
    """

    min_rows: int = 3
    max_param_ratio: float = 0.33
    min_sites: int = 2
    min_difference: int = 3
    max_query_age: int = 900
    collaboration: int | None = None
    privacy: PrivacyBudget | None = None
    grid: Mapping[str, float] | tuple[tuple[str, float], ...] = ()
    grid_digits: int | None = 2
    min_contributors: int | None = None
    count_iterates: bool = True

    @classmethod
    def citizen(cls, min_contributors: int = 10, **options: Any) -> DisclosurePolicy:
        """The policy of a citizen site: one person's rows (a phone, a wearable),
        too few for any per-site minimum, answered only inside a pooled sum of at
        least ``min_contributors`` persons.

        What changes against the hospital policy, and why it still protects a row:

        - *No per-site row minimum, no per-site differencing test.* Every subset of
          one person's rows is that person's, whatever its size; a per-site ``k``
          cannot protect it (with one row, every subset is that row or empty).
          What protects it is the pooled sum: the site contributes only under
          secure aggregation (masked, CKKS-encrypted), so nobody sees its totals.
        - *A pooled minimum of contributors.* ``min_sites`` is at least
          ``min_contributors``: the holder count (computed privately among the
          sites) refuses a query fewer than that many sites hold rows for, and the
          site-set audit (:func:`healthlab.audit.isolated_sites`) runs with that
          ``need``, so no combination of results over the logged sets of sites
          singles out fewer than ``min_contributors`` citizens.
        - *Contributors are the logged sites.* A citizen site takes part only when
          every site of the query holds rows for it (checked on the holder count,
          anonymously): the sets of contributors are then the sets of sites the
          site-set audit checks, so "all citizens, then all but the one whose row
          a filter leaves out" is refused like "all but one site".
        - *One record per citizen.* Its auditor allows one non-empty set of its
          rows, ever (its *record*): every query it answers sums that set, so
          any combination of answers weighs a citizen's rows all alike, and
          is a combination over sites. With one row this holds by itself; a
          device of a few rows that answered all its rows refuses a query of
          some of them (one day against the others).
        - *No groups.* A ``by=`` group, a histogram bin, a crosstab cell or a
          per-column missing count is refused: a group's holder count is the number
          of citizens in it, and groups of two columns differenced (``A=1`` minus
          ``B=1``) give the citizens in one but not the other, which no citizen
          can see from its own row.

        Each citizen counts as one person only if a site holds one person's rows
        and no one registers many sites (left to governance: on chain, sites of one
        owner count once). ``options`` are the other :class:`DisclosurePolicy`
        fields (``min_sites`` may only raise the pooled minimum).
        """
        if isinstance(min_contributors, bool) or not isinstance(min_contributors, int):
            raise InvalidInput("min_contributors must be a whole number")
        options["min_sites"] = max(int(options.get("min_sites", 0)), min_contributors)
        return cls(min_contributors=min_contributors, **options)

    @property
    def is_citizen(self) -> bool:
        """Whether this is a citizen site's policy (:meth:`citizen`)."""
        return self.min_contributors is not None

    def __post_init__(self) -> None:
        pairs = self.grid.items() if isinstance(self.grid, Mapping) else self.grid
        widths = tuple(sorted((str(c), float(w)) for c, w in pairs))
        if any(not (np.isfinite(w) and w > 0) for _, w in widths):
            raise InvalidInput("grid widths must be positive numbers")
        object.__setattr__(self, "grid", widths)
        if self.grid_digits is not None and not (
            isinstance(self.grid_digits, int) and 1 <= self.grid_digits <= 15
        ):
            raise InvalidInput("grid_digits must be a whole number from 1 to 15")
        if self.grid_digits is None:
            _logger.warning(
                "INSECURE DisclosurePolicy(grid_digits=None): bin edges and bounds "
                "are taken at any precision, so bisecting one pins a patient's value"
            )
        if not isinstance(self.count_iterates, bool):
            raise InvalidInput("count_iterates must be True or False")
        if not self.count_iterates:
            _logger.warning(
                "INSECURE DisclosurePolicy(count_iterates=False): every iterate of a "
                "model is answered, so a Newton path's totals may determine the "
                "values of a small set of this site's rows"
            )
        if self.min_rows < 1 or self.min_sites < 1 or self.min_difference < 1:
            raise InvalidInput("min_rows, min_sites and min_difference must be >= 1")
        if self.min_contributors is not None:
            floor = max(self.min_rows, self.min_difference, 2)
            if self.min_contributors < floor:
                raise InvalidInput(
                    "a citizen site's min_contributors (the pooled minimum of "
                    "persons) must be at least its min_rows and min_difference"
                )
            if self.min_sites < self.min_contributors:
                raise InvalidInput(
                    "a citizen site pools over at least min_contributors sites: "
                    "min_sites must be at least min_contributors"
                )
        if self.collaboration is not None and self.collaboration < 1:
            raise InvalidInput(
                "collaboration must be the id of an on-chain collaboration"
            )
        if not 0 < self.max_param_ratio <= 1:
            raise InvalidInput("max_param_ratio must be in (0, 1]")
        if self.max_query_age < 1:
            raise InvalidInput("max_query_age must be at least 1 second")

    def check_grid(self, site: str, column: str, values: Iterable[float]) -> None:
        """Refuse bin edges or clip bounds on ``column`` off the owner's grid."""
        width = dict(self.grid).get(column)
        if width is None:
            self._check_digits(site, column, values)
            return
        v = np.asarray(list(values), dtype=float) / width
        if np.any(np.abs(v - np.rint(v)) > 1e-9 * np.maximum(1.0, np.abs(v))):
            raise DisclosureRefused(
                f"site {site}: bin edges and bounds on {column!r} must be multiples "
                f"of {width:g} (its owner's grid, so that edges cannot be bisected "
                "towards one patient's value); round them to that grid"
            )

    def _check_digits(self, site: str, column: str, values: Iterable[float]) -> None:
        digits = self.grid_digits
        if digits is None:
            return
        v = np.asarray(list(values), dtype=float)
        v = v[np.isfinite(v) & (v != 0)]
        if v.size == 0:
            return
        # exactly the number `digits` significant digits write (no slack: 18 +
        # 1e-8 would catch exactly the rows equal to 18)
        if any(float(f"{x:.{digits}g}") != x for x in v.tolist()):
            raise DisclosureRefused(
                f"site {site}: bin edges and bounds on {column!r} may have at most "
                f"{digits} significant digit(s){_DIGIT_EXAMPLES.get(digits, '')}, so "
                "that edges cannot be bisected towards one patient's value; "
                "round them, or ask the owner to declare a grid for the column "
                '(DisclosurePolicy(grid={"column": width}))'
            )


@dataclass(frozen=True)
class QueryLogEntry:
    """One answered query, as the site remembers it (no values)."""

    time: float
    researcher: str | None
    query_hash: str
    kind: str
    subsets: int
    rows: int


class SiteProxy:
    """A site that runs elsewhere (a deployed SuperNode), as the researcher's side of
    a statistic sees it: its public facts only.

    Everything that touches rows — authorization, the disclosure checks, the
    computation, the auditor — runs at the site, reached through ``remote`` (the
    deployment's session, :class:`healthlab.federated.deploy.DeployedSites`).
    """

    def __init__(
        self,
        remote: Any,
        name: str,
        *,
        dataset_id: int,
        ledger: Ledger,
        policy: DisclosurePolicy,
        mask_public_key: bytes,
        content_hash: str,
        node_id: int,
    ) -> None:
        self.remote = remote
        self.name = name
        self.dataset_id = dataset_id
        self.ledger = ledger
        self.policy = policy
        self.mask_public_key = mask_public_key
        self.content_hash = content_hash
        self.node_id = node_id

    gated = True

    @property
    def participant(self) -> str:
        """The site's name in a query's participant set: its dataset id."""
        return str(self.dataset_id)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise InvalidInput(
            f"site {self.__dict__.get('name', '?')} is a deployed site: {name!r} is "
            "at the site, not here; this statistic does not run on a deployment "
            "(run it on sites in this process, or ask for one that does)"
        )

    def __repr__(self) -> str:
        return (
            f"SiteProxy({self.name!r}, dataset {self.dataset_id}, node {self.node_id})"
        )


class Site:
    """One data holder.

    Parameters
    ----------
    name:
        A short, public name (``"hospital_a"``).
    data:
        The site's rows, or a path to a CSV/Parquet file (its sha256 is then the
        content hash, as registered on chain).
    dataset_id, ledger:
        The dataset this data is registered under and the chain holding its grants.
        Without them the site is *ungated*: a local simulation for teaching and tests.
    policy:
        The owner's disclosure policy. It is fixed for the site's lifetime; a study
        may ask for stricter settings, never weaker ones.
    mask_key:
        The site's X25519 key for pairwise masks (default: a fresh one).
    state_dir:
        Where the site keeps what it answered (its auditor's memory), across
        processes and restarts; default: in memory only.
    units:
        A column naming the person each row belongs to, when rows are not persons
        (user-days): the auditor then counts distinct persons in every subset and
        every combination of answers, not rows.

    Examples
    --------
    >>> site = Site("hospital_a", frame, dataset_id=ds, ledger=ledger)
    >>> site.gated
    True
    """

    #: A site in this process (a :class:`SiteProxy` is reached through its session).
    remote: Any = None

    def __init__(
        self,
        name: str,
        data: pd.DataFrame | str | os.PathLike[str],
        *,
        dataset_id: int | None = None,
        ledger: Ledger | None = None,
        policy: DisclosurePolicy | None = None,
        content_hash: str | None = None,
        mask_key: X25519PrivateKey | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        units: str | None = None,
    ) -> None:
        if not name or not isinstance(name, str):
            raise InvalidInput("a site needs a short, non-empty name")
        if (dataset_id is None) != (ledger is None):
            raise InvalidInput(
                "pass both dataset_id and ledger for a gated site, or neither for an "
                "ungated simulation"
            )
        self.name = name
        self.dataset_id = dataset_id
        self.ledger = ledger
        self._policy = policy or DisclosurePolicy()
        self._path: Path | None = None
        if isinstance(data, pd.DataFrame):
            self._frame = data
        elif not isinstance(data, (str, os.PathLike)):
            raise InvalidInput(
                f"site {name}: data must be a pandas DataFrame or a path to a CSV or "
                f"Parquet file, not {type(data).__name__}"
            )
        else:
            self._path = Path(data)
            self._frame = at_site(
                name, "reading its data file", (), read_table, self._path
            )
        self._content_hash = content_hash
        #: the columns the computation under way has read (see :meth:`reads`)
        self._reads: set[str] | None = None
        # a deployed site keeps one key across processes; a simulated one makes its own
        self._mask_key = mask_key or X25519PrivateKey.generate()
        #: X25519 secrets shared with peers' public keys (static keys: computed once)
        self._shared: dict[bytes, bytes] = {}
        #: long-lived pair keys (context b""), by peer key, pair and purpose
        self._pair_keys: dict[tuple[bytes, bytes, bytes, int], bytes] = {}
        self._nonces: set[tuple[str, int]] = set()
        self._state_dir = state_dir
        if units is not None and units not in self._frame.columns:
            raise InvalidInput(
                f"site {name}: units={units!r} must name one of its columns"
            )
        self._units = units
        self.log: list[QueryLogEntry] = []
        # a model's answered iterates (healthlab.encrypted.models): per model, the
        # coefficients the site answered and its own totals there — the only points
        # a next Newton step may start from
        self._iterates: dict[str, dict[bytes, Any]] = {}
        #: per model, per iterate a Newton step starts from: the smallest step
        #: fraction asked from it, and whether a step from it was answered
        self._steps: dict[str, dict[bytes, tuple[float, bool]]] = {}
        #: the functions of its values every model summed, on the atoms of every
        #: set of rows they summed over (healthlab.encrypted.models.FunctionAtoms)
        self._function_atoms: Any = None

    @classmethod
    def from_sql(
        cls,
        name: str,
        url: str,
        table: str,
        *,
        columns: Sequence[str] | None = None,
        dataset_id: int | None = None,
        ledger: Ledger | None = None,
        policy: DisclosurePolicy | None = None,
    ) -> Site:
        """A site whose rows live in a SQL table (SQLite by default, PostgreSQL by URL).

        The content hash is the frame hash of the rows read (column names, dtypes,
        values): register that hash for the dataset.

        Examples
        --------
        >>> site = Site.from_sql(
        ...     "hospital_a", "postgresql://…/cohort", "cohort"
        ... )  # doctest: +SKIP
        """
        from healthlab.data.stores import SQLStore

        with SQLStore(url) as store:
            frame = at_site(
                name,
                f"reading table {table!r}",
                list(columns or ()),
                store.read_table,
                table,
                columns=list(columns) if columns else None,
            )
        return cls(name, frame, dataset_id=dataset_id, ledger=ledger, policy=policy)

    # ------------------------------------------------------------------ facts
    @property
    def policy(self) -> DisclosurePolicy:
        """The owner's disclosure policy (read-only)."""
        return self._policy

    @property
    def gated(self) -> bool:
        """Whether every query is checked against a grant on chain."""
        return self.ledger is not None

    @property
    def columns(self) -> list[str]:
        """Column names (schema only, no values)."""
        return [str(c) for c in self._frame.columns]

    @property
    def n_rows(self) -> int:
        """Number of rows held (never published by itself; used for weights caps)."""
        return len(self._frame)

    @cached_property
    def content_hash(self) -> str:
        """sha256 of the data: of the file when built from one, else of the frame."""
        if self._content_hash is not None:
            return self._content_hash
        digest = hashlib.sha256()
        if self._path is not None:
            with self._path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(repr(list(self._frame.columns)).encode())
            digest.update(repr(list(self._frame.dtypes.astype(str))).encode())
            hashed = pd.util.hash_pandas_object(self._frame, index=True)
            digest.update(hashed.to_numpy(dtype=np.uint64).tobytes())
        return "0x" + digest.hexdigest()

    @property
    def mask_public_key(self) -> bytes:
        """This site's X25519 public key, for the pairwise masks of secure sums."""
        return self._mask_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def participant(self) -> str:
        """How this site is named in a query's participant set and the shared query
        log: its dataset id when gated; else its name and a prefix of its content
        hash (so two teaching sites of one name but other data are not confused)."""
        if self.gated:
            return str(self.dataset_id)
        return f"{self.name}@{self.content_hash[2:14]}"

    def __repr__(self) -> str:
        kind = f"dataset {self.dataset_id}" if self.gated else "ungated"
        return f"Site({self.name!r}, {kind})"

    # ---------------------------------------------------------- authorization
    def authorize(self, signed: SignedQuery | None, *, query_hash: str) -> str | None:
        """Check a signed query before any computation; return the researcher.

        A gated site requires: a signature by the named researcher over exactly this
        query, on this chain and registry, fresh and never seen before, and a live
        grant for that researcher on this site's dataset (read from the chain now).
        An ungated site accepts unsigned queries.
        """
        if not self.gated:
            return signed.researcher if signed else None
        assert self.ledger is not None
        assert self.dataset_id is not None
        if signed is None:
            raise SignatureInvalid(
                f"site {self.name} only answers queries signed by a researcher"
            )
        if signed.query_hash != query_hash:
            raise SignatureInvalid(
                f"site {self.name}: the signature covers another query"
            )
        if signed.chain_id != self.ledger.chain_id or (
            signed.registry.lower() != self.ledger.address.lower()
        ):
            raise SignatureInvalid(
                f"site {self.name}: the query was signed for another chain or registry"
            )
        if recover_signer(signed).lower() != signed.researcher.lower():
            raise SignatureInvalid(
                f"site {self.name}: the query was not signed by {signed.researcher}"
            )
        age = self.ledger.now() - signed.issued_at
        if not -60 <= age <= self._policy.max_query_age:
            raise SignatureInvalid(
                f"site {self.name}: the query was signed {age} s ago; sign it again"
            )
        key = (signed.researcher.lower(), signed.nonce)
        if key in self._nonces:
            raise SignatureInvalid(
                f"site {self.name}: this signed query was already used (replay); "
                "sign a new one"
            )
        if not self.ledger.has_access(self.dataset_id, signed.researcher):
            raise AccessDenied(
                f"site {self.name}: {signed.researcher} holds no live grant on "
                f"dataset {self.dataset_id} (never approved, expired or revoked); "
                "request access with Ledger.request_access"
            )
        self._nonces.add(key)
        return signed.researcher

    def check_participants(
        self,
        query_hash: str,
        participants: Sequence[str],
        *,
        researcher: str | None,
        need: int,
    ) -> tuple[int, list[str]]:
        """Before computing: the query must be in the shared query log with exactly
        these participants; a gated site counts only datasets of distinct owners
        other than the researcher (Sybils), keeps to its collaboration, and no
        combination of the researcher's logged site sets may single out fewer than
        ``need`` sites (:meth:`Auditor.check_sites`) — sets of *owners*, the
        researcher's own datasets left out (they add nothing the researcher does not
        know). Returns how many participants are not distinct other owners (the
        holder count must exceed them) and the set audited (to remember)."""
        members = sorted(set(participants))
        if self.participant not in members or len(members) != len(participants):
            raise AccessDenied(
                f"site {self.name} is not among this query's sites, or a site is "
                "named twice; ask through healthlab.encrypted"
            )
        if len(members) < need:
            raise TooFewSites(
                f"site {self.name}: this query pools {len(members)} site(s), fewer "
                f"than the {need} required"
            )
        entries = logged_queries(self, researcher)
        if (query_hash, tuple(members)) not in entries:
            raise AccessDenied(
                f"site {self.name}: this query is not in the shared query log with "
                "these sites; the statistics functions log every query before "
                "asking (Ledger.log_query)"
            )
        untrusted = 0
        if self.gated:
            untrusted = len(members) - self.check_owners(members, researcher, need)
        owner_of = self._owners(researcher)
        me = owner_of(self.participant)
        # a logged query of one site was answered by no site (every site's minimum
        # is 2 or more): it pools nothing
        others = []
        for h, p in entries:
            mapped = sorted({o for o in map(owner_of, p) if o})
            if h != query_hash and me not in mapped and len(p) >= 2:
                others.append(mapped)
        mine = sorted({o for o in map(owner_of, members) if o})
        self.auditor.check_sites(self.name, researcher, mine, others, need)
        return untrusted, mine

    def owned_by(self, researcher: str | None) -> bool:
        """Whether this gated site's dataset is the researcher's own."""
        return self.gated and self._owners(researcher)(self.participant) == ""

    def _owners(self, researcher: str | None) -> Callable[[str], str]:
        """Participant -> who the site-set audit counts: every dataset by itself
        (each one's totals are its own, even beside another of the same owner),
        but '' for the researcher's own, which add nothing the researcher does not
        know."""
        if not self.gated:
            return lambda participant: participant
        assert self.ledger is not None
        ledger, who = self.ledger, (researcher or "").lower()
        cache: dict[str, str] = {}

        def owner_of(participant: str) -> str:
            if participant not in cache:
                owner = ledger.dataset(int(participant)).owner.lower()
                cache[participant] = "" if owner == who else participant
            return cache[participant]

        return owner_of

    def count_persons(self, rows: pd.Index | np.ndarray) -> int:
        """How many persons the rows at these positions are: rows, or distinct
        values of the ``units`` column when rows are user-days."""
        if self._units is None:
            return len(rows)
        return int(self._frame[self._units].iloc[np.asarray(rows)].nunique())

    def check_owners(
        self, members: Sequence[str], researcher: str | None, need: int
    ) -> int:
        """Refuse pooling ``members`` (dataset ids) unless they are datasets of at
        least ``need`` distinct owners other than the researcher, all members of
        this site's collaboration if it has one; return that count of owners."""
        assert self.ledger is not None
        try:
            ids = [int(m) for m in members]
        except ValueError:
            raise AccessDenied(
                f"site {self.name} pools only with registered datasets"
            ) from None
        owners = {self.ledger.dataset(i).owner.lower() for i in ids}
        others = owners - {(researcher or "").lower()}
        if len(others) < need:
            raise TooFewSites(
                f"site {self.name}: the query pools datasets of {len(others)} "
                f"owner(s) other than the researcher, fewer than the {need} a pooled "
                "result needs (a researcher's own datasets count not at all, several "
                "of one owner once); add sites of other owners"
            )
        collaboration = self._policy.collaboration
        if collaboration is not None and not all(
            self.ledger.is_member(collaboration, owner) for owner in owners
        ):
            raise DisclosureRefused(
                f"site {self.name} pools only with datasets whose owners are members "
                f"of collaboration #{collaboration}; leave the other sites out, or "
                "ask the collaboration's curator to admit their owners"
            )
        return len(others)

    # ------------------------------------------------------------------- rows
    @property
    def function_atoms(self) -> Any:
        """What this site's models summed over its rows, on the atoms of their
        sets (:class:`healthlab.encrypted.models.FunctionAtoms`)."""
        if self._function_atoms is None:
            from healthlab.encrypted.models import FunctionAtoms

            self._function_atoms = FunctionAtoms(self.n_rows)
        return self._function_atoms

    @contextlib.contextmanager
    def reads(self) -> Iterator[set[str]]:
        """The columns a computation in this block reads from the site's rows
        (:meth:`rows` notes them): the auditor matches an updated row to an earlier
        one by these columns' values only (:meth:`Auditor.lift`)."""
        before = self._reads
        self._reads = set()
        try:
            yield self._reads
        finally:
            self._reads = before

    def note_reads(self, columns: Iterable[str]) -> None:
        """Count ``columns`` among those the computation under way reads (a
        computation that reuses rows it prepared earlier names them again)."""
        if self._reads is not None:
            self._reads.update(str(c) for c in columns)

    def rows(
        self,
        columns: Sequence[str],
        *,
        dropna: bool = False,
        population: Sequence[str] = (),
    ) -> tuple[pd.DataFrame, int]:
        """The site's rows of ``columns`` for computation *at the site*; and how many
        rows were dropped for missing values.

        ``population``: the study's declared analysis population, the complete cases
        of these columns; rows outside it are always dropped (and counted). NaN or
        infinity in a numeric column of ``columns`` among the remaining rows is
        refused unless ``dropna``; then those rows are dropped and counted too.
        """
        wanted = list(dict.fromkeys([*columns, *population]))
        self.note_reads(wanted)
        missing = [c for c in wanted if c not in self._frame.columns]
        if missing:
            raise DataRefused(
                f"site {self.name} has no column(s) {missing}; it has {self.columns}"
            )
        near = self.column_relations().near
        related = [c for c in wanted if c in near]
        if related:
            # beside its basis, any statistic of such a column is the few rows'
            column = related[0]
            raise DisclosureRefused(
                f"site {self.name}: column {column!r} equals "
                f"{near[column].kind_words()} on all its rows but a few, so its "
                "statistics beside theirs would be those rows' own; compute on "
                f"{near[column].words()}, or ask the owner to correct or drop "
                f"{column!r}"
            )
        # index = row positions, so study code can map subsets back to all rows
        frame = self._frame.loc[:, wanted].reset_index(drop=True)
        bad = frame.isna()
        numeric = frame.select_dtypes("number")
        if not numeric.empty:
            bad.loc[:, numeric.columns] |= ~np.isfinite(
                numeric.to_numpy(dtype=float, na_value=np.nan)
            )
        outside = bad.loc[:, list(population)].any(axis=1).to_numpy()
        asked = bad.loc[:, list(columns)]
        rows_bad = asked.any(axis=1).to_numpy() & ~outside
        if rows_bad.any() and not dropna:
            # the columns, never how many rows: a count below the threshold would
            # single patients out (the site's operator may log counts, not send them)
            named = ", ".join(
                repr(str(c)) for c, n in asked.loc[~outside].sum().items() if n
            )
            raise DataRefused(
                f"site {self.name} has missing or infinite values in {named}; pass "
                "dropna=True to drop those rows (the pooled count dropped is "
                "reported), or declare them in the study's population="
            )
        dropped_rows = outside | rows_bad
        return frame.loc[~dropped_rows, list(columns)], int(dropped_rows.sum())

    def column_relations(self) -> Relations:
        """How this site's value columns relate on its rows
        (:mod:`healthlab.relations`), found once per version of its data."""
        cached = self.__dict__.get("_relations")
        if cached is None or cached[0] is not self._frame:
            found = find_relations(self._frame, self._policy.min_rows)
            self.__dict__["_relations"] = cached = (self._frame, found)
        return cached[1]

    # --------------------------------------------------- differential privacy
    @property
    def privacy_budget(self) -> PrivacyBudget | None:
        """The DP budget this site answers under: its dataset's on chain, else the
        policy's; ``None``: exact answers, audited for differencing."""
        if self.gated:
            assert self.ledger is not None
            assert self.dataset_id is not None
            on_chain = self.ledger.privacy_budget(self.dataset_id)
            if on_chain is not None:
                return on_chain
        return self._policy.privacy

    def _grant(self, researcher: str | None) -> str:
        """The key of a researcher's budget: per grant when gated."""
        who = (researcher or "").lower()
        if self.gated and researcher is not None:
            assert self.ledger is not None
            assert self.dataset_id is not None
            request = self.ledger.access(self.dataset_id, researcher).request_id
            return f"{who}#{request}"
        return who

    def privacy_spent(self, researcher: str | None) -> tuple[int, float]:
        """(answers, ε) this site spent on ``researcher``'s current grant."""
        budget = self.privacy_budget
        used = self.auditor.dp_answers.get(self._grant(researcher), [])
        delta = budget.delta if budget else 1e-5
        return len(used), epsilon_spent(used, delta)

    def check_privacy(self, researcher: str | None, noise_multiplier: float) -> float:
        """Refuse an answer that would spend more than the budget; return the ε the
        researcher's grant would have spent with it."""
        budget = self.privacy_budget
        assert budget is not None
        used = self.auditor.dp_answers.get(self._grant(researcher), [])
        after = epsilon_spent([*used, noise_multiplier], budget.delta)
        if after > budget.epsilon:
            spent = epsilon_spent(used, budget.delta)
            raise DisclosureRefused(
                f"site {self.name}: the privacy budget of this grant is spent "
                f"(ε {spent:.2f} of {budget.epsilon:g} at δ {budget.delta:g} used by "
                f"{len(used)} answers; one more would reach {after:.2f}); ask the "
                "owner for a new grant or a larger budget"
            )
        return after

    def record_privacy(self, researcher: str | None, noise_multiplier: float) -> None:
        """Count one answer against the researcher's budget (kept with the auditor's
        memory) and, when gated, record the grant's spend on chain (the owner)."""
        key = self._grant(researcher)
        self.auditor.record_dp(key, noise_multiplier)
        if self.gated and researcher is not None:
            assert self.ledger is not None
            assert self.dataset_id is not None
            answers, epsilon = self.privacy_spent(researcher)
            owner = self.ledger.dataset(self.dataset_id).owner
            self.ledger.record_privacy_spend(
                self.dataset_id, researcher, answers, epsilon, sender=owner
            )

    # ---------------------------------------------------------- disclosure
    def check_subsets(
        self,
        subsets: Mapping[str, Iterable[np.ndarray]],
        *,
        min_rows: int = 0,
        researcher: str | None = None,
        differencing: bool = True,
        columns: Iterable[str] | None = None,
    ) -> None:
        """Refuse a query before anything is computed unless every combination of
        its answers with what this site answered ``researcher`` before summarizes
        at least the site's minimum of rows (:mod:`healthlab.audit`). Under a DP
        budget (``differencing=False``) only each subset's size is checked: the
        noise covers combinations.

        ``subsets`` maps a column name to boolean masks over the site's rows (one per
        group, cell or bin). A non-empty mask must select at least the policy's
        minimum of rows (``min_rows`` is for the site's own callers: a study's
        threshold never reaches it, see :class:`~healthlab.encrypted.protocol.Query`);
        no linear combination of it and the subsets answered before may isolate
        fewer than that (or the policy's ``min_difference``). A refused query is
        remembered too. Messages name the rule, never counts of rows or values.
        ``columns``: those the query reads (:meth:`reads`), for the auditor.
        """
        with self.auditor.reading(columns):
            self._check_subsets(subsets, min_rows, researcher, differencing)

    def _check_subsets(
        self,
        subsets: Mapping[str, Iterable[np.ndarray]],
        min_rows: int,
        researcher: str | None,
        differencing: bool,
    ) -> None:
        if self._policy.is_citizen:
            self._check_citizen(subsets, researcher)
            return
        threshold = max(min_rows, self._policy.min_rows, self._policy.min_difference)
        masks = [np.asarray(m, dtype=bool) for ms in subsets.values() for m in ms]
        left_out = [np.asarray(m, dtype=bool) for m in subsets.get(LEFT_OUT, ())]
        if any(0 < int(m.sum()) < threshold for m in left_out):
            self.auditor.refuse(researcher, masks)
            raise DisclosureRefused(
                f"site {self.name}: the rows this query leaves out (missing values, or "
                f"outside the population) would be fewer than {threshold}, and their "
                "count is released; ask without the columns few rows lack, or "
                "declare a population that keeps those rows out of every query"
            )
        self.auditor.check(
            self.name, researcher, masks, threshold, differencing=differencing
        )

    def _check_citizen(
        self, subsets: Mapping[str, Iterable[np.ndarray]], researcher: str | None
    ) -> None:
        """A citizen site's audit (:meth:`DisclosurePolicy.citizen`): no groups,
        and every non-empty subset it answers is its one record. The sets of a
        column's few values (``values of …``) are functions of the record, not
        other rows: they are not subsets of it here."""
        rows = {
            column: [np.asarray(m, dtype=bool) for m in ms]
            for column, ms in subsets.items()
            if not str(column).startswith(VALUES_OF)
        }
        masks = [m for ms in rows.values() for m in ms]
        if any(len(ms) > 1 for column, ms in rows.items() if column != LEFT_OUT):
            self.auditor.refuse(researcher, masks)
            raise DisclosureRefused(
                f"site {self.name} is a citizen's site: it answers no groups, bins "
                "or cells (a group's holder count is the number of citizens in it, "
                "and groups differenced single citizens out); ask for totals over "
                "all of the citizens' rows"
            )
        self.auditor.check_record(self.name, researcher, masks)

    def refuse_subsets(
        self,
        subsets: Mapping[str, Iterable[np.ndarray]],
        *,
        researcher: str | None,
        columns: Iterable[str] | None = None,
    ) -> None:
        """Remember ``subsets`` as refused (a refusal the audit did not make, e.g. a
        total the encoding cannot carry): later queries are audited against them."""
        masks = [np.asarray(m, dtype=bool) for ms in subsets.values() for m in ms]
        with self.auditor.reading(columns):
            self.auditor.refuse(researcher, masks)

    def check_protected(
        self,
        subsets: Mapping[str, Iterable[np.ndarray]],
        protected: Iterable[np.ndarray] = (),
        *,
        researcher: str | None = None,
        columns: Iterable[str] | None = None,
    ) -> None:
        """Refuse answering ``subsets`` when a combination of them and what this
        site answered before would give a protected set's statistic: the site's rows
        of a group that too few sites held to be pooled (kept from before, or
        ``protected`` by this query)."""
        masks = [np.asarray(m, dtype=bool) for ms in subsets.values() for m in ms]
        with self.auditor.reading(columns):
            self.auditor.check_protected(self.name, researcher, masks, protected)

    def model_iterate(self, model: str, beta: np.ndarray) -> Any | None:
        """What this site stored when it answered ``model`` at ``beta`` (None: it
        did not)."""
        return self._iterates.get(model, {}).get(_beta_key(beta))

    def model_iterations(self, model: str) -> int:
        """How many iterates of ``model`` this site has answered."""
        return len(self._iterates.get(model, {}))

    def remember_iterate(self, model: str, beta: np.ndarray, stored: Any) -> None:
        """Record that this site answered ``model`` at ``beta`` (after the step to it
        was verified), with its own totals there."""
        self._iterates.setdefault(model, {})[_beta_key(beta)] = stored

    def newton_steps(self, model: str, start: np.ndarray) -> tuple[float, bool]:
        """The smallest fraction of a Newton step from ``start`` asked so far (2.0:
        none) and whether a step from it was answered."""
        return self._steps.get(model, {}).get(_beta_key(start), (2.0, False))

    def record_step(
        self, model: str, start: np.ndarray, fraction: float, answered: bool = False
    ) -> None:
        """Record a Newton step from ``start`` asked at ``fraction`` (and, once its
        check passed, answered)."""
        steps = self._steps.setdefault(model, {})
        smallest, done = steps.get(_beta_key(start), (2.0, False))
        steps[_beta_key(start)] = (min(smallest, fraction), done or answered)

    def undo_step(self, model: str, start: np.ndarray, fraction: float) -> None:
        """Forget that a Newton step from ``start`` was asked at ``fraction`` (its
        check failed on its own equation: no refusal to halve after)."""
        steps = self._steps.get(model, {})
        smallest, done = steps.get(_beta_key(start), (2.0, False))
        if smallest == fraction:
            steps[_beta_key(start)] = (2 * fraction, done)

    def check_model(self, n_params: int, n_rows: int) -> None:
        """Refuse a model with more parameters than ``max_param_ratio`` × rows."""
        if n_params > self._policy.max_param_ratio * n_rows:
            # the site's row count is its own total: it is not named
            raise DisclosureRefused(
                f"site {self.name}: {n_params} parameters exceed "
                f"{self._policy.max_param_ratio} per row of the site's rows; use fewer "
                "covariates"
            )

    def remember(
        self,
        subsets: Mapping[str, Iterable[np.ndarray]],
        *,
        query_hash: str,
        kind: str,
        researcher: str | None,
        protected: Iterable[np.ndarray] = (),
        participants: Sequence[str] = (),
        columns: Iterable[str] | None = None,
    ) -> None:
        """Record an answered query's subsets, the sets it protects and its
        participant set as audited (:meth:`check_participants`), and a log line.
        A citizen site keeps its record only (not the sets of a column's values:
        functions of the record, see :meth:`_check_citizen`)."""
        masks = [
            np.asarray(m, dtype=bool)
            for column, ms in subsets.items()
            if not (self._policy.is_citizen and str(column).startswith(VALUES_OF))
            for m in ms
        ]
        with self.auditor.reading(columns):
            self.auditor.record(researcher, masks, protected)
        if participants:
            self.auditor.record_sites(researcher, participants)
        sizes = [int(m.sum()) for m in masks if m.any()]
        self.log.append(
            QueryLogEntry(
                time.time(),
                researcher,
                query_hash,
                kind,
                len(sizes),
                max(sizes, default=0),
            )
        )

    @cached_property
    def holder_patterns(self) -> HolderPatterns:
        """Which released cells this site's rows are in, over every query it
        answered (:mod:`healthlab.holders`); persistent with ``state_dir``."""
        path = None
        if self._state_dir is not None:
            path = Path(self._state_dir) / f"holders-{self.name}.json"
        return HolderPatterns(path)

    @cached_property
    def auditor(self) -> Auditor:
        """What this site answered (per researcher); persistent with ``state_dir``."""
        path = None
        if self._state_dir is not None:
            path = Path(self._state_dir) / f"audit-{self.name}.json"
        # a hash of each row's values: the memory follows the rows when the data
        # changes (appended, removed or edited rows), see Auditor._carry_over;
        # columns in name order, numbers as float64, so a reordered file or an int
        # column read back as float hashes alike
        keys, column_keys = _value_hashes(self._frame)
        columns = sorted(str(c) for c in self._frame.columns)
        if self._units is None:
            return Auditor(
                self.n_rows,
                self.content_hash,
                path,
                row_keys=keys,
                columns=columns,
                column_keys=column_keys,
            )
        persons = self._frame[self._units].astype(str)
        return Auditor(
            self.n_rows,
            self.content_hash,
            path,
            units=pd.util.hash_pandas_object(persons, index=False).to_numpy(),
            unit_name=f"persons ({self._units})",
            row_keys=keys,
            columns=columns,
        )

    # ----------------------------------------------------------------- masks
    def pairwise_seeds(
        self, peers: Mapping[str, bytes], context: bytes, *, me: str | None = None
    ) -> list[tuple[bytes, int]]:
        """Seeds shared with every other site (X25519 + HKDF), with this site's sign.

        ``peers`` maps each member's identifier to its X25519 public key; ``me`` is
        this site's identifier among them (default: its name). The lower-named
        member of a pair adds the pair's stream, the other subtracts it, so the masks
        cancel in the sum across the members.
        """
        me = self.name if me is None else me
        keys = self.pairwise_keys(peers, b"healthlab-mask", context, me=me)
        return [(key, 1 if me < peer else -1) for peer, key in sorted(keys.items())]

    def pairwise_keys(
        self,
        peers: Mapping[str, bytes],
        purpose: bytes,
        context: bytes,
        *,
        me: str | None = None,
        length: int = 32,
    ) -> dict[str, bytes]:
        """A ``length``-byte secret shared with every other member (X25519 +
        HKDF-SHA256), separate per ``purpose`` (masks, message tags) and
        ``context``; with no ``context``, a long-lived key, derived once."""
        me = self.name if me is None else me
        out = {}
        for peer, public in sorted(peers.items()):
            if peer == me:
                continue
            shared = self._shared.get(public)
            if shared is None:  # one exchange per peer key, then HKDF per use
                shared = self._mask_key.exchange(
                    X25519PublicKey.from_public_bytes(public)
                )
                self._shared[public] = shared
            pair = "|".join(sorted((me, peer))).encode()
            cached = (public, pair, purpose, length)
            if not context and cached in self._pair_keys:
                out[peer] = self._pair_keys[cached]
                continue
            out[peer] = HKDF(
                algorithm=hashes.SHA256(),
                length=length,
                salt=None,
                info=purpose + b"|" + pair + b"|" + context,
            ).derive(shared)
            if not context:  # a long-lived key (its uses bind their context)
                self._pair_keys[cached] = out[peer]
        return out


#: The subsets keys' prefix of a column's few values' row sets (a category in
#: disguise, :func:`healthlab.encrypted.stats._moments`).
VALUES_OF = "values of "

#: The subsets key of the rows a query leaves out (missing values, outside the
#: population): their count is released as ``missing``, so they are audited too.
LEFT_OUT = "(rows left out)"

#: The shared query log of ungated (teaching) sites, in this process: (researcher,
#: query hash, participants). Gated sites read the chain's ``QueryLogged`` events.
_LOCAL_LOG: list[tuple[str, str, tuple[str, ...]]] = []


def log_query(
    sites: Sequence[Site], query_hash: str, researcher: str | None
) -> tuple[str, ...]:
    """Log a query in the shared log of ``sites`` before asking them; return its
    participant set (sorted ``Site.participant``). Gated sites: one ``QueryLogged``
    event on their chain, sent by the researcher. Ungated sites: this process's
    log."""
    members = tuple(sorted(s.participant for s in sites))
    gated = [s for s in sites if s.gated]
    if gated and len(gated) != len(sites):
        raise InvalidInput(
            "a query pools either sites that check grants on chain or ungated "
            "teaching sites, not both"
        )
    if gated:
        ledger = gated[0].ledger
        assert ledger is not None
        if researcher is None:
            raise InvalidInput(
                "these sites check grants on chain: pass researcher=<your address>"
            )
        ledger.log_query(query_hash, [int(m) for m in members], sender=researcher)
    else:
        # ungated sites take unsigned queries: they know no researcher (see
        # Site.authorize), so their log does not either
        _LOCAL_LOG.append(("", query_hash, members))
    return members


def logged_queries(
    site: Site, researcher: str | None
) -> list[tuple[str, tuple[str, ...]]]:
    """Every query of ``researcher`` in ``site``'s shared log: (hash, participants)."""
    if site.gated:
        assert site.ledger is not None
        if researcher is None:
            return []
        return [
            (q.query_hash, tuple(sorted(str(i) for i in set(q.dataset_ids))))
            for q in site.ledger.logged_queries(researcher)
        ]
    who = (researcher or "").lower()
    return [(h, members) for r, h, members in _LOCAL_LOG if r == who]


def _canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows' values, columns in name order, numbers as float64 and everything
    else as text: a reordered file or an int column read back as float alike."""
    canonical = pd.DataFrame(index=range(len(frame)))
    for name in sorted(frame.columns, key=str):
        column = frame[name].reset_index(drop=True)
        if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(
            column
        ):
            canonical[str(name)] = column.astype("float64")
        else:
            canonical[str(name)] = column.astype(str)
    return canonical


def _value_hashes(
    frame: pd.DataFrame,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A hash per row of its values (independent of column order and of an integer
    column's dtype), and one per row and column of each value (columns in name
    order); both None when a cell cannot be hashed (lists…)."""
    canonical = _canonical(frame)
    try:
        rows = pd.util.hash_pandas_object(canonical, index=False).to_numpy()
        parts = [hash_array(canonical[c].to_numpy()) for c in canonical.columns]
    except TypeError:
        return None, None
    if not parts:
        return rows, None
    return rows, np.column_stack(parts).astype(np.uint64)


def read_table(path: Path) -> pd.DataFrame:
    """A site's data file (CSV, or Parquet by its suffix) as a frame.

    A file that cannot be read as a table (empty, header only, binary, not UTF-8,
    ragged, not Parquet) is refused with :class:`~healthlab.errors.UnreadableFile`
    naming the file and the line, never its content.
    """
    if not path.is_file():
        raise InvalidInput(f"no data file at {path}")
    return read_data_file(path)


#: The ``{name: DataFrame}`` form's sites, kept between calls (by name and content)
#: so that their auditors remember what they answered.
_TEACHING: dict[tuple[str, str], Site] = {}


def _teaching_site(name: str, frame: pd.DataFrame) -> Site:
    """The ungated site for ``name`` and this frame's content, made once a process.

    This form is for teaching: whoever passes the frames holds every row, so it
    protects nothing against its own caller; the sites still refuse as gated ones.
    """
    if not isinstance(frame, pd.DataFrame):
        return Site(name, frame)  # Site names the wrong type
    fresh = Site(name, frame)
    return _TEACHING.setdefault((name, fresh.content_hash), fresh)


def as_sites(sites: Sequence[Site] | Mapping[str, pd.DataFrame]) -> list[Site]:
    """Normalize ``sites``: a list of :class:`Site`, or ``{name: DataFrame}``.

    The ``{name: DataFrame}`` form is for teaching and tests: its sites are kept
    between calls (so their auditors remember), but whoever holds the frames holds
    every row, so it protects nothing against its own caller.
    """
    if isinstance(sites, Mapping):
        return [_teaching_site(str(name), frame) for name, frame in sites.items()]
    listed = list(sites)
    if not listed or not all(isinstance(s, (Site, SiteProxy)) for s in listed):
        raise InvalidInput(
            "sites must be a list of healthlab.Site or a mapping {name: DataFrame}"
        )
    names = [s.name for s in listed]
    if len(set(names)) != len(names):
        raise InvalidInput(f"site names must be unique: {names}")
    return listed
