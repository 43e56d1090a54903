"""The notebooks in a real browser: JupyterLab and Voilà driven by Playwright in
Debian's Chromium, against one anvil node that both servers' kernels share.

The module starts, on 127.0.0.1 with free ports and temp dirs, an anvil node (the
registry deployed once, as ``healthlab chain up`` does), JupyterLab with a random
token on a temp copy of ``notebooks/`` and Voilà serving ``02_approve_requests``
(as ``make dashboard`` does); all are stopped by PID at the end, kernels included.
Screenshots of each step are kept in ``reports/browser/`` (or
``$HEALTHLAB_BROWSER_ARTIFACTS``). Chromium is ``/usr/bin/chromium`` (or
``$HEALTHLAB_CHROMIUM``): Playwright never downloads a browser. A missing browser
skips these tests locally and fails them under CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from healthlab.ledger import Ledger
from healthlab.ledger.node import AnvilNode
from healthlab.ledger.records import Status
from healthlab.notebooks import ensure_catalogue, node_account
from healthlab.services import free_port
from tests.conftest import require

pytestmark = [pytest.mark.browser, pytest.mark.anvil]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = Path(
    os.environ.get("HEALTHLAB_BROWSER_ARTIFACTS", ROOT / "reports" / "browser")
)
CHROMIUM = os.environ.get("HEALTHLAB_CHROMIUM", "/usr/bin/chromium")
#: Chromium on this machine's closed network: no background connections, no GPU.
CHROMIUM_FLAGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
#: JupyterLab user settings: no news or update checks, every cell rendered (so a
#: widget below the fold is in the page), no autosave racing the test's edits.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
}
#: The notebook ``make dashboard`` serves.
VOILA_NOTEBOOK = "02_approve_requests.ipynb"
#: Seconds a kernel may take to start, and to run a whole notebook, on 2 cores that
#: other jobs share (normally 3 s and 5-10 s).
START_TIMEOUT = 120.0
RUN_TIMEOUT = 180.0
#: Milliseconds Playwright waits for anything else (a click's effect: ~1 s).
ACTION_TIMEOUT = 60_000


def ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_browser() -> str:
    """Chromium's path; skip locally / fail under CI without it or Playwright."""
    problem = None
    if not os.access(CHROMIUM, os.X_OK):
        problem = (
            f"no Chromium at {CHROMIUM}: run `make setup` (installs Debian's chromium) "
            "or set HEALTHLAB_CHROMIUM"
        )
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright is not installed: run `make setup`"
    if problem:
        if ci():
            pytest.fail(problem)
        pytest.skip(problem)
    return CHROMIUM


# ------------------------------------------------------------------ processes
def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below ``pid``: kernels and their children."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(
                (int(entry.name), fields[19])
            )
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


@dataclass
class Server:
    """A server process on loopback with its token and log, stopped by PID."""

    name: str
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:].replace(self.token, "…")

    def wait_ready(self, path: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                )
            with contextlib.suppress(requests.RequestException):
                reply = requests.get(f"{self.url}{path}", timeout=2)
                if reply.status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready in {timeout:g} s:\n{self.tail()}")

    def keep_log(self, folder: Path) -> Path:
        """Copy the log into ``folder`` with its token blanked out."""
        folder.mkdir(parents=True, exist_ok=True)
        kept = folder / self.log.name
        kept.write_text(self.log.read_text(errors="replace").replace(self.token, "…"))
        return kept

    def stop(self) -> None:
        """SIGTERM (the server shuts its kernels down), then SIGKILL what is left."""
        below = _descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid, started in below:
            fields = _stat(pid)
            if fields and fields[19] == started and fields[0] not in ("Z", "X"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def start_server(
    name: str, args: list[str], env: dict[str, str], port: int, token: str, logs: Path
) -> Server:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=logs
        )
    return Server(name, f"http://127.0.0.1:{port}", token, process, log)


# ------------------------------------------------------------------ the stack
@dataclass
class Stack:
    """The anvil node, the registry, and JupyterLab and Voilà on it."""

    node: AnvilNode
    registry: str
    root: Path
    lab: Server
    voila: Server

    def ledger(self) -> Ledger:
        return Ledger.connect(self.node.url, self.registry)


