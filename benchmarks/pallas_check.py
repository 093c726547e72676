"""The Pallas kernel on an accelerator, in one call: agreement with the dense
kernel (float32 with full-precision products, and float64; forward,
closed-form backward, `jax.grad` through the forward pass, a `solve_discrete`
with test particles, causal or not), then
one training step of the medium size of `benchmarks/speed.py`
(`B=8, n=256, d=16, k=4, L=32, H=64`, float32) with `PallasKernel`,
`DenseKernel` and `AutoKernel`, of its long size (`B=1, n=4096, L=8, H=16`)
with `PallasKernel` and `AutoKernel`, and of the medium size with other block
sizes of `PallasKernel`, each timed after a warm-up with
`jax.block_until_ready`, median of 5.

    python -m benchmarks.pallas_check OUT [--dry-run] [--budget S]

Writes `OUT/pallas_check.json` after every item (atomically: a reader sees the
last complete state), so a run stopped from outside keeps what it had. Every
item runs under its own `try`: one that fails is recorded with its error and
the next one runs. Items that would start after `--budget` seconds (default
170) are recorded as skipped. `--dry-run` runs every item at tiny sizes (on a
CPU, Pallas' interpreter), so that what would fail for a reason the CPU shows
fails there first.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import traceback

from .speed import SIZES, _data

CHECK = dict(B=2, n=96, d=8, k=4, L=3, H=4, m_test=5)
CHECK_DRY = dict(B=2, n=9, d=4, k=2, L=2, H=2, m_test=2)
STEP_DRY = dict(B=2, n=16, d=4, k=2, L=2, H=2)
STEP_LONG_DRY = dict(B=1, n=40, d=4, k=2, L=1, H=2)
# relative difference (largest entry) allowed against the dense kernel: a few
# hundred roundoffs of the dtype, amplified through the layers and the adjoint
TOLERANCE = {"float32": 1e-4, "float64": 1e-11}


class Report:
    """The JSON file, rewritten atomically after every item."""

    def __init__(self, out: pathlib.Path, budget: float):
        self.path = out / "pallas_check.json"
        self.t0 = time.perf_counter()
        self.budget = budget
        self.data = {"items": {}, "errors": []}
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self):
        return time.perf_counter() - self.t0

    def write(self):
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def item(self, name, fn, *args):
        if self.elapsed() > self.budget:
            self.data["items"][name] = {"status": "skipped", "why": "time budget spent"}
            print(f"{name}: skipped (budget)", flush=True)
            self.write()
            return None
        t0 = time.perf_counter()
        try:
            result = fn(*args)
            entry = {"status": "ok", **result}
        except Exception as e:  # recorded; the next item runs
            entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:4000]}
            entry["traceback"] = traceback.format_exc()[-4000:]
            self.data["errors"].append(name)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.data["items"][name] = entry
        summary = {k: v for k, v in entry.items() if k not in ("traceback", "times")}
        print(f"{name}: {json.dumps(summary, default=str)[:600]}", flush=True)
        self.write()
        return entry


def _rel(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _tree_rel(a, b):
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    scale = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in lb)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) / scale
        for x, y in zip(la, lb)
    )


def environment():
    import jax

    out = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    try:
        import jaxlib

        out["jaxlib"] = jaxlib.__version__
    except Exception:
        pass
    try:
        out["device_kind"] = jax.devices()[0].device_kind
    except Exception:
        pass
    return out


def _head_inputs(cfg, dtype, key):
    """Projected heads with non-uniform weights, zero-weight probe keys and
    zero-weight test queries."""
    import jax
    import jax.numpy as jnp

    H, n, k, mt = cfg["H"], cfg["n"], cfg["k"], cfg["m_test"]
    ks = jax.random.split(key, 5)
    m = n + mt
    q = 0.8 * jax.random.normal(ks[0], (H, m, k), dtype)
    kk = 0.8 * jax.random.normal(ks[1], (H, n, k), dtype)
    v = jax.random.normal(ks[2], (H, n, k), dtype)
    w = jax.random.uniform(ks[3], (n,), dtype, minval=0.2, maxval=1.0)
    w = w.at[-2:].set(0.0)
    w = w / w.sum()
    u = jnp.concatenate([w, jnp.zeros(mt, dtype)])
    c = jax.random.normal(ks[4], (H, m, k), dtype)
    kpos = jnp.arange(n)
    qpos = jnp.concatenate([kpos, jnp.full((mt,), n)])
    return q, kk, v, w, c, u, qpos, kpos


def check_heads(cfg, dtype_name, causal):
    """Forward, closed-form backward and `jax.grad` through the forward pass of
    one layer's heads, against the dense kernel."""
    import jax
    import jax.numpy as jnp

    import mfattn

    dtype = jnp.dtype(dtype_name)
    q, k, v, w, c, u, qpos, kpos = _head_inputs(cfg, dtype, jax.random.key(1))
    pallas, dense = mfattn.PallasKernel(causal=causal), mfattn.DenseKernel(causal=causal)
    beta = 2.0
    fwd = jax.jit(lambda K, *a: K.forward(*a, beta, qpos, kpos), static_argnums=0)
    o, lse = fwd(pallas, q, k, v, w)
    o_ref, lse_ref = fwd(dense, q, k, v, w)
    bwd = jax.jit(lambda K, *a: K.backward(*a, c, u, beta, qpos, kpos), static_argnums=0)
    g = bwd(pallas, q, k, v, w, o, lse)
    g_ref = bwd(dense, q, k, v, w, o_ref, lse_ref)

    def scalar(K):
        return jax.jit(
            jax.grad(
                lambda q, k, v: jnp.sum(c * jnp.sin(K.forward(q, k, v, w, beta, qpos, kpos)[0])),
                argnums=(0, 1, 2),
            )
        )(q, k, v)

    ad, ad_ref = scalar(pallas), scalar(dense)
    errs = {
        "o": _rel(o, o_ref),
        "dq": _rel(g[0], g_ref[0]),
        "dk": _rel(g[1], g_ref[1]),
        "dv": _rel(g[2], g_ref[2]),
        "grad_through_forward": _tree_rel(ad, ad_ref),
    }
    tol = TOLERANCE[dtype_name]
    return {
        "dtype": str(o.dtype),
        "rel_err": errs,
        "tolerance": tol,
        "agree": max(errs.values()) < tol,
    }


