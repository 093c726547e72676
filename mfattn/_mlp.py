"""MLP blocks `F(x; phi) = W_2^T sigma(W_1^T x + b_1)` and their closed-form
derivatives (docs/theory.md, section 9)."""

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import as_float_array
from ._custom_types import ScalarLike

_ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "linear": lambda x: x,
}

Activation = str | Callable[[Array], Array]


def resolve_activation(activation: Activation) -> Callable[[Array], Array]:
    """The elementwise function named by `activation` (`"tanh"`, `"relu"`,
    `"gelu"`, `"linear"`), or `activation` itself if it is callable."""
    if callable(activation):
        return activation
    if isinstance(activation, str) and activation in _ACTIVATIONS:
        return _ACTIVATIONS[activation]
    raise ValueError(
        f"`activation` must be one of {tuple(_ACTIVATIONS)} or a callable, got {activation!r}"
    )


class MLPParams(eqx.Module):
    """The parameters `phi = (W_1, b_1, W_2)` of MLP blocks,
    `F(x; phi) = W_2^T sigma(W_1^T x + b_1)`.

    Leaves carry a leading depth axis, `W_1 (L, d, m)`, `b_1 (L, m)`,
    `W_2 (L, m, d)` (`m` the hidden width), one block per layer; one block is
    the same module without the leading axis (see [`mfattn.MLPParams.layer`][]).
    As the noise features of [`mfattn.solve_sde`][] the leading axis counts
    independent draws instead of layers.

    **Raises:** `ValueError` if the shapes do not fit together; `TypeError` for
    a non-floating dtype.
    """

    # shapes are checked in `__check_init__`, with messages naming the field
    W1: Float[Array, "... _ _"]
    b1: Float[Array, "... _"]
    W2: Float[Array, "... _ _"]

    def __check_init__(self):
        for name in ("W1", "b1", "W2"):
            dtype = getattr(self, name).dtype
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(f"`MLPParams.{name}` must be floating, got {dtype}")
        s1, sb, s2 = jnp.shape(self.W1), jnp.shape(self.b1), jnp.shape(self.W2)
        if len(s1) not in (2, 3):
            raise ValueError(f"`MLPParams.W1` must be (L, d, m) or (d, m), got {s1}")
        lead, (d, m) = s1[:-2], s1[-2:]
        if sb != lead + (m,):
            raise ValueError(f"`MLPParams.b1` must have shape {lead + (m,)}, got {sb}")
        if s2 != lead + (m, d):
            raise ValueError(f"`MLPParams.W2` must have shape {lead + (m, d)}, got {s2}")

    @property
    def depth(self) -> int:
        """Number of blocks `L` (leading axis)."""
        if self.W1.ndim != 3:
            raise ValueError("these parameters hold one block: they have no depth axis")
        return self.W1.shape[0]

    @property
    def dim(self) -> int:
        """Token dimension `d`."""
        return self.W1.shape[-2]

    @property
    def width(self) -> int:
        """Hidden width `m`."""
        return self.W1.shape[-1]

    @property
    def dtype(self):
        return self.W1.dtype

    def layer(self, l) -> "MLPParams":
        """The block of layer `l`: leaves `(d, m)`, `(m,)`, `(m, d)`."""
        return jax.tree.map(lambda a: a[l], self)

    @classmethod
    def init(
        cls,
        key: PRNGKeyArray,
        depth: int,
        dim: int,
        width: int,
        *,
        scale: ScalarLike = 1.0,
        bias: ScalarLike = 1.0,
        dtype=None,
    ) -> "MLPParams":
        """Draw `L = depth` blocks i.i.d. with mean-zero outputs.

        Every entry independent: `W_1 ~ U(-a, a)`, `a = sqrt(6 / (d + m))`
        (Xavier-uniform), `b_1 ~ U(-bias, bias)`, and
        `W_2 ~ scale * U(-a, a)`. `W_2` is symmetric and independent of
        `(W_1, b_1)`, so `E[F(x; phi)] = 0` for every `x`, and
        `E[F(x) F(y)^T] = scale^2 a^2 m / 3 * E[sigma(w.x + b) sigma(w.y + b)] I`
        is a multiple of the identity (docs/theory.md, section 9).

        **Arguments:** `key`, `depth` (`L`, or the number of noise features),
        `dim` (`d`), `width` (`m`), `scale` (the output scale, i.e. the
        strength of the MLP noise), `bias` (half-width of the bias law), `dtype`.
        """
        for name, value in (("depth", depth), ("dim", dim), ("width", width)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
        return cls(*_draw(key, scale, bias, depth, dim, width, dtype))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _draw(key, scale, bias, depth, dim, width, dtype):
    a = float(np.sqrt(6.0 / (dim + width)))
    k1, k2, k3 = jax.random.split(key, 3)
    W1 = jax.random.uniform(k1, (depth, dim, width), dtype, -a, a)
    b1 = (jax.random.uniform(k2, (depth, width), dtype, -1.0, 1.0) * bias).astype(dtype)
    W2 = (jax.random.uniform(k3, (depth, width, dim), dtype, -a, a) * scale).astype(dtype)
    return W1, b1, W2


def _check_block(params, x, name="x"):
    if not isinstance(params, MLPParams):
        raise TypeError(f"`params` must be an MLPParams, got {type(params).__name__}")
    if params.W1.ndim != 2:
        raise ValueError(
            f"`params` must hold one block, `W1` of shape (d, m), got {params.W1.shape}"
        )
    x = as_float_array(x, name)
    if x.shape[-1:] != (params.dim,):
        raise ValueError(f"`{name}` must end with d={params.dim}, got shape {x.shape}")
    return x


def _preactivation(params, x):
    """`W_1^T x + b_1` at every point (the bias broadcast explicitly over the
    points' axes)."""
    pre = x @ params.W1
    return pre + jnp.broadcast_to(params.b1, pre.shape)


def _activate(activation, pre):
    """`sigma(pre)` and `sigma'(pre)` (elementwise, by one forward-mode pass)."""
    act = resolve_activation(activation)
    return jax.jvp(act, (pre,), (jnp.ones_like(pre),))


def mlp_forward(
    params: MLPParams, x: Float[Array, "*n d"], activation: Activation = "tanh"
) -> Float[Array, "*n d"]:
    """`F(x; phi) = W_2^T sigma(W_1^T x + b_1)` for one block.

    **Arguments:** `params` (one block, leaves `(d, m)`, `(m,)`, `(m, d)`),
    points `x` `(..., d)`, `activation` (a name or an elementwise callable).

    **Returns:** `F(x)`, shaped like `x`.
    """
    x = _check_block(params, x)
    h = resolve_activation(activation)(_preactivation(params, x))
    return h @ params.W2


def mlp_backward(
    params: MLPParams,
    x: Float[Array, "n d"],
    p: Float[Array, "n d"],
    weights: Float[Array, " n"] | None = None,
    activation: Activation = "tanh",
) -> tuple[Float[Array, "n d"], MLPParams]:
    """The closed-form pullback of one MLP block (docs/theory.md, section 9).

    For cotangents `p_i` at points `x_i`, with `pre_i = W_1^T x_i + b_1` and
    `r_i = sigma'(pre_i) * (W_2 p_i)`:

        grad_x F(x_i)^T p_i = W_1 r_i,
        g(phi) = sum_i u_i grad_phi F(x_i; phi)^T p_i:
            dW_1 = sum_i u_i x_i r_i^T,  db_1 = sum_i u_i r_i,
            dW_2 = sum_i u_i sigma(pre_i) p_i^T.

    **Arguments:** `params` (one block), points `x (n, d)`, cotangents
    `p (n, d)`, point weights `u = weights (n,)` (default: all ones), `activation`.

    **Returns:** `(grad_x F^T p (n, d), g)` with `g` an `MLPParams` of one block.
    """
    x = _check_block(params, x)
    p = _check_block(params, p, "p")
    if x.ndim != 2 or p.shape != x.shape:
        raise ValueError(f"`x` and `p` must both be (n, d), got {x.shape} and {p.shape}")
    u = jnp.ones(x.shape[:1], x.dtype) if weights is None else weights
    s, ds = _activate(activation, _preactivation(params, x))
    r = ds * (p @ params.W2.T)
    grads = MLPParams(
        W1=jnp.einsum("n,nd,nm->dm", u, x, r),
        b1=jnp.einsum("n,nm->m", u, r),
        W2=jnp.einsum("n,nm,nd->md", u, s, p),
    )
    return r @ params.W1.T, grads


__all__ = ["MLPParams", "mlp_forward", "mlp_backward", "resolve_activation"]
