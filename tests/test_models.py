"""The trained models shipped in models/: they load, describe themselves, are
accurate on their test sets, and run energy-conserving MD."""

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from pes_calc import PESCalculator
from pes_calc.io import load_model, read_metadata
from pes_calc.md import run_md

ROOT = Path(__file__).resolve().parent.parent
# model name → (start structure, force RMS of its dataset in eV/Å, NVE steps, fs);
# C–H vibrations (period ~11 fs) need the short step for the molecules
SHIPPED = {
    "cu-emt-soap-bpnn": ("data/cu-emt/structures/cu-fcc-32.xyz", 0.67, 300, 2.0),
    "cu-emt-nequip": ("data/cu-emt/structures/cu-fcc-32.xyz", 0.67, 100, 2.0),
    "cu-emt-allegro": ("data/cu-emt/structures/cu-fcc-32.xyz", 0.67, 200, 2.0),
    "molecules-gfn2-soap-bpnn": ("data/molecules-gfn2/test.xyz", 1.0, 600, 0.25),
}


@pytest.fixture(params=sorted(SHIPPED), ids=sorted(SHIPPED))
def shipped(request):
    path = ROOT / "models" / f"{request.param}.safetensors"
    assert path.exists(), (
        f"{path} is missing: python scripts/train_models.py --only {request.param}"
    )
    assert (ROOT / "models" / f"{request.param}.yaml").exists(), (
        "its config must ship too"
    )
    return request.param, path


def test_model_is_accurate_on_its_test_set(shipped):
    name, path = shipped
    metadata = read_metadata(path)
    test = metadata["training"]["test_metrics"]
    force_scale = SHIPPED[name][1]
    print(name, {k: round(v, 5) for k, v in test.items() if isinstance(v, float)})
    # "real" models: force errors well below the forces themselves
    assert test["forces_rmse"] < 0.2 * force_scale
    assert test["energy_per_atom_rmse"] < 0.02  # eV/atom
    assert metadata["training_data_stats"]["forces_rms"] == pytest.approx(
        force_scale, rel=0.1
    )


def test_nve_md_conserves_energy(shipped):
    name, path = shipped
    structure, _, steps, timestep = SHIPPED[name]
    atoms = ase.io.read(ROOT / structure, index=0)
    atoms.calc = None
    torch.manual_seed(0)
    summary = run_md(
        PESCalculator(load_model(path), device="cpu"),
        atoms,
        ensemble="nve",
        temperature=300.0,
        steps=steps,
        timestep=timestep,
        progress=False,
        seed=0,
    )
    print(name, f"max |E(t) - E(0)| / N = {summary.energy_drift_per_atom:.2e} eV/atom")
    # Verlet's bounded energy error for these steps is 3e-5 to 7e-5 eV/atom (it
    # shrinks as the step squared); wrong forces or a rough model give 1e-3 and more
    assert summary.energy_drift_per_atom < 3e-4
    assert np.isfinite(atoms.get_positions()).all()
