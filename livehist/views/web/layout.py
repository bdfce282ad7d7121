"""Layouts of the web view: which devices and histograms appear, and where (`--layout FILE`).

A layout is a small JSON or YAML document:

    title: SANS2D live            # the page's title
    columns: 2                    # panels per row (1-4)
    panels:
      - {device: livehist/metadata/1, show: metadata}
      - {device: livehist/histogrammer/1, show: status}       # state, status, counters, buttons
      - {device: livehist/histogrammer/1, show: tof, scale: log}
      - {device: livehist/histogrammer/1, show: image, scale: log, width: 2}
      - {device: livehist/histogrammer/1, show: histograms}   # every histogram not placed yet

`show` is `status`, `metadata`, `histograms` (all the device's histograms that no other
panel shows, including ones added later through Configure) or one histogram's name.
`scale` (`linear` or `log`) is the starting y scale of a spectrum or colour scale of an
image; `width` is how many columns the panel spans.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from livehist.errors import LivehistError

SPECIAL = ("status", "metadata", "histograms")
SCALES = ("linear", "log")
MAX_COLUMNS = 4
MAX_BYTES = 1 << 20  # a layout is a page of text; more is a mistake (or an attack)


def short_device(name: str) -> str:
    """domain/family/member of a device given as such or as tango://HOST:PORT/domain/family/member."""
    return name.split("/", 3)[-1] if name.startswith("tango://") else name


def _short(value: object, limit: int = 80) -> str:
    """repr of a bad value, cut short: an error message never carries a whole document."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LayoutError(LivehistError):
    """A layout file that cannot be used; the message names the bad field and the fix."""


@dataclass(frozen=True)
class Panel:
    device: str
    show: str
    scale: str = "linear"
    width: int = 1


@dataclass(frozen=True)
class Layout:
    title: str = "livehist"
    columns: int = 2
    panels: tuple[Panel, ...] = field(default_factory=tuple)

    @property
    def devices(self) -> list[str]:
        """Every device named, in order of first appearance."""
        return list(dict.fromkeys(p.device for p in self.panels))

    def by_short_names(self) -> Layout:
        """This layout with every device as domain/family/member, as the service and its frames
        name it (a panel naming tango://HOST:PORT/a/b/c matched no frame and no control request)."""
        return replace(self, panels=tuple(replace(p, device=short_device(p.device)) for p in self.panels))

    def to_json(self) -> dict:
        return {"title": self.title, "columns": self.columns, "panels": [asdict(p) for p in self.panels]}


def default_layout(histogrammers: list[str], metadata: list[str]) -> Layout:
    """Metadata on top, then per histogrammer its status and every histogram (log colour)."""
    panels = [Panel(m, "metadata", width=2) for m in metadata]
    for dev in histogrammers:
        panels.append(Panel(dev, "status", width=2))
        panels.append(Panel(dev, "histograms"))
    return Layout("livehist", 2, tuple(panels))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise LayoutError(msg)


def parse_layout(doc: object, origin: str = "layout") -> Layout:
    """A Layout from a parsed JSON/YAML document; LayoutError names the bad field."""
    _check(
        isinstance(doc, dict), f"{origin}: must be a mapping with a 'panels' list, got {type(doc).__name__}"
    )
    unknown = set(doc) - {"title", "columns", "panels"}
    _check(not unknown, f"{origin}: unknown key(s) {sorted(unknown)}; use title, columns, panels")
    title = doc.get("title", "livehist")
    _check(isinstance(title, str), f"{origin}.title must be a string, got {_short(title)}")
    columns = doc.get("columns", 2)
    _check(
        isinstance(columns, int) and not isinstance(columns, bool) and 1 <= columns <= MAX_COLUMNS,
        f"{origin}.columns must be an integer from 1 to {MAX_COLUMNS}, got {_short(columns)}",
    )
    panels = doc.get("panels")
    _check(
        isinstance(panels, list) and panels, f"{origin}.panels must be a non-empty list, got {_short(panels)}"
    )
    out = []
    # (device, show) -> its first panel; a scan of all earlier panels took minutes for a 1 MB layout
    seen: dict[tuple[str, str], int] = {}
    for i, p in enumerate(panels):
        where = f"{origin}.panels[{i}]"
        _check(
            isinstance(p, dict), f"{where} must be a mapping like {{device: ..., show: ...}}, got {_short(p)}"
        )
        unknown = set(p) - {"device", "show", "scale", "width"}
        _check(not unknown, f"{where}: unknown key(s) {sorted(unknown)}; use device, show, scale, width")
        device = p.get("device")
        _check(
            isinstance(device, str) and device.count("/") >= 2 and device.strip() == device,
            f"{where}.device must be a Tango device name like domain/family/member, got {_short(device)}",
        )
        show = p.get("show", "histograms")
        _check(
            isinstance(show, str) and show != "",
            f"{where}.show must be status, metadata, histograms or a histogram name, got {_short(show)}",
        )
        scale = p.get("scale", "linear")
        _check(scale in SCALES, f"{where}.scale must be linear or log, got {_short(scale)}")
        width = p.get("width", 1)
        _check(
            isinstance(width, int) and not isinstance(width, bool) and 1 <= width <= columns,
            f"{where}.width must be an integer from 1 to columns ({columns}), got {_short(width)}",
        )
        key = (short_device(device).lower(), show)  # a/b/c and tango://HOST:PORT/a/b/c are one device
        twin = seen.setdefault(key, i)
        _check(twin == i, f"{where} repeats panels[{twin}] ({device}, show {show}); each appears once")
        out.append(Panel(device, show, scale, width))
    return Layout(title, columns, tuple(out))


def _loader():
    """YAML's safe loader without aliases: `*name` can make a few hundred bytes into 10**8 values."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a layout", mark
                )
            return super().compose_node(parent, index)

    return NoAliases


def load_layout(path: Path) -> Layout:
    """Read a JSON (.json) or YAML (anything else) layout file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise LayoutError(
                f"layout {path}: {path.stat().st_size} bytes; a layout is at most {MAX_BYTES} bytes"
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LayoutError(f"layout {path}: cannot read it ({exc})") from None
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.load(text, Loader=_loader())
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError: both say line and column
        raise LayoutError(
            f"layout {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from None
    return parse_layout(doc, f"layout {path}")
