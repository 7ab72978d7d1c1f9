"""Runs survive kills and bad input: exact resume, atomic saves, and one clear error line for each failure."""

import errno
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from dynsila import models
from dynsila.config import load_config
from dynsila.errors import CheckpointError, ConfigError
from dynsila.runs import checkpoint as ckpt
from dynsila.runs import rundir as rundir_module
from dynsila.runs.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from dynsila.train import main
from dynsila.training.train import train


def run_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dynsila.train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def epoch_of(path) -> int:
    try:
        return load_checkpoint(path)["epoch"]
    except CheckpointError:
        return 0


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in rows]


def test_sigkill_mid_run_then_resume_gives_identical_final_metrics(tiny_config):
    args = ["train.epochs=4", "data.batch_size=32"]
    reference = train(load_config(tiny_config("straight"), args))
    path = tiny_config("killed")
    run_dir = path.parent / "runs" / "killed"
    proc = run_cli(str(path), *args)
    deadline = time.time() + 120
    while epoch_of(run_dir / "last.pt") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # somewhere in epoch 3 (or while saving it)
    proc.wait()
    assert 2 <= epoch_of(run_dir / "last.pt") < 4
    resumed = train(load_config(path, [*args, "resume=true"]))
    assert resumed.val_top1 == reference.val_top1 and resumed.test_top1 == reference.test_top1
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert comparable(metrics) == comparable(straight)
    a, b = load_checkpoint(run_dir / "last.pt")["model"], load_checkpoint(reference.run_dir / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


SAVER = """
import sys, time, torch
from dynsila.runs.checkpoint import save_checkpoint
big = {"w": torch.randn(12_000_000)}
i, stop = 0, time.monotonic() + 300  # saves until killed; ends by itself should the test die first
while time.monotonic() < stop:
    i += 1
    save_checkpoint(sys.argv[1], {"model": big, "epoch": i})
"""
FIRST_SAVE_TIMEOUT_S = 120  # the child imports torch and writes 48 MB once: seconds, minutes on a loaded machine


def test_kill_during_save_never_leaves_a_truncated_checkpoint(tmp_path):
    target = tmp_path / "last.pt"
    rng = np.random.default_rng(0)
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)])
        try:
            deadline = time.monotonic() + FIRST_SAVE_TIMEOUT_S
            while not target.exists():  # first save done
                assert proc.poll() is None, f"the saver exited with {proc.returncode} before its first save"
                assert time.monotonic() < deadline, f"no first save within {FIRST_SAVE_TIMEOUT_S} s"
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0.0, 0.6)))  # then die somewhere inside a later save
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        checkpoint = load_checkpoint(target)  # always a whole file: the old or the new one
        assert checkpoint["model"]["w"].numel() == 12_000_000, attempt


def test_full_disk_during_save_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"epoch": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(target, {"epoch": 2})
    message = str(err.value)
    assert "No space left on device" in message and "previous file is intact" in message and "\n" not in message
    monkeypatch.undo()
    assert load_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_corrupt_checkpoint_is_one_line(tiny_config, capsys):
    path = tiny_config()
    assert main([str(path)]) == 0
    last = path.parent / "runs" / "tiny" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    assert main([str(path), "resume=true", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and err.count("\n") == 1


def test_checkpoint_of_another_architecture_names_keys(tiny_config, capsys):
    path = tiny_config()
    assert main([str(path)]) == 0
    capsys.readouterr()
    change = ["resume=true", "train.epochs=2", "model.growth_rate=6"]
    assert main([str(path), *change]) == 2  # refused before any weight is read: the record of the run differs
    err = capsys.readouterr().err
    assert "would change model.growth_rate from 4" in err and err.count("\n") == 1
    record_as_begun(path.parent / "runs" / "tiny", "model", growth_rate=6)  # a config.yaml edited by hand
    assert main([str(path), *change]) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "shape differs" in err and "stages." in err and err.count("\n") == 1


def record_as_begun(run_dir, section: str, **values) -> None:
    """Edit a run's config.yaml as if the run had begun with ``values`` in ``section``."""
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    recorded[section].update(values)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))


