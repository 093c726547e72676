"""The GPU check in one call: the environment, correctness on the accelerator
against the CPU, one training step against PyTorch on the same device, the
limit against torchdiffeq, and the largest convergence study that fits.

    bash benchmarks/device_check.sh OUT [--dry-run]            # every part, under 8 min
    python -m benchmarks.device_check OUT --part NAME [--dry-run] [--budget S]

`benchmarks/device_check.sh` calls this module once per part (`env`,
`correctness`, `speed`, `limit`, `study`), each under its own `timeout`, and
then `--finish NAME RC` (which marks a part that did not end by itself) and
`--summary` (one line per part). Each part writes `OUT/<part>.json`
atomically (a reader sees the last complete state, never a part of a file)
after every item it measures, so a part stopped by its budget keeps what it
had: its `status` is then `"killed"`; a part that raised is `"failed"` with the
error, and the next part runs anyway. Items that fail on their own (a PyTorch
size that runs out of memory, say) are recorded with their error in the
item and in the part's `errors`.

`--dry-run` runs every part at tiny sizes, so that on a CPU the whole script
takes about a minute (`tests/test_device_check.py`): what would fail on the
GPU for a reason the CPU shows fails there first.
"""

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

PARTS = ("env", "correctness", "speed", "limit", "study")
"""The parts, in the order `benchmarks/device_check.sh` runs them."""

# what the GPU of the check (one NVIDIA H200) can do at best, nominal
# numbers: float32 FLOP/s without tensor cores, exponentials per
# second (the special-function units); with k = 4 the exponentials bound a step
PEAKS = {"device": "NVIDIA H200 (nominal)", "float32_flops": 67e12, "exp_per_s": 3.9e12}

# --- correctness: sizes and tolerances -----------------------------------------
CORRECTNESS_SIZES = dict(n=64, d=8, k=4, L=4, H=8, J=4, M=16, chunk=16, B=4)
CORRECTNESS_DRY = dict(n=8, d=4, k=2, L=2, H=2, J=2, M=4, chunk=4, B=2)
# (name, dtype, matmul precision, tolerance of the relative difference, why)
PRECISIONS = (
    (
        "float64",
        "float64",
        None,
        1e-10,
        "unit roundoff 1.1e-16; the devices sum in other orders and use other exp "
        "implementations, amplified through L layers, n-term sums and the adjoint: "
        "1e-10 leaves a margin of about 1e6",
    ),
    (
        "float32",
        "float32",
        None,
        5e-3,
        "float32 at the default matmul precision, which on an NVIDIA GPU since Ampere "
        "may be TF32 (10-bit mantissa, unit roundoff 4.9e-4): what users get unless "
        "they raise it",
    ),
    (
        "float32_highest",
        "float32",
        "highest",
        1e-4,
        "float32 with full-precision matmuls: unit roundoff 6e-8, a margin of about 1e3 "
        "for the same amplification as float64",
    ),
)
# the adaptive limit solve: step acceptance turns rounding differences into
# differences of the order of the solver's tolerance, so it gets its own
# tolerances, and float32 solves at tolerances float32 can meet
LIMIT_SOLVE = {"float64": (1e-8, 1e-10, 1e-6), "float32": (1e-4, 1e-6, 1e-2)}

# --- speed: sizes and variants -------------------------------------------------
# the benchmarks.speed sizes and one far longer sequence (chunked kernels only:
# the dense one's (H, n, n) scores would take 69 GB per layer)
SPEED_SIZES = {
    "small": None,  # from benchmarks.speed.SIZES
    "medium": None,
    "long": None,
    "n65536": dict(B=1, n=65536, d=16, k=4, L=2, H=4),
}
# mfattn variants per size: -1 the default kernel (mfattn.AutoKernel), 0 dense,
# c > 0 ChunkedKernel(c)
SPEED_VARIANTS = {
    "small": (-1,),
    "medium": (-1, 0),
    "long": (-1, 0, 1024),
    "n65536": (-1, 1024, 4096),
}
SPEED_DRY = {
    "small": dict(B=2, n=16, d=4, k=2, L=2, H=2),
    "long": dict(B=1, n=64, d=4, k=2, L=2, H=2),
}
SPEED_VARIANTS_DRY = {"small": (-1,), "long": (-1, 16)}

# --- limit ---------------------------------------------------------------------
LIMIT_DRY = dict(n=8, d=4, k=2, J=2, M=4, rtol=1e-6, atol=1e-8, beta=1.0)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _error(e: BaseException) -> dict:
    return {"error": repr(e), "traceback": traceback.format_exc()[-4000:]}


def write_json(path, obj) -> None:
    """Write `obj` atomically (a temporary file renamed over `path`), as the
    study writes its per-condition files (`benchmarks.scaling.write_json`)."""
    from benchmarks.scaling._run import write_json as _write

    _write(path, obj)


