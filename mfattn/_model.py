"""Models: parameters plus everything that turns them into a Solution (the
field, the geometry, and for the limit how Diffrax integrates)."""

import abc

import diffrax
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import _solver_options as opts
from ._checks import check_beta
from ._discrete import solve_discrete
from ._field import AttentionField
from ._geometry import AbstractGeometry, Euclidean, Sphere, as_geometry
from ._interpolation import AbstractInterpolation, as_interpolation
from ._kernels import AbstractAttentionKernel
from ._params import AttentionParams
from ._residual import AbstractResidualScaling, InverseDepth, as_residual_scaling
from ._solution import Solution


def _as_beta(beta):
    """`beta` as an array leaf (differentiable, vmappable, no recompilation)."""
    return jnp.asarray(check_beta(beta))


class AbstractModel(eqx.Module):
    """A trainable transformer: parameters and how to solve it on a measure.

    Concrete models are [`mfattn.DiscreteTransformer`][] and
    [`mfattn.MeanFieldTransformer`][]; [`mfattn.train`][] treats both alike.
    A model owns its configuration: the attention field (`beta`, an array
    leaf, and the kernel), the geometry and, for the limit, how Diffrax
    integrates. `model(measure)` is the forward pass alone;
    `model.solve(measure, loss)` adds the adjoint and the gradient map.
    """

    params: eqx.AbstractVar[AttentionParams]
    beta: eqx.AbstractVar[Float[Array, ""]]
    kernel: eqx.AbstractVar[AbstractAttentionKernel | None]
    chunk_size: eqx.AbstractVar[int | None]
    mesh: eqx.AbstractVar[object]
    geometry: eqx.AbstractVar[AbstractGeometry]

    @abc.abstractmethod
    def solve(self, measure, loss, *, test_points=None, test_labels=None) -> Solution:
        """Forward states, adjoints and gradient map on one measure."""

    @abc.abstractmethod
    def __call__(self, measure, *, test_points=None) -> Solution:
        """The forward pass alone: a [`mfattn.Solution`][] with `xs` (and
        `test_xs`), no adjoints, gradients or loss."""

    @property
    def field(self) -> AttentionField:
        """The model's [`mfattn.AttentionField`][] (`beta` and kernel)."""
        return AttentionField(self.beta, self.kernel, self.mesh, chunk_size=self.chunk_size)

    @property
    def normalization(self) -> str | None:
        """The older string spelling of `geometry`: `"sphere"` or `None`."""
        return "sphere" if isinstance(self.geometry, Sphere) else None

    def with_params(self, params: AttentionParams) -> "AbstractModel":
        """The same model with new parameters."""
        return eqx.tree_at(lambda m: m.params, self, params)


class DiscreteTransformer(AbstractModel):
    """The `L`-layer, `H`-head attention-only transformer of docs/theory.md,
    section 3: [`mfattn.solve_discrete`][] on `params` (leaves `(L, H, d, k)`).

    **Arguments:**

    - `params`: an [`mfattn.AttentionParams`][] with leaves `(L, H, d, k)`.
    - `beta`: inverse temperature, stored as an array leaf: `jax.vmap` and
      `jax.grad` over it work, and a new value does not recompile.
    - `chunk_size`, `mesh`, `kernel`: the attention backend (see
      [`mfattn.AttentionField`][]).
    - `geometry`: [`mfattn.Euclidean`][]`()` (default) or [`mfattn.Sphere`][]`()`
      (post-normalised onto the sphere, docs/theory.md, section 10);
      `normalization="sphere"` is its deprecated spelling.
    - `residual_scaling`: [`mfattn.InverseDepth`][]`()` (default) or
      [`mfattn.InverseSqrtDepth`][]`()`.
    """

    params: AttentionParams
    beta: Float[Array, ""]
    chunk_size: int | None = eqx.field(static=True)
    mesh: object = eqx.field(static=True)
    kernel: AbstractAttentionKernel | None
    geometry: AbstractGeometry
    residual_scaling: AbstractResidualScaling

    def __init__(
        self,
        params: AttentionParams,
        beta,
        chunk_size: int | None = None,
        mesh=None,
        kernel: AbstractAttentionKernel | None = None,
        normalization: str | None = None,
        *,
        geometry: AbstractGeometry | str | None = None,
        residual_scaling: AbstractResidualScaling | str | None = None,
    ):
        self.params = params
        self.beta = _as_beta(beta)
        self.chunk_size = chunk_size
        self.mesh = mesh
        self.kernel = kernel
        self.geometry = as_geometry(geometry, normalization)
        self.residual_scaling = as_residual_scaling(residual_scaling)

    def _solve(self, measure, loss, test_points, test_labels):
        options = dict(kernel=self.kernel, chunk_size=self.chunk_size, mesh=self.mesh)
        options.update(geometry=self.geometry, residual_scaling=self.residual_scaling)
        args = (self.params, measure, loss, self.beta, test_points)
        return solve_discrete(*args, test_labels=test_labels, **options)

    def solve(self, measure, loss, *, test_points=None, test_labels=None) -> Solution:
        if loss is None:
            raise TypeError(
                "`loss` must be an mfattn loss; for the forward pass call `model(measure)`"
            )
        return self._solve(measure, loss, test_points, test_labels)

    def __call__(self, measure, *, test_points=None) -> Solution:
        return self._solve(measure, None, test_points, None)


