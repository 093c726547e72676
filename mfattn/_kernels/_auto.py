"""The default kernel: dense or chunked, chosen from the sizes at trace time."""

import equinox as eqx

from ._base import AbstractAttentionKernel, as_slope, check_options
from ._chunked import ChunkedKernel
from ._dense import DenseKernel


class AutoKernel(AbstractAttentionKernel):
    """The default backend: [`mfattn.DenseKernel`][] when there are at most
    `max_dense_keys` keys, else [`mfattn.ChunkedKernel`][]`(chunk_size)`. The
    choice is made from the (static) shapes at trace time, so it costs nothing
    at run time; both give the same numbers to rounding. The thresholds come
    from the step timings of `benchmarks/README.md` (at `n = 256` keys the
    chunked kernel with blocks of 128 took 7.9 s against 13.7 s for the dense
    one, and its memory is `O(m * chunk_size)`).

    **Arguments:** `causal`, `strict`, `alibi_slope` (as for
    [`mfattn.DenseKernel`][], passed to the kernel chosen), `max_dense_keys`
    (default 128), `chunk_size` (default 128).
    """

    causal: bool = eqx.field(static=True, default=False)
    max_dense_keys: int = eqx.field(static=True, default=128)
    chunk_size: int = eqx.field(static=True, default=128)
    strict: bool = eqx.field(static=True, default=False, kw_only=True)
    alibi_slope: float | None = eqx.field(
        static=True, default=None, converter=as_slope, kw_only=True
    )

    def __check_init__(self):
        check_options(self)

    def choose(self, num_keys: int) -> AbstractAttentionKernel:
        """The kernel used for `num_keys` keys."""
        options = dict(strict=self.strict, alibi_slope=self.alibi_slope)
        if num_keys <= self.max_dense_keys:
            return DenseKernel(self.causal, **options)
        return ChunkedKernel(self.chunk_size, self.causal, **options)

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        return self.choose(k.shape[-2]).forward(q, k, v, w, beta, qpos, kpos)

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        return self.choose(k.shape[-2]).backward(q, k, v, w, o, aux, c, u, beta, qpos, kpos)

    def weights(self, q, k, w, beta, qpos=None, kpos=None):
        return self.choose(k.shape[-2]).weights(q, k, w, beta, qpos, kpos)
