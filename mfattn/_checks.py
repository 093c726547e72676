"""Private input checks shared by the public API.

Shape and dtype problems raise at trace time, naming the argument. Value checks
(signs, normalisation) raise immediately on concrete arrays and go through
`eqx.error_if` when the value is only known inside a trace.
"""

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """Whether `x` has a value at trace time (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def as_float_array(x, name: str, ndim: int | tuple[int, ...] | None = None):
    """Convert `x` to a floating JAX array, raising a clear error otherwise."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        dtype = x.dtype
    else:
        try:
            dtype = np.asarray(x).dtype
        except Exception as e:  # pragma: no cover - defensive
            raise TypeError(f"`{name}` must be an array, got {type(x).__name__}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
            raise TypeError(
                f"`{name}` must have a floating dtype, got {dtype}; convert it "
                "with `.astype(float)` first"
            )
        raise TypeError(f"`{name}` must have a floating dtype, got {dtype}")
    x = jnp.asarray(x)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if x.ndim not in allowed:
            raise ValueError(
                f"`{name}` must have {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {x.shape}"
            )
    return x


def check_beta(beta, name: str = "beta"):
    """Inverse temperature: a positive finite scalar."""
    if isinstance(beta, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a positive number, got {beta!r}")
    if is_concrete(beta):
        value = np.asarray(beta)
        if value.shape != ():
            raise ValueError(f"`{name}` must be a scalar, got shape {value.shape}")
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"`{name}` must be a positive finite number, got {value}")
        return beta
    if jnp.shape(beta) != ():
        raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(beta)}")
    return beta
