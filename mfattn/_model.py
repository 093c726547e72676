"""Models: parameters plus the solver that turns them into a Solution."""

import abc

import equinox as eqx

from ._discrete import solve_discrete
from ._kernels import AbstractAttentionKernel
from ._params import AttentionParams
from ._solution import Solution
from ._sphere import check_normalization


class AbstractModel(eqx.Module):
    """A trainable transformer: parameters and how to solve it on a measure.

    Concrete models are [`mfattn.DiscreteTransformer`][] and
    [`mfattn.MeanFieldTransformer`][]; [`mfattn.train`][] treats both alike.
    """

    params: eqx.AbstractVar[AttentionParams]
    beta: eqx.AbstractVar[float]

    @abc.abstractmethod
    def solve(self, measure, loss, *, test_points=None, test_labels=None) -> Solution:
        """Forward states, adjoints and gradient map on one measure."""

    def with_params(self, params: AttentionParams) -> "AbstractModel":
        """The same model with new parameters."""
        return eqx.tree_at(lambda m: m.params, self, params)


class DiscreteTransformer(AbstractModel):
    """The `L`-layer, `H`-head attention-only transformer of docs/theory.md,
    section 3: [`mfattn.solve_discrete`][] on `params` (leaves `(L, H, d, k)`),
    with the attention backend `kernel` (or the `chunk_size`/`mesh` shortcuts),
    post-normalised onto the sphere with `normalization="sphere"`
    (docs/theory.md, section 10)."""

    params: AttentionParams
    beta: float = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True, default=None)
    mesh: object = eqx.field(static=True, default=None)
    kernel: AbstractAttentionKernel | None = None
    normalization: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_normalization(self.normalization)

    def solve(self, measure, loss, *, test_points=None, test_labels=None) -> Solution:
        return solve_discrete(
            self.params,
            measure,
            loss,
            self.beta,
            test_points=test_points,
            test_labels=test_labels,
            kernel=self.kernel,
            chunk_size=self.chunk_size,
            mesh=self.mesh,
            normalization=self.normalization,
        )


class MeanFieldTransformer(AbstractModel):
    """The continuous limit of docs/theory.md, section 6: parameter particles on a depth
    grid (leaves `(J+1, M, d, k)`), solved by [`mfattn.solve_limit`][]. Every
    (particle, node) pair is trained by its own optimiser state from the
    gradient map at that node. `normalization="sphere"`: the limit of the
    post-normalised transformer, the projected flow on the sphere
    (docs/theory.md, section 10)."""

    params: AttentionParams
    beta: float = eqx.field(static=True)
    times: object = None
    interpolation: str = eqx.field(static=True, default="linear")
    rtol: float | None = eqx.field(static=True, default=1e-6)
    atol: float | None = eqx.field(static=True, default=1e-8)
    max_steps: int = eqx.field(static=True, default=4096)
    chunk_size: int | None = eqx.field(static=True, default=None)
    mesh: object = eqx.field(static=True, default=None)
    kernel: AbstractAttentionKernel | None = None
    normalization: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_normalization(self.normalization)

    def solve(self, measure, loss, *, test_points=None, test_labels=None, ts=None) -> Solution:
        from ._limit import solve_limit

        return solve_limit(
            self.params,
            measure,
            loss,
            self.beta,
            test_points=test_points,
            test_labels=test_labels,
            ts=ts,
            times=self.times,
            interpolation=self.interpolation,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            kernel=self.kernel,
            chunk_size=self.chunk_size,
            mesh=self.mesh,
            normalization=self.normalization,
        )
