"""Global convergence of the gradient flow, measured (docs/theory.md, section 12).

Three questions, each answered on an independent training set (generic
discrete token measures) and on dependent ones (translates of one measure,
Dirac measures), with the probe outputs `Phi_{mu_a}(z)` of one probe `z` as the
model's outputs (`mfattn.ProbeRisk`, `mfattn.tangent_kernel`):

1. *criterion and kernel*: the smallest singular values of the log-sum-exp
   criterion (`mfattn.lse_independence`, modulo affine functions and modulo
   constants) next to the smallest eigenvalue of the tangent kernel of the
   discrete model against `L` and `H`, and of the limit at its mean-field
   initialisation against `M`: does the eigenvalue stay away from zero exactly
   when the criterion says independent?
2. *risk curves*: the risk along `mfattn.gradient_flow` from a small initial
   loss (targets `y = Phi(theta_0) + eps * delta`, `|delta| = 1`) against the
   training time `s`, with the linearised prediction
   `R_lin(s) = (1/2N) sum_i <u_i, r_0>^2 exp(-2 lambda_i s / N)` from the initial
   kernel's eigenpairs, the bound `R(0) exp(-2 lambda_min s / N)`, the measured
   tail rate against `2 lambda_min / N`, and for a dependent set the predicted
   plateau (the part of `r_0` in the kernel's near-null space);
3. *larger initial losses*: how often the flow still reaches `R < tol R(0)`
   as `eps` grows, within the horizon `2 s*`, twice the time
   `s* = log(1/tol) N / (2 lambda_min)` the initial kernel predicts (a Diffrax
   event stops it there), and the time it takes against `s*`.

The horizon of every flow is `2 s*` from its own initial kernel (the flows on a
dependent set use the horizon of the independent set with the same
initialisation). The flows from a small loss stop at `R < 1e-10 R(0)`, below
the window `1e-8 < R / R(0) < 1e-3` where the tail rate is fitted.

    python -m benchmarks.gradient_flow [--quick] [--resume]

Writes `benchmarks/results/gradient_flow[_quick].json` and three PNGs next to
it. `--resume` keeps the sections already in the JSON, and the runs of the
large section (which resumes run by run: raising `large_seeds` or adding to
`eps_large` only adds runs).
"""

import argparse
import datetime
import json
import math
import pathlib
import platform

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402

import mfattn  # noqa: E402

PRESETS = {
    "full": dict(
        N=6,
        n=4,
        d=2,
        k=2,
        beta=1.0,
        probe=[0.8, -0.5],
        radii=[0.3, 1.0, 3.0],
        num_probes=512,
        kernel_L=[2, 8, 32],
        kernel_H=[4, 16, 64],
        kernel_seeds=5,
        limit_M=[16, 64, 256],
        limit_nodes=3,
        limit_seeds=3,
        flow_L=4,
        flow_H=16,
        flow_seeds=5,
        eps_small=0.05,
        eps_large=[0.05, 0.2, 0.5, 1.0, 2.0, 5.0],
        large_seeds=16,
        horizon=2.0,
        num_saves=49,
        rtol=1e-7,
        atol=1e-10,
        reach_tol=1e-6,
        limit_flow=dict(M=32, s1=300.0, rtol=1e-6, atol=1e-9, flow_rtol=1e-5, flow_atol=1e-9),
    ),
    "quick": dict(
        N=6,
        n=4,
        d=2,
        k=2,
        beta=1.0,
        probe=[0.8, -0.5],
        radii=[1.0],
        num_probes=512,
        kernel_L=[2, 8],
        kernel_H=[4, 16],
        kernel_seeds=2,
        limit_M=[16],
        limit_nodes=3,
        limit_seeds=1,
        flow_L=2,
        flow_H=8,
        flow_seeds=2,
        eps_small=0.05,
        eps_large=[0.05, 0.5, 2.0],
        large_seeds=2,
        horizon=1.0,
        num_saves=25,
        rtol=1e-7,
        atol=1e-10,
        reach_tol=1e-3,
        limit_flow=None,
    ),
}


def nullities(cfg):
    """The kernel's nullity at the mean-field initialisation, for one probe
    (docs/theory.md, section 12): per output direction, `N - d - 1` (full) and
    `N - 1` (scores) for translates, `N - d` and `N` for Diracs, 0 if generic."""
    N, d = cfg["N"], cfg["d"]
    per = {"generic": (0, 0), "translates": (N - d - 1, N - 1), "diracs": (N - d, N)}
    return {name: dict(full=f * d, QK=q * d) for name, (f, q) in per.items()}


