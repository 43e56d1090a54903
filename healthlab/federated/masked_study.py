"""The server's half of a masked study, the same in simulation and in deployment.

1. ``query.hello``: every site checks the researcher's signature and grant and
   answers with its name, member id and row count (or refuses);
2. the members of the masked sums: in a deployment every dataset of the signed
   study (all must join); in simulation the study's sites that joined, at least
   ``min_sites``. The sites check them against their own list and keys;
3. ``query.moments`` (when ``standardize``): masked ``n, Σx, Σxxᵀ``; only the sum is
   readable; it gives the public transform (standardization; whitening for
   ``linear``);
4. rounds in which the server only relays: it sends each step's masked, tagged
   contributions with the next message (train: the previous round's, or the
   moments; evaluate: this round's), sums them for its own record, and asks for the
   score histogram at the finest level the pooled flags allow; every site derives
   the model itself (:mod:`healthlab.federated.masked_site`).

A member that refuses or does not answer a step stops the study with
:class:`~healthlab.errors.TooFewSites` and nothing of that step is released: the
masks cancel only in the sum over every member.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from healthlab.encrypted import secagg
from healthlab.encrypted.secagg import MAX_SITES
from healthlab.errors import InvalidInput, TooFewSites
from healthlab.federated.masked import Contribution, server_sum, to_record
from healthlab.federated.masked_site import (
    MEMBERS,
    RELAYED,
    RELAYED_EVAL,
    eval_size,
    histogram_level,
    peer_id,
    transform_from_moments,
    unflat,
)
from healthlab.federated.screening import site_status
from healthlab.federated.server_app import RoundReport
from healthlab.federated.spec import StudySpec
from healthlab.federated.study import Preprocessing
from healthlab.federated.task import Model, summarize

__all__ = [
    "Joined",
    "StudyLog",
    "join_sites",
    "masked_rounds",
    "pooled_metrics",
    "pooled_preprocessing",
    "run_masked_study",
    "wait_for_nodes",
]

_logger = logging.getLogger("flwr")

#: ``{node id: the site's hello status}`` of the sites that joined.
Joined = dict[int, Any]


class StudyLog:
    """What the server learns, step by step: kept in memory, and written as JSON to
    ``path`` (atomically, after every step) when one is given."""

    def __init__(
        self,
        study: StudySpec,
        path: str | os.PathLike[str] | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        self.path = Path(path) if path else None
        self.on_round = on_round
        self.reports: list[RoundReport] = []
        settings = {k: v for k, v in asdict(study).items() if k != "signature"}
        self.data: dict[str, Any] = {
            "status": "running",
            "error": None,
            "study_hash": study.hash,
            "study": settings,
            "sites": [],
            "refused_at_start": {},
            "preprocessing": None,
            "rounds": [],
            "params": [],
            "shapes": [],
        }
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_plain))
        os.replace(tmp, self.path)

    def round(self, report: RoundReport, params: list[np.ndarray]) -> None:
        self.reports.append(report)
        self.data["rounds"].append(asdict(report))
        self.data["params"] = [p.ravel().tolist() for p in params]
        self.data["shapes"] = [list(p.shape) for p in params]
        self.write()
        if self.on_round is not None:
            self.on_round(report)

    def params(self) -> list[np.ndarray]:
        """The last round's parameters."""
        return [
            np.asarray(p, dtype=np.float64).reshape(shape)
            for p, shape in zip(self.data["params"], self.data["shapes"], strict=True)
        ]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def send(grid: Grid, messages: Iterable[Message], timeout: float) -> dict[int, Message]:
    """Send and wait (at most ``timeout`` s); the replies by node."""
    replies = grid.send_and_receive(messages, timeout=timeout)
    return {r.metadata.src_node_id: r for r in replies}


