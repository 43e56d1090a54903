"""Start and stop a local anvil node (Foundry, from the npm package in contracts/)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import requests

from healthlab._process import stop_process, wait_until_ready
from healthlab.errors import ConfigurationError

__all__ = ["AnvilNode", "find_tool", "free_port"]

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


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AnvilNode:
    """An anvil process on loopback with its own port and temp dir, stopped by PID.

    Parameters
    ----------
    port:
        TCP port; a free one by default.
    state_file:
        Keep the chain in this file across restarts (anvil ``--state``).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        state_file: str | os.PathLike[str] | None = None,
        chain_id: int = 31337,
        accounts: int = 10,
    ) -> None:
        binary = find_tool("anvil")
        if binary is None:
            raise ConfigurationError(
                "anvil is not installed: run `make setup` (npm ci in contracts/ "
                "installs @foundry-rs/anvil-linux-amd64) or set HEALTHLAB_ANVIL"
            )
        self.binary = binary
        self.port = port or free_port()
        self.state_file = Path(state_file) if state_file else None
        self.chain_id = chain_id
        self.accounts = accounts
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="healthlab-anvil-")
        self.log_path = Path(self._tmp.name) / "anvil.log"

    @property
    def url(self) -> str:
        """The node's JSON-RPC URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> AnvilNode:
        """Start anvil and wait until it answers JSON-RPC."""
        args = [
            self.binary,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chain-id",
            str(self.chain_id),
            "--accounts",
            str(self.accounts),
            "--silent",
        ]
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            args += ["--state", str(self.state_file), "--state-interval", "5"]
        if self._answers():
            raise ConfigurationError(
                f"something already answers on {self.url}; pick another port"
            )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our binary, fixed args
                args, stdout=log, stderr=subprocess.STDOUT, cwd=self._tmp.name
            )
        wait_until_ready(
            self.process,
            self._answers,
            name="anvil",
            timeout=timeout,
            log_tail=lambda: self.log_path.read_text()[-500:],
            stop=self.stop,
        )
        return self

    def _answers(self) -> bool:
        try:
            reply = requests.post(
                self.url,
                json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
                timeout=1,
            )
            return reply.ok
        except requests.RequestException:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop anvil by PID (SIGTERM, so a state file is written), then clean up."""
        stop_process(self.process, timeout=timeout)
        self.process = None

    def close(self) -> None:
        """Stop and remove the temp dir."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> AnvilNode:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
