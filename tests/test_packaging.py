"""Packaging: dynsila is the only top-level name it installs, and a user's own ``models`` package is left alone."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_dynsila_as_its_only_top_level_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("dynsila-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"dynsila"}
    assert "dynsila/models/msdnet.py" in names  # the repository's models/ folder, installed under dynsila


def test_import_beside_a_foreign_models_package(tmp_path: Path) -> None:
    foreign = tmp_path / "models"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("OWNER = 'user'\n")
    script = (
        "import dynsila, models\n"
        "from dynsila.models import build\n"
        "assert models.OWNER == 'user', models.__file__\n"
        "net = build('msdnet', num_classes=3, n_blocks=2, n_channels=4, growth_rate=4, gr_factor=[1, 2], "
        "bn_factor=[1, 2], head_channels=8)\n"
        "print(net.num_exits)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"
