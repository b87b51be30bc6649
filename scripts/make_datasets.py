"""Generate the reference datasets in data/: Cu with EMT, molecules with GFN2-xTB.

Two sets, each written as extxyz train/val/test files with labels stored under the
keys ``energy`` (eV, total), ``forces`` (eV/Å) and, for structures with a cell,
``stress`` (eV/Å³, ASE sign convention); ``config_type`` in ``atoms.info`` names the
kind of structure:

* ``cu-emt``: fcc Cu labelled with ASE's EMT — bulk MD at 300–1200 K, strained and
  sheared cells, vacancies, (100)/(111) slabs and clusters; plus a hot
  out-of-distribution set (bulk MD at 1600–2000 K) and a few unlabelled starting
  structures for MD.
* ``molecules-gfn2``: small H/C/N/O molecules sampled with Langevin MD at 300–600 K
  run with GFN2-xTB itself (tblite, imported only when this set is built).
* ``dimers-gfn2``: dimers of rigid polar molecules (H2O, HCN, CH3CN, LiF) in random
  orientations, from contact to 11 Å between their closest atoms (beyond a 5 Å
  cutoff the interaction is dipolar electrostatics), labelled with GFN2-xTB; plus
  rigid separation scans (``scan.xyz``) for the long-range SOAP-BPNN evidence.

Everything is seeded and deterministic. Run from anywhere:

    python scripts/make_datasets.py [--only cu-emt|molecules-gfn2|dimers-gfn2]
                                    [--out data]
"""

from __future__ import annotations

import os

# tblite parallelises with OpenMP; for molecules of <= 10 atoms extra threads only
# add overhead. Must be set before numpy / tblite load their thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.build import bulk, fcc100, fcc111, molecule  # noqa: E402
from ase.calculators.calculator import Calculator  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.cluster import Icosahedron, Octahedron  # noqa: E402
from ase.constraints import FixCom  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from ase.md.velocitydistribution import Stationary  # noqa: E402
from ase.optimize import BFGS  # noqa: E402

SEED = 20250101
SPLITS = ("train", "val", "test")
VAL_FRACTION = TEST_FRACTION = 0.1
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data"

# --- Cu / EMT settings -------------------------------------------------------------
CU_A = 3.61  # Å (EMT's own minimum is 3.59 Å, so a=3.61 cells carry ~2 GPa tension)
CU_TIMESTEP_FS = 5.0
CU_FRICTION_PER_FS = 0.01
CU_EQUIL_STEPS = 200  # 1 ps
CU_STRIDE = 20  # 100 fs between samples

# --- molecules / GFN2-xTB settings -------------------------------------------------
MOL_TIMESTEP_FS = 0.5
MOL_FRICTION_PER_FS = 0.02
MOL_EQUIL_STEPS = 400  # 200 fs
MOL_STRIDE = 10  # 5 fs between samples
MOL_TEMPERATURES_K = (300, 400, 500, 600)
MOL_REPLICAS = 2  # independent trajectories per (molecule, temperature)
MOL_SAMPLES_PER_TRAJ = 5
MOLECULES = (
    "CH4",
    "H2O",
    "NH3",
    "H2CO",
    "HCN",
    "CH3OH",
    "H3CNH2",
    "C2H4",
    "C2H6",
    "HCOOH",
    "CH3CHO",
    "CH3CN",
    "CH3CH2OH",
    "glycine",
)

# --- dimers / GFN2-xTB settings ----------------------------------------------------
DIMER_MONOMERS = ("H2O", "HCN", "CH3CN", "LiF")  # dipoles 1.9-6 D in GFN2
DIMERS_PER_PAIR = 100  # random orientations per (unordered) monomer pair
DIMER_GAP_RANGE = (2.5, 11.0)  # closest intermolecular distance, Å, uniform
# rigid monomers at their GFN2 minimum: a 0.01 Å rattle gave 0.7 eV/Å intramolecular
# forces and tens of meV of strain energy per dimer, which buried the 1-20 meV
# interaction energies the long-range evidence is about (see models/README.md)
DIMER_RATTLE = 0.0  # Å
SCAN_GAPS = np.arange(2.5, 15.01, 0.5)  # closest intermolecular distance, Å


