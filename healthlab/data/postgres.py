"""Start and stop a throwaway PostgreSQL server (for tests and demos), by PID.

The server is Debian's (package ``postgresql``; binaries in
``/usr/lib/postgresql/<version>/bin``): :class:`PostgresServer` runs ``initdb`` in
a temp dir, starts ``postgres`` on its own loopback port with its socket in that
dir, and stops it by signalling the postmaster's PID — like
:class:`healthlab.ledger.node.AnvilNode` does for anvil.

PostgreSQL refuses to run as root. When this process is root, the server runs as
the ``postgres`` system user that the Debian package creates (or ``nobody``; or
``$HEALTHLAB_PG_USER``): ``subprocess`` switches user in the child, and the temp
dir is handed to that user. Otherwise it runs as the current user.

The cluster is for throwaway data: durability is off (``fsync=off``) for speed, and
the only login is a superuser with a random password (SCRAM) on 127.0.0.1.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from healthlab._process import stop_process, wait_until_ready
from healthlab.errors import ConfigurationError
from healthlab.ledger.node import free_port

__all__ = ["PostgresServer", "find_pg_bin"]

_INSTALL = (
    "install PostgreSQL: `apt-get install -y postgresql` (Debian), or set "
    "HEALTHLAB_PG_BIN to a folder holding initdb and postgres"
)


def _version_key(path: str) -> tuple[int, ...]:
    name = Path(path).parent.name
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def find_pg_bin() -> Path | None:
    """Folder of PostgreSQL's server binaries (``initdb``, ``postgres``).

    Looked up in ``$HEALTHLAB_PG_BIN``, then the newest
    ``/usr/lib/postgresql/*/bin``, then next to ``initdb`` on ``PATH``.
    """
    override = os.environ.get("HEALTHLAB_PG_BIN")
    if override:
        return Path(override)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key)
    for folder in reversed(debian):
        if (Path(folder) / "initdb").is_file():
            return Path(folder)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _server_user() -> pwd.struct_passwd | None:
    """The account to run as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    wanted = os.environ.get("HEALTHLAB_PG_USER")
    for name in [wanted] if wanted else ["postgres", "nobody"]:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ConfigurationError(
        "PostgreSQL cannot run as root and there is no `postgres` or `nobody` user: "
        "create one, or set HEALTHLAB_PG_USER to an unprivileged account"
    )


class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 with its own port, data dir and password.

    Examples
    --------
    >>> with PostgresServer() as server:  # doctest: +SKIP
    ...     store = SQLStore(server.url)
    """

    def __init__(self, port: int | None = None, *, user: str = "healthlab") -> None:
        folder = find_pg_bin()
        if folder is None or not (folder / "initdb").is_file():
            raise ConfigurationError(f"PostgreSQL's initdb was not found: {_INSTALL}")
        self.bin = folder
        self.port = port or free_port()
        self.user = user
        self._password = secrets.token_urlsafe(18)
        self._account = _server_user()
        self._tmp = tempfile.TemporaryDirectory(prefix="healthlab-pg-")
        self.root = Path(self._tmp.name)
        self.data_dir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        if self._account is not None:
            os.chown(self.root, self._account.pw_uid, self._account.pw_gid)

    def url_for(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of ``database``, password included."""
        return (
            f"postgresql+psycopg://{self.user}:{self._password}"
            f"@127.0.0.1:{self.port}/{database}"
        )

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default ``postgres`` database, password included."""
        return self.url_for()

    def __repr__(self) -> str:
        return f"PostgresServer(port={self.port}, data_dir={str(self.data_dir)!r})"

    def _run(self, args: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start a PostgreSQL binary as the server's account, in the temp dir."""
        account = self._account
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "TZ": "UTC"}
        if account is not None:
            env["HOME"] = str(self.root)
        return subprocess.Popen(  # noqa: S603 - PostgreSQL's own binaries, fixed args
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.root,
            env=env,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def _initdb(self, timeout: float) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self._password + "\n")
        pwfile.chmod(0o600)
        if self._account is not None:
            os.chown(pwfile, self._account.pw_uid, self._account.pw_gid)
        with self.log_path.open("ab") as log:
            init = self._run(
                [
                    "initdb",
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.user,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
                log,
            )
            try:
                code = init.wait(timeout)
            except subprocess.TimeoutExpired:
                init.kill()
                init.wait()
                code = -1
        pwfile.unlink()
        if code != 0:
            raise ConfigurationError(
                f"initdb failed (exit {code}): {self.log_path.read_text()[-800:]}"
            )

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """Create the cluster and start the server; wait until it accepts logins."""
        deadline = time.monotonic() + timeout
        self._initdb(timeout)
        log = self.log_path.open("ab")
        self.process = self._run(
            [
                "postgres",
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            log,
        )
        log.close()
        wait_until_ready(
            self.process,
            self._ready,
            name="postgres",
            timeout=max(0.0, deadline - time.monotonic()),
            log_tail=lambda: self.log_path.read_text()[-800:],
            stop=self.stop,
        )
        return self

    def _ready(self) -> bool:
        """True once the postmaster says ``ready`` in its PID file (PostgreSQL ≥ 10)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server by PID (SIGINT: fast shutdown), killing it if it hangs."""
        stop_process(self.process, sig=signal.SIGINT, timeout=timeout)
        self.process = None

    def close(self) -> None:
        """Stop and remove the data dir."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> PostgresServer:
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
