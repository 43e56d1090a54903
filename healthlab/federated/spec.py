"""A federated study's settings, one place for every runtime.

:class:`StudySpec` holds every setting of a study with its default, its validation and
its hash. :func:`healthlab.federated.train` (simulation), :func:`~healthlab.federated.
deploy.launch_study` and ``healthlab study`` (deployment) all build one; the
deployment carries it to the sites as Flower's run config, signed by the researcher.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Self

from healthlab.errors import InvalidInput
from healthlab.ledger.signing import SignedQuery

if TYPE_CHECKING:
    from healthlab.federated.server_app import ServerSettings
    from healthlab.federated.task import Model, TrainConfig
    from healthlab.ledger import Ledger

__all__ = ["MODEL_DEFAULTS", "OPTIONAL", "StudySpec", "toml_value"]

#: Local epochs and learning rate per model when the study leaves them unset.
MODEL_DEFAULTS = {"linear": (1, 1.0), "logistic": (10, 0.5), "mlp": (5, 0.1)}
#: Settings whose ``None`` means "not set"; Flower's run config holds only scalars, so
#: there ``0`` stands for ``None``.
OPTIONAL = ("epochs", "lr", "clip_norm", "dp_noise_multiplier", "dp_clipping_norm")


@dataclass(frozen=True)
class StudySpec:
    """A study's settings; in a deployment, the run config of the Flower App
    (kebab-case keys).

    The fields above ``researcher`` are *signed*: :attr:`hash` covers them and the
    researcher signs that hash; a site refuses a run whose settings do not match the
    signature. The signature fields travel with them; the operational fields
    (timeouts, how many nodes to wait for, where to write the result) are not signed.

    Examples
    --------
    >>> study = StudySpec(target="y", features=("a", "b"), rounds=5, datasets=(1, 2))
    >>> study.hash.startswith("0x") and len(study.hash) == 66
    True
    >>> StudySpec.from_run_config(study.to_run_config()) == study
    True
    """

    target: str
    features: tuple[str, ...]
    model: str = "logistic"
    rounds: int = 10
    strategy: str = "fedavg"
    epochs: int | None = None
    lr: float | None = None
    l2: float = 0.0
    batch_size: int = 0
    proximal_mu: float = 0.1
    seed: int = 0
    test_fraction: float = 0.2
    dropna: bool = False
    standardize: bool = True
    min_sites: int = 2
    max_update_norm: float = 1e4
    clip_norm: float | None = None
    dp_noise_multiplier: float | None = None
    dp_clipping_norm: float | None = None
    datasets: tuple[int, ...] = ()
    secure: str = "masked"
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
    #: a statistics session's socket (set by DeployedSites.open; a study has none)
    session: str = ""

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
        "session",
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
        for name in OPTIONAL:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InvalidInput(f"{name} must be positive, or left unset")
        if self.dp_noise_multiplier is not None and self.dp_clipping_norm is None:
            raise InvalidInput("differential privacy needs dp_clipping_norm")
        if self.max_update_norm <= 0:
            raise InvalidInput("max_update_norm must be positive")
        if self.secure not in ("masked", "none"):
            raise InvalidInput('secure must be "masked" (the default) or "none"')
        if self.secure == "masked":
            if self.strategy not in ("fedavg", "fedprox"):
                raise InvalidInput(
                    f"strategy {self.strategy!r} needs each site's update; masked "
                    'studies sum them: use fedavg or fedprox (or secure="none")'
                )
            if self.dp_noise_multiplier is not None:
                raise InvalidInput(
                    "server-side DP noise needs each site's update in clear; it is "
                    'not available with secure="masked" yet (use secure="none")'
                )
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
        """Local training settings (the model's defaults where unset)."""
        from healthlab.federated.task import TrainConfig

        epochs, lr = MODEL_DEFAULTS[self.model]
        return TrainConfig(
            epochs=self.epochs if self.epochs is not None else epochs,
            lr=self.lr if self.lr is not None else lr,
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
            clip_norm=self.clip_norm,
            dp_noise_multiplier=self.dp_noise_multiplier,
            dp_clipping_norm=self.dp_clipping_norm,
            proximal_mu=self.proximal_mu,
        )

    # -------------------------------------------------------- run config
    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """The Flower run config (``[tool.flwr.app.config]``): kebab-case scalars
        (an unset optional setting as 0)."""
        out: dict[str, str | int | float | bool] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                value = 0 if f.name == "epochs" else 0.0
            elif isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            out[f.name.replace("_", "-")] = value
        return out

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> StudySpec:
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
            elif f.type in ("int", "int | None"):
                values[f.name] = _typed(raw, int, key)
            elif f.type in ("float", "float | None"):
                values[f.name] = float(_typed(raw, (int, float), key))
            elif f.type in ("bool", bool):
                values[f.name] = _typed(raw, bool, key)
            else:
                values[f.name] = str(raw)
        if "target" not in values or "features" not in values:
            raise InvalidInput("the run config lacks 'target' or 'features'")
        for name in OPTIONAL:
            if values.get(name) == 0:
                values[name] = None
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


def toml_value(value: str | int | float | bool) -> str:
    """A scalar as a TOML value (strings as literal strings where they can be)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    if "'" not in value and "\n" not in value:
        return f"'{value}'"  # a TOML literal string: no escapes
    return json.dumps(value)
