"""Attention kernels: the backends of the attention field (docs/theory.md, section 1)."""

from ._auto import AutoKernel as AutoKernel
from ._base import AbstractAttentionKernel as AbstractAttentionKernel
from ._base import AbstractForwardOnlyKernel as AbstractForwardOnlyKernel
from ._chunked import ChunkedKernel as ChunkedKernel
from ._dense import DenseKernel as DenseKernel
from ._fused import FusedBuildError as FusedBuildError
from ._fused import FusedCPUKernel as FusedCPUKernel
from ._fused import fused_cpu_available as fused_cpu_available
from ._pallas import PallasKernel as PallasKernel
from ._sharded import ShardedKernel as ShardedKernel
from ._sharded import auto_mesh as auto_mesh
from ._unnormalized import UnnormalizedKernel as UnnormalizedKernel


def resolve_kernel(kernel=None, chunk_size=None, mesh=None) -> AbstractAttentionKernel:
    """The kernel object from `kernel=` or the `chunk_size=`/`mesh=` shortcuts."""
    if kernel is not None:
        if not isinstance(kernel, AbstractAttentionKernel):
            raise TypeError(
                f"`kernel` must be an mfattn attention kernel, got {type(kernel).__name__}"
            )
        if chunk_size is not None:
            raise ValueError("pass either `kernel` or `chunk_size`, not both")
    elif chunk_size is None:
        kernel = AutoKernel()
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}")
        kernel = ChunkedKernel(chunk_size)
    if mesh is not None:
        if isinstance(kernel, ShardedKernel):
            raise ValueError("`kernel` is already sharded; do not pass `mesh` too")
        kernel = ShardedKernel(kernel, mesh)
    return kernel
