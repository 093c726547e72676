"""The kernel interface: how one layer's heads attend (docs/theory.md, section 1)."""

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._custom_types import HeadArray, Positions


class AbstractAttentionKernel(eqx.Module):
    """How the heads of one layer attend: the backend of [`mfattn.AttentionField`][].

    A kernel acts in head space on projected queries `q (H, m, k)`, keys
    `k (H, n, k)`, values `v (H, n, k)` and key weights `w (n,)`, and computes

    - `forward`: the attention output `o_i = sum_j w_j A_ij v_j` and an auxiliary
      per-query quantity `aux` (whatever the kernel needs to recompute the
      attention density in `backward`; leaves of leading shape `(H, m)`),
    - `backward`: the closed-form cotangents of docs/theory.md, sections 1 and 4,
      for query cotangents `c (H, m, k)` and query weights `u (m,)`:
      `dq` (keys weighted by `w`) and `dk, dv` (queries weighted by `u`), and
    - `weights`: the attention matrix `P_ij = w_j A_ij`, `(H, m, n)` (what
      [`mfattn.attention_weights`][] returns).

    Zero-weight keys are probes (no effect on the softmax, but their `dk, dv`
    are defined) and zero-weight queries do not act on the keys; that is how
    test particles and the Lions derivative at arbitrary points are computed.

    With `causal=True`, key `j` is visible to query `i` only when
    `kpos[j] <= qpos[i]` (docs/theory.md, section 8); the positions are then
    required. A new backend (a fused or Pallas kernel) is one new subclass; a
    kernel with a forward pass only subclasses
    [`mfattn.AbstractForwardOnlyKernel`][].
    """

    causal: eqx.AbstractVar[bool]

    has_backward: ClassVar[bool] = True
    """Whether `backward` is implemented (`False` for
    [`mfattn.AbstractForwardOnlyKernel`][]): solvers that need the adjoint can
    read it at trace time."""

    @property
    def uses_positions(self) -> bool:
        """Whether the kernel reads sequence positions `qpos`, `kpos` (a causal
        mask, an ALiBi bias `alibi_slope`); the field then passes them. A kernel
        with another positional option overrides this."""
        return bool(self.causal) or getattr(self, "alibi_slope", None) is not None

    @abc.abstractmethod
    def forward(
        self,
        q: HeadArray,
        k: HeadArray,
        v: HeadArray,
        w: Array,
        beta,
        qpos: Positions | None = None,
        kpos: Positions | None = None,
    ) -> tuple[HeadArray, PyTree[Array]]:
        """`(o (H, m, k), aux)`."""

    @abc.abstractmethod
    def backward(
        self,
        q: HeadArray,
        k: HeadArray,
        v: HeadArray,
        w: Array,
        o: HeadArray,
        aux: PyTree[Array],
        c: HeadArray,
        u: Array,
        beta,
        qpos: Positions | None = None,
        kpos: Positions | None = None,
    ) -> tuple[HeadArray, HeadArray, HeadArray]:
        """`(dq (H, m, k), dk (H, n, k), dv (H, n, k))`."""

    def weights(
        self,
        q: HeadArray,
        k: HeadArray,
        w: Array,
        beta,
        qpos: Positions | None = None,
        kpos: Positions | None = None,
    ) -> HeadArray:
        """The attention matrix `P_ij = w_j A_ij`, `(H, m, n)`: the weight with
        which query `i` reads the value of key `j`, so that `o_i = sum_j P_ij v_j`
        (rows sum to 1 over the visible keys for a softmax or hardmax kernel).

        This default is the forward pass with the identity as values
        (`v_j = e_j`, `(H, n, n)`), exact for any kernel, forward-only ones
        included, at `O(H m n^2)` operations; the softmax kernels compute it
        directly from their density in `O(H m n k)`.
        """
        n = k.shape[-2]
        eye = jnp.broadcast_to(jnp.eye(n, dtype=k.dtype), k.shape[:-2] + (n, n))
        o, _ = self.forward(q, k, eye, w, beta, qpos, kpos)
        return o


class AbstractForwardOnlyKernel(AbstractAttentionKernel):
    """A kernel that implements only `forward` (a fused or experimental
    backend, a model read from elsewhere): subclass this and write `forward`.

    Forward-only solves (`solve_discrete` with `loss=None`, calling a model on
    a measure, [`mfattn.attention_flow`][], [`mfattn.probe_outputs`][],
    [`mfattn.attention_weights`][]) accept it; `jax.grad` of
    [`mfattn.discrete_loss`][] differentiates its forward pass by automatic
    differentiation. Every closed-form adjoint calls `backward`, which raises
    a `TypeError` naming the kernel class.
    """

    has_backward: ClassVar[bool] = False

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        """Not available: raises.

        **Raises:** `TypeError` naming the kernel class.
        """
        raise TypeError(
            f"{type(self).__name__} implements only the forward pass; forward-only "
            "solves (model(measure), attention_flow, probe_outputs) accept it, but "
            "the closed-form adjoint needs a kernel with a backward pass"
        )


def check_positions(kernel, qpos, kpos):
    """`(qpos, kpos)` for a kernel that reads positions, else `(None, None)`.

    **Raises:** `ValueError` when the kernel needs positions and one is missing.
    """
    if not kernel.uses_positions:
        return None, None
    if qpos is None or kpos is None:
        what = "causal" if kernel.causal else "positional-bias (alibi_slope)"
        raise ValueError(f"a {what} kernel needs query and key positions `qpos`, `kpos`")
    return qpos, kpos


def as_slope(slope):
    """Converter of `alibi_slope`: `None` or a Python float.

    **Raises:** `TypeError` for anything but one concrete real number.
    """
    if slope is None:
        return None
    dtype = getattr(slope, "dtype", None)
    if (
        isinstance(slope, (bool, np.bool_))
        or np.shape(slope) != ()
        or (dtype is not None and not np.issubdtype(dtype, np.number))
        or (dtype is None and not isinstance(slope, (int, float)))
        or isinstance(slope, complex)
        or (dtype is not None and np.issubdtype(dtype, np.complexfloating))
    ):
        raise TypeError(f"`alibi_slope` must be a real number or None, got {slope!r}")
    try:
        return float(slope)
    except Exception as e:  # a traced value: the slope is a static option
        raise TypeError(
            f"`alibi_slope` must be a concrete real number or None, got {slope!r}"
        ) from e


def check_options(kernel):
    """The invariants of the `causal`, `strict`, `alibi_slope` options.

    **Raises:** `TypeError`/`ValueError` naming the argument.
    """
    if not isinstance(kernel.causal, (bool, np.bool_)):
        raise TypeError(f"`causal` must be a bool, got {kernel.causal!r}")
    if not isinstance(kernel.strict, (bool, np.bool_)):
        raise TypeError(f"`strict` must be a bool, got {kernel.strict!r}")
    if kernel.strict and not kernel.causal:
        raise ValueError(
            "`strict=True` is a strict causal mask (key j visible to query i when j < i) "
            "and needs `causal=True`"
        )
    slope = kernel.alibi_slope
    if slope is not None and not math.isfinite(slope):
        raise ValueError(f"`alibi_slope` must be finite, got {slope!r}")
