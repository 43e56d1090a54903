"""``train()``: run a federated study on Flower's Simulation Engine in this process.

Why an in-process backend (and not Ray)? Flower's simulation runtime (its LinkState,
Grid, ServerApp and ClientApp machinery, ``flwr.simulation.run_simulation``) takes a
pluggable :class:`~flwr.server.superlink.fleet.vce.backend.Backend`. Its Ray backend
shuts Ray down after every run (17–37 s to start again on 2 cores) and runs each
ClientApp in another process, where the sites' data, their SQL stores and the
embedded chain that holds the grants cannot follow. Our backend runs each ClientApp
in the kernel's own threads: it starts in milliseconds, so every ``train()`` in a
kernel reuses the same engine at no cost, and the grant gate reads the same chain
the notebook uses. Real isolation between hospitals is what the deployment runtime
(a SuperLink and one SuperNode per site, see :mod:`healthlab.federated.deploy`) is for.

``train()`` installs this backend and Flower's shorter in-memory polls through
:mod:`healthlab.federated.flower_compat` (the one module that touches Flower's
internals, checked against the installed flwr version).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from healthlab.encrypted import KeyHolder, cov, describe
from healthlab.errors import HealthLabError, InvalidInput
from healthlab.federated.client_app import make_client_app
from healthlab.federated.flower_compat import install_engine
from healthlab.federated.server_app import (
    STRATEGIES,
    Outcome,
    RoundReport,
    ServerSettings,
    make_server_app,
)
from healthlab.federated.study import Preprocessing, Study, UpdateHook
from healthlab.federated.task import Model, TrainConfig, get_model
from healthlab.receipts import Receipt, build_receipt
from healthlab.sites import Site, as_sites

__all__ = ["FederatedResult", "train"]

_engine_lock = threading.Lock()


@dataclass
class FederatedResult:
    """A trained federated model, its history and its receipt."""

    model: Model
    params: list[np.ndarray]
    features: list[str]
    target: str
    preprocessing: Preprocessing
    rounds: list[RoundReport] = field(repr=False)
    receipt: Receipt = field(repr=False)
    test_index: dict[str, list[Any]] = field(repr=False)

    @property
    def weights(self) -> list[np.ndarray]:
        """The final parameters (on the transformed features)."""
        return self.params

    def _x(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise InvalidInput(f"the frame lacks feature columns {missing}")
        return self.preprocessing.apply(frame[self.features].to_numpy(dtype=np.float64))

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Probability of the positive class (binary models) for each row."""
        if self.model.task != "binary":
            raise InvalidInput("predict_proba is for binary models; use predict")
        return self.model.predict(self.params, self._x(frame))

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Class labels (0/1) for binary models, values for regression."""
        scores = self.model.predict(self.params, self._x(frame))
        if self.model.task == "binary":
            return (scores >= 0.5).astype(int)
        return scores

    @property
    def history(self) -> pd.DataFrame:
        """One row per round: sites that took part, refusals, pooled held-out metrics,
        and each site's held-out metrics in ``per_site``."""
        rows = []
        for r in self.rounds:
            rows.append(
                {
                    "round": r.round,
                    "sites": list(r.sites),
                    "n_sites": len(r.sites),
                    "refused": dict(r.refused),
                    "rejected": dict(r.rejected),
                    **r.pooled,
                    "per_site": r.per_site,
                    "seconds": r.seconds,
                }
            )
        return pd.DataFrame(rows)

    @property
    def history_by_site(self) -> pd.DataFrame:
        """Long form: one row per (round, site) with that site's held-out metrics."""
        rows = [
            {"round": r.round, "site": site, **values}
            for r in self.rounds
            for site, values in r.per_site.items()
        ]
        return pd.DataFrame(rows)

    @property
    def coefficients(self) -> pd.Series:
        """Linear/logistic coefficients on the raw features (intercept first)."""
        if self.model.name not in ("linear", "logistic"):
            raise InvalidInput("coefficients exist for linear and logistic models")
        matrix = np.asarray(self.preprocessing.matrix)
        center = np.asarray(self.preprocessing.center)
        beta = matrix @ self.params[0]
        intercept = self.params[1][0] - center @ beta
        return pd.Series([intercept, *beta], index=["Intercept", *self.features])


