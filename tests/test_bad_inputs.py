"""Bad input for every command and the public API: one line naming the problem and the fix, and nothing lost.

One table. Each case copies a tiny trained run (trained once for the module) into its own folder, damages what
it tests (a config, an override, a data file, a checkpoint, deploy weights, an export folder, a flag), hashes
every file there, calls a command's ``main(argv)`` in-process with stdout and stderr captured (or a public
function), and checks: a non-zero exit (or ``DynsilaError`` from the API), exactly one ``error: ...`` line on
stderr matching the case's pattern, no traceback, and every file that existed before byte-identical after.
A few cases need onnxruntime (or onnx) and skip without the deploy extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from dynsila import load_config, load_deploy_model
from dynsila.budget.thresholds import geometric_fractions
from dynsila.deploy.onnx_runner import MANIFEST, MANIFEST_FORMAT, OnnxEarlyExitRunner
from dynsila.errors import CheckpointError, DynsilaError
from dynsila.evaluate import main as evaluate_main
from dynsila.export import main as export_main
from dynsila.flops import main as flops_main
from dynsila.infer import main as infer_main
from dynsila.runs.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from dynsila.train import main as train_main
from tests.conftest import TINY_MSDNET, load_benchmark

RUN = "tiny"


def have(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


@dataclass
class Work:
    """One case's folder: ``tiny.yaml`` (out_dir ``runs``), the trained run ``runs/tiny``, room for data files."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "tiny.yaml"

    @property
    def run(self) -> Path:
        return self.root / "runs" / RUN

    def npz(self, **arrays: Any) -> Path:
        """A small valid npz data file with ``arrays`` replacing (or, as None, removing) its entries."""
        rng = np.random.default_rng(0)
        data = {
            "x_train": rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
            "y_train": np.arange(40) % 4,
            "x_test": rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8),
            "y_test": np.arange(20) % 4,
        }
        data.update(arrays)
        path = self.root / "data.npz"
        np.savez(path, **{k: v for k, v in data.items() if v is not None})
        return path


def write_config(path: Path, out_dir: Path) -> None:
    raw = {
        "name": RUN,
        "out_dir": str(out_dir),
        "model": dict(TINY_MSDNET),
        "data": {"name": "digits", "image_size": 8, "val_size": 0.2, "batch_size": 128},
        "train": {"epochs": 1, "lr": 0.05, "log_every": 5},
    }
    path.write_text(yaml.safe_dump(raw))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """A tiny finished run, trained once with resume=true on a fresh name; (its folder, what train printed)."""
    base = tmp_path_factory.mktemp("trained")
    write_config(base / "tiny.yaml", base / "runs")
    out, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: more threads only oversubscribe a loaded machine
    try:
        with contextlib.redirect_stdout(out):
            assert train_main([str(base / "tiny.yaml"), "resume=true"]) == 0
    finally:
        torch.set_num_threads(threads)
    return base, out.getvalue()


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(trained):
    """A torchrun relaunch script passes resume=true on its first launch too: it must start, with one line."""
    base, printed = trained
    lines = [line for line in printed.splitlines() if "no checkpoint" in line]
    assert lines == [f"no checkpoint in {base / 'runs' / RUN} (last.pt): starting fresh"]
    assert (base / "runs" / RUN / "last.pt").is_file() and (base / "runs" / RUN / "eval.json").is_file()


def test_a_checkpoint_cut_anywhere_is_one_clear_error(trained, tmp_path):
    """Cut at every 997th byte: the zip reader fails in several ways (OSError, IndexError, RuntimeError, ...),
    and every one is CheckpointError naming the file."""
    whole = (trained[0] / "runs" / RUN / "last.pt").read_bytes()
    cut = tmp_path / "last.pt"
    for length in [*range(0, len(whole), 997), len(whole) - 1]:
        cut.write_bytes(whole[:length])
        with pytest.raises(CheckpointError, match="is corrupt or truncated"):
            load_checkpoint(cut)


def test_a_huge_q_sends_every_sample_to_the_last_exit():
    """q^k overflowed (1e300 ** 2 = inf), the shares became NaN and infer sent everyone to exit 2."""
    np.testing.assert_allclose(
        geometric_fractions([1e300, 1.0], 3).numpy(), [[0, 0, 1], [1 / 3, 1 / 3, 1 / 3]], atol=1e-12
    )


