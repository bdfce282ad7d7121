"""`livehist web`: a live browser view of the histogrammers, served by an ordinary Tango client.

    livehist web [--port 8050] [--bind 127.0.0.1] [--layout FILE] [--control-token TOKEN] [DEVICE ...]

Default devices: every EventHistogrammer and HistogramSum in the Tango DB, and the
MetadataManager(s). Read-only unless a control token is given (or LIVEHIST_WEB_TOKEN is set).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from livehist.errors import LivehistError

HISTOGRAMMER_CLASSES = ("EventHistogrammer", "HistogramSum")
METADATA_CLASS = "MetadataManager"
TOKEN_ENV = "LIVEHIST_WEB_TOKEN"


def _host_port(tango_host: str | None) -> tuple[str, int]:
    if not tango_host and not os.environ.get("TANGO_HOST"):
        from livehist.site.control import Site

        tango_host = Site.from_state(None).tango_host  # where `livehist up` put it
    text = tango_host or os.environ["TANGO_HOST"]
    host, _, port = text.split(",")[0].rpartition(":")
    if not host or not port.isdigit():
        raise LivehistError(f"Tango host must be HOST:PORT, got {text!r}")
    return host, int(port)


def find_devices(names: list[str], tango_host: str | None = None) -> dict[str, tuple[str, str]]:
    """name -> (tango:// URL, class): the named devices, or the defaults from the DB."""
    import tango

    from livehist.views.web.layout import short_device

    host, port = _host_port(tango_host)
    try:
        db = tango.Database(host, port)
    except tango.DevFailed as exc:
        raise LivehistError(f"no Tango DB answers at {host}:{port} ({exc.args[0].desc.strip()}); "
                            "run `livehist up` or set TANGO_HOST") from None  # fmt: skip
    found: dict[str, tuple[str, str]] = {}
    if not names:
        for cls in (*HISTOGRAMMER_CLASSES, METADATA_CLASS):
            for name in sorted(db.get_device_name("*", cls).value_string):
                found[name] = (f"tango://{host}:{port}/{name}", cls)
        if not any(cls in HISTOGRAMMER_CLASSES for _, cls in found.values()):
            raise LivehistError(f"the Tango DB at {host}:{port} has no EventHistogrammer or HistogramSum "
                                "device; run `livehist up`, or name devices: livehist web DEVICE ...")  # fmt: skip
        return found
    for name in names:
        short = short_device(name)
        if name.startswith("tango://"):
            given = name[len("tango://") :].split("/", 1)[0]
            if given.lower() not in (f"{host}:{port}".lower(), f"{host.split('.')[0]}:{port}".lower()):
                raise LivehistError(
                    f"{name!r} names the Tango host {given}, but this view reads {host}:{port}; "
                    f"give the device as {short!r} with --tango-host {given}"
                )
        if short.count("/") != 2:
            raise LivehistError(f"device names are domain/family/member, got {name!r}")
        try:
            cls = db.get_class_for_device(short)
        except tango.DevFailed:
            cls = ""
        if not cls or cls == "DServer":
            raise LivehistError(f"device {short!r} is not in the Tango DB at {host}:{port}; "
                                "check the name (`livehist status` lists them)")  # fmt: skip
        if cls not in (*HISTOGRAMMER_CLASSES, METADATA_CLASS):
            raise LivehistError(f"device {short!r} is a {cls}; livehist web shows EventHistogrammer, "
                                "HistogramSum and MetadataManager devices")  # fmt: skip
        twin = next((n for n in found if n.lower() == short.lower() and n != short), None)
        if twin is not None:
            raise LivehistError(f"{short!r} and {twin!r} are one device (Tango names ignore case); "
                                "write it the same way everywhere")  # fmt: skip
        found[short] = (f"tango://{host}:{port}/{short}", cls)
    return found


def listen_socket(bind: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a clear error, not a log line."""
    if not 0 < port < 65536:
        raise LivehistError(f"--port must be from 1 to 65535, got {port}")
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise LivehistError(f"--bind {bind!r} is not an address of this machine ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise LivehistError(
            f"cannot listen on {bind}:{port}: {exc.strerror}; choose another --port or --bind"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def web(devices: list[str], port: int = 8050, bind: str = "127.0.0.1", layout: Path | None = None,
        control_token: str | None = None, tango_host: str | None = None, say=print,
        allow_origins: list[str] = ()) -> int:  # fmt: skip
    """Serve the page until interrupted."""
    from livehist.views.web.layout import default_layout, load_layout

    token = control_token if control_token is not None else os.environ.get(TOKEN_ENV)
    if token is not None and len(token.strip()) < 8:
        raise LivehistError(
            "the control token must be at least 8 characters (it guards Start/Stop/Configure)"
        )
    if token is not None and token != token.strip():
        raise LivehistError(
            "the control token must not begin or end with a space (HTTP drops those, so no browser "
            "could send it); remove the spaces"
        )
    if token is not None and not (token.isascii() and token.isprintable()):
        raise LivehistError("the control token must be printable ASCII (browsers send it in an HTTP header)")
    for origin in allow_origins:
        from livehist.views.web.app import normal_origin

        if normal_origin(origin) is None:
            raise LivehistError(
                f"--allow-origin {origin[:80]!r}: give a browser origin, scheme://host[:port] with "
                "scheme http or https and nothing after it, e.g. https://beamline.example.org"
            )
    if layout is not None:
        lay = load_layout(layout)
        if devices:
            raise LivehistError("name devices either on the command line or in --layout, not both")
        found = find_devices(lay.devices, tango_host)
        lay = lay.by_short_names()
        for i, p in enumerate(lay.panels):  # a MetadataManager sends no status or histograms: '?' forever
            cls = found[p.device][1]
            if (cls == METADATA_CLASS) != (p.show == "metadata"):
                fits = "metadata" if cls == METADATA_CLASS else "status, histograms or a histogram name"
                raise LivehistError(f"layout {layout}: panels[{i}] shows {p.show!r} of {p.device}, a {cls}; "
                                    f"show {fits} for it")  # fmt: skip
    else:
        found = find_devices(devices, tango_host)
        lay = default_layout([n for n, (_, c) in found.items() if c != METADATA_CLASS],
                             [n for n, (_, c) in found.items() if c == METADATA_CLASS])  # fmt: skip
    try:
        import uvicorn

        from livehist.views.web.app import Service, create_app
    except ImportError as exc:
        raise LivehistError(
            f"livehist web needs the web extra: pip install 'livehist[web]' ({exc})"
        ) from None
    sock = listen_socket(bind, port)
    host = sock.getsockname()[0]  # what was bound ("0" is 0.0.0.0: every interface)
    from livehist.views.web.app import _is_loopback

    app = create_app(
        Service(found, lay, token, loopback=_is_loopback(host), allowed_origins=tuple(allow_origins))
    )
    shown = f"[{host}]" if ":" in host else host
    say(f"livehist web: {len(found)} device(s): {', '.join(found)}")
    if host in ("0.0.0.0", "::"):
        say("livehist web: listening on every interface; put it behind the site's reverse proxy (README)")
    say(f"livehist web: open http://{shown}:{port}/  ({'control with the token' if token else 'read-only'})")
    # no per-message deflate: compressing 1 MB images 10 times a second costs more than sending them
    config = uvicorn.Config(app, log_level="warning", ws_max_size=1 << 16, ws_per_message_deflate=False,
                            lifespan="on")  # fmt: skip
    uvicorn.Server(config).run(sockets=[sock])
    return 0


WEB_PROCESS = "livehist-web"


def start_background(site, port: int = 8050, say=print) -> str:
    """Leave `livehist web` running for a site (stopped by `livehist down`); its URL."""
    import sys
    import time
    import urllib.request

    from livehist.site.process import Managed

    url = f"http://127.0.0.1:{port}/"
    proc = Managed(site.state_dir, WEB_PROCESS)
    if proc.pid() is None:
        try:
            listen_socket("127.0.0.1", port).close()
        except LivehistError as exc:
            raise LivehistError(f"the web view cannot start: {exc}") from None
        proc.start([sys.executable, "-m", "livehist.cli", "web", "--port", str(port), "--tango-host", site.tango_host],
                   env=site.server_env())  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "api/info", timeout=2) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        if proc.pid() is None or time.monotonic() > deadline:
            raise LivehistError(f"the web view did not start; its log {proc.log}:\n{proc.log_tail()}")
        time.sleep(0.3)