class MeanFieldTransformer(AbstractModel):
    """The continuous limit of docs/theory.md, section 6: parameter particles on a depth
    grid (leaves `(J+1, M, d, k)`), solved by [`mfattn.solve_limit`][]. Every
    (particle, node) pair is trained by its own optimiser state from the
    gradient map at that node.

    **Arguments:**

    - `params`, `beta`, `chunk_size`, `mesh`, `kernel`, `geometry`: as for
      [`mfattn.DiscreteTransformer`][] (`geometry=mfattn.Sphere()`: the limit
      of the post-normalised transformer, the projected flow on the sphere).
    - `times`, `interpolation`: the grid nodes and how the path is read
      between them (see [`mfattn.ParamPath`][]).
    - `rtol`, `atol`, `max_steps`, `solver`, `stepsize_controller`, `dt0`,
      `adjoint`: how Diffrax integrates (see [`mfattn.solve_limit`][];
      defaults in docs/conventions.md).
    """

    params: AttentionParams
    beta: Float[Array, ""]
    times: object
    interpolation: AbstractInterpolation
    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)
    max_steps: int | None = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)
    mesh: object = eqx.field(static=True)
    kernel: AbstractAttentionKernel | None
    geometry: AbstractGeometry
    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController | None
    dt0: float | None
    adjoint: diffrax.AbstractAdjoint

    def __init__(
        self,
        params: AttentionParams,
        beta,
        times=None,
        interpolation: AbstractInterpolation | str | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int | None = opts.MAX_STEPS,
        chunk_size: int | None = None,
        mesh=None,
        kernel: AbstractAttentionKernel | None = None,
        normalization: str | None = None,
        *,
        geometry: AbstractGeometry | str | None = None,
        solver: diffrax.AbstractSolver | None = None,
        stepsize_controller: diffrax.AbstractStepSizeController | None = None,
        dt0: float | None = None,
        adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint(),
    ):
        self.params = params
        self.beta = _as_beta(beta)
        self.times = times
        self.interpolation = as_interpolation(interpolation)
        self.rtol = rtol
        self.atol = atol
        self.max_steps = opts.check_max_steps(max_steps)
        self.chunk_size = chunk_size
        self.mesh = mesh
        self.kernel = kernel
        self.geometry = as_geometry(geometry, normalization)
        self.solver = opts.default_solver() if solver is None else solver
        self.stepsize_controller = stepsize_controller
        self.dt0 = opts.check_dt0(dt0)
        self.adjoint = adjoint

    def _options(self):
        return dict(
            times=self.times,
            interpolation=self.interpolation,
            solver=self.solver,
            rtol=self.rtol,
            atol=self.atol,
            stepsize_controller=self.stepsize_controller,
            dt0=self.dt0,
            max_steps=self.max_steps,
            kernel=self.kernel,
            chunk_size=self.chunk_size,
            mesh=self.mesh,
            geometry=self.geometry,
        )

    def problem(self, measure, loss=None, *, test_points=None, test_labels=None, probes=False):
        """The model's limit problem on `measure` (private to mfattn's solvers)."""
        from ._limit import limit_problem

        return limit_problem(
            self.params,
            measure,
            loss,
            self.beta,
            test_points=test_points,
            test_labels=test_labels,
            probes=probes,
            **self._options(),
        )

    def solve(
        self, measure, loss, *, test_points=None, test_labels=None, saveat=None, ts=None
    ) -> Solution:
        from ._limit import solve_limit

        if loss is None:
            raise TypeError(
                "`loss` must be an mfattn loss; for the forward pass call `model(measure)`"
            )
        args = (self.params, measure, loss, self.beta, test_points)
        options = dict(saveat=saveat, ts=ts, adjoint=self.adjoint, **self._options())
        return solve_limit(*args, test_labels=test_labels, **options)

    def __call__(self, measure, *, test_points=None, saveat=None) -> Solution:
        from ._limit import forward_limit

        return forward_limit(self.problem(measure, test_points=test_points), saveat)


__all__ = [
    "AbstractModel",
    "DiscreteTransformer",
    "MeanFieldTransformer",
    "Euclidean",
    "InverseDepth",
]
