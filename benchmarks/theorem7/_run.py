"""Running the study: one file per condition, written atomically, so that a
stopped run resumes where it stopped; the summary JSON and figures at the end."""

import hashlib
import json
import pathlib
import time
import zlib

import jax

import mfattn
from benchmarks.scaling._run import write_json  # atomic, synced

from . import _adjoint_distance, _global, _lemma6, _parts, _trained_bias
from ._config import PRESETS, Theorem7Config
from ._plots import plot_all
from ._summary import summarize

# what each part's conditions depend on: a condition's file holds the hash of
# these fields of the configuration that wrote it (the grids only choose which
# conditions run, and each file is named by its own coordinates)
COMMON_FIELDS = ("seed", "dim", "head_dim", "clusters", "beta")
PART_FIELDS = {
    "fluctuation": COMMON_FIELDS
    + ("tokens", "eta", "weight_decay", "batch", "probes", "test_points", "inits", "steps"),
    "bias": COMMON_FIELDS
    + (
        "tokens",
        "probes",
        "test_points",
        "bias_H",
        "bias_inits",
        "reference_M",
        "reference_rtol",
        "splits",
        "boots",
    ),
    "trained": COMMON_FIELDS
    + (
        "tokens",
        "eta",
        "weight_decay",
        "batch",
        "probes",
        "test_points",
        "steps",
        "bias_H",
        "trained_bias_inits",
        "trained_bias_groups",
    ),
    "adjoint": COMMON_FIELDS
    + ("tokens", "eta", "weight_decay", "batch", "probes", "test_points", "inits", "steps")
    + ("adjoint_L", "adjoint_distances", "adjoint_points"),
    "uniform": COMMON_FIELDS
    + (
        "uniform_L",
        "uniform_H",
        "uniform_inits",
        "ascent_steps",
        "ascent_restarts",
        "ascent_step_size",
    ),
    "global": COMMON_FIELDS
    + (
        "tokens",
        "eta",
        "weight_decay",
        "batch",
        "probes",
        "test_points",
        "global_inits",
        "global_checkpoints",
        "global_decay",
    ),
    "lemma6": ("seed", "clusters", "beta")
    + (
        "tokens",
        "weight_decay",
        "batch",
        "probes",
        "test_points",
        "lemma6_head_dim",
        "lemma6_L",
        "lemma6_H",
        "lemma6_inits",
        "lemma6_steps",
        "lemma6_eta_entry",
    ),
}


def _fingerprint(cfg: Theorem7Config, part: str) -> str:
    """A hash of every field that changes what a condition of `part` computes."""
    d = cfg.to_dict()
    fields = {k: d[k] for k in PART_FIELDS[part]}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class Conditions:
    """The folder of per-condition files of one preset: each file holds the
    configuration's fingerprint, and a file written by another configuration
    is an error (naming the file), never silently reused."""

    def __init__(
        self, folder: pathlib.Path, cfg: Theorem7Config, resume: bool = True, budget=None, mine=None
    ):
        self.folder, self.cfg, self.mine = folder, cfg, mine
        self.deadline = time.perf_counter() + (float("inf") if budget is None else budget)
        self.skipped: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)
        if not resume:
            for f in folder.glob("*.json"):
                f.unlink()

    def get(self, name: str, compute, log):
        """The record `name`: read back, or computed and written; `None` when
        it is not there and the budget is spent."""
        path = self.folder / f"{name}.json"
        fp = _fingerprint(self.cfg, name.split("-")[0])
        if path.exists():
            rec = json.loads(path.read_text())
            if rec.get("fingerprint") != fp:
                raise RuntimeError(
                    f"{path} was written by another configuration of the study "
                    f"(fingerprint {rec.get('fingerprint')}, this one {fp}): "
                    "move it away or run with --no-resume"
                )
            log(f"  {name}: done before")
            return rec["record"]
        if self.mine is not None and not self.mine(name):  # another process's
            return None
        if time.perf_counter() > self.deadline:
            self.skipped.append(name)
            return None
        t0 = time.perf_counter()
        rec = compute()
        rec["seconds"] = time.perf_counter() - t0
        write_json(path, {"fingerprint": fp, "record": rec})
        return rec


def owner(name: str, processes: int) -> int:
    """The process that computes the condition `name` when the study runs as
    `processes` processes: a hash of the name, the same on every process and
    every run, whatever order the conditions are met in."""
    return zlib.crc32(name.encode()) % processes


