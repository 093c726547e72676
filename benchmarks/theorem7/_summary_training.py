"""Records, fits and table rows of parts 4 (the spread along training, shared
against independent streams) and 5 (the spread against `d` per optimiser)."""

import numpy as np

import mfattn

from ._global import QUANTITIES

LEMMA6_QUANTITIES = (*QUANTITIES, "head_drift")


def _interval(per_init) -> dict:
    per_init = np.asarray(per_init, float)
    if not np.all(np.isfinite(per_init)):  # a diverged run: said, not averaged
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    t = mfattn.t_interval(per_init, min_samples=8)
    return {"value": t["estimate"], "ci_low": t["ci"][0], "ci_high": t["ci"][1]}


def trend(ci) -> str:
    """What a slope's interval says: `grows`, `falls`, or `flat within the
    interval`."""
    lo, hi = ci
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no interval"
    return "grows" if lo > 0 else "falls" if hi < 0 else "flat within the interval"


def _slope(x, per_init, name) -> dict | None:
    """The exponent of `mean spread ~ x^s` with its jackknife interval over
    initialisations (`per_init` is `(points, R)`, paired across points)."""
    per_init = np.asarray(per_init, float)
    if len(x) < 2 or per_init.shape[1] < 8:
        return None
    f = mfattn.power_law_fit({name: list(x)}, per_init, min_samples=8)
    return {"slope": f[name], "ci": f[name + "_ci"], "points": len(x)}


