"""The metadata model without Tango: validation, merge, audit trail, dataset life cycle."""

from __future__ import annotations

import grp
import json
import os
import stat
import threading

import jsonschema
import pytest

from livehist.components.metadata import MetadataError, MetadataStore, Rules, parse_user, schema


def test_merge_validates_and_keeps_free_form_keys():
    saved = []
    store = MetadataStore(save=saved.append)
    assert store.state == "STANDBY"
    changes = store.merge({"proposal": "20261234", "title": "Powder", "sample": {"name": "Si", "temperature": 295},
                           "users": ["Jane Doe (PI)", {"name": "Li Wei", "role": "student", "orcid": "0000-0001"}],
                           "beam_energy_meV": 25.3, "tags": ["a", "b"]})  # fmt: skip
    assert {c.key for c in changes} == {"proposal", "title", "sample.name", "sample.temperature", "users",
                                        "beam_energy_meV", "tags"}  # fmt: skip
    assert store.state == "ON" and saved[-1]["metadata"]["beam_energy_meV"] == 25.3
    snap = store.snapshot()
    assert snap["sample"] == {"name": "Si", "temperature": 295.0}
    assert snap["users"][0] == {"name": "Jane Doe", "role": "PI"}
    jsonschema.validate(snap, schema())  # what we keep is what the schema promises
    assert (
        store.merge({"sample": {"description": "NIST 640f"}}) and store.snapshot()["sample"]["name"] == "Si"
    )
    assert store.merge({"title": "Powder"}) == []  # no change, no audit entry
    snap["sample"]["name"] = "changed"  # a snapshot is a copy
    assert store.get("sample")["name"] == "Si"


@pytest.mark.parametrize(
    "update, message",
    [
        ({"proposal": "../../etc"}, "does not match the pattern"),
        ({"proposal": 20261234}, "proposal must be a string"),
        ({"title": "x" * 5000}, "over the limit of 4096"),
        ({"sample": {"temperature": "hot"}}, "sample.temperature must be a number"),
        ({"sample": {"colour": "red"}}, "sample.colour is not a sample field"),
        ({"sample": "Si"}, "sample must be an object"),
        ({"users": [{"name": "A", "shoe_size": 42}]}, "users[0].shoe_size is not a user field"),
        ({"users": [{"role": "PI"}]}, "users[0] must be an object with a name"),
        ({"users": "Jane"}, "users must be a list"),
        ({"data_root": "relative/path"}, "data_root must be an absolute path"),
        ({"bad key!": 1}, "is not allowed"),
        ({"nested": {"a": {"b": 1}}}, "one level of list/object"),
        ({"dataset": "x"}, "set by StartDataset"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "needs a JSON object"),
    ],
)
def test_bad_metadata_is_refused_whole_and_named(update, message):
    store = MetadataStore()
    store.merge({"proposal": "P1", "title": "kept"})
    before = store.stored()
    with pytest.raises(MetadataError) as exc:
        store.merge(update if isinstance(update, str) else {"title": "not applied", **update})
    assert message in str(exc.value)
    assert store.stored() == before  # all keys or none


def test_caps_on_keys_and_total_size():
    store = MetadataStore(Rules(max_free_keys=3, max_total_bytes=2000))
    store.merge({"a": 1, "b": 2, "c": 3})
    with pytest.raises(MetadataError, match="4 free-form keys, over the limit of 3"):
        store.merge({"d": 4})
    store.merge({"c": None})  # null removes a free-form key, making room
    store.merge({"d": 4})
    assert "c" not in store.snapshot() and store.audit[-2].key == "c" and store.audit[-2].new is None
    with pytest.raises(MetadataError, match="over the limit of 2000"):
        store.merge({"a": "x" * 1500, "b": "y" * 1500})


