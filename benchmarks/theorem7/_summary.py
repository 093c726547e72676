"""Fits, intervals, verdicts and the table of the study."""

import numpy as np

import mfattn

from ._adjoint_distance import adjoint_fits, adjoint_records
from ._config import Theorem7Config
from ._summary_training import (
    global_fits,
    global_records,
    lemma6_fits,
    lemma6_records,
    training_rows,
)
from ._trained_bias import reference_of, trained_bias_fits, trained_bias_records


def _interval(per_init) -> dict:
    t = mfattn.t_interval(np.asarray(per_init, float), min_samples=8)
    return {"value": t["estimate"], "ci_low": t["ci"][0], "ci_high": t["ci"][1]}


def fluctuation_records(points: list[dict]) -> list[dict]:
    """One record per `(L, H, k)`: the mean over initialisations of the
    per-initialisation sup, with its `t` interval."""
    out = []
    for p in points:
        for k_name, k in (("k0", 0), ("kK", p["steps"])):
            rec = {"L": p["L"], "H": p["H"], "k": k, "inits": p["inits"]}
            rec.update(_interval(p[k_name]["total"]))
            for part in ("state", "adjoint", "tokens", "test"):
                t = _interval(p[k_name][part])
                rec[part] = t["value"]
                rec[part + "_ci"] = [t["ci_low"], t["ci_high"]]
            out.append(rec)
    return out


def _fit(points, k_name, part="total", where=lambda p: True) -> dict | None:
    sel = [p for p in points if where(p)]
    if len({p["L"] for p in sel}) < 2 or len({p["H"] for p in sel}) < 2 or len(sel) < 4:
        return None
    per_init = np.array([p[k_name][part] for p in sel])
    f = mfattn.power_law_fit(
        {"L": [p["L"] for p in sel], "H": [p["H"] for p in sel]}, per_init, min_samples=8
    )
    return {
        "L": f["L"],
        "L_ci": f["L_ci"],
        "H": f["H"],
        "H_ci": f["H_ci"],
        "rms_log_residual": f["rms_log_residual"],
        "points": len(sel),
    }


def local_slopes(points: list[dict], k_name: str, part: str = "total") -> list[dict]:
    """Slopes in `L` between successive depths at each `H`, with jackknife
    intervals over initialisations."""
    out = []
    for H in sorted({p["H"] for p in points}):
        row = sorted((p for p in points if p["H"] == H), key=lambda p: p["L"])
        for a, b in zip(row, row[1:]):
            ea, eb = np.asarray(a[k_name][part]), np.asarray(b[k_name][part])
            lr = np.log(b["L"] / a["L"])
            jk = mfattn.jackknife(
                lambda idx, ea=ea, eb=eb, lr=lr: np.log(eb[idx].mean() / ea[idx].mean()) / lr,
                len(ea),
                min_samples=8,
            )
            out.append(
                {"H": H, "L_from": a["L"], "L_to": b["L"], "slope": jk["estimate"], "ci": jk["ci"]}
            )
    return out


def bias_records(points: list[dict], reference: dict) -> list[dict]:
    out = []
    for p in points:
        lo, hi = np.quantile(p["boots"], [0.025, 0.975])
        out.append(
            {
                "L": p["L"],
                "H": p["H"],
                "inits": p["inits"],
                "value": p["value"],
                "ci_low": float(lo),
                "ci_high": float(hi),
                "plain": p["plain"],
                "noise_of_mean": p["noise_of_mean"],
                "reference_M": 4 * reference["M"],
                "reference_error": reference["M_vs_4M"],
            }
        )
    return out


def bias_fit(points: list[dict]) -> dict | None:
    """Slope of `log bias` on `log L`, with the bootstrap over
    initialisations (independent at every `L`) for the interval."""
    pts = [p for p in points if p["value"] > 0]
    if len(pts) < 3:
        return None
    lx = np.log([p["L"] for p in pts])
    slope = float(np.polyfit(lx, np.log([p["value"] for p in pts]), 1)[0])
    B = min(len(p["boots"]) for p in pts)
    boots = []
    for b in range(B):
        y = np.array([p["boots"][b] for p in pts])
        if np.all(y > 0):
            boots.append(np.polyfit(lx, np.log(y), 1)[0])
    lo, hi = np.quantile(boots, [0.025, 0.975]) if boots else (np.nan, np.nan)
    return {"slope": slope, "ci": [float(lo), float(hi)], "points": len(pts)}


def uniform_fit(points: list[dict], causal: bool) -> dict | None:
    """Slope of the sup over token sets in `n` (jackknife over initialisations)."""
    sel = sorted((p for p in points if p["causal"] == causal), key=lambda p: p["n"])
    if len(sel) < 3:
        return None
    f = mfattn.power_law_fit(
        {"n": [p["n"] for p in sel]}, np.array([p["per_init"] for p in sel]), min_samples=8
    )
    return {"slope": f["n"], "ci": f["n_ci"], "points": len(sel)}


