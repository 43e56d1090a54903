"""Consortium scale (issue 16): one ``describe`` of two columns over 2 / 16 / 100 /
1,000 simulated sites of ``--rows`` rows each, on this machine, and where the time
goes; then the same with a third of the sites dropping out after the masks are set;
then a masked ``federated.train`` over the same numbers of sites.

Run by ``make bench`` (``.venv/bin/python benchmarks/scaling.py``). It is a
measurement, not a test: it always exits 0 and ends with a one-line summary
against the target (≤ 30 s for 1,000 sites on 2 cores).

Every site runs in this one process, one after another, so the figure is the sum
of every site's work (what one site pays is about it divided by the sites); the
phases are cProfile's cumulative times of the protocol's steps:

* ``sites compute``: authorizing, selecting rows, the disclosure checks and the
  totals (``SiteWork.__init__``);
* ``announce``: the holder flags' masks, the per-query mask key, Shamir shares of
  both seeds sealed to each neighbour;
* ``count``: checking the neighbours' tags, opening the shares, the holder count;
* ``contribute``: pairwise and self masks, CKKS encryption;
* ``reveal``: checking the neighbours' confirmations, the survivors' audit;
* ``aggregate``: the server adding ciphertexts;
* ``unmask + decrypt``: the key holder rebuilding the masks that do not cancel.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np
import pandas as pd
from machine import cpu_model  # benchmarks/machine.py (run as a script)

from healthlab import Site, encrypted, federated
from healthlab.encrypted import KeyHolder, secagg
from healthlab.encrypted.protocol import Relay, using_relay

TARGET_SECONDS = 30.0
PHASES = {
    "sites compute": "__init__",
    "announce": "announce",
    "count": "count_holders",
    "contribute": "contribute",
    "reveal": "reveal",
    "aggregate": "add",
    "unmask + decrypt": "unmask",
}


class Drops(Relay):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def drops(self, step: str) -> set[str]:
        return self.names if step == "contribute" else set()


def cohort(n: int, rows: int, seed: int = 0) -> list[Site]:
    rng = np.random.default_rng(seed)
    return [
        Site(
            f"site{i:04d}",
            pd.DataFrame(
                {"age": rng.normal(55, 12, rows), "sbp": rng.normal(130, 18, rows)}
            ),
        )
        for i in range(n)
    ]


def phases(profile: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    out = {}
    for label, name in PHASES.items():
        out[label] = sum(
            v[3]
            for (path, _, fn), v in stats.items()
            if fn == name and path.endswith("encrypted/protocol.py")
        )
    return out


def run(
    n: int, rows: int, drop: float, keys: KeyHolder
) -> tuple[float, dict[str, float]]:
    sites = cohort(n, rows)
    gone = {s.name for s in sites[1 :: max(1, round(1 / drop))]} if drop else set()
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    with using_relay(Drops(gone)):
        table = encrypted.describe(sites, ["age", "sbp"], keys=keys)
    profile.disable()
    took = time.perf_counter() - start
    kept = [s for s in sites if s.name not in gone]
    pooled = pd.concat([s.rows(["age", "sbp"])[0] for s in kept])
    assert table.loc["count", "age"] == len(pooled)
    error = abs(table.loc["mean", "age"] - pooled["age"].mean()) / abs(
        pooled["age"].mean()
    )
    assert error < 1e-12, error
    return took, phases(profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 16, 100, 1000])
    parser.add_argument(
        "--federated-rows",
        type=int,
        default=50,
        help="rows a site of the federated runs (0: no federated runs)",
    )
    parser.add_argument("--federated-rounds", type=int, default=2)
    args = parser.parse_args()
    keys = KeyHolder()
    print(f"describe of 2 columns, {args.rows} rows a site; {cpu_model()}")
    print(
        f"{'sites':>6} {'drop':>5} {'k':>4} {'seconds':>8}  "
        + "  ".join(f"{p:>10}" for p in PHASES)
    )
    figures = {}
    for n in args.sites:
        for drop in (0.0, 1 / 3) if n >= 16 else (0.0,):
            took, spent = run(n, args.rows, drop, keys)
            figures[(n, drop)] = took
            print(
                f"{n:>6} {drop:>5.2f} {secagg.degree(n):>4} {took:>8.2f}  "
                + "  ".join(f"{spent[p]:>10.2f}" for p in PHASES)
            )
    largest = max(args.sites)
    took = figures[(largest, 0.0)]
    verdict = "met" if took <= TARGET_SECONDS else "MISSED"
    trained = {}
    if args.federated_rows:
        print(
            f"\nfederated.train (masked, logistic, 2 features, {args.federated_rounds} "
            f"rounds), {args.federated_rows} rows a site"
        )
        print(f"{'sites':>6} {'k':>4} {'seconds':>8}  {'per round':>9}")
        for n in args.sites:
            seconds = train_sites(n, args.federated_rows, args.federated_rounds)
            trained[n] = seconds
            print(
                f"{n:>6} {secagg.degree(n):>4} {seconds:>8.2f}  "
                f"{seconds / args.federated_rounds:>9.2f}"
            )
    print(
        f"summary: describe over {largest} sites took {took:.1f} s "
        f"(target <= {TARGET_SECONDS:.0f} s: {verdict}); with a third dropped "
        f"{figures.get((largest, 1 / 3), float('nan')):.1f} s"
        + (
            f"; federated.train over {largest} sites {trained[largest]:.1f} s"
            if largest in trained
            else ""
        )
    )


def train_sites(n: int, rows: int, rounds: int) -> float:
    """Seconds of a masked ``federated.train`` over ``n`` simulated sites (every
    site in this process, one after another, as the statistics above)."""
    rng = np.random.default_rng(n)
    frames = {}
    for i in range(n):
        x = rng.normal(0, 1, (rows, 2))
        y = (x @ [1.0, -0.5] + rng.normal(0, 1, rows) > 0).astype(int)
        frames[f"site{i:04d}"] = pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "y": y})
    start = time.perf_counter()
    result = federated.train(
        frames, "y", rounds=rounds, round_timeout=3600.0, progress=lambda r: None
    )
    took = time.perf_counter() - start
    assert [len(s) for s in result.history["sites"]] == [n] * rounds
    return took


if __name__ == "__main__":
    main()