def _ratio(a, b) -> dict:
    """`mean a / mean b` with its jackknife interval over initialisations
    (paired: the same initialisation index in both)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    jk = mfattn.jackknife(lambda idx: a[idx].mean() / b[idx].mean(), len(a), min_samples=8)
    return {"value": jk["estimate"], "ci": jk["ci"]}


# --- part 4 --------------------------------------------------------------------------
def global_records(points: list[dict]) -> list[dict]:
    """One record per `(L, H, k, stream, quantity)`: the mean over
    initialisations of the per-initialisation sup, with its `t` interval."""
    out = []
    for p in points:
        for i, k in enumerate(p["checkpoints"]):
            for q in QUANTITIES:
                rec = {"L": p["L"], "H": p["H"], "k": k, "stream": p["stream"], "quantity": q}
                rec.update(_interval(p["per_init"][q][i]))
                rec["inits"] = p["inits"]
                rec["train_loss"] = p["train_loss"][i]
                if "scale" in p:  # the size of the mean, and the heads' drift
                    rec["scale"] = p["scale"][q][i]
                    rec["head_drift"] = float(np.mean(p["head_drift"][i]))
                out.append(rec)
    return out


def global_fits(points: list[dict], fit_from: int) -> list[dict]:
    """Per `(L, H, stream, quantity)`: the exponent of the spread in `k` over the
    checkpoints `k >= fit_from` (bounded in `K` if it is not positive), the
    ratio of the spread at the last checkpoint to that at `fit_from`, the
    ratio of the largest spread over the checkpoints to that at `k = 0`, and,
    for the shared stream, the ratio of its spread to the independent
    streams' at the last checkpoint (both trained from the same
    initialisations)."""
    by = {(p["L"], p["H"], p["stream"]): p for p in points}
    out = []
    for (L, H, stream), p in sorted(by.items()):
        ks = np.asarray(p["checkpoints"])
        sel = np.flatnonzero(ks >= max(fit_from, 1))
        for q in QUANTITIES:
            e = np.asarray(p["per_init"][q], float)  # (checkpoints, R)
            if not np.all(np.isfinite(e)):
                continue  # a diverged run stays in the records, not in the fits
            rec = {"L": L, "H": H, "stream": stream, "quantity": q, "inits": p["inits"]}
            rec["k_from"], rec["k_to"] = int(ks[sel[0]]), int(ks[-1])
            s = _slope(ks[sel], e[sel], "k") if len(sel) >= 2 else None
            rec.update({"slope": None, "ci": None} if s is None else s)
            rec["trend"] = trend(rec["ci"]) if s else "no interval"
            g = _ratio(e[-1], e[sel[0]])
            rec["last_over_first_fitted"], rec["last_over_first_fitted_ci"] = g["value"], g["ci"]
            peak = int(np.argmax(e.mean(axis=1)))
            m = _ratio(e[peak], e[0])
            rec["max_over_k0"], rec["max_over_k0_ci"], rec["k_of_max"] = (
                m["value"],
                m["ci"],
                int(ks[peak]),
            )
            other = by.get((L, H, "independent"))
            if stream == "shared" and other is not None:
                r = _ratio(e[-1], np.asarray(other["per_init"][q][-1], float))
                rec["shared_over_independent"], rec["shared_over_independent_ci"] = (
                    r["value"],
                    r["ci"],
                )
            out.append(rec)
    return out


# --- part 5 --------------------------------------------------------------------------
def lemma6_records(points: list[dict]) -> list[dict]:
    """One record per `(d, optimizer, eps, quantity)` after `K` steps (and the
    spread at `k = 0`, the same for every optimiser at one `d`, as `k0_*`)."""
    out = []
    for p in sorted(points, key=lambda p: (p["optimizer"], p["eps"], p["d"])):
        for q in LEMMA6_QUANTITIES:
            per = p["head_drift"] if q == "head_drift" else p["kK"][q]
            rec = {"d": p["d"], "optimizer": p["optimizer"], "eps": p["eps"], "quantity": q}
            rec.update(_interval(per))
            rec["inits"] = p["inits"]
            if q != "head_drift":
                k0 = _interval(p["k0"][q])
                rec["k0_value"], rec["k0_ci"] = k0["value"], [k0["ci_low"], k0["ci_high"]]
            rec["identity_loss"] = p["identity_loss"]
            rec["train_loss_first"] = p["train_loss_first"]
            rec["train_loss_last"] = p["train_loss_last"]
            out.append(rec)
    return out


def _finite(per_quantity: dict) -> bool:
    return all(np.all(np.isfinite(np.asarray(v, float))) for v in per_quantity.values())


def _growth_slope(ds, after, before) -> dict:
    """The exponent in `d` of `mean after / mean before` (paired
    initialisations), with its jackknife interval."""
    a, b = np.asarray(after, float), np.asarray(before, float)
    x = np.log(np.asarray(ds, float))
    jk = mfattn.jackknife(
        lambda idx: np.polyfit(x, np.log(a[:, idx].mean(1) / b[:, idx].mean(1)), 1)[0],
        a.shape[1],
        min_samples=8,
    )
    return {"slope": jk["estimate"], "ci": jk["ci"], "points": len(ds)}


def lemma6_fits(points: list[dict], min_d: int = 1) -> dict:
    """`{optimizer: [fit, ...]}`: per `eps` and quantity, the exponent of the
    spread after `K` steps in `d` with its jackknife interval over
    initialisations, over every `d` (`d_from` the least) and, where `min_d`
    leaves at least two, over `d >= min_d` (quantity `"state_growth"`: that of
    the state's spread after `K` over its spread at `k = 0`, what training
    added); and under `"init"` that of the spread at `k = 0` (the same
    initialisations for every optimiser)."""
    fits: dict[str, list] = {}
    for opt in sorted({p["optimizer"] for p in points}):
        for eps in sorted({p["eps"] for p in points if p["optimizer"] == opt}):
            every = sorted(
                (
                    p
                    for p in points
                    if p["optimizer"] == opt and p["eps"] == eps and _finite(p["kK"])
                ),
                key=lambda p: p["d"],
            )  # a diverged run (non-finite states) stays in the records, not in the fits
            rows = [every]
            if min_d > min((p["d"] for p in every), default=min_d):
                rows.append([p for p in every if p["d"] >= min_d])
            for row in rows:
                if len(row) < 2:
                    continue
                ds = [p["d"] for p in row]
                tag = {"eps": eps, "d": ds, "d_from": ds[0]}
                for q in LEMMA6_QUANTITIES:
                    per = [p["head_drift"] if q == "head_drift" else p["kK"][q] for p in row]
                    s = _slope(ds, per, "d")
                    if s is not None:
                        s.update({**tag, "quantity": q, "trend": trend(s["ci"])})
                        fits.setdefault(opt, []).append(s)
                # what training added: the state's spread after K over k = 0
                s = _growth_slope(
                    ds, [p["kK"]["state"] for p in row], [p["k0"]["state"] for p in row]
                )
                s.update({**tag, "quantity": "state_growth", "trend": trend(s["ci"])})
                fits.setdefault(opt, []).append(s)
    first = {}
    for p in points:  # the spread at k = 0 depends on d only
        first.setdefault(p["d"], p)
    row = [first[d] for d in sorted(first)]
    for q in QUANTITIES:
        s = _slope([p["d"] for p in row], [p["k0"][q] for p in row], "d") if len(row) >= 2 else None
        if s is not None:
            ds = sorted(first)
            s.update(
                {"eps": None, "quantity": q, "d": ds, "d_from": ds[0], "trend": trend(s["ci"])}
            )
            fits.setdefault("init", []).append(s)
    return fits


NAMES = {"adamw": "AdamW", "blockwise_sum": "blockwise", "blockwise_mean": "blockwise mean"}


def _bounded(ci) -> str:
    t = trend(ci)
    return {"grows": "excluded (grows)", "falls": "consistent (falls)"}.get(
        t, "consistent" if t.startswith("flat") else t
    )


def training_rows(data: dict) -> list[dict]:
    """The table's rows of parts 4 and 5 (the keys of `_summary.questions`'s
    rows). Both claims are bounds (in `K`, and in `d` for blockwise AdamW): a
    slope whose interval lies below zero is consistent with them, one above
    zero is not."""
    fits, rows = data["fits"], []

    def add(question, f, claim, claim_value, text):
        rows.append(
            {
                "question": question,
                "measured": f["slope"],
                "ci": f["ci"],
                "claim": claim,
                "claim_values": [claim_value],
                "verdict": text,
            }
        )

    g = fits.get("global_in_K") or []
    if g:
        L, H = max(((f["L"], f["H"]) for f in g), key=lambda t: (t[0] * t[1], t))
        for f in g:
            if (f["L"], f["H"]) != (L, H) or f["slope"] is None:
                continue
            if f["stream"] == "independent" and f["quantity"] != "state":
                continue
            q = {"state": "x", "adjoint_tokens": "p tokens", "adjoint_far": "p far"}[f["quantity"]]
            s = "shared" if f["stream"] == "shared" else "indep."
            add(
                f"spread vs k>={f['k_from']} ({q}, {s}, {L}x{H})",
                f,
                "<=0 (open: bounded in K?)",
                0.0,
                _bounded(f["ci"]),
            )
    for opt, fs in sorted((fits.get("fluctuation_vs_d") or {}).items()):
        least = min((f["eps"] for f in fs if f["eps"] is not None), default=None)
        for f in fs:
            if f["quantity"] != "state":
                continue
            asymptotic = f["d_from"] == max(g["d_from"] for g in fs if g["eps"] == f["eps"])
            if not asymptotic and f["eps"] != least:
                continue  # every d: at the least eps only; d >= min_d: at every eps
            smallest = min(g["d_from"] for g in fs)
            where = f">={f['d_from']}" if f["d_from"] > smallest else ""
            if opt == "init":
                add("spread at k=0 vs d", f, "none (the init's)", None, trend(f["ci"]))
                continue
            q = f"spread at K vs d{where} ({NAMES.get(opt, opt)}, {f['eps']:.0e})"
            if opt.startswith("blockwise"):
                # Lemma 6 bounds the constant: a spread that falls with d is
                # within it; one that grows is not
                add(q, f, "<=0 (Lemma 6: d-free bound)", 0.0, _bounded(f["ci"]))
            else:
                add(q, f, "none (may grow)", None, trend(f["ci"]))
    return rows
