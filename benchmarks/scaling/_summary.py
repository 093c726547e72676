"""The study's fits and text: the fits each quantity's data support
(`mfattn.power_law_fit`, `mfattn.jackknife`, `mfattn.combined_fit`), which
points the limit's own error disqualifies, the report and the Markdown table
(docs/theory.md, section 7)."""

import numpy as np

import mfattn

from ._config import StudyConfig, sweep_condition_name


def _mean_ci(x):
    x = np.asarray(x, float)
    if x.size < 4:
        return {"mean": float(x.mean()), "n": int(x.size), "ci": None}
    t = mfattn.t_interval(x)
    return {"mean": t["estimate"], "n": t["n"], "ci": t["ci"]}


def _fit(cov, per_init):
    per_init = np.asarray(per_init, float)
    if per_init.shape[1] < 4 or per_init.shape[0] <= len(cov):
        return None
    return mfattn.power_law_fit(cov, per_init)


PARTS = {"": None, "state_": "state", "adjoint_": "adjoint"}
"""Prefixes of the fitted quantities: the state and adjoint together (the
theorem's error), the state alone, the adjoint alone."""


def _view(pt, prefix):
    """A point's record for one part (`""`: both, `"state_"`, `"adjoint_"`)."""
    return pt if PARTS[prefix] is None else pt[PARTS[prefix]]


def _flags(pt, ref):
    """Which quantities of a point its reference error disqualifies, for the
    state and adjoint together and for each alone (each against the reference
    error of its own part). A quantity is a maximum over the recorded steps, so
    the limit's own error can move it by up to its own maximum over the steps:
    a quantity is disqualified where that exceeds a fifth of it. `*_kK`: the
    same at the last recorded step alone."""
    out = {}
    for prefix, part in PARTS.items():
        suffix = "" if part is None else f"_{part}"
        r = np.maximum(np.asarray(ref["M_vs_4M" + suffix]), np.asarray(ref["J_vs_2J" + suffix]))
        v = _view(pt, prefix)
        per_step = np.asarray(v["per_step_random"]).mean(axis=0)
        out[prefix + "total"] = bool(r.max() > per_step.max() / 5)
        out[prefix + "total_kK"] = bool(r[-1] > per_step[-1] / 5)
        out[prefix + "bias"] = bool(r.max() > max(v["bias_per_step"]) / 5)
        # the fluctuation is measured among initialisations: the limit plays no part
        out[prefix + "fluctuation"] = False
        out[prefix + "reference_max"] = float(r.max())
        out[prefix + "bias_resolved"] = bool(v["bias"] > 2 * v["bias_noise"])
    lem = np.asarray(pt["lemma6_per_step"]).mean(axis=0)
    out["lemma6"] = bool(max(pt["lemma6_reference"]) > lem.max() / 5)
    return out


def _bias_vs_L(P, keys):
    """Slope of `log bias` on `log L` over `keys`, jackknifed with the
    leave-one-out biases (`bias_loo`) of the records `P[k]`."""
    Ls = np.array([P[k]["L"] for k in keys], float)
    full = np.array([P[k]["bias"] for k in keys])
    loo = np.array([P[k]["bias_loo"] for k in keys])  # (points, R)
    R = loo.shape[1]

    def slope(idx):
        b = full if len(idx) == R else loo[:, np.setdiff1d(np.arange(R), idx)[0]]
        return np.polyfit(np.log(Ls), np.log(b), 1)[0]

    jk = mfattn.jackknife(slope, R)
    return {"L": Ls.tolist(), "bias": full.tolist(), "slope": jk["estimate"], "slope_ci": jk["ci"]}


