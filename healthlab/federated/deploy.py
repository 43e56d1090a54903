"""Federated studies on Flower's deployment runtime: a SuperLink, a SuperNode per site.

The simulation (:func:`healthlab.federated.train`) runs every site in one process. In a
deployment each hospital runs its own **SuperNode** next to its data; the researcher
runs a **SuperLink** and launches the study against it with ``flwr run``. The apps are
the same: :mod:`healthlab.federated.deployed_client` wraps the site logic of
:mod:`~healthlab.federated.client_app` (grant gate, local training, held-out metrics)
and :mod:`healthlab.federated.deployed_server` runs the round loop of
:mod:`~healthlab.federated.server_app` (screening, minimum of sites, deadline, DP).

What each side holds
--------------------
* **A site** (its SuperNode's ``--node-config``): its name, its data (a CSV/Parquet
  file, or a table of a SQL database through a SQLAlchemy URL), the dataset id it is
  registered under, the chain (``rpc-url``, ``registry``) it reads grants from, and its
  key material: an X25519 key file for the pairwise masks that hide its totals in the
  pooled statistics. Nothing else leaves it: no rows, no per-site totals.
* **The study** (the app's run config): target, features, model, rounds, strategy,
  local training settings, the dataset ids taking part, and the researcher's EIP-712
  signature of the study's hash (:attr:`StudyConfig.hash`). Every site checks the
  signature, the chain and registry it was made for, its freshness and the
  researcher's live grant on its dataset at its first message of a run, and the
  grant again before every round; it refuses (and sends nothing) otherwise.
* **Standardization** is federated: before the first round the sites exchange X25519
  public keys through the server and send their ``n``, ``Σx`` and ``Σxxᵀ`` as exact
  fixed-point digits plus pairwise masks that cancel in the sum, so the server learns
  only the pooled mean and (co)variance, from which it builds the public transform
  every site applies (standardization; whitening for ``linear``).

Worked example (loopback; one terminal per long-running command)
-----------------------------------------------------------------
::

    # 0. a chain with the registry
    healthlab node --port 8545
    export HEALTHLAB_RPC_URL=http://127.0.0.1:8545
    healthlab deploy                  # prints the registry address: 0xREGISTRY

Each site registers its data (the content hash is the file's sha256, or the hash of
the table as read) and the researcher obtains grants; e.g. from Python::

    from healthlab import Ledger, Site, sha256_of
    from healthlab.data import SQLStore, load_cohort

    SQLStore("sqlite:///site_b.db").write_table("cohort", load_cohort("site_b"))
    table = SQLStore("sqlite:///site_b.db").read_table("cohort")
    ledger = Ledger.connect()  # $HEALTHLAB_RPC_URL, the recorded registry
    owner, researcher = ledger.accounts[1], ledger.accounts[2]
    hashes = {
        "site_a": sha256_of("data_samples/cohort/site_a.csv"),
        "site_b": Site("site_b", table).content_hash,
    }
    for name, content in hashes.items():
        ds = ledger.register_dataset(
            f"https://{name}.example/cohort", content,
            terms="HMB", auto_approve=True, sender=owner,
        )  # dataset ids 1 and 2 on a fresh registry
        ledger.request_access(ds, "10-year CVD risk", "HMB", sender=researcher)

Then::

    # 1. the researcher's SuperLink (one port: Fleet, Control and Runtime APIs)
    healthlab superlink --port 9093

    # 2. one SuperNode per site, each with its own data, port and key material
    healthlab site-node --superlink 127.0.0.1:9093 --site site_a \\
        --data data_samples/cohort/site_a.csv --dataset-id 1 \\
        --registry 0xREGISTRY --state-dir ~/.healthlab/sites/site_a \\
        --port 9101 --verify-content
    healthlab site-node --superlink 127.0.0.1:9093 --site site_b \\
        --sql-url sqlite:///site_b.db --table cohort --dataset-id 2 \\
        --registry 0xREGISTRY --state-dir ~/.healthlab/sites/site_b \\
        --port 9102 --verify-content
    #    (a URL with a password: set HEALTHLAB_DATABASE_URL for the node instead
    #    of --sql-url, so that it does not show in the process list)

    # 3. the study: signed by the researcher (HEALTHLAB_PRIVATE_KEY, or the node's
    #    unlocked account on a dev chain), written into a Flower App and run with
    #    `flwr run <app> healthlab --stream` (connection in $FLWR_HOME/config.toml)
    healthlab study --superlink 127.0.0.1:9093 --registry 0xREGISTRY \\
        --researcher 0xRESEARCHER --datasets 1,2 --sites 2 \\
        --target cvd_event_10y --features age,sbp,smoker,diabetes \\
        --rounds 10 --result study.json

Each site's key (``<state-dir>/mask-key.pem``, mode 600) is created on first start;
``--key PATH`` uses an existing one. The SuperNode of a site that is not part of the
signed study, whose researcher has no live grant, or whose data differs from what was
registered (``--verify-content``) refuses, and the history shows it.

``healthlab study`` prints the history (round, sites, refusals, pooled held-out
loss/accuracy/AUC) and writes the result JSON; :func:`load_result` turns it into a
:class:`~healthlab.federated.FederatedResult` (``predict_proba``, ``history``,
``coefficients``, ``receipt``). From Python the same steps are :class:`SuperLink`,
:class:`SiteNode`, :meth:`StudyConfig.sign` and :func:`launch_study`.

The processes run on loopback with their own ports, ``FLWR_HOME`` and temp dirs, and
are stopped by PID (SIGTERM, then their process group: Flower's SuperExec and app
processes). Stop the SuperNodes before the SuperLink.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

import numpy as np

from healthlab._process import stop_process
from healthlab.errors import ConfigurationError, HealthLabError, InvalidInput
from healthlab.ledger.node import free_port
from healthlab.ledger.signing import SignedQuery

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from healthlab.federated.run import FederatedResult
    from healthlab.federated.server_app import ServerSettings
    from healthlab.federated.task import Model, TrainConfig
    from healthlab.ledger import Ledger
    from healthlab.sites import Site

__all__ = [
    "APP_DIR",
    "DeployedStudy",
    "SiteConfig",
    "SiteNode",
    "StudyConfig",
    "SuperLink",
    "ensure_state_dir",
    "find_flower",
    "flower_env",
    "launch_study",
    "load_result",
    "load_site_key",
    "write_app",
    "write_connection",
]

#: The Flower App (its ``pyproject.toml``) shipped inside the package.
APP_DIR = Path(__file__).resolve().parent / "app"
#: Name of the SuperLink connection written into ``$FLWR_HOME/config.toml``.
CONNECTION = "healthlab"
#: Local epochs and learning rate per model when the study leaves them at 0 (as in
#: :func:`healthlab.federated.train`).
MODEL_DEFAULTS = {"linear": (1, 1.0), "logistic": (10, 0.5), "mlp": (5, 0.1)}


# ------------------------------------------------------------------ the study
@dataclass(frozen=True)
class StudyConfig:
    """A study's settings: the run config of the Flower App (kebab-case keys).

    The fields above ``researcher`` are *signed*: :attr:`hash` covers them and the
    researcher signs that hash; a site refuses a run whose settings do not match the
    signature. The signature fields travel with them; the operational fields
    (timeouts, how many nodes to wait for, where to write the result) are not signed.

    Examples
    --------
    >>> study = StudyConfig(target="y", features=("a", "b"), rounds=5, datasets=(1, 2))
    >>> study.hash.startswith("0x") and len(study.hash) == 66
    True
    >>> StudyConfig.from_run_config(study.to_run_config()) == study
    True
    """

    target: str
    features: tuple[str, ...]
    model: str = "logistic"
    rounds: int = 3
    strategy: str = "fedavg"
    epochs: int = 0
    lr: float = 0.0
    l2: float = 0.0
    batch_size: int = 0
    proximal_mu: float = 0.1
    seed: int = 0
    test_fraction: float = 0.2
    dropna: bool = False
    standardize: bool = True
    min_sites: int = 2
    max_update_norm: float = 1e4
    clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 0.0
    datasets: tuple[int, ...] = ()
    # the signature
    researcher: str = ""
    study_hash: str = ""
    nonce: int = 0
    issued_at: int = 0
    chain_id: int = 0
    registry: str = ""
    signature: str = ""
    # operation
    expected_sites: int = 0
    node_timeout: float = 120.0
    round_timeout: float = 120.0
    result_path: str = ""

    SIGNATURE_FIELDS: ClassVar[tuple[str, ...]] = (
        "researcher",
        "study_hash",
        "nonce",
        "issued_at",
        "chain_id",
        "registry",
        "signature",
    )
    OPERATION_FIELDS: ClassVar[tuple[str, ...]] = (
        "expected_sites",
        "node_timeout",
        "round_timeout",
        "result_path",
    )

    def __post_init__(self) -> None:
        from healthlab.federated.server_app import STRATEGIES
        from healthlab.federated.task import MODELS

        if not self.target:
            raise InvalidInput("a study needs a target column")
        if not self.features:
            raise InvalidInput(
                "a deployed study names its feature columns (features=...): every "
                "site must use the same ones, in the same order"
            )
        if self.target in self.features:
            raise InvalidInput(f"{self.target!r} is both the target and a feature")
        if len(set(self.features)) != len(self.features):
            raise InvalidInput(f"duplicate feature columns: {list(self.features)}")
        if self.model not in MODELS:
            raise InvalidInput(
                f"unknown model {self.model!r}; choose one of {sorted(MODELS)}"
            )
        if self.strategy not in STRATEGIES:
            raise InvalidInput(
                f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}"
            )
        if self.rounds < 1:
            raise InvalidInput("rounds must be at least 1")
        if self.min_sites < 1:
            raise InvalidInput("min_sites must be at least 1")
        if not 0 <= self.test_fraction < 1:
            raise InvalidInput("test_fraction must be in [0, 1)")
        if self.dp_noise_multiplier > 0 and self.dp_clipping_norm <= 0:
            raise InvalidInput("differential privacy needs dp_clipping_norm > 0")
        if self.node_timeout <= 0 or self.round_timeout <= 0:
            raise InvalidInput("node_timeout and round_timeout must be positive")

    # ---------------------------------------------------------------- hashing
    def signed_settings(self) -> dict[str, Any]:
        """The settings the researcher signs (model defaults resolved)."""
        skip = {*self.SIGNATURE_FIELDS, *self.OPERATION_FIELDS}
        out = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip
        }
        out["features"] = list(self.features)
        out["datasets"] = list(self.datasets)
        config = self.train_config()
        out["epochs"], out["lr"] = config.epochs, config.lr
        return out

    @property
    def hash(self) -> str:
        """``0x`` + sha256 of the signed settings (what the researcher signs)."""
        public = {"kind": "federated-deployment", **self.signed_settings()}
        text = json.dumps(public, sort_keys=True, separators=(",", ":"))
        return "0x" + hashlib.sha256(text.encode()).hexdigest()

    @property
    def signed(self) -> bool:
        """Whether the study carries a researcher's signature."""
        return bool(self.signature)

    def sign(
        self, ledger: Ledger, researcher: str, *, nonce: int | None = None
    ) -> Self:
        """This study signed by ``researcher`` (EIP-712, bound to the ledger's chain).

        The key comes from the ledger (``HEALTHLAB_PRIVATE_KEY``/``HEALTHLAB_KEY_FILE``,
        or the node's unlocked account); a fresh random nonce is used by default.
        """
        query = ledger.sign_query(
            researcher,
            self.hash,
            nonce=secrets.randbits(62) if nonce is None else nonce,
        )
        return replace(
            self,
            researcher=query.researcher,
            study_hash=query.query_hash,
            nonce=query.nonce,
            issued_at=query.issued_at,
            chain_id=query.chain_id,
            registry=query.registry,
            signature=query.signature,
        )

    def signed_query(self) -> SignedQuery | None:
        """The signature as a :class:`SignedQuery` (``None`` when unsigned)."""
        if not self.signed:
            return None
        return SignedQuery(
            self.researcher,
            self.study_hash,
            self.nonce,
            self.issued_at,
            self.chain_id,
            self.registry,
            self.signature,
        )

    # ------------------------------------------------------- what it builds
    def train_config(self) -> TrainConfig:
        """Local training settings (the model's defaults where left at 0)."""
        from healthlab.federated.task import TrainConfig

        epochs, lr = MODEL_DEFAULTS[self.model]
        return TrainConfig(
            epochs=self.epochs or epochs,
            lr=self.lr or lr,
            l2=self.l2,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def model_family(self) -> Model:
        """The model family (``logistic``, ``linear`` or ``mlp``)."""
        from healthlab.federated.task import get_model

        return get_model(self.model)

    def server_settings(self) -> ServerSettings:
        """How the server runs the rounds."""
        from healthlab.federated.server_app import ServerSettings

        return ServerSettings(
            rounds=self.rounds,
            strategy=self.strategy,
            min_sites=self.min_sites,
            round_timeout=self.round_timeout,
            max_update_norm=self.max_update_norm,
            clip_norm=self.clip_norm or None,
            dp_noise_multiplier=self.dp_noise_multiplier or None,
            dp_clipping_norm=self.dp_clipping_norm or None,
            proximal_mu=self.proximal_mu,
        )

    # -------------------------------------------------------- run config
    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """The Flower run config (``[tool.flwr.app.config]``): kebab-case scalars."""
        out: dict[str, str | int | float | bool] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            out[f.name.replace("_", "-")] = value
        return out

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> StudyConfig:
        """Parse a Flower run config; unknown keys are ignored, missing ones default."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                continue
            raw = config[key]
            if f.name == "features":
                values[f.name] = tuple(c.strip() for c in str(raw).split(",") if c)
            elif f.name == "datasets":
                values[f.name] = _int_list(str(raw), key)
            elif f.type in ("int", int):
                values[f.name] = _typed(raw, int, key)
            elif f.type in ("float", float):
                values[f.name] = float(_typed(raw, (int, float), key))
            elif f.type in ("bool", bool):
                values[f.name] = _typed(raw, bool, key)
            else:
                values[f.name] = str(raw)
        if "target" not in values or "features" not in values:
            raise InvalidInput("the run config lacks 'target' or 'features'")
        return cls(**values)


def _typed(value: Any, kind: type | tuple[type, ...], key: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise InvalidInput(f"run config {key!r} must be a number, not a boolean")
    if not isinstance(value, kind):
        raise InvalidInput(f"run config {key!r} has the wrong type ({value!r})")
    return value


def _int_list(text: str, key: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidInput(f"{key!r} must be comma-separated integers") from None


# ------------------------------------------------------------------ a site
@dataclass(frozen=True)
class SiteConfig:
    """What a site's SuperNode is started with (its ``--node-config``).

    Parameters
    ----------
    name:
        The site's public name.
    dataset_id, rpc_url, registry:
        The dataset the data is registered under and the chain holding its grants.
    data:
        A CSV or Parquet file (its sha256 is the content hash registered on chain).
    sql_url, table:
        Or a table of a SQL database (``healthlab.data.SQLStore``); without
        ``sql_url`` the site reads ``$HEALTHLAB_DATABASE_URL`` (keeps a password out of
        the process list).
    key_path:
        The site's X25519 key (PEM, mode 600) for the pairwise masks; default
        ``<state_dir>/mask-key.pem``, created on first use.
    state_dir:
        Where the site keeps its key and the signatures it has accepted (replays of a
        signed study in another run are refused).
    verify_content:
        Refuse to compute when the data's hash differs from the registered one.
    """

    name: str
    dataset_id: int
    rpc_url: str
    registry: str
    data: str | None = None
    sql_url: str | None = None
    table: str | None = None
    key_path: str | None = None
    state_dir: str | None = None
    verify_content: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", self.name or ""):
            raise InvalidInput(
                f"site name {self.name!r}: use 1-64 letters, digits, '_', '-' or '.'"
            )
        if (self.data is None) == (self.table is None):
            raise InvalidInput(
                f"site {self.name}: give either a data file or a SQL table, not both"
            )
        if self.sql_url is not None and self.table is None:
            raise InvalidInput(f"site {self.name}: sql_url needs a table")
        for value in asdict(self).values():
            if isinstance(value, str) and ("'" in value and '"' in value):
                raise InvalidInput(
                    f"site {self.name}: a setting contains both quote characters"
                )

    def resolved(self) -> SiteConfig:
        """This config with relative paths (data file, SQLite database, key, state)
        made absolute: the ClientApp runs in another working directory."""
        data = str(Path(self.data).expanduser().resolve()) if self.data else None
        key = str(Path(self.key_path).expanduser().resolve()) if self.key_path else None
        state = (
            str(Path(self.state_dir).expanduser().resolve()) if self.state_dir else None
        )
        sql_url = self.sql_url
        if sql_url is not None:
            import sqlalchemy as sa

            url = sa.make_url(sql_url)
            database = url.database
            if (
                url.get_backend_name() == "sqlite"
                and database
                and database != ":memory:"
                and not database.startswith("file:")
                and not Path(database).is_absolute()
            ):
                absolute = str(Path(database).expanduser().resolve())
                sql_url = url.set(database=absolute).render_as_string(
                    hide_password=False
                )
        return replace(self, data=data, key_path=key, state_dir=state, sql_url=sql_url)

    def node_config(self) -> str:
        """The ``--node-config`` string (TOML values, space separated)."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            key = {"name": "site-name"}.get(f.name, f.name.replace("_", "-"))
            parts.append(f"{key}={_toml_value(value)}")
        return " ".join(parts)

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> SiteConfig:
        """Parse a SuperNode's node config (as the ClientApp sees it)."""
        missing = [
            k
            for k in ("site-name", "dataset-id", "rpc-url", "registry")
            if k not in config
        ]
        if missing:
            raise InvalidInput(
                f"this SuperNode's --node-config lacks {missing}: start it with "
                "`healthlab site-node` (site-name, dataset-id, rpc-url, registry and "
                "data-path or table)"
            )

        def opt(key: str) -> str | None:
            value = config.get(key)
            return None if value is None or value == "" else str(value)

        return cls(
            name=str(config["site-name"]),
            dataset_id=int(config["dataset-id"]),
            rpc_url=str(config["rpc-url"]),
            registry=str(config["registry"]),
            data=opt("data") or opt("data-path"),
            sql_url=opt("sql-url"),
            table=opt("table"),
            key_path=opt("key-path"),
            state_dir=opt("state-dir"),
            verify_content=bool(config.get("verify-content", False)),
        )


def _toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    if "'" not in value and "\n" not in value:
        return f"'{value}'"  # a TOML literal string: no escapes
    return json.dumps(value)


def load_site_key(
    path: str | os.PathLike[str], *, create: bool = True
) -> X25519PrivateKey:
    """A site's X25519 key from a PEM file (created with mode 600 when missing)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    file = Path(path).expanduser()
    if not file.exists():
        if not create:
            raise ConfigurationError(f"no key file at {file}")
        file.parent.mkdir(parents=True, exist_ok=True)
        key = X25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        descriptor = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
        return key
    if file.stat().st_mode & 0o077:
        raise ConfigurationError(
            f"{file} is readable by other users; run `chmod 600 {file}`"
        )
    loaded = serialization.load_pem_private_key(file.read_bytes(), password=None)
    if not isinstance(loaded, X25519PrivateKey):
        raise ConfigurationError(f"{file} does not hold an X25519 private key")
    return loaded


# --------------------------------------------------------------- processes
def find_flower(name: str) -> str | None:
    """Path of a Flower command (``flower-superlink``, ``flwr`` …): next to this
    Python first (the venv's ``bin``), then on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def _require_flower(name: str) -> str:
    path = find_flower(name)
    if path is None:
        raise ConfigurationError(
            f"{name} is not installed: install healthlab with its dependencies "
            "(flwr>=1.41,<1.42) in this environment"
        )
    return path


def flower_env(home: str | os.PathLike[str], **extra: str) -> dict[str, str]:
    """The environment for Flower processes: their own ``FLWR_HOME``, no telemetry,
    no update check, the venv's ``bin`` first on ``PATH`` (Flower starts
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` from it) and a
    SuperExec that looks for work every 0.1 s instead of every second."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), env.get("PATH", "")]
            ),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class _FlowerProcess:
    """A Flower process on loopback with its own port, FLWR_HOME and temp dir.

    It runs in its own process group (``start_new_session``), so the SuperExec and
    the app processes it starts can be found and stopped with it, by PID.
    """

    kind = "flower process"

    def __init__(
        self,
        port: int | None,
        home: str | os.PathLike[str] | None,
        env: Mapping[str, str] | None,
    ) -> None:
        self.port = port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"healthlab-{self.kind[:9]}-")
        self.home = Path(home) if home else Path(self._tmp.name) / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(self._tmp.name) / "output.log"
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id while started."""
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """Whether the main process is alive."""
        return self.process is not None and self.process.poll() is None

    def _args(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def log(self) -> str:
        """Everything the process printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 60.0) -> Self:
        """Start the process and wait until it is ready (clear error on timeout)."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> Self:
        """Start the process without waiting (see :meth:`wait_ready`)."""
        if self.running:
            return self
        if _port_open(self.port):
            raise ConfigurationError(
                f"port {self.port} on 127.0.0.1 is taken; pick another for the "
                f"{self.kind}"
            )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - Flower's own commands
                self._args(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._tmp.name,
                env=flower_env(self.home, **self.extra_env),
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> Self:
        """Wait until the launched process is ready; stop it and raise otherwise."""
        if self.process is None:
            raise ConfigurationError(f"the {self.kind} was not launched")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise ConfigurationError(
                    f"the {self.kind} exited with code {code}:\n{self.log()[-1500:]}"
                )
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise ConfigurationError(
            f"the {self.kind} was not ready within {timeout:g} s:\n{self.log()[-1500:]}"
        )

    def group(self) -> list[int]:
        """Live processes of this process's group (itself, SuperExec, apps)."""
        if self.process is None:
            return []
        return _group_members(self.process.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop by PID: SIGTERM (then SIGKILL), then what is left of its group."""
        process = self.process
        if process is None:
            return
        stop_process(process, timeout=timeout)
        # Flower's SuperExec notices its parent is gone within ~0.2 s; then finish
        # off anything of the group still alive.
        pgid = process.pid
        deadline = time.monotonic() + timeout
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

    def close(self) -> None:
        """Stop and remove the temp dir."""
        self.stop()
        self.process = None
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


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


class SuperLink(_FlowerProcess):
    """A Flower SuperLink on ``127.0.0.1:<port>`` (Fleet, Control and Runtime APIs
    share the port in Flower 1.41); ServerApps run in its subprocesses.

    Examples
    --------
    >>> with SuperLink() as link:  # doctest: +SKIP
    ...     print(link.address)
    """

    kind = "SuperLink"

    def __init__(
        self,
        port: int | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(port, home, env)
        self.binary = _require_flower("flower-superlink")

    def _args(self) -> list[str]:
        return [
            self.binary,
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    def _ready(self) -> bool:
        return _port_open(self.port) and "startup complete" in self.log()


class SiteNode(_FlowerProcess):
    """A site's Flower SuperNode: connects to ``superlink``, serves its ClientApp
    runtime on its own port, and carries the site's settings in ``--node-config``.

    Parameters
    ----------
    superlink:
        The SuperLink's ``host:port``.
    site:
        The site's data, dataset, chain and key material.
    env:
        Extra environment for the node (e.g. ``HEALTHLAB_DATABASE_URL``).
    """

    kind = "SuperNode"

    def __init__(
        self,
        superlink: str,
        site: SiteConfig,
        *,
        port: int | None = None,
        home: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(port, home, env)
        self.binary = _require_flower("flower-supernode")
        self.superlink = superlink
        self.site = site.resolved()
        self.node_id: int | None = None

    def _args(self) -> list[str]:
        return [
            self.binary,
            "--insecure",
            "--superlink",
            self.superlink,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--node-config",
            self.site.node_config(),
        ]

    def _ready(self) -> bool:
        match = re.search(r"SuperNode ID: (\d+)", self.log())
        if match:
            self.node_id = int(match.group(1))
        return match is not None


# ------------------------------------------------------------- the study
def write_app(directory: str | os.PathLike[str], study: StudyConfig) -> Path:
    """Write the Flower App for ``study``: the packaged ``pyproject.toml`` with the
    study's values in ``[tool.flwr.app.config]``. Returns the app directory."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    template = (APP_DIR / "pyproject.toml").read_text()
    table = re.search(r"^\[tool\.flwr\.app\.config\]$", template, re.MULTILINE)
    if table is None:
        raise ConfigurationError(f"{APP_DIR}/pyproject.toml has no run config table")
    head, marker = template[: table.start()], table.group(0)
    known = tomllib.loads(template)["tool"]["flwr"]["app"]["config"]
    values = study.to_run_config()
    if set(values) != set(known):
        raise ConfigurationError(
            "the packaged app's run config and StudyConfig differ: "
            f"{sorted(set(values) ^ set(known))}"
        )
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    text = head + marker + "\n" + "\n".join(lines) + "\n"
    tomllib.loads(text)  # refuse to write an invalid file
    (target / "pyproject.toml").write_text(text)
    return target


def write_connection(
    home: str | os.PathLike[str],
    address: str,
    *,
    name: str = CONNECTION,
    root_certificates: str | None = None,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection (the default).

    Insecure (plain HTTP) unless ``root_certificates`` is given.
    """
    path = Path(home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {_toml_value(root_certificates)}"
        if root_certificates
        else "insecure = true"
    )
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f"[superlink.{name}]\naddress = {_toml_value(address)}\n{security}\n"
    )
    return path


@dataclass
class DeployedStudy:
    """What :func:`launch_study` returns."""

    result: FederatedResult
    raw: dict[str, Any] = field(repr=False)
    output: str = field(repr=False)
    seconds: float = 0.0

    @property
    def history(self) -> Any:
        """The result's history (one row per round)."""
        return self.result.history


def launch_study(
    superlink: str,
    study: StudyConfig,
    *,
    ledger: Ledger | None = None,
    workdir: str | os.PathLike[str] | None = None,
    home: str | os.PathLike[str] | None = None,
    root_certificates: str | None = None,
    timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> DeployedStudy:
    """Run ``study`` against the SuperLink at ``superlink`` with ``flwr run --stream``.

    Parameters
    ----------
    study:
        Signed with :meth:`StudyConfig.sign` when the sites check grants.
    ledger:
        The researcher's ledger: with it the result carries a receipt naming each
        site's grant.
    workdir:
        Where the app directory (and by default the result JSON) are written; a temp
        dir by default, removed afterwards.
    home:
        ``FLWR_HOME`` for ``flwr run`` (its ``config.toml`` gets the connection).
    timeout:
        Seconds for the whole run (default: node timeout + rounds × 3 round
        timeouts + 120).
    echo:
        Called with every line ``flwr run`` prints (the streamed ServerApp log).
    """
    flwr = _require_flower("flwr")
    tmp = (
        None if workdir is not None else tempfile.TemporaryDirectory(prefix="hl-study-")
    )
    base = Path(workdir) if workdir is not None else Path(tmp.name)  # type: ignore[union-attr]
    try:
        base.mkdir(parents=True, exist_ok=True)
        if not study.result_path:
            study = replace(study, result_path=str((base / "result.json").resolve()))
        result_file = Path(study.result_path)
        result_file.unlink(missing_ok=True)
        app = write_app(base / "app", study)
        flwr_home = Path(home) if home else base / "flwr-home"
        write_connection(flwr_home, superlink, root_certificates=root_certificates)
        limit = timeout or (
            study.node_timeout + study.rounds * 3 * study.round_timeout + 120
        )
        started = time.monotonic()
        output = _run_flwr(
            [flwr, "run", str(app), CONNECTION, "--stream"],
            env=flower_env(flwr_home),
            cwd=base,
            timeout=limit,
            result_file=result_file,
            echo=echo,
        )
        seconds = time.monotonic() - started
        if not result_file.is_file():
            raise HealthLabError(
                "the study wrote no result (did the ServerApp start? is "
                f"result-path on this host?); flwr run printed:\n{output[-2000:]}"
            )
        raw = json.loads(result_file.read_text())
        if raw.get("status") != "finished":
            raise HealthLabError(
                f"the study failed on the SuperLink: {raw.get('error')}"
                + (f"\n{output[-1500:]}" if raw.get("status") != "failed" else "")
            )
        return DeployedStudy(load_result(raw, ledger=ledger), raw, output, seconds)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run_flwr(
    args: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    timeout: float,
    result_file: Path,
    echo: Callable[[str], None] | None,
) -> str:
    """Run ``flwr run --stream``; return its output.

    The log stream of Flower 1.41 ends a while after the ServerApp has finished; once
    the result file says the study is over, ``flwr run`` gets 3 seconds to end
    on its own and is then stopped (by PID): the run itself is complete.
    """
    lines: list[str] = []
    process = subprocess.Popen(  # noqa: S603 - Flower's own command
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )

    def pump() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if echo is not None:
                echo(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    finished_at: float | None = None
    try:
        while process.poll() is None:
            now = time.monotonic()
            if now > deadline:
                raise HealthLabError(
                    f"the study did not finish within {timeout:g} s; flwr run "
                    "printed:\n" + "\n".join(lines[-40:])
                )
            if finished_at is None and _result_final(result_file):
                finished_at = now
            if finished_at is not None and now - finished_at > 3.0:
                break
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(5)
        if process.stdout is not None:
            process.stdout.close()
    return "\n".join(lines)


def _result_final(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("status") in ("finished", "failed")
    except (OSError, ValueError):
        return False


class _Declared:
    """A site as the researcher knows it: name, dataset and content hash (no data)."""

    def __init__(
        self,
        name: str,
        dataset_id: int | None,
        content_hash: str | None,
        ledger: Ledger | None,
    ) -> None:
        self.name = name
        self.dataset_id = dataset_id
        self.content_hash = content_hash
        self.ledger = ledger if dataset_id is not None else None

    @property
    def gated(self) -> bool:
        return self.ledger is not None


def load_result(
    source: str | os.PathLike[str] | Mapping[str, Any], *, ledger: Ledger | None = None
) -> FederatedResult:
    """A :class:`~healthlab.federated.FederatedResult` from a deployed study's JSON.

    ``test_index`` is empty: the held-out rows stay at the sites. With the
    researcher's ``ledger`` the receipt names each site's grant.
    """
    from healthlab.federated.run import FederatedResult
    from healthlab.federated.server_app import RoundReport
    from healthlab.federated.study import Preprocessing
    from healthlab.federated.task import get_model
    from healthlab.receipts import build_receipt

    raw = (
        dict(source)
        if isinstance(source, Mapping)
        else json.loads(Path(source).read_text())
    )
    if raw.get("status") != "finished":
        raise HealthLabError(f"the study did not finish: {raw.get('error')}")
    study = raw["study"]
    params = [
        np.asarray(values, dtype=np.float64).reshape(shape)
        for values, shape in zip(raw["params"], raw["shapes"], strict=True)
    ]
    prep = Preprocessing(
        tuple(raw["preprocessing"]["center"]),
        tuple(tuple(row) for row in raw["preprocessing"]["matrix"]),
    )
    rounds = [RoundReport(**r) for r in raw["rounds"]]
    taken = {s for r in rounds for s in r.sites}
    sites = [
        _Declared(s["name"], s.get("dataset_id"), s.get("content_hash"), ledger)
        for s in raw["sites"]
        if s["name"] in taken
    ]
    researcher = study.get("researcher") or None
    receipt = build_receipt(
        kind="federated",
        result={f"param{i}": p.tolist() for i, p in enumerate(params)},
        queries=[{"kind": "federated-deployment", "study_hash": raw["study_hash"]}],
        parameters={
            **{k: v for k, v in study.items() if k not in StudyConfig.SIGNATURE_FIELDS},
            "runtime": "flower-deployment",
        },
        sites=cast("list[Site]", sites),  # stand-ins: name, dataset, hash, ledger
        researcher=researcher,
        refused={k: v for r in rounds for k, v in r.refused.items()},
        extra={
            "history": [
                {"round": r.round, "sites": r.sites, **r.pooled} for r in rounds
            ]
        },
    )
    features = list(study["features"])
    return FederatedResult(
        get_model(study["model"]),
        params,
        features,
        study["target"],
        prep,
        rounds,
        receipt,
        {},
    )


def ensure_state_dir(path: str | os.PathLike[str]) -> Path:
    """Create a site's state dir readable only by its owner."""
    directory = Path(path).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    mode = directory.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        directory.chmod(0o700)
    return directory
