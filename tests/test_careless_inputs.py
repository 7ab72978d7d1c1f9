"""Careless input at every door, as a new user types it: one line naming the problem and the fix, nothing lost.

The same table as ``tests/test_bad_inputs.py`` (its ``Case``, ``Work`` and checks), for the doors that table does
not reach: the launcher's variables, repeated keys and empty files, a resume that changes how the run trains,
data whose splits disagree, ``--force`` on a folder the project did not write, the ONNX runners' inputs, an
unfinished run, a corrupt image. Each case copies a tiny trained run (trained once for this module; its ONNX
export made once too), damages what it tests, and checks one ``error:`` line, no traceback and every file that
existed before byte-identical after. The tests after the table check the right behaviour where there is one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from dynsila import config as config_module
from dynsila.config import load_config
from dynsila.deploy.onnx_runner import MANIFEST, OnnxEarlyExitRunner
from dynsila.deploy.run_export import main as export_main
from dynsila.evaluate import main as evaluate_main
from dynsila.infer import main as infer_main
from dynsila.runs import rundir
from dynsila.runs.runlock import holds_run
from dynsila.train import main as train_main
from dynsila.training import train as training
from tests.conftest import load_benchmark
from tests.test_bad_inputs import (
    Case,
    Work,
    api,
    check_case,
    cli,
    deploy_config,
    deploy_meta,
    have,
    npz,
    npz_train,
    snapshot,
    train,
    trained,  # noqa: F401 (the module's one tiny trained run, a fixture)
    with_keys,
    write_config,
)

REPO = Path(__file__).resolve().parents[1]
IMAGES = np.random.default_rng(2).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
EXPORTED: dict[str, Path] = {}  # the module's ONNX export of the tiny run, made once (needs the deploy extra)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path | None:  # noqa: F811
    """The tiny run exported to ONNX once for the module (None without the deploy extra)."""
    if not (have("onnx") and have("onnxruntime") and have("onnxscript")):
        return None
    folder = tmp_path_factory.mktemp("export") / "onnx"
    assert cli(export_main, trained[0] / "runs" / "tiny", "--out", folder, "--exporter", "torchscript")[0] == 0
    EXPORTED["folder"] = folder
    return folder


# --- what the cases call ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """torchrun's variables set (and RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* cleared otherwise) for one call."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    os.environ.update(variables)
    try:
        yield
    finally:
        for n in names:
            os.environ.pop(n, None)
        os.environ.update(saved)


def launched(**variables: str) -> Callable[[Work], tuple[int, str]]:
    def call(w: Work) -> tuple[int, str]:
        with environment(**variables):
            return train(w, "name=fresh")

    return call


def export_to(out: str, cwd: str | None = None) -> Callable[[Work], tuple[int, str]]:
    """``python -m dynsila.export RUN --q 1 --out OUT --force``, from ``cwd`` (inside the case's folder)."""

    def call(w: Work) -> tuple[int, str]:
        with contextlib.chdir(w.root / cwd if cwd else w.root):
            return cli(export_main, w.run, "--q", "1", "--out", out, "--force")

    return call


def user_folder(w: Work) -> None:
    (w.root / "mydocs").mkdir()
    (w.root / "mydocs" / "thesis.tex").write_text("\\documentclass{article} years of work")


def export_like(w: Work, extra: str | None = "thesis.tex", manifest: Any = None) -> None:
    """A folder that looks like an export (a manifest and a graph), with a user's file in it."""
    folder = w.root / "old"
    folder.mkdir()
    (folder / "stage0.onnx").write_bytes(b"graph")
    (folder / MANIFEST).write_text(json.dumps(manifest or {"format": "dynsila-onnx-1"}))
    if extra:
        (folder / extra).write_text("mine")


def link_to_folder(w: Work) -> None:
    user_folder(w)
    (w.root / "link").symlink_to(w.root / "mydocs")


def resume_with(*overrides: str) -> Callable[[Work], tuple[int, str]]:
    return lambda w: train(w, "resume=true", *overrides)


def config_text(text: str) -> Callable[[Work], Any]:
    return lambda w: w.config.write_text(text)


def tiny_yaml_with(extra: str) -> Callable[[Work], Any]:
    """The case's config with ``extra`` YAML appended (a repeated section, say)."""
    return lambda w: w.config.write_text(w.config.read_text() + extra)


def edit_yaml(**changes: Any) -> Callable[[Work], Any]:
    return lambda w: w.config.write_text(yaml.safe_dump(with_keys(**changes)(yaml.safe_load(w.config.read_text()))))


