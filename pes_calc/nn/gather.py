"""Per-edge products with a per-atom matrix, without a per-edge copy of the matrices.

``gathered_matvec(vectors, matrices, index)[e] = vectors[e] @ matrices[index[e]]``
is ``matmul(vectors.unsqueeze(-2), matrices.index_select(0, index))``, but autograd
would keep the gathered (E, ..., D₁, D₂) matrices for the backward pass: for Allegro
at 16384 Cu atoms 3.6 GB per layer. These operators run edges in chunks and define
their own derivatives, so nothing per edge is kept beyond the inputs. Each backward
is written with these operators again, so forces can be differentiated for training.

They are registered as ``torch.ops.pes_calc.*`` so that TorchScript can call them;
artefacts that use them import this module before loading (artefacts.REQUIRED_IMPORTS).
"""

import torch
from torch import Tensor

# edges per chunk: a chunk's gathered matrices stay in cache (16 channels × 9 × 9 floats
# per edge: 5 MB for 1024 edges)
EDGE_CHUNK = 1024


@torch.library.custom_op("pes_calc::gathered_matvec", mutates_args=())
def gathered_matvec(vectors: Tensor, matrices: Tensor, index: Tensor) -> Tensor:
    """(E, ..., D₁) vectors times the (N, ..., D₁, D₂) matrix of row ``index[e]``
    → (E, ..., D₂); ``...`` are batch dimensions (channels), the same for both."""
    num_edges = vectors.shape[0]
    out = vectors.new_empty(vectors.shape[:-1] + matrices.shape[-1:])
    for start in range(0, num_edges, EDGE_CHUNK):
        chunk = slice(start, start + EDGE_CHUNK)
        gathered = matrices.index_select(0, index[chunk])
        out[chunk] = (vectors[chunk].unsqueeze(-2) @ gathered).squeeze(-2)
    return out


@gathered_matvec.register_fake
def _(vectors: Tensor, matrices: Tensor, index: Tensor) -> Tensor:
    return vectors.new_empty(vectors.shape[:-1] + matrices.shape[-1:])


@torch.library.custom_op("pes_calc::scattered_outer", mutates_args=())
def scattered_outer(
    left: Tensor, right: Tensor, index: Tensor, num_rows: int
) -> Tensor:
    """Σ over edges e with ``index[e] = n`` of the outer products left[e] ⊗ right[e]:
    (E, ..., D₁), (E, ..., D₂) → (num_rows, ..., D₁, D₂)."""
    num_edges = left.shape[0]
    out = left.new_zeros((num_rows,) + left.shape[1:] + right.shape[-1:])
    for start in range(0, num_edges, EDGE_CHUNK):
        chunk = slice(start, start + EDGE_CHUNK)
        outer = left[chunk].unsqueeze(-1) * right[chunk].unsqueeze(-2)
        out.index_add_(0, index[chunk], outer)
    return out


@scattered_outer.register_fake
def _(left: Tensor, right: Tensor, index: Tensor, num_rows: int) -> Tensor:
    return left.new_empty((num_rows,) + left.shape[1:] + right.shape[-1:])


def _keep_inputs(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's signature)
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2])


def _matvec_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    vectors, matrices, index = ctx.saved_tensors
    grad_vectors = gathered_matvec(grad, matrices.transpose(-1, -2), index)
    grad_matrices = scattered_outer(vectors, grad, index, matrices.shape[0])
    return grad_vectors, grad_matrices, None


def _outer_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    left, right, index = ctx.saved_tensors
    # grad (N, ..., D₁, D₂): d/d left[e] = grad[index[e]] · right[e], and the transpose
    grad_left = gathered_matvec(right, grad.transpose(-1, -2), index)
    grad_right = gathered_matvec(left, grad, index)
    return grad_left, grad_right, None, None


gathered_matvec.register_autograd(_matvec_backward, setup_context=_keep_inputs)
scattered_outer.register_autograd(_outer_backward, setup_context=_keep_inputs)
