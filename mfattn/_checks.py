"""Input checks shared by the public API, and the switch for value checks.

Shape and dtype problems always raise at trace time, naming the argument.
Value checks (finite entries, signs, normalisation) raise immediately on
concrete arrays and go through `eqx.error_if` when the value is only known
inside a trace; [`mfattn.set_checks`][] turns the checks of array values off.
What is checked, and what a crash costs, is in the README ("Checks and
crashes").
"""

import os
import warnings
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

_T = TypeVar("_T")
_ENV = "MFATTN_CHECKS"
_FALSE = ("0", "false", "off", "no")
_TRUE = ("1", "true", "on", "yes", "")


def _from_env(value: str | None) -> bool:
    """The default of the switch from the value of `MFATTN_CHECKS` (unset: on)."""
    if value is None:
        return True
    v = value.strip().lower()
    if v in _FALSE:
        return False
    if v not in _TRUE:
        warnings.warn(
            f"{_ENV}={value!r} is not one of 0/1, false/true, off/on, no/yes; value checks stay on",
            stacklevel=2,
        )
    return True


_enabled = _from_env(os.environ.get(_ENV))


def checks_enabled() -> bool:
    """Whether mfattn checks the values of array arguments (see [`mfattn.set_checks`][])."""
    return _enabled


def _set(enabled: bool):
    global _enabled
    if enabled != _enabled:
        _enabled = enabled
        # the switch is read when a function is traced: compiled functions
        # must be traced again to see the new value
        jax.clear_caches()


class _ChecksSetting:
    """What [`mfattn.set_checks`][] returns: the switch is already set; used as a
    context manager, the previous value comes back on exit."""

    def __init__(self, previous: bool):
        self.previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        _set(self.previous)
        return False

    def __repr__(self):
        return f"set_checks({_enabled})"


def set_checks(enabled: bool) -> _ChecksSetting:
    """Turn mfattn's checks of array values on or off.

    With checks on (the default), every array that enters mfattn (token points
    and weights, parameters, test points, labels and targets of the losses, a
    traced `beta`) is checked for NaN and infinities, and weights for sign and
    normalisation: a bad value raises a `ValueError` naming the argument (a
    leaf of a pytree by its path, e.g. `params.Q`) at trace time, or, inside
    jitted code, a runtime error with the same message
    (`equinox.EquinoxRuntimeError` under `eqx.filter_jit`, as in mfattn's solvers). Checks
    of types, shapes, dtypes and Python numbers are always on.

    `set_checks(False)` is for production runs that have measured a cost; the
    environment variable `MFATTN_CHECKS=0` sets the default before import.
    The switch is read when a function is traced, so changing it clears JAX's
    compilation caches (every jitted function is compiled again on its next
    call). [`mfattn.train`][]'s per-step divergence check is not affected.

    **Arguments:** `enabled`, a bool.

    **Returns:** an object that also works as a context manager restoring the
    previous value on exit: `with mfattn.set_checks(False): ...`.
    """
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"`enabled` must be a bool, got {enabled!r}")
    previous = _enabled
    _set(bool(enabled))
    return _ChecksSetting(previous)


