"""TensorBoard event files of a run (``runs/<name>/tensorboard/``), written from the rows of ``metrics.jsonl``.

``metrics.jsonl`` is the record; TensorBoard gets the same numbers, one step per epoch: every loss and monitor
term (``train/<term>``), the learning rate (``train/lr``), training throughput (``speed/img_per_s``), top-1 per
exit and split (``val_top1/exit1``; exits numbered from 1 as the command lines number them) and, when several
networks train, each one's (``net2/val_top1/exit1``). On by default where the ``tensorboard`` package is
installed; ``train.tensorboard: false`` turns it off. Only rank 0 writes. A resumed run purges the events of the
epochs it redoes (``purge_step``), so TensorBoard shows each epoch once; a folder written before the resume
point is kept, and one that is missing is filled from the rows already in ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EVENTS_DIR = "tensorboard"
RENAMED = {"lr": "train/lr", "img_per_s": "speed/img_per_s", "seconds": "speed/epoch_seconds"}


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of one metrics row (its ``epoch`` is the step)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "epoch" or value is None or isinstance(value, bool):
            continue
        if key == "networks":
            for i, network in enumerate(value):
                out.update({f"net{i + 1}/{tag}": v for tag, v in scalars(network).items() if "top1" in tag})
        elif isinstance(value, list):
            out.update({f"{key}/exit{k + 1}": float(v) for k, v in enumerate(value)})
        elif isinstance(value, int | float):
            out[RENAMED.get(key, f"train/{key}")] = float(value)
    return out


class EventLog:
    """Scalars of each metrics row into one TensorBoard run folder; a row is flushed as it is written."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def write(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_event_log(run_dir: Path, earlier_rows: list[dict[str, Any]]) -> EventLog | None:
    """The event log of a run that has finished ``len(earlier_rows)`` epochs (their rows from metrics.jsonl), or
    None (said once) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("no TensorBoard event files: the tensorboard package is not installed (pip install tensorboard, "
                 "or set train.tensorboard=false to silence this)")  # fmt: skip
        return None
    folder = Path(run_dir) / EVENTS_DIR
    missing = not folder.is_dir()
    events = EventLog(SummaryWriter(str(folder), purge_step=len(earlier_rows) + 1))
    if missing:  # a run resumed with TensorBoard newly on: its earlier epochs first
        for row in earlier_rows:
            events.write(row)
    return events
