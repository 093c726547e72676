"""Data laws with bounded support (docs/theory.md, section 4, paper Assumption 3)."""

import equinox as eqx
import jax

from ._loss import DenoisingLoss
from ._measure import EmpiricalMeasure


class DenoisingTask(eqx.Module):
    """In-context denoising: the default task.

    Each sample is a token set whose clean tokens `y_i` sit near a few random
    cluster centres; the input is a noisy copy `x_i = y_i + noise * xi_i`. The
    transformer must denoise each token using the others (its cluster-mates),
    so the task is learnt *in context*. The loss is
    [`mfattn.DenoisingLoss`][] with labels `y`.

    Every draw is bounded (centres uniform in `[-1, 1]^d`, offsets and noise
    from normals truncated at 2 standard deviations), so the data law has
    bounded support as the theory assumes.

    **Arguments:** `dim` (`d`), `num_tokens` (`n`), `num_clusters`, `spread`
    (cluster radius scale), `noise` (noise scale).

    Call it as `task(key, batch_size)` to get a batch of
    `(EmpiricalMeasure, DenoisingLoss)` with a leading batch axis (fresh
    samples for every key), or `task.sample(key)` for one sample.
    """

    dim: int = eqx.field(static=True, default=4)
    num_tokens: int = eqx.field(static=True, default=32)
    num_clusters: int = eqx.field(static=True, default=3)
    spread: float = eqx.field(static=True, default=0.15)
    noise: float = eqx.field(static=True, default=0.3)

    def __check_init__(self):
        for name in ("dim", "num_tokens", "num_clusters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        for name in ("spread", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0")

    def sample(self, key):
        """One sample: `(EmpiricalMeasure(noisy), DenoisingLoss(clean))`."""
        kc, ka, ks, kn = jax.random.split(key, 4)
        n, d = self.num_tokens, self.dim
        centres = jax.random.uniform(kc, (self.num_clusters, d), minval=-1.0, maxval=1.0)
        assign = jax.random.randint(ka, (n,), 0, self.num_clusters)
        clean = centres[assign] + self.spread * jax.random.truncated_normal(ks, -2.0, 2.0, (n, d))
        noisy = clean + self.noise * jax.random.truncated_normal(kn, -2.0, 2.0, (n, d))
        return EmpiricalMeasure(noisy), DenoisingLoss(clean)

    def __call__(self, key, batch_size: int):
        """A batch of `batch_size` fresh samples drawn from `key`."""
        return jax.vmap(self.sample)(jax.random.split(key, batch_size))


__all__ = ["DenoisingTask"]
