"""Attention parameters: heads (or parameter particles) on a depth grid."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._renamed import renamed_kwargs

_FIELDS = ("Q", "K", "V", "O")


class AttentionParams(eqx.Module):
    """The parameters `theta = (Q, K, V, O)` of many attention heads.

    Each field has shape `(L, H, d, k)`: depth nodes (layers of the discrete
    model, grid nodes of the limit), heads per node (parameter particles of the
    measure `nu_t`), then the `d x k` matrix. The parameters of one layer (the
    measure `nu^l = (1/H) sum_h delta_{theta_{l,h}}`) are the same module with
    leaves of shape `(H, d, k)`: see [`mfattn.AttentionParams.layer`][].

    Gradients of the loss (the gradient map of docs/theory.md, section 4) are returned as
    an `AttentionParams` of the same shape.

    **Raises:** `ValueError` if the four fields do not share one shape with 3 or
    4 axes; `TypeError` for a non-floating dtype.

    Values are not checked here (gradient maps are `AttentionParams` too, built
    inside the solvers); the solvers and [`mfattn.train`][] check the
    parameters they are given with [`mfattn.check_finite`][], naming the
    field (`params.Q`, ...).
    """

    # anonymous dims: the shapes are compared by __init__, with an error naming the field;
    # NumPy arrays are accepted (and kept: the solvers convert them)
    Q: Float[Array | np.ndarray, "... _ _"]
    K: Float[Array | np.ndarray, "... _ _"]
    V: Float[Array | np.ndarray, "... _ _"]
    O: Float[Array | np.ndarray, "... _ _"]

    def __check_init__(self):
        shapes = {}
        for name in _FIELDS:
            a = getattr(self, name)
            shape = jnp.shape(a)
            dtype = a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(f"`AttentionParams.{name}` must be floating, got {dtype}")
            if len(shape) not in (3, 4):
                raise ValueError(
                    f"`AttentionParams.{name}` must have shape (L, H, d, k) (or "
                    f"(H, d, k) for one layer), got {shape}"
                )
            shapes[name] = shape
        for name in _FIELDS[1:]:
            if shapes[name] != shapes["Q"]:
                raise ValueError(
                    f"`AttentionParams.{name}` has shape {shapes[name]} but "
                    f"`AttentionParams.Q` has {shapes['Q']}: the four fields must "
                    "share one shape"
                )

    # --- shape information -------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of depth nodes `L` (leading axis)."""
        if self.Q.ndim != 4:
            raise ValueError("these parameters hold one layer: they have no depth axis")
        return self.Q.shape[0]

    @property
    def heads(self) -> int:
        """Heads (parameter particles) per node, `H`."""
        return self.Q.shape[-3]

    @property
    def dim(self) -> int:
        """Token dimension `d`."""
        return self.Q.shape[-2]

    @property
    def head_dim(self) -> int:
        """Head dimension `k`."""
        return self.Q.shape[-1]

    @property
    def dtype(self):
        return self.Q.dtype

    def layer(self, l) -> "AttentionParams":
        """The heads of depth node `l`: an `AttentionParams` with leaves `(H, d, k)`."""
        return jax.tree.map(lambda a: a[l], self)

    def block_norms(self) -> Float[Array, "*LH 4"]:
        """Frobenius norm of every block (`Q`, `K`, `V`, `O` of every head), last
        axis in the order Q, K, V, O."""
        return jnp.stack(
            [jnp.sqrt(jnp.sum(getattr(self, n) ** 2, axis=(-2, -1))) for n in _FIELDS],
            axis=-1,
        )

    # --- constructors ------------------------------------------------------
    @classmethod
    def xavier_uniform(
        cls,
        key: PRNGKeyArray,
        depth: int,
        heads: int,
        dim: int,
        head_dim: int,
        dtype=None,
    ) -> "AttentionParams":
        """Draw `theta_{l,h}` i.i.d. from `nu_0` (docs/theory.md, section 3): every entry of
        every matrix independently `U(-a, a)`, `a = sqrt(6 / (d + k))`.

        **Arguments:** `key`, `depth` (`L`), `heads` (`H`), `dim` (`d`),
        `head_dim` (`k`), optional `dtype` (default: JAX's default float).
        """
        _check_sizes(depth=depth, heads=heads, dim=dim, head_dim=head_dim)
        dtype = jnp.result_type(float) if dtype is None else dtype
        a = float(np.sqrt(6.0 / (dim + head_dim)))
        keys = jax.random.split(key, 4)
        shape = (depth, heads, dim, head_dim)
        mats = [jax.random.uniform(k, shape, dtype=dtype, minval=-a, maxval=a) for k in keys]
        return cls(*mats)

    @classmethod
    @renamed_kwargs(num_nodes="depth", particles="heads")
    def mean_field(
        cls,
        key: PRNGKeyArray,
        depth: int,
        heads: int,
        dim: int,
        head_dim: int,
        dtype=None,
    ) -> "AttentionParams":
        """The mean-field initialisation of docs/theory.md, section 6: `M = heads`
        parameter particles `theta_0^m ~ nu_0` (Xavier-uniform), drawn once and
        repeated at each of the `depth` grid nodes (`J + 1`), so that
        `nu_t = nu_0` for every `t`. The sizes are named as in
        [`mfattn.AttentionParams.xavier_uniform`][] (`num_nodes=`, `particles=`
        are their deprecated names)."""
        _check_sizes(depth=depth)
        one = cls.xavier_uniform(key, 1, heads, dim, head_dim, dtype)
        return jax.tree.map(lambda a: jnp.repeat(a, depth, axis=0), one)


def _check_sizes(**sizes):
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"`{name}` must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}")
