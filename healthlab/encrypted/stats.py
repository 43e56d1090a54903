"""Table 1 statistics pooled across sites over encrypted site totals.

Every function takes ``sites`` — a list of :class:`~healthlab.Site` (gated by grants
on chain, queries signed by ``researcher``) or ``{name: DataFrame}`` for an ungated
local simulation — and returns a :class:`~healthlab.encrypted.tables.ResultTable`, a
pandas table whose ``.receipt`` ties it to the sites, the query and (when gated) the
grants that allowed it, and whose ``.missing``, ``.suppressed`` (and per statistic
``.outside``, ``.percentiles``, ``.noise``) say what the sites' rules left out.

Moments are computed in two rounds: the first pools ``n`` and ``Σx`` to get a public
center (the pooled mean), the second pools sums of deviations from it, so variances,
covariances and regressions do not lose digits to cancellation (as pandas' two-pass
algorithms do not). Sites encrypt exact fixed-point digits of their totals (see
:mod:`healthlab.encrypted.encoding`), so pooled counts are exact and moments match
pandas to ~1e-15 relative.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats as distributions

from healthlab.encrypted.encoding import MAX_ABS
from healthlab.encrypted.keys import KeyHolder
from healthlab.encrypted.protocol import (
    Block,
    Query,
    StudyRun,
    Totals,
    computation,
    computation_for,
    each,
    run_query,
)
from healthlab.encrypted.results import OLSResults
from healthlab.encrypted.tables import ResultTable
from healthlab.errors import (
    DataRefused,
    DisclosureRefused,
    InvalidInput,
    TooFewSites,
    TooManyDropouts,
)
from healthlab.receipts import Receipt, build_receipt
from healthlab.site_data import at_site, numeric, numeric_column
from healthlab.sites import LEFT_OUT, VALUES_OF, Site, as_sites

if TYPE_CHECKING:
    from healthlab.ledger.signing import SignedQuery

__all__ = [
    "AliasedDesign",
    "Levels",
    "corr",
    "counts",
    "cov",
    "crosstab",
    "describe",
    "histogram",
    "levels",
    "missing",
    "ols",
]

SitesLike = Sequence[Site] | Mapping[str, pd.DataFrame]
#: A column with more distinct values than this at a site is not a category.
MAX_LEVELS = 50
_log = logging.getLogger(__name__)


# ---------------------------------------------------------------- site side
def _by_columns(by: str | Sequence[str] | None) -> list[str]:
    """The grouping columns of ``by=`` (one name, or several)."""
    if by is None:
        return []
    return [by] if isinstance(by, str) else [str(b) for b in by]


def _group_masks(
    frame: pd.DataFrame, by: str | Sequence[str] | None, groups: Sequence[Any]
) -> list[np.ndarray]:
    named = _by_columns(by)
    if not named:
        return [np.ones(len(frame), dtype=bool)]
    if isinstance(by, str):
        labels = frame[by].astype(str).to_numpy()
        return [labels == g for g in groups]
    # several columns: a group is one level of each
    columns = [frame[b].astype(str).to_numpy() for b in named]
    masks = []
    for group in groups:
        mask = np.ones(len(frame), dtype=bool)
        for values, level in zip(columns, group, strict=True):
            mask &= values == str(level)
        masks.append(mask)
    return masks


def _full_masks(
    site: Site, kept: pd.DataFrame, masks: list[np.ndarray]
) -> list[np.ndarray]:
    """Masks over *all* the site's rows (for differencing), from masks over kept rows.

    ``Site.rows`` indexes kept rows by their position among all the site's rows.
    """
    positions = kept.index.to_numpy()
    full = []
    for mask in masks:
        m = np.zeros(site.n_rows, dtype=bool)
        m[positions[mask]] = True
        full.append(m)
    return full


@computation("moments")
def _moments(site: Site, query: Query) -> Totals:
    """n, Σ(x-c), Σ(x-c)² (or the upper triangle of Σ(x-c)(x-c)ᵀ) per group.

    Each group is a :class:`~healthlab.encrypted.protocol.Block`: the sites count
    among themselves how many hold rows in it, and a group fewer than the pooling
    minimum hold is sent as zeros by every site (and protected by its auditor).
    """
    spec = query.spec
    columns: list[str] = list(spec["columns"])
    by = spec.get("by")
    asked = list(dict.fromkeys(columns + _by_columns(by)))
    kept, dropped = site.rows(
        asked, dropna=bool(spec.get("dropna")), population=spec.get("population", ())
    )
    for column in _by_columns(by):
        _check_grouping(site, kept, column, site.policy.min_rows)
    values = numeric(site.name, kept, columns)
    masks = _group_masks(kept, by, spec.get("groups", ()))
    center = np.asarray(spec["center"], dtype=float)
    # a centre (or bound) of the caller's choosing must not be able to push a
    # site's totals past what the encoding carries (n·c or n·c² against 2^91: that
    # refusal, bisected, would count the site's rows): first moments are centred
    # at 0, second moments at most MAX_PARAMETER, whatever the rows
    if not np.all(np.isfinite(center)) or (
        np.any(center != 0)
        if spec["order"] == 1
        else np.any(np.abs(center) > MAX_PARAMETER)
    ):
        raise DataRefused(
            f"site {site.name}: a query's centres must be 0 for first moments and at "
            f"most {MAX_PARAMETER:.3g} in size for second moments (values this large "
            "are beyond what the encoding carries squared: rescale the column)"
        )
    if spec.get("bounds") is not None:  # public bounds: a site under DP clips to them
        if site.privacy_budget is None:
            # Σ clip(x) against Σ x gives the values beyond a bound (one patient's,
            # one site's, or a product of two columns' in a cross moment); only a
            # DP budget's noise covers that, so without one bounds are refused
            # whatever the rows (no refusal here depends on the data)
            raise DisclosureRefused(
                f"site {site.name} has no privacy budget, and clip bounds are only "
                "for sites with one (their noise covers what clipping reveals); ask "
                "without bounds=, or leave this site out"
            )
        limit = np.asarray(spec["bounds"], dtype=float)
        if np.any(np.abs(limit) > MAX_PARAMETER):
            raise DisclosureRefused(
                f"site {site.name}: bounds must be at most {MAX_PARAMETER:.3g} in size"
            )
        for column, bound in zip(columns, limit, strict=True):
            site.policy.check_grid(site.name, column, bound)
        values = np.clip(values, limit[:, 0], limit[:, 1])
    values = values - center
    totals: list[float] = [float(dropped)]
    p = len(columns)
    upper = np.triu_indices(p)
    starts = []
    for mask in masks:
        x = values[mask]
        starts.append(len(totals))
        totals.append(float(len(x)))
        totals.extend(x.sum(axis=0).tolist())
        if spec["order"] == 2:
            if spec["cross"]:
                totals.extend((x.T @ x)[upper].tolist())
            else:
                totals.extend(np.square(x).sum(axis=0).tolist())
    full = _full_masks(site, kept, masks)
    model = spec.get("model_params")
    if model:
        for mask in full:
            if mask.any():
                site.check_model(int(model), int(mask.sum()))
    subsets = {c: full for c in columns} | _left_out(site, kept)
    # a column of few values is a category in disguise: n, Σx (and Σx²) of a
    # column of 2 (3) values give each value's count, and Σxy the sums of the
    # others over them — so its value sets (within each group) are subsets too
    # (a column whose values all differ is a measurement, whatever their number)
    # — one subset key per value, its entries by group, so that the holder
    # patterns name the same cell alike at every site (a value one site alone
    # holds is that site's count and sums: healthlab/holders.py)
    few = 2 if spec["order"] == 1 else 3
    raw = values + center
    value_keys: list[str] = []
    for j, column in enumerate(columns):
        if np.unique(raw[:256, j]).size > few:  # a measurement: no full pass
            continue
        seen = np.unique(raw[:, j])
        if seen.size <= few and seen.size < len(raw):
            for v in seen:
                key = value_key(column, v)
                subsets[key] = _full_masks(
                    site, kept, [m & (raw[:, j] == v) for m in masks]
                )
                value_keys.append(key)
    if by is None:
        return totals, subsets
    ends = [*starts[1:], len(totals)]
    blocks = [
        Block(a, b, m, cells=tuple((c, g) for c in [*columns, *value_keys]))
        for g, (a, b, m) in enumerate(zip(starts, ends, full, strict=True))
    ]
    return totals, subsets, blocks


def value_key(column: str, value: float) -> str:
    """The subset key of a column's rows of one value (a few-value column's
    value set): the same at every site for the same value."""
    return f"{VALUES_OF}{column} = {float(value)!r}"


#: Largest centre of second moments, or bound, a site accepts: its square times a
#: billion rows stays below what the encoding carries, so no refusal of the
#: encoding can be steered by the query's parameters.
MAX_PARAMETER = float(np.sqrt(MAX_ABS / 1e9))


def _counts(site: Site, query: Query) -> Totals:
    """Cell counts of a histogram (one numeric column) or a cross-tabulation."""
    spec = query.spec
    columns: list[str] = list(spec["columns"])
    # a histogram of one group's rows: [column, level] pairs, levels as text
    within = [(str(c), str(v)) for c, v in spec.get("within") or ()]
    if within and "edges" not in spec:
        raise DataRefused(f"site {site.name}: within= applies to histograms only")
    reads = list(dict.fromkeys([*columns, *(c for c, _ in within)]))
    kept, dropped = site.rows(
        reads, dropna=bool(spec.get("dropna")), population=spec.get("population", ())
    )
    if "edges" in spec:
        edges = np.asarray(spec["edges"], dtype=np.float64)
        site.policy.check_grid(site.name, columns[0], edges)
        x = numeric_column(site.name, kept[columns[0]], columns[0])
        index = np.searchsorted(edges, x, side="right") - 1
        index[x == edges[-1]] = len(edges) - 2  # numpy: the last bin is closed
        member = np.ones(len(kept), dtype=bool)
        for column, level in within:
            _check_grouping(site, kept, column, site.policy.min_rows)
            member &= kept[column].astype(str).to_numpy() == level
        in_range = (x >= edges[0]) & (x <= edges[-1])
        inside = member & in_range
        masks = [inside & (index == i) for i in range(len(edges) - 1)]
    elif len(columns) == 1:  # one-way counts of a category's levels
        _check_grouping(site, kept, columns[0], site.policy.min_rows)
        r = kept[columns[0]].astype(str).to_numpy()
        masks = [r == a for a in spec["levels"][0]]
    else:
        row_levels, col_levels = spec["levels"]
        for column in columns:
            _check_grouping(site, kept, column, site.policy.min_rows)
        r = kept[columns[0]].astype(str).to_numpy()
        c = kept[columns[1]].astype(str).to_numpy()
        masks = [(r == a) & (c == b) for a in row_levels for b in col_levels]
    totals = [float(dropped)] + [float(m.sum()) for m in masks]
    if "edges" in spec:  # the rows outside the edges: counted too (a cell of its own)
        outside = member & ~in_range
        beyond = int(outside.sum())
        if 0 < beyond < site.policy.min_rows:
            raise DisclosureRefused(
                f"site {site.name}: fewer than {site.policy.min_rows} of its rows fall "
                "outside the bin edges, and their count is released; move the first "
                "or last edge out to cover the column's range"
            )
        masks.append(outside)
        totals.append(float(beyond))
    full = _full_masks(site, kept, masks)
    # every cell is a block: a bin or cell held by fewer sites than the pooling
    # minimum would be one site's count, so every site sends zeros for it
    # (the rows outside a histogram's edges are the last: all rows minus the bins
    # is them, so when too few sites hold such rows they are withheld, protected)
    blocks = [
        Block(1 + i, 2 + i, m, empty_released=True, cells=tuple((c, i) for c in reads))
        for i, m in enumerate(full)
    ]
    return totals, {col: full for col in reads} | _left_out(site, kept), blocks


@computation("counts")
def _count_query(site: Site, query: Query) -> Totals:
    """A ``counts`` query: per-column missing counts (``spec["missing"]``), else
    the cells of a histogram, one-way table or crosstab."""
    if query.spec.get("missing"):
        return _missing_counts(site, query)
    return _counts(site, query)


def _missing_counts(site: Site, query: Query) -> Totals:
    """Per column, the rows of the population without a value (NaN, infinite)."""
    spec = query.spec
    columns: list[str] = list(spec["columns"])
    base, _ = site.rows([], population=spec.get("population", ()))
    inside = base.index.to_numpy()
    masks = []
    for column in columns:
        kept, _ = site.rows(
            [column], dropna=True, population=spec.get("population", ())
        )
        masks.append(~np.isin(inside, kept.index.to_numpy()))
    everyone = np.ones(len(inside), dtype=bool)
    totals = [float(site.n_rows - len(inside)), float(len(inside))] + [
        float(m.sum()) for m in masks
    ]
    full = _full_masks(site, base, [everyone, *masks])
    # each column's missing rows are a cell: held by too few sites, withheld
    blocks = [
        Block(2 + i, 3 + i, m, empty_released=True, cells=((columns[i], 0),))
        for i, m in enumerate(full[1:])
    ]
    subsets = {"rows": [full[0]]} | {
        c: [m] for c, m in zip(columns, full[1:], strict=True)
    }
    return totals, subsets | _left_out(site, base), blocks


def _left_out(site: Site, kept: pd.DataFrame) -> dict[str, list[np.ndarray]]:
    """The rows a query left out (missing values, outside the population): their
    count is released as ``missing``, so they are audited as a subset too."""
    left = np.ones(site.n_rows, dtype=bool)
    left[kept.index.to_numpy()] = False
    return {LEFT_OUT: [left]} if left.any() else {}


def _check_grouping(site: Site, kept: pd.DataFrame, by: str, k: int) -> None:
    """At the site: a column that groups rows must be a category, not an
    identifier (as :func:`levels` refuses it), whatever groups a query names."""
    labels = kept[by].astype(str)
    distinct = labels.nunique()
    if distinct >= k and 2 * distinct > site.count_persons(kept.index.to_numpy()):
        raise DataRefused(
            f"site {site.name}: {by!r} looks like an identifier or a measurement, "
            "not a category; it cannot group rows"
        )


# ------------------------------------------------------------- researcher side
def _run(
    sites: list[Site],
    kind: str,
    spec: dict[str, Any],
    n_totals: int,
    *,
    keys: KeyHolder,
    researcher: str | None,
    min_sites: int,
    min_rows: int,
    on_refusal: str,
) -> StudyRun:
    query = Query(kind, spec, n_totals, min_rows=min_rows, min_sites=min_sites)
    run = run_query(
        sites,
        query,
        computation_for(kind),
        keys=keys,
        researcher=researcher,
        on_refusal=on_refusal,
    )
    return _own_threshold(run, min_rows)


def _own_threshold(run: StudyRun, min_rows: int) -> StudyRun:
    """The researcher's own ``min_rows``, applied to the pooled result here: a
    group, bin or cell of fewer pooled rows joins the run's suppressed blocks (it is
    not shown, as one too few sites hold); a result without groups of fewer pooled
    rows is refused. The sites never see this threshold (it would make their
    refusals a count oracle); their policies apply whatever is asked."""
    if min_rows <= 0:
        return run
    spec = run.query.spec
    pooled = np.asarray(run.totals[1:], dtype=float)
    if run.query.kind == "counts":
        starts = np.arange(pooled.size)
    elif run.query.kind == "moments":
        p = len(spec["columns"])
        width = 0 if spec["order"] == 1 else (p * (p + 1) // 2 if spec["cross"] else p)
        n_groups = max(1, len(spec.get("groups") or ()))
        starts = np.arange(n_groups) * (1 + p + width)
    else:
        return run
    small = [int(i) for i, n in enumerate(pooled[starts]) if 0 < round(n) < min_rows]
    if not small:
        return run
    if run.query.kind == "moments" and not spec.get("by"):
        raise DisclosureRefused(
            f"the pooled result summarizes fewer than your min_rows={min_rows} rows; "
            "ask with a lower min_rows (the sites' own minimums still apply)"
        )
    return replace(run, suppressed=sorted({*run.suppressed, *small}))


def _centers(
    sites: list[Site],
    columns: list[str],
    by: str | Sequence[str] | None,
    groups: list[Any],
    options: QueryOptions,
    model_params: int | None = None,
) -> tuple[StudyRun, np.ndarray, list[Any]]:
    """Round 1: pooled n and Σx per column (over all groups) → the public centers,
    and the groups held by enough sites to be pooled.

    A model's size is checked here already, so a refused model answers nothing.
    The sites refuse a query fewer than the pooling minimum of them hold rows for,
    and send zeros for a group fewer hold (the run's ``suppressed`` blocks): the
    centers come from the pooled groups only, and round 2 leaves the others out.
    """
    spec = {
        "columns": columns,
        "center": [0.0] * len(columns),
        "order": 1,
        "cross": False,
        "by": by,
        "groups": groups,
        "dropna": options.dropna,
        "population": options.population,
        "bounds": _bounds(options.bounds, columns),
        "model_params": model_params,
    }
    n_groups = max(1, len(groups))
    run = _run(
        sites,
        "moments",
        spec,
        1 + n_groups * (1 + len(columns)),
        **options.run_args(),
    )
    t = np.asarray(run.totals[1:]).reshape(n_groups, 1 + len(columns))
    pooled = [g for i, g in enumerate(groups) if i not in run.suppressed]
    if groups and not pooled:
        raise TooFewSites(
            f"no group of {by!r} is held by enough sites to be pooled; group rows "
            "more coarsely or add sites"
        )
    n = t[:, 0].sum()
    if n == 0:
        raise DisclosureRefused("no rows to summarize")
    return run, t[:, 1:].sum(axis=0) / n, pooled


@dataclass(frozen=True)
class QueryOptions:
    """How a statistic is asked, whatever it is: by whom and with which keys, the
    pooling and reporting thresholds, complete cases or not, what a refusal does,
    the declared analysis population and (for a site with a DP budget) the clip
    bounds. One object instead of a dict, so a misspelled option is an error."""

    keys: KeyHolder
    researcher: str | None
    min_sites: int
    min_rows: int
    dropna: bool
    on_refusal: str
    population: list[str] = field(default_factory=list)
    bounds: float | Mapping[str, float | tuple[float, float]] | None = None

    @classmethod
    def of(
        cls,
        keys: KeyHolder | None,
        researcher: str | None,
        min_sites: int,
        min_rows: int,
        dropna: bool,
        on_refusal: str,
        population: Sequence[str] | None = None,
        bounds: float | Mapping[str, float | tuple[float, float]] | None = None,
    ) -> QueryOptions:
        """The options of one call (a fresh key holder unless one is given)."""
        return cls(
            keys or KeyHolder(),
            researcher,
            min_sites,
            min_rows,
            dropna,
            on_refusal,
            population_columns(population),
            bounds,
        )

    def run_args(self) -> dict[str, Any]:
        """The keyword arguments of :func:`_run` these options set."""
        return {
            "keys": self.keys,
            "researcher": self.researcher,
            "min_sites": self.min_sites,
            "min_rows": self.min_rows,
            "on_refusal": self.on_refusal,
        }


def _bounds(bounds: Any, columns: Sequence[str]) -> list[list[float]] | None:
    """Public bounds ``[low, high]`` per column, in the columns' order (None: none
    given); ``B`` means ``(-B, B)``.

    A site whose dataset carries a privacy budget clips values to them and scales
    its noise by them; it refuses a query without them."""
    if bounds is None:
        return None
    if isinstance(bounds, Mapping):
        missing = [c for c in columns if c not in bounds]
        if missing:
            raise InvalidInput(f"bounds= gives no bound for {missing}")
        given = [bounds[c] for c in columns]
    else:
        given = [bounds] * len(columns)
    chosen = []
    for b in given:
        low, high = (-float(b), float(b)) if np.isscalar(b) else map(float, b)  # type: ignore[arg-type]
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise InvalidInput(
                "bounds are (low, high) with low < high, or B for (-B, B), finite"
            )
        chosen.append([low, high])
    return chosen


def population_columns(columns: Sequence[str] | None) -> list[str]:
    """The declared analysis population: sorted, distinct column names."""
    if columns is None:
        return []
    if isinstance(columns, str):
        columns = [columns]
    named = sorted({str(c) for c in columns})
    if not named:
        raise InvalidInput(
            "population= names the columns whose complete cases are the study's "
            "analysis population; give at least one, or leave it out"
        )
    return named


def _second_moments(
    sites: list[Site],
    columns: list[str],
    *,
    by: str | Sequence[str] | None,
    groups: list[str],
    cross: bool,
    options: QueryOptions,
    model_params: int | None = None,
) -> tuple[list[StudyRun], np.ndarray, list[dict[str, Any]]]:
    """Both rounds; return runs, centers and per-group {n, s1, s2 | m2, dropped}.

    Groups held by fewer sites than the pooling minimum are not asked for in round
    2: their entry is ``{"group": g, "suppressed": True}``.
    """
    first, center, pooled = _centers(sites, columns, by, groups, options, model_params)
    participants = [s for s in sites if s.name in {x.name for x in first.sites}]
    p = len(columns)
    width = p * (p + 1) // 2 if cross else p
    spec = {
        "columns": columns,
        "center": center.tolist(),
        "order": 2,
        "cross": cross,
        "by": by,
        "groups": pooled,
        "dropna": options.dropna,
        "population": options.population,
        "bounds": _bounds(options.bounds, columns),
        "model_params": model_params,
    }
    n_groups = max(1, len(pooled))
    per_group = 1 + p + width
    second = _run(
        participants,
        "moments",
        spec,
        1 + n_groups * per_group,
        **options.run_args(),
    )
    t = np.asarray(second.totals[1:]).reshape(n_groups, per_group)
    # a group the sites of round 2 suppressed (fewer of them took part) is out too
    kept = {
        g: row
        for i, (g, row) in enumerate(zip(pooled, t, strict=bool(groups)))
        if i not in second.suppressed
    }
    if groups and not kept:
        raise TooFewSites(
            f"no group of {by!r} is held by enough sites to be pooled; group rows "
            "more coarsely or add sites"
        )
    rows = iter(t)
    out = []
    labels: list[str | None] = list(groups) if groups else [None]
    for group in labels:
        if group is not None and group not in kept:
            out.append({"group": group, "suppressed": True})
            continue
        row = kept[group] if group is not None else next(rows)
        entry: dict[str, Any] = {"group": group, "n": row[0], "s1": row[1 : 1 + p]}
        if cross:
            m = np.zeros((p, p))
            m[np.triu_indices(p)] = row[1 + p :]
            entry["m2"] = m + np.triu(m, 1).T
        else:
            entry["s2"] = row[1 + p :]
        out.append(entry)
    # the count of rows left out is withheld when too few sites leave rows out
    # (by either round: each is its own answer)
    withheld = first.missing_withheld or second.missing_withheld
    out[0]["dropped"] = np.nan if withheld else second.totals[0]
    return [first, second], center, out


class Levels(list[str]):
    """The released levels of a column: a sorted list of text, and ``withheld``.

    ``withheld`` is one pooled flag: whether any site holds a level that was not
    released because fewer than its minimum rows hold it. It says neither how many
    levels were withheld, nor which, nor where: a count per site (or in all) would
    tell how many patients at some site have a rare value.
    """

    withheld: bool

    def __init__(self, values: Sequence[str] = (), *, withheld: bool = False) -> None:
        super().__init__(values)
        self.withheld = withheld

    def __repr__(self) -> str:
        note = ", withheld=True" if self.withheld else ""
        return f"Levels({list(self)!r}{note})"


class SiteLevels:
    """At one site: its levels of a column, split at its minimum rows ``k``.

    Only ``common`` (levels at least ``k`` of the site's rows hold) and the answer
    of :meth:`vetoes` leave the site; the rare levels stay in this object.
    """

    def __init__(self, site: Site, column: str, k: int) -> None:
        kept, _ = at_site(
            site.name, "reading levels", [column], site.rows, [column], dropna=True
        )
        counts = at_site(
            site.name, "counting levels", [column], _level_counts, kept[column]
        )
        distinct = len(counts)
        if distinct >= k and 2 * distinct > site.count_persons(kept.index.to_numpy()):
            raise DataRefused(
                f"site {site.name}: {column!r} looks like an identifier or a "
                "measurement, not a category (more than half of the site's rows with "
                "a value hold a value of their own); its levels are not released. "
                "Bin a measurement with histogram(); an identifier has no levels to "
                "share"
            )
        if distinct > MAX_LEVELS:
            raise DataRefused(
                f"site {site.name}: {column!r} has more than {MAX_LEVELS} levels; it "
                "is not categorical (bin it with histogram)"
            )
        self.common = frozenset(counts.index[counts >= k])
        self._rare = frozenset(counts.index[counts < k])

    @property
    def withholds(self) -> bool:
        """Whether this site holds a level it does not release."""
        return bool(self._rare)

    def vetoes(self, candidates: frozenset[str]) -> frozenset[str]:
        """Levels among ``candidates`` (released by other sites) that this site holds
        in fewer than ``k`` rows: they are withheld from everyone."""
        return candidates & self._rare


def _level_counts(values: pd.Series) -> pd.Series:
    return values.astype(str).value_counts(sort=False)


def levels(
    sites: SitesLike,
    column: str,
    *,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    min_rows: int = 0,
) -> Levels:
    """The union of a categorical column's levels across sites (compared as text).

    Each site authorizes the (signed) request first. Then:

    - **Rare levels are withheld.** A level is released only if at least ``k`` rows
      hold it at *every* site that holds it (``k``: the site's ``policy.min_rows``,
      default 3; ``min_rows`` is refused here, since a threshold of the
      researcher's choosing would make the release a count oracle on one site's
      rows of a level). Sites first offer their common
      levels; a level one site offers and another holds in 1 to ``k - 1`` rows is
      vetoed by the latter, so it is released by nobody. The result says only that
      something was withheld (``Levels.withheld``), never how many, which, or at
      which site.
    - **Identifiers are refused.** A site refuses a column with at least ``k``
      distinct values where more than half of its rows with a value hold distinct
      values (patient ids, dates, measurements: as many levels as rows, or nearly),
      and a column with more than 50 distinct values.

    When no level can be released at all (every level rare, or no values),
    :class:`~healthlab.errors.DisclosureRefused` is raised.

    Examples
    --------
    >>> levels({"a": frame_a, "b": frame_b}, "sex")  # doctest: +SKIP
    Levels(['F', 'M'])
    """
    site_list = as_sites(sites)
    need = max([2, *(s.policy.min_sites for s in site_list)])
    if len(site_list) < need:
        raise TooFewSites(
            f"levels are released only across at least {need} sites (one site's "
            "levels are that site's own)"
        )
    gated = [s for s in site_list if s.gated]
    if gated and len(gated) != len(site_list):
        raise InvalidInput(
            "levels pool either sites that check grants on chain or ungated "
            "teaching sites, not both"
        )
    members = sorted(s.participant for s in site_list)
    if min_rows > min(s.policy.min_rows for s in site_list):
        # a threshold of the researcher's choosing would make "released or not"
        # a count oracle on one site's rows of a level
        raise InvalidInput(
            "levels follow the sites' own minimum of rows; a stricter threshold of "
            "yours applies to pooled counts: pass min_rows= to describe, histogram "
            "or crosstab instead"
        )
    # the members are signed: a deployed site answers only for them, and takes
    # part in the vetoes only on the union of their (tagged) offers
    query = Query("levels", {"column": column, "members": members}, 0)
    from healthlab.encrypted.protocol import sign_query

    if site_list[0].remote is None:
        for site in gated:  # distinct owners other than the researcher, as a query
            site.check_owners(members, researcher, need)
    signed = sign_query(site_list, query, researcher)
    held = offer_levels(site_list, query, signed, column, members, need)
    offered = frozenset().union(*(h.common for h in held))
    vetoed = frozenset().union(*each(held, "vetoes", [(offered,)] * len(held)))
    released = sorted(offered - vetoed)
    withheld = any(h.withholds for h in held)
    if not released:
        raise DisclosureRefused(
            f"no level of {column!r} can be released: none is held by at least the "
            "minimum rows at every site that holds it (or the column holds no "
            "values); merge rare levels into wider ones at the sites"
        )
    return Levels(released, withheld=withheld)


def offer_levels(
    sites: list[Site],
    query: Query,
    signed: SignedQuery | None,
    column: str,
    members: Sequence[str],
    need: int,
) -> list[SiteLevels]:
    """At every site: authorize the signed ``levels`` query, then its levels of
    ``column`` split at its minimum rows (deployed sites: one message each, where
    each also checks that the ``members`` have enough distinct owners)."""
    if sites[0].remote is not None:
        return sites[0].remote.levels(sites, query, signed, column, members, need)  # type: ignore[no-any-return]
    held = []
    for site in sites:
        site.authorize(signed, query_hash=query.hash)
        held.append(SiteLevels(site, column, site.policy.min_rows))
    return held


def grouping_levels(sites: list[Site], column: str, researcher: str | None) -> Levels:
    """Levels of a column that groups (``by=``) or tabulates (``crosstab``) rows.

    A withheld level refuses the query: its rows would be in no group or cell, and
    all rows minus the released groups would summarize them.
    """
    found = levels(sites, column, researcher=researcher)
    if found.withheld:
        raise DisclosureRefused(
            f"{column!r} has a level held by fewer than the minimum rows at a site "
            "that holds it; it is withheld, so the column cannot group or tabulate "
            "rows (the rows of that level could be found by difference). Merge rare "
            "levels into wider ones at the sites"
        )
    return found


def describe(
    sites: SitesLike,
    columns: Sequence[str],
    *,
    by: str | Sequence[str] | None = None,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = False,
    min_sites: int = 2,
    min_rows: int = 0,
    on_refusal: str = "raise",
    population: Sequence[str] | None = None,
    bounds: float | Mapping[str, float | tuple[float, float]] | None = None,
    percentiles: Sequence[float] | None = None,
    ranges: tuple[float, float] | Mapping[str, tuple[float, float]] | None = None,
    resolution: float | Mapping[str, float] | None = None,
) -> ResultTable:
    """``count``, ``mean``, ``std``, ``var``, ``sum`` and ``sem`` pooled across sites.

    ``percentiles`` (e.g. ``[0.25, 0.5, 0.75]``) adds, per column, the interval
    that holds each pooled percentile, found by :func:`quantiles` at
    ``resolution`` within ``ranges`` (both a value for every column or a mapping
    per column; the range must hold every row): rows ``"25% lower"`` and ``"25%
    upper"``, the bracket ``[lower, upper)`` — of width ``resolution``, wider
    where a site's rules stopped the bisection (``.percentiles`` has each
    column's brackets, whether each reached the resolution, and their receipts).
    With ``by``, per released group, by the same bisection on the group's pooled
    counts (``.percentiles`` keyed by the result's columns, ``(group, column)``);
    a group's column whose steps cannot be released (too few sites hold its rows
    on one side of a step, or the auditor refuses every step) is ``NaN`` and
    named in ``.suppressed`` as ``(group, column)`` — never a bracket of other
    rows; a bracket some steps narrowed but not to the resolution is shown, with
    ``at_resolution`` False in ``.percentiles``.

    ``by`` is a column, or a list of columns (each group is one level of each:
    columns ``(level_a, level_b, column)``).

    Shaped like ``pandas.DataFrame.describe()`` (statistics as rows, columns as
    columns); with ``by``, columns become ``(group, column)``, and a group held by
    fewer sites than a pooled result needs (``min_sites`` or any site's policy) is
    left out and named in ``.suppressed``. The groups are the levels
    :func:`levels` releases; a level of ``by`` held by fewer than a site's minimum
    rows there is withheld, and then the query is refused (its rows would be
    summarized by difference), without naming the site. Minimum, maximum and
    quantiles are single rows' values and are not released. With ``dropna=True``
    rows with a missing value are dropped at the sites and counted in ``.missing``
    (and, without ``by``, a ``missing`` row).

    ``population`` declares the study's analysis population: the complete cases of
    these columns at every site (every statistic takes it). Queries over the same
    population summarize the same rows — and groups, bins and cells of them — so a
    whole Table 1, its regression and its figures are answered without the
    auditor's differencing refusals that "age over all rows, then age on the
    complete cases of bmi" meets. Rows outside it are counted in ``missing``.

    Examples
    --------
    >>> table = describe({"a": frame_a, "b": frame_b}, ["age", "bmi"])
    >>> table.loc["mean", "age"]  # doctest: +SKIP
    54.2
    >>> table.receipt["sites"][0]["name"]  # doctest: +SKIP
    'a'
    """
    site_list = as_sites(sites)
    cols = _columns(columns)
    options = QueryOptions.of(
        keys, researcher, min_sites, min_rows, dropna, on_refusal, population, bounds
    )
    asked = percentile_args(cols, percentiles, ranges, resolution)
    if not isinstance(by, str) and by is not None:
        named = _by_columns(by)
        if not named or len(set(named)) != len(named) or set(named) & set(cols):
            raise InvalidInput(
                "by= names one column, or several distinct ones, none of them "
                "among the columns described"
            )
        by = named[0] if len(named) == 1 else named
    if isinstance(by, str):
        groups: list[Any] = list(grouping_levels(site_list, by, researcher))
    elif by:
        groups = [
            tuple(g)
            for g in itertools.product(
                *(list(grouping_levels(site_list, b, researcher)) for b in by)
            )
        ]
    else:
        groups = []
    runs, center, stats = _second_moments(
        site_list, cols, by=by, groups=groups, cross=False, options=options
    )
    frames: dict[str | None, pd.DataFrame] = {}
    suppressed = [e["group"] for e in stats if e.get("suppressed")]
    for entry in stats:
        if entry.get("suppressed"):
            continue
        label = entry["group"]
        n = entry["n"]
        mean = center + entry["s1"] / n if n else np.full(len(cols), np.nan)
        ss = (
            entry["s2"] - np.square(entry["s1"]) / n
            if n
            else np.full(len(cols), np.nan)
        )
        var = ss / (n - 1) if n > 1 else np.full(len(cols), np.nan)
        # a constant column's sum of squares may round to -1e-30, and under a DP
        # budget noise can push it below 0: a variance is never negative
        var = np.where(np.isnan(var), var, np.maximum(var, 0.0))
        table = pd.DataFrame(
            {
                "count": float(n),
                "mean": mean,
                "std": np.sqrt(var),
                "var": var,
                "sum": mean * n,
                "sem": np.sqrt(var / n) if n else np.nan,
            },
            index=cols,
        ).T
        frames[label] = table
    result = frames[None] if by is None else pd.concat(frames, axis=1)
    left_out: int | None = 0
    if dropna or options.population:
        dropped = stats[0]["dropped"]
        if by is None:
            result.loc["missing"] = dropped
        # with by=, rows dropped (their group may be the missing value) are not
        # per group: only .missing counts them
        left_out = None if np.isnan(dropped) else round(dropped)
        if np.isnan(dropped):
            _log_missing_withheld("describe")
    if suppressed:
        _log.warning(
            "describe: %d group(s) of %r held by fewer sites than a pooled result "
            "needs are not shown: %s",
            len(suppressed),
            by,
            ", ".join(map(str, suppressed)),
        )
    found: dict[Any, ResultTable] | None = None
    if asked is not None:
        found, withheld = _describe_percentiles(
            site_list, result, cols, by, groups, suppressed, asked, options
        )
        suppressed = [*suppressed, *withheld]
    return release(
        result,
        runs,
        missing=left_out,
        suppressed=suppressed,
        percentiles=found,
        kind="describe",
        parameters={
            "columns": cols,
            "by": by,
            "dropna": dropna,
            "population": options.population,
            **(
                {}
                if asked is None
                else {
                    "percentiles": asked[0],
                    "ranges": {c: list(asked[1][c]) for c in cols},
                    "resolution": asked[2],
                }
            ),
        },
    )


def _describe_percentiles(
    site_list: list[Site],
    result: pd.DataFrame,
    cols: list[str],
    by: str | list[str] | None,
    groups: list[Any],
    suppressed: list[Any],
    asked: tuple[list[float], dict[str, tuple[float, float]], dict[str, float]],
    options: QueryOptions,
) -> tuple[dict[Any, ResultTable], list[Any]]:
    """``describe``'s percentile rows (``"25% lower"``, ``"25% upper"``, ...) added
    to ``result`` in place, by :func:`quantiles` per column — and with ``by``,
    per released group (each step counts the group's rows only). A group's
    column whose step count is withheld (too few sites hold its rows on one side
    of a step) gets ``NaN`` and is returned, keyed as the result's column
    ``(group, column)``, to be named in ``.suppressed``."""
    from healthlab.encrypted.inference import quantiles

    probabilities, spans, steps = asked
    named = _by_columns(by)
    cells: list[tuple[Any, Any]] = (
        [(None, c) for c in cols]
        if by is None
        else [(g, c) for g in groups if g not in suppressed for c in cols]
    )
    found: dict[Any, ResultTable] = {}
    withheld: list[Any] = []
    for group, column in cells:
        within = None
        key: Any = column
        if by is not None:
            levels_of = [group] if isinstance(by, str) else list(group)
            within = dict(zip(named, levels_of, strict=True))
            key = (*levels_of, column)  # the result's column
        try:
            answer = quantiles(
                site_list,
                column,
                probabilities,
                range=spans[column],
                resolution=steps[column],
                researcher=options.researcher,
                keys=options.keys,
                dropna=True,
                population=options.population or None,
                within=within,
            )
        except TooFewSites:
            if by is None:
                raise
            answer = None
        # with by=, a bracket that is the whole range says nothing of the group:
        # no step could be answered, so it is withheld and named, like a refusal
        if by is not None and (
            answer is None
            or (
                (answer["lower"] == spans[column][0])
                & (answer["upper"] == spans[column][1])
            ).any()
        ):
            withheld.append(key)
            _log.warning(
                "describe: the percentiles of %r in group %s are withheld (the "
                "sites' rules answer no bisection step of the group's rows)",
                column,
                group,
            )
            continue
        assert answer is not None
        found[key] = answer
    where = list(result.columns)
    for p in probabilities:
        label = f"{100 * p:g}%"
        for side in ("lower", "upper"):
            result.loc[f"{label} {side}"] = [
                float(found[k][side].loc[p]) if k in found else np.nan for k in where
            ]
    return found, withheld


def percentile_args(
    columns: list[str],
    percentiles: Sequence[float] | None,
    ranges: tuple[float, float] | Mapping[str, tuple[float, float]] | None,
    resolution: float | Mapping[str, float] | None,
) -> tuple[list[float], dict[str, tuple[float, float]], dict[str, float]] | None:
    """``describe``'s percentile arguments, per column, or None without them."""
    if percentiles is None:
        if ranges is not None or resolution is not None:
            raise InvalidInput(
                "ranges= and resolution= go with percentiles=[...]; give the "
                "percentiles too, or neither"
            )
        return None
    if ranges is None or resolution is None:
        raise InvalidInput(
            "percentiles= needs ranges= (low, high) holding every row, and "
            "resolution= (a step on the sites' grid): the minimum and maximum are "
            "single rows' values and are not released"
        )

    def per_column(given: Any, what: str) -> dict[str, Any]:
        if isinstance(given, Mapping):
            absent = [c for c in columns if c not in given]
            if absent:
                raise InvalidInput(
                    f"{what}= names no value for {', '.join(map(repr, absent))}"
                )
            return {c: given[c] for c in columns}
        return dict.fromkeys(columns, given)

    spans = per_column(ranges, "ranges")
    steps = per_column(resolution, "resolution")
    for column, span in spans.items():
        if not (isinstance(span, Sequence) and len(span) == 2):
            raise InvalidInput(
                f"ranges= for {column!r} is one (low, high) pair of numbers"
            )
    probabilities = [float(p) for p in percentiles]
    return (
        probabilities,
        {c: (float(a), float(b)) for c, (a, b) in spans.items()},
        {c: float(v) for c, v in steps.items()},
    )


def histogram(
    sites: SitesLike,
    column: str,
    bins: Sequence[float] | int,
    *,
    range: tuple[float, float] | None = None,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = False,
    min_sites: int = 2,
    min_rows: int = 0,
    on_refusal: str = "raise",
    population: Sequence[str] | None = None,
    bounds: float | Mapping[str, float | tuple[float, float]] | None = None,
    within: Mapping[str, Any] | None = None,
) -> ResultTable:
    """Exact pooled counts per bin, like ``numpy.histogram`` (last bin closed).

    ``within`` (``{"sex": "F"}``) counts only the rows of one group: one level of
    each named column, compared as text (the columns must be categories; the
    sites' cell rule and holder count apply to the group's bins as to any).

    ``bins`` are edges, or a number of equal bins over ``range`` (required then: the
    data's minimum and maximum are single rows' values and are not asked for).
    Values outside the edges are in no bin: ``.outside`` counts them. Edges must
    lie on each site's grid (:class:`~healthlab.DisclosurePolicy`: by default at
    most 2 significant digits, so 18, 0.25 or 120, not 18.5; the owner may
    declare another per column), which
    no bisection of an edge can then refine. A site refuses when any of its non-
    empty bins holds fewer than its policy's minimum of rows; ``min_rows`` is your
    own threshold on the pooled counts (a bin of fewer pooled rows is withheld, like
    a suppressed one, and never reaches the sites). A bin held by fewer sites than
    the pooling minimum (it would be one site's count) is sent as zeros by every
    site and shown as ``<NA>``, named in ``.suppressed`` as ``(left, right)``; a bin
    no site holds is 0. ``.missing``: rows left out (``dropna``, ``population``).

    Examples
    --------
    >>> histogram(sites, "age", [20, 40, 60, 80], researcher=me)  # doctest: +SKIP
       left  right  count
    0  20.0   40.0   1021
    1  40.0   60.0   2377
    2  60.0   80.0   1644
    """
    site_list = as_sites(sites)
    if isinstance(bins, int):
        if range is None:
            raise InvalidInput(
                "give bin edges, or a number of bins with range=(low, high): the "
                "minimum and maximum are not released"
            )
        # 12 digits: 0.1 + 0.2 is written 0.3 (the sites take the number, exactly)
        edges = np.asarray(
            [float(f"{e:.12g}") for e in np.linspace(range[0], range[1], bins + 1)]
        )
    else:
        edges = np.asarray(bins, dtype=np.float64)
    if edges.size < 2 or not np.all(np.diff(edges) > 0) or not np.isfinite(edges).all():
        raise InvalidInput("bin edges must be finite and strictly increasing")
    if bounds is not None:  # not silently ignored
        raise InvalidInput(
            "bounds= apply to moments (describe, cov, corr, ols); a count's "
            "sensitivity is one row per cell, so counts take none"
        )
    options = QueryOptions.of(
        keys, researcher, min_sites, min_rows, dropna, on_refusal, population, bounds
    )
    spec: dict[str, Any] = {
        "columns": [column],
        "edges": edges.tolist(),
        "dropna": dropna,
        "population": options.population,
    }
    if within:
        if column in within:
            raise InvalidInput(f"within= restricts rows by {column!r} itself")
        spec["within"] = [[str(c), str(v)] for c, v in within.items()]
    run = _run(site_list, "counts", spec, edges.size + 1, **options.run_args())
    cells = _cell_counts(run)
    result = pd.DataFrame({"left": edges[:-1], "right": edges[1:], "count": cells[:-1]})
    withheld = [
        (float(edges[i]), float(edges[i + 1]))
        for i in run.suppressed
        if i < len(edges) - 1  # the rows outside the edges are no bin
    ]
    if withheld:
        _log.warning(
            "histogram: %d bin(s) of %r held by fewer sites than a pooled result "
            "needs, or below your min_rows, are not shown (count <NA>): %s",
            len(withheld),
            column,
            ", ".join(f"[{a:g}, {b:g})" for a, b in withheld),
        )
    return release(
        result,
        [run],
        # rows outside the edges (numpy drops them): their count, or None (withheld)
        outside=None if pd.isna(cells[-1]) else int(cells[-1]),
        missing=_missing(run, "histogram"),
        suppressed=withheld,
        kind="histogram",
        parameters={
            "column": column,
            "edges": edges.tolist(),
            "population": options.population,
            **({"within": spec["within"]} if within else {}),
        },
    )


def crosstab(
    sites: SitesLike,
    row: str,
    col: str,
    *,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = False,
    min_sites: int = 2,
    min_rows: int = 0,
    on_refusal: str = "raise",
    population: Sequence[str] | None = None,
    bounds: float | Mapping[str, float | tuple[float, float]] | None = None,
) -> ResultTable:
    """Exact pooled counts of ``row`` × ``col`` levels, like ``pandas.crosstab``.

    Levels are compared as text, and are those :func:`levels` releases: a column
    with a withheld (rare) level, or one that looks like an identifier, is refused.
    A site refuses when any non-empty cell of its own table holds fewer than its
    policy's minimum of rows (``min_rows``: your own threshold on the pooled
    cells, applied here). A cell held by fewer sites than the pooling minimum is sent
    as zeros by every site and shown as ``<NA>``, named in
    ``.suppressed`` as (row level, column level). ``.missing``: rows left out.

    Examples
    --------
    >>> crosstab(sites, "sex", "smoker", researcher=me)  # doctest: +SKIP
    smoker     0    1
    sex
    F       1702  541
    M       1488  919
    """
    site_list = as_sites(sites)
    if bounds is not None:  # not silently ignored
        raise InvalidInput(
            "bounds= apply to moments (describe, cov, corr, ols); a count's "
            "sensitivity is one row per cell, so counts take none"
        )
    if row == col:  # pandas.crosstab(s, s): the one-way counts on the diagonal
        one_way = counts(
            site_list,
            row,
            researcher=researcher,
            keys=keys,
            dropna=dropna,
            min_sites=min_sites,
            min_rows=min_rows,
            on_refusal=on_refusal,
            population=population,
        )
        names = list(one_way.index)
        diagonal = pd.DataFrame(
            {
                level: pd.array(
                    [one_way["count"].iloc[i] if a == level else 0 for a in names],
                    dtype="Int64",
                )
                for i, level in enumerate(names)
            },
            index=pd.Index(names, name=row),
        )
        diagonal.columns = pd.Index(names, name=col)
        # the one-way receipt covers the counts the sites released; the diagonal
        # is their arrangement, so it gets a receipt over itself
        return ResultTable.released(
            diagonal,
            combined_receipt(
                diagonal,
                [one_way.receipt],
                site_list,
                kind="crosstab",
                parameters={
                    "row": row,
                    "col": col,
                    "population": list(population or ()),
                },
            ),
            missing=one_way.missing,
            suppressed=[(a, a) for a in one_way.suppressed],
            noise=one_way.noise,
            receipts=[one_way.receipt],
        )
    row_levels = list(grouping_levels(site_list, row, researcher))
    col_levels = list(grouping_levels(site_list, col, researcher))
    options = QueryOptions.of(
        keys, researcher, min_sites, min_rows, dropna, on_refusal, population, bounds
    )
    spec = {
        "columns": [row, col],
        "levels": [row_levels, col_levels],
        "dropna": dropna,
        "population": options.population,
    }
    n = len(row_levels) * len(col_levels)
    run = _run(site_list, "counts", spec, 1 + n, **options.run_args())
    cells = _cell_counts(run)
    width = len(col_levels)
    result = pd.DataFrame(
        {level: cells[j::width] for j, level in enumerate(col_levels)},
        index=pd.Index(row_levels, name=row),
    )
    result.columns = pd.Index(col_levels, name=col)
    where = [divmod(i, len(col_levels)) for i in run.suppressed]
    named = [(row_levels[a], col_levels[b]) for a, b in where]
    if named:
        _log.warning(
            "crosstab: %d cell(s) held by fewer sites than a pooled result needs, "
            "or below your min_rows, are not shown (<NA>): %s",
            len(named),
            ", ".join(f"{a} × {b}" for a, b in named),
        )
    return release(
        result,
        [run],
        missing=_missing(run, "crosstab"),
        suppressed=named,
        kind="crosstab",
        parameters={"row": row, "col": col, "population": options.population},
    )


def counts(
    sites: SitesLike,
    column: str,
    *,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = False,
    min_sites: int = 2,
    min_rows: int = 0,
    on_refusal: str = "raise",
    population: Sequence[str] | None = None,
) -> ResultTable:
    """Exact pooled one-way counts of a category's levels, like
    ``Series.value_counts()`` in the order of :func:`levels`.

    The same rules as :func:`crosstab`'s cells: levels are the released ones, a
    site refuses when a non-empty level holds fewer than its minimum of rows, and
    a level fewer sites hold than the pooling minimum is shown ``<NA>`` and named
    in ``.suppressed``. ``.missing``: rows without a value
    (None when too few sites leave rows out: it would be one site's count).

    Examples
    --------
    >>> counts(sites, "smoker", researcher=me)  # doctest: +SKIP
            count
    smoker
    no       3190
    yes      1460
    """
    site_list = as_sites(sites)
    names = list(grouping_levels(site_list, column, researcher))
    options = QueryOptions.of(
        keys, researcher, min_sites, min_rows, dropna, on_refusal, population
    )
    spec = {
        "columns": [column],
        "levels": [names],
        "dropna": dropna,
        "population": options.population,
    }
    run = _run(site_list, "counts", spec, 1 + len(names), **options.run_args())
    result = pd.DataFrame(
        {"count": _cell_counts(run)}, index=pd.Index(names, name=column)
    )
    return release(
        result,
        [run],
        missing=_missing(run, "counts"),
        suppressed=[names[i] for i in run.suppressed],
        kind="counts",
        parameters={"column": column, "population": options.population},
    )


def missing(
    sites: SitesLike,
    columns: Sequence[str],
    *,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    min_sites: int = 2,
    on_refusal: str = "raise",
    population: Sequence[str] | None = None,
) -> ResultTable:
    """Pooled per-column counts of rows without a value (NaN or infinite), of the
    rows in ``population`` (every row by default), like ``frame.isna().sum()``.

    Each column's missing rows are a cell under the sites' rules: 1 or 2 at a site
    is refused, a count only one site has is withheld (``<NA>``, named in
    ``.suppressed``). ``.missing``: the rows outside ``population`` (None withheld).
    """
    site_list = as_sites(sites)
    cols = _columns(columns)
    options = QueryOptions.of(
        keys, researcher, min_sites, 0, False, on_refusal, population
    )
    spec = {"columns": cols, "population": options.population, "missing": True}
    run = _run(site_list, "counts", spec, 2 + len(cols), **options.run_args())
    # block i is column i's count (totals[2 + i]); a suppressed one is <NA>
    values = np.maximum(np.rint(run.totals[2:]), 0).astype(np.int64)
    withheld = np.isin(np.arange(len(cols)), list(run.suppressed))
    values[withheld] = 0
    result = pd.DataFrame(
        {"missing": pd.arrays.IntegerArray(values, withheld), "of": int(run.totals[1])},
        index=pd.Index(cols),
    )
    return release(
        result,
        [run],
        missing=_missing(run, "missing"),
        suppressed=[cols[i] for i in run.suppressed],
        kind="missing",
        parameters={"columns": cols, "population": options.population},
    )


def _missing(run: StudyRun, kind: str) -> int | None:
    """The released count of rows a query left out, or None when it was withheld
    (too few sites leave rows out: it would be one site's count)."""
    if run.missing_withheld:
        _log_missing_withheld(kind)
        return None
    return int(run.totals[0])


def _log_missing_withheld(kind: str) -> None:
    _log.warning(
        "%s: the count of rows left out (missing) is withheld: too few sites leave "
        "rows out, so it would be one site's count",
        kind,
    )


def _cell_counts(run: StudyRun) -> pd.arrays.IntegerArray:
    """A count run's cells as integers, <NA> where the cell was suppressed (too few
    sites hold rows in it: every site sent zeros). Under a DP budget counts carry
    noise: rounded and kept >= 0 (post-processing)."""
    counts = np.maximum(np.rint(run.totals[1:]), 0).astype(np.int64)
    hidden = np.zeros(counts.size, dtype=bool)
    hidden[[i for i in run.suppressed if i < counts.size]] = True
    counts[hidden] = 0  # nothing kept under the mask (a min_rows cell's count)
    return pd.arrays.IntegerArray(counts, hidden)


def cov(
    sites: SitesLike,
    columns: Sequence[str],
    *,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = False,
    min_sites: int = 2,
    min_rows: int = 0,
    on_refusal: str = "raise",
    population: Sequence[str] | None = None,
    bounds: float | Mapping[str, float | tuple[float, float]] | None = None,
) -> ResultTable:
    """Pooled sample covariance matrix (complete cases), like ``DataFrame.cov()``.

    Examples
    --------
    >>> cov(sites, ["age", "sbp"], researcher=me).loc["age", "sbp"]  # doctest: +SKIP
    61.3
    """
    options = QueryOptions.of(
        keys, researcher, min_sites, min_rows, dropna, on_refusal, population, bounds
    )
    return _matrix(sites, columns, "cov", options)


def corr(
    sites: SitesLike,
    columns: Sequence[str],
    *,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = False,
    min_sites: int = 2,
    min_rows: int = 0,
    on_refusal: str = "raise",
    population: Sequence[str] | None = None,
    bounds: float | Mapping[str, float | tuple[float, float]] | None = None,
) -> ResultTable:
    """Pooled Pearson correlation matrix (complete cases), like ``DataFrame.corr()``.

    Examples
    --------
    >>> corr(sites, ["age", "sbp", "bmi"], researcher=me).round(2)  # doctest: +SKIP
          age   sbp   bmi
    age  1.00  0.31  0.08
    sbp  0.31  1.00  0.22
    bmi  0.08  0.22  1.00
    """
    options = QueryOptions.of(
        keys, researcher, min_sites, min_rows, dropna, on_refusal, population, bounds
    )
    return _matrix(sites, columns, "corr", options)


def _matrix(
    sites: SitesLike, columns: Sequence[str], kind: str, options: QueryOptions
) -> ResultTable:
    site_list = as_sites(sites)
    cols = _columns(columns)
    runs, _, stats = _second_moments(
        site_list, cols, by=None, groups=[], cross=True, options=options
    )
    entry = stats[0]
    n, s1, m2 = entry["n"], entry["s1"], entry["m2"]
    scatter = m2 - np.outer(s1, s1) / n
    matrix = scatter / (n - 1)
    if kind == "corr":
        scale = np.sqrt(np.diag(scatter))
        with np.errstate(divide="ignore", invalid="ignore"):  # constant column: NaN
            matrix = scatter / np.outer(scale, scale)
        np.fill_diagonal(matrix, np.where(scale > 0, 1.0, np.nan))
    result = pd.DataFrame(matrix, index=cols, columns=cols)
    dropped = entry["dropped"]
    return release(
        result,
        runs,
        missing=None if np.isnan(dropped) else round(dropped),
        kind=kind,
        parameters={
            "columns": cols,
            "dropna": options.dropna,
            "population": options.population,
        },
    )


def ols(
    sites: SitesLike,
    y: str,
    X: Sequence[str],  # noqa: N803 - the usual name of a design matrix
    *,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    dropna: bool = False,
    min_sites: int = 2,
    min_rows: int = 0,
    on_refusal: str = "raise",
    population: Sequence[str] | None = None,
    bounds: float | Mapping[str, float | tuple[float, float]] | None = None,
) -> OLSResults:
    """Ordinary least squares of ``y`` on ``X`` with an intercept, pooled across sites.

    Returns an :class:`~healthlab.encrypted.results.OLSResults` in statsmodels'
    shape: ``params``, ``bse``, ``pvalues`` (t), ``conf_int()``, ``cov_params()``,
    ``rsquared``, ``rsquared_adj``, ``fvalue``, ``f_pvalue``, ``summary()``;
    ``to_frame()`` is the table the receipt covers — one row per coefficient
    (``Intercept`` first) with ``coef``, ``se``, ``t``, ``P>|t|`` and the 95 %
    interval, a plain frame (``fit.table`` is the same with its ``receipt``;
    ``nobs``, ``df_resid`` and ``ssr`` are the fit's). Each site refuses a model
    with more than ``max_param_ratio`` (0.33) parameters per row of its own.

    Examples
    --------
    >>> fit = ols(sites, "sbp", ["age", "bmi"], researcher=me)  # doctest: +SKIP
    >>> fit.params, fit.rsquared, fit.to_frame()  # doctest: +SKIP
    """
    site_list = as_sites(sites)
    xs = _columns(X)
    if y in xs:
        raise InvalidInput(f"{y!r} is both the response and a covariate")
    cols = [*xs, y]
    options = QueryOptions.of(
        keys, researcher, min_sites, min_rows, dropna, on_refusal, population, bounds
    )
    runs, center, stats = _second_moments(
        site_list,
        cols,
        by=None,
        groups=[],
        cross=True,
        options=options,
        model_params=len(xs) + 1,
    )
    entry = stats[0]
    n, s1, m2 = entry["n"], entry["s1"], entry["m2"]
    scatter = m2 - np.outer(s1, s1) / n
    p = len(xs)
    sxx, sxy, syy = scatter[:p, :p], scatter[:p, p], scatter[p, p]
    # around the means: a constant covariate is aliased with the intercept
    check_aliasing(sxx, xs, with_intercept=True)
    beta = np.linalg.solve(sxx, sxy)
    inverse = np.linalg.inv(sxx)
    means = center + s1 / n
    intercept = means[p] - means[:p] @ beta
    rss = float(syy - sxy @ beta)
    if not rss > 1e-12 * float(syy):
        raise AliasedDesign(
            f"{y!r} is (nearly) an exact linear combination of the covariates (a "
            "perfect fit, with no residual to estimate standard errors from); is "
            "the outcome, or a function of it, among the covariates?"
        )
    dof = n - p - 1
    sigma2 = rss / dof
    se_beta = np.sqrt(np.diag(inverse) * sigma2)
    se_intercept = float(np.sqrt(sigma2 * (1.0 / n + means[:p] @ inverse @ means[:p])))
    coef = np.concatenate([[intercept], beta])
    se = np.concatenate([[se_intercept], se_beta])
    t = coef / se
    half = float(distributions.t.ppf(0.975, dof)) * se
    result = pd.DataFrame(
        {
            "coef": coef,
            "se": se,
            "t": t,
            "P>|t|": 2 * distributions.t.sf(np.abs(t), dof),
            "[0.025": coef - half,
            "0.975]": coef + half,
        },
        index=["Intercept", *xs],
    )
    # the covariance of (intercept, β): β's is σ² S⁻¹ around the means
    shift = inverse @ means[:p]
    cov = np.empty((p + 1, p + 1))
    cov[0, 0] = se_intercept**2
    cov[0, 1:] = cov[1:, 0] = -sigma2 * shift
    cov[1:, 1:] = sigma2 * inverse
    dropped = entry["dropped"]
    table = release(
        result,
        runs,
        missing=None if np.isnan(dropped) else round(dropped),
        kind="ols",
        parameters={
            "y": y,
            "X": xs,
            "dropna": dropna,
            "population": options.population,
        },
    )
    return OLSResults(
        params=pd.Series(coef, index=result.index),
        cov=cov,
        response=y,
        nobs=round(n),
        ssr=rss,
        centered_tss=float(syy),
        table=table,
        receipt=table.receipt,
    )


class AliasedDesign(InvalidInput):
    """A design column is (nearly) a combination of others: it cannot be estimated."""


#: Smallest eigenvalue of a design's correlation-scaled information matrix that
#: still counts as full rank (its reciprocal bounds the variance inflation).
ALIASING_THRESHOLD = 1e-10


def check_aliasing(
    matrix: np.ndarray, names: Sequence[str], *, with_intercept: bool = False
) -> None:
    """Refuse a design whose (pooled) information or scatter matrix is singular or
    nearly so, naming the term that is a combination of the ones before it —
    never arbitrary coefficients with NaN standard errors.

    ``with_intercept``: ``matrix`` is a scatter matrix around the means, so a term
    with no spread is constant, i.e. aliased with the intercept.
    """
    diagonal = np.diag(matrix)
    scale = np.sqrt(np.clip(diagonal, 0, None))
    base = ["Intercept"] if with_intercept else []
    flat = [names[j] for j in range(len(names)) if not scale[j] > 0]
    if flat:
        what = "constant in the pooled rows" if with_intercept else "zero in every row"
        raise AliasedDesign(
            f"the term(s) {flat} are {what}: aliased with {base or 'nothing'}; drop "
            "them"
        )
    scaled = matrix / np.outer(scale, scale)
    kept: list[int] = []
    for j in range(len(names)):
        trial = [*kept, j]
        if np.linalg.eigvalsh(scaled[np.ix_(trial, trial)]).min() <= ALIASING_THRESHOLD:
            others = base + [str(names[k]) for k in kept]
            raise AliasedDesign(
                f"the design is aliased: {names[j]!r} is (nearly) a linear "
                f"combination of {others}; drop it or one of them"
            )
        kept.append(j)


def receipt_for(
    result: pd.DataFrame,
    runs: list[StudyRun],
    *,
    kind: str,
    parameters: dict[str, Any],
    encryption: dict[str, Any] | None = None,
) -> Receipt:
    """The receipt of ``runs`` over ``result`` (the table its hash covers).

    Raises :class:`~healthlab.errors.TooManyDropouts` when sites dropped out
    between the queries the result is built from: its totals would pool different
    sites (a silent mix), so it is refused; ask again."""
    _same_sites([[s.name for s in r.sites] for r in runs], any(r.dropped for r in runs))
    last = runs[-1]
    return build_receipt(
        kind=kind,
        result=result,
        queries=[r.query.as_dict() for r in runs],
        parameters=parameters,
        sites=last.sites,
        researcher=last.signed.researcher if last.signed else None,
        refused={k: v for r in runs for k, v in r.refused.items()},
        extra={
            "encryption": {
                "mode": "site totals",
                **runs[0].public_params,
                "upload_bytes": _uploads(runs),
                **(encryption or {}),
            },
            # sites that went offline: their rows are in no total of this result
            **(
                {"dropped": sorted({d for r in runs for d in r.dropped})}
                if any(r.dropped for r in runs)
                else {}
            ),
        },
    )


def _same_sites(taking_part: Sequence[Sequence[str]], dropped: bool) -> None:
    """A result built from several queries pools the same sites in each: after a
    dropout that changed them, it is refused rather than mixed."""
    if dropped and len({tuple(sorted(names)) for names in taking_part}) > 1:
        raise TooManyDropouts(
            "sites dropped out between the queries this result is built from, so "
            "its totals would pool different sites; ask again"
        )


def combined_receipt(
    result: pd.DataFrame,
    parts: Sequence[Receipt],
    sites: Sequence[Site],
    *,
    kind: str,
    parameters: dict[str, Any],
) -> Receipt:
    """One receipt over ``result``, computed from released results whose receipts
    are ``parts``: their queries, sites (of ``sites``) and refusals, and each
    part's hash (``parts``)."""
    _same_sites(
        [[r["name"] for r in part["sites"]] for part in parts],
        any(part.get("dropped") for part in parts),
    )
    names = {r["name"] for part in parts for r in part["sites"]}
    return build_receipt(
        kind=kind,
        result=result,
        queries=[q for part in parts for q in part["queries"]],
        parameters=parameters,
        sites=[s for s in sites if s.name in names],
        researcher=parts[-1]["researcher"],
        refused={k: v for part in parts for k, v in part["refused"].items()},
        extra={
            "encryption": parts[-1]["encryption"],
            "parts": [part["receipt_hash"] for part in parts],
        },
    )


def noise_of(runs: list[StudyRun]) -> dict[str, Any] | None:
    """The pooled noise the sites added under DP budgets (None without any)."""
    noisy = [r.noise_sd for r in runs if r.noise_sd]
    if not noisy:
        return None
    # the pooled noise of every total: the sites' own, independent draws
    return {
        "sd_per_total": [
            np.sqrt(np.sum(np.square(list(n.values())), axis=0)).tolist() for n in noisy
        ],
        "sites": noisy,
        "note": "Gaussian noise the sites added under their privacy budgets, "
        "per query and total (the queries' layouts are in the receipt)",
    }


def release(
    result: pd.DataFrame,
    runs: list[StudyRun],
    *,
    kind: str,
    parameters: dict[str, Any],
    encryption: dict[str, Any] | None = None,
    **metadata: Any,
) -> ResultTable:
    """``result`` as a :class:`~healthlab.encrypted.tables.ResultTable`: its
    receipt over ``runs``, their noise, and ``metadata`` (``missing``, ...)."""
    receipt = receipt_for(
        result, runs, kind=kind, parameters=parameters, encryption=encryption
    )
    return ResultTable.released(result, receipt, noise=noise_of(runs), **metadata)


def _uploads(runs: list[StudyRun]) -> dict[str, int]:
    """Bytes each site uploaded over every round of a result."""
    total: dict[str, int] = {}
    for run in runs:
        for site, size in run.upload_bytes.items():
            total[site] = total.get(site, 0) + size
    return total


def _columns(columns: Sequence[str] | str) -> list[str]:
    cols = [columns] if isinstance(columns, str) else list(columns)
    if not cols:
        raise InvalidInput("name at least one column")
    if len(set(cols)) != len(cols):
        raise InvalidInput(f"columns repeat: {cols}")
    return cols
