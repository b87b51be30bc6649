"""Tests of `pes_calc.files`: atomic writes leave the old file or the whole new one,
and never a temporary file."""

import os
from pathlib import Path

import pytest

from pes_calc.files import atomic_write, atomic_write_text


def _write_bytes(data: bytes):
    def write(path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(data)

    return write


def test_atomic_write_writes_the_file(tmp_path):
    path = tmp_path / "model.bin"
    atomic_write(path, _write_bytes(b"\x00\x01new"))
    assert path.read_bytes() == b"\x00\x01new"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_atomic_write_replaces_an_old_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    atomic_write(str(path), _write_bytes(b"new contents"))  # a str path too
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_atomic_write_writes_next_to_the_target(tmp_path):
    seen = []

    def write(temporary: str) -> None:
        seen.append(temporary)
        assert not Path(tmp_path / "out.txt").exists()  # not there before the rename
        Path(temporary).write_text("x")

    atomic_write(tmp_path / "out.txt", write)
    (temporary,) = seen
    assert isinstance(temporary, str)
    # the same folder (one file system: an atomic rename), a name of its own
    assert Path(temporary).parent == tmp_path
    assert Path(temporary).name != "out.txt"
    assert str(os.getpid()) in Path(temporary).name
    assert not Path(temporary).exists()


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")

    def write(temporary: str) -> None:
        Path(temporary).write_bytes(b"half of the ne")  # interrupted half way
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_failed_write_without_an_old_file(tmp_path):
    def write(temporary: str) -> None:
        Path(temporary).write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.txt", write)
    assert os.listdir(tmp_path) == []


def test_write_that_raises_before_creating_anything(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")

    def write(temporary: str) -> None:
        raise ValueError("bad model")

    with pytest.raises(ValueError, match="bad model"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_write_that_creates_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "never.txt", lambda temporary: None)
    assert os.listdir(tmp_path) == []


def test_atomic_write_text(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "seed: 1\n")
    assert path.read_text() == "seed: 1\n"
    atomic_write_text(path, "seed: 2\nname: run\n")
    assert path.read_text() == "seed: 2\nname: run\n"
    assert os.listdir(tmp_path) == ["config.yaml"]
