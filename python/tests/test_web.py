"""The web demo in a real browser: scripts/demo.sh (what `make demo` runs) starts the
TensorBridge server, PHP-FPM and nginx on a free port in a temp dir; headless Chromium
(selenium + chromium-driver) draws held-out digits on the page's canvas, uploads a file that
is not an image, and switches to ResNet-18. Every test also checks that the page logged no
console errors.

``TB_WRITE_SCREENSHOT=1`` rewrites docs/img/web-demo.png (the README's screenshot).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, headless_chromium, shm_snapshot

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="the browser test needs Debian's chromium and chromium-driver: run `make setup` "
           "(or apt-get install chromium chromium-driver)"),
    # one worker runs the module, so the web stack and the browser start once
    pytest.mark.xdist_group("web")]

from selenium import webdriver  # noqa: E402 - after the skip, which explains a missing browser
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions import interaction  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

DEMO_SH = ROOT / "scripts" / "demo.sh"
WEB_SH = ROOT / "scripts" / "web.sh"
SCREENSHOT = ROOT / "docs" / "img" / "web-demo.png"
MODELS = ("digits=tensorbridge.models.digits:create "
          "digits-image=tensorbridge.models.digits:create_image "
          "resnet18=tensorbridge.models.resnet:create")

# Paints 64 pixel values (0..16) as an 8x8 grid of gray blocks, black ink on white: the
# digits-image model's box filter turns each block back into its value.
PAINT = """
const [pixels] = arguments;
const pad = document.getElementById('pad');
const ctx = pad.getContext('2d');
const cell = pad.width / 8;
ctx.fillStyle = '#fff';
ctx.fillRect(0, 0, pad.width, pad.height);
pixels.forEach((v, i) => {
  const g = Math.round(255 - 255 * v / 16);
  ctx.fillStyle = `rgb(${g}, ${g}, ${g})`;
  ctx.fillRect((i % 8) * cell, Math.floor(i / 8) * cell, cell, cell);
});
"""
DARK_PIXELS = """
const pad = document.getElementById('pad');
const data = pad.getContext('2d').getImageData(0, 0, pad.width, pad.height).data;
let n = 0;
for (let i = 0; i < data.length; i += 4) if (data[i] < 128) n++;
return n;
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running(pid: str) -> bool:
    """Whether the process runs (an exited daemon stays a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@functools.cache
def _held_out_digits(n: int) -> list[tuple[int, list[int]]]:
    """The first ``n`` held-out digits (never trained on) with distinct labels."""
    from tensorbridge.models import digits

    x, y = digits.load_data()
    picked: dict[int, list[int]] = {}
    for i in digits.split()[1].tolist():
        label = int(y[i])
        if label not in picked:
            picked[label] = [int(v) for v in x[i].tolist()]
        if len(picked) == n:
            break
    return list(picked.items())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo's nginx + PHP-FPM + TensorBridge server on a free port; yields the URL."""
    run = tmp_path_factory.mktemp("web")
    env = {**os.environ, "TB_WEB_DIR": str(run), "TB_WEB_PORT": str(_free_port()),
           "TB_WEB_MODELS": MODELS, "TB_SEARCH": "0"}  # the search has test_search.py
    shm_before = shm_snapshot()
    started = subprocess.run([str(DEMO_SH)], env=env, capture_output=True, text=True,
                             timeout=300)
    url = f"http://127.0.0.1:{env['TB_WEB_PORT']}/"
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        # `make demo`'s output: model loading progress, the CLI example, then the URL.
        assert f"ready on {run}/tb.sock" in started.stdout
        assert re.search(r"^  \d+/10 right", started.stdout, re.M), started.stdout
        assert started.stdout.splitlines()[-1].startswith(f"Web demo: {url} "), started.stdout
        yield url
    finally:
        pids = [(run / f"{name}.pid").read_text().strip()
                for name in ("server", "php-fpm", "nginx") if (run / f"{name}.pid").exists()]
        stopped = subprocess.run([str(WEB_SH), "stop"], env=env, capture_output=True,
                                 text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        # Nothing of the stack is left: no process, no socket, no pid file, no shared memory.
        assert [p for p in pids if _running(p)] == []
        assert sorted(p.name for p in run.iterdir() if p.suffix in (".pid", ".sock")) == []
        assert shm_snapshot() == shm_before


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    yield from headless_chromium("1100,800")


@pytest.fixture
def page(stack: str, browser: webdriver.Chrome) -> Iterator[webdriver.Chrome]:
    """The demo page freshly loaded; fails the test if the page logs a console error."""
    browser.get_log("browser")  # drop what earlier tests left
    browser.get(stack)
    yield browser
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def _answer(driver: webdriver.Chrome, act) -> str:
    """Runs ``act`` (a click, an upload) and waits for the page's next answer; its state."""
    result = driver.find_element(By.ID, "result")
    before = int(result.get_attribute("data-answers") or 0)
    act()
    WebDriverWait(driver, 30).until(
        lambda d: int(result.get_attribute("data-answers") or 0) > before)
    return result.get_attribute("data-state")


def _top(driver: webdriver.Chrome) -> list[tuple[str, float]]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#top li")
    return [(r.find_element(By.CLASS_NAME, "label").text,
             float(r.find_element(By.CLASS_NAME, "score").text.rstrip("%")))
            for r in rows]


def _timing(driver: webdriver.Chrome) -> dict[str, float]:
    """The latency table: row title -> milliseconds."""
    out = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "#timing tr"):
        value = row.find_element(By.TAG_NAME, "td").text
        if value != "–":
            out[row.find_element(By.TAG_NAME, "th").text] = float(value.removesuffix(" ms"))
    return out


