"""The site's half of a masked study, the same in simulation and in deployment.

A :class:`SiteSide` says where a site's handlers find the site, the study and the
members of a masked sum:

* in a deployment (:mod:`healthlab.federated.deployed_client`) the site is loaded
  from its SuperNode's node config, the study from the signed run config, and the
  members are exactly the signed study's datasets with the mask keys their owners
  bound on chain;
* in simulation (:func:`healthlab.federated.train`) the site is one of the study's
  ``Site`` objects and the members are the study's own sites that joined, with their
  own keys.

In both, nothing of a member's key or identity comes from the server, and the
handlers below are the same code:

* ``query.hello`` — the researcher's signature (once a run) and the live grant; the
  site's name, member id, row count, dataset and content hash.
* ``query.moments`` — masked ``n, Σx, Σxxᵀ`` over the feature columns.
* ``train`` — round r: the model of round r-1 *as this site derives it* from the
  relayed, checked contributions of round r-1 (or the study's initial model), trained
  on this site's rows; masked ``n·w`` and ``n``.
* ``evaluate`` — held-out sums of the model of round r (derived here), masked, with
  one flag per histogram level (a cell below the site's minimum of rows).
* ``query.histogram`` — the held-out score histogram at the finest level no site
  objects to, masked.

Every contribution is masked for, and tagged to, the members of the step
(:mod:`healthlab.federated.masked`); a site contributes to each step of a run once,
always with the same members, so a server cannot difference two sums of one step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from healthlab.errors import DataRefused, DisclosureRefused, HealthLabError
from healthlab.federated.masked import (
    Contribution,
    chain,
    contribute,
    from_record,
    open_sum,
)
from healthlab.federated.spec import StudySpec
from healthlab.federated.study import Preprocessing, Study
from healthlab.federated.task import Model
from healthlab.site_data import numeric
from healthlab.sites import Site

__all__ = [
    "HIST_LEVELS",
    "MEMBERS",
    "RELAYED",
    "RELAYED_EVAL",
    "Handler",
    "SiteSide",
    "eval_size",
    "eval_totals",
    "histogram_level",
    "make_site_app",
    "peer_id",
    "refusal",
    "score_histogram",
    "state",
    "transform_from_moments",
]

#: Content key of the members' contributions of the last step, relayed by the server.
RELAYED = "relayed"
#: Content key of the relayed evaluation a histogram step needs (``query.steps``).
RELAYED_EVAL = "relayed-eval"
#: Config key of the members of the study's masked sums, as the server proposes them.
MEMBERS = "members"
#: Where a site keeps what lasts across the messages of a run (``context.state``).
STATE = "healthlab"
_logger = logging.getLogger("healthlab.federated.site")
_REFUSED = (HealthLabError, OSError)


class SiteSide(Protocol):
    """Where the masked handlers find the site, the study and the sum's members."""

    def name(self, context: Context) -> str:
        """The site's name for a refusal (before anything is loaded)."""
        ...

    def open(self, context: Context) -> tuple[Site, StudySpec]:
        """The site (its data, policy and keys) and the study of this run."""
        ...

    def join(self, site: Site, study: StudySpec, context: Context) -> None:
        """Checks of the site's own policy before it joins (refuse by raising)."""
        ...

    def authorize(self, site: Site, study: StudySpec, context: Context) -> bool:
        """The researcher's signature, once a run; whether this was the first check
        (the live grant was checked with it)."""
        ...

    def check_grant(self, site: Site, study: StudySpec) -> None:
        """The researcher's grant on this site's dataset is still live."""
        ...

    def member(self, site: Site) -> str:
        """This site's id among the members of a masked sum."""
        ...

    def peers(
        self, site: Site, study: StudySpec, proposed: Sequence[str] | None
    ) -> dict[str, bytes]:
        """The members of the study's masked sums and their X25519 keys.

        ``proposed`` is the server's list; the keys (and, in a deployment, the
        members) never come from it. ``None``: check that a sum is possible.
        """
        ...


def peer_id(dataset_id: int) -> str:
    """A deployed member of a masked sum: named by its dataset (the study signs
    those)."""
    return f"dataset-{dataset_id}"


def refusal(msg: Message, site: str, reason: str) -> Message:
    """A reply that says the site refused, and carries nothing else."""
    content = RecordDict({"status": ConfigRecord({"site": site, "refused": reason})})
    return Message(content, reply_to=msg)


def state(context: Context) -> Any:
    """The site's record of this run in ``context.state``."""
    records: Any = context.state
    if STATE not in records:
        records[STATE] = ConfigRecord({})
    return records[STATE]