def training_sets(cfg, key=jax.random.key(0)):
    """The three training sets, `N` measures of `n` atoms in `R^d` each."""
    N, n, d = cfg["N"], cfg["n"], cfg["d"]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    batch = jax.vmap(mfattn.EmpiricalMeasure)
    base = jax.random.normal(k2, (n, d))
    return {
        "generic": batch(jax.random.normal(k1, (N, n, d))),
        "translates": batch(base + 0.7 * jax.random.normal(k3, (N, 1, d))),
        "diracs": batch(jnp.broadcast_to(jax.random.normal(k4, (N, 1, d)), (N, n, d))),
    }


# keys of the configuration that a resumed run may change: the large section
# resumes run by run, so more seeds or initial losses only add runs
GROWABLE = ("eps_large", "large_seeds")


# ------------------------------------------------------------ 1. criterion
def section_criterion(cfg, sets):
    rows = []
    for name, meas in sets.items():
        for radius in cfg["radii"]:
            for modulo in ("affine", "constants"):
                s = mfattn.lse_independence(
                    meas,
                    jax.random.key(1),
                    num_probes=cfg["num_probes"],
                    radius=radius,
                    modulo=modulo,
                )
                rows.append(dict(set=name, radius=radius, modulo=modulo, singular_values=_list(s)))
                print(f"criterion {name:10s} r={radius:3.1f} {modulo:9s} s_min={float(s[-1]):.2e}")
    return rows


# --------------------------------------------------------------- 2. kernel
def _spectrum(model, meas, z, blocks):
    return np.linalg.eigvalsh(np.asarray(mfattn.tangent_kernel(model, meas, z, blocks=blocks)))


def section_kernel(cfg, sets):
    z = jnp.asarray([cfg["probe"]])
    d, k, beta = cfg["d"], cfg["k"], cfg["beta"]
    rows = []
    for L in cfg["kernel_L"]:
        for H in cfg["kernel_H"]:
            for seed in range(cfg["kernel_seeds"]):
                params = mfattn.AttentionParams.xavier_uniform(
                    jax.random.key(100 + seed), L, H, d, k
                )
                model = mfattn.DiscreteTransformer(params, beta)
                for name, meas in sets.items():
                    for blocks in (("Q", "K", "V", "O"), ("Q", "K")):
                        ev = _spectrum(model, meas, z, blocks)
                        rows.append(
                            dict(
                                model="discrete",
                                L=L,
                                H=H,
                                seed=seed,
                                set=name,
                                blocks="".join(blocks),
                                eigenvalues=_list(ev),
                            )
                        )
            print(f"kernel discrete L={L:3d} H={H:3d} done", flush=True)
    for M in cfg["limit_M"]:
        for seed in range(cfg["limit_seeds"]):
            grid = mfattn.antithetic_mean_field(
                jax.random.key(200 + seed), cfg["limit_nodes"], M, d, k
            )
            model = mfattn.MeanFieldTransformer(grid, beta, rtol=1e-8, atol=1e-10)
            for name, meas in sets.items():
                for blocks in (("Q", "K", "V", "O"), ("Q", "K")):
                    ev = _spectrum(model, meas, z, blocks)
                    rows.append(
                        dict(
                            model="limit",
                            M=M,
                            nodes=cfg["limit_nodes"],
                            seed=seed,
                            set=name,
                            blocks="".join(blocks),
                            eigenvalues=_list(ev),
                        )
                    )
        print(f"kernel limit M={M:3d} done", flush=True)
    return rows


