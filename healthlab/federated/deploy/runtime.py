"""The site runtime: the only code that ever touches a site's data in a deployment.

A site's SuperNode runs with ``--isolation process``: it starts no app. This module
is the long-running process beside it (started by
:class:`~healthlab.federated.deploy.SiteNode`). It takes the SuperNode's tasks one by
one and answers each with :data:`healthlab.federated.deployed_client.app` — the
ClientApp of the HealthLab version installed at the site, imported once at start.

**Code pinning.** A study's app bundle (FAB) must be byte for byte the bundle this
HealthLab version writes (:func:`pinned_app`: the packaged ``pyproject.toml``, no
code; the study's settings travel as Flower's run config). The runtime hashes the
bytes it received; any other bundle — another version, a researcher's own
ClientApp, an extra file — is refused before anything of it is unpacked, written or
imported, the refusal is logged, and the researcher gets an ``AppBundleRefused``
error reply. Nothing from a bundle is ever installed or imported here.

Run as ``python -m healthlab.federated.deploy.runtime serve --runtime-api HOST:PORT
--secret-file FILE`` (the site runtime) or ``… supernode ARGS`` (Flower's SuperNode
with a shorter poll, see :mod:`healthlab.federated.flower_compat`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import healthlab
from healthlab.errors import AppBundleRefused, ConfigurationError
from healthlab.federated.flower_compat import RuntimeTasks, Task, run_supernode

__all__ = ["PinnedApp", "main", "pinned_app", "serve"]

_logger = logging.getLogger("healthlab.federated.site")


class PinnedApp:
    """The one app bundle a site accepts: its bytes' sha256 and what it is."""

    def __init__(self, content: bytes) -> None:
        self.sha256 = hashlib.sha256(content).hexdigest()
        self.size = len(content)

    def check(self, task: Task) -> None:
        """Refuse a bundle that is not byte for byte the pinned one."""
        got = task.fab_sha256
        if got == self.sha256:
            return
        raise AppBundleRefused(
            f"this site runs only the study app of HealthLab {healthlab.__version__} "
            f"(sha256 {self.sha256[:16]}…); the bundle sent ({task.fab_id} "
            f"{task.fab_version}, sha256 {got[:16]}…) differs and was not run. "
            "Launch the study with `healthlab study` of the same HealthLab version"
        )


@functools.cache
def pinned_app() -> PinnedApp:
    """The bundle this installed HealthLab writes (see :func:`launch.build_app`)."""
    from healthlab.federated.deploy.launch import build_app

    return PinnedApp(build_app())


def serve(
    address: str,
    secret: bytes,
    *,
    poll: float = 0.2,
    stop: threading.Event | None = None,
    parent_pid: int | None = None,
) -> None:
    """Answer the SuperNode's tasks at ``address`` until ``stop`` is set."""
    from healthlab.federated.deployed_client import app

    pinned = pinned_app()
    tasks = RuntimeTasks(address, secret)
    halt = stop or threading.Event()

    def answer(task: Task) -> Any:
        try:
            pinned.check(task)
        except AppBundleRefused as exc:
            _logger.error("app bundle refused for run %s: %s", task.run_id, exc)
            raise
        began = time.monotonic()
        reply = app(message=task.message, context=task.context)
        _logger.info(
            "%s handled in %.3f s",
            task.message.metadata.message_type,
            time.monotonic() - began,
        )
        return reply

    print(
        f"site runtime ready (HealthLab {healthlab.__version__}, app sha256 "
        f"{pinned.sha256[:16]}…)",
        flush=True,
    )
    try:
        while not halt.is_set():
            if parent_pid is not None and not _alive(parent_pid):
                return
            token = tasks.acquire()
            if token is None:
                halt.wait(poll)
                continue
            began = time.monotonic()
            tasks.run_task(token, answer)
            _logger.info("task answered in %.3f s", time.monotonic() - began)
    finally:
        tasks.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> None:
    """``serve`` (the site runtime) or ``supernode`` (Flower's SuperNode)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["supernode"]:
        rest = args[1:]
        poll = 0.3
        if rest[:1] == ["--poll"]:  # ours, before Flower's own arguments
            poll, rest = float(rest[1]), rest[2:]
        run_supernode(rest, poll=poll)
        return
    parser = argparse.ArgumentParser(prog="healthlab-site-runtime")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--runtime-api", required=True)
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--poll", type=float, default=0.2)
    parsed = parser.parse_args(args)
    secret_file = Path(parsed.secret_file)
    if secret_file.stat().st_mode & 0o077:
        raise ConfigurationError(f"{secret_file} is readable by other users")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise
    deadline = time.monotonic() + 60
    while True:  # the SuperNode's Runtime API may still be starting
        try:
            serve(
                parsed.runtime_api,
                secret_file.read_bytes(),
                parent_pid=parsed.parent_pid,
                poll=parsed.poll,
            )
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise
            if parsed.parent_pid is not None and not _alive(parsed.parent_pid):
                return
            _logger.info("waiting for the SuperNode's Runtime API: %s", exc)
            time.sleep(0.2)


if __name__ == "__main__":
    main()
