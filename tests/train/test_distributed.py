"""`distributed: true`: two processes (gloo on CPU) train one model, with and
without weight averaging (ema_decay), in one pair of spawned processes."""

import csv
import os
import socket

import ase.io
import pytest
import torch
from helpers import emt_structures
from safetensors.torch import load_file

from pes_calc.train import train

TINY_SOAP = {
    "soap": {
        "max_angular": 1,
        "max_radial": 2,
        "cutoff": {"radius": 3.5, "width": 0.5},
    },
    "bpnn": {"num_hidden_layers": 1, "num_neurons_per_layer": 8},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cu-ddp")
    ase.io.write(folder / "train.xyz", emt_structures(8, seed=0), format="extxyz")
    ase.io.write(folder / "val.xyz", emt_structures(3, seed=1), format="extxyz")
    return folder


def config(data, **training):
    return {
        "seed": 3,
        "data": {"train": str(data / "train.xyz"), "val": str(data / "val.xyz")},
        "architecture": {
            "name": "soap_bpnn",
            "model": TINY_SOAP,
            "training": {
                "batch_size": 3,
                "num_epochs": 2,
                "learning_rate": 2e-2,
                "loss": {"energy": 1.0, "forces": 1.0, "stress": 1.0},
                "distributed": True,
                **training,
            },
        },
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, runs):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    for run_config, outdir in runs:
        result = train(run_config, outdir, progress=False)
        torch.save(result.model.state_dict(), outdir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Run directories: "plain" and "ema" (ema_decay 0.9), each trained on 2 ranks."""
    import torch.multiprocessing as mp

    outdirs = {name: tmp_path_factory.mktemp(name) for name in ("plain", "ema")}
    jobs = [
        (config(data), outdirs["plain"]),
        (config(data, ema_decay=0.9), outdirs["ema"]),
    ]
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_ddp_worker, args=(r, 2, port, jobs)) for r in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
        assert process.exitcode == 0
    return outdirs


@pytest.mark.parametrize("name", ["plain", "ema"])
def test_ranks_end_with_the_same_weights_and_rank_0_writes(runs, name):
    outdir = runs[name]
    states = [torch.load(outdir / f"rank{r}.pt") for r in range(2)]
    saved = load_file(str(outdir / "model.safetensors"))
    # DDP keeps the replicas identical; rank 0 alone writes the run directory
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0)
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    with open(outdir / "train.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2


def test_every_rank_averages_the_same_weights(runs):
    checkpoint = torch.load(runs["ema"] / "checkpoint.pt", weights_only=True)
    assert torch.load(runs["plain"] / "checkpoint.pt", weights_only=True)["ema"] is None
    averages = checkpoint["ema"]["averages"]
    assert checkpoint["ema"]["num_updates"] > 0 and averages
    # the saved model holds the averages, which are not the trained weights
    assert any(not torch.equal(checkpoint["model"][n], a) for n, a in averages.items())
