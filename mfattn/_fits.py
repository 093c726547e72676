"""Fits of power laws to errors measured over independent initialisations
(the statistics of docs/theory.md, section 7). Plain NumPy: they run on the
host, on the results of a study."""

import numpy as np
from jaxtyping import ArrayLike


def slope_fit(
    xs: ArrayLike, per_init: ArrayLike, rng: np.random.Generator, boots: int = 2000
) -> tuple[float, list[float]]:
    """Least-squares slope of `log(mean error)` on `log(x)`, with a bootstrap
    over initialisations.

    **Arguments:**

    - `xs`: `(P,)` positive abscissae (e.g. depths `L`).
    - `per_init`: `(P, R)` errors, one column per initialisation.
    - `rng`: a `numpy.random.Generator` for the bootstrap.
    - `boots`: number of bootstrap resamples of the `R` columns.

    **Returns:** `(slope, [2.5 %, 97.5 %] bootstrap quantiles)`.
    """
    lx = np.log(np.asarray(xs, float))
    per_init = np.asarray(per_init)  # (points, R)
    fit = lambda e: np.polyfit(lx, np.log(e.mean(axis=1)), 1)[0]
    R = per_init.shape[1]
    samples = [fit(per_init[:, rng.integers(0, R, R)]) for _ in range(boots)]
    return float(fit(per_init)), [
        float(np.quantile(samples, 0.025)),
        float(np.quantile(samples, 0.975)),
    ]


def combined_fit(
    Ls: ArrayLike, Hs: ArrayLike, per_init: ArrayLike, rng: np.random.Generator, boots: int = 500
) -> dict:
    """Fit `E(L, H) = a/L + b L^-alpha H^-gamma` to mean errors.

    Least squares on `log E` with `a, b >= 0`, and a bootstrap over
    initialisations. Also fits `a, b` with the exponents fixed at the
    theorem's `(1/3, 1/2)` and at the ResNet rate `(1/2, 1/2)`
    (docs/theory.md, section 7), and reports each fit's RMS log-residual.

    **Arguments:**

    - `Ls`, `Hs`: `(P,)` depth and width of each point.
    - `per_init`: `(P, R)` errors, one column per initialisation.
    - `rng`: a `numpy.random.Generator` for the bootstrap.
    - `boots`: number of bootstrap resamples.

    **Returns:** a dict with `a`, `b`, `alpha`, `gamma`, their 95 % bootstrap
    intervals (`alpha_ci95`, `gamma_ci95`, `a_ci95`), `rms_log_residual`, and
    `theorem_fixed` / `resnet_fixed` (the fixed-exponent fits).
    """
    from scipy.optimize import least_squares

    L = np.asarray(Ls, float)
    H = np.asarray(Hs, float)
    per_init = np.asarray(per_init)

    def model(p, alpha=None, gamma=None):
        a, b = np.exp(p[0]), np.exp(p[1])
        al = p[2] if alpha is None else alpha
        ga = p[3] if gamma is None else gamma
        return a / L + b * L**-al * H**-ga

    def fit(e, alpha=None, gamma=None):
        y = np.log(e.mean(axis=1))
        free = alpha is None
        p0 = [np.log(0.05), np.log(e.mean()), 0.3, 0.5] if free else [np.log(0.05), 0.0]
        res = least_squares(
            lambda p: np.log(model(p, alpha, gamma)) - y,
            p0,
            bounds=([-20, -20, -1, -1], [5, 5, 3, 3]) if free else ([-20, -20], [5, 5]),
        )
        p = res.x
        rms = float(np.sqrt(np.mean(res.fun**2)))
        return p, rms

    p, rms = fit(per_init)
    R = per_init.shape[1]
    boot = np.array([fit(per_init[:, rng.integers(0, R, R)])[0] for _ in range(boots)])
    ci = lambda col: [float(np.quantile(col, 0.025)), float(np.quantile(col, 0.975))]
    out = {
        "a": float(np.exp(p[0])),
        "b": float(np.exp(p[1])),
        "alpha": float(p[2]),
        "gamma": float(p[3]),
        "alpha_ci95": ci(boot[:, 2]),
        "gamma_ci95": ci(boot[:, 3]),
        "a_ci95": ci(np.exp(boot[:, 0])),
        "rms_log_residual": rms,
    }
    for name, (al, ga) in {"theorem": (1 / 3, 1 / 2), "resnet": (1 / 2, 1 / 2)}.items():
        q, r = fit(per_init, al, ga)
        out[f"{name}_fixed"] = {
            "alpha": al,
            "gamma": ga,
            "a": float(np.exp(q[0])),
            "b": float(np.exp(q[1])),
            "rms_log_residual": r,
        }
    return out
