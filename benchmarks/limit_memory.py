"""Memory and time of the limit's forward solve, closed-form adjoint and
gradient map (`mfattn.solve_limit`): the dense-output route against the
checkpointed one (`checkpoints=`).

    python -m benchmarks.limit_memory [--quick]

1. Memory against `max_steps`: XLA's accounting of the compiled program's
   temporary memory (`compiled.memory_analysis().temp_size_in_bytes`; compile
   only, so sizes that could not run are reported too), for both routes of
   `solve_limit` and of `limit_gradient`. At the default `max_steps` both
   routes are also run once: their steps, their wall time and how far apart
   their gradients are.
2. `n = 65 536` tokens, the checkpointed route: the median wall time of
   forward + adjoint + gradient map after compilation (`jax.block_until_ready`),
   and the dense route's memory at that size (compile only).

Writes `benchmarks/results/limit_memory[_quick].json`.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mfattn  # noqa: E402

CHECKPOINTS = 16
SEGMENT_MAX_STEPS = 64


def cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def problem(n, d, k, M, J, dtype=jnp.float64, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    pts = jax.random.normal(keys[0], (n, d), dtype)
    grid = mfattn.AttentionParams.xavier_uniform(keys[1], J + 1, M, d, k, dtype=dtype)
    grid = jax.tree.map(lambda a: 2.0 * a, grid)  # a field that moves the tokens
    # a loss of O(n d) memory (an MMD loss holds an n x n Gram matrix)
    target = jax.random.normal(keys[2], (n, d), dtype)
    return grid, mfattn.EmpiricalMeasure(pts), mfattn.DenoisingLoss(target)


def program(kind, measure, loss, checkpoints, segment_max_steps=SEGMENT_MAX_STEPS, **kw):
    """`grid -> (loss, gradient, stats)`: `solve_limit`'s gradient map at the
    nodes, or `limit_gradient`'s integrated gradient."""
    seg = dict(checkpoints=checkpoints, segment_max_steps=segment_max_steps)
    if kind == "solve_limit":

        def f(grid):
            sol = mfattn.solve_limit(grid, measure, loss, 1.0, **seg, **kw)
            return sol.loss, sol.grads, sol.stats

    else:
        adjoint = mfattn.ClosedFormAdjoint(**seg)

        def f(grid):
            value, g = mfattn.limit_gradient(grid, measure, loss, 1.0, adjoint=adjoint, **kw)
            return value, g, {}

    return jax.jit(f)


def rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    scale = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb)) / scale


def timed(f, x, repeats):
    out = jax.block_until_ready(f(x))  # after compilation: the first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return out, times


def memory_sweep(args):
    n, d, k, M, J = (256, 4, 2, 4, 4) if args.quick else (512, 8, 2, 4, 4)
    steps = [256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384]
    grid, measure, loss = problem(n, d, k, M, J)
    config = dict(n=n, d=d, k=k, M=M, J=J, beta=1.0, dtype="float64", rtol=1e-6, atol=1e-8)
    print(f"memory: n={n} d={d} k={k} M={M} J={J}, Tsit5 rtol=1e-6 atol=1e-8", flush=True)
    rows, runs = [], []
    for kind in ("solve_limit", "limit_gradient"):
        outs = {}
        for max_steps in steps if kind == "solve_limit" else [4096]:
            for checkpoints in (None, CHECKPOINTS):
                f = program(kind, measure, loss, checkpoints, max_steps=max_steps)
                compiled = f.lower(grid).compile()
                temp = compiled.memory_analysis().temp_size_in_bytes
                route = "dense" if checkpoints is None else f"checkpoints={checkpoints}"
                rows.append(dict(function=kind, route=route, max_steps=max_steps, temp_bytes=temp))
                print(
                    f"  {kind:14s} {route:15s} max_steps={max_steps:6d}  "
                    f"temp {temp / 2**20:10.1f} MiB",
                    flush=True,
                )
                if max_steps == 4096:  # the default: run both routes
                    out, times = timed(compiled, grid, args.repeats)
                    outs[route] = out
                    runs.append(
                        dict(
                            function=kind,
                            route=route,
                            max_steps=max_steps,
                            median_s=statistics.median(times),
                            times_s=times,
                            stats={k: int(v) for k, v in out[2].items()},
                        )
                    )
                    print(
                        f"    run: median {statistics.median(times):.3f} s  {runs[-1]['stats']}",
                        flush=True,
                    )
        (dense, ckpt) = outs.values()
        runs[-1]["rel_diff_gradient_to_dense"] = rel(ckpt[1], dense[1])
        runs[-1]["abs_diff_loss_to_dense"] = abs(float(ckpt[0] - dense[0]))
        print(f"    gradients of the two routes: rel. diff {rel(ckpt[1], dense[1]):.1e}")
    return dict(config=config, temp=rows, runs=runs)


def large(args):
    """One `solve_limit` of `n` tokens: n^2 pairs per head and evaluation (a
    field evaluation took about 9 s at n = 65 536 with two heads on this
    machine), so one head, two nodes and two Euler steps."""
    n, d, k, M, J = args.n, 4, 2, 1, 1
    checkpoints = 2
    grid, measure, loss = problem(n, d, k, M, J, dtype=jnp.float32)
    kw = dict(solver=diffrax.Euler(), dt0=0.5)
    config = dict(n=n, d=d, k=k, M=M, J=J, beta=1.0, dtype="float32", solver="Euler", dt0=0.5)
    config.update(checkpoints=checkpoints, segment_max_steps=SEGMENT_MAX_STEPS)
    print(f"n={n}: d={d} k={k} M={M} J={J}, float32, Euler dt0=1/2", flush=True)
    out = {"config": config}
    for route_checkpoints in (None, checkpoints):
        f = program("solve_limit", measure, loss, route_checkpoints, **kw)
        t0 = time.perf_counter()
        compiled = f.lower(grid).compile()
        compile_s = time.perf_counter() - t0
        temp = compiled.memory_analysis().temp_size_in_bytes
        route = "dense" if route_checkpoints is None else f"checkpoints={route_checkpoints}"
        out[route] = dict(temp_bytes=temp, compile_s=compile_s)
        print(f"  {route:15s} temp {temp / 2**20:10.1f} MiB", flush=True)
    ckpt = out[f"checkpoints={checkpoints}"]
    res, times = timed(compiled, grid, args.large_repeats)
    ckpt.update(
        median_s=statistics.median(times),
        times_s=times,
        stats={k: int(v) for k, v in res[2].items()},
        finite=bool(all(jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(res[1]))),
    )
    print(f"  checkpointed run: median {ckpt['median_s']:.2f} s of {times}, {ckpt['stats']}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=None, help="tokens of the timed size")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = 4096 if args.quick else 65536
    results = dict(
        command="python -m benchmarks.limit_memory" + (" --quick" if args.quick else ""),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        cpu=cpu_model(),
        cores=os.cpu_count(),
        machine=platform.platform(),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        fused_cpu_kernel=getattr(mfattn, "fused_cpu_available", lambda: None)(),
    )
    results["memory"] = memory_sweep(args)
    results["large"] = large(args)
    out = pathlib.Path(
        args.out or f"benchmarks/results/limit_memory{'_quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
