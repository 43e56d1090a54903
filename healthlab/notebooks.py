"""What the notebooks call: a study's grants, tables and figures, headless runs.

The notebooks in ``notebooks/`` hold narrative and parameters; the steps they share
live here, typed and tested:

- :func:`open_study` registers each site's data on a chain, and has the researcher
  request access and each owner approve — the gated sites of a study.
- :func:`show` displays a table for people (HTML, text) together with a
  machine-readable copy that :func:`tables` reads back from an executed notebook, so
  tests and reports check the numbers a notebook produced, not only that it ran.
- Plaintext references (:func:`pandas_histogram`, :func:`pandas_ols`), the
  comparison table :func:`compare`, federated helpers (:func:`progress_printer`,
  :func:`revoke_after`, :func:`round_table`, :func:`federated_vs_centralized`) and
  figures (:func:`plot_metric`, :func:`plot_histogram`, :func:`plot_coefficients`;
  ``None`` when matplotlib is missing — the tables carry the same numbers).
- :func:`run_notebook` executes a notebook with papermill and :func:`export_html`
  turns the result into a static HTML report (``healthlab report``, ``make report``).
- Parties in separate kernels (``01`` the researcher, ``02`` the owner):
  :func:`connect_chain` picks the shared node (``rpc_url``, else
  ``$HEALTHLAB_RPC_URL``) or the embedded chain, :func:`node_account` picks an
  account by index, :func:`ensure_catalogue` registers the sample datasets once
  and :func:`ensure_directory` the owner directory that names their owners (both
  idempotent), :func:`chain_table` and :func:`chain_events` show the chain.
- The citizen health score (``05``): :func:`factor_table`,
  :func:`plot_factor_curves`, :func:`score_sites` (scores computed at each site),
  :func:`city_scores` (per-city aggregates over encrypted site totals) next to
  :func:`pandas_city_scores`, and :func:`oracle_requests` / :func:`worker_actions`
  for the city score oracle.

Examples
--------
>>> study = open_study(Ledger.local(), load_cohort_sites(), purpose="CVD risk")
>>> table = encrypted.describe(study.sites, ["age"], researcher=study.researcher)
>>> show(table, "describe", title="Age, pooled across sites")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from traitlets.config import Config

from healthlab.errors import (
    ConfigurationError,
    DisclosureRefused,
    DuplicateDataset,
    HealthLabError,
    InvalidInput,
)
from healthlab.sites import DisclosurePolicy, Site

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from healthlab.data import CityTables
    from healthlab.encrypted import KeyHolder
    from healthlab.federated import FederatedResult, RoundReport
    from healthlab.ledger import Ledger
    from healthlab.oracle import OracleClient, WorkerAction
    from healthlab.receipts import Receipt, Verification

__all__ = [
    "CITIZEN_TERMS",
    "HOSPITAL_TERMS",
    "NOTEBOOKS_DIR",
    "SAMPLE_DIRECTORY",
    "SAMPLE_HOSPITALS",
    "TABLE_MIMETYPE",
    "CityScores",
    "Comparison",
    "Connection",
    "SampleDataset",
    "Study",
    "chain_events",
    "chain_table",
    "citizen_days",
    "city_scores",
    "compare",
    "connect_chain",
    "ensure_catalogue",
    "ensure_directory",
    "export_html",
    "factor_table",
    "federated_vs_centralized",
    "in_period",
    "node_account",
    "notebook_path",
    "open_study",
    "oracle_requests",
    "pandas_city_scores",
    "pandas_coxph",
    "pandas_histogram",
    "pandas_logit",
    "pandas_ols",
    "parse_parameters",
    "plot_coefficients",
    "plot_factor_curves",
    "plot_histogram",
    "plot_metric",
    "plot_survival",
    "progress_printer",
    "provenance",
    "receipt_of",
    "receipt_table",
    "revoke_after",
    "round_table",
    "run_notebook",
    "sample_datasets",
    "score_sites",
    "show",
    "site_summary",
    "summary",
    "table_one",
    "tables",
    "verification_table",
    "worker_actions",
]

#: The repository's notebooks (``NN_snake_case.ipynb``).
NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
#: The output type :func:`show` adds next to HTML and text: the table as JSON.
TABLE_MIMETYPE = "application/vnd.healthlab.table+json"
#: Environment every headless run gets: no telemetry, no downloads.
RUN_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}
#: Parameter names that look like credentials (papermill writes parameters into the
#: executed notebook twice; keys come from the environment, never from parameters).
_SECRET_NAME = re.compile(
    r"key|secret|token|passw|mnemonic|credential|seed_phrase", re.IGNORECASE
)
_HEX64 = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


# ------------------------------------------------------------------ the study
@dataclass
class Study:
    """The gated sites of a study on one chain, their owners and the grants made."""

    ledger: Ledger
    researcher: str
    sites: list[Site]
    owners: dict[str, str]
    datasets: dict[str, int]
    requests: dict[str, int] = field(default_factory=dict)

    def site(self, name: str) -> Site:
        """The site called ``name``."""
        for site in self.sites:
            if site.name == name:
                return site
        raise InvalidInput(f"no site {name!r}; the study has {list(self.owners)}")

    def parties(self) -> pd.DataFrame:
        """Who is who: each owner with its dataset and grant, and the researcher."""
        rows = [
            {
                "party": f"data owner of {name}",
                "address": owner,
                "dataset": self.datasets[name],
                "request": self.requests.get(name),
                "has access": self.ledger.has_access(
                    self.datasets[name], self.researcher
                ),
            }
            for name, owner in self.owners.items()
        ]
        rows.append({"party": "researcher", "address": self.researcher})
        table = pd.DataFrame(rows).set_index("party")
        return table.astype(
            {"dataset": "Int64", "request": "Int64", "has access": "boolean"}
        )

    def revoke(self, name: str) -> None:
        """The owner of site ``name`` revokes the researcher's grant."""
        self.ledger.revoke(
            self.datasets[name], self.researcher, sender=self.owners[name]
        )


