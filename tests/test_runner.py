import pytest
import torch
from torch import nn

from dynsila import models
from dynsila.evaluate import CONFIDENCE, exit_indices, fit_thresholds, geometric_fractions
from dynsila.flops import exit_costs
from dynsila.fuse import fold_batchnorm
from dynsila.infer import main as infer_main
from dynsila.models import MultiExitNetwork
from dynsila.runner import EarlyExitRunner
from dynsila.train import main as train_main


def tiny_msdnet(kwargs, seed=0):
    torch.manual_seed(seed)
    model = models.build("msdnet", num_classes=5, **kwargs).double().eval()
    # random batch-norm statistics, so exits disagree and confidences spread
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


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
    EarlyExitRunner(model, [-float("inf"), 0, 0], costs=[1, 2, 3])(x)  # everyone exits at exit 1
    assert seen == [("stage0", 16)]
    with torch.no_grad():
        conf = CONFIDENCE["max_prob"](torch.stack(model(x), 1))
    seen.clear()
    t = [conf[:, 0].median().item(), -float("inf"), 0.0]  # half leave at exit 1, the rest at exit 2
    result = EarlyExitRunner(model, t, costs=[1, 2, 3])(x)
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
    runner = EarlyExitRunner(model, thresholds, costs=[1, 2, 3], fold_batchnorm=False)
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
