"""The live-captions page at ``/``, in a real headless browser: Debian's ``chromium``, driven
by selenium through Debian's ``chromium-driver`` (nothing downloaded), against a real
uvicorn serving the tiny checkpoint with ``--api-key``.

Chromium's fake capture device plays a speech file as the microphone (looping it, resampled
to the device's rate by Chromium), so what the page sends is not the file: the microphone
test compares the captions with offline ``transcribe`` of exactly the 16 kHz samples the
server's live job received (recorded by wrapping ``Job.append``). The file picker streams
a 16 kHz file sample for sample, so that test compares with offline ``transcribe`` of the
file itself, and its SRT/VTT downloads with ``mlx-voxtral transcribe --format srt|vtt``.

The file and dual-delay tests save screenshots in their tmp folders; README's
``docs/page.png`` (the dual-delay one) is written only when it is missing or
``MLX_VOXTRAL_SCREENSHOT=1``, so that a test run leaves the checkout as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

import mlx_voxtral  # noqa: E402
from mlx_voxtral.server import engine as engine_module  # noqa: E402
from mlx_voxtral.server.app import create_app  # noqa: E402
from mlx_voxtral.writers import render  # noqa: E402

from serving import Served  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]
API_KEY = "page-key_1.0~"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1100,900", "--autoplay-policy=no-user-gesture-required"]

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install chromium chromium-driver", allow_module_level=True)


def browser(profile: Path, downloads: Path, *flags: str):
    """A headless Chromium with a fresh profile; downloads land in ``downloads``."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, *flags, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver's path given: selenium skips Selenium Manager, which would fetch one
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def wait_for(driver, condition, timeout: float = 30.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutException(f"timed out waiting for {what}; status: {text(driver, '#status')!r}, "
                                   f"message: {text(driver, '#message')!r}, log: {driver.get_log('browser')}")
        time.sleep(0.05)


def text(driver, selector: str) -> str:
    return driver.execute_script("return document.querySelector(arguments[0]).textContent", selector)


def captions(driver) -> list[str]:
    """The final text of each turn the page shows."""
    return driver.execute_script("return [...document.querySelectorAll('#captions .turn .final')]"
                                 ".map(e => e.textContent)")


def open_page(driver, served, key: str = API_KEY) -> None:
    driver.get(served.url + "/")
    wait_for(driver, lambda: text(driver, "#status").startswith("Ready"), 15, "the page to load")
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)


# WCAG's contrast ratio of an element's text on the background it is painted over
CONTRAST = """
const lum = (c) => {
  const [r, g, b] = c.match(/[\\d.]+/g).slice(0, 3).map(Number).map((v) => v / 255)
    .map((v) => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};
const opaque = (c) => !/rgba\\(.*,\\s*0\\)$/.test(c) && c !== "transparent";
return [...document.querySelectorAll(arguments[0])].map((el) => {
  let bg = el;
  while (bg && !opaque(getComputedStyle(bg).backgroundColor)) bg = bg.parentElement;
  const [a, b] = [lum(getComputedStyle(el).color), lum(bg ? getComputedStyle(bg).backgroundColor : "rgb(255,255,255)")];
  return [el.id || el.className || el.tagName, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
});
"""


def contrast(driver, selector: str) -> dict:
    return dict(driver.execute_script(CONTRAST, selector))


