"""Survival across sites on a declared time grid: Kaplan–Meier and the log-rank test.

:func:`kaplan_meier` pools, per interval ``(t_{j-1}, t_j]`` of a public grid, the
exact counts of events and of censorings (and the rows followed beyond the grid)
from every site — a table of counts like a histogram's, through the same gates,
cell rule, holder count and auditor. From them: the number at risk at each grid
time, the Kaplan–Meier estimate with Greenwood's variance and lifelines'
exponential (log(−log)) confidence interval, and, with ``by=``, the log-rank test.
They equal lifelines on the pooled rows with durations rounded up to the grid
(``ceil_to_grid``): the grid is the resolution of the released curve, as a
histogram's bins are.

A cell (an interval's events or censorings, in a group) held by 1 or 2 rows at a
site is refused by that site (the cell rule), and a cell only one site holds would
be that site's count: every site refuses the query. By default the intervals are
merged first so that neither happens: one query of 0/1 flags (:func:`_merge_plan`,
summed like any totals) says which grid times some site's cell rule needs removed
and how many sites hold rows in each run of intervals' cells; the curve is then
asked on the merged grid (:func:`merged_grid`), under every rule as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as distributions

from healthlab.encrypted.keys import KeyHolder
from healthlab.encrypted.protocol import Block, Query, Totals, computation
from healthlab.encrypted.stats import (
    SitesLike,
    _check_grouping,
    _full_masks,
    _left_out,
    _run,
    grouping_levels,
    population_columns,
    receipt_for,
)
from healthlab.errors import DataRefused, InvalidInput
from healthlab.site_data import numeric_column
from healthlab.sites import Site, as_sites

__all__ = ["SurvivalResult", "ceil_to_grid", "kaplan_meier", "merged_grid"]

_log = logging.getLogger(__name__)


def ceil_to_grid(durations: np.ndarray, grid: Sequence[float]) -> np.ndarray:
    """Each duration rounded up to the next grid time (beyond the grid: ``inf``)."""
    edges = np.asarray(grid, dtype=float)
    index = np.searchsorted(edges, np.asarray(durations, dtype=float), side="left")
    return np.where(
        index < edges.size, edges[np.minimum(index, edges.size - 1)], np.inf
    )


# ------------------------------------------------------------------ site side
@dataclass
class _Leaving:
    """A site's complete cases for a survival query, each row's grid interval
    (``index``: j for ``(g[j-1], g[j]]``, beyond the grid ``>= len(grid)``) and
    event flag, and the rows of each group."""

    kept: pd.DataFrame
    index: np.ndarray
    event: np.ndarray
    members: list[np.ndarray]
    dropped: int


def _leaving(site: Site, spec: Mapping[str, Any]) -> _Leaving:
    duration, event, by = spec["duration"], spec["event"], spec.get("by")
    reads = [duration, event, *([by] if by else [])]
    kept, _ = site.rows(reads, dropna=True, population=spec.get("population", ()))
    if by:
        _check_grouping(site, kept, by, site.policy.min_rows)
    t = numeric_column(site.name, kept[duration], duration)
    e = numeric_column(site.name, kept[event], event)
    if not np.all(t > 0):
        raise DataRefused(
            f"site {site.name}: the durations {duration!r} must be positive"
        )
    if not np.all(np.isin(e, (0.0, 1.0))):
        raise DataRefused(
            f"site {site.name}: the event indicator {event!r} must be 0 (censored) "
            "or 1 (event)"
        )
    grid = np.asarray(spec["grid"], dtype=float)
    site.policy.check_grid(site.name, duration, grid)
    labels = kept[by].astype(str).to_numpy() if by else None
    members = [
        np.ones(len(t), dtype=bool) if labels is None else labels == group
        for group in spec.get("groups") or [None]
    ]
    index = np.searchsorted(grid, t, side="left")  # interval j: (g[j-1], g[j]]
    return _Leaving(kept, index, e, members, site.n_rows - len(kept))


def _interval_masks(rows: _Leaving, intervals: int) -> list[list[np.ndarray]]:
    """Per group, per interval: the events' rows and the censorings' rows."""
    return [
        [
            mask
            for j in range(1, intervals + 1)
            for mask in (
                member & (rows.index == j) & (rows.event == 1),
                member & (rows.index == j) & (rows.event == 0),
            )
        ]
        for member in rows.members
    ]


@computation("survival")
def _cells(site: Site, query: Query) -> Totals:
    """Per group and interval: events, censorings; then the rows beyond the grid."""
    spec = query.spec
    rows = _leaving(site, spec)
    intervals = len(spec["grid"]) - 1
    beyond = rows.index > intervals
    masks: list[np.ndarray] = []
    for member, cells in zip(
        rows.members, _interval_masks(rows, intervals), strict=True
    ):
        masks += [*cells, member & beyond]
    totals = [float(rows.dropped)] + [float(m.sum()) for m in masks]
    full = _full_masks(site, rows.kept, masks)
    # a cell only one site holds would be its count: every site refuses then
    blocks = [
        Block(
            1 + i,
            2 + i,
            m,
            empty_released=True,
            required=True,
            name="a cell of the grid (an interval's events or censorings) is",
        )
        for i, m in enumerate(full)
    ]
    columns = {spec["duration"]: full, spec["event"]: full}
    return totals, columns | _left_out(site, rows.kept), blocks


def local_merges(cells: np.ndarray, minimum: int) -> np.ndarray:
    """The interior grid times a site needs removed so that each of its cells is
    empty or holds at least ``minimum`` rows: ``cells`` is (cells, intervals) of
    row counts; merging runs forward, and a short last run joins the one before.
    Returns a 0/1 flag per interior boundary (``intervals - 1``)."""
    intervals = cells.shape[1]

    def ok(c: np.ndarray) -> bool:
        return bool(np.all((c == 0) | (c >= minimum)))

    runs: list[list[int]] = []
    current: list[int] = []
    for j in range(intervals):
        current.append(j)
        if ok(cells[:, current].sum(axis=1)):
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    while len(runs) > 1 and not ok(cells[:, runs[-1]].sum(axis=1)):
        last = runs.pop()
        runs[-1] += last
    flags = np.ones(intervals - 1, dtype=int)
    for run in runs:  # a boundary kept only where a run ends
        if run[-1] < intervals - 1:
            flags[run[-1]] = 0
    return flags


def interval_runs(intervals: int) -> list[tuple[int, int]]:
    """Every run ``(first, last)`` of consecutive intervals, in a fixed order."""
    return [(a, b) for a in range(intervals) for b in range(a, intervals)]


#: Most totals a merge plan may take (runs × cells): beyond, give a coarser grid
MAX_PLAN = 20_000


@computation("survival_grid")
def _merge_plan(site: Site, query: Query) -> Totals:
    """For the requested grid: per interior grid time, 1 if this site's cell rule
    needs it removed (:func:`local_merges`); per run of consecutive intervals
    (:func:`interval_runs`), group and kind (events, censorings), 1 if the site
    holds rows there. Summed over the sites, they say
    which grid times to drop so that every site can answer; no count leaves."""
    spec = query.spec
    rows = _leaving(site, spec)
    intervals = len(spec["grid"]) - 1
    cells = np.asarray(
        [[m.sum() for m in group] for group in _interval_masks(rows, intervals)]
    )  # groups × (2 · intervals): events, censorings of interval 1, then 2, ...
    by_interval = cells.reshape(len(rows.members), intervals, 2)
    stacked = by_interval.transpose(0, 2, 1).reshape(-1, intervals)
    minimum = max(site.policy.min_rows, site.policy.min_difference)
    flags = local_merges(stacked, minimum)
    # for every run of consecutive intervals: does the site hold rows in each
    # of its cells (group, kind) — so the holders of any merged cell are known
    reach = np.cumsum(by_interval, axis=1)
    reach = np.concatenate([np.zeros_like(reach[:, :1]), reach], axis=1)
    held = np.concatenate(
        [
            (reach[:, b + 1] - reach[:, a] > 0).astype(int).reshape(-1)
            for a, b in interval_runs(intervals)
        ]
    )
    totals = [float(rows.dropped), *map(float, flags), *map(float, held)]
    everyone = _full_masks(site, rows.kept, [np.ones(len(rows.kept), dtype=bool)])
    columns = {spec["duration"]: everyone, spec["event"]: everyone}
    return totals, columns | _left_out(site, rows.kept)


# ------------------------------------------------------------ researcher side
@dataclass
class SurvivalResult:
    """Pooled Kaplan–Meier curves on a grid, and (with groups) the log-rank test.

    ``grid``: the grid used (``requested_grid`` without the ``merged`` times).
    ``table``: one row per group and grid time with ``at_risk``, ``events``,
    ``censored``, ``survival``, ``se`` (Greenwood) and the ``lower`` / ``upper``
    confidence limits. ``logrank``: the test's χ², degrees of freedom and p-value
    (None without ``by``). ``receipt``: it covers ``to_frame()``, the table.
    """

    duration: str
    event: str
    by: str | None
    grid: list[float]
    table: pd.DataFrame
    logrank: dict[str, float] | None
    beyond: dict[Any, int]
    missing: float
    receipt: dict[str, Any]
    requested_grid: list[float] = field(default_factory=list)
    merged: list[float] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """The pooled table the receipt covers (a copy)."""
        return self.table.copy()

    def survival_function(self, group: Any = None) -> pd.Series:
        """S(t) at the grid times (t = grid[0] included, S = 1), one group's."""
        rows = self.curve(group)
        times = [self.grid[0], *rows["time"].tolist()]
        return pd.Series([1.0, *rows["survival"].tolist()], index=times, name="S(t)")

    def curve(self, group: Any = None) -> pd.DataFrame:
        """One group's rows of the table (the whole table without ``by``)."""
        if self.by is None:
            return self.table
        if group is None:
            raise InvalidInput(f"name a group of {self.by!r}")
        chosen: pd.DataFrame = self.table[self.table["group"] == group]
        return chosen

    def median(self, group: Any = None) -> float:
        """The first grid time where S(t) ≤ 0.5 (inf if it never falls that far)."""
        s = self.survival_function(group)
        below = s[s <= 0.5]
        return float(below.index[0]) if len(below) else float("inf")

    def __repr__(self) -> str:
        groups = "" if self.by is None else f", by={self.by!r}"
        return f"SurvivalResult({self.duration!r}, {self.event!r}{groups})"