def unfinished(w: Work) -> None:
    """The run as it stands mid-training: no deploy weights, no evaluation yet."""
    (w.run / "deploy.safetensors").unlink()
    (w.run / "eval.json").unlink()


def run_api(images: Any, method: str = "__call__") -> Callable[[Work], tuple[int, str]]:
    """The ONNX runner of the module's export, called on ``images``."""

    def call(w: Work) -> tuple[int, str]:
        runner = OnnxEarlyExitRunner(EXPORTED["folder"])
        if method == "run_stream":
            return api(runner.run_stream, [images])
        return api(getattr(runner, method), images)

    return call


FLOAT = np.zeros((2, 3, 8, 8), dtype=np.float32)


def image_folder(w: Work) -> None:
    """An ImageNet-layout folder of tiny PNGs with one corrupt JPEG among the training images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = w.root / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (w.root / "images" / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")


def image_folder_train(w: Work) -> tuple[int, str]:
    overrides = ("name=img", "data.name=imagefolder", f"data.root={w.root / 'images'}", "data.val_size=2")
    return train(w, *overrides, "data.batch_size=4", "data.eval_batch_size=4")


def flops_vs_acc(*argv: Any) -> Callable[[Work], tuple[int, str]]:
    return lambda w: cli(load_benchmark("flops_vs_acc").main, "--runs", w.run, *argv)


def without_budgeted_curves(w: Work) -> None:
    """The run's evaluation as a gated network's reads: one exit's numbers, no exit-threshold curves."""
    path = w.run / "eval.json"
    report = json.loads(path.read_text())
    report["curves"] = [c for c in report["curves"] if c.get("kind") != "budgeted"]
    path.write_text(json.dumps(report))
    os.utime(path, (path.stat().st_mtime + 10, path.stat().st_mtime + 10))


LAUNCH = "launch with torchrun"
R = "onnxruntime"

