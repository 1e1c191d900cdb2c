"""The nightly lock: one holder at a time, and a crashed holder never blocks the next forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jobs import nightly
from jobs.lease import Lease, LeaseHeld
from pipelines.storage import Storage
from tests.conftest import DEMO_CONFIG

HOLD = """
import sys
from jobs.lease import Lease
from pipelines.storage import Storage
lease = Lease(Storage(sys.argv[1]), "nightly-crossmodal", seconds=600)
with lease.hold("nightly in a child"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


def holder_process(folder):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_holder_is_refused_with_the_first_named_then_gets_it_after_release(tmp_path):
    first, second = (Lease(Storage(str(tmp_path)), "nightly-crossmodal", 600) for _ in range(2))
    with first.hold("nightly 2026-12-01"):
        with pytest.raises(LeaseHeld, match=f"nightly 2026-12-01 \\(pid {os.getpid()} on "):
            second.acquire("nightly 2026-12-01 again")
    assert not (tmp_path / "nightly-crossmodal.json").exists()
    second.acquire("later")
    assert second.holder().what == "later" and second.recovered is None


def test_a_lease_held_by_a_live_process_is_respected_and_a_sigkilled_one_is_taken_over(tmp_path):
    child = holder_process(tmp_path)
    lease = Lease(Storage(str(tmp_path)), "nightly-crossmodal", 600)
    with pytest.raises(LeaseHeld, match=f"pid {child.pid}"):
        lease.acquire("second")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert json.loads((tmp_path / "nightly-crossmodal.json").read_text())["pid"] == child.pid  # left behind
    lease.acquire("after the crash")
    assert lease.recovered.pid == child.pid
    assert lease.holder().pid == os.getpid()


def test_a_holder_on_another_host_is_trusted_until_its_lease_expires(tmp_path):
    lease = Lease(Storage(str(tmp_path)), "nightly-crossmodal", 600)
    record = {"token": "t", "what": "nightly elsewhere", "host": "node-7", "pid": 1, "process_start": "1"}
    now = time.time()
    (tmp_path / "nightly-crossmodal.json").write_text(json.dumps(record | {"acquired_at": now, "expires_at": now + 60}))
    with pytest.raises(LeaseHeld, match="nightly elsewhere \\(pid 1 on node-7"):
        lease.acquire("here")
    (tmp_path / "nightly-crossmodal.json").write_text(json.dumps(record | {"acquired_at": now, "expires_at": now - 1}))
    lease.acquire("here")
    assert lease.recovered.host == "node-7"


def test_renewal_pushes_the_expiry_and_a_lost_lease_is_noticed(tmp_path):
    lease = Lease(Storage(str(tmp_path)), "nightly-crossmodal", 600)
    first = lease.acquire("nightly")
    expiry = first.expires_at
    assert lease.renew() and lease.holder().expires_at > expiry
    (tmp_path / "nightly-crossmodal.json").unlink()  # someone removed it by hand
    assert not lease.renew()


def test_a_second_nightly_exits_0_naming_the_running_one(tmp_path, capsys):
    child = holder_process(tmp_path / "storage" / "locks")
    try:
        overrides = ["--set", f"storage.root={tmp_path / 'storage'}", "--set", "registry.enabled=true"]
        assert nightly.main([str(DEMO_CONFIG), *overrides]) == 0
    finally:
        child.stdin.close()
        child.wait()
    out = capsys.readouterr().out
    assert f"another nightly is running: nightly in a child (pid {child.pid} on" in out
    assert "this one does nothing" in out


def test_nightly_needs_a_registry(tmp_path, capsys):
    assert nightly.main([str(DEMO_CONFIG), "--set", "registry.enabled=false"]) == 2
    assert "set registry.enabled: true" in capsys.readouterr().err
