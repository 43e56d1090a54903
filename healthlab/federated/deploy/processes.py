"""The Flower processes of a deployment, on loopback, stopped by PID.

* :class:`SuperLink` — the researcher's server: TLS with the study's certificate
  and SuperNode authentication on by default (``insecure=True`` is a loud
  development opt-in). Nodes are admitted with :meth:`SuperLink.register_node`.
* :class:`SiteNode` — a site: Flower's SuperNode (``--isolation process``, its node
  key, the study's CA) and, beside it, the site runtime
  (:mod:`healthlab.federated.deploy.runtime`): one long-running process that answers
  every message with the HealthLab ClientApp installed at the site and refuses any
  other app bundle before it is unpacked.

What a site's processes can read: both get an environment built from an allowlist
(:func:`flower_env`: locale, paths, Flower's own settings) — never
``HEALTHLAB_PRIVATE_KEY``, ``HEALTHLAB_KEY_FILE``, ``HEALTHLAB_DATABASE_URL``,
passwords or tokens. A database URL is written to ``<state-dir>/database-url``
(mode 600) and read by the site runtime; the SuperNode reads only its node key;
the runtime reads the mask key, the data and the SuperExec secret.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from healthlab.errors import ConfigurationError
from healthlab.federated.deploy.pki import TLSFiles, make_node_key, write_private
from healthlab.federated.deploy.site import SiteConfig, ensure_state_dir
from healthlab.services import ManagedProcess, port_open, stop_process

__all__ = [
    "SiteNode",
    "SuperLink",
    "find_flower",
    "flower_env",
    "require_flower",
]

if TYPE_CHECKING:
    from healthlab.ledger import Ledger

_logger = logging.getLogger("healthlab.federated.deploy")

#: Variables a Flower or site process inherits (everything else is dropped).
_INHERITED = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
_INHERITED_PREFIXES = ("LC_", "COVERAGE_")
#: What a site may never hand on, even when a caller passes it in ``env``.
_SECRET = re.compile(r"PRIVATE|SECRET|PASSWORD|PASSWD|TOKEN|KEY_FILE|DATABASE_URL")


def find_flower(name: str) -> str | None:
    """Path of a Flower command (``flower-superlink``, ``flwr`` …): next to this
    Python first (the venv's ``bin``), then on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def require_flower(name: str) -> str:
    """:func:`find_flower`, or a clear error when Flower is not installed."""
    path = find_flower(name)
    if path is None:
        raise ConfigurationError(
            f"{name} is not installed: install healthlab with its dependencies "
            "(flwr>=1.41,<1.42) in this environment"
        )
    return path


def flower_env(home: str | os.PathLike[str], **extra: str) -> dict[str, str]:
    """The environment of a Flower or site process, built from an allowlist.

    Locale, paths and the venv are inherited; so is nothing else — no private key,
    database URL, password or token of the caller's. On top: its own ``FLWR_HOME``,
    no telemetry or update check, the venv's ``bin`` first on ``PATH`` (Flower
    starts ``flower-superexec`` and ``flwr-serverapp`` from it) and a SuperExec that
    looks for work every 0.1 s instead of every second. ``extra`` may not carry a
    secret either (a name like ``*_PASSWORD``, ``*TOKEN*``, ``*PRIVATE*``).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k in _INHERITED or k.startswith(_INHERITED_PREFIXES)
    }
    refused = sorted(k for k in extra if _SECRET.search(k.upper()))
    if refused:
        raise ConfigurationError(
            f"{refused} would reach a Flower process: pass secrets to a site in a "
            "file it reads (e.g. <state-dir>/database-url), never in its environment"
        )
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
            ),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class _FlowerProcess(ManagedProcess):
    """A Flower process on loopback with its own port, FLWR_HOME and temp dir.

    It runs in its own process group (``start_new_session``), so the SuperExec and
    the app processes it starts can be found and stopped with it, by PID.
    """

    kind = "flower process"
    start_timeout = 60.0
    stop_timeout = 15.0
    poll = 0.1
    new_session = True

    def __init__(
        self,
        port: int | None,
        home: str | os.PathLike[str] | None,
        env: Mapping[str, str] | None,
    ) -> None:
        super().__init__(port)
        self.home = Path(home) if home else self.root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(env or {})

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        return flower_env(self.home, **self.extra_env)

    def logs(self) -> list[str]:
        """Every output of this process and its companions."""
        return [self.log()]

    def group(self) -> list[int]:
        """Live processes of this process's group (itself, SuperExec, apps)."""
        if self.process is None:
            return []
        return _group_members(self.process.pid)

    def stop(self, timeout: float | None = None) -> None:
        """Stop by PID: SIGTERM (then SIGKILL), then what is left of its group."""
        process = self.process
        if process is None:
            return
        limit = self.stop_timeout if timeout is None else timeout
        super().stop(limit)
        # Flower's SuperExec notices its parent is gone within ~0.2 s; then finish
        # off anything of the group still alive.
        pgid = process.pid
        deadline = time.monotonic() + limit
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _group_members(pgid):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            end = time.monotonic() + 5.0
            while _group_members(pgid) and time.monotonic() < end:
                time.sleep(0.1)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel whether the group exists
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        rest = text[text.rfind(")") + 2 :].split()
        state, group = rest[0], int(rest[2])
        if group == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return sorted(members)


def _warn_insecure(kind: str) -> None:
    message = (
        f"INSECURE {kind}: no TLS and no node authentication — anyone who reaches "
        "the port can read the traffic and join as a site. For development only."
    )
    _logger.warning(message)
    print(f"WARNING: {message}", file=sys.stderr)


class SuperLink(_FlowerProcess):
    """A Flower SuperLink on ``127.0.0.1:<port>`` (Fleet, Control and Runtime APIs
    share the port in Flower 1.41); ServerApps run in its subprocesses.

    Parameters
    ----------
    tls:
        The study's CA and the SuperLink's certificate (:func:`make_study_pki`); by
        default a new set in ``<home>/../tls`` of this SuperLink. With TLS, SuperNode
        authentication is on: only nodes registered with :meth:`register_node` join.
    insecure:
        Plain HTTP and no node authentication: a loud opt-in, for development.

    Examples
    --------
    >>> with SuperLink() as link:  # doctest: +SKIP
    ...     link.register_node("site_a/node-key.pub")
    """

    kind = "SuperLink"

    def __init__(
        self,
        port: int | None = None,
        *,
        tls: TLSFiles | None = None,
        insecure: bool = False,
        home: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(port, home, env)
        self.binary = require_flower("flower-superlink")
        self.insecure = insecure
        if tls is None and not insecure:
            from healthlab.federated.deploy.pki import make_study_pki

            tls = make_study_pki(self.root / "tls")
        self.tls = None if insecure else tls
        self.database = self.root / "state.db"

    @property
    def root_certificates(self) -> str | None:
        """The CA certificate sites and ``flwr`` must trust (``None`` if insecure)."""
        return str(self.tls.ca_cert) if self.tls is not None else None

    def _args(self) -> list[str]:
        args = [self.binary]
        if self.tls is None:
            _warn_insecure("SuperLink")
            args.append("--insecure")
        else:
            args += [
                "--ssl-ca-certfile",
                str(self.tls.ca_cert),
                "--ssl-certfile",
                str(self.tls.server_cert),
                "--ssl-keyfile",
                str(self.tls.server_key),
                "--enable-supernode-auth",
                "--database",
                str(self.database),
            ]
        return [
            *args,
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    def _ready(self) -> bool:
        return port_open(self.port) and "startup complete" in self.log()

    def register_node(self, public_key: str | os.PathLike[str]) -> str:
        """Admit a SuperNode by its public key file (``flwr supernode register``)."""
        if self.tls is None:
            raise ConfigurationError(
                "this SuperLink runs without node authentication (insecure): there "
                "is nothing to register"
            )
        from healthlab.federated.deploy.launch import CONNECTION, write_connection

        home = self.root / "control-home"
        write_connection(home, self.address, root_certificates=self.root_certificates)
        done = subprocess.run(  # noqa: S603 - Flower's own command
            [
                require_flower("flwr"),
                "supernode",
                "register",
                str(Path(public_key).expanduser().resolve()),
                CONNECTION,
            ],
            capture_output=True,
            text=True,
            env=flower_env(home),
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise ConfigurationError(
                f"could not register the node key {public_key}: "
                f"{(done.stdout + done.stderr).strip()[-800:]}"
            )
        return done.stdout.strip()

    def register_datasets(self, ledger: Ledger, datasets: Iterable[int]) -> list[int]:
        """Admit the node bound on chain to each of ``datasets`` (and no other);
        returns the datasets registered. A dataset without bound keys is refused."""
        from healthlab.federated.deploy.pki import openssh_public_key

        done = []
        folder = self.root / "bound-keys"
        folder.mkdir(exist_ok=True)
        for dataset in datasets:
            bound = ledger.site_keys(dataset)
            if bound is None:
                raise ConfigurationError(
                    f"dataset {dataset} has no site keys bound on chain; its owner "
                    "binds them (healthlab.federated.deploy.bind_site_keys) first"
                )
            path = folder / f"dataset-{dataset}.pub"
            path.write_bytes(openssh_public_key(bound.node_key) + b"\n")
            self.register_node(path)
            done.append(dataset)
        return done


class SiteNode(_FlowerProcess):
    """A site: Flower's SuperNode and the site runtime beside it.

    The SuperNode connects to ``superlink`` with TLS (``root_certificates``: the
    study's CA) and its node key, and runs no app itself (``--isolation process``).
    The site runtime takes its tasks (signed with a secret only the two share) and
    answers them with the installed HealthLab ClientApp; an app bundle that is not
    the one this HealthLab version writes is refused before anything of it runs.

    Parameters
    ----------
    superlink:
        The SuperLink's ``host:port``.
    site:
        The site's data, dataset, chain and key material.
    root_certificates:
        The study CA's certificate (required unless ``insecure``).
    node_key:
        The SuperNode's private key (OpenSSH, P-384); default
        ``<state-dir>/node-key``, created on first use; register its ``.pub``.
    insecure:
        No TLS, no node key: a loud development opt-in.
    env:
        Extra, non-secret environment for both processes.
    poll:
        Seconds between the SuperNode's polls of the SuperLink, and the site
        runtime's of the SuperNode, when idle: a message waits about this long at
        each hop (a statistic takes five messages per query).
    """

    kind = "SuperNode"

    def __init__(
        self,
        superlink: str,
        site: SiteConfig,
        *,
        root_certificates: str | os.PathLike[str] | None = None,
        node_key: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        port: int | None = None,
        home: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        poll: float = 0.1,
    ) -> None:
        super().__init__(port, home, env)
        self.superlink = superlink
        self.node_poll = poll
        self.insecure = insecure
        if not insecure and root_certificates is None:
            raise ConfigurationError(
                f"site {site.name}: give the study CA's certificate "
                "(root_certificates / --root-certificates) so that the node only "
                "talks to the real SuperLink, or insecure=True for development"
            )
        self.root_certificates = (
            None if insecure else str(Path(str(root_certificates)).expanduser())
        )
        state = Path(site.state_dir or self.root / "site-state")
        self.state_dir = ensure_state_dir(state).resolve()
        self.site = _with_private_database(site.resolved(), self.state_dir)
        if self.site.state_dir is None:
            self.site = replace(self.site, state_dir=str(self.state_dir))
        if insecure:
            self.node_key: Path | None = None
        else:
            default = self.state_dir / "node-key"
            self.node_key = make_node_key(node_key or default)
        self.node_id: int | None = None
        self.runtime: subprocess.Popen[bytes] | None = None
        self.runtime_log = self.root / "runtime.log"

    @property
    def public_key_file(self) -> Path | None:
        """The node key's public half (OpenSSH), to register at the SuperLink."""
        if self.node_key is None:
            return None
        return self.node_key.with_name(self.node_key.name + ".pub")

    def _secret_file(self) -> Path:
        path = self.state_dir / "superexec-secret"
        if not path.exists():
            write_private(path, secrets.token_bytes(32))
        return path

    def _args(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "healthlab.federated.deploy.runtime",
            "supernode",
            "--poll",
            str(self.node_poll),
            "--superlink",
            self.superlink,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(self._secret_file()),
            "--node-config",
            self.site.node_config(),
        ]
        if self.insecure:
            _warn_insecure(f"site {self.site.name}")
            return [*args, "--insecure"]
        return [
            *args,
            "--root-certificates",
            str(self.root_certificates),
            "--auth-supernode-private-key",
            str(self.node_key),
        ]

    def _started(self) -> None:
        assert self.process is not None
        self.runtime = self._spawn(
            [
                sys.executable,
                "-m",
                "healthlab.federated.deploy.runtime",
                "serve",
                "--runtime-api",
                self.address,
                "--secret-file",
                str(self._secret_file()),
                "--parent-pid",
                str(self.process.pid),
                "--poll",
                str(self.node_poll),
            ],
            self.runtime_log,
        )

    def _hint(self) -> str:
        if "Failed to activate SuperNode" in self.log() or "2004" in self.log():
            return (
                f" (its node key is not registered at the SuperLink: register "
                f"{self.public_key_file} there, e.g. `healthlab superlink --register "
                "FILE`, then start the node again)"
            )
        return ""

    def runtime_output(self) -> str:
        """What the site runtime printed so far (its refusals among it)."""
        with contextlib.suppress(FileNotFoundError):
            return self.runtime_log.read_text(errors="replace")
        return ""

    def logs(self) -> list[str]:
        """The SuperNode's output and the site runtime's."""
        return [self.log(), self.runtime_output()]

    def _ready(self) -> bool:
        match = re.search(r"SuperNode ID: (\d+)", self.log())
        if match:
            self.node_id = int(match.group(1))
        serving = "site runtime ready" in self.runtime_output()
        if self.runtime is not None and self.runtime.poll() is not None:
            raise ConfigurationError(
                f"site {self.site.name}: the site runtime exited with code "
                f"{self.runtime.returncode}:\n{self.runtime_output()[-1500:]}"
            )
        return match is not None and serving

    def group(self) -> list[int]:
        """Live processes of the SuperNode's and the site runtime's groups."""
        runtime = _group_members(self.runtime.pid) if self.runtime else []
        return sorted({*super().group(), *runtime})

    def stop(self, timeout: float | None = None) -> None:
        """Stop the SuperNode, then the site runtime, by PID."""
        limit = self.stop_timeout if timeout is None else timeout
        super().stop(limit)
        stop_process(self.runtime, timeout=limit)


def _with_private_database(site: SiteConfig, state: Path) -> SiteConfig:
    """A SQL URL (it may hold a password) moves out of the node config (visible in
    the process list) into ``<state>/database-url``, mode 600, read by the site
    runtime; without one, ``$HEALTHLAB_DATABASE_URL`` of this process is used."""
    if site.table is None:
        return site
    url = site.sql_url or os.environ.get("HEALTHLAB_DATABASE_URL")
    if not url:
        raise ConfigurationError(
            f"site {site.name}: a SQL table needs a database URL (sql_url, or "
            "HEALTHLAB_DATABASE_URL for the command that starts the node)"
        )
    path = state / "database-url"
    path.unlink(missing_ok=True)
    write_private(path, url.encode())
    return replace(site, sql_url=None, sql_url_file=str(path))
