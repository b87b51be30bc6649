"""Constructing modules in float64 without touching torch's default dtype.

Constants computed at construction (e3nn's Clebsch-Gordan coefficients, torch-spex's
spline tables) and initial weights follow torch's default dtype. Built in float32, a
float64 model would be accurate (and equivariant) to ~1e-8 only, so models are
constructed in float64 and then cast. `torch.set_default_dtype` would do that for
the whole process, every thread and library included; `float64_construction` does
it for the tensors created inside its block, in this thread only (a torch function
mode, like ``with torch.device(...)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["float64_construction"]

# factories whose result is floating point when no dtype is given: the dtype is set
# before the call, so random ones draw the same numbers as a float64 default would
_FLOATING_FACTORIES = {
    torch.empty,
    torch.zeros,
    torch.ones,
    torch.randn,
    torch.rand,
    torch.eye,
    torch.linspace,
    torch.logspace,
    torch.empty_strided,
    torch.normal,
}
# factories whose result type depends on their data: rerun in float64 when they
# gave the default floating type
_DATA_FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.asarray,
    torch.full,
    torch.arange,
}


class float64_construction(TorchFunctionMode):  # noqa: N801 (used like a function)
    """``with float64_construction(): module = Module(...)``: tensors created in the
    block get float64 where they would get torch's default floating dtype (given
    explicitly or implied). `torch.get_default_dtype` is unchanged throughout."""

    def __enter__(self) -> float64_construction:
        self._default = torch.get_default_dtype()
        return super().__enter__()

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        default = self._default
        if default == torch.float64:
            return func(*args, **kwargs)
        # the default named explicitly (dtype=torch.get_default_dtype(), .to(it))
        if kwargs.get("dtype") == default:
            kwargs["dtype"] = torch.float64
        args = tuple(torch.float64 if arg is default else arg for arg in args)
        if func in _FLOATING_FACTORIES and kwargs.get("dtype") is None:
            kwargs["dtype"] = torch.float64
        result = func(*args, **kwargs)
        if (
            func in _DATA_FACTORIES
            and kwargs.get("dtype") is None
            and isinstance(result, torch.Tensor)
            and result.dtype == default
        ):
            kwargs["dtype"] = torch.float64
            result = func(*args, **kwargs)
        return result
