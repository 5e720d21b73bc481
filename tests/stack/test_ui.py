"""The Prefect UI in a real browser (Debian's headless Chromium driven by
Playwright): log in with the stack's auth string, open the `quantize`
deployment, fill its form, start a run, watch it reach Completed; then the
MLflow UI, behind its login, shows that run. Screenshots of each step go to
``test-artifacts/ui/``."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, WIKI_TEST, WIKI_VALID

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = REPO / "test-artifacts" / "ui"


@pytest.fixture
def page(stack):
    from playwright.sync_api import sync_playwright

    from stack.credentials import MLFLOW_ADMIN, load

    if not Path(CHROMIUM).is_file():
        pytest.fail("chromium not found: `make test` installs it (apt-get install chromium)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        # MLflow's UI asks with HTTP basic auth: a person's browser answers with the
        # admin's login (`quantmill stack env --logins`)
        login = {"username": MLFLOW_ADMIN, "password": load(stack["home"]).mlflow_admin_password}
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, http_credentials=login)
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def field(page, label: str):
    """The innermost form property labelled ``label``."""
    return page.locator(".schema-form-property", has=page.get_by_text(label, exact=True)).last


def fill(page, label: str, value: str, kind: str = "str") -> None:
    prop = field(page, label)
    prop.get_by_text(kind, exact=True).click()  # from None to a value of this type
    prop.locator("textarea, input").first.fill(value)


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_start_a_quantize_run_from_the_prefect_ui_and_find_it_in_mlflow(
    stack, client, page, tmp_path
):
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    ui = stack["env"]["PREFECT_API_URL"].removesuffix("/api")
    page.goto(f"{ui}/deployments")
    # the server asks for its auth string: the UI shows its login form first
    page.wait_for_url("**/login**")
    password = page.locator("input").first
    password.wait_for()
    shot(page, "0-login")
    password.fill(stack["env"]["PREFECT_API_AUTH_STRING"])
    page.keyboard.press("Enter")
    page.wait_for_url("**/deployments")
    page.get_by_text("quantize", exact=True).first.click()
    page.wait_for_url("**/deployments/deployment/**")
    shot(page, "1-deployment")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.wait_for_url("**/deployment/*/run?**")
    page.get_by_text("Run Name", exact=True).wait_for()

    run_name = f"from-the-ui-{uuid.uuid4().hex[:6]}"
    page.locator("input[type=text], input:not([type])").first.fill(run_name)  # Run Name
    field(page, "Recipe (Optional)").locator("button.p-select-button__control").focus()
    page.keyboard.press("ArrowDown")  # opens the list of shipped recipes
    page.get_by_role("option", name="rtn-w4g64", exact=True).click()
    fill(page, "Calib Data (Optional)", str(WIKI_VALID))
    fill(page, "Eval Data (Optional)", str(WIKI_TEST))
    fill(page, "Eval Windows (Optional)", "1", kind="int")
    fill(page, "Out Dir (Optional)", str(tmp_path / "from-the-ui"))
    shot(page, "2-form")
    page.get_by_role("button", name="Submit", exact=True).click()
    page.wait_for_url("**/deployments/deployment/**tab=Runs**")
    (flow_run,) = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name]))
    )
    flow_run_id = str(flow_run.id)
    assert flow_run.parameters["job"]["recipe"] == "rtn-w4g64"  # what the form said
    page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
    page.get_by_text(run_name).first.wait_for()

    deadline = time.monotonic() + 600
    while not page.get_by_text("Completed", exact=True).first.is_visible():
        assert not page.get_by_text("Failed", exact=True).first.is_visible(), "the run failed"
        assert time.monotonic() < deadline, "the run did not complete in 10 minutes"
        page.wait_for_timeout(5000)
        page.reload()
    shot(page, "3-completed")
    assert (tmp_path / "from-the-ui" / "quantmill_eval.json").is_file()

    mlflow_url = stack["env"]["MLFLOW_TRACKING_URI"]
    client = MlflowClient(mlflow_url)
    exp = client.get_experiment_by_name("quantmill")
    (run,) = client.search_runs(
        [exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    assert run.data.params["recipe.steps.0.method"] == "rtn"
    page.goto(f"{mlflow_url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}")
    page.get_by_text("rtn-w4g64").first.wait_for()
    page.get_by_text("perplexity", exact=True).first.wait_for()
    shot(page, "4-mlflow-run")