def _curve(events: np.ndarray, censored: np.ndarray, beyond: float, z: float) -> dict:
    """KM, Greenwood and the exponential CI from per-interval counts."""
    leaving = events + censored
    # at risk at the start of interval j: everyone leaving in j or later, or beyond
    at_risk = np.cumsum(leaving[::-1])[::-1] + beyond
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(at_risk > 0, 1 - events / at_risk, 1.0)
        survival = np.cumprod(factor)
        terms = np.where(
            (at_risk > 0) & (at_risk > events),
            events / (at_risk * (at_risk - events)),
            0.0,
        )
        greenwood = np.cumsum(terms)
        se = survival * np.sqrt(greenwood)
        # lifelines' exponential Greenwood bounds: on log(-log S)
        log_s = np.log(survival)
        v = np.where(log_s != 0, np.sqrt(greenwood) / np.abs(log_s), np.nan)
        lower = np.exp(-np.exp(np.log(-log_s) + z * v))
        upper = np.exp(-np.exp(np.log(-log_s) - z * v))
    lower = np.where(np.isnan(v), survival, lower)
    upper = np.where(np.isnan(v), survival, upper)
    return {
        "at_risk": at_risk,
        "events": events,
        "censored": censored,
        "survival": survival,
        "se": se,
        "lower": lower,
        "upper": upper,
    }


