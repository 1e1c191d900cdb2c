"""One nightly at a time: a lease file under the storage root, which every node shares.

    with Lease(Storage(cfg.storage.root).child("locks"), "nightly-crossmodal", seconds=600).hold("nightly 2026-12-01"):
        ...  # LeaseHeld if a live holder has it

The holder renews the lease from a background thread every third of its length. A holder that
crashed (SIGKILL, a lost node) stops renewing: its lease expires and the next nightly takes
it over. On the holder's own host a dead holder is seen at once (its pid is gone, or is another
process now). On a local or shared POSIX filesystem taking the lease is atomic (O_EXCL create,
rename of a stale file); on an object store it is write-then-read-back, which two nightlies
started in the same second could both pass: schedule nightlies on one scheduler.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from pipelines.lineage import process_start
from pipelines.storage import Storage


@dataclass
class Holder:
    token: str
    what: str  # what holds it, in words ("nightly 2026-12-01, pid 4242 on node-3")
    host: str
    pid: int
    process_start: str
    acquired_at: float
    expires_at: float

    def alive(self, now: float | None = None) -> bool:
        if (now or time.time()) >= self.expires_at:
            return False
        if self.host == socket.gethostname():
            return bool(self.process_start) and process_start(self.pid) == self.process_start
        return True  # another host: trust the lease until it expires

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.acquired_at))
        return f"{self.what} (pid {self.pid} on {self.host}, since {since})"


class LeaseHeld(RuntimeError):
    def __init__(self, holder: Holder):
        super().__init__(f"held by {holder.describe()}")
        self.holder = holder


class Lease:
    def __init__(self, folder: Storage, name: str, seconds: float):
        self.folder, self.name, self.seconds = folder, f"{name}.json", seconds
        self.mine: Holder | None = None
        self.recovered: Holder | None = None  # the dead holder this lease was taken over from

    # -- reading ---------------------------------------------------------------------------
    def holder(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.folder.read_bytes(self.name)))
        except (FileNotFoundError, OSError, ValueError, TypeError):
            return None  # absent, or half-written by a holder that died mid-write: nobody holds it

    # -- taking, renewing, releasing -------------------------------------------------------
    def acquire(self, what: str) -> Holder:
        """Take the lease or raise LeaseHeld naming the live holder."""
        pid = os.getpid()
        now = time.time()
        mine = Holder(uuid.uuid4().hex, what, socket.gethostname(), pid, process_start(pid), now, now + self.seconds)
        current = self.holder()
        if current is not None and current.alive(now):
            raise LeaseHeld(current)
        self.folder.makedirs()
        if current is not None or self.folder.exists(self.name):
            self._remove_stale(current.token if current else None)
        self._create(mine)
        confirmed = self.holder()
        if confirmed is None or confirmed.token != mine.token:
            raise LeaseHeld(confirmed or current)
        self.mine, self.recovered = mine, current
        return mine

    def renew(self) -> bool:
        """Push the expiry forward; False if the lease is no longer this holder's."""
        current = self.holder()
        if self.mine is None or current is None or current.token != self.mine.token:
            return False
        self.mine.expires_at = time.time() + self.seconds
        self._write(self.mine)
        return True

    def release(self) -> None:
        current = self.holder()
        if self.mine is not None and current is not None and current.token == self.mine.token:
            self.folder.fs.delete_file(self.folder.path(self.name))
        self.mine = None

    @contextmanager
    def hold(self, what: str) -> Iterator[Holder]:
        holder = self.acquire(what)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew_until, args=(stop,), daemon=True, name="lease-renewal")
        renewer.start()
        try:
            yield holder
        finally:
            stop.set()
            renewer.join()
            self.release()

    def _renew_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.seconds / 3):
            if not self.renew():
                print(f"lease {self.name}: lost to another holder", flush=True)
                return

    # -- the filesystem ----------------------------------------------------------------------
    def _create(self, holder: Holder) -> None:
        data = json.dumps(asdict(holder)).encode()
        if not self.folder.is_local():
            self.folder.write_bytes(data, self.name)
            return
        try:
            fd = os.open(self.folder.local_path(self.name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return  # another nightly created it first: the read-back names it
        with os.fdopen(fd, "wb") as out:
            out.write(data)

    def _write(self, holder: Holder) -> None:
        data = json.dumps(asdict(holder)).encode()
        if not self.folder.is_local():
            self.folder.write_bytes(data, self.name)
            return
        temporary = self.folder.local_path(f".{self.name}.{holder.token}")
        temporary.write_bytes(data)
        os.replace(temporary, self.folder.local_path(self.name))  # readers never see half a file

    def _remove_stale(self, stale_token: str | None) -> None:
        if not self.folder.is_local():
            self.folder.fs.delete_file(self.folder.path(self.name))
            return
        # Moved aside by rename, which one taker only wins; and if what was moved is not the
        # stale lease this taker saw (a faster taker already replaced it), it goes back.
        aside = self.folder.local_path(f".{self.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.folder.local_path(self.name), aside)
        except FileNotFoundError:
            return
        try:
            moved = Holder(**json.loads(aside.read_bytes()))
        except (ValueError, TypeError):
            moved = None
        if moved is not None and moved.token != stale_token:
            os.rename(aside, self.folder.local_path(self.name))
            raise LeaseHeld(moved)
        aside.unlink()