class PartRecord:
    """The JSON of one part, `OUT/<part>.json`, rewritten atomically after every
    change, and marked `"killed"` when the process receives SIGTERM (what
    `timeout` sends when the part's budget runs out).

    **Arguments:**

    - `out`: the output folder (created if missing).
    - `part`: the part's name.
    - `dry_run`: whether the part runs at its dry-run sizes.
    - `budget`: the part's time budget in seconds, or `None`.
    """

    def __init__(self, out, part: str, dry_run: bool = False, budget: float | None = None):
        self.out = pathlib.Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / f"{part}.json"
        self.t0 = time.monotonic()
        self.budget = budget
        self.data = {
            "part": part,
            "status": "running",
            "dry_run": dry_run,
            "started": _now(),
            "budget_s": budget,
            "elapsed_s": 0.0,
            "errors": [],
        }
        self.write()
        signal.signal(signal.SIGTERM, self._killed)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        """Seconds left of the budget (infinite without one)."""
        return float("inf") if self.budget is None else self.budget - self.elapsed()

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 3)
        write_json(self.path, self.data)

    def set(self, key, value) -> None:
        """Record `value` under `key` (a key of the part, or a path of keys) and write."""
        keys = key if isinstance(key, tuple) else (key,)
        d = self.data
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
        self.write()

    def error(self, where: str, e: BaseException) -> dict:
        """Record an item's error in the part's `errors` and return it."""
        err = dict(where=where, **_error(e))
        self.data["errors"].append(err)
        self.write()
        return err

    def finish(self, status: str = "done") -> None:
        self.data["status"] = status
        self.data["finished"] = _now()
        self.write()

    def _killed(self, signum, frame):
        self.data["status"] = "killed"
        self.data["error"] = (
            f"stopped by signal {signum} after {self.elapsed():.1f} s (the part's budget "
            f"of {self.budget} s ran out); what is above was complete"
        )
        with contextlib.suppress(Exception):
            self.write()
        os._exit(124)


def _timed(f, repeats: int, sync, max_s: float = float("inf")):
    """Median wall time of `f` after two warm-up calls (compilation, and the
    recompilation of a step whose outputs come back with another layout);
    `sync` waits for the device. At most `repeats` timed calls, fewer when
    they would take longer than `max_s`."""
    t0 = time.perf_counter()
    sync(f())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    sync(f())
    second = time.perf_counter() - t0
    n = repeats if max_s >= repeats * second else max(1, int(max_s / max(second, 1e-9)))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        sync(f())
        ts.append(time.perf_counter() - t0)
    return {"first_call_s": first, "times": ts, "median": statistics.median(ts)}


def _rel(a, b) -> float:
    """`max |a - b| / max |b|` over the leaves of two pytrees (on the host)."""
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"{len(la)} leaves against {len(lb)}")
    num = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb))
    den = max(float(np.max(np.abs(np.asarray(y)))) for y in lb)
    return num / den if den else num


def _torch(require_cuda: bool):
    """`(torch, device, note)`: `torch` is `None` (and `note` says why) when
    PyTorch is missing or, with `require_cuda`, has no CUDA device."""
    try:
        import torch
    except ImportError:
        return None, None, "skipped: torch not installed"
    if torch.cuda.is_available():
        return torch, "cuda", None
    if require_cuda:
        return None, None, "skipped: torch has no CUDA device"
    return torch, "cpu", "torch on the CPU (no CUDA device)"


# ----------------------------------------------------------------------------------
# env
# ----------------------------------------------------------------------------------


def _cmd(args) -> str | None:
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e!r}"
    return (res.stdout or res.stderr).strip()


def part_env(rec: PartRecord, dry_run: bool) -> None:
    """The machine: GPU model, driver, CUDA, the versions, the devices, the CPU."""
    import importlib.metadata

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rec.set("cpu", {"model": cpu, "cores": os.cpu_count()})
    rec.set("python", sys.version)
    rec.set("platform", platform.platform())
    versions = {}
    for pkg in (
        "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "diffrax", "equinox",
        "optax", "jaxtyping", "numpy", "torch", "torchdiffeq", "mfattn",
    ):  # fmt: skip
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    rec.set("versions", versions)
    rec.set("git_commit", _cmd(["git", "rev-parse", "HEAD"]))
    query = "name,driver_version,memory.total,compute_cap"
    rec.set(
        "nvidia_smi",
        {
            "query": _cmd(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"]),
            "header": (_cmd(["nvidia-smi"]) or "").splitlines()[:4],
        },
    )
    rec.set("environment", {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_FLAGS",
            "XLA_PYTHON_CLIENT_PREALLOCATE", "CUDA_VISIBLE_DEVICES")})  # fmt: skip
    try:
        import jax

        dev = jax.devices()
        rec.set(
            "jax",
            {
                "default_backend": jax.default_backend(),
                "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in dev],
                "platform_version": getattr(dev[0].client, "platform_version", None),
                "cpu_devices": len(jax.devices("cpu")),
            },
        )
        with contextlib.suppress(Exception):
            rec.set("jax_environment_info", jax.print_environment_info(return_string=True))
    except Exception as e:
        rec.set("jax", rec.error("jax", e))
    torch, device, note = _torch(require_cuda=False)
    if torch is None:
        rec.set("torch", note)
    else:
        info = {"version": torch.__version__, "cuda": torch.version.cuda, "device": device}
        if device == "cuda":
            info["device_name"] = torch.cuda.get_device_name(0)
            info["device_count"] = torch.cuda.device_count()
            props = torch.cuda.get_device_properties(0)
            info["memory_gib"] = props.total_memory / 2**30
        rec.set("torch", info)


# ----------------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------------


