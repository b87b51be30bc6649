"""The pes-calc command line: what `info` shows without --json."""

from pathlib import Path

from click.testing import CliRunner

from pes_calc.cli import main

SHIPPED = Path(__file__).parents[1] / "models" / "cu-emt-soap-bpnn-llpr.safetensors"
STRUCTURE = SHIPPED.parents[1] / "data" / "cu-emt" / "structures" / "cu-fcc-108.xyz"


def test_info_text_shows_errors_epochs_statistics_and_integrity():
    result = CliRunner().invoke(main, ["info", str(SHIPPED)])
    assert result.exit_code == 0, result.output
    for expected in (
        "epochs         250 run, best 244",
        "test RMSE",
        "forces 37.7 meV/Å",
        "data stats",
        "num_neighbors_mean 39.83",
        "LLPR",
        "16 ensemble",
        "integrity      SHA-256",
    ):
        assert expected in result.output, expected


def test_info_text_shows_the_llpr_energy_sigma_it_stores():
    from pes_calc.io import read_metadata

    llpr = read_metadata(SHIPPED)["llpr"]
    result = CliRunner().invoke(main, ["info", str(SHIPPED)])
    assert result.exit_code == 0, result.output
    source = llpr.get("energy_uncertainty", "analytic")
    weight = 0 if source == "ensemble" else 1
    assert (
        f"energy σ       {source} (" in result.output
        and f"α = {llpr['multiplier']:.4g}, w = {weight}, "
        f"a = {llpr.get('energy_ensemble_multiplier', 0):.4g}\n"
        in result.output
    ), result.output
    for name, value in (llpr.get("energy_validation_nll") or {}).items():
        assert f"{name} {value:.4g}" in result.output
    assert f"forces σ       α = {llpr['forces_multiplier']:.4g} (β = " in result.output


def test_md_refuses_an_unwritable_output_before_loading(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "md",
            str(SHIPPED),
            str(STRUCTURE),
            "--steps",
            "2",
            "--trajectory",
            str(tmp_path / "no" / "such" / "md.traj"),
        ],
    )
    assert result.exit_code == 2
    assert "--trajectory" in result.output and "does not exist" in result.output


def test_md_with_zero_steps_says_so(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "md",
            str(SHIPPED),
            str(STRUCTURE),
            "--steps",
            "0",
            "--quiet",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "(no steps run)" in result.output and "nan" not in result.output


def test_md_thread_default_grows_with_the_system(monkeypatch):
    import os

    from pes_calc.cli import default_md_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [default_md_threads(n) for n in (32, 2048, 4096, 16384, 10**6)] == [
        1,
        1,
        1,
        4,
        8,
    ]


def test_train_refuses_a_run_directory_under_a_file(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "file").write_text("")
    for command in ("train", "active-learn"):
        result = CliRunner().invoke(
            main,
            [
                command,
                str(tmp_path / "config.yaml"),
                "-o",
                str(tmp_path / "file" / "run"),
            ],
        )
        assert result.exit_code == 2, result.output
        assert "is a file, not a directory" in result.output
