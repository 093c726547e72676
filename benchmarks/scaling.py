"""The convergence study (docs/theory.md, section 7); the code lives in
`mfattn/studies/scaling.py` (so that `python -m mfattn` runs it from an installed
package too).

    python -m benchmarks.scaling --quick      # minutes on 2 cores
    python -m benchmarks.scaling --medium     # about an hour on 2 cores
    python -m benchmarks.scaling              # the full preset (resumable)
    python -m benchmarks.scaling --quick --summarize   # rebuild JSON and PNGs
"""

from mfattn import combined_fit, slope_fit  # noqa: F401
from mfattn.studies.scaling import PRESETS, main, run, summarize  # noqa: F401

if __name__ == "__main__":
    main()