def _correctness_problem(s: dict, dtype: str):
    """The inputs of every check, drawn on the CPU in float64 from explicit keys
    and cast, so that both devices see the same numbers."""
    import jax
    import jax.numpy as jnp

    import mfattn

    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        keys = jax.random.split(jax.random.key(0), 9)
        n, d, k, H = s["n"], s["d"], s["k"], s["H"]
        pts = jax.random.normal(keys[0], (n, d), jnp.float64)
        prob = {
            "q": jax.random.normal(keys[1], (H, n, k), jnp.float64),
            "k": jax.random.normal(keys[2], (H, n, k), jnp.float64),
            "v": jax.random.normal(keys[3], (H, n, k), jnp.float64),
            "c": jax.random.normal(keys[4], (H, n, k), jnp.float64),
            "w": jnp.full((n,), 1.0 / n, jnp.float64),
            "points": pts,
            "targets": pts + 0.3 * jax.random.normal(keys[5], (n, d), jnp.float64),
            "params": mfattn.AttentionParams.xavier_uniform(keys[6], s["L"], H, d, k),
            "grid": mfattn.AttentionParams.xavier_uniform(keys[7], s["J"] + 1, s["M"], d, k),
        }
        x = jax.random.normal(keys[8], (s["B"], n, d), jnp.float64)
        noise = jax.random.normal(jax.random.fold_in(keys[8], 1), (s["B"], n, d), jnp.float64)
        prob["batch"] = jnp.stack([x, x + 0.3 * noise])  # tokens and their clean labels
        return jax.tree.map(lambda a: a.astype(dtype), prob)


def _checks(s: dict, dtype: str) -> dict:
    """`{name: f(problem) -> {output: array}}`: the computations compared."""
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import mfattn

    def kernel(kern):
        def f(p):
            o, aux = kern.forward(p["q"], p["k"], p["v"], p["w"], 1.0)
            dq, dk, dv = kern.backward(p["q"], p["k"], p["v"], p["w"], o, aux, p["c"], p["w"], 1.0)
            return {"o": o, "dq": dq, "dk": dk, "dv": dv}

        return f

    def discrete(p):
        loss = mfattn.DenoisingLoss(p["targets"])
        sol = mfattn.solve_discrete(p["params"], mfattn.EmpiricalMeasure(p["points"]), loss, 1.0)
        return {"xs": sol.xs, "ps": sol.ps, "grads": sol.grads, "loss": sol.loss}

    rtol, atol, _ = LIMIT_SOLVE[dtype]

    def limit(p):
        loss = mfattn.DenoisingLoss(p["targets"])
        measure = mfattn.EmpiricalMeasure(p["points"])
        sol = mfattn.solve_limit(p["grid"], measure, loss, 1.0, rtol=rtol, atol=atol)
        return {"xs": sol.xs, "ps": sol.ps, "grads": sol.grads, "loss": sol.loss}

    def sphere(p):  # the limit on the sphere, at the nodes: geometry and saveat
        loss = mfattn.DenoisingLoss(p["targets"])
        measure = mfattn.EmpiricalMeasure(p["points"])
        ts = jnp.linspace(0.0, 1.0, s["J"] + 1, dtype=p["points"].dtype)
        sol = mfattn.solve_limit(
            p["grid"],
            measure,
            loss,
            1.0,
            saveat=diffrax.SaveAt(ts=ts),
            geometry=mfattn.Sphere(),
            rtol=rtol,
            atol=atol,
        )
        return {"xs": sol.xs, "ps": sol.ps, "grads": sol.grads}

    opt = mfattn.blockwise_adamw(1e-2)

    def train_step(p):  # the gradient map averaged over a batch, one blockwise AdamW update
        model = mfattn.DiscreteTransformer(p["params"], 1.0)
        state = opt.init(model.params)
        x, y = p["batch"]
        measures, losses = jax.vmap(
            lambda x, y: (mfattn.EmpiricalMeasure(x), mfattn.DenoisingLoss(y))
        )(x, y)
        sols = mfattn.batch_solve(model, measures, losses)
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), sols.grads)
        updates, state = opt.update(grads, state, model.params)
        params = eqx.apply_updates(model.params, updates)
        return {"params": params, "loss": jnp.mean(sols.loss), "nu": state[0].nu}

    return {
        "kernel_dense": kernel(mfattn.DenseKernel()),
        "kernel_chunked": kernel(mfattn.ChunkedKernel(s["chunk"])),
        "solve_discrete": discrete,
        "solve_limit": limit,
        "solve_limit_sphere": sphere,
        "train_step": train_step,
    }


