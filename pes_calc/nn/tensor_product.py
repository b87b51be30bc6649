"""Edge convolution Σ_j w_ij ⊙ (x_j ⊗ Y(r̂_ij)): an e3nn 'uvu' tensor product of
neighbor features with edge harmonics, summed onto the centre atoms.

`EdgeTensorProduct` computes exactly what ``scatter_sum(tp(x[j], Y, w), i, N)`` does for
an ``e3nn.o3.TensorProduct`` ``tp`` whose paths are all weighted 'uvu' paths, but
arranged for speed on per-edge tensors, which dominate the cost of NequIP:

- the Clebsch-Gordan coefficients of all paths that start from one input irrep are
  first contracted with the harmonics, (E, 9) @ (9, D (2l₁+1)), so each input irrep
  costs one batched matmul (E, D, 2l₁+1) @ (E, 2l₁+1, u) instead of one einsum per path;
- channels u are the innermost axis, and paths are grouped by output l, so the per-edge
  weights (E, p, u) multiply by broadcasting along contiguous channels;
- no per-edge tensor is sliced (slicing makes autograd allocate and zero-fill a full
  gradient per slice); only the aggregated (N, ...) features are rearranged into e3nn's
  layout at the end;
- edges run in chunks through the `edge_paths` operator, so each chunk's products are
  summed while still in cache, and nothing per edge is kept for the backward pass,
  which recomputes the chunk instead: recomputing in cache is cheaper than writing the
  products out and reading them back (NequIP at 2048 Cu atoms: 1.5x faster, with
  2.5-3x less memory, than plain autograd over the same chunks).
"""

from typing import List, Optional, Tuple

import torch
from e3nn import o3
from torch import Tensor, nn

from pes_calc.nn.scatter import scatter_sum

# edges per chunk: a chunk's per-edge tensors stay in cache from product to sum
EDGE_CHUNK = 2048


def _path_messages(
    neighbor_features: Tensor,
    harmonics: Tensor,
    path_weights: Tensor,
    coupling: Tensor,
    group_paths: List[int],
    group_dims: List[int],
) -> List[Tensor]:
    """Messages of the paths from one input irrep, one (E, p, 2l₃+1, u) tensor per
    output degree, from (E, 2l₁+1, u) features, (E, sh) harmonics, (E, P, u) weights."""
    num_edges, ir_dim = neighbor_features.shape[0], neighbor_features.shape[1]
    # contract the harmonics first: (E, D, 2l₁+1) is small next to (E, D, u)
    coupled_harmonics = (harmonics @ coupling).reshape(num_edges, -1, ir_dim)
    products = torch.bmm(coupled_harmonics, neighbor_features)  # (E, D, u)
    widths = [p * d for p, d in zip(group_paths, group_dims)]
    group_products = products.split(widths, dim=1)
    group_weights = path_weights.split(group_paths, dim=1)
    messages: List[Tensor] = []
    for k in range(len(group_paths)):
        group = group_products[k].reshape(num_edges, group_paths[k], group_dims[k], -1)
        messages.append(group * group_weights[k].unsqueeze(2))
    return messages


def _chunks(num_edges: int, size: int) -> List[Tuple[int, int]]:
    return [(a, min(a + size, num_edges)) for a in range(0, num_edges, size)]


@torch.library.custom_op("pes_calc::edge_paths", mutates_args=())
def edge_paths(
    features: Tensor,
    harmonics: Tensor,
    path_weights: Tensor,
    centres: Tensor,
    neighbors: Tensor,
    coupling: Tensor,
    group_paths: List[int],
    group_dims: List[int],
    edge_chunk: int,
) -> List[Tensor]:
    """Σ over edges of `_path_messages` onto the centres, (N, p, 2l₃+1, u) per output
    degree, from (N, 2l₁+1, u) features: edges in chunks, nothing per edge kept."""
    num_nodes, mul = features.shape[0], features.shape[2]
    aggregated = [
        features.new_zeros(num_nodes, p, d, mul)
        for p, d in zip(group_paths, group_dims)
    ]
    for a, b in _chunks(centres.shape[0], edge_chunk):
        messages = _path_messages(
            features.index_select(0, neighbors[a:b]),
            harmonics[a:b],
            path_weights[a:b],
            coupling,
            group_paths,
            group_dims,
        )
        for total, part in zip(aggregated, messages):
            total.index_add_(0, centres[a:b], part)
    return aggregated


@edge_paths.register_fake
def _(
    features,
    harmonics,
    path_weights,
    centres,
    neighbors,
    coupling,
    group_paths,
    group_dims,
    edge_chunk,
):  # noqa: ANN001, ANN202
    num_nodes, mul = features.shape[0], features.shape[2]
    return [
        features.new_empty(num_nodes, p, d, mul)
        for p, d in zip(group_paths, group_dims)
    ]


