"""How a residual block is scaled with depth (docs/theory.md, sections 3 and 9)."""

import abc
import warnings

import equinox as eqx


class AbstractResidualScaling(eqx.Module):
    """The factor `h(L)` of the residual step `x^{l+1} = x^l + h(L) [Gamma + F]`:
    [`mfattn.InverseDepth`][] (`1/L`, the mean-field ODE regime) or
    [`mfattn.InverseSqrtDepth`][] (`1/sqrt(L)`, whose limit with random
    per-layer parameters is the common-noise SDE)."""

    @abc.abstractmethod
    def factor(self, depth: int) -> float:
        """`h(L)` for `L = depth` layers."""


class InverseDepth(AbstractResidualScaling):
    """`h = 1/L` (docs/theory.md, section 3): Euler steps of an ODE in depth."""

    def factor(self, depth):
        return 1.0 / depth


class InverseSqrtDepth(AbstractResidualScaling):
    """`h = 1/sqrt(L)` (docs/theory.md, section 9): the regime of the
    common-noise SDE limit."""

    def factor(self, depth):
        return float(depth) ** -0.5


_STRINGS = {"1/L": InverseDepth, "1/sqrt(L)": InverseSqrtDepth}


def as_residual_scaling(value=None) -> AbstractResidualScaling:
    """The scaling from an object, `None` (`1/L`) or a deprecated string."""
    if value is None:
        return InverseDepth()
    if isinstance(value, str):
        if value not in _STRINGS:
            raise ValueError(
                f"`residual_scaling` must be mfattn.InverseDepth() or mfattn.InverseSqrtDepth(), "
                f"got {value!r}"
            )
        if value != "1/L":  # the old default spelling, passed along by old code
            warnings.warn(
                f"`residual_scaling={value!r}` is deprecated; use "
                f"`residual_scaling=mfattn.{_STRINGS[value].__name__}()`",
                DeprecationWarning,
                stacklevel=3,
            )
        return _STRINGS[value]()
    if not isinstance(value, AbstractResidualScaling):
        raise TypeError(
            "`residual_scaling` must be mfattn.InverseDepth() or mfattn.InverseSqrtDepth(), "
            f"got {type(value).__name__}"
        )
    return value
