"""What a user sees in `mlflow ui`: a finished tiny quickstart run, served by a real `mlflow server`
and read by a real headless Chromium (Debian's `chromium` and `chromedriver`, driven by Selenium).

The MLflow UI is a React app: every check waits explicitly for what it reads. Each test saves a
screenshot; with $DMSTAB_SCREENSHOTS set to a folder (docs/img), it is copied there too.
Run with `nox -s browser` (marker `browser`, left out of the default run).
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from dmstab.tracking import run_page
from tests.helpers import QUICKSTART, TINY, CachedRun, Training, copy_store, relocate
from tests.mlflow_server import MlflowServer

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"
WINDOW = (1400, 900)  # the page's size in CSS pixels, and the screenshots'
WAIT_S = 60.0  # the first page compiles MLflow's UI bundle in a cold browser: seconds on 2 cores
# Where to copy the screenshots ($DMSTAB_SCREENSHOTS), resolved before the tests change folder
SCREENSHOTS_TO = (
    Path(os.environ["DMSTAB_SCREENSHOTS"]).resolve()
    if os.environ.get("DMSTAB_SCREENSHOTS")
    else None
)
RUN_NAME = "quickstart·clts·s0"  # dmstab.config.describe.run_name of the quickstart with TINY
# The MLflow Assistant panel opens itself on a browser's first visit; these are what MLflow 3.17
# stores once a user has closed it. Only the screenshots depend on them.
ASSISTANT_CLOSED = {
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.assistant.panelOpen_v1": "false",
}


@dataclass(frozen=True)
class Served:
    server: MlflowServer
    run: CachedRun
    experiment_id: str

    def page(self, tab: str = "") -> str:
        """The run's page as `dmstab train` prints it, opened on `tab` (`model-metrics`,
        `artifacts/PATH`; the UI's routes `#/experiments/E/runs/R/TAB`)."""
        page = run_page(self.server.uri, self.experiment_id, self.run.run_id)
        path, _, query = page.partition("?")
        return f"{path}/{tab}?{query}" if tab else page


