"""A deployed site against an attacking researcher, a rogue node and a stranger.

Real processes on loopback: a SuperLink with TLS (a fresh study CA) and SuperNode
authentication, and a site (its SuperNode with ``--isolation process`` and the site
runtime beside it). The attacks, written as the attacker would:

* a researcher's own app bundle (its own ClientApp, or HealthLab's app with a module
  that shadows the site's code) sent with ``flwr run``: refused before any of it is
  imported — the marker files its code would write are absent, the reply is a named
  ``AppBundleRefused`` error, the site logs the refusal;
* a node whose key nobody registered, a node with no key, and a ``flwr`` client
  without the study's CA (another CA, or plain HTTP): each refused;
* secrets in the operator's environment (a private key, a database URL with a
  password): absent from every process of the site and from their command lines.

The honest study over TLS and node authentication is ``tests/test_deploy.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from healthlab.errors import AppBundleRefused, ConfigurationError
from healthlab.federated.deploy import (
    SiteConfig,
    SiteNode,
    SuperLink,
    flower_env,
    make_node_key,
    make_study_pki,
    write_app,
    write_connection,
)
from healthlab.federated.deploy.runtime import PinnedApp, pinned_app
from healthlab.federated.flower_compat import Task
from tests.test_deploy import require_flower

SECRET_KEY = "0x" + "5e" * 32
SECRET_URL = "postgresql://steward:hunter2-password@db.hospital.example/cohort"

EVIL_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "healthlab-study"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "healthlab"

[tool.flwr.app.components]
serverapp = "{server}:app"
clientapp = "{client}:app"

[tool.flwr.app.config]
out = ""
marker = ""
"""

#: The researcher's ServerApp (it runs on the researcher's own SuperLink): ask every
#: node once, write what came back.
EVIL_SERVER = """\
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()

@app.main()
def main(grid, context):
    deadline = time.time() + 60
    nodes = []
    while not nodes and time.time() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.1)
    messages = [
        Message(RecordDict({"ask": ConfigRecord({"x": 1})}), dst_node_id=n,
                message_type="query")
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=60))
    Path(context.run_config["out"]).write_text(json.dumps({
        "nodes": nodes,
        "errors": [r.error.reason if r.has_error() else None for r in replies],
        "contents": [None if r.has_error() else repr(r.content) for r in replies],
    }))
"""

#: The researcher's ClientApp: on import and when run, it leaves a marker and reads
#: what a hospital must never hand out.
EVIL_CLIENT = """\
import os
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

MARKER = Path({marker!r})
MARKER.with_suffix(".imported").write_text("imported")

app = ClientApp()

@app.query()
def steal(msg, context):
    MARKER.with_suffix(".ran").write_text("ran")
    loot = {{"env": dict(os.environ), "node": dict(context.node_config)}}
    data = context.node_config.get("data")
    if data:
        loot["rows"] = Path(str(data)).read_text()
    return Message(RecordDict({{"loot": ConfigRecord({{"x": repr(loot)}})}}),
                   reply_to=msg)
"""


@dataclass
class Scene:
    work: Path
    link: SuperLink
    node: SiteNode
    data: Path


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    """A TLS SuperLink and one registered site, with secrets in the environment."""
    require_flower()
    work = tmp_path_factory.mktemp("security")
    data = work / "site_a.csv"
    pd.DataFrame({"age": range(40, 90), "event": [0, 1] * 25}).to_csv(data)
    site = SiteConfig(
        name="site_a",
        dataset_id=1,
        rpc_url="http://127.0.0.1:1",  # never reached: refusals come first
        registry="0x" + "11" * 20,
        data=str(data),
        state_dir=str(work / "state_a"),
    )
    secrets_in_env = {
        "HEALTHLAB_PRIVATE_KEY": SECRET_KEY,
        "HEALTHLAB_DATABASE_URL": SECRET_URL,
        "PGPASSWORD": "hunter2-password",
    }
    saved = {k: os.environ.get(k) for k in secrets_in_env}
    os.environ.update(secrets_in_env)
    link = SuperLink()
    node: SiteNode | None = None
    try:
        link.start(timeout=60)
        node = SiteNode(link.address, site, root_certificates=link.root_certificates)
        link.register_node(node.public_key_file)
        node.start(timeout=90)
        yield Scene(work, link, node, data)
    finally:
        if node is not None:
            node.close()
        link.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _flwr_run(scene: Scene, app: Path, config: dict[str, str], ca: str | None) -> str:
    """``flwr run`` of ``app`` as the researcher would; its output."""
    home = scene.work / f"home-{app.name}-{time.monotonic_ns()}"
    write_connection(home, scene.link.address, root_certificates=ca, insecure=not ca)
    overrides = scene.work / f"{app.name}-run.toml"
    overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "flwr"),
            "run",
            str(app),
            "healthlab",
            "--run-config",
            str(overrides),
        ],
        capture_output=True,
        text=True,
        env=flower_env(home),
        timeout=120,
        check=False,
    )
    return done.stdout + done.stderr


