"""A site's settings (its SuperNode's node config), key material and state folder."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from healthlab.errors import ConfigurationError, InvalidInput
from healthlab.federated.spec import toml_value

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from healthlab.ledger import Ledger, SiteKeys

__all__ = ["SiteConfig", "bind_site_keys", "ensure_state_dir", "load_site_key"]


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
        Or a table of a SQL database (``healthlab.data.SQLStore``).
    sql_url_file:
        Or the database URL in a file of mode 600 (where :class:`SiteNode` puts it:
        a password stays out of the process list and of every environment).
    key_path:
        The site's X25519 key (PEM, mode 600) for the pairwise masks; default
        ``<state_dir>/mask-key.pem``, created on first use.
    state_dir:
        Where the site keeps its key and the signatures it has accepted (replays of a
        signed study in another run are refused).
    verify_content:
        Refuse to compute when the data's hash differs from the registered one.
    require_secure:
        Take part only in studies that send nothing per site in clear
        (``secure="masked"``, the default); ``False`` also allows ``secure="none"``.
    """

    name: str
    dataset_id: int
    rpc_url: str
    registry: str
    data: str | None = None
    sql_url: str | None = None
    table: str | None = None
    sql_url_file: str | None = None
    key_path: str | None = None
    state_dir: str | None = None
    verify_content: bool = False
    require_secure: bool = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", self.name or ""):
            raise InvalidInput(
                f"site name {self.name!r}: use 1-64 letters, digits, '_', '-' or '.'"
            )
        if (self.data is None) == (self.table is None):
            raise InvalidInput(
                f"site {self.name}: give either a data file or a SQL table, not both"
            )
        if (self.sql_url or self.sql_url_file) and self.table is None:
            raise InvalidInput(f"site {self.name}: a database URL needs a table")
        if self.sql_url and self.sql_url_file:
            raise InvalidInput(
                f"site {self.name}: give the database URL or a file holding it"
            )
        for value in asdict(self).values():
            if isinstance(value, str) and ("'" in value and '"' in value):
                raise InvalidInput(
                    f"site {self.name}: a setting contains both quote characters"
                )

    def database_url(self) -> str | None:
        """The database URL: given, or read from ``sql_url_file`` (mode 600)."""
        if self.sql_url_file is None:
            return self.sql_url
        path = Path(self.sql_url_file)
        if path.stat().st_mode & 0o077:
            raise ConfigurationError(
                f"{path} is readable by other users; run `chmod 600 {path}`"
            )
        return path.read_text().strip()

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
        url_file = (
            str(Path(self.sql_url_file).expanduser().resolve())
            if self.sql_url_file
            else None
        )
        return replace(
            self,
            data=data,
            key_path=key,
            state_dir=state,
            sql_url=sql_url,
            sql_url_file=url_file,
        )

    def node_config(self) -> str:
        """The ``--node-config`` string (TOML values, space separated)."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            key = {"name": "site-name"}.get(f.name, f.name.replace("_", "-"))
            parts.append(f"{key}={toml_value(value)}")
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
            sql_url_file=opt("sql-url-file"),
            key_path=opt("key-path"),
            state_dir=opt("state-dir"),
            verify_content=bool(config.get("verify-content", False)),
            require_secure=bool(config.get("require-secure", True)),
        )


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


def ensure_state_dir(path: str | os.PathLike[str]) -> Path:
    """Create a site's state dir readable only by its owner."""
    directory = Path(path).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    mode = directory.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        directory.chmod(0o700)
    return directory


def bind_site_keys(
    ledger: Ledger,
    site: SiteConfig,
    *,
    node_key: str | os.PathLike[str] | None = None,
    sender: str | None = None,
) -> SiteKeys:
    """Bind the site's mask key and node key to its dataset on chain (the dataset's
    owner sends it); both keys are made in the site's state dir when missing.

    Peers then mask with exactly these keys and a SuperLink admits exactly this node
    (:meth:`~healthlab.federated.deploy.SuperLink.register_datasets`).
    """
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from healthlab.federated.deploy.pki import make_node_key, node_public_point

    if site.key_path is None and site.state_dir is None:
        raise InvalidInput(f"site {site.name}: give key_path or state_dir")
    state = Path(site.state_dir) if site.state_dir else None
    key_path = (
        Path(site.key_path) if site.key_path else Path(str(state)) / "mask-key.pem"
    )
    if state is not None:
        ensure_state_dir(state)
    mask = (
        load_site_key(key_path)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    node = make_node_key(node_key or Path(str(state or key_path.parent)) / "node-key")
    return ledger.bind_site_keys(
        site.dataset_id, mask, node_public_point(node), sender=sender
    )
