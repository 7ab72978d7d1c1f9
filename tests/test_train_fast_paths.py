"""The training step's fast paths: statistics and the NaN check on the device, data on the device,
and compiled steps. Everything runs on the CPU here; the CUDA-only check is skipped without a GPU."""

import json
import os

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import dynsila.training.train as training
from dynsila import distributed
from dynsila.config import DataConfig, load_config
from dynsila.data import ArrayDataset, DeviceBatches, build_splits, normalize, random_crop_flip
from dynsila.errors import ConfigError, TrainingError
from dynsila.evaluation.epoch_sums import first_nonfinite
from dynsila.runs.checkpoint import load_checkpoint
from dynsila.training.train import build_run, epoch_batches, new_epoch_sums, train, train_step
from tests.test_distributed import torchrun

RUN_SLOW = os.environ.get("DYNSILA_SLOW") == "1"


def rows_of(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("seconds", "img_per_s")} for row in rows]


# --- statistics and the non-finite check on the device --------------------------------------------------------


def poison(monkeypatch, at_call: int, term: str, value: float) -> dict[str, int]:
    """Make loss term ``term`` equal ``value`` in the ``at_call``-th micro-batch (1-based); returns the counter."""
    calls = {"n": 0}
    real = training.ensemble_loss_terms

    def poisoned(outputs, labels, cfg):
        terms = real(outputs, labels, cfg)
        calls["n"] += 1
        if calls["n"] == at_call:
            terms[term] = terms[term] * 0 + value
        return terms

    monkeypatch.setattr(training, "ensemble_loss_terms", poisoned)
    return calls


def test_nan_names_the_step_it_happened_at_although_the_check_lags(tiny_config, monkeypatch):
    calls = poison(monkeypatch, at_call=3, term="sila", value=float("nan"))
    cfg = load_config(tiny_config(), ["train.log_every=5"])  # 8 steps per epoch: checks after steps 5 and 8
    with pytest.raises(TrainingError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("loss term 'sila' is nan at epoch 1 step 3 (seen at step 5: the check runs every ")
    assert "no checkpoint yet" in message and "\n" not in message
    assert calls["n"] == 5  # the run went on to the check, and no further
    assert not (cfg.run_dir / "last.pt").exists()


def test_inf_late_in_an_epoch_stops_before_that_epoch_is_saved(tiny_config, monkeypatch):
    path = tiny_config()
    train(load_config(path))
    last = load_config(path).run_dir / "last.pt"
    before = last.read_bytes()
    poison(monkeypatch, at_call=7, term="ce", value=float("inf"))  # epoch 2, step 7 of 8
    with pytest.raises(TrainingError) as err:
        train(load_config(path, ["resume=true", "train.epochs=2", "train.log_every=5"]))
    assert "loss term 'ce' is inf at epoch 2 step 7 (seen at step 8" in str(err.value)
    assert "last good checkpoint kept" in str(err.value)
    assert last.read_bytes() == before


def test_first_nonfinite_keeps_the_first_bad_step_and_prefers_a_term():
    record = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)
    nan, inf = float("nan"), float("inf")
    record = first_nonfinite(record, torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64), step=0)
    assert record.tolist() == [-1.0, 0.0, 0.0]
    record = first_nonfinite(record, torch.tensor([nan, 1.0, nan], dtype=torch.float64), step=4)
    assert record[:2].tolist() == [4.0, 2.0] and record[2].isnan()  # the term, not the total
    record = first_nonfinite(record, torch.tensor([inf, inf, 1.0], dtype=torch.float64), step=5)
    assert record[:2].tolist() == [4.0, 2.0]  # the first bad step stays
    total_only = first_nonfinite(torch.tensor([-1.0, 0.0, 0.0]), torch.tensor([inf, 1e38, 1e38]), step=2)
    assert total_only.tolist() == [2.0, 0.0, inf]  # finite terms whose sum overflowed: the total is named


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def test_a_training_step_never_reads_a_tensor_on_the_host(tiny_config, monkeypatch):
    # CPU stand-in for CUDA's sync check: any host read of a tensor inside the step raises
    cfg = load_config(tiny_config(), ["dml.peers=2", "train.accumulate_steps=2", "loss.self_distill=0.5"])
    run = build_run(cfg, distributed.setup("cpu"), resuming=False)
    sums = new_epoch_sums(run)
    images, labels = next(iter(epoch_batches(run, 0)))
    x = normalize(images, run.splits.mean, run.splits.std)
    train_step(run, x, labels, 0, sums)  # the optimizer creates its state on the first step

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host inside a training step")

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, host_read)
        train_step(run, x, labels, 1, sums)
    assert sums.seen == 2 * len(labels) and sums.names[:2] == ["loss", "ce"]
    assert float(sums.hits[0].sum()) > 0 and sums.nonfinite[0] == -1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_a_cuda_training_step_does_not_synchronise(tiny_config):
    cfg = load_config(tiny_config(), ["train.device=cuda", "data.on_device=true", "train.amp=bf16"])
    run = build_run(cfg, distributed.setup("cuda"), resuming=False)
    sums = new_epoch_sums(run)
    batches = iter(epoch_batches(run, 0))
    for step in range(3):
        images, labels = next(batches)
        x = normalize(images, run.splits.mean, run.splits.std)
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(run, x, labels, step, sums)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# --- data on the device ---------------------------------------------------------------------------------------


