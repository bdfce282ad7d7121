"""MetadataManager: one Tango device for experiment metadata, kept in the Tango database.

A thin shell over `livehist.components.metadata.MetadataStore`. Every change is written to the device
property `StoredMetadata` (metadata, audit trail, open dataset) before the command returns,
so a restarted server, or a rebooted machine, comes back with it. Change events are pushed
on every attribute after each change, so GUIs follow edits made by other clients.

    python -m livehist.devices.metadata INSTANCE
"""

from __future__ import annotations

import json
import os
import sys

import tango
from livehist.devices import events
from tango import AttrWriteType, DevState
from tango.server import Device, attribute, command, device_property, run

from livehist.components.metadata import (
    MetadataError,
    MetadataStore,
    Rules,
    format_user,
    from_tango_text,
    schema,
    tango_text,
)
from livehist.errors import LivehistError, tango_error_text

STATES = {"STANDBY": DevState.STANDBY, "ON": DevState.ON, "RUNNING": DevState.RUNNING}
# writable attribute -> (metadata key, sample sub-key or None)
FIELDS = {"Proposal": ("proposal", None), "Title": ("title", None), "Instrument": ("instrument", None),
          "DataRoot": ("data_root", None), "SampleName": ("sample", "name"),
          "SampleDescription": ("sample", "description")}  # fmt: skip
PUSHED = (*FIELDS, "Users", "Metadata", "DatasetName", "DataFolder", "AuditTrail")


def fail(reason: str, desc: str, origin: str) -> None:
    # Latin-1 bytes, other characters escaped: pytango would send a str as UTF-8 (µs -> Âµs)
    tango.Except.throw_exception(f"livehist_{reason}", tango_error_text(desc), f"MetadataManager.{origin}")


