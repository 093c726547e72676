"""The sup over initial conditions by adversarial ascent with restarts
(docs/theory.md, sections 6-7): the theorem's error is uniform over test
particles in a ball, and a finite set of random points only bounds it below."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float


class AdversarialSup(NamedTuple):
    """What [`mfattn.adversarial_sup`][] returns.

    - `value`: the largest error found (over all restarts and steps).
    - `point`: `(d,)`, where it was found.
    - `values`: `(c,)`, the best error of each restart.
    - `points`: `(c, d)`, where each restart found it.
    - `initial`: `(c,)`, the error at each starting point.
    """

    value: float
    point: np.ndarray
    values: np.ndarray
    points: np.ndarray
    initial: np.ndarray


def central_difference(
    error_fn: Callable[[Float[Array, "c d"]], Float[Array, " c"]], h: float
) -> Callable[[Float[Array, "c d"]], tuple[Float[Array, " c"], Float[Array, "c d"]]]:
    """Values and gradients of a per-point error function by central
    differences, with one batched call of `error_fn` on `c (2d + 1)` points
    (useful when `error_fn` is an expensive compiled solve that autodiff would
    have to be compiled again for).

    **Arguments:** `error_fn` (`(c, d) -> (c,)`, independent points), `h`
    (the step).

    **Returns:** a function `z -> (values (c,), gradients (c, d))`.
    """

    def value_and_grad(z):
        z = jnp.asarray(z)
        c, d = z.shape
        eye = h * jnp.eye(d, dtype=z.dtype)
        pts = jnp.concatenate(
            [z[:, None, :], z[:, None, :] + eye[None], z[:, None, :] - eye[None]], axis=1
        )  # (c, 2d + 1, d)
        e = jnp.asarray(error_fn(pts.reshape(c * (2 * d + 1), d))).reshape(c, 2 * d + 1)
        return e[:, 0], (e[:, 1 : d + 1] - e[:, d + 1 :]) / (2 * h)

    return value_and_grad


def adversarial_sup(
    error_fn: Callable[[Float[Array, "c d"]], Float[Array, " c"]] | None,
    starts: Float[ArrayLike, "c d"],
    radius: float,
    *,
    center: Float[ArrayLike, " d"] | None = None,
    steps: int = 10,
    step_size: float = 0.1,
    final_step_size: float | None = None,
    value_and_grad: Callable | None = None,
) -> AdversarialSup:
    """Maximise a per-point error over the ball `|z - center| <= radius` by
    projected, normalised gradient ascent from several starting points
    (restarts), keeping the best point seen.

    Each restart moves `z <- P(z + s_i radius g / |g|)` with `g` the gradient of
    its error (on the sphere, when `g` points out of the ball, its tangential
    part) and `P` the projection on the ball; the step `s_i` decays
    geometrically from `step_size` to `final_step_size` (default
    `step_size / 10`). The result is never below the error at the starts.

    **Arguments:**

    - `error_fn`: `(c, d) -> (c,)`, the error of each point (points are
      independent); differentiated by `jax.value_and_grad` unless
      `value_and_grad` is given.
    - `starts`: `(c, d)` starting points (e.g. the worst of a random set, and
      random points), one restart each.
    - `radius`, `center` (default the origin): the ball.
    - `steps`, `step_size`, `final_step_size`: the ascent.
    - `value_and_grad`: `z (c, d) -> (values (c,), gradients (c, d))`, e.g.
      [`mfattn.central_difference`][]`(error_fn, h)`; then `error_fn` may be
      `None`, and if given it evaluates the last step's points (no gradient
      is needed there: with central differences, `2d` fewer points each).

    **Returns:** an [`mfattn.AdversarialSup`][].

    **Raises:** `ValueError` for `starts` not `(c, d)`, or non-positive `radius`.
    """
    z = jnp.asarray(starts)
    if z.ndim != 2:
        raise ValueError(f"`starts` must be (c, d), got shape {z.shape}")
    if not radius > 0:
        raise ValueError(f"`radius` must be positive, got {radius}")
    value_only = error_fn if value_and_grad is not None else None  # for the last step
    if value_and_grad is None:
        if error_fn is None:
            raise ValueError("give `error_fn` or `value_and_grad`")

        @jax.jit
        def value_and_grad(z):
            e, vjp = jax.vjp(error_fn, z)
            return e, vjp(jnp.ones_like(e))[0]  # points are independent: one pullback

    c0 = jnp.zeros(z.shape[1], z.dtype) if center is None else jnp.asarray(center, z.dtype)
    c0 = jnp.reshape(c0, (1, -1))  # one row, broadcast explicitly against the points

    def project(z):
        r = jnp.linalg.norm(z - c0, axis=-1, keepdims=True)
        return jnp.where(r > radius, c0 + (z - c0) * radius / jnp.maximum(r, 1e-300), z)

    z = project(z)
    final = step_size / 10 if final_step_size is None else final_step_size
    sizes = step_size * (final / step_size) ** (np.arange(steps) / max(steps - 1, 1))
    value, grad = value_and_grad(z)
    initial = np.asarray(value)
    best, best_z = initial.copy(), np.asarray(z)
    for i, s in enumerate(sizes):
        last = i == len(sizes) - 1
        # on the sphere, with the gradient pointing out of the ball, move along
        # its tangential part (the radial part would be projected away)
        r = z - c0
        rn = jnp.linalg.norm(r, axis=-1, keepdims=True)
        rhat = r / jnp.maximum(rn, 1e-300)
        radial = jnp.sum(grad * rhat, axis=-1, keepdims=True)
        on_sphere = (rn >= radius * (1 - 1e-9)) & (radial > 0)
        g = jnp.where(on_sphere, grad - radial * rhat, grad)
        g = g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-30)
        z = project(z + s * radius * g)
        if last and value_only is not None:
            value = value_only(z)
        else:
            value, grad = value_and_grad(z)
        v = np.asarray(value)
        better = v > best
        best = np.where(better, v, best)
        best_z = np.where(better[:, None], np.asarray(z), best_z)
    i = int(np.argmax(best))
    return AdversarialSup(float(best[i]), best_z[i], best, best_z, initial)
