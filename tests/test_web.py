"""`livehist web` in a real browser (Debian's chromium driven by Playwright) against real devices.

The page shows live, changing plots; an ROI drawn with the mouse becomes a histogram on the
device; read-only mode refuses control; a device restart shows DOWN, then recovers; a frozen
WebSocket client drops frames alone. Plus the layout files, the frames and bad input.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tango

from livehist.site import control
from livehist.site.process import Managed
from livehist.views.web import frames
from livehist.views.web.hub import Hub
from livehist.views.web.layout import LayoutError, load_layout, parse_layout
from tests.conftest import free_port, run_cli

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
DEV = "webtest/histogrammer/1"
META = "webtest/metadata/1"
FAULTY = "webtest/histogrammer/3"  # a bad EventSource: FAULT, with no histograms
TOKEN = "s3cret-token-for-tests"
HISTOGRAMS = [
    {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 72000, "bins": 1000, "unit": "us"}},
    {"name": "image", "kind": "image", "pixels": {"first": 1, "shape": [600, 600]}},
]


def wait_for(cond, timeout: float = 60, what: str = "condition", interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


@pytest.fixture(scope="module")
def site(sites, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    props = {"EventSource": ["sim://?rate=1e6&seed=3&shape=600x600"], "PublishPeriod": ["0.2"],
             "Histograms": [json.dumps(HISTOGRAMS)]}  # fmt: skip
    config = {"servers": {
        "EventHistogrammer": {"webtest": {"EventHistogrammer": {DEV: {"properties": props}}},
                              "webfault": {"EventHistogrammer": {FAULTY: {"properties": {
                                  "EventSource": ["bogus://nowhere"]}}}}},
        "MetadataManager": {"webtest": {"MetadataManager": {META: {"properties": {
            "DefaultDataRoot": [str(data)]}}}}}}}  # fmt: skip
    s = sites.up(config)
    meta = tango.DeviceProxy(s.url(META))
    meta.SetMetadata(json.dumps({"proposal": "20260042", "title": "web view test", "sample": {"name": "Si"}}))
    return s


def proxy(site) -> tango.DeviceProxy:
    p = tango.DeviceProxy(site.url(DEV))
    p.set_timeout_millis(10_000)
    return p


def start_web(site, name: str, *args: str, env: dict | None = None) -> str:
    """`livehist web` as a managed process of the site (stopped by the site's teardown too)."""
    port = free_port()
    proc = Managed(site.state_dir, name)
    proc.start([sys.executable, "-m", "livehist.cli", "web", "--port", str(port), *args],
               env=dict(env or os.environ, TANGO_HOST=site.tango_host))  # fmt: skip
    url = f"http://127.0.0.1:{port}/"

    def answers():
        assert proc.pid() is not None, f"livehist web exited:\n{proc.log_tail()}"
        try:
            with urllib.request.urlopen(url + "api/info", timeout=2):
                return True
        except OSError:
            return False

    wait_for(answers, 60, "livehist web to answer")
    return url


@pytest.fixture(scope="module")
def web(site):
    url = start_web(site, "web-control", "--control-token", TOKEN)
    yield url
    Managed(site.state_dir, "web-control").stop()


@pytest.fixture(scope="module")
def web_ro(site):
    url = start_web(site, "web-readonly", DEV, META, env={k: v for k, v in os.environ.items()
                                                           if k != "LIVEHIST_WEB_TOKEN"})  # fmt: skip
    yield url
    Managed(site.state_dir, "web-readonly").stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is missing: run scripts/system-deps.sh (make test does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1300, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    yield pg
    ctx.close()
    assert not errors, errors  # no script error in the page, whatever the test did


def running(site) -> tango.DeviceProxy:
    h = proxy(site)
    if h.state() not in (tango.DevState.RUNNING, tango.DevState.ALARM):
        h.Start()
    return h


def paints(page, name: str, device: str = DEV) -> int:
    return page.evaluate(f"() => livehist.paints[{json.dumps(device + chr(0) + name)}] || 0")


def state_shown(page, device: str = DEV) -> str:
    return page.locator(f'section[data-device="{device}"][data-kind="status"] .state').inner_text()


def post(url: str, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Livehist-Token"] = token
    req = urllib.request.Request(url + path, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --- in the browser -----------------------------------------------------------------------
def test_page_shows_live_changing_plots_with_tof_axis_counters_and_metadata(site, web, page):
    h = running(site)
    h.Reset()
    page.goto(web)
    wait_for(lambda: paints(page, "tof") >= 3 and paints(page, "image") >= 3, 60, "tof and image painted")
    tof = page.locator(f'section[data-device="{DEV}"][data-name="tof"] canvas')
    image = page.locator(f'section[data-device="{DEV}"][data-name="image"] canvas')
    first = (tof.screenshot(), image.screenshot())
    n = paints(page, "image")
    wait_for(lambda: paints(page, "image") >= n + 3, 30, "three more image paints")
    second = (tof.screenshot(), image.screenshot())
    assert first[0] != second[0] and first[1] != second[1]  # live: both plots changed
    from io import BytesIO

    import matplotlib.image

    for png in second:
        pixels = matplotlib.image.imread(BytesIO(png), format="png")
        assert pixels[..., :3].std() > 0.05  # drawn, not blank
    # the TOF axis is the device's edges in its unit; the image is the device's 300x300 preview
    cfg = page.evaluate(f"() => livehist.configs[{json.dumps(DEV)}].histograms")
    by_name = {c["name"]: c for c in cfg}
    assert by_name["tof"]["unit"] == "us" and by_name["tof"]["edges"] == list(h.tof_edges)
    assert by_name["image"]["factor"] == 2
    assert page.evaluate(f"() => livehist.data[{json.dumps(DEV + chr(0) + 'image')}].h.shape") == [300, 300]
    assert state_shown(page) == "RUNNING"
    wait_for(lambda: state_shown(page, FAULTY) == "FAULT", 30, "the faulty device's FAULT")
    fault = page.locator(f'section[data-device="{FAULTY}"][data-kind="status"] .status-text').inner_text()
    assert "bogus" in fault  # the device's own reason
    status = page.locator(f'section[data-device="{DEV}"][data-kind="status"]')
    count = status.locator('[data-counter="EventCount"]').inner_text()
    assert int(count.replace(",", "")) > 0
    assert page.locator('[data-meta="proposal"]').inner_text() == "20260042"
    assert page.locator('[data-meta="sample"]').inner_text() == "Si"
    age = float(status.locator('[data-counter="age"]').inner_text())
    assert 0 <= age < 5  # seconds since the data on screen left the device
    # log scales redraw differently
    page.locator(f'section[data-device="{DEV}"][data-name="tof"] select[data-scale]').select_option("log")
    page.locator(f'section[data-device="{DEV}"][data-name="image"] select[data-scale]').select_option(
        "linear"
    )
    wait_for(lambda: paints(page, "image") >= n + 6, 30, "more paints")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web.png"))  # docs/web.png is one of these
    lat = page.evaluate("() => livehist.latencies.map(l => l.ms)")
    assert lat and min(lat) > -50  # timestamps are the device's publish times (same clock here)


def test_roi_drawn_with_the_mouse_appears_on_the_device(site, web, page):
    h = running(site)
    page.goto(web + f"?token={TOKEN}")
    wait_for(lambda: paints(page, "image") >= 2, 60, "image painted")
    assert "token" not in page.url, page.url  # out of the address bar and the history once read

    def drag(row0: int, col0: int, row1: int, col1: int) -> None:
        """Drag the mouse over the image from one detector pixel to another."""
        box = page.locator(f'section[data-device="{DEV}"][data-name="image"] canvas').bounding_box()
        inner = page.evaluate(
            f"() => livehist.panels.find(p => p.name === 'image' && p.device === '{DEV}').box"
        )
        x0, y0 = box["x"] + inner["x"], box["y"] + inner["y"]
        scale = inner["w"] / 300 / 2  # screen pixels per detector pixel (preview factor 2)
        page.mouse.move(x0 + col0 * scale, y0 + row0 * scale)
        page.mouse.down()
        page.mouse.move(x0 + col1 * scale, y0 + row1 * scale, steps=5)
        page.mouse.up()

    drag(200, 100, 300, 250)

    def on_device():
        specs = {s["name"]: s for s in json.loads(h.HistogramConfig)}
        return specs.get("roi_1")

    roi = wait_for(on_device, 30, "roi_1 on the device")
    assert roi["kind"] == "roi" and roi["pixels"]["shape"] == [600, 600]
    (r0, r1), (c0, c1) = roi["roi"]["rows"], roi["roi"]["cols"]
    assert abs(r0 - 200) <= 3 and abs(r1 - 300) <= 3 and abs(c0 - 100) <= 3 and abs(c1 - 250) <= 3
    assert roi["tof"]["unit"] == "us"  # the device's TOF axis
    wait_for(lambda: paints(page, "roi_1") >= 2, 60, "the new ROI's spectrum in the page")
    assert int(h.roi_1_total) >= 0 and h.roi_1.shape == (1000,)
    # one pair of window listeners for the drags of every panel: each histogram panel added its
    # own pair, which outlived it (a long-open page gathered them with every Configure)
    cdp = page.context.new_cdp_session(page)
    window = cdp.send("Runtime.evaluate", {"expression": "window"})["result"]["objectId"]
    listeners = cdp.send("DOMDebugger.getEventListeners", {"objectId": window})["listeners"]
    kinds = [x["type"] for x in listeners if not x["useCapture"]]  # Playwright's own capture
    assert (kinds.count("mousemove"), kinds.count("mouseup")) == (1, 1), listeners
    # a name the device already uses for another kind: refused, the page says why, nothing changed
    before = h.HistogramConfig
    page.locator(f'section[data-device="{DEV}"] input[data-roi-name]').fill("tof")
    drag(20, 20, 60, 60)
    wait_for(lambda: "already the name" in page.locator("#message").inner_text(), 30, "the error shown")
    assert h.HistogramConfig == before
    # the device's own refusal comes back word for word
    status, answer = post(web, "api/roi", {"device": DEV, "image": "image", "name": "roi_x",
                                           "rows": [0, 5000], "cols": [0, 10]}, TOKEN)  # fmt: skip
    assert status == 409 and "rows" in answer["error"] and "600" in answer["error"], answer
    assert h.HistogramConfig == before
    h.Configure(json.dumps(HISTOGRAMS))  # back to the module's histograms


def test_rois_sent_at_once_all_land_and_odd_bodies_get_400(site, web):
    """Each ROI is a read-modify-write of the device's histogram list: sent at once, all must land."""
    from concurrent.futures import ThreadPoolExecutor

    h = proxy(site)
    before = h.HistogramConfig
    try:
        bodies = [{"device": DEV, "image": "image", "name": f"race_{i}", "rows": [10 * i, 10 * i + 20],
                   "cols": [0, 30]} for i in range(4)]  # fmt: skip
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: post(web, "api/roi", b, TOKEN), bodies))
        assert all(status == 200 for status, _ in answers), answers
        names = {s["name"] for s in json.loads(h.HistogramConfig)}
        assert {f"race_{i}" for i in range(4)} <= names, names
    finally:
        h.Configure(before)
    for name in ("abc\n", "x" * 41):  # the device's own rule, not a looser one
        status, answer = post(web, "api/roi", {"device": DEV, "image": "image", "name": name, "rows": [0, 9],
                                               "cols": [0, 9]}, TOKEN)  # fmt: skip
        assert status == 400 and "at most 40" in answer["error"], answer
    for body in ({"device": [DEV], "command": "Stop"}, {"device": {"a": 1}, "command": "Stop"}):
        status, answer = post(web, "api/command", body, TOKEN)
        assert status == 404 and "not one this view follows" in answer["error"], answer
    req = urllib.request.Request(
        web + "api/command", b"[" * 100_000, {"X-Livehist-Token": TOKEN}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "must be JSON" in json.loads(err.value.read())["error"]
    with urllib.request.urlopen(web, timeout=30) as r:  # the page's address may hold ?token=
        assert r.headers["Referrer-Policy"] == "no-referrer"


def test_an_image_one_pixel_high_is_drawn_visibly_and_takes_an_roi(site, web, page):
    h = running(site)
    before = h.HistogramConfig
    thin = {"name": "thin", "kind": "image", "pixels": {"first": 0, "shape": [1, 500]}}
    h.Configure(json.dumps([*json.loads(before), thin]))
    try:
        page.goto(web + f"?token={TOKEN}")
        wait_for(lambda: paints(page, "thin") >= 1, 60, "the thin image painted")
        box = page.evaluate(f"() => livehist.panels.find(p => p.name === 'thin' && p.device === '{DEV}').box")
        assert box["h"] >= 24 and box["w"] >= 300, box  # it was 0.8 px high
        status, answer = post(web, "api/roi", {"device": DEV, "image": "thin", "name": "thin_roi",
                                               "rows": [0, 1], "cols": [100, 200]}, TOKEN)  # fmt: skip
        assert status == 200, answer
        # and with the mouse: a drag across the drawn strip
        canvas = page.locator(f'section[data-device="{DEV}"][data-name="thin"] canvas').bounding_box()
        page.locator(f'section[data-device="{DEV}"][data-name="thin"] input[data-roi-name]').fill("thin_drag")
        page.mouse.move(canvas["x"] + box["x"] + box["w"] * 0.5, canvas["y"] + box["y"] + 1)
        page.mouse.down()
        page.mouse.move(
            canvas["x"] + box["x"] + box["w"] * 0.7, canvas["y"] + box["y"] + box["h"] - 1, steps=5
        )
        page.mouse.up()
        roi = wait_for(lambda: {s["name"]: s for s in json.loads(h.HistogramConfig)}.get("thin_drag"), 30,
                       "the dragged ROI on the device")  # fmt: skip
        (r0, r1), (c0, c1) = roi["roi"]["rows"], roi["roi"]["cols"]
        assert (r0, r1) == (0, 1) and abs(c0 - 250) <= 3 and abs(c1 - 350) <= 3, roi
    finally:
        h.Configure(before)


def test_buttons_start_stop_and_reset_the_device(site, web, page):
    h = running(site)
    page.goto(web + f"?token={TOKEN}")
    wait_for(lambda: state_shown(page) == "RUNNING", 60, "RUNNING shown")
    buttons = page.locator(f'section[data-device="{DEV}"][data-kind="status"]')
    buttons.locator('button[data-command="Stop"]').click()
    wait_for(lambda: h.state() == tango.DevState.ON, 30, "the device stopped")
    wait_for(lambda: state_shown(page) == "ON", 30, "ON shown")
    buttons.locator('button[data-command="Reset"]').click()
    wait_for(lambda: h.EventCount == 0, 30, "the device reset")
    buttons.locator('button[data-command="Start"]').click()
    wait_for(lambda: h.state() == tango.DevState.RUNNING, 30, "the device started")
    buttons.locator('button[data-command="Start"]').click()  # again: the device refuses, the page says so
    wait_for(lambda: "Start is not allowed" in page.locator("#message").inner_text(), 30, "the refusal shown")


def test_read_only_refuses_control(site, web, web_ro, page):
    h = running(site)
    page.goto(web_ro)
    wait_for(lambda: paints(page, "image") >= 1, 60, "image painted")
    assert page.locator("#mode").inner_text() == "read-only"
    for button in page.locator("button[data-command]").all():
        assert button.is_disabled()
    before = h.HistogramConfig
    # a rectangle drawn in read-only mode is refused, and the page says how to allow it
    canvas = page.locator(f'section[data-device="{DEV}"][data-name="image"] canvas').bounding_box()
    page.mouse.move(canvas["x"] + 30, canvas["y"] + 30)
    page.mouse.down()
    page.mouse.move(canvas["x"] + 90, canvas["y"] + 90, steps=3)
    page.mouse.up()
    wait_for(lambda: "read-only" in page.locator("#message").inner_text(), 30, "the refusal shown")
    for body, path in (({"device": DEV, "command": "Stop"}, "api/command"),
                       ({"device": DEV, "image": "image", "name": "r", "rows": [0, 5], "cols": [0, 5]}, "api/roi")):  # fmt: skip
        status, answer = post(web_ro, path, body, TOKEN)
        assert status == 403 and "--control-token" in answer["error"]
    assert h.state() == tango.DevState.RUNNING and h.HistogramConfig == before
    # with a token configured: a wrong or missing token is refused too
    for token in (None, "wrong-token-123", TOKEN + "x"):
        status, answer = post(web, "api/command", {"device": DEV, "command": "Stop"}, token)
        assert status == 401 and "token" in answer["error"]
    assert h.state() == tango.DevState.RUNNING
    # a right token cannot reach a device the view does not follow, nor run other commands
    assert post(web, "api/command", {"device": "sys/tg_test/1", "command": "Init"}, TOKEN)[0] == 404
    assert post(web, "api/command", {"device": DEV, "command": "Init"}, TOKEN)[0] == 400
    assert post(web, "api/roi", {"device": DEV, "image": "image", "name": "1bad", "rows": [0, 5],
                                 "cols": [0, 5]}, TOKEN)[0] == 400  # fmt: skip
    assert post(web, "api/roi", {"device": DEV, "image": "image", "name": "ok", "rows": [0.5, 5],
                                 "cols": [0, 5]}, TOKEN)[0] == 400  # fmt: skip
    assert h.state() == tango.DevState.RUNNING and h.HistogramConfig == before


def test_a_device_restart_shows_down_then_recovers(site, web, page):
    running(site)
    page.goto(web)
    wait_for(lambda: state_shown(page) == "RUNNING", 60, "RUNNING shown")
    os.kill(Managed(site.state_dir, "EventHistogrammer-webtest").pid(), signal.SIGKILL)
    wait_for(lambda: state_shown(page) == "DOWN", 30, "DOWN shown")
    assert page.locator(f'section[data-device="{META}"] .state').inner_text() != "DOWN"  # the others go on
    control.up(site.tango_host, site.config_path, site.state_dir, say=lambda s: None)
    running(site)
    wait_for(lambda: state_shown(page) == "RUNNING", 60, "RUNNING shown again")
    n = paints(page, "image")
    wait_for(lambda: paints(page, "image") >= n + 5, 60, "images flowing again")


def handshake(url: str, path: str = "/ws", host: str | None = None, origin: str | None = None) -> str:
    """The status line a raw HTTP/WebSocket request gets (as a browser would send it)."""
    import socket

    port = int(url.rsplit(":", 1)[1].strip("/"))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    if path == "/ws":
        lines += ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                  "Sec-WebSocket-Version: 13"]  # fmt: skip
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return s.makefile("rb").readline().decode("latin-1").strip()


def test_other_web_sites_and_rebound_host_names_are_refused(site, web, page):
    """Browsers let any site open a WebSocket to 127.0.0.1 and, via DNS rebinding, read its
    pages: only the page's own origin (and loopback host names) get data."""
    port = web.rsplit(":", 1)[1].strip("/")
    me = f"http://127.0.0.1:{port}"
    assert " 101 " in handshake(web, origin=me)  # the page itself
    assert " 101 " in handshake(web, origin=f"http://localhost:{port}", host=f"localhost:{port}")
    assert " 101 " in handshake(web)  # no Origin: not a browser (scripts, livehist bench)
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", "file://",
                   f"http://127.0.0.1:{int(port) + 1}"):  # fmt: skip
        assert " 403 " in handshake(web, origin=origin), origin
    # DNS rebinding: evil.example now resolves to 127.0.0.1, the browser sends its name
    for path in ("/ws", "/api/info", "/"):
        assert " 403 " in handshake(
            web, path, host=f"evil.example:{port}", origin=f"http://evil.example:{port}"
        )
        assert " 403 " in handshake(web, path, host=f"evil.example:{port}")
    assert " 200 " in handshake(web, "/api/info")
    # a page from another site cannot reach control even with the token (a POST carries its Origin)
    req = urllib.request.Request(web + "api/command", json.dumps({"device": DEV, "command": "Stop"}).encode(),
                                 {"Content-Type": "application/json", "X-Livehist-Token": TOKEN,
                                  "Origin": "http://evil.example"}, method="POST")  # fmt: skip
    h = running(site)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 403 and "--allow-origin" in json.loads(refused.value.read())["error"]
    assert h.state() == tango.DevState.RUNNING
    # and the page still works in a real browser
    page.goto(web)
    wait_for(lambda: paints(page, "image") >= 1, 60, "image painted")


def test_allow_origin_lets_a_reverse_proxy_in_and_bad_values_are_refused(site):
    url = start_web(site, "web-proxy", DEV, "--allow-origin", "https://beamline.example.org")
    try:
        # nginx as in the README forwards Host 127.0.0.1:PORT and the browser's Origin
        assert " 101 " in handshake(url, origin="https://beamline.example.org")
        assert " 101 " in handshake(url, origin="https://beamline.example.org:443")
        # a proxy that forwards the browser's Host too
        assert " 101 " in handshake(url, host="beamline.example.org", origin="https://beamline.example.org")
        assert " 403 " in handshake(url, origin="http://beamline.example.org")  # not the same scheme
        assert " 403 " in handshake(url, origin="https://other.example.org")
    finally:
        Managed(site.state_dir, "web-proxy").stop()
    for bad in (
        "beamline.example.org",
        "ftp://x.org",
        "https://x.org/path",
        "https://x.org:99999",
        "null",
        "",
    ):
        r = run_cli("web", "--allow-origin", bad, DEV, env=dict(os.environ, TANGO_HOST=site.tango_host))
        assert r.returncode != 0 and "--allow-origin" in r.stderr and "https://" in r.stderr, (bad, r.stderr)


FROZEN = r"""
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
print("connected", flush=True)
time.sleep(3600)  # never reads a byte
"""


def test_a_frozen_browser_drops_frames_alone(site, web, page):
    h = running(site)
    port = web.rsplit(":", 1)[1].strip("/")
    frozen = subprocess.Popen([sys.executable, "-c", FROZEN, port], stdout=subprocess.PIPE, text=True)
    try:
        assert frozen.stdout.readline().strip() == "connected"
        page.goto(web)
        wait_for(lambda: paints(page, "image") >= 2, 60, "image painted")
        counter, n, t0 = h.UpdateCounter, paints(page, "image"), time.monotonic()
        # the frozen client's socket buffers fill up (megabytes of the kernel's, with frames of
        # 90 kB: 5-10 s on a quiet machine, longer on a loaded one), then its frames are dropped
        deadline = t0 + 90
        while True:
            time.sleep(1)
            with urllib.request.urlopen(web + "api/stats", timeout=10) as r:
                stuck = max(json.loads(r.read())["clients"], key=lambda c: c["dropped"])
            if (stuck["dropped"] > 10 and time.monotonic() - t0 > 6) or time.monotonic() > deadline:
                break
        assert stuck["dropped"] > 10 and stuck["waiting"] <= 10  # it drops, and what waits is bounded
        published = (h.UpdateCounter - counter) / (time.monotonic() - t0)
        assert published >= 3  # meanwhile the device published on at its 5/s
        # and this browser kept drawing: a count, not a rate (software painting in chromium on
        # 2 busy cores managed 1 frame/s in one full-suite run; a blocked service gives none)
        assert paints(page, "image") - n >= 3
    finally:
        frozen.kill()
        frozen.wait()


def test_start_background_leaves_the_web_view_running_until_down(site):
    """What `livehist demo --web` does: a managed process that `livehist down` stops."""
    from livehist.site.process import managed_processes
    from livehist.views.web import WEB_PROCESS, start_background

    port = free_port()
    url = start_background(site, port, say=lambda s: None)
    try:
        assert url == f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url + "api/info", timeout=10) as r:
            info = json.loads(r.read())
        assert info["control"] is False and set(info["devices"]) == {DEV, META, FAULTY}
        assert WEB_PROCESS in {p.name for p in managed_processes(site.state_dir)}  # `down` stops it
        assert start_background(site, port, say=lambda s: None) == url  # a second call reuses it
    finally:
        assert Managed(site.state_dir, WEB_PROCESS).stop()
    with pytest.raises(OSError):  # stopped: nothing listens there any more
        urllib.request.urlopen(url + "api/info", timeout=5)