def open_study(
    ledger: Ledger,
    frames: Mapping[str, pd.DataFrame],
    *,
    purpose: str,
    codes: str = "HMB|NCU",
    terms: str = "HMB|NCU",
    fee_wei: int = 0,
    grant_seconds: int = 30 * 24 * 3600,
    grant: Sequence[str] | None = None,
    researcher: str | None = None,
    policy: DisclosurePolicy | None = None,
) -> Study:
    """Register every site's data, request access to each and have its owner approve.

    Site ``i`` is owned by ``ledger.accounts[1 + i]``; the researcher defaults to the
    next account. Each dataset is registered with the content hash of the site's
    frame (what :func:`healthlab.receipts.verify` checks), a ``https://`` pointer,
    ``fee_wei``, ``grant_seconds`` and use ``terms``; the researcher requests access
    to the sites named in ``grant`` (default: all) with ``purpose`` and ``codes``
    and pays the fee, and each owner approves.

    Examples
    --------
    >>> study = open_study(
    ...     Ledger.local(), load_cohort_sites(), purpose="CVD risk"
    ... )  # doctest: +SKIP
    >>> study.parties()  # doctest: +SKIP
    """
    names = [str(n) for n in frames]
    accounts = ledger.accounts
    if len(accounts) < len(names) + 2:
        raise InvalidInput(
            f"{len(names)} sites need {len(names) + 2} accounts (deployer, owners, "
            f"researcher); the chain has {len(accounts)}"
        )
    chosen = set(names if grant is None else grant)
    unknown = sorted(chosen - set(names))
    if unknown:
        raise InvalidInput(f"cannot grant unknown sites {unknown}; sites: {names}")
    who = researcher or accounts[1 + len(names)]
    study = Study(ledger, who, [], {}, {})
    for i, (name, frame) in enumerate(frames.items()):
        owner = accounts[1 + i]
        ds = ledger.register_dataset(
            f"https://{name.replace('_', '-')}.hospital.example/cohort.csv",
            Site(name, frame).content_hash,
            fee_wei=fee_wei,
            grant_seconds=grant_seconds,
            terms=terms,
            sender=owner,
        )
        if name in chosen:
            request = ledger.request_access(ds, purpose, codes, sender=who)
            ledger.approve(request, sender=owner)
            study.requests[name] = request
        study.owners[name] = owner
        study.datasets[name] = ds
        study.sites.append(
            Site(name, frame, dataset_id=ds, ledger=ledger, policy=policy)
        )
    return study


# ------------------------------------------------------- parties and chains
class Connection(NamedTuple):
    """The chain a notebook uses, and whether other kernels share it."""

    ledger: Ledger
    #: True on a node (other notebooks, Voilà pages, people act on it too); False on
    #: the embedded chain, which only this kernel sees.
    shared: bool


def connect_chain(rpc_url: str = "") -> Connection:
    """The shared node when one is configured, else the embedded chain.

    ``rpc_url`` (a notebook parameter) first, then ``$HEALTHLAB_RPC_URL`` (what
    ``make lab`` and ``make dashboard`` export), then :meth:`Ledger.local`. On a node
    the registry recorded for that chain in ``$HEALTHLAB_HOME/deployments.json`` is
    used (deployed and recorded when there is none), so every kernel finds the same
    one. Keys come from the environment or the node's unlocked accounts, never from
    here.

    Examples
    --------
    >>> ledger, shared = connect_chain("")  # no node configured: embedded
    >>> shared
    False
    """
    from healthlab.ledger import Ledger

    if not isinstance(rpc_url, str):
        raise InvalidInput("rpc_url is a node's URL as text, or '' for the default")
    url = rpc_url.strip() or os.environ.get("HEALTHLAB_RPC_URL", "").strip()
    if not url:
        return Connection(Ledger.local(), False)
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        source = "rpc_url" if rpc_url.strip() else "HEALTHLAB_RPC_URL"
        raise InvalidInput(
            f"{source} must be a node's http(s) URL such as http://127.0.0.1:8545 "
            "(`make lab` or `healthlab chain up` starts one), or empty for the "
            "embedded chain"
        )
    return Connection(Ledger.connect(url), True)


def _public_url(url: str | None) -> str:
    """A node URL without credentials, path or query (they may hold a token)."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def chain_table(ledger: Ledger, shared: bool) -> pd.DataFrame:
    """Which chain this notebook uses: kind, node, chain id, registry, block."""
    unlocked = _unlocked(ledger)
    rows = {
        "chain": (
            "shared node (other notebooks and pages see the same state)"
            if shared
            else "embedded chain (this kernel only; the notebook plays every party)"
        ),
        "node": _public_url(ledger.rpc_url) or "(in this kernel)",
        "chain id": str(ledger.chain_id),
        "registry": ledger.address,
        "latest block": str(ledger.w3.eth.block_number),
        "accounts": str(len(unlocked)),
    }
    return pd.Series(rows, name="value").rename_axis("").to_frame()


def _unlocked(ledger: Ledger) -> list[str]:
    found = [str(a) for a in ledger.w3.eth.accounts]
    return found or list(ledger.accounts)


def node_account(ledger: Ledger, index: int) -> str:
    """The chain's account number ``index`` (0-based), an address — never a key.

    The node's unlocked accounts (anvil's or the embedded chain's dev accounts), in
    the node's order, so every kernel means the same party by the same number; on a
    node without unlocked accounts, the accounts of the keys in the environment.
    """
    if isinstance(index, bool) or not isinstance(index, int):
        raise InvalidInput(f"an account is chosen by its number, not {index!r}")
    accounts = _unlocked(ledger)
    if not 0 <= index < len(accounts):
        raise InvalidInput(
            f"account {index} does not exist: this chain has {len(accounts)} usable "
            f"accounts (0-{len(accounts) - 1}); choose one of them"
            if accounts
            else "this chain has no usable account: set HEALTHLAB_PRIVATE_KEY or "
            "HEALTHLAB_KEY_FILE, or use a dev node (`make node`)"
        )
    return accounts[index]


@dataclass(frozen=True)
class SampleDataset:
    """A dataset of ``data_samples/`` as it is registered on chain."""

    name: str
    kind: str
    pointer: str
    content_hash: str
    fee_wei: int
    grant_days: int
    terms: str


#: Use terms, fee (wei) and grant (days) of each sample hospital's cohort: the
#: university hospital for health research, the city hospital for any research, the
#: community centre free with ethics approval, the rural hospital disease-specific.
HOSPITAL_TERMS: dict[str, tuple[str, int, int]] = {
    "site_a": ("HMB|NCU", 10**16, 30),
    "site_b": ("GRU", 5 * 10**15, 30),
    "site_c": ("HMB|NCU|IRB", 0, 90),
    "site_d": ("DS|NCU", 2 * 10**16, 14),
}
#: Terms, fee (wei) and grant (days) every sample citizen sets on their record.
CITIZEN_TERMS: tuple[str, int, int] = ("HMB|NCU", 10**15, 7)


def sample_datasets(
    citizens: int = 4, *, root: str | os.PathLike[str] | None = None
) -> list[SampleDataset]:
    """The sample catalogue: every hospital cohort, then the first ``citizens``
    citizen records (``data_samples/city/patients.csv``: their pointers and hashes).

    A cohort's content hash is its frame's (:attr:`healthlab.Site.content_hash`, what
    a study's receipt checks); a record's is the sha256 of its bytes.
    """
    from healthlab.data import load_city_tables, load_cohort_sites

    if isinstance(citizens, bool) or not isinstance(citizens, int) or citizens < 0:
        raise InvalidInput(f"citizens is a number of records >= 0, not {citizens!r}")
    specs = []
    for name, frame in load_cohort_sites(root).items():
        terms, fee, days = HOSPITAL_TERMS.get(name, HOSPITAL_TERMS["site_a"])
        specs.append(
            SampleDataset(
                name,
                "hospital cohort",
                f"https://{name.replace('_', '-')}.hospital.example/cohort.csv",
                Site(name, frame).content_hash,
                fee,
                days,
                terms,
            )
        )
    patients = load_city_tables(root).patients
    if citizens > len(patients):
        raise InvalidInput(
            f"the samples hold {len(patients)} citizen records, not {citizens}"
        )
    terms, fee, days = CITIZEN_TERMS
    for row in patients.head(citizens).itertuples(index=False):
        specs.append(
            SampleDataset(
                str(row.user_id),
                "citizen record",
                str(row.record_pointer),
                str(row.content_hash),
                fee,
                days,
                terms,
            )
        )
    return specs


def ensure_catalogue(
    ledger: Ledger,
    owner: str,
    *,
    citizen: str | None = None,
    citizens: int = 4,
    root: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Register the sample datasets the chain lacks; return all of them with ids.

    Hospital cohorts are registered by ``owner``, citizen records by ``citizen``
    (default: ``owner``). A dataset its owner registered already — in an earlier
    run or another notebook — is left as it is, so calling this again changes
    nothing; ``registered now`` says which rows this call added. Someone else's
    registration of the same content is not the owner's dataset and is never
    adopted (registrations are per owner: a squatter blocks nothing).

    Returns one row per sample dataset (by name): kind, dataset id, owner,
    pointer, content hash, fee, terms, grant duration and ``registered now``.

    Examples
    --------
    >>> ledger = Ledger.local()
    >>> first = ensure_catalogue(ledger, ledger.accounts[1])
    >>> again = ensure_catalogue(ledger, ledger.accounts[1])
    >>> bool(again["registered now"].any())
    False
    """
    from healthlab.ledger.codes import code_names

    who_cites = citizen or owner
    known = _registered(ledger)
    rows = []
    for spec in sample_datasets(citizens, root=root):
        holder = owner if spec.kind == "hospital cohort" else who_cites
        key = (holder.lower(), spec.content_hash.lower())
        added = False
        if key not in known:
            try:
                ledger.register_dataset(
                    spec.pointer,
                    spec.content_hash,
                    fee_wei=spec.fee_wei,
                    grant_seconds=spec.grant_days * 86400,
                    terms=spec.terms,
                    sender=holder,
                )
                added = True
            except DuplicateDataset:  # another of its kernels registered it just now
                pass
            known = _registered(ledger)
        record = ledger.dataset(known[key])
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "dataset": record.id,
                "owner": record.owner,
                "pointer": record.pointer,
                "content hash": record.content_hash,
                "fee (ETH)": _eth(record.fee_wei),
                "terms": code_names(record.terms),
                "grant (days)": record.grant_seconds / 86400,
                "registered now": added,
            }
        )
    return pd.DataFrame(rows).set_index("name")


