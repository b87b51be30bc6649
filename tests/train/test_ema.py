"""`training.ema_decay`: the moving average of the weights that a run validates,
selects, saves, checkpoints and hands to LLPR."""

import copy
import csv

import ase.io
import pytest
import torch
from helpers import emt_structures
from safetensors.torch import load_file
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from pes_calc.io import load_model
from pes_calc.train import TrainingConfigError, normalise_config, train
from pes_calc.train.data import LabelKeys, load_graphs
from pes_calc.train.ema import WeightEMA, evaluation_weights
from pes_calc.train.evaluation import measure_errors

TINY_SOAP = {
    "soap": {
        "max_angular": 1,
        "max_radial": 2,
        "cutoff": {"radius": 3.5, "width": 0.5},
    },
    "bpnn": {"num_hidden_layers": 1, "num_neurons_per_layer": 8},
    "model_dtype": "float64",
}
DECAY = 0.9


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cu-ema")
    ase.io.write(folder / "train.xyz", emt_structures(8, seed=0), format="extxyz")
    ase.io.write(folder / "val.xyz", emt_structures(3, seed=1), format="extxyz")
    return folder


def config(data, epochs=4, **training):
    return {
        "seed": 3,
        "data": {"train": str(data / "train.xyz"), "val": str(data / "val.xyz")},
        "architecture": {
            "name": "soap_bpnn",
            "model": TINY_SOAP,
            "training": {
                "batch_size": 3,
                "num_epochs": epochs,
                "learning_rate": 2e-2,
                "loss": {"energy": 1.0, "forces": 1.0, "stress": 1.0},
                **training,
            },
        },
    }


def log_rows(outdir):
    with open(outdir / "train.csv") as handle:
        return list(csv.DictReader(handle))


def hand_ema(snapshots, decay):
    """The averages after each step, computed from the weights after each step
    (snapshots[0]: before the first)."""
    averages = [[w.clone() for w in snapshots[0]]]
    for k, weights in enumerate(snapshots[1:], start=1):
        d = min(decay, (1 + k) / (10 + k))
        averages.append(
            [d * a + (1 - d) * w for a, w in zip(averages[-1], weights, strict=True)]
        )
    return averages


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2, dtype=torch.float64)
        self.frozen = nn.Parameter(torch.ones(2, dtype=torch.float64))
        self.frozen.requires_grad_(False)
        self.register_buffer("table", torch.arange(3.0, dtype=torch.float64))