def check_solve(cfg, dtype_name, causal):
    """`solve_discrete` on a batch (vmapped) with test particles: paths,
    adjoints, gradient map, against the dense kernel."""
    import jax
    import jax.numpy as jnp

    import mfattn

    dtype = jnp.dtype(dtype_name)
    B, n, d, k, L, H, mt = (cfg[x] for x in ("B", "n", "d", "k", "L", "H", "m_test"))
    keys = jax.random.split(jax.random.key(2), 4)
    a = (6 / (d + k)) ** 0.5
    params = mfattn.AttentionParams(
        *(jax.random.uniform(kk, (L, H, d, k), dtype, -a, a) for kk in jax.random.split(keys[0], 4))
    )
    x = jax.random.normal(keys[1], (B, n, d), dtype)
    w = jax.random.uniform(keys[2], (B, n), dtype, minval=0.2, maxval=1.0)
    w = w / jnp.sum(w, axis=1, keepdims=True)
    z = jax.random.normal(keys[3], (B, mt, d), dtype)

    def run(kernel):
        def one(x, w, z):
            m = mfattn.EmpiricalMeasure(x, w)
            return mfattn.solve_discrete(
                params,
                m,
                mfattn.DenoisingLoss(0.5 * x),
                1.5,
                z,
                test_labels=0.5 * z,
                kernel=kernel,
            )

        sol = jax.jit(jax.vmap(one))(x, w, z)
        return {a: getattr(sol, a) for a in ("xs", "ps", "test_xs", "test_ps", "grads")}

    got = run(mfattn.PallasKernel(causal=causal))
    ref = run(mfattn.DenseKernel(causal=causal))
    errs = {a: _tree_rel(got[a], ref[a]) for a in got}
    tol = TOLERANCE[dtype_name]
    return {
        "dtype": str(got["xs"].dtype),
        "rel_err": errs,
        "tolerance": tol,
        "agree": max(errs.values()) < tol,
    }


