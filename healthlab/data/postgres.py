"""Start and stop a throwaway PostgreSQL server (for tests and demos), by PID.

The server is Debian's (package ``postgresql``; binaries in
``/usr/lib/postgresql/<version>/bin``): :class:`PostgresServer` runs ``initdb`` in
a temp dir, starts ``postgres`` on its own loopback port with its socket in that
dir, and stops it by signalling the postmaster's PID (a
:class:`healthlab.services.ManagedProcess`, like anvil's and Flower's).

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
from pathlib import Path

from healthlab.errors import ConfigurationError
from healthlab.services import ManagedProcess

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


class PostgresServer(ManagedProcess):
    """A PostgreSQL server on 127.0.0.1 with its own port, data dir and password.

    Stopping sends SIGINT (PostgreSQL's fast shutdown).

    Examples
    --------
    >>> with PostgresServer() as server:  # doctest: +SKIP
    ...     store = SQLStore(server.url)
    """

    kind = "postgres"
    log_name = "postgres.log"
    stop_timeout = 30.0
    stop_signal = signal.SIGINT
    tail_chars = 800

    def __init__(self, port: int | None = None, *, user: str = "healthlab") -> None:
        folder = find_pg_bin()
        if folder is None or not (folder / "initdb").is_file():
            raise ConfigurationError(f"PostgreSQL's initdb was not found: {_INSTALL}")
        account = _server_user()
        super().__init__(port)
        self.bin = folder
        self.user = user
        self._password = secrets.token_urlsafe(18)
        self.data_dir = self.root / "data"
        if account is not None:
            self.run_as = (account.pw_uid, account.pw_gid)
            os.chown(self.root, *self.run_as)

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

    def _env(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "TZ": "UTC"}
        if self.run_as is not None:
            env["HOME"] = str(self.root)
        return env

    def _prepare(self, timeout: float) -> None:
        """Create the cluster (``initdb``)."""
        pwfile = self.root / "pwfile"
        pwfile.write_text(self._password + "\n")
        pwfile.chmod(0o600)
        if self.run_as is not None:
            os.chown(pwfile, *self.run_as)
        init = self._spawn(
            [
                str(self.bin / "initdb"),
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
            self.log_path,
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

    def _args(self) -> list[str]:
        return [
            str(self.bin / "postgres"),
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
        ]

    def _ready(self) -> bool:
        """True once the postmaster says ``ready`` in its PID file (PostgreSQL ≥ 10)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"