def is_concrete(x) -> bool:
    """Whether `x` has a value at trace time (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def _is_inexact(x) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, (float, complex)) and not isinstance(x, bool)
    return jnp.issubdtype(dtype, jnp.inexact)


def _describe(leaf) -> str:
    """`3 NaN and 1 inf (first at index (0, 2))` for a concrete array."""
    with jax.ensure_compile_time_eval():
        a = jnp.asarray(leaf)
        num_nan = int(jnp.sum(jnp.isnan(a)))
        num_inf = int(jnp.sum(jnp.isinf(a)))
        first = int(jnp.argmax(~jnp.isfinite(a).ravel())) if a.ndim else 0
    parts = [f"{num_nan} NaN"] if num_nan else []
    parts += [f"{num_inf} inf"] if num_inf else []
    if a.ndim == 0:
        return " and ".join(parts)
    index = tuple(int(i) for i in np.unravel_index(first, a.shape))
    return " and ".join(parts) + f" (first at index {index})"


def check_finite(x: PyTree[_T], name: str) -> PyTree[_T]:
    """Check that every floating entry of `x` (an array or any pytree of arrays)
    is finite, and return `x`.

    Concrete values are checked at once; traced values (inside `jax.jit`,
    `jax.vmap`, `lax.scan`, ...) through `eqx.error_if`, which only fires if
    its result is used: write `x = check_finite(x, "x")`. Integer and
    boolean leaves, and non-array leaves, are skipped. Does nothing when
    checks are off ([`mfattn.set_checks`][]). Inside jit it costs two
    reductions per leaf (any NaN, any inf) and one conditional for the whole
    pytree.

    **Arguments:**

    - `x`: an array or a pytree (e.g. an [`mfattn.AttentionParams`][]).
    - `name`: the argument's name for the message; a leaf of a pytree is
      named by its path, e.g. `params.Q` for `check_finite(params, "params")`.

    **Returns:** `x`, unchanged (for traced leaves, the `eqx.error_if` output).

    **Raises:** `ValueError` for a concrete non-finite entry, naming the leaf
    and counting NaN and inf; for a traced one, `equinox.EquinoxRuntimeError`
    at run time with the message "`NAME` contains NaN" (or "inf").
    """
    if not _enabled:
        return x
    return _check_named({name: x})[name]


def check_finite_args(**named):
    """[`mfattn.check_finite`][] on several arguments with one runtime check (one
    `eqx.error_if`, so one conditional in the compiled program):
    `params, z = check_finite_args(params=params, test_points=z)`. `None`
    arguments are skipped. Returns the values in the order given (a tuple, or
    the value itself for one argument)."""
    if not _enabled:
        out = tuple(named.values())
    else:
        checked = _check_named(named)
        out = tuple(checked[k] for k in named)
    return out[0] if len(out) == 1 else out


def _check_named(named: dict) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(named)
    traced = []
    for i, (path, leaf) in enumerate(leaves):
        if not _is_inexact(leaf):
            continue
        # the first key is the argument's name: `params` + `.Q`
        leaf_name = path[0].key + jax.tree_util.keystr(path[1:])
        if is_concrete(leaf):
            if isinstance(leaf, (np.ndarray, np.generic, float, complex)):
                ok = bool(np.all(np.isfinite(leaf)))  # on the host: no transfer
            else:
                with jax.ensure_compile_time_eval():
                    ok = bool(jnp.all(jnp.isfinite(leaf)))
            if not ok:
                raise ValueError(
                    f"`{leaf_name}` has non-finite values: {_describe(leaf)}; mfattn "
                    "needs finite inputs"
                )
        else:
            traced.append((i, leaf_name))
    if not traced:
        return named
    arrays = [leaves[i][1] for i, _ in traced]
    nan = jnp.stack([jnp.any(jnp.isnan(a)) for a in arrays])
    inf = jnp.stack([jnp.any(jnp.isinf(a)) for a in arrays])
    bad = nan | inf
    first = jnp.argmax(bad)
    # message 2k + 1: leaf k holds a NaN; 2k + 2: leaf k holds an inf (and no
    # NaN); 0: nothing wrong. Under `jax.vmap`, `eqx.branched_error_if` reports
    # the *largest* index over the batch, so a finite batch element must give
    # the smallest one (0), or its "inf" would hide another element's NaN.
    index = jnp.where(jnp.any(bad), 1 + 2 * first + jnp.where(nan[first], 0, 1), 0)
    messages = ["non-finite values"]
    for _, leaf_name in traced:
        messages += [f"`{leaf_name}` contains NaN", f"`{leaf_name}` contains inf"]
    arrays = eqx.branched_error_if(arrays, jnp.any(bad), index, messages)
    new_leaves = [leaf for _, leaf in leaves]
    for (i, _), a in zip(traced, arrays):
        new_leaves[i] = a
    return jax.tree_util.tree_unflatten(treedef, new_leaves)


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


def check_positive(value, name: str):
    """A positive finite scalar (e.g. `beta`, a bandwidth), checked at once when
    concrete (always, whatever [`mfattn.set_checks`][] says: it costs nothing)
    and through `eqx.error_if` when traced (only with checks on). Returns the
    value, which callers must use."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a positive number, got {value!r}")
    if is_concrete(value):
        with jax.ensure_compile_time_eval():
            arr = np.asarray(value)
        if arr.shape != ():
            raise ValueError(f"`{name}` must be a scalar, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise TypeError(f"`{name}` must be a positive real number, got {value!r}")
        if not np.isfinite(arr) or arr <= 0:
            raise ValueError(f"`{name}` must be a positive finite number, got {arr}")
        return value
    if jnp.shape(value) != ():
        raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(value)}")
    if not _enabled:
        return value
    return eqx.branched_error_if(
        value,
        ~(jnp.isfinite(value) & (value > 0)),
        jnp.where(jnp.isfinite(value), 0, 1),
        [
            f"`{name}` must be positive, got a value <= 0",
            f"`{name}` must be finite, got NaN or inf",
        ],
    )


def check_beta(beta, name: str = "beta"):
    """The inverse temperature: a positive finite scalar, also when traced
    (then through `eqx.error_if`: use the returned value)."""
    return check_positive(beta, name)


