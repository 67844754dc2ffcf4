"""The web app in a real browser: Playwright drives the system chromium against `python -m reward_forcing.serve`
on the tiny config (loopback only). ``REWARD_FORCING_SCREENSHOT=1`` also refreshes docs/images/app.png.

Without chromium or the playwright package these tests are skipped, saying why; CI sets
REWARD_FORCING_REQUIRE_BROWSER=1, which turns that skip into a failure so the browser tests always run there.
The page's state is read from ``window.app`` (frames shown, applied events, the last frame's tag).
"""
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from reward_forcing.video_io import read_video
from conftest import REPO_ROOT, free_port

SCREENSHOT = REPO_ROOT / "docs" / "images" / "app.png"
HEIGHT, WIDTH = 48, 80


def _chromium() -> str:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[browser]')")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        missing.append("a chromium binary (apt-get install chromium)")
    if missing:
        reason = "browser tests need " + " and ".join(missing)
        if os.environ.get("REWARD_FORCING_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}; REWARD_FORCING_REQUIRE_BROWSER=1 makes this a failure", pytrace=False)
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _chromium()
    port = free_port()
    records = tmp_path_factory.mktemp("recordings")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reward_forcing.serve", "--config_path", str(REPO_ROOT / "configs" / "tiny.yaml"),
         "--port", str(port), "--record_dir", str(records), f"video.height={HEIGHT}", f"video.width={WIDTH}"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the server did not answer within 60 s")
    yield url, records
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 900, "height": 760})
        page.goto(server[0])
        yield page
        browser.close()


def _app(page, expr):
    return page.evaluate(f"() => window.app.{expr}")


def _wait(page, condition, timeout=20_000):
    page.wait_for_function(f"() => {condition}", timeout=timeout)


def test_frames_arrive_and_are_drawn(page):
    _wait(page, "window.app.framesShown > 12")
    first = _app(page, "framesShown")
    pixels = page.evaluate("""() => {
        const c = document.getElementById('screen');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
    }""")
    rgb = np.array(pixels, np.uint8).reshape(HEIGHT, WIDTH, 4)[..., :3]
    assert rgb.std() > 5 and rgb.max() > 0  # drawn: random tiny weights paint noise, not a blank canvas
    page.wait_for_timeout(500)
    assert _app(page, "framesShown") > first  # the counter keeps rising
    assert "fps" in page.inner_text("#status") and "drops" in page.inner_text("#status")


def test_a_prompt_switch_takes_effect_at_a_later_block(page, tmp_path):
    _wait(page, "window.app.lastShown !== null")
    shown_before = _app(page, "lastShown.block")
    page.fill("#prompt", "a blue boat on a lake")
    page.select_option("#policy", "recache")
    page.fill("#blend", "2")
    page.click("#send-prompt")
    _wait(page, "window.app.applied.some(m => m.events.some(e => e.text === 'a blue boat on a lake'))")
    applied = page.evaluate("() => window.app.applied.find(m => m.events.some(e => e.text === "
                            "'a blue boat on a lake'))")
    assert applied["block"] > shown_before and applied["events"][0]["policy"] == "recache"
    _wait(page, f"window.app.lastShown.block >= {applied['block']}")
    assert "a blue boat on a lake" in page.inner_text("#log")
    # REWARD_FORCING_SCREENSHOT=1 refreshes the README's screenshot; otherwise it goes to a temporary folder
    path = SCREENSHOT if os.environ.get("REWARD_FORCING_SCREENSHOT") == "1" else tmp_path / "app.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reset_and_image_start(page, tmp_path):
    from PIL import Image

    page.click("#reset")
    _wait(page, "window.app.lastShown.epoch === 1")
    image = tmp_path / "start.png"
    Image.fromarray(np.full((90, 100, 3), 200, np.uint8)).save(image)
    page.set_input_files("#image", str(image))
    _wait(page, "window.app.lastShown.epoch === 2")
    resets = page.evaluate("() => window.app.applied.filter(m => m.events[0].kind === 'Reset')")
    assert [m["epoch"] for m in resets] == [1, 2] and resets[1]["events"][0]["image"] == "<image>"
    assert "center-cropped" in page.inner_text("#log")


def test_recording_has_the_streamed_frame_count(page, server, tmp_path):
    page.click("#record")
    _wait(page, "document.getElementById('record').classList.contains('on')")
    start = _app(page, "framesReceived")
    _wait(page, f"window.app.framesReceived >= {start + 36}")
    page.click("#record")
    _wait(page, "window.app.recording !== null && !document.getElementById('download').hidden")
    recording = _app(page, "recording")
    href = page.get_attribute("#download", "href")
    data = urllib.request.urlopen(server[0].rstrip("/") + href).read()
    (tmp_path / "rec.mp4").write_bytes(data)
    frames, fps = read_video(tmp_path / "rec.mp4")
    assert recording["frames"] >= 36 and frames.shape == (recording["frames"], HEIGHT, WIDTH, 3) and fps == 16
    assert [p.name for p in server[1].glob("recording-*.mp4")] == [href.split("/")[-1]]  # named by the server
