"""Gradients of the continuous limit: closed-form adjoint ODE vs differentiating
through the Diffrax solver (RecursiveCheckpointAdjoint, BacksolveAdjoint).

Reports, for each method at the same tolerance: median wall time (after
compilation), relative error of the gradient against a tight-tolerance
reference, and the compiled program's temporary memory (XLA memory analysis).

    python -m benchmarks.limit_adjoints [--quick]
"""

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mfattn  # noqa: E402

ADJOINTS = {
    "closed_form": mfattn.ClosedFormAdjoint(),
    "recursive_checkpoint": diffrax.RecursiveCheckpointAdjoint(),
    "backsolve": diffrax.BacksolveAdjoint(),
}


def problem(n, d, k, M, J, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    pts = jax.random.normal(keys[0], (n, d))
    grid = mfattn.AttentionParams.xavier_uniform(keys[1], J + 1, M, d, k)
    target = mfattn.EmpiricalMeasure(jax.random.normal(keys[2], (8, d)))
    return grid, mfattn.EmpiricalMeasure(pts), mfattn.MMDLoss(target, 1.0)


def rel(a, b):
    num = max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    den = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
    return num / den


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/limit_adjoints.json")
    args = ap.parse_args(argv)
    sizes = [(16, 4, 2, 8, 4)] if args.quick else [(16, 4, 2, 8, 4), (64, 8, 4, 16, 8)]
    rows = []
    for n, d, k, M, J in sizes:
        grid, measure, loss = problem(n, d, k, M, J)
        beta = 1.0
        _, ref = mfattn.limit_gradient(grid, measure, loss, beta, rtol=1e-11, atol=1e-12)
        for (name, adjoint), tol in [(nm, t) for t in (1e-6, 1e-8) for nm in ADJOINTS.items()]:

            def grad_fn(g, a=adjoint, ms=measure, lo=loss, tol=tol):
                return mfattn.limit_gradient(g, ms, lo, 1.0, adjoint=a, rtol=tol, atol=tol)

            f = jax.jit(grad_fn)
            try:  # XLA's own accounting of the compiled program's scratch memory
                mem = f.lower(grid).compile().memory_analysis().temp_size_in_bytes
            except Exception:  # backend dependent
                mem = None
            out = jax.block_until_ready(f(grid))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = jax.block_until_ready(f(grid))
                times.append(time.perf_counter() - t0)
            err = rel(out[1], ref)
            row = dict(
                n=n,
                d=d,
                k=k,
                M=M,
                J=J,
                tol=tol,
                method=name,
                median_s=statistics.median(times),
                rel_err=err,
                temp_bytes=mem,
            )
            rows.append(row)
            print(
                f"n={n:4d} d={d} M={M:3d} J={J:2d}  {name:22s} "
                f"{row['median_s'] * 1e3:9.1f} ms  rel.err {err:8.1e}  "
                f"temp {0 if mem is None else mem / 2**20:8.1f} MiB",
                flush=True,
            )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"machine": platform.platform(), "cpus": jax.device_count(), "rows": rows}, indent=1
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
