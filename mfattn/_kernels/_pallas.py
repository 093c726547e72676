"""A fused flash-style kernel written in Pallas, for accelerators and small head
dimensions (docs/theory.md, sections 1, 4 and 8).

Three `pallas_call`s, each over a grid of (heads, blocks): the forward pass
(one program per block of queries, an online softmax over the blocks of keys),
the key side of the backward pass (one program per block of keys, a loop over
the blocks of queries: `dk`, `dv`) and its query side (one program per block of
queries: `dq`). Densities are recomputed from the log-normaliser, as in
`_softmax.backward_block`, so memory is `O(H (m + n) k)`.

Layout: the leading (head) axes are flattened, the head dimension is padded with
zeros to a power of two of at least 16 (Triton's smallest `dot`; zero columns
change no score), the queries and keys to multiples of their block sizes
(padding keys have weight 0, padding queries weight 0, both sliced off). `beta`
is folded into the queries before the call (`s_ij = <beta q_i, k_j>`).
"""

import dataclasses
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _softmax
from ._base import AbstractAttentionKernel, as_slope, check_options, check_positions
from ._dense import DenseKernel

try:  # the Pallas API (import errors are reported when the kernel is used)
    from jax.experimental import pallas as pl
except ImportError as e:  # pragma: no cover
    pl, _PALLAS_ERROR = None, e
else:
    _PALLAS_ERROR = None

_HIGHEST = lax.Precision.HIGHEST  # IEEE float32 products on GPUs (not TF32)
_MIN_BLOCK = 16  # Triton's smallest dot operand side (float64 needs 16 too)


def _dot(a, b, trans_a=False, trans_b=False):
    """The 2-d product `a @ b` (operands optionally transposed) in the inputs'
    precision: lowered to one Triton `dot` on a GPU."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=a.dtype)


def _squeezed():
    return getattr(pl, "squeezed", None)


def _pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _is_pow2_block(b) -> bool:
    return not isinstance(b, bool) and isinstance(b, int) and b >= _MIN_BLOCK and b & (b - 1) == 0


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static options of one call (hashable: a `custom_vjp` static argument)."""

    causal: bool
    strict: bool
    slope: float | None
    block_q: int
    block_k: int
    interpret: bool
    num_warps: int | None
    num_stages: int | None

    @property
    def positions(self) -> bool:
        return self.causal or self.slope is not None


# ---------------------------------------------------------------- the layout


def _pad_to(x, axis, size):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


@dataclasses.dataclass(frozen=True)
class _Layout:
    lead: tuple
    m: int
    n: int
    kdim: int
    kp: int
    bq: int
    bk: int
    mp: int
    np_: int

    @property
    def heads(self) -> int:
        return math.prod(self.lead)

    def heads_in(self, x, rows):
        """`(..., rows, kdim)` as `(G, rows_padded, kp)`."""
        x = x.reshape((self.heads,) + x.shape[-2:])
        return _pad_to(_pad_to(x, 2, self.kp), 1, rows)

    def heads_out(self, x, rows):
        return x[:, :rows, : self.kdim].reshape(self.lead + (rows, self.kdim))