def test_weight_ema_follows_the_warm_up_formula_and_swaps_back_exactly():
    torch.manual_seed(0)
    model = Tiny()
    ema = WeightEMA(model, 0.5)
    assert set(ema.averages) == {"linear.weight", "linear.bias"}  # not frozen
    snapshots = [[p.detach().clone() for p in model.linear.parameters()]]
    for _ in range(4):
        with torch.no_grad():
            for p in model.linear.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        snapshots.append([p.detach().clone() for p in model.linear.parameters()])
    expected = hand_ema(snapshots, 0.5)[-1]
    assert [ema.decay_at(k) for k in (1, 2, 8, 20)] == [2 / 11, 3 / 12, 0.5, 0.5]
    for name, value in zip(("linear.weight", "linear.bias"), expected, strict=True):
        torch.testing.assert_close(ema.averages[name], value, rtol=1e-14, atol=0)

    trained = copy.deepcopy(model.state_dict())
    with ema.applied():
        assert torch.equal(model.linear.weight, ema.averages["linear.weight"])
        assert torch.equal(model.table, trained["table"])
        assert torch.equal(model.frozen, trained["frozen"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    with evaluation_weights(None):  # no averaging: the trained weights
        assert torch.equal(model.linear.weight, trained["linear.weight"])

    again = WeightEMA(model, 0.5)
    again.load_state_dict(ema.state_dict())
    assert again.num_updates == 4
    for name, value in ema.averages.items():
        assert torch.equal(again.averages[name], value)
    with pytest.raises(ValueError, match="other parameters"):
        WeightEMA(nn.Linear(2, 2), 0.5).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("bad", [1.5, -0.1, "x", 0, 1, True, [0.9]])
def test_bad_ema_decay_values_are_named(data, bad):
    with pytest.raises(TrainingConfigError, match=r"ema_decay must be null .* got"):
        normalise_config(config(data, ema_decay=bad))
    for good in (None, 0.99, 0.5):
        training = normalise_config(config(data, ema_decay=good))
        assert training["architecture"]["training"]["ema_decay"] == good


@pytest.fixture(scope="module")
def ema_run(data, tmp_path_factory):
    """A run with ema_decay and the weights after every optimizer step."""
    outdir = tmp_path_factory.mktemp("ema-run")
    snapshots = []

    def before(optimizer, args, kwargs):
        if not snapshots:
            snapshots.append([p.detach().clone() for p in _parameters(optimizer)])

    def after(optimizer, args, kwargs):
        snapshots.append([p.detach().clone() for p in _parameters(optimizer)])

    handles = [
        register_optimizer_step_pre_hook(before),
        register_optimizer_step_post_hook(after),
    ]
    try:
        result = train(config(data, ema_decay=DECAY), outdir, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    names = [n for n, p in result.model.named_parameters() if p.requires_grad]
    averages = [dict(zip(names, a, strict=True)) for a in hand_ema(snapshots, DECAY)]
    raw = [dict(zip(names, w, strict=True)) for w in snapshots]
    return result, outdir, averages, raw


def _parameters(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _with_weights(model, weights):
    model = copy.deepcopy(model)
    model.load_state_dict({**model.state_dict(), **weights})
    return model


def test_the_saved_model_is_the_moving_average_at_the_best_epoch(data, ema_run):
    result, outdir, averages, raw = ema_run
    steps_per_epoch = (len(averages) - 1) // 4
    assert steps_per_epoch * 4 == len(averages) - 1 and steps_per_epoch > 1
    best = averages[result.best_epoch * steps_per_epoch]
    saved = load_file(str(outdir / "model.safetensors"))
    for name, value in best.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            result.model.state_dict()[name], value, rtol=1e-12, atol=1e-14
        )
    # the averages are not the trained weights; the checkpoint keeps both
    checkpoint = torch.load(outdir / "checkpoint.pt", weights_only=True)
    last = len(averages) - 1
    assert checkpoint["ema"]["num_updates"] == last
    for name, value in raw[last].items():
        assert torch.equal(checkpoint["model"][name], value)
        torch.testing.assert_close(
            checkpoint["ema"]["averages"][name],
            averages[last][name],
            rtol=1e-12,
            atol=1e-14,
        )
    assert any(
        not torch.allclose(raw[last][n], averages[last][n], rtol=1e-3) for n in raw[0]
    )


def test_validation_uses_the_moving_average(data, ema_run):
    result, outdir, averages, raw = ema_run
    steps_per_epoch = (len(averages) - 1) // 4
    graphs = load_graphs(
        data / "val.xyz",
        result.model.species,
        result.model.cutoff,
        LabelKeys(),
        torch.float64,
    )
    for row in log_rows(outdir):
        step = int(row["epoch"]) * steps_per_epoch
        logged = float(row["val_forces_rmse"])
        for weights, matches in ((averages[step], True), (raw[step], False)):
            model = _with_weights(result.model, weights)
            metrics = measure_errors(model, graphs, batch_size=3).metrics()
            assert (logged == pytest.approx(metrics["forces_rmse"], rel=1e-9)) is (
                matches
            ), (row["epoch"], matches)


def test_llpr_wraps_the_averaged_weights(data, ema_run, tmp_path):
    result, outdir, _, _ = ema_run
    llpr_config = {
        "seed": 5,
        "data": config(data)["data"],
        "architecture": {
            "name": "llpr",
            "model": {"num_ensemble_members": {"energy": 2}},
            "training": {
                "model_checkpoint": str(outdir / "model.safetensors"),
                "batch_size": 3,
            },
        },
    }
    llpr = train(llpr_config, tmp_path, progress=False)
    wrapped = load_model(tmp_path / "model.safetensors").potential.state_dict()
    for name, value in result.model.state_dict().items():
        assert torch.equal(llpr.model.potential.state_dict()[name], value), name
        assert torch.equal(wrapped[name], value), name


def test_interrupted_run_with_ema_resumes_to_the_same_model(data, tmp_path):
    uninterrupted = train(config(data, ema_decay=DECAY), tmp_path / "a", progress=False)

    def interrupt(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            config(data, ema_decay=DECAY),
            tmp_path / "b",
            progress=False,
            callbacks=[interrupt],
        )
    resumed = train(config(data, ema_decay=DECAY), tmp_path / "b", progress=False)
    assert resumed.best_epoch == uninterrupted.best_epoch
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    files = [load_file(str(tmp_path / run / "model.safetensors")) for run in "ab"]
    for name, value in files[0].items():
        assert torch.equal(files[1][name], value), name
    checkpoints = [
        torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in "ab"
    ]
    for name, value in checkpoints[0]["ema"]["averages"].items():
        assert torch.equal(checkpoints[1]["ema"]["averages"][name], value), name
    a, b = log_rows(tmp_path / "a"), log_rows(tmp_path / "b")
    assert [r["val_forces_rmse"] for r in a] == [r["val_forces_rmse"] for r in b]
    # switching averaging on (or changing its decay) is another run
    with pytest.raises(TrainingConfigError, match="different config"):
        train(config(data, ema_decay=0.5), tmp_path / "b", progress=False)
    with pytest.raises(TrainingConfigError, match="different config"):
        train(config(data), tmp_path / "b", progress=False)


def test_without_ema_decay_nothing_is_averaged(data, tmp_path):
    """null is the default: the same run, no averages in the checkpoint."""
    default = train(config(data, epochs=2), tmp_path / "a", progress=False)
    null = train(config(data, epochs=2, ema_decay=None), tmp_path / "b", progress=False)
    for name, value in default.model.state_dict().items():
        assert torch.equal(null.model.state_dict()[name], value), name
    assert (
        torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["ema"] is None
    )
    # a checkpoint written before ema_decay existed resumes as a run without it
    checkpoint = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    del checkpoint["ema"], checkpoint["config"]["architecture"]["training"]["ema_decay"]
    torch.save(checkpoint, tmp_path / "a" / "checkpoint.pt")
    longer = train(config(data, epochs=3), tmp_path / "a", progress=False)
    assert longer.model is not None and len(log_rows(tmp_path / "a")) == 3
