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
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Context

from healthlab.dp import epsilon_spent
from healthlab.encrypted import KeyHolder, cov, describe
from healthlab.errors import (
    DisclosureRefused,
    HealthLabError,
    InvalidInput,
)
from healthlab.federated.client_app import make_client_app
from healthlab.federated.flower_compat import install_engine, quick_grid
from healthlab.federated.masked_site import local_study, state
from healthlab.federated.server_app import Outcome, RoundReport, make_server_app
from healthlab.federated.spec import StudySpec
from healthlab.federated.study import (
    Preprocessing,
    Study,
    UpdateHook,
    check_live_grant,
)
from healthlab.federated.task import Model
from healthlab.receipts import Receipt, build_receipt
from healthlab.sites import Site, as_sites

__all__ = ["FederatedResult", "SimulatedSide", "train"]

_engine_lock = threading.Lock()
#: The defaults of every study setting, from :class:`StudySpec`.
_DEFAULT: dict[str, Any] = {f.name: f.default for f in fields(StudySpec)}


def simulation_round_timeout(n_sites: int) -> float:
    """The default deadline of a simulated round's step over ``n_sites``: the
    study's default (120 s) up to 500 sites, then growing with their square (a
    step's cost in Flower's in-memory link state is O(n²))."""
    base = float(_DEFAULT["round_timeout"])
    return base * max(1.0, (n_sites / 500) ** 2)