def _keep_for_recomputation(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs[:6])
    ctx.groups = (inputs[6], inputs[7], inputs[8])


def _edge_paths_backward(ctx, grads: List[Optional[Tensor]]):  # noqa: ANN001, ANN202
    """Recompute each chunk's messages with autograd and pull the centres' gradients
    back through them. Under create_graph (training on forces) the recomputation is
    itself recorded, so the result can be differentiated again."""
    features, harmonics, path_weights, centres, neighbors, coupling = ctx.saved_tensors
    group_paths, group_dims, edge_chunk = ctx.groups
    create_graph = torch.is_grad_enabled()
    grad_features = torch.zeros_like(features)
    grad_harmonics: List[Tensor] = []
    grad_weights: List[Tensor] = []
    for a, b in _chunks(centres.shape[0], edge_chunk):
        with torch.enable_grad():
            inputs = [
                features.index_select(0, neighbors[a:b]),
                harmonics[a:b],
                path_weights[a:b],
            ]
            if not create_graph:
                inputs = [x.detach().requires_grad_() for x in inputs]
            else:
                inputs = [x if x.requires_grad else x.requires_grad_() for x in inputs]
            messages = _path_messages(*inputs, coupling, group_paths, group_dims)
            outputs = [m for m, g in zip(messages, grads) if g is not None]
            upstream = [g.index_select(0, centres[a:b]) for g in grads if g is not None]
            grad_x, grad_h, grad_w = torch.autograd.grad(
                outputs, inputs, upstream, create_graph=create_graph, allow_unused=True
            )
        grad_x = torch.zeros_like(inputs[0]) if grad_x is None else grad_x
        if create_graph:  # out of place, so that autograd can record it
            grad_features = grad_features.index_add(0, neighbors[a:b], grad_x)
        else:
            grad_features.index_add_(0, neighbors[a:b], grad_x)
        grad_harmonics.append(torch.zeros_like(inputs[1]) if grad_h is None else grad_h)
        grad_weights.append(torch.zeros_like(inputs[2]) if grad_w is None else grad_w)
    if not grad_harmonics:  # no edges
        grad_harmonics, grad_weights = (
            [torch.zeros_like(harmonics)],
            [torch.zeros_like(path_weights)],
        )
    return (
        grad_features,
        torch.cat(grad_harmonics),
        torch.cat(grad_weights),
        None,
        None,
        None,
        None,
        None,
        None,
    )


edge_paths.register_autograd(
    _edge_paths_backward, setup_context=_keep_for_recomputation
)


class _InputIrrepPaths(nn.Module):
    """All paths that start from one input irrep (mul u, degree l₁), grouped by
    output l."""

    def __init__(
        self, coupling: Tensor, mul: int, ir_dim: int, groups: List[Tuple[int, int]]
    ):
        super().__init__()
        # (harmonics dim, D · (2l₁+1)): path weight × Wigner 3j of every path, by group
        self.register_buffer("coupling", coupling, persistent=False)
        self.mul = mul
        self.ir_dim = ir_dim
        self.group_paths = [p for p, _ in groups]  # number of paths per output degree
        self.group_dims = [d for _, d in groups]  # 2l₃+1
        self.num_paths = sum(self.group_paths)