# --- without a browser ----------------------------------------------------------------------
def test_frames_round_trip_any_shape_and_odd_headers():
    for array in (np.arange(7, dtype=np.int64), np.arange(12, dtype=np.int32).reshape(3, 4), None):
        header = {"kind": "x", "device": "a/b/c", "name": "é ü 中", "rate": np.float64(1.5), "n": np.int64(3)}
        h, back = frames.decode(frames.encode(header, array))
        assert h["name"] == "é ü 中" and h["rate"] == 1.5 and h["n"] == 3 and h["t_sent"] > 0
        if array is None:
            assert back is None
        else:
            assert back.shape == array.shape and np.array_equal(back, array)
            assert back.dtype == (np.uint8 if array.ndim == 2 else np.float64)  # counts 0..11: one byte each
            start = len(frames.encode(header, array)) - back.nbytes
            assert start % 8 == 0  # typed arrays in the page need the alignment


@pytest.mark.parametrize(
    "top, wire",
    [(255, np.uint8), (256, np.uint16), (65535, np.uint16), (65536, np.uint32), (2**32 - 1, np.uint32),
     (2**32, np.float32)],
)  # fmt: skip
def test_image_counts_travel_exactly_in_the_smallest_unsigned_type_that_holds_them(top, wire):
    image = np.zeros((3, 5), np.int64)
    image[1, 2] = top
    _, back = frames.decode(frames.encode({"kind": "image"}, image))
    assert back.dtype == wire and back[1, 2] == top and back.sum() == top  # 2**32 is exact in float32 too
    negative = image.copy()
    negative[0, 0] = -1  # not counts: float32, sign kept
    _, back = frames.decode(frames.encode({"kind": "image"}, negative))
    assert back.dtype == np.float32 and back[0, 0] == -1
    for empty in (np.zeros((0, 4), np.int64), np.zeros((2, 3), np.float64)):
        _, back = frames.decode(frames.encode({"kind": "image"}, empty))
        assert back.shape == empty.shape and np.array_equal(back, empty)


