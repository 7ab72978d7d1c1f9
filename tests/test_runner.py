import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynsila import models
from dynsila.budget.flops import exit_costs
from dynsila.budget.thresholds import CONFIDENCE, exit_indices, fit_thresholds, geometric_fractions
from dynsila.deploy.fuse import fold_batchnorm
from dynsila.deploy.infer import main as infer_main
from dynsila.deploy.runner import EarlyExitRunner
from dynsila.models import MultiExitNetwork
from dynsila.train import main as train_main
from tests.conftest import randomise_batchnorm


def tiny_msdnet(kwargs, seed=0):
    torch.manual_seed(seed)
    model = models.build("msdnet", num_classes=5, **kwargs).double().eval()
    return randomise_batchnorm(model)  # so exits disagree and confidences spread


@pytest.mark.parametrize("criterion", sorted(CONFIDENCE))
@pytest.mark.parametrize("q", [0.3, 1.0, 3.0])
def test_runner_decisions_equal_the_evaluators_simulation(tiny_model_kwargs, criterion, q):
    model = tiny_msdnet(tiny_model_kwargs)
    g = torch.Generator().manual_seed(1)
    val_x, test_x = torch.randn(120, 3, 8, 8, generator=g).double(), torch.randn(90, 3, 8, 8, generator=g).double()
    with torch.no_grad():
        val_logits, test_logits = torch.stack(model(val_x), 1), torch.stack(model(test_x), 1)
    confidence = CONFIDENCE[criterion]
    thresholds = fit_thresholds(confidence(val_logits), geometric_fractions([q], 3))[0]
    simulated = exit_indices(confidence(test_logits), thresholds[None])[0]
    assert len(set(simulated.tolist())) > 1  # the case is not trivial

    costs = [c.macs_cumulative for c in exit_costs(model.float(), (3, 8, 8))]
    model.double()
    runner = EarlyExitRunner(model, thresholds, criterion, costs=costs)
    for batch in (90, 7, 1):
        results = [runner(test_x[i : i + batch]) for i in range(0, 90, batch)]
        exits = torch.cat([r.exit_index for r in results])
        assert torch.equal(exits, simulated)
        predictions = torch.cat([r.predictions for r in results])
        assert torch.equal(predictions, test_logits.argmax(-1)[torch.arange(90), simulated])
        macs = torch.cat([r.macs for r in results])
        assert macs.tolist() == [costs[k] for k in simulated.tolist()]
        # streaming: survivors of several batches are regrouped before the next stage; same decisions, in order
        streamed = runner.run_stream(test_x.split(batch), group_size=max(batch, 16))
        assert torch.equal(streamed.exit_index, simulated)
        assert torch.equal(streamed.predictions, predictions)


def test_samples_that_exit_are_not_computed_further(tiny_model_kwargs):
    model = tiny_msdnet(tiny_model_kwargs)
    seen: list[tuple[str, int]] = []
    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda m, inp, out, i=i: seen.append((f"stage{i}", inp[0][0].shape[0])))
    x = torch.randn(16, 3, 8, 8).double()
    # deferred=False: every stage runs whole, so its hook sees who enters it (deferral: the next test)
    EarlyExitRunner(model, [-float("inf"), 0, 0], costs=[1, 2, 3], deferred=False)(x)  # everyone leaves at exit 1
    assert seen == [("stage0", 16)]
    with torch.no_grad():
        conf = CONFIDENCE["max_prob"](torch.stack(model(x), 1))
    seen.clear()
    t = [conf[:, 0].median().item(), -float("inf"), 0.0]  # half leave at exit 1, the rest at exit 2
    result = EarlyExitRunner(model, t, costs=[1, 2, 3], deferred=False)(x)
    assert seen == [("stage0", 16), ("stage1", int((result.exit_index == 1).sum()))]
    assert 0 < (result.exit_index == 1).sum() < 16 and (result.exit_index != 2).all()


