"""The site's ClientApp on Flower's deployment runtime (``app``, one SuperNode a site).

The site reads who it is from its SuperNode's node config (see
:class:`~healthlab.federated.deploy.SiteConfig`: ``site-name``, ``data-path`` or
``sql-url`` + ``table``, ``dataset-id``, ``rpc-url``, ``registry``, ``key-path``,
``state-dir``) and the study from the run config
(:class:`~healthlab.federated.deploy.StudyConfig`). It runs inside the site runtime
(:mod:`healthlab.federated.deploy.runtime`), which answers every message of the
site's SuperNode with this app and refuses any other app bundle; what must last
across the messages of a run lives in the run's ``context.state``.

Messages:

* ``query.hello`` — the site checks the researcher's signature of the study (its
  chain, registry, freshness, that the nonce was not used in another run) and the
  live grant on its dataset, and answers with its name, its row count (the cap on the
  example counts it may claim), its dataset and content hash, and its X25519 public
  key; or refuses.
* ``query.moments`` — its ``n``, ``Σx`` and ``Σxxᵀ`` over the feature columns as
  exact fixed-point digits plus pairwise masks shared with the other sites
  (:mod:`healthlab.encrypted.encoding`): only the sum across sites is readable. The
  members of the sum are exactly the signed study's datasets, with the mask keys
  their owners bound on chain (:func:`study_peers`); nothing of it comes from the
  server.
* ``train`` / ``evaluate`` — :func:`healthlab.federated.client_app.make_client_app`'s
  handlers, unchanged: the grant is checked again (``Study.gate``) before local
  training or held-out metrics, on features transformed with the public pooled
  preprocessing that arrives with the message.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from healthlab.errors import (
    AccessDenied,
    DataRefused,
    DisclosureRefused,
    HealthLabError,
    SignatureInvalid,
)
from healthlab.federated.client_app import make_client_app, refusal
from healthlab.federated.deploy import (
    SiteConfig,
    StudyConfig,
    ensure_state_dir,
    load_site_key,
)
from healthlab.federated.masked import Contribution, contribute, from_record, open_sum
from healthlab.federated.study import Preprocessing, Study
from healthlab.sites import Site

__all__ = [
    "HIST_LEVELS",
    "PREPROCESSING",
    "RELAYED",
    "app",
    "eval_size",
    "eval_totals",
    "histogram_level",
    "load_site",
    "peer_id",
    "preprocessing_record",
    "score_histogram",
    "study_peers",
    "transform_from_moments",
]

#: Content key of the public pooled preprocessing the server attaches to messages.
PREPROCESSING = "preprocessing"
#: Content key of the members' contributions of the last step, relayed by the server.
RELAYED = "relayed"
_STATE = "healthlab"
_logger = logging.getLogger("healthlab.federated.site")

app = ClientApp()


def preprocessing_record(prep: Preprocessing) -> ConfigRecord:
    """The public transform as a message record (``center``, row-major ``matrix``)."""
    matrix = np.asarray(prep.matrix, dtype=np.float64)
    return ConfigRecord(
        {
            "center": [float(c) for c in prep.center],
            "matrix": [float(v) for v in matrix.ravel()],
            "p": len(prep.center),
        }
    )


def _preprocessing(msg: Message, study: StudyConfig) -> Preprocessing:
    content: Any = msg.content
    p = len(study.features)
    if PREPROCESSING not in content:
        if study.standardize:
            raise DataRefused(
                "the study standardizes features but the message carries no pooled "
                "preprocessing"
            )
        return Preprocessing.identity(p)
    record = content[PREPROCESSING]
    center = [float(c) for c in record["center"]]
    flat = np.asarray([float(v) for v in record["matrix"]], dtype=np.float64)
    if len(center) != p or flat.size != p * p or not np.isfinite(flat).all():
        raise DataRefused("the preprocessing sent with the message is malformed")
    rows = flat.reshape(p, p).tolist()
    return Preprocessing(tuple(center), tuple(tuple(r) for r in rows))


def load_site(config: SiteConfig) -> Site:
    """The site's data, dataset, chain and key material, from its node config.

    Loaded afresh for every message (the data may change between messages): replay
    protection across messages and runs lives in ``state-dir``, not in memory.
    """
    from healthlab.ledger import Ledger

    ledger = Ledger.connect(config.rpc_url, config.registry, deploy=False)
    data: Any
    if config.data is not None:
        data = Path(config.data).expanduser()
    else:
        from healthlab.data.stores import SQLStore

        assert config.table is not None
        store = SQLStore(config.database_url())
        try:
            data = store.read_table(config.table)
        finally:
            store.close()
    key_path = config.key_path or (
        str(Path(config.state_dir) / "mask-key.pem") if config.state_dir else None
    )
    # a deployed site keeps one key for the whole run (Flower starts a process per
    # message), so it loads its own
    site = Site(
        config.name,
        data,
        dataset_id=config.dataset_id,
        ledger=ledger,
        mask_key=load_site_key(key_path) if key_path is not None else None,
    )
    if config.verify_content:
        registered = ledger.dataset(config.dataset_id).content_hash
        if registered.lower() != site.content_hash.lower():
            raise DataRefused(
                f"site {config.name}: the data loaded does not match the content hash "
                f"registered for dataset {config.dataset_id}"
            )
    return site


def _site_and_study(context: Context) -> tuple[SiteConfig, Site, StudyConfig]:
    site_config = SiteConfig.from_node_config(context.node_config)
    study = StudyConfig.from_run_config(context.run_config)
    return site_config, load_site(site_config), study


def _authorize(
    site: Site, site_config: SiteConfig, study: StudyConfig, context: Context
) -> bool:
    """The researcher's signature, once per run (remembered in ``context.state``);
    returns whether this message was the first (the grant was checked with it)."""
    state: Any = context.state
    known = state[_STATE]["study-hash"] if _STATE in state else None
    if known == study.hash:
        return False
    signed = study.signed_query()
    if signed is None:
        raise SignatureInvalid(
            f"site {site.name} only takes part in studies signed by a researcher"
        )
    if signed.query_hash.lower() != study.hash.lower():
        raise SignatureInvalid(
            f"site {site.name}: the study's settings differ from what the researcher "
            "signed"
        )
    if study.datasets and site.dataset_id not in study.datasets:
        raise AccessDenied(
            f"site {site.name}: dataset {site.dataset_id} is not part of the signed "
            f"study (datasets {list(study.datasets)})"
        )
    _check_nonce(site_config, signed.researcher, signed.nonce, context.run_id)
    site.authorize(signed, query_hash=study.hash)
    _record_nonce(site_config, signed.researcher, signed.nonce, context.run_id)
    state[_STATE] = ConfigRecord({"study-hash": study.hash})
    _logger.info("site %s: study %s authorized", site.name, study.hash[:10])
    return True


def _nonce_file(site_config: SiteConfig) -> Path | None:
    if site_config.state_dir is None:
        return None
    return ensure_state_dir(site_config.state_dir) / "signatures.json"


def _check_nonce(
    site_config: SiteConfig, researcher: str, nonce: int, run: int
) -> None:
    file = _nonce_file(site_config)
    if file is None or not file.exists():
        return
    used = json.loads(file.read_text())
    earlier = used.get(f"{researcher.lower()}:{nonce}")
    if earlier is not None and earlier != run:
        raise SignatureInvalid(
            f"site {site_config.name}: this signed study was already used in run "
            f"{earlier} (replay); the researcher must sign it again"
        )


def _record_nonce(
    site_config: SiteConfig, researcher: str, nonce: int, run: int
) -> None:
    file = _nonce_file(site_config)
    if file is None:
        return
    used = json.loads(file.read_text()) if file.exists() else {}
    used[f"{researcher.lower()}:{nonce}"] = run
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(used, indent=1))
    os.replace(tmp, file)


def _check_grant(site: Site, study: StudyConfig) -> None:
    assert site.ledger is not None
    assert site.dataset_id is not None
    if not site.ledger.has_access(site.dataset_id, study.researcher):
        raise AccessDenied(
            f"site {site.name}: the grant on dataset {site.dataset_id} is no longer "
            "live (revoked or expired); this site stops contributing"
        )


def peer_id(dataset_id: int) -> str:
    """A member of a masked sum: named by its dataset (the study signs those)."""
    return f"dataset-{dataset_id}"


def study_peers(site: Site, study: StudyConfig) -> dict[str, bytes]:
    """The members of a masked sum and their X25519 keys: exactly the datasets of
    the signed study, with the keys their owners bound on chain.

    Nothing comes from the server: a server cannot add a member whose key it holds,
    drop one, or substitute a key, so one site's masked totals stay closed to it.
    """
    assert site.ledger is not None
    if not study.datasets:
        raise DisclosureRefused(
            f"site {site.name}: a masked sum needs the study's datasets, signed by "
            "the researcher (StudyConfig datasets=...)"
        )
    if site.dataset_id not in study.datasets:
        raise AccessDenied(
            f"site {site.name}: dataset {site.dataset_id} is not part of the signed "
            "study"
        )
    if len(study.datasets) < site.policy.min_sites:
        raise DisclosureRefused(
            f"site {site.name}: a pooled result needs at least "
            f"{site.policy.min_sites} sites; the study names {len(study.datasets)}"
        )
    peers: dict[str, bytes] = {}
    for dataset in study.datasets:
        bound = site.ledger.site_keys(dataset)
        if bound is None:
            raise DisclosureRefused(
                f"site {site.name}: dataset {dataset} of the study has no site keys "
                "bound on chain; its owner binds them (Ledger.bind_site_keys) before "
                "a masked sum"
            )
        peers[peer_id(dataset)] = bound.mask_key
    if peers[peer_id(int(site.dataset_id or 0))] != site.mask_public_key:
        raise DisclosureRefused(
            f"site {site.name}: its mask key is not the one bound to dataset "
            f"{site.dataset_id} on chain; bind this node's key (Ledger.bind_site_keys) "
            "or start the node with the bound key"
        )
    if len(set(peers.values())) != len(peers):
        raise DisclosureRefused(
            f"site {site.name}: two datasets of the study are bound to the same mask "
            "key; each site needs its own"
        )
    return peers


def _gated(context: Context) -> tuple[SiteConfig, Site, StudyConfig]:
    """The site and the study, after the signature (once a run) and the grant."""
    site_config, site, study = _site_and_study(context)
    if not _authorize(site, site_config, study, context):
        _check_grant(site, study)
    return site_config, site, study


def _site_name(context: Context) -> str:
    return str(context.node_config.get("site-name", f"node {context.node_id}"))


_REFUSED = (HealthLabError, OSError)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Signature and grant check; the site's name, row count, dataset and public key."""
    try:
        site_config, site, study = _site_and_study(context)
        _check_secure(site_config, study)
        if not _authorize(site, site_config, study, context):
            _check_grant(site, study)
        if study.standardize or study.secure != "none":
            study_peers(site, study)  # refuse now, not after every site has joined
    except _REFUSED as exc:
        return refusal(msg, _site_name(context), str(exc))
    has_key = site_config.key_path is not None or site_config.state_dir is not None
    status = ConfigRecord(
        {
            "site": site.name,
            "rows": site.n_rows,
            "dataset-id": int(site.dataset_id or 0),
            "content-hash": site.content_hash,
            "mask-key": site.mask_public_key if has_key else b"",
        }
    )
    return Message(RecordDict({"status": status}), reply_to=msg)


