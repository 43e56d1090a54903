"""The study's ServerApp on Flower's deployment runtime (``app``, run by a SuperLink).

It reads the study from the run config
(:class:`~healthlab.federated.deploy.StudyConfig`) and then:

1. waits until ``expected-sites`` SuperNodes are connected (``node-timeout``);
2. ``query.hello``: every site checks the researcher's signature and grant and
   answers with its name, row count and X25519 public key (or refuses);
3. ``query.moments`` (when ``standardize``): the sites send masked ``n, Σx, Σxxᵀ``
   over exactly the signed study's datasets (keys from the chain); the masks cancel
   in the sum, so only the pooled mean and covariance are known;
   they give the public transform (standardization; whitening for ``linear``, as
   :func:`healthlab.federated.train` does);
4. ``secure="masked"`` (the default): rounds in which the server only relays — it
   sends each step's masked, tagged contributions with the next message (train:
   the previous round's, or the moments; evaluate: this round's), sums them for its
   own record, and asks for the score histogram at the finest level the pooled
   flags allow (:func:`_masked_rounds`); every site derives the model itself;
   ``secure="none"``: :mod:`healthlab.federated.server_app`'s loop — screening of
   NaN/inf, shapes and norms, example counts capped at the rows each site declared
   in step 2, the minimum of sites, the round deadline, DP — on a grid that attaches
   the transform to every message;
5. writes the history and the final weights as JSON to ``result-path`` (after every
   round, with ``status`` ``running``, then ``finished`` or ``failed``) and logs each
   round, which ``flwr run --stream`` shows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from healthlab.encrypted.encoding import MAX_SITES
from healthlab.errors import InvalidInput, TooFewSites
from healthlab.federated.deploy import StudyConfig
from healthlab.federated.deployed_client import (
    PREPROCESSING,
    RELAYED,
    eval_size,
    histogram_level,
    preprocessing_record,
    transform_from_moments,
)
from healthlab.federated.flower_compat import quick_object_pulls
from healthlab.federated.masked import Contribution, server_sum, to_record
from healthlab.federated.server_app import (
    Outcome,
    RoundReport,
    run_rounds,
)
from healthlab.federated.study import Preprocessing, Study
from healthlab.federated.task import Model, summarize
from healthlab.sites import Site

__all__ = ["StudyGrid", "app", "pooled_preprocessing"]

_logger = logging.getLogger("flwr")

app = ServerApp()


class StudyGrid(Grid):
    """The run's grid, with two changes for a study.

    * Every outgoing message carries the public pooled preprocessing.
    * Replies are polled every ``poll`` seconds (Flower 1.41's grid sleeps 3 s between
      polls, which would add up to 3 s to every phase of every round).
    """

    def __init__(self, grid: Grid, poll: float = 0.1) -> None:
        self._grid = grid
        self.poll = poll
        self.preprocessing: ConfigRecord | None = None

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(
            content, message_type, dst_node_id, group_id, ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        listed = list(messages)
        if self.preprocessing is not None:
            for message in listed:
                content: Any = message.content
                content[PREPROCESSING] = ConfigRecord(dict(self.preprocessing))
        return self._grid.push_messages(listed)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else math.inf)
        replies: list[Message] = []
        while waiting and time.monotonic() < end:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(self.poll)
        return replies


class _DeclaredSite:
    """What the server knows of a site: its name and the rows it declared."""

    def __init__(self, name: str, rows: int) -> None:
        self.name = name
        self.n_rows = rows


class _Result:
    """The JSON the ServerApp writes (atomically) after every step."""

    def __init__(self, study: StudyConfig) -> None:
        self.path = Path(study.result_path) if study.result_path else None
        settings = {k: v for k, v in asdict(study).items() if k not in ("signature",)}
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
        self.data["rounds"].append(asdict(report))
        self.data["params"] = [p.ravel().tolist() for p in params]
        self.data["shapes"] = [list(p.shape) for p in params]
        self.write()


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the study described by the run config."""
    quick_object_pulls()  # replies' objects arrive within ms on loopback
    study = StudyConfig.from_run_config(context.run_config)
    result = _Result(study)
    try:
        _run_study(StudyGrid(grid), study, result)
    except BaseException as exc:
        result.data["status"] = "failed"
        result.data["error"] = f"{type(exc).__name__}: {exc}"
        result.write()
        _logger.error("study failed: %s\n%s", exc, traceback.format_exc())
        raise
    result.data["status"] = "finished"
    result.write()
    _logger.info("study finished; result in %s", result.path)


def _wait_for_nodes(grid: Grid, study: StudyConfig) -> list[int]:
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
                f"only {len(nodes)} site node(s) connected to the SuperLink within "
                f"{study.node_timeout:g} s; the study needs {study.min_sites} "
                f"(expected {expected})"
            )
        time.sleep(0.2)


