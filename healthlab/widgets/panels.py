"""ipywidgets panels over a :class:`~healthlab.ledger.Ledger`.

Three panels make the consent registry usable without code:

- :class:`Catalogue` — the datasets with filters, for everyone;
- :class:`RequestForm` — a researcher asks for access (the fee is shown before
  paying) and follows the status of their requests;
- :class:`OwnerInbox` — a data owner approves, declines and revokes, and withdraws
  their earnings.

Both the researcher's requests and the owner's live grants carry a "privacy spent"
column: the privacy ledger on chain (ε spent of the dataset's DP budget and the
answers given under the grant, :meth:`Ledger.request_privacy_spent`).

Senders are addresses, never keys: the ledger signs with keys from the environment
or with the node's unlocked accounts. Every action reports in the panel's ``status``
line *and* prints the same line, so results also appear in headless runs; an error
inside a callback is shown and printed the same way (and kept in ``.error``), never
swallowed. Each action is a method too (``form.request()``, ``inbox.approve()``…),
which is what a button calls, so notebooks and tests can drive the panels without a
browser; ``form.fill()``, ``catalogue.filter()`` and ``inbox.select()`` set what a
user would type or click first, and ``form.quote()``/``inbox.earnings()`` read what
the panel shows as tables. While an action runs its panel's buttons are disabled
and the status says it is working. Displayed, a panel is its live widget; a static
report (no widget state) shows a one-line note instead, next to the tables its
``show()`` displays.

Examples
--------
>>> ledger = Ledger.local()  # doctest: +SKIP
>>> Catalogue(ledger)  # doctest: +SKIP
>>> RequestForm(ledger, researcher=ledger.accounts[2])  # doctest: +SKIP
>>> OwnerInbox(ledger, owner=ledger.accounts[1])  # doctest: +SKIP
"""

from __future__ import annotations

import html
import io
import os
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import ipywidgets as widgets
import pandas as pd

from healthlab.errors import (
    ConfigurationError,
    HealthLabError,
    InvalidInput,
    PurposeUnverified,
)
from healthlab.ledger.codes import (
    ATTESTABLE,
    DESCRIPTIONS,
    PURPOSES,
    Codes,
    as_codes,
    code_names,
)
from healthlab.ledger.codes import permits as codes_permit
from healthlab.ledger.records import Request, Status

if TYPE_CHECKING:
    from healthlab.dp import PrivacyBudget
    from healthlab.ledger import Ledger
    from healthlab.storage import Keyring

__all__ = ["Catalogue", "OwnerInbox", "RequestForm", "eth"]

T = TypeVar("T")
WEI_PER_ETH = 10**18
_ANY = ""
_WORKING = "<i>working… (waiting for the chain)</i>"
#: Room for the controls' labels ("purpose codes" is cut short by default).
_LABELS = {"description_width": "8em"}


def eth(wei: int) -> str:
    """Wei as an exact decimal string of ether: ``10**16`` → ``"0.01"``."""
    whole, frac = divmod(int(wei), WEI_PER_ETH)
    digits = f"{frac:018d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def _utc(timestamp: int | None) -> str:
    if timestamp is None:
        return ""
    return pd.Timestamp(int(timestamp), unit="s", tz="UTC").strftime(
        "%Y-%m-%d %H:%M UTC"
    )


def _short(address: str) -> str:
    return f"{address[:6]}…{address[-4:]}"


#: Plain rules for the panels' tables (an HTML widget gets no notebook table style).
_TABLE_STYLE = (
    "<style>.healthlab-table{border-collapse:collapse;margin:4px 0}"
    ".healthlab-table th,.healthlab-table td{padding:2px 10px;text-align:left;"
    "border-bottom:1px solid #ddd}</style>"
)


def _html_table(frame: pd.DataFrame, empty: str) -> str:
    if frame.empty:
        return f"<i>{html.escape(empty)}</i>"
    table = frame.reset_index().to_html(
        index=False, escape=True, border=0, classes="healthlab-table"
    )
    return _TABLE_STYLE + str(table)


