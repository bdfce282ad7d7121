"""Experiment metadata: a validated model, an audit trail and the dataset life cycle.

Plain Python (no Tango): the MetadataManager device is a thin shell over `MetadataStore`,
which it persists in the Tango database through the `save` callback.

The metadata is one JSON object:

    {"proposal": "20261234", "title": "...", "instrument": "...", "data_root": "/data",
     "sample": {"name": "...", "description": "...", "chemical_formula": "...", "temperature": 295.0},
     "users": [{"name": "Jane Doe", "role": "PI", "email": "...", "orcid": "...", "affiliation": "..."}],
     ...free-form keys (str/number/bool/null, or small lists/objects of them)}

`merge` is last-writer-wins per key (per sample sub-key); `users` is replaced as a whole;
a free-form key set to null is removed.

Text policy (Tango's DevString is Latin-1 on the wire): the JSON surfaces (SetMetadata,
GetMetadata, Metadata, AuditTrail) are ASCII JSON with \\u escapes, so any Unicode is exact.
The plain string attributes show Latin-1 text as is and any other character as a Python
escape (`\\u03b1`, `\\U0001f9ea`), with a backslash doubled; writing them (and spock's
meta_set) accepts the same escapes and `\\N{GREEK SMALL LETTER ALPHA}`: `tango_text` and
`from_tango_text` are exact inverses.
"""

from __future__ import annotations

import copy
import grp
import json
import math
import os
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from livehist.errors import LivehistError, from_tango_text, tango_text  # noqa: F401 (re-exported)

STRING_KEYS = ("proposal", "title", "instrument", "data_root")
SAMPLE_KEYS = {"name": str, "description": str, "chemical_formula": str, "temperature": float}
USER_KEYS = ("name", "role", "email", "orcid", "affiliation")
DATASET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUMMARY_RE = re.compile(r"^(dataset(_[0-9]+)?\.json|\.dataset\.json\..*\.tmp)$")
FREE_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


class MetadataError(LivehistError):
    """Bad metadata or a dataset request that cannot be honoured; the message names the fix."""


@dataclass
class Rules:
    """Validation rules (device properties of the MetadataManager)."""

    proposal_pattern: str = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
    max_value_chars: int = 4096
    max_users: int = 50
    max_free_keys: int = 100
    max_total_bytes: int = 60_000  # all metadata as JSON; Tango DB properties stay small
    audit_length: int = 200
    audit_bytes: int = 32_000  # the audit trail as JSON; old entries go first
    audit_value_chars: int = 256  # longer old/new values are kept abbreviated (and marked so)
    folder_pattern: str = "{data_root}/{year}/{proposal}/{dataset}"
    data_group: str = ""  # group owning created folders ("" = the process's group)
    data_mode: int = 0o2775  # setgid: files inside inherit the group


@dataclass
class Change:
    key: str
    old: Any
    new: Any
    client: str
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))

    def to_json(self) -> dict:
        return {"time": self.time, "client": self.client, "key": self.key, "old": self.old, "new": self.new}

    def abbreviated(self, chars: int) -> Change:
        """This change with an old/new value longer than `chars` (as JSON) cut and marked as cut."""
        return Change(
            self.key, _abbreviate(self.old, chars), _abbreviate(self.new, chars), self.client, self.time
        )


def _abbreviate(value: Any, chars: int) -> Any:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) <= chars:
        return value
    return f"{text[:chars]}... [abbreviated in the audit trail: {len(text)} characters in all]"


# attribute names and other spellings users type -> the metadata key ("sample.name" = a sub-key)
KEY_ALIASES = {"proposal": "proposal", "title": "title", "instrument": "instrument",
               "dataroot": "data_root", "data_root": "data_root", "users": "users", "user": "users",
               "sample": "sample", "samplename": "sample.name", "sampledescription": "sample.description",
               **{f"sample.{k}": f"sample.{k}" for k in SAMPLE_KEYS},
               **{f"sample_{k}": f"sample.{k}" for k in SAMPLE_KEYS},
               # the open dataset (read-only attributes DatasetName, DataFolder): never a free key
               "dataset": "dataset", "datasetname": "dataset", "dataset_name": "dataset",
               "datafolder": "dataset", "data_folder": "dataset"}  # fmt: skip