def rng_for(*keys: int | str) -> np.random.Generator:
    """Independent, reproducible generator for one part of the data (keyed by name)."""
    ints = [
        k if isinstance(k, int) else int.from_bytes(k.encode(), "little") % 2**32
        for k in keys
    ]
    return np.random.default_rng([SEED, *ints])


# --- labelling and sampling --------------------------------------------------------


def labelled(
    atoms: Atoms, calc: Calculator, config_type: str, stress: bool, **info
) -> Atoms:
    """Bare copy of ``atoms`` (no momenta/constraints) carrying ``calc``'s labels.

    The copy gets a SinglePointCalculator with energy, forces and (if ``stress``)
    stress, so ``ase.io.write(format="extxyz")`` stores them under those keys.
    """
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.calc = calc
    results = {"energy": out.get_potential_energy(), "forces": out.get_forces()}
    if stress:
        results["stress"] = out.get_stress()
    out.calc = SinglePointCalculator(out, **results)
    out.info["config_type"] = config_type
    out.info.update(info)
    return out


def thermal_momenta(atoms: Atoms, temperature_K: float, rng) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_K`` with zero total momentum."""
    kT = units.kB * temperature_K
    sigma = np.sqrt(atoms.get_masses() * kT)[:, None]
    atoms.set_momenta(sigma * rng.standard_normal(size=(len(atoms), 3)))
    Stationary(atoms)


def langevin_samples(
    atoms: Atoms,
    calc: Calculator,
    temperature_K: float,
    n_samples: int,
    rng: np.random.Generator,
    *,
    config_type: str,
    stress: bool,
    timestep_fs: float,
    friction_per_fs: float,
    n_equil: int,
    stride: int,
) -> list[Atoms]:
    """Langevin MD (centre of mass fixed) at ``temperature_K``; label every ``stride``
    steps after ``n_equil`` equilibration steps."""
    atoms = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    atoms.calc = calc
    atoms.set_constraint(FixCom())
    thermal_momenta(atoms, temperature_K, rng)
    dyn = Langevin(
        atoms,
        timestep_fs * units.fs,
        temperature_K=temperature_K,
        friction=friction_per_fs / units.fs,
        fixcm=False,
        rng=rng,
    )
    dyn.run(n_equil)
    samples = []
    for _ in range(n_samples):
        dyn.run(stride)
        samples.append(
            labelled(atoms, calc, config_type, stress, temperature_K=temperature_K)
        )
    return samples


def cu_md(atoms: Atoms, temperature_K: float, n_samples: int, rng, config_type: str):
    """EMT Langevin samples of a Cu structure (stress whenever it has a cell)."""
    return langevin_samples(
        atoms,
        EMT(),
        temperature_K,
        n_samples,
        rng,
        config_type=config_type,
        stress=atoms.cell.volume > 0,
        timestep_fs=CU_TIMESTEP_FS,
        friction_per_fs=CU_FRICTION_PER_FS,
        n_equil=CU_EQUIL_STEPS,
        stride=CU_STRIDE,
    )


def rattled(atoms: Atoms, sigma: float, rng: np.random.Generator) -> Atoms:
    """Copy with Gaussian displacements of standard deviation ``sigma`` (Å)."""
    out = atoms.copy()
    out.positions += rng.normal(0.0, sigma, size=out.positions.shape)
    return out


# --- Cu structures -----------------------------------------------------------------


def cu_fcc(n: int) -> Atoms:
    """n x n x n conventional fcc Cu cell (4 n^3 atoms) at a = 3.61 Å."""
    return bulk("Cu", "fcc", a=CU_A, cubic=True).repeat(n)


def cu_slab(facet: str) -> Atoms:
    """4-layer 3x3 Cu(100) or Cu(111) slab, 6 Å vacuum each side, pbc (T, T, F)."""
    build = {"100": fcc100, "111": fcc111}[facet]
    slab = build("Cu", size=(3, 3, 4), a=CU_A, vacuum=6.0)
    return Atoms(slab.numbers, slab.positions, cell=slab.cell, pbc=(True, True, False))


def as_cluster(atoms: Atoms) -> Atoms:
    """Free cluster: centred at the origin, no cell, pbc False."""
    pos = atoms.positions - atoms.positions.mean(axis=0)
    return Atoms(atoms.numbers, pos, pbc=False)


def cu_cutout(rng: np.random.Generator, n_min: int = 20, n_max: int = 50) -> Atoms:
    """Sphere cut from bulk fcc around a random centre, with n_min..n_max atoms."""
    block = cu_fcc(5)
    centre = block.cell.diagonal() / 2
    while True:
        c = centre + rng.uniform(-CU_A / 2, CU_A / 2, size=3)
        r = rng.uniform(4.0, 6.5)
        keep = np.linalg.norm(block.positions - c, axis=1) < r
        if n_min <= keep.sum() <= n_max:
            return as_cluster(block[keep])


def cu_bulk_md() -> list[Atoms]:
    """Bulk fcc MD at 300/600/900/1200 K: 35 samples of 32 atoms + 10 of 108 each."""
    frames = []
    for T in (300, 600, 900, 1200):
        ct = f"bulk_md_{T}K"
        frames += cu_md(cu_fcc(2), T, 35, rng_for("bulk32", T), ct)
        frames += cu_md(cu_fcc(3), T, 10, rng_for("bulk108", T), ct)
    return frames


def cu_strained() -> list[Atoms]:
    """32-atom cells: 25 with ±4 % volume change, 25 with random symmetric strains
    (|e_ij| <= 2 %), 40 sheared (one or more off-diagonal e_ij up to ±6 %); all
    rattled by 0.03–0.08 Å."""
    rng = rng_for("strain")
    frames = []

    def strained(eps: np.ndarray, config_type: str) -> Atoms:
        atoms = cu_fcc(2)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        atoms = rattled(atoms, rng.uniform(0.03, 0.08), rng)
        return labelled(atoms, EMT(), config_type, stress=True)

    for dv in np.linspace(-0.04, 0.04, 25):
        frames.append(strained(((1 + dv) ** (1 / 3) - 1) * np.eye(3), "strained"))
    for _ in range(25):
        e = rng.uniform(-0.02, 0.02, size=(3, 3))
        frames.append(strained((e + e.T) / 2, "strained"))
    for _ in range(40):
        e = np.zeros((3, 3))
        pairs = [(0, 1), (0, 2), (1, 2)]
        for k in rng.choice(3, size=rng.integers(1, 4), replace=False):
            i, j = pairs[k]
            e[i, j] = e[j, i] = rng.uniform(-0.06, 0.06)
        frames.append(strained(e, "sheared"))
    return frames


def cu_vacancy() -> list[Atoms]:
    """MD at 300/600/900 K of 32-atom cells minus 1 or 2 atoms and a 108-atom cell
    minus 2 atoms (8 samples each)."""
    frames = []
    for T in (300, 600, 900):
        for n_cells, n_vac in ((2, 1), (2, 2), (3, 2)):
            rng = rng_for("vacancy", T, n_cells, n_vac)
            atoms = cu_fcc(n_cells)
            del atoms[rng.choice(len(atoms), size=n_vac, replace=False).tolist()]
            frames += cu_md(atoms, T, 8, rng, "vacancy")
    return frames


def cu_slabs() -> list[Atoms]:
    """Per facet: MD at 300/600/900 K (12 samples each) and 8 slabs rattled by
    0.03–0.10 Å."""
    frames = []
    for facet in ("100", "111"):
        ct = f"slab{facet}"
        for T in (300, 600, 900):
            frames += cu_md(cu_slab(facet), T, 12, rng_for(ct, T), ct)
        rng = rng_for(ct, "rattle")
        for _ in range(8):
            atoms = rattled(cu_slab(facet), rng.uniform(0.03, 0.10), rng)
            frames.append(labelled(atoms, EMT(), ct, stress=True))
    return frames


def cu_clusters() -> list[Atoms]:
    """Six clusters (13–55 atoms): MD at 300 and 600 K (5 samples each) plus 10
    rattled by 0.03–0.10 Å; no cell, so no stress."""
    rng = rng_for("cluster")
    shapes = {
        "ico13": as_cluster(Icosahedron("Cu", 2, latticeconstant=CU_A)),
        "ico55": as_cluster(Icosahedron("Cu", 3, latticeconstant=CU_A)),
        "octa19": as_cluster(Octahedron("Cu", 3, latticeconstant=CU_A)),
        "truncocta38": as_cluster(Octahedron("Cu", 4, 1, latticeconstant=CU_A)),
        "cutout_a": cu_cutout(rng),
        "cutout_b": cu_cutout(rng),
    }
    frames = []
    for name, atoms in shapes.items():
        for T in (300, 600):
            for f in cu_md(atoms, T, 5, rng_for("cluster", name, T), "cluster"):
                f.info["shape"] = name
                frames.append(f)
    names = list(shapes)
    for _ in range(10):
        name = names[rng.integers(len(names))]
        atoms = rattled(shapes[name], rng.uniform(0.03, 0.10), rng)
        frames.append(labelled(atoms, EMT(), "cluster", stress=False, shape=name))
    return frames


def cu_hot() -> list[Atoms]:
    """Out-of-distribution 32-atom bulk MD at 1600/1800/2000 K (14 + 13 + 13)."""
    frames = []
    for T, n in ((1600, 14), (1800, 13), (2000, 13)):
        frames += cu_md(cu_fcc(2), T, n, rng_for("hot", T), f"hot_md_{T}K")
    return frames


# --- molecules ---------------------------------------------------------------------


def gfn2() -> Calculator:
    """GFN2-xTB through tblite's ASE calculator (energies in eV, forces in eV/Å)."""
    from tblite.ase import TBLite  # lazy: only this set needs tblite

    return TBLite(method="GFN2-xTB", verbosity=0)


