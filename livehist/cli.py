"""The `livehist` command line (names fixed in CONTRACT.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from livehist.errors import LivehistError


def _path(text: str) -> Path:
    """A path option; an empty one (`--state-dir "$DIR"` with DIR unset) is refused: it meant the
    current folder, and `up` filled it with a database, logs and pids."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a folder or file path")
    from livehist.site.process import expand_home

    try:
        return expand_home(text)
    except LivehistError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _site_options(p: argparse.ArgumentParser, host: bool = True, config: bool = True) -> None:
    if host:
        p.add_argument("--tango-host", metavar="HOST:PORT",
                       help="Tango DB (default: $TANGO_HOST, else 127.0.0.1:10000)")  # fmt: skip
    if config:
        p.add_argument("--config", type=_path, metavar="FILE",
                       help="dsconfig JSON (default: tango-db/livehist.json)")  # fmt: skip
    p.add_argument("--state-dir", type=_path, metavar="DIR",
                   help="DB file, logs, pids (default: $LIVEHIST_STATE_DIR, else ~/.local/state/livehist)")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="livehist", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "up",
        help="start the Tango DB (if needed) and every configured server "
        "(exit status 4: all answer, some in FAULT)",
    )
    _site_options(p)
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each start")
    p = sub.add_parser("down", help="stop exactly what `up` started")
    _site_options(p, host=False, config=False)
    p = sub.add_parser("status", help="devices, states, rates")
    _site_options(p)
    p = sub.add_parser("demo", help="up, then a short live acquisition and a Sardana scan")
    _site_options(p)
    p.add_argument("--out", type=_path, metavar="DIR",
                   help="data root for the demo dataset (default: the MetadataManager's DataRoot)")  # fmt: skip
    p.add_argument("--web", action="store_true",
                   help="leave the web view running afterwards (http://127.0.0.1:8050/, read-only)")  # fmt: skip
    p = sub.add_parser(
        "web", help="a live browser view of the histogrammers (read-only unless a token is given)"
    )
    p.add_argument("devices", nargs="*", metavar="DEVICE",
                   help="devices to show (default: every EventHistogrammer and HistogramSum, and the MetadataManager)")  # fmt: skip
    p.add_argument("--port", type=int, default=8050, help="HTTP port (default 8050)")
    p.add_argument("--bind", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; expose it through a reverse proxy)")  # fmt: skip
    p.add_argument(
        "--layout", type=_path, metavar="FILE", help="JSON or YAML layout (default: every histogram)"
    )
    p.add_argument("--control-token", metavar="TOKEN",
                   help="allow Start/Stop/Reset/ROIs to browsers that give this token "
                        "(default: $LIVEHIST_WEB_TOKEN; unset: read-only)")  # fmt: skip
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="a browser origin besides the page's own that may use the service, e.g. the "
                        "site's reverse proxy https://beamline.example.org (repeatable)")  # fmt: skip
    p.add_argument(
        "--tango-host", metavar="HOST:PORT", help="Tango DB (default: $TANGO_HOST, else 127.0.0.1:10000)"
    )
    p = sub.add_parser("stream", help="publish sim:// or nexus:// events as ev44 on ZeroMQ or Kafka")
    p.add_argument("source", help="sim://?rate=1e6 or nexus:///path.nxs?rate=realtime")
    to = p.add_mutually_exclusive_group()
    to.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint to bind")
    to.add_argument("--kafka", metavar="BROKER/TOPIC", help="publish to this Kafka topic instead")
    p.add_argument("--partitions", type=int, metavar="N",
                   help="partitions of the Kafka topic when it is created (default 1)")  # fmt: skip
    p.add_argument("--pub", action="store_true", help="PUB socket (for zmq+sub://) instead of PUSH")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: never)")
    p = sub.add_parser("plot", help="PNG pictures of the histograms recorded in a NeXus file")
    p.add_argument("file", type=_path, help="a .nxs file written by livehist")
    p.add_argument("--out", type=_path, metavar="DIR", help="folder for the PNGs (default: beside the file)")
    p = sub.add_parser("listen", help="print hs01 histograms re-streamed by an EventHistogrammer")
    p.add_argument("endpoint", help="the device's RestreamEndpoint, e.g. tcp://127.0.0.1:5560")
    p.add_argument("--count", type=int, default=0, help="stop after this many messages (0: never)")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: never)")
    p = sub.add_parser("repair", help="make a NeXus file left open by a crashed writer readable again")
    p.add_argument("file", type=_path, help="the .nxs file (its unfinished entries are marked incomplete)")
    p = sub.add_parser("view", help="a Taurus panel on a running EventHistogrammer")
    p.add_argument("device", nargs="?", default="livehist/histogrammer/1", help="device name or tango:// URL")
    p.add_argument("--metadata", default="livehist/metadata/1", help="the MetadataManager to summarise")
    p.add_argument(
        "--screenshot", type=_path, metavar="PNG", help="save a picture of the panel after --seconds"
    )
    p.add_argument("--seconds", type=float, default=0.0, help="close after this long (0: stay open)")
    p.add_argument("--trace", action="store_true", help="print the device states the panel sees")
    p.add_argument(
        "--rate",
        type=float,
        default=5.0,
        metavar="HZ",
        help="redraws per second at most, 0.1 to 10 (default 5): spectra, counters and image",
    )
    p.add_argument("--image-rate", type=float, default=5.0, metavar="HZ",
                   help="image refreshes per second at most, 0.1 to 10 (default 5; never above --rate)")  # fmt: skip
    p = sub.add_parser("bench", help="benchmarks, each beside a reference measured in the same run")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quick", action="store_true", help="short runs (for smoke tests)")
    p.add_argument("--only", nargs="+", metavar="SECTION",
                   help="only these sections: engine zmq kafka scaling device web recorders sardana")  # fmt: skip
    return ap


