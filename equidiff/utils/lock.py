"""A run owns its output folder while it works: ``FolderLock``, a lock file that also works across nodes.

Two runs writing one folder mix their results (samples of one configuration, metrics of the other). The
launching process of a run therefore holds ``<output_dir>/.equidiff.lock`` from before its first write to its
last; a second run meets it and stops with a message naming the holder (host, pid, start time, command).

Why not ``fcntl``/``flock``: on the shared filesystems of clusters (NFS, Lustre, GPFS) they depend on mount
options and lock daemons, and a crashed node's lock lingers until a server-side lease runs out. So the lock is
a plain file, created atomically (``os.link`` of a complete temporary file, else ``O_CREAT | O_EXCL``; both
are atomic on NFS v3+ and local filesystems), holding who owns it, with a heartbeat: a thread refreshes its
modification time every ``heartbeat`` seconds. A lock is stale, and is taken over, when

* its holder ran on this machine (same host name, boot id and pid namespace) and that process is gone
  (``kill -9``, OOM killer): decided at once from the pid and the process's start time (pids are reused);
* it belongs to an earlier run of this same SLURM job (same ``SLURM_JOB_ID``, lower ``SLURM_RESTART_COUNT``):
  a requeued job takes over the lock of its own dead previous incarnation at once, on whatever node;
* otherwise (another node, or a container whose processes we cannot see) its heartbeat is older than
  ``stale_after`` seconds, measured on the filesystem's own clock (the mtime of a file created now next to
  it), so clock skew between nodes does not matter.

A take-over is serialised by a second, short-lived lock file (``.equidiff.lock.takeover``): under it the taker
checks that the lock is still the one it judged stale, removes it and creates its own, so two runs cannot
both take one stale lock. A taker that dies inside that few-millisecond section leaves the take-over file,
which the next taker removes once it is older than ``TAKEOVER_STALE_S``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

from equidiff.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".equidiff.lock"
# A lock whose heartbeat is older than this (seconds) is stale. Well above NFS attribute caching (up to 60 s):
# another node may see a heartbeat that late.
STALE_AFTER_S = 300.0
TAKEOVER_STALE_S = 60.0


class FolderBusy(ConfigError):
    """The output folder is held by another, live run."""


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None without /proc."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name (field 2) may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` runs (and is the one that started at ``start``, when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is not None and stat.rsplit(")", 1)[-1].split()[:1] in (["Z"], ["X"]):
        return False  # a zombie: killed, not yet reaped by its parent
    return start is None or _proc_start(pid) in (None, start)


def _identity() -> dict:
    """Who this process is: what a later run needs to tell whether it is still alive."""
    pid = os.getpid()
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": pid_ns,
        "proc_start": _proc_start(pid),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }


def _fs_now(folder: Path) -> float:
    """Now, on the clock of the filesystem that holds ``folder`` (the mtime of a file created there)."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".equidiff.clock.")
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(probe)


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists (atomically: no reader sees it half-written)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL (a reader may briefly see it empty)
            pass
        try:
            out = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(out, data)
            os.fsync(out)
        finally:
            os.close(out)
        return True
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class FolderLock:
    """``<folder>/.equidiff.lock``, held from ``acquire()`` to ``release()`` (see the module docstring).

    ``stale_after`` / ``heartbeat`` default to $EQUIDIFF_LOCK_STALE_AFTER (or ``STALE_AFTER_S``) and a tenth
    of it (at most 30 s).
    """

    def __init__(self, folder: str | os.PathLike, *, stale_after: float | None = None,
                 heartbeat: float | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        env = os.environ.get("EQUIDIFF_LOCK_STALE_AFTER")
        self.stale_after = float(stale_after if stale_after is not None else env or STALE_AFTER_S)
        self.heartbeat = float(heartbeat if heartbeat is not None else min(30.0, self.stale_after / 10))
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading
    def _read(self) -> tuple[dict | None, float | None]:
        """(holder, heartbeat age in s on the filesystem's clock); (None, None) when there is no lock."""
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}  # being written (O_EXCL fallback) or damaged
        return holder, max(0.0, _fs_now(self.folder) - st.st_mtime)

    def _stale_reason(self, h: dict, age: float) -> str | None:
        me = _identity()
        if (h.get("slurm_job_id") and h["slurm_job_id"] == me["slurm_job_id"]
                and int(h.get("slurm_restart_count") or 0) < me["slurm_restart_count"]):
            return "it was taken by an earlier run of this requeued SLURM job"
        same_machine = (h.get("host") == me["host"] and h.get("boot_id") == me["boot_id"]
                        and h.get("pid_ns") == me["pid_ns"])
        if same_machine and isinstance(h.get("pid"), int):
            if not _pid_alive(h["pid"], h.get("proc_start")):
                return f"its process {h['pid']} on this machine is no longer running"
            return None
        if age > self.stale_after:
            return f"its heartbeat stopped {age:.0f} s ago (more than {self.stale_after:.0f} s)"
        return None

    def describe(self, h: dict, age: float) -> str:
        if not h:
            return f"a lock file being written or damaged, {age:.0f} s old"
        return (f"host {h.get('host')}, pid {h.get('pid')}, started {h.get('started')}, "
                f"command: {h.get('command')} (heartbeat {age:.0f} s ago"
                + (f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else "") + ")")

    # ------------------------------------------------------------------ acquiring
    def acquire(self) -> FolderLock:
        """Take the lock, or take over a stale one; raise ``FolderBusy`` when a live run holds it."""
        if self.token is not None:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        token = uuid.uuid4().hex
        data = json.dumps({**_identity(), "token": token}, indent=1).encode()
        for attempt in range(200):
            if _create_exclusive(self.path, data):
                self._hold(token)
                return self
            holder, age = self._read()
            if holder is None:
                continue  # released meanwhile
            if not holder:  # empty: a creator between O_EXCL and its write, unless long dead
                if age < self.stale_after:
                    time.sleep(0.05)
                    continue
                reason = "it is an empty lock file left by a run that died while creating it"
            else:
                reason = self._stale_reason(holder, age)
            if reason is None:
                raise FolderBusy(
                    f"{self.folder} is in use by another equidiff run ({self.describe(holder, age)}). Two runs "
                    "writing one folder would mix their results. Wait for it to finish, or choose another "
                    f"paths.output_dir. If that run is dead (e.g. its node crashed), its lock is taken over "
                    f"automatically once its heartbeat is older than {self.stale_after:.0f} s; or delete "
                    f"{self.path} yourself.")
            if self._take_over(holder, data, token, reason):
                return self
            time.sleep(0.02 * (1 + attempt % 5))
        raise FolderBusy(f"could not take the lock {self.path}: it kept changing hands; try again")

    def _take_over(self, seen: dict, data: bytes, token: str, reason: str) -> bool:
        mutex = self.path.with_name(LOCK_NAME + ".takeover")
        if not _create_exclusive(mutex, token.encode()):
            with contextlib.suppress(OSError):
                if _fs_now(self.folder) - mutex.stat().st_mtime > TAKEOVER_STALE_S:
                    mutex.unlink()  # a taker died inside the take-over section
            return False
        try:
            current, age = self._read()
            if current != seen:
                return False  # released, or taken by someone else meanwhile: look again
            self.path.unlink()
            if not _create_exclusive(self.path, data):
                return False  # a new run created it right after the unlink: it holds it
            log.warning("took over the stale lock of %s: %s", self.describe(seen, age or 0.0), reason)
            self._hold(token)
            return True
        finally:
            if _read_text(str(mutex)) == token:
                mutex.unlink()

    def _hold(self, token: str) -> None:
        self.token = token
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="equidiff-lock-heartbeat", daemon=True)
        self._thread.start()

    def _owned(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, ValueError):
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self._owned():
                log.error("lost the lock %s (taken over by another run after a missed heartbeat?): results in "
                          "%s may now mix with that run's", self.path, self.folder)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    # ------------------------------------------------------------------ releasing
    def release(self) -> None:
        if self.token is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._owned():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.token, self._thread = None, None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def launching_process() -> bool:
    """Whether this process launched the job (rank 0 of rank 0's node), as opposed to a DDP rank > 0.

    Lightning re-executes ``sys.argv`` for ranks > 0 with LOCAL_RANK set (and NODE_RANK on other nodes);
    torchrun sets RANK, SLURM's srun SLURM_PROCID (also in the children Lightning starts under SLURM, hence
    all of them are checked). A variable that is unset or 0 says nothing against rank 0.
    """
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return all(os.environ.get(k, "0").strip() in ("", "0") for k in keys)
