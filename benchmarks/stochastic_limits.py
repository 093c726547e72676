"""The stochastic regime, whole: pathwise convergence, the two limits (depth and
tokens), energy dissipation and the coercivity criterion (docs/theory.md,
section 9).

    python -m benchmarks.stochastic_limits --quick   # under 5 minutes on 2 cores
    python -m benchmarks.stochastic_limits           # the full preset (resumable)

Every condition's result is written to the JSON as soon as it is done (an
atomic replace); a rerun skips the conditions already there (`--fresh` starts
over). Every path draws its own features (Xavier-uniform attention heads,
`k = d`; `mfattn.MLPParams.init` MLP features of output scale `s`), initial
tokens `N(0, I)` and Brownian path, from one key. 95 % intervals: percentile
bootstrap over paths (2000 resamples) for fits, rates and crossings;
1.96 standard errors for means.

- `pathwise`: `E sup_l |X^L_{t_l} - X_{t_l}|` (root mean square over tokens)
  of `mfattn.pathwise_coupling` against `L`, the SDE solved with a step 16
  times finer than the deepest model's, attention plus MLP noise, Gaussian
  (exactly Euler-Maruyama) and sign multipliers, linear and nonlinear
  activations; slopes in `L`.
- `commute`: `D(L, n) = E [(1/n) sum_{i<=n} |x_i^{n,L}(T) - x_i^{N}(T)|^2]^{1/2}`,
  the `n`-token model with `L` layers against the `N`-token SDE on the same
  features and Brownian path, its first `n` initial tokens shared (a
  synchronous coupling; the conditional mean-field limit is its `N -> inf`
  limit). `L = inf` is the `n`-token SDE, `n = N` the `N`-token model.
  `chaos`: the same distance for the SDE at several horizons, in `d = 2, 8`,
  and the rescaled MMD of the earlier synchronisation study, slopes in `n`.
- `energy`: the `1/sqrt(L)` model with Gaussian multipliers (the SDE's
  Euler-Maruyama scheme) over long horizons, Euclidean (`d = 1`) and
  normalised (`geometry=Sphere()`, `d = 2, 3`): `E[W(mu_t)]`, the gap
  `e^beta/(2 beta) - E_beta(mu_t)` on the sphere, their exponential rates and
  the top Lyapunov exponent of the same paths (tangent by `jax.jvp` through
  the model, renormalised at every save time), at `dt` and `dt/2` on the same
  Brownian paths.
- `criterion`: `mfattn.coercivity` at the initial law (Monte Carlo over
  features, tokens and directions) predicts the MLP noise scale at which the
  top Lyapunov exponent turns negative against the expanding drift
  `alpha m_beta(x)`, `d = 1`; measured `lambda = 0` crossings of
  `mfattn.solve_sde` with bootstrap intervals.
- `dimension`: with MLP noise alone, the criterion's noise part at the
  initial law against the measured top Lyapunov exponent, `d = 1..8`.
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import mfattn  # noqa: E402
from mfattn._pathwise import layer_parameters  # noqa: E402

ACTIVATIONS = ("linear", "relu", "gelu", "tanh", "sigmoid", "sin")
_FUNCS = (
    lambda x: x,
    jax.nn.relu,
    lambda x: jax.nn.gelu(x, approximate=False),
    jnp.tanh,
    jax.nn.sigmoid,
    jnp.sin,
)
PRESETS = {
    "quick": dict(
        pathwise=dict(
            Ls=(8, 64), paths=16, n=4, d=2, M=4, Mp=4, width=8, scale=0.7, heads=2,
            cases=(("linear", "gaussian"), ("tanh", "gaussian"), ("linear", "rademacher")),
        ),
        commute=dict(Ls=(8,), ns=(4, 16), N=64, paths=8, T=1.0, dt=1 / 128, d=2),
        chaos=dict(ns=(4, 16), N=64, paths=8, horizons=(1.0, 2.0), dt=1 / 32, dims=(2,)),
        energy=dict(
            paths=8, T=8.0, dt=1 / 8, segments=16, cases=(("sphere", 3, "both", "tanh"),),
        ),
        criterion=dict(
            paths=8, n=6, T=4.0, dt=1 / 16, segments=8, scales=(1.0, 3.0, 8.0),
            draws=128, activations=("linear", "tanh"),
        ),
        dimension=dict(dims=(1, 2, 4), n=6, paths=8, T=4.0, dt=1 / 16, draws=64),
    ),
    "full": dict(
        pathwise=dict(
            Ls=(8, 16, 32, 64, 128, 256, 512, 1024), paths=24, n=8, d=2, M=8, Mp=8, width=16,
            scale=0.7, heads=2,
            cases=(
                ("linear", "gaussian"), ("tanh", "gaussian"), ("relu", "gaussian"),
                ("tanh", "rademacher"),
            ),
        ),
        commute=dict(Ls=(8, 32, 128), ns=(4, 8, 16, 32, 64), N=256, paths=16, T=1.0,
                     dt=1 / 512, d=2),
        chaos=dict(ns=(4, 8, 16, 32, 64), N=512, paths=16, horizons=(1.0, 2.0, 4.0, 8.0),
                   dt=1 / 64, dims=(2, 8)),
        energy=dict(
            paths=24, T=32.0, dt=1 / 16, segments=32,
            cases=(
                ("euclidean", 1, "mlp", "tanh"), ("euclidean", 1, "attention", "-"),
                ("sphere", 2, "both", "tanh"), ("sphere", 3, "both", "tanh"),
            ),
        ),
        criterion=dict(
            paths=32, n=8, T=12.0, dt=1 / 32, segments=24,
            scales=(1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0), draws=512,
            activations=ACTIVATIONS,
        ),
        dimension=dict(dims=(1, 2, 3, 4, 8), n=8, paths=24, T=12.0, dt=1 / 32, draws=256),
    ),
}  # fmt: skip
RESULTS = os.path.join(os.path.dirname(__file__), "results")
RESULT_KEYS = dict(
    pathwise=("pathwise", "pathwise_fits"),
    commute=("commute", "commute_fits", "commute_N"),
    chaos=("chaos", "chaos_fits"),
    energy=("energy", "energy_dt"),
    criterion=("criterion",),
    dimension=("dimension",),
)
BETA = 1.0
BOOT = 2000


def mixture(onehot):
    """`sum_a onehot[a] sigma_a`: one compiled program serves every activation."""
    return lambda x: sum(w * f(x) for w, f in zip(onehot, _FUNCS))


def onehot(act):
    return jnp.asarray(np.eye(len(ACTIVATIONS))[ACTIVATIONS.index(act)])


def mean_ci(a):
    a = np.asarray(a, float)
    half = 1.96 * a.std(ddof=1) / np.sqrt(a.size)
    return float(a.mean()), float(a.mean() - half), float(a.mean() + half)


def boot_ci(stat, data, seed=0):
    """Percentile 95 % interval of `stat(data[:, idx])` over resampled paths
    (the last axis)."""
    rng = np.random.default_rng(seed)
    P = data.shape[-1]
    vals = np.array([stat(data[..., rng.integers(0, P, P)]) for _ in range(BOOT)])
    vals = vals[np.isfinite(vals)]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def loglog_slope(x, per_path):
    """Slope of `log mean` against `log x` and its bootstrap interval."""
    lx = np.log(np.asarray(x, float))
    stat = lambda d: np.polyfit(lx, np.log(d.mean(-1)), 1)[0]
    return float(stat(per_path)), boot_ci(stat, per_path)


def draw(key, n, d, M, Mp, width, scale, att_scale=1.0):
    kf, km, kx, kb = jax.random.split(key, 4)
    feats = None
    if M:
        feats = mfattn.AttentionParams.xavier_uniform(kf, 1, M, d, d).layer(0)
        feats = mfattn.AttentionParams(feats.Q, feats.K, feats.V, att_scale * feats.O)
    mlp = mfattn.MLPParams.init(km, Mp, d, width, scale=scale) if Mp else None
    return feats, mlp, jax.random.normal(kx, (n, d)), kb


# ------------------------------------------------------------------ pathwise
def part_pathwise(cfg, res, save):
    """The SDE once per case at the deepest model's layer times (a step 8 times
    finer); the discrete side at each `L` by the same coupling with the SDE's
    step set to the layer spacing (the discrete side does not depend on the
    SDE's step: only on the key, `L` and the multipliers)."""
    c = cfg["pathwise"]
    rows = res.setdefault("pathwise", [])
    done = {(r["L"], r["activation"], r["multipliers"]) for r in rows}
    Lmax = max(c["Ls"])
    dt0 = 1.0 / (8 * Lmax)
    keys = jax.random.split(jax.random.key(11), c["paths"])
    laws = {"gaussian": mfattn.GaussianMultipliers(), "rademacher": mfattn.RademacherMultipliers()}

    def runner(L, mult, step, side):
        @jax.jit
        def run(keys, oh):
            def one(key):
                feats, mlp, x0, kb = draw(
                    key, c["n"], c["d"], c["M"], c["Mp"], c["width"], c["scale"]
                )
                cp = mfattn.pathwise_coupling(
                    feats, mfattn.EmpiricalMeasure(x0), BETA, kb, L, heads=c["heads"],
                    mlp=mlp, activation=mixture(oh), multipliers=laws[mult], dt0=step,
                )  # fmt: skip
                return getattr(cp, side)

            return jax.vmap(one)(keys)

        return run

    refs = {}
    for act, mult in c["cases"]:
        if all((L, act, mult) in done for L in c["Ls"]):
            continue
        t0 = time.time()
        ref = refs.get(act)
        if ref is None:  # the SDE does not depend on the multipliers
            ref = refs[act] = np.asarray(runner(Lmax, mult, dt0, "sde")(keys, onehot(act)))
        print(f"[pathwise] {act}: the SDE at dt = {dt0:.3g} ({time.time() - t0:.0f} s)", flush=True)
        for L in c["Ls"]:
            if (L, act, mult) in done:
                continue
            t0 = time.time()
            xd = np.asarray(runner(L, mult, 1.0 / L, "discrete")(keys, onehot(act)))
            xs = ref[:, :: Lmax // L]
            e = np.max(np.sqrt(np.mean(np.sum((xd - xs) ** 2, -1), -1)), -1)  # (paths,)
            v, lo, hi = mean_ci(e)
            rows.append(
                dict(L=L, activation=act, multipliers=mult, value=v, ci_low=lo, ci_high=hi,
                     per_path=e.tolist(), seconds=time.time() - t0)
            )  # fmt: skip
            print(f"[pathwise] {mult:10s} {act:7s} L={L:5d} E sup = {v:.4g} "
                  f"[{lo:.4g}, {hi:.4g}]", flush=True)  # fmt: skip
            save()
    fits = []
    for act, mult in c["cases"]:
        pts = sorted(
            (r for r in rows if (r["activation"], r["multipliers"]) == (act, mult)),
            key=lambda r: r["L"],
        )
        if len(pts) < 2:
            continue
        Ls = [r["L"] for r in pts]
        per = np.array([r["per_path"] for r in pts])
        s, ci = loglog_slope(Ls, per)
        # the slope of E / ln L: -1/2 for the dyadic coupling's O(ln L / sqrt(L))
        s_log, ci_log = loglog_slope(Ls, per / np.log(np.asarray(Ls, float))[:, None])
        fits.append(dict(activation=act, multipliers=mult, slope=s, ci=ci, Ls=Ls,
                         slope_over_log_L=s_log, ci_over_log_L=ci_log))  # fmt: skip
    res["pathwise_fits"] = fits
    save()


# ------------------------------------------------------------------ commute
def part_commute(cfg, res, save):
    c = cfg["commute"]
    rows = res.setdefault("commute", [])
    done = {(r["L"], r["n"]) for r in rows}
    N, T, d = c["N"], c["T"], c["d"]
    keys = jax.random.split(jax.random.key(12), c["paths"])
    M, Mp, width = 8, 8, 16

    def setup(key):
        feats, mlp, x0, kb = draw(key, N, d, M, Mp, width, 1.0)
        return feats, mlp, x0, kb

    @jax.jit
    def reference(keys):
        def one(key):
            feats, mlp, x0, kb = setup(key)
            return mfattn.solve_sde(
                feats, mfattn.EmpiricalMeasure(x0), BETA, kb, heads=4, mlp=mlp, t1=T, dt0=c["dt"]
            ).xs[-1]

        return jax.vmap(one)(keys)

    ref = None

    def record(L, n, dist):
        v, lo, hi = mean_ci(dist)
        rows.append(dict(L=L, n=n, value=v, ci_low=lo, ci_high=hi, per_path=dist.tolist()))
        print(f"[commute] L={L} n={n}: D = {v:.4g} [{lo:.4g}, {hi:.4g}]", flush=True)
        save()

    res["commute_N"] = N
    for n in tuple(c["ns"]) + (N,):
        if all((L, n) in done for L in tuple(c["Ls"]) + ("inf",)):
            continue
        if ref is None:
            ref = np.asarray(reference(keys))  # (P, N, d)
        for L in c["Ls"]:
            if (L, n) in done and ("inf", n) in done:
                continue

            @jax.jit
            def run(keys, n=n, L=L):
                def one(key):
                    feats, mlp, x0, kb = setup(key)
                    cp = mfattn.pathwise_coupling(
                        feats, mfattn.EmpiricalMeasure(x0[:n]), BETA, kb, L, heads=4, mlp=mlp,
                        t1=T, dt0=c["dt"],
                    )  # fmt: skip
                    return cp.discrete[-1], cp.sde[-1]

                return jax.vmap(one)(keys)

            xd, xs = (np.asarray(a) for a in run(keys))
            rms = lambda A, R=ref[:, :n]: np.sqrt(np.mean(np.sum((A - R) ** 2, -1), -1))
            if n == N:  # the N-token model against the N-token SDE: the depth error alone
                record(L, N, rms(xd))
                if ("inf", N) not in done:
                    record("inf", N, rms(xs))
                    done.add(("inf", N))
                continue
            if (L, n) not in done:
                record(L, n, rms(xd))
            if ("inf", n) not in done:
                record("inf", n, rms(xs))
                done.add(("inf", n))
    # the iterated limits: the depth error at n = N, the token error at L = inf
    get = {(r["L"], r["n"]): np.asarray(r["per_path"]) for r in rows}
    fits = []
    Ls = [L for L in c["Ls"] if (L, N) in get]
    if len(Ls) > 1:
        s, ci = loglog_slope(Ls, np.array([get[(L, N)] for L in Ls]))
        fits.append(dict(limit="L at n = N", slope=s, ci=ci))
    for L in ("inf",) + tuple(c["Ls"]):
        ns = [n for n in c["ns"] if (L, n) in get]
        if len(ns) > 1:
            s, ci = loglog_slope(ns, np.array([get[(L, n)] for n in ns]))
            fits.append(dict(limit=f"n at L = {L}", slope=s, ci=ci))
    res["commute_fits"] = fits
    save()


def mmd(X, Y, bandwidth=1.0):
    k = lambda A, B: np.exp(-np.sum((A[:, None] - B[None]) ** 2, -1) / (2 * bandwidth**2))
    v = k(X, X).mean() - 2 * k(X, Y).mean() + k(Y, Y).mean()
    return float(np.sqrt(max(v, 0.0)))


def part_chaos(cfg, res, save):
    """The `n`-token SDE against the `N`-token SDE at several horizons."""
    c = cfg["chaos"]
    rows = res.setdefault("chaos", [])
    done = {(r["d"], r["n"]) for r in rows}
    N, hz = c["N"], tuple(c["horizons"])
    keys = jax.random.split(jax.random.key(13), c["paths"])
    ts = jnp.asarray((0.0,) + hz)
    for d in c["dims"]:
        if all((d, n) in done for n in c["ns"]):
            continue

        def solve(key, n, d=d):
            feats, mlp, x0, kb = draw(key, N, d, 8, 8, 16, 1.0)
            return mfattn.solve_sde(
                feats, mfattn.EmpiricalMeasure(x0[:n]), BETA, kb, heads=4, mlp=mlp,
                t1=hz[-1], dt0=c["dt"], ts=ts,
            ).xs  # fmt: skip

        ref = np.asarray(jax.jit(jax.vmap(lambda k: solve(k, N)))(keys))  # (P, S, N, d)
        for n in c["ns"]:
            if (d, n) in done:
                continue
            xs = np.asarray(jax.jit(jax.vmap(lambda k, n=n: solve(k, n)))(keys))
            dist = np.sqrt(np.mean(np.sum((xs - ref[:, :, :n]) ** 2, -1), -1))  # (P, S)
            mm = np.zeros(dist.shape)
            for p in range(dist.shape[0]):
                for s in range(dist.shape[1]):
                    B = ref[p, s]
                    centre = B.mean(0)
                    radius = np.sqrt(np.mean(np.sum((B - centre) ** 2, -1)))
                    mm[p, s] = mmd((xs[p, s] - centre) / radius, (B - centre) / radius)
            rows.append(dict(d=d, n=n, ts=np.asarray(ts).tolist(), coupling=dist.T.tolist(),
                             mmd=mm.T.tolist()))  # fmt: skip
            print(f"[chaos] d={d} n={n}: coupling {dist.mean(0).round(4)}, "
                  f"mmd {mm.mean(0).round(4)}", flush=True)  # fmt: skip
            save()
    fits = []
    for d in c["dims"]:
        pts = sorted((r for r in rows if r["d"] == d), key=lambda r: r["n"])
        if len(pts) < 2:
            continue
        ns = [r["n"] for r in pts]
        for s, t in enumerate(pts[0]["ts"]):
            for kind in ("coupling", "mmd"):
                per = np.array([r[kind][s] for r in pts])  # (len(ns), P)
                if np.any(per.mean(-1) <= 0):
                    continue
                slope, ci = loglog_slope(ns, per)
                fits.append(dict(d=d, t=t, distance=kind, slope=slope, ci=ci))
    res["chaos_fits"] = fits
    save()


# ------------------------------------------------------------------ energy
def spread(X):
    return jnp.mean(jnp.sum((X - X.mean(-2, keepdims=True)) ** 2, -1), -1)


def sphere_gap(X, beta=BETA):
    """`e^beta/(2 beta) - E_beta(mu)` for unit tokens, as
    `e^beta/(2 beta) mean_ij (-expm1(-beta |x_i - x_j|^2 / 2))` (exact for unit
    vectors, no cancellation near one cluster)."""
    D2 = jnp.sum((X[..., :, None, :] - X[..., None, :, :]) ** 2, -1)
    return jnp.exp(beta) / (2 * beta) * jnp.mean(-jnp.expm1(-beta * D2 / 2), axis=(-2, -1))


def energy_runner(c, geometry, d, noise, act):
    """Paths of the `1/sqrt(L)` model with Gaussian multipliers (the SDE's
    Euler-Maruyama scheme) at `dt` and `dt/2` on the same Brownian path."""
    T, dt, S, n = c["T"], c["dt"], c["segments"], 8
    Ls = int(round(T / (dt * S)))  # layers per segment at dt
    geom = mfattn.Sphere() if geometry == "sphere" else mfattn.Euclidean()
    M = 16 if noise in ("attention", "both") else 0
    Mp = 16 if noise in ("mlp", "both") else 0
    K = M + Mp
    act_fn = mixture(onehot(act if act != "-" else "tanh"))

    def path(feats, mlp, x0, U0, incs, Lseg, step):
        ts = jnp.arange(Lseg + 1) * step

        def seg(carry, inc):
            X, U, logn = carry
            params, blocks = layer_parameters(feats, mlp, None, inc, ts, 1.0, Lseg**-0.5)

            def f(X):
                return mfattn.solve_discrete(
                    params, mfattn.EmpiricalMeasure(X), None, BETA, mlp=blocks,
                    activation=act_fn, residual_scaling=mfattn.InverseSqrtDepth(), geometry=geom,
                ).xs[-1]  # fmt: skip

            X1, U1 = jax.jvp(f, (X,), (U,))
            r = jnp.linalg.norm(U1)
            return (X1, U1 / r, logn + jnp.log(r)), (X1, logn + jnp.log(r))

        _, (Xs, logs) = jax.lax.scan(seg, (x0, U0, jnp.zeros(())), incs)
        Xs = jnp.concatenate([x0[None], Xs])
        return Xs, jnp.concatenate([jnp.zeros(1), logs])

    @jax.jit
    def run(keys):
        def one(key):
            feats, mlp, x0, kb = draw(key, n, d, M, Mp, 16, 1.0)
            if geometry == "sphere":
                x0 = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
            kn, kt = jax.random.split(kb)
            U0 = jax.random.normal(kt, (n, d))
            fine = jax.random.normal(kn, (S, 2 * Ls, K)) * jnp.sqrt(dt / 2)
            coarse = fine.reshape(S, Ls, 2, K).sum(2)
            out = []
            for incs, Lseg, step in ((coarse, Ls, dt), (fine, 2 * Ls, dt / 2)):
                Xs, logs = path(feats, mlp, x0, U0, incs, Lseg, step)
                energy = sphere_gap(Xs) if geometry == "sphere" else jnp.zeros(S + 1)
                out.append((spread(Xs), energy, logs))
            return out

        return jax.vmap(one)(keys)

    return run, np.linspace(0.0, T, S + 1)


def rate_fit(ts, series):
    """Exponential rate of the mean over paths (`series (S, P)`), least squares
    of `log mean` over `[T/4, T]`, with a bootstrap interval."""
    q = (len(ts) - 1) // 4
    t = ts[q:]
    stat = lambda d: np.polyfit(t, np.log(np.maximum(d[q:].mean(-1), 1e-300)), 1)[0]
    return float(stat(series)), boot_ci(stat, series)


def part_energy(cfg, res, save):
    c = cfg["energy"]
    rows = res.setdefault("energy", [])
    done = {(r["geometry"], r["d"], r["noise"], r["activation"]) for r in rows}
    keys = jax.random.split(jax.random.key(14), c["paths"])
    for geometry, d, noise, act in c["cases"]:
        if (geometry, d, noise, act) in done:
            continue
        t0 = time.time()
        run, ts = energy_runner(c, geometry, d, noise, act)
        out = run(keys)
        q = (len(ts) - 1) // 4
        lams = []
        for (W, E, logs), dt in zip(out, (c["dt"], c["dt"] / 2)):
            W, E, logs = np.asarray(W).T, np.asarray(E).T, np.asarray(logs)  # (S+1, P)
            W = np.maximum(W, 1e-300)
            lam = (logs[:, -1] - logs[:, q]) / (ts[-1] - ts[q])
            lams.append(lam)
            lm, llo, lhi = mean_ci(lam)
            rate, ci = rate_fit(ts, W)
            logw = np.log(W / W[:1])
            rec = dict(
                geometry=geometry, d=d, noise=noise, activation=act, dt=dt, T=c["T"],
                quantity="spread", rate=rate, ci=ci, lyapunov=lm, lyapunov_ci=[llo, lhi],
                log_rate=mean_ci((logw[-1] - logw[q]) / (ts[-1] - ts[q])),
                mean_spread=W.mean(-1).tolist(), ts=ts.tolist(),
                floored=int(np.sum(W[-1] <= 1e-300)),
            )  # fmt: skip
            rows.append(rec)
            if geometry == "sphere":
                E = np.maximum(E, 1e-300)
                erate, eci = rate_fit(ts, E)
                rows.append(dict(rec, quantity="gap", rate=erate, ci=eci,
                                 mean_gap=E.mean(-1).tolist()))  # fmt: skip
                rows[-1].pop("mean_spread")
            print(f"[energy] {geometry} d={d} {noise} {act} dt={dt}: rate E[W] {rate:+.4f} "
                  f"{np.round(ci, 4)}, lambda {lm:+.4f} [{llo:+.4f}, {lhi:+.4f}]",
                  flush=True)  # fmt: skip
        diff = lams[0] - lams[1]
        res.setdefault("energy_dt", []).append(
            dict(geometry=geometry, d=d, noise=noise, activation=act,
                 lyapunov_difference=mean_ci(diff), seconds=time.time() - t0)
        )  # fmt: skip
        save()


# ------------------------------------------------------------------ criterion
def crossing(xs, ys):
    """The first `x` where `y` goes from positive to negative (log-linear), or None."""
    for i in range(len(xs) - 1):
        if ys[i] > 0 >= ys[i + 1]:
            lx = np.log(xs[i]) + (np.log(xs[i + 1]) - np.log(xs[i])) * ys[i] / (ys[i] - ys[i + 1])
            return float(np.exp(lx))
    return None


def part_criterion(cfg, res, save):
    c = cfg["criterion"]
    out = res.setdefault("criterion", {})
    n, T, dt, d = c["n"], c["T"], c["dt"], 1
    ts = jnp.linspace(0.0, T, c["segments"] + 1)
    eye = jnp.eye(d)[None, None]
    drift = mfattn.AttentionParams(eye, eye, eye, eye)  # alpha = 1
    keys = jax.random.split(jax.random.key(15), c["paths"])

    @jax.jit
    def measure(keys, oh, s):
        def one(key):
            _, mlp, x0, kb = draw(key, n, d, 0, 16, 16, s)
            kb, kt = jax.random.split(kb)
            sol = mfattn.solve_sde(
                None, mfattn.EmpiricalMeasure(x0), BETA, kb, mlp=mlp, activation=mixture(oh),
                drift=drift, t1=T, dt0=dt, ts=ts, tangent=jax.random.normal(kt, (n, d)),
            )  # fmt: skip
            return sol.log_tangent

        return jax.vmap(one)(keys)

    @jax.jit
    def predict(keys, oh, offset):
        def one(key):
            _, mlp, x0, kb = draw(key, n, d, 0, 16, 16, 1.0)
            U = jax.random.normal(kb, (n, d))
            co = mfattn.coercivity(
                None, mfattn.EmpiricalMeasure(x0 + offset), BETA, U, mlp=mlp,
                activation=mixture(oh), drift=drift,
            )  # fmt: skip
            return co.drift, co.noise

        return jax.vmap(one)(keys)

    pkeys = jax.random.split(jax.random.key(16), c["draws"])
    q = c["segments"] // 4
    for act in c["activations"]:
        if act in out and out[act].get("complete"):
            if "predicted_far" not in out[act]:
                far_prediction(out[act], predict, pkeys, onehot(act))
                save()
            continue
        rec = out.setdefault(act, dict(lyapunov={}))
        oh = onehot(act)
        for s in c["scales"]:
            if str(s) in rec["lyapunov"]:
                continue
            lt = np.asarray(measure(keys, oh, s))
            lam = (lt[:, -1] - lt[:, q]) / (float(ts[-1]) - float(ts[q]))
            rec["lyapunov"][str(s)] = lam.tolist()
            print(f"[criterion] {act} s={s}: lambda {np.mean(lam):+.3f}", flush=True)
            save()
        scales = list(c["scales"])
        lam = np.array([rec["lyapunov"][str(s)] for s in scales])  # (S, P)
        rec["scales"] = scales
        rec["lyapunov_mean"] = [mean_ci(v) for v in lam]
        rec["measured"] = crossing(scales, lam.mean(-1))
        rng = np.random.default_rng(1)
        boots = [crossing(scales, lam[:, rng.integers(0, lam.shape[1], lam.shape[1])].mean(-1))
                 for _ in range(BOOT)]  # fmt: skip
        found = np.array([b for b in boots if b is not None])
        rec["measured_found_fraction"] = float(found.size / BOOT)
        rec["measured_ci"] = (
            [float(np.percentile(found, 2.5)), float(np.percentile(found, 97.5))]
            if found.size
            else None
        )
        # the prediction at the initial law, and the noise's part far from the origin
        D, Nz = (np.asarray(a) for a in predict(pkeys, oh, 0.0))
        rec["drift_expansion"] = mean_ci(D)
        rec["noise_at_scale_1"] = mean_ci(Nz)
        stat = lambda v: np.sqrt(v[0].mean() / -v[1].mean()) if v[1].mean() < 0 else np.nan
        both = np.stack([D, Nz])
        rec["predicted"] = float(stat(both))
        rec["predicted_ci"] = boot_ci(stat, both) if np.isfinite(rec["predicted"]) else None
        far = {}
        for offset in (3.0, 10.0, 30.0):
            _, Nf = (np.asarray(a) for a in predict(pkeys, oh, offset))
            far[str(offset)] = mean_ci(Nf)
        rec["noise_at_scale_1_offset"] = far
        far_prediction(rec, predict, pkeys, oh)
        rec["complete"] = True
        print(f"[criterion] {act}: predicted {rec['predicted']:.3g} {rec['predicted_ci']}, "
              f"measured {rec['measured']} {rec['measured_ci']}", flush=True)  # fmt: skip
        save()


def far_prediction(rec, predict, pkeys, oh, offset=30.0):
    """The threshold from the drift's expansion at the initial law against the
    noise's part with the same tokens moved `offset` away from the origin
    (where the expanding drift carries them), paired draws."""
    D, _ = (np.asarray(a) for a in predict(pkeys, oh, 0.0))
    _, Nf = (np.asarray(a) for a in predict(pkeys, oh, offset))
    stat = lambda v: np.sqrt(v[0].mean() / -v[1].mean()) if v[1].mean() < -1e-12 else np.inf
    both = np.stack([D, Nf])
    value = float(stat(both))
    rec["predicted_far"] = value if np.isfinite(value) else None
    rec["predicted_far_ci"] = boot_ci(stat, both) if np.isfinite(value) else None
    rec["predicted_far_offset"] = offset


def part_dimension(cfg, res, save):
    """Pure MLP noise (tanh, `s = 1`, `M' = 16`), no drift: the noise's part of
    the criterion at the initial law against the measured `lambda`, by `d`
    (the one-token closed form has the factor `d/2 - 1`)."""
    c = cfg["dimension"]
    rows = res.setdefault("dimension", [])
    done = {r["d"] for r in rows}
    n, T, dt = c["n"], c["T"], c["dt"]
    S = 16
    ts = jnp.linspace(0.0, T, S + 1)
    keys = jax.random.split(jax.random.key(17), c["paths"])
    pkeys = jax.random.split(jax.random.key(18), c["draws"])
    for d in c["dims"]:
        if d in done:
            continue

        @jax.jit
        def measure(keys, d=d):
            def one(key):
                _, mlp, x0, kb = draw(key, n, d, 0, 16, 16, 1.0)
                kb, kt = jax.random.split(kb)
                return mfattn.solve_sde(
                    None, mfattn.EmpiricalMeasure(x0), BETA, kb, mlp=mlp, t1=T, dt0=dt, ts=ts,
                    tangent=jax.random.normal(kt, (n, d)),
                ).log_tangent  # fmt: skip

            return jax.vmap(one)(keys)

        @jax.jit
        def predict(keys, d=d):
            def one(key):
                _, mlp, x0, kb = draw(key, n, d, 0, 16, 16, 1.0)
                U = jax.random.normal(kb, (n, d))
                return mfattn.coercivity(None, mfattn.EmpiricalMeasure(x0), BETA, U, mlp=mlp).noise

            return jax.vmap(one)(keys)

        lt = np.asarray(measure(keys))
        q = S // 4
        lam = (lt[:, -1] - lt[:, q]) / (float(ts[-1]) - float(ts[q]))
        noise = np.asarray(predict(pkeys))
        rows.append(dict(d=d, lyapunov=mean_ci(lam), noise_part=mean_ci(noise), T=T, dt=dt))
        print(f"[dimension] d={d}: lambda {lam.mean():+.4f}, noise part at the initial law "
              f"{noise.mean():+.4f}", flush=True)  # fmt: skip
        save()


# ------------------------------------------------------------------ plots
def plot(res, prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res.get("pathwise", [])
    if rows:
        fig, ax = plt.subplots(figsize=(5.6, 4))
        cases = sorted({(r["activation"], r["multipliers"]) for r in rows})
        fits = {(f["activation"], f["multipliers"]): f for f in res.get("pathwise_fits", [])}
        for k, (a, m) in enumerate(cases):
            pts = sorted((r for r in rows if (r["activation"], r["multipliers"]) == (a, m)),
                         key=lambda r: r["L"])  # fmt: skip
            L = np.array([r["L"] for r in pts])
            v = np.array([r["value"] for r in pts])
            err = [v - [r["ci_low"] for r in pts], [r["ci_high"] for r in pts] - v]
            f = fits.get((a, m))
            lab = f"{a}, {m}" + (f" (slope {f['slope']:+.2f})" if f else "")
            ax.errorbar(L, v, yerr=err, marker="o" if m == "gaussian" else "s", ms=3,
                        capsize=2, color=f"C{k}", label=lab)  # fmt: skip
        L = np.array(sorted({r["L"] for r in rows}), float)
        v0 = rows[0]["value"] * (L / rows[0]["L"]) ** -0.5
        ax.plot(L, v0, "k--", lw=0.8, label="L^-1/2")
        ax.set(xscale="log", yscale="log", xlabel="L (layers)",
               ylabel="E sup_t |X^L_t - X_t| (95% CI)")  # fmt: skip
        ax.set_title("Does the 1/sqrt(L) transformer converge pathwise to its SDE?", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(prefix + "_pathwise.png", dpi=120)
        plt.close(fig)

    rows = res.get("commute", [])
    if rows:
        fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        Ls = [L for L in dict.fromkeys(r["L"] for r in rows)]
        Nref = res.get("commute_N")
        ns = [n for n in dict.fromkeys(r["n"] for r in rows) if n != Nref]
        get = {(r["L"], r["n"]): r for r in rows}
        for k, L in enumerate(Ls):
            pts = [get[(L, n)] for n in ns if (L, n) in get]
            x = [r["n"] for r in pts]
            a0.errorbar(x, [r["value"] for r in pts],
                        yerr=[[r["value"] - r["ci_low"] for r in pts],
                              [r["ci_high"] - r["value"] for r in pts]],
                        marker="o", ms=3, capsize=2, color=f"C{k}", label=f"L = {L}")  # fmt: skip
            if (L, Nref) in get:
                r = get[(L, Nref)]
                a0.axhline(r["value"], color=f"C{k}", ls=":", lw=0.8)
        a0.set(xscale="log", yscale="log", xlabel="n (tokens)",
               ylabel="distance to the N-token SDE at T")  # fmt: skip
        a0.set_title("n -> inf at each L (dotted: n = N)", fontsize=10)
        a0.legend(fontsize=7)
        Lnum = [L for L in Ls if L != "inf"]
        for k, n in enumerate(ns + [Nref]):
            pts = [get[(L, n)] for L in Lnum if (L, n) in get]
            a1.errorbar([r["L"] for r in pts], [r["value"] for r in pts],
                        yerr=[[r["value"] - r["ci_low"] for r in pts],
                              [r["ci_high"] - r["value"] for r in pts]],
                        marker="o", ms=3, capsize=2, color=f"C{k}",
                        label=f"n = {n}" + (" (= N)" if n == Nref else ""))  # fmt: skip
            if ("inf", n) in get:
                a1.axhline(get[("inf", n)]["value"], color=f"C{k}", ls=":", lw=0.8)
        a1.set(xscale="log", xlabel="L (layers)")
        a1.set_title("L -> inf at each n (dotted: the n-token SDE)", fontsize=10)
        a1.legend(fontsize=7)
        fig.suptitle("Do the depth and token limits commute?", fontsize=11)
        fig.tight_layout()
        fig.savefig(prefix + "_commute.png", dpi=120)
        plt.close(fig)

    fits = res.get("chaos_fits", [])
    if fits:
        dims = sorted({f["d"] for f in fits})
        fig, ax = plt.subplots(figsize=(5.6, 4))
        for k, (d, kind) in enumerate([(d, kind) for d in dims for kind in ("coupling", "mmd")]):
            pts = sorted((f for f in fits if (f["d"], f["distance"]) == (d, kind)),
                         key=lambda f: f["t"])  # fmt: skip
            t = np.array([f["t"] for f in pts])
            s = np.array([f["slope"] for f in pts])
            err = [s - [f["ci"][0] for f in pts], [f["ci"][1] for f in pts] - s]
            ax.errorbar(t + 0.05 * k, s, yerr=err, marker="o", capsize=3, color=f"C{k}",
                        label=f"d = {d}, {kind}")  # fmt: skip
        ax.axhline(-0.5, color="k", ls="--", lw=0.8, label="n^-1/2")
        ax.set(xlabel="horizon t", ylabel="slope of distance in n (95% CI)")
        ax.set_title("The rate in n of propagation of chaos, by horizon", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(prefix + "_chaos.png", dpi=120)
        plt.close(fig)

    rows = res.get("energy", [])
    if rows:
        cases = list(dict.fromkeys((r["geometry"], r["d"], r["noise"], r["activation"])
                                   for r in rows))  # fmt: skip
        fig, axes = plt.subplots(1, len(cases), figsize=(3.6 * len(cases), 3.4), squeeze=False)
        for ax, case in zip(axes[0], cases):
            for r in rows:
                if (r["geometry"], r["d"], r["noise"], r["activation"]) != case:
                    continue
                y = r.get("mean_gap") if r["quantity"] == "gap" else r.get("mean_spread")
                ls = "-" if r["dt"] == max(x["dt"] for x in rows) else "--"
                col = "C1" if r["quantity"] == "gap" else "C0"
                ax.plot(r["ts"], y, ls=ls, color=col,
                        label=f"{r['quantity']}, dt={r['dt']:.3g}: rate {r['rate']:+.3f}, "
                              f"2 lambda {2 * r['lyapunov']:+.3f}")  # fmt: skip
            ax.set(yscale="log", xlabel="t", title=" ".join(map(str, case)))
            ax.legend(fontsize=6)
        axes[0, 0].set_ylabel("E[W(mu_t)] and the sphere gap")
        fig.suptitle("Does the energy dissipate exponentially, at twice the Lyapunov rate?",
                     fontsize=11)  # fmt: skip
        fig.tight_layout()
        fig.savefig(prefix + "_energy.png", dpi=120)
        plt.close(fig)

    crit = res.get("criterion", {})
    acts = [a for a in ACTIVATIONS if a in crit and crit[a].get("complete")]
    if acts:
        fig, ax = plt.subplots(figsize=(5.6, 3.8))
        top = max(crit[a]["scales"][-1] for a in acts) * 1.2
        for i, a in enumerate(acts):
            r = crit[a]
            p = r["predicted"]
            if p is not None and np.isfinite(p):
                lo, hi = r["predicted_ci"]
                lab = "predicted (initial law)" if i == 0 else None
                ax.errorbar(i - 0.1, p, yerr=[[p - lo], [hi - p]], fmt="s", color="C0",
                            capsize=3, label=lab)  # fmt: skip
            pf = r.get("predicted_far")
            if pf is not None and pf > top:  # off the scale: written out
                ax.plot(i, top, marker="D", color="C2")
                ax.annotate(f"{pf:.0f}", (i, top), fontsize=7, ha="center", va="bottom")
            elif pf is not None:
                lo, hi = r["predicted_far_ci"]
                lab = "predicted (noise far from the origin)" if i == 0 else None
                ax.errorbar(i, pf, yerr=[[pf - lo], [hi - pf]], fmt="D", color="C2",
                            capsize=3, label=lab)  # fmt: skip
            m = r["measured"]
            if m is not None:
                ci = r["measured_ci"]
                ax.errorbar(i + 0.1, m, yerr=[[m - ci[0]], [ci[1] - m]], fmt="o", color="C3",
                            capsize=3, label="measured lambda = 0" if i == 0 else None)  # fmt: skip
            else:
                ax.plot(i + 0.1, top, marker="^", color="C3")
                ax.annotate("none", (i + 0.1, top), fontsize=7, ha="left", va="top")
        ax.set_xticks(range(len(acts)))
        ax.set_xticklabels(acts)
        ax.set_ylim(0, top * 1.12)
        ax.set_ylabel("MLP noise scale s at lambda = 0 (95% CI)")
        ax.set_title("Which activations synchronise against the drift, and where?", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(prefix + "_criterion.png", dpi=120)
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small preset")
    parser.add_argument("--fresh", action="store_true", help="ignore saved results")
    parser.add_argument(
        "--parts",
        default="pathwise,commute,chaos,energy,criterion,dimension",
        help="comma-separated",
    )
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else "full"
    cfg = PRESETS[preset]
    os.makedirs(RESULTS, exist_ok=True)
    name = "stochastic_limits" + ("_quick" if args.quick else "")
    path = os.path.join(RESULTS, name + ".json")
    res = {}
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            res = json.load(f)
        old = res.get("config", {})
        for part, config in json.loads(json.dumps(cfg)).items():
            if old.get(part) != config:  # a part whose settings changed starts over
                for key in RESULT_KEYS[part]:
                    res.pop(key, None)
    res["config"] = cfg
    res["preset"] = preset
    res["environment"] = dict(
        jax=jax.__version__, mfattn=mfattn.__version__, machine=platform.machine()
    )
    start = time.time()

    def save():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, path)

    parts = dict(
        pathwise=part_pathwise,
        commute=part_commute,
        chaos=part_chaos,
        energy=part_energy,
        criterion=part_criterion,
        dimension=part_dimension,
    )
    for p in args.parts.split(","):
        print(f"== {p}", flush=True)
        parts[p](cfg, res, save)
    res["seconds_this_run"] = time.time() - start
    save()
    plot(res, os.path.join(RESULTS, name))
    print(f"wrote {path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