def test_a_client_that_does_not_read_is_bounded_and_the_others_get_everything():
    async def scenario():
        hub = Hub(asyncio.get_running_loop())
        slow, fast = hub.join(), hub.join()
        got = []
        for i in range(1000):
            hub.publish(("d/e/v", "image"), b"%d" % i)
            hub.publish(("d/e/v", ":status"), b"s%d" % i)
            got.append(await fast.next_frame())
            got.append(await fast.next_frame())
        assert len(got) == 2000 and got[-2:] == [b"999", b"s999"]
        assert len(slow.waiting) == 2 and slow.dropped == 1998
        assert [await slow.next_frame(), await slow.next_frame()] == [b"999", b"s999"]  # the newest only
        late = hub.join()  # a browser that connects later gets the latest of everything at once
        assert len(late.waiting) == 2

    # in a thread of its own: Playwright's sync API keeps an event loop running in this one
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, scenario()).result(timeout=60)


def test_the_hub_forgets_the_frames_of_histograms_a_device_no_longer_has():
    from livehist.views.web.frames import encode

    async def scenario():
        hub = Hub(asyncio.get_running_loop())
        config = lambda *names: encode({"kind": "config", "histograms": [{"name": n} for n in names]})  # noqa: E731
        hub.publish(("d/e/v", ":config"), config("tof", "img0", "config"))
        for key in ("tof", "img0", ":status", ":metadata", "config"):
            hub.publish(("d/e/v", key), b"x")
        hub.publish(("o/t/her", "img0"), b"y")
        hub.publish(("d/e/v", ":config"), config("tof", "img1", "config"))  # Configure renamed the image
        assert set(hub.latest) == {
            ("d/e/v", k) for k in (":config", "tof", ":status", ":metadata", "config")
        } | {("o/t/her", "img0")}
        # a new browser gets no frame of a histogram gone, and the configuration whatever histograms
        # are named (one named 'config' replaced it)
        waiting = hub.join().waiting
        assert len(waiting) == 6 and next(iter(waiting)) == ("d/e/v", ":config")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, scenario()).result(timeout=60)