def join_sites(
    grid: Grid, nodes: list[int], study: StudySpec, log: StudyLog
) -> tuple[Joined, dict[str, str]]:
    """Ask every node to join (``query.hello``); the ones that did, and why the
    others did not."""
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({})}),
            dst_node_id=node,
            message_type="query.hello",
        )
        for node in nodes
    ]
    replies = send(grid, messages, study.round_timeout)
    joined: Joined = {}
    refused: dict[str, str] = {}
    for node in nodes:
        reply = replies.get(node)
        got = None if reply is None else site_status(reply)
        if got is None:
            reason = (
                reply.error.reason
                if reply is not None and reply.has_error()
                else "no reply before the deadline"
            )
            refused[f"node {node}"] = f"error: {reason}"
        elif "refused" in got:
            refused[str(got["site"])] = str(got["refused"])
        else:
            joined[node] = got
    names = [str(s["site"]) for s in joined.values()]
    if len(set(names)) != len(names):
        raise InvalidInput(f"two nodes claim the same site name: {sorted(names)}")
    log.data["sites"] = [
        {
            "name": str(s["site"]),
            "rows": int(s["rows"]),
            "dataset_id": int(s["dataset-id"]),
            "content_hash": str(s["content-hash"]),
        }
        for s in joined.values()
    ]
    log.data["refused_at_start"] = refused
    log.write()
    for name, reason in refused.items():
        _logger.warning("%s refused: %s", name, reason)
    if len(joined) < study.min_sites:
        raise TooFewSites(
            f"only {len(joined)} site(s) agreed to take part, fewer than the "
            f"{study.min_sites} required (refused: {refused or 'none'})"
        )
    return joined, refused


def members(joined: Joined, study: StudySpec) -> list[str]:
    """The members of the masked sums: every dataset of a signed study's list (all
    must have joined), or else every site that joined (at least ``min_sites``)."""
    ids = sorted(str(s["member"]) for s in joined.values())
    if len(ids) > MAX_SITES:
        raise InvalidInput(f"masked sums are exact for at most {MAX_SITES} sites")
    if study.datasets:
        missing = sorted(d for d in study.datasets if peer_id(d) not in set(ids))
        if missing:
            raise TooFewSites(
                "a masked sum runs over every dataset of the signed study; dataset(s) "
                f"{missing} did not join. Start their nodes, or sign the study "
                "without them"
            )
    elif len(ids) < study.min_sites:
        raise TooFewSites(
            f"a masked sum needs at least {study.min_sites} sites; {len(ids)} joined"
        )
    return ids


def _config(rnd: int | None, names: list[str]) -> ConfigRecord:
    values: dict[str, Any] = {MEMBERS: list(names)}
    if rnd is not None:
        values["round"] = rnd
    return ConfigRecord(values)


def _ask(
    nodes: list[int],
    message_type: str,
    rnd: int | None,
    names: list[str],
    relayed: ConfigRecord | None,
) -> list[Message]:
    out = []
    for node in nodes:
        records: dict[str, Any] = {"config": _config(rnd, names)}
        if relayed is not None:
            records[RELAYED] = ConfigRecord(dict(relayed))
        out.append(
            Message(RecordDict(records), dst_node_id=node, message_type=message_type)
        )
    return out


def _collect(
    grid: Grid,
    joined: Joined,
    study: StudySpec,
    messages: list[Message],
    what: str,
) -> list[Contribution]:
    """Every member's masked contribution to one step, or a named error."""
    contributions = []
    for member, content in _member_replies(grid, joined, study, messages, what):
        digits = np.asarray(content["arrays"].to_numpy_ndarrays()[0], dtype=np.int64)
        contributions.append(
            Contribution(
                member,
                digits,
                bytes(content["status"]["tags"]),
                secagg.modulus(len(joined)),
            )
        )
    return contributions


