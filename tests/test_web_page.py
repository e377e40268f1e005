"""The page uhd-serve gives at / in headless Chromium: an uploaded image gets the model's slice plan drawn and
tabulated, and two questions in turns get answers that stream in and equal the Python API's.

The browser is driven over the W3C WebDriver protocol (what Selenium speaks) by the system's `chromedriver`, with the
standard library's HTTP client: no browser download and no extra package. `.ci/run` installs Debian's `chromium` and
`chromium-driver` when they are missing; without them this test is skipped, saying so."""
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.serve_helpers import eval_images, serving, shared_checkpoint

TOKENS = 16
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"   # the W3C key of an element reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """A headless Chromium session through chromedriver."""

    def __init__(self):
        self.port = _free_port()
        self.driver = subprocess.Popen([shutil.which("chromedriver"), f"--port={self.port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                self.driver.kill()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        options = {"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            "--window-size=1280,900"]}
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium:
            options["binary"] = chromium
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})["sessionId"]

    def _call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"webdriver {method} {path}: {e.read().decode()[:500]}") from None

    def command(self, method: str, path: str, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str):
        self.command("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self.command("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str):
        self.command("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str):
        self.command("POST", f"/element/{self.find(css)}/click", {})

    def script(self, source: str, *args):
        return self.command("POST", "/execute/sync", {"script": source, "args": list(args)})

    def wait(self, source: str, timeout: float = 180.0):
        """The value of the script `source` once it is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.script(source)
            if value:
                return value
            if time.monotonic() > deadline:
                error = self.script("return document.getElementById('error').textContent")
                raise AssertionError(f"timed out waiting for: {source} (page error: {error!r})")
            time.sleep(0.05)

    def close(self):
        try:
            self.command("DELETE", "")
        finally:
            self.driver.kill()
            self.driver.wait(30)


@pytest.fixture(scope="module")
def served(synthetic_data, tmp_path_factory):
    if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser"))):
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    import uhd_jax

    # SliME: a slice grid to draw (over the letterboxed picture its tiles cut) and the fastest of the slicing models
    final = shared_checkpoint("configs/slime.py:tiny", "slime", synthetic_data, tmp_path_factory)
    model = uhd_jax.load(final, batch_size=1)
    with serving(model, slots=2, max_tokens_limit=TOKENS) as server:
        yield server, model, eval_images(synthetic_data, 16)


ANSWERS = "return [...document.querySelectorAll('#turns .answer')].map(a => [a.dataset.state, a.textContent, " \
          "Number(a.dataset.chunks)])"


def test_upload_see_the_slices_and_ask_two_turns_in_chromium(served):
    server, model, images = served
    # an image the model cuts into several slices, so that the grid is there to see
    image = next(p for p in images if model.slice_plan(p)["grid"] not in (None, (1, 1)))
    plan = model.slice_plan(image)
    browser = Browser()
    try:
        browser.open(server.url + "/")
        assert browser.script("return document.title") == "uhd-jax"
        browser.type("#file", image)
        grid = browser.wait("return document.getElementById('panel').dataset.grid")
        assert grid == f"{plan['grid'][0]}x{plan['grid'][1]}"
        assert browser.script("return document.getElementById('panel').dataset.tokens") == str(plan["tokens"])
        # one table row for the overview and one per slice, each with the slice's tokens
        rows = browser.script("return [...document.querySelectorAll('#slices tbody tr')].map(r => r.lastChild"
                              ".textContent)")
        assert rows == [str(plan["overview_tokens"])] + [str(t) for _, _, t in plan["cells"]]
        # the grid is drawn: the canvas has the picture's aspect and yellow grid lines on it
        painted = browser.script("""
            const c = document.getElementById('panel'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
            let yellow = 0;
            for (let i = 0; i < d.data.length; i += 4) {
              if (d.data[i] > 240 && d.data[i + 1] > 190 && d.data[i + 1] < 220 && d.data[i + 2] < 30) yellow++;
            }
            return [c.width, c.height, yellow];""")
        assert painted[2] > 2 * (painted[0] + painted[1])
        browser.type("#max-tokens", str(TOKENS))
        questions = ["What is written?", "And the colour?"]
        for n, question in enumerate(questions, 1):
            browser.type("#question", question)
            browser.click("#send")
            browser.wait(f"const a = document.querySelectorAll('#turns .answer'); return a.length == {n} && "
                         f"a[{n - 1}].dataset.state != 'streaming'")
        answers = browser.script(ANSWERS)
    finally:
        browser.close()
    first = model.chat([{"role": "user", "content": questions[0]}], image=image, max_new_tokens=TOKENS)
    second = model.chat([{"role": "user", "content": questions[0]}, {"role": "assistant", "content": first},
                         {"role": "user", "content": questions[1]}], image=image, max_new_tokens=TOKENS)
    assert [(state, text) for state, text, _ in answers] == [("done", first), ("done", second)]
    # each answer came in as several server-sent events, shown one by one
    assert all(chunks > 1 for _, _, chunks in answers), answers
