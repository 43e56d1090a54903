"""The services HealthLab runs on loopback — anvil, PostgreSQL, Flower's SuperLink
and SuperNodes — each a child process owned by one object and stopped by PID.

:class:`ManagedProcess` is what they share: a free port (:func:`free_port`), a temp
dir that is the child's working dir and holds its log, a start that waits for the
service's own sign of readiness, a stop by PID (:func:`stop_process`), an
idempotent :meth:`~ManagedProcess.close` and the context manager.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from healthlab.errors import ConfigurationError

__all__ = ["ManagedProcess", "free_port", "port_open", "stop_process"]


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on ``127.0.0.1:<port>``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


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


class ManagedProcess:
    """A service run as a child process on ``127.0.0.1:<port>``, owned by this object.

    A subclass says how to run it (:meth:`_args`; :meth:`_env`, :attr:`run_as`) and
    when it is ready (:meth:`_ready`: the service's own signal — an answer on its
    port, a status file, a line in its log — never a fixed sleep). The rest is here:

    - a port (a free one by default) and a temp dir :attr:`root`, the child's
      working dir, holding its output in :attr:`log_path` (:meth:`log`,
      :meth:`log_tail`);
    - :meth:`start` = :meth:`launch` + :meth:`wait_ready`: an early exit, a
      readiness check that raises, or the timeout stops the child and raises
      :class:`~healthlab.errors.ConfigurationError` with the end of its log;
    - :meth:`stop` by PID (:attr:`stop_signal`, SIGKILL if it hangs; the handle is
      kept, so its exit code can be read), :meth:`close` = stop, drop the handle,
      remove the temp dir (idempotent);
    - ``with Service() as s:`` starts it and closes it however the block ends.
    """

    #: What the service is called in messages and in its temp dir's name.
    kind: ClassVar[str] = "process"
    #: Name of the log file in the temp dir.
    log_name: ClassVar[str] = "output.log"
    #: Default seconds for :meth:`start` and :meth:`stop`.
    start_timeout: ClassVar[float] = 60.0
    stop_timeout: ClassVar[float] = 10.0
    #: The signal that asks the service to stop (it may save state first).
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    #: Seconds between readiness checks.
    poll: ClassVar[float] = 0.05
    #: How many characters of the log an error shows.
    tail_chars: ClassVar[int] = 1500
    #: Run the child in a process group of its own (``start_new_session``).
    new_session: ClassVar[bool] = False

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"healthlab-{self.kind}-")
        self.root = Path(self._tmp.name)
        self.log_path = self.root / self.log_name
        self.process: subprocess.Popen[bytes] | None = None
        #: ``(uid, gid)`` the children run as; None: this process's own.
        self.run_as: tuple[int, int] | None = None

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "not running"
        return f"{type(self).__name__}(port={self.port}, {state})"

    @property
    def pid(self) -> int | None:
        """The process id once launched (kept after :meth:`stop`)."""
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """Whether the main process is alive."""
        return self.process is not None and self.process.poll() is None

    # ---------------------------------------------------------- subclass hooks
    def _args(self) -> list[str]:
        """The command line of the service."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """Whether the service is ready (it may raise ConfigurationError)."""
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        """The children's environment; None inherits this process's."""
        return None

    def _prepare(self, timeout: float) -> None:
        """Called by :meth:`start` before the service is launched."""

    def _started(self) -> None:
        """Called once the main process is launched (start its companions here)."""

    def _hint(self) -> str:
        """What to do about an early exit, read from the log ("" if nothing)."""
        return ""

    # ------------------------------------------------------------------ output
    def log(self) -> str:
        """Everything the service printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self) -> str:
        """The end of :meth:`log` (what an error shows)."""
        return self.log()[-self.tail_chars :]

    # --------------------------------------------------------------- lifecycle
    def _spawn(self, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Start ``args`` in the temp dir, output appended to ``log_path``."""
        uid, gid = self.run_as or (None, None)
        with log_path.open("ab") as log:
            return subprocess.Popen(  # noqa: S603 - the services' own binaries
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=self._env(),
                start_new_session=self.new_session,
                user=uid,
                group=gid,
                extra_groups=None if self.run_as is None else [],
            )

    def start(self, timeout: float | None = None) -> Self:
        """Start the service and wait until it is ready (clear error otherwise);
        ``timeout`` defaults to :attr:`start_timeout`."""
        limit = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        if not self.running:
            self._prepare(limit)
        self.launch()
        return self.wait_ready(max(0.0, deadline - time.monotonic()))

    def launch(self) -> Self:
        """Start the service without waiting (see :meth:`wait_ready`)."""
        if self.running:
            return self
        if port_open(self.port):
            raise ConfigurationError(
                f"{self.kind}: port {self.port} on 127.0.0.1 is taken; pick another"
            )
        self.process = self._spawn(self._args(), self.log_path)
        self._started()
        return self

    def wait_ready(self, timeout: float | None = None) -> Self:
        """Wait until the launched service is ready; stop it and raise otherwise."""
        process = self.process
        if process is None:
            raise ConfigurationError(f"the {self.kind} was not launched")
        limit = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        try:
            while True:
                if process.poll() is not None:
                    raise ConfigurationError(
                        f"{self.kind} exited with code {process.returncode}"
                        f"{self._hint()}:\n{self.log_tail()}"
                    )
                if self._ready():
                    return self
                if time.monotonic() >= deadline:
                    raise ConfigurationError(
                        f"{self.kind} was not ready within {limit:g} s:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(self.poll)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float | None = None) -> None:
        """Stop the service by PID (:attr:`stop_signal`, then SIGKILL after
        ``timeout``, default :attr:`stop_timeout`)."""
        limit = self.stop_timeout if timeout is None else timeout
        stop_process(self.process, sig=self.stop_signal, timeout=limit)

    def close(self) -> None:
        """Stop, forget the process and remove the temp dir; again is a no-op."""
        self.stop()
        self.process = None
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
