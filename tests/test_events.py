"""TensorBoard event files: written from the metrics rows, read back by TensorBoard's own reader, one value per
epoch after a resume that redoes an epoch, off with train.tensorboard=false, and skipped when the package is absent."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest

from dynsila.config import load_config
from dynsila.runs.events import EVENTS_DIR, open_event_log, scalars
from dynsila.training.train import train


def read_events(run_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = event_accumulator.EventAccumulator(str(run_dir / EVENTS_DIR))
    accumulator.Reload()
    return accumulator


def test_scalars_name_every_term_exit_and_network():
    row = {"epoch": 3, "loss": 1.5, "ce": 1.0, "sila": 0.5, "lr": 0.1, "img_per_s": 900.0, "seconds": 2.0,
           "val_top1": [50.0, 60.0], "test_top1": None,
           "networks": [{"val_top1": [50.0, 60.0]}, {"val_top1": [40.0, 45.0], "train_top1": [1.0, 2.0]}]}  # fmt: skip
    tags = scalars(row)
    assert tags["train/loss"] == 1.5 and tags["train/sila"] == 0.5 and tags["train/lr"] == 0.1
    assert tags["speed/img_per_s"] == 900.0 and tags["val_top1/exit2"] == 60.0
    assert tags["net2/val_top1/exit1"] == 40.0 and tags["net2/train_top1/exit2"] == 2.0
    assert "train/epoch" not in tags and not any(t.startswith("test_top1") for t in tags)


def test_a_run_writes_events_tensorboard_reads_back_once_per_epoch_after_a_resume(tiny_config):
    pytest.importorskip("tensorboard")
    path, constant = tiny_config(), ["train.schedule=constant"]
    train(load_config(path, [*constant, "train.epochs=1"]))
    run = load_config(path).run_dir
    saved = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    train(load_config(path, [*constant, "train.epochs=2", "resume=true"]))
    for name, data in saved.items():  # as if killed after epoch 2's events, before its checkpoint
        (run / name).write_bytes(data)
    train(load_config(path, [*constant, "train.epochs=2", "resume=true"]))  # epoch 2 again

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = read_events(run)
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/ce", "train/sila", "train/lr", "speed/img_per_s", "train/twin_gap_e0"}
    assert expected | {f"{split}_top1/exit{k}" for split in ("train", "val", "test") for k in (1, 2, 3)} <= tags
    for tag, key in (("train/loss", "loss"), ("val_top1/exit3", "val_top1"), ("speed/img_per_s", "img_per_s")):
        got = events.Scalars(tag)
        assert [e.step for e in got] == [1, 2], tag  # the redone epoch once
        want = [r[key][-1] if isinstance(r[key], list) else r[key] for r in rows]
        assert [e.value for e in got] == pytest.approx(want, rel=1e-6), tag


def test_events_are_off_with_one_key_and_skipped_without_the_package(tiny_config, monkeypatch, caplog, tmp_path):
    path = tiny_config()
    train(load_config(path, ["train.tensorboard=false"]))
    run = load_config(path).run_dir
    assert (run / "metrics.jsonl").is_file() and not (run / EVENTS_DIR).exists()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with caplog.at_level(logging.INFO, logger="dynsila"):
        assert open_event_log(tmp_path / "elsewhere", []) is None
    assert "pip install tensorboard" in caplog.text and not (tmp_path / "elsewhere").exists()
    shutil.rmtree(run)