def verdict(ci, claim: float) -> str:
    lo, hi = ci
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no interval"
    if hi - lo > 1.0:
        return "too wide to tell"
    return "consistent" if lo <= claim <= hi else "excluded"


def questions(data: dict) -> list[dict]:
    """The table's rows: question, measured exponent and interval, the known or
    claimed answer, and the verdict."""
    fits, rows = data["fits"], []

    def add(question, fit, key, ci_key, claims):
        if not fit or fit.get(key) is None:
            return
        value, ci = fit[key], fit[ci_key]
        rows.append(
            {
                "question": question,
                "measured": value,
                "ci": ci,
                "claim": " or ".join(name for name, _ in claims),
                "claim_values": [v for _, v in claims],
                "verdict": "; ".join(
                    (f"{name.split(' ')[0]}: " if len(claims) > 1 else "") + verdict(ci, v)
                    for name, v in claims
                ),
            }
        )

    parts = (("", "x, p everywhere"), ("_tokens", "x, p at tokens"), ("_state", "x only"))
    for suffix, what in parts:
        f0 = fits.get("fluctuation_k0_vs_LH" + suffix)
        clt = [("-1/2 (CLT)", -0.5)]
        add(f"spread at k=0 vs L ({what})", f0, "L", "L_ci", clt)
        add(f"spread at k=0 vs H ({what})", f0, "H", "H_ci", clt)
    for suffix, what in parts:
        fK = fits.get("fluctuation_kK_vs_LH" + suffix)
        add(
            f"spread after K vs L ({what})",
            fK,
            "L",
            "L_ci",
            [("-1/3 (bound)", -1 / 3), ("-1/2 (CLT)", -0.5)],
        )
        add(f"spread after K vs H ({what})", fK, "H", "H_ci", [("-1/2 (theorem)", -0.5)])
    add(
        "bias of the mean at k=0 vs L",
        fits.get("bias_init_vs_L"),
        "slope",
        "ci",
        [("-1 (Euler)", -1.0)],
    )
    add(
        "bias at k=0 vs L (means at L and 2L)",
        fits.get("bias_successive_k0_vs_L"),
        "slope",
        "ci",
        [("-1 (Euler)", -1.0)],
    )
    add(
        "bias after K vs L (means at L and 2L)",
        fits.get("bias_trained_vs_L"),
        "slope",
        "ci",
        [("-1 (Euler)", -1.0)],
    )
    for H, f in (fits.get("bias_trained_vs_L_by_H") or {}).items():
        add(
            f"bias after K vs L (means at L and 2L, H={H})",
            f.get("bias_trained_vs_L"),
            "slope",
            "ci",
            [("-1 (Euler)", -1.0)],
        )
    for causal in (False, True):
        name = "causal" if causal else "unmasked"
        add(
            f"sup over token sets vs n ({name})",
            fits.get(f"uniform_{name}_vs_n"),
            "slope",
            "ci",
            [("0 (uniform in n)", 0.0)],
        )
    rows.extend(training_rows(data))
    by_distance = [f for f in fits.get("adjoint_vs_H_by_distance") or [] if f["k"] > 0]
    if by_distance:
        L = data["config"]["adjoint_L"]
        for f in (by_distance[0], by_distance[-1]):
            add(
                f"spread of p after K vs H, {f['distance']:g} R from tokens (L={L})",
                {"slope": f["p_spread"], "ci": f["p_spread_ci"]},
                "slope",
                "ci",
                [("-1/2 (theorem)", -0.5)],
            )
    return rows


