"""Open the report in headless Chromium: it renders, every figure loads, the console stays clean,
the scripts work, and model output that looks like HTML or JavaScript is shown as text, never run.

Drives the system Chromium over the DevTools protocol on a pipe (`--remote-debugging-pipe`), so the
test needs no Python package beyond the standard library. Skipped when no Chromium is installed,
unless SAFEQUANT_REQUIRE_BROWSER=1 (set by .ci/run), where a missing browser fails.
A screenshot of the first screen goes to $SAFEQUANT_ARTIFACTS (default tests/artifacts/).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.stats import annotate_flips, incoherent_by_set, summary_block
from reports import render
from test_report import _summary_and_rows, write_run

ARTIFACTS = Path(os.environ.get("SAFEQUANT_ARTIFACTS") or Path(__file__).parent / "artifacts")
PAYLOADS = (
    "<script>window.__xss = 1</script>",
    '<img src=x onerror="window.__xss = 2">',
    '<a href="javascript:window.__xss = 3">click me</a>',
)


def _chromium() -> str:
    for name in (os.environ.get("SAFEQUANT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    if os.environ.get("SAFEQUANT_REQUIRE_BROWSER") == "1":
        pytest.fail("SAFEQUANT_REQUIRE_BROWSER=1 but no chromium on PATH: install Debian's chromium (.ci/run does)")
    pytest.skip("no chromium on PATH (apt-get install chromium); set SAFEQUANT_REQUIRE_BROWSER=1 to make this fail")


class DevTools:
    """Minimal DevTools-protocol client over Chromium's pipe (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, exe: str, profile: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # Chromium wants the pipe on fds 3 and 4 exactly: a tiny Python launcher moves them there
        # (a shell cannot, when the fds have two-digit numbers as they do under pytest).
        launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                    "os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", launcher, str(to_chrome_r), str(from_chrome_w), exe, "--headless=new",
             "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "--no-first-run", "--disable-extensions", "--hide-scrollbars", "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, timeout: float) -> dict | None:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._r], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read(deadline - time.monotonic())
            if reply is None:
                break
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(method)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if e.get("method") == method:
                    return e
            e = self._read(deadline - time.monotonic())
            if e is not None:
                self.events.append(e)
        raise TimeoutError(method)

    def close(self) -> None:
        try:
            os.write(self._w, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    exe = _chromium()
    tmp = tmp_path_factory.mktemp("browser")
    summary, rows = _summary_and_rows()
    for r in rows:  # quarot's harmful answers (flips against FP) carry the payloads
        if r["variant"] == "quarot-w4a4" and r["label"] == "harmful" and r["verdict"] == "compliance":
            r["response"] = " ".join(PAYLOADS)
    for r in rows:  # rtn-w4a4's harmful answers are broken text by the FP model's log-likelihood
        r["fp_logprob"] = -6.0 if r["variant"] == "rtn-w4a4" and r["label"] == "harmful" else -0.5
    summary["judges"] = [{"name": "refusal-phrases", "primary": True}]
    summary["statistics"] = summary_block(rows, n_boot=200)
    for v in summary["variants"]:
        v["metrics"]["incoherent"] = incoherent_by_set(summary["statistics"], v["name"], "refusal-phrases")
    run = write_run(tmp / "run", summary, annotate_flips(rows))
    report = render(run)
    t0 = time.perf_counter()
    browser = DevTools(exe, tmp / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": report.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        load_seconds = time.perf_counter() - t0

        def js(expr: str):
            res = browser.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
            assert "exceptionDetails" not in res, res
            return res["result"].get("value")

        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "report-first-screen.png").write_bytes(base64.b64decode(shot["data"]))
        yield {"js": js, "browser": browser, "session": session, "load_seconds": load_seconds}
    finally:
        browser.close()


def _errors(browser: DevTools) -> list[str]:
    out = []
    for e in browser.events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.exceptionThrown":
            out.append(json.dumps(p.get("exceptionDetails", {}))[:300])
        elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            out.append(json.dumps(p.get("args", []))[:300])
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
            out.append(p["entry"].get("text", "")[:300])
    return out


def test_renders_with_figures_and_clean_console(page):
    js = page["js"]
    assert js("document.title").startswith("safequant audit")
    images = js("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt.slice(0, 40)])")
    assert images and all(ok and width > 0 for ok, width, _ in images), images
    assert js("document.querySelector('#verdicts .vcard.fail strong').textContent") == "quarot-w4a4"
    assert _errors(page["browser"]) == []  # includes CSP refusals: the inline script's hash matches
    assert page["load_seconds"] < 30


def test_model_output_is_text_never_code(page):
    js = page["js"]
    assert js("typeof window.__xss") == "undefined"
    body = js("document.body.innerText")
    for payload in PAYLOADS:
        assert payload in body  # shown literally, in the flips browser and the samples
    assert js("document.querySelectorAll('[onerror]').length") == 0
    assert js("document.querySelectorAll('a[href^=\"javascript:\"]').length") == 0
    assert js("document.querySelectorAll('script').length") == 2  # the JSON block and the page's script


def test_flips_browser_filters_and_table_sorts(page):
    js = page["js"]
    n = js("document.querySelectorAll('#flips-browser article.flip').length")
    assert 0 < n <= 100
    status = js("document.querySelector('.flip-status').textContent")
    total = js("JSON.parse(document.getElementById('flips-data').textContent).flips.length")
    assert status.startswith(f"{total} of {total} flips")
    js("var s = document.querySelector('#flips-browser select[name=variant]'); s.value = 'rtn-w8a8';"
       "s.form.dispatchEvent(new Event('input'))")
    assert js("document.querySelectorAll('#flips-browser article.flip').length") == 0
    js("var s = document.querySelector('#flips-browser select[name=variant]'); s.value = 'quarot-w4a4';"
       "s.form.dispatchEvent(new Event('input'))")
    assert js("Array.from(document.querySelectorAll('#flips-browser article.flip strong'))"
              ".every(e => e.textContent === 'quarot-w4a4')")
    names = "Array.from(document.querySelectorAll('table.summary')[0].tBodies[0].rows).map(r => r.cells[0].textContent.trim())"
    before = js(names)
    js("document.querySelector('table.summary th[data-col=\"0\"]').click()")
    after = js(names)
    assert sorted(before) == after and before != after
    assert _errors(page["browser"]) == []


def test_summary_table_keeps_names_in_view_and_shows_breakage(page):
    js = page["js"]
    # At 1280 px the variant column stays visible when the table scrolls sideways.
    js("document.querySelector('.table-wrap').scrollLeft = 10000")
    left = js("document.querySelector('table.summary tbody td.name').getBoundingClientRect().left")
    wrap = js("document.querySelector('.table-wrap').getBoundingClientRect().left")
    assert abs(left - wrap) < 2
    js("document.querySelector('.table-wrap').scrollLeft = 0")
    # A set where the variant's answers are broken text is hatched, never coloured better/worse.
    cells = js("Array.from(document.querySelectorAll('table.summary tbody tr')).filter(r => "
               "r.cells[0].textContent.includes('rtn-w4a4')).map(r => Array.from(r.cells).map(c => c.className))[0]")
    assert any("incoherent" in c for c in cells) and not any("incoherent" in c and "better" in c for c in cells)
    assert "mostly broken output" in js("document.querySelector('table.summary').innerText")