CASES = [
    # the launcher's variables (torchrun), checked before any process group is made
    Case("launcher-rank-outside-world", launched(WORLD_SIZE="1", RANK="1"), rf"RANK=1 is outside 0..0 .*{LAUNCH}"),
    Case(
        "launcher-no-master-addr",
        launched(WORLD_SIZE="2", RANK="0", MASTER_PORT="29500"),
        rf"WORLD_SIZE=2 but MASTER_ADDR is not set; {LAUNCH}",
    ),
    Case(
        "launcher-one-process-no-master-addr",
        launched(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_PORT="29500"),
        rf"WORLD_SIZE=1 but MASTER_ADDR is not set; {LAUNCH}",
    ),
    Case("launcher-world-size-a-word", launched(WORLD_SIZE="two", RANK="0"), r"WORLD_SIZE='two' is not a whole number"),
    Case("launcher-rank-without-world-size", launched(RANK="0"), r"RANK is set but WORLD_SIZE is not"),
    Case("launcher-world-size-without-rank", launched(WORLD_SIZE="2"), r"WORLD_SIZE is set but RANK is not"),
    Case("launcher-world-size-zero", launched(WORLD_SIZE="0", RANK="0"), r"WORLD_SIZE=0 must be at least 1"),
    Case("launcher-rank-negative", launched(WORLD_SIZE="2", RANK="-1"), r"RANK=-1 must be at least 0"),
    Case(
        "launcher-local-rank-a-word",
        launched(WORLD_SIZE="1", RANK="0", LOCAL_RANK="gpu0"),
        r"LOCAL_RANK='gpu0' is not a whole number",
    ),
    Case(
        "launcher-port-a-word",
        launched(WORLD_SIZE="2", RANK="0", MASTER_ADDR="localhost", MASTER_PORT="http"),
        r"MASTER_PORT='http' is not a whole number",
    ),
    Case(
        "launcher-port-too-large",
        launched(WORLD_SIZE="2", RANK="1", MASTER_ADDR="localhost", MASTER_PORT="70000"),
        r"MASTER_PORT=70000 is not a port",
    ),
    # config files: repeated keys, empty files, sections that are not mappings
    Case(
        "config-section-twice",
        train,
        r"key 'train' appears twice \(lines \d+ and \d+\); keep one",
        tiny_yaml_with("train:\n  epochs: 3\n"),
    ),
    Case(
        "config-key-twice-in-a-section",
        train,
        r"key 'lr' appears twice \(lines 2 and 3\)",
        config_text("train:\n  lr: 0.1\n  lr: 0.5\n"),
    ),
    Case("config-empty-file", train, r"tiny.yaml is empty; copy a preset", config_text("")),
    Case("config-only-comments", train, r"is empty; copy a preset", config_text("# to do\n\n")),
    Case("config-a-string", train, r"must hold a mapping of config sections, not a str", config_text("digits\n")),
    Case(
        "config-section-null",
        train,
        r"config section 'train' must be a mapping, got NoneType",
        config_text("name: tiny\ntrain:\n"),
    ),
    # resume: a key that shapes training may not change (the run's config.yaml records how it began)
    Case(
        "resume-changed-lr",
        resume_with("train.lr=0.1"),
        r"resume=true would change train.lr from 0.05 .* to 0.1; drop the change .* name=.* --force",
    ),
    Case("resume-changed-seed", resume_with("seed=3"), r"would change seed from 0 .* to 3"),
    Case("resume-changed-batch", resume_with("data.batch_size=64"), r"would change data.batch_size from 128"),
    Case("resume-changed-technique", resume_with("sila.enabled=false"), r"would change sila\.\w+ from "),
    Case("resume-changed-in-the-file", resume_with(), r"would change train.lr from 0.05", edit_yaml(train__lr=0.2)),
    # run configs: a technique section of a package that is gone
    Case(
        "evaluate-enabled-technique-not-installed",
        lambda w: cli(evaluate_main, w.run),
        r"the run used technique section 'mytech' \(enabled: true\), but no installed package registers it",
        deploy_meta(deploy_config(with_keys(mytech={"enabled": True, "strength": 2}))),
    ),
    # data: classes, labels the training split lacks, image shapes across splits
    Case(
        "npz-one-class",
        npz_train,
        r"training labels hold 1 class \(\[0\]\); a classifier needs at least 2",
        npz(y_train=np.zeros(40, dtype=np.int64), y_test=np.zeros(20, dtype=np.int64)),
    ),  # fmt: skip
    Case(
        "npz-test-label-unseen",
        npz_train,
        r"y_test has 1 class\(es\) the training labels never hold \(4\)",
        npz(y_train=np.arange(40) % 4, y_test=np.arange(20) % 5),
    ),
    Case(
        "npz-val-label-unseen",
        npz_train,
        r"y_val has 1 class\(es\) the training labels never hold \(3\)",
        npz(y_train=np.arange(40) % 3, x_val=IMAGES[:8], y_val=np.arange(8) % 4),
    ),
    Case(
        "npz-test-images-larger",
        npz_train,
        r"x_test images are 32x32x1 but x_train's are 8x8x1; store every split at one image size",
        npz(x_test=np.zeros((20, 32, 32, 1), dtype=np.uint8)),
    ),
    Case(
        "npz-test-images-colour",
        npz_train,
        r"x_test images are 8x8x3 but x_train's are 8x8x1",
        npz(x_test=np.repeat(IMAGES[:20], 3, axis=3)),
    ),
    Case(
        "npz-val-images-smaller",
        npz_train,
        r"x_val images are 4x4x1 but x_train's are 8x8x1",
        npz(x_val=IMAGES[:8, :4, :4], y_val=np.arange(8) % 4),
    ),
    Case(
        "npz-num-classes-below-labels",
        lambda w: train(w, "name=npz", "data.name=npz", f"data.root={w.root / 'data.npz'}", "data.num_classes=2"),
        r"train labels span 0..3 but the data has 2 classes",
        npz(),
    ),
    # a corrupt image in an image folder: the file named; the stub left behind does not block the rerun
    Case(
        "imagefolder-corrupt-jpeg",
        image_folder_train,
        r"broken.jpg is not a readable image .*; replace or remove",
        image_folder,
    ),  # fmt: skip
    # --force replaces only what the project wrote
    Case(
        "export-force-user-folder",
        export_to("mydocs"),
        r"--force replaces only an earlier export, but .*mydocs holds no readable manifest.json of an export; choose",
        user_folder,
    ),
    Case(
        "export-force-user-file",
        export_to("notes.txt"),
        r"notes.txt is a file or a link, not an export folder",
        lambda w: (w.root / "notes.txt").write_text("my notes"),
    ),
    Case("export-force-dot", export_to("."), r"--force replaces only an earlier export, but /.* holds no readable"),
    Case("export-force-dot-dot", export_to("..", cwd="runs"), r"--force replaces only an earlier export"),
    Case("export-force-link", export_to("link"), r"link is a file or a link", link_to_folder),
    Case(
        "export-force-export-with-a-user-file",
        export_to("old"),
        r"old holds thesis.tex, which no export writes",
        export_like,
    ),
    Case(
        "export-force-foreign-manifest",
        export_to("old"),
        r"old has a manifest.json that is not an export's",
        lambda w: export_like(w, None, {"format": "someone-else-1"}),
    ),
    Case("export-without-force-file", lambda w: cli(export_main, w.run, "--out", w.config), r"tiny.yaml exists; pass"),
    # the ONNX runners' input
    Case(
        "runner-uint8-pixels",
        run_api(IMAGES[:4].transpose(0, 3, 1, 2).repeat(3, 1)),
        r"the images are uint8 pixels, but the graphs take normalised float32: convert",
        needs=R,
    ),  # fmt: skip
    Case("runner-int64-pixels", run_api(np.ones((2, 3, 8, 8), dtype=np.int64)), r"int64 pixels", needs=R),
    Case(
        "runner-channels-last",
        run_api(FLOAT.transpose(0, 2, 3, 1)),
        r"channels last .*x.transpose\(0, 3, 1, 2\)",
        needs=R,
    ),  # fmt: skip
    Case(
        "runner-wrong-size",
        run_api(np.zeros((2, 3, 16, 16), np.float32)),
        r"the export takes N x 3 x 8 x 8; resize",
        needs=R,
    ),  # fmt: skip
    Case("runner-empty-batch", run_api(FLOAT[:0]), r"the batch is empty \(0 images\)", needs=R),
    Case("runner-one-image", run_api(FLOAT[0]), r"shape \(3, 8, 8\); pass a batch .*x\[None\]", needs=R),
    Case("runner-strings", run_api(np.full((2, 3, 8, 8), "a")), r"not numbers", needs=R),
    Case("runner-stream-uint8", run_api(FLOAT.astype(np.uint8), "run_stream"), r"uint8 pixels", needs=R),
    Case(
        "runner-all-exits-channels-last",
        run_api(FLOAT.transpose(0, 2, 3, 1), "all_exit_logits"),
        r"channels last",
        needs=R,
    ),  # fmt: skip
    # a run that has not finished, or a file where a run folder goes
    Case(
        "infer-unfinished-run",
        lambda w: cli(infer_main, w.run, "--q", "1"),
        r"has not finished training \(1 epoch\(s\) done, no deploy.safetensors yet\); .* resume=true",
        unfinished,
    ),  # fmt: skip
    Case("evaluate-unfinished-run", lambda w: cli(evaluate_main, w.run), r"has not finished training", unfinished),
    Case("export-unfinished-run", lambda w: cli(export_main, w.run), r"has not finished training", unfinished),
    Case(
        "infer-on-a-file", lambda w: cli(infer_main, w.run / "last.pt", "--q", "1"), r"last.pt is a file; pass a run's"
    ),
    Case("evaluate-on-a-file", lambda w: cli(evaluate_main, w.config), r"tiny.yaml is a file; pass a run's folder"),
    # flops_vs_acc
    Case(
        "flops-vs-acc-gated-only",
        flops_vs_acc(),
        r"none of the runs has exit thresholds to compare",
        without_budgeted_curves,
    ),
]