def test_a_run_name_cannot_leave_out_dir(tmp_path, capsys):
    """name=../../somewhere used to write a whole run two folders above out_dir."""
    config = tmp_path / "a" / "b" / "tiny.yaml"
    config.parent.mkdir(parents=True)
    write_config(config, config.parent / "runs")
    assert train_main([str(config), "name=../../escaped"]) == 2
    assert "config key 'name' is '../../escaped'" in capsys.readouterr().err
    assert not (tmp_path / "a" / "escaped").exists() and not (config.parent / "runs").exists()


# --- calling a command or the API ------------------------------------------------------------------------------


def cli(main: Callable[[list[str]], int], *argv: Any) -> tuple[int, str]:
    """(exit status, stderr) of ``main(argv)`` in-process; argparse's refusals exit through SystemExit."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def api(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, str]:
    """A public function's documented failure, DynsilaError, as (2, its message as the CLIs print it)."""
    try:
        function(*args, **kwargs)
    except DynsilaError as e:
        return 2, f"error: {e}\n"
    return 0, ""


def train(w: Work, *overrides: str) -> tuple[int, str]:
    return cli(train_main, w.config, *overrides)


def anytime(*argv: Any) -> tuple[int, str]:
    return cli(load_benchmark("anytime").main, *argv)


def flops_vs_acc(w: Work, *argv: Any) -> tuple[int, str]:
    return cli(load_benchmark("flops_vs_acc").main, *argv, "--results-dir", w.root / "results")


# --- damaging files ----------------------------------------------------------------------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def rewrite_checkpoint(path: Path, change: Callable[[dict], dict]) -> None:
    torch.save(change(torch.load(path, weights_only=True)), path)


def without(key: str) -> Callable[[dict], dict]:
    return lambda d: {k: v for k, v in d.items() if k != key}


