"""`build_model`: architecture name + species + hyperparameters → `Potential`.

Hyperparameters are merged over each architecture's defaults; an unknown name is an
error that lists the known ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from ase.data import atomic_numbers

from pes_calc.nn.zbl import ZBL
from pes_calc.potential import Potential

# hyperparameters that every architecture accepts: they configure the `Potential`
POTENTIAL_DEFAULTS: Dict[str, Any] = {
    "per_type_energy_scales": 1.0,
    "per_type_energy_shifts": 0.0,
    "per_type_energy_scales_trainable": False,
    "per_type_energy_shifts_trainable": False,
    "do_derivatives": True,
    "model_dtype": "float32",
    "seed": None,
}

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _registry() -> Dict[str, tuple[dict, Callable[..., Potential]]]:
    """Architecture name → (default hyperparameters, builder)."""
    from pes_calc.architectures import allegro, nequip, soap_bpnn

    return {
        "soap_bpnn": (soap_bpnn.DEFAULT_HYPERS, soap_bpnn.build),
        "nequip": (nequip.DEFAULT_HYPERS, nequip.build),
        "allegro": (allegro.DEFAULT_HYPERS, allegro.build),
    }


def architecture_names() -> list[str]:
    """Names accepted by `build_model`."""
    return sorted(_registry())


def merge_hypers(defaults: Mapping, given: Mapping, where: str = "") -> dict:
    """Deep-merge ``given`` over ``defaults``; unknown keys raise ``ValueError``."""
    merged = copy.deepcopy(dict(defaults))
    for key, value in given.items():
        if key not in defaults:
            raise ValueError(
                f"unknown hyperparameter {where}{key!r}; known: "
                f"{', '.join(sorted(defaults))}"
            )
        if isinstance(defaults[key], Mapping) and isinstance(value, Mapping):
            merged[key] = merge_hypers(defaults[key], value, f"{where}{key}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_model(
    name: str | Mapping[str, Any],
    species: Sequence[str] | None = None,
    **hypers: Any,
) -> Potential:
    """Build an untrained model.

    Parameters
    ----------
    name
        An architecture name (``"soap_bpnn"``), or a YAML ``architecture`` section
        ``{"name": ..., "model": {...}}`` (species may then sit in it too).
    species
        Chemical symbols in type order, e.g. ``["Cu", "Ag"]``.
    **hypers
        Hyperparameters with the architecture's names, e.g. ``soap={...}``.

    >>> model = build_model("soap_bpnn", ["Cu"], soap={"max_angular": 2, "max_radial": 2})
    >>> model.species, model.cutoff
    (['Cu'], 5.0)
    """
    if isinstance(name, Mapping):
        section = dict(name)
        if "name" not in section:
            raise ValueError("the architecture section needs a 'name'")
        hypers = {**section.get("model", {}), **hypers}
        species = species if species is not None else section.get("species")
        name = section["name"]
    registry = _registry()
    if name not in registry:
        raise ValueError(
            f"unknown architecture {name!r}; choose from {', '.join(sorted(registry))}"
        )
    if not species:
        raise ValueError("build_model needs the species (chemical symbols) to model")
    species = list(species)
    unknown = [s for s in species if s not in atomic_numbers]
    if unknown or len(set(species)) != len(species):
        raise ValueError(f"species must be distinct chemical symbols, got {species}")

    defaults, builder = registry[name]
    merged = merge_hypers({**defaults, **POTENTIAL_DEFAULTS}, hypers)
    if merged["model_dtype"] not in DTYPES:
        raise ValueError(f"model_dtype must be one of {sorted(DTYPES)}")
    config = {"name": name, "species": species, "model": merged}
    if merged["seed"] is None:  # initialised from (and advancing) the global RNG
        model = builder(species, merged)
    else:
        with torch.random.fork_rng(devices=[]):  # a seed leaves the caller's RNG alone
            torch.manual_seed(int(merged["seed"]))
            model = builder(species, merged)
    model.config = config
    # inference is the default use; the trainer switches to .train() itself
    return model.to(DTYPES[merged["model_dtype"]]).eval()


def potential_options(hypers: Mapping[str, Any]) -> Dict[str, Any]:
    """The `Potential` keyword arguments among merged hyperparameters."""
    names = [
        "per_type_energy_scales",
        "per_type_energy_shifts",
        "per_type_energy_scales_trainable",
        "per_type_energy_shifts_trainable",
        "do_derivatives",
    ]
    return {key: hypers[key] for key in names}


def pair_potential_from(
    spec: Any, species: Sequence[str], cutoff: float
) -> Optional[ZBL]:
    """The pair potential named by a ``pair_potential`` hyperparameter: None, "ZBL",
    or ``{"name": "ZBL", "units": "metal" | "real"}``."""
    if spec is None:
        return None
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    if spec.get("name", "").upper() != "ZBL":
        raise ValueError(f"unknown pair_potential {spec!r}; only ZBL is available")
    return ZBL(species, cutoff, spec.get("units", "metal"))
