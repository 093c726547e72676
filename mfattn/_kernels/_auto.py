"""The default kernel: dense or chunked, chosen from the sizes and the backend
at trace time."""

import functools

import equinox as eqx
import jax

from ._base import AbstractAttentionKernel, as_slope, check_options
from ._chunked import ChunkedKernel
from ._dense import DenseKernel
from ._fused import _MAX_HEAD_DIM, FusedCPUKernel, fused_cpu_available

# On the CPU: dense up to this many keys, else chunks of this many keys (the step
# timings of benchmarks/README.md: at n = 256 keys chunks of 128 took 7.9 s
# against 13.7 s for the dense kernel).
CPU_MAX_DENSE_KEYS = 128
CPU_CHUNK_SIZE = 128
# On an accelerator the dense kernel runs the scores as a few large fused
# operations, and the chunked kernel's loop over key blocks is sequential: the
# larger the block the better, as long as the block of scores fits. One call
# (one sample of a vmapped batch) may hold a block of scores of at most
# 1/ACCELERATOR_MEMORY_SHARE of the device's memory, so that a batch of a dozen
# samples, forward and backward, stays within a fraction of it (on one H200 the
# dense kernel took 0.022 s against 0.237 s for chunks of 128 keys at n = 256,
# benchmarks/results/gpu_check_speed.json); 256 MiB where the device does not
# say its memory.
ACCELERATOR_MEMORY_SHARE = 64
ACCELERATOR_SCORE_BYTES = 2**28


@functools.cache
def score_budget(backend: str) -> int:
    """The bytes of scores one call may hold on `backend` (an accelerator)."""
    try:
        limit = jax.local_devices(backend=backend)[0].memory_stats()["bytes_limit"]
        return max(int(limit) // ACCELERATOR_MEMORY_SHARE, 2**20)
    except Exception:  # no memory statistics on this backend
        return ACCELERATOR_SCORE_BYTES


def _floor_pow2(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


class AutoKernel(AbstractAttentionKernel):
    """The default backend: the fused C++ kernel on the CPU, else
    [`mfattn.DenseKernel`][] for few keys and [`mfattn.ChunkedKernel`][] for
    many. The choice is made from the (static) shapes, the dtype and the
    default backend at trace time, so it costs nothing at run time; all give
    the same numbers to rounding.

    - On the CPU: [`mfattn.FusedCPUKernel`][] for float32 and float64 inputs
      with a head dimension of at most 64, where it could be built
      (`mfattn.fused_cpu_available()`; it is built for the machine on first use
      and runs on all its cores). Otherwise dense up to 128 keys, else chunks
      of 128 keys.
    - On an accelerator (GPU, TPU): dense while the scores of one call (heads
      times queries times keys) fit in 1/64 of the device's memory (256 MiB
      where it does not say), else the largest power-of-two chunk whose scores
      fit (at least 128 keys). On one H200 the dense kernel was ten times
      faster than chunks of 128 at 256 keys.

    `max_dense_keys` and `chunk_size`, when given, override the rule on every
    backend (and choose between the pure-JAX kernels: the fused kernel is then
    not used).

    **Arguments:** `causal`, `strict`, `alibi_slope` (as for
    [`mfattn.DenseKernel`][], passed to the kernel chosen), `max_dense_keys`
    (default `None`: the rule above), `chunk_size` (default `None`: the rule
    above), `fused` (default `None`: the fused kernel on the CPU where it is
    available; `False`: never).
    """

    causal: bool = eqx.field(static=True, default=False)
    max_dense_keys: int | None = eqx.field(static=True, default=None)
    chunk_size: int | None = eqx.field(static=True, default=None)
    fused: bool | None = eqx.field(static=True, default=None, kw_only=True)
    strict: bool = eqx.field(static=True, default=False, kw_only=True)
    alibi_slope: float | None = eqx.field(
        static=True, default=None, converter=as_slope, kw_only=True
    )

    def __check_init__(self):
        check_options(self)
        for name in ("max_dense_keys", "chunk_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"`{name}` must be a positive int or None, got {v!r}")
        if self.fused not in (None, False):
            raise ValueError(f"`fused` must be None or False, got {self.fused!r}")

    def choose(
        self,
        num_keys: int,
        query_rows: int | None = None,
        itemsize: int = 4,
        backend=None,
        *,
        head_dim: int = 4,
        floating: bool = True,
    ) -> AbstractAttentionKernel:
        """The kernel used for `num_keys` keys.

        `query_rows` is the number of score rows of one call (heads times
        queries; by default `num_keys`), `itemsize` the bytes of one score,
        `backend` the platform (by default `jax.default_backend()`), `head_dim`
        the larger of the query and value dimensions and `floating` whether the
        inputs are float32 or float64 (`itemsize` 4 or 8)."""
        options = dict(strict=self.strict, alibi_slope=self.alibi_slope)
        backend = jax.default_backend() if backend is None else backend
        if (
            backend == "cpu"
            and self.fused is None
            and self.max_dense_keys is None
            and self.chunk_size is None
            and floating
            and itemsize in (4, 8)
            and head_dim <= _MAX_HEAD_DIM
            and fused_cpu_available()
        ):
            return FusedCPUKernel(self.causal, **options)
        if backend == "cpu":
            max_dense, chunk = CPU_MAX_DENSE_KEYS, CPU_CHUNK_SIZE
        else:
            rows = num_keys if query_rows is None else max(int(query_rows), 1)
            fit = _floor_pow2(score_budget(backend) // (rows * itemsize))
            max_dense, chunk = fit, max(fit, CPU_CHUNK_SIZE)
        if self.max_dense_keys is not None:
            max_dense = self.max_dense_keys
        if self.chunk_size is not None:
            chunk = self.chunk_size
        if num_keys <= max_dense:
            return DenseKernel(self.causal, **options)
        return ChunkedKernel(chunk, self.causal, **options)

    def _pick(self, q, k, v=None):
        rows = q.size // q.shape[-1] if q.ndim else 1
        return self.choose(
            k.shape[-2],
            rows,
            q.dtype.itemsize,
            head_dim=max(q.shape[-1], 0 if v is None else v.shape[-1]),
            floating=FusedCPUKernel.supports(q, k, v),
        )

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        return self._pick(q, k, v).forward(q, k, v, w, beta, qpos, kpos)

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        return self._pick(q, k, v).backward(q, k, v, w, o, aux, c, u, beta, qpos, kpos)

    def weights(self, q, k, w, beta, qpos=None, kpos=None):
        return self._pick(q, k).weights(q, k, w, beta, qpos, kpos)
