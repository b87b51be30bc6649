"""The peers' speed on the systems and models of scripts/benchmark.py, through their own
ASE calculators; run in each peer's virtualenv (scripts/peers/README.md).

- ``nequip`` / ``allegro``: ``nequip.model.NequIPGNNModel`` and
  ``allegro.model.AllegroModel`` (nequip 0.19, nequip-allegro 0.8) at the sizes of
  `benchmark.MODELS`, float32, untrained, through ``NequIPCalculator`` (default
  neighbor-list backend, matscipy). Artefacts: ``eager`` (the GraphModel object)
  and ``aotinductor``: nequip's recommended fast path, what ``nequip-compile --mode
  aotinductor --target ase`` writes, loaded with
  ``NequIPCalculator.from_compiled_model`` (TorchScript compilation is refused
  by nequip on torch ≥ 2.10). nequip-compile takes only checkpoints/packages,
  so the same export call is made here on the freshly built model (`_nequip_aoti`).
  The eager models run only up to 256 atoms (`benchmark.PEER_EAGER_SYSTEMS`).
- ``soap_bpnn``: metatrain's ``SoapBpnn`` with its default hypers, exported with
  ``model.export()`` (a TorchScript ``AtomisticModel``) and run by
  ``metatomic_ase.MetatomicCalculator`` with its defaults (vesin neighbor lists with a
  2 Å skin), ``sphericart.torch`` imported (its Python-registered autograd is needed
  for correct forces, scripts/peers/README.md).
- ``mace``: a small MACE (reference point, a different model): ``ScaleShiftMACE``,
  2 interactions, 32 channels, hidden irreps 32x0e+32x1o, correlation 3, max_ell 3,
  8 Bessels, r_max 5 Å, float32, through ``MACECalculator`` (eager).

    /work/peers/bench-venv/bin/python scripts/peers/benchmark_peers.py --peer allegro \
        --systems 32 256 --json allegro.json

Normally started by ``python scripts/benchmark.py --peers``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmark as harness  # noqa: E402 (the shared harness, numpy/ase only)

PEERS = ["nequip", "allegro", "soap_bpnn", "mace"]
ARTEFACTS = {
    "nequip": ["eager", "aotinductor"],
    "allegro": ["eager", "aotinductor"],
    "soap_bpnn": ["torchscript"],
    "mace": ["eager"],
}
LABELS = {
    ("nequip", "eager"): "nequip eager",
    ("nequip", "aotinductor"): "nequip AOTInductor (target ase)",
    ("allegro", "eager"): "nequip-allegro eager",
    ("allegro", "aotinductor"): "nequip-allegro AOTInductor (target ase)",
    ("soap_bpnn", "torchscript"): "metatrain export + MetatomicCalculator",
    ("mace", "eager"): "MACE small, MACECalculator (reference, different model)",
}


# ---------------------------------------------------------------------------------
# nequip and nequip-allegro


def _nequip_model(peer: str):
    from nequip.utils.global_state import set_global_state

    set_global_state()  # nequip's builders insist on it (seeds, TF32 off)
    hypers = dict(harness.MODELS[peer])
    common = {
        "seed": 0,
        "model_dtype": "float32",
        "type_names": ["Cu"],
        "avg_num_neighbors": harness.AVG_NUM_NEIGHBORS,
    }
    if peer == "nequip":
        from nequip.model import NequIPGNNModel

        # pes_calc's NequIP defaults for the radial MLP (nequip's are 1 × 128)
        model = NequIPGNNModel(
            **common, **hypers, radial_mlp_depth=2, radial_mlp_width=64
        )
    else:
        from allegro.model import AllegroModel

        model = AllegroModel(
            **common,
            **hypers,
            radial_chemical_embed={
                "_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
                "num_bessels": 8,
                "bessel_trainable": False,
                "polynomial_cutoff_p": 6,
            },
        )
    return model.eval()


def _nequip_calculator(model: Any, device: str):
    from nequip.integrations.ase import NequIPCalculator
    from nequip.integrations.utils import basic_transforms

    metadata = model.metadata
    return NequIPCalculator(
        model=model,
        device=device,
        transforms=basic_transforms(
            metadata, float(metadata["r_max"]), ["Cu"], {"Cu": "Cu"}
        ),
    )


def _nequip_aoti(model: Any, path: Path, device: str) -> None:
    """What ``nequip-compile --mode aotinductor --target ase`` does after loading."""
    import torch
    from nequip.data import AtomicDataDict
    from nequip.scripts._compile_utils import AOTI_ASE_TARGET, COMPILE_TARGET_DICT
    from nequip.utils.aot import aot_export_model
    from nequip.utils.aoti_metadata import (
        NEQUIP_AOTI_INPUTS_KEY,
        NEQUIP_AOTI_OUTPUTS_KEY,
        serialize_aoti_keys,
    )
    from nequip.utils.global_state import get_latest_global_state

    target = COMPILE_TARGET_DICT[AOTI_ASE_TARGET]
    metadata = dict(model.metadata)
    metadata.update(get_latest_global_state(only_metadata_related=True))
    metadata = {
        k: str(int(v)) if isinstance(v, bool) else v for k, v in metadata.items()
    }
    metadata[NEQUIP_AOTI_INPUTS_KEY] = serialize_aoti_keys(target["input"])
    metadata[NEQUIP_AOTI_OUTPUTS_KEY] = serialize_aoti_keys(target["output"])
    # example input: a 32-atom cell through the calculator's own transforms
    data = _nequip_calculator(model, device).atoms_to_data(harness.make_system("32"))
    data = target["data_settings"](AtomicDataDict.to_(data, device))
    dims = {
        "graph": torch.export.Dim.STATIC,
        "node": torch.export.Dim("num_nodes", min=2),
        "edge": torch.export.Dim("num_edges", min=2),
    }
    aot_export_model(
        model=model,
        device=device,
        input_fields=target["input"],
        output_fields=target["output"],
        data=data,
        batch_map=target["batch_map_settings"](dims),
        output_path=str(path),
        inductor_configs={
            "aot_inductor.metadata": {k: str(v) for k, v in metadata.items()}
        },
        seed=1,
    )


def _nequip_prepare(peer: str, artefact: str, folder: Path, device: str) -> dict:
    model = _nequip_model(peer)
    info = {"parameters": sum(p.numel() for p in model.parameters())}
    if artefact == "aotinductor":
        path = folder / f"{peer}.nequip.pt2"
        _nequip_aoti(model, path, device)
        info["path"] = str(path)
    return info


def _nequip_make(spec: dict) -> tuple[Any, None]:
    if spec["artefact"] == "aotinductor":
        from nequip.integrations.ase import NequIPCalculator

        return NequIPCalculator.from_compiled_model(
            spec["path"], device=spec["device"], chemical_species_to_atom_type_map=True
        ), None
    return _nequip_calculator(_nequip_model(spec["code"]), spec["device"]), None


# ---------------------------------------------------------------------------------
# metatrain SOAP-BPNN


def _metatrain_prepare(peer: str, artefact: str, folder: Path, device: str) -> dict:
    import sphericart.torch  # noqa: F401 (autograd formulas of the harmonics)
    import torch
    from metatrain.soap_bpnn import SoapBpnn
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import get_energy_target_info

    torch.manual_seed(0)
    info = DatasetInfo(
        length_unit="Angstrom",
        atomic_types=[29],
        targets={"energy": get_energy_target_info("energy", {"unit": "eV"})},
    )
    model = SoapBpnn(get_default_hypers("soap_bpnn")["model"], info).to(torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    path = folder / "soap_bpnn.pt"
    extensions = folder / "extensions"
    model.export().save(str(path), collect_extensions=str(extensions))
    return {"path": str(path), "extensions": str(extensions), "parameters": parameters}


def _metatrain_make(spec: dict) -> tuple[Any, None]:
    import sphericart.torch  # noqa: F401
    from metatomic_ase import MetatomicCalculator

    return MetatomicCalculator(
        spec["path"], extensions_directory=spec["extensions"], device=spec["device"]
    ), None


# ---------------------------------------------------------------------------------
# MACE (reference point)

MACE_HYPERS = {
    "num_interactions": 2,
    "channels": 32,
    "max_L": 1,
    "correlation": 3,
    "max_ell": 3,
    "num_bessel": 8,
    "r_max": 5.0,
}


def _mace_model():
    import os

    # e3nn 0.4.4 (pinned by mace-torch) torch.load()s its own constants, which
    # torch ≥ 2.6 refuses without this switch
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(0)
    h = MACE_HYPERS
    model = modules.ScaleShiftMACE(
        r_max=h["r_max"],
        num_bessel=h["num_bessel"],
        num_polynomial_cutoff=5,
        max_ell=h["max_ell"],
        interaction_cls=modules.interaction_classes[
            "RealAgnosticResidualInteractionBlock"
        ],
        interaction_cls_first=modules.interaction_classes[
            "RealAgnosticInteractionBlock"
        ],
        num_interactions=h["num_interactions"],
        num_elements=1,
        hidden_irreps=o3.Irreps(f"{h['channels']}x0e + {h['channels']}x1o"),
        MLP_irreps=o3.Irreps("16x0e"),
        gate=torch.nn.functional.silu,
        atomic_energies=np.array([0.0]),
        avg_num_neighbors=harness.AVG_NUM_NEIGHBORS,
        atomic_numbers=[29],
        correlation=h["correlation"],
        radial_type="bessel",
        atomic_inter_scale=1.0,
        atomic_inter_shift=0.0,
    )
    return model.to(torch.float32).eval()


def _mace_prepare(peer: str, artefact: str, folder: Path, device: str) -> dict:
    return {"parameters": sum(p.numel() for p in _mace_model().parameters())}


def _mace_make(spec: dict) -> tuple[Any, None]:
    from mace.calculators import MACECalculator

    return MACECalculator(
        models=_mace_model(), device=spec["device"], default_dtype="float32"
    ), None


PREPARE = {
    "nequip": _nequip_prepare,
    "allegro": _nequip_prepare,
    "soap_bpnn": _metatrain_prepare,
    "mace": _mace_prepare,
}
MAKE = {
    "nequip": _nequip_make,
    "allegro": _nequip_make,
    "soap_bpnn": _metatrain_make,
    "mace": _mace_make,
}


def _make(spec: dict) -> tuple[Any, None]:
    return MAKE[spec["code"]](spec)


def prepare(
    peer: str, artefacts: list[str], folder: Path, device: str, threads: int
) -> dict:
    """Build (and compile) each artefact of ``peer`` in ``folder``; {artefact: info}.

    An artefact already prepared there (its ``.json``, same torch, device and
    threads) is reused: nequip's AOTInductor export takes minutes. Compiling uses
    the threads the timing will use: inductor generates serial loops for one thread
    and parallel ones for more, and a package runs best with the count it had.
    """
    import torch

    torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    prepared = {}
    for artefact in artefacts:
        stamp = {"torch": torch.__version__, "device": device, "threads": threads}
        cached = folder / f"{peer}-{artefact}.json"
        if cached.exists():
            info = json.loads(cached.read_text())
            if info.get("stamp") == stamp and "error" not in info:
                prepared[artefact] = info
                continue
        started = time.perf_counter()
        try:
            info = PREPARE[peer](peer, artefact, folder, device)
        except Exception as error:  # noqa: BLE001 (reported as n/a, with the reason)
            lines = str(error).strip().splitlines()
            info = {
                "error": f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
            }
        info.update(
            stamp=stamp,
            label=LABELS[(peer, artefact)],
            compile_s=time.perf_counter() - started,
        )
        cached.write_text(json.dumps(info))
        prepared[artefact] = info
        state = info.get("error") or f"ready in {info['compile_s']:.0f} s"
        print(f"[{peer}] {artefact}: {state}", file=sys.stderr, flush=True)
    return prepared


def wanted(peer: str, artefact: str, system: str) -> bool:
    """Whether this artefact runs on this system (eager peers stop at 256 atoms)."""
    return artefact != "eager" or system in harness.PEER_EAGER_SYSTEMS.get(
        peer, harness.SYSTEMS
    )


def worker_spec(
    peer: str, artefact: str, info: dict, system: str, common: dict
) -> dict:
    """What a worker needs to time one artefact of ``peer`` on one system."""
    return {
        **common,
        **info,
        "code": peer,
        "architecture": peer,
        "artefact": artefact,
        "system": system,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", required=True, choices=PEERS)
    parser.add_argument(
        "--systems", nargs="+", default=["32", "256"], choices=harness.SYSTEMS
    )
    parser.add_argument(
        "--artefacts", nargs="+", default=None, help=f"default: {ARTEFACTS}"
    )
    parser.add_argument(
        "--spec",
        default="{}",
        help="JSON: modes, calls, steps, warmup, budget, min_calls, threads, device",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=harness.CACHE / "peers",
        help="where compiled artefacts are kept between runs",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="only build the artefacts; --json gets {artefact: info}",
    )
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    common = {**harness.DEFAULT_SPEC, **json.loads(args.spec)}
    artefacts = args.artefacts or ARTEFACTS[args.peer]
    info = prepare(
        args.peer, artefacts, args.cache, common["device"], common["threads"]
    )
    if args.prepare_only:
        args.json.write_text(json.dumps(info, indent=1))
        return
    records = []
    for artefact in artefacts:
        for system in args.systems:
            if not wanted(args.peer, artefact, system):
                continue
            spec = worker_spec(args.peer, artefact, info[artefact], system, common)
            if "error" in info[artefact]:
                record = {key: spec[key] for key in harness.RECORD_KEYS if key in spec}
                record["error"] = info[artefact]["error"]
            else:
                record = harness.launch(
                    sys.executable, Path(__file__), spec, args.timeout
                )
            harness._progress(record)
            records.append(record)
    args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        harness.worker_main(_make)
    else:
        main()
