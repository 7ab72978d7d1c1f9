"""python -m dynsila.plot: one PNG of the training curves and accuracy against MACs of several runs, evaluated or
not; an existing PNG is kept unless --force; a folder that is no run is one line."""

from __future__ import annotations

import shutil

from PIL import Image

from dynsila.config import load_config
from dynsila.plot import draw, main, run_curves
from dynsila.runs.rundir import read_metrics
from dynsila.training.train import train


def test_plot_draws_runs_with_and_without_eval_json(tiny_config, tmp_path, capsys):
    run = train(load_config(tiny_config(), ["train.epochs=2"])).run_dir
    unevaluated = tmp_path / "runs" / "unevaluated"
    unevaluated.mkdir()
    shutil.copy(run / "metrics.jsonl", unevaluated / "metrics.jsonl")

    curves = run_curves(run)
    rows = read_metrics(run)
    assert curves.epochs == [1, 2] and curves.loss == [r["loss"] for r in rows] and len(curves.val_top1[0]) == 3
    assert curves.report is not None and len(curves.report.exits) == 3 and run_curves(unevaluated).report is None

    figure = draw([curves])  # the axis says which MACs convention eval.json's budgeted curve was counted in
    assert figure.axes[2].get_xlabel() == "MACs per image (budgeted: paper convention)"
    out = tmp_path / "curves.png"
    assert main([str(run), str(unevaluated), "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1600, 480)
    before = out.read_bytes()
    assert main([str(run), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main([str(run), "--out", str(out), "--force"]) == 0 and out.read_bytes() != before

    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing has no metrics.jsonl rows" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