def _label(study: StudyConfig, step: str, run_id: int) -> str:
    return f"{study.hash}|{step}|{run_id}"


def _n_moments(p: int) -> int:
    return 1 + p + p * (p + 1) // 2


def _state(context: Context) -> Any:
    state: Any = context.state
    return state[_STATE]


@app.query("moments")
def moments(msg: Message, context: Context) -> Message:
    """Masked ``n, Σx, Σxxᵀ`` (upper triangle) over the study's feature columns,
    tagged for every other member (:mod:`healthlab.federated.masked`)."""
    try:
        site_config, site, study = _gated(context)
        if site_config.key_path is None and site_config.state_dir is None:
            raise DisclosureRefused(
                f"site {site.name} has no key material for masked sums: start its "
                "node with key-path or state-dir"
            )
        kept, _ = site.rows(list(study.features), dropna=study.dropna)
        n = len(kept)
        if n < site.policy.min_rows:
            raise DisclosureRefused(
                f"site {site.name}: fewer than {site.policy.min_rows} complete rows"
            )
        x = kept.to_numpy(dtype=np.float64)
        upper = np.triu_indices(x.shape[1])
        totals = np.concatenate([[float(n)], x.sum(axis=0), (x.T @ x)[upper]])
        sent = _send(site, study, context, "moments", totals)
    except _REFUSED as exc:
        return refusal(msg, _site_name(context), str(exc))
    return _contribution_reply(msg, site.name, sent)