def summarize(data):
    """Fits from the per-condition results: `{"fits": ..., "marks": ...,
    "reference": ..., "displacement": ...}` (what the study's JSON adds).

    Every fit uses only the points whose reference error is below a fifth of
    the fitted quantity, needs 4 initialisations (jackknife `t` intervals over
    them) and more points than parameters. Fits are made for the state and
    adjoint together (no prefix: the theorem's error, with the adversarial sup)
    and for each alone (`state_`, `adjoint_`: random `z`)."""
    cfg, pts = StudyConfig.from_json(data["config"]), data["points"]
    fits, marks = {}, {}
    main = cfg.main_condition
    reference, displacement = {}, {}
    for cname, c in pts.items():
        reference[cname] = c["reference"]
        displacement[cname] = c["displacement"]
        marks[cname] = {k: _flags(p, c["reference"]) for k, p in c["points"].items()}
    enough = cfg.inits >= 4
    if main in pts:
        c = pts[main]
        P = c["points"]
        ok = lambda k, q: not marks[main][k][q]
        grid = list(P)
        Hmax = max(P[k]["H"] for k in grid)
        Lmax = max(P[k]["L"] for k in grid)
        last = len(c["steps"]) - 1
        for prefix in PARTS:
            V = {k: _view(P[k], prefix) for k in grid}
            # bias against L at the largest H (jackknife over inits of the slope)
            at_H = sorted((k for k in grid if P[k]["H"] == Hmax), key=lambda k: P[k]["L"])
            keys = [k for k in at_H if ok(k, prefix + "bias")]
            excluded = [P[k]["L"] for k in at_H if k not in keys]
            if len(keys) >= 2 and enough:
                V2 = {k: dict(V[k], L=P[k]["L"]) for k in keys}
                fits[prefix + "bias_vs_L"] = dict(
                    _bias_vs_L(V2, keys),
                    H=Hmax,
                    resolved=[marks[main][k][prefix + "bias_resolved"] for k in keys],
                    excluded=excluded,
                )
            else:  # recorded, with why it is not fitted
                fits[prefix + "bias_vs_L"] = {
                    "L": [P[k]["L"] for k in at_H],
                    "bias": [V[k]["bias"] for k in at_H],
                    "H": Hmax,
                    "excluded": excluded,
                    "slope": None,
                    "slope_ci": None,
                    "why": (
                        "fewer than 4 initialisations"
                        if not enough
                        else "fewer than 2 depths whose bias is above five times the "
                        "limit's own error"
                    ),
                }
            # `E = c L^a H^b`: the error (max over steps), the fluctuation (max
            # over steps, at k = 0 and at the last step: the part training adds)
            total = "total" if prefix == "" else "total_random"
            quantities = {
                "total": ("total", lambda v, t=total: v[t]),
                # the error after the last step (random z): what training leaves
                "total_kK": ("total_kK", lambda v: np.asarray(v["per_step_random"])[:, last]),
                "fluctuation": ("fluctuation", lambda v: v["fluctuation"]),
                "fluctuation_k0": ("fluctuation", lambda v: v["fluctuation_per_step"][0]),
                "fluctuation_kK": ("fluctuation", lambda v: v["fluctuation_per_step"][last]),
            }
            if prefix == "":  # Lemma 6 (zero at k = 0: all of it training's)
                quantities["lemma6"] = ("lemma6", lambda v: v["lemma6"])
            for name, (q, get) in quantities.items():
                keys = [k for k in grid if ok(k, prefix + q if q != "lemma6" else q)]
                if len(keys) >= 4:
                    cov = {"L": [P[k]["L"] for k in keys], "H": [P[k]["H"] for k in keys]}
                    f = _fit(cov, [get(V[k]) for k in keys])
                    if f is not None:
                        f["points_used"] = keys
                        fits[f"{prefix}{name}_vs_LH"] = f
            keys = [k for k in grid if ok(k, prefix + "total")]
            if len(keys) >= 5 and enough:
                fits[prefix + "total_combined"] = dict(
                    mfattn.combined_fit(
                        [P[k]["L"] for k in keys],
                        [P[k]["H"] for k in keys],
                        [V[k][total] for k in keys],
                        interval="jackknife",
                    ),
                    points_used=keys,
                )
            for axis, fixed, var in [("L", "H", Hmax), ("H", "L", Lmax)]:
                keys = [k for k in grid if P[k][fixed] == var and ok(k, prefix + "total")]
                if len(keys) >= 2:
                    f = _fit({axis: [P[k][axis] for k in keys]}, [V[k][total] for k in keys])
                    if f is not None:
                        fits[f"{prefix}total_vs_{axis}"] = dict(f, at={fixed: var})
        # the horizon: error per recorded step at every grid point
        fits["horizon"] = {
            k: {
                "steps": c["steps"],
                "per_step": [_mean_ci(col) for col in np.asarray(P[k]["per_step_random"]).T],
                "bias_per_step": P[k]["bias_per_step"],
                "state_per_step": [
                    _mean_ci(col) for col in np.asarray(P[k]["state"]["per_step_random"]).T
                ],
            }
            for k in grid
        }
    # tokens (masked and unmasked) and dimension (per optimiser) sweeps, at one
    # grid point; each quantity uses the conditions its reference allows
    L, H = cfg.sweep_LH
    at = f"L{L}/H{H}"

    def sweep(names, xs, q, get):
        rows = [pts[n]["points"].get(at) if n in pts else None for n in names]
        flag = [marks[n].get(at, {}) if n in pts else {} for n in names]
        keep = [r is not None and not f.get(q, True) for r, f in zip(rows, flag)]
        used = [x for x, k in zip(xs, keep) if k]
        vals = [get(r) for r, k in zip(rows, keep) if k]
        out = {
            "x": used,
            "excluded": [x for x, k, r in zip(xs, keep, rows) if r is not None and not k],
            "values": [_mean_ci(v) for v in vals],
        }
        if len(used) >= 2:
            out.update(_fit({"slope": used}, vals) or {})
        return out

    opt0 = cfg.optimizers[0]
    for causal in (False, True):
        names = [sweep_condition_name(cfg, cfg.dim, n, opt0, causal) for n in cfg.n_sweep]
        if not any(n in pts for n in names):
            continue
        tag = "causal" if causal else "unmasked"
        fits[f"total_vs_n_{tag}"] = {
            prefix + "total": sweep(
                names,
                cfg.n_sweep,
                prefix + "total",
                lambda r, p=prefix: _view(r, p)["total" if p == "" else "total_random"],
            )
            for prefix in PARTS
        }
        fits[f"total_vs_n_{tag}"]["state_total_kK"] = sweep(
            names,
            cfg.n_sweep,
            "state_total_kK",
            lambda r: np.asarray(r["state"]["per_step_random"])[:, -1],
        )
    lemma6 = {}
    for opt in cfg.optimizers:
        names = [sweep_condition_name(cfg, d, cfg.tokens, opt) for d in cfg.d_sweep]
        if not any(n in pts for n in names):
            continue
        lemma6[opt] = {"lemma6": sweep(names, cfg.d_sweep, "lemma6", lambda r: r["lemma6"])}
        lemma6[opt]["state_total_kK"] = sweep(
            names,
            cfg.d_sweep,
            "state_total_kK",
            lambda r: np.asarray(r["state"]["per_step_random"])[:, -1],
        )
        for prefix in PARTS:
            lemma6[opt][prefix + "total"] = sweep(
                names,
                cfg.d_sweep,
                prefix + "total",
                lambda r, p=prefix: _view(r, p)["total" if p == "" else "total_random"],
            )
    if lemma6:
        fits["lemma6"] = lemma6
    return {"fits": fits, "marks": marks, "reference": reference, "displacement": displacement}