def kernel_summary(cfg, rows):
    """Per model size and set: mean and spread over seeds of `lambda_min`, of the
    largest eigenvalue in the predicted null block and of the first one above
    it; and for the dependent sets the fitted exponents of the null block's
    largest eigenvalue, `lambda ~ L^a H^b` (discrete)."""
    null = nullities(cfg)
    out = []
    keys = sorted(
        {(r["model"], r.get("L"), r.get("H"), r.get("M"), r["set"], r["blocks"]) for r in rows},
        key=str,
    )
    for model, L, H, M, name, blocks in keys:
        sel = [
            np.array(r["eigenvalues"])
            for r in rows
            if (r["model"], r.get("L"), r.get("H"), r.get("M"), r["set"], r["blocks"])
            == (model, L, H, M, name, blocks)
        ]
        ev = np.stack(sel)
        nb = null[name]["full" if blocks == "QKVO" else "QK"]
        row = dict(
            model=model,
            L=L,
            H=H,
            M=M,
            set=name,
            blocks=blocks,
            seeds=len(sel),
            predicted_nullity=nb,
            lambda_min_mean=float(np.mean(ev[:, 0])),
            lambda_min_sd=float(np.std(ev[:, 0], ddof=1)) if len(sel) > 1 else None,
            lambda_max_mean=float(np.mean(ev[:, -1])),
        )
        if 0 < nb < ev.shape[1]:
            row["null_block_top_mean"] = float(np.mean(ev[:, nb - 1]))
            row["above_null_mean"] = float(np.mean(ev[:, nb]))
        out.append(row)
    fits = []
    for name in ("translates", "diracs", "generic"):
        for blocks in ("QKVO", "QK"):
            nb = null[name]["full" if blocks == "QKVO" else "QK"]
            idx = max(nb - 1, 0)
            if nb >= null_size(cfg):
                continue  # the QK kernel of Diracs is zero: nothing to fit
            pts = [
                (r["L"], r["H"], r["eigenvalues"][idx])
                for r in rows
                if r["model"] == "discrete" and r["set"] == name and r["blocks"] == blocks
            ]
            if len(pts) < 4:
                continue
            top = max(
                max(r["eigenvalues"])
                for r in rows
                if r["model"] == "discrete" and r["set"] == name and r["blocks"] == blocks
            )
            if max(abs(v) for *_, v in pts) < 1e-12 * top:
                continue  # zero to rounding at every size (Diracs): nothing to fit
            A = np.array([[1.0, math.log(L), math.log(H)] for L, H, _ in pts])
            y = np.log(np.array([v for *_, v in pts]))
            coef, res, *_ = np.linalg.lstsq(A, y, rcond=None)
            dof = len(y) - 3
            sigma2 = float(np.sum((y - A @ coef) ** 2)) / max(dof, 1)
            cov = sigma2 * np.linalg.inv(A.T @ A)
            fits.append(
                dict(
                    set=name,
                    blocks=blocks,
                    eigenvalue_index=idx,
                    exponent_L=float(coef[1]),
                    exponent_L_se=float(math.sqrt(cov[1, 1])),
                    exponent_H=float(coef[2]),
                    exponent_H_se=float(math.sqrt(cov[2, 2])),
                    points=len(y),
                )
            )
    return out, fits


def null_size(cfg):
    return cfg["N"] * cfg["d"]  # outputs: N measures x one probe x d components


# ---------------------------------------------------------------- 3. flows
@eqx.filter_jit
def _outputs(model, meas, z):
    return jax.vmap(lambda m: mfattn.probe_outputs(model, m, z))(meas)


class RiskBelow(eqx.Module):
    """Event condition: the risk is below `threshold`."""

    model: mfattn.AbstractModel
    risk: mfattn.AbstractRisk
    threshold: jax.Array

    def __call__(self, s, params, args, **kwargs):
        return self.risk(self.model.with_params(params)) < self.threshold


def _flow(model, risk, cfg, s1, rtol, atol, stop):
    # log-spaced to s1 / 2, then evenly spaced (denser in the exponential tail)
    head = jnp.logspace(-2, math.log10(s1 / 2), cfg["num_saves"] - 9)
    ss = jnp.concatenate([jnp.zeros(1), head, jnp.linspace(s1 / 2, s1, 9)[1:]])
    return mfattn.gradient_flow(
        model,
        risk,
        ss[-1],
        ss=ss,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=200_000,
        throw=False,
        event=diffrax.Event(RiskBelow(model, risk, jnp.asarray(stop))),
    )


def _tail_rate(ss, R, s_end=np.inf):
    """Slope of `-log R` where `1e-8 < R / R(0) < 1e-3` (least squares): past
    the fast modes, above the floor the solver's tolerance leaves near the
    minimum, before the flow was stopped. `None` when fewer than three saved
    points are in that window."""
    ss, R = np.asarray(ss), np.asarray(R)
    sel = (R < 1e-3 * R[0]) & (R > 1e-8 * R[0]) & (ss <= s_end)
    if sel.sum() < 3:
        return None
    return float(-scipy.stats.linregress(ss[sel], np.log(R[sel])).slope)


def _result_name(result):
    for name in ("successful", "event_occurred", "max_steps_reached"):
        if result == getattr(diffrax.RESULTS, name):
            return name
    return str(result)


def horizon(cfg, lam_min):
    """`horizon * s*`, `s* = log(1/tol) N / (2 lambda_min)`."""
    return cfg["horizon"] * math.log(1 / cfg["reach_tol"]) * cfg["N"] / (2 * lam_min)


