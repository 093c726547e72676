"""The discrete model's integrator, written once: explicit Euler steps of an
[`mfattn.AttentionVectorField`][] through its geometry, and the exact adjoint
recursion of those steps (docs/theory.md, sections 3, 4, 9, 10 and 12).

The forward pass is

    x^{l+1} = step(x^l, h v(t_l, x^l)),       step = geometry.step,

with `v` the field's unprojected velocity (attention plus MLP blocks) at the
layers `t_l` of a piecewise-constant path and `h` the residual factor; the
adjoint goes back through the step map, then through the field's one
closed-form pullback,

    q^l = J_step(y^l)^T p^{l+1},   p^l = tangent(x^l, q^l + h b(x^l; q^l)),

and the gradient map of layer `l` is the field's at the cotangents `q^l`.
The discrete model, its MLP and `1/sqrt(L)` variants, the sphere, test
particles and probes are all this scan.
"""

import jax.numpy as jnp
from jax import lax

from ._vector_field import AttentionVectorField


def _concat(first_or_rest, last, prepend_last):
    if last is None:
        return None
    if prepend_last:  # the adjoint: p^0 first, then p^1..p^L
        return jnp.concatenate([last[None], first_or_rest], axis=0)
    return jnp.concatenate([first_or_rest, last[None]], axis=0)


def euler_forward(vf: AttentionVectorField, x0, z0, h, *, keep: bool = True):
    """Explicit Euler from `(x0, z0)` over the path's nodes.

    **Returns:** `(xs (L+1, n, d), zs (L+1, m, d) or None, trace)`; `trace`
    holds what [`euler_adjoint`][] needs (the radii of the geometry's step and
    the kernel caches, `O(n)` per layer for the default kernels), or `None`
    with `keep=False` (forward only)."""
    geometry = vf.geometry

    def step(carry, node):
        x, z = carry
        t, layer = node
        if keep:
            vx, vz, cache = vf.field_velocity(t, x, z, layer=layer, return_cache=True)
        else:
            (vx, vz), cache = vf.field_velocity(t, x, z, layer=layer), None
        x_next, rx = geometry.step(x, vx, h)
        z_next, rz = (None, None) if z is None else geometry.step(z, vz, h)
        return (x_next, z_next), (x, z, rx, rz, cache)

    (x_last, z_last), (xs, zs, rxs, rzs, caches) = lax.scan(
        step, (x0, z0), (vf.path.times, vf.layers())
    )
    xs = _concat(xs, x_last, False)
    zs = _concat(zs, z_last, False)
    trace = (rxs, rzs, caches) if keep else None
    return xs, zs, trace


def euler_adjoint(vf: AttentionVectorField, xs, zs, trace, p_last, pz_last, h):
    """The exact adjoint of [`euler_forward`][] from the terminal cotangents
    `(p_last, pz_last)` (tangent ones on the sphere).

    **Returns:** `(ps (L+1, n, d), pzs (L+1, m, d) or None, grads)`, `grads`
    the pair `(attention gradient map, MLP gradient map or None)` stacked over
    the layers."""
    geometry = vf.geometry
    rxs, rzs, caches = trace

    def step(carry, inputs):
        p, pz = carry
        t, x, z, rx, rz, layer, cache = inputs
        q = geometry.step_pullback(rx, p)
        qz = None if pz is None else geometry.step_pullback(rz, pz)
        b, bz, grads = vf.field_pullback(t, x, z, q, qz, layer=layer, cache=cache)
        p_prev = geometry.tangent(x, q + h * b)
        pz_prev = None if pz is None else geometry.tangent(z, qz + h * bz)
        return (p_prev, pz_prev), (p, pz, grads)

    inputs = (
        vf.path.times,
        xs[:-1],
        None if zs is None else zs[:-1],
        rxs,
        rzs,
        vf.layers(),
        caches,
    )
    (p_first, pz_first), (ps, pzs, grads) = lax.scan(step, (p_last, pz_last), inputs, reverse=True)
    return _concat(ps, p_first, True), _concat(pzs, pz_first, True), grads
