"""mfattn against PyTorch, in the same run: one training step of the discrete
transformer at three sizes, and the limit's forward + adjoint against
torchdiffeq.

    python -m benchmarks.speed [--quick] [--repeats 5]

Every measurement runs in its own subprocess (so that its peak resident memory
is its own), after a warm-up call (compilation for JAX), timed with
`jax.block_until_ready`, median of `--repeats`. Throughput is reported as
nominal GFLOP/s and exp/s of the attention core (`14 n^2 k` flops and `2 n^2`
exponentials per head, layer and sample: forward scores and outputs, and the
backward's recomputed scores and four products), against the machine's
float32 matmul peak and `exp` throughput measured in the same run. PyTorch is
optional (`pip install -e ".[bench]"`); without it only mfattn is timed.

Results go to `benchmarks/results/speed.json`; the table in
`benchmarks/README.md` is copied from this script's output.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    "small": dict(B=8, n=64, d=16, k=4, L=8, H=16),
    "medium": dict(B=8, n=256, d=16, k=4, L=32, H=64),
    "long": dict(B=1, n=4096, d=16, k=4, L=8, H=16),
}
# the mfattn configurations timed at each size: (chunk_size, devices); chunk -1 is
# the plain call (the default kernel, mfattn.AutoKernel: the fused C++ kernel on the
# CPU), chunk -2 the default's pure-JAX rule (AutoKernel(fused=False)), chunk 0 the
# dense kernel;
# devices > 1 shards over that many host CPU devices (the batch of token sets when
# B > 1, the tokens when B = 1), i.e. the cores
VARIANTS = {
    "small": [(-1, 1), (-2, 1), (0, 1), (0, 0)],
    "medium": [(-1, 1), (-2, 1), (0, 1), (128, 1), (128, 0)],
    "long": [(-1, 1), (-2, 1), (64, 1), (64, 0)],
}
LIMIT = dict(n=64, d=8, k=4, J=8, M=32, rtol=1e-6, atol=1e-8, beta=1.0)


def _cpu_model() -> str:
    """The CPU's model name and widest vector extension, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line
    except OSError:
        pass
    for ext in ("avx512f", "avx2", "neon", "sse4_2"):
        if f" {ext}" in flags:
            return f"{model} ({ext})"
    return model


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(f, repeats):
    f()  # warm-up (compilation)
    f()  # and again: a step whose outputs come back with another sharding recompiles once
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return ts


