"""Load, check and apply the dsconfig JSON of livehist's servers and devices.

The file is plain dsconfig JSON; the only addition is `$LIVEHIST_*` placeholders in string
values, replaced by paths known at install/run time (the installed macros/ folder, the
state dir), so one file serves every checkout and every site.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from livehist.errors import LivehistError


def placeholders(state_dir: Path) -> dict[str, str]:
    import livehist.devices
    import livehist.macros
    import livehist.recorders

    return {
        "LIVEHIST_MACROS": str(Path(livehist.macros.__file__).parent),
        "LIVEHIST_RECORDERS": str(Path(livehist.recorders.__file__).parent / "sardana"),
        "LIVEHIST_CONTROLLERS": str(Path(livehist.devices.__file__).parent / "controllers"),
        "LIVEHIST_STATE_DIR": str(state_dir),
    }


def _expand(value: Any, mapping: dict[str, str]) -> Any:
    """$NAME or ${NAME} of the mapping replaced; every other $ kept as written (string.Template
    turned `$$` into `$`, silently changing a value such as a regex's `end$$`)."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: mapping.get(m[1] or m[2], m[0]), value)
    if isinstance(value, list):
        return [_expand(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, mapping) for k, v in value.items()}
    return value


_PLACEHOLDER = re.compile(r"\$(?:\{(\w+)\}|(\w+))")

MAX_CONFIG_BYTES = 16 << 20


def read(path: Path) -> str:
    """The text of a config file, read once (it may be a pipe: `--config /dev/stdin`)."""
    try:
        with open(path, "rb") as f:  # bounded: `--config /dev/zero` (a slip) read until memory ran out
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise LivehistError(
                f"config {path} is larger than {MAX_CONFIG_BYTES >> 20} MB (a dsconfig JSON of livehist is a "
                "few kB): is it the right file? pass the dsconfig JSON with --config"
            )
        return data.decode("utf-8")
    except OSError as exc:
        raise LivehistError(
            f"cannot read config {path}: {exc.strerror}; pass an existing dsconfig JSON with --config"
        ) from None
    except UnicodeDecodeError as exc:
        raise LivehistError(
            f"config {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8 JSON"
        ) from None


def load(path: Path, state_dir: Path, text: str | None = None) -> dict:
    """Read (unless its `text` is given) and check a dsconfig JSON file; raise LivehistError
    naming what is wrong."""
    if text is None:
        text = read(path)
    try:
        config = json.loads(text)
    except RecursionError:
        raise LivehistError(
            f"config {path} is nested too deeply to be a dsconfig JSON; fix the file"
        ) from None
    except ValueError as exc:
        raise LivehistError(
            f"config {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix the file or pass another with --config"
        ) from None
    config = _split_server_keys(config, path)
    _check_schema(config, path)
    from livehist.site.servers import check_servers

    check_servers(config.get("servers", {}), path)
    seen: dict[str, str] = {}
    for server, cls, dev in devices(config):
        for what, name in (("server", server), ("class", cls), ("device", dev)):
            # non-ASCII: written into the database, then the server aborted at its export; a control
            # character (a NUL from "\u0000") ended `up` in a traceback with the database written
            bad = "".join(sorted({c for c in name if not c.isascii() or ord(c) < 32 or ord(c) == 127}))
            if bad:
                raise LivehistError(
                    f"config {path}: {what} name {name!r} has characters Tango names cannot carry "
                    f"({ascii(bad)[1:-1] if not bad.isprintable() else bad}); "
                    "use ASCII letters, digits and - _ . in server, class and device names"
                )
        where = seen.get(dev.lower())
        if where is not None:
            raise LivehistError(
                f"config {path}: device {dev!r} is listed twice ({where} and {server}; Tango names ignore "
                "case); a device belongs to one server: remove one"
            )
        seen[dev.lower()] = server
    _check_instances(config, path)
    aliases: dict[str, str] = {}
    for instances in config["servers"].values():
        for classes in instances.values():
            for devs in classes.values():
                for dev, body in devs.items():
                    alias = body.get("alias") if isinstance(body, dict) else None
                    if not alias:
                        continue
                    other = aliases.setdefault(alias.lower(), dev)
                    if other != dev:
                        raise LivehistError(
                            f"config {path}: alias {alias!r} is given to two devices, {other} and {dev} "
                            "(an alias names one device; Tango aliases ignore case): give each its own"
                        )
    mapping = placeholders(state_dir)
    expanded = _expand(config, mapping)
    _check_text(expanded, path, mapping)
    return expanded


def _check_text(config: dict, path: Path, mapping: dict[str, str]) -> None:
    """Every string Tango is to store is text: a placeholder replaced by a path whose name is not
    UTF-8 (a folder named in another encoding) ended `up` half way in a TypeError from pytango."""

    def walk(value: Any, where: list[str]):
        if isinstance(value, str):
            yield where, value
        elif isinstance(value, list):
            for v in value:
                yield from walk(v, where)
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, [*where, k])

    for where, value in walk(config, []):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            names = [f"${k}" for k, v in mapping.items() if v in value]
            keys = where[4:] if where[:1] == ["servers"] else []  # device, "properties", name
            what = f"{keys[0]} property {keys[2]}" if keys[1:2] == ["properties"] else "/".join(where)
            raise LivehistError(
                f"config {path}: {what} becomes {value!r} once {' and '.join(names) or 'its placeholders'} "
                "is replaced, and that path is not UTF-8 text, which Tango cannot store; give a --state-dir "
                "(and an installation folder) whose name is UTF-8"
            ) from None


