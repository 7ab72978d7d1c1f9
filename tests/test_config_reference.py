"""docs/config.md is generated from the config dataclasses (docs/make_config_reference.py) and kept up to date."""

import dataclasses
import importlib.util
from pathlib import Path

from dynsila import config
from dynsila.methods.sila import SiLaConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("make_config_reference", REPO_ROOT / "docs/make_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_config_reference_page_is_up_to_date():
    generated = _generator().reference()
    assert (REPO_ROOT / "docs/config.md").read_text() == generated, "run: python docs/make_config_reference.py"


def test_the_reference_names_every_key_with_its_default_and_comment():
    page = _generator().reference()
    for section, cls in [("data", config.DataConfig), ("train", config.TrainConfig), ("sila", SiLaConfig)]:
        for f in dataclasses.fields(cls):
            assert f"| `{section}.{f.name}` |" in page
    self_distill = "| `loss.self_distill` | `float` | `0.0` | [0.0, ] | weight of T^2 KL(p_last \\|\\| p_k)"
    assert self_distill in page  # the comment beside the field, with the table's pipes escaped
    assert "| `train.lr` | `float` | `0.1` | (0.0, ] |" in page
