"""python -m dynsila.predict: PNG files the test writes go through the run's preprocessing and early exit, into a
CSV that matches the runner on the same images; unreadable files, existing outputs and the class names."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from dynsila.config import load_config
from dynsila.data import build_splits, normalize
from dynsila.deploy.infer import fitted_runner
from dynsila.deploy.predict import COLUMNS, main, read_image
from dynsila.runs.rundir import load_deploy_model
from dynsila.training.train import train


def read_csv(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_predict_writes_the_runners_decisions_for_a_folder_of_images(tiny_config, tmp_path, capsys):
    run = train(load_config(tiny_config(), ["train.epochs=2"])).run_dir
    model, cfg = load_deploy_model(run)
    assert cfg.data.mean and cfg.data.std and cfg.data.class_names == [str(d) for d in range(10)]  # in the run
    splits = build_splits(cfg.data)
    images = splits.test.images[:12]  # uint8 3 x 8 x 8, as the run evaluates them
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    for i, image in enumerate(images):
        where = folder / "more" if i % 3 == 0 else folder  # sub-folders are read too
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(where / f"digit{i:02d}.png")

    out = tmp_path / "predictions.csv"
    assert main([str(run), str(folder), "--q", "1.0", "--out", str(out), "--device", "cpu"]) == 0
    rows = read_csv(out)
    assert rows[0] == COLUMNS and len(rows) == 13
    by_file = {r[0]: r for r in rows[1:]}

    args = argparse.Namespace(q=1.0, budget=None, criterion="max_prob", device="cpu")
    runner, _, costs, _ = fitted_runner(model, cfg, splits, args)
    expected = runner(normalize(images, splits.mean, splits.std))
    exits = set()
    for i in range(len(images)):
        where = folder / "more" if i % 3 == 0 else folder
        file, label, name, confidence, exit_number, macs = by_file[str(where / f"digit{i:02d}.png")]
        assert int(label) == int(expected.predictions[i]) and name == label
        assert int(exit_number) == int(expected.exit_index[i]) + 1  # numbered from 1, as infer prints them
        assert float(confidence) == pytest.approx(float(expected.confidence[i]), rel=1e-5)
        assert int(macs) == costs[int(exit_number) - 1]
        exits.add(int(exit_number))
    assert len(exits) > 1  # q = 1 spreads the images over the exits

    # an exit policy other than the quotas: the same decisions as its runner makes on the same images
    patience = tmp_path / "patience.csv"
    argv = [str(run), str(folder), "--q", "1.0", "--policy", "patience", "--patience", "2", "--out", str(patience)]
    assert main(argv) == 0
    args = argparse.Namespace(q=1.0, budget=None, epsilon=None, criterion="max_prob", device="cpu",
                              policy="patience", patience=2, floor=None, risk=None, bound=None, delta=None,
                              held_out=None)  # fmt: skip
    policy_run = fitted_runner(model, cfg, splits, args)[0](normalize(images, splits.mean, splits.std))
    by_file = {r[0]: r for r in read_csv(patience)[1:]}
    for i in range(len(images)):
        where = folder / "more" if i % 3 == 0 else folder
        row = by_file[str(where / f"digit{i:02d}.png")]
        assert int(row[1]) == int(policy_run.predictions[i]) and int(row[4]) == int(policy_run.exit_index[i]) + 1

    # an existing CSV is kept unless --force
    before = out.read_text()
    assert main([str(run), str(folder), "--q", "1.0", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == before

    # a corrupt image: one line naming it, or skipped with a warning
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main([str(run), str(folder), "--q", "1.0", "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.png is not a readable image" in err and len(err.splitlines()) == 1
    assert out.read_text() == before
    assert main([str(run), str(folder), str(bad), "--budget", "1e9", "--out", str(out), "--force", "--skip-bad"]) == 0
    assert err_lines(capsys) == 2  # the folder's copy and the one named
    rows = read_csv(out)
    assert len(rows) == 13 and all(r[4] == "3" for r in rows[1:])  # a budget above every exit: the last exit


def err_lines(capsys) -> int:
    return sum(line.startswith("warning: skipped") for line in capsys.readouterr().err.splitlines())


def test_any_image_size_and_mode_is_read_as_the_run_reads_its_data(tiny_config, tmp_path):
    cfg = load_config(tiny_config())
    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((40, 30), 200, dtype=np.uint8)).save(big)  # grey, not square, JPEG
    x = read_image(big, cfg)
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and int(x.float().mean().round()) == 200