def test_layouts_from_json_and_yaml_and_their_errors(tmp_path):
    y = tmp_path / "l.yaml"
    y.write_text("title: SANS2D\ncolumns: 3\npanels:\n  - {device: a/b/1, show: status, width: 3}\n"
                 "  - {device: a/b/1, show: tof, scale: log}\n  - device: a/b/1\n")  # fmt: skip
    lay = load_layout(y)
    assert lay.title == "SANS2D" and lay.columns == 3 and lay.devices == ["a/b/1"]
    assert [p.show for p in lay.panels] == ["status", "tof", "histograms"] and lay.panels[1].scale == "log"
    j = tmp_path / "l.json"
    j.write_text(json.dumps(lay.to_json()))
    assert load_layout(j) == lay
    bad = {
        "[1, 2]": "must be a mapping",
        "panels: []": "panels must be a non-empty list",
        "columns: 9\npanels: [{device: a/b/c}]": "columns must be an integer from 1 to 4, got 9",
        "panels: [{device: abc}]": "panels[0].device must be a Tango device name",
        "panels: [{device: a/b/c, scale: huge}]": "panels[0].scale must be linear or log, got 'huge'",
        "panels: [{device: a/b/c, width: 3}]": "panels[0].width must be an integer from 1 to columns (2), got 3",
        "panels: [{device: a/b/c, colour: red}]": "unknown key(s) ['colour']",
        "panels: [{device: a/b/c}]\nextra: 1": "unknown key(s) ['extra']",
        "panels: [{device: a/b/c": "not valid YAML",
        # 300 bytes that YAML's aliases would make 10**8 values (took 35 s and 1 GB, then a traceback)
        "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\npanels: [{device: a/b/c, show: *b}]": "aliases (*name) are not allowed",
        "panels: [{device: a/b/c, show: tof}, {device: A/B/C, show: tof}]": "panels[1] repeats panels[0]",
        f"title: [{'x, ' * 10000}x]\npanels: [{{device: a/b/c}}]": "title must be a string, got ['x', 'x',",
    }
    for text, message in bad.items():
        y.write_text(text)
        with pytest.raises(LayoutError) as err:
            load_layout(y)
        assert message in str(err.value) and str(y) in str(err.value), (text, str(err.value))
        assert len(str(err.value)) < 600, "the bad value is cut short, not copied whole"
    y.write_text("panels: [{device: a/b/c}]\n" + "#" * (1 << 20))
    with pytest.raises(LayoutError, match="a layout is at most"):
        load_layout(y)
    with pytest.raises(LayoutError, match="cannot read"):
        load_layout(tmp_path / "missing.yaml")
    with pytest.raises(LayoutError, match="must be a string"):
        parse_layout({"title": 5, "panels": [{"device": "a/b/c"}]})
    many = tmp_path / "many.json"  # panels a script made: checked in a moment (was quadratic: 40 s)
    many.write_text(json.dumps({"panels": [{"device": "a/b/c", "show": f"h{i}"} for i in range(20000)]}))
    t0 = time.monotonic()
    assert len(load_layout(many).panels) == 20000 and time.monotonic() - t0 < 10
    with pytest.raises(LayoutError, match=r"panels\[1\] repeats panels\[0\]"):
        parse_layout({"panels": [{"device": "a/b/c"}, {"device": "tango://h:1/A/B/C"}]})