def table(data: dict) -> str:
    """The plain-text table the main job prints."""
    rows = questions(data)
    head = f"{'question':44s} {'exponent [95% interval]':24s} {'answer':27s} verdict"
    note = (
        "spread: among initialisations trained on one data stream (no limit needed); "
        "CLT: a central limit over the L H independent heads; bound: the theorem's "
        "L^-1/3 H^-1/2"
    )
    lines = [note, "", head, "-" * len(head)]
    for r in rows:
        m = f"{r['measured']:+.2f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]"
        lines.append(f"{r['question']:44s} {m:24s} {r['claim']:27s} {r['verdict']}")
    c = data["config"]
    ref = data.get("bias_reference", {})
    lines.append("")
    lines.append(
        f"L in {c['L']}, H in {c['H']} (fits from L = {c['fit_min_L']}), {c['inits']} "
        f"initialisations, K = {c['steps']} AdamW steps; bias: {c['bias_inits']} "
        f"initialisations, H = {c['bias_H']}, reference "
        f"M = {4 * c['reference_M']} (its distance to M = {c['reference_M']}: "
        f"{ref.get('M_vs_4M', float('nan')):.2g}); sup over token sets: L = H = "
        f"{c['uniform_L']}, k = 0, the state only."
    )
    if data.get("bias_trained"):
        lines.append(
            f"Bias after training: {c['trained_bias_inits']} initialisations in "
            f"{c['trained_bias_groups']} groups at L in {list(c['trained_bias_L'])}, H = "
            f"{c['bias_H']}"
            + "".join(
                f" (and H = {h} at L in {list(c['trained_bias_more_L'])})"
                for h in c.get("trained_bias_more_H", ())
            )
            + ", "
            f"K = {c['steps']}; the distance of the means at L and 2L, whose "
            "exponent is the bias's (no trained limit needed)."
        )
    if data.get("global_in_K"):
        lines.append(
            f"Spread vs k: {c['global_inits']} initialisations at (L, H) in "
            f"{[tuple(t) for t in c['global_LH']]}, AdamW at the step "
            f"eta / sqrt(1 + k / {c['global_decay']:g}), to k = {c['global_checkpoints'][-1]}; "
            "shared: one data stream; indep.: one stream per initialisation (the control)."
        )
    if data.get("lemma6_d"):
        lines.append(
            f"Spread vs d: {c['lemma6_inits']} initialisations, L = {c['lemma6_L']}, "
            f"H = {c['lemma6_H']}, k = {c['lemma6_head_dim']}, K = {c['lemma6_steps']} steps "
            f"at a fixed per-entry step {c['lemma6_eta_entry']:g} (blockwise: per block "
            "x sqrt(4 k)), d in " + str(list(c["lemma6_d"])) + ", the state."
        )
    return "\n".join(lines)


def summarize(cfg: Theorem7Config, records: dict) -> dict:
    """The study's JSON from its per-condition records."""
    fl = records.get("fluctuation", [])
    bias = records.get("bias", [])
    uni = records.get("uniform", [])
    ref = records.get("bias_reference")
    fits = {}
    big = lambda p: p["L"] >= cfg.fit_min_L
    for k_name, key in (("k0", "fluctuation_k0_vs_LH"), ("kK", "fluctuation_kK_vs_LH")):
        fits[key] = _fit(fl, k_name, where=big)
        fits[key + "_all_L"] = _fit(fl, k_name)
        for part in ("state", "adjoint", "tokens", "test"):
            fits[f"{key}_{part}"] = _fit(fl, k_name, part, where=big)
    fits["bias_init_vs_L"] = bias_fit([p for p in bias if big(p)])
    fits["bias_init_vs_L_all_L"] = bias_fit(bias)
    for name, f in fits.items():
        if f is not None:
            f["min_L"] = min(cfg.L + cfg.bias_L) if name.endswith("_all_L") else cfg.fit_min_L
    for causal in (False, True):
        fits[f"uniform_{'causal' if causal else 'unmasked'}_vs_n"] = uniform_fit(uni, causal)
    data = {
        "config": {
            **cfg.to_dict(),
            "K": cfg.steps,
            "n": cfg.tokens,
            "d": cfg.dim,
            "device": records.get("device"),
        },
        "fluctuation": fluctuation_records(fl),
        "local_slopes": {
            f"{k}{'' if part == 'total' else '_' + part}": local_slopes(fl, k, part)
            for k in ("k0", "kK")
            for part in ("total", "state", "tokens")
        },
        "bias_init": bias_records(bias, ref) if ref else [],
        "bias_reference": {
            k: v for k, v in (ref or {}).items() if k in ("M", "M_vs_4M", "M_vs_4M_test_adjoint")
        },
        "uniform": [{k: v for k, v in p.items() if k != "per_init"} for p in uni],
        "fits": fits,
        "training_loss": [
            {"L": p["L"], "H": p["H"], "first": p["train_loss_first"], "last": p["train_loss_last"]}
            for p in fl
        ],
        "wall_seconds": records.get("wall_seconds"),
    }
    data["global_in_K"] = global_records(records.get("global", []))
    data["lemma6_d"] = lemma6_records(records.get("lemma6", []))
    fits["global_in_K"] = global_fits(records.get("global", []), cfg.global_fit_from)
    fits["fluctuation_vs_d"] = lemma6_fits(records.get("lemma6", []), cfg.lemma6_fit_min_d)
    tref = reference_of(ref)
    data["bias_trained"] = trained_bias_records(records.get("trained_bias", []), tref)
    fits.update(trained_bias_fits(records.get("trained_bias", []), tref, cfg.fit_min_L))
    more = records.get("trained_bias_more", [])
    data["bias_trained"] += trained_bias_records(more, None)
    fits["bias_trained_vs_L_by_H"] = {
        str(H): trained_bias_fits([p for p in more if p["H"] == H], None, cfg.fit_min_L)
        for H in sorted({p["H"] for p in more})
    }
    data["adjoint_distance"] = adjoint_records(records.get("adjoint", []))
    fits["adjoint_vs_H_by_distance"] = adjoint_fits(records.get("adjoint", []))
    data["questions"] = questions(data)
    return data