def _wait_for(path: Path, timeout: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return dict(json.loads(path.read_text()))
        time.sleep(0.1)
    raise AssertionError(f"the researcher's ServerApp wrote nothing to {path}")


def _evil_app(folder: Path, marker: Path, *, shadow: bool) -> Path:
    """A researcher's bundle: its own ClientApp, or HealthLab's app whose
    ``healthlab.federated.deployed_client`` is replaced by the researcher's."""
    folder.mkdir(parents=True)
    (folder / "evil_server.py").write_text(EVIL_SERVER)
    client = EVIL_CLIENT.format(marker=str(marker))
    if shadow:
        package = folder / "healthlab" / "federated"
        package.mkdir(parents=True)
        for init in (folder / "healthlab", package):
            (init / "__init__.py").write_text("")
        (package / "deployed_client.py").write_text(client)
        names = {
            "server": "evil_server",
            "client": "healthlab.federated.deployed_client",
        }
    else:
        (folder / "evil_client.py").write_text(client)
        names = {"server": "evil_server", "client": "evil_client"}
    (folder / "pyproject.toml").write_text(EVIL_PYPROJECT.format(**names))
    return folder


@pytest.mark.parametrize("shadow", [False, True], ids=["own-clientapp", "shadowing"])
def test_a_researchers_own_bundle_is_refused_before_any_of_it_runs(
    scene: Scene, shadow: bool
) -> None:
    tag = "shadow" if shadow else "own"
    marker = scene.work / f"marker-{tag}"
    app = _evil_app(scene.work / f"evil-{tag}", marker, shadow=shadow)
    out = scene.work / f"out-{tag}.json"
    printed = _flwr_run(
        scene,
        app,
        {"out": str(out), "marker": str(marker)},
        scene.link.root_certificates,
    )
    got = _wait_for(out)
    assert got["nodes"], f"the site's node never joined: {printed[-2000:]}"
    errors = [str(e) for e in got["errors"]]  # type: ignore[attr-defined]
    assert got["contents"] == [None], f"the site answered: {got['contents']}"
    assert len(errors) == 1 and "AppBundleRefused" in errors[0], errors
    assert "HealthLab" in errors[0] and "was not run" in errors[0]
    assert not marker.with_suffix(".imported").exists(), (
        "the bundle's code was imported"
    )
    assert not marker.with_suffix(".ran").exists(), "the bundle's ClientApp ran"
    assert "app bundle refused" in scene.node.runtime_output()
    assert SECRET_KEY not in json.dumps(got) and "hunter2" not in json.dumps(got)
    # nothing of the bundle was unpacked at the site either
    assert not list(scene.node.home.rglob("evil_*.py"))


def test_the_pinned_bundle_is_exactly_what_this_version_writes(tmp_path: Path) -> None:
    from healthlab.federated.flower_compat import build_fab

    pinned = pinned_app()
    app = write_app(tmp_path / "app")
    assert PinnedApp(build_fab(app)).sha256 == pinned.sha256
    (app / "extra.py").write_text("print('hi')\n")
    assert PinnedApp(build_fab(app)).sha256 != pinned.sha256
    with pytest.raises(ConfigurationError, match=r"only its pyproject\.toml"):
        write_app(app)


@pytest.mark.parametrize("flip", [0, 100, -1])
def test_a_bundle_differing_in_one_byte_is_refused(flip: int) -> None:
    from healthlab.federated.deploy import build_app

    content = bytearray(build_app())
    content[flip] ^= 0x01
    task = Task(None, None, 7, "healthlab/healthlab-study", "0.1.0", bytes(content))
    with pytest.raises(AppBundleRefused, match="differs and was not run"):
        pinned_app().check(task)
    pinned_app().check(
        Task(None, None, 7, "healthlab/healthlab-study", "0.1.0", build_app())
    )


def test_no_secret_reaches_the_sites_processes(scene: Scene) -> None:
    pids = scene.node.group()
    assert len(pids) >= 2, f"expected the SuperNode and the site runtime: {pids}"
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        names = {line.split("=", 1)[0] for line in environ.split("\0") if line}
        for text in (environ, cmdline):
            assert SECRET_KEY not in text, f"pid {pid} holds the private key"
            assert "hunter2" not in text, f"pid {pid} holds the database password"
        assert not names & {"HEALTHLAB_PRIVATE_KEY", "HEALTHLAB_DATABASE_URL"}
        assert "PGPASSWORD" not in names


def test_a_database_url_reaches_the_site_only_as_a_private_file(tmp_path: Path) -> None:
    site = SiteConfig(
        name="site_sql",
        dataset_id=3,
        rpc_url="http://127.0.0.1:1",
        registry="0x" + "11" * 20,
        sql_url=SECRET_URL,
        table="cohort",
        state_dir=str(tmp_path / "state"),
    )
    node = SiteNode("127.0.0.1:1", site, insecure=True)
    try:
        assert node.site.sql_url is None
        assert "hunter2" not in node.site.node_config()
        assert "hunter2" not in " ".join(node._args())
        url_file = Path(str(node.site.sql_url_file))
        assert url_file.stat().st_mode & 0o777 == 0o600
        assert node.site.database_url() == SECRET_URL
        url_file.chmod(0o644)
        with pytest.raises(ConfigurationError, match="readable by other users"):
            node.site.database_url()
    finally:
        node.close()


@pytest.mark.parametrize(
    "name", ["HEALTHLAB_PRIVATE_KEY", "PGPASSWORD", "API_TOKEN", "HEALTHLAB_KEY_FILE"]
)
def test_secrets_cannot_be_handed_to_a_flower_process(
    name: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match="never in its environment"):
        flower_env(tmp_path, **{name: "x"})


def test_an_unregistered_node_is_refused(scene: Scene) -> None:
    site = SiteConfig(
        name="rogue",
        dataset_id=1,
        rpc_url="http://127.0.0.1:1",
        registry="0x" + "11" * 20,
        data=str(scene.data),
        state_dir=str(scene.work / "state_rogue"),
    )
    rogue = SiteNode(
        scene.link.address, site, root_certificates=scene.link.root_certificates
    )
    try:
        with pytest.raises(ConfigurationError) as refused:
            rogue.start(timeout=90)
        message = str(refused.value)
        assert "not registered at the SuperLink" in message, message[-1500:]
        assert "Failed to activate SuperNode" in message or "2004" in message
        assert rogue.node_id is None
    finally:
        rogue.close()


def _raw_supernode(scene: Scene, *extra: str) -> subprocess.CompletedProcess[str]:
    """``flower-supernode`` as a stranger would start it, until it gives up."""
    home = scene.work / f"stranger-{time.monotonic_ns()}"
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "flower-supernode"),
            "--superlink",
            scene.link.address,
            "--isolation",
            "process",
            "--max-retries",
            "1",
            "--max-wait-time",
            "20",
            "--port",
            str(_free_port()),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=flower_env(home),
        timeout=120,
        check=False,
    )