def one_flow(model, meas, z, eps, key, cfg, nb, s1, rtol, atol, stop_ratio, with_end_kernel=True):
    """One flow of the probe risk from `y = Phi(theta_0) + eps delta`, to `s1`
    (`None`: the horizon of its own initial kernel), stopped once
    `R < stop_ratio R(0)` (later saves hold the stopped state)."""
    N = cfg["N"]
    out0 = _outputs(model, meas, z)
    delta = jax.random.normal(key, out0.shape, out0.dtype)
    targets = out0 + eps * delta / jnp.linalg.norm(delta)
    risk = mfattn.ProbeRisk(meas, z, targets)
    K0 = np.asarray(mfattn.tangent_kernel(model, meas, z))
    lam, U = np.linalg.eigh(K0)
    r0 = np.asarray(out0 - targets).reshape(-1)
    coef = U.T @ r0
    if s1 is None:
        s1 = horizon(cfg, lam[0])
    R0 = float(jnp.sum(r0**2) / (2 * N))
    sol = _flow(model, risk, cfg, s1, rtol, atol, stop_ratio * R0)
    ss, R = np.asarray(sol.ss), np.asarray(sol.risk)
    stopped = sol.result == diffrax.RESULTS.event_occurred
    R_lin = np.array([np.sum(coef**2 * np.exp(-2 * lam * s / N)) / (2 * N) for s in ss])
    row = dict(
        eps=eps,
        s1=float(s1),
        ss=_list(ss),
        risk=_list(R),
        risk_linearised=_list(R_lin),
        lambda_min_0=float(lam[0]),
        eigenvalues_0=_list(lam),
        predicted_rate_0=float(2 * lam[0] / N),
        tail_rate=_tail_rate(ss, R, float(sol.s_end)),
        tail_rate_linearised=_tail_rate(ss, R_lin),
        final_ratio=float(R[-1] / R[0]),
        num_steps=int(sol.stats["num_steps"]),
        result=_result_name(sol.result),
        stopped=bool(stopped),
        s_end=float(sol.s_end),
        stop_ratio=stop_ratio,
        predicted_time_to_tol=float(horizon(cfg, lam[0]) / cfg["horizon"]),
        dissipation_end=float(sol.dissipation[-1]),
    )
    if nb:
        row["plateau_predicted"] = float(np.sum(coef[:nb] ** 2) / np.sum(coef**2))
        row["null_block_top"] = float(lam[nb - 1])
    if with_end_kernel:
        lam1 = np.linalg.eigvalsh(np.asarray(mfattn.tangent_kernel(sol.model, meas, z)))
        row["lambda_min_end"] = float(lam1[0])
        row["predicted_rate_end"] = float(2 * lam1[0] / N)
        move = [
            float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
            for a, b in zip(jax.tree.leaves(sol.model.params), jax.tree.leaves(model.params))
        ]
        row["param_rel_change"] = max(move)
    return row


def section_flows(cfg, sets):
    z = jnp.asarray([cfg["probe"]])
    null = nullities(cfg)
    rows = []
    L, H, d, k = cfg["flow_L"], cfg["flow_H"], cfg["d"], cfg["k"]
    for seed in range(cfg["flow_seeds"]):
        params = mfattn.AttentionParams.xavier_uniform(jax.random.key(300 + seed), L, H, d, k)
        model = mfattn.DiscreteTransformer(params, cfg["beta"])
        s1 = None
        for name in ("generic", "translates"):
            row = one_flow(
                model,
                sets[name],
                z,
                cfg["eps_small"],
                jax.random.key(400 + seed),
                cfg,
                null[name]["full"],
                s1,
                cfg["rtol"],
                cfg["atol"],
                1e-10,  # below the window of the tail fit
            )
            if name == "generic":  # the dependent set's flow runs as long
                s1, unit = row["s1"], row["predicted_rate_0"]
            rows.append(
                dict(model="discrete", L=L, H=H, set=name, seed=seed, rate_unit=unit, **row)
            )
            print(
                f"flow {name:10s} seed {seed}: s1 = {row['s1']:.0f}, R(s1)/R0 = "
                f"{row['final_ratio']:.2e}, tail rate {row['tail_rate']}, predicted "
                f"{row['predicted_rate_0']:.3e} (start), {row['predicted_rate_end']:.3e} (end)",
                flush=True,
            )
    return rows