def _admit(side: SiteSide, site: Site, study: StudySpec, context: Context) -> None:
    """The signature (once a run) and the live grant."""
    if not side.authorize(site, study, context):
        side.check_grant(site, study)


def _gated(side: SiteSide, context: Context) -> tuple[Site, StudySpec]:
    """The site and the study, after the signature (once a run) and the grant."""
    site, study = side.open(context)
    _admit(side, site, study, context)
    return site, study


def _members(msg: Message) -> list[str] | None:
    content: Any = msg.content
    config: Any = content.get("config", {})
    if MEMBERS not in config:
        return None
    return [str(m) for m in config[MEMBERS]]


def _peers(
    side: SiteSide, site: Site, study: StudySpec, msg: Message, context: Context
) -> dict[str, bytes]:
    """The members of this run's masked sums with their keys: the side's, checked
    once a run and then kept; the same for the whole run (a server that changes
    them between steps is refused)."""
    record = state(context)
    proposed = _members(msg)
    if "members" in record:
        names = [str(m) for m in record["members"]]
        if proposed is not None and sorted(proposed) != names:
            raise DisclosureRefused(
                f"site {site.name}: the members of this run's masked sums changed "
                f"({names} -> {sorted(proposed)}); a site sums with one set of "
                "members per run"
            )
        keys = [bytes(k) for k in record["member-keys"]]
        return dict(zip(names, keys, strict=True))
    peers = side.peers(site, study, proposed)
    names = sorted(peers)
    record["members"] = names
    record["member-keys"] = [peers[n] for n in names]
    return peers


def _label(study: StudySpec, step: str, context: Context, peers: Iterable[str]) -> str:
    return f"{study.hash}|{step}|{context.run_id}|{','.join(sorted(peers))}"


def _n_moments(p: int) -> int:
    return 1 + p + p * (p + 1) // 2


def _send(
    side: SiteSide,
    site: Site,
    study: StudySpec,
    msg: Message,
    context: Context,
    step: str,
    totals: Any,
) -> Contribution:
    """This site's masked, tagged contribution to ``step``, once a run; its digest
    is kept so that the site recognises its own vector when the server relays it."""
    record = state(context)
    if f"sent-{step}" in record:
        raise DisclosureRefused(
            f"site {site.name} already contributed to step {step!r} of this run; a "
            "site contributes to each step once"
        )
    peers = _peers(side, site, study, msg, context)
    # keyed to every list this site has opened (masked.chain): a site shown other
    # lists than its neighbours no longer cancels with them
    opened = str(record.get("chain", ""))
    sent = contribute(
        site,
        peers,
        side.member(site),
        totals,
        _label(study, step, context, peers),
        chain=bytes.fromhex(opened),
    )
    record[f"sent-{step}"] = sent.digest
    record[f"chain-{step}"] = opened
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
    column, or whitening ``(x - mean) @ C^-½`` for linear models."""
    n = sums[0]
    if n < 2:
        raise DataRefused("fewer than 2 complete rows across the sites")
    mean = np.asarray(sums[1 : 1 + p]) / n
    cross = np.zeros((p, p))
    cross[np.triu_indices(p)] = sums[1 + p :]
    cross = cross + np.triu(cross, 1).T
    scatter = cross - n * np.outer(mean, mean)
    cov = scatter / (n - 1)
    if linear:
        # the covariance with divisor n: the mean squared loss's Hessian is then
        # exactly the identity, so one step of size 1 is pooled least squares (with
        # n - 1, every slope came out times 1 - 1/n)
        values, vectors = np.linalg.eigh(scatter / n)
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


def unflat(flat: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``flat`` cut into arrays of the shapes of ``like``."""
    out, start = [], 0
    for p in like:
        size = int(np.asarray(p).size)
        out.append(np.asarray(flat[start : start + size]).reshape(np.shape(p)))
        start += size
    return out


