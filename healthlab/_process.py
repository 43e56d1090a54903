"""Helpers for the services run on loopback (anvil, PostgreSQL, Flower's SuperLink
and SuperNodes): wait until one is ready, stop it by PID."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

from healthlab.errors import ConfigurationError

__all__ = ["stop_process", "wait_until_ready"]


def wait_until_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    name: str,
    timeout: float,
    log_tail: Callable[[], str],
    stop: Callable[[], None],
    poll: float = 0.05,
) -> None:
    """Poll ``ready()`` until it holds; if the process exits or time runs out, call
    ``stop()`` and raise :class:`~healthlab.errors.ConfigurationError` with the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            code = process.returncode
            stop()
            raise ConfigurationError(f"{name} exited with code {code}: {log_tail()}")
        if ready():
            return
        time.sleep(poll)
    stop()
    raise ConfigurationError(f"{name} was not ready within {timeout:g} s: {log_tail()}")


def stop_process(
    process: subprocess.Popen[bytes] | None,
    *,
    sig: signal.Signals = signal.SIGTERM,
    timeout: float = 10.0,
) -> None:
    """Stop a child by PID: ``sig`` first (it may save state), SIGKILL if it hangs."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
