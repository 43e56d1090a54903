"""Start and stop a local anvil node (Foundry, from the npm package in contracts/).

:class:`AnvilNode` is a node owned by one process (tests, ``healthlab node``).
:class:`LocalChain` is the one node that separate processes share — JupyterLab's
kernels, the Voilà page, reports: started detached with a pid file, reused while it
runs, its chain kept in a state file across restarts (``healthlab chain up|status|
down``, used by ``make lab`` and ``make dashboard``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from healthlab.errors import ConfigurationError
from healthlab.services import ManagedProcess

__all__ = ["AnvilNode", "ChainProcess", "LocalChain", "find_tool"]

#: Seconds between anvil's dumps of its state file (it also dumps on SIGTERM).
STATE_INTERVAL = 5

_NPM_BIN = (
    Path(__file__).resolve().parents[2] / "contracts" / "node_modules" / "@foundry-rs"
)


def find_tool(name: str) -> str | None:
    """Path of Foundry's ``anvil`` or ``cast``.

    Looked up in ``$HEALTHLAB_<NAME>``, then contracts/node_modules, then ``PATH``.
    """
    override = os.environ.get(f"HEALTHLAB_{name.upper()}")
    if override:
        return override
    packaged = _NPM_BIN / f"{name}-linux-amd64" / "bin" / name
    if packaged.is_file():
        return str(packaged)
    return shutil.which(name)


def _require_anvil() -> str:
    binary = find_tool("anvil")
    if binary is None:
        raise ConfigurationError(
            "anvil is not installed: run `make setup` (npm ci in contracts/ "
            "installs @foundry-rs/anvil-linux-amd64) or set HEALTHLAB_ANVIL"
        )
    return binary


def _anvil_args(
    binary: str,
    port: int,
    *,
    chain_id: int,
    accounts: int,
    state_file: Path | None,
) -> list[str]:
    args = [
        binary,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--chain-id",
        str(chain_id),
        "--accounts",
        str(accounts),
        "--silent",
    ]
    if state_file is not None:
        args += ["--state", str(state_file), "--state-interval", str(STATE_INTERVAL)]
    return args


def _answers(url: str) -> bool:
    """Whether a JSON-RPC node answers ``eth_chainId`` at ``url``."""
    try:
        reply = requests.post(
            url,
            json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
            timeout=1,
        )
        return reply.ok
    except requests.RequestException:
        return False


class AnvilNode(ManagedProcess):
    """An anvil process on loopback with its own port and temp dir, stopped by PID.

    Parameters
    ----------
    port:
        TCP port; a free one by default.
    state_file:
        Keep the chain in this file across restarts (anvil ``--state``); stopping
        sends SIGTERM, on which anvil writes it.
    """

    kind = "anvil"
    log_name = "anvil.log"
    start_timeout = 30.0
    tail_chars = 500

    def __init__(
        self,
        port: int | None = None,
        *,
        state_file: str | os.PathLike[str] | None = None,
        chain_id: int = 31337,
        accounts: int = 10,
    ) -> None:
        self.binary = _require_anvil()
        super().__init__(port)
        self.state_file = Path(state_file) if state_file else None
        self.chain_id = chain_id
        self.accounts = accounts

    @property
    def url(self) -> str:
        """The node's JSON-RPC URL."""
        return f"http://127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        return _anvil_args(
            self.binary,
            self.port,
            chain_id=self.chain_id,
            accounts=self.accounts,
            state_file=self.state_file,
        )

    def _prepare(self, timeout: float) -> None:
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)

    def _ready(self) -> bool:
        return self._answers()

    def _answers(self) -> bool:
        return _answers(self.url)


# ------------------------------------------------------------- the shared node
@dataclass(frozen=True)
class ChainProcess:
    """The shared node as found or started by :class:`LocalChain`."""

    url: str
    #: Its process id; None for a node that answers on the port but that this
    #: folder did not start (reused as it is, never stopped).
    pid: int | None
    state_file: Path | None = None
    log_path: Path | None = None
    #: True when this call started it, False when it was already running.
    started: bool = False


#: Lowest UID of a person's account (Debian's FIRST_UID); below it, system services.
FIRST_USER_UID = 1000
#: The unprivileged "nobody" account, never a person.
NOBODY_UID = 65534