def _free_port() -> int:
    from healthlab.services import free_port

    return free_port()


def test_a_node_without_a_key_is_refused(scene: Scene) -> None:
    done = _raw_supernode(
        scene, "--root-certificates", str(scene.link.root_certificates)
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-1500:]
    assert "SuperNode ID" not in output
    assert "authentication" in output.lower(), output[-1500:]


def test_a_node_trusting_another_ca_does_not_connect(scene: Scene) -> None:
    other = make_study_pki(scene.work / "other-ca")
    key = make_node_key(scene.work / "stranger-key")
    done = _raw_supernode(
        scene,
        "--root-certificates",
        str(other.ca_cert),
        "--auth-supernode-private-key",
        str(key),
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "SuperNode ID" not in output, output[-1500:]


@pytest.mark.parametrize("how", ["another-ca", "plain-http"])
def test_a_client_without_the_study_ca_is_refused(scene: Scene, how: str) -> None:
    app = write_app(scene.work / f"app-{how}")
    ca = (
        str(make_study_pki(scene.work / f"ca-{how}").ca_cert)
        if how == "another-ca"
        else None
    )
    output = _flwr_run(scene, app, {}, ca)
    assert "Successfully started run" not in output, output[-1500:]
    assert any(
        word in output
        for word in (
            "CERTIFICATE_VERIFY_FAILED",
            "certificate",
            "SSL",
            "Connect",
            "connect",
        )
    ), output[-1500:]