def test_random_crop_flip_equals_torchvision_per_sample():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 10, 12), dtype=torch.uint8, generator=gen)  # not square on purpose
    offsets = torch.randint(0, 5, (7, 2), generator=gen)
    flips = torch.tensor([True, False, True, True, False, False, True])
    out = random_crop_flip(images, offsets, flips, pad=2)
    for i in range(7):
        top, left = offsets[i].tolist()
        expected = TF.crop(TF.pad(images[i], [2], fill=0), top, left, 10, 12)
        if flips[i]:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(out[i], expected), i


def indexed_dataset(n: int, width: int = 8) -> ArrayDataset:
    """Images whose pixel (0, 0, 0) is the sample's index and whose columns rise left to right (10, 20, ...)."""
    images = (10 * (1 + torch.arange(width))).to(torch.uint8).expand(n, 3, width, width).clone()
    images[:, 0, 0, 0] = torch.arange(n).to(torch.uint8)
    return ArrayDataset(images, torch.arange(n) % 3)


def ids_of(batches) -> list[int]:
    return [int(i) for images, _ in batches for i in images[:, 0, 0, 0]]


def test_device_batches_are_a_function_of_the_seed_and_shard_like_distributed_sampler():
    data, cfg = indexed_dataset(50), DataConfig(name="npz", augment="none")
    one = DeviceBatches(data, cfg, 8, torch.device("cpu"))
    assert len(one) == 6
    first = ids_of(one.epoch(seed=7))
    assert first == ids_of(DeviceBatches(data, cfg, 8, torch.device("cpu")).epoch(seed=7))
    assert first != ids_of(one.epoch(seed=8))
    assert len(first) == 48 and len(set(first)) == 48  # each sample at most once; the last partial batch dropped
    labels = torch.cat([y for _, y in one.epoch(seed=7)])
    assert torch.equal(labels, torch.tensor(first) % 3)  # labels travel with their images
    shards = [ids_of(DeviceBatches(data, cfg, 8, torch.device("cpu"), rank=r, world_size=2).epoch(7)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 24 and not set(shards[0]) & set(shards[1])


def column_order(images: torch.Tensor) -> set[str]:
    """'rising' / 'falling' per image from the non-padding columns of channel 1 (row 4)."""
    orders = set()
    for row in images[:, 1, 4].tolist():
        values = [v for v in row if v]
        orders.add("rising" if values == sorted(values) else "falling" if values == sorted(values)[::-1] else "?")
    return orders


@pytest.mark.parametrize(("augment", "orders"), [("crop", {"rising"}), ("crop_flip", {"rising", "falling"})])
def test_device_augmentation_crops_always_and_flips_only_when_asked(augment, orders):
    batches = DeviceBatches(indexed_dataset(64), DataConfig(name="npz", augment=augment), 64, torch.device("cpu"))
    images = next(iter(batches.epoch(seed=1)))[0]
    assert column_order(images) == orders
    shifted = (images[:, 1] == 0).any(dim=(1, 2))  # zero padding came into view
    assert 0 < int(shifted.sum()) < 64


def test_digits_on_device_uses_the_digits_augmentation():
    splits = build_splits(DataConfig(name="digits", image_size=8, val_size=0.2))
    batches = DeviceBatches(splits.train, DataConfig(name="digits"), 64, torch.device("cpu"))
    assert (batches.crop, batches.flip, batches.pad) == (True, False, 1)  # crop, never a mirrored digit


def test_on_device_resume_equals_an_uninterrupted_run(tiny_config, monkeypatch):
    epochs_drawn = []
    real_epoch = DeviceBatches.epoch

    def recorded_epoch(self, seed):
        epochs_drawn.append(seed)
        return real_epoch(self, seed)

    monkeypatch.setattr(DeviceBatches, "epoch", recorded_epoch)
    common = ["data.on_device=true", "train.schedule=constant", "train.log_every=3"]
    straight = train(load_config(tiny_config("straight"), [*common, "train.epochs=2"]))
    assert epochs_drawn == [0, 1]  # seed 0: seed * 100003 + epoch
    train(load_config(tiny_config("resumed"), [*common, "train.epochs=1"]))
    resumed = train(load_config(tiny_config("resumed"), [*common, "train.epochs=2", "resume=true"]))
    assert rows_of(resumed.run_dir) == rows_of(straight.run_dir)
    a, b = (load_checkpoint(r.run_dir / "last.pt")["model"] for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_device_refuses_what_it_cannot_hold_or_augment(tiny_config):
    with pytest.raises(ConfigError, match="data.on_device augments with none, crop or crop_flip, not data.augment"):
        train(load_config(tiny_config(), ["data.on_device=true", "data.augment=rrc_flip"]))
    assert not load_config(tiny_config()).run_dir.exists()  # stopped before anything was written
    folder_like = torch.utils.data.TensorDataset(torch.zeros(2, 3, 4, 4))  # not in memory as uint8 arrays
    with pytest.raises(ConfigError, match="data.on_device needs an in-memory dataset"):
        DeviceBatches(folder_like, DataConfig(name="imagefolder"), 2, torch.device("cpu"))


def test_two_processes_on_device_match_one_with_two_micro_batches_augmentation_on(tiny_config):
    # every rank makes the same draws and takes a strided shard, so even augmented batches agree (unlike the
    # DataLoader path, where each process draws its own crops); tests/test_distributed.py explains the setup
    common = ["data.on_device=true", "data.batch_size=64", "train.epochs=2", "train.eval_test_every_epoch=false"]
    two = torchrun(2, tiny_config("dev2"), *common, "train.log_every=4")
    assert two.returncode == 0, two.stderr[-2000:]
    one = torchrun(1, tiny_config("dev1"), *common, "train.accumulate_steps=2")
    assert one.returncode == 0, one.stderr[-2000:]
    runs = tiny_config("x").parent / "runs"
    for a, b in zip(rows_of(runs / "dev2"), rows_of(runs / "dev1"), strict=True):
        for term in ("loss", "ce", "sila"):
            assert a[term] == pytest.approx(b[term], abs=1e-5, rel=1e-5), term
    w2, w1 = (load_checkpoint(runs / name / "last.pt")["model"] for name in ("dev2", "dev1"))
    learned = [k for k in w1 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4) for k in learned)


# --- compiled steps -------------------------------------------------------------------------------------------


def test_compile_flag_compiles_the_step(tiny_config, monkeypatch):
    # dynamo traces the real step; the "eager" backend skips inductor's C++ build (minutes on this CPU)
    compiled = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, backend="eager", fullgraph=True)  # fullgraph: a graph break fails the test

    monkeypatch.setattr(torch, "compile", eager_compile)
    with_compile = train(load_config(tiny_config("compiled"), ["train.compile=true"]))
    assert compiled == [training.forward_and_statistics]
    plain = train(load_config(tiny_config("plain")))
    for a, b in zip(rows_of(with_compile.run_dir), rows_of(plain.run_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["val_top1"] == pytest.approx(b["val_top1"])


@pytest.mark.slow
@pytest.mark.skipif(not RUN_SLOW, reason="inductor's C++ compile of the step takes ~3 min on this CPU; DYNSILA_SLOW=1")
def test_compile_with_inductor_trains_like_eager(tiny_config):
    compiled = train(load_config(tiny_config("inductor"), ["train.compile=true"]))
    plain = train(load_config(tiny_config("plain")))
    for a, b in zip(rows_of(compiled.run_dir), rows_of(plain.run_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
