"""The scaling study's fits recover known exponents from synthetic data."""

import numpy as np

from mfattn import combined_fit, slope_fit


def test_slope_fit_recovers_a_power_law():
    rng = np.random.default_rng(0)
    xs = np.array([2, 4, 8, 16, 32])
    per = 0.7 * xs[:, None] ** -0.4 * np.exp(0.02 * rng.standard_normal((5, 6)))
    slope, (lo, hi) = slope_fit(xs, per, rng, boots=300)
    assert abs(slope + 0.4) < 0.02 and lo < -0.4 < hi


def test_combined_fit_recovers_the_exponents():
    rng = np.random.default_rng(1)
    Ls, Hs = np.meshgrid([2, 4, 8, 16, 32], [4, 16, 64, 256], indexing="ij")
    Ls, Hs = Ls.ravel(), Hs.ravel()
    true = 0.3 / Ls + 2.0 * Ls**-0.6 * Hs**-0.45
    per = true[:, None] * np.exp(0.01 * rng.standard_normal((Ls.size, 5)))
    fit = combined_fit(Ls, Hs, per, rng, boots=50)
    assert abs(fit["alpha"] - 0.6) < 0.05 and abs(fit["gamma"] - 0.45) < 0.03
    assert abs(fit["a"] - 0.3) < 0.05
    assert fit["alpha_ci95"][0] <= fit["alpha"] <= fit["alpha_ci95"][1]
    # the fixed-exponent fits are worse on data that do not follow them
    assert fit["rms_log_residual"] < fit["theorem_fixed"]["rms_log_residual"]


def test_library_does_not_import_the_studies():
    # the studies live in benchmarks/ (outside the package): `import mfattn`
    # imports nothing of them, and no plotting library
    import pathlib
    import subprocess
    import sys

    code = (
        "import sys, mfattn; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'benchmarks', 'matplotlib'}))"
    )
    root = pathlib.Path(__file__).resolve().parents[1]  # where `benchmarks` is importable
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "[]"
    assert not (root / "mfattn" / "studies").exists()


def test_combined_fit_jackknife_intervals():
    rng = np.random.default_rng(2)
    Ls, Hs = np.meshgrid([2, 4, 8, 16], [4, 16, 64], indexing="ij")
    Ls, Hs = Ls.ravel(), Hs.ravel()
    true = 0.3 / Ls + 2.0 * Ls**-0.5 * Hs**-0.5
    per = true[:, None] * np.exp(0.02 * rng.standard_normal((Ls.size, 6)))
    fit = combined_fit(Ls, Hs, per, interval="jackknife")
    assert fit["interval"] == "jackknife"
    assert fit["alpha_ci95"][0] < 0.5 < fit["alpha_ci95"][1]
    assert fit["gamma_ci95"][0] < 0.5 < fit["gamma_ci95"][1]