def test_livehist_web_refuses_bad_input_with_clear_messages(site, tmp_path):
    env = dict(os.environ, TANGO_HOST=site.tango_host)
    env.pop("LIVEHIST_WEB_TOKEN", None)
    taken = Managed(site.state_dir, "web-control").record()
    cases = [
        (["--port", "0"], "--port must be from 1 to 65535, got 0"),
        (["--port", "70000"], "--port must be from 1 to 65535, got 70000"),
        (["--bind", "no.such.host.invalid"], "--bind 'no.such.host.invalid' is not an address"),
        (["no/such/device"], "device 'no/such/device' is not in the Tango DB"),
        (["sys/tg_test/1"], "is a TangoTest; livehist web shows EventHistogrammer"),
        (["not-a-device"], "device names are domain/family/member, got 'not-a-device'"),
        (["--control-token", "short"], "at least 8 characters"),
        (["--control-token", "schlüssel-geheim"], "printable ASCII"),
        (["--control-token", " padded-token "], "must not begin or end with a space"),
        ([f"tango://127.0.0.1:1/{DEV}"], f"give the device as '{DEV}' with --tango-host 127.0.0.1:1"),
        ([DEV, DEV.upper()], "are one device (Tango names ignore case)"),
        (["--layout", str(tmp_path / "none.yaml")], "cannot read it"),
        (["--tango-host", "nohost"], "Tango host must be HOST:PORT, got 'nohost'"),
    ]
    layout = tmp_path / "l.yaml"
    layout.write_text(f"panels: [{{device: {DEV}}}]\n")
    cases.append((["--layout", str(layout), DEV], "either on the command line or in --layout"))
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(f"panels: [{{device: {DEV}}}, {{device: {META}, show: status}}]\n")
    cases.append(
        (["--layout", str(mixed)], f"panels[1] shows 'status' of {META}, a MetadataManager; show metadata")
    )
    if taken:  # the port of the running web view
        port = next(a for a in taken["argv"][taken["argv"].index("--port") + 1 :])
        cases.append((["--port", port, DEV], f"cannot listen on 127.0.0.1:{port}"))
    for args, message in cases:
        out = run_cli("web", *args, env=env, timeout=60)
        assert out.returncode == 1 and message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
    empty = dict(env, TANGO_HOST=f"127.0.0.1:{free_port()}")
    out = run_cli("web", env=empty, timeout=120)
    assert out.returncode == 1 and "no Tango DB answers" in out.stderr, out.stderr


