"""One training epoch's statistics, accumulated on the device so that a step never waits for the host."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class EpochSums:
    """One epoch's training statistics on this process, kept on the device so that a step never waits for the
    host: per-sample sums of the loss, its terms and the monitor terms; correct predictions per exit; the first
    non-finite loss. The host reads them every ``train.log_every`` steps and at the epoch's end."""

    hits: list[torch.Tensor]  # per network: K correct predictions (float64, on the device)
    nonfinite: torch.Tensor  # [step, index into names, value] of the first non-finite loss term; step -1: none
    names: list[str] = field(default_factory=list)  # "loss", its terms, then the monitor terms (first step's)
    num_losses: int = 0  # the first num_losses names are "loss" and its terms; the rest are monitors
    totals: torch.Tensor | None = None  # per-sample sums in the order of names (float64, on the device)
    seen: int = 0
    lr: float = 0.0  # at the last step
    start: float = field(default_factory=time.perf_counter)

    def add(
        self,
        loss: torch.Tensor,
        terms: dict[str, torch.Tensor],
        monitors: dict[str, torch.Tensor],
        count: int,
        step: int,
    ) -> None:
        """Accumulate one micro-batch of ``count`` samples (0-d loss, terms and monitors), on the device."""
        values = torch.stack([loss, *terms.values(), *monitors.values()]).detach().double()
        if self.totals is None:
            self.names, self.num_losses = ["loss", *terms, *monitors], 1 + len(terms)
            self.totals = torch.zeros_like(values)
        self.totals += values * count
        self.seen += count
        self.nonfinite = first_nonfinite(self.nonfinite, values[: self.num_losses], step)


def first_nonfinite(record: torch.Tensor, losses: torch.Tensor, step: int) -> torch.Tensor:
    """``record`` ([step, index, value]; step -1: nothing yet) updated with one micro-batch's ``losses`` ([loss,
    term 1, term 2, ...]) on the device, without a host sync. The first bad step is kept; a bad term is named
    before the total."""
    bad = ~torch.isfinite(losses)
    bad_terms = bad[1:]
    index = torch.where(bad_terms.any(), bad_terms.int().argmax() + 1, 0)
    value = losses.gather(0, index.view(1))[0]  # not losses[index]: a 0-d index tensor is read on the host
    now = torch.stack([losses.new_full((), step), index.to(losses.dtype), value])
    return torch.where(bad.any() & (record[0] < 0), now, record)


def nonfinite_report(sums: EpochSums, record: list[float], epoch: int, step: int, log_every: int) -> str:
    """Where the first non-finite loss appeared, in words, from the host copy of ``sums.nonfinite``
    ([step, index, value]; step -1: it was seen on another process)."""
    bad_step, bad_index, bad_value = int(record[0]), int(record[1]), record[2]
    if bad_step < 0:
        return f"a loss term is not finite on another process by epoch {epoch + 1} step {step + 1}"
    what = f"loss term '{sums.names[bad_index]}' is {bad_value} at epoch {epoch + 1} step {bad_step + 1}"
    if bad_step != step:
        what += f" (seen at step {step + 1}: the check runs every train.log_every={log_every} steps)"
    return what