def _status(reply: Message) -> Any:
    content: Any = reply.content
    if reply.has_error() or "status" not in content:
        return None
    return content["status"]


def _query(
    grid: Grid,
    nodes: list[int],
    action: str,
    config: ConfigRecord,
    timeout: float,
) -> dict[int, Message]:
    messages = [
        Message(
            RecordDict({"config": ConfigRecord(dict(config))}),
            dst_node_id=node,
            message_type=f"query.{action}",
        )
        for node in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=timeout)
    return {r.metadata.src_node_id: r for r in replies}


def _run_study(grid: StudyGrid, study: StudyConfig, result: _Result) -> None:
    nodes = _wait_for_nodes(grid, study)
    _logger.info("%d site node(s) connected; asking them to join", len(nodes))
    replies = _query(grid, nodes, "hello", ConfigRecord({}), study.round_timeout)
    joined: dict[int, Any] = {}
    refused: dict[str, str] = {}
    for node in nodes:
        reply = replies.get(node)
        status = None if reply is None else _status(reply)
        if status is None:
            reason = (
                reply.error.reason
                if reply is not None and reply.has_error()
                else "no reply before the deadline"
            )
            refused[f"node {node}"] = f"error: {reason}"
        elif "refused" in status:
            refused[str(status["site"])] = str(status["refused"])
        else:
            joined[node] = status
    names = [str(s["site"]) for s in joined.values()]
    if len(set(names)) != len(names):
        raise InvalidInput(f"two nodes claim the same site name: {sorted(names)}")
    result.data["sites"] = [
        {
            "name": str(s["site"]),
            "rows": int(s["rows"]),
            "dataset_id": int(s["dataset-id"]),
            "content_hash": str(s["content-hash"]),
        }
        for s in joined.values()
    ]
    result.data["refused_at_start"] = refused
    result.write()
    for name, reason in refused.items():
        _logger.warning("%s refused: %s", name, reason)
    if len(joined) < study.min_sites:
        raise TooFewSites(
            f"only {len(joined)} site(s) agreed to take part, fewer than the "
            f"{study.min_sites} required (refused: {refused or 'none'})"
        )
    p = len(study.features)
    relayed: ConfigRecord | None = None
    if study.standardize:
        prep, relayed = pooled_preprocessing(grid, joined, study)
    else:
        prep = Preprocessing.identity(p)
    result.data["preprocessing"] = {
        "center": list(prep.center),
        "matrix": [list(r) for r in prep.matrix],
    }
    if study.secure != "none":
        _masked_rounds(grid, joined, study, result, relayed, refused)
        return
    grid.preprocessing = preprocessing_record(prep)
    declared = [_DeclaredSite(str(s["site"]), int(s["rows"])) for s in joined.values()]
    declared += [_DeclaredSite(name, 0) for name in refused]
    model = study.model_family()
    local = Study(
        cast(list[Site], declared),
        list(study.features),
        study.target,
        model,
        study.train_config(),
        prep,
        study.researcher or None,
        test_fraction=study.test_fraction,
        seed=study.seed,
        dropna=study.dropna,
    )
    outcome = Outcome()

    def on_round(report: RoundReport) -> None:
        result.round(report, outcome.params)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in report.pooled.items())
        _logger.info(
            "round %d/%d: %d site(s) %s; %s%s",
            report.round,
            study.rounds,
            len(report.sites),
            ",".join(report.sites),
            shown or "no held-out metrics",
            f"; refused {sorted(report.refused)}" if report.refused else "",
        )

    initial = model.init(p, study.seed)
    run_rounds(grid, local, study.server_settings(), initial, outcome, on_round, None)
    if outcome.error is not None:  # not set by run_rounds; kept for safety
        raise outcome.error


def _members(joined: dict[int, Any], study: StudyConfig) -> None:
    """Every dataset of the signed study must have joined: the sites mask over
    exactly those (keys from the chain), so the masks cancel only with all of them."""
    if len(study.datasets) > MAX_SITES:
        raise InvalidInput(f"masked sums are exact for at most {MAX_SITES} sites")
    taking_part = {int(s["dataset-id"]) for s in joined.values()}
    missing = sorted(set(study.datasets) - taking_part)
    if not study.datasets or missing:
        raise TooFewSites(
            "a masked sum runs over every dataset of the signed study; dataset(s) "
            f"{missing or '(none signed)'} did not join. Start their nodes, or sign "
            "the study without them"
        )


