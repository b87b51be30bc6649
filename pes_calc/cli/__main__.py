"""``python -m pes_calc.cli`` (e.g. under ``torchrun -m pes_calc.cli train ...``)."""

from pes_calc.cli import main

main()