def write_lab_settings(folder: Path) -> None:
    for plugin, values in LAB_SETTINGS.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_browser()
    require("anvil")
    tmp = Path(tempfile.mkdtemp(prefix="healthlab-browser-"))
    root, home, logs = tmp / "notebooks", tmp / "home", tmp / "logs"
    logs.mkdir()
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".*"))
    write_lab_settings(tmp / "lab-settings")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEALTHLAB_HOME", str(home))
        for name in ("HEALTHLAB_RPC_URL", "HEALTHLAB_REGISTRY"):
            mp.delenv(name, raising=False)
        node = AnvilNode().start()
        servers: list[Server] = []
        try:
            registry = Ledger.connect(node.url).address  # deployed once, recorded
            env = {
                **os.environ,
                "HEALTHLAB_RPC_URL": node.url,
                "HEALTHLAB_HOME": str(home),
                "JUPYTER_CONFIG_DIR": str(tmp / "jupyter-config"),
                "JUPYTER_DATA_DIR": str(tmp / "jupyter-data"),
                "JUPYTER_RUNTIME_DIR": str(tmp / "jupyter-runtime"),
                "JUPYTERLAB_SETTINGS_DIR": str(tmp / "lab-settings"),
                "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "lab-workspaces"),
                "IPYTHONDIR": str(tmp / "ipython"),
                "MPLBACKEND": "Agg",
                "FLWR_TELEMETRY_ENABLED": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
            }
            for name in ("HEALTHLAB_PRIVATE_KEY", "HEALTHLAB_KEY_FILE"):
                env.pop(name, None)
            as_root = ["--allow-root"] if os.getuid() == 0 else []
            lab_port, lab_token = free_port(), secrets.token_hex(16)
            lab = start_server(
                "jupyterlab",
                [
                    sys.executable,
                    "-m",
                    "jupyterlab",
                    "--ServerApp.ip=127.0.0.1",
                    f"--ServerApp.port={lab_port}",
                    "--ServerApp.port_retries=0",
                    f"--ServerApp.root_dir={root}",
                    f"--IdentityProvider.token={lab_token}",
                    "--ServerApp.open_browser=False",
                    "--LabApp.extension_manager=readonly",
                    "--LabApp.news_url=None",
                    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                    *as_root,
                ],
                env,
                lab_port,
                lab_token,
                logs,
            )
            servers.append(lab)
            voila_port, voila_token = free_port(), secrets.token_hex(16)
            voila = start_server(
                "voila",
                [
                    sys.executable,
                    "-m",
                    "voila",
                    str(root / VOILA_NOTEBOOK),
                    "--no-browser",
                    "--Voila.ip=127.0.0.1",
                    f"--port={voila_port}",
                    "--Voila.port_retries=0",
                    f"--Voila.token={voila_token}",
                ],
                env,
                voila_port,
                voila_token,
                logs,
            )
            servers.append(voila)
            lab.wait_ready(f"/api/status?token={lab_token}")
            voila.wait_ready("/voila/static/favicon.ico")
            yield Stack(node, registry, root, lab, voila)
        finally:
            for server in servers:
                server.stop()
                server.keep_log(ARTIFACTS / "servers")
            node.close()
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ the browser
@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=require_browser(),
            headless=True,
            chromium_sandbox=os.getuid() != 0,  # root: --no-sandbox
            args=CHROMIUM_FLAGS,
        )
        try:
            yield chromium
        finally:
            chromium.close()


