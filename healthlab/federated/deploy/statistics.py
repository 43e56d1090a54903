"""The encrypted statistics on a deployment: ``sites=`` a handle on a SuperLink.

The calls of :mod:`healthlab.encrypted` — ``describe``, ``histogram``,
``crosstab``, ``corr``, ``cov``, ``ols``, ``glm``, ``logit``, ``kaplan_meier`` … —
take a :class:`DeployedSites` as their ``sites``::

    from healthlab import encrypted
    from healthlab.federated.deploy import DeployedSites

    with DeployedSites.open(
        "127.0.0.1:9093",
        ledger,
        researcher,
        datasets=[1, 2, 3, 4],
        root_certificates="~/.healthlab/superlink/tls/ca.crt",
    ) as sites:
        table = encrypted.describe(sites, ["age", "sbp"], researcher=researcher)

What runs where
---------------
* **The researcher's process** runs the statistic's own code, as with sites in
  this process: it builds and signs each query, logs it in the shared query log
  on chain, holds the CKKS secret key, sums the encrypted contributions and
  decrypts only the pooled totals.
* **The ServerApp** (one Flower run per session, started with ``flwr run``) is a
  relay: it carries each step's messages between the researcher's process (over a
  Unix socket in a directory only the researcher's user can open) and the
  SuperNodes, and decides nothing.
* **Each SuperNode's site runtime** answers every step with the same site code as
  in simulation (:mod:`~healthlab.federated.deploy.answers`: the grant gate, the
  disclosure policy, the auditor in its ``state-dir``, the computation registered
  for the query's kind) and checks the peers' mask keys against the chain.

A statistic takes about one message round trip per protocol step (prepare,
announce, count, contribute, reveal), so ``describe`` (two queries) is ten round
trips. A site that does not answer a step within ``step_timeout`` has dropped out:
before the masks are set the query is asked again without it; after, its neighbours'
shares recover the sum over the others (:mod:`healthlab.encrypted.secagg`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from healthlab.encrypted import wire
from healthlab.encrypted.protocol import DroppedOut, Query
from healthlab.errors import ConfigurationError, HealthLabError, TooFewSites
from healthlab.sites import DisclosurePolicy, SiteProxy

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.serverapp import Grid

    from healthlab.federated.deploy.site import SiteConfig
    from healthlab.ledger import Ledger
    from healthlab.ledger.signing import SignedQuery

__all__ = [
    "Channel",
    "DeployedSites",
    "InProcessNodes",
    "RelayChannel",
    "serve_session",
]

_logger = logging.getLogger("flwr")

#: The message type of a statistics step (the sites' ``@app.query("statistics")``).
MESSAGE_TYPE = "query.statistics"


class Channel:
    """How the researcher's process reaches the nodes: node ids, and one message
    to each of some nodes with their replies (``None``: no reply in time)."""

    def nodes(self, expected: int, timeout: float) -> list[int]:
        raise NotImplementedError

    def exchange(
        self, bodies: Mapping[int, bytes], timeout: float
    ) -> dict[int, bytes | None]:
        raise NotImplementedError

    def close(self) -> None:
        """End the session (the relay's run finishes)."""


class InProcessNodes(Channel):
    """Sites answered in this process by the deployed site code itself
    (:func:`~healthlab.federated.deploy.answers.answer`, each with its node config
    and ``state-dir``): the deployment without Flower's processes, for tests and
    teaching. Messages still go through the wire format."""

    def __init__(self, configs: Sequence[SiteConfig], run_id: int = 1) -> None:
        self.configs = {i + 1: c for i, c in enumerate(configs)}
        self.run_id = run_id
        #: nodes that answer nothing (a simulated network)
        self.offline: set[int] = set()

    def nodes(self, expected: int, timeout: float) -> list[int]:
        return sorted(self.configs)

    def exchange(
        self, bodies: Mapping[int, bytes], timeout: float
    ) -> dict[int, bytes | None]:
        from healthlab.federated.deploy.answers import answer

        return {
            node: None
            if node in self.offline
            else answer(body, self.configs[node], self.run_id)
            for node, body in bodies.items()
        }


# ------------------------------------------------------------- socket framing
def _send_frame(sock: socket.socket, data: dict[str, Any]) -> None:
    raw = json.dumps(data, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">Q", len(raw)) + raw)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("the other end of the session closed it")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket) -> dict[str, Any]:
    (size,) = struct.unpack(">Q", _recv_exact(sock, 8))
    if size > 1 << 32:
        raise ConnectionError("a session frame is too large")
    data = json.loads(_recv_exact(sock, size))
    if not isinstance(data, dict):
        raise ConnectionError("a session frame is malformed")
    return data