def section_large(cfg, sets, rows, save):
    """Resumable run by run: `rows` holds the runs already done; `save()`
    writes them after every new one."""
    z = jnp.asarray([cfg["probe"]])
    L, H, d, k = cfg["flow_L"], cfg["flow_H"], cfg["d"], cfg["k"]
    done = {(r["eps"], r["seed"]) for r in rows}
    for eps in cfg["eps_large"]:
        for seed in range(cfg["large_seeds"]):
            if (eps, seed) in done:
                continue
            params = mfattn.AttentionParams.xavier_uniform(jax.random.key(500 + seed), L, H, d, k)
            model = mfattn.DiscreteTransformer(params, cfg["beta"])
            row = one_flow(
                model,
                sets["generic"],
                z,
                eps,
                jax.random.key(600 + seed),
                cfg,
                0,
                None,
                cfg["rtol"],
                cfg["atol"],
                cfg["reach_tol"],  # stop once reached
            )
            row["reached"] = bool(row["final_ratio"] < cfg["reach_tol"])
            row["time_to_tol_over_predicted"] = (
                row["s_end"] / row["predicted_time_to_tol"] if row["stopped"] else None
            )
            rows.append(dict(model="discrete", L=L, H=H, set="generic", seed=seed, **row))
            save()
            print(
                f"large eps={eps:4.2f} seed {seed}: R(s_end)/R0 = {row['final_ratio']:.2e}, "
                f"s_end / s* = {row['s_end'] / row['predicted_time_to_tol']:.2f}, "
                f"lambda_min 0 -> end {row['lambda_min_0']:.3e} -> {row['lambda_min_end']:.3e}",
                flush=True,
            )
    return rows


def section_limit_flows(cfg, sets):
    lf = cfg["limit_flow"]
    z = jnp.asarray([cfg["probe"]])
    null = nullities(cfg)
    grid = mfattn.antithetic_mean_field(
        jax.random.key(700), cfg["limit_nodes"], lf["M"], cfg["d"], cfg["k"]
    )
    model = mfattn.MeanFieldTransformer(grid, cfg["beta"], rtol=lf["rtol"], atol=lf["atol"])
    rows = []
    for name in ("generic", "translates"):
        row = one_flow(
            model,
            sets[name],
            z,
            cfg["eps_small"],
            jax.random.key(800),
            cfg,
            null[name]["full"],
            lf["s1"],
            lf["flow_rtol"],
            lf["flow_atol"],
            1e-10,
            with_end_kernel=False,
        )
        if name == "generic":
            unit = row["predicted_rate_0"]
        rows.append(
            dict(
                model="limit",
                M=lf["M"],
                nodes=cfg["limit_nodes"],
                set=name,
                seed=0,
                rate_unit=unit,
                **row,
            )
        )
        print(f"limit flow {name}: R(s1)/R0 = {row['final_ratio']:.2e}", flush=True)
    return rows