def other_users(proc: str | os.PathLike[str] = "/proc") -> set[int]:
    """UIDs of people other than us with processes on this machine (from ``/proc``):
    any account from :data:`FIRST_USER_UID` up, but ``nobody``, and root when we are
    not root. Unreadable entries (a process that just ended) are skipped."""
    me = os.getuid()
    found: set[int] = set()
    for status in Path(proc).glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Uid:"):
                fields = line.split()
                uid = int(fields[1]) if len(fields) > 1 else me
                person = uid >= FIRST_USER_UID and uid != NOBODY_UID
                if uid != me and (person or (uid == 0 and me != 0)):
                    found.add(uid)
                break
    return found


def check_single_user(
    allow_shared: bool, proc: str | os.PathLike[str] = "/proc"
) -> None:
    """Refuse to start the lab node where other people run processes, unless
    ``allow_shared``: anvil's HTTP port on 127.0.0.1 is open to every local user,
    and it signs for its unlocked dev accounts and answers cheat RPCs
    (``anvil_impersonateAccount``, ``anvil_setBalance``) — another user could act
    as any owner or researcher on it."""
    if allow_shared:
        return
    others = other_users(proc)
    if others:
        raise ConfigurationError(
            f"{len(others)} other user account(s) run processes on this machine: "
            "the lab chain's port on 127.0.0.1 would be open to them, and anvil "
            "signs for its dev accounts and answers cheat calls, so they could "
            "approve grants or withdraw as anyone. Run the lab where only you are "
            "logged in (your laptop, a container), or accept the risk for a "
            "teaching chain with no real value: `healthlab chain up --shared-host` "
            "(make lab SHARED_HOST=1, or HEALTHLAB_SHARED_HOST=1)"
        )


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie child is reaped and counts as gone)."""
    with contextlib.suppress(ChildProcessError):
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no procfs (macOS): signal 0 only tells that the pid exists
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _is_anvil(pid: int) -> bool:
    """Whether ``pid`` is a running anvil (a recycled pid is somebody else's)."""
    if not _alive(pid):
        return False
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except FileNotFoundError:
        return not Path("/proc/self/stat").exists()
    except OSError:
        return False
    return os.path.basename(argv0) == b"anvil"


class LocalChain:
    """The one local anvil node that notebooks, Voilà pages and reports share.

    Separate processes (JupyterLab's kernels, a Voilà server, a report run) cannot
    share an in-process chain, so they meet on this node through
    ``HEALTHLAB_RPC_URL``. The node runs detached; its files live in ``directory``:

    - ``anvil-state.json`` — the chain, dumped every few seconds and on stop, and
      loaded at the next start (anvil ``--state``): datasets and grants persist;
    - ``anvil.pid`` — the running node (JSON: pid, url, state file), so the next
      :meth:`up` reuses it and :meth:`down` stops it by PID;
    - ``anvil.log`` — what anvil printed.

    Parameters
    ----------
    directory:
        Folder of those files (created on :meth:`up`).
    port:
        Port on 127.0.0.1 for :meth:`up`. A node that answers there but was not
        started from ``directory`` (e.g. ``healthlab node`` in a terminal) is reused
        as it is and never stopped.

    Examples
    --------
    >>> node = LocalChain(".healthlab", 8545).up()  # doctest: +SKIP
    >>> Ledger.connect(node.url)  # deploys the registry once, then finds it
    ... # doctest: +SKIP
    >>> LocalChain(".healthlab").down()  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] = ".healthlab",
        port: int = 8545,
        *,
        chain_id: int = 31337,
        accounts: int = 10,
        shared_host: bool = False,
    ) -> None:
        if not 0 < port < 65536:
            raise ConfigurationError(f"port {port} is not a TCP port (1-65535)")
        self.directory = Path(directory).expanduser().resolve()
        self.port = port
        self.chain_id = chain_id
        self.accounts = accounts
        self.shared_host = shared_host
        self.state_file = self.directory / "anvil-state.json"
        self.pid_file = self.directory / "anvil.pid"
        self.log_path = self.directory / "anvil.log"

    @property
    def url(self) -> str:
        """The JSON-RPC URL :meth:`up` starts the node on."""
        return f"http://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize up/down across processes (``make lab`` next to ``make
        dashboard``)."""
        import fcntl

        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (self.directory / "anvil.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _record(self) -> dict[str, object] | None:
        try:
            record = json.loads(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
            return None
        return record

    def _ours(self) -> ChainProcess | None:
        """The node this folder started, if it still runs (a stale pid file goes)."""
        record = self._record()
        if record is None:
            return None
        pid = int(str(record["pid"]))
        if not _is_anvil(pid):
            self.pid_file.unlink(missing_ok=True)
            return None
        return ChainProcess(
            url=str(record["url"]),
            pid=pid,
            state_file=Path(str(record["state"])),
            log_path=self.log_path,
        )

    def status(self) -> ChainProcess | None:
        """The running node: this folder's, else whatever answers on the port."""
        ours = self._ours()
        if ours is not None:
            return ours
        return ChainProcess(self.url, None) if _answers(self.url) else None

    def up(self, timeout: float = 30.0) -> ChainProcess:
        """Reuse the running node or start one detached; wait until it answers."""
        with self._locked():
            ours = self._ours()
            if ours is not None:
                if ours.url != self.url:
                    raise ConfigurationError(
                        f"the node of {self.directory} already runs at {ours.url} "
                        f"(pid {ours.pid}); use its port, or stop it first with "
                        f"`healthlab chain down --dir {self.directory}`"
                    )
                self._wait(ours.pid, timeout)  # it may still be starting
                return ours
            if _answers(self.url):
                return ChainProcess(self.url, None)
            check_single_user(self.shared_host)
            pid = self._spawn()
            self.pid_file.write_text(
                json.dumps({"pid": pid, "url": self.url, "state": str(self.state_file)})
            )
            try:
                self._wait(pid, timeout)
            except ConfigurationError:
                self._stop(pid, timeout=5.0)
                self.pid_file.unlink(missing_ok=True)
                raise
            return ChainProcess(
                self.url, pid, self.state_file, self.log_path, started=True
            )

    def _spawn(self) -> int:
        binary = _require_anvil()
        args = _anvil_args(
            binary,
            self.port,
            chain_id=self.chain_id,
            accounts=self.accounts,
            state_file=self.state_file,
        )
        # posix_spawn, not Popen: the node outlives this process; setsid keeps a
        # Ctrl-C in the terminal that started it (or make's) from reaching it
        with (
            self.log_path.open("ab") as log,
            open(os.devnull, "rb") as null,
        ):
            return os.posix_spawn(
                binary,
                args,
                dict(os.environ),
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, null.fileno(), 0),
                    (os.POSIX_SPAWN_DUP2, log.fileno(), 1),
                    (os.POSIX_SPAWN_DUP2, log.fileno(), 2),
                ],
                setsid=True,
            )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-500:]
        except FileNotFoundError:
            return "(no log)"

    def _wait(self, pid: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _answers(self.url):
                return
            if pid is not None and not _alive(pid):
                raise ConfigurationError(
                    f"anvil (pid {pid}) exited before answering at {self.url}; is "
                    f"port {self.port} taken? Pick another with --port. Its log "
                    f"({self.log_path}): {self._log_tail()}"
                )
            time.sleep(0.05)
        raise ConfigurationError(
            f"anvil (pid {pid}) did not answer at {self.url} within {timeout:g} s; "
            f"stop it with `healthlab chain down`. Its log: {self._log_tail()}"
        )

    @staticmethod
    def _stop(pid: int, timeout: float) -> bool:
        """SIGTERM (anvil dumps its state), SIGKILL after ``timeout``; True when the
        state was saved by a clean stop."""
        if not _is_anvil(pid):
            return True
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)
        return False

    def down(self, timeout: float = 30.0) -> ChainProcess | None:
        """Stop this folder's node by PID, its state saved; None when none runs.

        A node that answers on the port but was not started from this folder is
        left alone.
        """
        with self._locked():
            ours = self._ours()
            if ours is None or ours.pid is None:
                return None
            clean = self._stop(ours.pid, timeout)
            self.pid_file.unlink(missing_ok=True)
            if not clean:
                raise ConfigurationError(
                    f"anvil (pid {ours.pid}) did not stop within {timeout:g} s and "
                    f"was killed: changes of its last {STATE_INTERVAL} s may be "
                    f"missing from {ours.state_file}"
                )
            return ours