class TensorStateNet(MultiExitNetwork):
    """A plain CNN with a tensor state and two exits after the second of three stages (exit_after [1, 1, 2])."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stages = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
        self.exits = nn.ModuleList()
        for _ in range(3):
            head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            head.fc = nn.Linear(4, 3)
            self.exits.append(head)
        self.exit_after = [1, 1, 2]


def test_runner_is_generic_over_the_protocol():
    torch.manual_seed(0)
    model = TensorStateNet().eval()
    fit_x, x = torch.randn(40, 3, 6, 6).double(), torch.randn(40, 3, 6, 6).double()
    with torch.no_grad():
        fit_conf = CONFIDENCE["max_prob"](torch.stack(model.double()(fit_x), 1))
        conf = CONFIDENCE["max_prob"](torch.stack(model(x), 1))
    thresholds = fit_thresholds(fit_conf, geometric_fractions([1.0], 3))[0]
    result = EarlyExitRunner(model, thresholds, costs=[1, 1, 2])(x)
    assert torch.equal(result.exit_index, exit_indices(conf, thresholds[None])[0])


def test_streaming_regroups_survivors_into_full_groups(tiny_model_kwargs):
    model = tiny_msdnet(tiny_model_kwargs)
    sizes: list[int] = []
    model.stages[2].register_forward_pre_hook(lambda m, inp: sizes.append(inp[0][0].shape[0]))
    x = torch.randn(200, 3, 8, 8).double()
    with torch.no_grad():
        conf = CONFIDENCE["max_prob"](torch.stack(model(x), 1))
    sizes.clear()
    thresholds = fit_thresholds(conf, geometric_fractions([1.0], 3))[0]
    runner = EarlyExitRunner(model, thresholds, costs=[1, 2, 3], fold_batchnorm=False, deferred=False)
    result = runner.run_stream(x.split(20))
    assert all(s >= 20 for s in sizes[:-1]) and sum(sizes) == int((result.exit_index == 2).sum())
    assert torch.equal(result.exit_index, runner(x).exit_index)


def test_folded_batchnorm_keeps_the_function(tiny_model_kwargs):
    model = tiny_msdnet(tiny_model_kwargs).float()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for a, b in zip(model(x), folded(x), strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_runner_rejects_wrong_threshold_counts(tiny_model_kwargs):
    with pytest.raises(ValueError, match="2 thresholds"):
        EarlyExitRunner(tiny_msdnet(tiny_model_kwargs), [0.5, 0.5], costs=[1, 2, 3])
    runner = EarlyExitRunner(tiny_msdnet(tiny_model_kwargs), [0.5, 0.5, 0.5], costs=[1, 2, 3])
    with pytest.raises(ValueError, match="4 thresholds"):
        runner.set_thresholds([0.1, 0.2, 0.3, 0.4])
    assert runner.thresholds.tolist() == [0.5, 0.5, 0.5]  # a refused change leaves the runner as it was


def test_set_thresholds_gives_the_decisions_of_a_new_runner(tiny_model_kwargs):
    model = tiny_msdnet(tiny_model_kwargs)
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(5)).double()
    runner = EarlyExitRunner(model, [2.0, 2.0, 0.0], costs=[1, 2, 3])  # nobody leaves before the last exit
    assert set(runner(x).exit_index.tolist()) == {2}
    with torch.no_grad():
        conf = CONFIDENCE["max_prob"](torch.stack(model(x), 1))
    thresholds = fit_thresholds(conf, geometric_fractions([1.0], 3))[0]
    runner.set_thresholds(thresholds)
    expected = EarlyExitRunner(model, thresholds, costs=[1, 2, 3])(x).exit_index
    assert torch.equal(runner(x).exit_index, expected) and len(set(expected.tolist())) > 1


def test_infer_cli(tiny_config, capsys):
    path = tiny_config()
    assert train_main([str(path)]) == 0
    run_dir = str(path.parent / "runs" / "tiny")
    capsys.readouterr()
    assert infer_main([run_dir, "--q", "1.0", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "images/s" in out and "exit  threshold" in out
    histogram = [int(line.split()[2]) for line in out.splitlines() if line[:4].strip().isdigit()]
    assert len(histogram) == 3 and sum(histogram) == 359  # every test image exits exactly once
    assert infer_main([run_dir, "--budget", "1", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "below exit 1's cost" in out


def _python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return its stdout and stderr."""
    clean = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=120, check=True
    )
    return done.stdout + done.stderr


def test_runner_and_thresholds_import_neither_the_evaluator_nor_heavy_libraries():
    code = (
        "import os, sys\n"
        "import dynsila.budget.thresholds\n"
        "print(sorted(m for m in sys.modules if m.startswith('dynsila')))\n"
        "import dynsila.deploy.runner\n"
        "heavy = ('dynsila.evaluation.evaluate', 'dynsila.budget.flops', 'torchvision', 'timm', 'fvcore')\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))\n"
    )
    thresholds_only, heavy, onednn = _python(code).splitlines()[-3:]
    assert (
        thresholds_only == "['dynsila', 'dynsila.budget', 'dynsila.budget.thresholds']"
    )  # the threshold maths imports torch alone
    assert heavy == "[]"
    assert onednn == "None"  # importing sets nothing in the environment


