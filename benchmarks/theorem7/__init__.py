"""The seed paper's central claim where its asymptotics live (docs/theory.md,
section 7): a transformer of depth `L` and `H` heads per layer trained with
AdamW stays within `O(1/L + L^{-1/3} H^{-1/2})` of its mean-field limit. Each
part is built so that its cost does not cap the sizes:

1. the fluctuation among independently initialised models trained on one data
   stream needs no limit: `L` and `H` as large as the machine allows, at
   `k = 0` (where a central limit predicts `(L H)^{-1/2}`) and after `K` steps;
2. the `1/L` bias where the limit is exact: heads i.i.d. in depth from `nu_0`
   make the limit one McKean-Vlasov ODE with a time-independent field, solved
   with a quasi-Monte-Carlo sample of `M` heads (checked against `4M`); the
   bias of the mean over many initialisations by a split-half estimate, free
   of the Monte-Carlo noise of the mean; after training, its rate from the
   means at successive depths `L` and `2L`, which needs no trained limit
   (checked at `k = 0` against the exact limit);
3. the sup of the fluctuation over token sets of `n` tokens (projected
   gradient ascent on the token positions), unmasked and causal;
4. the fluctuation along training, to `K = 2000` steps at the decaying step
   `eta_k = eta / sqrt(1 + k / 100)`, on one shared data stream and, as a
   control, on one independent stream per initialisation (the data's noise),
   the state apart from the adjoint at the tokens and at test points;
5. the fluctuation after `K` steps against `d = 2 ... 64` (Lemma 6), with
   AdamW at a fixed per-entry step against blockwise AdamW (sum and mean), and
   Adam's `eps` swept;
6. the adjoint against the distance of the test points from the tokens: its
   spread's exponent in `H`, the Lions term's share of its increments, and
   the effective number of heads that carry it.

    python -m benchmarks.theorem7 --quick     # about two minutes on 2 cores
    python -m benchmarks.theorem7             # the full preset (resumable)
    python -m benchmarks.theorem7 --gpu       # L, H to 256 and n to 1024, one GPU
    python -m benchmarks.theorem7 --quick --table   # the table of a finished run

Results: `benchmarks/results/theorem7{,_quick,_gpu}.json`, one file per
condition in the folder of the same name (resumable), and the PNGs
`*_fluctuation.png`, `*_bias.png`, `*_bias_trained.png`, `*_uniform.png`,
`*_global.png`, `*_lemma6.png`, `*_adjoint.png`, `*_adjoint_heads.png`.
"""

from ._config import PRESETS as PRESETS
from ._config import Theorem7Config as Theorem7Config
from ._run import run as run
from ._summary import table as table


def main(argv=None, prog="python -m benchmarks.theorem7"):
    """The study's command line (`python -m benchmarks.theorem7`; see
    `benchmarks/theorem7/__main__.py`): returns the study JSON's data."""
    from .__main__ import main as _main  # imported here: `-m` runs it as __main__

    return _main(argv, prog)