class EdgeTensorProduct(nn.Module):
    """Gather-tensor-product-scatter with the paths and normalisation of an e3nn
    ``TensorProduct`` (weighted 'uvu' paths, per-edge weights, one path per output)."""

    def __init__(self, tensor_product: o3.TensorProduct):
        super().__init__()
        tp = tensor_product
        if any(mul != 1 for mul, _ in tp.irreps_in2):
            raise ValueError(
                "EdgeTensorProduct needs multiplicity 1 for the second input"
            )
        if any(
            ins.connection_mode != "uvu" or not ins.has_weight
            for ins in tp.instructions
        ):
            raise ValueError("EdgeTensorProduct supports only weighted 'uvu' paths")
        outputs = [ins.i_out for ins in tp.instructions]
        if len(set(outputs)) != len(outputs) or len(outputs) != len(tp.irreps_out):
            raise ValueError(
                "EdgeTensorProduct needs exactly one path per output irrep"
            )
        sh_slices = tp.irreps_in2.slices()

        muls = {mul for mul, _ in tp.irreps_out}
        if len(muls) != 1:
            raise ValueError("EdgeTensorProduct needs one multiplicity for all paths")
        blocks = []
        block_inputs: List[int] = []
        # e3nn's path index of each path, block by block and group by group
        path_order: List[int] = []
        # (block, group, path within group) of each output irrep, in output order
        locations: List[Tuple[int, int, int]] = [(0, 0, 0)] * len(tp.irreps_out)
        for i1, (mul, ir1) in enumerate(tp.irreps_in1):
            paths = [
                (k, ins) for k, ins in enumerate(tp.instructions) if ins.i_in1 == i1
            ]
            if not paths:
                continue
            degrees = sorted({tp.irreps_out[ins.i_out].ir.l for _, ins in paths})
            groups: List[Tuple[int, int]] = []
            rows: List[Tensor] = []
            for group, l3 in enumerate(degrees):
                in_group = [
                    (k, ins) for k, ins in paths if tp.irreps_out[ins.i_out].ir.l == l3
                ]
                groups.append((len(in_group), 2 * l3 + 1))
                # (sh, p, 2l₃+1, 2l₁+1), so the products come out as (p, 2l₃+1, u)
                block = torch.zeros(
                    tp.irreps_in2.dim,
                    len(in_group),
                    2 * l3 + 1,
                    ir1.dim,
                    dtype=torch.float64,
                )
                for p, (k, ins) in enumerate(in_group):
                    l2 = tp.irreps_in2[ins.i_in2].ir.l
                    # (m1, m2, m3) → (m2, m3, m1)
                    w3j = o3.wigner_3j(ir1.l, l2, l3, dtype=torch.float64)
                    w3j = w3j.permute(1, 2, 0)
                    block[sh_slices[ins.i_in2], p] = ins.path_weight * w3j
                    path_order.append(k)
                    locations[ins.i_out] = (len(blocks), group, p)
                rows.append(block.reshape(tp.irreps_in2.dim, -1))
            coupling = torch.cat(rows, dim=1)
            blocks.append(
                _InputIrrepPaths(
                    coupling.to(torch.get_default_dtype()), mul, ir1.dim, groups
                )
            )
            block_inputs.append(i1)
        self.blocks = nn.ModuleList(blocks)
        self.block_inputs = block_inputs  # which input irrep each block reads
        self.block_paths = [block.num_paths for block in blocks]
        self.register_buffer("path_order", torch.tensor(path_order), persistent=False)
        self.input_dims = [mul_ir.dim for mul_ir in tp.irreps_in1]
        self.locations = locations
        self.mul = muls.pop()
        self.num_paths = len(tp.instructions)
        # edges in chunks through the edge_paths operator; False: plain autograd over
        # all edges at once (prepare_for_export)
        self.chunked = True
        self.edge_chunk = EDGE_CHUNK

    def prepare_for_export(self) -> None:
        """All edges at once, with plain autograd: under export the edge count is
        symbolic, and so would be the number of chunks (and the chunked operator is
        Python, which a compiled package cannot call)."""
        self.chunked = False

    def forward(
        self,
        node_features: Tensor,
        harmonics: Tensor,
        weights: Tensor,
        edge_index: Tensor,
    ) -> Tensor:
        """(N, irreps_in1), (E, irreps_in2), (E, weight_numel), (2, E)
        → (N, irreps_out): Σ over edges i←j of the tensor product of x_j with the
        edge's harmonics."""
        num_nodes = node_features.shape[0]
        num_edges = edge_index.shape[1]
        # (E, P, u) in block order: one gather here, none per block
        weights = weights.reshape(num_edges, self.num_paths, self.mul)
        block_weights = weights.index_select(1, self.path_order).split(
            self.block_paths, dim=1
        )
        inputs = node_features.split(self.input_dims, dim=1)
        centres, neighbors = edge_index[0], edge_index[1]
        aggregated: List[List[Tensor]] = []
        for k, block in enumerate(self.blocks):
            # (N, 2l₁+1, u): channels innermost, as in the products
            features = inputs[self.block_inputs[k]].reshape(
                num_nodes, block.mul, block.ir_dim
            )
            features = features.transpose(1, 2).contiguous()
            if self.chunked:
                aggregated.append(
                    torch.ops.pes_calc.edge_paths(
                        features,
                        harmonics,
                        block_weights[k],
                        centres,
                        neighbors,
                        block.coupling,
                        block.group_paths,
                        block.group_dims,
                        self.edge_chunk,
                    )
                )
            else:
                messages = _path_messages(
                    features.index_select(0, neighbors),
                    harmonics,
                    block_weights[k],
                    block.coupling,
                    block.group_paths,
                    block.group_dims,
                )
                aggregated.append(
                    [scatter_sum(m, centres, num_nodes) for m in messages]
                )
        # node-level rearrangement into e3nn's layout: (N, u, 2l+1) per output irrep
        pieces: List[Tensor] = []
        for k, group, path in self.locations:
            pieces.append(
                aggregated[k][group][:, path].transpose(1, 2).reshape(num_nodes, -1)
            )
        return torch.cat(pieces, dim=1)