def _data(cfg, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    B, n, d, k, L, H = (cfg[x] for x in "BndkLH")
    a = np.sqrt(6 / (d + k))
    params = [rng.uniform(-a, a, (L, H, d, k)).astype(np.float32) for _ in range(4)]
    x = rng.standard_normal((B, n, d)).astype(np.float32)
    y = x + 0.3 * rng.standard_normal((B, n, d)).astype(np.float32)
    return params, x, y


def worker_step(framework, size, repeats, chunk=0, devices=1):
    cfg = dict(SIZES[size])
    cfg["chunk"] = chunk
    params, x, y = _data(cfg)
    rss0 = _rss_mib()
    if framework == "torch":
        import torch

        from .torch_reference import TorchStep

        torch.set_num_threads(os.cpu_count())
        step = TorchStep(params, 1.0)
        xt, yt = torch.tensor(x), torch.tensor(y)
        ts = _time(lambda: step(xt, yt), repeats)
        label = "torch SDPA eager"
    else:
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        from jax.sharding import AxisType, NamedSharding, PartitionSpec

        import mfattn

        mesh = None  # token sharding inside every attention call (B = 1)
        x, y = jnp.asarray(x), jnp.asarray(y)
        if devices > 1:
            assert jax.device_count() == devices, jax.devices()
            axis = "tokens" if cfg["B"] == 1 else "batch"
            devs = jax.make_mesh((devices,), (axis,), axis_types=(AxisType.Auto,))
            if axis == "tokens":
                mesh = devs
            else:  # data parallel: the token sets split over the devices
                x, y = (jax.device_put(a, NamedSharding(devs, PartitionSpec(axis))) for a in (x, y))
        if chunk == -1:
            kernel = mfattn.AutoKernel()
        elif chunk == -2:
            kernel = mfattn.AutoKernel(fused=False)
        elif chunk == 0:
            kernel = mfattn.DenseKernel()
        else:
            kernel = mfattn.ChunkedKernel(chunk)
        model = mfattn.DiscreteTransformer(
            mfattn.AttentionParams(*map(jnp.asarray, params)), 1.0, mesh=mesh, kernel=kernel
        )
        opt = mfattn.blockwise_adamw(1e-2)
        state = opt.init(model.params)
        measures, losses = jax.vmap(
            lambda x, y: (mfattn.EmpiricalMeasure(x), mfattn.DenoisingLoss(y))
        )(x, y)

        @eqx.filter_jit
        def step(model, state, measures, losses):
            sols = mfattn.batch_solve(model, measures, losses)
            grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), sols.grads)
            updates, state = opt.update(grads, state, model.params)
            return model.with_params(eqx.apply_updates(model.params, updates)), state

        box = {"m": model, "s": state}

        def run():
            box["m"], box["s"] = step(box["m"], box["s"], measures, losses)
            jax.block_until_ready(box["m"])

        ts = _time(run, repeats)
        label = "mfattn (" + {-1: "default", -2: "pure JAX", 0: "dense"}.get(
            chunk, f"chunk {chunk}"
        )
        label += f", {devices} devices" if devices > 1 else ""
        label += ", checks off)" if os.environ.get("MFATTN_CHECKS") == "0" else ")"
    return {
        "label": label,
        "times": ts,
        "median": statistics.median(ts),
        "peak_mib": _rss_mib() - rss0,
    }


def worker_limit(framework, repeats):
    import numpy as np

    c = LIMIT
    rng = np.random.default_rng(0)
    a = np.sqrt(6 / (c["d"] + c["k"]))
    grid = [rng.uniform(-a, a, (c["J"] + 1, c["M"], c["d"], c["k"])) for _ in range(4)]
    x = rng.standard_normal((c["n"], c["d"]))
    y = x + 0.3 * rng.standard_normal((c["n"], c["d"]))
    rss0 = _rss_mib()
    if framework == "torch":
        import torch

        from .torch_reference import TorchLimit

        torch.set_num_threads(os.cpu_count())
        lim = TorchLimit(grid, c["beta"], c["rtol"], c["atol"])
        xt, yt = torch.tensor(x), torch.tensor(y)
        ts = _time(lambda: lim(xt, yt), repeats)
        label = "torchdiffeq odeint_adjoint (dopri5)"
    else:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        import mfattn

        params = mfattn.AttentionParams(*map(jnp.asarray, grid))
        measure = mfattn.EmpiricalMeasure(jnp.asarray(x))
        loss = mfattn.DenoisingLoss(jnp.asarray(y))

        def run():
            jax.block_until_ready(
                mfattn.limit_gradient(
                    params, measure, loss, c["beta"], rtol=c["rtol"], atol=c["atol"]
                )
            )

        ts = _time(run, repeats)
        label = "mfattn limit_gradient (Tsit5, closed-form adjoint)"
    return {
        "label": label,
        "times": ts,
        "median": statistics.median(ts),
        "peak_mib": _rss_mib() - rss0,
    }


