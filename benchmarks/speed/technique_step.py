"""What does each training technique cost? Per training step, and in the deploy network's MACs and parameters.

    python benchmarks/speed/technique_step.py [--threads 2] [--repeats 7] [--smoke]

A 4-exit CIFAR-style MSDNet (random weights: only timing matters), batch 64 at 32x32, 100 classes, CPU, SGD. Each
technique's step is what the training loop runs with it on: every technique's ``before_step`` (L2W's meta update:
a virtual step with second-order autograd on half the batch, the meta loss on the other half, Adam on the weight
net), the forward, the loss terms, backward and the optimizer step; it is timed back to back against the plain
step (the exit cross-entropy alone) in one process, both from the same weights. The deploy cost is the deploy
network's (``build_model``: IMTA's links and ZTW's cascading connections and ensembles stay; SiLa's twins and the
training-only parts go) MACs at the last exit and its parameters, against the plain network's. ZTW's second
stage (the ensembles) is a run of its own from a trained first stage, so only its deploy cost is counted here.
Writes benchmarks/results/technique_step.{json,md} (``--smoke``: 3 exits, batch 8, 1 repeat, under
``--results-dir`` only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import (
    RESULTS_DIR,
    command_line,
    environment,
    header,
    paired_ratio,
    paired_times,
    run_seconds,
    write_results,
)
from dynsila.budget.flops import exit_costs
from dynsila.config import Config, load_config
from dynsila.methods.losses import ensemble_loss_terms
from dynsila.methods.technique import TECHNIQUES, Networks, Step, network_configs, prepare_network
from dynsila.optim import build_optimizer
from dynsila.runs.rundir import build_model

MODEL = ["model.name=msdnet", "model.stem=cifar", "model.step=2", "model.base=2", "model.n_channels=8",
         "model.growth_rate=4", "model.gr_factor=[1,2,4]", "model.bn_factor=[1,2,4]"]  # fmt: skip


def training_step(cfg: Config, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One optimizer step of a freshly seeded network as ``cfg`` prepares it (every technique's hooks)."""
    torch.manual_seed(0)
    networks = Networks([prepare_network(build_model(c), c).train() for _, c in network_configs(cfg)])  # DML: peers
    optimizer = build_optimizer(cfg.train, networks)

    def step() -> None:
        for technique in TECHNIQUES:
            technique.before_step(Step(networks, images, labels, cfg, cfg.train.lr))
        optimizer.zero_grad(set_to_none=True)
        terms = ensemble_loss_terms(networks(images), labels, cfg)
        torch.stack(list(terms.values())).sum().backward()
        optimizer.step()

    return step


# name -> the overrides that switch it on (beside sila.enabled=false unless it is SiLa); None: no training step
TECHNIQUES_TIMED: dict[str, tuple[list[str], bool]] = {
    "SiLa (MLP twin)": (["sila.enabled=true", "sila.head=mlp", "sila.attach=features", "sila.softmax=separate"], True),
    "self-distillation": (["loss.self_distill=1.0"], True),
    "DML (2 peers)": (["dml.peers=2"], True),
    "gradient equilibrium": (["ge.enabled=true"], True),
    "IMTA": (["imta.enabled=true"], True),
    "L2W-DEN": (["l2w.enabled=true"], True),
    "ZTW, cascading (stage 1)": (["ztw.enabled=true"], True),
    "ZTW, + ensembles (stage 2)": (["ztw.enabled=true", "ztw.stage=ensemble"], False),
}


def deploy_cost(cfg: Config) -> tuple[int, int]:
    """The deploy network's MACs at its last exit (cumulative, as evaluated) and its parameters."""
    model = build_model(cfg).eval()
    last = exit_costs(model, (3, 32, 32))[-1]
    return last.macs_cumulative, last.params_cumulative


def measure(name: str, common: list[str], plain: Callable[[], None], images, labels, repeats: int) -> dict:
    overrides, trains = TECHNIQUES_TIMED[name]
    sila = overrides[0].startswith("sila.")
    cfg = load_config(None, [*common, *([] if sila else ["sila.enabled=false"]), *overrides])
    macs, params = deploy_cost(cfg)
    row: dict = {"technique": name, "overrides": overrides, "deploy_macs": macs, "deploy_params": params}
    if trains:
        step = training_step(cfg, images, labels)
        row["step_time_ratio"] = paired_ratio(step, plain, repeats=repeats, warmup=1)
        row["seconds"] = sorted(paired_times(step, plain, repeats=repeats, warmup=0)[0])[repeats // 2]
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    exits, batch, repeats = (3, 8, 1) if args.smoke else (4, 64, args.repeats)  # 3: ZTW links one pair of ICs
    common = [*MODEL, f"model.n_blocks={exits}", "data.num_classes=100", "data.image_size=32"]
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 100, (batch,), generator=g)
    plain_cfg = load_config(None, [*common, "sila.enabled=false"])
    plain = training_step(plain_cfg, images, labels)
    plain_macs, plain_params = deploy_cost(plain_cfg)
    plain()  # warm-up
    plain_seconds = statistics.median(run_seconds(plain, "cpu") for _ in range(repeats))
    rows = [measure(name, common, plain, images, labels, repeats) for name in TECHNIQUES_TIMED]
    load = {"start": load_start, "end": os.getloadavg()[0]}
    command, env = command_line(__file__, argv), environment(threads=args.threads)
    payload = {"command": command, "environment": env, "exits": exits, "batch": batch, "repeats": repeats,
               "plain": {"deploy_macs": plain_macs, "deploy_params": plain_params, "seconds": plain_seconds},
               "rows": rows, "load_average_1min": load}  # fmt: skip
    text = "\n".join(report_lines(payload, args.threads))
    write_results("technique_step", payload, text, args.results_dir)
    print(text)
    return 0


def report_lines(payload: dict, threads: int) -> list[str]:
    plain, load = payload["plain"], payload["load_average_1min"]

    def step(r: dict) -> str:
        return f"{r['step_time_ratio']:.2f}x ({r['seconds']:.4f} s)" if "step_time_ratio" in r else "not timed"

    body = [f"| {r['technique']} | {step(r)} | {r['deploy_macs'] / plain['deploy_macs']:.4f} "
            f"| {r['deploy_params'] / plain['deploy_params']:.4f} |" for r in payload["rows"]]  # fmt: skip
    return [
        *header("What each training technique costs", payload["command"], payload["environment"]),
        f"1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the end ({threads} threads "
        "timed; a load above that means other work shared the cores).",
        "",
        f"MSDNet, {payload['exits']} exits, batch {payload['batch']} at 32x32, 100 classes; step time: median of "
        f"{payload['repeats']} back-to-back pairs with the plain step ({plain['seconds']:.4f} s); deploy cost: the "
        f"deploy network's last-exit MACs and parameters over the plain network's ({plain['deploy_macs']:,} MACs, "
        f"{plain['deploy_params']:,} parameters).",
        "",
        "| technique | training step vs plain | deploy MACs vs plain | deploy parameters vs plain |",
        "| --- | --- | --- | --- |",
        *body,
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
