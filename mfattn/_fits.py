"""Fits of power laws to errors measured over independent initialisations
(the statistics of docs/theory.md, section 7). Plain NumPy: they run on the
host, on the results of a study."""

from collections.abc import Sequence
from typing import Union

import numpy as np
from jaxtyping import ArrayLike

# values given as arrays or (nested) lists of numbers
Values = Union[ArrayLike, Sequence]


def slope_fit(
    xs: Values, per_init: Values, rng: np.random.Generator, boots: int = 2000
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
    Ls: Values,
    Hs: Values,
    per_init: Values,
    rng: np.random.Generator | None = None,
    boots: int = 500,
    *,
    interval: str = "bootstrap",
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
    - `interval`: `"bootstrap"` (quantiles of `boots` resamples of the
      initialisations) or `"jackknife"` (delete-one jackknife, `t` interval;
      see [`mfattn.jackknife`][]; needs at least 4 initialisations).

    **Returns:** a dict with `a`, `b`, `alpha`, `gamma`, their 95 % intervals
    (`alpha_ci95`, `gamma_ci95`, `a_ci95`), `rms_log_residual`, `interval`,
    and `theorem_fixed` / `resnet_fixed` (the fixed-exponent fits).

    **Raises:** `ValueError` for an unknown `interval`.
    """
    if interval not in ("bootstrap", "jackknife"):
        raise ValueError(f"`interval` must be 'bootstrap' or 'jackknife', got {interval!r}")
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
    if interval == "bootstrap":
        rng = np.random.default_rng(0) if rng is None else rng
        boot = np.array([fit(per_init[:, rng.integers(0, R, R)])[0] for _ in range(boots)])
        q = lambda col: [float(np.quantile(col, 0.025)), float(np.quantile(col, 0.975))]
        cis = {"alpha": q(boot[:, 2]), "gamma": q(boot[:, 3]), "a": q(np.exp(boot[:, 0]))}
    else:
        jk = jackknife(lambda idx: fit(per_init[:, idx])[0], R)
        ci = np.asarray(jk["ci"])
        cis = {"alpha": ci[2].tolist(), "gamma": ci[3].tolist(), "a": np.exp(ci[0]).tolist()}
    out = {
        "a": float(np.exp(p[0])),
        "b": float(np.exp(p[1])),
        "alpha": float(p[2]),
        "gamma": float(p[3]),
        "alpha_ci95": cis["alpha"],
        "gamma_ci95": cis["gamma"],
        "a_ci95": cis["a"],
        "rms_log_residual": rms,
        "interval": interval,
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


def _check_count(n: int, min_samples: int, what: str = "samples"):
    if n < min_samples:
        raise ValueError(
            f"an interval needs at least {min_samples} independent {what}, got {n} "
            "(pass `min_samples` to override)"
        )


def t_interval(
    samples: Values, level: float = 0.95, *, min_samples: int = 4
) -> dict[str, float | list[float] | int]:
    """Student-`t` interval for the mean of independent samples (e.g. errors
    of independent initialisations).

    **Arguments:**

    - `samples`: `(R,)` independent values.
    - `level`: the interval's coverage (default 0.95).
    - `min_samples`: refuse to give an interval from fewer samples.

    **Returns:** a dict: `estimate` (the mean), `se` (`s / sqrt(R)`), `ci`
    (`[lo, hi]`, `mean -+ t_{R-1} se`), `n` (`R`).

    **Raises:** `ValueError` when `samples` is not 1-D or has fewer than
    `min_samples` entries.
    """
    from scipy.stats import t

    x = np.asarray(samples, float)
    if x.ndim != 1:
        raise ValueError(f"`samples` must be 1-D, got shape {x.shape}")
    _check_count(x.size, max(min_samples, 2))
    se = float(x.std(ddof=1) / np.sqrt(x.size))
    half = float(t.ppf(0.5 + level / 2, x.size - 1)) * se
    mean = float(x.mean())
    return {"estimate": mean, "se": se, "ci": [mean - half, mean + half], "n": int(x.size)}


def jackknife(
    statistic, num_samples: int, level: float = 0.95, *, min_samples: int = 4
) -> dict[str, object]:
    """Delete-one jackknife of a statistic of `R` independent samples.

    `statistic(idx)` computes the statistic from the samples `idx` (an integer
    array of indices into `0..R-1`); it may return a float or an array. The
    leave-one-out values `s_i = statistic(all but i)` give the standard error
    `se = sqrt((R-1)/R sum_i (s_i - mean_i s_i)^2)` and the interval
    `s -+ t_{R-1} se` around the full-sample value `s`, as well as the
    bias-corrected value `R s - (R-1) mean_i s_i`.

    **Arguments:**

    - `statistic`: a function of an index array.
    - `num_samples`: `R`.
    - `level`: the interval's coverage (default 0.95).
    - `min_samples`: refuse to give an interval from fewer samples.

    **Returns:** a dict: `estimate` (the full-sample statistic), `se`, `ci`
    (`[lo, hi]`), `bias_corrected`, `n`; arrays become lists.

    **Raises:** `ValueError` for fewer than `min_samples` samples.
    """
    from scipy.stats import t

    R = int(num_samples)
    _check_count(R, max(min_samples, 2))
    full = np.asarray(statistic(np.arange(R)), float)
    loo = np.stack([np.asarray(statistic(np.delete(np.arange(R), i)), float) for i in range(R)])
    mean = loo.mean(axis=0)
    se = np.sqrt((R - 1) / R * np.sum((loo - mean) ** 2, axis=0))
    half = t.ppf(0.5 + level / 2, R - 1) * se
    out = {
        "estimate": full,
        "se": se,
        "ci": np.stack([full - half, full + half], axis=-1),
        "bias_corrected": R * full - (R - 1) * mean,
    }
    out = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in out.items()}
    out["n"] = R
    return out


def power_law_fit(
    covariates: dict[str, Values],
    per_init: Values,
    level: float = 0.95,
    *,
    min_samples: int = 4,
) -> dict[str, object]:
    """Fit `E = c prod_j x_j^{s_j}` (least squares on `log E`) to the mean
    error over independent initialisations, with jackknife intervals over them.

    **Arguments:**

    - `covariates`: `{name: (P,)}` positive values of each covariate at the
      `P` points (e.g. `{"L": Ls, "H": Hs}`); one name gives a slope fit.
    - `per_init`: `(P, R)` errors, one column per initialisation (the same
      initialisation index across points may be correlated; the jackknife
      deletes one column at a time, so it accounts for that).
    - `level`, `min_samples`: as in [`mfattn.jackknife`][].

    **Returns:** a dict: for every covariate `name`, `name` (the exponent
    `s_j`, negative for a decreasing error) and `name_ci` (its interval);
    `coefficient` (`c`), `rms_log_residual`, `samples` (`R`), `points` (`P`).

    **Raises:** `ValueError` for fewer than `min_samples` initialisations or
    fewer points than parameters.
    """
    names = list(covariates)
    e = np.asarray(per_init, float)
    if e.ndim != 2:
        raise ValueError(f"`per_init` must be (points, inits), got shape {e.shape}")
    X = np.column_stack(
        [np.ones(e.shape[0])] + [np.log(np.asarray(covariates[k], float)) for k in names]
    )
    if X.shape[0] <= X.shape[1] - 1:
        raise ValueError(f"{X.shape[0]} points cannot fit {X.shape[1]} parameters")

    def fit(idx):
        y = np.log(e[:, idx].mean(axis=1))
        return np.linalg.lstsq(X, y, rcond=None)[0]

    jk = jackknife(fit, e.shape[1], level, min_samples=min_samples)
    coef = np.asarray(jk["estimate"])
    ci = np.asarray(jk["ci"])
    resid = np.log(e.mean(axis=1)) - X @ coef
    out: dict[str, object] = {}
    for j, k in enumerate(names, start=1):
        out[k] = float(coef[j])
        out[f"{k}_ci"] = ci[j].tolist()
    out["coefficient"] = float(np.exp(coef[0]))
    out["rms_log_residual"] = float(np.sqrt(np.mean(resid**2)))
    out["samples"] = int(e.shape[1])
    out["points"] = int(e.shape[0])
    return out
