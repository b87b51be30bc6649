"""`build_model`: architecture name + species + hyperparameters → `Potential`.

Hyperparameters are merged over each architecture's defaults; an unknown name is an
error that lists the known ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ase.data import atomic_numbers

from pes_calc.architectures import allegro, nequip, soap_bpnn
from pes_calc.choices import DTYPES, as_dtype
from pes_calc.config import ConfigError, check_keys, merge_hypers
from pes_calc.nn.precision import float64_construction
from pes_calc.nn.zbl import ZBL
from pes_calc.potential import Architecture, Potential

# hyperparameters that every architecture accepts: they configure the `Potential`
POTENTIAL_DEFAULTS: dict[str, Any] = {
    "per_type_energy_scales": 1.0,
    "per_type_energy_shifts": 0.0,
    "per_type_energy_scales_trainable": False,
    "per_type_energy_shifts_trainable": False,
    "do_derivatives": True,
    "model_dtype": "float32",
    "seed": None,
}
# the keys of a YAML architecture section (training: the trainer's settings)
SECTION_KEYS = ("name", "species", "model", "training")


def _registry() -> dict[str, tuple[dict, Callable[..., Architecture]]]:
    """Architecture name → (default hyperparameters, architecture class)."""
    return {
        "soap_bpnn": (soap_bpnn.DEFAULT_HYPERS, soap_bpnn.SoapBpnn),
        "nequip": (nequip.DEFAULT_HYPERS, nequip.NequIP),
        "allegro": (allegro.DEFAULT_HYPERS, allegro.Allegro),
    }


def _check_architecture(name: str, registry: Mapping[str, Any]) -> None:
    """Raise `ConfigError` for an unknown architecture name, suggesting the nearest."""
    if name not in registry:
        close = difflib.get_close_matches(str(name), list(registry), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown architecture {name!r}{hint}; choose from "
            f"{', '.join(sorted(registry))}"
        )


def _build(
    architecture_class: Callable[..., Architecture], species: list, hypers: dict
) -> Potential:
    """Architecture + pair potential + per-type scales and shifts → `Potential`."""
    architecture = architecture_class(species, hypers)
    # soap_bpnn has metatrain's boolean `zbl`; nequip and allegro a `pair_potential`
    spec = "ZBL" if hypers.get("zbl") else hypers.get("pair_potential")
    return Potential(
        architecture,
        species,
        pair_potential=pair_potential_from(spec, species, architecture.cutoff),
        **potential_options(hypers),
    )


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

    >>> model = build_model(
    ...     "soap_bpnn", ["Cu"], soap={"max_angular": 2, "max_radial": 2}
    ... )
    >>> model.species, model.cutoff
    (['Cu'], 5.0)
    """
    if isinstance(name, Mapping):
        section = dict(name)
        if "name" not in section:
            raise ConfigError("the architecture section needs a 'name'")
        # a YAML section: its training part is the trainer's, the rest is checked
        check_keys(section, SECTION_KEYS, "architecture")
        given = section.get("model") or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"architecture.model must be a mapping, got {given!r}")
        hypers = {**given, **hypers}
        species = species if species is not None else section.get("species")
        name = str(section["name"])
    registry = _registry()
    _check_architecture(name, registry)
    if not species:
        raise ValueError("build_model needs the species (chemical symbols) to model")
    species = list(species)
    unknown = [s for s in species if s not in atomic_numbers]
    if unknown or len(set(species)) != len(species):
        raise ValueError(f"species must be distinct chemical symbols, got {species}")

    defaults, architecture_class = registry[name]
    merged = merge_hypers({**defaults, **POTENTIAL_DEFAULTS}, hypers)
    # torch.float64 or "float64": the config (and the model file) keeps the name
    dtype = as_dtype(merged["model_dtype"], "model_dtype")
    merged["model_dtype"] = str(dtype).removeprefix("torch.")
    config = {"name": name, "species": species, "model": merged}
    # constructed in float64, then cast: exact constants (Clebsch-Gordan, splines)
    # in float64 models, and the same initial weights whatever the dtype
    with float64_construction():
        if merged["seed"] is None:  # initialised from (and advancing) the global RNG
            model = _build(architecture_class, species, merged)
        else:
            with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone
                torch.manual_seed(int(merged["seed"]))
                model = _build(architecture_class, species, merged)
    model.config = config
    # inference is the default use; the trainer switches to .train() itself
    return model.to(DTYPES[merged["model_dtype"]]).eval()


def cutoff_of(name: str, hypers: Mapping[str, Any]) -> float:
    """The cutoff radius (Å) a model built from ``hypers`` will have, without
    building it (the trainer needs it to make graphs before the statistics that
    other hyperparameters may reference)."""
    registry = _registry()
    _check_architecture(name, registry)
    merged = merge_hypers({**registry[name][0], **POTENTIAL_DEFAULTS}, hypers)
    radius = (
        merged["soap"]["cutoff"]["radius"] if name == "soap_bpnn" else merged["r_max"]
    )
    if not isinstance(radius, (int, float)):
        raise ValueError(
            f"the cutoff of a {name} model must be a number, got {radius!r}"
        )
    return float(radius)


def potential_options(hypers: Mapping[str, Any]) -> dict[str, Any]:
    """The `Potential` keyword arguments among merged hyperparameters."""
    names = [
        "per_type_energy_scales",
        "per_type_energy_shifts",
        "per_type_energy_scales_trainable",
        "per_type_energy_shifts_trainable",
        "do_derivatives",
    ]
    return {key: hypers[key] for key in names}


def pair_potential_from(spec: Any, species: Sequence[str], cutoff: float) -> ZBL | None:
    """The pair potential named by a ``pair_potential`` hyperparameter: None, "ZBL",
    or ``{"name": "ZBL", "units": "metal" | "real"}``."""
    if spec is None:
        return None
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    if str(spec.get("name", "")).upper() != "ZBL":
        raise ValueError(f"unknown pair_potential {spec!r}; only ZBL is available")
    unknown = sorted(set(spec) - {"name", "units"})
    if unknown:  # a misspelt "units" must not silently fall back to metal units
        raise ValueError(f"unknown pair_potential keys {unknown}; known: name, units")
    return ZBL(species, cutoff, spec.get("units", "metal"))