def test_audit_trail_is_bounded_and_survives_a_restore():
    saved = []
    store = MetadataStore(Rules(audit_length=5), save=saved.append)
    for i in range(12):
        store.merge({"title": f"t{i}"}, client=f"10.0.0.{i}")
    trail = [c.to_json() for c in store.audit]
    assert len(trail) == 5 and trail[-1]["new"] == "t11" and trail[-1]["old"] == "t10"
    assert trail[-1]["client"] == "10.0.0.11" and trail[-1]["time"].endswith("+00:00")
    again = MetadataStore(Rules(audit_length=5), stored=json.loads(json.dumps(saved[-1])))
    assert again.stored() == store.stored()


def test_concurrent_writers_with_room_keep_every_key():
    store = MetadataStore(Rules(max_free_keys=500))
    threads = [threading.Thread(target=lambda k=k: [store.merge({f"w{k}_{i}": i}, client=f"w{k}") for i in range(50)])
               for k in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {f"w{k}_{i}" for k in range(4) for i in range(50)} <= set(store.snapshot())


def test_dataset_life_cycle_with_folder_group_mode_and_summary(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    store = MetadataStore(Rules(data_group=group, data_mode=0o2750))
    with pytest.raises(MetadataError, match="no proposal set"):
        store.start_dataset("run1")
    store.merge({"proposal": "20261234"})
    with pytest.raises(MetadataError, match="no DataRoot set"):
        store.start_dataset("run1")
    store.merge({"data_root": str(tmp_path), "instrument": "SANS2D", "sample": {"name": "Si"}})
    for bad in ("../x", "a/b", "..", "", "x" * 70, "-lead"):
        with pytest.raises(MetadataError, match="is not allowed"):
            store.start_dataset(bad)
    folder = store.start_dataset("run1")
    assert store.state == "RUNNING" and folder.is_dir()
    assert folder.parent.name == "20261234" and folder.parent.parent.parent == tmp_path
    mode = folder.stat().st_mode
    assert stat.S_IMODE(mode) == 0o2750 and folder.stat().st_gid == os.getgid()
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o2750  # created parents too
    with pytest.raises(MetadataError, match="EndDataset first"):
        store.start_dataset("run2")
    (folder / "scan.nxs").write_bytes(b"x" * 10)
    summary_path = store.end_dataset()
    summary = json.loads(summary_path.read_text())
    assert summary["dataset"] == "run1" and summary["metadata"]["sample"]["name"] == "Si"
    assert summary["files"] == [{"path": "scan.nxs", "size": 10, "modified": summary["files"][0]["modified"]}]
    assert summary["start_time"] <= summary["end_time"] and store.state == "ON"
    with pytest.raises(MetadataError, match="no dataset is open"):
        store.end_dataset()


def test_folder_pattern_and_group_errors(tmp_path):
    store = MetadataStore(Rules(folder_pattern="{data_root}/{nope}/{dataset}"))
    store.merge({"proposal": "P", "data_root": str(tmp_path)})
    with pytest.raises(MetadataError, match="cannot be filled"):
        store.start_dataset("d")
    store = MetadataStore(Rules(folder_pattern="/tmp/{dataset}"))
    store.merge({"proposal": "P", "data_root": str(tmp_path)})
    with pytest.raises(MetadataError, match="outside DataRoot"):
        store.start_dataset("d")
    store = MetadataStore(Rules(data_group="no-such-group-livehist"))
    store.merge({"proposal": "P", "data_root": str(tmp_path)})
    with pytest.raises(MetadataError, match="DataGroup 'no-such-group-livehist' is not a group"):
        store.start_dataset("d")
    store = MetadataStore()
    store.merge({"proposal": "P", "data_root": str(tmp_path / "missing")})
    with pytest.raises(MetadataError, match="does not exist"):
        store.start_dataset("d")
    with pytest.raises(MetadataError, match="not a regex"):
        MetadataStore(Rules(proposal_pattern="(["))


def test_parse_user():
    assert parse_user("Jane Doe (PI)") == {"name": "Jane Doe", "role": "PI"}
    assert parse_user(" Li Wei ") == {"name": "Li Wei"}
