"""Allegro's tensor-track building blocks: channels of weighted spherical harmonics
and the channel-wise ('uuu') tensor product of edge tensors with their centre's
environment, contracted per atom (see `ChannelTensorProduct`)."""

import math
from typing import List

import torch
from e3nn import o3
from torch import Tensor, nn

import pes_calc.nn.gather  # noqa: F401 (registers torch.ops.pes_calc.gathered_matvec)

__all__ = ["ChannelTensorProduct", "irrep_index", "weighted_harmonics"]


def weighted_harmonics(
    weights: Tensor, harmonics: Tensor, irrep_of_component: Tensor
) -> Tensor:
    """Channels of weighted spherical harmonics, channel-major: (E, C, Σ 2l+1).

    ``weights`` (E, C, n_irreps) scales each irrep block of ``harmonics`` (E, Σ 2l+1)
    per channel; ``irrep_of_component`` (Σ 2l+1,) names the irrep of each component.
    """
    return weights.index_select(-1, irrep_of_component) * harmonics.unsqueeze(1)


def irrep_index(irreps: o3.Irreps) -> Tensor:
    """(Σ 2l+1,) position in ``irreps`` of each component of one channel."""
    return torch.tensor(
        [k for k, (_, ir) in enumerate(irreps) for _ in range(ir.dim)], dtype=torch.long
    )


class ChannelTensorProduct(nn.Module):
    """Channel-wise ('uuu') tensor product of edge tensors with their centre's
    environment; path weights are per (path, channel) with ``tp_path_channel_coupling``,
    else one weight per path shared by channels.

    Both inputs and the output are channel-major, (rows, C, Σ 2l+1). The e3nn
    ``tensor_product`` holds the weights (and the state-dict layout); its paths are
    summed into one coupling tensor W[u, i, j, k], contracted with the environment
    per atom, M[n, u, i, k] = Σ_j Γ[n, u, j] W[u, i, j, k], so each edge costs one
    (Σ 2l+1)² matrix-vector product out[e, u] = V[e, u] · M[centre(e), u], not an
    outer product per path (e3nn's forward, ~3× slower and larger on CPU).
    """

    def __init__(
        self,
        irreps_1: o3.Irreps,
        irreps_2: o3.Irreps,
        irreps_out: o3.Irreps,
        instructions: list,
        coupling: bool,
    ):
        super().__init__()
        self.coupling = coupling
        self.tensor_product = o3.TensorProduct(
            irreps_1,
            irreps_2,
            irreps_out,
            instructions,
            internal_weights=coupling,
            shared_weights=True,
        )
        self.channels = irreps_out[0].mul
        num_paths = len(instructions)
        self.num_paths = num_paths
        self.path_weights = nn.Parameter(torch.randn(0 if coupling else num_paths))
        self.broadcast_contraction = False  # see prepare_for_export
        # per path: a scale (a Python float, kept exact in any model dtype) × a pattern
        # of Wigner 3j symbols in the (i, j, k) block of its irreps. Where e3nn's
        # forward uses exact constants (an l = 0 irrep, or 1 ⊗ 1 → 1) the pattern is
        # 0/±1 and the scale carries 1/√dim, so a float32 build cast to float64 agrees
        # with it too
        offsets = [
            [0] + [sum(ir.dim for _, ir in irreps[: k + 1]) for k in range(len(irreps))]
            for irreps in (irreps_1, irreps_2, irreps_out)
        ]
        dims = [offset[-1] for offset in offsets]
        patterns = torch.zeros(
            num_paths, dims[0], dims[1], dims[2], dtype=torch.float64
        )
        path_scales: List[float] = []
        for p, ins in enumerate(self.tensor_product.instructions):
            ls = (
                irreps_1[ins.i_in1].ir.l,
                irreps_2[ins.i_in2].ir.l,
                irreps_out[ins.i_out].ir.l,
            )
            (a1, b1), (a2, b2), (a3, b3) = [
                (o[k], o[k + 1])
                for o, k in zip(offsets, (ins.i_in1, ins.i_in2, ins.i_out))
            ]
            wigner = o3.wigner_3j(*ls, dtype=torch.float64)
            exact = (
                6.0 if ls == (1, 1, 1) else float(2 * max(ls) + 1) if 0 in ls else 0.0
            )
            if exact:
                wigner = torch.round(wigner * math.sqrt(exact))
            patterns[p, a1:b1, a2:b2, a3:b3] = wigner
            path_scales.append(
                ins.path_weight / math.sqrt(exact) if exact else ins.path_weight
            )
        self.register_buffer(
            "patterns", patterns.to(torch.get_default_dtype()), persistent=False
        )
        # a plain attribute, not a buffer: .to(float32) must not round the scales
        self.path_scales = torch.tensor(path_scales, dtype=torch.float64)

    def forward(self, x: Tensor, environment: Tensor, centre: Tensor) -> Tensor:
        """``x`` (E, C, D₁) edge tensors, ``environment`` (N, C, D₂) per atom,
        ``centre`` (E,) each edge's atom → (E, C, D_out)."""
        if self.coupling:
            weight = self.tensor_product.weight.view(self.num_paths, self.channels)
        else:
            weight = self.path_weights.unsqueeze(-1).expand(
                self.num_paths, self.channels
            )
        # a few numbers per call; a TorchScript artefact's .to() cannot recast a buffer
        # from the float64 master (on a GPU this is a small host-to-device copy)
        scales = self.path_scales.to(device=weight.device, dtype=weight.dtype)
        # W[u, j, (i, k)], so that the per-atom contraction over j is one batched matmul
        coupling = torch.einsum(
            "pu,pijk->ujik", weight * scales.unsqueeze(-1), self.patterns
        )
        dim_1, dim_out = self.patterns.shape[1], self.patterns.shape[3]
        per_atom = torch.bmm(
            environment.transpose(0, 1),
            coupling.reshape(self.channels, -1, dim_1 * dim_out),
        )
        per_atom = per_atom.transpose(0, 1).reshape(
            -1, self.channels, dim_1, dim_out
        )  # (N, C, D₁, D_out)
        if self.broadcast_contraction:
            # each edge reads its centre's matrices (E, C, D₁, D_out), which autograd
            # keeps
            per_edge = per_atom.index_select(0, centre)
            return (x.unsqueeze(-1) * per_edge).sum(-2)
        # the same in chunks of edges, keeping no per-edge matrices
        # (pes_calc/nn/gather.py)
        return torch.ops.pes_calc.gathered_matvec(x, per_atom, centre)

    def prepare_for_export(self) -> None:
        """Contract by gather, multiply and sum, which inductor fuses into one loop (the
        chunked operator of eager and TorchScript is Python, which a compiled package
        cannot call)."""
        self.broadcast_contraction = True