def part_correctness(rec: PartRecord, dry_run: bool) -> None:
    """Every check on the default device (the GPU) and on the CPU, per
    precision; the largest relative difference of each output against the
    tolerance of its precision."""
    import jax

    jax.config.update("jax_enable_x64", True)
    dev, cpu = jax.devices()[0], jax.devices("cpu")[0]
    s = CORRECTNESS_DRY if dry_run else CORRECTNESS_SIZES
    rec.set("devices", {"device": str(dev), "platform": dev.platform, "reference": str(cpu)})
    if dev.platform == "cpu":
        rec.set("note", "the default device is the CPU: it is compared with itself")
    rec.set("sizes", s)
    rec.set("tolerances", {name: {"tol": tol, "why": why} for name, _, _, tol, why in PRECISIONS})
    rec.set(
        "limit_tolerances",
        {
            dt: {"rtol": r, "atol": a, "tol": t, "why": "adaptive steps: accept/reject "
                 "decisions turn rounding into differences of the order of rtol"}
            for dt, (r, a, t) in LIMIT_SOLVE.items()
        },
    )  # fmt: skip
    results = {}
    rec.set("results", results)
    for name, dtype, precision, tol, _ in PRECISIONS:
        prob = _correctness_problem(s, dtype)
        for check, f in _checks(s, dtype).items():
            key = f"{name}/{check}"
            if dry_run and precision and check.startswith("solve_limit"):
                continue  # the precision changes nothing on a CPU: the dry run saves time
            if rec.left() < 10:
                results[key] = {"skipped": "the part's budget ran out"}
                rec.data.setdefault("skipped", []).append(key)
                rec.write()
                continue
            t0 = time.perf_counter()
            try:
                ctx = (
                    jax.default_matmul_precision(precision)
                    if precision
                    else contextlib.nullcontext()
                )
                with ctx:
                    g = jax.jit(f)
                    out_dev = jax.block_until_ready(g(jax.device_put(prob, dev)))
                    out_cpu = jax.block_until_ready(g(jax.device_put(prob, cpu)))
                got = {
                    "devices": [str(*jax.tree.leaves(o)[0].devices()) for o in (out_dev, out_cpu)],
                    "dtype": str(jax.tree.leaves(out_dev)[0].dtype),
                }
                ctol = LIMIT_SOLVE[dtype][2] if check.startswith("solve_limit") else tol
                diffs = {k: _rel(out_dev[k], out_cpu[k]) for k in out_dev}
                worst = max(diffs.values())
                finite = all(
                    bool(jax.numpy.all(jax.numpy.isfinite(a))) for a in jax.tree.leaves(out_dev)
                )
                got.update(
                    rel_diff=diffs,
                    max_rel_diff=worst,
                    tol=ctol,
                    finite=finite,
                    passed=bool(finite and worst <= ctol),
                    seconds=time.perf_counter() - t0,
                )
                if not got["passed"]:
                    rec.data["errors"].append(
                        {"where": key, "error": f"max relative difference {worst:.3g} > {ctol:g}"
                         if finite else "non-finite outputs on the device"}
                    )  # fmt: skip
                results[key] = got
            except Exception as e:
                results[key] = rec.error(key, e)
            print(
                f"correctness {key}: {results[key].get('max_rel_diff', results[key])}", flush=True
            )
            rec.write()
    rec.set("passed", all(r.get("passed", False) for r in results.values()))
    print(f"correctness: passed {rec.data['passed']}", flush=True)


# ----------------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------------


def _speed_sizes(dry_run: bool):
    from benchmarks import speed

    if dry_run:
        return SPEED_DRY, SPEED_VARIANTS_DRY
    sizes = {k: dict(v or speed.SIZES[k]) for k, v in SPEED_SIZES.items()}
    return sizes, SPEED_VARIANTS


def _deadline(budget_s: float):
    """`left()`: the seconds left of `budget_s` from now."""
    t0 = time.monotonic()
    return lambda: budget_s - (time.monotonic() - t0)


