"""A fused attention kernel for the CPU in C++, called through the XLA FFI
(docs/theory.md, sections 1, 4 and 8).

The C++ source, `_cpu/attention.cc`, is compiled on first use with the
machine's C++ compiler (`$CXX`, else `c++` or `g++`) for the machine it runs on
(`-march=native`, OpenMP), against the XLA FFI headers that jaxlib ships, and
cached in `$MFATTN_CACHE_DIR` (default `$XDG_CACHE_HOME/mfattn`, else
`~/.cache/mfattn`) under a name that hashes the source, the flags, the compiler,
jaxlib's version and the CPU's features: a second process, or a machine with
another CPU, never loads a library built for something else. The build takes
about ten seconds, once; it is atomic and locked, so that parallel test workers
build it once. Where it cannot build (no compiler, no headers), the error is
kept and [`mfattn.AutoKernel`][] keeps the pure-JAX kernels.
"""

import ctypes
import dataclasses
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _softmax
from ._base import AbstractAttentionKernel, as_slope, check_options, check_positions
from ._chunked import ChunkedKernel
from ._dense import DenseKernel

_SOURCE = pathlib.Path(__file__).with_name("_cpu") / "attention.cc"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w"]
_TARGETS = {
    ("forward", np.dtype("float32")): ("MfattnForwardF32", "mfattn_cpu_forward_f32"),
    ("forward", np.dtype("float64")): ("MfattnForwardF64", "mfattn_cpu_forward_f64"),
    ("backward", np.dtype("float32")): ("MfattnBackwardF32", "mfattn_cpu_backward_f32"),
    ("backward", np.dtype("float64")): ("MfattnBackwardF64", "mfattn_cpu_backward_f64"),
}
_CAUSAL, _STRICT, _ALIBI = 1, 2, 4
_MAX_HEAD_DIM = 64


class FusedBuildError(RuntimeError):
    """The fused CPU kernel could not be built or loaded here."""


def cache_dir() -> pathlib.Path:
    """Where the compiled kernel is kept: `$MFATTN_CACHE_DIR`, else
    `$XDG_CACHE_HOME/mfattn` or `~/.cache/mfattn`, else (where that cannot be
    created or written) a directory of this user's in the temporary directory."""
    env = os.environ.get("MFATTN_CACHE_DIR")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    path = pathlib.Path(base) / "mfattn"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return pathlib.Path(tempfile.gettempdir()) / f"mfattn-{uid}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_features() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _include_dir() -> str:
    try:
        from jax import ffi
    except ImportError as e:  # jax older than the FFI module
        raise FusedBuildError(f"jax.ffi is not available in jax {jax.__version__}") from e
    return ffi.include_dir()