def test_the_table_holds_every_door():
    assert len(CASES) >= 45 and len({c.id for c in CASES}) == len(CASES)
    doors = {c.id.split("-")[0] for c in CASES}
    assert {"launcher", "config", "resume", "npz", "export", "runner", "infer", "evaluate"} <= doors


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_careless_input_is_one_line_and_changes_nothing(case: Case, trained, exported, tmp_path):  # noqa: F811
    if case.needs and (not have(case.needs) or exported is None):
        pytest.skip(f"needs {case.needs} (the deploy extra)")
    check_case(case, trained[0], tmp_path)


# --- where there is a right behaviour ---------------------------------------------------------------------------


def test_resume_may_extend_the_run_and_change_what_it_prints(trained):  # noqa: F811
    cfg = load_config(trained[0] / "tiny.yaml", ["resume=true", "train.epochs=3", "train.log_every=1"])
    rundir.refuse_changed_resume(cfg)  # no error: these keys do not shape the epochs already trained


def test_a_run_records_only_the_techniques_it_used(trained):  # noqa: F811
    recorded = yaml.safe_load((trained[0] / "runs" / "tiny" / "config.yaml").read_text())
    assert "sila" in recorded  # enabled by default
    assert not {"dml", "l2w", "imta", "ztw", "gradient_equilibrium"} & set(recorded)