def rewrite_deploy(path: Path, change: Callable[[dict[str, str]], dict[str, str]]) -> None:
    """Save the deploy weights again with their metadata changed (what a tampered file looks like)."""
    with safe_open(str(path), framework="pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(state, str(path), metadata=change(dict(metadata)))


def deploy_config(change: Callable[[dict], Any]) -> Callable[[dict[str, str]], dict[str, str]]:
    """A metadata change that edits the config YAML inside it."""

    def edit(metadata: dict[str, str]) -> dict[str, str]:
        raw = yaml.safe_load(metadata["config"])
        return {**metadata, "config": yaml.safe_dump(change(raw))}

    return edit


def with_keys(**changes: Any) -> Callable[[dict], dict]:
    def change(raw: dict) -> dict:
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            node = raw
            for part in parents:
                node = node[part]
            node[leaf] = value
        return raw

    return change


def export_folder(w: Work, **entry_changes: Any) -> Path:
    """A fake export folder (graph files that are never opened) whose manifest the case damages."""
    folder = w.root / "onnx"
    folder.mkdir()
    for name in ("stage0.onnx", "exit0.onnx"):
        (folder / name).write_bytes(b"not opened: the manifest is refused first")
    manifest = {
        "format": MANIFEST_FORMAT,
        "criterion": "max_prob",
        "input": {"name": "image"},
        "stages": [{"file": "stage0.onnx", "opset": 18}],
        "exits": [{"file": "exit0.onnx", "opset": 18, "after_stage": 0, "threshold": "-inf", "macs_cumulative": 1}],
    }
    manifest["exits"][0].update(entry_changes.pop("exit", {}))
    manifest["stages"][0].update(entry_changes.pop("stage", {}))
    manifest.update(entry_changes)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def graph_of_opset(path: Path, opset: int) -> None:
    """A one-node ONNX graph (Identity) declaring ``opset`` (needs the onnx package)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("state0_0", TensorProto.FLOAT, [None, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["state0_0"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(path))


# --- the table ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    call: Callable[[Work], tuple[int, str]]  # (exit status, stderr) of the command or API call
    expect: str  # a regular expression the one error line must match: the problem (and the fix where named)
    damage: Callable[[Work], Any] | None = None  # writes what the case tests, before the files are hashed
    needs: str | None = None  # a package the case needs (the deploy extra)


Q = "python -m dynsila.infer"
IMAGES = np.random.default_rng(1).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
DEPLOY = Path("runs") / RUN / "deploy.safetensors"


def npz(**arrays: Any) -> Callable[[Work], Any]:
    return lambda w: w.npz(**arrays)


def npz_train(w: Work) -> tuple[int, str]:
    return train(w, "name=npz", "data.name=npz", f"data.root={w.root / 'data.npz'}", "data.val_size=0.25")


def run_file(name: str, change: Callable[[Path], Any]) -> Callable[[Work], Any]:
    return lambda w: change(w.run / name)


def deploy_meta(change: Callable[[dict[str, str]], dict[str, str]]) -> Callable[[Work], Any]:
    return run_file("deploy.safetensors", lambda path: rewrite_deploy(path, change))


def folder(**changes: Any) -> Callable[[Work], Any]:
    return lambda w: export_folder(w, **changes)


def runner(**kwargs: Any) -> Callable[[Work], tuple[int, str]]:
    return lambda w: api(OnnxEarlyExitRunner, w.root / "onnx", **kwargs)


def evaluate(w: Work) -> tuple[int, str]:
    return cli(evaluate_main, w.run)


def resume(w: Work) -> tuple[int, str]:
    return train(w, "resume=true")


def manifest_not_json(w: Work) -> None:
    export_folder(w)
    (w.root / "onnx" / MANIFEST).write_text("{")


def graph_with_opset_99(w: Work) -> None:
    export_folder(w)
    graph_of_opset(w.root / "onnx" / "stage0.onnx", 99)


CASES = [
    # config files and overrides (python -m dynsila.train, python -m dynsila.flops, load_config)
    Case("train-config-missing", lambda w: cli(train_main, w.root / "nope.yaml"), r"config file .* not found; pass"),
    Case("train-config-not-yaml", train, r"not valid YAML", lambda w: w.config.write_text("a: [1,\n")),
    Case("train-config-a-list", train, r"must hold a mapping", lambda w: w.config.write_text("- 1\n- 2\n")),
    Case(
        "train-unknown-key",
        lambda w: train(w, "train.epochz=2"),
        r"unknown config key 'train.epochz'; did you mean 'train.epochs'",
    ),
    Case("train-wrong-type", lambda w: train(w, "train.epochs=two"), r"'train.epochs' expects int"),
    Case("train-out-of-range", lambda w: train(w, "train.lr=-0.1"), r"'train.lr' must lie in \(0.0, inf\]"),
    Case("train-override-no-equals", lambda w: train(w, "train.epochs"), r"not of the form key=value"),
    Case("train-override-into-a-value", lambda w: train(w, "seed.x=1"), r"config key 'seed' expects int"),
    Case(
        "train-unknown-model",
        lambda w: train(w, "model.name=msdnett"),
        r"unknown model 'msdnett'.*did you mean 'msdnet'",
    ),
    Case(
        "train-name-climbs-out", lambda w: train(w, "name=../../x"), r"config key 'name' is '../../x'.*path separator"
    ),
    Case("train-name-with-separator", lambda w: train(w, "name=a/b"), r"config key 'name' is 'a/b'.*folder name"),
    Case("train-name-dot-dot", lambda w: train(w, "name=.."), r"config key 'name' is '..'.*dot path"),
    Case("train-name-empty", lambda w: train(w, "name="), r"config key 'name' is ''.*empty"),
    Case("train-name-absolute", lambda w: train(w, "name=/tmp/elsewhere"), r"config key 'name'.*path separator"),
    Case(
        "train-out-dir-is-a-file",
        lambda w: train(w, "name=b", f"out_dir={w.config}"),
        r"cannot create the run directory .*tiny.yaml/b \(Not a directory\); choose another out_dir",
    ),
    Case("train-existing-run", train, r"already exists; pass resume=true .* --force .* name="),
    Case("train-unknown-flag", lambda w: train(w, "--forse"), r"unrecognized arguments: --forse; see"),
    Case(
        "train-init-from-missing",
        lambda w: train(w, "name=b", f"train.init_from={w.root / 'nope'}"),
        r"deploy weights .* not found",
    ),
    Case("flops-config-missing", lambda w: cli(flops_main, w.root / "nope.yaml"), r"config file .* not found"),
    Case(
        "flops-bad-model-value",
        lambda w: cli(flops_main, w.config, "model.n_blocks=zero"),
        r"'model.n_blocks' expects int",
    ),
    Case("api-load-config-missing", lambda w: api(load_config, w.root / "nope.yaml"), r"config file .* not found"),
    Case("api-load-config-name", lambda w: api(load_config, w.config, ["name=../x"]), r"config key 'name' is '../x'"),
    # checkpoints (resume=true)
    Case(
        "resume-truncated-last",
        resume,
        r"last.pt is corrupt or truncated .*; use another checkpoint",
        run_file("last.pt", lambda p: truncate(p, 0.04)),  # inside the zip's first record: OSError from the reader
    ),
    Case("resume-truncated-last-half", resume, r"last.pt is corrupt or truncated", run_file("last.pt", truncate)),
    Case("resume-empty-last", resume, r"corrupt or truncated", run_file("last.pt", lambda p: p.write_bytes(b""))),
    Case(
        "resume-pickled-last",
        resume,
        r"needs pickle to load .* weights_only=True",
        run_file("last.pt", lambda p: torch.save({"format": CHECKPOINT_FORMAT, "model": Path("x")}, p)),
    ),
    Case(
        "resume-foreign-last",
        resume,
        r"not a dynsila checkpoint",
        run_file("last.pt", lambda p: torch.save({"model": {}}, p)),
    ),
    Case(
        "resume-other-architecture",
        lambda w: train(w, "resume=true", "model.growth_rate=6"),
        r"resume=true would change model.growth_rate from 4 .* to 6; .* name=",
    ),
    Case(
        "resume-last-without-optimizer",
        resume,
        r"not a whole training checkpoint \(no entry 'optimizer'\)",
        run_file("last.pt", lambda p: rewrite_checkpoint(p, without("optimizer"))),
    ),
    Case(
        "resume-last-without-rng",
        resume,
        r"not a whole training checkpoint",
        run_file("last.pt", lambda p: rewrite_checkpoint(p, without("rng"))),
    ),
    Case(
        "resume-metrics-not-json",
        resume,
        r"metrics.jsonl line 1 is not JSON",
        run_file("metrics.jsonl", lambda p: p.write_text("{oops\n")),
    ),
    # data files (npz)
    Case("npz-missing", npz_train, r"npz dataset not found"),
    Case(
        "npz-not-a-zip", npz_train, r"not a readable .npz file", lambda w: (w.root / "data.npz").write_bytes(b"hello")
    ),
    Case("npz-float-images", npz_train, r"x_train must be uint8", npz(x_train=IMAGES.astype(np.float32))),
    Case("npz-images-3d", npz_train, r"x_train must be uint8 N x H x W x C", npz(x_train=IMAGES[..., 0])),
    Case("npz-two-channels", npz_train, r"neither 1 nor 3 channels", npz(x_train=np.repeat(IMAGES, 2, axis=3))),
    Case("npz-label-negative", npz_train, r"labels span -1", npz(y_train=np.arange(40) % 4 - 1)),
    Case("npz-label-fraction", npz_train, r"whole-number labels", npz(y_train=np.full(40, 0.5))),
    Case("npz-label-nan", npz_train, r"y_test must hold 20 whole-number labels", npz(y_test=np.full(20, np.nan))),
    Case("npz-lengths-differ", npz_train, r"y_train must hold 40", npz(y_train=np.arange(39) % 4)),
    Case(
        "npz-object-array", npz_train, r"not a readable .npz file", npz(y_train=np.array([{"a": 1}] * 40, dtype=object))
    ),
    Case("npz-no-train", npz_train, r"no x_train / y_train", npz(x_train=None, y_train=None)),
    Case("npz-no-evaluation-split", npz_train, r"neither x_test/y_test nor x_val/y_val", npz(x_test=None, y_test=None)),
    Case("npz-x-without-y", npz_train, r"has x_test but no y_test", npz(y_test=None)),
    Case("npz-empty-test", npz_train, r"the test split holds no images", npz(x_test=IMAGES[:0], y_test=np.arange(0))),
    Case(
        "npz-constant-images",
        npz_train,
        r"every training pixel is 7 \(constant images",
        npz(x_train=np.full_like(IMAGES, 7)),
    ),
    # deploy weights and run directories (evaluate, infer, load_deploy_model)
    Case(
        "evaluate-not-a-run",
        lambda w: cli(evaluate_main, w.root / "nope"),
        r"deploy weights .* not found; train a run first",
    ),
    Case(
        "evaluate-truncated-deploy",
        evaluate,
        r"not a readable safetensors file",
        run_file("deploy.safetensors", truncate),
    ),
    Case(
        "evaluate-pickle-as-deploy",
        evaluate,
        r"not a readable safetensors file",
        run_file("deploy.safetensors", lambda p: torch.save({"a": Path("x")}, p)),
    ),
    Case(
        "evaluate-metadata-not-yaml",
        evaluate,
        r"metadata is not valid YAML",
        deploy_meta(lambda m: {**m, "config": "a: [1,"}),
    ),
    Case(
        "evaluate-metadata-a-list",
        evaluate,
        r"metadata must hold a mapping",
        deploy_meta(lambda m: {**m, "config": "- 1"}),
    ),
    Case(
        "evaluate-metadata-name-climbs-out",
        evaluate,
        r"config key 'name' is '../../x'",
        deploy_meta(deploy_config(with_keys(name="../../x"))),
    ),
    Case(
        "evaluate-metadata-unknown-key",
        evaluate,
        r"unknown config key 'train.evil'",
        deploy_meta(deploy_config(with_keys(train__evil=1))),
    ),
    Case(
        "evaluate-metadata-without-config",
        evaluate,
        r"carries no dynsila config",
        deploy_meta(lambda m: {"format": m["format"]}),
    ),
    Case(
        "evaluate-metadata-other-architecture",
        evaluate,
        r"another architecture",
        deploy_meta(deploy_config(with_keys(model__growth_rate=6))),
    ),
    Case(
        "evaluate-device-unknown",
        lambda w: cli(evaluate_main, w.run, "--device", "tpu9"),
        r"--device: 'tpu9' is not a device name",
    ),
    Case(
        "evaluate-unknown-criterion",
        lambda w: cli(evaluate_main, w.run, "--criteria", "vibes"),
        r"invalid choice: 'vibes'",
    ),
    Case(
        "api-load-deploy-truncated",
        lambda w: api(load_deploy_model, w.run),
        r"not a readable safetensors",
        run_file("deploy.safetensors", truncate),
    ),
    Case(
        "api-load-deploy-metadata-name",
        lambda w: api(load_deploy_model, w.run),
        r"config key 'name' is '/etc'",
        deploy_meta(deploy_config(with_keys(name="/etc"))),
    ),
    Case(
        "infer-q-negative",
        lambda w: cli(infer_main, w.run, "--q", "-1"),
        rf"{Q}: argument --q: -1 is outside \(0.0, inf\]; see {Q} --help",
    ),
    Case("infer-q-zero", lambda w: cli(infer_main, w.run, "--q", "0"), r"argument --q: 0 is outside"),
    Case("infer-q-nan", lambda w: cli(infer_main, w.run, "--q", "nan"), r"argument --q: nan is outside"),
    Case(
        "infer-q-not-a-number", lambda w: cli(infer_main, w.run, "--q", "half"), r"argument --q: 'half' is not a float"
    ),
    Case(
        "infer-budget-negative", lambda w: cli(infer_main, w.run, "--budget", "-5"), r"argument --budget: -5 is outside"
    ),
    Case(
        "infer-batch-size-zero",
        lambda w: cli(infer_main, w.run, "--q", "1", "--batch-size", "0"),
        r"argument --batch-size: 0 is outside \[1, inf\]",
    ),
    Case(
        "infer-no-target",
        lambda w: cli(infer_main, w.run),
        r"one of the arguments --q --budget --gate-threshold --epsilon is required",
    ),
    Case("infer-not-a-run", lambda w: cli(infer_main, w.root / "nope", "--q", "1"), r"deploy weights .* not found"),
    # export folders and manifests (python -m dynsila.export, OnnxEarlyExitRunner)
    Case("export-q-negative", lambda w: cli(export_main, w.run, "--q", "-1"), r"argument --q: -1 is outside"),
    Case("export-budget-zero", lambda w: cli(export_main, w.run, "--budget", "0"), r"argument --budget: 0 is outside"),
    Case("export-not-a-run", lambda w: cli(export_main, w.root / "nope"), r"deploy weights .* not found"),
    Case(
        "export-out-exists",
        lambda w: cli(export_main, w.run, "--out", w.root / "out"),
        r"exists; pass --force|the deploy extra",
        lambda w: (w.root / "out").mkdir(),
    ),
    Case(
        "runner-file-climbs-out",
        runner(),
        r"graph file '../x.onnx' is not a plain file name",
        folder(exit={"file": "../x.onnx"}),
        "onnxruntime",
    ),
    Case(
        "runner-file-absolute",
        runner(),
        r"graph file '/etc/x.onnx' is not a plain file name",
        folder(stage={"file": "/etc/x.onnx"}),
        "onnxruntime",
    ),
    Case(
        "runner-cache-dir-climbs-out",
        runner(),
        r"onnxruntime cache_dir '../cache' is not a folder inside the export folder",
        folder(onnxruntime={"cache_dir": "../cache"}),
        "onnxruntime",
    ),
    Case(
        "runner-cache-dir-absolute",
        runner(),
        r"onnxruntime cache_dir '/tmp/cache' is not a folder inside the export folder",
        folder(onnxruntime={"cache_dir": "/tmp/cache"}),
        "onnxruntime",
    ),
    Case(
        "export-ort-cache-outside",
        lambda w: cli(export_main, w.run, "--ort-cache", "/tmp/ort-cache-elsewhere"),
        r"--ort-cache: '/tmp/ort-cache-elsewhere' is not a folder inside the export folder",
    ),
    Case(
        "runner-graph-missing",
        runner(),
        r"graph file exit9.onnx is missing",
        folder(exit={"file": "exit9.onnx"}),
        "onnxruntime",
    ),
    Case("runner-manifest-not-json", runner(), r"manifest.json is not JSON", manifest_not_json, "onnxruntime"),
    Case(
        "runner-manifest-other-format",
        runner(),
        r"is not a dynsila-onnx-1 manifest",
        folder(format="other-1"),
        "onnxruntime",
    ),
    Case("runner-manifest-no-exits", runner(), r"lists no stages or no exits", folder(exits=[]), "onnxruntime"),
    Case("runner-threads-zero", runner(threads=0), r"threads=0: give a whole number >= 1", folder(), "onnxruntime"),
    Case("runner-threshold-nan", runner(thresholds=[float("nan")]), r"a threshold is NaN", folder(), "onnxruntime"),
    Case("runner-wrong-opset", runner(), r"cannot load stage0.onnx .*; re-export the run", graph_with_opset_99, "onnx"),
    # benchmarks
    Case("anytime-jobs-zero", lambda w: anytime("--jobs", "0"), r"argument --jobs: 0 is outside \[1, inf\]"),
    Case("anytime-threads-negative", lambda w: anytime("--threads", "-2"), r"argument --threads: -2 is outside"),
    Case("anytime-max-minutes-zero", lambda w: anytime("--max-minutes", "0"), r"argument --max-minutes: 0 is outside"),
    Case("anytime-unknown-preset", lambda w: anytime("--preset", "nope"), r"argument --preset: invalid choice: 'nope'"),
    Case(
        "flops-vs-acc-out-climbs-out",
        lambda w: flops_vs_acc(w, "--runs", w.run, "--out", "../escape"),
        r"argument --out: '../escape' is not a plain name",
    ),
    Case(
        "flops-vs-acc-not-a-run", lambda w: flops_vs_acc(w, "--runs", w.root / "nope"), r"deploy weights .* not found"
    ),
    Case(
        "flops-vs-acc-eval-not-json",
        lambda w: flops_vs_acc(w, "--runs", w.run),
        r"eval.json is not JSON; delete it",
        run_file("eval.json", lambda p: p.write_text("{")),
    ),
]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_the_table_covers_every_command_and_the_api():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    prefixes = {c.id.split("-")[0] for c in CASES}
    assert {"train", "flops", "evaluate", "infer", "export", "anytime", "api", "runner"} <= prefixes


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_changes_nothing(case: Case, trained, tmp_path):
    if case.needs and not have(case.needs):
        pytest.skip(f"needs {case.needs} (the deploy extra)")
    check_case(case, trained[0], tmp_path)


def check_case(case: Case, run_copy: Path, tmp_path: Path) -> None:
    """Damage a copy of the trained run as ``case`` says, call it, and check: non-zero exit, one ``error:`` line
    matching ``case.expect``, no traceback, every file that existed before unchanged."""
    w = Work(tmp_path / "w")
    shutil.copytree(run_copy, w.root)
    write_config(w.config, w.root / "runs")
    if case.damage is not None:
        case.damage(w)
    before = snapshot(w.root)
    code, err = case.call(w)
    assert code != 0, f"exit status 0; stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(case.expect, lines[0]), lines[0]
    after = snapshot(w.root)
    assert {k: after.get(k) for k in before} == before, "a file that existed before was changed or removed"