class _Panel:
    """Status line, error reporting and notebook display shared by the panels."""

    widget: Any

    def __init__(self) -> None:
        self.status = widgets.HTML(value="")
        #: The last line shown in the status (plain text).
        self.message = ""
        #: The error of the last action, or None when it succeeded.
        self.error: BaseException | None = None
        #: Buttons disabled while an action runs (no double requests from a
        #: double click; the chain may take seconds to answer).
        self._buttons: list[Any] = []
        self._depth = 0

    def _summary(self) -> str:
        """One line about the panel for front ends that cannot show widgets."""
        return type(self).__name__

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """The live widget, with a one-line note for static reports and HTML.

        JupyterLab and Voilà render the widget; a headless run's HTML report (no
        widget state is saved) shows the note instead of the widget's ``repr``.
        """
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        summary = self._summary()
        note = (
            f"{summary} (an interactive panel: it is live in JupyterLab or Voilà "
            "with a running kernel; the tables below show its state)"
        )
        if data is not None:
            data["text/plain"] = note
            data["text/html"] = f"<p><i>{html.escape(note)}</i></p>"
        return bundle

    def _say(self, message: str) -> None:
        self.message = message
        self.error = None
        self.status.value = f"<span style='color:#1b5e20'>{html.escape(message)}</span>"
        print(message)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.message = f"{type(exc).__name__}: {exc}"
        self.status.value = (
            f"<span style='color:#b71c1c'><b>{html.escape(type(exc).__name__)}</b>: "
            f"{html.escape(str(exc))}</span>"
        )
        print(f"error: {self.message}")

    def _run(self, action: Callable[[], T]) -> T | None:
        """Run ``action``; show and print any error (unexpected ones propagate too).

        While the outermost action runs, the panel's buttons are disabled and the
        status says it is working (reading or writing the chain takes a while on a
        node); both are restored afterwards, whatever happened.
        """
        outer = self._depth == 0
        previous = self.status.value
        if outer:
            self.status.value = _WORKING
            for button in self._buttons:
                button.disabled = True
        self._depth += 1
        try:
            return action()
        except HealthLabError as exc:  # a refusal the user can act on
            self._fail(exc)
            return None
        except Exception as exc:  # a bug: show it, print the traceback, re-raise
            self._fail(exc)
            traceback.print_exc()
            raise
        finally:
            self._depth -= 1
            if outer:
                for button in self._buttons:
                    button.disabled = False
                if self.status.value == _WORKING:
                    self.status.value = previous