def _collect(
    grid: Grid,
    joined: dict[int, Any],
    study: StudyConfig,
    messages: list[Message],
    what: str,
) -> list[Contribution]:
    """Every member's masked contribution to one step, or a named error."""
    replies = {
        r.metadata.src_node_id: r
        for r in grid.send_and_receive(messages, timeout=study.round_timeout)
    }
    contributions = []
    for node, joined_status in joined.items():
        reply = replies.get(node)
        status = None if reply is None else _status(reply)
        name = str(joined_status["site"])
        if status is None or "refused" in status:
            if status is not None:
                reason = str(status["refused"])
            elif reply is not None and reply.has_error():
                reason = f"error: {reply.error.reason}"
            else:
                reason = "no reply before the deadline"
            raise TooFewSites(
                f"site {name} did not send its masked {what} ({reason}); a masked sum "
                "needs every member (their masks cancel only together)"
            )
        content: Any = cast(Message, reply).content
        digits = np.asarray(content["arrays"].to_numpy_ndarrays()[0], dtype=np.int64)
        contributions.append(
            Contribution(str(status["member"]), digits, bytes(status["tags"]))
        )
    return contributions


def _ask(
    grid: Grid,
    nodes: list[int],
    message_type: str,
    rnd: int,
    relayed: ConfigRecord | None,
) -> list[Message]:
    out = []
    for node in nodes:
        records: dict[str, Any] = {"config": ConfigRecord({"round": rnd})}
        if relayed is not None:
            records[RELAYED] = ConfigRecord(dict(relayed))
        out.append(
            Message(RecordDict(records), dst_node_id=node, message_type=message_type)
        )
    return out


def pooled_preprocessing(
    grid: Grid, joined: dict[int, Any], study: StudyConfig
) -> tuple[Preprocessing, ConfigRecord]:
    """The public transform from the sites' masked ``n, Σx, Σxxᵀ`` (only the sum is
    readable), and the contributions to relay: each site derives the same transform
    from them itself (``deployed_client.transform_from_moments``)."""
    _members(joined, study)
    nodes = list(joined)
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({})}),
            dst_node_id=node,
            message_type="query.moments",
        )
        for node in nodes
    ]
    contributions = _collect(grid, joined, study, messages, "moments")
    p = len(study.features)
    sums = server_sum(contributions, 1 + p + p * (p + 1) // 2)
    prep = transform_from_moments(sums, p, linear=study.model == "linear")
    _logger.info(
        "pooled statistics over %d rows from %d sites", int(sums[0]), len(joined)
    )
    return prep, to_record("moments", contributions)


def _masked_rounds(
    grid: StudyGrid,
    joined: dict[int, Any],
    study: StudyConfig,
    result: _Result,
    relayed: ConfigRecord | None,
    refused_at_start: dict[str, str],
) -> None:
    """Rounds in which nothing per site reaches the server: masked n·w and n, masked
    held-out sums; the server relays each step's contributions and every site
    derives the next model from them itself (the server's model is never used)."""
    _members(joined, study)
    model = study.model_family()
    init = model.init(len(study.features), study.seed)
    size = sum(int(np.asarray(a).size) for a in init)
    names = sorted(str(s["site"]) for s in joined.values())
    nodes = list(joined)
    params = [np.asarray(a, dtype=np.float64) for a in init]
    for rnd in range(1, study.rounds + 1):
        started = time.monotonic()
        sent = _ask(grid, nodes, MessageType.TRAIN, rnd, relayed)
        contributions = _collect(grid, joined, study, sent, f"update of round {rnd}")
        sums = server_sum(contributions, size + 1)
        flat = np.asarray(sums[:-1]) / sums[-1]
        params, start = [], 0
        for a in init:
            shape = np.asarray(a).shape
            count = int(np.prod(shape)) if shape else 1
            params.append(flat[start : start + count].reshape(shape))
            start += count
        relayed = to_record(f"train-{rnd}", contributions)
        asked = _ask(grid, nodes, MessageType.EVALUATE, rnd, relayed)
        evaluated = _collect(grid, joined, study, asked, f"metrics of round {rnd}")
        sums = server_sum(evaluated, eval_size(model.task))
        counts = None
        bins = histogram_level(sums) if model.task == "binary" else None
        if bins is not None:
            ask = _ask(
                grid, nodes, "query.histogram", rnd, to_record(f"eval-{rnd}", evaluated)
            )
            got = _collect(grid, joined, study, ask, f"histogram of round {rnd}")
            counts = server_sum(got, 2 * bins)
        pooled = pooled_metrics(model, sums, counts)
        report = RoundReport(
            rnd,
            names,
            dict(refused_at_start) if rnd == 1 else {},
            {},
            pooled,
            {},
            time.monotonic() - started,
        )
        result.round(report, params)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in pooled.items())
        _logger.info(
            "round %d/%d (masked): %d site(s); %s",
            rnd,
            study.rounds,
            len(names),
            shown or "no held-out metrics",
        )


def pooled_metrics(
    model: Model, sums: list[float], counts: list[float] | None = None
) -> dict[str, float]:
    """Loss, accuracy and a binned AUC (binary; ``counts``: the pooled negative then
    positive counts per score bin, or none) or R² from pooled held-out sums
    (:func:`~healthlab.federated.deployed_client.eval_totals`)."""
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
    return summarize(model, values)