class RelayChannel(Channel):
    """The session's ServerApp, over the Unix socket it connected to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def _ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.sock.settimeout(timeout + 30)
        _send_frame(self.sock, request)
        reply = _recv_frame(self.sock)
        if "error" in reply:
            raise HealthLabError(f"the session's ServerApp failed: {reply['error']}")
        return reply

    def nodes(self, expected: int, timeout: float) -> list[int]:
        reply = self._ask(
            {"op": "nodes", "expected": expected, "timeout": timeout}, timeout
        )
        return [int(n) for n in reply["nodes"]]

    def exchange(
        self, bodies: Mapping[int, bytes], timeout: float
    ) -> dict[int, bytes | None]:
        request = {
            "op": "send",
            "timeout": timeout,
            "bodies": {str(n): wire.encode(b) for n, b in bodies.items()},
        }
        reply = self._ask(request, timeout)
        got = reply["replies"]
        return {
            int(n): None if got.get(str(n)) is None else wire.decode(got[str(n)])
            for n in bodies
        }

    def close(self) -> None:
        try:
            self.sock.settimeout(10)
            _send_frame(self.sock, {"op": "close"})
            _recv_frame(self.sock)
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            self.sock.close()


# ------------------------------------------------------------ the sites' work
class RemoteWork:
    """The researcher's handle on one deployed site's work for one query: what
    :class:`~healthlab.encrypted.protocol.SiteWork` shows of itself, the rest at
    the site."""

    def __init__(self, site: SiteProxy, query: Query, noise_sd: Any) -> None:
        import numpy as np

        self.site = site
        self.remote: DeployedSites = site.remote
        self.query = query
        self.noise_sd = None if noise_sd is None else np.asarray(noise_sd, float)
        self.holders: list[int] | None = None
        self.suppressed: list[int] = []
        self.missing_withheld = False
        #: answers a site gave ahead, in the message of the step before
        self.announced: Any = None
        self.announced_for: dict[str, bytes] | None = None
        self.contributed: Any = None
        self.contributed_for: tuple[dict[str, bytes], str] | None = None


class RemoteLevels:
    """One deployed site's offered levels (its rare ones stay at the site)."""

    def __init__(
        self,
        site: SiteProxy,
        query_hash: str,
        common: frozenset[str],
        withholds: bool,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.site = site
        self.remote: DeployedSites = site.remote
        self.query_hash = query_hash
        self.common = frozenset(str(c) for c in common)
        self.withholds = bool(withholds)
        #: per other member (dataset id), the site's tag of its offer for it
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}


