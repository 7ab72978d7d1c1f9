"""torchrun + DDP on CPU (gloo): two processes compute what one process computes for the same global batch.

Why the one-process side uses train.accumulate_steps=2: batch-norm normalises with the statistics of the batch a
process sees. Two DDP ranks each see half of the global batch (DistributedSampler's strided shards), so one
process on the whole batch would normalise differently and the losses could not agree. SyncBatchNorm would fix
that but has no CPU kernels. With accumulate_steps=2 the single process splits each global batch into the same
two strided shards and averages their gradients, which is exactly DDP's computation; what remains is float
rounding. Augmentation is off because each process draws its own random crops.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from dynsila.runs.checkpoint import load_checkpoint


def torchrun(nproc: int, config, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "dynsila.train",
        str(config),
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_processes_match_one_with_the_same_global_batch(tiny_config):
    common = ["data.augment=none", "data.batch_size=64", "train.epochs=2", "train.eval_test_every_epoch=false"]
    two = torchrun(2, tiny_config("ddp2"), *common)
    assert two.returncode == 0, two.stderr[-2000:]
    one = torchrun(1, tiny_config("ddp1"), *common, "train.accumulate_steps=2")
    assert one.returncode == 0, one.stderr[-2000:]
    runs = tiny_config("x").parent / "runs"
    rows = [
        [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("ddp2", "ddp1")
    ]
    for a, b in zip(*rows, strict=True):
        for term in ("loss", "ce", "sila"):
            assert a[term] == pytest.approx(b[term], abs=1e-5, rel=1e-5), term
    w2 = load_checkpoint(runs / "ddp2" / "last.pt")["model"]
    w1 = load_checkpoint(runs / "ddp1" / "last.pt")["model"]
    learned = [k for k in w1 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k in learned:  # batch-norm running statistics differ by design (DDP keeps rank 0's); weights do not
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k
    # only rank 0 wrote and printed
    assert two.stdout.count("deploy weights") == 1
    assert len(list((runs / "ddp2" / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's events only
    assert len(load_checkpoint(runs / "ddp2" / "last.pt")["rng"]) == 2  # each rank's RNG state is kept