# ------------------------------------------------------------------ catalogue
class Catalogue(_Panel):
    """The datasets of a ledger as a filterable table; ``.selected`` is a dataset id.

    Filters: ``text`` (case-insensitive, in the pointer, the owner's address or
    its name), ``use`` (a code: for a purpose, datasets whose terms permit it once
    its requirements are attested — GRU permits every purpose, HMB permits DS; for
    a requirement such as NCU or COL, datasets whose terms set it) and
    ``active_only``.

    ``directory`` (default ``$HEALTHLAB_DIRECTORY``) is the collaboration whose
    curator names the owners it vouches for: the ``owner name`` column shows that
    name, verified on chain, and marks every other owner ``unverified`` — a
    squatter registering a hospital's pointer and hash shows as unverified, under
    its own address.
    """

    COLUMNS = (
        "owner",
        "owner name",
        "pointer",
        "fee (ETH)",
        "grant (days)",
        "terms",
        "auto-approve",
        "active",
        "download",
    )

    def __init__(
        self,
        ledger: Ledger,
        *,
        active_only: bool = True,
        directory: int | None = None,
    ) -> None:
        super().__init__()
        self.ledger = ledger
        if directory is None and os.environ.get("HEALTHLAB_DIRECTORY", "").strip():
            text = os.environ["HEALTHLAB_DIRECTORY"].strip()
            if not text.isdigit():
                raise InvalidInput(
                    "HEALTHLAB_DIRECTORY is the id of the collaboration that names "
                    "owners (a whole number)"
                )
            directory = int(text)
        self.directory = directory
        self.text = widgets.Text(
            description="contains", placeholder="pointer, owner address or name"
        )
        self.use = widgets.Dropdown(
            description="use",
            options=[("any use", _ANY)]
            + [(f"{c.name} — {DESCRIPTIONS[c]}", c.name) for c in Codes],
            value=_ANY,
        )
        self.active_only = widgets.Checkbox(
            value=active_only, description="active only"
        )
        self.refresh_button = widgets.Button(description="refresh", icon="refresh")
        self.select = widgets.Select(description="dataset", options=[], rows=6)
        self.table_html = widgets.HTML()
        #: Every dataset (last refresh) and the rows the filters keep.
        self.all = pd.DataFrame(columns=list(self.COLUMNS))
        self.table = self.all
        for control in (self.text, self.use, self.active_only):
            control.observe(lambda _change: self._run(self._apply), names="value")
        self.refresh_button.on_click(lambda _button: self.refresh())
        self._buttons = [self.refresh_button]
        self.widget = widgets.VBox(
            [
                widgets.HTML("<h3>Datasets</h3>"),
                widgets.HBox([self.text, self.use, self.active_only]),
                self.refresh_button,
                self.table_html,
                self.select,
                self.status,
            ]
        )
        self.refresh()

    @property
    def selected(self) -> int | None:
        """The id of the selected dataset (None when the filters keep no row)."""
        value = self.select.value
        return None if value is None else int(value)

    def _summary(self) -> str:
        return f"Datasets: {len(self.all)} on chain, {len(self.table)} shown"

    def filter(
        self, *, contains: str = "", use: str = "", active_only: bool = True
    ) -> pd.DataFrame:
        """Set the filters (as a user would) and return the rows they keep.

        ``use`` is a code name (``"HMB"``, ``"NCU"``…) or ``""`` for any use.
        """
        code = use.strip().upper()
        if code and code not in Codes.__members__:
            raise InvalidInput(
                f"unknown use code {use!r}; use one of {', '.join(Codes.__members__)} "
                "or '' for any use"
            )
        self.text.value = contains
        self.use.value = code
        self.active_only.value = bool(active_only)
        return self.table

    def refresh(self) -> pd.DataFrame | None:
        """Read the datasets from the chain again and apply the filters."""

        def load() -> pd.DataFrame:
            raw = self.ledger.datasets()
            rows = pd.DataFrame(
                {
                    "owner": raw["owner"],
                    "owner name": [self._owner_name(str(o)) for o in raw["owner"]],
                    "pointer": raw["pointer"],
                    "fee (ETH)": [eth(int(w)) for w in raw["fee_wei"]],
                    "grant (days)": [int(s) / 86400 for s in raw["grant_seconds"]],
                    "terms": raw["terms"],
                    "auto-approve": raw["auto_approve"].astype(bool),
                    "active": raw["active"].astype(bool),
                    "download": [
                        "yes" if as_codes(t) & Codes.DL else "compute only"
                        for t in raw["terms"]
                    ],
                },
                index=raw.index,
                columns=list(self.COLUMNS),
            )
            self.all = rows
            table = self._apply()
            self._say(f"{len(rows)} datasets on chain, {len(table)} shown")
            return table

        return self._run(load)

    def _owner_name(self, owner: str) -> str:
        """The directory's verified name for ``owner``, else ``unverified``."""
        if self.directory is None:
            return "unverified (no owner directory set)"
        name = self.ledger.owner_name(self.directory, owner)
        return "unverified" if name is None else name

    def _apply(self) -> pd.DataFrame:
        rows = self.all
        keep = pd.Series(True, index=rows.index)
        needle = self.text.value.strip().lower()
        if needle:
            keep &= (
                rows["pointer"].str.lower().str.contains(needle, regex=False)
                | rows["owner"].str.lower().str.contains(needle, regex=False)
                | rows["owner name"].str.lower().str.contains(needle, regex=False)
            )
        if self.use.value != _ANY:
            keep &= rows["terms"].map(lambda t: _offers(as_codes(t), self.use.value))
        if self.active_only.value:
            keep &= rows["active"]
        self.table = rows[keep.astype(bool)]
        self.table_html.value = _html_table(self.table, "no dataset matches")
        previous = self.select.value
        ids = [int(i) for i in self.table.index]
        self.select.options = [
            (f"#{i} {self.table.at[i, 'pointer']!s}", int(i)) for i in self.table.index
        ]
        self.select.value = previous if previous in ids else (ids[0] if ids else None)
        return self.table

    def show(self) -> None:
        """Display the filtered table as a static table (headless runs, reports)."""
        from healthlab.notebooks import show

        show(self.table, "catalogue", title="Datasets")


def _write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _offers(terms: Codes, name: str) -> bool:
    code = Codes[name]
    if code & PURPOSES:
        return codes_permit(code | ATTESTABLE, terms)
    return bool(terms & code)


