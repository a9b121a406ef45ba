"""The cluster web page at `/`, driven in headless Chromium against a real cluster:
launch a model and a second replica from the page, watch traffic spread over both,
terminate the replica and then the model, and check a screenshot of the page by OCR.

Needs Debian's `chromium`, `chromedriver` and `tesseract-ocr` (`make install` installs
them); without them the test fails and says so rather than skipping.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import ADMIN_KEY, Cluster, ready_workers, running_cluster, workers_of

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TESSERACT = Path("/usr/bin/tesseract")
MODEL = "minilm-web"

CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Twice the pixels per character: the screenshot is read back by OCR.
    "--force-device-scale-factor=2",
)


def _require_tools() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER, TESSERACT) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium Python package")
    if missing:
        pytest.fail(
            f"the web page test needs {', '.join(missing)}: run `make install`, "
            "which installs chromium, chromedriver, tesseract-ocr and selenium"
        )


@pytest.fixture
def browser(tmp_path: Path, log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from _chromium(tmp_path, log_dir, monkeypatch, ())


#: Every request that is not to this host goes to a proxy that is not there: a page that
#: needs the internet (a CDN's script) stays blank, as on a site without it.
OFFLINE_ARGS = ("--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1;localhost")


def _chromium(
    tmp_path: Path, log_dir: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...]
) -> Iterator[Any]:
    _require_tools()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    # The driver and browser are given by path, so Selenium Manager has nothing to fetch.
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (*CHROMIUM_ARGS, *extra):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(
        executable_path=str(CHROMEDRIVER), log_output=str(log_dir / "chromedriver.log")
    )
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The cluster page as a test sees it: queries through the page's data-* attributes."""

    def __init__(self, driver: Any, base: str) -> None:
        self.driver = driver
        self.base = base

    def open(self) -> None:
        self.driver.get(f"{self.base}/")
        self.wait("the page script running", lambda: self.polls() >= 0)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def polls(self) -> int:
        value = self.js(
            "const s = document.getElementById('poll-status'); return s && s.dataset.polls"
        )
        return int(value) if value is not None else -1

    def status(self) -> tuple[str, str]:
        state, text = self.js(
            "const s = document.getElementById('poll-status');"
            "return [s.dataset.state, s.textContent]"
        )
        return state, text

    def message(self) -> tuple[str | None, str]:
        kind, text, hidden = self.js(
            "const m = document.getElementById('message');"
            "return [m.dataset.kind || null, m.textContent, m.hidden]"
        )
        return (None, "") if hidden else (kind, text)

    def attrs(self, selector: str, name: str) -> list[str]:
        """One data-* attribute of every element that matches the CSS selector."""
        return self.js(
            "return Array.from(document.querySelectorAll(arguments[0]))"
            ".map(e => e.getAttribute(arguments[1]))",
            selector,
            name,
        )

    def replica_states(self, model: str) -> list[str]:
        return self.attrs(f'tr.replica-row[data-model="{model}"]', "data-state")

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the page never showed {what}; status {self.status()}, "
                    f"message {self.message()}"
                )
            time.sleep(0.25)

    def fill(self, fields: dict[str, str]) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        for field, value in fields.items():
            element = self.driver.find_element(By.ID, field)
            if element.tag_name == "select":
                Select(element).select_by_value(value)
            else:
                element.clear()
                if value:
                    element.send_keys(value)

    def launch(self, **fields: str) -> tuple[str | None, str]:
        """Fill every field of the launch form (empty when not given) and press Launch."""
        from selenium.webdriver.common.by import By

        names = ("model-name", "uid", "engine", "path", "n-gpu", "devices", "node")
        values = {f"launch-{n}": fields.get(n.replace("-", "_"), "") for n in names}
        values["launch-type"] = fields.get("type", "")
        values["launch-replica"] = fields.get("replica", "1")
        self.fill(values)
        self.js("document.getElementById('message').hidden = true")
        self.driver.find_element(By.ID, "launch-button").click()
        return self.wait(
            "the launch answer",
            lambda: self.message() if self.message()[0] in ("ok", "error") else None,
            timeout=60,
        )

    def click_and_confirm(self, selector: str) -> None:
        """Click a button the page may redraw between polls, then accept its confirm()."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        for _ in range(20):
            try:
                self.driver.find_element(By.CSS_SELECTOR, selector).click()
                break
            except StaleElementReferenceException:
                time.sleep(0.1)
        else:
            raise AssertionError(f"could not click {selector}")
        WebDriverWait(self.driver, 10).until(expected_conditions.alert_is_present()).accept()


#: The cells and charts whose right edge lies past their card's: what overflows it.
SPILLS = """
const out = [];
for (const panel of document.querySelectorAll('.panel')) {
  const edge = panel.getBoundingClientRect().right;
  for (const el of panel.querySelectorAll('th, td, figure')) {
    if (el.closest('.scroll')) continue;  // a scrolling table stays inside by design
    const right = el.getBoundingClientRect().right;
    if (right > edge + 0.5) out.push(`${panel.id}: ${el.textContent.trim().slice(0, 30)}`);
  }
}
return out;
"""


def _held(view: dict[str, Any], node: str) -> dict[str, str | None]:
    (entry,) = [n for n in view["nodes"] if n["name"] == node]
    return {d["id"]: d["model"] for d in entry["devices"]}


def _ocr(image: Path) -> str:
    done = subprocess.run(
        [str(TESSERACT), str(image), "stdout"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_launch_scale_spread_and_terminate_from_the_page(
    browser: Any, inferq_env: dict[str, str], log_dir: Path, tmp_path: Path
) -> None:
    with running_cluster(inferq_env, "webui", log_dir, tmp_path) as cluster:
        cluster.add_node("node-w", devices="0,1")
        page = Page(browser, cluster.base)
        _drive_the_page(page, cluster, log_dir)


def _drive_the_page(page: Page, cluster: Cluster, log_dir: Path) -> None:
    # The page itself is open; the API behind it wants a key, and the page says so.
    page.open()
    _, text = page.wait("the key asked for", lambda: page.status()[0] == "error" and page.status())
    assert "API key" in text, text
    page.fill({"api-key": ADMIN_KEY})
    page.driver.find_element("id", "save-key").click()
    page.wait("node-w", lambda: "node-w" in page.attrs("div.node", "data-node"))
    # The key stays in the browser across reloads.
    page.open()
    assert page.js("return document.getElementById('api-key').value") == ADMIN_KEY
    page.wait("node-w after a reload", lambda: page.attrs("div.node", "data-node") == ["node-w"])
    assert page.attrs('span.chip[data-node="node-w"]', "data-device") == ["0", "1"]

    # Launch the model on device 0, then a second replica wherever a device is free.
    kind, text = page.launch(model_name="minilm", uid=MODEL, devices="0")
    assert kind == "ok" and f"Launched {MODEL}" in text and "node-w [0]" in text, text
    page.wait("a ready replica", lambda: page.replica_states(MODEL) == ["ready"])
    kind, text = page.launch(model_name="minilm", uid=MODEL, n_gpu="1")
    assert kind == "ok" and "node-w [1]" in text, text
    second = text.split(": ", 1)[1].split()[0]
    page.wait("two ready replicas", lambda: page.replica_states(MODEL) == ["ready", "ready"])
    view = cluster.wait("two ready replicas", lambda v: len(ready_workers(v, MODEL)) == 2)
    assert _held(view, "node-w") == {"0": MODEL, "1": MODEL}
    (row,) = [m for m in view["models"] if m["id"] == MODEL]
    assert (row["replicas_alive"], row["replicas_wanted"], row["source"]) == (2, 2, "launched")
    assert sorted(page.attrs('span.chip[data-node="node-w"]', "data-holder")) == [MODEL, MODEL]
    assert second in page.attrs(f'tr.replica-row[data-model="{MODEL}"]', "data-replica")

    # An API refusal shows in the message area.
    kind, text = page.launch(model_name="minilm", uid="minilm-other", devices="1")
    assert kind == "error" and f"in use on node-w: 1 ({MODEL})" in text, text

    # Traffic spreads over both replicas, and the Workers section counts it.
    with cluster.http() as http:

        def embed(i: int) -> int:
            body = {"model": MODEL, "input": [f"web page text {i} " * (1 + i % 5)]}
            return http.post("/v1/embeddings", json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(embed, range(60))) == {200}

    def tasks_done() -> list[int] | None:
        rows = f'tr.worker-row[data-model="{MODEL}"][data-state="ready"]'
        counts = [int(n) for n in page.attrs(rows, "data-tasks-done")]
        return counts if len(counts) == 2 and min(counts) > 0 else None

    done = page.wait("both workers with tasks done", tasks_done, timeout=20)
    view = cluster.wait(
        "both replicas serving",
        # Counters reach the view with the next heartbeat.
        lambda v: sum(w["tasks_done"] for w in ready_workers(v, MODEL)) >= 60,
        timeout=15,
    )
    assert all(w["tasks_done"] > 0 for w in ready_workers(view, MODEL)), done

    # Charts of the last minutes: requests/s rose while the traffic ran.
    def served_rate() -> bool:
        samples = cluster.view()["history"]["models"].get(MODEL, [])
        return any((s["requests_per_s"] or 0) > 0 for s in samples)

    page.wait("a sample with the traffic", served_rate, timeout=20)
    row = f'.chart-row[data-model="{MODEL}"] .chart'
    metrics = page.wait("the model's charts", lambda: page.attrs(row, "data-metric"))
    assert metrics == [
        "queue_depth",
        "requests_per_s",
        "tokens_per_s",
        "batch_size",
        "padding_efficiency",
        "replicas_alive",
    ]
    page.wait(
        "lines drawn",
        lambda: page.js(f"return document.querySelectorAll('{row} polyline.value').length") >= 5,
    )
    assert page.js(f"return document.querySelectorAll('{row} polyline.wanted').length") == 1

    # Nothing spills over its card at desktop and laptop widths.
    for width in (1400, 1366, 1280):
        page.driver.set_window_size(width, 1000)
        time.sleep(0.5)
        spilled = page.js(SPILLS)
        assert spilled == [], (width, spilled)

    # A screenshot of the whole page, read back by OCR.
    # The window is the viewport plus the browser's own frame: grow it to the page.
    height, frame = page.js(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    page.driver.set_window_size(1280, max(1000, int(height) + int(frame)))
    time.sleep(0.5)
    shot = log_dir / "web-ui.png"
    assert page.driver.save_screenshot(str(shot))
    text = _ocr(shot)
    for expected in ("Cluster Information", "Running Models", "Workers", "Queues", MODEL, "node-w"):
        assert expected in text, f"{expected!r} not read from {shot}:\n{text}"
    page.driver.set_window_size(1280, 1000)

    # Terminate the second replica from the page: it leaves the page and the view.
    page.click_and_confirm(f'button.terminate-replica[data-replica="{second}"]')
    page.wait("one replica left", lambda: page.replica_states(MODEL) == ["ready"], timeout=60)
    view = cluster.wait(
        "one replica left",
        lambda v: len(workers_of(v, MODEL)) == 1 and _held(v, "node-w")["1"] is None,
        timeout=60,
    )
    assert _held(view, "node-w") == {"0": MODEL, "1": None}
    assert page.attrs('span.chip[data-node="node-w"]', "data-holder") == [MODEL, ""]
    kind, text = page.message()
    assert kind == "ok" and second in text, text
    page.wait(
        "the stop event",
        lambda: "stopped" in page.attrs(f'#events li[data-replica="{second}"]', "data-event"),
        timeout=20,
    )

    # Terminate the model from the page: it is gone everywhere.
    page.click_and_confirm(f'button.terminate-model[data-model="{MODEL}"]')
    page.wait(
        "the model gone",
        lambda: (
            not page.attrs(
                f'#models [data-model="{MODEL}"], #workers [data-model="{MODEL}"]', "data-model"
            )
        ),
        timeout=60,
    )
    view = cluster.wait("no workers", lambda v: not workers_of(v, MODEL), timeout=60)
    assert MODEL not in [m["id"] for m in view["models"]]
    assert _held(view, "node-w") == {"0": None, "1": None}


def test_the_api_docs_render_without_the_internet(
    api: str, tmp_path: Path, log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/docs and /redoc load their scripts from the API itself, not a CDN."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    for driver in _chromium(tmp_path, log_dir, monkeypatch, OFFLINE_ARGS):
        driver.get(f"{api}/docs")
        title = WebDriverWait(driver, 30).until(
            expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, ".info .title"))
        )
        assert "inferq" in title.text
        operations = driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
        assert "/v1/embeddings" in {o.text.replace("\u200b", "").strip() for o in operations}
        assert "cdn." not in driver.page_source
        driver.get(f"{api}/redoc")
        WebDriverWait(driver, 30).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".api-content"))
        )
