"""The README runs as written: every ``python -m dynsila`` line of its quick start and of its ONNX export, and
the quick start's Python example, on the digits preset, in a folder of the test's own.

One change is made, and only to save time: each ``python -m dynsila.train`` line trains one epoch
(``train.epochs=1`` appended). Everything else runs exactly as the README prints it; ``my_images/`` (the predict
line's folder) is written by the test from the run's own test images.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import deploy_installed

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
ONE_EPOCH = "train.epochs=1"


def block_after(text: str, marker: str, language: str) -> str:
    """The first fenced block of ``language`` after ``marker``."""
    found = re.search(rf"```{language}\n(.*?)```", text[text.index(marker) :], re.S)
    assert found is not None, f"the README has no {language} block after {marker!r}"
    return found.group(1)


def dynsila_commands(block: str) -> list[list[str]]:
    """Each ``python -m dynsila.X ...`` line as (module, *arguments), comments dropped."""
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [words[2:] for words in lines if words[:2] == ["python", "-m"] and words[2].startswith("dynsila.")]


def run_command(module: str, args: list[str]) -> int:
    main = importlib.import_module(module).main
    with contextlib.redirect_stdout(io.StringIO()):
        return main(args)


def write_images(run_dir: Path, folder: Path, count: int = 6) -> torch.Tensor:
    from dynsila import load_deploy_model
    from dynsila.data import build_splits

    _, cfg = load_deploy_model(run_dir)
    images = build_splits(cfg.data).test.images[:count]
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"image{i}.png")
    return images


def test_the_readme_runs_as_written(tmp_path, monkeypatch):
    text = README.read_text()
    quick = dynsila_commands(block_after(text, "## Quick start", "bash"))
    export = dynsila_commands(block_after(text, "## Export to ONNX", "bash"))
    assert [c[0] for c in quick][:3] == ["dynsila.train", "dynsila.evaluate", "dynsila.infer"]
    assert {"dynsila.predict", "dynsila.plot"} <= {c[0] for c in quick} and export[0][0] == "dynsila.export"
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    for module, *args in quick + (export if deploy_installed() else []):
        if module == "dynsila.train":
            args = [*args, ONE_EPOCH]
        if module == "dynsila.predict" and not Path("my_images").exists():
            images = write_images(Path(args[0]), Path("my_images"))
        assert run_command(module, args) == 0, f"python -m {module} {' '.join(args)} failed"
    assert len(Path("predictions.csv").read_text().splitlines()) == 1 + len(images)
    assert Path("curves.png").stat().st_size > 0

    # the quick start's Python example, with the predict images as its ``images``
    example = block_after(text, "## Quick start", "python")
    scope: dict = {"images": images}
    exec(compile(example, "README.md", "exec"), scope)
    logits = scope["logits_per_exit"]
    assert len(logits) >= 2 and all(z.shape == (len(images), 10) for z in logits)


@pytest.mark.skipif(not deploy_installed(), reason="the export line needs the deploy extra")
def test_the_readme_export_block_names_a_folder_the_python_example_reads():
    text = README.read_text()
    (module, *args) = dynsila_commands(block_after(text, "## Export to ONNX", "bash"))[0]
    example = block_after(text, "## Export to ONNX", "python")
    assert f'"{args[args.index("--out") + 1]}"' in example


def test_the_readme_is_a_manual_not_a_report():
    assert len(README.read_text().splitlines()) <= 250  # the rest lives in docs/ and benchmarks/results/
