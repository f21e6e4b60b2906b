"""The page at `/` in a real headless browser (Debian's chromium + chromium-driver, Selenium):
upload a PNG and a DICOM, see the label, the status and the heatmap appear, see the history rows;
see DICOM series appear with their slice ribbon, status and counts; the page fits a phone screen.
Screenshots go to artifacts/browser/ (ignored) to be looked at.

Skips with the reason when chromium is not installed here; `tools/setup_system.sh` installs it
and CI runs that before the tests.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ct_edge.classifier import Classifier
from ct_edge.server import ServerConfig, Service, create_server
from ct_edge.store import Store
from tools import chromium

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SCREENSHOTS = ROOT / "artifacts" / "browser"

pytestmark = pytest.mark.skipif(
    not chromium.available(),
    reason="chromium and chromium-driver are not installed (bash tools/setup_system.sh installs "
           "them; CI does)")


@contextlib.contextmanager
def serving(bundle: Path, data_dir: Path, token: str | None = None) -> Iterator[str]:
    store = Store(data_dir)
    service = Service(Classifier.from_bundle(bundle), store)
    server = create_server(ServerConfig(port=0, token=token), service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.stop()
        thread.join(10)
        store.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    pytest.importorskip("selenium.webdriver")
    driver = chromium.start(tmp_path / "chromium-profile", 1100, 1400)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: object, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_upload_png_and_dicom_shows_answers_heatmap_and_history(
        browser, tiny_bundle: Path, synthetic_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from selenium.webdriver.common.by import By

    png = tmp_path / "chest-normal.png"
    shutil.copy(sorted((synthetic_root / "test" / "Normal").glob("*.png"))[0], png)
    dicom = FIXTURES / "ct_small.dcm"
    with serving(tiny_bundle, tmp_path / "data") as url:
        browser.get(url + "/")
        assert "not a diagnostic device" in browser.find_element(By.TAG_NAME, "header").text
        wait_for(browser, lambda d: "classes:" in d.find_element(By.ID, "model").text)
        upload = browser.find_element(By.ID, "files")
        # The picker is reachable by keyboard: a real, focusable input with a visible label.
        assert upload.is_enabled()
        assert browser.find_element(By.CSS_SELECTOR, "label[for=files]").is_displayed()
        upload.send_keys(f"{png}\n{dicom}")
        cards = wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == 2
                         and d.find_elements(By.CSS_SELECTOR, ".card"))
        by_name = {card.find_element(By.TAG_NAME, "h3").text: card for card in cards}
        assert set(by_name) == {png.name, dicom.name}
        for card in cards:
            status = card.find_element(By.CSS_SELECTOR, ".status")
            assert status.text.split("\n")[0] in (
                "OK: answered from inside the model's domain",
                "UNCERTAIN: the model is not confident; do not rely on this label",
                "OUT OF DOMAIN: no label; this image is outside what the model knows")
            assert card.get_attribute("data-status") in ("ok", "uncertain", "out_of_domain")
        scan = by_name[png.name]
        assert scan.get_attribute("data-status") in ("ok", "uncertain"), scan.text
        assert scan.find_element(By.CSS_SELECTOR, ".label").text.split(" ")[0] in (
            "COVID-19", "Normal", "Viral")
        assert len(scan.find_elements(By.CSS_SELECTOR, ".bars li")) == 3
        image = wait_for(browser, lambda d: scan.find_elements(By.CSS_SELECTOR, ".heatmap img"))[0]
        wait_for(browser, lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", image) == 256)
        rows = wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR,
                                                               "#history tbody tr")) == 2
                        and d.find_elements(By.CSS_SELECTOR, "#history tbody tr"))
        assert {row.find_elements(By.TAG_NAME, "td")[2].text for row in rows} == {
            png.name, dicom.name}
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "serve_desktop.png"))

        browser.set_window_size(390, 844)  # a phone
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"the page is {overflow} px wider than a phone screen"
        browser.save_screenshot(str(SCREENSHOTS / "serve_phone.png"))
    assert (SCREENSHOTS / "serve_desktop.png").stat().st_size > 10_000


def test_page_asks_for_the_token_and_then_works(browser, tiny_bundle: Path,
                                                 tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    with serving(tiny_bundle, tmp_path / "data", token="browser-token-123") as url:
        browser.get(url + "/")
        field = wait_for(browser, lambda d: d.find_element(By.ID, "token").is_displayed()
                         and d.find_element(By.ID, "token"))
        field.send_keys("browser-token-123")
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        wait_for(browser, lambda d: "classes:" in d.find_element(By.ID, "model").text)
        assert not browser.find_element(By.ID, "token-section").is_displayed()


def add_series(store: Store, series_uid: str, slices: list[dict | None]) -> int:
    """What `ct-edge listen` records, through the store API: one instance per item, classified
    with the result dict (None: still waiting); the series id."""
    for n, result in enumerate(slices):
        instance_id = store.add_dicom_instance(
            sop_instance_uid=f"{series_uid}.{n + 1}", study_uid="1.2.826.0.1.3680043.2.7",
            series_uid=series_uid, spool_path=f"spool/{n}.dcm", nbytes=1000, modality="CT",
            patient_id="PATIENT-42", description="CHEST 1mm", instance_number=n + 1,
            slice_location=-5.0 * n)
        if result is not None:
            store.add_dicom_result(instance_id, source=f"dicom {series_uid}.{n + 1}", **result)
    return store.get_dicom_series(series_uid=series_uid)["id"]


def test_series_appear_with_ribbon_status_and_counts(browser, tiny_bundle: Path,
                                                     tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    normal = {"status": "ok", "label": "Normal",
              "probabilities": {"COVID-19": 0.05, "Normal": 0.9, "Viral Pneumonia": 0.05}}
    covid = {"status": "ok", "label": "COVID-19",
             "probabilities": {"COVID-19": 0.8, "Normal": 0.1, "Viral Pneumonia": 0.1}}
    unsure = {"status": "uncertain", "label": "COVID-19", "reason": "confidence below 0.70",
              "probabilities": {"COVID-19": 0.5, "Normal": 0.3, "Viral Pneumonia": 0.2}}
    outside = {"status": "out_of_domain", "reason": "unlike the training images (score 8.1 > 3.2)"}
    unreadable = {"status": None, "error": "pixel data cannot be decoded"}
    data_dir = tmp_path / "data"
    with serving(tiny_bundle, data_dir) as url, Store(data_dir) as listener:
        receiving = add_series(listener, "1.2.826.0.1.3680043.2.7.1001",
                               [normal] * 6 + [covid] * 3 + [None] * 3)
        browser.get(url + "/")
        card = wait_for(browser, lambda d: d.find_elements(
            By.CSS_SELECTOR, f'.series[data-series-id="{receiving}"]'))[0]
        assert card.get_attribute("data-state") == "receiving"
        assert card.find_element(By.CSS_SELECTOR, ".status").text.startswith("RECEIVING")
        assert "12 slices" in card.text and "9 classified" in card.text and "3 waiting" in card.text
        assert "PATIENT-42" not in browser.find_element(By.TAG_NAME, "body").text
        # A series the node completes while the page is open appears without a reload.
        done = add_series(listener, "1.2.826.0.1.3680043.2.7.2002",
                          [normal] * 20 + [unsure] * 8 + [covid] * 10 + [outside] * 3 + [unreadable])
        listener.complete_dicom_series(
            done, status="uncertain", label="COVID-19", reason="confidence 0.52 below 0.70",
            probabilities={"COVID-19": 0.52, "Normal": 0.4, "Viral Pneumonia": 0.08},
            aggregate="topk-mean", counts={"slices": 42})
        card = wait_for(browser, lambda d: d.find_elements(
            By.CSS_SELECTOR, f'.series[data-series-id="{done}"]'), timeout=30)[0]
        status = card.find_element(By.CSS_SELECTOR, ".status")
        assert status.text.startswith("UNCERTAIN") and status.get_attribute("role") == "alert"
        assert card.find_element(By.CSS_SELECTOR, ".label").text == "Series: COVID-19 52.0%"
        counts = card.find_element(By.CSS_SELECTOR, ".counts").text
        assert counts == ("42 slices · 38 classified (8 uncertain) · 3 out of domain · "
                          "1 unreadable")
        cells = card.find_elements(By.CSS_SELECTOR, ".ribbon .cell")
        assert [c.get_attribute("data-status") for c in cells] == (
            ["ok"] * 20 + ["uncertain"] * 8 + ["ok"] * 10 + ["out_of_domain"] * 3 + ["error"])
        assert cells[20].get_attribute("aria-label").endswith(", uncertain")
        # Keyboard: one Tab stop, arrow keys walk the slices and the result is read out.
        assert [c.get_attribute("tabindex") for c in cells].count("0") == 1
        cells[0].click()
        for _ in range(40):
            browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
        active = browser.switch_to.active_element
        assert active.get_attribute("data-index") == "40"
        card = browser.find_element(By.CSS_SELECTOR, f'.series[data-series-id="{done}"]')
        detail = card.find_element(By.CSS_SELECTOR, ".slice-detail").text
        assert detail.startswith("Slice 41 of 42") and "out of domain" in detail
        browser.execute_script("arguments[0].scrollIntoView()", card)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "series_desktop.png"))
        section = browser.find_element(By.ID, "series-title").find_element(By.XPATH, "..")
        section.screenshot(str(SCREENSHOTS / "series_section.png"))

        browser.set_window_size(390, 844)
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"the page is {overflow} px wider than a phone screen"
        browser.execute_script("arguments[0].scrollIntoView()",
                               browser.find_element(By.ID, "series-title"))
        browser.save_screenshot(str(SCREENSHOTS / "series_phone.png"))


def test_the_page_screenshot_tool_shows_every_upload(tiny_bundle: Path, synthetic_root: Path,
                                                      tmp_path: Path) -> None:
    from PIL import Image

    from tools.page_screenshot import screenshot

    scans = [sorted((synthetic_root / "test" / label).glob("*.png"))[0]
             for label in ("COVID-19", "Normal")]
    out = screenshot(tiny_bundle, [*scans, FIXTURES / "ct_small.dcm"], tmp_path / "page.png",
                     width=640, height=800)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] == 640 and 600 <= image.size[1] <= 800
        assert len(set(image.convert("L").getdata())) > 32  # a rendered page, not a blank one


def test_the_page_warns_when_its_artifact_missed_parity(browser, tiny_bundle: Path,
                                                        tmp_path: Path) -> None:
    """serve warned on stderr only; whoever looks at the page must see it too."""
    from bundle_helpers import set_default_status
    from selenium.webdriver.common.by import By

    failed = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    name = set_default_status(failed)
    for bundle, warned in ((tiny_bundle, False), (failed, True)):
        with serving(bundle, tmp_path / f"data-{warned}") as url:
            browser.get(url + "/")
            wait_for(browser, lambda d: "classes:" in d.find_element(By.ID, "model").text)
            warning = browser.find_element(By.ID, "parity-warning")
            assert warning.is_displayed() == warned
            if warned:
                assert warning.text == (f"Warning: artifact {name!r} has parity status "
                                        "'failed'; its answers may differ from the reference model")
            # The history marks a stored answer of that artifact, as `ct-edge results` does.
            browser.find_element(By.ID, "files").send_keys(str(FIXTURES / "gray8.png"))
            (row,) = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR,
                                                                 "#history tbody tr"))
            marks = row.find_elements(By.CSS_SELECTOR, ".parity-mark")
            assert len(marks) == warned
            if warned:
                assert marks[0].text == "*" and marks[0].get_attribute("title") == (
                    f"artifact {name!r} has parity status 'failed'; its answers may differ from "
                    "the reference model")