def time_step(cfg, kernel_name, repeats, blocks=None):
    """One training step (forward, closed-form adjoint, gradient map, blockwise
    AdamW) of a batch, as `benchmarks/speed.py` times it."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import mfattn

    params, x, y = _data(cfg)
    if kernel_name == "pallas":
        bq, bk = blocks or (64, 64)
        kernel = mfattn.PallasKernel(block_q=bq, block_k=bk)
    elif kernel_name == "dense":
        kernel = mfattn.DenseKernel()
    else:
        kernel = mfattn.AutoKernel()
    model = mfattn.DiscreteTransformer(
        mfattn.AttentionParams(*map(jnp.asarray, params)), 1.0, kernel=kernel
    )
    opt = mfattn.blockwise_adamw(1e-2)
    state = opt.init(model.params)
    measures, losses = jax.vmap(lambda x, y: (mfattn.EmpiricalMeasure(x), mfattn.DenoisingLoss(y)))(
        jnp.asarray(x), jnp.asarray(y)
    )

    @eqx.filter_jit
    def step(model, state, measures, losses):
        sols = mfattn.batch_solve(model, measures, losses)
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), sols.grads)
        updates, state = opt.update(grads, state, model.params)
        return model.with_params(eqx.apply_updates(model.params, updates)), state, sols.loss

    box = {"m": model, "s": state}

    def run():
        box["m"], box["s"], loss = step(box["m"], box["s"], measures, losses)
        jax.block_until_ready((box["m"], loss))
        return loss

    t0 = time.perf_counter()
    loss0 = run()  # compilation
    compile_s = time.perf_counter() - t0
    run()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
    out = {
        "config": {k: cfg[k] for k in "BndkLH"},
        "kernel": repr(kernel),
        "first_call_s": compile_s,
        "times": ts,
        "median_s": statistics.median(ts),
        "first_loss": float(jnp.mean(loss0)),
    }
    if kernel_name == "auto":
        rows = cfg["H"] * cfg["n"]
        out["auto_chooses"] = repr(kernel.choose(cfg["n"], rows, 4))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for pallas_check.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (a CPU check)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds before skipping")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import jax

    rep = Report(pathlib.Path(args.out), args.budget)
    rep.data.update(
        command="python -m benchmarks.pallas_check " + " ".join(argv or sys.argv[1:]),
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        dry_run=args.dry_run,
    )
    rep.item("environment", environment)

    # correctness (x64 on: both dtypes; full-precision float32 products, so
    # that the dense reference does not round its inputs to TF32 on a GPU)
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    check = CHECK_DRY if args.dry_run else CHECK
    for dtype in ("float32", "float64"):
        for causal in (False, True):
            tag = f"{dtype}-{'causal' if causal else 'full'}"
            rep.item(f"heads-{tag}", check_heads, check, dtype, causal)
            rep.item(f"solve-{tag}", check_solve, check, dtype, causal)

    # timings, float32 as benchmarks/speed.py (x64 off, JAX's default)
    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_default_matmul_precision", None)
    step = STEP_DRY if args.dry_run else SIZES["medium"]
    repeats = 2 if args.dry_run else args.repeats
    for name in ("dense", "auto", "pallas"):
        rep.item(f"step-{name}", time_step, step, name, repeats)
    # one long sequence (B=1, n=4096, L=8, H=16), if the budget allows
    long = STEP_LONG_DRY if args.dry_run else SIZES["long"]
    for name in ("pallas", "auto"):
        rep.item(f"long-step-{name}", time_step, long, name, repeats)
    for blocks in ((32, 32), (128, 64), (64, 128)):
        name = f"step-pallas-{blocks[0]}x{blocks[1]}"
        rep.item(name, time_step, step, "pallas", repeats, blocks)

    items = rep.data["items"]
    medians = {k: v["median_s"] for k, v in items.items() if "median_s" in v}
    if "step-dense" in medians:
        rep.data["ratio_to_dense"] = {
            k: t / medians["step-dense"] for k, t in medians.items() if k.startswith("step")
        }
    if "long-step-auto" in medians and "long-step-pallas" in medians:
        rep.data["long_ratio_pallas_to_auto"] = (
            medians["long-step-pallas"] / medians["long-step-auto"]
        )
    rep.data["all_agree"] = all(
        v.get("agree", True) for k, v in items.items() if k.startswith(("heads", "solve"))
    ) and not any(
        v["status"] == "failed" for k, v in items.items() if k.startswith(("heads", "solve"))
    )
    rep.write()
    print(f"written to {rep.path} in {rep.elapsed():.0f} s; errors: {rep.data['errors']}")
    return rep.data


if __name__ == "__main__":
    main()
