"""The equiangular reduction of the self-attention dynamics on the sphere
(docs/theory.md, section 10): tokens whose pairwise inner products are all equal
stay so, and the common inner product solves a scalar ODE."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._custom_types import ScalarLike


def _check_n_rho(n, rho):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"`n` must be a positive int, got {n!r}")
    rho = float(rho)
    if n > 1 and not (-1.0 / (n - 1) <= rho <= 1.0):
        raise ValueError(
            f"`rho` must lie in [-1/(n-1), 1] = [{-1.0 / (n - 1):.6g}, 1] for n = {n} "
            f"equiangular unit vectors, got {rho!r}"
        )
    return rho


def equiangular_points(
    n: int,
    dim: int,
    rho: ScalarLike,
    *,
    key: PRNGKeyArray | None = None,
    dtype=None,
) -> Float[Array, "n dim"]:
    """`n` unit vectors in `R^dim` with all pairwise inner products equal to `rho`.

    In `R^n` they are `x_i = sqrt(1 - rho) e_i + c 1` with
    `c = (sqrt(1 + (n - 1) rho) - sqrt(1 - rho)) / n` (`1` the all-ones vector):
    then `|x_i|^2 = 1` and `<x_i, x_j> = rho`. They are padded with zeros to
    `R^dim` and, if `key` is given, rotated by a uniformly random orthogonal
    matrix.

    **Arguments:**

    - `n`: number of tokens.
    - `dim`: token dimension, `dim >= n` (the Gram matrix
      `(1 - rho) I + rho 1 1^T` has rank `n` unless `rho = -1/(n-1)` or `1`).
    - `rho`: the common inner product, in `[-1/(n-1), 1]`.
    - `key`: optional `jax.random` key for a random rotation.
    - `dtype`: floating dtype (default: JAX's default float).

    **Returns:** `(n, dim)` points on the unit sphere.

    **Raises:** `ValueError` for `dim < n` or `rho` out of range.

    See docs/theory.md, section 10.
    """
    rho = _check_n_rho(n, rho)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < n:
        raise ValueError(f"`dim` must be an int >= n = {n}, got {dim!r}")
    dtype = jnp.result_type(float) if dtype is None else dtype
    a = np.sqrt(1.0 - rho)
    c = (np.sqrt(1.0 + (n - 1) * rho) - a) / n
    x = a * np.eye(n, dim) + c * np.pad(np.ones((n, n)), ((0, 0), (0, dim - n)))
    x = jnp.asarray(x, dtype)
    if key is not None:
        g = jax.random.normal(key, (dim, dim), dtype)
        q, r = jnp.linalg.qr(g)
        q = q * jnp.sign(jnp.diag(r))[None, :]  # Haar-distributed (Mezzadri's correction)
        x = x @ q.T
    return x


def equiangular_velocity(
    rho: Float[ArrayLike, "..."] | float, beta: ScalarLike, n: int
) -> Float[np.ndarray, "..."]:
    """The right-hand side of the equiangular ODE (softmax attention, `Q = K = V =
    O = I`, one head, uniform weights, tokens on the sphere):

        rho' = 2 e^{beta rho} (1 - rho) ((n - 1) rho + 1) / (e^beta + (n - 1) e^{beta rho})
             = 2 (1 - rho) ((n - 1) rho + 1) / (e^{beta (1 - rho)} + n - 1),

    evaluated in the second form, which does not overflow at large `beta`.
    `beta = 0` (uniform attention) is allowed. See docs/theory.md, section 10.
    """
    rho = np.asarray(rho, dtype=np.float64)
    with np.errstate(over="ignore"):  # e^{beta (1 - rho)} = inf gives the right limit, 0
        out = 2.0 * (1.0 - rho) * ((n - 1) * rho + 1.0) / (np.exp(beta * (1.0 - rho)) + (n - 1))
    return np.asarray(out)


def equiangular_rho(
    ts: Float[ArrayLike, " T"] | Sequence[float],
    rho0: ScalarLike,
    beta: ScalarLike,
    n: int,
    *,
    rtol: float = 1e-13,
    atol: float = 1e-15,
) -> Float[np.ndarray, " T"]:
    """The common inner product `rho(t)` of `n` equiangular tokens, from the scalar
    ODE of [`mfattn.equiangular_velocity`][], integrated with
    `scipy.integrate.solve_ivp` (DOP853, order 8) at tight tolerance: a
    reference, independent of mfattn's own solvers, for
    [`mfattn.solve_limit`][] on the sphere.

    **Arguments:**

    - `ts`: non-decreasing times `(T,)` with `ts[0] >= 0`; `rho(0) = rho0`.
    - `rho0`: initial inner product in `[-1/(n-1), 1]`.
    - `beta`: inverse temperature `>= 0`.
    - `n`: number of tokens.
    - `rtol`, `atol`: solver tolerances (the defaults give a global error of
      about `1e-12` on the `beta = 0` closed form).

    **Returns:** `rho` at `ts`, float64 numpy array `(T,)`.

    For `beta = 0` the solution is explicit: `r(t) = r(0) e^{2t}` with
    `r = (1 + (n - 1) rho) / (1 - rho)` (the tests use it).
    See docs/theory.md, section 10.
    """
    from scipy.integrate import solve_ivp

    rho0 = _check_n_rho(n, rho0)
    beta = float(beta)
    if not (np.isfinite(beta) and beta >= 0):
        raise ValueError(f"`beta` must be a finite number >= 0, got {beta!r}")
    ts = np.asarray(ts, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0 or ts[0] < 0 or np.any(np.diff(ts) < 0):
        raise ValueError("`ts` must be a non-empty, non-decreasing 1-D array of times >= 0")
    if ts[-1] == 0:
        return np.full(ts.shape, rho0)
    sol = solve_ivp(
        lambda t, y: equiangular_velocity(y, beta, n),
        (0.0, float(ts[-1])),
        [rho0],
        method="DOP853",
        t_eval=ts,
        rtol=rtol,
        atol=atol,
    )
    if not sol.success:  # pragma: no cover - scipy failure
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    return sol.y[0]
