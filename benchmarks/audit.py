"""The site auditor's cost: a ``describe`` after many answered queries against one
on fresh sites (issue 13's target: at most 1.2x).

Run by ``make bench`` (``.venv/bin/python benchmarks/audit.py``). It is a
measurement, not a test: it always exits 0 and ends with a one-line summary.

The study: ``--rows`` rows over two sites, ten measurements each missing in ~2 % of
rows, a sex and a four-level region column. "Answered before" are ``--queries``
describe-like queries a researcher asks in an ordinary study — the complete cases of
one to three of the measurements, overall or by sex or region — recorded at each
site as its auditor records an answered query (its kept subsets, each group's, and
the rows it left out). Then one ``describe`` of two columns over all rows is timed
on those sites (each repeat from a copy of their memory as built) and on fresh ones,
best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import pandas as pd
from machine import cpu_model  # benchmarks/machine.py (run as a script)

from healthlab import Site, encrypted
from healthlab.encrypted import KeyHolder
from healthlab.errors import DisclosureRefused
from healthlab.sites import LEFT_OUT

MEASURES = [f"m{i}" for i in range(10)]
TARGET = 1.2


def cohort(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {m: rng.normal(50, 10, rows).round(2) for m in MEASURES}
        | {
            "sex": rng.choice(["F", "M"], rows),
            "region": rng.choice(["n", "s", "e", "w"], rows),
        }
    )
    for m in MEASURES:
        frame.loc[rng.random(rows) < 0.02, m] = np.nan
    return frame


def answered_subsets(frame: pd.DataFrame, queries: int, seed: int) -> list[dict]:
    """The subsets of ``queries`` ordinary describe queries at one site."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(queries):
        columns = list(rng.choice(MEASURES, int(rng.integers(1, 4)), replace=False))
        kept = frame[columns].notna().all(axis=1).to_numpy()
        by = [None, "sex", "region"][int(rng.integers(0, 3))]
        if by is None:
            groups = [kept]
        else:
            labels = frame[by].to_numpy()
            groups = [kept & (labels == g) for g in np.unique(labels)]
        subsets = {c: groups for c in columns}
        if (~kept).any():
            subsets[LEFT_OUT] = [~kept]
        out.append(subsets)
    return out


def timed(sites: list[Site], repeat: int) -> float:
    keys = KeyHolder()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        encrypted.describe(sites, ["m0", "m1"], keys=keys, dropna=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    half = args.rows // 2
    frames = {"a": cohort(half, 1), "b": cohort(args.rows - half, 2)}
    print("HealthLab auditor benchmark")
    print(f"machine    {cpu_model()}")
    print(f"rows       {args.rows:,} over 2 sites; {args.queries} answered queries")
    load = os.getloadavg()[0]
    print(f"load       {load:.2f} (1 min, at start); best of {args.repeat}")

    fresh = [Site(n, f) for n, f in frames.items()]
    fresh_s = timed(fresh, args.repeat)

    busy = [Site(n, f) for n, f in frames.items()]
    start = time.perf_counter()
    subsets_total = answered = 0
    for i, site in enumerate(busy):
        for j, subsets in enumerate(
            answered_subsets(frames[site.name], args.queries, i)
        ):
            try:  # audited as an answer would be: the memory must itself be sound
                site.check_subsets(subsets)
            except DisclosureRefused:
                continue
            site.remember(
                subsets, query_hash=f"0x{j:064x}", kind="moments", researcher=None
            )
            answered += 1
        subsets_total = len(site.auditor.answered.get("", []))
    print(
        f"memory     {answered / len(busy):.0f} of {args.queries} queries answered "
        "per site, "
        f"{subsets_total} distinct subsets (built in "
        f"{time.perf_counter() - start:.0f} s)"
    )
    # a describe after the answered queries answers new subsets once: each repeat
    # starts from a copy of the memory as built (the site's auditor, with what it
    # keeps between queries), so every timed describe is that first, audited one
    built = {site.name: copy.deepcopy(site.auditor) for site in busy}
    keys = KeyHolder()
    busy_s = float("inf")
    for _ in range(args.repeat):
        for site in busy:
            vars(site)["auditor"] = copy.deepcopy(built[site.name])  # cached_property
        start = time.perf_counter()
        encrypted.describe(busy, ["m0", "m1"], keys=keys, dropna=True)
        busy_s = min(busy_s, time.perf_counter() - start)
    ratio = busy_s / fresh_s
    print(f"\n{'describe, fresh sites':<40}{fresh_s:8.2f} s")
    print(f"{'describe after the answered queries':<40}{busy_s:8.2f} s")
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(
        f"\nsummary: audited describe {ratio:.2f}x a fresh one "
        f"(target <= {TARGET}x): {verdict}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
