"""The mean-field attention velocity field and its closed-form derivatives."""

import equinox as eqx
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float

from . import _kernel, _sharding
from ._checks import as_float_array, check_beta
from ._measure import EmpiricalMeasure
from ._params import AttentionParams


def check_layer(measure: EmpiricalMeasure, params: AttentionParams, name="params"):
    """Check that `params` holds one layer `(H, d, k)` matching `measure`'s `d`."""
    if not isinstance(measure, EmpiricalMeasure):
        raise TypeError(f"`measure` must be an EmpiricalMeasure, got {type(measure).__name__}")
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


class AttentionField(eqx.Module):
    """The multi-head attention velocity field `Gamma(x, mu; nu)` (SPEC 1-2).

    For one layer of `H` heads, `nu = (1/H) sum_h delta_{theta_h}` and

        Gamma(x, mu; nu) = (1/H) sum_h O_h V_h^T m_h(x),
        m_h(x) = int y a_h(x, y) mu(dy),  a_h(x, y) = exp(s_h(x, y)) / D_h(x),
        s_h(x, y) = beta <Q_h^T x, K_h^T y>.

    The softmax is computed stably (scores shifted by their max), so that
    `beta = 1e3` on unit-scale tokens is finite. The discrete transformer takes
    explicit Euler steps of this field; the continuous limit integrates it with
    Diffrax; both call the same methods.

    **Arguments:**

    - `beta`: inverse temperature, a positive scalar.
    - `chunk_size`: `None` (default) evaluates each layer with dense `(H, m, n)`
      score blocks, fastest for short sequences; an int processes keys in blocks
      of that size with an online softmax and recomputed densities, one head at
      a time, so memory is `O(m * chunk_size)` per head (long sequences). Both
      give the same numbers to rounding.
    - `mesh`: `None` (default) runs on one device. A `jax.sharding.Mesh` shards
      the queries (tokens and test particles) of every kernel call over all its
      devices with `jax.shard_map`; keys are gathered on every device and
      key-side sums are reduced across devices. Combine with `chunk_size` for
      long sequences on many devices. The numbers are those of one device, to
      rounding. The mesh's axes are used as `Auto` axes (an `Explicit` mesh,
      `jax.make_mesh`'s default, is converted); to place data on the devices
      yourself, e.g. parameters replicated so that a jitted training step sees
      the same input shardings at every call, create the mesh with
      `axis_types=(jax.sharding.AxisType.Auto,) * ndim`.

    Methods take query points `x` of shape `(d,)` or `(m, d)`, an
    [`mfattn.EmpiricalMeasure`][], and one layer's heads (an
    [`mfattn.AttentionParams`][] with leaves `(H, d, k)`).
    """

    beta: float | Float[Array, ""]
    chunk_size: int | None = eqx.field(static=True, default=None)
    mesh: Mesh | None = eqx.field(static=True, default=None)

    def __init__(self, beta, chunk_size: int | None = None, mesh: Mesh | None = None):
        self.beta = check_beta(beta)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(
                f"`mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__}"
            )
        self.mesh = None if mesh is None else _sharding.auto_mesh(mesh)

    # Kernel dispatch: dense (one (H, m, n) block, fastest for small n) or chunked
    # over keys with O(m * chunk_size) memory per head (long sequences).
    def _k_forward(self, q, k, v, w):
        if self.chunk_size is None:
            f = lambda q, k, v, w: _kernel.forward(q, k, v, w, self.beta)
        else:
            f = lambda q, k, v, w: _kernel.forward_chunked(q, k, v, w, self.beta, self.chunk_size)
        if self.mesh is None:
            return f(q, k, v, w)
        return _sharding.forward(self.mesh, f, q, k, v, w)

    def _k_query_side(self, q, k, v, w, o, lse, c):
        b, cs = self.beta, self.chunk_size
        if cs is None:
            f = lambda *a: _kernel.query_side(*a, b)
        else:
            f = lambda *a: _kernel.query_side_chunked(*a, b, cs)
        if self.mesh is None:
            return f(q, k, v, w, o, lse, c)
        return _sharding.query_side(self.mesh, f, q, k, v, w, o, lse, c)

    def _k_key_side(self, q, o, lse, c, u, kp, vp):
        b, cs = self.beta, self.chunk_size
        if cs is None:
            f = lambda *a: _kernel.key_side(*a, b)
        else:
            f = lambda *a: _kernel.key_side_chunked(*a, b, cs)
        if self.mesh is None:
            return f(q, o, lse, c, u, kp, vp)
        return _sharding.key_side(self.mesh, f, q, o, lse, c, u, kp, vp)

    def _k_backward(self, q, k, v, w, o, lse, c):
        b, cs = self.beta, self.chunk_size
        if cs is None:
            f = lambda *a, u=None: _kernel.backward(*a, b, u=u)
        else:
            f = lambda *a, u=None: _kernel.backward_chunked(*a, b, cs, u=u)
        if self.mesh is None:
            return f(q, k, v, w, o, lse, c)
        return _sharding.backward(self.mesh, f, q, k, v, w, o, lse, c)

    # ------------------------------------------------------------------ field
    def __call__(self, x, measure: EmpiricalMeasure, params: AttentionParams):
        """Same as [`mfattn.AttentionField.velocity`][]."""
        return self.velocity(x, measure, params)

    @eqx.filter_jit
    def velocity(self, x, measure: EmpiricalMeasure, params: AttentionParams):
        """`Gamma(x, mu; nu)`, shape like `x`."""
        check_layer(measure, params)
        x = _queries(x, measure.dim)
        single = x.ndim == 1
        xs = x[None] if single else x
        o, _ = self._attend(xs, measure, params)
        out = jnp.einsum("hdk,hmk->md", params.O, o) / params.heads
        return out[0] if single else out

    def _attend(self, xs, measure, params):
        q = _kernel.project(xs, params.Q)
        k = _kernel.project(measure.points, params.K)
        v = _kernel.project(measure.points, params.V)
        return self._k_forward(q, k, v, measure.weights)

    def _stats(self, xs, measure, params):
        # pi (H, m, n) and m_h(x) (H, m, d): the literal SPEC objects.
        _, lse = self._attend(xs, measure, params)
        q = _kernel.project(xs, params.Q)
        k = _kernel.project(measure.points, params.K)
        pi = _kernel.density(q, k, lse, self.beta) * measure.weights
        mean = jnp.einsum("hmn,nd->hmd", pi, measure.points)
        return pi, mean, lse

    # ----------------------------------------------- closed-form derivatives
    @eqx.filter_jit
    def grad_x(self, x, measure: EmpiricalMeasure, params: AttentionParams):
        """`grad_x Gamma(x, mu; nu) = (1/H) sum_h beta O V^T Cov_a(x)[y] K Q^T`.

        **Returns:** `(d, d)` for one query, `(m, d, d)` for many (SPEC 1).
        """
        check_layer(measure, params)
        x = _queries(x, measure.dim)
        single = x.ndim == 1
        xs = x[None] if single else x
        pi, mean, _ = self._stats(xs, measure, params)
        dev = measure.points[None, None] - mean[:, :, None]  # (H, m, n, d)
        cov = jnp.einsum("hmn,hmnd,hmne->hmde", pi, dev, dev)
        OV = jnp.einsum("hdk,hek->hde", params.O, params.V)
        KQ = jnp.einsum("hdk,hek->hde", params.K, params.Q)
        out = self.beta * jnp.einsum("hde,hmef,hfg->mdg", OV, cov, KQ) / params.heads
        return out[0] if single else out

    @eqx.filter_jit
    def lions_derivative(self, x, measure: EmpiricalMeasure, params: AttentionParams, y):
        """The Lions derivative `d_mu Gamma(x, mu; nu)(y)` (SPEC 1):

            (1/H) sum_h a_h(x, y) O V^T [I + beta (y - m_h(x)) (K Q^T x)^T].

        For an atom `y = x_j`, `w_j * d_mu Gamma(x, mu)(x_j)` is the Jacobian of
        `Gamma(x, mu)` with respect to the atom `x_j`.

        **Arguments:** query points `x` `(d,)` or `(m, d)`; evaluation points
        `y` `(d,)` or `(p, d)` (any points, not only atoms).

        **Returns:** `(d, d)`, `(m, d, d)`, `(p, d, d)` or `(m, p, d, d)`
        following the shapes of `x` and `y`.
        """
        check_layer(measure, params)
        x = _queries(x, measure.dim)
        y = _queries(y, measure.dim, "y")
        xs = x[None] if x.ndim == 1 else x
        ys = y[None] if y.ndim == 1 else y
        _, mean, lse = self._stats(xs, measure, params)
        q = _kernel.project(xs, params.Q)
        a = _kernel.density(q, _kernel.project(ys, params.K), lse, self.beta)
        OV = jnp.einsum("hdk,hek->hde", params.O, params.V)
        kq = jnp.einsum("hdk,hmk->hmd", params.K, q)  # K Q^T x, (H, m, d)
        u = jnp.einsum("hde,hmpe->hmpd", OV, ys[None, None] - mean[:, :, None])
        mat = OV[:, None, None] + self.beta * u[..., :, None] * kq[:, :, None, None, :]
        out = jnp.einsum("hmp,hmpde->mpde", a, mat) / params.heads
        if y.ndim == 1:
            out = out[:, 0]
        if x.ndim == 1:
            out = out[0]
        return out

    @eqx.filter_jit
    def param_grad(self, x, measure: EmpiricalMeasure, params: AttentionParams, p, weights=None):
        """The per-head gradient map `g(theta_h) = sum_i u_i grad_theta G(x_i, mu; theta_h)^T p_i`
        (SPEC section 4), in closed form.

        **Arguments:** query points `x` `(m, d)`, cotangents `p` `(m, d)`, query
        weights `u` `(m,)` (default: `measure.weights` when `x` are the atoms,
        which is the case the gradient map of the transformer uses; pass them
        explicitly otherwise).

        **Returns:** an `AttentionParams` with leaves `(H, d, k)`.
        """
        check_layer(measure, params)
        x = _queries(x, measure.dim)
        p = _queries(p, measure.dim, "p")
        if x.ndim != 2 or p.shape != x.shape:
            raise ValueError(f"`x` and `p` must both be (m, d), got {x.shape} and {p.shape}")
        if weights is None:
            if x.shape[0] != measure.num_points:
                raise ValueError("pass `weights` for query points that are not the atoms")
            weights = measure.weights
        weights = as_float_array(weights, "weights", ndim=1)
        q = _kernel.project(x, params.Q)
        k = _kernel.project(measure.points, params.K)
        v = _kernel.project(measure.points, params.V)
        o, lse = self._k_forward(q, k, v, measure.weights)
        c = jnp.einsum("hdk,md->hmk", params.O, p)
        dq = self._k_query_side(q, k, v, measure.weights, o, lse, c)
        dk, dv = self._k_key_side(q, o, lse, c, weights, k, v)
        return _assemble_grads(x, weights, measure.points, measure.weights, p, o, dq, dk, dv)

    # ------------------------------------------- solver-facing contractions
    @eqx.filter_jit
    def forward(
        self,
        measure: EmpiricalMeasure,
        params: AttentionParams,
        test_points=None,
        *,
        return_cache: bool = False,
    ):
        """Velocities of the atoms and of optional test points `z (m, d)`
        (test points are moved by the field but do not act on the measure).

        **Returns:** `(v_atoms (n, d), v_test (m, d) or None)`, and with
        `return_cache=True` a third element: the per-head attention outputs and
        log-normalisers `(o (H, n+m, k), lse (H, n+m))`, `O(n)` memory, which
        [`mfattn.AttentionField.backward`][] accepts as `cache` instead of
        recomputing them (one pass over the keys less).
        """
        check_layer(measure, params)
        pts = measure.points
        if test_points is not None:
            pts = jnp.concatenate([pts, test_points], axis=0)
        o, lse = self._attend(pts, measure, params)
        vel = jnp.einsum("hdk,hmk->md", params.O, o) / params.heads
        n = measure.num_points
        out = vel[:n], (None if test_points is None else vel[n:])
        return out + ((o, lse),) if return_cache else out

    def backward(
        self,
        measure: EmpiricalMeasure,
        params: AttentionParams,
        p,
        test_points=None,
        test_p=None,
        cache=None,
    ):
        """One step of the closed-form adjoint (SPEC section 4).

        With `p` the rescaled adjoints of the atoms, returns the bracket

            b_i = grad_x Gamma(x_i)^T p_i + sum_j w_j d_mu Gamma(x_j)(x_i)^T p_j

        for every atom, the same bracket at test points `z` (whose adjoints
        `test_p` are carried but do not act on the measure), and the per-head
        gradient map `g(theta_h) = sum_i w_i grad_theta G(x_i; theta_h)^T p_i`.

        **Returns:** `(b_atoms (n, d), b_test (m, d) or None, grads)`, `grads`
        an `AttentionParams` with leaves `(H, d, k)`. `cache`: the third output
        of `forward(..., return_cache=True)` at the same points, or `None`.
        """
        check_layer(measure, params)
        x, w, H = measure.points, measure.weights, params.heads
        q = _kernel.project(x, params.Q)
        k = _kernel.project(x, params.K)
        v = _kernel.project(x, params.V)
        n = x.shape[0]
        if cache is None:
            o, lse = self._k_forward(q, k, v, w)
        else:
            o, lse = cache[0][:, :n], cache[1][:, :n]
        c = jnp.einsum("hdk,md->hmk", params.O, p)
        dq, dk, dv = self._k_backward(q, k, v, w, o, lse, c)
        bracket = _to_tokens(params, dq, dk, dv) / H
        grads = _assemble_grads(x, w, x, w, p, o, dq, dk, dv)
        if test_points is None:
            return bracket, None, grads
        z = test_points
        qz = _kernel.project(z, params.Q)
        kz = _kernel.project(z, params.K)
        vz = _kernel.project(z, params.V)
        if cache is None:
            oz, lsez = self._k_forward(qz, k, v, w)
        else:
            oz, lsez = cache[0][:, n:], cache[1][:, n:]
        cz = jnp.einsum("hdk,md->hmk", params.O, test_p)
        dqz = self._k_query_side(qz, k, v, w, oz, lsez, cz)
        dkz, dvz = self._k_key_side(q, o, lse, c, w, kz, vz)
        return bracket, _to_tokens(params, dqz, dkz, dvz) / H, grads


def _to_tokens(params, dq, dk, dv):
    """`sum_h Q_h dq_h + K_h dk_h + V_h dv_h`, back in token space."""
    return (
        jnp.einsum("hdk,hmk->md", params.Q, dq)
        + jnp.einsum("hdk,hmk->md", params.K, dk)
        + jnp.einsum("hdk,hmk->md", params.V, dv)
    )


def _assemble_grads(x, u, y, w, p, o, dq, dk, dv):
    """Per-head gradient map from the head-space contractions:
    `dQ = sum_i u_i x_i dq_i^T`, `dK = sum_j w_j y_j dk_j^T`,
    `dV = sum_j w_j y_j dv_j^T`, `dO = sum_i u_i p_i o_i^T`."""
    return AttentionParams(
        Q=jnp.einsum("m,md,hmk->hdk", u, x, dq),
        K=jnp.einsum("n,nd,hnk->hdk", w, y, dk),
        V=jnp.einsum("n,nd,hnk->hdk", w, y, dv),
        O=jnp.einsum("m,md,hmk->hdk", u, p, o),
    )