def test_an_unused_technique_of_a_gone_package_is_tolerated(trained, tmp_path, caplog):  # noqa: F811
    """A run trained while a user's technique package was installed, evaluated after it was removed."""
    run = tmp_path / "tiny"
    shutil.copytree(trained[0] / "runs" / "tiny", run)
    text = yaml.safe_load((run / "config.yaml").read_text())
    text["mytech"] = {"enabled": False, "strength": 2}
    cfg = config_module.config_from_yaml(yaml.safe_dump(text), "config.yaml")
    assert cfg.name == "tiny"
    assert any("'mytech' belongs to a technique that is not installed" in r.getMessage() for r in caplog.records)
    with pytest.raises(config_module.ConfigError, match="unknown config key 'mytech'"):
        config_module.config_from_dict(text)  # a config a user writes is not a record: the unknown key stops


def test_ctrl_c_says_where_the_run_stands_and_how_to_resume(trained, tmp_path, monkeypatch):  # noqa: F811
    w = Work(tmp_path / "w")
    shutil.copytree(trained[0], w.root)
    write_config(w.config, w.root / "runs")

    def interrupt(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_one_epoch", interrupt)
    before = snapshot(w.root)
    code, err = cli(train_main, w.config, "resume=true", "train.epochs=2")
    assert code == 130
    assert err.splitlines() == [
        f"interrupted: tiny has 1 of 2 epochs in {w.run / 'last.pt'}; resume with: python -m dynsila.train "
        f"{w.config} train.epochs=2 resume=true"
    ]
    after = snapshot(w.root)
    assert {k: after.get(k) for k in before if k != "runs/tiny/config.yaml"} == {
        k: v for k, v in before.items() if k != "runs/tiny/config.yaml"
    }


def test_ctrl_c_before_the_first_epoch(trained, tmp_path, monkeypatch):  # noqa: F811
    write_config(tmp_path / "tiny.yaml", tmp_path / "runs")
    monkeypatch.setattr(training, "build_run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = cli(train_main, tmp_path / "tiny.yaml")
    assert code == 130 and err.startswith("interrupted before the first epoch finished; nothing to resume; rerun")


def test_a_stub_run_does_not_block_the_rerun(tmp_path):
    """A run that stopped before its first epoch (a corrupt image) leaves only config.yaml: not a run."""
    run = tmp_path / "runs" / "img"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: img\n")
    (run / ".lock").write_text("")
    assert not holds_run(run)
    (run / "metrics.jsonl").write_text("{}\n")
    assert holds_run(run)


def test_force_replaces_an_earlier_export(trained, exported, tmp_path):  # noqa: F811
    if exported is None:
        pytest.skip("needs the deploy extra")
    out = tmp_path / "onnx"
    shutil.copytree(exported, out)
    code, err = cli(export_main, trained[0] / "runs" / "tiny", "--out", out, "--force", "--exporter", "torchscript")
    assert code == 0, err
    assert json.loads((out / MANIFEST).read_text())["format"] == "dynsila-onnx-1"


def test_flops_vs_acc_writes_results_only_when_asked(trained, tmp_path, capsys):  # noqa: F811
    """Without --save (or --results-dir) it prints; the committed benchmarks/results files stay as they are."""
    bench = load_benchmark("flops_vs_acc")
    results = Path(bench.__file__).resolve().parents[1] / "results"
    before = snapshot(results)
    with contextlib.chdir(tmp_path):
        assert bench.main(["--runs", str(trained[0] / "runs" / "tiny")]) == 0
    assert snapshot(results) == before and not list(tmp_path.iterdir())
    assert "not saved; pass --save" in capsys.readouterr().out


def test_flops_vs_acc_leaves_out_a_gated_run(trained, tmp_path, capsys):  # noqa: F811
    w = Work(tmp_path / "w")
    shutil.copytree(trained[0], w.root)
    gated = w.root / "gated"
    shutil.copytree(w.run, gated)
    path = gated / "eval.json"
    report = json.loads(path.read_text())
    report["curves"] = [c for c in report["curves"] if c.get("kind") != "budgeted"]
    report["run"] = "gated"
    path.write_text(json.dumps(report))
    os.utime(path, (path.stat().st_mtime + 10, path.stat().st_mtime + 10))
    assert load_benchmark("flops_vs_acc").main(["--runs", str(w.run), str(gated)]) == 0
    assert "left out gated: a gated network" in capsys.readouterr().out


def test_the_reliability_page_lists_every_case():
    """docs/reliability.md's table is generated from both tables; regenerate it after changing a case."""
    spec = importlib.util.spec_from_file_location("make_bad_inputs_table", REPO / "docs" / "make_bad_inputs_table.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    text = generator.PAGE.read_text()
    assert generator.page(text) == text, "docs/reliability.md is out of date: python docs/make_bad_inputs_table.py"
    assert all(f"| {c.id} |" in text for c in CASES)