def glycine() -> Atoms:
    """Neutral glycine from rough hand-placed coordinates, relaxed with GFN2-xTB."""
    symbols = "NCCOOHHHHH"
    positions = [
        (-1.32, 0.87, 0.00),  # N
        (0.00, 0.25, 0.00),  # C alpha
        (1.10, 1.28, 0.00),  # C carboxyl
        (0.90, 2.48, 0.00),  # O (=O)
        (2.33, 0.74, 0.00),  # O (-OH)
        (2.98, 1.46, 0.00),  # H on O
        (0.10, -0.39, 0.88),  # H on C alpha
        (0.10, -0.39, -0.88),  # H on C alpha
        (-1.40, 1.47, 0.81),  # H on N
        (-1.40, 1.47, -0.81),  # H on N
    ]
    atoms = Atoms(symbols, positions)
    atoms.calc = gfn2()
    BFGS(atoms, logfile=None).run(fmax=0.01, steps=300)
    return Atoms(atoms.numbers, atoms.positions)


def build_molecule(name: str) -> Atoms:
    """Starting geometry: ASE's g2 collection, or the relaxed glycine above."""
    atoms = glycine() if name == "glycine" else molecule(name)
    return Atoms(atoms.numbers, atoms.positions, pbc=False)


def molecules_md(name: str) -> list[Atoms]:
    """GFN2-xTB Langevin samples of one molecule at each temperature and replica."""
    start = build_molecule(name)
    frames = []
    for T in MOL_TEMPERATURES_K:
        for rep in range(MOL_REPLICAS):
            frames += langevin_samples(
                start,
                gfn2(),
                T,
                MOL_SAMPLES_PER_TRAJ,
                rng_for("molecule", name, T, rep),
                config_type=name,
                stress=False,
                timestep_fs=MOL_TIMESTEP_FS,
                friction_per_fs=MOL_FRICTION_PER_FS,
                n_equil=MOL_EQUIL_STEPS,
                stride=MOL_STRIDE,
            )
    return frames