def pooled_preprocessing(
    grid: Grid, joined: Joined, study: StudySpec
) -> tuple[Preprocessing, ConfigRecord]:
    """The public transform from the sites' masked ``n, Σx, Σxxᵀ`` (only the sum is
    readable), and the contributions to relay: each site derives the same transform
    from them itself (:func:`~healthlab.federated.masked_site.transform_from_moments`).
    """
    names = members(joined, study)
    messages = _ask(list(joined), "query.moments", None, names, None)
    contributions = _collect(grid, joined, study, messages, "moments")
    p = len(study.features)
    sums = server_sum(contributions, 1 + p + p * (p + 1) // 2)
    prep = transform_from_moments(sums, p, linear=study.model == "linear")
    _logger.info(
        "pooled statistics over %d rows from %d sites", int(sums[0]), len(joined)
    )
    return prep, to_record("moments", contributions)


def masked_rounds(
    grid: Grid,
    joined: Joined,
    study: StudySpec,
    log: StudyLog,
    relayed: ConfigRecord | None,
    refused_at_start: dict[str, str],
) -> None:
    """Rounds in which nothing per site reaches the server: masked n·w and n, masked
    held-out sums and histograms; the server relays each step's contributions and
    every site derives the next model from them itself (the server's model is never
    used).

    Pipelined, one round trip a round: message k relays the updates of round k-1
    and asks for the held-out sums of round k-1 (on the model they give) and the
    update of round k, and, with the evaluation of round k-2 relayed, the histogram
    of round k-2. ``rounds`` rounds take ``rounds + 2`` messages; a round is
    reported once its metrics are complete.
    """
    names = members(joined, study)
    model = study.model_family()
    init = model.init(len(study.features), study.seed)
    size = sum(int(np.asarray(a).size) for a in init)
    sites = sorted(str(s["site"]) for s in joined.values())
    nodes = list(joined)
    evaluating = study.test_fraction > 0
    params: dict[int, list[np.ndarray]] = {}
    waiting: dict[int, list[float]] = {}  # pooled eval sums awaiting their histogram
    hist: tuple[int, ConfigRecord] | None = None  # (round, its relayed evaluation)
    started = time.monotonic()

    def report(rnd: int, pooled: dict[str, float]) -> None:
        nonlocal started
        now = time.monotonic()
        log.round(
            RoundReport(
                rnd, sites, dict(refused_at_start), {}, pooled, {}, now - started
            ),
            params[rnd],
        )
        started = now
        shown = ", ".join(f"{k} {v:.4f}" for k, v in pooled.items())
        _logger.info(
            "round %d/%d (masked): %d site(s); %s",
            rnd,
            study.rounds,
            len(sites),
            shown or "no held-out metrics",
        )

    k = 1
    while True:
        asked = {
            "train": k if k <= study.rounds else 0,
            "eval": k - 1 if evaluating and 1 <= k - 1 <= study.rounds else 0,
            "hist": hist[0] if hist is not None else 0,
        }
        if not any(asked.values()):
            return
        got = _collect_steps(grid, joined, study, nodes, names, asked, relayed, hist)
        hist = None
        if asked["hist"]:
            rnd = asked["hist"]
            sums = waiting.pop(rnd)
            bins = histogram_level(sums) or 0
            counts = server_sum(got[f"hist-{rnd}"], 2 * bins)
            report(rnd, pooled_metrics(model, sums, counts))
        if asked["eval"]:
            rnd = asked["eval"]
            evaluated = got[f"eval-{rnd}"]
            sums = server_sum(evaluated, eval_size(model.task))
            if model.task == "binary" and histogram_level(sums) is not None:
                waiting[rnd] = sums
                hist = (rnd, to_record(f"eval-{rnd}", evaluated))
            else:
                report(rnd, pooled_metrics(model, sums, None))
        if asked["train"]:
            rnd = asked["train"]
            contributions = got[f"train-{rnd}"]
            sums = server_sum(contributions, size + 1)
            params[rnd] = unflat(np.asarray(sums[:-1]) / sums[-1], init)
            relayed = to_record(f"train-{rnd}", contributions)
            if not evaluating:
                report(rnd, {})
        k += 1


def _collect_steps(
    grid: Grid,
    joined: Joined,
    study: StudySpec,
    nodes: list[int],
    names: list[str],
    asked: dict[str, int],
    relayed: ConfigRecord | None,
    hist: tuple[int, ConfigRecord] | None,
) -> dict[str, list[Contribution]]:
    """One ``query.steps`` message to every member; each step's contributions."""
    config: dict[str, Any] = {MEMBERS: list(names)}
    config.update({f"{kind}-round": rnd for kind, rnd in asked.items()})
    messages = []
    for node in nodes:
        records: dict[str, Any] = {"config": ConfigRecord(dict(config))}
        if relayed is not None:
            records[RELAYED] = ConfigRecord(dict(relayed))
        if hist is not None:
            records[RELAYED_EVAL] = ConfigRecord(dict(hist[1]))
        messages.append(
            Message(RecordDict(records), dst_node_id=node, message_type="query.steps")
        )
    what = ", ".join(
        f"{_STEP_NAMES[kind]} of round {rnd}" for kind, rnd in asked.items() if rnd
    )
    out: dict[str, list[Contribution]] = {}
    for member, content in _member_replies(grid, joined, study, messages, what):
        got = content["status"]
        arrays = content["arrays"].to_numpy_ndarrays()
        steps = [str(step) for step in got["steps"]]
        tags = [bytes(t) for t in got["tags"]]
        if not len(arrays) == len(steps) == len(tags):
            raise TooFewSites(f"site {got['site']} sent a malformed reply ({what})")
        for step, digits, tag in zip(steps, arrays, tags, strict=True):
            out.setdefault(step, []).append(
                Contribution(
                    member,
                    np.asarray(digits, dtype=np.int64),
                    tag,
                    secagg.modulus(len(joined)),
                )
            )
    wanted = {f"{kind}-{rnd}" for kind, rnd in asked.items() if rnd}
    if set(out) != wanted or any(len(v) != len(joined) for v in out.values()):
        raise TooFewSites(f"the sites' replies do not hold every step of: {what}")
    return out


def _member_replies(
    grid: Grid,
    joined: Joined,
    study: StudySpec,
    messages: list[Message],
    what: str,
) -> list[tuple[str, Any]]:
    """Send one step's messages; every member's ``(member id, reply content)``, or
    :class:`TooFewSites` naming the first member that refused or did not answer."""
    replies = send(grid, messages, study.round_timeout)
    out = []
    for node, joined_status in joined.items():
        reply = replies.get(node)
        got = None if reply is None else site_status(reply)
        if got is None or "refused" in got:
            raise TooFewSites(
                f"site {joined_status['site']} did not send its masked {what} "
                f"({_reason(reply, got)}); a masked sum needs every member (their "
                "masks cancel only together)"
            )
        out.append((str(got["member"]), cast(Message, reply).content))
    return out


_STEP_NAMES = {"train": "update", "eval": "metrics", "hist": "histogram"}


def _reason(reply: Message | None, got: Any) -> str:
    if got is not None:
        return str(got["refused"])
    if reply is not None and reply.has_error():
        return f"error: {reply.error.reason}"
    return "no reply before the deadline"


def wait_for_nodes(grid: Grid, study: StudySpec, poll: float = 0.2) -> list[int]:
    """The connected nodes, once ``expected_sites`` are (or ``min_sites`` at the
    ``node_timeout``)."""
    expected = study.expected_sites or study.min_sites
    deadline = time.monotonic() + study.node_timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            if len(nodes) >= study.min_sites:
                _logger.warning(
                    "%d of %d expected sites connected; going on", len(nodes), expected
                )
                return nodes
            raise TooFewSites(
                f"only {len(nodes)} site node(s) connected within "
                f"{study.node_timeout:g} s; the study needs {study.min_sites} "
                f"(expected {expected})"
            )
        time.sleep(poll)


def run_masked_study(
    grid: Grid, nodes: list[int], study: StudySpec, log: StudyLog
) -> None:
    """Join, standardize and run the masked rounds of ``study`` on ``nodes``."""
    joined, refused = join_sites(grid, nodes, study, log)
    relayed: ConfigRecord | None = None
    if study.standardize:
        prep, relayed = pooled_preprocessing(grid, joined, study)
    else:
        prep = Preprocessing.identity(len(study.features))
    log.data["preprocessing"] = {
        "center": list(prep.center),
        "matrix": [list(r) for r in prep.matrix],
    }
    masked_rounds(grid, joined, study, log, relayed, refused)


def pooled_metrics(
    model: Model, sums: list[float], counts: list[float] | None = None
) -> dict[str, float]:
    """Loss, accuracy and a binned AUC with the number of score bins it used
    (binary; ``counts``: the pooled negative then positive counts per score bin, or
    none: ``auc`` NaN, ``auc_bins`` 0) or R² from pooled held-out sums
    (:func:`~healthlab.federated.masked_site.eval_totals`)."""
    values = {"n": sums[0], "loss_sum": sums[1]}
    if model.task == "binary":
        values["correct"] = sums[2]
        if counts is not None:
            bins = len(counts) // 2
            for label in (0, 1):
                for i in range(bins):
                    values[f"bin{label}_{i}"] = counts[label * bins + i]
    else:
        values.update({"sse": sums[2], "sy": sums[3], "syy": sums[4]})
    pooled = summarize(model, values)
    if model.task == "binary" and pooled:
        # withheld (NaN) when every histogram level had a cell below a site's minimum
        pooled.setdefault("auc", float("nan"))
        pooled["auc_bins"] = float(len(counts) // 2 if counts is not None else 0)
    return pooled