#: The delta at which a federated study's DP epsilon is reported.
FEDERATED_DELTA = 1e-5


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
        # divisor n, not n - 1: the loss's Hessian is then exactly the identity
        n = float(stats.loc["count", features].to_numpy(dtype=float).min())
        values, vectors = np.linalg.eigh(matrix.to_numpy() * (n - 1) / n)
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
    model: str = _DEFAULT["model"],
    rounds: int = _DEFAULT["rounds"],
    *,
    strategy: str = _DEFAULT["strategy"],
    researcher: str | None = None,
    epochs: int | None = _DEFAULT["epochs"],
    lr: float | None = _DEFAULT["lr"],
    l2: float = _DEFAULT["l2"],
    batch_size: int = _DEFAULT["batch_size"],
    proximal_mu: float = _DEFAULT["proximal_mu"],
    test_fraction: float = _DEFAULT["test_fraction"],
    seed: int = _DEFAULT["seed"],
    dropna: bool = _DEFAULT["dropna"],
    standardize: bool = _DEFAULT["standardize"],
    min_sites: int = _DEFAULT["min_sites"],
    round_timeout: float | None = None,
    max_update_norm: float = _DEFAULT["max_update_norm"],
    clip_norm: float | None = _DEFAULT["clip_norm"],
    dp_noise_multiplier: float | None = _DEFAULT["dp_noise_multiplier"],
    dp_clipping_norm: float | None = _DEFAULT["dp_clipping_norm"],
    secure: str = _DEFAULT["secure"],
    keys: KeyHolder | None = None,
    progress: Callable[[RoundReport], None] | None = None,
    update_hook: UpdateHook | None = None,
) -> FederatedResult:
    """Train a model across sites for prediction; the data never leaves them.

    This is for prediction (``predict_proba``, held-out metrics), not inference:
    it returns no standard errors, and its logistic fit is penalized (``l2``) and
    stops after ``rounds``. For coefficients with standard errors, confidence
    intervals and p-values use :func:`healthlab.encrypted.glm` (exact pooled
    maximum likelihood). Each site holds out ``test_fraction`` (default 0.2) of its
    rows for the history's metrics — ``result.test_index`` names them, the receipt
    records the fraction; pass ``test_fraction=0`` to train on every row. A site
    with fewer than its minimum rows to train on refuses; a site left out of a
    round is logged as a warning and named in the history and the receipt.

    Every setting, with its default and validation, is a field of
    :class:`~healthlab.federated.spec.StudySpec` (the same for a deployment).

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
        ``"median"`` (the last three need ``secure="none"``).
    secure:
        ``"masked"`` (the default): the protocol of a deployment
        (:mod:`healthlab.federated.masked_study`). Every value a site sends — its
        standardization moments, its update, its held-out sums and score histogram —
        is masked so that only the sum over the sites is readable; every site derives
        the next model itself from the others' checked contributions; the history has
        pooled metrics only. A site that refuses or fails mid-study stops it with
        :class:`~healthlab.errors.TooFewSites`. ``"none"``: each site's update and
        metrics reach the server in clear (robust strategies, server-side DP, the
        ``update_hook`` of a compromised site, per-site metrics).
    dp_noise_multiplier, dp_clipping_norm:
        Flower's server-side fixed-clipping Gaussian mechanism (``secure="none"``);
        recorded in the receipt.
    round_timeout:
        How long a step of a round may take, in seconds (a hang's deadline).
        Default: :func:`simulation_round_timeout` of the number of sites — 120 s,
        growing with the square of the sites beyond 500 (Flower's in-memory link
        scans every stored message for each node's pull: a step over 1,000
        simulated sites took ~70 s on 2 cores, more on a loaded machine).
    progress:
        Called after every round with its :class:`RoundReport` (default: tqdm).
    update_hook:
        Replace what a site sends (a compromised site, for tests and teaching). It
        sees every site's plaintext update, so it needs ``secure="none"``.

    Flower internals this installs (the in-process backend, the in-memory grid's
    shorter poll) are listed in :mod:`healthlab.federated.flower_compat`.

    Examples
    --------
    >>> result = train(
    ...     {"a": frame_a, "b": frame_b}, target="event", rounds=5
    ... )  # doctest: +SKIP
    >>> result.history[["round", "accuracy"]]  # doctest: +SKIP
    """
    site_list = as_sites(sites)
    if secure == "ckks":
        raise InvalidInput(
            'secure="ckks" was replaced by secure="masked" (the default): the '
            "protocol of a deployment, in which nothing per site reaches the server"
        )
    if secure != "none" and update_hook is not None:
        raise InvalidInput(
            "update_hook sees each site's plaintext update before it is masked; it is "
            'refused with secure aggregation (use secure="none" to simulate a '
            "compromised site)"
        )
    cols = list(features) if features is not None else _other_columns(site_list, target)
    spec = StudySpec(
        target=target,
        features=tuple(cols),
        model=model,
        rounds=rounds,
        strategy=strategy,
        epochs=epochs,
        lr=lr,
        l2=l2,
        batch_size=batch_size,
        proximal_mu=proximal_mu,
        seed=seed,
        test_fraction=test_fraction,
        dropna=dropna,
        standardize=standardize,
        min_sites=min_sites,
        max_update_norm=max_update_norm,
        clip_norm=clip_norm,
        dp_noise_multiplier=dp_noise_multiplier,
        dp_clipping_norm=dp_clipping_norm,
        secure=secure,
        expected_sites=len(site_list),
        round_timeout=(
            simulation_round_timeout(len(site_list))
            if round_timeout is None
            else round_timeout
        ),
    )
    gated = [s for s in site_list if s.gated]
    if gated and researcher is None:
        raise InvalidInput("these sites check grants on chain: pass researcher=")
    callback = progress or _tqdm_progress(rounds)
    if secure == "none":
        return _train_in_clear(
            site_list, spec, researcher, keys or KeyHolder(), callback, update_hook
        )
    if gated:
        ledger = gated[0].ledger
        assert ledger is not None
        assert researcher is not None
        spec = spec.sign(ledger, researcher)
    return _train_masked(site_list, spec, callback)