class UI:
    """A browser tab of one test; the test's numbered screenshots go to
    ARTIFACTS/<test>/ (shared by its tabs)."""

    def __init__(
        self, context: Any, folder: Path, shots: list[Path], errors: list[str]
    ) -> None:
        self.context = context
        self.page = context.new_page()
        self.folder = folder
        self.shots = shots
        #: Uncaught JavaScript errors of the test's pages.
        self.errors = errors
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    @classmethod
    def first(cls, context: Any, name: str) -> UI:
        folder = ARTIFACTS / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return cls(context, folder, [], [])

    def new_tab(self) -> UI:
        """Another tab in the same browser (another party's page)."""
        return UI(self.context, self.folder, self.shots, self.errors)

    def shot(self, step: str, element: Any = None) -> Path:
        """Screenshot the whole page, or only ``element`` (a locator)."""
        path = self.folder / f"{len(self.shots) + 1:02d}_{step}.png"
        self.page.bring_to_front()
        if element is None:
            self.page.screenshot(path=str(path), full_page=True)
        else:
            element.screenshot(path=str(path))
        self.shots.append(path)
        return path

    @contextlib.contextmanager
    def steps(self) -> Iterator[None]:
        """Keep a screenshot of the page when the test fails inside."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.shot("failure")
            raise
        assert not self.errors, f"JavaScript errors in the page: {self.errors}"


@pytest.fixture
def ui(browser: Any, request: pytest.FixtureRequest) -> Iterator[UI]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(ACTION_TIMEOUT)
    try:
        yield UI.first(context, request.node.name)
    finally:
        context.close()


# ------------------------------------------------------------------ JupyterLab
def open_notebook(ui: UI, stack: Stack, name: str, *, workspace: str) -> None:
    """Open ``name`` in JupyterLab (one workspace per party, as two people would)
    and wait until its kernel is idle."""
    ui.page.goto(
        f"{stack.lab.url}/lab/workspaces/{workspace}/tree/{name}"
        f"?token={stack.lab.token}"
    )
    ui.page.locator(
        ".jp-NotebookPanel:not(.lm-mod-hidden) "
        ".jp-Notebook-ExecutionIndicator[data-status='idle']"
    ).first.wait_for(timeout=START_TIMEOUT * 1000)
    accept_kernel_dialog(ui)


def accept_kernel_dialog(ui: UI) -> None:
    """JupyterLab sometimes asks which kernel to start (a modal "Select Kernel"
    dialog, seen on a loaded machine): take the one it proposes, as a user would.
    Until it is answered, the dialog swallows every click (Run All included)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    dialog = ui.page.locator(".jp-Dialog").filter(has_text="Select Kernel")
    deadline = time.monotonic() + START_TIMEOUT
    # a click that lands while the dialog still opens (on a loaded machine) does
    # nothing: press again until it has gone
    while dialog.count() and time.monotonic() < deadline:
        try:
            dialog.get_by_role("button", name="Select", exact=True).click(
                timeout=10_000
            )
            dialog.wait_for(state="detached", timeout=10_000)
        except PlaywrightTimeout:
            continue
    if dialog.count():
        raise AssertionError(
            f"the Select Kernel dialog stayed open for {START_TIMEOUT:.0f} s"
        )


def run_all_cells(ui: UI, timeout: float = START_TIMEOUT) -> None:
    """Run → Run All Cells, from the menu bar as a user would, until the notebook
    shows that it took: a cell queued or run (``[*]`` or ``[n]``).

    On a loaded machine the first click can land before the notebook is the
    current widget (the menu item is disabled then, and a click on it does
    nothing). While no cell has been queued the click is safe to repeat: the
    notebook is focused and the menu opened again, and the item is clicked once
    it is enabled."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    prompts = current(ui).locator(".jp-CodeCell .jp-InputArea-prompt")
    item = ui.page.locator(".lm-Menu-item:not(.lm-mod-disabled)").filter(
        has=ui.page.get_by_text("Run All Cells", exact=True)
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        accept_kernel_dialog(ui)
        tab = ui.page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current")
        if tab.count():  # the notebook's tab: makes it the current widget
            tab.first.click()
        ui.page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        try:
            item.first.wait_for(timeout=10_000)
            item.first.click()
        except PlaywrightTimeout:
            ui.page.keyboard.press("Escape")  # close the menu; focus and try again
            continue
        started = time.monotonic() + 10.0
        while time.monotonic() < started:
            texts = [t.strip() for t in prompts.all_inner_texts()]
            if any(re.fullmatch(r"\[(\*|\d+)\]:", t) for t in texts):
                return
            time.sleep(0.25)
    raise AssertionError(f"Run All Cells did not start within {timeout:.0f} s")


# ------------------------------------------------------------------ widgets
def current(ui: UI) -> Any:
    """The notebook panel on screen in JupyterLab (the page itself in Voilà)."""
    panel = ui.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    return panel if panel.count() else ui.page.locator("body")


def panel_box(ui: UI, heading: str) -> Any:
    """A HealthLab widget panel (a VBox) by the start of its heading."""
    return (
        current(ui)
        .locator(".widget-vbox")
        .filter(has=ui.page.locator("h3", has_text=heading))
        .last
    )


def labelled(box: Any, kind: str, label: str) -> Any:
    """The <select> of an ipywidgets control of ``kind`` labelled ``label``."""
    return (
        box.locator(f".widget-{kind}")
        .filter(
            has=box.page.locator("label", has_text=re.compile(f"^{re.escape(label)}$"))
        )
        .locator("select")
    )


def choose(select: Any, starting: str) -> str:
    """Pick the option whose value starts with ``starting``; return that value.

    ipywidgets renders an option's text with no-break spaces; its ``value``
    attribute is the label as given."""
    option = select.locator(f"option[value^={json.dumps(starting)}]")
    value = str(option.get_attribute("value"))
    select.select_option(value=value)
    return value


_ROWS_JS = """table => [...table.querySelectorAll("tr")].map(
  tr => [...tr.querySelectorAll("th, td")].map(cell => cell.innerText.trim()))"""


def table_rows(cells: list[list[str]]) -> list[dict[str, str]]:
    """A pandas HTML table's rows as {column: text}, the index column included.

    pandas names the index in a header row of its own (``["request", "", …]``
    under ``["", "dataset", …]``) or, for a plain column, in the first row."""
    if not cells:
        return []
    header, data = cells[0], cells[1:]
    if header and header[0] == "" and data and data[0][0] and not any(data[0][1:]):
        header, data = [data[0][0], *header[1:]], data[1:]
    return [dict(zip(header, row, strict=True)) for row in data]


def wait_row(box: Any, timeout: float = 60.0, **cells: str) -> dict[str, str]:
    """The first row of the last table in ``box`` showing all of ``cells``
    ({column: text}), waiting until the table shows one."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        if box.locator("table").count():
            rows = table_rows(box.locator("table").last.evaluate(_ROWS_JS))
            for row in rows:
                if all(row.get(k) == v for k, v in cells.items()):
                    return row
        time.sleep(0.25)
    raise AssertionError(f"no row with {cells} in {rows}")