class _QuietWhenClosed:
    """stdout that goes quiet when it cannot be written: its reader has gone (`livehist up | head -1`),
    its disk is full (`livehist up > up.log`), or it was closed (`>&-`). The command finishes its work
    (servers started, files written) instead of dying half way; a full disk or an I/O error is noted
    once on stderr."""

    def __init__(self, stream) -> None:
        self.stream = stream if stream is not None else open(os.devnull, "w")  # noqa: SIM115

    def _lost(self, exc: OSError) -> None:
        self.stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        if not isinstance(exc, BrokenPipeError):
            try:
                print(f"livehist: standard output cannot be written ({exc.strerror or exc}); going on without it",
                      file=sys.stderr)  # fmt: skip
            except (OSError, AttributeError):
                pass

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            self._lost(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            self._lost(exc)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not isinstance(sys.stdout, _QuietWhenClosed):
        if sys.stdout is not None and hasattr(
            sys.stdout, "reconfigure"
        ):  # progress lines reach a pipe (`up | tee up.log`) as they come
            sys.stdout.reconfigure(line_buffering=True)
        sys.stdout = _QuietWhenClosed(sys.stdout)
    try:
        if args.command == "up":
            from livehist.site.control import remembered_config, up

            config = args.config
            if config is None:  # the state dir's own, not the default over a site's configuration
                config = remembered_config(args.state_dir)
                if config is not None:
                    print(f"configuration {config}: the one this state dir was brought up with (--config for "
                          "another)")  # fmt: skip
            site = up(args.tango_host, config, args.state_dir, timeout=args.timeout)
            if site.faults:  # running, but not working: a script must not go on as if all were well
                print(f"{len(site.faults)} device(s) in FAULT: {', '.join(site.faults)} (why: INFO above); their "
                      "servers run: fix the cause, then Init the device (exit status 4)")  # fmt: skip
                return 4
            return 0
        if args.command == "down":
            from livehist.site.control import down

            down(args.state_dir)
            return 0
        if args.command == "status":
            from livehist.site.control import status

            return status(args.state_dir, args.tango_host, args.config)
        if args.command == "demo":
            from livehist.site.demo import demo

            demo(args.tango_host, args.config, args.state_dir, args.out, web=args.web)
            return 0
        if args.command == "web":
            from livehist.views.web import web

            return web(
                args.devices,
                args.port,
                args.bind,
                args.layout,
                args.control_token,
                args.tango_host,
                allow_origins=args.allow_origin,
            )
        if args.command == "stream":
            from livehist.engine.stream import stream

            if args.partitions is not None and not args.kafka:
                raise LivehistError("--partitions goes with --kafka BROKER/TOPIC")
            _check_seconds(args.seconds)
            stream(
                args.source, args.bind, args.pub, args.seconds, kafka=args.kafka, partitions=args.partitions
            )
            return 0
        if args.command == "plot":
            from livehist.views.plots import plot_file

            try:
                plot_file(args.file, args.out)
            except (OSError, ValueError) as exc:
                raise LivehistError(f"{args.file}: {exc}") from None
            return 0
        if args.command == "listen":
            from livehist.components.restream import listen

            _check_seconds(args.seconds)
            if args.count < 0:
                raise LivehistError(f"--count must be >= 0 (0: never), got {args.count}")
            endpoint = _check_listen_endpoint(args.endpoint)
            n = listen(endpoint, args.count, args.seconds)
            if n == 0 and (args.count or args.seconds):
                raise LivehistError(
                    f"no histogram arrived from {endpoint}"
                    + (f" in {args.seconds:g} s" if args.seconds else "")
                    + "; is an EventHistogrammer re-streaming there (its RestreamEndpoint property) and RUNNING?"
                )
            return 0
        if args.command == "repair":
            from livehist.recorders.repair import repair

            repair(args.file)
            return 0
        if args.command == "view":
            from livehist.views.panel import view

            _check_seconds(args.seconds)
            return view(
                args.device,
                args.metadata,
                args.screenshot,
                args.seconds,
                args.trace,
                args.image_rate,
                args.rate,
            )
        if args.command == "bench":
            from livehist.bench import bench

            bench(as_json=args.json, quick=args.quick, only=args.only)
            return 0
    except LivehistError as exc:
        print(f"livehist {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"livehist {args.command}: interrupted", file=sys.stderr)
        return 130
    return 2


def _check_seconds(seconds: float) -> None:
    import math

    if not (math.isfinite(seconds) and seconds >= 0):
        raise LivehistError(f"--seconds must be a number >= 0 (0: never stop), got {seconds}")


def _check_listen_endpoint(endpoint: str) -> str:
    """A SUB endpoint that can work, or a LivehistError naming the fix (ZeroMQ itself only says
    'Invalid argument', and connecting to a closed port waits silently forever)."""
    import re
    import socket

    if "://" not in endpoint:
        raise LivehistError(
            f"endpoint {endpoint!r} has no scheme; write it like tcp://{endpoint} (the RestreamEndpoint)"
        )
    m = re.match(r"^tcp://\[?([^\]]*?)\]?:(\d+)$", endpoint)
    if endpoint.startswith("tcp://") and not m:
        raise LivehistError(
            f"endpoint {endpoint!r} is not tcp://HOST:PORT; write it like tcp://127.0.0.1:5560"
        )
    if m:
        host, port = m.group(1), int(m.group(2))
        if host in ("*", "0.0.0.0", ""):
            raise LivehistError(
                f"{endpoint!r} is a bind address; connect to the device's host, e.g. tcp://127.0.0.1:{port}"
            )
        try:
            socket.create_connection((host, port), timeout=3).close()
        except OSError as exc:
            raise LivehistError(
                f"nothing answers at {endpoint} ({exc.strerror or exc}); is the EventHistogrammer running "
                "and is this its RestreamEndpoint?"
            ) from None
    return endpoint


if __name__ == "__main__":
    sys.exit(main())
