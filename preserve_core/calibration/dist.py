"""Process-group helpers: the same code runs as one process or as N ranks under Accelerate.

Work is split by a global item index ``i``: rank ``r`` of ``w`` takes the items with ``i % w == r``.
Sums are all-reduced and Python objects gathered, so every rank ends with the global result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Dist:
    """Rank, world size and collectives of an optional ``accelerate.Accelerator``."""

    accelerator: Any = None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, index: int) -> bool:
        """Whether global item ``index`` belongs to this rank."""
        return index % self.world == self.rank

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all ranks (a new tensor when world > 1)."""
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def gather(self, items: list) -> list:
        """Concatenate every rank's list of picklable objects (rank order)."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def broadcast_error(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed, so no rank waits forever in a collective."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        messages = [m for m in self.gather([repr(error) if error is not None else None]) if m is not None]
        if error is not None:
            raise error
        if messages:
            from ..errors import PPFTError

            raise PPFTError(f"calibration failed on another process: {messages[0]}")
