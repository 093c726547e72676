"""Shared jaxtyping aliases (SPEC notation: `n` tokens, `d` token dimension,
`k` head dimension, `L` depth nodes, `H` heads or parameter particles)."""

from typing import Union

import numpy as np
from jaxtyping import Array, ArrayLike, Float, Shaped

Points = Float[Array, "n d"]
Weights = Float[Array, " n"]
Queries = Float[Array, "m d"]
Matrix = Float[Array, "d d"]
HeadMatrix = Float[Array, "... d k"]
Scalar = Float[Array, ""]
ScalarLike = Union[float, int, np.floating, Shaped[ArrayLike, ""]]

__all__ = [
    "Points",
    "Weights",
    "Queries",
    "Matrix",
    "HeadMatrix",
    "Scalar",
    "ScalarLike",
]
