"""A check that a denoising loop never reads tensor data on the host (a device sync on a GPU).

On a GPU, reading a device tensor on the host (``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``.tolist()``,
``.cpu()``, a data-dependent shape such as ``nonzero`` or a boolean mask) waits for every kernel queued before it,
and a blocking host-to-device copy (``.to(device)`` of a host tensor, ``torch.tensor(..., device=...)``, a host
table indexed by a device tensor) does too. Both stall the queue once per step and rule out CUDA graphs.

``HostSyncWatch`` finds them without a GPU. The loop runs on the ``meta`` device, where tensors have shapes but no
data: any host read of device data raises there, and so does an op mixing a host tensor (other than a 0-d
scalar, which CUDA kernels also take by value) with device data. A ``TorchDispatchMode`` also flags, once the
loop has started, every host read (``aten._local_scalar_dense``, the data-dependent ops) of a tensor that is not
on the CPU, and every blocking copy between devices, so the failure names the line; copies with
``non_blocking=True`` are allowed (on CUDA equidiff makes them from pinned memory: the noise blocks of
``equidiff.utils.rng``). Host work on host tensors (a scheduler's CPU tables) is no device sync and is allowed.
The loop "starts" at the first call of the model function the sampler gets (``watch.arm_on_call(model_fn)``),
so the set-up before it (building the step tables, moving them to the device once, drawing x_T) may read and
copy freely.

Not seen on the meta device: ``torch.tensor(data, device=...)`` (made on meta without a copy), which on CUDA is a
blocking copy. The CUDA run (``torch.cuda.set_sync_debug_mode``) sees it.

On a CUDA device the same watch also sets ``torch.cuda.set_sync_debug_mode("error")`` from that first call to the
end of the block (tests/gpu).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops whose result the host must read (item, bool, float, int, tolist end in _local_scalar_dense) or whose output
# shape depends on the data
HOST_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero, aten.nonzero_static,
              aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.argwhere,
              aten.repeat_interleave}


class HostSyncError(AssertionError):
    pass


def _where() -> str:
    """The innermost frame of equidiff code (or else of the caller) in the current stack."""
    frames = [f for f in traceback.extract_stack()[:-3] if "torch/" not in f.filename]
    ours = [f for f in frames if "/equidiff/" in f.filename] or frames
    f = ours[-1]
    return f"{f.filename}:{f.lineno} ({f.line})"


class HostSyncWatch(TorchDispatchMode):
    """Record (and raise on) host reads and blocking device transfers once armed (module docstring)."""

    def __init__(self):
        super().__init__()
        self.armed = False
        self.found: list[str] = []
        self._cuda_mode = None

    # ------------------------------------------------------------------ arming
    def arm_on_call(self, fn: Callable) -> Callable:
        """``fn`` wrapped so that its first call arms the watch (the loop starts there)."""

        def wrapped(*args, **kwargs):
            self.arm()
            return fn(*args, **kwargs)

        return wrapped

    def arm(self) -> None:
        if not self.armed:
            self.armed = True
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self._cuda_mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        if self._cuda_mode is not None:
            torch.cuda.set_sync_debug_mode(self._cuda_mode)
        self.armed = False
        return super().__exit__(*exc)

    # ------------------------------------------------------------------ the check
    def _flag(self, what: str) -> None:
        msg = f"{what} at {_where()}"
        self.found.append(msg)
        raise HostSyncError(f"the loop reads device data on the host or waits for a copy: {msg}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.armed:
            if func.overloadpacket in HOST_READS and any(
                    isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in (*args, *kwargs.values())):
                self._flag(f"host read {func}")
            if func.overloadpacket in (aten._to_copy, aten.copy_):
                src = args[0] if func.overloadpacket is aten._to_copy else args[1]
                dst_device = (kwargs.get("device") or src.device) if func.overloadpacket is aten._to_copy \
                    else args[0].device
                blocking = not (kwargs.get("non_blocking") if func.overloadpacket is aten._to_copy
                                else (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)))
                if isinstance(src, torch.Tensor) and torch.device(dst_device) != src.device and blocking:
                    self._flag(f"blocking copy {src.device} -> {dst_device} ({func})")
        return func(*args, **kwargs)