def _send(
    site: Site, study: StudyConfig, context: Context, step: str, totals: Any
) -> Contribution:
    """This site's masked, tagged contribution to ``step``; its digest is kept so
    that the site recognises its own vector when the server relays it."""
    sent = contribute(
        site,
        study_peers(site, study),
        peer_id(int(site.dataset_id or 0)),
        totals,
        _label(study, step, context.run_id),
    )
    _state(context)[f"sent-{step}"] = sent.digest
    return sent


def _contribution_reply(msg: Message, name: str, sent: Contribution) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord([sent.digits]),
            "status": ConfigRecord(
                {"site": name, "member": sent.member, "tags": sent.tags}
            ),
        }
    )
    return Message(content, reply_to=msg)


def transform_from_moments(sums: list[float], p: int, *, linear: bool) -> Preprocessing:
    """The public transform from pooled ``n, Σx, Σxxᵀ``: ``(x - mean) / std`` per
    column, or whitening ``(x - mean) @ C^-½`` for linear models (as the
    simulation's :func:`healthlab.federated.train` does)."""
    n = sums[0]
    if n < 2:
        raise DataRefused("fewer than 2 complete rows across the sites")
    mean = np.asarray(sums[1 : 1 + p]) / n
    cross = np.zeros((p, p))
    cross[np.triu_indices(p)] = sums[1 + p :]
    cross = cross + np.triu(cross, 1).T
    cov = (cross - n * np.outer(mean, mean)) / (n - 1)
    if linear:
        values, vectors = np.linalg.eigh(cov)
        if values.min() <= 1e-12 * values.max():
            raise DataRefused("the features are collinear; drop one to whiten")
        transform = vectors @ np.diag(values**-0.5) @ vectors.T
    else:
        std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        std[~np.isfinite(std) | (std == 0)] = 1.0
        transform = np.diag(1.0 / std)
    return Preprocessing(
        tuple(float(c) for c in mean),
        tuple(tuple(float(v) for v in row) for row in transform.tolist()),
    )


