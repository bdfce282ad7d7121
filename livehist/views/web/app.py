"""The ASGI application of `livehist web`: one page, its static files, a WebSocket, control.

    GET  /              the page (static/index.html)
    GET  /static/...    its script and style (packaged with livehist: no CDN)
    GET  /api/info      the layout, the devices and whether control is on
    GET  /api/stats     frames sent and dropped per browser
    WS   /ws            binary frames (frames.py), newest first per key
    POST /api/command   {"device", "command": Start|Stop|Reset}           (token)
    POST /api/roi       {"device", "image", "name", "rows", "cols"}       (token)

Control needs the token given to `livehist web` (header `X-Livehist-Token`); without a
token the service is read-only and both POSTs answer 403.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from livehist.engine.spec import NAME_RE
from livehist.views.web.follower import Follower, _error_text
from livehist.views.web.hub import Hub
from livehist.views.web.layout import Layout

STATIC = Path(__file__).parent / "static"
COMMANDS = ("Start", "Stop", "Reset")
TOKEN_HEADER = "x-livehist-token"


@dataclass
class Service:
    """What the application serves: devices (name -> (url, class)), the layout, the token."""

    devices: dict[str, tuple[str, str]]
    layout: Layout
    token: str | None = None
    max_rate: float = 10.0
    loopback: bool = True  # bound to a loopback address: other host names are refused (DNS rebinding)
    allowed_origins: tuple[str, ...] = ()  # origins a browser may come from besides the page's own
    followers: list[Follower] = field(default_factory=list)
    hub: Hub | None = None


def _refuse(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status_code=status)


def create_app(service: Service) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.hub = Hub(asyncio.get_running_loop())
        for name, (url, cls) in service.devices.items():
            f = Follower(name, url, cls, service.hub.publish_threadsafe, service.max_rate,
                         watched=lambda: bool(service.hub.clients))  # fmt: skip
            f.start()
            service.followers.append(f)
        try:
            yield
        finally:
            for f in service.followers:
                f.stop()
            for f in service.followers:
                await asyncio.to_thread(f.join, 5)

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"layout": service.layout.to_json(), "control": service.token is not None,
                             "devices": {n: cls for n, (_, cls) in service.devices.items()}})  # fmt: skip

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"clients": service.hub.stats() if service.hub else [],
                             "reads": {f.device: f.reads for f in service.followers}})  # fmt: skip

    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        client = service.hub.join()
        for f in service.followers:
            f.kick()  # its frames may be old: the newcomer gets current ones

        async def send() -> None:
            while True:
                frame = await client.next_frame()
                await ws.send_bytes(frame)
                client.sent += 1

        sender = asyncio.create_task(send())
        try:
            while True:  # the page says nothing; this notices when it goes
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
        except WebSocketDisconnect:
            pass
        finally:
            service.hub.leave(client)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    async def _authorised(request: Request) -> tuple[dict | None, JSONResponse | None]:
        if service.token is None:
            return None, _refuse(403, "this livehist web is read-only: start it with --control-token "
                                      "(or LIVEHIST_WEB_TOKEN) to allow control")  # fmt: skip
        given = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), service.token.encode()):
            return None, _refuse(401, "wrong or missing control token (header X-Livehist-Token)")
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None, _refuse(400, "the request body must be JSON (a small object)")
        if not isinstance(body, dict):
            return None, _refuse(400, "the request body must be a JSON object")
        device = body.get("device")
        if not isinstance(device, str) or device not in service.devices:
            return None, _refuse(404, f"device {device!r} is not one this view follows "
                                      f"({', '.join(service.devices)})")  # fmt: skip
        return body, None

    async def command(request: Request) -> JSONResponse:
        body, refused = await _authorised(request)
        if refused:
            return refused
        cmd = body.get("command")
        if cmd not in COMMANDS:
            return _refuse(400, f"command must be one of {', '.join(COMMANDS)}, got {cmd!r}")
        url = service.devices[body["device"]][0]
        error = await asyncio.to_thread(_run_command, url, cmd)
        return _refuse(409, error) if error else JSONResponse({"ok": True})

    async def roi(request: Request) -> JSONResponse:
        body, refused = await _authorised(request)
        if refused:
            return refused
        url, cls = service.devices[body["device"]]
        if cls == "MetadataManager":
            return _refuse(400, f"{body['device']} is a MetadataManager: it has no histograms")
        name, image = body.get("name"), body.get("image")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            return _refuse(
                400, f"ROI name must be a letter then letters, digits or _ (at most 40), got {name!r}"
            )
        for key in ("rows", "cols"):
            v = body.get(key)
            if not (isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)):
                return _refuse(400, f"{key} must be two integers [first, end), got {v!r}")
        error = await asyncio.to_thread(_configure_roi, url, image, name, body["rows"], body["cols"])
        return _refuse(409, error) if error else JSONResponse({"ok": True, "name": name})

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/stats", stats),
        Route("/api/command", command, methods=["POST"]),
        Route("/api/roi", roi, methods=["POST"]),
        WebSocketRoute("/ws", stream),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[
        Middleware(SameOrigin, loopback=service.loopback, allowed=service.allowed_origins),
        Middleware(NoReferrer)])  # fmt: skip


LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def _is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host(hostport: str) -> tuple[str, str]:
    """("name", "port") of a Host header value or an origin's netloc ("" when no port)."""
    hostport = hostport.strip().lower()
    if hostport.startswith("["):  # [::1]:8050
        end = hostport.find("]")
        return hostport[: end + 1], hostport[end + 2 :] if end >= 0 else ""
    name, _, port = hostport.partition(":")
    return name, port