# --------------------------------------------------------------- summaries
def flow_summary(cfg, flows, large):
    out = {}
    for name in ("generic", "translates"):
        sel = [r for r in flows if r["set"] == name and r["model"] == "discrete"]
        if not sel:
            continue
        s = dict(runs=len(sel))
        ratio = [r["final_ratio"] for r in sel]
        s["final_ratio_median"] = float(np.median(ratio))
        s["final_ratio_range"] = [float(min(ratio)), float(max(ratio))]
        rates = [
            r["tail_rate"] / r["predicted_rate_end"]
            for r in sel
            if r["tail_rate"] is not None and r.get("predicted_rate_end")
        ]
        if name == "generic" and rates:
            lin = [
                r["tail_rate"] / r["tail_rate_linearised"]
                for r in sel
                if r["tail_rate"] is not None and r["tail_rate_linearised"]
            ]
            if lin:
                s["tail_over_linearised_tail_mean"] = float(np.mean(lin))
                s["tail_over_linearised_tail_range"] = [float(min(lin)), float(max(lin))]
            s["tail_over_predicted_end_mean"] = float(np.mean(rates))
            s["tail_over_predicted_end_range"] = [float(min(rates)), float(max(rates))]
            r0 = [r["tail_rate"] / r["predicted_rate_0"] for r in sel if r["tail_rate"] is not None]
            s["tail_over_predicted_0_mean"] = float(np.mean(r0))
            s["tail_over_predicted_0_range"] = [float(min(r0)), float(max(r0))]
            s["tail_over_predicted_0"] = r0  # per run, in seed order
            s["tail_over_predicted_end"] = rates
        if name == "translates":
            pred = np.array([r["plateau_predicted"] for r in sel])
            s["plateau_predicted_mean"] = float(np.mean(pred))
            s["plateau_predicted"] = _list(pred)
            s["final_over_plateau"] = _list(np.array(ratio) / pred)
            s["null_block_top"] = [r["null_block_top"] for r in sel]
        s["max_abs_log_ratio_to_linearised"] = [_log_dev(r) for r in sel]
        out[name] = s
    limit = {}
    for r in flows:
        if r["model"] != "limit":
            continue
        limit[r["set"]] = dict(
            M=r["M"],
            s1=r["s1"],
            final_ratio=r["final_ratio"],
            predicted_rate_0=r["predicted_rate_0"],
            bound_at_s1=float(math.exp(-r["predicted_rate_0"] * r["s1"])),
            plateau_predicted=r.get("plateau_predicted"),
            final_over_plateau=(
                r["final_ratio"] / r["plateau_predicted"] if r.get("plateau_predicted") else None
            ),
            max_abs_log_ratio_to_linearised=_log_dev(r),
        )
    if limit:
        out["limit"] = limit
    rows = []
    for eps in sorted({r["eps"] for r in large}):
        sel = [r for r in large if r["eps"] == eps]
        k, n = sum(r["reached"] for r in sel), len(sel)
        lo, hi = _wilson(k, n)
        rows.append(
            dict(
                eps=eps,
                runs=n,
                reached=k,
                reached_wilson95=[lo, hi],
                final_ratio_median=float(np.median([r["final_ratio"] for r in sel])),
                final_ratio_max=float(np.max([r["final_ratio"] for r in sel])),
                lambda_min_end_over_0_median=float(
                    np.median([r["lambda_min_end"] / r["lambda_min_0"] for r in sel])
                ),
                param_rel_change_median=float(np.median([r["param_rel_change"] for r in sel])),
                time_to_tol_over_predicted_median=_median_or_none(
                    [r.get("time_to_tol_over_predicted") for r in sel]
                ),
                time_to_tol_over_predicted_range=_range_or_none(
                    [r.get("time_to_tol_over_predicted") for r in sel]
                ),
                lambda_min_end_over_0_range=_range_or_none(
                    [r["lambda_min_end"] / r["lambda_min_0"] for r in sel]
                ),
                param_rel_change_range=_range_or_none([r["param_rel_change"] for r in sel]),
            )
        )
    out["large"] = rows
    k, n = sum(r["reached"] for r in large), len(large)
    out["large_pooled"] = dict(runs=n, reached=k, reached_wilson95=_wilson(k, n))
    return out


def _log_dev(r):
    """`max |log(R / R_lin)|` over the saves up to where the flow ended (later
    saves hold the stopped state while `R_lin` goes on falling)."""
    ss = np.array(r["ss"])
    keep = ss <= r.get("s_end", np.inf)
    return float(np.max(np.abs(np.log(np.array(r["risk"]) / np.array(r["risk_linearised"]))[keep])))


def _range_or_none(values):
    values = [v for v in values if v is not None]
    return [float(min(values)), float(max(values))] if values else None


def _median_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _wilson(k, n, zq=1.96):
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    den = 1 + zq**2 / n
    c = (p + zq**2 / (2 * n)) / den
    h = zq * math.sqrt(p * (1 - p) / n + zq**2 / (4 * n * n)) / den
    return [max(0.0, c - h), min(1.0, c + h)]


def _list(a):
    return [float(v) for v in np.asarray(a).reshape(-1)]


# ------------------------------------------------------------------ plots
COLORS = {"generic": "tab:blue", "translates": "tab:red", "diracs": "tab:orange"}
FLOOR = 1e-16  # eigenvalues at or below rounding (|lambda| < 1e-14 lambda_max) are drawn here
ROUNDING_LEVEL = {"generic": 3e-15, "translates": 10 * FLOOR, "diracs": FLOOR}  # apart, in the band


def _shown(row, scale):
    """Where a kernel summary row's `lambda_min` is drawn: at its value, or at
    its set's symbolic level in the rounding band when `|lambda_min|` is below
    `1e-14 scale` (`scale`: the largest eigenvalue of any kernel; the score
    kernel of Diracs is zero to rounding as a whole)."""
    lam = row["lambda_min_mean"]
    if abs(lam) < 1e-14 * scale:
        return ROUNDING_LEVEL[row["set"]]
    return lam