# --- dimers ------------------------------------------------------------------------


def relaxed_monomer(name: str) -> Atoms:
    """``ase.build.molecule(name)`` relaxed with GFN2-xTB, centre of mass at 0."""
    atoms = Atoms(molecule(name).numbers, molecule(name).positions)
    atoms.calc = gfn2()
    BFGS(atoms, logfile=None).run(fmax=0.005, steps=300)
    return Atoms(atoms.numbers, atoms.positions - atoms.get_center_of_mass())


def closest_distance(a: Atoms, b: Atoms) -> float:
    """Shortest distance (Å) between an atom of ``a`` and an atom of ``b``."""
    distances = np.linalg.norm(a.positions[:, None] - b.positions[None], axis=-1)
    return float(distances.min())


def place_at_gap(a: Atoms, b: Atoms, direction: np.ndarray, gap: float) -> Atoms:
    """``a`` + ``b`` moved along ``direction`` until the closest intermolecular
    distance is ``gap`` (Å), within 1e-4 Å."""
    distance = gap + 3.0
    for _ in range(100):
        moved = b.copy()
        moved.positions += distance * direction
        error = gap - closest_distance(a, moved)
        if abs(error) < 1e-4:
            break
        distance += error  # the closest distance grows about 1:1 with distance
    dimer = a + moved
    return Atoms(dimer.numbers, dimer.positions, pbc=False)