#: What the sample owner directory is called on chain.
SAMPLE_DIRECTORY = "HealthLab sample owner directory"
#: The name its curator gives the owner of the sample hospital cohorts.
SAMPLE_HOSPITALS = "HealthLab Sample Hospitals (synthetic data)"


def ensure_directory(
    ledger: Ledger,
    curator: str,
    names: Mapping[str, str],
    *,
    title: str = SAMPLE_DIRECTORY,
) -> int:
    """The owner directory ``curator`` keeps under ``title``, naming each owner of
    ``names`` (``{owner address: institution name}``); return its id.

    Created and named once per chain: the curator's oldest collaboration called
    ``title`` is used, a missing member is added and a missing or different name
    set, so calling this again (from another kernel too) sends nothing. Pass the id
    to :class:`~healthlab.widgets.Catalogue` (``directory=``): owners named here
    show their name, verified on chain; every other owner shows ``unverified``.

    Examples
    --------
    >>> ledger = Ledger.local()
    >>> owner, curator = ledger.accounts[1], ledger.accounts[5]
    >>> directory = ensure_directory(ledger, curator, {owner: "St. Mary's"})
    >>> ledger.owner_name(directory, owner)
    "St. Mary's"
    >>> ensure_directory(ledger, curator, {owner: "St. Mary's"}) == directory
    True
    """
    if not isinstance(title, str) or not title.strip():
        raise InvalidInput("give the directory a title (its collaboration's name)")
    found = [i for i, n in ledger.collaborations(curator=curator).items() if n == title]
    if not found:
        ledger.create_collaboration(title, sender=curator)
        # another kernel may have created one meanwhile: every caller takes the oldest
        found = [
            i for i, n in ledger.collaborations(curator=curator).items() if n == title
        ]
    directory = found[0]
    for owner, name in names.items():
        if not ledger.is_member(directory, owner):
            ledger.set_member(directory, owner, sender=curator)
        if ledger.owner_name(directory, owner) != name:
            ledger.name_member(directory, owner, name, sender=curator)
    return directory


def _registered(ledger: Ledger) -> dict[tuple[str, str], int]:
    """Dataset ids by (owner, content hash), both lower case: an owner registers a
    content once (others may register the same content as theirs)."""
    frame = ledger.datasets()
    keys = zip(frame["owner"].tolist(), frame["content_hash"].tolist(), strict=True)
    return {
        (str(o).lower(), str(h).lower()): int(i)
        for i, (o, h) in zip(frame.index, keys, strict=True)
    }


def _eth(wei: int) -> str:
    from healthlab.widgets import eth

    return eth(wei)


def chain_events(ledger: Ledger) -> pd.DataFrame:
    """The registry's events for people: what happened, to which dataset and request,
    who, how much (ETH and exact wei). Transaction hashes are left out."""
    events = ledger.events()
    amounts = events["amount_wei"]
    table = pd.DataFrame(
        {
            "block": events["block"],
            "time": events["time"].dt.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "event": events["event"],
            "dataset": events["dataset"],
            "request": events["request"],
            "account": events["account"],
            "amount (ETH)": [None if a is None else _eth(int(a)) for a in amounts],
            "amount (wei)": [None if a is None else str(int(a)) for a in amounts],
            "details": events["details"],
        }
    )
    return table.rename_axis("event #")