def _version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _library_path(cxx: str, flags: list[str]) -> pathlib.Path:
    h = hashlib.sha256()
    for part in (
        _SOURCE.read_bytes(),
        " ".join(flags).encode(),
        _version(cxx).encode(),
        jax.__version__.encode(),
        getattr(jax.lib, "__version__", "").encode() if hasattr(jax, "lib") else b"",
        platform.machine().encode(),
        _cpu_features().encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"attention-{h.hexdigest()[:20]}.so"


def _compile(cxx: str, flags: list[str], out: pathlib.Path) -> None:
    """Compile to a temporary file beside `out`, then rename (atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".tmp-", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *flags, "-I", _include_dir(), str(_SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise FusedBuildError(
                f"compiling the fused CPU kernel failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}"
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> pathlib.Path:
    """The compiled library, built if needed (under a lock on the cache)."""
    if not _SOURCE.exists():
        raise FusedBuildError(f"the kernel's source {_SOURCE} is missing")
    cxx = _compiler()
    if cxx is None:
        raise FusedBuildError("no C++ compiler found ($CXX, c++, g++, clang++)")
    flags = list(_FLAGS)
    lib = _library_path(cxx, flags)
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(lib.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not lib.exists():
            try:
                _compile(cxx, flags, lib)
            except FusedBuildError:
                # a compiler without -march=native (or OpenMP): the portable build
                flags = [f for f in flags if f not in ("-march=native", "-fopenmp")]
                lib = _library_path(cxx, flags)
                if not lib.exists():
                    _compile(cxx, flags, lib)
    return lib


@functools.cache
def _load():
    """Build, load and register the FFI targets once per process; the error
    (a `FusedBuildError`) is cached too."""
    if sys.platform == "win32":
        raise FusedBuildError("the fused CPU kernel is built for Linux and macOS only")
    try:
        from jax import ffi
    except ImportError as e:
        raise FusedBuildError(f"jax.ffi is not available in jax {jax.__version__}") from e
    path = _build()
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        raise FusedBuildError(f"loading {path} failed: {e}") from e
    for symbol, target in _TARGETS.values():
        ffi.register_ffi_target(target, ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.MfattnThreads.restype = ctypes.c_int
    return lib


def fused_cpu_error() -> Exception | None:
    """Why the fused CPU kernel is not available here (`None` when it is).
    Builds it on the first call."""
    if os.environ.get("MFATTN_FUSED_CPU", "1") == "0":
        return FusedBuildError("disabled by MFATTN_FUSED_CPU=0")
    try:
        _load()
    except FusedBuildError as e:
        return e
    return None


def fused_cpu_available() -> bool:
    """Whether [`mfattn.FusedCPUKernel`][] can run here (it is built on the
    first call: about ten seconds, once per machine). `MFATTN_FUSED_CPU=0` in
    the environment makes this `False`, and so keeps [`mfattn.AutoKernel`][]
    on the pure-JAX kernels."""
    return fused_cpu_error() is None


def fused_cpu_threads() -> int:
    """The number of threads the fused kernel runs on (OpenMP's default: the
    cores this process may use, or `OMP_NUM_THREADS`)."""
    return int(_load().MfattnThreads())


# ----------------------------------------------------------------- the calls


@dataclasses.dataclass(frozen=True)
class _Config:
    causal: bool
    strict: bool
    slope: float | None

    @property
    def flags(self) -> np.int32:
        f = (_CAUSAL if self.causal else 0) | (_STRICT if self.strict else 0)
        return np.int32(f | (_ALIBI if self.slope is not None else 0))

    @property
    def positions(self) -> bool:
        return self.causal or self.slope is not None


def _side(cfg, q, w, beta, qpos, kpos):
    dtype = q.dtype
    beta = jnp.asarray(beta, dtype).reshape(())
    w = jnp.asarray(w).astype(dtype)
    if cfg.positions:
        qpos, kpos = jnp.asarray(qpos, jnp.int32), jnp.asarray(kpos, jnp.int32)
    else:
        qpos = kpos = jnp.zeros((1,), jnp.int32)
    slope = 0.0 if cfg.slope is None else cfg.slope
    rate = (slope / _softmax.num_tokens(w).astype(dtype)).astype(dtype).reshape(())
    return w, beta, qpos, kpos, rate


def _target(kind, dtype):
    _load()
    return _TARGETS[(kind, np.dtype(dtype))][1]


def _forward(cfg, q, k, v, w, beta, qpos, kpos):
    from jax import ffi

    w, beta, qpos, kpos, rate = _side(cfg, q, w, beta, qpos, kpos)
    out = (
        jax.ShapeDtypeStruct(q.shape[:-1] + v.shape[-1:], q.dtype),
        jax.ShapeDtypeStruct(q.shape[:-1], q.dtype),
    )
    call = ffi.ffi_call(_target("forward", q.dtype), out, vmap_method="broadcast_all")
    return call(q, k, v, w, beta, qpos, kpos, rate, flags=cfg.flags)


def _backward(cfg, q, k, v, w, beta, qpos, kpos, lse, delta, c, u):
    """`(dq / beta, dk, dv, ds)` as in the Pallas kernel: `ds_j = sum_i u_i dS_ij`."""
    from jax import ffi

    w, beta, qpos, kpos, rate = _side(cfg, q, w, beta, qpos, kpos)
    dtype = q.dtype
    out = (
        jax.ShapeDtypeStruct(q.shape, dtype),
        jax.ShapeDtypeStruct(k.shape, dtype),
        jax.ShapeDtypeStruct(v.shape, dtype),
        jax.ShapeDtypeStruct(k.shape[:-1], dtype),
    )
    call = ffi.ffi_call(_target("backward", dtype), out, vmap_method="broadcast_all")
    return call(
        q,
        k,
        v,
        w,
        beta,
        qpos,
        kpos,
        rate,
        lse.astype(dtype),
        delta.astype(dtype),
        c.astype(dtype),
        jnp.asarray(u).astype(dtype),
        flags=cfg.flags,
    )


def _dense(cfg):
    return DenseKernel(cfg.causal, strict=cfg.strict, alibi_slope=cfg.slope)


# the pure-JAX kernel that differentiates the forward pass: dense for few keys,
# else in chunks (memory O(H m chunk) rather than O(H m n))
_FALLBACK_CHUNK = 128


def _fallback(cfg, num_keys: int):
    if num_keys <= _FALLBACK_CHUNK:
        return _dense(cfg)
    return ChunkedKernel(_FALLBACK_CHUNK, cfg.causal, strict=cfg.strict, alibi_slope=cfg.slope)


# Differentiation. `_attend_jvp` makes every transformation work (jax.jvp,
# jax.jacfwd, jax.grad): the tangent is a pure-JAX kernel's (`_fallback`), so
# differentiating the forward pass runs at that kernel's speed, while the
# primal (and the closed-form `backward`) run fused. `_attend_vjp` is reverse
# mode through the fused backward pass (no forward mode).


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _attend_jvp(cfg, q, k, v, w, beta, qpos, kpos):
    return _forward(cfg, q, k, v, w, beta, qpos, kpos)


@_attend_jvp.defjvp
def _attend_jvp_rule(cfg, primals, tangents):
    q, k, v, w, beta, qpos, kpos = primals
    dq, dk, dv, dw, dbeta, _, _ = tangents

    def pure(q, k, v, w, beta):
        return _fallback(cfg, k.shape[-2]).forward(q, k, v, w, beta, qpos, kpos)

    return jax.jvp(pure, (q, k, v, w, beta), (dq, dk, dv, dw, dbeta))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend_vjp(cfg, q, k, v, w, beta, qpos, kpos):
    return _forward(cfg, q, k, v, w, beta, qpos, kpos)


def _attend_vjp_fwd(cfg, q, k, v, w, beta, qpos, kpos):
    o, lse = _forward(cfg, q, k, v, w, beta, qpos, kpos)
    return (o, lse), (q, k, v, w, beta, qpos, kpos, o, lse)


def _attend_vjp_bwd(cfg, res, cts):
    return _softmax.forward_vjp(_backward, cfg, res, cts)


_attend_vjp.defvjp(_attend_vjp_fwd, _attend_vjp_bwd)


# The closed-form backward pass, differentiable (a solve differentiated in
# `beta` or in its initial condition differentiates the adjoint too): the
# tangent is the pure-JAX kernel's, as for the forward pass.


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _pullback(cfg, q, k, v, w, o, lse, c, u, beta, qpos, kpos):
    delta = jnp.sum(c * o, -1)
    dqb, dk, dv, _ = _backward(cfg, q, k, v, w, beta, qpos, kpos, lse, delta, c, u)
    return beta * dqb, dk, dv


@_pullback.defjvp
def _pullback_jvp_rule(cfg, primals, tangents):
    qpos, kpos = primals[-2:]

    def pure(q, k, v, w, o, lse, c, u, beta):
        kernel = _fallback(cfg, k.shape[-2])
        return kernel.backward(q, k, v, w, o, lse, c, u, beta, qpos, kpos)

    return jax.jvp(pure, primals[:-2], tangents[:-2])


# ------------------------------------------------------------ the kernel


class FusedCPUKernel(AbstractAttentionKernel):
    """A fused attention kernel for the CPU, in C++ through the XLA FFI: for
    each query, the scores against all keys, `exp`, the online softmax and the
    `k`-dimensional products in one pass over the keys held transposed in
    cache (vectorised over keys), threaded over heads, samples and blocks of
    queries with OpenMP; and the closed-form backward pass of docs/theory.md,
    section 4, in one more pass that recomputes the densities from the
    log-normaliser. The same numbers as [`mfattn.DenseKernel`][] to rounding
    (to 1e-12 in float64; `exp` in float32 is a polynomial of about one ulp),
    memory `O(H (m + n) k)`.

    It is built for the machine on first use (`mfattn.fused_cpu_available()`
    says whether it could be) and [`mfattn.AutoKernel`][] chooses it on the CPU
    for float32 and float64 inputs with a head dimension of at most 64.

    Differentiating the forward pass (`jax.grad` of [`mfattn.discrete_loss`][],
    `jax.jvp`, `jax.jacfwd`) works with every transformation by default: the
    derivative is that of the pure-JAX kernels, dense up to 128 keys, else in
    chunks of 128 (`autodiff="jvp"`). With
    `autodiff="vjp"`, reverse mode runs through the fused backward pass
    instead (forward mode is then not available). The solvers' closed-form
    adjoints call `backward`, which is fused either way; differentiating it
    (a solve differentiated in `beta` or its initial condition) goes through
    the pure-JAX kernels in the same way.

    **Arguments:**

    - `causal`, `strict`, `alibi_slope`: as for [`mfattn.DenseKernel`][].
    - `autodiff`: `"jvp"` (default) or `"vjp"`, as above.

    **Raises:** as [`mfattn.DenseKernel`][] for the options; `ValueError` for
    another `autodiff`; on use, `RuntimeError` (a `FusedBuildError`) where the
    kernel cannot be built, `TypeError` for inputs that are not float32 or
    float64, `ValueError` for a head dimension above 64.
    """

    causal: bool = eqx.field(static=True, default=False)
    strict: bool = eqx.field(static=True, default=False, kw_only=True)
    alibi_slope: float | None = eqx.field(
        static=True, default=None, converter=as_slope, kw_only=True
    )
    autodiff: str = eqx.field(static=True, default="jvp", kw_only=True)

    def __check_init__(self):
        check_options(self)
        if self.autodiff not in ("jvp", "vjp"):
            raise ValueError(f"`autodiff` must be 'jvp' or 'vjp', got {self.autodiff!r}")

    @staticmethod
    def supports(q, k=None, v=None) -> bool:
        """Whether inputs of these dtypes and head dimensions run fused."""
        arrays = [x for x in (q, k, v) if x is not None]
        return all(
            np.dtype(x.dtype) in (np.dtype("float32"), np.dtype("float64"))
            and x.dtype == q.dtype
            and x.shape[-1] <= _MAX_HEAD_DIM
            for x in arrays
        )

    def _config(self, q, k, v) -> _Config:
        err = fused_cpu_error()
        if err is not None:
            raise err
        if np.dtype(q.dtype) not in (np.dtype("float32"), np.dtype("float64")):
            raise TypeError(f"FusedCPUKernel needs float32 or float64 inputs, got {q.dtype}")
        for name, x in (("k", k), ("v", v)):
            if x is not None and x.dtype != q.dtype:
                raise TypeError(f"FusedCPUKernel: `{name}` is {x.dtype}, `q` is {q.dtype}")
        if q.shape[-1] > _MAX_HEAD_DIM or (v is not None and v.shape[-1] > _MAX_HEAD_DIM):
            raise ValueError(f"FusedCPUKernel supports head dimensions up to {_MAX_HEAD_DIM}")
        if k is not None and q.shape[:-2] != k.shape[:-2]:
            raise ValueError(
                f"FusedCPUKernel: queries {q.shape} and keys {k.shape} differ in their head axes"
            )
        return _Config(bool(self.causal), bool(self.strict), self.alibi_slope)

    def forward(self, q, k, v, w, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        cfg = self._config(q, k, v)
        attend = _attend_vjp if self.autodiff == "vjp" else _attend_jvp
        return attend(cfg, q, k, v, w, jnp.asarray(beta, q.dtype), qpos, kpos)

    def backward(self, q, k, v, w, o, aux, c, u, beta, qpos=None, kpos=None):
        qpos, kpos = check_positions(self, qpos, kpos)
        cfg = self._config(q, k, v)
        beta = jnp.asarray(beta, q.dtype)
        return _pullback(cfg, q, k, v, w, o, aux, c, u, beta, qpos, kpos)

    def weights(self, q, k, w, beta, qpos=None, kpos=None):
        return _dense(_Config(bool(self.causal), bool(self.strict), self.alibi_slope)).weights(
            q, k, w, beta, qpos, kpos
        )
