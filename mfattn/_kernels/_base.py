"""The kernel interface: how one layer's heads attend (docs/theory.md, section 1)."""

import abc

import equinox as eqx
from jaxtyping import Array, PyTree

from .._custom_types import HeadArray, Positions


class AbstractAttentionKernel(eqx.Module):
    """How the heads of one layer attend: the backend of [`mfattn.AttentionField`][].

    A kernel acts in head space on projected queries `q (H, m, k)`, keys
    `k (H, n, k)`, values `v (H, n, k)` and key weights `w (n,)`, and computes

    - `forward`: the attention output `o_i = sum_j w_j A_ij v_j` and an auxiliary
      per-query quantity `aux` (whatever the kernel needs to recompute the
      attention density in `backward`; leaves of leading shape `(H, m)`), and
    - `backward`: the closed-form cotangents of docs/theory.md, sections 1 and 4,
      for query cotangents `c (H, m, k)` and query weights `u (m,)`:
      `dq` (keys weighted by `w`) and `dk, dv` (queries weighted by `u`).

    Zero-weight keys are probes (no effect on the softmax, but their `dk, dv`
    are defined) and zero-weight queries do not act on the keys; that is how
    test particles and the Lions derivative at arbitrary points are computed.

    With `causal=True`, key `j` is visible to query `i` only when
    `kpos[j] <= qpos[i]` (docs/theory.md, section 8); the positions are then
    required. A new backend (a fused or Pallas kernel) is one new subclass.
    """

    causal: eqx.AbstractVar[bool]

    @property
    def uses_positions(self) -> bool:
        """Whether the kernel reads sequence positions `qpos`, `kpos` (a causal
        mask, a positional bias); the field then passes them."""
        return self.causal

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


def check_positions(kernel, qpos, kpos):
    if kernel.causal and (qpos is None or kpos is None):
        raise ValueError("a causal kernel needs query and key positions `qpos`, `kpos`")
    if not kernel.causal:
        return None, None
    return qpos, kpos