def _logrank(events: np.ndarray, at_risk: np.ndarray) -> dict[str, float]:
    """The log-rank test from per-group, per-interval events and numbers at risk
    (groups × intervals): (O − E)ᵀ V⁻¹ (O − E) on G − 1 degrees of freedom."""
    d = events.sum(axis=0)
    n = at_risk.sum(axis=0)
    use = n > 0
    d, n, dg, ng = d[use], n[use], events[:, use], at_risk[:, use]
    expected = (ng * d / n).sum(axis=1)
    observed = dg.sum(axis=1)
    groups = events.shape[0]
    cov = np.zeros((groups, groups))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(n > 1, d * (n - d) / (n * n * (n - 1)), 0.0)
    for a in range(groups):
        for b in range(groups):
            if a == b:
                cov[a, a] = np.sum(scale * ng[a] * (n - ng[a]))
            else:
                cov[a, b] = -np.sum(scale * ng[a] * ng[b])
    diff = (observed - expected)[:-1]
    statistic = float(diff @ np.linalg.solve(cov[:-1, :-1], diff))
    dof = groups - 1
    return {
        "statistic": statistic,
        "df": float(dof),
        "p_value": float(distributions.chi2.sf(statistic, dof)),
    }


def merged_grid(
    edges: np.ndarray, removals: np.ndarray, held: np.ndarray, need: int
) -> np.ndarray:
    """The grid a survival query is asked on: ``edges`` without the interior times
    any site's cell rule removes (``removals``: per interior time, how many sites
    ask), then merged further until each interval's every cell is held by no site
    or by at least ``need`` (``held``: per run of :func:`interval_runs`, per group
    and kind, how many sites hold rows there)."""
    intervals = edges.size - 1
    runs: list[list[int]] = [[0]]
    for j in range(1, intervals):
        if round(float(removals[j - 1])) > 0:
            runs[-1].append(j)
        else:
            runs.append([j])
    holders = dict(
        zip(interval_runs(intervals), np.rint(held).astype(int), strict=True)
    )

    def poolable(run: list[int]) -> bool:
        count = holders[(run[0], run[-1])]
        return bool(np.all((count == 0) | (count >= need)))

    merged: list[list[int]] = []
    for run in runs:
        if merged and not poolable(merged[-1]):
            merged[-1] += run
        else:
            merged.append(run)
    while len(merged) > 1 and not poolable(merged[-1]):
        last = merged.pop()
        merged[-1] += last
    return np.asarray([edges[0], *(edges[run[-1] + 1] for run in merged)])