def _train_masked(
    site_list: list[Site], spec: StudySpec, callback: Callable[[RoundReport], None]
) -> FederatedResult:
    """The masked protocol of a deployment, on the simulation runtime."""
    from flwr.serverapp import Grid, ServerApp

    from healthlab.federated.masked_site import make_site_app
    from healthlab.federated.masked_study import (
        StudyLog,
        run_masked_study,
        wait_for_nodes,
    )

    log = StudyLog(spec, on_round=callback)
    outcome = Outcome()
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Any) -> None:
        try:
            quick_grid(grid)
            nodes = wait_for_nodes(grid, spec, poll=0.005)
            run_masked_study(grid, nodes, spec, log)
        except BaseException as exc:  # surfaced below, in the caller's thread
            outcome.error = exc

    _simulate(server, make_site_app(SimulatedSide(site_list, spec)), len(site_list))
    if outcome.error is not None:
        raise outcome.error
    if len(log.reports) != spec.rounds:
        raise HealthLabError(
            f"the study stopped after {len(log.reports)} of {spec.rounds} rounds"
        )
    stored = log.data["preprocessing"]
    prep = Preprocessing(
        tuple(float(c) for c in stored["center"]),
        tuple(tuple(float(v) for v in row) for row in stored["matrix"]),
    )
    taken = {str(s["name"]) for s in log.data["sites"]}
    members = [s for s in site_list if s.name in taken]
    identity = Preprocessing.identity(len(spec.features))
    test_index = {
        s.name: local_study(s, spec, identity).held_out_index(s) for s in members
    }
    receipt = _receipt(
        spec,
        log.params(),
        log.reports,
        members,
        spec.researcher or None,
        dict(log.data["refused_at_start"]),
        spec.hash,
        whiten=spec.model == "linear" and spec.standardize,
    )
    return FederatedResult(
        spec.model_family(),
        log.params(),
        list(spec.features),
        spec.target,
        prep,
        log.reports,
        receipt,
        test_index,
    )


class SimulatedSide:
    """The sites of a simulated masked study: the ``Site`` objects themselves.

    The members of a sum are the study's own sites that the server names (those
    that joined), with their own mask keys: the server cannot add a member or
    substitute a key, and each site checks it is one of them and that they are at
    least its ``min_sites``.
    """

    def __init__(self, sites: list[Site], study: StudySpec) -> None:
        self.sites = sites
        self.study = study
        self.keys = {s.name: s.mask_public_key for s in sites}

    def _site(self, context: Context) -> Site:
        return self.sites[int(context.node_config["partition-id"])]

    def name(self, context: Context) -> str:
        return self._site(context).name

    def open(self, context: Context) -> tuple[Site, StudySpec]:
        return self._site(context), self.study

    def join(self, site: Site, study: StudySpec, context: Context) -> None:
        return None

    def authorize(self, site: Site, study: StudySpec, context: Context) -> bool:
        record = state(context)
        if record.get("study-hash") == study.hash:
            return False
        site.authorize(study.signed_query(), query_hash=study.hash)
        record["study-hash"] = study.hash
        return True

    def check_grant(self, site: Site, study: StudySpec) -> None:
        check_live_grant(site, study.researcher)

    def member(self, site: Site) -> str:
        return site.name

    def peers(
        self, site: Site, study: StudySpec, proposed: Sequence[str] | None
    ) -> dict[str, bytes]:
        names = list(self.keys) if proposed is None else list(proposed)
        unknown = sorted(set(names) - set(self.keys))
        if unknown:
            raise DisclosureRefused(f"{unknown} are not sites of this study")
        if site.name not in names:
            raise DisclosureRefused(f"site {site.name} is not among the members")
        if len(set(names)) < site.policy.min_sites:
            raise DisclosureRefused(
                f"site {site.name}: a masked sum needs at least "
                f"{site.policy.min_sites} sites; {len(set(names))} take part"
            )
        return {name: self.keys[name] for name in names}