def _open_relayed(
    side: SiteSide,
    site: Site,
    study: StudySpec,
    msg: Message,
    context: Context,
    want: str,
    n_totals: int,
    key: str = RELAYED,
) -> list[float]:
    """The exact sum of the relayed contributions to step ``want`` (content record
    ``key``), after checking them (:func:`healthlab.federated.masked.open_sum`)."""
    content: Any = msg.content
    if key not in content:
        raise DataRefused(
            f"the message carries no relayed contributions of step {want!r}: this "
            "site trains and evaluates only the model the sites' own sums produce"
        )
    step, contributions = from_record(content[key])
    if step != want:
        raise DataRefused(f"the relayed step is {step!r}, this site expects {want!r}")
    peers = _peers(side, site, study, msg, context)
    record = state(context)
    sums = open_sum(
        site,
        peers,
        side.member(site),
        contributions,
        _label(study, step, context, peers),
        own_digest=str(record.get(f"sent-{step}", "")),
        n_totals=n_totals,
        chain=bytes.fromhex(str(record.get(f"chain-{step}", ""))),
    )
    if f"opened-{step}" not in record:  # each list enters the chain once
        before = bytes.fromhex(str(record.get("chain", "")))
        record["chain"] = chain(before, step, contributions).hex()
        record[f"opened-{step}"] = True
    return sums


def _apply_relayed(
    side: SiteSide,
    site: Site,
    study: StudySpec,
    msg: Message,
    context: Context,
    want: str,
    key: str = RELAYED,
) -> None:
    """Fold the checked sum of step ``want`` into the site's state (once):
    ``moments`` gives the transform, ``train-r`` the model of round r."""
    record = state(context)
    if f"done-{want}" in record:
        return
    p = len(study.features)
    init = study.model_family().init(p, study.seed)
    n_totals = _n_moments(p) if want == "moments" else _flat(init).size + 1
    sums = _open_relayed(side, site, study, msg, context, want, n_totals, key)
    if want == "moments":
        prep = transform_from_moments(sums, p, linear=study.model == "linear")
        record["prep"] = [*prep.center, *np.ravel(prep.matrix).tolist()]
    else:
        n = sums[-1]
        if n < 1:
            raise DataRefused(f"step {want}: no training rows across the sites")
        rnd = int(want.split("-")[1])
        record[f"model-{rnd}"] = (np.asarray(sums[:-1]) / n).tolist()
        stale = f"model-{rnd - 3}"  # a histogram needs the model two rounds back
        if stale in record:
            del record[stale]
    record[f"done-{want}"] = True


def _site_prep(context: Context, study: StudySpec) -> Preprocessing:
    p = len(study.features)
    if not study.standardize:
        return Preprocessing.identity(p)
    record = state(context)
    if "prep" not in record:
        raise DataRefused("this site has not derived the study's standardization")
    values = [float(v) for v in record["prep"]]
    matrix = np.asarray(values[p:]).reshape(p, p)
    return Preprocessing(tuple(values[:p]), tuple(tuple(r) for r in matrix.tolist()))


def _site_model(context: Context, study: StudySpec, rnd: int) -> list[np.ndarray]:
    """The model of round ``rnd`` (0: the study's initial model), as derived here."""
    init = study.model_family().init(len(study.features), study.seed)
    if rnd == 0:
        return [np.asarray(p, dtype=np.float64) for p in init]
    record = state(context)
    if f"model-{rnd}" not in record:
        raise DataRefused(f"this site has not derived the model of round {rnd}")
    return unflat(np.asarray(record[f"model-{rnd}"], dtype=np.float64), init)


def local_study(site: Site, study: StudySpec, prep: Preprocessing) -> Study:
    """The study as one site prepares its rows (held-out split, transform)."""
    local = Study(
        [site],
        list(study.features),
        study.target,
        study.model_family(),
        study.train_config(),
        prep,
        study.researcher or None,
        test_fraction=study.test_fraction,
        seed=study.seed,
        dropna=study.dropna,
    )
    local.mark_authorized(site)  # the signature was checked against the study hash
    return local


#: Score-bin counts of the pooled AUC, finest first. Each site says (masked) for
#: which of them its histogram would have a non-empty cell below its minimum of rows;
#: the finest level no site objects to is used, in a second masked sum, or none: no
#: pooled cell is ever below a site's minimum.
HIST_LEVELS = (10, 5, 2)


def score_histogram(
    model: Any, params: list[np.ndarray], x: np.ndarray, y: np.ndarray, bins: int
) -> np.ndarray:
    """Negative then positive counts per score bin of ``bins`` equal bins."""
    prediction = model.predict(params, x)
    index = np.minimum((prediction * bins).astype(int), bins - 1)
    return np.concatenate(
        [np.bincount(index[y == label], minlength=bins) for label in (0, 1)]
    ).astype(np.float64)


