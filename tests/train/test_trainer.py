import csv
import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import emt_structures

from pes_calc.calculator import PESCalculator
from pes_calc.cli import main
from pes_calc.io import load_model, read_metadata
from pes_calc.train import TrainingConfigError, load_config, train

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
    folder = tmp_path_factory.mktemp("cu")
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


def test_training_lowers_the_error_and_writes_a_described_model(data, tmp_path):
    result = train(config(data, epochs=8), tmp_path, progress=False)
    rows = log_rows(tmp_path)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    first, last = float(rows[0]["val_forces_rmse"]), float(rows[-1]["val_forces_rmse"])
    assert last < 0.8 * first, (first, last)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    metadata = read_metadata(tmp_path / "model.safetensors")
    stats = metadata["training_data_stats"]
    assert stats["num_neighbors_mean"] > 0 and stats["forces_rms"] > 0.1
    assert metadata["training"]["best_epoch"] == result.best_epoch
    best_row = min(rows, key=lambda row: float(row["val_rmse_prod"]))
    assert metadata["training"]["val_metrics"]["forces_rmse"] == pytest.approx(
        float(best_row["val_forces_rmse"])
    )
    model = load_model(tmp_path / "model.safetensors")
    # metatrain's composition model and scaling, as per-type shift and scale
    # (one species: least squares of E_s ≈ n_s μ gives μ = Σ n E / Σ n²)
    structures = ase.io.read(data / "train.xyz", ":")
    n = np.array([len(a) for a in structures])
    energies = np.array([a.get_potential_energy() for a in structures])
    assert model.per_type_energy_shifts.item() == pytest.approx(
        np.sum(n * energies) / np.sum(n * n)
    )
    assert model.per_type_energy_scales.item() == pytest.approx(stats["forces_rms"])


def test_interrupted_run_resumes_to_the_same_model(data, tmp_path, monkeypatch):
    uninterrupted = train(config(data), tmp_path / "a", progress=False)

    def interrupt(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(data), tmp_path / "b", progress=False, callbacks=[interrupt])
    assert len(log_rows(tmp_path / "b")) == 2
    resumed = train(config(data), tmp_path / "b", progress=False)
    for name, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(
            resumed.model.state_dict()[name], value, rtol=0, atol=0
        )
    a, b = log_rows(tmp_path / "a"), log_rows(tmp_path / "b")
    assert [r["val_forces_rmse"] for r in a] == [r["val_forces_rmse"] for r in b]

    with pytest.raises(TrainingConfigError, match="different config"):
        train(config(data, learning_rate=1e-2), tmp_path / "b", progress=False)
    # asking for more epochs continues the run, also when the same files are
    # named relative to the working directory
    longer_config = config(data, epochs=5)
    longer_config["data"] = {
        name: Path(value).name for name, value in longer_config["data"].items()
    }
    monkeypatch.chdir(data)
    longer = train(longer_config, tmp_path / "b", progress=False)
    assert len(log_rows(tmp_path / "b")) == 5 and longer.model is not None


def test_statistics_references_in_a_nequip_config(data, tmp_path):
    nequip = config(data, epochs=1)
    nequip["architecture"]["name"] = "nequip"
    nequip["architecture"]["model"] = {
        "r_max": 3.5,
        "l_max": 1,
        "num_layers": 1,
        "num_features": 4,
        "num_bessels": 4,
        "radial_mlp_width": 8,
        "radial_mlp_depth": 1,
        "avg_num_neighbors": "${training_data_stats:num_neighbors_mean}",
        "per_type_energy_shifts": "${training_data_stats:per_atom_energy_mean}",
        "per_type_energy_scales": "${training_data_stats:forces_rms}",
    }
    result = train(nequip, tmp_path, progress=False)
    stats = result.model.config["training_data_stats"]
    hypers = result.model.config["model"]
    assert hypers["avg_num_neighbors"] == stats["num_neighbors_mean"]
    assert hypers["per_type_energy_shifts"] == stats["per_atom_energy_mean"]
    # given explicitly, the shifts are not replaced by the composition fit
    assert result.model.per_type_energy_shifts.item() == pytest.approx(
        stats["per_atom_energy_mean"]
    )