def test_web_follows_a_layout_file_and_a_device_that_is_down(site, page, tmp_path):
    """A layout naming one histogram and a second device whose server is not running."""
    db = tango.Database(*site.host_port)
    info = tango.DbDevInfo()
    info.name, info._class, info.server = (
        "webtest/histogrammer/2",
        "EventHistogrammer",
        "EventHistogrammer/nowhere",
    )
    db.add_device(info)
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"title": "beamline ü", "columns": 1, "panels": [
        {"device": DEV, "show": "image", "scale": "linear"},
        {"device": "webtest/histogrammer/2", "show": "status"}]}))  # fmt: skip
    running(site)
    url = start_web(site, "web-layout", "--layout", str(layout))
    try:
        page.goto(url)
        wait_for(lambda: paints(page, "image") >= 2, 60, "image painted")
        assert page.title() == "beamline ü"
        assert (
            page.locator("section.panel").count() == 2
            and page.locator('section[data-name="tof"]').count() == 0
        )
        wait_for(lambda: state_shown(page, "webtest/histogrammer/2") == "DOWN", 30, "the absent device DOWN")
    finally:
        Managed(site.state_dir, "web-layout").stop()
        db.delete_device("webtest/histogrammer/2")


def test_a_layout_naming_devices_by_tango_url_shows_and_controls_them(site, page, tmp_path):
    """`tango://HOST:PORT/a/b/c` in a layout is the device a/b/c (its panels matched no frame)."""
    url_of = lambda dev: f"tango://{site.tango_host}/{dev}"  # noqa: E731
    layout = tmp_path / "by-url.yaml"
    layout.write_text(json.dumps({"panels": [
        {"device": url_of(DEV), "show": "status"}, {"device": url_of(DEV), "show": "tof"},
        {"device": url_of(META), "show": "metadata"}]}))  # fmt: skip
    running(site)
    url = start_web(site, "web-by-url", "--layout", str(layout), "--control-token", TOKEN)
    try:
        page.goto(url)
        wait_for(lambda: paints(page, "tof") >= 1, 60, "tof painted")
        wait_for(lambda: state_shown(page) in ("RUNNING", "ALARM"), 30, "the device's state")
        assert page.locator('[data-meta="proposal"]').inner_text() == "20260042"
        with urllib.request.urlopen(url + "api/info", timeout=10) as r:
            panels = json.loads(r.read())["layout"]["panels"]
        assert [p["device"] for p in panels] == [DEV, DEV, META]
        assert post(url, "api/command", {"device": panels[0]["device"], "command": "Reset"}, TOKEN)[0] == 200
    finally:
        Managed(site.state_dir, "web-by-url").stop()