CACHE_PROBE = """
import torch
from dynsila.deploy.runner import raise_primitive_cache
if {raise_cache}:
    raise_primitive_cache()  # after importing torch, before the first convolution
torch.set_num_threads(1)
conv = torch.nn.Conv2d(4, 4, 3, padding=1).eval()
with torch.no_grad():
    for batch in range(2, 600):  # ~1,200 primitives (a convolution and a reorder per shape) > 1,024
        conv(torch.randn(batch, 4, 6, 6))
    print("PROBE", flush=True)
    conv(torch.randn(2, 4, 6, 6))
"""


def _first_shape_was_cached(raise_cache: bool) -> bool | None:
    """Whether oneDNN still had the first shape's convolution after ~1,200 other primitives (None: no oneDNN
    log)."""
    out = _python(CACHE_PROBE.format(raise_cache=raise_cache), ONEDNN_VERBOSE="profile_create")
    after = out.split("PROBE", 1)[-1]
    created = [line for line in after.splitlines() if ",convolution," in line and "create:cache_" in line]
    return None if not created else "create:cache_hit" in created[0]


def test_primitive_cache_setting_works_when_set_before_the_first_convolution():
    raised = _first_shape_was_cached(True)
    if raised is None:
        pytest.skip("this torch build logs no oneDNN convolution primitives")
    assert raised  # the variable was read at the first convolution, after it was set
    assert _first_shape_was_cached(False) is False  # the default cache evicted it: the setting matters


# Three scales and two layers per block, so the last layers before each exit compute finer scales that only later
# exits read (the deferred part) and the runner's lazy evaluation has something to leave out.
THREE_SCALES = {"gr_factor": [1, 2, 4], "bn_factor": [1, 2, 4], "step": 2, "base": 2}


@pytest.mark.parametrize("deferred", [True, False])
def test_each_sample_pays_exactly_the_counted_cost_of_its_exit(tiny_model_kwargs, deferred):
    model = tiny_msdnet(tiny_model_kwargs | THREE_SCALES).float()
    costs = exit_costs(model, (3, 8, 8))
    model.double()
    assert costs[0].macs_deferred > 0 and costs[1].macs_deferred > 0  # the case is not trivial
    assert all(c.macs_lazy + c.macs_deferred == c.macs_cumulative for c in costs)
    charged = [c.macs_lazy if deferred else c.macs_cumulative for c in costs]
    x = torch.randn(6, 3, 8, 8).double()
    for k in range(3):  # everyone goes on to exit k and leaves there
        thresholds = [float("inf")] * k + [-float("inf")] * (3 - k)
        runner = EarlyExitRunner(model, thresholds, costs=charged, deferred=deferred)
        with FlopCounterMode(display=False) as counter:
            result = runner(x)
        assert (result.exit_index == k).all()
        assert counter.get_total_flops() == 2 * 6 * charged[k]  # torch counts a multiply-add as 2 FLOPs
    with torch.no_grad():
        conf = CONFIDENCE["max_prob"](torch.stack(model(x), 1))
    runner = EarlyExitRunner(model, [conf[:, 0].median().item(), -float("inf"), 0.0], costs=charged, deferred=deferred)
    with FlopCounterMode(display=False) as counter:
        result = runner(x)  # some leave at exit 1, the rest at exit 2: each pays its own exit's cost
    assert 0 < (result.exit_index == 0).sum() < 6
    assert counter.get_total_flops() == 2 * int(result.macs.sum())