def site_summary(frames: Mapping[str, pd.DataFrame], target: str) -> pd.DataFrame:
    """Rows and outcome share per site (how a split differs between sites)."""
    rows = {
        name: {
            "rows": len(frame),
            "events": int(frame[target].sum()),
            "event share": float(frame[target].mean()),
        }
        for name, frame in frames.items()
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("site")


# ------------------------------------------------------------------- tables
def show(
    frame: pd.DataFrame | pd.Series,
    key: str,
    *,
    title: str = "",
    digits: int | None = None,
) -> None:
    """Display ``frame`` (HTML and text) with a JSON copy under ``key``.

    ``digits`` rounds what people see; the copy (:data:`TABLE_MIMETYPE`) keeps every
    digit and is what :func:`tables` reads back from an executed notebook. Front ends
    that do not know its type show the HTML.
    """
    from IPython.display import display

    table = frame.to_frame() if isinstance(frame, pd.Series) else frame
    shown = None if digits is None else (lambda x: f"{x:.{digits}f}")
    heading = f"<h4>{title}</h4>" if title else ""
    html = table.to_html(float_format=shown)
    text = (title + "\n" if title else "") + table.to_string(float_format=shown)
    bundle = {
        "text/html": heading + html,
        "text/plain": text,
        TABLE_MIMETYPE: {"key": key, "title": title, **_payload(table)},
    }
    display(bundle, raw=True)  # type: ignore[no-untyped-call]


def _payload(table: pd.DataFrame) -> dict[str, Any]:
    split = table.to_dict(orient="split")
    return {
        "index": [_json_cell(v) for v in split["index"]],
        "columns": [_json_cell(v) for v in split["columns"]],
        "data": [[_json_cell(v) for v in row] for row in split["data"]],
        "index_names": [_json_cell(n) for n in table.index.names],
        "column_names": [_json_cell(n) for n in table.columns.names],
    }


def _json_cell(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_cell(v) for v in value]
    if isinstance(value, (list, dict)):
        return json.loads(json.dumps(value, default=_json_cell))
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def tables(notebook: str | os.PathLike[str] | Any) -> dict[str, pd.DataFrame]:
    """The tables a notebook displayed with :func:`show`, by key (last one wins).

    ``notebook`` is an executed notebook's path or its ``nbformat`` node.
    """
    import nbformat

    nb = (
        nbformat.read(os.fspath(notebook), as_version=4)  # type: ignore[no-untyped-call]
        if isinstance(notebook, (str, os.PathLike))
        else notebook
    )
    found: dict[str, pd.DataFrame] = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            payload = output.get("data", {}).get(TABLE_MIMETYPE)
            if payload:
                found[payload["key"]] = _frame(payload)
    return found


def _frame(payload: Mapping[str, Any]) -> pd.DataFrame:
    def labels(values: list[Any], names: list[Any]) -> pd.Index:
        if values and isinstance(values[0], list):
            return pd.MultiIndex.from_tuples([tuple(v) for v in values], names=names)
        index: pd.Index = pd.Index(values, name=names[0] if names else None)
        return index

    return pd.DataFrame(
        payload["data"],
        index=labels(payload["index"], payload["index_names"]),
        columns=labels(payload["columns"], payload["column_names"]),
    )


class Comparison(pd.DataFrame):
    """:func:`compare`'s table, with its largest differences as attributes:
    ``max_abs``, ``max_rel`` (over the cells both give) and ``n_withheld`` (cells
    ``ours`` withheld); :meth:`figures` has the three as a dict."""

    _metadata: ClassVar[list[str]] = ["max_abs", "max_rel", "n_withheld"]

    max_abs: float
    max_rel: float
    n_withheld: int

    @property
    def _constructor(self) -> type[Comparison]:
        return Comparison

    def figures(self) -> dict[str, float]:
        """``{"max_abs": ..., "max_rel": ..., "withheld": ...}``."""
        return {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "withheld": self.n_withheld,
        }


def compare(
    ours: pd.DataFrame,
    reference: pd.DataFrame,
    *,
    names: tuple[str, str] = ("encrypted", "pandas"),
) -> Comparison:
    """Both results side by side, cell by cell, on the rows and columns they share.

    One row per (statistic, column) with both values and their absolute and relative
    differences; ``.max_abs``/``.max_rel`` are the largest ones over the cells both
    give, ``.n_withheld`` how many ``ours`` withheld (``<NA>``; the ``withheld``
    column marks them).
    """
    rows = [r for r in ours.index if r in reference.index]
    cols = [c for c in ours.columns if c in reference.columns]
    if not rows or not cols:
        raise InvalidInput("the two results share no rows or columns to compare")
    levels = list(range(ours.columns.nlevels))
    a = ours.loc[rows, cols].astype(float).stack(levels)
    b = reference.loc[rows, cols].astype(float).stack(levels)
    table = pd.DataFrame({names[0]: a, names[1]: b})
    table["abs diff"] = (table[names[0]] - table[names[1]]).abs()
    scale = table[names[1]].abs().where(table[names[1]] != 0, 1.0)
    table["rel diff"] = table["abs diff"] / scale
    table.index.names = ["row", *["group"] * (len(levels) - 1), "column"]
    # a cell the sites withheld (<NA>: too few sites or rows) is not a match: it
    # is named, and the largest differences are over the cells both give
    table["withheld"] = table[names[0]].isna() & table[names[1]].notna()
    result = Comparison(table)
    figures = {
        "max_abs": float(table["abs diff"].max()),
        "max_rel": float(table["rel diff"].max()),
        "n_withheld": int(table["withheld"].sum()),
    }
    for name, value in figures.items():
        object.__setattr__(result, name, value)
    return result


def pandas_histogram(
    frame: pd.DataFrame, column: str, edges: Sequence[float]
) -> pd.DataFrame:
    """``numpy.histogram`` of pooled rows, shaped like ``encrypted.histogram``."""
    counts, bins = np.histogram(frame[column].dropna(), bins=np.asarray(edges, float))
    return pd.DataFrame({"left": bins[:-1], "right": bins[1:], "count": counts})


def pandas_ols(frame: pd.DataFrame, y: str, X: Sequence[str]) -> pd.DataFrame:  # noqa: N803
    """Least squares on pooled rows (complete cases), shaped like ``encrypted.ols``."""
    rows = frame[[*X, y]].dropna()
    design = np.column_stack([np.ones(len(rows)), rows[list(X)].to_numpy(float)])
    target = rows[y].to_numpy(float)
    coef, rss, _, _ = np.linalg.lstsq(design, target, rcond=None)
    dof = len(rows) - design.shape[1]
    sigma2 = float(rss[0]) / dof
    se = np.sqrt(np.diag(np.linalg.inv(design.T @ design)) * sigma2)
    return pd.DataFrame(
        {"coef": coef, "se": se, "t": coef / se}, index=["Intercept", *X]
    )


def pandas_logit(frame: pd.DataFrame, formula: str) -> Any:
    """statsmodels' logistic GLM on pooled rows (complete cases of the formula's
    columns): the reference ``encrypted.logit`` is compared with."""
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    from healthlab.encrypted.models import parse_formula

    rows = frame[parse_formula(formula).reads].dropna()
    return smf.glm(formula, rows, family=sm.families.Binomial()).fit(tol=1e-14)


def pandas_coxph(
    frame: pd.DataFrame,
    formula: str,
    duration: str,
    event: str,
    grid: Sequence[float],
) -> Any:
    """statsmodels' Cox model (Breslow ties) on pooled rows with follow-up rounded
    up to ``grid`` (beyond it: censored after its end) — the reference
    ``encrypted.coxph`` is compared with."""
    import statsmodels.api as sm

    from healthlab.encrypted.models import parse_formula
    from healthlab.encrypted.survival import ceil_to_grid

    rhs = formula.split("~", 1)[-1].strip()
    reads = parse_formula(f"{event} ~ {rhs}").reads
    rows = frame[list(dict.fromkeys([duration, *reads]))].dropna()
    t = ceil_to_grid(rows[duration].to_numpy(), grid)
    e = np.where(np.isfinite(t), rows[event].to_numpy(), 0)
    rows = rows.assign(_t=np.where(np.isfinite(t), t, float(grid[-1]) + 1))
    model = sm.PHReg.from_formula(f"_t ~ {rhs}", rows, status=e, ties="breslow")
    return model.fit(method="newton", tol=1e-14, maxiter=200)


def receipt_table(receipt: Mapping[str, Any]) -> pd.DataFrame:
    """A receipt's sites: dataset, grant (request), a short content hash; refusals."""
    rows = [
        {
            "site": s["name"],
            "dataset": s.get("dataset_id"),
            "request": s.get("request_id"),
            "content hash": str(s.get("content_hash", ""))[:18] + "…",
            "took part": True,
            "refusal": "",
        }
        for s in receipt["sites"]
    ]
    rows += [
        {"site": name, "content hash": "", "took part": False, "refusal": reason}
        for name, reason in receipt.get("refused", {}).items()
    ]
    table = pd.DataFrame(rows).set_index("site")
    return table.astype({"dataset": "Int64", "request": "Int64"})


def verification_table(verification: Verification) -> pd.DataFrame:
    """Every check of :func:`healthlab.receipts.verify`: passed, or why not."""
    rows = [
        {"check": name, "passed": passed, "problem": "" if passed else detail}
        for name, passed, detail in verification.checks
    ]
    return pd.DataFrame(rows, columns=["check", "passed", "problem"]).set_index("check")


def provenance(
    results: Mapping[str, Any], ledger: Ledger, *, anchor: bool = True
) -> pd.DataFrame:
    """Anchor each result's receipt on chain (by its researcher) and verify it.

    ``results`` maps a label to an encrypted-statistics result (its ``.receipt``:
    a table, or a fitted model, whose receipt covers its ``to_frame()``) or a
    :class:`~healthlab.federated.FederatedResult`. One row
    per result: kind, sites, receipt hash, anchored requests, and whether every
    check of :func:`healthlab.receipts.verify` passed.
    """
    from healthlab.receipts import verify

    rows = []
    for label, result in results.items():
        receipt = receipt_of(result)
        checked = _hashed(result)
        if anchor:
            receipt.anchor(ledger)
        report = verify(receipt, checked, ledger)
        rows.append(
            {
                "result": label,
                "kind": receipt["kind"],
                "sites": ", ".join(s["name"] for s in receipt["sites"]),
                "receipt hash": receipt["receipt_hash"],
                "anchored requests": ", ".join(
                    str(a["request_id"]) for a in receipt.get("anchors", [])
                ),
                "verified": report.ok,
                "problems": "; ".join(report.problems),
            }
        )
    return pd.DataFrame(rows).set_index("result")


def receipt_of(result: Any) -> Receipt:
    """The receipt of an encrypted-statistics result or a federated model."""
    from healthlab.federated import FederatedResult

    if isinstance(result, FederatedResult):
        return result.receipt
    receipt: Receipt | None = getattr(result, "receipt", None)
    if not receipt:
        raise InvalidInput("this result carries no receipt")
    return receipt


def _hashed(result: Any) -> Any:
    """What a result's ``result_hash`` covers (a federated model: its final
    parameters; a fitted model: its ``to_frame()``; a table: itself)."""
    from healthlab.federated import FederatedResult

    if isinstance(result, FederatedResult):
        return {f"param{i}": p.tolist() for i, p in enumerate(result.params)}
    if not isinstance(result, pd.DataFrame) and callable(
        getattr(result, "to_frame", None)
    ):
        return result.to_frame()
    return result


def table_one(
    overall: pd.DataFrame,
    grouped: pd.DataFrame,
    counts: Mapping[str, pd.DataFrame] | None = None,
    *,
    digits: int = 1,
    p_values: bool = False,
) -> pd.DataFrame:
    """A paper's Table 1 from pooled results (see
    :func:`healthlab.encrypted.inference.format_table_one`)."""
    from healthlab.encrypted.inference import format_table_one

    return format_table_one(overall, grouped, counts, digits=digits, p_values=p_values)


# -------------------------------------------------------------- federated
def progress_printer(
    rounds: int, *hooks: Callable[[RoundReport], None]
) -> Callable[[RoundReport], None]:
    """A ``progress=`` callback printing one line per round, then running ``hooks``.

    Printed lines reach headless runs and HTML reports (a widget would not).
    """

    def report(r: RoundReport) -> None:
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in r.pooled.items())
        refused = f"  refused: {', '.join(r.refused)}" if r.refused else ""
        print(f"round {r.round}/{rounds}  {len(r.sites)} sites  {metrics}{refused}")
        for hook in hooks:
            hook(r)

    return report


