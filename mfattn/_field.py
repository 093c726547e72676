"""The mean-field attention velocity field and its closed-form derivatives.

Everything here is one forward route (`AttentionField._outputs`) and one
backward route (`AttentionField._pullback`) through a kernel object; the public
closed forms are those two routes evaluated at the right points with the right
weights (docs/theory.md, sections 1, 2 and 4).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float

from ._checks import as_float_array, check_beta
from ._kernels import AbstractAttentionKernel, resolve_kernel
from ._measure import EmpiricalMeasure, check_measure
from ._params import AttentionParams


def check_layer(measure: EmpiricalMeasure, params: AttentionParams, name="params"):
    """Check that `params` holds one layer `(H, d, k)` matching `measure`'s `d`."""
    check_measure(measure)
    if not isinstance(params, AttentionParams):
        raise TypeError(f"`{name}` must be an AttentionParams, got {type(params).__name__}")
    if params.Q.ndim != 3:
        raise ValueError(
            f"`{name}` must hold one layer, leaves of shape (H, d, k), got {params.Q.shape}"
        )
    if params.dim != measure.dim:
        raise ValueError(
            f"`{name}` has token dimension d={params.dim} but `measure` has d={measure.dim}"
        )


def _queries(x, d, name="x"):
    x = as_float_array(x, name, ndim=(1, 2))
    if x.shape[-1] != d:
        raise ValueError(f"`{name}` has dimension {x.shape[-1]}, expected d={d}")
    return x


def _project(x, W):
    """`x (m, d)`, `W (H, d, k)` -> `W^T x` per head, `(H, m, k)`."""
    return jnp.einsum("md,hdk->hmk", x, W)


def _assemble_grads(x, u, y, w, p, o, dq, dk, dv):
    """Per-head gradient map from the head-space cotangents, queries `x`
    (weights `u`, cotangents `p`), keys `y` (weights `w`):
    `dQ = sum_i u_i x_i dq_i^T`, `dK = sum_j w_j y_j dk_j^T`,
    `dV = sum_j w_j y_j dv_j^T`, `dO = sum_i u_i p_i o_i^T`."""
    return AttentionParams(
        Q=jnp.einsum("m,md,hmk->hdk", u, x, dq),
        K=jnp.einsum("n,nd,hnk->hdk", w, y, dk),
        V=jnp.einsum("n,nd,hnk->hdk", w, y, dv),
        O=jnp.einsum("m,md,hmk->hdk", u, p, o),
    )


