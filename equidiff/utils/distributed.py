"""DDP that cannot hang for long when a process dies during start-up.

Two mechanisms, for the two ways ranks are started:

* **Ranks Lightning starts as subprocesses of rank 0** (``trainer=ddp_cpu`` / ``trainer=ddp`` outside SLURM):
  :func:`launcher_watch` makes each of them end with rank 0 (Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``;
  elsewhere a thread that polls the parent's pid). Without it a rank whose rank 0 died (an exception, an
  out-of-memory kill) before the process group existed waits in the rendezvous for the full timeout (30
  minutes by default), holding its memory. SIGKILL, because such a rank is usually blocked inside the C++
  rendezvous or a collective, where a Python signal handler never runs. Lightning already covers the other
  direction: its launcher ends every process when a child exits with an error.
* **Ranks started by someone else** (``srun``, one task per GPU; ``torchrun``): :class:`DDPStrategy` sets up the
  process group with a short *start-up* timeout (``startup_timeout_s``: rendezvous, the first broadcasts and
  barriers) and raises it to the steady-state ``timeout_s`` once every loop runs, so that a long collective
  later (rank 0 merging 50k samples while the others wait at a barrier, metric syncs) is not cut short.
  The SLURM scripts also run ``srun --kill-on-bad-exit=1``, which ends the step when any task fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy

LAUNCHER_ENV = "EQUIDIFF_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def launcher_pid() -> int | None:
    """The pid of the equidiff process that started this one as a DDP rank (Lightning's subprocess launcher),
    or None when this process was not started that way (rank 0, srun, torchrun, a single process)."""
    pid = os.environ.get(LAUNCHER_ENV)
    if not pid or os.environ.get("LOCAL_RANK", "0") == "0" or int(pid) == os.getpid():
        return None
    return int(pid)


@contextlib.contextmanager
def launcher_watch() -> Iterator[None]:
    """Around one ``equidiff`` command: in a rank that Lightning started as a subprocess of rank 0, end this
    process when rank 0 ends; in any other process, mark it as the launcher of the ranks it may start
    (``EQUIDIFF_LAUNCHER_PID``, inherited by Lightning's subprocesses; removed again afterwards)."""
    parent = launcher_pid()
    if parent is not None:
        _die_with_parent(parent)
        yield
        return
    old = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LAUNCHER_ENV, None)
        else:
            os.environ[LAUNCHER_ENV] = old


def _parent_gone(parent: int) -> None:
    print(f"equidiff: rank 0 (pid {parent}) has ended; this DDP rank ends too", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent:  # it ended before the request took effect
                    _parent_gone(parent)
                return
        except (OSError, AttributeError):
            pass

    def poll() -> None:  # portable fallback: a daemon thread runs even while the main thread waits in C++
        while os.getppid() == parent:
            time.sleep(1.0)
        _parent_gone(parent)

    if os.getppid() != parent:
        _parent_gone(parent)
    threading.Thread(target=poll, name="equidiff-parent-watch", daemon=True).start()


def set_process_group_timeout(timeout: timedelta) -> None:
    """Set the default process group's timeout for the operations that follow (torch >= 2.6)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # public from torch 2.9
    setter(timeout)


class DDPStrategy(_LightningDDPStrategy):
    """Lightning's ``DDPStrategy`` with a start-up timeout and a steady-state timeout.

    Args:
        startup_timeout_s: timeout of the rendezvous and of every collective until the first loop starts. It
            must cover the skew between the ranks' start-up (each builds its objects and loads its weights
            before joining), and bounds how long a rank waits for one that died during start-up.
        timeout_s: timeout of every collective once the loops run (Lightning's default is 30 minutes). It must
            cover the longest wait at a barrier, e.g. rank 0 merging all samples while the others wait.
        **kwargs: Lightning's ``DDPStrategy`` arguments (``process_group_backend``, ...), except ``timeout``.
    """

    def __init__(self, *, startup_timeout_s: float = 300, timeout_s: float = 1800, **kwargs):
        if "timeout" in kwargs:
            raise TypeError("equidiff's DDPStrategy takes startup_timeout_s and timeout_s, not timeout")
        super().__init__(timeout=timedelta(seconds=startup_timeout_s), **kwargs)
        self.startup_timeout = timedelta(seconds=startup_timeout_s)
        self.steady_timeout = timedelta(seconds=timeout_s)
        self._steady = False

    def setup_environment(self) -> None:
        self._steady = False  # a new process group starts with the start-up timeout
        super().setup_environment()

    def _start_steady_state(self) -> None:
        if not self._steady:
            set_process_group_timeout(self.steady_timeout)
            self._steady = True

    # the loops call these on every rank once set-up is over (the sanity check calls on_validation_start)
    def on_train_start(self) -> None:
        super().on_train_start()
        self._start_steady_state()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._start_steady_state()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._start_steady_state()

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._start_steady_state()
