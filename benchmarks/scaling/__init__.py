"""The convergence study (docs/theory.md, section 7): how far a trained finite
transformer (`L` layers, `H` heads) is from its trained mean-field limit, where
training matters.

    python -m benchmarks.scaling --quick       # the quick preset (minutes)
    python -m benchmarks.scaling --medium      # about 25 min on 2 cores
    python -m benchmarks.scaling               # the full preset (see PRESETS)
    python -m mfattn                           # = the quick preset

**The regime.** `nu_0` ties `O = V` (`Q, K, V` Xavier-uniform, `O = V`): it is
compactly supported, `E[O V^T] = (k a^2 / 3) I != 0`, so the limit moves from
`k = 0` and the Euler (`1/L`) term is present at initialisation. Tokens are
the in-context denoising task rescaled to RMS norm (`x / sqrt(d)`, the labels
too; Remark 8), so errors are RMS errors of the original variables. Both
models are trained `K` steps on the same data stream with the same optimiser;
the learning rate is a common per-block schedule: every optimiser moves a
`d x k` block by about `eta` (Frobenius) per step (AdamW and blockwise "mean"
at `eta / sqrt(d k)`, blockwise "sum" at `eta`).

**What is measured**, per condition (task, optimiser) and grid point `(L, H)`,
from `R` initialisations and `P` probe token sets (each with random test
particles `z` in the ball that covers the data's support), at the recorded
training steps `k`:

- the error `max_l |z_k^l - z_k(l/L)| + |p_k^l - p_k(l/L)|` (sup over `z`,
  max over probes, layers and recorded steps), split into a bias (the error of
  the mean over initialisations) and a fluctuation (`mfattn.bias_fluctuation`);
  the sup over `z` is refined by an adversarial ascent with restarts
  (`mfattn.adversarial_sup`, central-difference gradients) at the step where
  each initialisation's error peaks;
- the same for the state alone (`|z_k^l - z_k(l/L)|`) and the adjoint alone
  (random `z`), each against the limit's own error of that part (the sup of
  the sum is dominated by the adjoint, whose own error in the limit is the
  larger);
- Lemma 6: every discrete head pushed through the limit's training as a test
  parameter (`mfattn.train_coupled`), `max_k max_{l,h} |theta^k - theta~^k|`;
- the limit's own error at every recorded step: `J` against `2J` depth nodes
  and `M` against `4M` particles (independent draws), of the state and adjoint
  together and of each alone; points whose reference error exceeds a fifth of
  the quantity they are compared with are excluded from its fits and marked;
- the limit's displacement `max_z |z_k(1) - z_0(1)|`.

The sweeps (over `n`, masked and not, and over `d` per optimiser, at one grid
point) may use their own reference and training length: `sweep_nodes`,
`sweep_particles`, `sweep_steps`, `sweep_record_every` (default: the main
grid's).

Results go, per condition, to `<out>_points/<condition>.json` (written
atomically; an interrupted run resumes there, a truncated or corrupt file is
computed again with a warning; a failed condition is recorded with its error
and skipped), and together with the fits (`mfattn.power_law_fit`,
`mfattn.jackknife`: `t` intervals over initialisations, never from fewer than
4) to `<out>.json` and a PNG per question.

The package: `_config.py` (`StudyConfig`, `PRESETS`), `_condition.py` (one
condition's measurement), `_records.py` (its results as typed records),
`_run.py` (orchestration, files), `_summary.py` (fits, report, table),
`_plots.py` (PNGs), `__main__.py` (the command line). It uses mfattn's public
API only; mfattn does not import it.
"""

from mfattn import combined_fit as combined_fit
from mfattn import slope_fit as slope_fit

from ._condition import Condition as Condition
from ._condition import RMSTask as RMSTask
from ._condition import limit_eval_blocks as limit_eval_blocks
from ._condition import make_optimizer as make_optimizer
from ._condition import tied_init as tied_init
from ._config import OPTIMIZERS as OPTIMIZERS
from ._config import PRESETS as PRESETS
from ._config import StudyConfig as StudyConfig
from ._config import condition_name as condition_name
from ._config import sweep_condition_name as sweep_condition_name
from ._plots import plot as plot
from ._records import ConditionResult as ConditionResult
from ._records import FailedCondition as FailedCondition
from ._records import GridPoint as GridPoint
from ._records import Reference as Reference
from ._records import Split as Split
from ._run import as_config as as_config
from ._run import conditions as conditions
from ._run import read_condition as read_condition
from ._run import run as run
from ._run import write_json as write_json
from ._summary import report as report
from ._summary import summarize as summarize
from ._summary import table as table


def main(argv=None, prog="python -m benchmarks.scaling"):
    """The study's command line (`python -m benchmarks.scaling`; see
    `benchmarks/scaling/__main__.py`): returns the study JSON's data, or `None`
    after `--table`."""
    from .__main__ import main as _main  # imported here: `-m` runs it as __main__

    return _main(argv, prog)