def canonical_key(key: str) -> str:
    """The metadata key meant by `key`: 'Proposal' -> 'proposal', 'SampleName' -> 'sample.name'."""
    return KEY_ALIASES.get(str(key).lower(), str(key))


def schema(rules: Rules | None = None) -> dict:
    """JSON schema of what SetMetadata accepts (clients build forms from it)."""
    rules = rules or Rules()
    text = {"type": "string", "maxLength": rules.max_value_chars}
    scalar = {"type": ["string", "number", "boolean", "null"]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "livehist experiment metadata",
        "type": "object",
        "properties": {
            "proposal": {**text, "pattern": rules.proposal_pattern, "description": "proposal id"},
            "title": {**text, "description": "experiment title"},
            "instrument": {**text, "description": "instrument (beamline) name"},
            "data_root": {**text, "description": "absolute folder under which datasets are created"},
            "sample": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "name": text,
                    "description": text,
                    "chemical_formula": text,
                    "temperature": {"type": "number", "description": "sample temperature in K"},
                },  # fmt: skip
            },
            "users": {
                "type": "array",
                "maxItems": rules.max_users,
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {k: text for k in USER_KEYS},
                },
            },
        },
        "additionalProperties": {
            "anyOf": [
                scalar,
                {"type": "array", "items": scalar},
                {"type": "object", "additionalProperties": scalar},
            ]
        },  # fmt: skip
        "propertyNames": {"pattern": FREE_KEY_RE.pattern},
        "maxProperties": len(STRING_KEYS) + 2 + rules.max_free_keys,
    }


