"""The web demo in a real browser: `python -m src.app` on `make tiny`'s world, driven by headless Chromium (Debian's
chromium + chromedriver, `make browser`; Selenium is pointed at /usr/bin/chromedriver, so nothing is downloaded).

Two people uploaded as aligned crops -> the gallery shows the generated image and the routing overlays show both
people's colours; a photo without a face -> the page says so and the app keeps serving. The page loads nothing
from outside this machine. A screenshot of the page after generation is written to the test's out/ folder (and
to $UNIPORTRAIT_SCREENSHOT when set: the README's copy, docs/img/app.png).

The app runs on random released-layout adapters written here (tests/web/helpers.py), not on runs/tiny: CI runs
the slow tests beside its training. UNIPORTRAIT_APP_ARGS replaces those weight options (e.g. `--checkpoint
runs/tiny/stage2/checkpoints/last.ckpt` after `make demo`, for the README's screenshot).
"""
from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from src.inference.io import PALETTE
from tests.web.helpers import blank_photo, released_weights

REPO = Path(__file__).resolve().parents[2]
TINY_ROOT = REPO / "artifacts" / "tiny"  # `make tiny`'s world, anchored at the checkout
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S, GENERATE_TIMEOUT_S = 300, 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                       reason=f"needs Debian's {CHROMIUM} and {CHROMEDRIVER}: run `make browser` (as root)"),
    pytest.mark.skipif(not (TINY_ROOT / "tiny_report.json").is_file(),
                       reason=f"needs the embedded default world at {TINY_ROOT}: run `make tiny`"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m src.app` on a free localhost port, run from the checkout (the default tiny world); its URL."""
    root = tmp_path_factory.mktemp("app")
    override = os.environ.get("UNIPORTRAIT_APP_ARGS")
    weights = shlex.split(override) if override else released_weights(TINY_ROOT, root / "released")
    port = free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(root / "gradio"), TMPDIR=str(root), OMP_NUM_THREADS="1")
    log = (root / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "src.app", "--port", str(port), "--device", "cpu", *weights],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited ({proc.returncode}):\n{(root / 'app.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the app did not answer within {START_TIMEOUT_S} s:\n{(root / 'app.log').read_text()}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(predicate, timeout: float, what: str, driver=None):
    """Poll `predicate()` until it returns something truthy; fail naming `what` (and the status line)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - elements re-render while gradio updates them
            value = None
        if value:
            return value
        time.sleep(0.5)
    status = status_text(driver) if driver is not None else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what} (status: {status!r})")


def status_text(driver) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, "status")
    return found[0].text if found else ""


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    wait_for(lambda: [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == name],
             30, f"the {name!r} tab", driver)[0].click()


def upload(driver, elem_id: str, files: list[Path]) -> None:
    from selenium.webdriver.common.by import By

    field = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} input[type=file]"), 30,
                     f"the file input of #{elem_id}", driver)[0]
    field.send_keys("\n".join(str(f) for f in files))


def gallery_images(driver, elem_id: str) -> list[np.ndarray]:
    """The images a gallery shows, fetched from the app as the browser fetched them."""
    from selenium.webdriver.common.by import By

    out = []
    for img in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img"):
        src = img.get_attribute("src")
        if src and src.startswith("http"):
            with urllib.request.urlopen(src, timeout=30) as r:
                out.append(np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")))
    return out


def palette_shares(overlay: np.ndarray, image: np.ndarray, alpha: float = 0.5) -> dict[int, float]:
    """Share of the pixels tinted with each identity colour: overlay = (1 - alpha) image + alpha colour, so
    colour = (overlay - (1 - alpha) image) / alpha, matched to the nearest palette colour (within 12 levels)."""
    colour = (overlay.astype(float) - (1 - alpha) * image.astype(float)) / alpha  # (H, W, 3)
    dist = np.linalg.norm(colour[:, :, None, :] - PALETTE[None, None].astype(float), axis=-1)  # (H, W, P)
    nearest, close = dist.argmin(-1), dist.min(-1) <= 12
    return {int(k): float(((nearest == k) & close).mean()) for k in np.unique(nearest[close])}


def page_requests(driver) -> set[str]:
    """Every URL the page requested (Chromium's performance log: Network.requestWillBeSent)."""
    urls = set()
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.add(msg["params"]["request"]["url"])
    return urls


def test_two_people_generate_in_the_browser_with_both_colours_routed(app: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(app)
    open_tab(browser, "Several people")
    people = [TINY_ROOT / "examples" / "person_a.png", TINY_ROOT / "examples" / "person_b.png"]
    upload(browser, "several-files", people)
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#several-preview img")) == 2, 60,
             "the preview of both uploads", browser)
    browser.find_element(By.ID, "several-generate").click()
    wait_for(lambda: "✓" in status_text(browser) or "⚠" in status_text(browser), GENERATE_TIMEOUT_S,
             "the generation", browser)
    assert "✓" in status_text(browser), status_text(browser)
    assert "of 2 people" in status_text(browser)
    images = wait_for(lambda: gallery_images(browser, "gallery"), 30, "the generated image", browser)
    overlays = wait_for(lambda: gallery_images(browser, "routing"), 30, "the routing maps", browser)
    assert len(images) == 1 and images[0].shape == (64, 64, 3)
    assert len(overlays) == 8  # all layers, then the tiny UNet's 7 cross-attention layers
    shares = palette_shares(overlays[0], images[0])  # the all-layers overlay of image 1
    assert set(shares) == {0, 1}, shares  # person 1's and person 2's colours, no other
    assert min(shares.values()) >= 0.05 and sum(shares.values()) >= 0.95, shares
    legend = browser.find_element(By.ID, "legend").text
    assert "person 1" in legend and "person 2" in legend

    outside = {u for u in page_requests(browser)
               if urlparse(u).scheme in ("http", "https", "ws", "wss") and not u.startswith(app.rstrip("/"))}
    assert not outside, f"the page fetched from outside the app: {sorted(outside)}"

    for _ in range(3):  # the whole page: grow the window until the page stops growing with it
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1400, min(height + 140, 2600))  # + the window's own frame
        time.sleep(1)
    shot = tmp_path / "out" / "app.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))
    if os.environ.get("UNIPORTRAIT_SCREENSHOT"):
        target = Path(os.environ["UNIPORTRAIT_SCREENSHOT"])
        target = target if target.is_absolute() else REPO / target
        shutil.copyfile(shot, target)


def test_a_photo_without_a_face_shows_a_message_and_the_app_keeps_serving(app: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(app)
    photos = wait_for(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, "#upload-kind label")
                               if e.text.startswith("photos")], 30, "the 'photos' upload kind", browser)
    photos[0].click()
    upload(browser, "single-files", [blank_photo(tmp_path / "empty_wall.png")])
    wait_for(lambda: "empty_wall.png: no face found" in status_text(browser), 60, "the preview's message", browser)
    browser.find_element(By.ID, "single-generate").click()
    wait_for(lambda: "Could not generate: empty_wall.png: no face found" in status_text(browser), 60,
             "the generation's message", browser)
    with urllib.request.urlopen(app, timeout=10) as r:  # still serving
        assert r.status == 200
