"""One writer per output root: a lease file that a second run will not share.

``OUT/_writer.json`` (readers skip names starting with ``_``) holds the owner's token, run id,
host, pid and heartbeat time. The owner rewrites it every ``heartbeat_s`` seconds from a daemon
thread and deletes it when the run ends. Another run that finds the file:

* takes it over at once when the owner was a process of this host that no longer exists (the
  usual case: a killed run re-run on the same machine), or when told to (``--break-lock``);
* otherwise watches it: a heartbeat that moves means a live run, and the newcomer stops with
  an error naming it; no heartbeat for ``stale_s`` seconds (on the newcomer's clock, so clock
  skew between hosts does not matter) means a dead run, and the newcomer takes over.

Take-over deletes the file and creates it again exclusively, so of two newcomers one wins and
the other sees a fresh lease. On stores without conditional deletes, two newcomers that judge
the same dead lease at the same instant can both delete it; the loser then finds the winner's
lease. An owner whose lease was taken over sees it at its next heartbeat and stops committing
(:meth:`WriterLease.check`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from jobs.infer.output import Output
from jobs.infer.errors import LockedError  # noqa: F401  (raised here; imported from here too)

HEARTBEAT_S = 20.0
STALE_S = 90.0


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _local_owner_gone(lease: dict) -> bool:
    """True if ``lease`` was taken by a process of this host that has exited."""
    if lease.get("host") != socket.gethostname():
        return False
    pid = lease.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    started = lease.get("pid_start")
    return started is not None and _process_start(pid) != started


class WriterLease:
    """The writer lease of one output root; use as a context manager around a run."""

    def __init__(self, output: Output | str, run_label: str = "", *, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S, break_lock: bool = False):
        self.output = Output.of(output)
        self.path = self.output.lock_path()
        self.heartbeat_s, self.stale_s, self.break_lock = heartbeat_s, stale_s, break_lock
        self.token = uuid.uuid4().hex
        self.info = {"token": self.token, "run": run_label, "host": socket.gethostname(), "pid": os.getpid(),
                     "pid_start": _process_start(os.getpid())}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- reading and writing
    def _read(self) -> dict | None:
        try:
            return self.output.read_json(self.path)  # safe while the owner's heartbeat replaces it
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn or foreign content: no heartbeat will ever move in it

    def _payload(self) -> dict:
        return {**self.info, "heartbeat_at": time.time()}

    def _remove(self) -> None:
        try:
            self.output.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------------ acquiring
    def acquire(self) -> "WriterLease":
        while True:
            if self.output.write_json(self.path, self._payload(), exclusive=True):
                break
            held = self._read()
            if held is None:
                continue  # released between our create and read: try again
            if not (self.break_lock or _local_owner_gone(held)):
                self._wait_until_stale(held)
            if self._read() == held:  # not replaced meanwhile by another newcomer's lease
                self._remove()
        self._thread = threading.Thread(target=self._beat, name="writer-lease", daemon=True)
        self._thread.start()
        return self

    def _wait_until_stale(self, held: dict) -> None:
        """Return once ``held`` shows no heartbeat for ``stale_s``; raise if its owner is alive."""
        first = time.monotonic()
        while time.monotonic() - first < self.stale_s:
            time.sleep(min(self.heartbeat_s / 2, self.stale_s / 10))
            now = self._read()
            if now is None:
                return  # released meanwhile
            if now != held:
                raise LockedError(
                    f"output is being written by another run ({now.get('run') or 'unknown run'} on host "
                    f"{now.get('host')}, pid {now.get('pid')}): one writer per output at a time. If that run "
                    f"is gone, rerun with --break-lock, or wait {self.stale_s:.0f} s after its last heartbeat"
                )

    # ------------------------------------------------------------------------ holding
    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self._read()
                if not held or held.get("token") != self.token:
                    self.lost = f"the writer lease was taken over by {held.get('run') if held else 'nobody'}"
                    return
                self.output.write_json(self.path, self._payload())
                last_ok = time.monotonic()
            except Exception as e:  # noqa: BLE001  (a storage hiccup: retry at the next beat)
                if time.monotonic() - last_ok > self.stale_s / 2:
                    # others may soon judge the lease dead: stop committing rather than race them
                    self.lost = f"the writer lease could not be renewed: {type(e).__name__}: {e}"
                    return

    def check(self) -> None:
        """Raise if another run took the lease over (then this one must not commit)."""
        if self.lost:
            raise LockedError(f"stopped: {self.lost}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held and held.get("token") == self.token:
            self._remove()

    def __enter__(self) -> "WriterLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
