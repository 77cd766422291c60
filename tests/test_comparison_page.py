"""The comparison page at `/`, in a real headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by Selenium, against a real server: every model listed, a photo through every model (one
`/compare` per photo) with the same top-1 as `/predict`, live charts with data, nothing loaded
from elsewhere, no console errors, usable at phone width and with 40 models, and the API key asked
for once.

The screenshots are saved under `test-artifacts/` (ignored by git) for a person to look at.
"""
import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from contract import METADATA_FILE
from tests.service_fixtures import ready_server, required_tool

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
PAGE_BUDGET_BYTES = 300_000
WAIT_S = 60


@pytest.fixture(scope="module")
def server(served):
    return served()


@pytest.fixture(scope="module")
def listed(server) -> list[dict]:
    return httpx.get(f"{server.url}/models").json()["models"]


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = required_tool("chromium", "chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--disable-background-networking", "--disable-component-update", "--no-first-run",
                     "--disable-sync", "--disable-extensions",
                     # Any name the page asked for would fail to resolve, and show in the log below.
                     "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = ChromeService(executable_path=required_tool("chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_until(driver, condition, what: str, timeout: float = WAIT_S):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"the page did not show {what} within {timeout} s") from None


def open_page(driver, server, models: int) -> None:
    driver.get(f"{server.url}/")
    wait_until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models tbody tr[data-model]")) == models,
               f"{models} model rows")


def upload(driver, photo: Path, models: int) -> dict[str, dict]:
    """Send a photo through the page; each model's card, once every card is done."""
    driver.find_element(By.ID, "file").send_keys(str(photo))
    done = "#results .card[data-done='true']"
    wait_until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) == models and d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete)"),
        f"a result for each of the {models} models")
    return {card.get_attribute("data-model"): card for card in driver.find_elements(By.CSS_SELECTOR, done)}