def run(preset, out: pathlib.Path, progress: bool = True, resume: bool = True, budget=None) -> dict:
    """Run (or resume) the preset `preset` (a name of `PRESETS` or a
    `Theorem7Config`); write the study JSON `out`, the
    per-condition files in the folder next to it (`out` without `.json`), and
    the PNGs `out` with `_fluctuation.png`, `_bias.png`, `_bias_trained.png`,
    `_uniform.png`, `_global.png`, `_lemma6.png`, `_adjoint.png`,
    `_adjoint_heads.png`.
    With `budget` (seconds), no condition starts after it is spent: the JSON
    then summarises the conditions done, and lists the others in `skipped`.

    Under multi-controller JAX (`jax.distributed.initialize()` first, every
    process with the same arguments and a folder they all see) each process
    computes the conditions it owns (`owner`), in two passes (the bias
    points need the reference, which one process computes in the first); then
    process 0 alone reads every condition back and writes the JSON and PNGs,
    and every process returns that JSON."""
    if isinstance(preset, Theorem7Config):
        cfg = preset
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise ValueError(f"`preset` must be one of {sorted(PRESETS)} or a Theorem7Config")
    count, me = jax.process_count(), jax.process_index()
    if count == 1:
        return _run(cfg, out, progress, resume, budget)
    folder = out.with_suffix("")
    if not resume and me == 0:
        Conditions(folder, cfg, resume=False)  # clears the folder once
    mfattn.barrier("theorem7: folder")
    for n in (1, 2):
        _run(cfg, out, progress, True, budget, mine=lambda name: owner(name, count) == me)
        mfattn.barrier(f"theorem7: pass {n}")
    data = _run(cfg, out, progress, True, budget) if me == 0 else None
    mfattn.barrier("theorem7: summary")
    return data if data is not None else json.loads(out.read_text())


def _trained_row(conds, cfg, log, H, depths, name):
    """Part 2 after training at `H` heads: the records at `depths` (condition
    names from the pattern `name`), with the distance of the means of
    successive depths logged."""
    row = []
    for L in depths:
        rec = conds.get(
            name.format(L=L, H=H),
            lambda L=L: _trained_bias.trained_bias_point(cfg, L, H),
            log,
        )
        if rec is None:
            continue
        if row:
            k0, kK = (_trained_bias.distance(row[-1][k], rec[k]) for k in ("k0", "kK"))
            log(
                f"  H={H}, L={row[-1]['L']} to {L}: distance of the means {k0:.4g} at k=0, "
                f"{kK:.4g} at k={cfg.steps} ({rec['seconds']:.1f} s)"
            )
        row.append(rec)
    return row


