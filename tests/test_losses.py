"""Loss composition: ce_weight, the twin-agreement monitor, and the config ranges of the loss keys."""

import pytest
import torch
import torch.nn.functional as F

from dynsila.config import Config, LossConfig, load_config
from dynsila.errors import ConfigError
from dynsila.methods.losses import ensemble_loss_terms, ensemble_monitor_terms, loss_terms
from dynsila.methods.sila import SiLaConfig, SiLaOutput


def _logits(seed: int, exits: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(6, 4, requires_grad=True) for _ in range(exits)]


def test_ce_weight_scales_the_exit_cross_entropy_and_its_gradient_exactly():
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    plain, scaled = _logits(0), _logits(0)
    ce_1 = loss_terms(plain, y, Config(loss=LossConfig(exit_weights=[1.0, 0.5, 2.0])))["ce"]
    ce_3 = loss_terms(scaled, y, Config(loss=LossConfig(exit_weights=[1.0, 0.5, 2.0], ce_weight=3.0)))["ce"]
    expected = sum(w * F.cross_entropy(z, y) for w, z in zip([1.0, 0.5, 2.0], plain, strict=True))
    assert ce_1.item() == pytest.approx(expected.item(), rel=1e-6)
    assert ce_3.item() == pytest.approx(3.0 * ce_1.item(), rel=1e-6)
    ce_1.backward()
    ce_3.backward()
    for a, b in zip(plain, scaled, strict=True):
        assert torch.allclose(b.grad, 3.0 * a.grad, rtol=1e-6, atol=0)
        assert a.grad.abs().sum() > 0


def test_ce_weight_leaves_the_twin_term_alone():
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    output = SiLaOutput(_logits(0, 2), _logits(1, 2))
    base = loss_terms(output, y, Config())
    scaled = loss_terms(output, y, Config(loss=LossConfig(ce_weight=0.0)))
    assert scaled["ce"].item() == 0.0 and base["ce"].item() > 0
    assert scaled["sila"].item() == pytest.approx(base["sila"].item(), rel=1e-7)


@pytest.mark.parametrize(
    "override", ["loss.ce_weight=-0.5", "loss.self_distill=-1", "loss.distill_temperature=0", "sila.softmax=joint2"]
)
def test_bad_loss_keys_stop_with_one_line(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_monitor_reports_the_twin_gap_and_agreement_per_exit():
    z = [torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])]
    z_twin = [torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)]
    monitor = ensemble_monitor_terms([SiLaOutput(z, z_twin)], torch.tensor([0, 1]), Config())
    assert set(monitor) == {"twin_gap_e0", "twin_rel_gap_e0", "twin_agree_e0"}
    assert monitor["twin_gap_e0"].item() == pytest.approx(5.0 / 6)  # |diffs| 0,1,0,0,1,3 over 6 entries
    assert monitor["twin_rel_gap_e0"].item() == pytest.approx((5.0 / 6) / (3.0 / 6))
    assert monitor["twin_agree_e0"].item() == pytest.approx(0.5)  # sample 0 agrees (class 0), sample 1 does not
    assert all(not v.requires_grad and v.dim() == 0 for v in monitor.values())  # logged, never minimised


def test_monitor_averages_sila_peers_and_ignores_plain_outputs():
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    a, b = SiLaOutput(_logits(0, 2), _logits(1, 2)), SiLaOutput(_logits(2, 2), _logits(3, 2))
    both = ensemble_monitor_terms([a, b], y, Config())
    each = [ensemble_monitor_terms([o], y, Config()) for o in (a, b)]
    for name in ("twin_gap_e1", "twin_agree_e0"):
        assert both[name].item() == pytest.approx((each[0][name].item() + each[1][name].item()) / 2, rel=1e-6)
    assert ensemble_monitor_terms([_logits(0)], y, Config()) == {}


def test_joint_only_in_an_ensemble_has_no_ce_term():
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    outputs = [SiLaOutput(_logits(0, 2), _logits(1, 2)), SiLaOutput(_logits(2, 2), _logits(3, 2))]
    cfg = load_config(None, ["sila.softmax=joint_only", "dml.peers=2"])
    assert set(ensemble_loss_terms(outputs, y, cfg)) == {"joint_ce", "dml"}
    joint = Config().with_section(SiLaConfig(softmax="joint"))
    assert set(ensemble_loss_terms(outputs, y, joint)) == {"ce", "sila", "dml"}
