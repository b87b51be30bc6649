"""Train the models shipped in models/ from their configs, and tabulate them.

    python scripts/train_models.py                 # every models/*.yaml, then the table
    python scripts/train_models.py --only cu-emt-soap-bpnn
    python scripts/train_models.py --table         # only rewrite the table

Each config ``models/NAME.yaml`` trains in ``runs/NAME/`` (rerunning resumes an
interrupted run); the best model is copied to ``models/NAME.safetensors``. The
table in models/README.md (between the TABLE markers) lists each model's test
errors, read back from the model files' metadata, and its training time.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
BEGIN, END = "<!-- TABLE BEGIN -->", "<!-- TABLE END -->"


def train_one(name: str) -> None:
    from pes_calc.train import load_config, train

    config = MODELS / f"{name}.yaml"
    result = train(load_config(config), ROOT / "runs" / name)
    shutil.copyfile(result.model_path, MODELS / f"{name}.safetensors")
    print(f"{name}: {result.test_metrics}", flush=True)


def table() -> str:
    """A markdown table of every shipped model file's metadata."""
    from pes_calc.io import load_model, read_metadata

    rows = [
        "| model | architecture | parameters | test E (meV/atom) | test F (meV/Å) "
        "| test σ (meV/Å³) | epochs | training time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(MODELS.glob("*.safetensors")):
        metadata = read_metadata(path)
        # trainable weights only: the file also holds buffers (spline tables, ...)
        parameters = sum(
            p.numel() for p in load_model(path).parameters() if p.requires_grad
        )
        training = metadata.get("training", {})
        test = training.get("test_metrics", {})

        def milli(key: str, test: dict = test) -> str:
            return f"{1000 * test[key]:.2f}" if key in test else "–"

        minutes = training.get("training_time_s", float("nan")) / 60
        rows.append(
            f"| `{path.name}` | {metadata['architecture']}"
            f"{' + LLPR' if metadata.get('llpr') else ''} | {parameters:,} | "
            f"{milli('energy_per_atom_rmse')} | {milli('forces_rmse')} | "
            f"{milli('stress_rmse')} | {training.get('best_epoch', '–')} / "
            f"{training.get('epochs_run', '–')} | {minutes:.0f} min |"
        )
    return "\n".join(rows)


def write_table() -> None:
    readme = MODELS / "README.md"
    text = readme.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{readme} has no {BEGIN} marker")
    new = re.sub(
        re.escape(BEGIN) + ".*?" + re.escape(END),
        lambda _: f"{BEGIN}\n{table()}\n{END}",
        text,
        flags=re.S,
    )
    readme.write_text(new)
    print(table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="config name (repeatable)")
    parser.add_argument("--table", action="store_true", help="only rewrite the table")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.table:
        names = args.only or sorted(p.stem for p in MODELS.glob("*.yaml"))
        for name in names:
            if not (MODELS / f"{name}.yaml").exists():
                sys.exit(f"no config models/{name}.yaml")
            train_one(name)
    write_table()


if __name__ == "__main__":
    main()