def plot(res, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    base = out.with_suffix("")
    # 1. the kernel's smallest eigenvalue against L H, and the criterion
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    scale = max(row["lambda_max_mean"] for row in res["kernel_summary"])
    for ax, blocks, title in [
        (axes[0], "QKVO", "full kernel (Q, K, V, O)"),
        (axes[1], "QK", "score kernel (Q, K)"),
    ]:
        for row in res["kernel_summary"]:
            if row["blocks"] != blocks or row["model"] != "discrete":
                continue
            ax.scatter(
                row["L"] * row["H"],
                _shown(row, scale),
                color=COLORS[row["set"]],
                marker={2: "o", 8: "s", 32: "^"}.get(row["L"], "o"),
                s=25,
            )
        # the limit to the right of the largest L H, one column per M
        x_limit = {
            M: 4 * 2**i * max(cfg["kernel_L"]) * max(cfg["kernel_H"])
            for i, M in enumerate(cfg["limit_M"])
        }
        ax.axvline(2 * max(cfg["kernel_L"]) * max(cfg["kernel_H"]), color="0.5", lw=0.6, ls=":")
        for row in res["kernel_summary"]:
            if row["blocks"] != blocks or row["model"] != "limit":
                continue
            ax.scatter(
                x_limit[row["M"]],
                _shown(row, scale),
                color=COLORS[row["set"]],
                marker="*",
                s=80,
                edgecolor="k",
                linewidth=0.5,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(
            "L H  (o L=2, s L=8, ^ L=32)\n* limit, M = "
            + ", ".join(str(m) for m in cfg["limit_M"])
            + " left to right"
        )
        ax.set_title(title)
        ax.axhspan(FLOOR / 3, 1e-13, color="0.9", zorder=0)
        ax.text(ax.get_xlim()[0] * 1.1, 3e-15, "zero to rounding", fontsize=7, color="0.4")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("lambda_min(K), mean over seeds")
    crit = {
        (r["set"], r["modulo"]): r["singular_values"][-1]
        for r in res["criterion"]
        if r["radius"] == 1.0
    }
    handles = [
        plt.Line2D(
            [],
            [],
            color=COLORS[name],
            marker="o",
            ls="",
            label=f"{name}: criterion s_min {crit.get((name, 'affine'), np.nan):.0e} (affine), "
            f"{crit.get((name, 'constants'), np.nan):.0e} (constants)",
        )
        for name in ("generic", "translates", "diracs")
    ]
    fig.legend(handles=handles, loc="lower center", ncol=1, fontsize=8, frameon=False)
    fig.suptitle("Does the kernel stay away from zero exactly when the criterion says independent?")
    fig.tight_layout(rect=(0, 0.16, 1, 0.95))
    fig.savefig(f"{base}_kernel.png", dpi=110)
    plt.close(fig)

    # 2. risk curves from a small initial loss, against s in units of the
    # predicted time constant N / (2 lambda_min) of the independent set
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    labelled = set()

    def once(label):
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for row in res["flows"]:
        x = np.array(row["ss"])[1:] * row["rate_unit"]
        R = np.array(row["risk"])
        c = COLORS[row["set"]]
        if row["model"] == "discrete":
            lab = once(f"{row['set']}, discrete L={row['L']} H={row['H']}")
            ax.plot(x, R[1:] / R[0], "-", color=c, lw=1.2, alpha=0.8, label=lab)
        else:
            lab = once(f"{row['set']}, limit M={row['M']}")
            ax.plot(x, R[1:] / R[0], "-", color=c, lw=2.5, alpha=0.35, label=lab)
        lin = np.array(row["risk_linearised"])[1:] / R[0]
        ax.plot(x, lin, ":", color="k", lw=0.8, label=once("linearised at s = 0 (K_0 eigenpairs)"))
        if row["set"] == "translates" and row["model"] == "discrete":
            ax.axhline(
                row["plateau_predicted"],
                color=c,
                ls="--",
                lw=0.6,
                label=once("predicted plateau: part of r_0 in the null block"),
            )
    xs = np.linspace(0, cfg["horizon"] * np.log(1 / cfg["reach_tol"]), 100)
    ax.plot(xs, np.exp(-xs), "--", color="tab:green", lw=1.0, label="exp(-2 lambda_min s / N)")
    ax.set_yscale("log")
    ax.set_ylim(1e-9, 2.0)
    ax.set_xlabel("2 lambda_min(K_0) s / N   (lambda_min of the independent set's kernel)")
    ax.set_ylabel("R(s) / R(0)")
    ax.set_title("Risk along the gradient flow from a small initial loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlim(left=0)
    fig.tight_layout()
    fig.savefig(f"{base}_risk.png", dpi=110)
    plt.close(fig)

    # 3. larger initial losses: reached or not, how fast, and how far the kernel moved
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    ax = axes[0]
    eps_all = sorted({row["eps"] for row in res["large"]})
    for row in res["large"]:
        jitter = 1 + 0.06 * (row["seed"] / max(cfg["large_seeds"] - 1, 1) - 0.5)
        if row["reached"] and row.get("time_to_tol_over_predicted") is not None:
            y, face = row["time_to_tol_over_predicted"], "tab:blue"
        else:  # not reached by the horizon: drawn at the horizon, open
            y, face = cfg["horizon"], "none"
        ax.scatter(row["eps"] * jitter, y, s=16, alpha=0.7, facecolor=face, edgecolor="tab:blue")
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="the initial kernel's prediction s*")
    ax.axhline(cfg["horizon"], color="tab:red", ls=":", lw=0.8, label="horizon (open: not reached)")
    for row in res["summary"]["large"]:
        ax.annotate(f"{row['reached']}/{row['runs']}", (row["eps"], 4.5), ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(eps_all, [f"{e:g}" for e in eps_all])
    ax.set_ylim(3e-3, 9.0)
    ax.set_xlabel("initial residual |r_0| = eps")
    ax.set_ylabel(f"time to R < {cfg['reach_tol']:.0e} R(0), over s*")
    ax.set_title("Reached (count per eps), and when")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax = axes[1]
    for row in res["large"]:
        jitter = 1 + 0.06 * (row["seed"] / max(cfg["large_seeds"] - 1, 1) - 0.5)
        ax.scatter(
            row["eps"] * jitter,
            row["lambda_min_end"] / row["lambda_min_0"],
            color="tab:purple",
            s=16,
            alpha=0.7,
        )
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(eps_all, [f"{e:g}" for e in eps_all])
    ax.set_xlabel("initial residual |r_0| = eps")
    ax.set_ylabel("lambda_min(K) where the flow stopped / at s = 0")
    ax.set_title("How far the kernel moved")
    ax.grid(alpha=0.3)
    fig.suptitle("From larger initial losses: does the flow still reach the tolerance, and when?")
    fig.tight_layout()
    fig.savefig(f"{base}_large.png", dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else "full"
    cfg = PRESETS[preset]
    out = pathlib.Path(
        args.out or f"benchmarks/results/gradient_flow{'_quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {}
    if args.resume and out.exists():
        res = json.loads(out.read_text())
        old = res.get("config") or {}
        if any(old.get(k) != v for k, v in cfg.items() if k not in GROWABLE):
            raise SystemExit(f"{out} was written with another configuration; drop --resume")
        # the large section resumes run by run: keep its runs on the current grid
        res["large"] = [
            r
            for r in res.get("large", [])
            if r["eps"] in cfg["eps_large"] and r["seed"] < cfg["large_seeds"]
        ]
    res.update(
        config=cfg,
        preset=preset,
        command=f"python -m benchmarks.gradient_flow{' --quick' if args.quick else ''}",
        machine=platform.platform(),
        jax=jax.__version__,
    )
    res.setdefault("date", datetime.date.today().isoformat())
    sets = training_sets(cfg)

    def save():
        out.write_text(json.dumps(res, indent=1))

    sections = [
        ("criterion", section_criterion),
        ("kernel", section_kernel),
        ("flows", section_flows),
    ]
    for name, fn in sections:
        if name not in res:
            res[name] = fn(cfg, sets)
            save()
    res.setdefault("large", [])
    section_large(cfg, sets, res["large"], save)
    if cfg["limit_flow"] and "limit_flows" not in res:
        res["limit_flows"] = section_limit_flows(cfg, sets)
        save()
    for row in res.get("limit_flows", []):  # written before the rate unit was stored
        row.setdefault(
            "rate_unit",
            next(r["predicted_rate_0"] for r in res["limit_flows"] if r["set"] == "generic"),
        )
    for row in res["flows"] + res["large"] + res.get("limit_flows", []):  # cheap: redo
        if row["result"] == "diffrax._solution.RESULTS<>":  # as an earlier version wrote them
            row["result"] = "successful"
        elif "an event occurred" in row["result"]:
            row["result"] = "event_occurred"
        row["tail_rate"] = _tail_rate(row["ss"], row["risk"], row.get("s_end", np.inf))
        row["tail_rate_linearised"] = _tail_rate(row["ss"], row["risk_linearised"])
    res["kernel_summary"], res["kernel_fits"] = kernel_summary(cfg, res["kernel"])
    res["flows"] = [r for r in res["flows"] if r["model"] == "discrete"] + res.get(
        "limit_flows", []
    )
    res["summary"] = flow_summary(cfg, res["flows"], res["large"])
    save()
    plot(res, out)
    print(json.dumps(res["summary"], indent=1))
    print(json.dumps(res["kernel_fits"], indent=1))
    print(f"written to {out} and {out.with_suffix('')}_{{kernel,risk,large}}.png")


if __name__ == "__main__":
    main()