# ---------------------------------------------------------------- the session
class DeployedSites(Sequence[SiteProxy]):
    """The study's SuperNodes as the ``sites`` of the encrypted statistics.

    Open one with :meth:`open` (a SuperLink; a Flower run relays the session) and
    close it when done (or use ``with``). ``datasets`` chooses the sites by the
    dataset they are registered under; by default every node that answers.

    Parameters
    ----------
    step_timeout:
        Seconds a site has to answer one step; a site that does not has dropped
        out.
    """

    def __init__(
        self,
        channel: Channel,
        ledger: Ledger,
        *,
        datasets: Sequence[int] | None = None,
        expected_sites: int | None = None,
        node_timeout: float = 120.0,
        step_timeout: float = 60.0,
    ) -> None:
        self.channel = channel
        self.ledger = ledger
        self.step_timeout = step_timeout
        self._sent_public: dict[int, str] = {}
        expected = expected_sites or (len(datasets) if datasets else 2)
        nodes = channel.nodes(expected, node_timeout)
        replies = self._exchange({n: {"step": "hello"} for n in nodes})
        sites: list[SiteProxy] = []
        refused: dict[int, str] = {}
        for node in nodes:
            reply = replies.get(node)
            if reply is None:
                refused[node] = "no reply"
                continue
            if "refused" in reply:
                refused[node] = str(reply["refused"].get("message"))
                continue
            hello = reply["ok"]
            sites.append(
                SiteProxy(
                    self,
                    str(hello["site"]),
                    dataset_id=int(hello["dataset_id"]),
                    ledger=ledger,
                    policy=_policy(hello["policy"]),
                    mask_public_key=bytes(hello["mask_key"]),
                    content_hash=str(hello["content_hash"]),
                    node_id=node,
                )
            )
        if datasets is not None:
            wanted = {int(d) for d in datasets}
            sites = [s for s in sites if s.dataset_id in wanted]
            missing = sorted(wanted - {s.dataset_id for s in sites})
            if missing:
                raise TooFewSites(
                    f"no connected site answers for dataset(s) {missing}"
                    + (f" (nodes that did not answer: {refused})" if refused else "")
                )
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"two nodes give the same site name: {names}")
        self._sites = sorted(sites, key=lambda s: s.dataset_id)
        self.refused = refused
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # ---- Sequence
    def __len__(self) -> int:
        return len(self._sites)

    def __getitem__(self, index: Any) -> Any:
        return self._sites[index]

    def __iter__(self) -> Iterator[SiteProxy]:
        return iter(self._sites)

    def __repr__(self) -> str:
        return f"DeployedSites({[s.name for s in self._sites]})"

    def __enter__(self) -> DeployedSites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the session: the relay's Flower run finishes."""
        self.channel.close()
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                self._process.wait(10)
            if self._process.stdout is not None:
                self._process.stdout.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ---- messages
    def _exchange(self, requests: Mapping[int, Any]) -> dict[int, Any]:
        bodies = {node: wire.dump(r) for node, r in requests.items()}
        raw = self.channel.exchange(bodies, self.step_timeout)
        return {n: None if b is None else wire.load(b) for n, b in raw.items()}

    def _ask_each(
        self, sites: Sequence[SiteProxy], step: str, args: Sequence[Mapping[str, Any]]
    ) -> list[Any]:
        """Each site's answer to ``step`` (``None``: no reply); raises the first
        refusal, naming the site."""
        replies = self._exchange(
            {
                s.node_id: {"step": step, "args": dict(a)}
                for s, a in zip(sites, args, strict=True)
            }
        )
        out: list[Any] = []
        for site in sites:
            reply = replies.get(site.node_id)
            if reply is None:
                out.append(None)
            elif "refused" in reply:
                out.append(wire.error_from(reply["refused"]))
            else:
                out.append(reply["ok"])
        return out

    def prepare(
        self, sites: Sequence[SiteProxy], query: Query, signed: SignedQuery | None
    ) -> list[Any]:
        """Every site's work for ``query`` (or the error it refused with); a site
        that does not answer has dropped out before anything was computed."""
        # every site announces in the same message, for the peers the query
        # pools (PreparedQuery.finish names the same peers when all sites prepared)
        peers = {s.name: s.mask_public_key for s in sites}
        got = self._ask_each(
            sites,
            "prepare",
            [{"query": query, "signed": signed, "peers": peers}] * len(sites),
        )
        silent = [s.name for s, g in zip(sites, got, strict=True) if g is None]
        if silent:
            raise TooFewSites(
                f"site(s) {silent} did not answer within {self.step_timeout:g} s; ask "
                "again, or without them"
            )
        out: list[Any] = []
        for s, g in zip(sites, got, strict=True):
            if isinstance(g, BaseException):
                out.append(g)
                continue
            work = RemoteWork(s, query, g.get("noise_sd"))
            work.announced = g.get("announced")
            work.announced_for = peers
            out.append(work)
        return out

    def step(
        self,
        work: list[Any],
        step: str,
        args: list[tuple[Any, ...]],
        then: Sequence[tuple[Any, ...] | None] | None = None,
    ) -> list[Any]:
        """One step of :meth:`PreparedQuery.finish` at every site of ``work``
        (with ``then``, a site contributes in the count's message)."""
        if step == "vetoes":
            return self._vetoes(work, args)
        if step == "announce" and all(
            w.announced is not None and w.announced_for == a[0]
            for w, a in zip(work, args, strict=True)
        ):
            return [w.announced for w in work]
        if step == "contribute" and all(
            w.contributed is not None and w.contributed_for == (a[0], a[1].fingerprint)
            for w, a in zip(work, args, strict=True)
        ):
            return [w.contributed for w in work]
        requests: list[dict[str, Any]] = []
        for w, a in zip(work, args, strict=True):
            request: dict[str, Any] = {"query_hash": w.query.hash}
            if step == "announce":
                request["peers"] = a[0]
            elif step == "count_holders":
                request["peers"], request["announced"] = a[0], list(a[1])
                ahead = None if then is None else then[len(requests)]
                if ahead is not None:
                    request["contribute"] = self._contribute_args(w, *ahead)
                    w.contributed_for = (ahead[0], ahead[1].fingerprint)
            elif step == "contribute":
                request.update(self._contribute_args(w, *a))
            elif step == "reveal":
                request["survivors"], request["confirms"] = list(a[0]), dict(a[1])
            else:
                raise HealthLabError(f"no deployed step {step!r}")
            requests.append(request)
        got = self._ask_each([w.site for w in work], step, requests)
        for g in got:
            if isinstance(g, BaseException):
                raise g
        silent = [w.site.name for w, g in zip(work, got, strict=True) if g is None]
        if silent and step == "announce":
            raise DroppedOut(silent)
        if step == "contribute":
            for w, g in zip(work, got, strict=True):
                if g is not None:
                    self._sent_public[w.site.node_id] = g.fingerprint
        if step == "count_holders":
            for w, g in zip(work, got, strict=True):
                if g is not None and g.get("contribution") is not None:
                    w.contributed = g["contribution"]
                    self._sent_public[w.site.node_id] = w.contributed_for[1]
                if g is not None:
                    w.holders = [int(h) for h in g["holders"]]
                    w.suppressed = [int(i) for i in g["suppressed"]]
                    w.missing_withheld = bool(g["missing_withheld"])
            return [
                None if g is None else w.holders for w, g in zip(work, got, strict=True)
            ]
        return got

    def _contribute_args(
        self, work: RemoteWork, peers: Mapping[str, bytes], public: Any
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"peers": dict(peers)}
        if self._sent_public.get(work.site.node_id) == public.fingerprint:
            args["fingerprint"] = public.fingerprint
        else:
            args["public"] = public
        return args

    def levels(
        self,
        sites: Sequence[SiteProxy],
        query: Query,
        signed: SignedQuery | None,
        column: str,
        members: Sequence[str],
        need: int,
    ) -> list[RemoteLevels]:
        """:func:`healthlab.encrypted.stats.offer_levels` at the deployed sites."""
        args = {
            "query": query,
            "signed": signed,
            "column": column,
            "members": list(members),
            "need": int(need),
        }
        got = self._ask_each(sites, "levels", [args] * len(sites))
        out = []
        for site, g in zip(sites, got, strict=True):
            if g is None:
                raise TooFewSites(
                    f"site {site.name} did not answer within {self.step_timeout:g} s"
                )
            if isinstance(g, BaseException):
                raise g
            out.append(
                RemoteLevels(
                    site, query.hash, g["common"], g["withholds"], g.get("tags")
                )
            )
        return out

    def _vetoes(self, held: list[Any], args: list[tuple[Any, ...]]) -> list[Any]:
        got = self._ask_each(
            [h.site for h in held],
            "vetoes",
            [
                {
                    "query_hash": h.query_hash,
                    "candidates": frozenset(a[0]),
                    # every other member's offer, with its tag for this site
                    "offers": {
                        o.site.participant: {
                            "common": sorted(o.common),
                            "tag": o.tags.get(h.site.participant, ""),
                        }
                        for o in held
                        if o is not h
                    },
                }
                for h, a in zip(held, args, strict=True)
            ],
        )
        for h, g in zip(held, got, strict=True):
            if g is None:
                raise TooFewSites(
                    f"site {h.site.name} did not answer within {self.step_timeout:g} s"
                )
            if isinstance(g, BaseException):
                raise g
        return [frozenset(str(v) for v in g) for g in got]

    # ---- opening a session on a SuperLink
    @classmethod
    def open(
        cls,
        superlink: str,
        ledger: Ledger,
        *,
        datasets: Sequence[int] | None = None,
        root_certificates: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        expected_sites: int | None = None,
        node_timeout: float = 120.0,
        step_timeout: float = 60.0,
        start_timeout: float = 120.0,
        home: str | os.PathLike[str] | None = None,
    ) -> DeployedSites:
        """Start the relay (a Flower run of the study app in session mode) on the
        SuperLink at ``superlink`` and connect to its sites.

        The ServerApp runs on the SuperLink's host and reaches this process over a
        Unix socket, so the researcher runs the SuperLink (as for a study). TLS
        against ``root_certificates`` (the study CA); plain HTTP only with
        ``insecure=True``.
        """
        from healthlab.federated.deploy.launch import (
            CONNECTION,
            write_app,
            write_connection,
        )
        from healthlab.federated.deploy.processes import flower_env, require_flower

        flwr = require_flower("flwr")
        tmp = tempfile.TemporaryDirectory(prefix="hl-s-")
        base = Path(tmp.name)
        base.chmod(0o700)  # the socket: only this user can connect
        path = base / "relay.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        process: subprocess.Popen[bytes] | None = None
        try:
            listener.bind(str(path))
            listener.listen(1)
            app = write_app(base / "app")
            config = base / "session.toml"
            config.write_text(
                f"session = {json.dumps(str(path))}\n"
                f"expected-sites = {int(expected_sites or len(datasets or ()) or 2)}\n"
                f"node-timeout = {float(node_timeout)}\n"
            )
            flwr_home = Path(home) if home else base / "flwr-home"
            write_connection(
                flwr_home,
                superlink,
                root_certificates=None
                if root_certificates is None
                else str(Path(root_certificates).expanduser()),
                insecure=insecure,
            )
            process = subprocess.Popen(  # noqa: S603 - Flower's own command
                [flwr, "run", str(app), CONNECTION, "--run-config", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=base,
                env=flower_env(flwr_home),
                start_new_session=True,
            )
            listener.settimeout(0.2)
            deadline = time.monotonic() + start_timeout
            sock: socket.socket | None = None
            while sock is None:
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise HealthLabError(
                            f"the session's ServerApp did not connect within "
                            f"{start_timeout:g} s; flwr run printed:\n"
                            + _output(process)
                        ) from None
                    code = process.poll()
                    if code not in (None, 0):
                        raise HealthLabError(
                            f"flwr run failed (exit {code}):\n" + _output(process)
                        ) from None
            sock.settimeout(None)
            channel = RelayChannel(sock)
            try:
                sites = cls(
                    channel,
                    ledger,
                    datasets=datasets,
                    expected_sites=expected_sites,
                    node_timeout=node_timeout,
                    step_timeout=step_timeout,
                )
            except BaseException:
                channel.close()
                raise
        except BaseException:
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
            tmp.cleanup()
            raise
        finally:
            listener.close()
        sites._process = process
        sites._tmp = tmp
        return sites


def _output(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None or process.stdout is None:
        return "(still running)"
    return process.stdout.read().decode(errors="replace")[-2000:]


def _policy(data: Mapping[str, Any]) -> DisclosurePolicy:
    return DisclosurePolicy(
        min_rows=int(data["min_rows"]),
        max_param_ratio=float(data["max_param_ratio"]),
        min_sites=int(data["min_sites"]),
        min_difference=int(data["min_difference"]),
        max_query_age=int(data["max_query_age"]),
        grid_digits=None if data["grid_digits"] is None else int(data["grid_digits"]),
        min_contributors=None
        if data["min_contributors"] is None
        else int(data["min_contributors"]),
        grid=tuple((str(k), float(v)) for k, v in data["grid"]),
    )


# --------------------------------------------------------- the ServerApp side
def serve_session(grid: Grid, context: Context, poll: float = 0.01) -> None:
    """The ServerApp of a statistics session: relay the researcher's messages to
    the nodes and their replies back, until the researcher closes the session."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from healthlab.federated.deployed_client import STATISTICS

    path = str(context.run_config["session"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    try:
        while True:
            try:
                request = _recv_frame(sock)
            except (ConnectionError, OSError):
                return  # the researcher's process is gone
            op = request.get("op")
            try:
                if op == "close":
                    _send_frame(sock, {"closed": True})
                    return
                if op == "nodes":
                    deadline = time.monotonic() + float(request["timeout"])
                    expected = int(request["expected"])
                    while True:
                        nodes = sorted(grid.get_node_ids())
                        if len(nodes) >= expected or time.monotonic() > deadline:
                            break
                        time.sleep(0.1)
                    _send_frame(sock, {"nodes": nodes})
                    continue
                if op != "send":
                    _send_frame(sock, {"error": f"unknown operation {op!r}"})
                    continue
                bodies = {
                    int(n): wire.decode(b) for n, b in dict(request["bodies"]).items()
                }
                messages = [
                    Message(
                        RecordDict({STATISTICS: ConfigRecord({"body": body})}),
                        dst_node_id=node,
                        message_type=MESSAGE_TYPE,
                    )
                    for node, body in bodies.items()
                ]
                t0 = time.monotonic()
                waiting = {
                    mid: m.metadata.dst_node_id
                    for mid, m in zip(
                        grid.push_messages(messages), messages, strict=True
                    )
                }
                t1 = time.monotonic()
                arrivals = []
                end = time.monotonic() + float(request["timeout"])
                replies: dict[str, Any] = {}
                while waiting and time.monotonic() < end:
                    for reply in grid.pull_messages(list(waiting)):
                        node = waiting.pop(reply.metadata.reply_to_message_id, None)
                        if node is None:
                            continue
                        if reply.has_error():
                            replies[str(node)] = None
                            continue
                        arrivals.append(time.monotonic())
                        content: Any = reply.content
                        body = bytes(content[STATISTICS]["body"])
                        replies[str(node)] = wire.encode(body)
                    if waiting:
                        time.sleep(poll)
                _logger.info(
                    "statistics step to %d node(s): pushed in %.3f s, %d replies "
                    "after %s s",
                    len(messages),
                    t1 - t0,
                    len(arrivals),
                    [round(t - t0, 3) for t in arrivals],
                )
                _send_frame(sock, {"replies": replies})
            except (ConnectionError, OSError):
                return
            except Exception as exc:
                _send_frame(sock, {"error": f"{type(exc).__name__}: {exc}"})
    finally:
        sock.close()