def normal_origin(origin: str) -> str | None:
    """scheme://host[:port] of an Origin header or an --allow-origin value, its default port
    dropped; None when it is not one (e.g. "null", from a sandboxed page or a file)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


class SameOrigin:
    """Answers only the page's own origin, the allowed ones, and (bound to loopback) loopback names.

    Browsers let any web site open a WebSocket to 127.0.0.1 (no CORS for WebSockets), and a
    site whose name re-resolves to 127.0.0.1 (DNS rebinding) even reads its answers. So a
    request that carries an `Origin` must come from the page itself (its host and port are
    the `Host` the request was sent to) or from an `--allow-origin`, and while the service
    listens on loopback only, the `Host` must be a loopback name or an allowed origin's
    host. Non-browser clients (no `Origin`) and the page itself pass."""

    def __init__(self, app, loopback: bool, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.loopback = loopback
        self.allowed = {o for o in map(normal_origin, allowed) if o}
        self.allowed_hosts = {_split_host(o.split("://", 1)[1])[0] for o in self.allowed}

    def refusal(self, scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        name, port = _split_host(host)
        if self.loopback and not (_is_loopback(name) or name in self.allowed_hosts):
            return (f"host {host[:80]!r} is not this service's: it listens on loopback only; "
                    "open it as http://127.0.0.1:PORT/ or start livehist web with --allow-origin")  # fmt: skip
        origin = headers.get("origin")
        if origin is None:
            return None
        seen = normal_origin(origin)
        if seen is not None and (
            seen in self.allowed or seen.split("://", 1)[1] == _host_only(name, port, seen)
        ):
            return None
        return (f"origin {origin[:80]!r} may not use this service; start livehist web with "
                f"--allow-origin {origin[:80] if seen else 'URL'} to allow it")  # fmt: skip

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        why = self.refusal(scope)
        if why is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # refused before the handshake: the browser sees 403
            await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
            return
        await _refuse(403, why)(scope, receive, send)


def _host_only(name: str, port: str, origin: str) -> str:
    """The Host header as an origin writes it (default port of the origin's scheme dropped)."""
    default = "443" if origin.startswith("https:") else "80"
    return name if port in ("", default) else f"{name}:{port}"


class NoReferrer:
    """Every HTTP answer says `Referrer-Policy: no-referrer`: the page's address may carry
    ?token=, which must not travel in the Referer of the requests the page makes."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_policy(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"referrer-policy", b"no-referrer")]
            await send(message)

        await self.app(scope, receive, send_with_policy)


def _proxy(url: str):
    import tango

    p = tango.DeviceProxy(url)
    p.set_timeout_millis(10_000)
    return p


def _run_command(url: str, cmd: str) -> str | None:
    """Run Start/Stop/Reset; the device's own error text, or None."""
    try:
        _proxy(url).command_inout(cmd)
    except Exception as exc:
        return f"{cmd}: {_error_text(exc)}"
    return None


def roi_spec(specs: list[dict], image: str, name: str, rows: list[int], cols: list[int]) -> list[dict]:
    """The histogram list with ROI `name` over `image` added (or replaced: same name)."""
    source = next((s for s in specs if s.get("name") == image), None)
    if source is None or source.get("kind") != "image":
        raise ValueError(f"{image!r} is not an image histogram of this device")
    if any(s.get("name") == name and s.get("kind") != "roi" for s in specs):
        raise ValueError(f"{name!r} is already the name of the {next(s['kind'] for s in specs if s['name'] == name)}"
                         " histogram; choose another ROI name")  # fmt: skip
    tof = next((s["tof"] for s in specs if s.get("kind") == "tof" and "tof" in s), None)
    tof = tof or {"start": 0, "stop": 100_000_000, "bins": 1000, "unit": "ns"}
    new = {"name": name, "kind": "roi", "pixels": dict(source["pixels"]),
           "roi": {"rows": list(rows), "cols": list(cols)}, "tof": tof}  # fmt: skip
    out = [s for s in specs if s.get("name") != name]
    out.append(new)
    return out


_ROI_LOCKS: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)


def _configure_roi(url: str, image: str, name: str, rows: list[int], cols: list[int]) -> str | None:
    """Read the histogram list, add the ROI, Configure: one at a time per device, so ROIs drawn
    at once in two browsers both land (each read-modify-write sees the one before it). A change
    made by another Tango client between the read and the Configure is still overwritten."""
    with _ROI_LOCKS[url]:
        return _configure_roi_locked(url, image, name, rows, cols)


def _configure_roi_locked(url: str, image: str, name: str, rows: list[int], cols: list[int]) -> str | None:
    try:
        p = _proxy(url)
        specs = json.loads(p.read_attribute("HistogramConfig").value)
        p.command_inout("Configure", json.dumps(roi_spec(specs, image, name, rows, cols)))
    except ValueError as exc:
        return f"ROI {name}: {exc}"
    except Exception as exc:  # DevFailed: the device's own message (bad rows, too much memory...)
        return f"Configure: {_error_text(exc)}"
    return None