def screenshot(driver, name: str) -> Path:
    """The whole page: the window is made as tall as the page first."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()["width"], min(height + 140, 8000))
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_the_page_lists_every_model_with_its_facts(browser, server, listed):
    open_page(browser, server, len(listed))
    for model in listed:
        row = browser.find_element(By.CSS_SELECTOR, f"#models tr[data-model='{model['name']}']")
        text = row.text
        assert model["metadata"]["architecture"] in text
        assert "ready" in text and "FP32" in text
        assert model["preprocessing"] in text  # what the weights were trained with, as /models says it
        crop = model["metadata"]["preprocessing"]["crop"]
        assert f"{crop}×{crop}" in text  # noqa: RUF001 (the page writes a multiplication sign)
        if model["metadata"]["weights"]["kind"] == "random":
            assert "random weights" in text.lower() and "meaningless" in text, text


def test_a_photo_through_the_page_gets_each_models_top1_from_predict(browser, server, listed, photos):
    open_page(browser, server, len(listed))
    cards = upload(browser, photos["chelsea"], len(listed))
    for model in listed:
        expected = httpx.post(f"{server.url}/predict/{model['name']}",
                              files={"file": photos["chelsea"].read_bytes()}).json()["predictions"][0]
        card = cards[model["name"]]
        top1 = card.find_element(By.CSS_SELECTOR, "li.top1")
        assert int(top1.get_attribute("data-class-id")) == expected["class_id"], model["name"]
        assert expected["label"] in top1.text
        assert len(card.find_elements(By.CSS_SELECTOR, "li")) == 5
        stages = [s.get_attribute("data-stage") for s in card.find_elements(By.CSS_SELECTOR, ".timings span")]
        assert stages == ["decode", "preprocess", "queue", "inference", "total"]
        # The thumbnail is what the model saw: its crop, not the photo.
        seen = card.find_element(By.CSS_SELECTOR, ".seen img")
        size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", seen)
        crop = model["metadata"]["preprocessing"]["crop"]
        assert size == [crop, crop], model["name"]


def test_the_page_sends_one_compare_per_photo_running_the_models_one_after_another(browser, server, listed,
                                                                                  photos):
    open_page(browser, server, len(listed))
    for photo in ("chelsea", "coffee"):
        upload(browser, photos[photo], len(listed))
        wait_until(browser, lambda d, photo=photo: photo in d.find_element(By.ID, "photo-caption").text
                   and len(d.find_elements(By.CSS_SELECTOR, "#results .card[data-done='true']")) == len(listed),
                   f"every model's answer about {photo}")
    paths = [urlsplit(u) for u in requested_urls(browser)]
    compares = [u for u in paths if u.path == "/compare"]
    assert len(compares) == 2, compares
    assert all("sequential=true" in u.query and "input_image=true" in u.query for u in compares)
    assert not [u for u in paths if u.path.startswith("/predict/")]


def test_after_traffic_the_charts_have_data_and_nothing_left_loopback(browser, server, listed, photos):
    open_page(browser, server, len(listed))
    upload(browser, photos["coffee"], len(listed))
    names = sorted(m["name"] for m in listed)

    def charted(d):
        return d.execute_script("""
            const c = window.cnnServe.charts;
            if (!c.time || !c.macs) return null;
            return {time: c.time.series.slice(1).map(
                        (s, i) => [s.label, c.time.data[i + 1].filter(v => v !== null).length]),
                    macs: c.macs.data[0].length,
                    rows: document.querySelectorAll('#latency tbody tr[data-model]').length};
        """)

    wait_until(browser, lambda d: (c := charted(d)) and c["macs"] == len(names) and c["rows"] == len(names)
               and all(n > 0 for _, n in c["time"]), "charts with a point per model")
    chart = charted(browser)
    assert [label for label, _ in chart["time"]] == names
    screenshot(browser, "comparison-page.png")

    urls = requested_urls(browser)
    assert any(u.endswith("/static/page.js") for u in urls)  # the log really holds the page's requests
    outside = [u for u in urls if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).hostname != "127.0.0.1"]
    assert outside == []
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def test_the_page_is_small_and_renders_fast(browser, server, listed):
    open_page(browser, server, len(listed))
    weight, first_paint = browser.execute_script("""
        const own = performance.getEntriesByType('resource').filter(e => e.initiatorType !== 'fetch');
        const page = performance.getEntriesByType('navigation')[0];
        const paint = performance.getEntriesByName('first-contentful-paint')[0];
        return [[page, ...own].reduce((sum, e) => sum + e.encodedBodySize, 0), paint ? paint.startTime : null];
    """)
    print(f"page weight {weight} bytes, first contentful paint {first_paint:.0f} ms")
    assert 50_000 < weight < PAGE_BUDGET_BYTES  # uPlot alone is about 51 KB: the sum is real
    assert first_paint is not None


@pytest.mark.parametrize("width", [390, 1400])
def test_no_horizontal_scroll_at_phone_or_desktop_width(browser, server, listed, photos, width):
    browser.set_window_size(width, 900)
    open_page(browser, server, len(listed))
    upload(browser, photos["chelsea"], len(listed))
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    if width < 500:
        screenshot(browser, "comparison-page-phone.png")


def test_the_services_error_message_is_shown_for_a_file_it_refuses(browser, server, listed, tmp_path):
    fake = tmp_path / "not-a-photo.png"
    fake.write_bytes(b"these bytes are not an image")
    open_page(browser, server, len(listed))
    cards = upload(browser, fake, len(listed))
    expected = httpx.post(f"{server.url}/predict/{listed[0]['name']}", files={"file": fake.read_bytes()}).json()
    for card in cards.values():
        error = card.find_element(By.CSS_SELECTOR, ".error").text
        assert expected["error"] in error and expected["code"] in error


@pytest.fixture(scope="module")
def keyed(served):
    return served(["effnet"], API_KEY="page-test-key")


def test_with_an_api_key_the_page_asks_once_then_predicts(browser, keyed, photos):
    open_page(browser, keyed, 1)
    browser.find_element(By.ID, "file").send_keys(str(photos["chelsea"]))
    dialog = browser.find_element(By.ID, "key-dialog")
    wait_until(browser, lambda d: dialog.is_displayed(), "the API key dialog")
    browser.find_element(By.ID, "key").send_keys("page-test-key")
    browser.find_element(By.ID, "key-use").click()
    wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card[data-done='true'] li.top1"),
               "a prediction after the key was given")
    browser.find_element(By.ID, "file").send_keys(str(photos["coffee"]))  # asked once only
    wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".card[data-done='true'] li.top1")
               and "coffee" in d.find_element(By.ID, "photo-caption").text, "a second prediction")
    assert not dialog.is_displayed()


def test_forty_models_fit_the_page_and_int8_shows_its_drift(browser, run_export, model_repository, tmp_path,
                                                             photos):
    repository = tmp_path / "forty"
    exported = run_export("--weights", "random", "--models", "effnet_int8", "--out", str(repository))
    assert exported.returncode == 0, exported.stderr
    for i in range(39):
        folder = repository / f"effnet_{i:02d}"
        shutil.copytree(model_repository / "effnet", folder)
        metadata = json.loads((folder / METADATA_FILE).read_text())
        (folder / METADATA_FILE).write_text(json.dumps({**metadata, "name": folder.name}))
    with ready_server(repository, tmp_path / "run") as many:
        browser.set_window_size(1280, 900)
        open_page(browser, many, 40)
        int8 = browser.find_element(By.CSS_SELECTOR, "#models tr[data-model='effnet_int8']").text
        assert "INT8: top-1 agrees" in int8 and "cosine" in int8
        upload(browser, photos["chelsea"], 40)
        assert browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth") <= 0
        screenshot(browser, "comparison-page-40-models.png")