def _preprocessing(
    sites: list[Site],
    features: list[str],
    model: Model,
    *,
    researcher: str | None,
    keys: KeyHolder,
    dropna: bool,
    whiten: bool,
    min_sites: int,
) -> Preprocessing:
    """Pooled standardization (or whitening) from the encrypted statistics."""
    # a site without a grant is skipped here as in the rounds (it refuses every round)
    options: dict[str, Any] = {
        "researcher": researcher,
        "keys": keys,
        "dropna": dropna,
        "on_refusal": "skip",
        "min_sites": min_sites,
    }
    if whiten:
        matrix = cov(sites, features, **options)
        stats = describe(sites, features, **options)
        center = stats.loc["mean", features].to_numpy(dtype=float)
        values, vectors = np.linalg.eigh(matrix.to_numpy())
        if values.min() <= 1e-12 * values.max():
            raise InvalidInput("the features are collinear; drop one to whiten")
        transform = vectors @ np.diag(values**-0.5) @ vectors.T
    else:
        stats = describe(sites, features, **options)
        center = stats.loc["mean", features].to_numpy(dtype=float)
        std = stats.loc["std", features].to_numpy(dtype=float).copy()
        std[~np.isfinite(std) | (std == 0)] = 1.0
        transform = np.diag(1.0 / std)
    rows: list[list[float]] = transform.tolist()
    return Preprocessing(
        tuple(float(c) for c in center), tuple(tuple(row) for row in rows)
    )