def worker_peak(repeats):
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    t = statistics.median(_time(lambda: jax.block_until_ready(mm(a)), repeats))
    e = jax.random.normal(jax.random.key(1), (1 << 24,), jnp.float32)
    ex = jax.jit(jnp.exp)
    te = statistics.median(_time(lambda: jax.block_until_ready(ex(e)), repeats))
    out = {"jax_matmul_gflops": 2 * 2048**3 / t / 1e9, "jax_exp_per_s": (1 << 24) / te}
    import mfattn

    if mfattn.fused_cpu_available():
        # the fused kernel's forward alone, on blocks that stay in cache: the
        # exponentials per second it reaches with its scores and products around
        # them (512 heads of 256 queries and keys, k = 4), its own ceiling
        G, n = 512, 256
        q = 0.5 * jax.random.normal(jax.random.key(2), (G, n, 4), jnp.float32)
        w = jnp.full((n,), 1.0 / n, jnp.float32)
        fw = jax.jit(lambda q: mfattn.FusedCPUKernel().forward(q, q, q, w, 1.0))
        tf = statistics.median(_time(lambda: jax.block_until_ready(fw(q)), repeats))
        out["fused_forward_exp_per_s"] = G * n * n / tf
    try:
        import torch

        torch.set_num_threads(os.cpu_count())
        at = torch.randn(2048, 2048)
        t = statistics.median(_time(lambda: at @ at, repeats))
        et = torch.randn(1 << 24)
        te = statistics.median(_time(lambda: torch.exp(et), repeats))
        out.update(torch_matmul_gflops=2 * 2048**3 / t / 1e9, torch_exp_per_s=(1 << 24) / te)
    except ImportError:
        pass
    return out


def _sub(args, devices=1, checks=True):
    cmd = [sys.executable, "-m", "benchmarks.speed", "--worker", *map(str, args)]
    env = dict(os.environ)
    if not checks:
        env["MFATTN_CHECKS"] = "0"
    if devices > 1:
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def nominal(cfg):
    B, n, k, L, H = (cfg[x] for x in "BnkLH")
    return 14 * n * n * k * B * L * H, 2 * n * n * B * L * H


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small size only, 2 repeats")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/speed.json")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), help="default: all")
    args = ap.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "step":
            fw, size, rep, *more = rest
            out = worker_step(fw, size, int(rep), *map(int, more))
        elif kind == "limit":
            out = worker_limit(rest[0], int(rest[1]))
        else:
            out = worker_peak(int(rest[0]))
        print(json.dumps(out))
        return out
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        print("PyTorch is not installed (pip install -e '.[bench]'): timing mfattn only")
        have_torch = False
    repeats = 2 if args.quick else args.repeats
    sizes = args.sizes or (["small"] if args.quick else list(SIZES))
    print(f"load average before: {os.getloadavg()}  (time only on an idle machine)")
    peak = _sub(["peak", repeats])
    print(
        f"machine: JAX f32 matmul {peak['jax_matmul_gflops']:.1f} GFLOP/s, exp "
        f"{peak['jax_exp_per_s'] / 1e9:.2f} G/s"
        + (
            f"; fused kernel forward alone {peak['fused_forward_exp_per_s'] / 1e9:.2f} Gexp/s"
            if "fused_forward_exp_per_s" in peak
            else ""
        )
        + (
            f"; torch matmul {peak['torch_matmul_gflops']:.1f} GFLOP/s, exp "
            f"{peak['torch_exp_per_s'] / 1e9:.2f} G/s"
            if "torch_matmul_gflops" in peak
            else ""
        )
    )
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.speed " + " ".join(argv or sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores, {_cpu_model()}",
        "load_average_before": os.getloadavg(),
        "peak": peak,
        "steps": {},
        "limit": {},
    }
    cols = ("median s", 9), ("ratio", 6), ("GFLOP/s", 8), ("%peak", 6), ("Gexp/s", 7)
    head = f"{'size':8s} {'implementation':34s} " + " ".join(f"{c:>{w}s}" for c, w in cols)
    head += f" {'peak MiB':>9s}"
    print(head)
    for size in sizes:
        cfg = SIZES[size]
        flops, exps = nominal(cfg)
        rows = {}
        for chunk, devices in VARIANTS[size]:
            devices = devices or os.cpu_count()
            name = f"mfattn-chunk{chunk}-dev{devices}"
            if name not in rows:
                rows[name] = _sub(["step", "jax", size, repeats, chunk, devices], devices)
        if size == "medium":  # the cost of the value checks (mfattn.set_checks), paired
            rows["mfattn-default-checks-off"] = _sub(
                ["step", "jax", size, repeats, -1, 1], checks=False
            )
        if have_torch:
            rows["torch"] = _sub(["step", "torch", size, repeats])
        base = rows["torch"]["median"] if have_torch else min(r["median"] for r in rows.values())
        for name, r in rows.items():
            r.update(
                ratio=r["median"] / base,
                gflops=flops / r["median"] / 1e9,
                exp_per_s=exps / r["median"],
                config=cfg,
            )
            pk = (
                peak["jax_matmul_gflops"]
                if name.startswith("mfattn")
                else peak.get("torch_matmul_gflops", float("nan"))
            )
            print(
                f"{size:8s} {r['label']:34s} {r['median']:9.3f} {r['ratio']:6.2f} "
                f"{r['gflops']:8.1f} {100 * r['gflops'] / pk:5.1f}% "
                f"{r['exp_per_s'] / 1e9:7.2f} {r['peak_mib']:9.0f}",
                flush=True,
            )
        results["steps"][size] = rows
    if not args.quick:
        rows = {"mfattn": _sub(["limit", "jax", repeats])}
        if have_torch:
            rows["torch"] = _sub(["limit", "torch", repeats])
        base = rows.get("torch", rows["mfattn"])["median"]
        for r in rows.values():
            r["ratio"] = r["median"] / base
            print(
                f"{'limit':8s} {r['label'][:34]:34s} {r['median']:9.3f} {r['ratio']:6.2f} "
                f"{'':8s} {'':6s} {'':7s} {r['peak_mib']:9.0f}",
                flush=True,
            )
        results["limit"] = {"config": LIMIT, **rows}
    results["load_average_after"] = os.getloadavg()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"written to {out}\n")
    print(markdown(results))
    return results


