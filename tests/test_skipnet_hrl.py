"""SkipNet trained as its authors train it: the HRL reward, the computation %, the initialisation, the presets."""

from __future__ import annotations

from dataclasses import astuple
from pathlib import Path

import pytest
import torch

from dynsila import models
from dynsila.config import load_config
from dynsila.errors import ConfigError
from dynsila.methods.hrl import (
    Baseline,
    GateLossConfig,
    GateStageConfig,
    action_log_probs,
    hrl_policy_loss,
    reward_to_go,
    skip_rewards,
)
from dynsila.models.skipnet import BasicBlock, SkipNet, skipnet_computation_percent
from dynsila.optim import learning_rate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A 3-gate toy: two samples, alpha = 0.3 (0.1 per skip), per-sample cross-entropy 0.5 and 1.0.
ACTIONS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # 1 = run the block, 0 = skip it
CE = torch.tensor([0.5, 1.0])
# by hand: sample 1 skips gates 2 and 3, so R = -0.5 + [0.2, 0.2, 0.1]; sample 2 skips gate 1 only
HAND_RETURNS = torch.tensor([[-0.3, -0.3, -0.4], [-0.9, -1.0, -1.0]])


def test_reward_to_go_on_a_three_gate_toy():
    step = skip_rewards(ACTIONS, alpha=0.3)
    assert torch.allclose(step, torch.tensor([[0.0, 0.1, 0.1], [0.1, 0.0, 0.0]]))
    assert torch.allclose(reward_to_go(step, -CE), HAND_RETURNS)


def policy_gradient(rl_weight: float, baseline: Baseline = "none", batch_size: int = 2) -> torch.Tensor:
    """d loss / d gate logit for the toy, gate probabilities sigmoid(logits)."""
    logits = torch.tensor([[0.2, -0.4, 0.1], [1.0, 0.3, -0.6]], requires_grad=True)
    loss = hrl_policy_loss(torch.sigmoid(logits), ACTIONS, CE, 0.3, rl_weight, batch_size, baseline)
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def test_policy_gradient_matches_the_hand_computation():
    logits = torch.tensor([[0.2, -0.4, 0.1], [1.0, 0.3, -0.6]])
    p = torch.sigmoid(logits)
    # REINFORCE summed over the batch: d/dz [-w R log pi(a)] = -w R (a - p) for a Bernoulli(sigmoid(z)) policy
    hand = -0.01 * HAND_RETURNS * (ACTIONS - p)
    assert torch.allclose(policy_gradient(0.01), hand, atol=1e-7)
    assert torch.allclose(policy_gradient(0.05), 5 * hand, atol=1e-7)  # rl_weight scales the term linearly
    centred = HAND_RETURNS - HAND_RETURNS.mean(dim=0)
    assert torch.allclose(policy_gradient(0.01, "batch_mean"), -0.01 * centred * (ACTIONS - p), atol=1e-7)


def test_the_term_is_summed_over_the_global_batch_whatever_the_split():
    torch.manual_seed(0)
    probs = torch.rand(8, 5, requires_grad=True)
    actions = torch.bernoulli(torch.full((8, 5), 0.5))
    ce = torch.rand(8)
    whole = hrl_policy_loss(probs, actions, ce, 0.1, 0.01, batch_size=8)
    halves = sum(hrl_policy_loss(probs[i::2], actions[i::2], ce[i::2], 0.1, 0.01, batch_size=8) for i in range(2))
    assert torch.allclose(whole, halves / 2)  # two micro-batches (or DDP ranks) average to the full-batch term
    per_sample = -(reward_to_go(skip_rewards(actions, 0.1), -ce) * action_log_probs(probs, actions)).sum()
    assert torch.allclose(whole, 0.01 * per_sample)


def test_the_skip_reward_teaches_gates_to_skip():
    torch.manual_seed(0)
    logits = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=0.5)
    for _ in range(200):
        probs = torch.sigmoid(logits).expand(64, -1)
        actions = torch.bernoulli(probs.detach())
        loss = hrl_policy_loss(probs, actions, torch.ones(64), alpha=1.0, rl_weight=0.01, batch_size=64)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.sigmoid(logits).max() < 0.3  # every gate learnt to skip for the reward alone


def test_skipnet_computation_percent_on_fixed_decisions():
    executed = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # gate shares run: 0.5, 0, 1
    assert skipnet_computation_percent(executed) == pytest.approx((0.5 + 0 + 1 + 1) / 4 * 100)
    assert skipnet_computation_percent(torch.ones(5, 53)) == pytest.approx(100.0)
    assert skipnet_computation_percent(torch.zeros(5, 53)) == pytest.approx(100 / 54)  # the first block runs
    with pytest.raises(ValueError, match="N x G"):
        skipnet_computation_percent(torch.ones(3))