def revoke_after(study: Study, site: str, round_: int) -> Callable[[RoundReport], None]:
    """A round hook: ``site``'s owner revokes the grant right after round ``round_``."""
    study.site(site)  # fail now for an unknown site, not mid-training

    def hook(r: RoundReport) -> None:
        if r.round == round_:
            study.revoke(site)
            print(f"-- the owner of {site} revoked the grant after round {round_}")

    return hook


def round_table(result: FederatedResult) -> pd.DataFrame:
    """The history, one row per round, with sites and refusals spelled out."""
    history = result.history
    table = history.drop(columns=["per_site", "rejected", "sites", "refused"])
    table.insert(1, "sites", history["sites"].map(lambda s: ", ".join(sorted(s))))
    table.insert(3, "refused", history["refused"].map(lambda s: ", ".join(sorted(s))))
    return table.set_index("round")


def federated_vs_centralized(
    result: FederatedResult, frames: Mapping[str, pd.DataFrame]
) -> pd.DataFrame:
    """Accuracy and AUC of the federated model and of scikit-learn trained centrally.

    Both are scored on the same held-out rows (each site's ``result.test_index``);
    the centralized model (standardized features, ``LogisticRegression``) is fit on
    the union of the sites' training rows — what pooling the data would give.
    Rows with a missing feature or target are left out, as the sites did.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    train_parts, test_parts = [], []
    columns = [*result.features, result.target]
    for name, frame in frames.items():
        held_out = np.zeros(len(frame), dtype=bool)
        held_out[list(result.test_index.get(name, []))] = True
        complete = frame[columns].notna().all(axis=1).to_numpy()
        train_parts.append(frame[complete & ~held_out])
        test_parts.append(frame[complete & held_out])
    train_rows, test_rows = pd.concat(train_parts), pd.concat(test_parts)
    y_train, y_test = train_rows[result.target], test_rows[result.target]
    scaler = StandardScaler().fit(train_rows[result.features])
    central = LogisticRegression(max_iter=1000).fit(
        scaler.transform(train_rows[result.features]), y_train
    )
    central_p = central.predict_proba(scaler.transform(test_rows[result.features]))[
        :, 1
    ]
    federated_p = result.predict_proba(test_rows)
    rows = {
        "federated": federated_p,
        "centralized (scikit-learn)": central_p,
    }
    scores = {
        name: {
            "accuracy": float(np.mean((p >= 0.5) == y_test.to_numpy())),
            "auc": float(roc_auc_score(y_test, p)),
            "train rows": len(train_rows),
            "held-out rows": len(test_rows),
        }
        for name, p in rows.items()
    }
    return pd.DataFrame.from_dict(scores, orient="index")


# ------------------------------------------------------------------ figures
def _pyplot() -> Any | None:
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # tables carry the same numbers
        return None
    return plt


def plot_metric(
    histories: Mapping[str, pd.DataFrame], metric: str = "auc", *, title: str = ""
) -> Figure | None:
    """One line per history (``round`` against ``metric``); None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, history in histories.items():
        ax.plot(history["round"], history[metric], marker="o", label=label)
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    plt.close(fig)  # shown once, by the cell that returns it
    return fig  # type: ignore[no-any-return]