class MetadataManager(Device):
    """Proposal, sample, users, instrument and free-form metadata for every file written."""

    ProposalPattern = device_property(dtype=str, default_value=Rules.proposal_pattern,
                                      doc="regular expression a proposal id must match")  # fmt: skip
    DataFolderPattern = device_property(dtype=str, default_value=Rules.folder_pattern,
                                        doc="folder of a dataset: {data_root} {proposal} {dataset} {year} {date} {instrument}")  # fmt: skip
    DataGroup = device_property(
        dtype=str, default_value="", doc="group owning created folders ('' = server's)"
    )
    DataMode = device_property(dtype=str, default_value="2775", doc="octal mode of created folders")
    MaxValueChars = device_property(dtype=int, default_value=Rules.max_value_chars)
    AuditLength = device_property(
        dtype=int, default_value=Rules.audit_length, doc="changes kept in AuditTrail"
    )
    AuditBytes = device_property(dtype=int, default_value=Rules.audit_bytes,
                                 doc="size bound of AuditTrail as JSON; the oldest changes go first")  # fmt: skip
    DefaultDataRoot = device_property(dtype=str, default_value="",
                                      doc="DataRoot used (and created) while none is set")  # fmt: skip
    StoredMetadata = device_property(dtype=str, default_value="", doc="written by the device: do not edit")

    def init_device(self) -> None:
        super().init_device()
        self.store: MetadataStore | None = None
        for name in (*PUSHED, "State", "Status"):
            if name not in FIELDS:  # those are made in initialize_dynamic_attributes
                self.set_change_event(name, True, False)
        try:
            try:
                mode = int(self.DataMode, 8)
            except ValueError:
                mode = -1
            if not 0 <= mode <= 0o7777:  # it said "invalid literal for int() with base 8: 'rwxrwsr-x'"
                raise MetadataError(
                    f"DataMode {self.DataMode!r} is not an octal mode of folders such as 2775 (setgid, group "
                    "writable) or 2750"
                )
            for name in ("MaxValueChars", "AuditLength", "AuditBytes"):
                if getattr(self, name) < 1:
                    raise MetadataError(f"{name} {getattr(self, name)} must be at least 1")
            rules = Rules(proposal_pattern=self.ProposalPattern, folder_pattern=self.DataFolderPattern,
                          data_group=self.DataGroup, data_mode=mode,
                          max_value_chars=self.MaxValueChars, audit_length=self.AuditLength,
                          audit_bytes=self.AuditBytes)  # fmt: skip
            try:
                stored = json.loads(self.StoredMetadata) if self.StoredMetadata else None
            except ValueError as exc:  # it said only 'Expecting ',' delimiter: line 1 column 49'
                raise MetadataError(
                    f"StoredMetadata is not JSON ({exc}; {len(self.StoredMetadata)} characters, cut short?): "
                    "put back an earlier value from the property's history in the Tango DB, or delete it "
                    "to start empty"
                ) from None
            self.store = MetadataStore(rules, save=self._save, stored=stored)
            if self.DefaultDataRoot and not self.store.get("data_root"):
                os.makedirs(self.DefaultDataRoot, exist_ok=True)
                self.store.merge({"data_root": self.DefaultDataRoot}, "DefaultDataRoot property")
        except (ValueError, OSError, MetadataError) as exc:
            self.set_state(DevState.FAULT)
            self.set_status(tango_text(f"cannot start: {exc}; fix the properties and run Init"))
            return
        except Exception as exc:  # Init said 'UNKNOWN CORBA system exception' and the device 'ON, ready'
            self.set_state(DevState.FAULT)
            self.set_status(
                tango_text(f"cannot start: {exc.__class__.__name__}: {exc}; run Init after the fix")
            )
            return
        self._sync_state()

    def _save(self, stored: dict) -> None:
        """Persist in the Tango DB (the property the device reads back at start)."""
        try:
            db = tango.Util.instance().get_database()
        except tango.DevFailed:  # no database (DeviceTestContext): nothing survives anyway
            return
        if db is not None:
            db.put_device_property(self.get_name(), {"StoredMetadata": [json.dumps(stored)]})

    def _sync_state(self) -> None:
        store = self.store
        self.set_state(STATES[store.state])
        if store.dataset:
            self.set_status(
                tango_text(f"dataset {store.dataset['name']!r} open in {store.dataset['folder']}")
            )
        elif store.state == "ON":
            self.set_status(
                tango_text(f"ready: proposal {store.get('proposal')}; StartDataset to open a dataset")
            )
        else:
            self.set_status("no proposal set: write Proposal (or SetMetadata) first")

    def _client(self) -> str:
        try:
            ident = self.get_client_ident()
            try:
                host = ident.get_client_hostname()
            except Exception:  # no reverse lookup for this address
                host = ""
            return (
                f"{host} ({ident.client_ip})"
                if host and host != ident.client_ip
                else ident.client_ip or "unknown"
            )
        except Exception:  # an internal call has no client
            return "local"

    def _changed(self) -> None:
        """After any change: state, then change events on everything a GUI shows.

        The change is saved by now, so a failing push is logged, never raised: a command
        that raises must have changed nothing."""
        self._sync_state()
        if not events.ready():  # see devices/events.py; a subscriber reads the saved value
            return
        for name in (*PUSHED, "State", "Status"):
            try:
                value = self.get_state() if name == "State" else self.get_status() if name == "Status" \
                    else self._value(name)  # fmt: skip
                self.push_change_event(name, value)
            except Exception as exc:  # a client-side problem must not undo or hide a saved change
                self.error_stream(f"change event of {name} not pushed: {exc!r}")

    def _value(self, name: str):
        store = self.store
        if name in FIELDS:
            key, sub = FIELDS[name]
            return tango_text(store.get(key, {}).get(sub, "") if sub else store.get(key) or "")
        if name == "Users":
            return [tango_text(format_user(u)) for u in store.get("users", [])]
        if name == "Metadata":
            return json.dumps(store.snapshot())
        if name == "DatasetName":
            return store.dataset["name"] if store.dataset else ""
        if name == "DataFolder":
            return tango_text(store.dataset["folder"]) if store.dataset else ""
        if name == "AuditTrail":
            return json.dumps([c.to_json() for c in store.audit])
        raise KeyError(name)

    def _merge(self, update: dict | str, origin: str) -> None:
        if self.store is None:
            fail("NotInitialised", self.get_status(), origin)
        try:
            changes = self.store.merge(update, self._client())
        except MetadataError as exc:
            fail("BadMetadata", str(exc), origin)
        except tango.DevFailed as exc:  # the Tango DB refused the save: nothing was changed
            fail(
                "NotSaved",
                f"metadata not changed: it cannot be saved in the Tango DB ({exc.args[0].desc})",
                origin,
            )
        if changes:
            self._changed()

    def read_attr_hardware(self, attr_list) -> None:
        if self.store is None:
            fail("NotInitialised", self.get_status(), "read")

    # --- attributes --------------------------------------------------------------------
    def _read_field(self, attr: tango.Attribute) -> None:
        attr.set_value(self._value(attr.get_name()))

    def _write_field(self, attr: tango.WAttribute) -> None:
        key, sub = FIELDS[attr.get_name()]
        try:
            value = from_tango_text(attr.get_write_value(), attr.get_name())
        except LivehistError as exc:
            fail("BadMetadata", str(exc), f"write {attr.get_name()}")
        self._merge({key: {sub: value}} if sub else {key: value}, f"write {attr.get_name()}")

    def initialize_dynamic_attributes(self) -> None:
        events.open_event_socket(self.get_name())
        docs = {"Proposal": "proposal id (ProposalPattern)", "Title": "experiment title",
                "Instrument": "instrument / beamline", "DataRoot": "absolute folder under which datasets go",
                "SampleName": "sample name", "SampleDescription": "sample description"}  # fmt: skip
        for name in FIELDS:
            attr = tango.Attr(name, tango.DevString, AttrWriteType.READ_WRITE)
            props = tango.UserDefaultAttrProp()
            props.set_description(docs[name] + " (kept across restarts; characters beyond Latin-1 read and "
                                  "write as \\u03b1-style escapes, a backslash as \\\\)")  # fmt: skip
            attr.set_default_properties(props)
            self.add_attribute(attr, self._read_field, self._write_field)
            self.set_change_event(name, True, False)

    @attribute(dtype=(str,), max_dim_x=1000, access=AttrWriteType.READ_WRITE,
               doc="users as 'Name (role)'; full records (email, orcid, affiliation) through SetMetadata")  # fmt: skip
    def Users(self) -> list[str]:
        return self._value("Users")

    @Users.write
    def Users(self, value: list[str]) -> None:
        try:
            users = [from_tango_text(u, "Users") for u in value]
        except LivehistError as exc:
            fail("BadMetadata", str(exc), "write Users")
        self._merge({"users": users}, "write Users")

    @attribute(dtype=str, doc="all current metadata as JSON (with the open dataset)")
    def Metadata(self) -> str:
        return self._value("Metadata")

    @attribute(dtype=str, doc="name of the open dataset ('' when none)")
    def DatasetName(self) -> str:
        return self._value("DatasetName")

    @attribute(dtype=str, doc="folder of the open dataset ('' when none)")
    def DataFolder(self) -> str:
        return self._value("DataFolder")

    @attribute(dtype=str, doc="JSON list of the last changes: time, client, key, old, new")
    def AuditTrail(self) -> str:
        return self._value("AuditTrail")

    @attribute(dtype=str, doc="JSON schema of what SetMetadata accepts")
    def MetadataSchema(self) -> str:
        return json.dumps(schema(self.store.rules if self.store else None))

    # --- commands ----------------------------------------------------------------------
    @command(dtype_in=str, doc_in="JSON object merged into the metadata (unknown keys are kept as free-form)")
    def SetMetadata(self, update: str) -> None:
        self._merge(update, "SetMetadata")

    @command(dtype_out=str, doc_out="all current metadata as JSON")
    def GetMetadata(self) -> str:
        if self.store is None:
            fail("NotInitialised", self.get_status(), "GetMetadata")
        return self._value("Metadata")

    @command(dtype_in=str, dtype_out=str, doc_in="dataset name", doc_out="the DataFolder created")
    def StartDataset(self, name: str) -> str:
        if self.store is None:
            fail("NotInitialised", self.get_status(), "StartDataset")
        try:
            folder = self.store.start_dataset(name, self._client())
        except (MetadataError, OSError) as exc:
            fail("BadDataset", str(exc), "StartDataset")
        except tango.DevFailed as exc:
            fail("NotSaved", f"dataset not started: it cannot be saved in the Tango DB ({exc.args[0].desc})",
                 "StartDataset")  # fmt: skip
        self._changed()
        return tango_text(str(folder))

    @command(dtype_out=str, doc_out="path of the dataset summary (JSON) written in the folder")
    def EndDataset(self) -> str:
        if self.store is None:
            fail("NotInitialised", self.get_status(), "EndDataset")
        try:
            path = self.store.end_dataset(self._client())
        except (MetadataError, OSError) as exc:
            fail("BadDataset", str(exc), "EndDataset")
        except tango.DevFailed as exc:
            fail("NotSaved", f"dataset not ended: it cannot be saved in the Tango DB ({exc.args[0].desc})",
                 "EndDataset")  # fmt: skip
        self._changed()
        return tango_text(str(path))


def main(args: list[str] | None = None) -> None:
    run((MetadataManager,), args=args or ["MetadataManager", *sys.argv[1:]])


if __name__ == "__main__":
    main()
