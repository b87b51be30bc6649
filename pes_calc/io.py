"""The model file: safetensors weights + JSON metadata; nothing is ever unpickled.

Layout of ``model.safetensors``:

- tensors: the `Potential`'s state dict;
- metadata (string → string): ``format`` = ``"pes_calc.model"``,
  ``format_version`` = `FORMAT_VERSION`, ``metadata``, one JSON document with
  the architecture name, hyperparameters, species, cutoff, dtype, units, the
  training-data statistics and LLPR settings where present, and ``digests``: the
  SHA-256 of the ``metadata`` string and of every tensor (name, dtype, shape and
  bytes), checked at load, so a damaged byte anywhere is a `ModelFileError` that
  names the tensor. Files written before digests existed load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pes_calc._version import __version__
from pes_calc.build import build_model
from pes_calc.llpr import LLPR
from pes_calc.potential import Potential

FORMAT_TAG = "pes_calc.model"
FORMAT_VERSION = 1
UNITS = {"energy": "eV", "length": "Å"}


class ModelFileError(ValueError):
    """A model file that is missing, foreign, corrupted, truncated or too new."""


DIGESTS_KEY = "digests"


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_metadata(model: Potential | LLPR) -> dict[str, Any]:
    """The JSON metadata describing ``model`` (enough to rebuild it)."""
    dtype = next(iter(model.state_dict().values())).dtype
    return {
        "architecture": model.config["name"],
        "species": model.species,
        "model": model.config["model"],
        "cutoff": model.cutoff,
        "dtype": str(dtype).removeprefix("torch."),
        "units": UNITS,
        "do_derivatives": model.do_derivatives,
        "training_data_stats": model.config.get("training_data_stats", {}),
        # how it was trained: data, epochs, validation and test errors (trainer)
        "training": model.config.get("training", {}),
        # LLPR wrappers: ensemble size, regulariser, calibration (pes_calc.llpr)
        "llpr": model.config.get("llpr"),
        "pes_calc_version": __version__,
    }


# e3nn's code-generated tensor-product modules gain these buffers when deep-copied;
# they are constants that construction rebuilds, not weights
_COPIED_CONSTANT = re.compile(r"\._compiled_main\w*\._tensor_constant\d+$")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a model file stores: the state dict without e3nn's copied
    constants."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not _COPIED_CONSTANT.search(name)
    }


def save_model(model: Potential | LLPR, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` (a ``.safetensors`` file)."""
    tensors = {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model_state(model).items()
    }
    document = json.dumps(model_metadata(model))
    digests = {
        "metadata": _text_digest(document),
        "tensors": {name: tensor_digest(name, t) for name, t in tensors.items()},
    }
    metadata = {
        "format": FORMAT_TAG,
        "format_version": str(FORMAT_VERSION),
        "metadata": document,
        DIGESTS_KEY: json.dumps(digests),
    }
    save_file(tensors, str(path), metadata=metadata)
    # safetensors creates files 0600; give them the mode any other file would get
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checked JSON metadata of a model file, without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # safetensors reports header damage in several ways
        raise ModelFileError(
            f"{path} is not a readable safetensors file (corrupted or truncated?): "
            f"{error}"
        ) from error
    if header.get("format") != FORMAT_TAG:
        raise ModelFileError(
            f"{path} is a safetensors file but not a pes_calc model "
            f"(format tag {header.get('format')!r}, expected {FORMAT_TAG!r})"
        )
    try:
        version = int(header.get("format_version", "-1"))
    except ValueError:
        raise ModelFileError(
            f"{path} has an invalid format version {header['format_version']!r}"
        ) from None
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format version {version}, newer than this pes_calc "
            f"understands ({FORMAT_VERSION}); upgrade pes_calc to read it"
        )
    if version < 1:
        raise ModelFileError(f"{path} has an invalid format version {version}")
    try:
        metadata = json.loads(header["metadata"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path} has damaged metadata: {error}") from error
    digests = _stored_digests(path, header)
    written = None if digests is None else digests.get("metadata")
    if digests is not None and written != _text_digest(header["metadata"]):
        raise ModelFileError(
            f"{path}: its metadata does not match the digest written with it "
            "(the file is damaged)"
        )
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path} has damaged metadata: not a JSON object")
    return metadata


def _stored_digests(path: Path, header: dict[str, str]) -> dict[str, Any] | None:
    """The digests in a file's header; None for files written before them."""
    if DIGESTS_KEY not in header:
        return None
    try:
        digests = json.loads(header[DIGESTS_KEY])
        tensors = digests.get("tensors") if isinstance(digests, dict) else None
        if not isinstance(tensors, dict):
            raise ValueError("not a digest table")
    except ValueError as error:
        raise ModelFileError(f"{path} has damaged digests: {error}") from error
    return digests


def is_checked(path: str | os.PathLike) -> bool:
    """Whether a model file carries digests (files before them load unchecked)."""
    with safe_open(str(path), framework="pt") as handle:
        return DIGESTS_KEY in (handle.metadata() or {})


def check_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Raise `ModelFileError` naming the first tensor whose bytes do not match the
    digest written at save; warn once if the file has no digests."""
    with safe_open(str(path), framework="pt") as handle:
        digests = _stored_digests(path, handle.metadata() or {})
    if digests is None:
        warnings.warn(
            f"{path} was written before pes_calc stored digests: its bytes cannot be "
            "checked (save_model(load_model(path), path) adds them)",
            stacklevel=3,
        )
        return
    expected = digests["tensors"]
    if set(expected) != set(tensors):
        names = sorted(set(expected) ^ set(tensors))
        raise ModelFileError(f"{path}: tensors {names[:5]} differ from those written")
    for name, tensor in tensors.items():
        if tensor_digest(name, tensor) != expected[name]:
            raise ModelFileError(
                f"{path}: the bytes of tensor {name!r} do not match the digest "
                "written with them (the file is damaged)"
            )


def load_model(path: str | os.PathLike) -> Potential | LLPR:
    """Rebuild the eager model stored in ``path`` (``.safetensors``): a
    `Potential`, or an `LLPR` around one when the file holds LLPR settings."""
    metadata = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise ModelFileError(
            f"{path}: the weights cannot be read (truncated or corrupted?): {error}"
        ) from error
    check_tensors(Path(path), tensors)
    model: Potential | LLPR
    try:
        model = build_model(
            {"name": metadata["architecture"], "model": metadata["model"]},
            metadata["species"],
        )
        dtype = getattr(torch, metadata["dtype"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ModelFileError(
            f"{path}: its metadata does not describe a model this pes_calc can "
            f"build: {error!r}"
        ) from error
    model.config["training_data_stats"] = metadata.get("training_data_stats", {})
    model.config["training"] = metadata.get("training", {})
    model.do_derivatives = bool(metadata.get("do_derivatives", True))
    if metadata.get("llpr"):
        try:
            members = int(metadata["llpr"]["num_ensemble_members"].get("energy", 0))
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ModelFileError(f"{path}: damaged LLPR settings: {error!r}") from error
        model = LLPR(model, members)
        model.config["llpr"] = metadata["llpr"]
    model = model.to(dtype)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        raise ModelFileError(
            f"{path}: weights do not match the {metadata['architecture']} model "
            f"described in its metadata: {error}"
        ) from error
    if missing or unexpected:
        raise ModelFileError(
            f"{path}: weights do not match the {metadata['architecture']} model "
            f"described in its metadata (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    return model.eval()