def check_solve(solution, name: str):
    """Turn a failed `diffrax.diffeqsolve` (called with `throw=False`) into an
    error naming the solve: "NAME failed: <Diffrax's message>" (e.g. the
    maximum number of steps was reached). Returns `solution`, which callers
    must use. Always on: it only reads the solve's result code."""
    result = solution.result
    import diffrax

    messages = [f"{name} failed: {m}" for m in result._enumeration._index_to_message]
    return eqx.branched_error_if(solution, ~diffrax.is_okay(result), result._value, messages)


def check_sizes(**sizes) -> None:
    """Sizes that must be at least one, checked at trace time (shapes are
    static): `check_sizes(**{"params (L layers)": L})` raises
    `ValueError: `params` has L = 0 ...`. Each keyword is `"argument:what"`,
    e.g. `"params:L layers"`, and its value the size."""
    for key, value in sizes.items():
        name, _, what = key.partition(":")
        if int(value) < 1:
            raise ValueError(f"`{name}` has {what} = 0; need at least one")


def check_nonnegative_weights(weights, name: str = "weights"):
    """Finite, non-negative masses (not necessarily summing to one), at once
    when concrete and through `eqx.error_if` when traced (with checks on).
    Returns the weights, which callers must use."""
    if not _enabled:
        return weights
    weights = check_finite(weights, name)
    if is_concrete(weights):
        with jax.ensure_compile_time_eval():
            negative = bool(jnp.any(jnp.asarray(weights) < 0))
        if negative:
            raise ValueError(f"`{name}` must be non-negative")
        return weights
    return eqx.error_if(weights, jnp.any(weights < 0), f"`{name}` must be non-negative")


def weights_tolerance(*dtypes) -> float:
    """How far from one a sum of weights may be: `1e-6` in float64, `1e-4` in
    float32, and eight units in the last place of a lower precision (bfloat16,
    float16), whose own rounding of `1/n` already moves the sum that far. The
    loosest over `dtypes` (the weights' own dtype and the one they are cast to)."""
    tol = 1e-6
    for dtype in dtypes:
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            continue
        eps = float(jnp.finfo(dtype).eps)
        tol = max(tol, 1e-4 if eps >= 1e-7 else 1e-6, 8 * eps)
    return tol


def check_nonzero_rows(x, name: str, why: str):
    """Every row of `x` `(..., d)` has a non-zero norm (e.g. a token that is
    mapped to the unit sphere): at once when concrete, through `eqx.error_if`
    when traced (with checks on). Returns `x`, which callers must use."""
    if not _enabled or x is None or x.shape[-2] == 0:
        return x
    if is_concrete(x):
        with jax.ensure_compile_time_eval():
            zero = np.asarray(jnp.all(jnp.asarray(x) == 0, axis=-1))
        if np.any(zero):
            index = tuple(int(i) for i in np.argwhere(zero)[0])
            raise ValueError(f"`{name}` has a zero row (first at index {index}): {why}")
        return x
    return eqx.error_if(x, jnp.any(jnp.all(x == 0, axis=-1)), f"`{name}` has a zero row: {why}")


def check_nonzero(x, name: str, why: str):
    """`x` is not the zero array (e.g. an initial tangent that is normalised):
    at once when concrete, through `eqx.error_if` when traced (with checks on).
    Returns `x`, which callers must use."""
    if not _enabled:
        return x
    if is_concrete(x):
        with jax.ensure_compile_time_eval():
            zero = bool(jnp.all(jnp.asarray(x) == 0))
        if zero:
            raise ValueError(f"`{name}` is zero: {why}")
        return x
    return eqx.error_if(x, jnp.all(x == 0), f"`{name}` is zero: {why}")


def check_beta_in(beta, dtype, name: str = "beta"):
    """`beta` as the solvers compute with it: positive and finite in the working
    floating `dtype`, and not below its smallest normal number (a denormal
    `beta`, e.g. `5e-324`, is flushed to zero by XLA or rounds to 0 in float32).
    Concrete values are always checked (they cost nothing); a traced `beta`
    through `eqx.error_if` with checks on. Returns `beta`, which callers must use."""
    beta = check_positive(beta, name)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return beta
    finfo = jnp.finfo(dtype)
    if is_concrete(beta):
        with jax.ensure_compile_time_eval():
            b = float(np.asarray(beta))
        if b > float(finfo.max):
            raise ValueError(
                f"`{name}` = {b!r} overflows {dtype.name} (largest finite value "
                f"{float(finfo.max):.3g}): it would become inf"
            )
        if b < float(finfo.tiny):
            raise ValueError(
                f"`{name}` = {b!r} is below the smallest normal {dtype.name} "
                f"({float(finfo.tiny):.3g}): it would be computed as 0"
            )
        return beta
    if not _enabled:
        return beta
    b = jnp.asarray(beta).astype(dtype)
    return eqx.branched_error_if(
        beta,
        ~jnp.isfinite(b) | (b < finfo.tiny),
        jnp.where(jnp.isfinite(b), 0, 1),
        [
            f"`{name}` is below the smallest normal {dtype.name}: it would be computed as 0",
            f"`{name}` overflows {dtype.name}: it would become inf",
        ],
    )