def test_linear_layers_start_as_in_the_reference():
    torch.manual_seed(0)
    model = SkipNet(BasicBlock, [1, 1, 1], [16, 32, 64], "rnn", "cifar", num_classes=100, hidden_dim=400)
    assert model.controller is not None
    for layer in (model.controller.proj, model.exits[0].fc):  # 400 x 1 gate projection, 64 x 100 classifier
        weight, bias = layer.weight, layer.bias
        assert weight.mean().abs() < 0.2 * weight.std()
        assert weight.std().item() == pytest.approx((2 / weight.numel()) ** 0.5, rel=0.15)
        assert bias.abs().max() <= weight.shape[1] ** -0.5 and bias.abs().max() > 0  # PyTorch's default bias
    conv = model.body.blocks[-1].conv2.weight  # convolutions keep He fan-out, N(0, sqrt(2 / (k x k x out)))
    assert conv.std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.05)


def test_constant_warm_up_then_the_schedule():
    cfg = load_config(CONFIGS / "cifar10" / "skipnet110_baseline.yaml").train
    assert (cfg.constant_warmup_steps, cfg.constant_warmup_lr) == (400, 0.01)
    steps = 351
    assert learning_rate(cfg, 0, steps) == learning_rate(cfg, 399, steps) == 0.01
    assert learning_rate(cfg, 400, steps) == pytest.approx(0.1)
    total = cfg.epochs * steps
    assert learning_rate(cfg, total // 2 + steps, steps) == pytest.approx(0.01)  # x0.1 at 32k of 64k


@pytest.mark.parametrize("twin", ["baseline", "sila"])
def test_presets_are_the_reference_schedules(twin):
    sp = load_config(CONFIGS / "cifar10" / f"skipnet110_{twin}.yaml")
    hrl = load_config(CONFIGS / "cifar10" / f"skipnet110_{twin}_hrl.yaml")
    steps = (50_000 - 5_000) // 128  # CIFAR-10 train minus the held-out validation, drop_last batches of 128
    assert sp.data.batch_size == hrl.data.batch_size == 128 and sp.data.val_size == hrl.data.val_size == 5000
    assert (
        abs(sp.train.epochs * steps - 64_000) < steps
        and sp.section(GateStageConfig).stage == "sp"
        and sp.section(GateLossConfig).gate_cost == 0
    )
    assert abs(hrl.train.epochs * steps - 10_000) < steps and hrl.section(GateStageConfig).stage == "hrl"
    assert (hrl.train.lr, hrl.train.schedule, hrl.train.init_from) == (1e-4, "constant", f"runs/{sp.name}")
    assert astuple(hrl.section(GateLossConfig))[1:] == (0.1, 0.01, "none")
    assert sp.model == hrl.model and sp.model["depth"] == 110 and sp.sila.enabled == hrl.sila.enabled


def test_hrl_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="rl_baseline"):
        load_config(None, ["loss.rl_baseline=moving_average"])
    with pytest.raises(ConfigError, match="hrl_alpha"):
        load_config(None, ["loss.hrl_alpha=-0.1"])
    assert models.build("skipnet", num_classes=10, depth=20, gate="rnn").body.gates.__len__() == 8


def test_benchmark_acceptance_reads_the_points():
    from tests.conftest import load_benchmark

    bench = load_benchmark("accuracy.skipnet_hrl")

    def point(alpha, share):
        return bench.StagePoint(
            "sp" if alpha is None else "hrl", alpha, "r", 60.0, 60.0, 50.0, share, [share], 1e6, None, None
        )

    sp = point(None, 0.8)
    assert all(c["met"] for c in bench.acceptance(sp, [point(1.0, 0.3), point(0.25, 0.6)]))
    checks = [c["met"] for c in bench.acceptance(sp, [point(0.25, 0.3), point(1.0, 0.05)])]
    assert checks == [True, False, True]  # ordered and below SP, but alpha 1 collapsed
    checks = [c["met"] for c in bench.acceptance(sp, [point(0.25, 0.9), point(1.0, 0.9)])]
    assert checks == [False, True, False]  # equal points, and above the SP model
    hrl = [point(0.1, 0.5), point(0.25, 0.3), point(0.5, 0.0), point(1.0, 0.0)]
    assert bench.passing_pairs(sp, hrl) == [(0.1, 0.25)]  # 0.5 and 1 collapsed


def test_the_evaluator_reports_skipnet_computation_percent_beside_the_block_share():
    from dynsila.budget.flops import gated_costs
    from dynsila.evaluation.evaluate import GatedPass, gated_exit

    model = models.build("skipnet", num_classes=10, depth=20, gate="rnn").eval()
    costs = gated_costs(model, (3, 8, 8))
    executed = torch.tensor([[1.0] * 8, [1.0, 0, 0, 0, 0, 0, 0, 1]])  # 8 gates; 10 of 16 decisions run
    logits, labels = torch.eye(10)[:2], torch.tensor([0, 5])
    one = GatedPass(logits, labels, executed, costs.per_sample(executed))
    row = gated_exit(model, one, one, costs)
    assert row.executed_fraction == pytest.approx(10 / 16)
    assert row.skipnet_computation_percent == pytest.approx((8 * 10 / 16 + 1) / 9 * 100)
