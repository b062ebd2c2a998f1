"""Spectral normalization: scale a weight to a target largest singular value, or fold torch's.

The largest singular value comes from Lanczos (ARPACK's implicitly restarted Lanczos on the
smaller Gram matrix WᵀW or WWᵀ, through matrix-vector products only), which reaches a tight
relative tolerance even when σ1 ≈ σ2, where plain power iteration needs ~1/(1 - σ2/σ1) steps.

>>> from wtool.transforms import Context, Transform
>>> w = np.diag([4.0, 2.0, 1.0])
>>> Transform.create("spectral-norm", {"method": "svd"}).apply(w, Context.of(w)).diagonal()
array([1.  , 0.5 , 0.25])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from wtool.tensor import TensorInfo
from wtool.transforms._layout import (
    AlongDim,
    Fold,
    FoldIntoOne,
    join,
    matrix_around,
    normalize_dim,
    split_name,
)
from wtool.transforms.base import Context, Group, param

#: Below this many rows or columns an exact SVD is cheaper than any iteration.
EXACT_BELOW = 32


def exact_sigma(matrix: np.ndarray) -> float:
    """The largest singular value by a full (values-only) SVD."""
    if matrix.size == 0:
        return 0.0
    return float(np.linalg.svd(matrix, compute_uv=False)[0])


def lanczos_sigma(matrix: np.ndarray, tol: float, restarts: int, rng: np.random.Generator) -> float | None:
    """The largest singular value to relative tolerance `tol`, or None if Lanczos did not converge.

    ARPACK stops when the Ritz pair's residual is below tol·θ for θ ≈ σ1², which bounds the
    relative error of σ1 by tol/2. Products with the matrix run in its own dtype (float32
    stays float32: half the memory traffic); ARPACK's vectors are float64.
    """
    from scipy.sparse.linalg import (  # 0.15 s to import: only when used
        ArpackError,
        LinearOperator,
        eigsh,
    )

    rows, cols = matrix.shape
    if min(rows, cols) < EXACT_BELOW:
        return exact_sigma(matrix)
    if not np.any(matrix):
        return 0.0
    dtype = matrix.dtype
    if cols <= rows:
        def gram(x: np.ndarray) -> np.ndarray:
            return matrix.T @ (matrix @ x.ravel().astype(dtype, copy=False))
    else:
        def gram(x: np.ndarray) -> np.ndarray:
            return matrix @ (matrix.T @ x.ravel().astype(dtype, copy=False))
    size = min(rows, cols)
    operator = LinearOperator((size, size), matvec=lambda x: gram(x).astype(np.float64), dtype=np.float64)
    try:
        values, vectors = eigsh(operator, k=1, which="LA", tol=tol, maxiter=restarts, v0=rng.standard_normal(size))
    except ArpackError:
        return None
    vector = vectors[:, 0].astype(dtype)
    image = matrix @ vector if cols <= rows else matrix.T @ vector
    # ‖W v‖ and √θ are both Rayleigh-quotient bounds (error quadratic in the vector's); rounding may split them.
    return float(max(np.linalg.norm(image.astype(np.float64)), np.sqrt(max(values[0], 0.0))))


@dataclass(frozen=True)
class SpectralNormParams:
    target: float = param(1.0, "the largest singular value after scaling", low=0.0, low_open=True)
    dim: int = param(0, "axis kept as rows when the weight is seen as a matrix (shape[dim], -1); "
                        "0 for Conv/Linear, 1 for ConvTranspose")
    clamp: bool = param(False, "only scale down: leave tensors whose σ <= target alone")
    method: str = param("power", "power: Lanczos iteration to `tol` (fast on large matrices); svd: exact",
                        choices=("power", "svd"))
    tol: float = param(1e-6, "relative tolerance on σ for method=power", low=0.0, low_open=True, high=0.1)
    iters: int = param(300, "cap on Lanczos restarts for method=power (each ~20 products with W and Wᵀ); "
                            "falls back to an exact SVD when reached", low=1)
    seed: int = param(0, "seed of the Lanczos start vector (mixed with the tensor name)", low=0)


class SpectralNorm(AlongDim, name="spectral-norm"):
    """Scale each weight so its largest singular value equals `target` (or at most `target` with clamp)."""

    Params = SpectralNormParams
    formula = ("W' = target · W/σ(W), σ = largest singular value of W reshaped to (shape[dim], -1); "
               "clamp: only if σ > target")
    applies_to = "float tensors with ndim >= 2 that have axis `dim`; records sigma_before/sigma_after"
    example = "spectral-norm:target=1.0,method=power"
    spreads_nonfinite = True

    def sigma(self, matrix: np.ndarray, ctx: Context) -> float:
        """σ1 of `matrix` by the chosen method; notes a fallback to SVD in `ctx.extras`."""
        if not np.all(np.isfinite(matrix)):
            return float("nan")
        if self.params.method == "svd":
            return exact_sigma(matrix)
        found = lanczos_sigma(matrix, self.params.tol, self.params.iters, ctx.rng(self.params.seed))
        if found is None:
            ctx.extras["sigma_method"] = (f"svd (Lanczos did not reach tol={self.params.tol:g} "
                                          f"in {self.params.iters} restarts)")
            return exact_sigma(matrix)
        return found

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        p = self.params
        sigma = self.sigma(matrix_around(array, normalize_dim(p.dim, array.ndim)), ctx)
        if sigma == 0.0 or (p.clamp and sigma <= p.target):
            scale = 1.0
        else:
            scale = p.target / sigma
        ctx.extras["sigma_before"] = sigma
        ctx.extras["sigma_after"] = sigma * scale
        return array * array.dtype.type(scale) if scale != 1.0 else array.copy()


# ---------------------------------------------------------------- fold torch's spectral norm

@dataclass(frozen=True)
class _Spectral:
    weight_in: str
    u: str
    v: str
    weight: str
    dim: int


@dataclass(frozen=True)
class FoldSpectralNormParams:
    dim: int | None = param(None, "axis of W that u runs along (1 for ConvTranspose); none: infer from "
                                  "len(u) and len(v), 0 where ambiguous")


class FoldSpectralNorm(FoldIntoOne, name="fold-spectral-norm"):
    """Fold torch spectral-norm tensors (weight_orig/_u/_v or parametrizations) into the eval-mode weight."""

    Params = FoldSpectralNormParams
    formula = "P.weight = W/σ with σ = uᵀ·(W_mat·v), W_mat = W with dim moved first, reshaped (shape[dim], -1)"
    applies_to = ("P.X_orig + P.X_u + P.X_v (torch.nn.utils.spectral_norm) and P.parametrizations.X.original + "
                  ".0._u + .0._v; formed when the original weight is selected")
    example = "fold-spectral-norm"
    spreads_nonfinite = True

    def find(self, info: TensorInfo, by_name: Mapping[str, TensorInfo]) -> Fold | None:
        found = self._companions(info, by_name)
        if found is None:
            return None
        u_name, v_name, weight, problem = found
        dim, how = (None, "")
        if not problem:
            dim, how = self._dim(info, by_name[u_name], by_name[v_name])
            if dim is None:
                problem = how
        return Fold((u_name, v_name), weight, f"{weight} <- {info.name}, {u_name}, {v_name} (dim {dim}{how})",
                    _Spectral(info.name, u_name, v_name, weight, dim), problem)

    @staticmethod
    def _companions(info: TensorInfo, by_name: Mapping[str, TensorInfo]) -> tuple[str, str, str, str] | None:
        """(u, v, folded weight, problem) when `info` is the original weight of a spectral norm."""
        parts = info.name.split(".")
        if len(parts) >= 3 and parts[-3] == "parametrizations" and parts[-1] == "original":
            prefix, leaf = ".".join(parts[:-3]), parts[-2]
            base = join(prefix, "parametrizations", leaf)
            u_name, v_name = join(base, "0", "_u"), join(base, "0", "_v")
            if u_name not in by_name or v_name not in by_name:
                return None
            stacked = any(n.startswith(base + ".1.") for n in by_name)
            return u_name, v_name, join(prefix, leaf), "more than one parametrization is stacked" if stacked else ""
        prefix, leaf = split_name(info.name)
        if not leaf.endswith("_orig") or leaf == "_orig":
            return None
        base = leaf[:-5]
        u_name, v_name = join(prefix, base + "_u"), join(prefix, base + "_v")
        if u_name not in by_name:
            return None
        problem = ""
        if join(prefix, base + "_mask") in by_name:
            problem = f"both {u_name} (spectral norm) and {join(prefix, base + '_mask')} (pruning) are present"
        elif v_name not in by_name:
            problem = f"{v_name} is missing (checkpoints from torch < 1.1 store only u)"
        return u_name, v_name, join(prefix, base), problem

    def _dim(self, weight: TensorInfo, u: TensorInfo, v: TensorInfo) -> tuple[int | None, str]:
        """The axis u runs along and a remark on how it was chosen, or (None, why not)."""
        if u.ndim != 1 or v.ndim != 1:
            return None, f"{u.name} and {v.name} must be vectors"
        fits = [a for a in range(weight.ndim)
                if weight.shape[a] == u.shape[0] and weight.numel == u.shape[0] * v.shape[0]]
        if self.params.dim is not None:
            try:
                dim = normalize_dim(self.params.dim, weight.ndim)
            except ValueError as err:
                return None, str(err)
            if dim not in fits:
                return None, (f"len(u)={u.shape[0]}, len(v)={v.shape[0]} do not fit dim={self.params.dim} "
                              f"of {list(weight.shape)}")
            return dim, ", given"
        if not fits:
            return None, f"len(u)={u.shape[0]}, len(v)={v.shape[0]} fit no axis of {list(weight.shape)}"
        if len(fits) == 1:
            return fits[0], ""
        dim = 0 if 0 in fits else fits[0]
        return dim, f", ambiguous among {fits}: pass dim= to choose"

    def apply_group(self, group: Group, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec: _Spectral = group.data
        weight = arrays[spec.weight_in]
        matrix = matrix_around(weight, spec.dim).astype(np.float64)
        sigma = float(arrays[spec.u].astype(np.float64) @ (matrix @ arrays[spec.v].astype(np.float64)))
        return {spec.weight: (weight / sigma).astype(weight.dtype, copy=False)}