def dimers(monomers: dict[str, Atoms]) -> list[Atoms]:
    """Randomly oriented dimers of every monomer pair (rigid monomers unless
    DIMER_RATTLE), with the closest intermolecular distance uniform in
    DIMER_GAP_RANGE. Each frame stores the summed GFN2 energy of its two monomers
    (``monomer_energy``, eV; rigid monomers only) for interaction energies."""
    from scipy.spatial.transform import Rotation

    frames = []
    names = list(monomers)
    alone = {}
    for name, m in monomers.items():
        m = m.copy()
        m.calc = gfn2()
        alone[name] = m.get_potential_energy()
    for first in range(len(names)):
        for second in range(first, len(names)):
            a_name, b_name = names[first], names[second]
            rng = rng_for("dimer", a_name, b_name)
            for _ in range(DIMERS_PER_PAIR):
                a, b = monomers[a_name].copy(), monomers[b_name].copy()
                for m in (a, b):
                    m.positions = Rotation.random(random_state=rng).apply(m.positions)
                    if DIMER_RATTLE:
                        m.positions += rng.normal(
                            0.0, DIMER_RATTLE, size=m.positions.shape
                        )
                direction = rng.normal(size=3)
                gap = rng.uniform(*DIMER_GAP_RANGE)
                dimer = place_at_gap(a, b, direction / np.linalg.norm(direction), gap)
                extra = (
                    {}
                    if DIMER_RATTLE
                    else {"monomer_energy": alone[a_name] + alone[b_name]}
                )
                frames.append(
                    labelled(
                        dimer,
                        gfn2(),
                        f"{a_name}-{b_name}",
                        stress=False,
                        gap=round(gap, 4),
                        monomer_atoms=len(a),
                        **extra,
                    )
                )
    return frames


def dimer_scans(monomers: dict[str, Atoms]) -> list[Atoms]:
    """Rigid scans of the closest intermolecular distance over SCAN_GAPS for four
    fixed orientations; each frame stores the monomers' summed GFN2 energy
    (``monomer_energy``, eV) so that interaction energies can be read off."""
    from scipy.spatial.transform import Rotation

    rng = rng_for("scan")
    frames = []
    pairs = (("LiF", "LiF"), ("H2O", "H2O"), ("HCN", "CH3CN"), ("LiF", "H2O"))
    for a_name, b_name in pairs:
        a, b = monomers[a_name].copy(), monomers[b_name].copy()
        b.positions = Rotation.random(random_state=rng).apply(b.positions)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        monomer_energy = 0.0
        for m in (a, b):
            m.calc = gfn2()
            monomer_energy += m.get_potential_energy()
        for gap in SCAN_GAPS:
            dimer = place_at_gap(a, b, direction, gap)
            frames.append(
                labelled(
                    dimer,
                    gfn2(),
                    f"{a_name}-{b_name}",
                    stress=False,
                    gap=round(float(gap), 4),
                    monomer_atoms=len(a),
                    monomer_energy=monomer_energy,
                )
            )
    return frames


# --- splitting, writing, reporting -------------------------------------------------


def stratified_split(
    frames: list[Atoms], rng: np.random.Generator
) -> dict[str, list[Atoms]]:
    """80/10/10 split within each config_type (at least one per split), shuffled."""
    by_type: dict[str, list[int]] = {}
    for i, f in enumerate(frames):
        by_type.setdefault(f.info["config_type"], []).append(i)
    idx: dict[str, list[int]] = {s: [] for s in SPLITS}
    for members in by_type.values():
        members = rng.permutation(members).tolist()
        n_val = max(1, round(VAL_FRACTION * len(members)))
        n_test = max(1, round(TEST_FRACTION * len(members)))
        idx["val"] += members[:n_val]
        idx["test"] += members[n_val : n_val + n_test]
        idx["train"] += members[n_val + n_test :]
    return {s: [frames[i] for i in rng.permutation(idx[s])] for s in SPLITS}