def worker_speed_jax(sizes: dict, variants: dict, repeats: int, budget_s: float, partial=None):
    """One training step of mfattn (the step of `benchmarks.speed`: the batch's
    gradient maps averaged, one blockwise AdamW update) per size and kernel
    variant, on the default device, after the device's measured peaks
    (`worker_peaks`): timings, XLA's memory analysis of the compiled step and
    the device's peak memory so far. Stops starting variants when `budget_s`
    runs out; what it has after each variant also goes to the file `partial`."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import mfattn
    from benchmarks import speed

    left = _deadline(budget_s)
    dev = jax.devices()[0]
    out = {"device": str(dev), "device_kind": dev.device_kind, "sizes": {}}
    try:
        out["peaks_measured"] = worker_peaks()
    except Exception as e:
        out["peaks_measured"] = _error(e)
    opt = mfattn.blockwise_adamw(1e-2)
    todo = [(size, chunk) for size in sizes for chunk in variants[size]]
    for i, (size, chunk) in enumerate(todo):
        kernel = {-1: mfattn.AutoKernel(), 0: mfattn.DenseKernel()}.get(chunk)
        kernel = kernel or mfattn.ChunkedKernel(chunk)
        name = {-1: "default", 0: "dense"}.get(chunk, f"chunk{chunk}")
        label = f"mfattn {name} ({type(kernel).__name__})"
        if chunk == -1:
            with contextlib.suppress(Exception):  # what the default chose on this device
                n_keys, rows = sizes[size]["n"], sizes[size]["H"] * sizes[size]["n"]
                label += f" -> {kernel.choose(n_keys, rows, 4)!r}"
        row = out["sizes"].setdefault(size, {})
        if left() < 3:
            row[name] = {"label": label, "skipped": "the worker's budget ran out"}
            continue
        try:
            params, x, y = speed._data(sizes[size])
            params = mfattn.AttentionParams(*(jax.device_put(a, dev) for a in params))
            x, y = jax.device_put(x, dev), jax.device_put(y, dev)
            model = mfattn.DiscreteTransformer(params, 1.0, kernel=kernel)
            state = opt.init(model.params)

            def step(model, state, x, y):
                measures, losses = jax.vmap(
                    lambda x, y: (mfattn.EmpiricalMeasure(x), mfattn.DenoisingLoss(y))
                )(x, y)
                sols = mfattn.batch_solve(model, measures, losses)
                grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), sols.grads)
                updates, state = opt.update(grads, state, model.params)
                return model.with_params(eqx.apply_updates(model.params, updates)), state

            t0 = time.perf_counter()
            compiled = eqx.filter_jit(step).lower(model, state, x, y).compile()
            compile_s = time.perf_counter() - t0
            mem = None
            with contextlib.suppress(Exception):
                ma = compiled.compiled.memory_analysis()
                mem = {
                    k: getattr(ma, k)
                    for k in (
                        "temp_size_in_bytes",
                        "argument_size_in_bytes",
                        "output_size_in_bytes",
                    )
                }
            box = {"m": model, "s": state}

            def run(box=box, compiled=compiled, x=x, y=y):
                box["m"], box["s"] = compiled(box["m"], box["s"], x, y)
                return box["m"]

            # the timed repeats take at most a third of the time left per variant left
            r = _timed(run, repeats, jax.block_until_ready, left() / (len(todo) - i) / 3)
            stats = {}
            with contextlib.suppress(Exception):
                stats = dev.memory_stats() or {}
            r.update(
                label=label,
                compile_s=compile_s,
                xla_memory=mem,
                device_peak_bytes_so_far=stats.get("peak_bytes_in_use"),
            )
            del box, compiled, run, params, x, y, model, state
        except Exception as e:
            r = dict(label=label, **_error(e))
        row[name] = r
        print(f"speed {size} {label}: {r.get('median', r.get('error'))}", file=sys.stderr)
        if partial:
            write_json(partial, out)
    return out


def worker_speed_torch(
    sizes: dict, repeats: int, budget_s: float, dry_run: bool = False, partial=None
) -> dict:
    """One training step of `benchmarks.torch_reference.TorchStep`
    (`scaled_dot_product_attention`) per size on the CUDA device: timings after
    warm-up with `torch.cuda.synchronize`, and `torch.cuda.max_memory_allocated`
    (reset per size). In a dry run without CUDA, on the CPU. Stops starting
    sizes when `budget_s` runs out; what it has also goes to `partial`."""
    from benchmarks import speed

    torch, device, note = _torch(require_cuda=not dry_run)
    if torch is None:
        return {size: note for size in sizes}
    from benchmarks.torch_reference import TorchStep

    left = _deadline(budget_s)
    torch.set_default_device(device)  # TorchStep's tensors are made on the GPU
    cuda = device == "cuda"
    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    out = {}
    for i, (size, cfg) in enumerate(sizes.items()):
        label = f"torch SDPA eager ({device})"
        if left() < 3:
            out[size] = {"label": label, "skipped": "the worker's budget ran out"}
            continue
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            params, x, y = speed._data(cfg)
            step = TorchStep(params, 1.0)
            xt, yt = torch.tensor(x), torch.tensor(y)
            max_s = left() / (len(sizes) - i) / 3
            r = _timed(lambda s=step, a=xt, b=yt: s(a, b), repeats, sync, max_s)
            r.update(label=label, torch_device=device)
            if cuda:
                r.update(
                    device_name=torch.cuda.get_device_name(0),
                    peak_bytes=torch.cuda.max_memory_allocated(),
                    sdp_backends={
                        "flash": torch.backends.cuda.flash_sdp_enabled(),
                        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                        "math": torch.backends.cuda.math_sdp_enabled(),
                    },
                )
            del step, xt, yt
        except Exception as e:  # out of memory, say: the next size runs
            r = dict(label=label, **_error(e))
        out[size] = r
        print(f"speed {size} {label}: {r.get('median', r.get('error'))}", file=sys.stderr)
        if partial:
            write_json(partial, out)
    return out


def worker_peaks() -> dict:
    """The device's float32 matmul and `exp` throughput, measured (JAX)."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    n = 8192 if dev.platform == "gpu" else 512
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), dev)
    out = {}
    for prec in ("default", "highest"):
        mm = jax.jit(lambda a, p=prec: jnp.matmul(a, a, precision=p))
        t = _timed(lambda mm=mm: mm(a), 3, jax.block_until_ready)["median"]
        out[f"matmul_f32_{prec}_flops"] = 2 * n**3 / t
    m = (1 << 28) if dev.platform == "gpu" else (1 << 20)
    e = jax.device_put(jax.random.normal(jax.random.key(1), (m,), jnp.float32), dev)
    ex = jax.jit(jnp.exp)
    out["exp_per_s"] = m / _timed(lambda: ex(e), 3, jax.block_until_ready)["median"]
    return out


def _has(r, key) -> bool:
    return isinstance(r, dict) and key in r


