"""Smooth cutoff functions f(r): 1 well inside the cutoff, 0 beyond it, continuous
with continuous first derivative so that forces stay continuous."""

import math

import torch
from torch import Tensor


def shifted_cosine_cutoff(r: Tensor, cutoff: float, width: float) -> Tensor:
    """1 for r < cutoff - width, then ½(1 + cos(π (r - cutoff + width) / width)),
    0 for r ≥ cutoff. SOAP's (and metatrain's) smooth cutoff; r and lengths in Å."""
    onset = cutoff - width
    # clamp the cosine argument so gradients are exactly zero outside the switch
    x = torch.clamp((r - onset) / width, 0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * x))


def shifted_cosine_cutoff_slope(r: Tensor, cutoff: float, width: float) -> Tensor:
    """d/dr of `shifted_cosine_cutoff` (per Å): -½ (π/width) sin(π x) in the switch."""
    x = torch.clamp((r - cutoff + width) / width, 0.0, 1.0)
    return -0.5 * (math.pi / width) * torch.sin(math.pi * x)


def polynomial_envelope(r: Tensor, cutoff: float, p: float = 6.0) -> Tensor:
    """NequIP's polynomial envelope u(r/cutoff) (Klicpera et al.): a triple root at
    the cutoff, so u and its first two derivatives vanish there (not the third,
    whatever p); 0 beyond it."""
    x = torch.clamp(r / cutoff, 0.0, 1.0)
    envelope = (
        1.0
        - (p + 1.0) * (p + 2.0) / 2.0 * torch.pow(x, p)
        + p * (p + 2.0) * torch.pow(x, p + 1.0)
        - p * (p + 1.0) / 2.0 * torch.pow(x, p + 2.0)
    )
    return envelope * (r < cutoff).to(r.dtype)