def test_fine_tuning_starts_from_the_given_model(data, tmp_path):
    base = train(config(data, epochs=2), tmp_path / "base", progress=False)
    tuned_config = config(
        data,
        epochs=1,
        learning_rate=1e-12,
        finetune={"read_from": str(tmp_path / "base" / "model.safetensors")},
    )
    tuned = train(tuned_config, tmp_path / "tuned", progress=False)
    for name, value in base.model.state_dict().items():
        torch.testing.assert_close(
            tuned.model.state_dict()[name], value, rtol=1e-6, atol=1e-8
        )
    wrong = config(
        data, finetune={"read_from": str(tmp_path / "base" / "model.safetensors")}
    )
    wrong["architecture"]["name"] = "allegro"
    with pytest.raises(TrainingConfigError, match="is a soap_bpnn model"):
        train(wrong, tmp_path / "wrong", progress=False)


def test_energy_only_data(data, tmp_path):
    structures = ase.io.read(data / "train.xyz", ":")
    for atoms in structures:
        atoms.info["E"] = atoms.get_potential_energy()
        atoms.calc = None
    ase.io.write(tmp_path / "e.xyz", structures, format="extxyz")
    energy_only = config(data, epochs=2, loss=None)
    energy_only["data"].update(
        train=str(tmp_path / "e.xyz"),
        val=str(tmp_path / "e.xyz"),
        energy_key="E",
        forces_key=None,
        stress_key=None,
    )
    result = train(energy_only, tmp_path / "out", progress=False)
    assert set(result.val_metrics) >= {"energy_per_atom_rmse"}
    assert "forces_rmse" not in result.val_metrics


def test_config_errors_are_named(data, tmp_path):
    bad = config(data)
    bad["architecture"]["training"]["num_epoch"] = 3
    with pytest.raises(TrainingConfigError, match="num_epoch"):
        train(bad, tmp_path, progress=False)
    bad = config(data)
    del bad["data"]["val"]
    with pytest.raises(TrainingConfigError, match="'val'"):
        train(bad, tmp_path, progress=False)