def _layout(cfg: _Config, q, k) -> _Layout:
    m, kdim = q.shape[-2:]
    n = k.shape[-2]
    bq = min(cfg.block_q, max(_MIN_BLOCK, _pow2(m)))
    bk = min(cfg.block_k, max(_MIN_BLOCK, _pow2(n)))
    return _Layout(
        lead=q.shape[:-2],
        m=m,
        n=n,
        kdim=kdim,
        kp=max(_MIN_BLOCK, _pow2(kdim)),
        bq=bq,
        bk=bk,
        mp=-(-m // bq) * bq,
        np_=-(-n // bk) * bk,
    )


def _side_inputs(cfg, lay, w, qpos, kpos, dtype):
    """Key weights, positions and the ALiBi rate `slope / n`, padded: `(w, extras)`
    where `extras` is `()` or `(qpos, kpos, rate)` (positions int32; the rate
    one float per query)."""
    wp = _pad_to(w.astype(dtype), 0, lay.np_)
    if not cfg.positions:
        return wp, ()
    rate = 0.0 if cfg.slope is None else cfg.slope / _softmax.num_tokens(w).astype(dtype)
    return wp, (
        _pad_to(qpos.astype(jnp.int32), 0, lay.mp),
        _pad_to(kpos.astype(jnp.int32), 0, lay.np_),
        jnp.full((lay.mp,), rate, dtype),
    )


# ------------------------------------------------------ inside the kernels


def _scores(cfg, q, kk, qp, kp, rate):
    """`(s, mask)` of one (query block, key block) pair: `<q_i, k_j> + b_ij` and
    the visibility mask (`None` without positions)."""
    s = _dot(q, kk, trans_b=True)
    if not cfg.positions:
        return s, None
    gap = qp[:, None] - kp[None, :]
    if cfg.slope is not None:
        s = s - rate[:, None] * jnp.abs(gap).astype(s.dtype)
    if not cfg.causal:
        return s, None
    return s, (gap > 0) if cfg.strict else (gap >= 0)


def _density(cfg, q, kk, lse, qp, kp, rate):
    s, mask = _scores(cfg, q, kk, qp, kp, rate)
    cap = float(np.log(np.finfo(s.dtype).max)) / 4  # as _softmax.density
    A = jnp.exp(jnp.minimum(s - lse[:, None], cap))
    return A if mask is None else jnp.where(mask, A, 0.0)


def _forward_kernel(cfg, lay, q_ref, k_ref, v_ref, w_ref, *refs):
    extra, (o_ref, lse_ref) = refs[:-2], refs[-2:]
    q = q_ref[...]
    qp, kpos_ref, rate = (extra[0][...], extra[1], extra[2][...]) if extra else (None,) * 3
    dtype = q.dtype

    def body(j, state):
        mx, total, acc = state
        blk = pl.ds(j * lay.bk, lay.bk)
        kk, vv, ww = k_ref[blk, :], v_ref[blk, :], w_ref[blk]
        kp = None if kpos_ref is None else kpos_ref[blk]
        s, mask = _scores(cfg, q, kk, qp, kp, rate)
        on = jnp.broadcast_to((ww > 0)[None, :], s.shape)
        if mask is not None:
            on = on & mask
        s = jnp.where(on, s, -jnp.inf)
        new = jnp.maximum(mx, jnp.max(s, axis=1))
        safe = jnp.where(jnp.isfinite(new), new, 0.0)
        scale = jnp.where(jnp.isfinite(mx), jnp.exp(mx - safe), 0.0)
        e = jnp.where(on, ww[None, :] * jnp.exp(s - safe[:, None]), 0.0)
        total = total * scale + jnp.sum(e, axis=1)
        acc = acc * scale[:, None] + _dot(e, vv)
        return new, total, acc

    state = (
        jnp.full((lay.bq,), -jnp.inf, dtype),
        jnp.zeros((lay.bq,), dtype),
        jnp.zeros((lay.bq, lay.kp), dtype),
    )
    mx, total, acc = lax.fori_loop(0, lay.np_ // lay.bk, body, state)
    empty = total <= 0
    one = jnp.where(empty, 1.0, total)
    o_ref[...] = acc / one[:, None]
    lse_ref[...] = jnp.where(empty, jnp.inf, jnp.log(one) + mx)


def _dkdv_kernel(cfg, lay, q_ref, k_ref, v_ref, c_ref, lse_ref, dl_ref, u_ref, *refs):
    extra, (dk_ref, dv_ref, ds_ref) = refs[:-3], refs[-3:]
    kk, vv = k_ref[...], v_ref[...]
    kp = extra[1][...] if extra else None

    def body(i, state):
        dk, dv, ds = state
        blk = pl.ds(i * lay.bq, lay.bq)
        q, c, u = q_ref[blk, :], c_ref[blk, :], u_ref[blk]
        qp, rate = (extra[0][blk], extra[2][blk]) if extra else (None, None)
        A = _density(cfg, q, kk, lse_ref[blk], qp, kp, rate)
        dS = A * (_dot(c, vv, trans_b=True) - dl_ref[blk][:, None])
        dSu = dS * u[:, None]
        dk = dk + _dot(dSu, q, trans_a=True)
        dv = dv + _dot(A * u[:, None], c, trans_a=True)
        return dk, dv, ds + jnp.sum(dSu, axis=0)

    zeros = jnp.zeros((lay.bk, lay.kp), kk.dtype)
    state = (zeros, zeros, jnp.zeros((lay.bk,), kk.dtype))
    dk, dv, ds = lax.fori_loop(0, lay.mp // lay.bq, body, state)
    dk_ref[...] = dk
    dv_ref[...] = dv
    ds_ref[...] = ds


def _dq_kernel(cfg, lay, q_ref, k_ref, v_ref, w_ref, c_ref, lse_ref, dl_ref, *refs):
    extra, dq_ref = refs[:-1], refs[-1]
    q, c, lse, dl = q_ref[...], c_ref[...], lse_ref[...], dl_ref[...]
    qp, kpos_ref, rate = (extra[0][...], extra[1], extra[2][...]) if extra else (None,) * 3

    def body(j, dq):
        blk = pl.ds(j * lay.bk, lay.bk)
        kk, vv, ww = k_ref[blk, :], v_ref[blk, :], w_ref[blk]
        kp = None if kpos_ref is None else kpos_ref[blk]
        A = _density(cfg, q, kk, lse, qp, kp, rate)
        dS = A * (_dot(c, vv, trans_b=True) - dl[:, None])
        return dq + _dot(dS * ww[None, :], kk)

    dq_ref[...] = lax.fori_loop(0, lay.np_ // lay.bk, body, jnp.zeros((lay.bq, lay.kp), q.dtype))


# ------------------------------------------------------------- the calls


def _specs(lay):
    """Block specs over the grid `(head g, block b)`: a block of rows, all the
    rows, a per-row vector block and a whole per-row vector (shared by heads)."""
    sq = _squeezed()

    def rows(size):
        return pl.BlockSpec((sq, size, lay.kp), lambda g, b: (g, b, 0))

    def all_rows(total):
        return pl.BlockSpec((sq, total, lay.kp), lambda g, b: (g, 0, 0))

    def head_vec(size):
        return pl.BlockSpec((sq, size), lambda g, b: (g, b))

    def head_all(total):
        return pl.BlockSpec((sq, total), lambda g, b: (g, 0))

    def vec(size):
        return pl.BlockSpec((size,), lambda g, b: (b,))

    def vec_all(total):
        return pl.BlockSpec((total,), lambda g, b: (0,))

    return rows, all_rows, head_vec, head_all, vec, vec_all


def _call(cfg, kernel, grid, in_specs, out_specs, out_shape, name):
    params = {}
    if not cfg.interpret:
        try:  # Triton, not Mosaic GPU: `compiler_params` selects the backend
            from jax.experimental.pallas import triton as plgpu

            params["compiler_params"] = plgpu.CompilerParams(
                num_warps=cfg.num_warps, num_stages=cfg.num_stages
            )
        except (ImportError, AttributeError):  # another JAX: Pallas' default backend
            pass
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=tuple(in_specs),
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        name=name,
        **params,
    )


def _forward(cfg, q, k, v, w, beta, qpos, kpos):
    """`(o, lse)` as `_softmax.forward_finish` gives them."""
    lay = _layout(cfg, q, k)
    dtype = q.dtype
    rows, all_rows, head_vec, _, vec, vec_all = _specs(lay)
    qs = lay.heads_in(beta * q, lay.mp)
    ks, vs = lay.heads_in(k, lay.np_), lay.heads_in(v, lay.np_)
    wp, extras = _side_inputs(cfg, lay, w, qpos, kpos, dtype)
    in_specs = [rows(lay.bq), all_rows(lay.np_), all_rows(lay.np_), vec_all(lay.np_)]
    if extras:
        in_specs += [vec(lay.bq), vec_all(lay.np_), vec(lay.bq)]
    G = lay.heads
    o, lse = _call(
        cfg,
        lambda *r: _forward_kernel(cfg, lay, *r),
        (G, lay.mp // lay.bq),
        in_specs,
        [rows(lay.bq), head_vec(lay.bq)],
        [
            jax.ShapeDtypeStruct((G, lay.mp, lay.kp), dtype),
            jax.ShapeDtypeStruct((G, lay.mp), dtype),
        ],
        "mfattn_attention_forward",
    )(qs, ks, vs, wp, *extras)
    return lay.heads_out(o, lay.m), lse[:, : lay.m].reshape(lay.lead + (lay.m,))


def _backward(cfg, q, k, v, w, beta, qpos, kpos, lse, delta, c, u):
    """`(dq / beta, dk, dv, ds)`: `dq_i / beta = sum_j w_j dS_ij k_j`,
    `dk_j = beta sum_i u_i dS_ij q_i`, `dv_j = sum_i u_i A_ij c_i` and
    `ds_j = sum_i u_i dS_ij`, with `dS_ij = A_ij (<c_i, v_j> - delta_i)`."""
    lay = _layout(cfg, q, k)
    dtype = q.dtype
    G = lay.heads
    rows, all_rows, head_vec, head_all, vec, vec_all = _specs(lay)
    qs = lay.heads_in(beta * q, lay.mp)
    ks, vs = lay.heads_in(k, lay.np_), lay.heads_in(v, lay.np_)
    cs = lay.heads_in(c, lay.mp)
    wp, extras = _side_inputs(cfg, lay, w, qpos, kpos, dtype)
    # padding queries see no key: +inf log-normaliser, density 0
    lp = _pad_to(lse.reshape(G, lay.m), 1, lay.mp)
    lp = lp.at[:, lay.m :].set(jnp.inf)
    dl = _pad_to(delta.reshape(G, lay.m), 1, lay.mp)
    up = _pad_to(u.astype(dtype), 0, lay.mp)

    key_in = [all_rows(lay.mp), rows(lay.bk), rows(lay.bk), all_rows(lay.mp)]
    key_in += [head_all(lay.mp), head_all(lay.mp), vec_all(lay.mp)]
    if extras:
        key_in += [vec_all(lay.mp), vec(lay.bk), vec_all(lay.mp)]
    dk, dv, ds = _call(
        cfg,
        lambda *r: _dkdv_kernel(cfg, lay, *r),
        (G, lay.np_ // lay.bk),
        key_in,
        [rows(lay.bk), rows(lay.bk), head_vec(lay.bk)],
        [
            jax.ShapeDtypeStruct((G, lay.np_, lay.kp), dtype),
            jax.ShapeDtypeStruct((G, lay.np_, lay.kp), dtype),
            jax.ShapeDtypeStruct((G, lay.np_), dtype),
        ],
        "mfattn_attention_backward_keys",
    )(qs, ks, vs, cs, lp, dl, up, *extras)

    query_in = [rows(lay.bq), all_rows(lay.np_), all_rows(lay.np_), vec_all(lay.np_)]
    query_in += [rows(lay.bq), head_vec(lay.bq), head_vec(lay.bq)]
    if extras:
        query_in += [vec(lay.bq), vec_all(lay.np_), vec(lay.bq)]
    dq = _call(
        cfg,
        lambda *r: _dq_kernel(cfg, lay, *r),
        (G, lay.mp // lay.bq),
        query_in,
        rows(lay.bq),
        jax.ShapeDtypeStruct((G, lay.mp, lay.kp), dtype),
        "mfattn_attention_backward_queries",
    )(qs, ks, vs, wp, cs, lp, dl, *extras)
    return (
        lay.heads_out(dq, lay.m),
        lay.heads_out(dk, lay.n),
        lay.heads_out(dv, lay.n),
        ds[:, : lay.n].reshape(lay.lead + (lay.n,)),
    )


# ----------------------------------- the forward pass, differentiable


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg, q, k, v, w, beta, qpos, kpos):
    return _forward(cfg, q, k, v, w, beta, qpos, kpos)


def _attend_fwd(cfg, q, k, v, w, beta, qpos, kpos):
    o, lse = _forward(cfg, q, k, v, w, beta, qpos, kpos)
    return (o, lse), (q, k, v, w, beta, qpos, kpos, o, lse)


def _attend_bwd(cfg, res, cts):
    return _softmax.forward_vjp(_backward, cfg, res, cts)


_attend.defvjp(_attend_fwd, _attend_bwd)


# ------------------------------------------------------------ the kernel


class PallasKernel(AbstractAttentionKernel):
    """A fused flash-attention kernel in Pallas for small head dimensions
    (`k = 4 ... 32`, where FlashAttention and cuDNN attention do not apply): an
    online softmax over blocks of keys, one program per (head, block of
    queries), and the closed-form backward pass of docs/theory.md, section 4,
    as two more fused kernels (key side, then query side) that recompute the
    densities from the log-normaliser. The same numbers as
    [`mfattn.DenseKernel`][] to rounding, memory `O(H (m + n) k)`.

    On a GPU it compiles with Pallas' Triton backend; elsewhere (the CPU) it
    runs in Pallas' interpreter, which is correct but slow: a kernel for tests
    and for checking, not for speed there. It is opt-in (pass
    `kernel=mfattn.PallasKernel()`); [`mfattn.AutoKernel`][] does not choose it.
    Its forward pass is differentiable in reverse mode (`jax.grad` of
    [`mfattn.discrete_loss`][], `jax.vjp`) by the same fused backward kernels,
    in `q, k, v, w` and `beta`; forward mode (`jax.jvp`, `jax.jacfwd`) is not
    available. The derivative in a zero weight `w_j` is the one-sided one
    (`w_j -> 0+`), where the dense kernel's automatic derivative gives 0.

    **Arguments:**

    - `causal`, `strict`, `alibi_slope`: as for [`mfattn.DenseKernel`][].
    - `block_q`, `block_k`: queries and keys per block, powers of two of at
      least 16 (default 64 each; a block is cut down to the sequence for short
      ones).
    - `interpret`: run in Pallas' interpreter (`True`), compile (`False`), or
      `None` (default): interpret when JAX's default backend is the CPU.
    - `num_warps`, `num_stages`: Triton's launch options (default `None`:
      Triton's choice).

    **Raises:** `ValueError` for block sizes that are not powers of two of at
    least 16, and as [`mfattn.DenseKernel`][] for the other options;
    `ImportError` on use when `jax.experimental.pallas` cannot be imported.
    """

    causal: bool = eqx.field(static=True, default=False)
    strict: bool = eqx.field(static=True, default=False, kw_only=True)
    alibi_slope: float | None = eqx.field(
        static=True, default=None, converter=as_slope, kw_only=True
    )
    block_q: int = eqx.field(static=True, default=64, kw_only=True)
    block_k: int = eqx.field(static=True, default=64, kw_only=True)
    interpret: bool | None = eqx.field(static=True, default=None, kw_only=True)
    num_warps: int | None = eqx.field(static=True, default=None, kw_only=True)
    num_stages: int | None = eqx.field(static=True, default=None, kw_only=True)

    def __check_init__(self):
        check_options(self)
        for name in ("block_q", "block_k"):
            b = getattr(self, name)
            if not _is_pow2_block(b):
                raise ValueError(
                    f"`{name}` must be a power of two of at least {_MIN_BLOCK}, got {b!r}"
                )
        if self.interpret is not None and not isinstance(self.interpret, (bool, np.bool_)):
            raise TypeError(f"`interpret` must be a bool or None, got {self.interpret!r}")
        for name in ("num_warps", "num_stages"):
            x = getattr(self, name)
            if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
                raise ValueError(f"`{name}` must be a positive int or None, got {x!r}")

    def _config(self, q) -> _Config:
        if pl is None:
            raise ImportError(
                "PallasKernel needs jax.experimental.pallas, which could not be imported"
            ) from _PALLAS_ERROR
        if not jnp.issubdtype(q.dtype, jnp.floating):
            raise TypeError(f"PallasKernel needs floating-point inputs, got {q.dtype}")
        interpret = self.interpret
        if interpret is None:
            interpret = jax.default_backend() == "cpu"
        return _Config(
            causal=bool(self.causal),
            strict=bool(self.strict),
            slope=self.alibi_slope,
            block_q=self.block_q,
            block_k=self.block_k,
            interpret=bool(interpret),
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        cfg = self._config(q)
        return _attend(cfg, q, k, v, w, jnp.asarray(beta, q.dtype), qpos, kpos)

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        cfg = self._config(q)
        beta = jnp.asarray(beta, q.dtype)
        delta = jnp.sum(c * o, -1)
        dqb, dk, dv, _ = _backward(cfg, q, k, v, w, beta, qpos, kpos, aux, delta, c, u)
        return beta * dqb, dk, dv

    def weights(self, q, k, w, beta, qpos=None, kpos=None):
        dense = DenseKernel(self.causal, strict=self.strict, alibi_slope=self.alibi_slope)
        return dense.weights(q, k, w, beta, qpos, kpos)
