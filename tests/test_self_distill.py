"""Self-distillation: the last exit teaches the earlier ones, and receives no gradient for it."""

import math

import pytest
import torch

from dynsila import models
from dynsila.config import Config, LossConfig
from dynsila.methods.losses import ensemble_loss_terms, loss_terms
from dynsila.methods.self_distill import SelfDistillConfig, self_distillation_loss
from dynsila.methods.sila import SiLa, SiLaConfig


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def _hand_kl(teacher: list[list[float]], student: list[list[float]], t: float) -> float:
    """Batch mean of sum_c p_c log(p_c / q_c), p = softmax(teacher / t), q = softmax(student / t)."""
    total = 0.0
    for row_t, row_s in zip(teacher, student, strict=True):
        p, q = _softmax(row_t, t), _softmax(row_s, t)
        total += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q, strict=True))
    return total / len(teacher)


def test_value_matches_a_hand_computation():
    z0 = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
    z1 = [[0.2, 0.4, 0.0], [-1.0, 1.0, 0.0]]
    z2 = [[3.0, -1.0, 0.5], [0.0, 0.0, 1.0]]  # the teacher
    t, weights = 3.0, [0.5, 2.0, 7.0]  # w_K (7) weights no term: the last exit is not a student
    got = self_distillation_loss([torch.tensor(z) for z in (z0, z1, z2)], weights, t)
    expected = t * t * (0.5 * _hand_kl(z2, z0, t) + 2.0 * _hand_kl(z2, z1, t))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # and through loss_terms, scaled by loss.self_distill
    cfg = Config(loss=LossConfig(exit_weights=weights)).with_section(SelfDistillConfig(0.25, t))
    terms = loss_terms([torch.tensor(z) for z in (z0, z1, z2)], torch.tensor([0, 2]), cfg)
    assert terms["self_distill"].item() == pytest.approx(0.25 * expected, rel=1e-5)


def test_gradient_reaches_the_students_and_not_the_teacher_logits():
    torch.manual_seed(0)
    logits = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    self_distillation_loss(logits, [1.0, 1.0, 1.0], 4.0).backward()
    assert logits[-1].grad is None
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in logits[:-1])


def test_gradient_does_not_reach_the_teacher_exit_of_a_network(tiny_model_kwargs):
    torch.manual_seed(0)
    model = models.build("msdnet", num_classes=10, **tiny_model_kwargs)
    cfg = Config().with_section(SelfDistillConfig(self_distill=1.0))
    terms = loss_terms(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]), cfg)
    terms["self_distill"].backward()
    teacher_grads = [p.grad for p in model.exits[-1].parameters()]
    assert all(g is None or not g.any() for g in teacher_grads)
    for student in model.exits[:-1]:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    stem_grad = model.stem.scales[0][0].weight.grad  # the shared trunk learns through the students
    assert stem_grad is not None and stem_grad.abs().sum() > 0


def test_off_by_default_and_absent_for_one_exit():
    logits = [torch.randn(4, 5) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3])
    assert "self_distill" not in loss_terms(logits, y, Config())
    assert "self_distill" not in loss_terms(logits[:1], y, Config().with_section(SelfDistillConfig(self_distill=1.0)))


def test_composes_with_sila_and_with_dml_peers(tiny_model_kwargs):
    torch.manual_seed(0)
    peers = [SiLa(models.build("msdnet", num_classes=10, **tiny_model_kwargs), SiLaConfig()) for _ in range(2)]
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    outputs = [peer(x) for peer in peers]
    cfg = Config().with_section(SelfDistillConfig(self_distill=0.5, distill_temperature=2.0))
    terms = ensemble_loss_terms(outputs, y, cfg)
    assert {"ce", "sila", "dml", "self_distill"} <= set(terms)
    # each peer distils its own main exits (not the twins, not the other peer's last exit)
    own = sum(0.5 * self_distillation_loss(o.logits, [1.0, 1.0, 1.0], 2.0) for o in outputs)
    assert terms["self_distill"].item() == pytest.approx(own.item(), rel=1e-6)