def test_cli_train_then_eval_json_matches_the_calculator(data, tmp_path):
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config(data, epochs=1)))
    runner = CliRunner()
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        result = runner.invoke(
            main,
            [
                "train",
                str(tmp_path / "config.yaml"),
                "-o",
                str(out),
                "--quiet",
                "--threads",
                "1",
            ],
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "config.yaml")["seed"] == 3

    model_path = out / "model.safetensors"
    result = runner.invoke(
        main, ["eval", str(model_path), str(data / "val.xyz"), "--json"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)

    # the same numbers, one structure at a time through the ASE calculator
    calculator = PESCalculator(str(model_path), dtype=torch.float64)
    energy_errors, force_errors, stress_errors = [], [], []
    for atoms in ase.io.read(data / "val.xyz", ":"):
        reference_energy, reference_forces = (
            atoms.get_potential_energy(),
            atoms.get_forces(),
        )
        reference_stress = atoms.calc.results.get("stress")
        atoms.calc = calculator
        energy_errors.append(
            (atoms.get_potential_energy() - reference_energy) / len(atoms)
        )
        force_errors.append((atoms.get_forces() - reference_forces).ravel())
        if reference_stress is not None:
            stress = atoms.get_stress(voigt=False)
            xx, yy, zz, yz, xz, xy = reference_stress
            reference = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
            stress_errors.append((stress - reference).ravel())
    assert metrics["energy_per_atom_rmse"] == pytest.approx(
        np.sqrt(np.mean(np.square(energy_errors))), rel=1e-4
    )
    assert metrics["forces_mae"] == pytest.approx(
        np.mean(np.abs(np.concatenate(force_errors))), rel=1e-4
    )
    assert metrics["stress_rmse"] == pytest.approx(
        np.sqrt(np.mean(np.square(np.concatenate(stress_errors)))), rel=1e-4
    )
    assert metrics["num_structures"] == 4

    plot = tmp_path / "parity.png"
    result = runner.invoke(
        main, ["eval", str(model_path), str(data / "val.xyz"), "--plot", str(plot)]
    )
    assert result.exit_code == 0 and plot.stat().st_size > 10_000
    result = runner.invoke(
        main, ["eval", str(tmp_path / "config.yaml"), str(data / "val.xyz")]
    )
    assert result.exit_code != 0 and "not a" in result.output.lower()


def test_isolated_atom_energies_become_the_shifts(data, tmp_path):
    given = config(data, epochs=1)
    given["data"]["isolated_atom_energies"] = {"Cu": -0.25}
    result = train(given, tmp_path, progress=False)
    assert result.model.per_type_energy_shifts.tolist() == [-0.25]
    assert result.model.config["model"]["per_type_energy_shifts"] == [-0.25]
    given["data"]["isolated_atom_energies"] = {"Ag": -0.1}
    with pytest.raises(TrainingConfigError, match="Ag"):
        train(given, tmp_path / "other", progress=False)


def test_a_diverging_run_stops_with_a_clear_error(data, tmp_path):
    with pytest.raises(FloatingPointError, match="lower learning_rate"):
        train(config(data, epochs=3, learning_rate=1e12), tmp_path, progress=False)


def test_metatrain_names_from_the_seeds(data, tmp_path):
    """fixed_composition_weights keyed by atomic number, fixed_scaling_weights, and
    the logging/loader names metatrain configs carry."""
    given = config(
        data,
        epochs=1,
        fixed_composition_weights={"energy": {29: -3.5}},
        fixed_scaling_weights={"energy": {"Cu": 0.125}},
        remove_composition_contribution=False,
        log_mae=True,
        log_separate_blocks=False,
        per_structure_targets=["energy"],
        num_workers=2,
        checkpoint_interval=1,
    )
    given["architecture"]["model"] = {**TINY_SOAP, "add_lambda_basis": True}
    result = train(given, tmp_path, progress=False)
    assert result.model.config["model"]["per_type_energy_shifts"] == [-3.5]
    assert result.model.config["model"]["per_type_energy_scales"] == [0.125]
    with pytest.raises(TrainingConfigError, match="not an atomic number"):
        train(
            config(data, epochs=1, fixed_composition_weights={"energy": {200: 1.0}}),
            tmp_path / "bad",
            progress=False,
        )
    with pytest.raises(TrainingConfigError, match="only the energy target"):
        train(
            config(
                data, epochs=1, fixed_scaling_weights={"energy": 1.0, "dipole": 2.0}
            ),
            tmp_path / "bad2",
            progress=False,
        )


def test_nequip_names_for_the_allegro_embedding():
    from pes_calc import build_model

    common = {"num_scalar_features": 8, "num_tensor_features": 4, "seed": 0}
    nequip_style = build_model(
        "allegro",
        ["Cu"],
        radial_chemical_embed_dim=16,
        **common,
        radial_chemical_embed={
            "_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
            "num_bessels": 6,
        },
    )
    ours = build_model(
        "allegro",
        ["Cu"],
        scalar_embed_output_dim=16,
        **common,
        radial_chemical_embed={"name": "TwoBodyBesselScalarEmbed", "num_bessels": 6},
    )
    expected = ours.state_dict()
    for name, tensor in nequip_style.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with pytest.raises(ValueError, match="give one"):
        build_model(
            "allegro",
            ["Cu"],
            radial_chemical_embed_dim=16,
            scalar_embed_output_dim=8,
            **common,
        )