def _ci(f, k):
    ci = f.get(f"{k}_ci")
    return f"{f[k]:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{f[k]:+.2f}"


def report(data) -> str:
    """What the data support, as text (printed at the end of a run)."""
    cfg, fits, pts = StudyConfig.from_json(data["config"]), data["fits"], data["points"]
    lines = [
        f"{len(pts)} conditions done, {len(data['failed'])} failed; "
        f"{cfg.inits} inits, K = {cfg.steps}"
        + (f" (sweeps: K = {cfg.sweep_steps})" if cfg.sweep_steps is not None else "")
    ]
    for name, c in pts.items():
        r = c["reference"]
        lines.append(
            f"{name}: limit displacement {max(c['displacement']):.3g}; own error (x and p) "
            f"M vs 4M {max(r['M_vs_4M']):.3g}, J vs 2J {max(r['J_vs_2J']):.3g}; (x alone) "
            f"{max(r['M_vs_4M_state']):.3g}, {max(r['J_vs_2J_state']):.3g}"
        )
    main = cfg.main_condition
    if main in data.get("marks", {}):
        m = data["marks"][main]
        for prefix, what in [("", "x and p"), ("state_", "x alone")]:
            out = {q: sum(v[prefix + q] for v in m.values()) for q in ("total", "bias")}
            lines.append(
                f"{main} ({what}): of {len(m)} grid points, excluded by the limit's own error "
                f"(above a fifth of the quantity): error {out['total']}, bias {out['bias']}; "
                f"bias above twice its noise at "
                f"{sum(v[prefix + 'bias_resolved'] for v in m.values())}"
            )
        lines.append(
            f"Lemma 6: excluded at {sum(v['lemma6'] for v in m.values())} of {len(m)}. Fits "
            "need 4 usable points (2 for the bias against L) and 4 initialisations; a fit "
            "not printed is one the data cannot support"
        )
    for prefix in PARTS:
        f = fits.get(prefix + "bias_vs_L")
        if f is not None and f["slope"] is not None:
            lines.append(
                f"{prefix}bias vs L (H = {f['H']}, L = {f['L']}): slope {f['slope']:+.2f} "
                f"[{f['slope_ci'][0]:+.2f}, {f['slope_ci'][1]:+.2f}]"
            )
        elif f is not None:
            lines.append(f"{prefix}bias vs L (H = {f['H']}): not fitted, {f['why']}")
        for q in ("total", "total_kK", "fluctuation", "fluctuation_k0", "fluctuation_kK", "lemma6"):
            k = f"{prefix}{q}_vs_LH"
            if k in fits:
                lines.append(f"{k}: L {_ci(fits[k], 'L')}, H {_ci(fits[k], 'H')}")
    for tag in ("unmasked", "causal"):
        for q, f in fits.get(f"total_vs_n_{tag}", {}).items():
            if "slope_ci" in f:
                lines.append(f"{q} vs n ({tag}, n = {f['x']}): slope {_ci(f, 'slope')}")
    for opt, g in fits.get("lemma6", {}).items():
        for q, f in g.items():
            if "slope_ci" in f:
                lines.append(f"{q} vs d ({opt}, d = {f['x']}): slope {_ci(f, 'slope')}")
    return "\n".join(lines)