def train(
    sites: Sequence[Site] | Mapping[str, pd.DataFrame],
    target: str,
    features: Sequence[str] | None = None,
    model: str = "logistic",
    rounds: int = 10,
    *,
    strategy: str = "fedavg",
    researcher: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    l2: float = 0.0,
    batch_size: int = 0,
    proximal_mu: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    dropna: bool = False,
    standardize: bool = True,
    min_sites: int = 2,
    round_timeout: float = 60.0,
    max_update_norm: float = 1e4,
    clip_norm: float | None = None,
    dp_noise_multiplier: float | None = None,
    dp_clipping_norm: float | None = None,
    secure: str = "none",
    keys: KeyHolder | None = None,
    progress: Callable[[RoundReport], None] | None = None,
    update_hook: UpdateHook | None = None,
) -> FederatedResult:
    """Train a model across sites; the data never leaves them.

    Parameters
    ----------
    sites:
        ``healthlab.Site`` objects (gated: each checks the researcher's grant before
        every round) or ``{name: DataFrame}`` for an ungated simulation.
    target, features:
        The outcome column and the feature columns (default: every other column).
    model:
        ``"logistic"``, ``"linear"`` or ``"mlp"``.
    strategy:
        ``"fedavg"``, ``"fedprox"``, ``"fedadam"``, ``"trimmed"`` (trimmed mean) or
        ``"median"``.
    secure:
        ``"ckks"`` to send every update as masked, CKKS-encrypted totals that only
        the researcher decrypts, summed (robust strategies do not apply then).
    dp_noise_multiplier, dp_clipping_norm:
        Flower's server-side fixed-clipping Gaussian mechanism; recorded in the receipt.
    progress:
        Called after every round with its :class:`RoundReport` (default: tqdm).
    update_hook:
        Replace what a site sends (a compromised site, for tests and teaching). It
        sees every site's plaintext update, so it is refused with ``secure="ckks"``.

    Examples
    --------
    >>> result = train(
    ...     {"a": frame_a, "b": frame_b}, target="event", rounds=5
    ... )  # doctest: +SKIP
    >>> result.history[["round", "accuracy"]]  # doctest: +SKIP
    """
    site_list = as_sites(sites)
    if strategy not in STRATEGIES:
        raise InvalidInput(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if secure not in ("none", "ckks"):
        raise InvalidInput('secure must be "none" or "ckks"')
    if secure != "none" and update_hook is not None:
        raise InvalidInput(
            "update_hook sees each site's plaintext update before it is masked; it is "
            'refused with secure aggregation (use secure="none" to simulate a '
            "compromised site)"
        )
    if secure == "ckks" and strategy not in ("fedavg", "fedprox"):
        raise InvalidInput("secure aggregation sums updates: use fedavg or fedprox")
    if rounds < 1:
        raise InvalidInput("rounds must be at least 1")
    family = get_model(model)
    cols = list(features) if features is not None else _other_columns(site_list, target)
    if target in cols:
        raise InvalidInput(f"{target!r} is both the target and a feature")
    keys = keys or KeyHolder()
    whiten = family.name == "linear"
    prep = (
        _preprocessing(
            site_list,
            cols,
            family,
            researcher=researcher,
            keys=keys,
            dropna=dropna,
            whiten=whiten,
            min_sites=min_sites,
        )
        if standardize
        else Preprocessing.identity(len(cols))
    )
    defaults = {"linear": (1, 1.0), "logistic": (10, 0.5), "mlp": (5, 0.1)}
    local_epochs, local_lr = defaults[family.name]
    config = TrainConfig(
        epochs=epochs if epochs is not None else local_epochs,
        lr=lr if lr is not None else local_lr,
        l2=l2,
        batch_size=batch_size,
        seed=seed,
    )
    study = Study(
        site_list,
        cols,
        target,
        family,
        config,
        prep,
        researcher,
        test_fraction=test_fraction,
        seed=seed,
        dropna=dropna,
        secure=secure,
        update_hook=update_hook,
    )
    if any(s.gated for s in site_list):
        if researcher is None:
            raise InvalidInput("these sites check grants on chain: pass researcher=")
        ledger = next(s.ledger for s in site_list if s.ledger is not None)
        study.signed = ledger.sign_query(
            researcher, study.hash, nonce=seed + (1 << 40) + _nonce()
        )
    settings = ServerSettings(
        rounds=rounds,
        strategy=strategy,
        min_sites=min_sites,
        round_timeout=round_timeout,
        max_update_norm=max_update_norm,
        clip_norm=clip_norm,
        dp_noise_multiplier=dp_noise_multiplier,
        dp_clipping_norm=dp_clipping_norm,
        proximal_mu=proximal_mu,
    )
    initial = family.init(len(cols), seed)
    outcome = Outcome()
    callback = progress or _tqdm_progress(rounds)
    public = keys.public_context() if secure == "ckks" else None
    client = make_client_app(study, public)
    server = make_server_app(
        study, settings, initial, outcome, on_round=callback, keys=keys
    )
    _simulate(server, client, len(site_list))
    if outcome.error is not None:
        raise outcome.error
    if len(outcome.rounds) != rounds:
        raise HealthLabError(
            f"the study stopped after {len(outcome.rounds)} of {rounds} rounds"
        )
    test_index = {
        s.name: study.data(s).test_index for s in site_list if s.name in study._data
    }
    parameters = {
        "model": family.name,
        "features": cols,
        "target": target,
        "rounds": rounds,
        "strategy": strategy,
        "local": config.__dict__,
        "secure": secure,
        "test_fraction": test_fraction,
        "seed": seed,
        "standardize": standardize,
        "whiten": whiten and standardize,
        "min_sites": min_sites,
        "max_update_norm": max_update_norm,
        "clip_norm": clip_norm,
        "differential_privacy": None
        if dp_noise_multiplier is None
        else {
            "mechanism": "Gaussian, server-side fixed clipping (Flower)",
            "noise_multiplier": dp_noise_multiplier,
            "clipping_norm": dp_clipping_norm,
            "rounds": rounds,
            "sampled_sites_per_round": len(site_list),
        },
    }
    final = {f"param{i}": p.tolist() for i, p in enumerate(outcome.params)}
    taken = sorted({s for r in outcome.rounds for s in r.sites})
    refused = {k: v for r in outcome.rounds for k, v in r.refused.items()}
    receipt = build_receipt(
        kind="federated",
        result=final,
        queries=[{"kind": "federated", "study_hash": study.hash}],
        parameters=parameters,
        sites=[s for s in site_list if s.name in taken],
        researcher=researcher,
        refused=refused,
        extra={
            "history": [
                {
                    "round": r.round,
                    "sites": r.sites,
                    **{k: v for k, v in r.pooled.items()},
                }
                for r in outcome.rounds
            ]
        },
    )
    return FederatedResult(
        family, outcome.params, cols, target, prep, outcome.rounds, receipt, test_index
    )


_counter = iter(range(1, 1 << 62))


def _nonce() -> int:
    return next(_counter)


def _other_columns(sites: list[Site], target: str) -> list[str]:
    columns = [c for c in sites[0].columns if c != target]
    if not columns:
        raise InvalidInput("no feature columns besides the target")
    return columns


def _tqdm_progress(rounds: int) -> Callable[[RoundReport], None]:
    from tqdm.auto import tqdm

    bar = tqdm(total=rounds, desc="federated rounds", leave=False)

    def update(report: RoundReport) -> None:
        shown = {k: round(v, 4) for k, v in report.pooled.items() if k != "loss"}
        bar.set_postfix(sites=len(report.sites), **shown)
        bar.update(1)
        if report.round == rounds:
            bar.close()

    return update


def _simulate(server: Any, client: Any, n_sites: int) -> None:
    """One run on Flower's simulation runtime with the in-process backend."""
    from flwr.simulation import run_simulation

    install_engine()
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    with _engine_lock:
        flwr_logger.setLevel(logging.ERROR)
        try:
            run_simulation(
                server_app=server,
                client_app=client,
                num_supernodes=n_sites,
                backend_name="healthlab-inprocess",
                backend_config={"init_args": {"num_cpus": 2}},
            )
        finally:
            flwr_logger.setLevel(level)