def test_metadata_beyond_latin1_shows_as_written_not_as_tango_escapes(site, web, page):
    meta = tango.DeviceProxy(site.url(META))
    name = "α-Fe2O3 \\ Å 🧪"
    meta.SetMetadata(json.dumps({"sample": {"name": name}}))
    try:
        page.goto(web)
        wait_for(lambda: page.locator('[data-meta="sample"]').inner_text() == name, 30, "the sample name")
    finally:
        meta.SetMetadata(json.dumps({"sample": {"name": "Si"}}))


def test_a_metadata_manager_that_dies_shows_down_not_its_last_values(site, web, page):
    meta = page.locator(f'section[data-device="{META}"][data-kind="metadata"]')
    page.goto(web)
    wait_for(lambda: meta.locator(".state").inner_text() == "ON", 60, "the metadata manager ON")
    os.kill(Managed(site.state_dir, "MetadataManager-webtest").pid(), signal.SIGKILL)
    try:
        wait_for(lambda: meta.locator(".state").inner_text() == "DOWN", 30, "DOWN shown")
        assert page.locator('[data-meta="proposal"]').inner_text() == "-"  # not the last proposal seen
    finally:
        control.up(site.tango_host, site.config_path, site.state_dir, say=lambda s: None)
    wait_for(lambda: meta.locator(".state").inner_text() == "ON", 60, "ON again")
    wait_for(lambda: page.locator('[data-meta="proposal"]').inner_text() == "20260042", 30, "the proposal")