def _run(cfg, out, progress, resume, budget, mine=None):
    """One pass over the study: every condition read back or computed (with
    `mine`, only the ones it accepts, and nothing summarised)."""
    if not progress:
        log = lambda *a, **k: None
    elif jax.process_count() > 1:
        log = lambda *a, **k: print(f"[p{jax.process_index()}]", *a, **k, flush=True)
    else:
        log = print
    t0 = time.perf_counter()
    conds = Conditions(out.with_suffix(""), cfg, resume, budget, mine)
    records = {"device": str(jax.devices()[0].device_kind)}
    grid = sorted(((L, H) for L in cfg.L for H in cfg.H), key=lambda g: (g[0] * g[1], g))
    log(f"[1/7] fluctuation among {cfg.inits} initialisations, {len(grid)} (L, H)")
    fl = []
    for i, (L, H) in enumerate(grid):
        rec = conds.get(
            f"fluctuation-L{L}-H{H}", lambda L=L, H=H: _parts.fluctuation_point(cfg, L, H), log
        )
        if rec is None:
            continue
        fl.append(rec)
        log(
            f"  [{i + 1}/{len(grid)}] L={L} H={H}: k=0 "
            f"{sum(rec['k0']['total']) / rec['inits']:.4g}, k={cfg.steps} "
            f"{sum(rec['kK']['total']) / rec['inits']:.4g} ({rec['seconds']:.1f} s)"
        )
    records["fluctuation"] = fl
    log(f"[2/7] bias of the mean of {cfg.bias_inits} initialisations at k = 0")
    ref = None
    if cfg.bias_L:
        ref = conds.get("bias-reference", lambda: _parts.bias_reference(cfg), log)
    bias = []
    if ref is not None:
        log(
            f"  reference M = {4 * ref['M']}: its distance to M = {ref['M']} is "
            f"{ref['M_vs_4M']:.3g}"
        )
        records["bias_reference"] = ref
    if ref is None:
        conds.skipped.extend(f"bias-L{L}" for L in cfg.bias_L)
    for L in cfg.bias_L if ref is not None else ():
        rec = conds.get(f"bias-L{L}", lambda L=L: _parts.bias_point(cfg, L, ref), log)
        if rec is None:
            continue
        bias.append(rec)
        log(
            f"  L={L}: split-half {rec['value']:.4g} (plain {rec['plain']:.4g}, noise of the "
            f"mean {rec['noise_of_mean']:.3g}; {rec['seconds']:.1f} s)"
        )
    records["bias"] = bias
    log(
        f"[3/7] bias after {cfg.steps} steps: the means of {cfg.trained_bias_inits} "
        "initialisations at successive depths"
    )
    tb = _trained_row(conds, cfg, log, cfg.bias_H, cfg.trained_bias_L, "trained-L{L}")
    records["trained_bias"] = tb
    more = [
        rec
        for H in cfg.trained_bias_more_H
        for rec in _trained_row(conds, cfg, log, H, cfg.trained_bias_more_L, "trained-L{L}-H{H}")
    ]
    records["trained_bias_more"] = more
    log("[4/7] sup of the fluctuation over token sets")
    uni = []
    for causal in cfg.causal:
        for n in cfg.uniform_n:
            name = f"uniform-n{n}-{'causal' if causal else 'unmasked'}"
            rec = conds.get(
                name, lambda n=n, causal=causal: _parts.uniform_point(cfg, n, causal), log
            )
            if rec is None:
                continue
            uni.append(rec)
            log(
                f"  n={n} {'causal' if causal else 'unmasked'}: {rec['start']:.4g} -> "
                f"{rec['value']:.4g} (last quarter x{rec['last_quarter_gain']:.3f}; "
                f"{rec['seconds']:.1f} s)"
            )
    records["uniform"] = uni
    log(
        f"[5/7] spread along training, {cfg.global_inits} initialisations, shared and "
        "independent streams"
    )
    glo = []
    for L, H in sorted(cfg.global_LH, key=lambda g: (g[0] * g[1], g)):
        for stream in _global.STREAMS:
            rec = conds.get(
                f"global-L{L}-H{H}-{stream}",
                lambda L=L, H=H, stream=stream: _global.global_point(cfg, L, H, stream),
                log,
            )
            if rec is None:
                continue
            glo.append(rec)
            state = [sum(v) / len(v) for v in rec["per_init"]["state"]]
            log(
                f"  L={L} H={H} {stream}: state spread "
                + ", ".join(f"k={k} {v:.3g}" for k, v in zip(rec["checkpoints"], state))
                + f" ({rec['seconds']:.1f} s)"
            )
    records["global"] = glo
    log(f"[6/7] spread after {cfg.lemma6_steps} steps against d, per optimiser and eps")
    l6 = []
    for eps in cfg.lemma6_eps:  # the first eps at every d first: a stopped run has its fit
        for d in cfg.lemma6_d:
            for opt in cfg.lemma6_optimizers:
                name = f"lemma6-d{d}-{opt}-eps{_lemma6.eps_name(eps)}"
                rec = conds.get(
                    name,
                    lambda d=d, opt=opt, eps=eps: _lemma6.lemma6_point(cfg, d, opt, eps),
                    log,
                )
                if rec is None:
                    continue
                l6.append(rec)
                log(
                    f"  d={d} {opt} eps={eps:g}: state spread "
                    f"{sum(rec['k0']['state']) / rec['inits']:.3g} -> "
                    f"{sum(rec['kK']['state']) / rec['inits']:.3g}, loss "
                    f"{rec['train_loss_first']:.3g} -> {rec['train_loss_last']:.3g} "
                    f"({rec['seconds']:.1f} s)"
                )
    records["lemma6"] = l6
    log(f"[7/7] the adjoint against the distance from the tokens, L = {cfg.adjoint_L}")
    adj = []
    for H in cfg.adjoint_H:
        rec = conds.get(
            f"adjoint-L{cfg.adjoint_L}-H{H}",
            lambda H=H: _adjoint_distance.adjoint_point(cfg, H),
            log,
        )
        if rec is None:
            continue
        adj.append(rec)
        spread = [sum(v) / len(v) for v in rec["kK"]["p_spread"]]
        log(
            f"  H={H}: p spread after {cfg.steps} steps by distance "
            + ", ".join(f"{d:g}: {v:.3g}" for d, v in zip(rec["distances"], spread))
            + f" ({rec['seconds']:.1f} s)"
        )
    records["adjoint"] = adj
    records["wall_seconds"] = sum(
        r.get("seconds", 0.0)
        for r in [*fl, *([ref] if ref else []), *bias, *tb, *more, *uni, *glo, *l6, *adj]
    )
    if mine is not None:
        return None
    data = summarize(cfg, records)
    data["complete"] = not conds.skipped
    data["skipped"] = conds.skipped
    data["wall_seconds_this_run"] = time.perf_counter() - t0
    write_json(out, data)
    plot_all(data, out)
    return data