def test_lazy_runner_gives_the_eager_networks_decisions_and_confidences(tiny_model_kwargs):
    model = tiny_msdnet(tiny_model_kwargs | THREE_SCALES)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, 8, 8, generator=g).double()
    with torch.no_grad():
        logits = torch.stack(model(x), 1)  # the normal forward: every stage whole
    conf = CONFIDENCE["max_prob"](logits)
    thresholds = fit_thresholds(conf, geometric_fractions([1.0], 3))[0]
    expected = exit_indices(conf, thresholds[None])[0]
    assert len(set(expected.tolist())) == 3
    lazy = EarlyExitRunner(model, thresholds, fold_batchnorm=False, channels_last=False, costs=[1, 2, 3])
    for result in (lazy(x), lazy.run_stream(x.split(16))):
        assert torch.equal(result.exit_index, expected)
        assert torch.equal(result.predictions, logits.argmax(-1)[torch.arange(64), expected])
        # the exit's logits are the eager ones: their confidence agrees to float64 rounding
        assert torch.allclose(result.confidence, conf[torch.arange(64), expected], rtol=0, atol=1e-12)


def test_compaction_keeps_the_channels_last_layout(tiny_model_kwargs):
    model = tiny_msdnet(tiny_model_kwargs | THREE_SCALES)
    layouts: list[bool] = []
    runner = EarlyExitRunner(model, [0.0, 0.0, 0.0], costs=[1, 2, 3])  # folded copy, channels-last
    for stage in runner.model.stages[1:]:
        stage[0].register_forward_pre_hook(
            lambda m, inp: layouts.extend(t.is_contiguous(memory_format=torch.channels_last) for t in inp[0])
        )
    x = torch.randn(32, 3, 8, 8).double()
    with torch.no_grad():
        conf = CONFIDENCE["max_prob"](torch.stack(model(x), 1))
    runner.thresholds = torch.tensor([conf[:, 0].median().item(), conf[:, 1].median().item(), 0.0]).double()
    runner(x)
    assert layouts and all(layouts)


def test_compiled_runner_sends_every_piece_through_the_compiler(tiny_model_kwargs, monkeypatch):
    """``compile=True`` wraps exactly the pieces the runner calls (stem, each stage's deferred halves or the whole
    stage, each exit head), the runner calls only wrapped pieces, and its decisions stay the eager runner's."""
    import dynsila.deploy.runner as runner_module

    wrapped: list = []
    called: set[int] = set()

    def counting(fn):
        index = len(wrapped)
        wrapped.append(fn)

        def run(*args):
            called.add(index)
            return fn(*args)

        return run

    monkeypatch.setattr(runner_module, "_compiled", counting)
    model = tiny_msdnet(tiny_model_kwargs | THREE_SCALES)
    x = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        conf = CONFIDENCE["max_prob"](torch.stack(model(x), 1))
    thresholds = fit_thresholds(conf, geometric_fractions([1.0], 3))[0]
    plain = EarlyExitRunner(model, thresholds, costs=[1, 2, 3])
    compiled = EarlyExitRunner(model, thresholds, costs=[1, 2, 3], compile=True)
    net = compiled.model
    assert wrapped[0] is net.stem and all(any(w is head for w in wrapped) for head in net.exits)
    for stage, split in zip(net.stages, compiled.splits, strict=True):
        assert any(w is stage for w in wrapped)
        if split is not None:
            assert any(w == split.for_exits for w in wrapped) and any(w == split.complete for w in wrapped)
    assert any(s is not None for s in compiled.splits), "the three-scale tiny MSDNet has a deferred stage"
    expected, got = plain.run_stream(x.split(16)), compiled.run_stream(x.split(16))
    assert torch.equal(got.exit_index, expected.exit_index) and len(set(expected.exit_index.tolist())) == 3
    assert torch.equal(got.predictions, expected.predictions)
    assert called  # the compiled runner ran through the wrapped pieces (a bypass would leave this empty)
    assert any(wrapped[i] == s.complete for i in called for s in compiled.splits if s is not None)


def test_compiled_runner_matches_the_eager_runner_for_real(tiny_model_kwargs):
    """Through inductor itself (a one-stage graph per piece, dynamic batch size, frozen weights): the same exit
    decisions and predictions as the eager runner, on batches that shrink as samples leave."""
    pytest.importorskip("torch._inductor")
    model = tiny_msdnet(tiny_model_kwargs | THREE_SCALES).float()
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        conf = CONFIDENCE["max_prob"](torch.stack(model(x), 1))
    thresholds = fit_thresholds(conf, geometric_fractions([1.0], 3))[0]
    expected = EarlyExitRunner(model, thresholds, costs=[1, 2, 3])(x)
    got = EarlyExitRunner(model, thresholds, costs=[1, 2, 3], compile=True)(x)
    assert torch.equal(got.exit_index, expected.exit_index)
    assert torch.equal(got.predictions, expected.predictions)