def _split_server_keys(config: Any, path: Path) -> Any:
    """dsconfig's "v1" server keys `"Executable/instance"` as the nested form every check and
    `devices()` read (dsconfig's own split raised on `a/b/c` and let one form overwrite the other)."""
    if not isinstance(config, dict) or not isinstance(config.get("servers"), dict):
        return config
    servers: dict = {}
    for key, value in config["servers"].items():
        if "/" not in key:
            if key in servers and isinstance(servers[key], dict) and isinstance(value, dict):
                _merge_instances(servers[key], value, key, path)
            else:
                servers[key] = value
            continue
        executable, _, instance = key.partition("/")
        into = servers.setdefault(executable, {})
        if not isinstance(into, dict):
            return config  # the schema check names the wrong shape
        _merge_instances(into, {instance: value}, executable, path)
    return {**config, "servers": servers}


def _merge_instances(into: dict, instances: dict, executable: str, path: Path) -> None:
    for instance, value in instances.items():
        if instance in into:
            raise LivehistError(
                f'config {path}: server {executable}/{instance} is given twice (as "{executable}/{instance}" '
                f'and as "{executable}": {{"{instance}": ...}}); keep one of them'
            )
        into[instance] = value


def _check_schema(config: Any, path: Path) -> None:
    import jsonschema
    from dsconfig.formatting import SCHEMA_FILENAME, normalize_config

    if not isinstance(config, dict) or "servers" not in config:
        raise LivehistError(
            f'config {path} has no "servers" object; it must be dsconfig JSON: '
            '{"servers": {"Server": {"instance": {"Class": {"dom/fam/mem": {...}}}}}}'
        )
    if "devices" in config:  # dsconfig reads the devices' servers from $TANGO_HOST's database for it
        raise LivehistError(
            f'config {path}: the top-level "devices" of dsconfig (changes to devices already in a database) '
            'is not read by `livehist up`; put each device under "servers" (Executable/instance/Class/device)'
        )
    schema = json.loads(Path(SCHEMA_FILENAME).read_text())
    try:
        # `livehist` (Sardana elements, environment) is ours; the rest is dsconfig's
        jsonschema.validate(normalize_config({k: v for k, v in config.items() if k != "livehist"}), schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise LivehistError(f"config {path} is not valid dsconfig JSON at {where}: {exc.message}") from None
    try:  # checked here, not half way through `up` with every server already started
        jsonschema.validate(config.get("livehist", {}), LIVEHIST_SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(["livehist", *(str(p) for p in exc.absolute_path)])
        raise LivehistError(f"config {path}: {where}: {exc.message}") from None
    sardana = (config.get("livehist") or {}).get("sardana") or {}
    names = {dev.lower() for _, _, dev in devices(config)}
    for key in ("pool", "macroserver"):
        if sardana and sardana[key].lower() not in names:
            raise LivehistError(
                f"config {path}: livehist/sardana/{key} names {sardana[key]!r}, which is not a device of its "
                "servers; name the Pool and MacroServer of the Sardana server in it"
            )


def _check_instances(config: dict, path: Path) -> None:
    """Instance names the server can be started with, one pid record per server (the record of
    Exec/inst is run/Exec-inst.json): `-h` was read as an option and the server died printing its
    usage, `a\\b` never answered, `a/b` beside `a-b` shared one record and the second never started."""
    records: dict[str, str] = {}
    for executable, instances in config["servers"].items():
        for instance in instances:
            if not instance or instance.startswith("-") or "/" in instance or "\\" in instance:
                fixed = re.sub(r"[/\\]", "_", instance).lstrip("-") or "1"
                raise LivehistError(
                    f"config {path}: server instance {instance!r} of {executable} cannot name a Tango server "
                    "(not empty, no '-' first, which the server reads as an option, no '/' or '\\'); rename it, "
                    f"e.g. to {fixed!r}"
                )
            server = f"{executable}/{instance}"
            other = records.setdefault(server.replace("/", "-").lower(), server)
            if other != server:
                raise LivehistError(
                    f"config {path}: servers {other} and {server} would share one pid record in the state dir "
                    "(Tango server names ignore case), so the second would never start; rename one instance"
                )


_NAME = {"type": "string", "minLength": 1}
LIVEHIST_SCHEMA = {
    "type": "object",
    "properties": {
        "sardana": {
            "type": "object",
            "required": ["pool", "macroserver"],
            "properties": {
                "pool": _NAME,
                "macroserver": _NAME,
                "histogrammer": _NAME,
                "controllers": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "library", "class", "name"],
                        "properties": {
                            "type": _NAME, "library": _NAME, "class": _NAME, "name": _NAME,
                            "elements": {"type": "object", "additionalProperties": _NAME},
                            "properties": {"type": "object"},
                        },
                    },
                },
                "measurement_groups": {
                    "type": "object",
                    "additionalProperties": {"type": "array", "minItems": 1, "items": _NAME},
                },
                "environment": {"type": "object"},
            },
        }
    },
}  # fmt: skip


