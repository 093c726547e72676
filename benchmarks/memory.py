"""Memory of one discrete solve (forward + closed-form adjoint + gradient map)
with the dense and the chunked attention kernels.

    python -m benchmarks.memory [--quick]

Reports XLA's accounting of the compiled program's temporary memory (no run
needed, so the dense path is reported even where it could not run) and, for
the sizes that fit, the median wall time of a run after compilation.
"""

import argparse
import statistics
import time

import jax

import mfattn


def solve(params, pts, chunk):
    m = mfattn.EmpiricalMeasure(pts)
    kernel = mfattn.DenseKernel() if chunk is None else mfattn.ChunkedKernel(chunk)
    sol = mfattn.solve_discrete(params, m, mfattn.DenoisingLoss(pts), 1.0, kernel=kernel)
    return sol.ps[0], sol.grads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    L, H, d, k = 8, 16, 16, 4
    sizes = [1024, 4096] if args.quick else [1024, 4096, 65536]
    run_up_to = 4096
    for n in sizes:
        params = mfattn.AttentionParams.xavier_uniform(jax.random.key(0), L, H, d, k)
        pts = jax.random.normal(jax.random.key(1), (n, d))
        for chunk in (None, 256):
            f = jax.jit(solve, static_argnums=2)
            compiled = f.lower(params, pts, chunk).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
            line = f"n={n:6d} L={L} H={H} d={d} k={k} chunk={str(chunk):>4s}  temp {temp:10.1f} MiB"
            if n <= run_up_to:
                jax.block_until_ready(compiled(params, pts))
                ts = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(params, pts))
                    ts.append(time.perf_counter() - t0)
                line += f"  median {statistics.median(ts):7.3f} s"
            print(line, flush=True)


if __name__ == "__main__":
    main()
