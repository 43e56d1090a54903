"""Survival across sites: Kaplan–Meier, the log-rank test and the Cox model, their
cost (issue 14 asks for Cox and Kaplan–Meier times on gbsg2 split over 4 sites).

Run by ``make bench`` (``.venv/bin/python benchmarks/survival.py``). It is a
measurement, not a test: it always exits 0 and ends with a one-line summary.

Timed: Kaplan–Meier (alone and by horTh with the log-rank test) on gbsg2 over 2
sites — over 4 its grid has cells of 1-2 censorings at a site, refused by the cell
rule; the Cox model ``~ C(horTh) + age + tsize + pnodes + progrec + estrec`` on
gbsg2 over 4 sites; and, for scale, a Cox model with ``--covariates`` normal
covariates over ``--sites`` synthetic sites of ``--rows`` rows on a 10-interval
grid, against one ``describe`` of the same columns.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from lifelines.datasets import load_gbsg2
from machine import cpu_model  # benchmarks/machine.py (run as a script)

from healthlab import Site, encrypted
from healthlab.encrypted.survival import kaplan_meier

GRID = [0, 700, 1400, 2700]
COX = "~ C(horTh) + age + tsize + pnodes + progrec + estrec"
SCALE_GRID = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def cohort(rows: int, covariates: int, seed: int) -> pd.DataFrame:
    """Exponential event times with log-hazard x·β, uniform censoring on [0, 12]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (rows, covariates))
    beta = np.linspace(-0.4, 0.4, covariates)
    time_ = rng.exponential(1 / (0.15 * np.exp(x @ beta)))
    censor = rng.uniform(0, 12, rows)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(covariates)])
    frame["time"] = np.maximum(np.minimum(time_, censor), 1e-6)
    frame["event"] = (time_ <= censor).astype(float)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--covariates", type=int, default=10)
    args = parser.parse_args()
    frame = load_gbsg2().sample(frac=1.0, random_state=3).reset_index(drop=True)
    two = {f"s{i}": frame.iloc[i::2] for i in range(2)}
    start = time.perf_counter()
    kaplan_meier(two, "time", "cens", grid=GRID)
    km = time.perf_counter() - start
    start = time.perf_counter()
    grouped = kaplan_meier(two, "time", "cens", grid=GRID, by="horTh")
    by = time.perf_counter() - start
    four = [Site(f"s{i}", frame.iloc[i::4].reset_index(drop=True)) for i in range(4)]
    start = time.perf_counter()
    cox = encrypted.coxph(four, COX, "time", "cens", grid=GRID)
    gbsg2_cox = time.perf_counter() - start

    frames = [cohort(args.rows, args.covariates, s) for s in range(args.sites)]
    names = [f"x{i}" for i in range(args.covariates)]
    sites = [Site(f"s{i}", f) for i, f in enumerate(frames)]
    start = time.perf_counter()
    big = encrypted.coxph(
        sites, "~ " + " + ".join(names), "time", "event", grid=SCALE_GRID
    )
    scale = time.perf_counter() - start
    queries = len(big.receipt["queries"])
    fresh = [Site(f"s{i}", f) for i, f in enumerate(frames)]
    start = time.perf_counter()
    encrypted.describe(fresh, [*names, "time", "event"])
    describe = time.perf_counter() - start

    print(f"# {cpu_model()}")
    print(f"gbsg2 ({len(frame)} rows), grid {GRID}")
    print(
        f"  Kaplan–Meier over 2 sites: {km:.2f} s; by horTh with log-rank: {by:.2f} s"
    )
    if grouped.logrank:
        print(f"  log-rank chi2 {grouped.logrank['statistic']:.3f}")
    print(
        f"  Cox {COX} over 4 sites: {gbsg2_cox:.2f} s, {cox.iterations} Newton steps, "
        f"{len(cox.receipt['queries'])} queries"
    )
    print(
        f"Cox, {args.covariates} covariates, {args.sites} sites x {args.rows:,} rows, "
        f"{len(SCALE_GRID) - 1} intervals: {scale:.2f} s, {big.iterations} Newton "
        f"steps, {queries} queries, {scale / queries:.2f} s per query; describe of "
        f"the same columns {describe:.2f} s ({scale / queries / describe:.2f}x per "
        "query)"
    )
    print(
        f"summary: Kaplan–Meier {km:.2f} s, with log-rank {by:.2f} s; Cox on gbsg2 "
        f"over 4 sites {gbsg2_cox:.2f} s; Cox at {args.sites}x{args.rows:,} rows "
        f"{scale:.2f} s ({scale / queries / describe:.2f}x a describe per query)"
    )


if __name__ == "__main__":
    main()