def _worker(name: str, args: list, timeout: float, partial=None) -> dict:
    """Run a worker of this module in its own process (its peak memory is its
    own; a crash or a hang stays there), within `timeout` seconds. With
    `partial` (a path, passed to the worker as its last argument), a worker
    that does not finish returns what it wrote there, with the error."""
    args = [*args, str(partial)] if partial else args
    cmd = [sys.executable, "-m", "benchmarks.device_check", "-", "--worker", name, json.dumps(args)]
    try:
        limit = None if timeout == float("inf") else max(timeout, 1)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        sys.stderr.write((err or "")[-3000:])
        out = {"error": f"worker {name} ran past its {timeout:.0f} s", "timed_out": True}
    else:
        sys.stderr.write(res.stderr[-3000:])
        if not res.returncode:
            return json.loads(res.stdout.strip().splitlines()[-1])
        out = {"error": f"worker {name} exited with {res.returncode}", "stderr": res.stderr[-3000:]}
    if partial:
        with contextlib.suppress(OSError, ValueError):
            out = {**json.loads(pathlib.Path(partial).read_text()), **out}
    return out


def part_speed(rec: PartRecord, dry_run: bool) -> None:
    """One training step per size: mfattn (each kernel variant, all sizes in
    one process), then PyTorch (SDPA, all sizes in another) on the same device."""
    from benchmarks import speed

    sizes, variants = _speed_sizes(dry_run)
    repeats = 2 if dry_run else 5
    _, device, note = _torch(require_cuda=not dry_run)
    rec.set("torch", note or f"torch on {device}")  # note: why not, or not on a GPU
    rec.set("peaks_nominal", PEAKS)
    rec.set(
        "method",
        "median of up to `repeats` steps after two warm-up steps (jax.block_until_ready, "
        "torch.cuda.synchronize); nominal counts of benchmarks.speed.nominal (14 n^2 k "
        "flops, 2 n^2 exponentials per head, layer and sample); mfattn's memory: XLA's "
        "analysis of the compiled step and the device's peak since the worker started "
        "(the largest over the sizes and variants run so far); torch's: "
        "max_memory_allocated, reset per size",
    )
    rows = {}
    for size, cfg in sizes.items():
        flops, exps = speed.nominal(cfg)
        rows[size] = {"config": cfg, "nominal_flops": flops, "nominal_exps": exps}
    rec.set("sizes", rows)
    # what the workers have, outside OUT (which holds one file per part)
    tmp = pathlib.Path(tempfile.gettempdir())
    budget = rec.left() - 5
    jax_share = 0.62 if device is not None else 1.0
    res = _worker(
        "speed_jax",
        [sizes, variants, repeats, budget * jax_share - 5],
        budget * jax_share,
        tmp / f"device_check_{os.getpid()}_jax.json",
    )
    rec.set("device", res.get("device"))
    rec.set("peaks_measured", res.get("peaks_measured"))
    if "error" in res:
        rec.data["errors"].append({"where": "speed/mfattn", "error": res["error"]})
    for size, row in rows.items():
        row["mfattn"] = res.get("sizes", {}).get(size, {})
    rec.write()
    if device is not None:
        budget = rec.left() - 5
        tres = _worker(
            "speed_torch",
            [sizes, repeats, budget - 5, dry_run],
            budget,
            tmp / f"device_check_{os.getpid()}_torch.json",
        )
        if "error" in tres:
            rec.data["errors"].append({"where": "speed/torch", "error": tres["error"]})
    for size, row in rows.items():
        row["torch"] = tres.get(size, "not run") if device is not None else note
        for r in [*row["mfattn"].values(), row["torch"]]:
            if _has(r, "median"):
                r["flops_per_s"] = row["nominal_flops"] / r["median"]
                r["exp_per_s"] = row["nominal_exps"] / r["median"]
                r["fraction_of_peak_flops"] = r["flops_per_s"] / PEAKS["float32_flops"]
                r["fraction_of_peak_exp"] = r["exp_per_s"] / PEAKS["exp_per_s"]
            elif _has(r, "error"):
                where = f"speed/{size}/{r.get('label')}"
                rec.data["errors"].append({"where": where, "error": r["error"]})
            elif _has(r, "skipped") or r == "not run":
                rec.data.setdefault("skipped", []).append(f"{size}: {r}")
        if _has(row["torch"], "median"):
            for r in row["mfattn"].values():
                if _has(r, "median"):
                    r["ratio_to_torch"] = r["median"] / row["torch"]["median"]
        timed = [*row["mfattn"].values(), row["torch"]]
        timed = [f"{r['label']} {r['median']:.4g} s" for r in timed if _has(r, "median")]
        print(f"speed {size}: " + ", ".join(timed), flush=True)
    rec.write()


# ----------------------------------------------------------------------------------
# limit
# ----------------------------------------------------------------------------------


