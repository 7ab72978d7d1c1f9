"""How the ONNX runner makes its sessions (dynsila.onnx_runner.SessionSettings): thread pools, optimisation
level, the on-disk cache of optimised graphs, and the export's recorded defaults."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dynsila.deploy.onnx_runner import OnnxEarlyExitRunner, SessionSettings
from dynsila.errors import DynsilaError
from tests.test_export import REPO, compare_runners, export_tensor_state_net, needs_deploy


@needs_deploy
def test_session_settings_keep_decisions_and_the_cache_is_reused(tmp_path):
    model, x = export_tensor_state_net(tmp_path / "net")
    reference = OnnxEarlyExitRunner(tmp_path / "net", threads=1)
    assert reference.thread_pool == "session" and reference.sessions.optimization == "all"
    expected = reference.all_exit_logits(x.numpy())
    cache = tmp_path / "cache"
    first = OnnxEarlyExitRunner(tmp_path / "net", threads=1, cache_dir=cache)
    written = sorted(p.name for p in cache.iterdir())
    assert len(written) == 6 and all(name.endswith(".onnx") for name in written)  # 3 stages, 3 exits, no partials
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    second = OnnxEarlyExitRunner(tmp_path / "net", threads=1, cache_dir=cache)  # reads, writes nothing
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    for runner in (first, second, OnnxEarlyExitRunner(tmp_path / "net", threads=1, optimization="disabled")):
        np.testing.assert_allclose(runner.all_exit_logits(x.numpy()), expected, rtol=1e-5, atol=1e-5)
        assert np.array_equal(runner(x.numpy()).exit_index, reference(x.numpy()).exit_index)
    compare_runners(model, tmp_path / "net", x, batch_size=7, singles=5)


@needs_deploy
def test_bad_session_settings_are_one_line_errors(tmp_path):
    for kwargs, problem in (
        ({"thread_pool": "global"}, "unknown thread_pool 'global'"),
        ({"optimization": "max"}, "unknown optimization 'max'"),
        ({"threads": 0}, "threads must be at least 1"),
    ):
        with pytest.raises(DynsilaError, match=problem) as e:
            SessionSettings(**kwargs)
        assert "\n" not in str(e.value)


@needs_deploy
def test_the_manifest_records_the_exports_session_defaults(tmp_path):
    export_tensor_state_net(tmp_path / "net")
    manifest_path = tmp_path / "net" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["onnxruntime"] = {"optimization": "basic", "cache_dir": "ort_cache"}
    manifest_path.write_text(json.dumps(manifest))
    runner = OnnxEarlyExitRunner(tmp_path / "net", threads=1)
    assert runner.sessions.optimization == "basic" and (tmp_path / "net" / "ort_cache").is_dir()
    assert OnnxEarlyExitRunner(tmp_path / "net", threads=1, optimization="all").sessions.optimization == "all"


@needs_deploy
def test_shared_pools_are_made_once_per_process_and_a_mismatch_is_refused(tmp_path):
    """ONNX Runtime's global pools are process-wide, so this runs in a fresh interpreter."""
    export_tensor_state_net(tmp_path / "net")
    code = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "import numpy as np\n"
        "from dynsila.deploy.onnx_runner import OnnxEarlyExitRunner\n"
        "x = np.zeros((3, 3, 6, 6), np.float32)\n"
        "shared = OnnxEarlyExitRunner(sys.argv[1], threads=1, thread_pool='shared')\n"
        "print(shared.thread_pool, shared(x).exit_index.shape[0])\n"
        "print(OnnxEarlyExitRunner(sys.argv[1], threads=1, thread_pool='shared').thread_pool)\n"
        "for kwargs in ({'threads': 2, 'thread_pool': 'shared'}, {'threads': 1, 'thread_pool': 'session'}):\n"
        "    try:\n        OnnxEarlyExitRunner(sys.argv[1], **kwargs)\n"
        "    except Exception as e:\n        print(str(e).split(':')[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "net"), str(REPO)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    refused = "this process already runs ONNX Runtime on shared thread pools of 1 threads, which cannot change"
    assert done.stdout.splitlines() == ["shared 3", "shared", refused, refused]