def wait_all_ran(ui: UI, timeout: float = RUN_TIMEOUT) -> None:
    """Until every code cell has run; a cell that failed stops Run All (its
    successors keep ``[ ]``), which fails here with the error shown."""
    prompts = current(ui).locator(".jp-CodeCell .jp-InputArea-prompt")
    deadline = time.monotonic() + timeout
    stuck = 0
    while time.monotonic() < deadline:
        texts = [t.strip() for t in prompts.all_inner_texts()]
        if texts and all(re.fullmatch(r"\[\d+\]:", t) for t in texts):
            return
        idle = current(ui).locator(
            ".jp-Notebook-ExecutionIndicator[data-status='idle']"
        )
        ran = any(re.fullmatch(r"\[\d+\]:", t) for t in texts)
        stuck = stuck + 1 if ran and "[*]:" not in texts and idle.count() else 0
        if stuck >= 4:  # idle for a second with cells left: Run All stopped
            break
        time.sleep(0.25)
    errors = current(ui).locator(".jp-OutputArea-output[data-mime-type*='stderr']")
    shown = "\n".join(errors.all_inner_texts())[-3000:]
    raise AssertionError(f"not every cell ran (prompts {texts}); stderr:\n{shown}")


# ------------------------------------------------------------------ the flow
RESEARCHER, OWNER, CITIZEN, OTHER_RESEARCHER = 2, 1, 3, 4


def catalogue(ledger: Ledger) -> Any:
    """The sample datasets by name, registered once (what the notebooks call)."""
    return ensure_catalogue(
        ledger, node_account(ledger, OWNER), citizen=node_account(ledger, CITIZEN)
    )