# ---------------------------------------------------------------- privacy
class _PrivacyColumn:
    """The privacy ledger as a table column: what a grant spent of its dataset's
    DP budget (ε spent of ε allowed, answers given), read from the chain; "no
    budget" for a dataset whose owner set none."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._budgets: dict[int, PrivacyBudget | None] = {}

    def __call__(self, request: Request) -> str:
        if request.dataset_id not in self._budgets:
            self._budgets[request.dataset_id] = self.ledger.privacy_budget(
                request.dataset_id
            )
        budget = self._budgets[request.dataset_id]
        if budget is None:
            return "no budget"
        spent = self.ledger.request_privacy_spent(request.id)
        answers = "answer" if spent.answers == 1 else "answers"
        return (
            f"ε {spent.epsilon:.3g} of {budget.epsilon:.3g} ({spent.answers} {answers})"
        )


# ---------------------------------------------------------------- requests
REQUEST_COLUMNS = (
    "request",
    "dataset",
    "codes",
    "paid (ETH)",
    "status",
    "requested",
    "expires",
    "privacy spent",
)


def _request_rows(requests: list[Request], privacy: _PrivacyColumn) -> pd.DataFrame:
    frame = pd.DataFrame(
        [
            {
                "request": r.id,
                "dataset": r.dataset_id,
                "codes": code_names(r.codes),
                "paid (ETH)": eth(r.amount_wei),
                "status": r.status.name,
                "requested": _utc(r.created_at),
                "expires": _utc(r.expires_at),
                # spent only under a grant: a pending or declined request has none
                "privacy spent": privacy(r) if r.expires_at is not None else "",
            }
            for r in requests
        ],
        columns=list(REQUEST_COLUMNS),
    )
    return frame.set_index("request")


class RequestForm(_Panel):
    """A researcher's access request, and the status of their requests.

    The fee is read from the chain whenever the dataset changes and shown before
    paying; the request pays exactly the fee shown (``fee_wei``), so if the owner
    changed it meanwhile the registry refuses with ``FeeChanged`` and nothing is paid.
    Pass a :class:`Catalogue` to follow its selection.
    """

    def __init__(
        self, ledger: Ledger, researcher: str, *, catalogue: Catalogue | None = None
    ) -> None:
        super().__init__()
        self.ledger = ledger
        self.researcher = researcher
        wide = {"layout": widgets.Layout(width="36em"), "style": _LABELS}
        self.dataset = widgets.Dropdown(description="dataset", options=[], **wide)
        self.codes = widgets.SelectMultiple(
            description="purpose codes",
            options=[(f"{c.name} — {DESCRIPTIONS[c]}", c.name) for c in Codes],
            rows=len(Codes),
            **wide,
        )
        self.purpose = widgets.Textarea(
            description="purpose", placeholder="what is the study about?", **wide
        )
        self.fee = widgets.HTML()
        self.terms = widgets.HTML()
        #: The fee shown for the selected dataset, in wei (what a request pays).
        self.fee_wei: int | None = None
        self.request_button = widgets.Button(
            description="request access", button_style="primary", icon="paper-plane"
        )
        self.refresh_button = widgets.Button(description="refresh", icon="refresh")
        self.download_button = widgets.Button(
            description="download",
            icon="download",
            disabled=True,
            tooltip="enabled once the owner has released the key of your download "
            "grant",
        )
        self.download_note = widgets.HTML()
        self.table_html = widgets.HTML()
        #: The researcher's requests (last refresh).
        self.table = _request_rows([], _PrivacyColumn(ledger))
        #: What the last download returned (a DataFrame for Parquet, else bytes).
        self.downloaded: pd.DataFrame | bytes | None = None
        self.dataset.observe(lambda _change: self._run(self._read_fee), names="value")
        self.request_button.on_click(lambda _button: self.request())
        self.refresh_button.on_click(lambda _button: self.refresh())
        self.download_button.on_click(lambda _button: self.download())
        self._buttons = [self.request_button, self.refresh_button]
        if catalogue is not None:
            catalogue.select.observe(self._follow, names="value")
        self.widget = widgets.VBox(
            [
                widgets.HTML(f"<h3>Request access as {html.escape(researcher)}</h3>"),
                self.dataset,
                self.terms,
                self.fee,
                self.codes,
                self.purpose,
                self.request_button,
                widgets.HBox([self.download_button, self.download_note]),
                self.status,
                widgets.HTML("<h4>Your requests</h4>"),
                self.refresh_button,
                self.table_html,
            ]
        )
        self.refresh()

    def _summary(self) -> str:
        return f"Request form of {self.researcher}: {len(self.table)} request(s) so far"

    def fill(
        self,
        *,
        dataset: int | None = None,
        codes: Iterable[str] = (),
        purpose: str = "",
    ) -> RequestForm:
        """Preset the form (as a user would type): dataset, purpose codes, purpose.

        ``dataset=None`` keeps the selection; a dataset that is not open for
        requests, or an unknown code, is refused with what to choose instead.
        Nothing is sent: :meth:`request` (the button) sends.
        """
        if dataset is not None:
            offered = [value for _label, value in self.dataset.options]
            if int(dataset) not in offered:
                raise InvalidInput(
                    f"dataset #{dataset} is not open for requests; open ones: "
                    f"{', '.join(f'#{i}' for i in offered) or 'none'}"
                )
            self.dataset.value = int(dataset)
        names = [str(c).strip().upper() for c in codes]
        unknown = [n for n in names if n not in Codes.__members__]
        if unknown:
            raise InvalidInput(
                f"unknown purpose code(s) {unknown}; known: "
                f"{', '.join(Codes.__members__)}"
            )
        self.codes.value = tuple(dict.fromkeys(names))
        self.purpose.value = purpose
        return self

    def quote(self) -> pd.DataFrame:
        """What pressing "request access" would ask for and pay, read from the chain.

        One row: the dataset, its owner, pointer and use terms, the grant duration,
        the fee in ETH and wei (paid into escrow), the codes chosen and whether the
        terms permit them.
        """
        if self.dataset.value is None:
            raise InvalidInput("no dataset is open for requests; press refresh")
        record = self.ledger.dataset(int(self.dataset.value))
        chosen = as_codes(list(self.codes.value))
        row = {
            "dataset": record.id,
            "owner": record.owner,
            "pointer": record.pointer,
            "terms": code_names(record.terms),
            "grant (days)": record.grant_seconds / 86400,
            "fee (ETH)": eth(record.fee_wei),
            "fee (wei)": str(record.fee_wei),
            "your codes": code_names(chosen),
            "permitted": codes_permit(chosen, record.terms),
        }
        return pd.DataFrame([row]).set_index("dataset")

    def _follow(self, change: dict[str, Any]) -> None:
        ids = [value for _label, value in self.dataset.options]
        if change["new"] in ids:
            self.dataset.value = change["new"]

    def _read_fee(self) -> None:
        self.fee_wei = None
        self.fee.value = self.terms.value = ""
        if self.dataset.value is None:
            return
        record = self.ledger.dataset(int(self.dataset.value))
        self.fee_wei = record.fee_wei
        self.fee.value = (
            f"<b>fee: {eth(record.fee_wei)} ETH</b> ({record.fee_wei} wei), paid "
            "into escrow now; the owner gets it on approval, you get it back if "
            "declined"
        )
        self.terms.value = (
            f"use terms: {html.escape(code_names(record.terms) or 'none')}; "
            "grants last "
            f"{record.grant_seconds / 86400:g} days; "
            + (
                "downloadable (add DL to your codes to ask for a download grant)"
                if record.downloadable
                else "compute only (studies run at the sites)"
            )
        )
        self._download_state()

    def _download_state(self) -> None:
        """Enable "download" only for a live download grant whose key was released."""
        ready, note = False, ""
        if self.dataset.value is not None:
            ds = int(self.dataset.value)
            access = self.ledger.access(ds, self.researcher)
            if access.download and self.ledger.has_access(ds, self.researcher):
                if self.ledger.key_envelope(access.request_id) is None:
                    note = "download grant: waiting for the owner to release the key"
                else:
                    ready, note = True, "download grant: the key is released to you"
        self.download_button.disabled = not ready
        self.download_note.value = html.escape(note)

    def download(self, path: str | None = None) -> pd.DataFrame | bytes | None:
        """Download the selected dataset under your download grant.

        Opens the key envelope the owner released to you, fetches the blob, checks
        its CID and the content hash registered on chain, and decrypts. Returns a
        DataFrame for Parquet data, else the bytes; with ``path`` also writes them
        there (mode 600).
        """

        def fetch() -> pd.DataFrame | bytes:
            from healthlab import storage

            if self.dataset.value is None:
                raise InvalidInput("choose a dataset first")
            ds = int(self.dataset.value)
            data = storage.download(self.ledger, ds, researcher=self.researcher)
            if path is not None:
                _write_private(path, data)
            result: pd.DataFrame | bytes = data
            if data[:4] == b"PAR1":
                result = pd.read_parquet(io.BytesIO(data))
            self.downloaded = result
            shape = (
                f"{result.shape[0]} rows × {result.shape[1]} columns"
                if isinstance(result, pd.DataFrame)
                else f"{len(data):,} bytes"
            )
            where = f", saved to {path}" if path else ""
            self._say(
                f"downloaded dataset #{ds}: {shape}; CID and content hash verified"
                f"{where}"
            )
            return result

        return self._run(fetch)

    def refresh(self) -> pd.DataFrame | None:
        """Reload the open datasets, the fee shown and the researcher's requests."""

        def load() -> pd.DataFrame:
            frame = self.ledger.datasets()
            frame = frame[frame["active"].astype(bool)]
            _choose(
                self.dataset,
                [(f"#{i} {frame.at[i, 'pointer']!s}", int(i)) for i in frame.index],
            )
            self._read_fee()  # also when the same dataset stays selected
            self.table = _request_rows(
                self.ledger.requests(researcher=self.researcher),
                _PrivacyColumn(self.ledger),
            )
            self.table_html.value = _html_table(self.table, "no requests yet")
            return self.table

        return self._run(load)

    def request(self) -> int | None:
        """Request access to the selected dataset; return the request id."""

        def send() -> int:
            if self.dataset.value is None:
                raise InvalidInput("choose a dataset first")
            if not self.codes.value:
                raise InvalidInput(
                    "choose at least one purpose code (and attest what the terms "
                    "require, e.g. NCU)"
                )
            if self.fee_wei is None:
                raise InvalidInput("the fee could not be read; press refresh")
            ds = int(self.dataset.value)
            request_id = self.ledger.request_access(
                ds,
                self.purpose.value,
                as_codes(list(self.codes.value)),
                fee_wei=self.fee_wei,
                sender=self.researcher,
            )
            status = self.ledger.request(request_id).status
            self.refresh()
            self._say(
                f"request #{request_id} on dataset #{ds}: {status.name}; paid "
                f"{eth(self.fee_wei)} ETH into escrow"
            )
            return request_id

        return self._run(send)

    def show(self, label: str = "") -> None:
        """Display the researcher's requests as a static table.

        ``label`` goes into the title and, dash-joined, into the key
        (``my_requests-after-refresh``).
        """
        from healthlab.notebooks import show

        suffix = "-" + "-".join(label.lower().split()) if label else ""
        note = f" ({label})" if label else ""
        show(self.table, f"my_requests{suffix}", title=f"Your requests{note}")