def part_limit(rec: PartRecord, dry_run: bool) -> None:
    """`mfattn.limit_gradient` (Tsit5, closed-form adjoint) against
    `torchdiffeq.odeint_adjoint` (dopri5; `benchmarks.torch_reference.TorchLimit`)
    at the sizes of `benchmarks.speed.LIMIT`, on the same device, in float64;
    their losses and gradients compared (mfattn's gradient is in the mean-field
    normalisation `M dLoss/dtheta_j / c_j`, see `mfattn.limit_gradient`)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    import mfattn
    from benchmarks import speed

    c = LIMIT_DRY if dry_run else speed.LIMIT
    repeats = 2 if dry_run else 5
    rec.set("config", c)
    # the inputs of benchmarks.speed.worker_limit
    rng = np.random.default_rng(0)
    a = np.sqrt(6 / (c["d"] + c["k"]))
    grid = [rng.uniform(-a, a, (c["J"] + 1, c["M"], c["d"], c["k"])) for _ in range(4)]
    x = rng.standard_normal((c["n"], c["d"]))
    y = x + 0.3 * rng.standard_normal((c["n"], c["d"]))
    dev = jax.devices()[0]
    params = mfattn.AttentionParams(*(jax.device_put(g, dev) for g in grid))
    measure = mfattn.EmpiricalMeasure(jax.device_put(x, dev))
    loss = mfattn.DenoisingLoss(jax.device_put(y, dev))
    f = jax.jit(
        lambda p: mfattn.limit_gradient(p, measure, loss, c["beta"], rtol=c["rtol"], atol=c["atol"])
    )
    box = {}

    def run():
        box["out"] = f(params)
        return box["out"]

    try:
        r = _timed(run, repeats, jax.block_until_ready, rec.left() / 4)
        r.update(label="mfattn limit_gradient (Tsit5, closed-form adjoint)", device=str(dev))
        with contextlib.suppress(Exception):
            r["device_peak_bytes"] = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    except Exception as e:
        r = rec.error("mfattn", e)
    rec.set("mfattn", r)
    torch, device, note = _torch(require_cuda=not dry_run)
    if torch is None:
        rec.set("torch", note)
        return
    from benchmarks.torch_reference import TorchLimit

    try:
        torch.set_default_device(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        lim = TorchLimit(grid, c["beta"], c["rtol"], c["atol"])
        xt, yt = torch.tensor(x), torch.tensor(y)
        sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
        tbox = {}

        def trun():
            tbox["out"] = lim(xt, yt)
            return tbox["out"]

        tr = _timed(trun, repeats, sync, rec.left() / 2)
        tr.update(label="torchdiffeq odeint_adjoint (dopri5)", device=device)
        if note:
            tr["note"] = note
        if device == "cuda":
            tr["peak_bytes"] = torch.cuda.max_memory_allocated()
    except Exception as e:
        rec.set("torch", rec.error("torch", e))
        return
    rec.set("torch", tr)
    if "median" in r:
        rec.set("ratio_mfattn_to_torch", r["median"] / tr["median"])
        value, grads = box["out"]
        tvalue, tgrads = tbox["out"]
        c_j = np.asarray(mfattn.ParamPath(params).basis_integrals())
        scaled = [g.detach().cpu().numpy() * c["M"] / c_j[:, None, None, None] for g in tgrads]
        agree = {
            "loss_rel_diff": abs(float(value) - float(tvalue.detach()))
            / abs(float(tvalue.detach())),
            "grad_rel_diff": _rel(list(jax.tree.leaves(grads)), scaled),
            "tol": 1e-3,
            "why": "both solve to rtol 1e-6, atol 1e-8 with other methods (Tsit5 and dopri5, "
            "the closed-form and the continuous adjoint); at these sizes mfattn's own gradient "
            "at rtol 1e-6 differs from its gradient at rtol 1e-10 by 2.4e-4 of the largest "
            "entry (CPU, float64), so 1e-3 is the solvers' tolerance with a margin of 4",
        }
        agree["passed"] = max(agree["loss_rel_diff"], agree["grad_rel_diff"]) <= agree["tol"]
        if not agree["passed"]:
            rec.data["errors"].append({"where": "limit/agreement", "error": str(agree)})
        rec.set("agreement", agree)


# ----------------------------------------------------------------------------------
# study
# ----------------------------------------------------------------------------------


def study_stages(dry_run: bool) -> dict:
    """`{name: StudyConfig}`, smallest first: each runs only after the one
    before it finished, so that the part keeps the largest that fit."""
    import dataclasses

    from benchmarks.scaling import PRESETS

    no_sweeps = dict(n_sweep=(), d_sweep=(), causal_sweep=False)
    if dry_run:
        tiny = dataclasses.replace(
            PRESETS["quick"],
            steps=2,
            record_every=1,
            nodes=2,
            particles=4,
            sweep_particles=4,
            L=(1,),
            H=(2,),
            inits=3,  # the jackknife of the bias leaves one out
            probes=2,
            test_points=2,
            limit_block=2,
            restarts=1,
            adversarial_steps=1,
            sweep_LH=(1, 2),
            **no_sweeps,
        )
        return {"dry": tiny}
    return {
        "quick": PRESETS["quick"],
        "full_main": dataclasses.replace(PRESETS["full"], **no_sweeps),
        "gpu": PRESETS["gpu"],
    }


def part_study(rec: PartRecord, dry_run: bool) -> None:
    """The convergence study (`benchmarks.scaling.run`), its stages in order of
    size; each finished stage's study JSON goes into `study.json` (its
    per-condition files and PNGs into a temporary folder, so that the output
    folder holds one file per part)."""
    stages = study_stages(dry_run)
    rec.set("stages_planned", {k: v.to_json() for k, v in stages.items()})
    rec.set("stages", {})
    with tempfile.TemporaryDirectory(prefix="device_check_study_") as tmp:
        for name in stages:
            rec.set(("stages", name), {"status": "running", "started": _now()})
            t0 = time.perf_counter()
            path = pathlib.Path(tmp) / f"{name}.json"
            res = _worker("study", [name, dry_run, str(path)], rec.left() - 5)
            if res.get("timed_out"):  # the largest that fits is the one before
                rec.set(
                    ("stages", name),
                    {"status": "ran past the part's budget", "wall_s": time.perf_counter() - t0},
                )
                if "largest_done" not in rec.data:
                    rec.data.setdefault("skipped", []).append("no stage finished in the budget")
                    rec.write()
                break
            if "error" in res:
                rec.set(("stages", name), dict(status="failed", **res))
                rec.data["errors"].append({"where": f"study/{name}", "error": res["error"]})
                break
            data = json.loads(path.read_text())
            failed = data.get("failed") or {}
            stage = {
                "status": "done" if not failed else "done_with_failed_conditions",
                "wall_s": time.perf_counter() - t0,
                "data": data,
            }
            for cname, f in failed.items():
                rec.data["errors"].append(
                    {"where": f"study/{name}/{cname}", "error": f.get("error")}
                )
            rec.set(("stages", name), stage)
            rec.set("largest_done", name)
            print(f"study {name}: {stage['status']} in {stage['wall_s']:.1f} s", flush=True)


def worker_study(name: str, dry_run: bool, out: str) -> dict:
    """Run the study stage `name` of `study_stages`, its JSON to `out` (its
    progress to stderr, the log)."""
    import jax

    jax.config.update("jax_enable_x64", True)  # as the study's command line does
    from benchmarks.scaling import run

    with contextlib.redirect_stdout(sys.stderr):
        data = run(study_stages(dry_run)[name], out, progress=True)
    return {"wall_seconds_this_run": data["wall_seconds_this_run"]}


# ----------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------

_PARTS = {
    "env": part_env,
    "correctness": part_correctness,
    "speed": part_speed,
    "limit": part_limit,
    "study": part_study,
}
_WORKERS = {
    "speed_jax": worker_speed_jax,
    "speed_torch": worker_speed_torch,
    "peaks": worker_peaks,
    "study": worker_study,
}


def run_part(out, part: str, dry_run: bool = False, budget: float | None = None) -> int:
    """Run one part, writing `OUT/<part>.json`.

    **Returns:** 0 when the part ran to its end (its items' own errors are in
    its `errors`), 1 when it raised (recorded as `"failed"` with the error).

    **Raises:** `ValueError` for an unknown `part`.
    """
    if part not in _PARTS:
        raise ValueError(f"`part` must be one of {PARTS}, got {part!r}")
    rec = PartRecord(out, part, dry_run, budget)
    try:
        _PARTS[part](rec, dry_run)
    except Exception as e:
        rec.data["error"] = _error(e)
        rec.finish("failed")
        traceback.print_exc()
        return 1
    rec.finish("done")
    return 0


def finish_part(out, part: str, rc: int) -> None:
    """After the part's process ended with exit status `rc`: a part whose file
    still says `"running"` (killed before it could say so), or has no file, is
    marked `"killed"` (rc 124 or 137, `timeout`'s) or `"failed"`."""
    path = pathlib.Path(out) / f"{part}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        data = {"part": part, "errors": [], "note": f"no readable file: {e!r}"}
    if data.get("status") in ("done", "failed", "killed"):
        return
    data["status"] = "killed" if rc in (124, 137) else "failed"
    data["error"] = f"the part's process ended with exit status {rc} before it finished"
    data["exit_status"] = rc
    write_json(path, data)


def summary(out) -> list[str]:
    """One line per part: its status, time and errors."""
    lines = []
    for part in PARTS:
        path = pathlib.Path(out) / f"{part}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            lines.append(f"{part:12s} missing ({e.__class__.__name__})")
            continue
        errs = data.get("errors") or []
        line = f"{part:12s} {data.get('status', '?'):8s} {data.get('elapsed_s', 0):7.1f} s"
        line += f"  {len(errs)} errors" if errs else ""
        line += f"  {len(data['skipped'])} skipped" if data.get("skipped") else ""
        if data.get("error"):
            err = data["error"]
            line += "  " + (err["error"] if isinstance(err, dict) else str(err))[:200]
        elif errs:
            line += ": " + "; ".join(str(e.get("error"))[:80] for e in errs[:3])
        lines.append(line)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.device_check", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("out", help="output folder")
    ap.add_argument("--part", choices=PARTS)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (about a minute on a CPU)")
    ap.add_argument("--budget", type=float, default=None, help="the part's time budget, s")
    ap.add_argument("--finish", nargs=2, metavar=("PART", "RC"), help=argparse.SUPPRESS)
    ap.add_argument("--summary", action="store_true", help="one line per part")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        name, wargs = args.worker
        print(json.dumps(_WORKERS[name](*json.loads(wargs))))
        return 0
    if args.finish:
        finish_part(args.out, args.finish[0], int(args.finish[1]))
        return 0
    if args.summary:
        print("\n".join(summary(args.out)))
        return 0
    if args.part is None:
        ap.error("one of --part, --summary is required")
    return run_part(args.out, args.part, args.dry_run, args.budget)


if __name__ == "__main__":
    sys.exit(main())