def devices(config: dict) -> list[tuple[str, str, str]]:
    """(server "Exec/instance", class, device) for every device in the config, in order."""
    out = []
    for server, instances in config.get("servers", {}).items():
        for instance, classes in instances.items():
            for cls, devs in classes.items():
                for dev in devs:
                    out.append((f"{server}/{instance}", cls, dev))
    return out


# Properties that devices rewrite themselves at run time (EventHistogrammer.Configure keeps
# its list in Histograms). The config only seeds them: `up` never reverts what a device stored.
RUNTIME_OWNED = {"EventHistogrammer": ("Histograms",)}


def _keep_runtime_owned(config: dict, db) -> dict:
    config = json.loads(json.dumps(config))
    for instances in config.get("servers", {}).values():
        for classes in instances.values():
            for cls, devs in classes.items():
                for dev, body in devs.items():
                    props = body.get("properties", {}) if isinstance(body, dict) else {}
                    owned = [p for p in RUNTIME_OWNED.get(cls, ()) if p in props]
                    if not owned:
                        continue
                    stored = db.get_device_property(dev, owned)
                    for name in owned:
                        if list(stored[name]):
                            del props[name]
    return config


def _overwritten(db, dbcalls: list, path) -> list[str]:
    """One line per device property whose value in the database the config replaces."""
    import tango

    lines = []
    for method, args, _ in dbcalls:
        if method != "put_device_property" or len(args) != 2 or not isinstance(args[1], dict):
            continue
        dev, props = args
        try:
            stored = db.get_device_property(dev, list(props))
        except tango.DevFailed:
            continue
        for name, value in props.items():
            old = [str(v) for v in stored.get(name, [])]
            new = [str(v) for v in (value if isinstance(value, list | tuple) else [value])]
            if old and old != new:
                lines.append(f"{dev} property {name}: {_short(old)} in the database (edited since, e.g. in Jive?) "
                             f"is set back to {_short(new)} from {path}; to keep a change, put it in that file")  # fmt: skip
    return lines