def severe(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def clips(speech_5s, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("page_audio")
    a16 = folder / "speech_16k.wav"
    subprocess.run(["sox", str(speech_5s), "-r", "16000", "-c", "1", "-b", "16", str(a16)], check=True,
                   capture_output=True)
    return {"a16": a16, "mic": speech_5s}


@pytest.fixture(scope="module")
def offline(model_fp32, clips):
    """Offline results, before any server thread touches the model."""
    return mlx_voxtral.transcribe(model_fp32, clips["a16"])


@pytest.fixture(scope="module")
def server(model_fp32, offline):
    served = Served(create_app(model_fp32, model_name="default", api_key=API_KEY))
    yield served
    served.close()


@pytest.fixture(scope="module")
def received(offline):
    """The 16 kHz audio each live job was given: ``id(job) -> (job, [chunks])``, the job kept
    so that its id is never reused (``Job.append`` wrapped)."""
    jobs: dict = {}
    real = engine_module.Job.append

    def recording(self, samples):
        jobs.setdefault(id(self), (self, []))[1].append(np.asarray(samples, np.float32).reshape(-1).copy())
        return real(self, samples)

    engine_module.Job.append = recording
    yield jobs
    engine_module.Job.append = real


@pytest.fixture(scope="module")
def chrome(tmp_path_factory, clips):
    """The browser for the captions tests: the microphone is the fake device playing speech."""
    folder = tmp_path_factory.mktemp("chrome")
    downloads = folder / "downloads"
    downloads.mkdir()
    driver = browser(folder / "profile", downloads, "--use-fake-ui-for-media-stream",
                     "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={clips['mic']}")
    driver.downloads = downloads
    yield driver
    driver.quit()


def screenshot(driver, path: Path, readme: bool = False) -> None:
    """A PNG of the page at ``path``; with ``readme``, also README's ``docs/page.png`` when
    that is missing or ``MLX_VOXTRAL_SCREENSHOT=1``."""
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    docs = ROOT / "docs" / "page.png"
    if readme and (os.environ.get("MLX_VOXTRAL_SCREENSHOT") == "1" or not docs.exists()):
        docs.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, docs)


def download(driver, button: str, name: str) -> str:
    target = driver.downloads / name
    target.unlink(missing_ok=True)
    driver.find_element(By.ID, button).click()
    wait_for(driver, lambda: target.exists() and target.stat().st_size > 0, 10, f"{name} to download")
    return target.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
def test_page_is_served_without_a_key(server):
    page = server.http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp  # nothing from elsewhere
    for asset, kind in (("page.js", "javascript"), ("subtitles.js", "javascript"),
                        ("pcm16-worklet.js", "javascript"), ("page.css", "text/css")):
        r = server.http.get(f"/static/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
        assert "http://" not in r.text and "https://" not in r.text, asset  # no CDN, no fonts
    assert "http" not in page.text.replace("http-equiv", "")
    assert server.http.get("/static/nope.js").status_code == 404
    assert server.http.get("/v1/models").status_code == 401  # the API still needs the key


def test_file_captions_equal_offline(chrome, server, offline, clips, tmp_path):
    """The file picker streams the 16 kHz file at real-time pace: the captions, their word
    times and the SRT/VTT downloads equal offline transcription of the file."""
    driver = chrome
    open_page(driver, server)
    driver.get_log("browser")
    started = time.monotonic()
    driver.find_element(By.ID, "file").send_keys(str(clips["a16"]))
    wait_for(driver, lambda: "done" in text(driver, "#status"), 60, "the file's captions")
    took = time.monotonic() - started
    assert took >= offline.audio_duration - 0.2, took  # streamed at real time, not all at once
    assert text(driver, "#message") == ""
    assert captions(driver) == [offline.text]
    assert offline.words, "the tiny checkpoint says no words here: nothing to time"
    spans = driver.find_elements(By.CSS_SELECTOR, "#captions .word")
    shown = [(s.text, float(s.get_attribute("data-start")), float(s.get_attribute("data-end"))) for s in spans]
    assert shown == [(w.text, round(w.start, 2), round(w.end, 2)) for w in offline.words if w.text.strip()]

    # word times on hover, and from the keyboard
    ActionChains(driver).move_to_element(spans[0]).perform()
    assert text(driver, "#word-time") == f"“{offline.words[0].text}”: {offline.words[0].start:.2f}–" \
                                         f"{offline.words[0].end:.2f} s"
    driver.find_element(By.ID, "captions").send_keys(Keys.END)
    last = offline.words[-1]
    assert driver.switch_to.active_element.text == last.text
    assert text(driver, "#word-time").startswith(f"“{last.text}”: {last.start:.2f}")

    assert download(driver, "srt", "captions.srt") == render(offline, "srt")
    assert download(driver, "vtt", "captions.vtt") == render(offline, "vtt")
    assert severe(driver) == []  # no script error, nothing blocked by the page's policy

    # accessible: captions in a polite live region, readable contrast everywhere
    assert driver.find_element(By.ID, "captions").get_attribute("aria-live") == "polite"
    ratios = contrast(driver, "h1, h2, label, .quiet, #status, #captions .final, button:enabled, select:enabled")
    assert len(ratios) > 10 and min(ratios.values()) >= 4.5, ratios

    ActionChains(driver).move_to_element(spans[len(spans) // 2]).perform()
    screenshot(driver, tmp_path / "page.png")

    driver.find_element(By.ID, "clear").send_keys(Keys.ENTER)
    assert captions(driver) == [] and not driver.find_element(By.ID, "srt").is_enabled()


WATCH_PROVISIONAL = """
window.provisionalSeen = [];
new MutationObserver(() => {
  for (const el of document.querySelectorAll("#captions .provisional")) {
    if (el.textContent) window.provisionalSeen.push([el.textContent, getComputedStyle(el).fontStyle,
                                                     getComputedStyle(el).color]);
  }
}).observe(document.getElementById("captions"), {subtree: true, childList: true, characterData: true});
"""


def test_dual_delay_shows_provisional_text(chrome, server, offline, clips, tmp_path):
    """Dual delay on (the keyboard alone): fast text shows in its own style after the final
    text while the file streams; at the end it is gone and the final text is the offline
    text at the (final) delay."""
    driver = chrome
    open_page(driver, server)
    dual = driver.find_element(By.ID, "dual")
    dual.send_keys(Keys.SPACE)
    assert dual.is_selected() and driver.find_element(By.ID, "provisional-delay").is_enabled()
    assert driver.find_element(By.ID, "delay").get_attribute("value") == str(offline.delay_ms)
    driver.execute_script(WATCH_PROVISIONAL)
    driver.find_element(By.ID, "file").send_keys(str(clips["a16"]))
    # README's picture: mid-stream, final and provisional text, a word's time on hover
    wait_for(driver, lambda: driver.execute_script(
        "return document.querySelectorAll('#captions .word').length >= 3"
        " && document.querySelector('#captions .provisional').textContent !== ''"), 30, "provisional text")
    ActionChains(driver).move_to_element(driver.find_elements(By.CSS_SELECTOR, "#captions .word")[1]).perform()
    screenshot(driver, tmp_path / "page-dual-delay.png", readme=True)
    wait_for(driver, lambda: "done" in text(driver, "#status"), 60, "the file's captions")
    assert text(driver, "#message") == ""
    assert captions(driver) == [offline.text]
    seen = driver.execute_script("return window.provisionalSeen")
    assert seen, "no provisional text was shown"
    final_color = driver.execute_script("return getComputedStyle(document.querySelector('#captions .final')).color")
    assert all(style == "italic" and color != final_color for _, style, color in seen)
    assert text(driver, "#captions .provisional") == ""
    assert driver.find_element(By.CSS_SELECTOR, "#captions .provisional").get_attribute("aria-hidden") == "true"
    assert min(contrast(driver, "#captions .provisional").values()) >= 4.5


def test_microphone_captions_equal_what_the_server_received(chrome, server, model_fp32, received):
    """Start and Stop from the keyboard; the captions equal offline transcription of the
    samples the server decoded (not of the file: the fake device loops and resamples it)."""
    driver = chrome
    open_page(driver, server)
    assert captions(driver) == []
    before = set(received)
    start = driver.find_element(By.ID, "start")
    start.send_keys(Keys.ENTER)
    wait_for(driver, lambda: "s sent" in text(driver, "#status"), 15, "the microphone")
    assert "Hz" in text(driver, "#status")
    time.sleep(2.5)
    driver.find_element(By.ID, "stop").send_keys(Keys.ENTER)
    wait_for(driver, lambda: "done" in text(driver, "#status"), 30, "the final captions")
    jobs = [chunks for j, (_, chunks) in received.items() if j not in before]
    assert len(jobs) == 1
    audio = np.concatenate(jobs[0])
    assert audio.shape[0] > 2 * 16000 and np.abs(audio).max() > 0.05  # speech, not silence
    want = mlx_voxtral.transcribe(model_fp32, audio).text
    assert captions(driver) == ([want] if want else [])
    assert text(driver, "#message") == ""


def test_wrong_key_is_said(chrome, server, clips):
    driver = chrome
    open_page(driver, server, key="not-the-key")
    driver.find_element(By.ID, "file").send_keys(str(clips["a16"]))
    wait_for(driver, lambda: text(driver, "#message"), 10, "the message")
    assert text(driver, "#message") == "The server did not accept this API key."
    assert min(contrast(driver, "#message").values()) >= 4.5
    open_page(driver, server, key="")
    driver.find_element(By.ID, "start").click()
    wait_for(driver, lambda: text(driver, "#message"), 10, "the message")
    assert "needs an API key" in text(driver, "#message")


def test_server_at_capacity_is_said(chrome, model_fp32, clips, offline):
    full = Served(create_app(model_fp32, model_name="default", max_live=0))
    try:
        open_page(chrome, full, key="")
        chrome.find_element(By.ID, "file").send_keys(str(clips["a16"]))
        wait_for(chrome, lambda: text(chrome, "#message"), 10, "the message")
        assert text(chrome, "#message") == ("The server is at capacity: all its live sessions are in use. "
                                            "Try again in a moment.")
        wait_for(chrome, lambda: not chrome.find_element(By.ID, "start").get_attribute("disabled"), 5, "Start")
    finally:
        full.close()


def test_denied_microphone_is_said(server, tmp_path, clips):
    driver = browser(tmp_path / "profile", tmp_path, "--use-fake-device-for-media-stream",
                     f"--use-file-for-fake-audio-capture={clips['mic']}")
    try:
        driver.execute_cdp_cmd("Browser.setPermission", {"permission": {"name": "microphone"},
                                                         "setting": "denied", "origin": server.url})
        open_page(driver, server)
        driver.find_element(By.ID, "start").click()
        wait_for(driver, lambda: text(driver, "#message"), 10, "the message")
        assert text(driver, "#message").startswith("Microphone access was denied.")
        assert driver.find_element(By.ID, "message").get_attribute("role") == "alert"
        assert not driver.find_element(By.ID, "start").get_attribute("disabled")  # try again
    finally:
        driver.quit()


def test_lost_connection_is_said(chrome, model_fp32, clips, offline):
    """The server goes away while the page streams: the page says so and keeps the captions."""
    doomed = Served(create_app(model_fp32, model_name="default"))
    try:
        open_page(chrome, doomed, key="")
        chrome.find_element(By.ID, "file").send_keys(str(clips["a16"]))
        wait_for(chrome, lambda: "s sent" in text(chrome, "#status"), 10, "the stream")
    finally:
        doomed.close()
    wait_for(chrome, lambda: text(chrome, "#message"), 10, "the message")
    assert text(chrome, "#message").startswith("Lost the connection to the server.")
    assert text(chrome, "#status") == "Disconnected."
    assert not chrome.find_element(By.ID, "start").get_attribute("disabled")