def _flat(params: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(p) for p in params])


def _unflat(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    out, start = [], 0
    for p in like:
        out.append(np.asarray(flat[start : start + p.size]).reshape(p.shape))
        start += p.size
    return out


def _apply_relayed(
    msg: Message, context: Context, site: Site, study: StudyConfig, want: str
) -> None:
    """Fold the contributions the server relays for step ``want`` into the site's
    state (once), after checking them (:func:`healthlab.federated.masked.open_sum`):
    ``moments`` gives the transform, ``train-r`` the model of round r."""
    state = _state(context)
    if f"done-{want}" in state:
        return
    content: Any = msg.content
    if RELAYED not in content:
        raise DataRefused(
            f"the message carries no relayed contributions of step {want!r}: this "
            "site trains and evaluates only the model the sites' own sums produce"
        )
    step, contributions = from_record(content[RELAYED])
    if step != want:
        raise DataRefused(f"the relayed step is {step!r}, this site expects {want!r}")
    p = len(study.features)
    family = study.model_family()
    init = family.init(p, study.seed)
    n_totals = _n_moments(p) if step == "moments" else _flat(init).size + 1
    sums = open_sum(
        site,
        study_peers(site, study),
        peer_id(int(site.dataset_id or 0)),
        contributions,
        _label(study, step, context.run_id),
        own_digest=str(state.get(f"sent-{step}", "")),
        n_totals=n_totals,
    )
    if step == "moments":
        prep = transform_from_moments(sums, p, linear=study.model == "linear")
        state["prep"] = [*prep.center, *np.ravel(prep.matrix).tolist()]
    else:
        n = sums[-1]
        if n < 1:
            raise DataRefused(f"step {step}: no training rows across the sites")
        state["model"] = (np.asarray(sums[:-1]) / n).tolist()
        state["model-round"] = int(step.split("-")[1])
    state[f"done-{step}"] = True


def _site_prep(context: Context, study: StudyConfig) -> Preprocessing:
    p = len(study.features)
    if not study.standardize:
        return Preprocessing.identity(p)
    values = [float(v) for v in _state(context)["prep"]]
    matrix = np.asarray(values[p:]).reshape(p, p)
    return Preprocessing(tuple(values[:p]), tuple(tuple(r) for r in matrix.tolist()))


def _site_model(context: Context, study: StudyConfig, rnd: int) -> list[np.ndarray]:
    """The model of round ``rnd`` (0: the study's initial model), as derived here."""
    init = study.model_family().init(len(study.features), study.seed)
    if rnd == 0:
        return [np.asarray(p, dtype=np.float64) for p in init]
    state = _state(context)
    if int(state.get("model-round", 0)) != rnd:
        raise DataRefused(f"this site has not derived the model of round {rnd}")
    return _unflat(np.asarray(state["model"], dtype=np.float64), init)


def _local_study(site: Site, study: StudyConfig, prep: Preprocessing) -> Study:
    local = Study(
        [site],
        list(study.features),
        study.target,
        study.model_family(),
        study.train_config(),
        prep,
        study.researcher,
        test_fraction=study.test_fraction,
        seed=study.seed,
        dropna=study.dropna,
    )
    local.mark_authorized(site)  # the signature was checked against the study hash
    return local


def _masked_train(msg: Message, context: Context) -> Message:
    """Round r: the model of round r-1 as the sites' own sums give it, trained on
    this site's rows; n·w and n sent masked and tagged."""
    try:
        _, site, study = _gated(context)
        config: Any = msg.content["config"]
        rnd = int(config["round"])
        if rnd > 1:
            _apply_relayed(msg, context, site, study, f"train-{rnd - 1}")
        elif study.standardize:
            _apply_relayed(msg, context, site, study, "moments")
        params = _site_model(context, study, rnd - 1)
        local = _local_study(site, study, _site_prep(context, study))
        data = local.data(site)
        base = study.train_config()
        fit = replace(base, seed=base.seed + rnd, proximal_mu=_mu(study))
        new = study.model_family().fit(params, data.x_train, data.y_train, fit)
        flat = _flat(new)
        if not np.isfinite(flat).all():
            raise DataRefused(f"site {site.name}: the local update is not finite")
        if study.clip_norm > 0:  # clipped here: the server sees no single update
            update = flat - _flat(params)
            norm = float(np.linalg.norm(update))
            if norm > study.clip_norm:
                flat = _flat(params) + update * (study.clip_norm / norm)
        n = len(data.y_train)
        sent = _send(
            site, study, context, f"train-{rnd}", np.concatenate([flat * n, [float(n)]])
        )
    except _REFUSED as exc:
        return refusal(msg, _site_name(context), str(exc))
    return _contribution_reply(msg, site.name, sent)


def _mu(study: StudyConfig) -> float:
    return study.proximal_mu if study.strategy == "fedprox" else 0.0


#: Score-bin counts of the pooled AUC in a deployment, finest first. Each site says
#: (masked) for which of them its histogram would have a non-empty cell below its
#: minimum of rows; the finest level no site objects to is used, in a second masked
#: sum, or none: no pooled cell is ever below a site's minimum.
HIST_LEVELS = (10, 5, 2)


def score_histogram(
    model: Any, params: list[np.ndarray], x: np.ndarray, y: np.ndarray, bins: int
) -> np.ndarray:
    prediction = model.predict(params, x)
    index = np.minimum((prediction * bins).astype(int), bins - 1)
    return np.concatenate(
        [np.bincount(index[y == label], minlength=bins) for label in (0, 1)]
    ).astype(np.float64)


def eval_totals(
    model: Any, params: list[np.ndarray], x: np.ndarray, y: np.ndarray, min_cell: int
) -> np.ndarray:
    """A site's held-out sums in a fixed order: ``n, loss_sum``, then ``correct``
    and one flag per :data:`HIST_LEVELS` (1: a non-empty cell of that histogram is
    below ``min_cell``) for binary models, or ``sse, sy, syy`` for regression."""
    prediction = model.predict(params, x)
    head = [float(len(y)), float(model.loss(params, x, y) * len(y))]
    if model.task != "binary":
        sse = float(np.sum(np.square(prediction - y)))
        return np.asarray([*head, sse, float(np.sum(y)), float(np.sum(y * y))])
    correct = float(np.sum((prediction >= 0.5) == (y == 1)))
    flags = []
    for bins in HIST_LEVELS:
        counts = score_histogram(model, params, x, y, bins)
        flags.append(float(np.any((counts > 0) & (counts < min_cell))))
    return np.asarray([*head, correct, *flags])


def eval_size(task: str) -> int:
    """Length of :func:`eval_totals` for a model task."""
    return 2 + (1 + len(HIST_LEVELS) if task == "binary" else 3)


def histogram_level(sums: list[float]) -> int | None:
    """The finest histogram no site objects to, from pooled :func:`eval_totals`."""
    for i, bins in enumerate(HIST_LEVELS):
        if round(sums[3 + i]) == 0:
            return bins
    return None


def _masked_evaluate(msg: Message, context: Context) -> Message:
    """Held-out sums of the model of round r (derived here), masked."""
    try:
        _, site, study = _gated(context)
        content: Any = msg.content
        rnd = int(content["config"]["round"])
        _apply_relayed(msg, context, site, study, f"train-{rnd}")
        params = _site_model(context, study, rnd)
        local = _local_study(site, study, _site_prep(context, study))
        data = local.data(site)
        if len(data.y_test) < site.policy.min_rows:
            raise DisclosureRefused(
                f"site {site.name}: too few held-out rows to report metrics"
            )
        totals = eval_totals(
            study.model_family(), params, data.x_test, data.y_test, site.policy.min_rows
        )
        sent = _send(site, study, context, f"eval-{rnd}", totals)
    except _REFUSED as exc:
        return refusal(msg, _site_name(context), str(exc))
    return _contribution_reply(msg, site.name, sent)


@app.query("histogram")
def histogram(msg: Message, context: Context) -> Message:
    """The held-out score histogram of round r, masked, at the finest level the
    pooled flags of the relayed (checked) evaluation allow."""
    try:
        _, site, study = _gated(context)
        content: Any = msg.content
        rnd = int(content["config"]["round"])
        family = study.model_family()
        if family.task != "binary":
            raise DataRefused("a score histogram is for binary models")
        if RELAYED not in content:
            raise DataRefused(
                f"the histogram of round {rnd} needs its evaluation relayed"
            )
        step, contributions = from_record(content[RELAYED])
        if step != f"eval-{rnd}":
            raise DataRefused(
                f"the histogram of round {rnd} needs its evaluation relayed"
            )
        sums = open_sum(
            site,
            study_peers(site, study),
            peer_id(int(site.dataset_id or 0)),
            contributions,
            _label(study, step, context.run_id),
            own_digest=str(_state(context).get(f"sent-{step}", "")),
            n_totals=eval_size(family.task),
        )
        bins = histogram_level(sums)
        if bins is None:
            raise DisclosureRefused(
                "every histogram level has a cell below some site's minimum of rows"
            )
        local = _local_study(site, study, _site_prep(context, study))
        data = local.data(site)
        counts = score_histogram(
            family, _site_model(context, study, rnd), data.x_test, data.y_test, bins
        )
        if np.any((counts > 0) & (counts < site.policy.min_rows)):
            raise DisclosureRefused("the pooled flags do not match this site's data")
        sent = _send(site, study, context, f"hist-{rnd}", counts)
    except _REFUSED as exc:
        return refusal(msg, _site_name(context), str(exc))
    return _contribution_reply(msg, site.name, sent)


def _check_secure(site_config: SiteConfig, study: StudyConfig) -> None:
    if study.secure == "none" and site_config.require_secure:
        raise DisclosureRefused(
            f"site {site_config.name} sends nothing per site in clear: it takes part "
            'only in studies with secure="masked" (its operator may allow '
            "secure=none with require-secure=false)"
        )


def _delegate(msg: Message, context: Context) -> Message:
    """secure="none": the simulation's ClientApp handler on this site's data."""
    try:
        site_config, site, study = _site_and_study(context)
        _check_secure(site_config, study)
        _authorize(site, site_config, study, context)
        prep = _preprocessing(msg, study)
    except _REFUSED as exc:
        return refusal(msg, _site_name(context), str(exc))
    # The signature was checked above against the deployment's study hash; Study.gate
    # checks the grant again before the round, as in the simulation.
    inner = make_client_app(_local_study(site, study, prep))
    scoped = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config={"partition-id": 0},
        state=context.state,
        run_config=context.run_config,
    )
    return inner(msg, scoped)


def _secure(context: Context) -> bool:
    return str(context.run_config.get("secure", "masked")) != "none"


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training: masked and checked (``secure="masked"``) or in clear."""
    if _secure(context):
        return _masked_train(msg, context)
    return _delegate(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out metric sums: masked (``secure="masked"``) or in clear."""
    if _secure(context):
        return _masked_evaluate(msg, context)
    return _delegate(msg, context)