def table(data) -> str:
    """The main grid as Markdown: mean (t interval) of the error, bias,
    fluctuation and Lemma 6 distance per `(L, H)`, and the state's alone."""
    cfg, pts = StudyConfig.from_json(data["config"]), data["points"]
    main = cfg.main_condition
    if main not in pts:
        return "(the main condition has not run)"
    P, marks = pts[main]["points"], data["marks"][main]
    fmt = lambda x: (
        f"{x['mean']:.3g} [{x['ci'][0]:.3g}, {x['ci'][1]:.3g}]" if x["ci"] else f"{x['mean']:.3g}"
    )
    lines = [
        f"Main condition `{main}`, {cfg.inits} initialisations, K = {cfg.steps} steps "
        "(95 % t intervals over initialisations; * = excluded from fits: the limit's own error "
        "is above a fifth of the quantity; (noise): bias below twice its Monte-Carlo noise):",
        "",
        "| L | H | error x+p (adversarial sup) | bias x+p | fluctuation x+p | "
        "error x (random z) | bias x | fluctuation x | Lemma 6 |",
        "| --: | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for k, p in sorted(P.items(), key=lambda kv: (kv[1]["L"], kv[1]["H"])):
        m = marks[k]
        star = lambda q, m=m: "*" if m[q] else ""
        noise = lambda q, m=m: "" if m[q] else " (noise)"
        s = p["state"]
        lines.append(
            f"| {p['L']} | {p['H']} | {fmt(_mean_ci(p['total']))}{star('total')} | "
            f"{p['bias']:.3g}{star('bias')}{noise('bias_resolved')} | "
            f"{fmt(_mean_ci(p['fluctuation']))} | "
            f"{fmt(_mean_ci(s['total_random']))}{star('state_total')} | "
            f"{s['bias']:.3g}{star('state_bias')}{noise('state_bias_resolved')} | "
            f"{fmt(_mean_ci(s['fluctuation']))} | "
            f"{fmt(_mean_ci(p['lemma6']))}{star('lemma6')} |"
        )
    return "\n".join(lines)