def write_frames(path: Path, frames: list[Atoms]) -> None:
    """Write extxyz and check that it reads back with the same labels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, frames, format="extxyz")
    back = ase.io.read(path, ":", format="extxyz")
    assert len(back) == len(frames), path
    for a, b in zip(frames, back, strict=True):
        assert b.info["config_type"] == a.info["config_type"]
        assert set(b.calc.results) == set(a.calc.results), (path, b.calc.results)
        # extxyz stores 8 decimals
        np.testing.assert_allclose(b.get_forces(), a.get_forces(), atol=1e-7)
    print(
        f"  wrote {path} ({len(frames)} structures, {path.stat().st_size / 1e6:.2f} MB)"
    )


def stats(frames: list[Atoms]) -> dict[str, float]:
    """Force RMS (eV/Å) and energy-per-atom statistics (eV/atom) of a list of frames."""
    forces = np.concatenate([f.get_forces().ravel() for f in frames])
    e_atom = np.array([f.get_potential_energy() / len(f) for f in frames])
    return {
        "n": len(frames),
        "atoms": sum(len(f) for f in frames),
        "f_rms": float(np.sqrt(np.mean(forces**2))),
        "f_max": float(np.abs(forces).max()),
        "e_mean": float(e_atom.mean()),
        "e_std": float(e_atom.std()),
        "e_min": float(e_atom.min()),
        "e_max": float(e_atom.max()),
    }


def composition_residual_std(frames: list[Atoms]) -> float:
    """Std (eV/atom) of energies after a least-squares per-element reference fit."""
    elements = sorted({z for f in frames for z in f.numbers})
    counts = np.array([[np.sum(f.numbers == z) for z in elements] for f in frames])
    energies = np.array([f.get_potential_energy() for f in frames])
    refs, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    natoms = counts.sum(axis=1)
    return float(np.std((energies - counts @ refs) / natoms))


def summarize(name: str, splits: dict[str, list[Atoms]], extra=None) -> None:
    """Print counts per config_type per split and force / energy statistics.

    ``extra`` maps a row label to frames outside the splits (e.g. hot.xyz).
    """
    everything = [f for s in SPLITS for f in splits[s]]
    types = sorted({f.info["config_type"] for f in everything})
    rows = [(t, [f for f in everything if f.info["config_type"] == t]) for t in types]
    rows += list((extra or {}).items())
    width = max(len(label) for label, _ in rows) + 2
    print(f"\n=== {name} ===")
    header = f"{'config_type':<{width}}" + "".join(f"{s:>7}" for s in SPLITS)
    header += f"{'total':>7}{'F_rms':>8}{'E/N mean':>10}{'E/N std':>9}"
    print(header)
    for label, frames in rows:
        counts = [
            sum(f.info["config_type"] == label for f in splits[s]) for s in SPLITS
        ]
        cells = [str(c) if label in types else "-" for c in counts]
        st = stats(frames)
        print(
            f"{label:<{width}}"
            + "".join(f"{c:>7}" for c in cells)
            + f"{st['n']:>7}{st['f_rms']:>8.3f}{st['e_mean']:>10.4f}{st['e_std']:>9.4f}"
        )
    print("-" * len(header))
    for label, frames in [*((s, splits[s]) for s in SPLITS), ("all", everything)]:
        st = stats(frames)
        print(
            f"{label:<6} n={st['n']:4d} atoms={st['atoms']:6d}  F_rms={st['f_rms']:.3f}"
            f" |F|max={st['f_max']:.2f} eV/Å  E/N: mean={st['e_mean']:.4f}"
            f" std={st['e_std']:.4f} [{st['e_min']:.4f}, {st['e_max']:.4f}] eV/atom"
        )
    print("(F_rms in eV/Å, E/N in eV/atom)")


def timed(label: str, fn: Callable[[], list[Atoms]], timings: dict) -> list[Atoms]:
    """Run one generator, record and print its wall time."""
    t0 = time.perf_counter()
    frames = fn()
    timings[label] = time.perf_counter() - t0
    print(
        f"  {label:<28} {len(frames):4d} structures  {timings[label]:7.1f} s",
        flush=True,
    )
    return frames


def make_cu_emt(out: Path, timings: dict) -> None:
    """Build data/cu-emt: train/val/test, hot.xyz and structures/."""
    print("cu-emt: EMT labels for Cu", flush=True)
    frames = []
    for label, fn in (
        ("cu bulk MD", cu_bulk_md),
        ("cu strained/sheared", cu_strained),
        ("cu vacancy MD", cu_vacancy),
        ("cu slabs", cu_slabs),
        ("cu clusters", cu_clusters),
    ):
        frames += timed(label, fn, timings)
    hot = timed("cu hot MD (OOD)", cu_hot, timings)

    root = out / "cu-emt"
    splits = stratified_split(frames, rng_for("split", "cu-emt"))
    for s in SPLITS:
        write_frames(root / f"{s}.xyz", splits[s])
    write_frames(root / "hot.xyz", hot)

    structures = {
        "cu-fcc-108.xyz": cu_fcc(3),
        "cu-fcc-32.xyz": cu_fcc(2),
        "cu-slab-111.xyz": cu_slab("111"),
        "cu-cluster-ico55.xyz": as_cluster(Icosahedron("Cu", 3, latticeconstant=CU_A)),
    }
    (root / "structures").mkdir(parents=True, exist_ok=True)
    for fname, atoms in structures.items():
        ase.io.write(root / "structures" / fname, atoms, format="extxyz")
    print(f"  wrote {root / 'structures'}/ ({', '.join(structures)})")
    summarize("cu-emt", splits, extra={"hot.xyz (OOD)": hot})


def make_molecules_gfn2(out: Path, timings: dict) -> None:
    """Build data/molecules-gfn2: train/val/test from GFN2-xTB Langevin MD."""
    print("molecules-gfn2: GFN2-xTB (tblite) labels for H/C/N/O molecules", flush=True)
    check = molecule("CH4")
    check.calc = gfn2()
    e_hartree = check.get_potential_energy() / units.Hartree
    assert -4.3 < e_hartree < -4.0, f"tblite CH4 energy {e_hartree} Eh: units?"
    frames = []
    for name in MOLECULES:
        frames += timed(f"molecule {name}", lambda n=name: molecules_md(n), timings)
    root = out / "molecules-gfn2"
    splits = stratified_split(frames, rng_for("split", "molecules-gfn2"))
    for s in SPLITS:
        write_frames(root / f"{s}.xyz", splits[s])
    summarize("molecules-gfn2", splits)
    print(
        "E/N std after a per-element linear reference fit: "
        f"{composition_residual_std(frames):.4f} eV/atom"
    )


def make_dimers_gfn2(out: Path, timings: dict) -> None:
    """Build data/dimers-gfn2: train/val/test of random dimers and scan.xyz."""
    print("dimers-gfn2: GFN2-xTB (tblite) labels for polar dimers", flush=True)
    monomers = timed_monomers(timings)
    frames = timed("random dimers", lambda: dimers(monomers), timings)
    scans = timed("separation scans", lambda: dimer_scans(monomers), timings)
    root = out / "dimers-gfn2"
    splits = stratified_split(frames, rng_for("split", "dimers-gfn2"))
    for s in SPLITS:
        write_frames(root / f"{s}.xyz", splits[s])
    write_frames(root / "scan.xyz", scans)
    summarize("dimers-gfn2", splits, extra={"scan.xyz": scans})
    for s in SPLITS:
        separated = sum(f.info["gap"] > 5.0 for f in splits[s])
        print(f"{s}: {separated} of {len(splits[s])} dimers with a gap beyond 5 Å")


def timed_monomers(timings: dict) -> dict[str, Atoms]:
    """The relaxed monomers of DIMER_MONOMERS, timed."""
    t0 = time.perf_counter()
    monomers = {name: relaxed_monomer(name) for name in DIMER_MONOMERS}
    timings["monomers"] = time.perf_counter() - t0
    return monomers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=("cu-emt", "molecules-gfn2", "dimers-gfn2"),
        help="build one set only",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: data/)"
    )
    args = parser.parse_args()

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.only in (None, "cu-emt"):
        make_cu_emt(args.out, timings)
    if args.only in (None, "molecules-gfn2"):
        make_molecules_gfn2(args.out, timings)
    if args.only in (None, "dimers-gfn2"):
        make_dimers_gfn2(args.out, timings)
    print(f"\ntotal time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