def kaplan_meier(
    sites: SitesLike,
    duration: str,
    event: str,
    *,
    grid: Sequence[float],
    by: str | None = None,
    researcher: str | None = None,
    keys: KeyHolder | None = None,
    population: Sequence[str] | None = None,
    min_sites: int = 2,
    on_refusal: str = "raise",
    alpha: float = 0.05,
    merge: bool = True,
) -> SurvivalResult:
    """Kaplan–Meier survival pooled across sites on a declared time ``grid``.

    ``duration`` is the follow-up time (positive), ``event`` 1 for an event and 0
    for a censoring. ``grid`` starts at 0 and is strictly increasing; it must lie
    on the sites' grid (2 significant digits by default, as bin edges). Durations
    are counted per interval ``(t_{j-1}, t_j]``, and a row followed beyond the last
    grid time counts as at risk throughout (censored after it). With ``by`` (a
    category) there is a curve per level and the log-rank test of their equality.
    Rows with a missing duration, event or group are left out (complete cases).

    With ``merge=True`` (the default), intervals are merged where a cell would
    break a rule: each site says, for every interior grid time, whether its cell
    rule needs it removed (a cell of 1 or 2 rows there: merging runs forward, a
    short last interval joins the one before) and where it holds rows; only these
    0/1 flags, summed over the sites, reach you. Times any site needs removed are
    dropped, and intervals are merged further until each cell is held by no site
    or by the pooling minimum. The curve is then asked on that grid: ``grid`` is
    the grid used, ``requested_grid`` the one asked, ``merged`` the times
    removed (logged as a warning). ``merge=False`` refuses such a grid instead.

    Examples
    --------
    >>> km = kaplan_meier(
    ...     sites, "week", "arrest", grid=range(0, 56, 4)
    ... )  # doctest: +SKIP
    >>> km.table[["time", "at_risk", "survival", "lower", "upper"]]  # doctest: +SKIP
    """
    site_list = as_sites(sites)
    edges = np.asarray(list(grid), dtype=float)
    if edges.size < 2 or edges[0] != 0 or not np.all(np.diff(edges) > 0):
        raise InvalidInput(
            "grid= is the survival curve's time grid: starting at 0, strictly "
            "increasing, with at least one interval"
        )
    if not 0 < alpha < 1:
        raise InvalidInput("alpha must be between 0 and 1")
    keys = keys or KeyHolder()
    groups = list(grouping_levels(site_list, by, researcher)) if by else []
    if by and len(groups) < 2:
        raise InvalidInput(f"{by!r} has fewer than 2 released levels to compare")
    requested = edges
    run_args: dict[str, Any] = {
        "keys": keys,
        "researcher": researcher,
        "min_sites": min_sites,
        "min_rows": 0,
        "on_refusal": on_refusal,
    }

    def spec_on(grid: np.ndarray) -> dict[str, Any]:
        return {
            "duration": duration,
            "event": event,
            "by": by,
            "groups": groups,
            "grid": grid.tolist(),
            "population": population_columns(population),
            "columns": [duration, event],
        }

    runs = []
    if merge and edges.size > 2:
        plan_spec = spec_on(edges)
        intervals = edges.size - 1
        n_groups = max(1, len(groups))
        n_runs = len(interval_runs(intervals))
        if n_runs * n_groups * 2 > MAX_PLAN:
            raise InvalidInput(
                f"a grid of {intervals} intervals is too fine to merge "
                "automatically; give a coarser grid, or merge=False"
            )
        plan = _run(
            site_list,
            "survival_grid",
            plan_spec,
            1 + (intervals - 1) + n_runs * n_groups * 2,
            **run_args,
        )
        sums = np.asarray(plan.totals[1:], dtype=float)
        edges = merged_grid(
            edges,
            sums[: intervals - 1],
            sums[intervals - 1 :].reshape(n_runs, n_groups, 2),
            min_sites,
        )
        runs.append(plan)
    removed = [float(t) for t in requested if t not in set(edges.tolist())]
    if removed:
        _log.warning(
            "kaplan_meier: grid times %s removed (merging intervals whose cells a "
            "site could not release)",
            ", ".join(f"{t:g}" for t in removed),
        )
    intervals = edges.size - 1
    per_group = 2 * intervals + 1
    spec = spec_on(edges)
    n_groups = max(1, len(groups))
    run = _run(
        site_list,
        "survival",
        spec,
        1 + n_groups * per_group,
        **run_args,
    )
    runs.append(run)
    counts = np.asarray(run.totals[1:], dtype=float).reshape(n_groups, per_group)
    z = float(distributions.norm.ppf(1 - alpha / 2))
    frames = []
    beyond: dict[Any, int] = {}
    at_risk_rows, event_rows = [], []
    for g, row in enumerate(counts):
        events, censored = row[: 2 * intervals : 2], row[1 : 2 * intervals : 2]
        curve = _curve(events, censored, row[-1], z)
        frame = pd.DataFrame({"time": edges[1:], **curve})
        for column in ("at_risk", "events", "censored"):
            frame[column] = frame[column].round().astype(int)
        label = groups[g] if groups else None
        if groups:
            frame.insert(0, "group", label)
        frames.append(frame)
        beyond[label] = round(row[-1])
        at_risk_rows.append(curve["at_risk"])
        event_rows.append(events)
    table = pd.concat(frames, ignore_index=True)
    test = (
        _logrank(np.asarray(event_rows), np.asarray(at_risk_rows)) if groups else None
    )
    receipt = receipt_for(
        table,
        runs,
        kind="kaplan_meier",
        parameters={
            "duration": duration,
            "event": event,
            "by": by,
            "grid": edges.tolist(),
            "requested_grid": requested.tolist(),
            "population": spec["population"],
        },
    )
    return SurvivalResult(
        duration=duration,
        event=event,
        by=by,
        grid=edges.tolist(),
        requested_grid=requested.tolist(),
        merged=removed,
        table=table,
        logrank=test,
        beyond=beyond,
        missing=np.nan if run.missing_withheld else float(run.totals[0]),
        receipt=receipt,
    )
