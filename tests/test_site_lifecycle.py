"""`livehist up / down / status` against a hostile user: host names the resolver cannot even
encode, state dirs deleted or made unwritable under a running site, odd server instance names.
Real embedded databases and real device servers on free ports."""

from __future__ import annotations

import os

from livehist.site.process import managed_processes
from tests.conftest import run_cli

MM = {"servers": {"MetadataManager": {"lc": {"MetadataManager": {
    "test/lifecycle/m": {"properties": {"DefaultDataRoot": ["/tmp"]}}}}}}}  # fmt: skip


def test_a_tango_host_name_the_resolver_cannot_encode_is_named_not_a_traceback(tmp_path):
    """`a..b:PORT` (an empty label, a typo) made Python's idna codec raise UnicodeError out of the
    connection attempt: `up` and `status` ended in a traceback instead of naming the host."""
    state = tmp_path / "state"
    for command in ("up", "status"):
        out = run_cli(command, "--tango-host", "beamline..example:12345", "--state-dir", str(state))
        text = out.stdout + out.stderr
        assert out.returncode == 1 and "Traceback" not in text, text
        assert "the name 'beamline..example' does not resolve" in text, text
        assert "check TANGO_HOST / --tango-host" in text, text
    assert managed_processes(state) == []
    env = dict(os.environ, TANGO_HOST="beamline..example:12345")
    out = run_cli("status", "--state-dir", str(state), env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "the name 'beamline..example' does not resolve" in out.stdout, out.stdout
