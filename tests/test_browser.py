"""The web page in headless Chromium (Debian's chromium + chromium-driver, Selenium).

Starts ``grmpiqa serve --backbone test-tiny --pretrained random`` on a free loopback
port, uploads two real images through the page's file input, waits for the scores,
checks them against the API, toggles the quality map, downloads the CSV and saves a
screenshot. Skips cleanly when chromium, chromedriver or selenium is absent.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import KODAK_ROOT, make_image

pytest.importorskip("httpx", reason="needs httpx (dev extra)")
pytest.importorskip("fastapi", reason="grmpiqa[serve] is not installed")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
_missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
if _missing:
    pytest.skip(
        f"headless browser test needs {', '.join(_missing)} "
        "(apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )
selenium = pytest.importorskip("selenium", reason="the browser test needs selenium (dev extra)")

import httpx  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve import Server, post_files  # noqa: E402

#: where ``GRMPIQA_SCREENSHOT=PATH`` copies the screenshot (docs/serve-page.png)
SCREENSHOT_ENV = "GRMPIQA_SCREENSHOT"


def two_images(tmp: Path) -> list[Path]:
    """Two real photographs (Kodak) when the shared data is there, else generated ones."""
    kodak = sorted(KODAK_ROOT.glob("*.png"))[:2] if KODAK_ROOT.is_dir() else []
    if len(kodak) == 2:
        return kodak
    return [
        make_image(tmp / "first.png", (320, 240), seed=1),
        make_image(tmp / "second.jpg", (240, 320), seed=2),
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("browser_log") / "server.log"
    srv = Server(["--backbone", "test-tiny", "--pretrained", "random"], log)
    yield srv
    srv.stop()


@pytest.fixture
def browser(tmp_path):
    profile = tempfile.mkdtemp(prefix="grmpiqa-chromium-")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        # a phone-sized viewport (GRMPIQA_SCREENSHOT_SIZE=W,H for the docs' screenshot)
        f"--window-size={os.environ.get('GRMPIQA_SCREENSHOT_SIZE', '412,915')}",
    ):
        opts.add_argument(flag)
    opts.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=ChromeService(CHROMEDRIVER), options=opts)
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_scores_two_images_toggles_maps_and_downloads_csv(server, browser, tmp_path):
    images = two_images(tmp_path)
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "test-tiny" in d.find_element(By.ID, "model").text)
    warning = browser.find_element(By.ID, "random-warning")
    assert warning.is_displayed() and "RANDOM" in warning.text  # random weights announced
    # accessible controls: labelled file input, labelled checkbox, keyboard-focusable drop
    assert browser.find_element(By.CSS_SELECTOR, "label[for=file]").text == "Choose images"
    assert browser.find_element(By.CSS_SELECTOR, "label[for=show-maps]").text
    assert browser.find_element(By.ID, "drop").get_attribute("tabindex") == "0"

    browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in images))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.result[data-score]")) == 2)
    cards = browser.find_elements(By.CSS_SELECTOR, "li.result")
    shown = {c.get_attribute("data-name"): float(c.get_attribute("data-score")) for c in cards}
    assert set(shown) == {p.name for p in images}
    names = [c.get_attribute("data-name") for c in cards]
    order = [float(c.get_attribute("data-score")) for c in cards]
    assert order == sorted(order, reverse=True)  # best first
    # the page shows what the API answers for the same files
    api = post_files(server.url, images).json()["results"]
    for r in api:
        assert shown[r["name"]] == pytest.approx(r["score"], abs=1e-9)
    for c in cards:
        assert c.find_element(By.CSS_SELECTOR, "img").get_attribute("alt")
        assert c.find_element(By.CSS_SELECTOR, ".score").text.startswith("score 0.")
    # no horizontal scrolling on a phone-sized viewport
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1"
    )

    canvases = browser.find_elements(By.CSS_SELECTOR, "canvas.map")
    assert len(canvases) == 2 and not any(c.is_displayed() for c in canvases)
    browser.find_element(By.ID, "show-maps").click()
    canvases = browser.find_elements(By.CSS_SELECTOR, "canvas.map")
    assert all(c.is_displayed() for c in canvases)
    assert browser.find_element(By.ID, "legend").is_displayed()
    assert canvases[0].get_attribute("width") == "7"  # the 7x7 grid of test-tiny
    # the overlay is painted: not all pixels equal
    distinct = browser.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, "
        "c.height).data; const s = new Set(); for (let i = 0; i < d.length; i += 4) "
        "s.add(d[i] + ',' + d[i+1] + ',' + d[i+2]); return s.size;",
        canvases[0],
    )
    assert distinct > 1

    shot = tmp_path / "page.png"
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])

    browser.find_element(By.ID, "csv").click()
    target = browser.downloads / "grmpiqa-scores.csv"
    deadline = time.monotonic() + 30
    while not target.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    with open(target) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == names
    for r in rows:
        assert float(r["score"]) == pytest.approx(shown[r["name"]], abs=1e-6)
        assert float(r["map_mean"]) > 0

    browser.find_element(By.ID, "show-maps").click()
    assert not any(c.is_displayed() for c in browser.find_elements(By.CSS_SELECTOR, "canvas.map"))
    assert httpx.get(server.url + "/v1/health").json()["status"] == "ok"


def test_bad_file_is_reported_on_the_page(server, browser, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: "test-tiny" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "li.result.failed"))
    card = browser.find_element(By.CSS_SELECTOR, "li.result.failed")
    assert "notes.txt: not an image file" in card.find_element(By.CSS_SELECTOR, ".error").text
    assert "1 could not be read" in browser.find_element(By.ID, "status").text
