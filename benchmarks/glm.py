"""A pooled logistic GLM's cost (issue 14's targets: at most 1.5x a ``describe`` of
the same columns per Newton iteration, and 10 s in all).

Run by ``make bench`` (``.venv/bin/python benchmarks/glm.py``). It is a
measurement, not a test: it always exits 0 and ends with a one-line summary.

The study: ``--sites`` sites of ``--rows`` rows each, ``--covariates`` normal
covariates and a 0/1 outcome drawn from a logistic model. Timed: one
``encrypted.logit`` of the outcome on every covariate (every iteration is a query
through the sites' gates, auditors, holder count with the Newton-step check,
masking and CKKS), and one ``encrypted.describe`` of the same columns (two
rounds). Printed: the fit's time, its iterations, the time per iteration, the
describe's time and the ratio per iteration; and where an iteration's time goes
at a site (its own computation of XᵀWX at two coefficient vectors).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from machine import cpu_model  # benchmarks/machine.py (run as a script)

from healthlab import Site, encrypted
from healthlab.encrypted import models

PER_ITERATION_TARGET = 1.5
TOTAL_TARGET = 10.0


def cohort(rows: int, covariates: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (rows, covariates))
    beta = np.linspace(-0.5, 0.5, covariates)
    p = 1 / (1 + np.exp(-(x @ beta - 0.3)))
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(covariates)])
    frame["y"] = (rng.random(rows) < p).astype(float)
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--covariates", type=int, default=10)
    args = parser.parse_args()
    frames = [cohort(args.rows, args.covariates, s) for s in range(args.sites)]
    names = [f"x{i}" for i in range(args.covariates)]
    formula = "y ~ " + " + ".join(names)

    site_time = {"s": 0.0, "calls": 0}
    inner = models._evaluate

    def timed(*a: object) -> object:
        start = time.perf_counter()
        out = inner(*a)  # type: ignore[arg-type]
        site_time["s"] += time.perf_counter() - start
        site_time["calls"] += 1
        return out

    models._evaluate = timed  # type: ignore[assignment]
    sites = [Site(f"s{i}", f) for i, f in enumerate(frames)]
    start = time.perf_counter()
    fit = encrypted.logit(sites, formula)
    total = time.perf_counter() - start
    models._evaluate = inner  # type: ignore[assignment]
    queries = len(fit.receipt["queries"])

    fresh = [Site(f"s{i}", f) for i, f in enumerate(frames)]
    start = time.perf_counter()
    encrypted.describe(fresh, [*names, "y"])
    describe = time.perf_counter() - start

    per_query = total / queries
    print(f"# {cpu_model()}")
    print(
        f"logistic glm, {args.covariates} covariates, {args.sites} sites x "
        f"{args.rows:,} rows: {total:.2f} s, {fit.iterations} Newton steps "
        f"({queries} queries with the start)"
    )
    print(f"  per query (iteration): {per_query:.2f} s")
    print(
        f"  of which the sites' own XᵀWX: {site_time['s'] / queries:.2f} s "
        f"({site_time['calls'] // queries} site evaluations per query)"
    )
    print(f"describe of the same {args.covariates + 1} columns: {describe:.2f} s")
    ratio = per_query / describe
    per_ok = "met" if ratio <= PER_ITERATION_TARGET else "NOT met"
    total_ok = "met" if total <= TOTAL_TARGET else "NOT met"
    print(
        f"summary: {per_query:.2f} s per iteration = {ratio:.2f}x a describe (target "
        f"<= {PER_ITERATION_TARGET}x: {per_ok}); {total:.1f} s in all (target <= "
        f"{TOTAL_TARGET:.0f} s: {total_ok})"
    )


if __name__ == "__main__":
    main()
