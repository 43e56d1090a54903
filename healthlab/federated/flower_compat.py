"""Every place HealthLab reaches into Flower's internals, pinned to flwr 1.41.

Flower's public API (``ClientApp``, ``ServerApp``, ``Grid``, the strategies,
``run_simulation``, the ``flower-*`` and ``flwr`` commands) is used as documented
everywhere else. What follows is not public in flwr 1.41, so it is here, in one place,
checked against the installed version (:func:`check_version`) before it is used:

1. **The simulation engine** (:func:`install_engine`, used by
   :func:`healthlab.federated.train`). Flower's simulation builds ``RayBackend``
   directly and shuts Ray down after every run (17–37 s to start again on 2 cores);
   its ClientApps run in other processes, where the sites' data and the embedded
   chain cannot follow. We register a backend that runs ClientApps in this process's
   threads, and let the in-memory runtime poll every 5 ms instead of 0.1 s and its
   workers stop without waiting 1 s (rounds take milliseconds here).
2. **The grid's poll** (:func:`quick_grid`): the in-memory grid of the simulation
   polls for replies every 0.1 s; we set its ``pull_interval`` to 5 ms.
3. **The SuperNode's poll of the SuperLink** (:func:`run_supernode`):
   ``flower-supernode`` sleeps a hard-coded 3 s whenever the SuperLink has no
   message for it, which adds up to 3 s to every phase of every round. The site's
   SuperNode is started through this module, which shortens that one sleep to 0.3 s
   (no setting exists for it) and then runs Flower's own ``flower-supernode`` entry
   point. Shorter is slower on 2 cores: at 0.1 s four SuperNodes kept the SuperLink
   at ~60 % of a core and a round took 13.5 s instead of 10.5 s.
4. **Object pulls** (:func:`quick_object_pulls`): a message's parts travel as
   objects, and a process that asks for one not uploaded yet waits 1 s, then 2 s …
   (``PULL_INITIAL_BACKOFF``). On loopback they arrive within milliseconds, so the
   SuperNode, the ServerApp's grid and the site runtime retry after 20 ms (doubling
   up to 0.25 s) instead; measured: 1.1–3.2 s of every task before, per message.
5. **The site runtime's link to its SuperNode** (:class:`RuntimeTasks`): with
   ``--isolation process`` a SuperNode starts no app process; a long-running site
   process takes tasks from the SuperNode's Runtime API (``AcquireTask``, HMAC-signed
   with the SuperExec secret), pulls each task's message, context, run and app bundle
   (FAB), and pushes the reply — what ``flower-superexec`` and ``flwr-clientapp`` do,
   without starting a Python process per message and without installing or importing
   anything from the bundle.
"""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from healthlab.errors import ConfigurationError

__all__ = [
    "FLOWER_VERSION",
    "InProcessBackend",
    "RuntimeTasks",
    "Task",
    "build_fab",
    "check_version",
    "install_engine",
    "quick_grid",
    "quick_object_pulls",
    "run_supernode",
]

#: The Flower release line these adaptations were written and tested against.
FLOWER_VERSION = "1.41"
_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"


def check_version() -> None:
    """Refuse to touch Flower's internals under another Flower release."""
    import flwr

    version = str(getattr(flwr, "__version__", ""))
    if not (version == FLOWER_VERSION or version.startswith(FLOWER_VERSION + ".")):
        raise ConfigurationError(
            f"HealthLab's federated runtime is written for flwr {FLOWER_VERSION}.x "
            f"but flwr {version or '(unknown)'} is installed: install "
            f"'flwr[simulation]>={FLOWER_VERSION},<1.42' (see constraints.txt)"
        )


# ------------------------------------------------------------ 1. simulation engine
class InProcessBackend:
    """A Flower simulation backend running ClientApps in this process's threads."""

    def __init__(self, backend_config: Mapping[str, Any]) -> None:
        self.app_fn: Callable[[], Any] | None = None
        workers = backend_config.get("init_args", {}).get("num_cpus", 2)
        self.workers = max(1, int(workers))

    def build(self, app_fn: Callable[[], Any]) -> None:
        """Remember how to load the ClientApp."""
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        """Messages processed concurrently."""
        return self.workers

    def is_worker_idle(self) -> bool:
        """Workers are threads of Flower's own pool; one is always free to start."""
        return True

    def terminate(self) -> None:
        """Nothing to stop: the engine stays ready for the next run."""

    def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
        """Run the ClientApp on one message."""
        assert self.app_fn is not None
        return self.app_fn()(message=message, context=context), context


class _PromptQueue(queue.Queue[Any]):
    """A queue whose blocking ``get`` wakes at least every 20 ms."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return super().get(block, None if timeout is None else min(timeout, 0.02))


def install_engine() -> None:
    """Point Flower's simulation runtime at :class:`InProcessBackend` (once)."""
    if _BACKEND_MODULE in sys.modules and getattr(
        sys.modules[_BACKEND_MODULE], "HEALTHLAB", False
    ):
        return
    check_version()
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import Backend

    backend = type("InProcessBackend", (InProcessBackend, Backend), {})
    module = types.ModuleType(_BACKEND_MODULE)
    module.RayBackend = backend  # type: ignore[attr-defined]
    module.HEALTHLAB = True  # type: ignore[attr-defined]
    sys.modules[_BACKEND_MODULE] = module

    def add_messages_to_queue(
        state: Any, queue_: Any, nodes_mapping: Any, f_stop: threading.Event
    ) -> None:
        while not f_stop.is_set():
            for node_id in nodes_mapping:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue_.put(msg)
            f_stop.wait(0.005)

    vce_api.Queue = _PromptQueue  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue  # type: ignore[assignment]


