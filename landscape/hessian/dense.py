"""The dense Hessian of a small space, column by column: H = [H e₁, …, H eₙ].

n Hessian-vector products and n² numbers: for spaces of up to a few thousand coordinates (the
digits MLP, a small LoRA model), where exact eigenvalues (``torch.linalg.eigvalsh``) and the exact
trace check the iterative estimators. Larger spaces raise an error before any work.
"""
from __future__ import annotations

import functools
import numpy as np
import torch
from tqdm.auto import tqdm

from .linalg import as_operator
from .operator import run_on_hessian

__all__ = ["dense_matrix", "dense_hessian", "DENSE_MAX_DIM"]

DENSE_MAX_DIM = 5000


def _check_size(n: int, max_dim: int) -> None:
    if n > max_dim:
        raise ValueError(
            f"a dense Hessian of {n} coordinates ({n * n * 8 / 2**30:.1f} GiB in fp64, {n} products) exceeds "
            f"max_dim={max_dim}; use landscape.hessian_eigenvalues / hessian_trace / hessian_density (matrix-free), "
            "a smaller space (e.g. 'lora' instead of 'merged'), or raise max_dim deliberately")


def dense_matrix(op, *, max_dim: int = DENSE_MAX_DIM, progress: bool = False) -> np.ndarray:
    """The n×n float64 matrix of a square linear operator, one product per column (not symmetrized)."""
    op = as_operator(op)
    n = op.shape[1]
    _check_size(n, max_dim)
    out = np.empty((n, n))
    e = np.zeros(n)
    for j in tqdm(range(n), desc="dense Hessian", unit="col", disable=not progress, dynamic_ncols=True, leave=False):
        e[j] = 1.0
        out[:, j] = op.matvec(e)
        e[j] = 0.0
    return out


def dense_hessian(model, loss, space="lora", *, max_dim: int = DENSE_MAX_DIM, progress: bool = True,
                  **operator_options) -> torch.Tensor:
    """The Hessian of ``loss`` in ``space`` as a dense n×n tensor in the model's dtype.

    Coordinates in the order of ``Space.to_vector``; for tangent / normal the ambient merged
    coordinates (the matrix is P H P). Arguments as for :func:`landscape.hessian_eigenvalues`.

    Raises:
        ValueError: the space has more than ``max_dim`` coordinates — before any work.
    """
    matrix = functools.partial(dense_matrix, max_dim=max_dim, progress=progress)
    run = run_on_hessian(model, loss, space, matrix, name="dense Hessian", progress=False,
                         check=lambda n: _check_size(n, max_dim), **operator_options)
    return torch.from_numpy(run.result).to(dtype=run.operator.dtype_torch)
