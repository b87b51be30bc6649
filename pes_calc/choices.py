"""The spellings accepted wherever a dtype or a device is taken.

``torch.float64`` or ``"float64"`` (also ``"float32"``, ``"double"``, ``"float"``),
``torch.device("cuda:0")`` or ``"cuda:0"``; anything else is a ``ValueError`` that
lists the choices.

>>> as_dtype("float64"), as_dtype(torch.float32), as_dtype(None)
(torch.float64, torch.float32, None)
>>> as_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}
_ALIASES = {"float": torch.float32, "double": torch.float64}


def as_dtype(
    value: torch.dtype | str | None, name: str = "dtype"
) -> torch.dtype | None:
    """A float dtype from a torch dtype or its name; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str):
        key = value.removeprefix("torch.")
        if key in DTYPES or key in _ALIASES:
            return DTYPES.get(key) or _ALIASES[key]
    raise ValueError(
        f"{name} {value!r} is not one pes_calc runs in; choose torch.float32, "
        "torch.float64, 'float32' or 'float64'"
    )


def as_device(
    value: torch.device | str | None, name: str = "device"
) -> torch.device | None:
    """A torch device from a device or its name (``"cpu"``, ``"cuda"``,
    ``"cuda:1"``); None stays None."""
    if value is None or isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            pass
    raise ValueError(
        f"{name} {value!r} is not a device; choose 'cpu', 'cuda', 'cuda:N' or a "
        "torch.device"
    )
