"""Kept as an alias: the architecture benchmark is now scripts/benchmark.py.

``python scripts/benchmark_architectures.py ARGS`` runs ``scripts/benchmark.py ARGS``;
``MODELS``, ``copper`` and ``time_calls`` are re-exported for scripts/benchmark_llpr.py.
"""

from __future__ import annotations

from benchmark import MODELS, copper, main, time_calls

__all__ = ["MODELS", "copper", "time_calls"]

if __name__ == "__main__":
    main()
