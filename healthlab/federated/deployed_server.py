"""The study's ServerApp on Flower's deployment runtime (``app``, run by a SuperLink).

It reads the study from the run config (:class:`~healthlab.federated.spec.StudySpec`),
waits until ``expected-sites`` SuperNodes are connected (``node-timeout``), and runs
it:

* ``secure="masked"`` (the default): :mod:`healthlab.federated.masked_study`, the
  same server loop as the simulation's — the sites join (signature and grant), the
  masked moments give the public transform, and in every round the server only
  relays masked, tagged contributions; every site derives the model itself;
* ``secure="none"``: after the same join and masked moments,
  :mod:`healthlab.federated.server_app`'s loop — screening of NaN/inf, shapes and
  norms, example counts capped at the rows each site declared, the minimum of sites,
  the round deadline, DP — on a grid that attaches the transform to every message.

It writes the history and the final weights as JSON to ``result-path`` (after every
round, with ``status`` ``running``, then ``finished`` or ``failed``) and logs each
round, which ``flwr run --stream`` shows.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Iterable
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from healthlab.federated.deployed_client import PREPROCESSING, preprocessing_record
from healthlab.federated.flower_compat import quick_object_pulls
from healthlab.federated.masked_study import (
    StudyLog,
    join_sites,
    pooled_preprocessing,
    run_masked_study,
    wait_for_nodes,
)
from healthlab.federated.server_app import Outcome, RoundReport, run_rounds
from healthlab.federated.spec import StudySpec
from healthlab.federated.study import Preprocessing, Study
from healthlab.sites import Site

__all__ = ["StudyGrid", "app"]

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


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the study described by the run config."""
    quick_object_pulls()  # replies' objects arrive within ms on loopback
    if context.run_config.get("session"):  # a statistics session: a relay only
        from healthlab.federated.deploy.statistics import serve_session

        _logger.info("statistics session: relaying the researcher's queries")
        serve_session(grid, context)
        _logger.info("statistics session closed")
        return
    study = StudySpec.from_run_config(context.run_config)
    log = StudyLog(study, study.result_path or None)
    try:
        _run_study(StudyGrid(grid), study, log)
    except BaseException as exc:
        log.data["status"] = "failed"
        log.data["error"] = f"{type(exc).__name__}: {exc}"
        log.write()
        _logger.error("study failed: %s\n%s", exc, traceback.format_exc())
        raise
    log.data["status"] = "finished"
    log.write()
    _logger.info("study finished; result in %s", log.path)


def _run_study(grid: StudyGrid, study: StudySpec, log: StudyLog) -> None:
    nodes = wait_for_nodes(grid, study)
    _logger.info("%d site node(s) connected; asking them to join", len(nodes))
    if study.secure != "none":
        run_masked_study(grid, nodes, study, log)
        return
    joined, refused = join_sites(grid, nodes, study, log)
    p = len(study.features)
    if study.standardize:
        prep, _ = pooled_preprocessing(grid, joined, study)
    else:
        prep = Preprocessing.identity(p)
    log.data["preprocessing"] = {
        "center": list(prep.center),
        "matrix": [list(r) for r in prep.matrix],
    }
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
        log.round(report, outcome.params)
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
    run_rounds(grid, local, study.server_settings(), initial, outcome, on_round)
