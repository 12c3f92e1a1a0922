"""A sweep in the MLflow UI, seen in a real browser; and ``wrnsweep ui``.

A real ``mlflow server`` (SQLite in tmp) on 127.0.0.1 receives a small synthetic
sweep launched through the CLI (``tests/sweeps/ui.yaml``). Headless Chromium
(Debian's, driven by Playwright) opens the experiment's runs page and the
compare-runs page; every trial run's name and its ``val_acc``, read back with
``MlflowClient`` and formatted as the UI formats metrics, must be on them.
The champion that the sweep registered is opened too: its version page (signature)
and its logged model's page (metrics). Screenshots of the pages go to
``$WRNSWEEP_TEST_ARTIFACTS`` (else tmp_path).

``wrnsweep ui`` is driven as a user would: on a finished sweep folder with the
embedded SQLite store (a copy of the session's, tests/sweeps/two_arch.yaml) it
serves the experiment on 127.0.0.1 until SIGINT
(exit 0); for a sweep tracked on a server it only prints the URL; a missing
folder or a busy port exits 2 with nothing started.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.ui import experiment_url
from tests._cluster import env, free_port, wait_for
from tests._meta import sweep_meta

REPO = Path(__file__).resolve().parents[1]
UI_SWEEP = REPO / "tests" / "sweeps" / "ui.yaml"
WRNSWEEP = str(Path(sys.executable).with_name("wrnsweep"))
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Wide enough that MLflow's virtualised compare grid renders every run's column
# beside its assistant panel (at 1600 px it drew 4 of 5).
VIEWPORT = {"width": 1920, "height": 1200}
TALL = {"width": 1920, "height": 2400}  # the whole compare page, metrics included, in one shot
PAGE_TIMEOUT_MS = 60_000  # first load of the UI's bundle on a busy 2-core machine

pytestmark = pytest.mark.slow


# -- helpers -----------------------------------------------------------------------------
def ui_metric(value: float) -> str:
    """A metric value as MLflow's UI shows it: ``Utils.formatMetric`` of its JS bundle.

    3 decimals below 10, 2 below 100, 1 above; ``toExponential(3)`` below 1e-3.
    """
    if value == 0:
        return "0"
    if math.isnan(value):
        return "NaN"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    scale = 1000 if abs(value) < 10 else 100 if abs(value) < 100 else 10
    rounded = math.floor(value * scale + 0.5) / scale  # JS Math.round: half up
    return str(int(rounded)) if rounded.is_integer() else repr(rounded)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def listening_addresses(port: int) -> list[str]:
    """Local addresses with a socket in LISTEN on ``port``, from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: TCP_LISTEN
                if len(address) == 8:  # IPv4, little-endian hex
                    found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                else:
                    words = bytes.fromhex(address)
                    raw = b"".join(words[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.append(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def cli_env() -> dict[str, str]:
    """The user's environment without a tracking URI or Ray address of its own."""
    return {k: v for k, v in env().items() if k != "MLFLOW_TRACKING_URI"}


def start_launch(storage: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``wrnsweep launch tests/sweeps/ui.yaml`` in the background, its output in a log."""
    storage.mkdir(parents=True)
    with (storage / "launch.log").open("w") as log:
        return subprocess.Popen([WRNSWEEP, "launch", str(UI_SWEEP), "--storage", str(storage),
                                 *extra], stdout=log, stderr=subprocess.STDOUT,
                                cwd=storage, env=cli_env())


def finished(proc: subprocess.Popen[bytes], storage: Path) -> Path:
    """Wait for a launch to end well; the sweep's folder."""
    code = proc.wait(timeout=600)
    assert code == 0, (storage / "launch.log").read_text()[-4000:]
    return storage / "ui"


@dataclass
class Trial:
    run_id: str
    name: str
    val_acc: float
    status: str


@dataclass
class TrackedSweep:
    home: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials: list[Trial]


def tracked(home: Path) -> TrackedSweep:
    """The sweep's trial runs as MlflowClient reads them (what the UI must show)."""
    from mlflow import MlflowClient

    meta = sweep_meta(home)
    client = MlflowClient(tracking_uri=meta["tracking_uri"])
    runs = client.search_runs(
        [meta["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'")
    trials = [Trial(r.info.run_id, r.info.run_name, r.data.metrics["val_acc"], r.info.status)
              for r in runs]
    return TrackedSweep(home, meta["tracking_uri"], meta["experiment_id"],
                        meta["parent_run_id"], trials)


def artifacts_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("WRNSWEEP_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = artifacts_dir(tmp_path) / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing (CI starts without it)."""
    if CHROMIUM.exists():
        return str(CHROMIUM)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and "
                    "apt-get); install it with: apt-get install chromium")
    start = time.monotonic()
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for another apt (an image's own set-up) instead of failing on its lock.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y",
               "--no-install-recommends", "chromium"]
    result = subprocess.run(install, capture_output=True, text=True, env=apt_env, timeout=1200)
    if result.returncode != 0:  # stale or missing package lists: refresh them once
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"],
                       capture_output=True, text=True, env=apt_env, timeout=600)
        result = subprocess.run(install, capture_output=True, text=True, env=apt_env,
                                timeout=1200)
    if result.returncode != 0 or not CHROMIUM.exists():
        pytest.skip(f"cannot install chromium with apt-get (exit {result.returncode}): "
                    f"{(result.stderr or result.stdout).strip()[-500:]}")
    print(f"installed {CHROMIUM} with apt-get in {time.monotonic() - start:.0f} s")
    return str(CHROMIUM)


def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store in ``folder``; its URI."""
    folder.mkdir(parents=True)
    port = free_port()
    with (folder / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server_sweep(tmp_path_factory) -> Iterator[TrackedSweep]:
    """The UI sweep tracked on a real `mlflow server` on 127.0.0.1: three trials, every
    one FINISHED."""
    work = tmp_path_factory.mktemp("ui")
    server, uri = start_mlflow_server(work / "mlflow")

    def up() -> bool:
        assert server.poll() is None, (work / "mlflow" / "server.log").read_text()[-3000:]
        return http_ok(f"{uri}/health")

    launch = None
    try:
        wait_for(up, 120, "mlflow server to answer /health")
        launch = start_launch(work / "server", "--tracking-uri", uri)
        sweep = tracked(finished(launch, work / "server"))
        assert [t.status for t in sweep.trials] == ["FINISHED"] * 3
        yield sweep
    finally:
        if launch is not None and launch.poll() is None:  # only when the fixture failed
            launch.terminate()  # SIGTERM: the driver stops the Ray it started
            launch.wait(timeout=120)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def local_sweep(two_arch_sweep, tmp_path_factory) -> TrackedSweep:
    """A sweep with the embedded store, sqlite:///<sweep>/mlflow.db: a copy of the
    session's (tests/sweeps/two_arch.yaml, experiment "e2e")."""
    sweep = tracked(two_arch_sweep.copy_to(tmp_path_factory.mktemp("ui-local")))
    assert sweep.tracking_uri.startswith("sqlite:///")
    return sweep


@pytest.fixture(scope="module")
def browser(chromium: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    from playwright.sync_api import expect

    # Assertions wait as long as actions (their own default is 5 s): the runs grid of
    # a first load took longer while the suite's other worker trained beside it.
    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    yield context.new_page()
    context.close()


# -- the UI in a browser -----------------------------------------------------------------
def test_experiment_page_lists_every_trial_run(server_sweep, page, tmp_path: Path) -> None:
    """The runs page `wrnsweep ui` links to: the sweep's parent run, expanded, shows one
    child run per trial under its MLflow name."""
    from playwright.sync_api import expect

    page.goto(experiment_url(server_sweep.tracking_uri, server_sweep.experiment_id))
    parent = page.locator(
        f'[role="gridcell"]:has(a[href$="/runs/{server_sweep.parent_run_id}"])')
    expect(parent).to_contain_text("ui")
    parent.get_by_role("button").click()  # the +: expand the sweep's child runs
    for trial in server_sweep.trials:
        expect(page.locator(f'a[href$="/runs/{trial.run_id}"]')).to_have_text(trial.name)
    screenshot(page, tmp_path, "mlflow-ui-experiment.png")


# Texts of the cells right of a row's label, left to right: MLflow's compare grids
# are absolutely positioned <div>s (react-virtualized), not table rows. The metrics
# grid is a 300 px box (7 rows) whose later rows (val_acc is the 10th of 11) are
# rendered below its fold: they are read there, unscrolled, while labels and values
# line up. Scrolling that box in MLflow 3.17.2 leaves the names one scroll event
# behind the values (its sync reads the grid's scrollTop before it is updated).
ROW_NUMBERS = """([label, count]) => {
  const box = label.getBoundingClientRect();
  const y = box.top + box.height / 2;
  const cells = [];
  for (const el of document.querySelectorAll("body *")) {
    const text = el.textContent.trim();
    if (el.children.length || !/^-?[0-9.]+(e[-+][0-9]+)?$|^NaN$/.test(text)) continue;
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.left >= box.right && r.top <= y && y <= r.bottom)
      cells.push([r.left, text]);
  }
  return cells.length >= count ? cells.sort((a, b) => a[0] - b[0]).map((c) => c[1]) : null;
}"""


def test_compare_page_shows_every_trial_with_its_val_acc(server_sweep, page,
                                                         tmp_path: Path) -> None:
    """MLflow 3's compare-runs page (``#/compare-runs?runs=[...]&experiments=[...]``, the
    route its "Compare" button opens) shows each trial's name and, in the val_acc row
    and the same column, its last val_acc as the UI formats it."""
    from playwright.sync_api import expect

    trials = server_sweep.trials
    ids = [t.run_id for t in trials]
    page.set_viewport_size(TALL)  # the app scrolls inside a pane: full_page alone cuts it
    page.goto(f"{server_sweep.tracking_uri}/#/compare-runs?runs={json.dumps(ids)}"
              f"&experiments={json.dumps([server_sweep.experiment_id])}")
    expect(page.get_by_text(f"Comparing {len(trials)} Runs from 1 Experiment")).to_be_visible()
    names = []
    for trial in trials:
        cell = page.get_by_text(trial.name, exact=True).first
        expect(cell).to_be_visible()
        names.append((cell.bounding_box()["x"], trial.name))
    label = page.locator('a[href*="metric=%22val_acc%22"]').first  # the metric's row label
    expect(label).to_be_attached()
    numbers = page.wait_for_function(  # null until the row's values are rendered
        ROW_NUMBERS, arg=[label.element_handle(), len(trials)]).json_value()
    in_columns = [name for _, name in sorted(names)]
    assert dict(zip(in_columns, numbers, strict=True)) == {
        t.name: ui_metric(t.val_acc) for t in trials}, numbers
    screenshot(page, tmp_path, "mlflow-ui-compare.png")


def test_champion_pages_show_its_signature_and_metrics(server_sweep, page,
                                                       tmp_path: Path) -> None:
    """The sweep's registered model (``#/models/ui``) lists the champion; its version
    page shows the signature (Schema: ``images`` uint8 (-1, 32, 32, 3) in, ``logits``
    float32 out) and links its logged model ("Source Model"), whose page shows the
    metrics of the registered weights: ``test_acc`` equal to the version's tag and
    ``val_acc`` of the checkpoint's epoch. MLflow 3.17's version page has no metrics of
    its own: they are on the logged model's page."""
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    client = MlflowClient(tracking_uri=server_sweep.tracking_uri,
                          registry_uri=server_sweep.tracking_uri)
    champion = client.get_model_version_by_alias("ui", "champion")
    model_id = champion.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    metrics = {m.key: m.value for m in logged.metrics}
    assert repr(metrics["test_acc"]) == champion.tags["test_acc"]

    page.goto(f"{server_sweep.tracking_uri}/#/models/ui")
    row = page.locator(f'[role="row"]:has(a[href$="/models/ui/versions/{champion.version}"])')
    expect(row).to_contain_text("champion")
    expect(row).to_contain_text(champion.tags["test_acc"])  # the version's tags, listed
    row.locator(f'a[href$="/models/ui/versions/{champion.version}"]').first.click()

    expect(page.get_by_text(f"Version {champion.version}", exact=True).first).to_be_visible()
    page.get_by_text("Inputs (1)").click()
    page.get_by_text("Outputs (1)").click()
    expect(page.get_by_text("images (required)")).to_be_visible()
    expect(page.get_by_text("Tensor (dtype: uint8, shape: [-1,32,32,3])")).to_be_visible()
    expect(page.get_by_text("logits (required)")).to_be_visible()
    expect(page.get_by_text("Tensor (dtype: float32, shape: [-1,10])")).to_be_visible()
    expect(page.get_by_text("Test accuracy of exactly these weights")).to_be_visible()
    screenshot(page, tmp_path, "mlflow-ui-champion-version.png")

    page.locator(f'a[href$="/models/{model_id}"]').first.click()  # "Source Model"
    for key in ("test_acc", "val_acc"):
        row = page.locator(f'[role="row"]:has-text("{key}")').first
        expect(row).to_contain_text(repr(metrics[key]))  # JS prints doubles as repr does
    expect(page.locator('a[href*="/models/ui/versions/"]').first).to_be_visible()  # its version
    screenshot(page, tmp_path, "mlflow-ui-champion-logged-model.png")


# -- wrnsweep ui -------------------------------------------------------------------------
def test_ui_serves_the_sweep_on_localhost_until_sigint(local_sweep, tmp_path: Path) -> None:
    """`wrnsweep ui FOLDER` starts MLflow on the sweep's SQLite store, bound to
    127.0.0.1 only, prints the experiment's URL, and SIGINT stops it all: exit 0."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = experiment_url(base, local_sweep.experiment_id)
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen([WRNSWEEP, "ui", str(local_sweep.home), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=cli_env())
    try:
        def answers() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return http_ok(f"{base}/health")

        wait_for(answers, 120, "wrnsweep ui to answer /health")
        wait_for(lambda: url in log.read_text(), 30, f"wrnsweep ui to print {url}")
        got = get_json(f"{base}/ajax-api/2.0/mlflow/experiments/get?"
                       f"experiment_id={local_sweep.experiment_id}")
        assert got["experiment"]["name"] == "e2e"
        assert got["experiment"]["artifact_location"] == (
            (local_sweep.home / "mlartifacts").resolve().as_uri())
        assert set(listening_addresses(port)) == {"127.0.0.1"}
        assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "MLflow UI stopped" in text and "Traceback" not in text, text[-3000:]
    assert listening_addresses(port) == []  # nothing left behind
    assert not http_ok(f"{base}/health")


def test_ui_of_a_server_tracked_sweep_starts_nothing(server_sweep, tmp_path: Path) -> None:
    """A sweep tracked on an MLflow server: `wrnsweep ui` prints that server's URL of
    the experiment and exits 0 at once."""
    result = subprocess.run([WRNSWEEP, "ui", str(server_sweep.home)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"MLflow UI: {server_sweep.tracking_uri}/#/experiments/"
        f"{server_sweep.experiment_id}/runs?workflowType=machine_learning")


def test_ui_refuses_a_missing_folder_and_a_busy_port(local_sweep, tmp_path: Path) -> None:
    """Exit 2 with a message naming the argument, no traceback, nothing started."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        runs = [subprocess.Popen([WRNSWEEP, "ui", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=cli_env())
                for args in ([str(tmp_path / "missing")],
                             [str(local_sweep.home), "--port", str(port)])]
        (_, missing), (_, in_use) = (p.communicate(timeout=60) for p in runs)
    assert [p.returncode for p in runs] == [2, 2], (missing, in_use)
    assert f"{tmp_path / 'missing'}: no such sweep folder" in missing
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in in_use
    assert "Traceback" not in missing + in_use
    assert not (tmp_path / "mlruns").exists()