class NotATensor:
    pass


def test_checkpoint_needing_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="needs pickle to load"):
        load_checkpoint(path)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a dynsila checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, capsys):
    path = tiny_config()
    assert main([str(path)]) == 0
    last = path.parent / "runs" / "tiny" / "last.pt"
    before = last.read_bytes()
    capsys.readouterr()
    record_as_begun(last.parent, "train", lr=1e30, schedule="constant")  # the resume check lets it continue
    assert main([str(path), "resume=true", "train.epochs=2", "train.lr=1e30", "train.schedule=constant"]) == 2
    err = capsys.readouterr().err
    assert "loss term" in err and "at epoch 2 step" in err and "last good checkpoint kept" in err
    assert err.count("\n") == 1
    assert last.read_bytes() == before


def test_labels_out_of_range(tmp_path, tiny_config, capsys):
    x = np.zeros((20, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=np.arange(20) % 12, x_test=x[:4], y_test=np.zeros(4))
    path = tiny_config(data={"name": "npz", "root": str(tmp_path / "bad.npz"), "num_classes": 10})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "labels span 0..11" in err and "10 classes" in err and err.count("\n") == 1


def test_missing_dataset_root_on_the_command_line(tiny_config, capsys, tmp_path):
    path = tiny_config(data={"name": "cifar10", "root": str(tmp_path / "nowhere")})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "cifar10 not found" in err and "nowhere" in err and err.count("\n") == 1


def watch_first_conv(model: nn.Module, seen: list[dict]) -> nn.Module:
    """Record, for every training-mode call of the model's first convolution, the layout of its input and weight
    and the dtype it computed in: what autocast and channels-last actually did."""

    def channels_last(t: torch.Tensor) -> bool:  # strictly: a (N, C>1, H, W) channels-last tensor is not contiguous
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    def record(module, inputs, output):
        if module.training:
            seen.append(
                {
                    "input_channels_last": channels_last(inputs[0]),
                    "weight_channels_last": channels_last(module.weight),
                    "output_dtype": output.dtype,
                    "weight_dtype": module.weight.dtype,
                }
            )

    next(m for m in model.modules() if isinstance(m, nn.Conv2d)).register_forward_hook(record)
    return model


def test_precision_and_layout_options(tiny_config, tiny_model_kwargs, monkeypatch):
    seen: list[dict] = []
    build_model = rundir_module.build_model
    monkeypatch.setattr(rundir_module, "build_model", lambda *a, **k: watch_first_conv(build_model(*a, **k), seen))
    result = train(load_config(tiny_config("bf16"), ["train.amp=bf16", "train.channels_last=true"]))
    assert all(np.isfinite(result.val_top1))
    expected = {"input_channels_last": True, "weight_channels_last": True, "output_dtype": torch.bfloat16}
    assert seen and all({k: s[k] for k in expected} == expected for s in seen), seen[:1]
    assert all(s["weight_dtype"] == torch.float32 for s in seen)  # autocast keeps float32 master weights
    # the control: the same watch on a plain float32 forward sees float32 and the default layout
    plain: list[dict] = []
    model = watch_first_conv(models.build("msdnet", num_classes=10, **tiny_model_kwargs).train(), plain)
    model(torch.randn(4, 3, 8, 8))
    layout_and_dtype = {"input_channels_last": False, "weight_channels_last": False, "output_dtype": torch.float32}
    assert plain == [{**layout_and_dtype, "weight_dtype": torch.float32}]
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        train(load_config(tiny_config("fp16"), ["train.amp=fp16"]))
    with pytest.raises(ConfigError, match="divisible"):
        train(load_config(tiny_config("odd"), ["data.batch_size=30", "train.accumulate_steps=4"]))