def check_states_finite(outputs, forward, adjoint, name: str):
    """One runtime check that a solve's states stayed finite: `forward` and
    `adjoint` are small pytrees read for the test (e.g. the final tokens and the
    initial adjoints; a non-finite value anywhere propagates to them), and the
    check is threaded through `outputs` (everything the solve returns), so that
    it fires whenever a result is used. Always on when called (one reduction
    per leaf, one conditional). The message names the solve and says NaN or inf.
    Returns `outputs`, which callers must use."""

    def flags(tree):
        leaves = [jnp.asarray(a) for a in jax.tree.leaves(tree) if _is_inexact(a)]
        if not leaves:
            return jnp.array(False), jnp.array(False)
        nan = jnp.any(jnp.stack([jnp.any(jnp.isnan(a)) for a in leaves]))
        inf = jnp.any(jnp.stack([jnp.any(jnp.isinf(a)) for a in leaves]))
        return nan, inf

    fnan, finf = flags(forward)
    anan, ainf = flags(adjoint)
    fbad, abad = fnan | finf, anan | ainf
    # 0: nothing wrong (the smallest index: see `_check_named` on vmap)
    index = jnp.where(fbad, jnp.where(fnan, 1, 2), jnp.where(abad, jnp.where(anan, 3, 4), 0))
    hint = (
        "(overflow: check the size of the tokens and of `beta` in this dtype, or "
        "a zero token mapped to the sphere)"
    )
    messages = [
        "non-finite states",
        f"{name}'s forward pass produced NaN {hint}",
        f"{name}'s forward pass produced inf {hint}",
        f"{name}'s adjoint pass produced NaN {hint}",
        f"{name}'s adjoint pass produced inf {hint}",
    ]
    return eqx.branched_error_if(outputs, fbad | abad, index, messages)


def check_grid(times, interpolation: str, name: str = "times"):
    """The nodes of a depth grid `(N,)` on `[0, 1]`: finite, strictly increasing,
    starting at 0, ending at 1 (linear interpolation, `N > 1`) or below 1
    (constant interpolation, where nodes are left endpoints). At once when
    concrete, through `eqx.error_if` when traced (with checks on), so that a
    grid passed to a jitted solver is checked as [`mfattn.ParamPath`][] checks
    it. Returns `times`, which callers must use.

    **Raises:** `ValueError` naming `times` (or `equinox.EquinoxRuntimeError`
    with the same words when traced)."""
    N = times.shape[0]
    if N == 0:
        raise ValueError(f"`{name}` has no nodes")
    last_is_one = interpolation == "linear" and N > 1
    last_below_one = interpolation == "constant"
    if is_concrete(times):
        with jax.ensure_compile_time_eval():
            t = np.asarray(times, dtype=np.float64)
        if not np.all(np.isfinite(t)):
            raise ValueError(f"`{name}` has non-finite values: {_describe(t)}")
        if np.any(np.diff(t) <= 0):
            raise ValueError(f"`{name}` must be strictly increasing, got {t}")
        if t[0] != 0.0:
            raise ValueError(f"`{name}` must start at 0 (cover [0, 1]), got t_0={t[0]}")
        if last_is_one and t[-1] != 1.0:
            raise ValueError(f"`{name}` must end at 1 for linear interpolation, got t_J={t[-1]}")
        if last_below_one and t[-1] >= 1.0:
            raise ValueError(
                f"`{name}` are left endpoints for constant interpolation: the "
                f"last must be < 1, got {t[-1]}"
            )
        return times
    if not _enabled:
        return times
    conditions = [
        (jnp.any(jnp.isnan(times)), f"`{name}` contains NaN"),
        (jnp.any(jnp.isinf(times)), f"`{name}` contains inf"),
        (jnp.any(jnp.diff(times) <= 0), f"`{name}` must be strictly increasing"),
        (times[0] != 0, f"`{name}` must start at 0 (cover [0, 1])"),
    ]
    if last_is_one:
        conditions.append((times[-1] != 1, f"`{name}` must end at 1 for linear interpolation"))
    if last_below_one:
        conditions.append(
            (
                times[-1] >= 1,
                f"`{name}` are left endpoints for constant interpolation: the last must be < 1",
            )
        )
    bad = jnp.stack([c for c, _ in conditions])
    # 0: nothing wrong (the smallest index: see `_check_named` on vmap)
    index = jnp.where(jnp.any(bad), 1 + jnp.argmax(bad), 0)
    messages = [f"`{name}` is not a valid grid"] + [m for _, m in conditions]
    return eqx.branched_error_if(times, jnp.any(bad), index, messages)
