"""Re-estimating ``C_t`` during FoLoRA training (our interpretation of the spec's ``refresh_every``).

Collection: during the ``refresh_window`` optimizer steps that end at a refresh step, every target
wrapper keeps its latest training input; ``extra_loss`` (called once per micro-batch with the batch)
adds ``x x^T`` over the task loss positions to one float32 sum per distinct layer input (its upper
row blocks, :class:`...calibration.gram.UpperGram`), then drops the inputs. At a refresh the sums
become matrices one input at a time. Estimate at a refresh:

    C_window = sum x x^T / N  (all micro-batches of the window, summed over processes)
    C_t <- mix * C_window + (1 - mix) * C_t_previous      (C_t_previous: the calibration C_t at first)

Then ``V`` and ``lambda`` are recomputed and ``A~`` and the Adam moments move into the new
coordinates with ``T = V_old^T M V_new`` (see :func:`.basis.transition`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from ...calibration.gram import UpperGram
from ...calibration.stats import select_rows, token_mask


class TaskWindow:
    """Per input key: ``sums[key]`` = sum x x^T as an :class:`UpperGram` (its upper row blocks, float32:
    9/16 of ``n^2`` at real widths) and ``counts[key]`` = tokens, since the last clear. With ``positions:
    balanced`` each key has two, ``<key>@loss`` and ``<key>@all``, and its estimate is their mean."""

    def __init__(self, positions: str):
        self.positions = positions
        self.parts = ("loss", "all") if positions == "balanced" else (positions,)
        self.sums: dict[str, UpperGram] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def _name(self, key: str, part: str) -> str:
        return key if len(self.parts) == 1 else f"{key}@{part}"

    def add_batch(self, inputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        """``inputs``: one layer input [B, T, n] per key, from the forward pass of ``batch``."""
        for part in self.parts:
            mask = token_mask(batch, part)
            with torch.no_grad(), torch.autocast(mask.device.type, enabled=False):
                for key, x in inputs.items():
                    rows, name = select_rows(x, mask.to(x.device)), self._name(key, part)
                    if name not in self.sums:
                        self.sums[name] = UpperGram(rows.shape[1], rows.device)
                        self.counts[name] = torch.zeros((), dtype=torch.float64, device=rows.device)
                    self.sums[name].add_(rows, x.dtype)
                    self.counts[name] += rows.shape[0]

    def pop_estimates(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, C_window)`` (float32 [n, n]) for keys that saw tokens, reduced over processes, one key
        at a time: each sum leaves the window as its matrix is built, so besides the window's other sums
        only one or two ``[n, n]`` exist. ``balanced``: the mean of the parts that saw tokens. Empties the window."""
        keys = sorted({name.rpartition("@")[0] if len(self.parts) > 1 else name for name in self.sums})
        for key in keys:
            estimates = []
            for part in self.parts:
                gram, count = self.sums.pop(self._name(key, part)), self.counts.pop(self._name(key, part))
                if dist.is_available() and dist.is_initialized():
                    gram.reduce_(_all_reduced)
                    dist.all_reduce(count)
                if float(count) > 0:
                    estimates.append(gram.full().div_(float(count)))
                del gram
            if estimates:
                yield key, estimates[0] if len(estimates) == 1 else (estimates[0] + estimates[1]) / 2

    def clear(self) -> None:
        self.sums, self.counts = {}, {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"window_block/{k}/{j}": b for k, g in self.sums.items() for j, b in enumerate(g.blocks)}
        state.update({f"window_count/{k}": v for k, v in self.counts.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """From :meth:`state_dict`; a window saved as full ``window_sum/<key>`` matrices (before the row
        blocks) loads too."""
        self.clear()
        blocks: dict[str, dict[int, torch.Tensor]] = {}
        for name, value in state.items():
            kind, _, rest = name.partition("/")
            if kind == "window_block":
                key, _, j = rest.rpartition("/")
                blocks.setdefault(key, {})[int(j)] = value.to(device)
            elif kind == "window_sum":
                self.sums[rest] = UpperGram.from_full(value.to(device))
            elif kind == "window_count":
                self.counts[rest] = value.to(device=device, dtype=torch.float64)
        for key, parts in blocks.items():
            self.sums[key] = UpperGram.from_blocks([parts[j] for j in range(len(parts))])


def _all_reduced(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def in_window(next_step: int, refresh_every: int, window: int) -> bool:
    """Whether optimizer step ``next_step`` (1-based) is one of the ``window`` steps ending at a refresh."""
    if refresh_every <= 0:
        return False
    return (next_step - 1) % refresh_every >= refresh_every - min(window, refresh_every)


def mix_estimate(window: torch.Tensor, previous: torch.Tensor, mix: float) -> torch.Tensor:
    """``mix * C_window + (1 - mix) * C_previous`` in float32 on the CPU."""
    window = window.float().cpu()
    if mix >= 1.0:
        return window
    return mix * window + (1.0 - mix) * previous.float().cpu()