class MetadataStore:
    """The current metadata, its audit trail and the open dataset; thread-safe."""

    def __init__(self, rules: Rules | None = None, save: Callable[[dict], None] | None = None,
                 stored: dict | None = None) -> None:  # fmt: skip
        self.rules = rules or Rules()
        try:
            self._proposal_re = re.compile(self.rules.proposal_pattern)
        except re.error as exc:
            raise MetadataError(
                f"ProposalPattern {self.rules.proposal_pattern!r} is not a regex: {exc}"
            ) from None
        self._save = save
        self._lock = threading.RLock()
        self.metadata: dict = {"sample": {}, "users": []}
        self.audit: deque[Change] = deque(maxlen=self.rules.audit_length)
        self.dataset: dict | None = None  # {"name", "folder", "start"} while one is open
        self._extra: dict = {}  # keys of a StoredMetadata written by a newer version, kept as they were
        if stored:
            self._restore(stored)

    # --- persistence -------------------------------------------------------------------
    def _restore(self, stored: dict) -> None:
        """Take what `stored()` gave (the device's StoredMetadata). Only its shape is checked, not
        today's rules (a stricter ProposalPattern must not lose the proposal); keys this version
        does not know, from a newer one, are kept and saved again. Anything else that is not what
        a save wrote raises MetadataError saying what, and nothing is taken."""

        def bad(what: str) -> MetadataError:
            return MetadataError(
                f"StoredMetadata is not what this device saved: {what} (edited by hand, or cut by the "
                "database?); correct it, or put back an earlier value from the property's history in the "
                "Tango DB, or delete it to start empty"
            )

        if not isinstance(stored, dict):
            raise bad(f"a JSON {type(stored).__name__}, not an object")
        metadata = stored.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise bad(f"metadata is a {type(metadata).__name__}, not an object")
        metadata = {"sample": {}, "users": [], **metadata}
        for key in STRING_KEYS:
            if not isinstance(metadata.get(key, ""), str):
                raise bad(f"metadata.{key} is {metadata[key]!r:.60}, not a string")
        sample, users = metadata["sample"], metadata["users"]
        if not isinstance(sample, dict) or not all(
            k in SAMPLE_KEYS and isinstance(v, str if SAMPLE_KEYS[k] is str else int | float)
            for k, v in sample.items()
        ):
            raise bad(f"metadata.sample is {sample!r:.80}, not an object of {', '.join(SAMPLE_KEYS)}")
        if not isinstance(users, list) or not all(
            isinstance(u, dict) and isinstance(u.get("name"), str) and u["name"]
            and all(k in USER_KEYS and isinstance(v, str) for k, v in u.items()) for u in users
        ):  # fmt: skip
            raise bad(f"metadata.users is {users!r:.80}, not a list of users with a name")
        audit = stored.get("audit") or []
        if not isinstance(audit, list) or not all(isinstance(c, dict) and "key" in c for c in audit):
            raise bad(f"audit is {audit!r:.80}, not a list of changes")
        dataset = stored.get("dataset")
        if dataset is not None and not (
            isinstance(dataset, dict)
            and all(isinstance(dataset.get(k), str) for k in ("name", "folder", "start"))
        ):
            raise bad(f"dataset is {dataset!r:.80}, not an object with name, folder and start")
        self._extra = {k: v for k, v in stored.items() if k not in ("metadata", "audit", "dataset")}
        self.metadata = metadata
        changes = [Change(str(c["key"]), c.get("old"), c.get("new"), str(c.get("client", "")),
                          str(c.get("time", ""))) for c in audit[-self.rules.audit_length :]]  # fmt: skip
        self.audit = self._bounded(self.audit, changes, abbreviate=False)  # saved abbreviated already
        self.dataset = dataset

    def _bounded(self, audit: deque[Change], new: list[Change], abbreviate: bool = True) -> deque[Change]:
        """`audit` plus `new` (abbreviated), oldest dropped until it fits AuditLength and AuditBytes.

        Restored entries are not abbreviated again: each restart cut the cut value and its note
        '4000 characters in all' became '316 characters in all'."""
        out = deque(audit, maxlen=self.rules.audit_length)
        out.extend(c.abbreviated(self.rules.audit_value_chars) if abbreviate else c for c in new)
        size = len(json.dumps([c.to_json() for c in out]))
        while out and size > self.rules.audit_bytes:
            size -= len(json.dumps(out.popleft().to_json())) + 2
        return out

    def _commit(self, metadata: dict, audit: deque[Change], dataset: dict | None) -> None:
        """Save first, then take the new state: a save that fails changes nothing."""
        if self._save is not None:
            self._save({**self._extra, "metadata": metadata, "audit": [c.to_json() for c in audit],
                        "dataset": dataset})  # fmt: skip
        self.metadata, self.audit, self.dataset = metadata, audit, dataset

    def stored(self) -> dict:
        with self._lock:
            return {**self._extra, "metadata": self.metadata, "audit": [c.to_json() for c in self.audit],
                    "dataset": self.dataset}  # fmt: skip

    # --- reading -----------------------------------------------------------------------
    def snapshot(self) -> dict:
        """A deep copy of the metadata plus the open dataset, for a file or a record."""
        with self._lock:
            snap = copy.deepcopy(self.metadata)
            if self.dataset:
                snap["dataset"] = dict(self.dataset)
            return snap

    def get(self, key: str, default: Any = "") -> Any:
        with self._lock:
            return copy.deepcopy(self.metadata.get(key, default))

    @property
    def state(self) -> str:
        if self.dataset:
            return "RUNNING"
        return "ON" if self.metadata.get("proposal") else "STANDBY"

    # --- validation --------------------------------------------------------------------
    def _text(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise MetadataError(f"{where} must be a string, got {type(value).__name__} {value!r:.60}")
        if len(value) > self.rules.max_value_chars:
            raise MetadataError(
                f"{where} is {len(value)} characters, over the limit of {self.rules.max_value_chars}; shorten it"
            )
        if "\x00" in value:
            raise MetadataError(
                f"{where} contains U+0000 (NUL), which NeXus and Tango strings cannot hold; remove it"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate from JSON such as "\ud800"
            raise MetadataError(
                f"{where} contains {value[exc.start]!r}, half of a UTF-16 pair and not a character; "
                "give the whole character (e.g. \\ud83e\\uddea)"
            ) from None
        return value

    def _check(self, key: str, value: Any) -> Any:
        """The validated (and normalised) value for a top-level key."""
        if key == "proposal":
            value = self._text(value, "proposal")
            if value and not self._proposal_re.fullmatch(value):  # fullmatch: '$' lets 'x\n' through
                raise MetadataError(
                    f"proposal {value!r} does not match the pattern {self.rules.proposal_pattern!r} "
                    "(ProposalPattern property); give the proposal id as issued by the user office"
                )
            return value
        if key in STRING_KEYS:
            value = self._text(value, key)
            if key == "data_root" and value and not os.path.isabs(value):
                raise MetadataError(f"data_root must be an absolute path, got {value!r}")
            return value
        if key == "sample":
            if not isinstance(value, dict):
                raise MetadataError(f'sample must be an object like {{"name": "Si"}}, got {value!r:.60}')
            out = {}
            for k, v in value.items():
                if k not in SAMPLE_KEYS:
                    raise MetadataError(
                        f"sample.{k} is not a sample field; use one of {', '.join(SAMPLE_KEYS)}"
                    )
                if SAMPLE_KEYS[k] is float:
                    if isinstance(v, bool) or not isinstance(v, int | float):
                        raise MetadataError(f"sample.{k} must be a number (K), got {v!r:.60}")
                    if isinstance(v, int) and abs(v) > 1e300 or not math.isfinite(v) or v < 0:
                        raise MetadataError(
                            f"sample.{k} must be a finite number of kelvin >= 0, got {v!r}; "
                            "give the temperature in K (e.g. 295.0)"
                        )
                    out[k] = float(v)
                else:
                    out[k] = self._text(v, f"sample.{k}")
            return out
        if key == "users":
            if not isinstance(value, list):
                raise MetadataError(
                    f'users must be a list like [{{"name": "Jane Doe", "role": "PI"}}], got {value!r:.60}'
                )
            if len(value) > self.rules.max_users:
                raise MetadataError(
                    f"users has {len(value)} entries, over the limit of {self.rules.max_users}"
                )
            users = []
            # 'Name (role)' as the Users attribute shows it stands for that user's whole record:
            # writing back what was read (or adding one user to it) kept no email, ORCID, affiliation
            known = [u for u in self.metadata.get("users") or [] if isinstance(u, dict) and u.get("name")]
            for i, u in enumerate(value):
                if isinstance(u, str):
                    same = next((k for k in known if format_user(k) == u), None)
                    if same is not None:
                        known.remove(same)
                        u = copy.deepcopy(same)
                    else:
                        u = parse_user(u)
                if not isinstance(u, dict) or not u.get("name"):
                    raise MetadataError(f"users[{i}] must be an object with a name, got {u!r:.60}")
                unknown = sorted(set(u) - set(USER_KEYS))
                if unknown:
                    raise MetadataError(
                        f"users[{i}].{unknown[0]} is not a user field; use {', '.join(USER_KEYS)}"
                    )
                users.append({k: self._text(v, f"users[{i}].{k}") for k, v in u.items()})
            return users
        if not FREE_KEY_RE.fullmatch(key):
            raise MetadataError(
                f"metadata key {key!r} is not allowed; keys start with an ASCII letter (a-z, A-Z) and hold "
                "ASCII letters, digits, _ . - (at most 64; values may hold any text)"
            )
        return self._free(value, key, 0)

    def _free(self, value: Any, where: str, depth: int) -> Any:
        if value is None or isinstance(value, bool | int | float):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
                raise MetadataError(
                    f"{where} is an integer of {len(str(abs(value)))} digits; files keep integers of "
                    "at most 64 bits: give it as a string or a float"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise MetadataError(
                    f"{where} is {value!r}, which JSON cannot hold; give a finite number or null"
                )
            return value
        if isinstance(value, str):
            return self._text(value, where)
        if depth == 0 and isinstance(value, list):
            return [self._free(v, f"{where}[{i}]", 1) for i, v in enumerate(value)]
        if depth == 0 and isinstance(value, dict):
            return {
                self._text(str(k), f"{where} key"): self._free(v, f"{where}.{k}", 1) for k, v in value.items()
            }
        raise MetadataError(
            f"{where}: free-form values are strings, numbers, booleans, null, or one level of list/object of them; "
            f"got {type(value).__name__}"
        )

    # --- changing ----------------------------------------------------------------------
    def merge(self, update: dict | str, client: str = "local") -> list[Change]:
        """Validate everything first, then apply: all keys or none. Returns what changed."""
        if isinstance(update, str):
            try:
                update = json.loads(update, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
            except RecursionError:
                raise MetadataError(
                    "SetMetadata argument is nested too deep; give a flat JSON object"
                ) from None
            except ValueError as exc:
                raise MetadataError(
                    f"SetMetadata argument is not valid JSON ({exc}); give a JSON object"
                ) from None
        if not isinstance(update, dict):
            raise MetadataError(f"SetMetadata needs a JSON object of key: value, got {type(update).__name__}")
        # 'Dataset', 'DatasetName' were kept as free keys beside the real dataset: one stored so
        # before can still be removed (null), none can be set
        legacy = [k for k, v in update.items() if v is None and k != "dataset" and k in self.metadata
                  and canonical_key(k) == "dataset"]  # fmt: skip
        given = next((k for k in update if canonical_key(k) == "dataset" and k not in legacy), None)
        if given is not None:
            raise MetadataError(
                f"{given!r}: the dataset is set by StartDataset/EndDataset, not by SetMetadata; "
                "use another key for notes of your own"
            )
        with self._lock:
            update = self._canonical({k: v for k, v in update.items() if k not in legacy})
        with self._lock:
            checked = {str(k): self._check(str(k), v) for k, v in update.items()}
            checked.update(dict.fromkeys(legacy))
            new = copy.deepcopy(self.metadata)
            changes = []
            for key, value in checked.items():
                if key == "sample":
                    for k, v in value.items():
                        old = new["sample"].get(k)
                        if old != v:
                            changes.append(Change(f"sample.{k}", old, v, client))
                            new["sample"][k] = v
                    continue
                old = new.get(key)
                if value is None and key not in (*STRING_KEYS, "users"):  # null removes a free-form key
                    if key in new:
                        changes.append(Change(key, old, None, client))
                        del new[key]
                elif old != value:
                    changes.append(Change(key, old, value, client))
                    new[key] = value
            fixed = self._folder_keys() if self.dataset else set()
            moved = [c for c in changes if c.key in fixed]
            if moved:  # the folder is named by them: files of one proposal would land in another's
                c = moved[0]
                raise MetadataError(
                    f"{c.key} cannot change while dataset {self.dataset['name']!r} is open in "
                    f"{self.dataset['folder']}, a folder named by it ({c.key} {c.old!r}): EndDataset, then "
                    f"set {c.key} to {c.new!r:.80} and StartDataset"
                )
            free = [k for k in new if k not in (*STRING_KEYS, "sample", "users")]
            if len(free) > self.rules.max_free_keys:
                raise MetadataError(
                    f"{len(free)} free-form keys, over the limit of {self.rules.max_free_keys}; remove some (set to null)"
                )
            size = len(json.dumps(new))
            if size > self.rules.max_total_bytes:
                raise MetadataError(
                    f"metadata would be {size} bytes as JSON, over the limit of {self.rules.max_total_bytes}; "
                    "keep bulky data in files, not in metadata"
                )
            if not changes:
                return []
            self._commit(new, self._bounded(self.audit, changes), self.dataset)
            return changes

    def _canonical(self, update: dict) -> dict:
        """Keys as stored: attribute names and case variants mapped, never a second shadow key."""
        out: dict = {}
        known = {k.lower(): k for k in self.metadata}

        def put(key: str, value: Any, given: str) -> None:
            if key.lower() in {k.lower() for k in out}:
                raise MetadataError(f"{given!r} and another key both mean {key!r} (keys differing only in "
                                    "case are one key); give it once")  # fmt: skip
            out[key] = value

        for given, value in update.items():
            key = canonical_key(given)
            if key.startswith("sample."):
                sub = key.split(".", 1)[1]
                sample = out.setdefault("sample", {})
                if sub in sample:
                    raise MetadataError(f"{given!r} and another key both mean {key!r}; give it once")
                sample[sub] = value
                continue
            if key == "sample" and isinstance(value, dict):
                sample = out.setdefault("sample", {})
                for k, v in value.items():
                    sub = canonical_key(f"sample.{k}").split(".", 1)[1]
                    if sub in sample:
                        raise MetadataError(
                            f"sample.{k} and another key both mean sample.{sub}; give it once"
                        )
                    sample[sub] = v
                continue
            if key == given and key.lower() in known and known[key.lower()] != key:
                raise MetadataError(
                    f"metadata key {given!r} differs only in case from the existing {known[key.lower()]!r}; "
                    f"did you mean {known[key.lower()]!r}? (keys are case-sensitive)"
                )
            put(key, value, given)
        return out

    # --- datasets ----------------------------------------------------------------------
    def _folder_keys(self) -> set[str]:
        """Metadata keys a dataset's folder is made of (DataFolderPattern): fixed while it is open."""
        import string

        try:
            used = {f for _, f, _, _ in string.Formatter().parse(self.rules.folder_pattern) if f}
        except ValueError:
            used = set()
        return {"data_root"} | ({"proposal", "instrument"} & used)

    def folder_for(self, name: str) -> Path:
        if not isinstance(name, str) or not DATASET_NAME_RE.fullmatch(name) or name in (".", ".."):
            raise MetadataError(
                f"dataset name {name!r} is not allowed: use 1-64 ASCII letters (a-z, A-Z), digits, _ . - "
                "(no path separators, no '..'), starting with a letter or digit; it names a folder, so that "
                "every file system and transfer tool takes it (the title may hold any text)"
            )
        md = self.metadata
        if not md.get("proposal"):
            raise MetadataError(
                'no proposal set: set Proposal (or SetMetadata {"proposal": ...}) before StartDataset'
            )
        if not md.get("data_root"):
            raise MetadataError(
                "no DataRoot set: set DataRoot to the absolute folder for data before StartDataset"
            )
        now = datetime.now()
        fields = {"data_root": md["data_root"], "proposal": md["proposal"], "dataset": name,
                  "instrument": md.get("instrument") or "instrument", "year": f"{now:%Y}",
                  "date": f"{now:%Y-%m-%d}"}  # fmt: skip
        try:
            # one slash where a DataRoot '/' or '//data' doubled it: Path keeps a leading '//'
            folder = Path(re.sub(r"/{2,}", "/", self.rules.folder_pattern.format(**fields)))
        except (KeyError, IndexError, ValueError) as exc:
            raise MetadataError(
                f"DataFolderPattern {self.rules.folder_pattern!r} cannot be filled ({exc}); "
                f"it may use {{{'}, {'.join(fields)}}}"
            ) from None
        base = Path(re.sub(r"/{2,}", "/", md["data_root"]))
        for p in [folder, *folder.parents]:  # below DataRoot: a link made there led into another folder
            if base in p.parents and p.is_symlink():
                raise MetadataError(
                    f"{p} is a symbolic link (to {os.readlink(p)}); a dataset is never written through a link "
                    "below DataRoot (it led into another proposal's folder): remove it or choose another "
                    "dataset name"
                )
        root = Path(md["data_root"]).resolve()
        if root not in folder.resolve().parents:
            raise MetadataError(f"DataFolderPattern gives {folder}, outside DataRoot {root}; fix the pattern")
        return folder

    def start_dataset(self, name: str, client: str = "local") -> Path:
        with self._lock:
            if self.dataset:
                raise MetadataError(f"dataset {self.dataset['name']!r} is open; EndDataset first")
            folder = self.folder_for(name)
            done = folder / "dataset.json"
            if done.exists():
                raise MetadataError(
                    f"dataset {name!r} was already recorded and closed ({done} exists); a dataset is never "
                    f"reopened or overwritten: choose a new name, e.g. {self._free_name(name)!r}"
                )
            make_folder(folder, Path(self.metadata["data_root"]), self.rules.data_group, self.rules.data_mode)
            dataset = {"name": name, "folder": str(folder), "start": _now()}
            self._commit(
                self.metadata, self._bounded(self.audit, [Change("dataset", None, name, client)]), dataset
            )
            return folder

    def _free_name(self, name: str) -> str:
        for k in range(2, 10_000):
            candidate = f"{name}_{k}"
            if (
                DATASET_NAME_RE.fullmatch(candidate)
                and not (self.folder_for(candidate) / "dataset.json").exists()
            ):
                return candidate
        return f"{name}_{_now()[:10]}"

    def end_dataset(self, client: str = "local") -> Path:
        """Close the dataset; write its summary (metadata, files, time range) as JSON in its folder."""
        with self._lock:
            if not self.dataset:
                raise MetadataError("no dataset is open; StartDataset first")
            ds = dict(self.dataset, end=_now())
            folder = Path(ds["folder"])
            if not folder.is_dir():  # it said '[Errno 2] No such file ... .dataset.json.123.tmp'
                raise MetadataError(
                    f"the folder of dataset {ds['name']!r}, {folder}, is gone (moved or deleted?): create it "
                    f"again (mkdir -p {folder}) and EndDataset; the summary then lists what is in it"
                )
            busy = _being_written(folder)
            if busy:
                raise MetadataError(
                    f"{', '.join(busy[:3])} in dataset {ds['name']!r} {'is' if len(busy) == 1 else 'are'} being "
                    "written (a scan or count is running); EndDataset once it has ended: a summary now would "
                    "list files still growing, and the scan would go on into the closed dataset"
                )
            done = _summary_of(folder, ds["name"], ds["start"])
            if done is not None:  # an EndDataset killed before its close was saved, or a cloned device
                self._commit(self.metadata, self._bounded(self.audit, [Change("dataset", ds["name"], None, client)]),
                             None)  # fmt: skip
                return done  # closed as summarised: a second summary (dataset_2.json) would list it twice
            summary = {
                "schema": "livehist-dataset/1",
                "dataset": ds["name"],
                "folder": str(folder),
                "start_time": ds["start"],
                "end_time": ds["end"],
                "metadata": copy.deepcopy(self.metadata),
                **self._changes_since_start(ds["name"]),
                "files": _files(folder),
            }
            try:
                path = _write_new(folder, "dataset", json.dumps(summary, indent=1, ensure_ascii=False))
            except OSError as exc:  # it said '[Errno 28] No space left on device' and nothing more
                raise MetadataError(
                    f"dataset {ds['name']!r} stays open: its summary cannot be written in {folder} "
                    f"({exc.strerror}); free space or make the folder writable, then EndDataset again"
                ) from None
            try:
                self._commit(self.metadata, self._bounded(self.audit, [Change("dataset", ds["name"], None, client)]),
                             None)  # fmt: skip
            except BaseException:
                path.unlink(missing_ok=True)  # the dataset stays open: no summary claims it closed
                raise
            return path

    def _changes_since_start(self, name: str) -> dict:
        """What changed while dataset `name` was open (from the audit trail): `metadata` is the
        metadata at its end, and a file written before a change (another sample) must not be taken
        for one of the end's. Incomplete when the trail no longer reaches back to StartDataset."""
        trail = list(self.audit)
        start = next((i for i in range(len(trail) - 1, -1, -1)
                      if trail[i].key == "dataset" and trail[i].old is None and trail[i].new == name), None)  # fmt: skip
        out: dict = {
            "metadata_changes": [c.to_json() for c in trail[(start or -1) + 1 :] if c.key != "dataset"]
        }
        if start is None:
            out["metadata_changes_complete"] = False  # AuditLength/AuditBytes dropped the oldest
        return out


def parse_user(text: str) -> dict:
    """'Jane Doe (PI)' -> {"name": "Jane Doe", "role": "PI"}; 'Jane Doe' -> {"name": "Jane Doe"}."""
    m = re.match(r"^\s*(.*?)\s*\(([^()]*)\)\s*$", text)
    if m and m.group(1):
        return {"name": m.group(1), "role": m.group(2).strip()}
    return {"name": text.strip()}


def format_user(user: dict) -> str:
    return f"{user['name']} ({user['role']})" if user.get("role") else user["name"]


def make_folder(folder: Path, root: Path, group: str, mode: int) -> None:
    """Create `folder` and any missing parents below `root` with `group` and `mode`."""
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise MetadataError(
                f"DataGroup {group!r} is not a group on this machine; fix the property"
            ) from None
    if not root.is_dir():
        raise MetadataError(f"DataRoot {root} does not exist (or is not a folder); create it or fix DataRoot")
    folder, root = (Path(re.sub(r"/{2,}", "/", str(p))) for p in (folder, root))  # '//data' is '/data'
    missing = [p for p in [folder, *folder.parents] if root in p.parents and not p.exists()]
    for p in reversed(missing):
        try:
            p.mkdir()
            if gid != -1:
                os.chown(p, -1, gid)
            os.chmod(p, mode)  # after chown: chown may clear the setgid bit
        except FileExistsError:
            pass
        except OSError as exc:  # also a read-only or full file system, not only permissions
            raise MetadataError(
                f"cannot create {p}: {exc.strerror}; check DataRoot (permissions, space, a read-only "
                "mount) and DataGroup"
            ) from None
    if folder.exists() and not folder.is_dir():  # it was taken as the dataset's folder
        raise MetadataError(f"{folder} exists and is a file, not a folder; choose another dataset name")
    if not folder.is_dir():  # never hand out a DataFolder that is not there
        raise MetadataError(f"{folder} could not be created under DataRoot {root}; check DataFolderPattern")


def _files(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not SUMMARY_RE.match(p.name):
            st = p.stat()
            out.append({"path": str(p.relative_to(folder)), "size": st.st_size,
                        "modified": datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds")})  # fmt: skip
    return out


def _being_written(folder: Path) -> list[str]:
    """Files of `folder` a writer holds locked: livehist's SPEC and JSON lines sinks hold a flock,
    its NeXus sink a POSIX lock (other HDF5 writers a flock), for as long as a scan writes."""
    import fcntl

    busy = []
    for entry in _files(folder):
        try:
            fd = os.open(folder / entry["path"], os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            for lock, unlock in ((fcntl.flock, fcntl.flock), (fcntl.lockf, fcntl.lockf)):
                try:
                    lock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    busy.append(entry["path"])
                    break
                unlock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return busy


def _summary_of(folder: Path, name: str, start: str) -> Path | None:
    """The summary already written in `folder` for the dataset `name` opened at `start`, if any."""
    for path in sorted(folder.glob("dataset*.json")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(summary, dict) and (summary.get("dataset"), summary.get("start_time")) == (name, start):
            return path
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are all different: json.loads kept the last of two silently."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise MetadataError(
                f"SetMetadata argument gives {key!r} twice ({out[key]!r:.40} and {value!r:.40}); give it once"
            )
        out[key] = value
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (no NaN or infinities); give a finite number or null")


def _write_new(folder: Path, stem: str, text: str) -> Path:
    """Write `folder/stem.json` whole, or `stem_2.json`... if taken: never replace a file."""
    tmp = folder / f".{stem}.json.{os.getpid()}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")  # on a full disk, no half-written file is left behind
        for k in range(1, 1000):
            path = folder / (f"{stem}.json" if k == 1 else f"{stem}_{k}.json")
            try:
                os.link(tmp, path)  # atomic and exclusive: a catalogue never reads half a summary
                return path
            except FileExistsError:
                continue
        raise MetadataError(f"{folder} holds 999 {stem} summaries; clean it up")
    finally:
        tmp.unlink(missing_ok=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