def test_request_in_01_and_approve_in_02_through_jupyterlab(
    stack: Stack, ui: UI
) -> None:
    ledger = stack.ledger()
    researcher = node_account(ledger, RESEARCHER)
    page = ui.page
    with ui.steps():
        open_notebook(ui, stack, "01_request_access.ipynb", workspace="researcher")
        run_all_cells(ui)
        wait_all_ran(ui)
        form = panel_box(ui, "Request access as")
        form.get_by_role("button", name="request access").wait_for()
        ui.shot("researcher_ran_01")
        samples = catalogue(ledger)
        assert not samples["registered now"].any(), "01 registers the samples"
        ds = int(samples.loc["site_a", "dataset"])
        assert ledger.requests(researcher=researcher) == [], "01 must not act alone"

        choose(labelled(form, "dropdown", "dataset"), f"#{ds} ")
        form.get_by_text("fee: 0.01 ETH").wait_for()  # shown before paying
        ui.shot("researcher_chose_dataset")
        form.get_by_role("button", name="request access").click()

        status = form.get_by_text(re.compile(rf"request #\d+ on dataset #{ds}: "))
        status.wait_for()
        message = str(status.inner_text())
        ui.shot("researcher_requested")
        req = int(re.search(r"request #(\d+)", message)[1])  # type: ignore[index]
        assert f"request #{req} on dataset #{ds}: PENDING; paid 0.01 ETH" in message
        on_chain = ledger.request(req)
        assert (on_chain.researcher, on_chain.dataset_id, on_chain.status) == (
            researcher,
            ds,
            Status.PENDING,
        )
        assert not ledger.has_access(ds, researcher)
        wait_row(form, request=str(req), status="PENDING")

        owner_tab = ui.new_tab()
        open_notebook(owner_tab, stack, "02_approve_requests.ipynb", workspace="owner")
        run_all_cells(owner_tab)
        wait_all_ran(owner_tab)
        inbox = panel_box(owner_tab, "Requests for")
        inbox.get_by_role("button", name="approve").wait_for()
        owner_tab.shot("owner_ran_02")
        assert ledger.request(req).status is Status.PENDING, "02 must not act alone"
        owner = node_account(ledger, OWNER)
        choose(labelled(inbox, "select", "request"), f"#{req} on #{ds} by ")
        inbox.get_by_role("button", name="approve").click()
        inbox.get_by_text(
            f"approved request #{req}: {researcher} may use dataset #{ds} until"
        ).wait_for()
        owner_tab.shot("owner_approved")
        assert ledger.request(req).status is Status.APPROVED
        assert ledger.has_access(ds, researcher)
        assert fee_paid(ledger, req) == (owner, 10**16)  # site_a's fee, paid

        page.bring_to_front()
        form.get_by_role("button", name="refresh").click()
        row = wait_row(form, request=str(req), status="APPROVED")
        assert (row["dataset"], row["paid (ETH)"]) == (str(ds), "0.01")
        ui.shot("researcher_sees_approval")


def test_approve_through_the_voila_page_of_02(stack: Stack, ui: UI) -> None:
    ledger = stack.ledger()
    researcher = node_account(ledger, OTHER_RESEARCHER)
    ds = int(catalogue(ledger).loc["site_b"]["dataset"])
    req = ledger.request_access(
        ds, "Sleep and blood pressure", "HMB|NCU", sender=researcher
    )
    assert ledger.request(req).status is Status.PENDING
    owner = node_account(ledger, OWNER)
    with ui.steps():
        ui.page.goto(f"{stack.voila.url}/?token={stack.voila.token}")
        inbox = panel_box(ui, "Requests for")
        inbox.get_by_role("button", name="approve").wait_for(
            timeout=(START_TIMEOUT + RUN_TIMEOUT) * 1000
        )
        shown = str(ui.page.locator("body").inner_text())
        assert "OwnerInbox(ledger, owner)" not in shown, "Voilà must show no code"
        assert "this is the inbox of" in shown  # outputs are there
        ui.shot("voila_page")
        ui.shot("voila_inbox", inbox)

        choose(labelled(inbox, "select", "request"), f"#{req} on #{ds} by ")
        inbox.get_by_role("button", name="approve").click()
        inbox.get_by_text(
            f"approved request #{req}: {researcher} may use dataset #{ds} until"
        ).wait_for()
        ui.shot("voila_approved", inbox)
    assert ledger.request(req).status is Status.APPROVED
    assert ledger.has_access(ds, researcher)
    assert fee_paid(ledger, req) == (owner, 5 * 10**15)
    assert ledger.dataset(ds).fee_wei == 5 * 10**15


def fee_paid(ledger: Ledger, request_id: int) -> tuple[str, int]:
    """Who the registry paid request ``request_id``'s fee to, and how much."""
    events = ledger.events()
    (row,) = events[
        (events["event"] == "FeePaid") & (events["request"] == request_id)
    ].itertuples()
    return str(row.account), int(row.amount_wei)