# ------------------------------------------------------------------- inbox
class OwnerInbox(_Panel):
    """A data owner's pending requests and live grants, and their earnings.

    Pending requests show the purpose codes, the purpose text (sealed by the
    researcher to the owner's key and checked here against its hash on chain), the
    fee and the requester's
    history: how many requests they made before this one (on any dataset) and how
    many of those were granted. Live grants show what each spent of its dataset's
    DP budget (ε of ε allowed, answers), or "no budget".
    """

    PENDING_COLUMNS = (
        "request",
        "dataset",
        "researcher",
        "codes",
        "purpose",
        "fee (ETH)",
        "earlier requests",
        "earlier grants",
        "requested",
    )
    GRANT_COLUMNS = (
        "request",
        "dataset",
        "researcher",
        "codes",
        "expires",
        "privacy spent",
    )

    def __init__(
        self, ledger: Ledger, owner: str, *, keyring: Keyring | None = None
    ) -> None:
        super().__init__()
        self.ledger = ledger
        self.owner = owner
        #: The owner's data keys (healthlab.storage.Keyring): approving a download
        #: request releases the dataset's key to the researcher from it.
        self.keyring = keyring
        self.pending_select = widgets.Select(description="request", options=[], rows=5)
        self.approve_button = widgets.Button(
            description="approve", button_style="success", icon="check"
        )
        self.decline_button = widgets.Button(
            description="decline", button_style="warning", icon="times"
        )
        self.grant_select = widgets.Select(description="grant", options=[], rows=5)
        self.revoke_button = widgets.Button(
            description="revoke", button_style="danger", icon="ban"
        )
        self.credit = widgets.HTML()
        #: The owner's withdrawable credit in wei (last refresh).
        self.credit_wei = 0
        self.withdraw_button = widgets.Button(description="withdraw", icon="download")
        self.refresh_button = widgets.Button(description="refresh", icon="refresh")
        self.pending_html = widgets.HTML()
        self.grants_html = widgets.HTML()
        #: Pending requests and live grants on the owner's datasets (last refresh).
        self.pending = pd.DataFrame(columns=list(self.PENDING_COLUMNS)).set_index(
            "request"
        )
        self.grants = pd.DataFrame(columns=list(self.GRANT_COLUMNS)).set_index(
            "request"
        )
        self._grants: dict[int, tuple[int, str]] = {}
        self.approve_button.on_click(lambda _button: self.approve())
        self.decline_button.on_click(lambda _button: self.decline())
        self.revoke_button.on_click(lambda _button: self.revoke())
        self.withdraw_button.on_click(lambda _button: self.withdraw())
        self.refresh_button.on_click(lambda _button: self.refresh())
        self._buttons = [
            self.approve_button,
            self.decline_button,
            self.revoke_button,
            self.withdraw_button,
            self.refresh_button,
        ]
        self.widget = widgets.VBox(
            [
                widgets.HTML(f"<h3>Requests for {html.escape(owner)}</h3>"),
                self.refresh_button,
                self.pending_html,
                widgets.HBox(
                    [self.pending_select, self.approve_button, self.decline_button]
                ),
                widgets.HTML("<h4>Live grants</h4>"),
                self.grants_html,
                widgets.HBox([self.grant_select, self.revoke_button]),
                widgets.HTML("<h4>Earnings</h4>"),
                widgets.HBox([self.credit, self.withdraw_button]),
                self.status,
            ]
        )
        self.refresh()

    def _summary(self) -> str:
        return (
            f"Inbox of {self.owner}: {len(self.pending)} pending request(s), "
            f"{len(self.grants)} live grant(s), credit {eth(self.credit_wei)} ETH"
        )

    def select(self, request_id: int) -> OwnerInbox:
        """Select a pending request or a live grant by its request id (as a click
        in the lists would); refused with the ids there are when it is neither."""
        pending = [value for _label, value in self.pending_select.options]
        live = [value for _label, value in self.grant_select.options]
        if request_id in pending:
            self.pending_select.value = request_id
        elif request_id in live:
            self.grant_select.value = request_id
        else:
            raise InvalidInput(
                f"request #{request_id} is neither pending nor a live grant on your "
                f"datasets (pending: {pending or 'none'}, live: {live or 'none'}); "
                "press refresh if it is new"
            )
        return self

    def earnings(self) -> pd.DataFrame:
        """The owner's credit (withdrawable now) and what the chain says was paid out.

        One row: credit in ETH and wei, live grants and pending requests (as of
        the last refresh), and the total the registry's events show paid to the
        owner: fees paid on approval or key release (``FeePaid``) and withdrawals.
        """
        events = self.ledger.events()
        withdrawn = sum(
            int(a)
            for kind, who, a in zip(
                events["event"], events["account"], events["amount_wei"], strict=True
            )
            if kind in ("Withdrawal", "FeePaid")
            and str(who).lower() == self.owner.lower()
        )
        row = {
            "owner": self.owner,
            "credit (ETH)": eth(self.credit_wei),
            "credit (wei)": str(self.credit_wei),
            "live grants": len(self.grants),
            "pending": len(self.pending),
            "paid out (ETH)": eth(withdrawn),
        }
        return pd.DataFrame([row]).set_index("owner")

    def _purpose(self, request_id: int) -> str:
        """The purpose text: as this client sent it, else as the researcher sealed
        it to the owner, checked against its hash on chain."""
        try:
            return self.ledger.purpose_of(request_id).text
        except InvalidInput:
            pass
        try:
            sealed = self.ledger.sealed_purpose(request_id, owner=self.owner)
        except PurposeUnverified:
            return (
                "(the sealed purpose does not match its hash on chain: ask the "
                "researcher)"
            )
        except ConfigurationError:
            return "(sealed to the owner: open the inbox with the owner's key)"
        if sealed is None:
            return "(not sealed: only its hash is on chain; ask the researcher)"
        return sealed.text

    def refresh(self) -> pd.DataFrame | None:
        """Reload requests, grants and credit from the chain."""

        def load() -> pd.DataFrame:
            datasets = self.ledger.datasets()
            owned = {
                int(i)
                for i in datasets.index
                if str(datasets.at[i, "owner"]).lower() == self.owner.lower()
            }
            everything = self.ledger.requests()
            privacy = _PrivacyColumn(self.ledger)
            pending, grants = [], []
            self._grants = {}
            for position, r in enumerate(everything):
                if r.dataset_id not in owned:
                    continue
                if r.status is Status.PENDING:
                    # oldest first: ids number each dataset's requests on their own
                    earlier = [
                        q for q in everything[:position] if q.researcher == r.researcher
                    ]
                    pending.append(
                        {
                            "request": r.id,
                            "dataset": r.dataset_id,
                            "researcher": r.researcher,
                            "codes": code_names(r.codes),
                            "purpose": self._purpose(r.id),
                            "fee (ETH)": eth(r.amount_wei),
                            "earlier requests": len(earlier),
                            "earlier grants": sum(
                                q.expires_at is not None for q in earlier
                            ),
                            "requested": _utc(r.created_at),
                        }
                    )
                elif r.status is Status.APPROVED:
                    grants.append(
                        {
                            "request": r.id,
                            "dataset": r.dataset_id,
                            "researcher": r.researcher,
                            "codes": code_names(r.codes),
                            "expires": _utc(r.expires_at),
                            "privacy spent": privacy(r),
                        }
                    )
                    self._grants[r.id] = (r.dataset_id, r.researcher)
            self.pending = pd.DataFrame(
                pending, columns=list(self.PENDING_COLUMNS)
            ).set_index("request")
            self.grants = pd.DataFrame(
                grants, columns=list(self.GRANT_COLUMNS)
            ).set_index("request")
            self.pending_html.value = _html_table(self.pending, "no pending requests")
            self.grants_html.value = _html_table(self.grants, "no live grants")
            _choose(
                self.pending_select,
                [
                    (
                        f"#{i} on #{self.pending.at[i, 'dataset']!s} by "
                        f"{_short(str(self.pending.at[i, 'researcher']))}",
                        int(i),
                    )
                    for i in self.pending.index
                ],
            )
            _choose(
                self.grant_select,
                [
                    (
                        f"#{i} on #{self.grants.at[i, 'dataset']!s} for "
                        f"{_short(str(self.grants.at[i, 'researcher']))}",
                        int(i),
                    )
                    for i in self.grants.index
                ],
            )
            self.credit_wei = self.ledger.credit(self.owner)
            self.credit.value = f"credit: <b>{eth(self.credit_wei)} ETH</b>"
            return self.pending

        return self._run(load)

    def _selected(self, select: Any, what: str) -> int:
        if select.value is None:
            raise InvalidInput(f"select a {what} first")
        return int(select.value)

    def approve(self) -> Request | None:
        """Approve the selected pending request: a compute grant's fee is paid to
        the owner in the same transaction; a download grant's when its key is
        released (done here when the data key is in the keyring)."""

        def act() -> Request:
            done = self.ledger.approve(
                self._selected(self.pending_select, "pending request"),
                sender=self.owner,
            )
            released = self._release(done)
            if not done.download:
                fee = f"; {eth(done.amount_wei)} ETH paid to you"
            elif released.startswith("; its data key"):
                fee = f"; {eth(done.amount_wei)} ETH paid to you on the key's release"
            else:
                fee = f"; its {eth(done.amount_wei)} ETH wait in escrow for the key"
            self.refresh()
            self._say(
                f"approved request #{done.id}: {done.researcher} may use dataset "
                f"#{done.dataset_id} until {_utc(done.expires_at)}{fee}{released}"
            )
            return done

        return self._run(act)

    def _release(self, done: Request) -> str:
        """For a download grant: seal the data key to the researcher and publish it."""
        if not done.download:
            return ""
        from healthlab import storage
        from healthlab.storage.errors import KeyNotInKeyring

        keyring = self.keyring if self.keyring is not None else storage.Keyring()
        try:
            storage.release_key(
                self.ledger, done.id, keyring=keyring, sender=self.owner
            )
        except KeyNotInKeyring:
            return (
                "; the data key of this dataset is not in your keyring, so no key "
                "was released: release it with healthlab.storage.release_key"
            )
        return "; its data key was released to the researcher (download grant)"

    def decline(self) -> Request | None:
        """Decline the selected pending request; the researcher is refunded."""

        def act() -> Request:
            done = self.ledger.decline(
                self._selected(self.pending_select, "pending request"),
                sender=self.owner,
            )
            self.refresh()
            self._say(
                f"declined request #{done.id} on dataset #{done.dataset_id}; "
                f"{eth(done.amount_wei)} ETH credited back to {done.researcher}"
            )
            return done

        return self._run(act)

    def revoke(self) -> tuple[int, str] | None:
        """Revoke the selected live grant at once; return (dataset id, researcher)."""

        def act() -> tuple[int, str]:
            request_id = self._selected(self.grant_select, "live grant")
            ds, researcher = self._grants[request_id]
            self.ledger.revoke(ds, researcher, sender=self.owner)
            self.refresh()
            self._say(
                f"revoked request #{request_id}: {researcher} no longer has access "
                f"to dataset #{ds}"
            )
            return ds, researcher

        return self._run(act)

    def withdraw(self) -> int | None:
        """Pay the owner's credit out to the owner; return the wei paid."""

        def act() -> int:
            paid = self.ledger.withdraw(sender=self.owner)
            self.refresh()
            self._say(f"withdrew {eth(paid)} ETH ({paid} wei) to {self.owner}")
            return paid

        return self._run(act)

    def show(self, label: str = "") -> None:
        """Display pending requests, live grants and earnings as static tables.

        ``label`` (e.g. ``"after approval"``) goes into the titles and, as
        ``-after-approval``, into the keys, so each step's tables stay apart.
        """
        from healthlab.notebooks import show

        suffix = "-" + "-".join(label.lower().split()) if label else ""
        note = f" ({label})" if label else ""
        show(self.pending, f"pending_requests{suffix}", title=f"Pending requests{note}")
        show(self.grants, f"live_grants{suffix}", title=f"Live grants{note}")
        show(self.earnings(), f"earnings{suffix}", title=f"Earnings{note}")


def _choose(select: Any, options: list[tuple[str, int]]) -> None:
    """Set a selector's options, keeping the selection when it is still there."""
    previous = select.value
    ids = [value for _label, value in options]
    select.options = options
    select.value = previous if previous in ids else (ids[0] if ids else None)