@pytest.fixture(scope="module")
def served(run_cache: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The session's tiny quickstart run (the `tiny_dm` fixture's), its store copied into a folder
    of its own and served there by `mlflow server`."""
    folder, (cached,) = run_cache.get((Training.of(QUICKSTART, TINY),))
    root = tmp_path_factory.mktemp("mlflow-ui")
    copy_store(folder, root)
    server = MlflowServer(root)
    server.start()
    try:
        run = server.client().get_run(cached.run_id)
        yield Served(server, relocate(cached, root), run.info.experiment_id)
    finally:
        server.kill()


@pytest.fixture(scope="module")
def browser(served: Served) -> Iterator[WebDriver]:
    """Headless Chromium at WINDOW, on the system's browser and driver (Selenium Manager, which
    would download a browser, is never asked: both paths are given)."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER}: {INSTALL}")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs pip install -e .[browser]")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)  # no sandbox: CI runs as root, which Chromium refuses
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    try:
        width, height = WINDOW
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        driver.get(served.server.uri)
        for key, value in ASSISTANT_CLOSED.items():
            driver.execute_script("localStorage.setItem(arguments[0], arguments[1])", key, value)
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    """`condition`'s first truthy value, polled until WAIT_S; else fails saying `what`."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(condition, f"no {what}")


def element(driver: WebDriver, xpath: str) -> Any:
    from selenium.webdriver.common.by import By

    return wait_for(
        driver, lambda d: next(iter(d.find_elements(By.XPATH, xpath)), None), f"element {xpath}"
    )


def screenshot(driver: WebDriver, folder: Path, name: str) -> Path:
    """The page as a PNG in `folder`, copied to $DMSTAB_SCREENSHOTS when that is set."""
    path = folder / name
    assert driver.save_screenshot(str(path)), path
    assert Image.open(path).size == WINDOW
    if SCREENSHOTS_TO is not None:
        shutil.copyfile(path, SCREENSHOTS_TO / name)
    return path


def test_the_experiment_list_shows_the_experiment_and_its_runs(
    browser: WebDriver, served: Served, tmp_path: Path
) -> None:
    browser.get(f"{served.server.uri}/#/experiments")
    row = element(browser, "//*[@role='row' or self::tr][.//a[normalize-space()='tests']]")
    assert "Runs of dmstab recipes" in row.text  # the experiment's description
    row.find_element("xpath", ".//a[normalize-space()='tests']").click()
    # MLflow 3.17 opens every experiment in its GenAI view unless told otherwise; its toggle
    # (top left) switches to the training runs (docs/tracking.md says so)
    element(browser, "//*[@role='button'][normalize-space()='Model training']").click()
    element(browser, f"//a[normalize-space()='{RUN_NAME}']")
    assert f"#/experiments/{served.experiment_id}/runs" in browser.current_url
    screenshot(browser, tmp_path, "mlflow_experiment_runs.png")


def test_the_printed_run_page_shows_name_description_and_params_in_the_training_view(
    browser: WebDriver, served: Served, tmp_path: Path
) -> None:
    browser.get(served.page())
    element(browser, f"//*[normalize-space()='{RUN_NAME}']")
    # the training view's chrome: the breadcrumb leads to the experiment's Runs, not GenAI's
    # Evaluations, and the side bar offers the model registry, not judges and prompts
    element(browser, "//nav//a[normalize-space()='Runs']")
    texts = browser.find_element("tag name", "body").text.splitlines()
    assert "Model registry" in texts and "Evaluations" not in texts and "Judges" not in texts
    # the description is rendered markdown: dmstab.config.describe.run_description
    note = element(browser, "//*[@data-testid='note-editor-preview-content']")
    assert note.find_element("xpath", ".//strong").text == "train"
    assert note.find_element("xpath", ".//code").text == "quickstart"
    assert "**" not in note.text and "clts training, 12 steps of batch 8" in note.text
    row = element(
        browser, "//*[@role='row'][./*[@role='cell'][1][normalize-space()='model.channels']]"
    )
    assert row.find_elements("xpath", "./*[@role='cell']")[1].text == "32"
    screenshot(browser, tmp_path, "mlflow_run_overview.png")


def test_the_loss_chart_plots_every_logged_step(
    browser: WebDriver, served: Served, tmp_path: Path
) -> None:
    history = served.server.client().get_metric_history(served.run.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 13))  # TINY logs every step
    browser.get(served.page("model-metrics"))
    element(browser, "//input[@placeholder='Search metric charts']").send_keys("train/loss")
    # MLflow groups the charts by prefix: the section `train` holds the chart titled `loss`
    card = element(
        browser,
        "//*[@data-testid='experiment-view-compare-runs-card'][.//*[normalize-space()='loss']]",
    )
    traces = wait_for(
        browser,
        lambda d: d.execute_script(
            "const plot = arguments[0].querySelector('.js-plotly-plot');"
            "return plot && plot.data && plot.data.map(t => [t.name, t.x, t.y]);",
            card,
        ),
        "plotted loss",
    )
    assert traces and all(name == RUN_NAME for name, _, _ in traces)
    for _, steps, values in traces:
        assert steps == [m.step for m in history]
        assert values == pytest.approx([m.value for m in history], rel=1e-12)
    screenshot(browser, tmp_path, "mlflow_loss_chart.png")


def test_the_sample_grid_renders_as_the_logged_image(
    browser: WebDriver, served: Served, tmp_path: Path
) -> None:
    assert served.run.samples is not None
    grid = served.run.samples  # runs/RUN/samples/step_00000012.png, logged with log_image
    logged = served.server.client().list_artifacts(served.run.run_id, "images")
    (path,) = [
        a.path
        for a in logged
        if a.path.startswith("images/samples+step+12+") and a.path.endswith(".png")
    ]
    browser.get(served.page(f"artifacts/{path}"))
    image = element(browser, "//img[starts-with(@src, 'blob:')]")
    size = wait_for(
        browser,
        lambda d: d.execute_script(
            "const i = arguments[0]; return i.complete && i.naturalWidth > 0"
            " && [i.naturalWidth, i.naturalHeight];",
            image,
        ),
        "decoded sample grid",
    )
    assert tuple(size) == Image.open(grid).size
    shown = browser.execute_async_script(  # the bytes behind the image: the logged file's
        "const done = arguments[1];"
        "fetch(arguments[0].src).then(r => r.arrayBuffer()).then(b => {"
        "  let s = ''; new Uint8Array(b).forEach(c => s += String.fromCharCode(c)); done(btoa(s));"
        "});",
        image,
    )
    assert base64.b64decode(shown) == grid.read_bytes()
    screenshot(browser, tmp_path, "mlflow_sample_grid.png")
