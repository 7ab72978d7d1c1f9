"""SkipNet's gate policy stays float32 under autocast: a confident gate keeps its probability below 1, can still
sample a skip, and gets a policy gradient in the hybrid RL stage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynsila import models
from dynsila.methods.hrl import hrl_policy_loss

CONFIDENT = 0.999  # bf16 rounds it to exactly 1.0


def confident_skipnet(gate: str) -> models.MultiExitNetwork:
    """SkipNet-20 whose every gate says 'run' with probability 0.999, whatever its input."""
    torch.manual_seed(0)
    net = models.build("skipnet", num_classes=10, depth=20, gate=gate, stem="cifar")
    logit = math.log(CONFIDENT / (1 - CONFIDENT))
    with torch.no_grad():
        if gate == "rnn":
            net.controller.proj.weight.zero_()
            net.controller.proj.bias.fill_(logit)
        else:
            for g in net.body.gates:
                g.logits.weight.zero_()
                g.logits.bias.copy_(torch.tensor([0.0, logit]))
    return net


def test_bf16_rounds_the_confident_probability_to_one():
    """The failure the float32 policy prevents (so the tests below can fail)."""
    assert torch.tensor(CONFIDENT).bfloat16().item() == 1.0
    assert torch.sigmoid(torch.tensor(6.9, dtype=torch.bfloat16)).item() == 1.0


@pytest.mark.parametrize("gate", ["rnn", "ffgate1", "ffgate2"])
def test_gate_probabilities_stay_float32_under_bf16_autocast(gate):
    net = confident_skipnet(gate).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = net(torch.randn(4, 3, 8, 8))
    assert out.logits[-1].dtype == torch.bfloat16  # the network itself runs in bf16
    probs = torch.stack(out.gate_probs)
    assert probs.dtype == torch.float32
    assert torch.allclose(probs, torch.full_like(probs, CONFIDENT), atol=1e-6) and bool((probs < 1).all())


@pytest.mark.parametrize("gate", ["rnn", "ffgate2"])
def test_hrl_policy_gradient_reaches_a_confident_gate_under_bf16_autocast(gate):
    net = confident_skipnet(gate).train()
    net.body.gate_mode = "sample"
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        task = F.cross_entropy(out.logits[-1].float(), y, reduction="none")
        probs, actions = torch.stack(out.gate_probs, 1), torch.stack(out.gate_actions, 1)
        loss = hrl_policy_loss(probs, actions, task, alpha=0.1, rl_weight=0.01, batch_size=8)
    assert out.action_log_prob is not None and out.action_log_prob.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    head = net.controller.proj.bias if gate == "rnn" else net.body.gates[0].logits.bias
    assert head.grad is not None and bool(head.grad.abs().sum() > 0)
