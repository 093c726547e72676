"""The numbers the READMEs derive from committed results files rather than read
off them, computed again from those files (seconds, no solve):

- `scaling_full.json`: the state's fluctuation fits with and without
  `L = 1` (at `k = 0` and at the last step), the combined fit's RMS
  log-residuals corrected for the parameters fitted (also for
  `scaling_medium.json`), and the gain of the adversarial ascent over the
  random-`z` maximum per grid point;
- `low_temperature.json`: each run's slope of `W_2` against `beta` on
  `beta >= 1e3` at `t = 1`, or the reason it is not fitted;
- `gradient_flow.json`: the limit's smallest tangent-kernel eigenvalue per
  particle count `M` and initialisation.

    python -m benchmarks.readme_checks    # prints them, writes results/readme_checks.json
"""

import json
import pathlib

import numpy as np
from scipy import stats

import mfattn

from .scaling._config import StudyConfig

RESULTS = pathlib.Path(__file__).parent / "results"


def _interval(f, name):
    return {"exponent": f[name], "ci": f[name + "_ci"]}


def scaling(data):
    """The state's fluctuation fits with and without `L = 1`, the combined fit's
    residuals per degree of freedom, and the adversarial ascent's gain."""
    main = StudyConfig.from_json(data["config"]).main_condition
    c = data["points"][main]
    P, last = c["points"], len(c["steps"]) - 1
    out = {"condition": main, "fluctuation_state": {}, "ascent_gain": {}}
    for name, step in (("k0", 0), (f"k{c['steps'][last]}", last)):
        for tag, keys in (("all", list(P)), ("without_L1", [k for k in P if P[k]["L"] > 1])):
            f = mfattn.power_law_fit(
                {"L": [P[k]["L"] for k in keys], "H": [P[k]["H"] for k in keys]},
                [P[k]["state"]["fluctuation_per_step"][step] for k in keys],
            )
            out["fluctuation_state"][f"{name}_{tag}"] = {
                "points": keys,
                "L": _interval(f, "L"),
                "H": _interval(f, "H"),
            }
    out["combined_rms_per_dof"] = combined_rms_per_dof(data)
    for k, p in P.items():  # adversarial sup over the random-z maximum, per initialisation
        g = np.asarray(p["total"]) / np.asarray(p["total_random"])
        out["ascent_gain"][k] = {
            "median": float(np.median(g)),
            "min": float(g.min()),
            "max": float(g.max()),
        }
    out["steps"] = data["config"]["adversarial_steps"]
    return out


def combined_rms_per_dof(data):
    """The combined fit's RMS log-residuals, free and at fixed exponents, times
    `sqrt(n / (n - p))` for `p` fitted parameters on `n` points."""
    cf = data["fits"]["state_total_combined"]
    n = len(cf["points_used"])
    # free: a, b, alpha, gamma; fixed exponents: a, b
    return {
        lab: {
            "rms": r,
            "parameters": p,
            "points": n,
            "rms_corrected": r * np.sqrt(n / (n - p)),
        }
        for lab, r, p in (
            ("free", cf["rms_log_residual"], 4),
            ("theorem", cf["theorem_fixed"]["rms_log_residual"], 2),
            ("resnet", cf["resnet_fixed"]["rms_log_residual"], 2),
        )
    }


def low_temperature(data, t=1.0):
    """Per run, the slope of `log W_2` against `log beta` on `beta >= tail` at
    `t`, over the points above ten times the hardmax reference's own error (as
    `benchmarks.low_temperature` fits them), or why the run is not fitted."""
    cfg = data["config"]
    betas, it = np.asarray(cfg["betas"]), cfg["ts"].index(t)
    runs = []
    for r in data["rows"]:
        w = np.array([r["w2"][repr(b)][it] for b in cfg["betas"]])
        floor = 10 * r["hardmax_tolerance_error"][it]
        keep = (betas >= cfg["tail"]) & (w > floor)
        slope = (
            float(stats.linregress(np.log(betas[keep]), np.log(w[keep])).slope)
            if keep.sum() >= 2
            else None
        )
        runs.append(
            {
                "model": r["model"],
                "n": r["n"],
                "seed": r["seed"],
                "w2": dict(zip(map(float, betas), w.tolist())),
                "floor": floor,
                "slope_vs_beta": slope,
                "why_not_fitted": None
                if slope is not None
                else "fewer than 2 points of beta >= tail above the reference's floor",
            }
        )
    return {"t": t, "tail": cfg["tail"], "runs": runs}


def gradient_flow(data, dataset="generic"):
    """The limit's smallest tangent-kernel eigenvalue, per `M` and initialisation."""
    out = {}
    for blocks in ("QKVO", "QK"):
        for M in data["config"]["limit_M"]:
            v = [
                r["eigenvalues"][0]
                for r in data["kernel"]
                if r["model"] == "limit" and r["set"] == dataset
                if r["M"] == M and r["blocks"] == blocks
            ]
            out[f"{blocks}_M{M}"] = {"per_init": v, "mean": float(np.mean(v))}
    return {"set": dataset, "lambda_min": out}


def main():
    load = lambda name: json.loads((RESULTS / name).read_text())
    out = {
        "scaling_full": scaling(load("scaling_full.json")),
        "scaling_medium": {
            "combined_rms_per_dof": combined_rms_per_dof(load("scaling_medium.json"))
        },
        "low_temperature": low_temperature(load("low_temperature.json")),
        "gradient_flow": gradient_flow(load("gradient_flow.json")),
    }
    s = out["scaling_full"]
    for k, f in s["fluctuation_state"].items():
        L, H = f["L"], f["H"]
        print(
            f"state fluctuation {k}: L {L['exponent']:+.2f} "
            f"[{L['ci'][0]:+.2f}, {L['ci'][1]:+.2f}], H {H['exponent']:+.2f} "
            f"[{H['ci'][0]:+.2f}, {H['ci'][1]:+.2f}]"
        )
    combined = [("full", k, r) for k, r in s["combined_rms_per_dof"].items()]
    combined += [("medium", k, r) for k, r in out["scaling_medium"]["combined_rms_per_dof"].items()]
    for preset, k, r in combined:
        print(
            f"combined fit ({preset}) {k}: RMS {r['rms']:.3f}, {r['parameters']} parameters on "
            f"{r['points']} points, corrected {r['rms_corrected']:.2f}"
        )
    for k, g in s["ascent_gain"].items():
        print(
            f"ascent gain {k} ({s['steps']} steps): median {g['median']:.2f} "
            f"(range {g['min']:.2f}-{g['max']:.2f})"
        )
    for r in out["low_temperature"]["runs"]:
        w = " ".join(f"{v:.1e}" for v in r["w2"].values())
        s_ = "not fitted" if r["slope_vs_beta"] is None else f"{r['slope_vs_beta']:+.3f}"
        print(
            f"low temperature {r['model']} n={r['n']} seed {r['seed']}: "
            f"slope {s_}; W2 {w}; floor {r['floor']:.1e}"
        )
    for k, v in out["gradient_flow"]["lambda_min"].items():
        per = ", ".join(f"{x:.4f}" for x in v["per_init"])
        print(f"gradient flow limit lambda_min {k}: {per}; mean {v['mean']:.4f}")
    path = RESULTS / "readme_checks.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
