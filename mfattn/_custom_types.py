"""Shared jaxtyping aliases (notation of docs/theory.md: `n` tokens, `d` token
dimension, `k` head dimension, `L` depth nodes, `H` heads or parameter particles,
`m` query points, `p` probe points)."""

from typing import Union

import numpy as np
from jaxtyping import Array, ArrayLike, Float, Shaped

Points = Float[Array, "n d"]
Weights = Float[Array, " n"]
Queries = Float[Array, "m d"]
Matrix = Float[Array, "d d"]
HeadMatrix = Float[Array, "... d k"]
Scalar = Float[Array, ""]
HeadArray = Float[Array, "... _ _"]
Positions = Shaped[Array, " _"]
BetaLike = Union[float, int, np.floating, Float[ArrayLike, ""]]
ScalarLike = Union[float, int, np.floating, Shaped[ArrayLike, ""]]

__all__ = [
    "Points",
    "Weights",
    "Queries",
    "Matrix",
    "HeadMatrix",
    "Scalar",
    "HeadArray",
    "Positions",
    "BetaLike",
    "ScalarLike",
]