def _train_in_clear(
    site_list: list[Site],
    spec: StudySpec,
    researcher: str | None,
    keys: KeyHolder,
    callback: Callable[[RoundReport], None],
    update_hook: UpdateHook | None,
) -> FederatedResult:
    """``secure="none"``: Flower's strategies on updates and metrics in clear."""
    family = spec.model_family()
    cols = list(spec.features)
    whiten = family.name == "linear"
    prep = (
        _preprocessing(
            site_list,
            cols,
            family,
            researcher=researcher,
            keys=keys,
            dropna=spec.dropna,
            whiten=whiten,
            min_sites=spec.min_sites,
        )
        if spec.standardize
        else Preprocessing.identity(len(cols))
    )
    study = Study(
        site_list,
        cols,
        spec.target,
        family,
        spec.train_config(),
        prep,
        researcher,
        test_fraction=spec.test_fraction,
        seed=spec.seed,
        dropna=spec.dropna,
        update_hook=update_hook,
    )
    if any(s.gated for s in site_list):
        assert researcher is not None
        ledger = next(s.ledger for s in site_list if s.ledger is not None)
        study.signed = ledger.sign_query(
            researcher, study.hash, nonce=spec.seed + (1 << 40) + _nonce()
        )
    initial = family.init(len(cols), spec.seed)
    outcome = Outcome()
    client = make_client_app(study)
    server = make_server_app(
        study, spec.server_settings(), initial, outcome, on_round=callback
    )
    _simulate(server, client, len(site_list))
    if outcome.error is not None:
        raise outcome.error
    if len(outcome.rounds) != spec.rounds:
        raise HealthLabError(
            f"the study stopped after {len(outcome.rounds)} of {spec.rounds} rounds"
        )
    test_index = {
        s.name: study.data(s).test_index for s in site_list if s.name in study._data
    }
    taken = sorted({s for r in outcome.rounds for s in r.sites})
    refused = {k: v for r in outcome.rounds for k, v in r.refused.items()}
    receipt = _receipt(
        spec,
        outcome.params,
        outcome.rounds,
        [s for s in site_list if s.name in taken],
        researcher,
        refused,
        study.hash,
        whiten=whiten and spec.standardize,
    )
    return FederatedResult(
        family,
        outcome.params,
        cols,
        spec.target,
        prep,
        outcome.rounds,
        receipt,
        test_index,
    )


def _receipt(
    spec: StudySpec,
    params: list[np.ndarray],
    rounds: list[RoundReport],
    sites: list[Site],
    researcher: str | None,
    refused: dict[str, str],
    study_hash: str,
    *,
    whiten: bool,
) -> Receipt:
    parameters = {
        "model": spec.model,
        "features": list(spec.features),
        "target": spec.target,
        "rounds": spec.rounds,
        "strategy": spec.strategy,
        "local": spec.train_config().__dict__,
        "secure": spec.secure,
        "test_fraction": spec.test_fraction,
        "seed": spec.seed,
        "standardize": spec.standardize,
        "whiten": whiten,
        "min_sites": spec.min_sites,
        "max_update_norm": spec.max_update_norm,
        "clip_norm": spec.clip_norm,
        "differential_privacy": None
        if spec.dp_noise_multiplier is None
        else {
            "mechanism": "Gaussian, server-side fixed clipping (Flower)",
            "noise_multiplier": spec.dp_noise_multiplier,
            "clipping_norm": spec.dp_clipping_norm,
            "rounds": spec.rounds,
            "sampled_sites_per_round": spec.expected_sites,
            # every site's clipped update is in every round (no subsampling): the
            # rounds compose as Gaussian mechanisms, accounted as the sites' DP is
            "unit": "one site's update (site-level privacy)",
            "delta": FEDERATED_DELTA,
            "epsilon": epsilon_spent(
                [spec.dp_noise_multiplier] * spec.rounds, FEDERATED_DELTA
            ),
            "accountant": "prv-accountant, Gaussian composition (healthlab.dp)",
        },
    }
    final = {f"param{i}": p.tolist() for i, p in enumerate(params)}
    return build_receipt(
        kind="federated",
        result=final,
        queries=[{"kind": "federated", "study_hash": study_hash}],
        parameters=parameters,
        sites=sites,
        researcher=researcher,
        refused=refused,
        extra={
            "history": [
                {"round": r.round, "sites": r.sites, **dict(r.pooled)} for r in rounds
            ]
        },
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