def _short(values: list[str]) -> str:
    text = values[0] if len(values) == 1 else " | ".join(values)
    return repr(text if len(text) <= 120 else text[:117] + "...")


class _DsconfigView:
    """The database as dsconfig should see it. dsconfig reads the current configuration through
    DbMySQLSelect, whose strings pytango decodes as Latin-1, while it writes properties as UTF-8:
    a non-Latin-1 value never compared equal and was written again at every `up`; and a device
    without an alias reads as alias '', which it 'deleted' at every `up` too ("N database
    changes" each time, where nothing had changed)."""

    def __init__(self, db) -> None:
        self._db = db

    def __getattr__(self, name: str):
        return getattr(self._db, name)

    def command_inout(self, name: str, *args, **kwargs):
        result = self._db.command_inout(name, *args, **kwargs)
        if name.lower() != "dbmysqlselect":
            return result
        numbers, strings = result
        strings = [_as_written(s) for s in strings]
        query = " ".join(str(args[0]).split()).lower() if args else ""
        if query.startswith("select alias, name from device"):
            pairs = [(a, d) for a, d in zip(strings[::2], strings[1::2], strict=False) if a]
            strings = [x for pair in pairs for x in pair]
        return numbers, strings


def _as_written(text: str) -> str:
    """A string pytango wrote as UTF-8 and read back as Latin-1, as it was written."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def apply(config: dict, host: str, port: int, path: Path | str = "the config", say=None) -> int:
    """Write the config into the database (dsconfig's json2tango in update mode).

    Returns the number of database calls made (0 when the DB already matches). A device or an
    alias that the database gives to a server or device outside this config is refused before
    anything is written (dsconfig would move it into ours); a call the database refuses is
    reported with how many were made before it. A device property the config sets over another
    value in the database (edited in Jive since, say) is named through `say`: the config is
    the truth, but the edit must not vanish without a word."""
    import contextlib
    import io

    import tango
    from dsconfig.json2tango import apply_config, prepare_config

    db = _DsconfigView(tango.Database(host, port))
    dsconfig_part = {k: v for k, v in config.items() if k != "livehist"}
    prepared = prepare_config(_keep_runtime_owned(dsconfig_part, db))
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        _, _, dbcalls, collisions, alias_collisions, _ = apply_config(prepared, db, write=False, update=True)
    ours = {server.lower() for server, _, _ in devices(config)}
    our_devices = {dev.lower() for _, _, dev in devices(config)}
    for server, taken in collisions.items():
        if server.lower() not in ours:
            cls, dev = taken[0]
            raise LivehistError(
                f"config {path}: device {dev} is already in the Tango database at {host}:{port}, served by "
                f"{server} (class {cls}), a server this config does not have; `livehist up` does not take "
                "devices from other servers: rename it in the config, or, if nothing uses it any more, "
                f"delete it from the database first (tango_admin --delete-device {dev})"
            )
    for alias, holder, dev in sorted(alias_collisions):
        if holder.lower() not in our_devices:
            raise LivehistError(
                f"config {path}: alias {alias!r} of {dev} is already the alias of {holder} in the Tango "
                f"database at {host}:{port}; choose another alias in the config"
            )
    if say is not None:
        for line in _overwritten(db, dbcalls, path):
            say(line)
    for done, (method, args, kwargs) in enumerate(dbcalls):
        try:
            getattr(db, method)(*args, **kwargs)
        except tango.DevFailed as exc:
            why = " ".join(str(exc.args[0].desc).split())[:300]
            raise LivehistError(
                f"the Tango database at {host}:{port} refused {method}{args!r} from config {path}: {why}; "
                f"{done} of its {len(dbcalls)} changes were made before it (the next `livehist up` makes "
                "the rest once the config is fixed)"
            ) from None
    return len(dbcalls)