def eval_totals(
    model: Model, params: list[np.ndarray], x: np.ndarray, y: np.ndarray, min_cell: int
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


#: ``handler(msg, context) -> reply``: a ClientApp handler.
Handler = Callable[[Message, Context], Message]


def make_site_app(side: SiteSide, in_clear: Handler | None = None) -> ClientApp:
    """A ClientApp that answers the masked study's messages for the sites ``side``
    describes. ``train`` and ``evaluate`` of a study with ``secure="none"`` go to
    ``in_clear`` (refused without one)."""
    app = ClientApp()

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        """Signature and grant; the site's name, member id, rows, dataset, hash."""
        try:
            site, study = side.open(context)
            side.join(site, study, context)
            _admit(side, site, study, context)
            if study.standardize or study.secure != "none":
                side.peers(site, study, None)  # refuse now, not after all joined
        except _REFUSED as exc:
            return refusal(msg, side.name(context), str(exc))
        status = ConfigRecord(
            {
                "site": site.name,
                "member": side.member(site),
                "rows": site.n_rows,
                "dataset-id": int(site.dataset_id or 0),
                "content-hash": site.content_hash,
            }
        )
        return Message(RecordDict({"status": status}), reply_to=msg)

    @app.query("moments")
    def moments(msg: Message, context: Context) -> Message:
        """Masked ``n, Σx, Σxxᵀ`` (upper triangle) over the study's features."""
        try:
            site, study = _gated(side, context)
            kept, _ = site.rows(list(study.features), dropna=study.dropna)
            n = len(kept)
            if n < site.policy.min_rows:
                raise DisclosureRefused(
                    f"site {site.name}: fewer than {site.policy.min_rows} complete rows"
                )
            x = numeric(site.name, kept, list(study.features))
            upper = np.triu_indices(x.shape[1])
            totals = np.concatenate([[float(n)], x.sum(axis=0), (x.T @ x)[upper]])
            sent = _send(side, site, study, msg, context, "moments", totals)
        except _REFUSED as exc:
            return refusal(msg, side.name(context), str(exc))
        return _contribution_reply(msg, site.name, sent)

    prepared: dict[tuple[str, str, str, Preprocessing], Any] = {}

    def data(site: Site, study: StudySpec, context: Context) -> Any:
        """The site's prepared rows, kept while its data and the study are the same
        (a deployed site loads its data afresh for every message)."""
        prep = _site_prep(context, study)
        key = (site.name, site.content_hash, study.hash, prep)
        if key not in prepared:
            # one entry per site and study (a simulation runs every site here)
            if len(prepared) >= 4096:
                prepared.pop(next(iter(prepared)))
            prepared[key] = local_study(site, study, prep).data(site)
        return prepared[key]

    def train_totals(
        site: Site,
        study: StudySpec,
        msg: Message,
        context: Context,
        rnd: int,
        key: str = RELAYED,
    ) -> np.ndarray:
        """Round r: the model of round r-1 as the sites' own sums give it (relayed
        with the message), trained on this site's rows: n·w and n."""
        if rnd > 1:
            _apply_relayed(side, site, study, msg, context, f"train-{rnd - 1}", key)
        elif study.standardize:
            _apply_relayed(side, site, study, msg, context, "moments", key)
        params = _site_model(context, study, rnd - 1)
        rows = data(site, study, context)
        if len(rows.y_train) < site.policy.min_rows:
            raise DisclosureRefused(
                f"site {site.name}: fewer than {site.policy.min_rows} training rows"
            )
        base = study.train_config()
        mu = study.proximal_mu if study.strategy == "fedprox" else 0.0
        fit = replace(base, seed=base.seed + rnd, proximal_mu=mu)
        new = study.model_family().fit(params, rows.x_train, rows.y_train, fit)
        flat = _flat(new)
        if not np.isfinite(flat).all():
            raise DataRefused(f"site {site.name}: the local update is not finite")
        if study.clip_norm is not None:  # clipped here: no single update leaves
            update = flat - _flat(params)
            norm = float(np.linalg.norm(update))
            if norm > study.clip_norm:
                flat = _flat(params) + update * (study.clip_norm / norm)
        n = len(rows.y_train)
        return np.concatenate([flat * n, [float(n)]])

    def evaluation_totals(
        site: Site,
        study: StudySpec,
        msg: Message,
        context: Context,
        rnd: int,
        key: str = RELAYED,
    ) -> np.ndarray:
        """Held-out sums of the model of round r (derived here from the relayed
        updates of round r)."""
        _apply_relayed(side, site, study, msg, context, f"train-{rnd}", key)
        params = _site_model(context, study, rnd)
        rows = data(site, study, context)
        if len(rows.y_test) < site.policy.min_rows:
            raise DisclosureRefused(
                f"site {site.name}: fewer than {site.policy.min_rows} held-out "
                "rows to report metrics (raise test_fraction, or set it to 0 for "
                "a study without held-out metrics)"
            )
        return eval_totals(
            study.model_family(), params, rows.x_test, rows.y_test, site.policy.min_rows
        )

    def histogram_totals(
        site: Site,
        study: StudySpec,
        msg: Message,
        context: Context,
        rnd: int,
        key: str = RELAYED,
    ) -> np.ndarray:
        """The held-out score histogram of round r at the finest level the pooled
        flags of the relayed (checked) evaluation of round r allow."""
        family = study.model_family()
        if family.task != "binary":
            raise DataRefused("a score histogram is for binary models")
        sums = _open_relayed(
            side, site, study, msg, context, f"eval-{rnd}", eval_size(family.task), key
        )
        bins = histogram_level(sums)
        if bins is None:
            raise DisclosureRefused(
                "every histogram level has a cell below some site's minimum of rows"
            )
        rows = data(site, study, context)
        model = _site_model(context, study, rnd)
        counts = score_histogram(family, model, rows.x_test, rows.y_test, bins)
        if np.any((counts > 0) & (counts < site.policy.min_rows)):
            raise DisclosureRefused("the pooled flags do not match this site's data")
        return counts

    def round_step(kind: str, compute: Callable[..., np.ndarray]) -> Handler:
        """A ``train`` or ``evaluate`` handler: round r's totals, masked and tagged
        (in clear to ``in_clear`` for a study with ``secure="none"``)."""

        def handler(msg: Message, context: Context) -> Message:
            try:
                site, study = side.open(context)
                if study.secure == "none" and in_clear is not None:
                    return in_clear(msg, context)
                _admit(side, site, study, context)
                _check_masked(study)
                rnd = _round(msg)
                totals = compute(site, study, msg, context, rnd)
                sent = _send(side, site, study, msg, context, f"{kind}-{rnd}", totals)
            except _REFUSED as exc:
                return refusal(msg, side.name(context), str(exc))
            return _contribution_reply(msg, site.name, sent)

        return handler

    app.train()(round_step("train", train_totals))
    app.evaluate()(round_step("eval", evaluation_totals))

    @app.query("histogram")
    def histogram(msg: Message, context: Context) -> Message:
        """Round r's score histogram, masked (:func:`histogram_totals`)."""
        try:
            site, study = _gated(side, context)
            rnd = _round(msg)
            totals = histogram_totals(site, study, msg, context, rnd)
            sent = _send(side, site, study, msg, context, f"hist-{rnd}", totals)
        except _REFUSED as exc:
            return refusal(msg, side.name(context), str(exc))
        return _contribution_reply(msg, site.name, sent)

    @app.query("steps")
    def steps(msg: Message, context: Context) -> Message:
        """Several steps in one message (one round trip a round): the held-out sums
        of round ``eval-round`` and the update of round ``train-round`` (both from
        the updates relayed with it), the histogram of round ``hist-round`` (from
        the evaluation relayed as ``relayed-eval``). 0: that step is not asked."""
        try:
            site, study = _gated(side, context)
            _check_masked(study)
            config: Any = msg.content["config"]
            asked = {
                k: int(config.get(f"{k}-round", 0)) for k in ("eval", "train", "hist")
            }
            if not any(asked.values()):
                raise DataRefused("the message asks for no step")
            sent: dict[str, Contribution] = {}
            computed = (
                ("eval", evaluation_totals, RELAYED),
                ("train", train_totals, RELAYED),
                ("hist", histogram_totals, RELAYED_EVAL),
            )
            for kind, compute, key in computed:
                rnd = asked[kind]
                if rnd:
                    totals = compute(site, study, msg, context, rnd, key)
                    step = f"{kind}-{rnd}"
                    sent[step] = _send(side, site, study, msg, context, step, totals)
        except _REFUSED as exc:
            return refusal(msg, side.name(context), str(exc))
        content = RecordDict(
            {
                "arrays": ArrayRecord([c.digits for c in sent.values()]),
                "status": ConfigRecord(
                    {
                        "site": site.name,
                        "member": side.member(site),
                        "steps": list(sent),
                        "tags": [c.tags for c in sent.values()],
                    }
                ),
            }
        )
        return Message(content, reply_to=msg)

    return app


def _round(msg: Message) -> int:
    content: Any = msg.content
    return int(content["config"]["round"])


def _check_masked(study: StudySpec) -> None:
    if study.secure == "none":
        raise DataRefused('the study runs with secure="none": not a masked round')
