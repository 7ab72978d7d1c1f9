import json
import logging
import subprocess
import sys

import pytest
import torch
import yaml

from dynsila.config import load_config
from dynsila.data import build_splits, make_loader
from dynsila.evaluation.evaluate import collect_logits, topk_accuracy
from dynsila.optim import learning_rate
from dynsila.runs.checkpoint import load_checkpoint
from dynsila.runs.rundir import build_model, load_deploy_model
from dynsila.train import main
from dynsila.training.train import train


def test_one_epoch_run_writes_every_file(tiny_config, capsys):
    path = tiny_config()
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    cfg = load_config(path)
    run = cfg.run_dir
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "deploy.safetensors", "eval.json"):
        assert (run / name).is_file(), name
    assert "epoch 1/1  step" in out and "img/s" in out and "eta" in out and "sila" in out
    assert "anytime prediction" in out and "test top-1" in out and "budgeted (max_prob)" in out

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert {"epoch", "loss", "ce", "sila", "lr", "val_top1", "test_top1", "train_top1", "seconds"} <= set(rows[0])
    assert len(rows[0]["val_top1"]) == 3
    # the twin/main monitor is averaged like a loss term, written, and never added to the loss
    assert {f"twin_gap_e{k}" for k in range(3)} <= set(rows[0]) and rows[0]["twin_gap_e0"] > 0
    assert rows[0]["loss"] == pytest.approx(rows[0]["ce"] + rows[0]["sila"], rel=1e-6)  # float32 sums
    assert "twin_gap" not in out  # metrics only, not the progress lines

    checkpoint = load_checkpoint(run / "last.pt")  # weights_only=True inside
    assert checkpoint["epoch"] == 1 and any(k.startswith("peers.0.heads.") for k in checkpoint["model"])

    # the saved config alone rebuilds the model; the deploy weights have no SiLa heads and reproduce the table
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["num_classes"] == 10 and saved["model"]["growth_rate"] == 4
    model, deploy_cfg = load_deploy_model(run)
    plain = build_model(deploy_cfg)
    assert list(model.state_dict()) == list(plain.state_dict())
    splits = build_splits(deploy_cfg.data)
    logits, labels = collect_logits(model, make_loader(splits.val, 512, False), splits.mean, splits.std)
    assert topk_accuracy(logits, labels).tolist() == pytest.approx(rows[0]["val_top1"])


def test_runs_are_repeatable_and_resume_continues(tiny_config):
    # a constant schedule, so that a 1-epoch run is the first half of a 2-epoch one
    a = train(load_config(tiny_config("a"), ["train.epochs=2", "train.schedule=constant"]))
    b = train(load_config(tiny_config("b"), ["train.epochs=2", "train.schedule=constant"]))
    assert a.val_top1 == b.val_top1
    last_a = load_checkpoint(a.run_dir / "last.pt")["model"]
    last_b = load_checkpoint(b.run_dir / "last.pt")["model"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)

    # run c: one epoch, then resume to two; it must end where the uninterrupted run did
    train(load_config(tiny_config("c"), ["train.epochs=1", "train.schedule=constant"]))
    c = train(load_config(tiny_config("c"), ["train.epochs=2", "train.schedule=constant", "resume=true"]))
    last_c = load_checkpoint(c.run_dir / "last.pt")["model"]
    assert all(torch.equal(last_a[k], last_c[k]) for k in last_a)
    assert len((c.run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_existing_run_directory_is_not_overwritten(tiny_config, capsys):
    path = tiny_config()
    assert main([str(path)]) == 0
    before = (load_config(path).run_dir / "last.pt").read_bytes()
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "resume=true" in err and "--force" in err
    assert (load_config(path).run_dir / "last.pt").read_bytes() == before


def test_baseline_run_has_no_sila_terms(tiny_config):
    result = train(load_config(tiny_config(), ["sila.enabled=false"]))
    row = json.loads((result.run_dir / "metrics.jsonl").read_text())
    assert "sila" not in row and "ce" in row
    assert not [k for k in row if k.startswith("twin_")]


def test_library_logs_and_the_command_line_prints_the_same_lines(tiny_config, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="dynsila"):
        train(load_config(tiny_config("library")))
    assert capsys.readouterr().out == ""  # the library never prints
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("dynsila")]
    assert any(m.startswith("library: msdnet on digits") for m in logged)
    assert any("epoch 1/1  step" in m for m in logged) and any("anytime prediction" in m for m in logged)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dynsila"):
        assert main([str(tiny_config("cli"))]) == 0
    printed = capsys.readouterr().out
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("dynsila")]
    assert printed == "".join(m + "\n" for m in logged)  # bare messages, one per record, nothing else
    assert logging.getLogger("dynsila").handlers == []  # the command line removed its handler


def test_python_dash_m_prints_the_progress(tiny_config):
    # under ``python -m`` the module is __main__: its log lines must still reach stdout
    done = subprocess.run(
        [sys.executable, "-m", "dynsila.train", str(tiny_config())], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny: msdnet on digits" in done.stdout and "epoch 1/1  step 8/8" in done.stdout
    assert "deploy weights (training-only heads pruned)" in done.stdout


def test_wrong_length_exit_weights_stop_before_the_run_directory_exists(tiny_config, capsys):
    path = tiny_config()
    assert main([str(path), "loss.exit_weights=[1,1]"]) == 2
    err = capsys.readouterr().err
    assert "'loss.exit_weights' has 2 entries but model (msdnet) has 3 exits" in err and err.count("\n") == 1
    assert not load_config(path).run_dir.exists()


@pytest.mark.parametrize("override", ["train.epochs=-1", "data.batch_size=0", "train.lr=-1", "sila.weight=-5"])
def test_out_of_range_values_stop_with_one_line(tiny_config, capsys, override):
    path = tiny_config()
    assert main([str(path), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config key '{override.split('=')[0]}' must lie in") and err.count("\n") == 1
    assert not load_config(path).run_dir.exists()


def test_bad_config_fails_before_anything_runs(tiny_config, capsys):
    path = tiny_config()
    assert main([str(path), "train.epoch=2"]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err
    assert not load_config(path).run_dir.exists()


def test_learning_rate_schedules():
    cfg = load_config(None, ["train.epochs=4", "train.lr=1", "train.milestones=[0.5,0.75]"]).train
    assert [learning_rate(cfg, s, 10) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = load_config(None, ["train.epochs=2", "train.lr=1", "train.schedule=cosine", "train.warmup_epochs=1"]).train
    assert learning_rate(cos, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cos, 10, 10) == pytest.approx(1.0)
    assert learning_rate(cos, 15, 10) == pytest.approx(0.5)
