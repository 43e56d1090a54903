"""Kaplan–Meier and the log-rank test across sites: their cost (issue 14 asks for
Cox and Kaplan–Meier times on gbsg2 split over 4 sites; Cox is not built yet).

Run by ``make bench`` (``.venv/bin/python benchmarks/survival.py``). It is a
measurement, not a test: it always exits 0 and ends with a one-line summary.
"""

from __future__ import annotations

import time

from lifelines.datasets import load_gbsg2
from machine import cpu_model  # benchmarks/machine.py (run as a script)

from healthlab.encrypted.survival import kaplan_meier

GRID = [0, 700, 1400, 2700]


def main() -> None:
    frame = load_gbsg2().sample(frac=1.0, random_state=3).reset_index(drop=True)
    # 2 sites: over 4 this grid has cells of 1-2 rows at a site (refused)
    sites = {f"s{i}": frame.iloc[i::2] for i in range(2)}
    start = time.perf_counter()
    kaplan_meier(sites, "time", "cens", grid=GRID)
    km = time.perf_counter() - start
    start = time.perf_counter()
    grouped = kaplan_meier(sites, "time", "cens", grid=GRID, by="horTh")
    by = time.perf_counter() - start
    print(f"# {cpu_model()}")
    print(f"gbsg2 ({len(frame)} rows) over 2 sites, grid {GRID}")
    print(f"  Kaplan–Meier: {km:.2f} s; by horTh with the log-rank test: {by:.2f} s")
    print(
        f"  log-rank chi2 {grouped.logrank['statistic']:.3f}" if grouped.logrank else ""
    )
    print(
        f"summary: Kaplan–Meier {km:.2f} s, with log-rank {by:.2f} s (Cox: not built)"
    )


if __name__ == "__main__":
    main()
