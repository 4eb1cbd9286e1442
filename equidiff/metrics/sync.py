"""Gathering ``cat`` states across processes when some process holds no rows.

A predict run can leave a process without samples of its own (fewer samples than processes, or the last
samples of a resumed run): its metrics see no ``update``. torchmetrics (1.9) then syncs an empty list state
as ``torch.tensor([])``, one-dimensional and of the metric's default dtype, while the other processes hold
(n, D) float64 features or int64 seeds; ``gather_all_tensors`` needs the same number of dimensions and the
same dtype on every process, so the collective fails (or hangs). ``gather_allowing_empty`` first shares each
process's shape and dtype, gives an empty process a (0, D) tensor of the others' dtype, then gathers as
torchmetrics does. Metrics with ``cat`` states pass it as ``dist_sync_fn`` (``with_empty_rank_sync``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors


def gather_allowing_empty(result: torch.Tensor, group=None) -> list[torch.Tensor]:
    """torchmetrics' ``gather_all_tensors``, also when this process (or another) holds no rows."""
    group = dist.group.WORLD if group is None else group
    shapes: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(shapes, (result.numel() == 0, tuple(result.shape[1:]), result.dtype), group=group)
    template = next(((tail, dtype) for empty, tail, dtype in shapes if not empty), None)
    if result.numel() == 0 and template is not None:
        tail, dtype = template
        result = torch.empty((0, *tail), dtype=dtype, device=result.device)
    return gather_all_tensors(result, group)


def with_empty_rank_sync(kwargs: dict) -> dict:
    """``kwargs`` of a torchmetrics ``Metric`` with ``dist_sync_fn=gather_allowing_empty`` unless one is given."""
    return {"dist_sync_fn": gather_allowing_empty, **kwargs}
