"""Sharing a list of work items between torchrun processes, and the few collectives that needs.

A single process (no torchrun) gets everything and the collectives are no-ops.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from train.runtime import Runtime

T = TypeVar("T")


class WorkShare:
    """This process's share of the work, and collectives on a gloo group whose timeout outlasts
    any extraction (the default process group may time out while processes finish unevenly)."""

    def __init__(self, rank: int = 0, size: int = 1, group: Any = None) -> None:
        """Process ``rank`` of ``size``; the defaults are a single process."""
        self.rank, self.size, self.group = rank, size, group
        self.is_main = rank == 0

    @classmethod
    def join(cls, runtime: Runtime) -> WorkShare:
        """The share of this process under torchrun (``train.runtime.setup_runtime``, whose default
        group needs no NCCL for this: ``backend="gloo"``)."""
        group = dist.new_group(backend="gloo", timeout=timedelta(days=7)) if runtime.distributed else None
        return cls(runtime.rank, runtime.world_size, group)

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def share(self, items: list[T]) -> list[T]:
        """Every ``size``-th item, from this process's rank on."""
        return items[self.rank::self.size]

    def from_main(self, fn: Callable[[], T]) -> T:
        """fn() run by process 0; its result, or the exception it raised, on every process."""
        box: list[Any] = [None]
        if self.is_main:
            try:
                box = [(True, fn())]
            except Exception as e:  # re-raised on every process, not only on process 0
                box = [(False, e)]
        if self.group is not None:
            dist.broadcast_object_list(box, src=0, group=self.group)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def gather(self, obj: T) -> list[T]:
        """obj of every process, by rank (a barrier too)."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out
