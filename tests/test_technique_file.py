"""A training technique from a file: the README's snippet, written to a file, trains with ``--technique``; the run's
config.yaml records the file and only the sections of the techniques it used."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from dynsila.methods.technique import TECHNIQUES, unregister_technique
from dynsila.runs.rundir import read_run_config
from dynsila.train import main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_technique() -> str:
    """The README's python block after "Your own technique is one file"."""
    text = README.read_text()
    after = text[text.index("**Your own technique is one file") :]
    found = re.search(r"```python\n(.*?)```", after, re.S)
    assert found is not None, "the README's technique snippet is gone"
    return found.group(1)


@pytest.fixture
def forget_logit_norm():
    """Unregister the snippet's technique and forget the imported file, whatever the test did."""
    yield
    unregister_technique("logit_norm")
    for name in [m for m in sys.modules if m.startswith("dynsila_technique_")]:
        del sys.modules[name]


def test_the_readme_technique_trains_from_its_file(tiny_config, tmp_path, capsys, forget_logit_norm):
    file = tmp_path / "mine.py"
    file.write_text(readme_technique())
    config = tiny_config(sila={"enabled": False})
    assert main([str(config), "--technique", str(file), "logit_norm.weight=0.01"]) == 0
    run = tmp_path / "runs" / "tiny"
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["logit_norm"] > 0 and row["loss"] == pytest.approx(row["ce"] + row["logit_norm"], rel=1e-5)

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["techniques"] == [str(file.resolve())] and saved["logit_norm"] == {"weight": 0.01}
    assert not {"dml", "imta", "ztw", "l2w", "ge"} & set(saved)  # techniques left at their defaults
    assert saved["sila"]["enabled"] is False  # set away from its default: recorded
    assert "self_distill" not in saved["loss"] and "stage" not in saved["train"]

    unregister_technique("logit_norm")  # a fresh process: the recorded file is imported again to read the run
    for name in [m for m in sys.modules if m.startswith("dynsila_technique_")]:
        del sys.modules[name]
    assert read_run_config(run).logit_norm.weight == 0.01
    assert "logit_norm" in [t.name for t in TECHNIQUES]


def test_a_missing_or_broken_technique_file_is_one_line(tiny_config, tmp_path, capsys, forget_logit_norm):
    config = tiny_config()
    assert main([str(config), "--technique", str(tmp_path / "absent.py")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: technique file") and "absent.py" in err and len(err.splitlines()) == 1
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no GPU here')\n")
    assert main([str(config), "--technique", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.py failed to import (RuntimeError: no GPU here)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()