class AttentionField(eqx.Module):
    """The multi-head attention velocity field `Gamma(x, mu; nu)`
    (docs/theory.md, sections 1-2).

    For one layer of `H` heads, `nu = (1/H) sum_h delta_{theta_h}` and

        Gamma(x, mu; nu) = (1/H) sum_h O_h V_h^T m_h(x),
        m_h(x) = int y a_h(x, y) mu(dy),  a_h(x, y) = exp(s_h(x, y)) / D_h(x),
        s_h(x, y) = beta <Q_h^T x, K_h^T y>.

    The softmax is computed stably, so that `beta = 1e3` on unit-scale tokens
    is finite. The discrete transformer and the limit both evaluate it through
    [`mfattn.AttentionVectorField`][].

    **Arguments:**

    - `beta`: inverse temperature, a positive scalar.
    - `kernel`: the backend, an [`mfattn.AbstractAttentionKernel`][]; default
      [`mfattn.AutoKernel`][]`()` (dense for short sequences, chunked beyond).
      Causal masking is a property of the kernel
      (`DenseKernel(causal=True)`): token `i` attends to tokens `j <= i` in the
      order of `measure.points`.
    - `mesh`, `chunk_size`: shortcuts: `chunk_size=c` means
      `kernel=ChunkedKernel(c)`, and `mesh=` wraps the kernel in
      [`mfattn.ShardedKernel`][] (queries sharded over the mesh's devices).
      `AttentionField(beta, c)` with an int `c` still means `chunk_size=c`.

    Methods take query points `x` of shape `(d,)` or `(m, d)`, an
    [`mfattn.EmpiricalMeasure`][], and one layer's heads (an
    [`mfattn.AttentionParams`][] with leaves `(H, d, k)`). Query points that are
    not atoms sit, for a causal kernel, after the last token (they see every
    token) unless `positions=` says otherwise.
    """

    beta: float | Float[Array, ""]
    kernel: AbstractAttentionKernel

    def __init__(
        self,
        beta,
        kernel: AbstractAttentionKernel | int | None = None,
        mesh: Mesh | None = None,
        *,
        chunk_size: int | None = None,
    ):
        if isinstance(kernel, int) and not isinstance(kernel, bool):
            kernel, chunk_size = None, kernel  # the old positional `chunk_size`
        self.beta = check_beta(beta)
        self.kernel = resolve_kernel(kernel, chunk_size, mesh)

    @property
    def causal(self) -> bool:
        return self.kernel.causal

    # ------------------------------------------------------------ the routes
    def _positions(self, n, m, positions, name="test_positions"):
        """Token positions `0..n-1` followed by those of `m` extra points."""
        if not self.kernel.uses_positions:
            return None
        tokens = jnp.arange(n)
        if m == 0:
            return tokens
        if positions is None:
            extra = jnp.full((m,), n)
        else:
            extra = jnp.asarray(positions)
            if extra.shape != (m,):
                raise ValueError(f"`{name}` must have shape ({m},), got {extra.shape}")
        return jnp.concatenate([tokens, extra.astype(tokens.dtype)])

    def _outputs(self, params, pts, n, w, pos):
        """Attention outputs `(o, aux)` of all points `pts` against the first `n`
        (the atoms, weights `w`)."""
        q = _project(pts, params.Q)
        k = _project(pts[:n], params.K)
        v = _project(pts[:n], params.V)
        kpos = None if pos is None else pos[:n]
        return self.kernel.forward(q, k, v, w, self.beta, pos, kpos)

    def _pullback(self, params, pts, w, u, pos, p, cache, num_keys=None):
        """The closed-form pullback of the velocities of all points `pts`
        (queries with weights `u`, zero for test points; cotangents `p`) against
        the keys `pts[:num_keys]` (default all; weights `w`, zero for probes):
        the bracket at every point (the query side at every point, the key side
        at the keys) and the per-head gradient map."""
        nk = pts.shape[0] if num_keys is None else num_keys
        kpts, kw = pts[:nk], w[:nk]
        kpos = None if pos is None else pos[:nk]
        q = _project(pts, params.Q)
        k = _project(kpts, params.K)
        v = _project(kpts, params.V)
        if cache is None:
            o, aux = self.kernel.forward(q, k, v, kw, self.beta, pos, kpos)
        else:
            o, aux = cache
        c = jnp.einsum("hdk,md->hmk", params.O, p)
        dq, dk, dv = self.kernel.backward(q, k, v, kw, o, aux, c, u, self.beta, pos, kpos)
        bracket = jnp.einsum("hdk,hmk->md", params.Q, dq)
        key_side = jnp.einsum("hdk,hnk->nd", params.K, dk) + jnp.einsum("hdk,hnk->nd", params.V, dv)
        bracket = bracket.at[:nk].add(key_side) / params.heads
        return bracket, _assemble_grads(pts, u, kpts, kw, p, o, dq, dk, dv)

    # ------------------------------------------------ solver-facing methods
    def forward(
        self,
        measure: EmpiricalMeasure,
        params: AttentionParams,
        test_points=None,
        *,
        return_cache: bool = False,
        test_positions=None,
    ):
        """Velocities of the atoms and of optional test points `z (m, d)`
        (test points are moved by the field but do not act on the measure).

        **Returns:** `(v_atoms (n, d), v_test (m, d) or None)`, and with
        `return_cache=True` a third element: the kernel's per-head outputs at
        all the points (for the default kernels `(o (H, n+m, k), lse (H, n+m))`,
        `O(n)` memory), which [`mfattn.AttentionField.backward`][] accepts as
        `cache` instead of recomputing them.
        """
        check_layer(measure, params)
        n = measure.num_points
        pts = measure.points
        m = 0
        if test_points is not None:
            pts = jnp.concatenate([pts, test_points], axis=0)
            m = test_points.shape[0]
        pos = self._positions(n, m, test_positions)
        o, aux = self._outputs(params, pts, n, measure.weights, pos)
        vel = jnp.einsum("hdk,hmk->md", params.O, o) / params.heads
        out = vel[:n], (None if test_points is None else vel[n:])
        return out + ((o, aux),) if return_cache else out

    def backward(
        self,
        measure: EmpiricalMeasure,
        params: AttentionParams,
        p,
        test_points=None,
        test_p=None,
        cache=None,
        *,
        test_positions=None,
        probes: bool = False,
    ):
        """One step of the closed-form adjoint (docs/theory.md, section 4).

        With `p` the rescaled adjoints of the atoms, returns the bracket

            b_i = grad_x Gamma(x_i)^T p_i + sum_j w_j d_mu Gamma(x_j)(x_i)^T p_j

        for every atom, the same bracket at test points `z` (whose adjoints
        `test_p` are carried but do not act on the measure), and the per-head
        gradient map `g(theta_h) = sum_i w_i grad_theta G(x_i; theta_h)^T p_i`.

        With `probes=True` the extra points are *probes* instead (docs/theory.md,
        section 12): queries of weight 1 whose cotangents `test_p` act on the
        atoms (`+ sum_k d_mu Gamma(z_k)(x_i)^T q_k` in `b_i`, and their part of
        the gradient map), and which are no keys: their bracket is the query
        side alone, `grad_x Gamma(z_k)^T q_k`.

        **Returns:** `(b_atoms (n, d), b_test (m, d) or None, grads)`, `grads`
        an `AttentionParams` with leaves `(H, d, k)`. `cache`: the third output
        of `forward(..., return_cache=True)` at the same points, or `None`.
        """
        check_layer(measure, params)
        n, w = measure.num_points, measure.weights
        if test_points is None:
            pos = self._positions(n, 0, None)
            b, g = self._pullback(params, measure.points, w, w, pos, p, cache)
            return b, None, g
        m = test_points.shape[0]
        pts = jnp.concatenate([measure.points, test_points], axis=0)
        extra = jnp.ones((m,), w.dtype) if probes else jnp.zeros((m,), w.dtype)
        u = jnp.concatenate([w, extra])
        wz = jnp.concatenate([w, jnp.zeros((m,), w.dtype)])
        pos = self._positions(n, m, test_positions)
        if cache is None:  # the forward against the atoms alone (extra points do not act)
            cache = self._outputs(params, pts, n, w, pos)
        P = jnp.concatenate([p, test_p], axis=0)
        b, g = self._pullback(params, pts, wz, u, pos, P, cache, n if probes else None)
        return b[:n], b[n:], g

    # ------------------------------------------------------ closed forms
    def __call__(self, x, measure: EmpiricalMeasure, params: AttentionParams, positions=None):
        """Same as [`mfattn.AttentionField.velocity`][]."""
        return self.velocity(x, measure, params, positions)

    @eqx.filter_jit
    def velocity(self, x, measure: EmpiricalMeasure, params: AttentionParams, positions=None):
        """`Gamma(x, mu; nu)`, shape like `x` (`positions`: of the query points,
        for a causal kernel; default after the last token)."""
        check_layer(measure, params)
        x = _queries(x, measure.dim)
        xs = x[None] if x.ndim == 1 else x
        _, vz = self.forward(measure, params, xs, test_positions=_pos(positions, x))
        return vz[0] if x.ndim == 1 else vz

    def _probe_setup(self, measure, xs, ys, xpos, ypos):
        """Points `[atoms; x; y]` with key weights `[w; 0; 0]` and positions."""
        n, m = measure.num_points, xs.shape[0]
        py = 0 if ys is None else ys.shape[0]
        pts = [measure.points, xs] + ([] if ys is None else [ys])
        pts = jnp.concatenate(pts, axis=0)
        w = jnp.concatenate([measure.weights, jnp.zeros((m + py,), measure.weights.dtype)])
        extra = None
        if self.kernel.uses_positions:
            xp = jnp.full((m,), n) if xpos is None else jnp.asarray(xpos)
            yp = jnp.full((py,), n) if ypos is None else jnp.asarray(ypos)
            extra = jnp.concatenate([xp, yp])
        pos = self._positions(n, m + py, extra, "positions")
        return pts, w, pos

    @eqx.filter_jit
    def grad_x(self, x, measure: EmpiricalMeasure, params: AttentionParams, positions=None):
        """`grad_x Gamma(x, mu; nu) = (1/H) sum_h beta O V^T Cov_a(x)[y] K Q^T`
        (docs/theory.md, section 1), computed as the pullback of `Gamma(x)` with
        unit cotangents (the atoms' cotangents zero).

        **Returns:** `(d, d)` for one query, `(m, d, d)` for many.
        """
        check_layer(measure, params)
        x = _queries(x, measure.dim)
        xs = x[None] if x.ndim == 1 else x
        n, m, d = measure.num_points, xs.shape[0], measure.dim
        pts, w, pos = self._probe_setup(measure, xs, None, _pos(positions, x), None)
        u = w  # x are test queries: they do not act on the atoms
        cache = self._outputs(params, pts, n, measure.weights, pos)

        def row(e):
            p = jnp.concatenate([jnp.zeros((n, d), pts.dtype), jnp.broadcast_to(e, (m, d))])
            return self._pullback(params, pts, w, u, pos, p, cache)[0][n:]

        out = jnp.moveaxis(jax.vmap(row)(jnp.eye(d, dtype=pts.dtype)), 0, 1)
        return out[0] if x.ndim == 1 else out

    @eqx.filter_jit
    def lions_derivative(
        self,
        x,
        measure: EmpiricalMeasure,
        params: AttentionParams,
        y,
        positions=None,
        y_positions=None,
    ):
        """The Lions derivative `d_mu Gamma(x, mu; nu)(y)` (docs/theory.md,
        section 1),

            (1/H) sum_h a_h(x, y) O V^T [I + beta (y - m_h(x)) (K Q^T x)^T],

        computed as the key-side pullback at probe points `y` (weight 0) of one
        query `x` with unit cotangents. For an atom `y = x_j`,
        `w_j * d_mu Gamma(x, mu)(x_j)` is the Jacobian of `Gamma(x, mu)` with
        respect to the atom `x_j`.

        **Arguments:** query points `x` `(d,)` or `(m, d)`; evaluation points
        `y` `(d,)` or `(p, d)` (any points, not only atoms); for a causal
        kernel their `positions`, `y_positions` (default after the last token).

        **Returns:** `(d, d)`, `(m, d, d)`, `(p, d, d)` or `(m, p, d, d)`
        following the shapes of `x` and `y`.
        """
        check_layer(measure, params)
        x = _queries(x, measure.dim)
        y = _queries(y, measure.dim, "y")
        xs = x[None] if x.ndim == 1 else x
        ys = y[None] if y.ndim == 1 else y
        n, d = measure.num_points, measure.dim
        xpos = _pos(positions, x)
        xpos = jnp.full((xs.shape[0],), n) if xpos is None else jnp.asarray(xpos)

        def one(xi, pi):
            pts, w, pos = self._probe_setup(measure, xi[None], ys, pi[None], _pos(y_positions, y))
            u = jnp.zeros_like(w).at[n].set(1.0)  # only the query x acts
            cache = self._outputs(params, pts, n, measure.weights, pos)

            def row(e):
                p = jnp.zeros_like(pts).at[n].set(e)
                return self._pullback(params, pts, w, u, pos, p, cache)[0][n + 1 :]

            return jnp.moveaxis(jax.vmap(row)(jnp.eye(d, dtype=pts.dtype)), 0, 1)

        out = jax.vmap(one)(xs, xpos)  # (m, p, d, d)
        if y.ndim == 1:
            out = out[:, 0]
        if x.ndim == 1:
            out = out[0]
        return out

    @eqx.filter_jit
    def param_grad(
        self, x, measure: EmpiricalMeasure, params: AttentionParams, p, weights=None, positions=None
    ):
        """The per-head gradient map
        `g(theta_h) = sum_i u_i grad_theta G(x_i, mu; theta_h)^T p_i`
        (docs/theory.md, section 4), the same pullback as the solvers'.

        **Arguments:** query points `x` `(m, d)`, cotangents `p` `(m, d)`, query
        weights `u` `(m,)` (default: `measure.weights` when `x` are the atoms,
        the case of the transformer's gradient map; pass them explicitly
        otherwise), and for a causal kernel the queries' `positions` (default:
        the token positions when `weights` is `None`, else after the last token).

        **Returns:** an `AttentionParams` with leaves `(H, d, k)`.
        """
        check_layer(measure, params)
        x = _queries(x, measure.dim)
        p = _queries(p, measure.dim, "p")
        if x.ndim != 2 or p.shape != x.shape:
            raise ValueError(f"`x` and `p` must both be (m, d), got {x.shape} and {p.shape}")
        n = measure.num_points
        if weights is None:
            if x.shape[0] != n:
                raise ValueError("pass `weights` for query points that are not the atoms")
            weights = measure.weights
            if positions is None and self.kernel.uses_positions:
                positions = jnp.arange(n)
        weights = as_float_array(weights, "weights", ndim=1)
        pts, w, pos = self._probe_setup(measure, x, None, positions, None)
        u = jnp.concatenate([jnp.zeros_like(measure.weights), weights.astype(w.dtype)])
        P = jnp.concatenate([jnp.zeros_like(measure.points), p])
        cache = self._outputs(params, pts, n, measure.weights, pos)
        return self._pullback(params, pts, w, u, pos, P, cache)[1]


def _pos(positions, x):
    """Positions of a single query given as a scalar, as a `(1,)` array."""
    if positions is None:
        return None
    positions = jnp.asarray(positions)
    return positions[None] if x.ndim == 1 and positions.ndim == 0 else positions
