"""The scaling-law study (SPEC section 7); the code lives in `mfattn.scaling`.

    python -m benchmarks.scaling --quick      # < 5 minutes on 2 cores
    python -m benchmarks.scaling              # the full preset (resumable)

See `mfattn/scaling.py` for what is measured and how.
"""

from mfattn.scaling import PRESETS, combined_fit, main, run, slope_fit, summarize  # noqa: F401

if __name__ == "__main__":
    main()
