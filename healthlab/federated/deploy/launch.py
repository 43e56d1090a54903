"""Writing a study's Flower App and running it against a SuperLink (``flwr run``).

The app bundle is the same for every study of a HealthLab version: the packaged
``pyproject.toml`` (its components are modules of the installed package; it holds no
code) with the version filled in. A site accepts exactly that bundle
(:mod:`healthlab.federated.deploy.runtime`). The study's own settings travel as
Flower's run config (``flwr run --run-config study.toml``), signed by the researcher.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import healthlab
from healthlab.errors import ConfigurationError, HealthLabError
from healthlab.federated.deploy.processes import flower_env, require_flower
from healthlab.federated.deploy.results import load_result
from healthlab.federated.spec import StudySpec, toml_value

if TYPE_CHECKING:
    from healthlab.federated.run import FederatedResult
    from healthlab.ledger import Ledger

__all__ = [
    "APP_DIR",
    "CONNECTION",
    "DeployedStudy",
    "build_app",
    "launch_study",
    "write_app",
    "write_connection",
    "write_run_config",
]

#: The Flower App (its ``pyproject.toml``) shipped inside the package.
APP_DIR = Path(__file__).resolve().parent.parent / "app"
#: Name of the SuperLink connection written into ``$FLWR_HOME/config.toml``.
CONNECTION = "healthlab"


def _app_text() -> str:
    template = (APP_DIR / "pyproject.toml").read_text()
    text, count = re.subn(
        r'^version = "[^"]*"$',
        f'version = "{healthlab.__version__}"',
        template,
        count=1,
        flags=re.MULTILINE,
    )
    if count != 1:
        raise ConfigurationError(f"{APP_DIR}/pyproject.toml has no project version")
    return text


def write_app(directory: str | os.PathLike[str]) -> Path:
    """Write the study app (one ``pyproject.toml``, no code) into ``directory``.

    ``directory`` must be empty of anything else: every file in it goes into the
    bundle, and a site accepts only the bundle this HealthLab version writes.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    others = [p.name for p in target.iterdir() if p.name != "pyproject.toml"]
    if others:
        raise ConfigurationError(
            f"{target} holds {sorted(others)}: the study app's folder must hold only "
            "its pyproject.toml (sites refuse any other bundle)"
        )
    (target / "pyproject.toml").write_text(_app_text())
    return target


def build_app() -> bytes:
    """The bytes of the app bundle (FAB) that :func:`write_app` gives ``flwr run``."""
    from healthlab.federated.flower_compat import build_fab

    with tempfile.TemporaryDirectory(prefix="hl-app-") as tmp:
        return build_fab(write_app(Path(tmp) / "app"))


def write_run_config(path: str | os.PathLike[str], study: StudySpec) -> Path:
    """The study's settings as a TOML file for ``flwr run --run-config``."""
    known = tomllib.loads(_app_text())["tool"]["flwr"]["app"]["config"]
    values = study.to_run_config()
    if set(values) != set(known):
        raise ConfigurationError(
            "the packaged app's run config and StudySpec differ: "
            f"{sorted(set(values) ^ set(known))}"
        )
    text = "\n".join(f"{key} = {toml_value(value)}" for key, value in values.items())
    tomllib.loads(text)  # refuse to write an invalid file
    target = Path(path)
    target.write_text(text + "\n")
    return target


def write_connection(
    home: str | os.PathLike[str],
    address: str,
    *,
    name: str = CONNECTION,
    root_certificates: str | None = None,
    insecure: bool = False,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection (the default).

    TLS against ``root_certificates`` (the study CA); plain HTTP only with
    ``insecure=True``.
    """
    if not root_certificates and not insecure:
        raise ConfigurationError(
            "give the study CA's certificate (root_certificates / "
            "--root-certificates) to reach the SuperLink over TLS, or insecure=True "
            "for development"
        )
    path = Path(home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {toml_value(root_certificates)}"
        if root_certificates
        else "insecure = true"
    )
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f"[superlink.{name}]\naddress = {toml_value(address)}\n{security}\n"
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
    study: StudySpec,
    *,
    ledger: Ledger | None = None,
    workdir: str | os.PathLike[str] | None = None,
    home: str | os.PathLike[str] | None = None,
    root_certificates: str | None = None,
    insecure: bool = False,
    timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> DeployedStudy:
    """Run ``study`` against the SuperLink at ``superlink`` with ``flwr run --stream``.

    Parameters
    ----------
    study:
        Signed with :meth:`StudySpec.sign` when the sites check grants.
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
    flwr = require_flower("flwr")
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
        app = write_app(base / "app")
        run_config = write_run_config(base / "run-config.toml", study)
        flwr_home = Path(home) if home else base / "flwr-home"
        write_connection(
            flwr_home,
            superlink,
            root_certificates=root_certificates,
            insecure=insecure,
        )
        limit = timeout or (
            study.node_timeout + study.rounds * 3 * study.round_timeout + 120
        )
        started = time.monotonic()
        output = _run_flwr(
            [
                flwr,
                "run",
                str(app),
                CONNECTION,
                "--stream",
                "--run-config",
                str(run_config),
            ],
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
