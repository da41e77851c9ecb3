"""The operator's page of ``patchcore-fast serve`` (issue #22) in a real headless Chromium:
upload an image, see the overlay beside the photo, the score, the verdict and the model's
summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from patchcore_fast.model import PatchCore
from patchcore_fast.serve import ServeOptions, create_app
from serving import ThreadServer

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser",
                             shutil.which("chromium") or "") if p and Path(p).exists()), None)
DRIVER = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "")
               if p and Path(p).exists()), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="Chromium and chromedriver not installed (apt-get install chromium "
           "chromium-driver; .ci/setup does it where apt is available)")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions",
                 "--disable-component-update", "--no-first-run", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(fit_demo):
    root, model_file = fit_demo("page", n_train=8, n_test_good=1, n_test_defect=2)
    model = PatchCore.load(model_file, device="cpu")
    files = sorted((root / "widget" / "test").rglob("*.png"))
    app = create_app(model, ServeOptions(model_name=model_file.name))
    with ThreadServer(app) as url:
        yield url, files


def test_upload_shows_overlay_score_and_verdict(browser, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, files = served
    browser.get(url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: "efficientnet_lite0" in d.find_element(By.ID, "model").text)
    summary = browser.find_element(By.ID, "model").text
    assert "threshold" in summary and "memory bank" in summary  # fit calibrates

    picked = files[-2:]
    browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in picked))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.done")) == 2)
    cards = browser.find_elements(By.CSS_SELECTOR, ".result.done")
    for card in cards:
        overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
        wait.until(lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", overlay))
        size = browser.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay)
        photo = card.find_element(By.CSS_SELECTOR, "img.photo")
        wait.until(ec.visibility_of(photo))
        assert browser.execute_script("return arguments[0].naturalWidth", photo) == size[0]
        verdict = card.find_element(By.CSS_SELECTOR, ".verdict").text
        assert verdict.startswith(("GOOD (normalised score", "DEFECTIVE (normalised score")), \
            verdict
        assert card.find_element(By.CSS_SELECTOR, ".score").text.startswith("score ")
    # The page shows each image's own answer: the scores the API gives for these files.
    shown = {c.find_element(By.CSS_SELECTOR, ".name").text: float(c.get_attribute("data-score"))
             for c in cards}
    verdicts = {c.find_element(By.CSS_SELECTOR, ".name").text:
                c.find_element(By.CSS_SELECTOR, ".verdict").text for c in cards}
    for f in picked:
        r = httpx.post(f"{url}/v1/predict", content=f.read_bytes(),
                       headers={"Content-Type": "image/png"}, timeout=120)
        assert shown[f.name] == pytest.approx(r.json()["score"], rel=1e-5)
        assert verdicts[f.name].startswith(r.json()["label"].upper())


def test_bad_file_shows_the_error(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = served
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    browser.get(url + "/")
    browser.find_element(By.ID, "files").send_keys(str(bad))
    WebDriverWait(browser, 120).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".result.failed"))
    text = browser.find_element(By.CSS_SELECTOR, ".result.failed .verdict").text
    assert text.startswith("error:") and "not an image" in text