def plot_histogram(table: pd.DataFrame, *, title: str = "") -> Figure | None:
    """Bars of a histogram table (``left``, ``right``, ``count``)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    widths = table["right"] - table["left"]
    counts = table["count"].astype(float)  # <NA> (a withheld bin) becomes NaN
    shown = counts.notna()
    ax.bar(
        table["left"][shown],
        counts[shown],
        width=widths[shown],
        align="edge",
        edgecolor="k",
    )
    if not shown.all():  # a withheld bin: hatched, at the axis, and named
        top = float(counts[shown].max()) if shown.any() else 1.0
        ax.bar(
            table["left"][~shown],
            top * 0.05,
            width=widths[~shown],
            align="edge",
            fill=False,
            hatch="//",
            edgecolor="grey",
            label="withheld (too few sites or rows)",
        )
        ax.legend(loc="upper right", fontsize="small")
    ax.set_ylabel("count")
    ax.set_title(title)
    plt.close(fig)
    return fig  # type: ignore[no-any-return]


def plot_survival(result: Any, *, title: str = "") -> Figure | None:
    """Kaplan–Meier steps with their confidence band, one line per group."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    groups = [None] if result.by is None else list(dict.fromkeys(result.table["group"]))
    for group in groups:
        rows = result.curve(group)
        times = [result.grid[0], *rows["time"].tolist()]
        label = "all" if group is None else f"{result.by} = {group}"
        line = ax.step(
            times, [1.0, *rows["survival"].tolist()], where="post", label=label
        )[0]
        ax.fill_between(
            times,
            [1.0, *rows["lower"].tolist()],
            [1.0, *rows["upper"].tolist()],
            step="post",
            alpha=0.2,
            color=line.get_color(),
        )
    ax.set_xlabel(result.duration)
    ax.set_ylabel("S(t)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(title)
    plt.close(fig)
    return fig  # type: ignore[no-any-return]


def plot_coefficients(table: pd.DataFrame, *, title: str = "") -> Figure | None:
    """Coefficients with 95 % intervals (``coef`` ± 1.96 ``se``), intercept left out."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = table.drop(index="Intercept", errors="ignore")
    fig, ax = plt.subplots(figsize=(6, 1.5 + 0.4 * len(rows)))
    ax.errorbar(rows["coef"], rows.index, xerr=1.96 * rows["se"], fmt="o", capsize=4)
    ax.axvline(0, color="grey", lw=1)
    ax.set_xlabel("coefficient (95 % interval)")
    ax.set_title(title)
    plt.close(fig)
    return fig  # type: ignore[no-any-return]


# ------------------------------------------------------------ health score
def factor_table(weights: Mapping[str, float] | None = None) -> pd.DataFrame:
    """The score's formula, one row per factor: unit, curve, valid range, weight,
    reference (:mod:`healthlab.score`)."""
    from healthlab.score import FACTORS, validate_weights

    chosen = validate_weights(weights)
    rows = {
        name: {
            "unit": f.unit,
            "curve (input→value)": ", ".join(f"{x:g}→{y:g}" for x, y in f.points),
            "valid inputs": f"{f.valid[0]:g}–{f.valid[1]:g}",
            "weight": chosen[name],
            "reference": f.reference,
        }
        for name, f in FACTORS.items()
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("factor")


def plot_factor_curves(weights: Mapping[str, float] | None = None) -> Figure | None:
    """Each factor's normalization curve (input → value in [0, 1]) with its weight."""
    plt = _pyplot()
    if plt is None:
        return None
    from healthlab.score import FACTORS, validate_weights

    chosen = validate_weights(weights)
    fig, axes = plt.subplots(2, 4, figsize=(11, 4.8))
    flat = axes.ravel()
    for ax, (name, factor) in zip(flat, FACTORS.items(), strict=False):
        xs = [x for x, _ in factor.points]
        pad = 0.15 * (xs[-1] - xs[0])
        grid = np.linspace(xs[0] - pad, xs[-1] + pad, 200)
        ax.plot(grid, factor.normalize(grid))
        ax.set_title(f"{name} (weight {chosen[name]:g})", fontsize=9)
        ax.set_xlabel(factor.unit, fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in flat[len(FACTORS) :]:
        ax.axis("off")
    fig.tight_layout()
    plt.close(fig)
    return fig  # type: ignore[no-any-return]


def score_sites(
    tables: CityTables | None = None,
    *,
    weights: Mapping[str, float] | None = None,
    min_coverage: float = 0.5,
) -> dict[str, pd.DataFrame]:
    """Each hospital's citizens' user-days with their score, computed at the site.

    The hospital holding a citizen's record (``patients.site``) holds that citizen's
    wearable days joined with the city sensors (:func:`healthlab.data.city_days`) and
    scores them there with :func:`healthlab.score.health_score`; nothing leaves it.
    Returns ``{site: frame}`` with the city-day columns and ``score``.
    """
    from healthlab.data import city_days, load_city_tables
    from healthlab.score import health_score

    tables = tables if tables is not None else load_city_tables()
    days = city_days(tables)
    holder = days["user_id"].map(tables.patients.set_index("user_id")["site"])
    return {
        str(name): frame.reset_index(drop=True).assign(
            score=lambda f: health_score(f, weights, min_coverage=min_coverage)
        )
        for name, frame in days.groupby(holder, sort=True)
    }


def citizen_days(
    user: str, n_days: int, tables: CityTables | None = None
) -> pd.DataFrame:
    """The first ``n_days`` days of one citizen: the score's inputs, by ISO date.

    What the citizen's own app shows them (their wearable's readings and their
    city's sensors that day); the samples are synthetic.
    """
    from healthlab.data import city_days, load_city_tables
    from healthlab.score import FACTORS

    if isinstance(n_days, bool) or not isinstance(n_days, int) or n_days < 1:
        raise InvalidInput(f"n_days is a number of days >= 1, not {n_days!r}")
    days = city_days(tables if tables is not None else load_city_tables())
    mine = days[days["user_id"] == user]
    if mine.empty:
        raise InvalidInput(
            f"no citizen {user!r} in the samples; ids look like "
            f"{', '.join(days['user_id'].drop_duplicates().head(3))}"
        )
    mine = mine.sort_values("date").head(n_days)
    dates = pd.to_datetime(mine["date"]).dt.strftime("%Y-%m-%d")
    return mine.set_index(pd.Index(dates, name="date"))[["city_id", *FACTORS]]


def _period(first_day: str, last_day: str) -> tuple[pd.Timestamp, pd.Timestamp]:
    try:
        start, end = pd.Timestamp(first_day), pd.Timestamp(last_day)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"days are ISO dates (YYYY-MM-DD), not {first_day!r} / {last_day!r}"
        ) from None
    if end < start:
        raise InvalidInput(
            f"the period ends ({last_day}) before it starts ({first_day})"
        )
    return start, end


def in_period(
    sites: Mapping[str, pd.DataFrame], first_day: str, last_day: str
) -> dict[str, pd.DataFrame]:
    """Each site's user-days from ``first_day`` to ``last_day`` (ISO dates, both
    included) — what the site selects before it computes its totals."""
    start, end = _period(first_day, last_day)
    out = {}
    for name, frame in sites.items():
        dates = pd.to_datetime(frame["date"])
        out[name] = frame[(dates >= start) & (dates <= end)].reset_index(drop=True)
    return out


class CityScores(pd.DataFrame):
    """:func:`city_scores`' table, with ``results``: each answered city's
    ``describe`` result (a :class:`~healthlab.encrypted.ResultTable`)."""

    _metadata: ClassVar[list[str]] = ["results"]

    results: dict[str, Any]

    @property
    def _constructor(self) -> type[CityScores]:
        return CityScores


def city_scores(
    sites: Mapping[str, pd.DataFrame],
    first_day: str,
    last_day: str,
    *,
    keys: KeyHolder | None = None,
    min_sites: int = 2,
) -> CityScores:
    """Each city's mean score over a period, pooled over encrypted site totals.

    For every city, the sites holding any of its user-days in the period (each
    site's rows of that city, scored at the site) take part in one
    :func:`healthlab.encrypted.describe` of ``score`` (rows without a score are
    dropped at the sites). A city held by fewer than ``min_sites`` sites, or whose
    sites' disclosure rules say no, gets no number: ``refused`` says why. One line
    is printed per city as it is computed.

    Returns one row per city: ``sites``, ``user-days``, ``mean``, ``std``, ``sem``
    and ``refused``; ``.results`` maps each answered city to its ``describe``
    result (with its receipt).
    """
    from healthlab import encrypted

    selected = in_period(sites, first_day, last_day)
    cities = sorted({str(c) for f in selected.values() for c in f["city_id"]})
    rows, results = [], {}
    for city in cities:
        holding = {
            name: frame.loc[frame["city_id"] == city, ["score"]].reset_index(drop=True)
            for name, frame in selected.items()
            if (frame["city_id"] == city).any()
        }
        row: dict[str, Any] = {"city": city, "sites": ", ".join(holding)}
        try:
            table = encrypted.describe(
                holding, ["score"], dropna=True, keys=keys, min_sites=min_sites
            )
        except DisclosureRefused as refusal:
            row |= {"user-days": np.nan, "mean": np.nan, "std": np.nan}
            row |= {"sem": np.nan, "refused": f"{type(refusal).__name__}: {refusal}"}
            print(f"{city}: refused ({type(refusal).__name__})")
        else:
            results[city] = table
            column = table["score"]
            row |= {"user-days": float(column["count"]), "mean": float(column["mean"])}
            row |= {"std": float(column["std"]), "sem": float(column["sem"])}
            row["refused"] = ""
            print(f"{city}: {len(holding)} sites, {column['count']:.0f} user-days")
        rows.append(row)
    scores = CityScores(pd.DataFrame(rows).set_index("city"))
    object.__setattr__(scores, "results", results)
    return scores


def pandas_city_scores(
    sites: Mapping[str, pd.DataFrame], first_day: str, last_day: str
) -> pd.DataFrame:
    """The plaintext reference: pandas on every site's rows pooled, per city."""
    selected = in_period(sites, first_day, last_day)
    pooled = pd.concat(
        [f.assign(_site=name) for name, f in selected.items()], ignore_index=True
    )
    scored = pooled.dropna(subset=["score"])
    grouped = scored.groupby("city_id")
    table = pd.DataFrame(
        {
            "sites": grouped["_site"].nunique(),
            "user-days": grouped["score"].count().astype(float),
            "mean": grouped["score"].mean(),
            "std": grouped["score"].std(),
            "sem": grouped["score"].sem(),
        }
    )
    return table.rename_axis("city")


def oracle_requests(oracle: OracleClient) -> pd.DataFrame:
    """Every score request of an oracle contract: who asked, the city and period,
    the fee, the status and the answer (an aggregate) or the refusal."""
    rows = []
    for r in oracle.requests():
        first, last = r.period
        rows.append(
            {
                "request": r.id,
                "requester": r.requester,
                "city": r.city,
                "from": first.isoformat(),
                "to": last.isoformat(),
                "fee (ETH)": _eth(r.amount_wei),
                "status": r.status.name,
                "score": None if r.result is None else r.result.score,
                "user-days": None if r.result is None else r.result.user_days,
                "sites": None if r.result is None else r.result.sites,
                "refusal": "" if r.refusal is None else r.refusal.name,
            }
        )
    columns = ["request", "requester", "city", "from", "to", "fee (ETH)", "status"]
    columns += ["score", "user-days", "sites", "refusal"]
    return pd.DataFrame(rows, columns=columns).set_index("request")


def worker_actions(actions: Sequence[WorkerAction]) -> pd.DataFrame:
    """What an oracle worker's run did per request: answer or refusal, gas, why."""
    rows = [
        {
            "request": a.request_id,
            "action": a.action,
            "score x100": None
            if a.answer is None or a.answer.result is None
            else a.answer.result.score_x100,
            "refusal": ""
            if a.answer is None or a.answer.refusal is None
            else a.answer.refusal.name,
            "gas used": a.gas_used,
            "why": a.note,
        }
        for a in actions
    ]
    columns = ["request", "action", "score x100", "refusal", "gas used", "why"]
    return pd.DataFrame(rows, columns=columns).set_index("request")


# ------------------------------------------------------------ headless runs
def notebook_path(name: str | os.PathLike[str]) -> Path:
    """A notebook by path, file name or number: ``"06"``, ``"06_study_report"``…"""
    path = Path(name)
    if path.suffix == ".ipynb" and path.is_file():
        return path
    stem = path.stem if path.suffix == ".ipynb" else str(name)
    matches = sorted(NOTEBOOKS_DIR.glob(f"{stem}*.ipynb"))
    exact = [m for m in matches if m.stem == stem]
    if exact or len(matches) == 1:
        return (exact or matches)[0]
    known = ", ".join(p.stem for p in sorted(NOTEBOOKS_DIR.glob("*.ipynb")))
    raise InvalidInput(f"no single notebook matches {str(name)!r}; known: {known}")


def parse_parameters(pairs: Sequence[str]) -> dict[str, Any]:
    """``["rounds=5", 'columns=["age","bmi"]', "by=sex"]`` → parameter values.

    A value is read as JSON when it is JSON (numbers, lists, ``true``), else as text.
    """
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip().isidentifier():
            raise InvalidInput(f"parameters are NAME=VALUE, not {pair!r}")
        try:
            values[name.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[name.strip()] = text
    return values


def summary(executed: str | os.PathLike[str]) -> str:
    """One line about an executed notebook: tables, figures, run time."""
    import nbformat

    nb = nbformat.read(os.fspath(executed), as_version=4)  # type: ignore[no-untyped-call]
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    seconds = nb.metadata.get("papermill", {}).get("duration") or 0.0
    n_tables = len(tables(nb))
    return (
        f"{Path(executed).stem}: {_plural(n_tables, 'table')}, "
        f"{_plural(figures, 'figure')}, {seconds:.1f} s"
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _check_parameters(path: Path, parameters: Mapping[str, Any]) -> None:
    """Refuse unknown parameter names and anything that looks like a credential."""
    import papermill  # type: ignore[import-untyped]

    for name, value in parameters.items():
        if _SECRET_NAME.search(name) or (
            isinstance(value, str) and _HEX64.match(value.strip())
        ):
            raise InvalidInput(
                f"parameter {name!r} looks like a secret: parameters are written "
                "into the executed notebook and its report. Keys come from "
                "HEALTHLAB_PRIVATE_KEY or HEALTHLAB_KEY_FILE, never from parameters"
            )
    declared = papermill.inspect_notebook(str(path))
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise InvalidInput(
            f"{path.name} has no parameter(s) {unknown}; it takes {sorted(declared)}"
        )


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kernel_transport(folder: Path) -> Config:
    """Kernel sockets: Unix sockets in ``folder`` (private, made for this run) where
    the platform has them, else loopback TCP.

    With TCP, jupyter_client picks free ports and releases them before the kernel
    binds them, so reports run side by side (``healthlab demo``, the tests) can
    race for the same port and a kernel dies with "Address already in use". Unix
    sockets in a private folder cannot collide, and no other local user can reach
    them.
    """
    if os.name == "nt":
        return Config()
    return Config({"KernelManager": {"transport": "ipc", "ip": str(folder / "kernel")}})


def run_notebook(
    name: str | os.PathLike[str],
    parameters: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike[str] = "reports",
    *,
    timeout: float = 600.0,
    progress: bool = False,
) -> Path:
    """Execute a notebook with papermill into ``out_dir``; return the executed copy.

    ``parameters`` override the notebook's ``parameters`` cell; unknown names and
    anything that looks like a key are refused (papermill writes parameters into the
    executed notebook). The kernel is the ``python3`` of this environment, runs in
    the notebook's folder, with telemetry and downloads off. A failing cell raises
    :class:`~healthlab.errors.HealthLabError` naming the cell and the error; the
    executed copy keeps the traceback.

    Examples
    --------
    >>> run_notebook("06_study_report", {"rounds": 2}, "reports")  # doctest: +SKIP
    PosixPath('reports/06_study_report.ipynb')
    """
    import papermill

    source = notebook_path(name)
    values = dict(parameters or {})
    _check_parameters(source, values)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / source.name
    with (
        _environment(RUN_ENVIRONMENT),
        tempfile.TemporaryDirectory(prefix="healthlab-kernel-") as sockets,
    ):
        try:
            papermill.execute_notebook(
                str(source),
                str(target),
                parameters=values,
                kernel_name="python3",
                cwd=str(source.parent),
                progress_bar=progress,
                execution_timeout=timeout,
                # panels are live only with a kernel: keep no widget state, so the
                # report shows each panel's static note and tables, not a CDN widget
                store_widget_state=False,
                # keep the kernel's start-up notices out of every run's output
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
                config=_kernel_transport(Path(sockets)),
            )
        except papermill.PapermillExecutionError as exc:
            raise HealthLabError(
                f"{source.name} failed in cell {exc.exec_count} with {exc.ename}: "
                f"{exc.evalue}; the executed copy with the traceback is {target}"
            ) from exc
    return target


def export_html(
    executed: str | os.PathLike[str],
    html_path: str | os.PathLike[str] | None = None,
    *,
    no_input: bool = True,
) -> Path:
    """Write an executed notebook as static HTML (without code cells by default).

    Outputs are embedded (figures as images) and widget state is left out (a
    widget shows its static text instead), so the report opens offline without a
    CDN. Returns the HTML file's path (default: next to it).
    """
    import nbformat
    from nbconvert import HTMLExporter

    source = Path(executed)
    if not source.is_file():
        raise ConfigurationError(f"no executed notebook at {source}")
    target = Path(html_path) if html_path else source.with_suffix(".html")
    exporter = HTMLExporter(  # type: ignore[no-untyped-call]
        exclude_input=no_input,
        exclude_input_prompt=no_input,
        exclude_output_prompt=no_input,
    )
    notebook = nbformat.read(source, as_version=4)  # type: ignore[no-untyped-call]
    notebook.metadata.pop("widgets", None)
    body, _ = exporter.from_notebook_node(notebook)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target
