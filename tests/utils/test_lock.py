"""FolderLock: one holder at a time, named to the second comer; stale locks (dead pid, old heartbeat on another
node, the dead previous run of a requeued SLURM job) are taken over, by exactly one taker."""

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from equidiff.utils.lock import LOCK_NAME, FolderBusy, FolderLock, launching_process


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid no longer exists
    return p.pid


def _write_lock(folder, age_s: float = 0.0, **fields):
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": None, "pid_ns": None,
              "proc_start": None, "started": "2024-01-01T00:00:00+00:00", "command": "equidiff predict old",
              "slurm_job_id": None, "slurm_restart_count": 0, "token": "old", **fields}
    path = folder / LOCK_NAME
    path.write_text(json.dumps(holder))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def _same_machine():
    from equidiff.utils.lock import _identity

    me = _identity()
    return {k: me[k] for k in ("host", "boot_id", "pid_ns")}


def test_a_second_holder_is_refused_with_the_holder_named(tmp_path):
    with FolderLock(tmp_path) as lock:
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["token"] == lock.token
        with pytest.raises(FolderBusy) as e:
            FolderLock(tmp_path).acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "command:" in msg
        assert "started" in msg and "paths.output_dir" in msg
    assert not (tmp_path / LOCK_NAME).exists(), "released on exit"
    FolderLock(tmp_path).acquire().release()  # free again


def test_release_never_removes_another_runs_lock(tmp_path):
    lock = FolderLock(tmp_path).acquire()
    _write_lock(tmp_path, token="someone-else")  # e.g. taken over after a missed heartbeat
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "someone-else"


def test_lock_of_a_dead_process_on_this_machine_is_taken_over(tmp_path, caplog):
    _write_lock(tmp_path, pid=_dead_pid(), **_same_machine())  # fresh heartbeat: the pid alone decides
    with caplog.at_level("WARNING"), FolderLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    assert "took over the stale lock" in caplog.text and "no longer running" in caplog.text


def test_lock_of_a_live_process_on_this_machine_is_kept_whatever_its_heartbeat(tmp_path):
    _write_lock(tmp_path, age_s=10_000, **_same_machine())  # this very process: alive
    with pytest.raises(FolderBusy):
        FolderLock(tmp_path, stale_after=60).acquire()


def test_lock_of_another_node_is_stale_only_after_its_heartbeat_timeout(tmp_path):
    _write_lock(tmp_path, age_s=5, host="node-elsewhere", pid=1)
    with pytest.raises(FolderBusy, match="node-elsewhere"):
        FolderLock(tmp_path, stale_after=60).acquire()
    _write_lock(tmp_path, age_s=120, host="node-elsewhere", pid=1)
    with FolderLock(tmp_path, stale_after=60) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token


def test_requeued_slurm_job_takes_over_its_previous_incarnation_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _write_lock(tmp_path, host="node-before-requeue", pid=1, slurm_job_id="4242", slurm_restart_count=0)
    with FolderLock(tmp_path, stale_after=600) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_restart_count"] == 1
        assert lock.token
    # another step of the same (not requeued) job, or another job: its heartbeat decides
    _write_lock(tmp_path, host="node-before-requeue", pid=1, slurm_job_id="4242", slurm_restart_count=1)
    with pytest.raises(FolderBusy):
        FolderLock(tmp_path, stale_after=600).acquire()
    _write_lock(tmp_path, host="node-before-requeue", pid=1, slurm_job_id="1", slurm_restart_count=0)
    with pytest.raises(FolderBusy):
        FolderLock(tmp_path, stale_after=600).acquire()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    with FolderLock(tmp_path, heartbeat=0.05):
        path = tmp_path / LOCK_NAME
        os.utime(path, (time.time() - 1000, time.time() - 1000))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 100


def _race(folder, rank, start, done, results):
    import equidiff.utils.lock as lock_module

    fs_now, take_over = lock_module._fs_now, FolderLock._take_over

    def slow_fs_now(folder):  # a slow shared filesystem: every racer judges the lock stale before any takes it
        time.sleep(0.1)
        return fs_now(folder)

    def late_take_over(self, *args):  # racers act on their (by then old) judgement one after the other
        time.sleep(0.4 * rank)
        return take_over(self, *args)

    lock_module._fs_now, FolderLock._take_over = slow_fs_now, late_take_over
    start.wait(timeout=60)
    try:
        lock = FolderLock(folder, stale_after=60).acquire()
        results.put("won")
    except FolderBusy:
        lock = None
        results.put("refused")
    done.wait(timeout=60)  # hold until every racer has tried
    if lock is not None:
        lock.release()


def test_two_runs_cannot_both_take_one_stale_lock(tmp_path):
    ctx = mp.get_context("fork")
    n = 4
    for _ in range(2):
        _write_lock(tmp_path, age_s=1000, host="node-elsewhere", pid=1)
        start, done, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(tmp_path, i, start, done, results)) for i in range(n)]
        for p in procs:
            p.start()
        outcomes = sorted(results.get(timeout=60) for _ in range(n))
        for p in procs:
            p.join(timeout=60)
        assert outcomes == ["refused"] * (n - 1) + ["won"], outcomes
        assert not (tmp_path / LOCK_NAME).exists()
        assert not list(tmp_path.iterdir()), "no take-over or clock-probe file left behind"


@pytest.mark.parametrize(("env", "holder"), [
    ({}, True),
    ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
    ({"LOCAL_RANK": "1"}, False),                      # Lightning's re-executed rank > 0
    ({"SLURM_PROCID": "0", "LOCAL_RANK": "2"}, False),  # a child Lightning started inside a one-task SLURM job
    ({"SLURM_PROCID": "3"}, False),                     # srun task 3
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),     # rank 0 of the second node
    ({"RANK": "5"}, False),                             # torchrun
    ({"SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}, True),
])
def test_only_the_launching_process_holds_the_lock(monkeypatch, env, holder):
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launching_process() is holder