def test_the_pad_draws_with_the_mouse_and_clears(page: webdriver.Chrome) -> None:
    pad = page.find_element(By.ID, "pad")
    assert page.execute_script(DARK_PIXELS) == 0
    (ActionChains(page).move_to_element_with_offset(pad, -60, -80).click_and_hold()
     .move_by_offset(100, 0).move_by_offset(-40, 150).release().perform())
    assert page.execute_script(DARK_PIXELS) > 2000  # two strokes 22 px wide
    page.find_element(By.ID, "clear").click()
    assert page.execute_script(DARK_PIXELS) == 0
    # A finger draws too (touch pointer events, as on a phone).
    touch = ActionBuilder(page, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
    touch.pointer_action.move_to(pad, -50, 0).pointer_down().move_to(pad, 50, 0).pointer_up()
    touch.perform()
    assert page.execute_script(DARK_PIXELS) > 1000  # one stroke, 100 px long, 22 px wide
    page.find_element(By.ID, "clear").click()
    # An empty pad is not sent.
    assert _answer(page, page.find_element(By.ID, "classify").click) == "error"
    assert "draw a digit first" in page.find_element(By.ID, "error").text


def test_drawn_held_out_digits_are_classified(page: webdriver.Chrome) -> None:
    assert Select(page.find_element(By.ID, "model")).first_selected_option.get_attribute(
        "value") == "digits-image"
    for label, pixels in _held_out_digits(3):
        page.execute_script(PAINT, pixels)
        assert _answer(page, page.find_element(By.ID, "classify").click) == "done"
        top = _top(page)
        assert len(top) == 3 and top[0][0] == str(label), (label, top)
        assert top[0][1] >= top[1][1] >= top[2][1]
    assert not page.find_element(By.ID, "notice").is_displayed()  # trained weights: no notice
    timing = _timing(page)
    php_total, round_trip, preprocess, compute = list(timing.values())[:4]
    assert list(timing)[:4] == [
        "PHP total (classify.php, start to answer)",
        "TensorBridge round trip ($client->classify())",
        "server preprocessing (decode, resize)", "model compute"], timing
    # The parts nest: the server's stages lie inside the round trip, which lies inside PHP's total.
    assert php_total >= round_trip >= preprocess + compute > 0
    if os.environ.get("TB_WRITE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.save_screenshot(str(SCREENSHOT))


def test_an_uploaded_image_is_classified(page: webdriver.Chrome, tmp_path: Path) -> None:
    from PIL import Image

    label, pixels = _held_out_digits(4)[3]
    gray = [round(255 - 255 * v / 16) for v in pixels]
    image = Image.new("L", (8, 8))
    image.putdata(gray)
    path = tmp_path / "digit.jpg"  # a JPEG, unlike the canvas's PNG
    image.resize((160, 160), Image.Resampling.NEAREST).save(path, quality=95)
    upload = page.find_element(By.ID, "file")
    assert _answer(page, lambda: upload.send_keys(str(path))) == "done"
    assert _top(page)[0][0] == str(label)
    assert "(digit.jpg, digits-image)" in page.find_element(By.ID, "source").text


def test_a_file_that_is_not_an_image_shows_an_error(page: webdriver.Chrome,
                                                    tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("These are notes, not a picture.\n")
    upload = page.find_element(By.ID, "file")
    assert _answer(page, lambda: upload.send_keys(str(notes))) == "error"
    error = page.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.text.startswith("That file is not an image ("), error.text
    assert "Upload a PNG, JPEG, GIF or WebP image." in error.text
    assert page.find_elements(By.CSS_SELECTOR, "#top li") == []
    # The page still works after the error.
    page.execute_script(PAINT, _held_out_digits(1)[0][1])
    assert _answer(page, page.find_element(By.ID, "classify").click) == "done"


def test_resnet18_shows_its_random_weights_notice(page: webdriver.Chrome) -> None:
    page.execute_script(PAINT, _held_out_digits(1)[0][1])
    assert _answer(page, page.find_element(By.ID, "classify").click) == "done"
    # Choosing another model classifies the same drawing again.
    select = Select(page.find_element(By.ID, "model"))
    assert _answer(page, lambda: select.select_by_value("resnet18")) == "done"
    notice = page.find_element(By.ID, "notice")
    assert notice.is_displayed() and "random weights" in notice.text
    top = _top(page)
    assert len(top) == 3 and all(label for label, _ in top)
    assert "(drawing.png, resnet18)" in page.find_element(By.ID, "source").text