def markdown(results) -> str:
    """The tables of `benchmarks/README.md`, from a results file: every row's
    median, the range of its repeats, the ratio to PyTorch's median, nominal
    throughput, and the exponentials per second as a share of the fused
    kernel's own forward rate measured in the same run."""
    peak = results["peak"]
    ceiling = peak.get("fused_forward_exp_per_s")
    lines = [
        "| size | implementation | median | range of repeats | ratio to torch "
        "| GFLOP/s | Gexp/s | % of fused forward exp/s | peak MiB |",
        "| --- | --- | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for size, rows in results["steps"].items():
        cfg = SIZES[size]
        first = True
        for r in rows.values():
            head = f"{size} `B={cfg['B']}, n={cfg['n']}, L={cfg['L']}, H={cfg['H']}`"
            share = f"{100 * r['exp_per_s'] / ceiling:.0f} %" if ceiling else "n/a"
            lines.append(
                f"| {head if first else ''} | {r['label']} | {r['median']:.3g} s "
                f"| {min(r['times']):.3g}-{max(r['times']):.3g} s | {r['ratio']:.2f} "
                f"| {r['gflops']:.1f} | {r['exp_per_s'] / 1e9:.2f} | {share} "
                f"| {r['peak_mib']:.0f} |"
            )
            first = False
    limit = {k: v for k, v in results.get("limit", {}).items() if k != "config"}
    if limit:
        lines += ["", "| limit | median | range of repeats | ratio | peak MiB |"]
        lines.append("| --- | --: | --: | --: | --: |")
        for r in limit.values():
            lines.append(
                f"| {r['label']} | {r['median']:.3g} s | {min(r['times']):.3g}-"
                f"{max(r['times']):.3g} s | {r['ratio']:.2f} | {r['peak_mib']:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
