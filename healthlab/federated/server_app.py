"""The in-clear ServerApp (``secure="none"``): the rounds, with defences, a minimum
of replies and a deadline.

Each round: send the global model to the sites → drop refusals, errors and late
replies → reject updates with NaN/inf, a wrong shape or an absurd norm, cap example
counts at what each site registered (the
:class:`~healthlab.federated.screening.Screening` wrapper around the strategy) →
aggregate with the chosen Flower strategy (optionally with Flower's server-side DP)
→ evaluate on every site's held-out rows → record a history row and call the
progress callback. The masked protocol, the default, is
:mod:`healthlab.federated.masked_study`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)

from healthlab.errors import HealthLabError, InvalidInput
from healthlab.federated.flower_compat import quick_grid
from healthlab.federated.screening import Screening, site_status
from healthlab.federated.study import Study
from healthlab.federated.task import summarize

_log = logging.getLogger(__name__)

__all__ = [
    "STRATEGIES",
    "RoundReport",
    "ServerSettings",
    "make_server_app",
    "make_strategy",
    "run_rounds",
]


def _c(message: Message) -> Any:
    """A message's records, untyped (Flower types each record as a union)."""
    return message.content


STRATEGIES = ("fedavg", "fedprox", "fedadam", "trimmed", "median")


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs the rounds."""

    rounds: int = 10
    strategy: str = "fedavg"
    min_sites: int = 2
    round_timeout: float = 60.0
    max_update_norm: float = 1e4
    clip_norm: float | None = None
    dp_noise_multiplier: float | None = None
    dp_clipping_norm: float | None = None
    proximal_mu: float = 0.1
    trim_beta: float = 0.2
    server_lr: float = 0.1


@dataclass
class RoundReport:
    """What one round produced (one row of the history)."""

    round: int
    sites: list[str]
    refused: dict[str, str]
    rejected: dict[str, str]
    pooled: dict[str, float]
    per_site: dict[str, dict[str, float]]
    seconds: float


@dataclass
class Outcome:
    """Filled by the ServerApp: final parameters and the history."""

    params: list[np.ndarray] = field(default_factory=list)
    rounds: list[RoundReport] = field(default_factory=list)
    error: BaseException | None = None


def make_strategy(settings: ServerSettings, n_sites: int) -> Strategy:
    """The Flower strategy named in ``settings`` (optionally wrapped for DP)."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_available_nodes": 1,
    }
    name = settings.strategy
    strategy: Strategy
    if name == "fedavg":
        strategy = FedAvg(**common)
    elif name == "fedprox":
        strategy = FedProx(**common, proximal_mu=settings.proximal_mu)
    elif name == "fedadam":
        strategy = FedAdam(**common, eta=settings.server_lr)
    elif name == "trimmed":
        strategy = FedTrimmedAvg(**common, beta=settings.trim_beta)
    elif name == "median":
        strategy = FedMedian(**common)
    else:
        raise InvalidInput(f"unknown strategy {name!r}; choose one of {STRATEGIES}")
    if settings.dp_noise_multiplier is not None:
        if settings.dp_clipping_norm is None:
            raise InvalidInput("differential privacy needs dp_clipping_norm")
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=settings.dp_noise_multiplier,
            clipping_norm=settings.dp_clipping_norm,
            num_sampled_clients=n_sites,
        )
    return strategy


def make_server_app(
    study: Study,
    settings: ServerSettings,
    initial: list[np.ndarray],
    outcome: Outcome,
    *,
    on_round: Callable[[RoundReport], None] | None = None,
) -> ServerApp:
    """The study's ServerApp; results land in ``outcome``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_rounds(grid, study, settings, initial, outcome, on_round)
        except BaseException as exc:  # surfaced by train() in the caller's thread
            outcome.error = exc

    return app


def _wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() > deadline:
            return nodes
        time.sleep(0.02)


def run_rounds(
    grid: Grid,
    study: Study,
    settings: ServerSettings,
    initial: list[np.ndarray],
    outcome: Outcome,
    on_round: Callable[[RoundReport], None] | None,
) -> None:
    quick_grid(grid)  # the simulation's in-memory grid polls every 0.1 s
    nodes = _wait_for_nodes(grid, len(study.sites), settings.round_timeout)
    # the screen wraps outside DP and the aggregation: see healthlab.federated.screening
    strategy = Screening(
        make_strategy(settings, len(study.sites)),
        # the most training rows a site can hold: its registered rows minus held-out
        registered={
            s.name: s.n_rows - round(study.test_fraction * s.n_rows)
            for s in study.sites
        },
        max_update_norm=settings.max_update_norm,
        clip_norm=settings.clip_norm,
        min_sites=settings.min_sites,
    )
    params = [np.asarray(p, dtype=np.float64) for p in initial]
    for rnd in range(1, settings.rounds + 1):
        started = time.monotonic()
        refused: dict[str, str] = {}
        rejected: dict[str, str] = {}
        config = ConfigRecord({"round": rnd})
        messages = strategy.configure_train(rnd, ArrayRecord(params), config, grid)
        replies = grid.send_and_receive(messages, timeout=settings.round_timeout)
        aggregated, _ = strategy.aggregate_train(rnd, replies)
        screened = strategy.screened[rnd]
        taken = screened.sites
        refused.update(screened.refused)
        rejected.update(screened.rejected)
        if aggregated is None:
            raise HealthLabError(f"round {rnd}: the strategy produced no model")
        params = [
            np.asarray(a, dtype=np.float64) for a in aggregated.to_numpy_ndarrays()
        ]
        pooled, per_site = _evaluate(grid, nodes, params, study, settings, refused)
        report = RoundReport(
            rnd, taken, refused, rejected, pooled, per_site, time.monotonic() - started
        )
        for site, reason in {**refused, **rejected}.items():
            # a site left out of a round is loud: here, in the history, the receipt
            _log.warning("round %d: site %s left out: %s", rnd, site, reason)
        outcome.rounds.append(report)
        outcome.params = params
        if on_round is not None:
            on_round(report)


def _evaluate(
    grid: Grid,
    nodes: list[int],
    params: list[np.ndarray],
    study: Study,
    settings: ServerSettings,
    refused: dict[str, str],
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    messages = [
        Message(
            RecordDict({"arrays": ArrayRecord(params)}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in nodes
    ]
    totals: dict[str, float] = {}
    per_site: dict[str, dict[str, float]] = {}
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        status = site_status(reply)
        if status is None or "refused" in status:
            continue
        sums = {k: float(v) for k, v in _c(reply)["metrics"].items()}
        per_site[str(status["site"])] = summarize(study.model, sums)
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + value
    return summarize(study.model, totals), per_site