def test_a_histogram_named_config_or_metadata_does_not_hide_the_configuration(site, web, page):
    """Histogram frames and the device's own frames (configuration, status) shared one key space."""
    h = running(site)
    odd = [{"name": n, "kind": "tof", "tof": {"start": 0, "stop": 72000, "bins": 50, "unit": "us"}}
           for n in ("config", "metadata")]  # fmt: skip
    h.Configure(json.dumps(HISTOGRAMS[:1] + odd))
    try:
        page.goto(web)
        wait_for(lambda: paints(page, "config") >= 2, 60, "read while a browser looks")
        page.reload()  # a new browser: it got the histogram 'config' in place of the configuration
        wait_for(lambda: paints(page, "config") >= 1 and paints(page, "metadata") >= 1, 60, "both painted")
        assert paints(page, "tof") >= 1 and state_shown(page) in ("RUNNING", "ALARM")
    finally:
        h.Configure(json.dumps(HISTOGRAMS))


def test_every_wire_type_of_an_image_frame_is_one_the_page_decodes():
    """The page's TYPED map (livehist.js) must name every dtype `frames.encode` can send."""
    import re
    from pathlib import Path

    js = (Path(frames.__file__).parent / "static" / "livehist.js").read_text()
    typed = set(re.search(r"const TYPED = \{([^}]*)\}", js)[1].replace(" ", "").split(","))
    typed = {entry.split(":")[0] for entry in typed if entry}
    arrays = [np.zeros(3), np.array([[True, False]]), np.array([[-1, 2]], np.int8), np.array([[2**64 - 1]], np.uint64),
              np.array([[300, 0]], ">i8"), np.arange(40, dtype=np.int64).reshape(5, 8)[:, ::2] * 10**8,
              np.zeros((0, 0), np.int64), np.array([[1.0, 2.0]]), np.array([[70000]], np.uint32)]  # fmt: skip
    for array in arrays:
        header, back = frames.decode(frames.encode({"kind": "image"}, array))
        assert header["dtype"] in typed, header["dtype"]
        if array.dtype.kind in "iub" and array.size and array.min() >= 0 and array.max() < 2**32:
            assert back.dtype.kind == "u" and np.array_equal(back.astype(np.int64), array.astype(np.int64))