# ------------------------------------------------------------------ 2. the grid
def quick_grid(grid: Any, interval: float = 0.005) -> None:
    """Let the simulation's in-memory grid poll for replies every ``interval`` s."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = interval


# --------------------------------------------------------- 4. object pulls
#: Seconds before retrying an object not there yet (doubling), and the cap.
PULL_BACKOFF = (0.02, 0.25)


def quick_object_pulls() -> None:
    """Let the SuperNode and the ServerApp's grid retry missing objects quickly."""
    check_version()
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    for module in (http_grid, start_client_internal):
        current = module.pull_objects
        if getattr(current, "healthlab", False):
            continue
        quick = functools.partial(
            current, initial_backoff=PULL_BACKOFF[0], backoff_cap=PULL_BACKOFF[1]
        )
        quick.healthlab = True  # type: ignore[attr-defined]
        module.pull_objects = quick  # type: ignore[attr-defined]


# ------------------------------------------------------- 3. the SuperNode's poll
class _QuickTime:
    """``time`` for flwr's SuperNode loop, whose idle sleep of 3 s becomes ``poll``."""

    def __init__(self, poll: float) -> None:
        self.poll = poll

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def run_supernode(argv: Sequence[str], *, poll: float = 0.3) -> None:
    """Run ``flower-supernode`` with ``argv``; it polls the SuperLink every ``poll``
    seconds when idle (instead of 3 s)."""
    check_version()
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    start_client_internal.time = _QuickTime(poll)  # type: ignore[attr-defined,assignment]
    quick_object_pulls()
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


# ------------------------------------------------- 5. the site runtime's tasks
def build_fab(directory: str | os.PathLike[str]) -> bytes:
    """The app bundle ``flwr run`` builds from ``directory`` (deterministic: fixed
    zip dates and a content manifest), to pin the hash a site accepts."""
    check_version()
    from flwr.cli.build import build_fab_from_disk

    with warnings.catch_warnings():  # flwr 1.41 asks pathspec for a deprecated style
        warnings.simplefilter("ignore", DeprecationWarning)
        return bytes(build_fab_from_disk(Path(directory)))


@dataclass
class Task:
    """One message for the site, as pulled from its SuperNode."""

    message: Any
    context: Any
    run_id: int
    fab_id: str
    fab_version: str
    fab_content: bytes

    @property
    def fab_sha256(self) -> str:
        """sha256 of the app bundle's bytes, computed here (not taken from the run)."""
        return hashlib.sha256(self.fab_content).hexdigest()


class RuntimeTasks:
    """The Runtime API of one SuperNode, as a site runtime uses it.

    ``acquire()`` asks for the next ClientApp task (signed with the SuperExec secret,
    so that no other local process can take the site's tasks); ``pull(token)`` returns
    its :class:`Task`; ``reply(token, task, message)`` pushes the answer and closes
    the task.
    """

    def __init__(self, address: str, secret: bytes) -> None:
        check_version()
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.interceptors.http.superexec_auth import (
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = address
        self._client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,  # loopback to its own SuperNode; AcquireTask is HMAC-signed
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=secret,
                    protected_methods={"/flwr.proto.Runtime/AcquireTask"},
                ),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def acquire(self) -> str | None:
        """The token of the next ClientApp task, or ``None`` when there is none."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        response = self._client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        )
        if response.HasField("task") and response.token:
            return str(response.token)
        return None

    def _task_client(self, token: str) -> Any:
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def run_task(self, token: str, handle: Callable[[Task], Any]) -> None:
        """Pull the task of ``token``, answer it with ``handle(task)`` (a Message),
        push the reply and the task's final status; heartbeats while it runs."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import (
            HeartbeatSender,
            make_task_heartbeat_fn_http,
        )
        from flwr.supernode.runtime.run_clientapp import (
            push_message,
            push_task_output,
        )

        client = self._task_client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context = None
        status, details = SubStatus.FAILED, "the site could not read the task"
        try:
            message, context, run, fab = _pull_task_input(client)
            task = Task(
                message, context, run.run_id, run.fab_id, run.fab_version, fab.content
            )
            try:
                reply = handle(task)
                status, details = SubStatus.COMPLETED, ""
            except Exception as exc:  # the site's own refusal, as a Flower error
                reply = Message(
                    Error(
                        code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                        reason=f"{type(exc).__name__}: {exc}",
                    ),
                    reply_to=message,
                )
                details = f"{type(exc).__name__}: {exc}"
            push_message(client, reply, context)
        finally:
            push_task_output(
                client=client, context=context, sub_status=status, details=details
            )
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    def close(self) -> None:
        """Close the connection."""
        self._client.close()


def _pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """flwr 1.41's ``run_clientapp.pull_task_input``, with the quick object retry."""
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode gave a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    from flwr.app import Message

    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=PULL_BACKOFF[0],
        backoff_cap=PULL_BACKOFF[1],
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab
