"""Run fingerprints: what a training run is, hashed, so that its checkpoints
can be told from another run's."""

import functools
import hashlib
import inspect
import json
import re
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

# a fingerprint is a dict of these parts (hex digests, and two ints)
PARTS = (
    "model",
    "model_parameters",
    "optimizer",
    "sampler",
    "key",
    "initial_state",
    "batch_size",
    "steps_per_call",
)
_LABELS = {
    "model": "the model (its tree structure, shapes, dtypes or configuration, e.g. depth or beta)",
    "model_parameters": "the model's initial parameter values",
    "optimizer": "the optimizer (what its updates do or its state's structure, "
    "e.g. the learning rate)",
    "sampler": "the sampler (its configuration, e.g. the task or the loss)",
    "key": "the key",
    "initial_state": "the starting state (`state=`; to continue a run in its "
    "`checkpoint_dir`, rerun it with a larger `num_steps` instead)",
}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_DEPTH = 16
_SMALL = 8  # leaves with at most this many entries count as configuration (e.g. beta)
_MANTISSA_BITS = 30  # floats are hashed to ~9 significant digits: platform round-off aside


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class _Hasher:
    """SHA-256 of a deterministic description of Python objects and pytrees."""

    def __init__(self):
        self._h = hashlib.sha256()

    def text(self, s: str):
        self._h.update(_ADDRESS.sub(" at 0x?", s).encode() + b"\x00")

    def array(self, a, values: bool = True):
        if _is_key(a):
            self.text(f"key:{jax.random.key_impl(a)}")
            a = jax.random.key_data(a)
        a = np.asarray(a)
        self.text(f"array:{a.dtype.str}:{a.shape}")
        if not values:
            return
        if np.issubdtype(a.dtype, np.inexact):
            # rounded to _MANTISSA_BITS, so that the last bits of a float
            # (another platform's round-off) do not make another run
            a = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)
            parts = (a.real, a.imag) if np.iscomplexobj(a) else (a,)
            for p in parts:
                m, e = np.frexp(np.where(np.isfinite(p), p, 0.0))
                q = np.ldexp(np.round(m * 2.0**_MANTISSA_BITS), e)
                self._h.update(np.ascontiguousarray(q).tobytes())
                self._h.update(np.isnan(p).tobytes() + np.isposinf(p).tobytes())
                self._h.update(np.isneginf(p).tobytes())
        else:
            self._h.update(np.ascontiguousarray(a).tobytes())

    def obj(self, x, depth: int = 0, seen: frozenset = frozenset()):
        """Any object: numbers and strings by value, arrays by dtype, shape and
        values, functions by name, code, defaults, closure and the data
        globals they read, pytrees by structure and leaves; anything else by
        its type's name."""
        if depth > _MAX_DEPTH:
            self.text(f"deep:{type(x).__qualname__}")
            return
        if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
            self.text(f"{type(x).__name__}:{x!r}")
            return
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            self.array(x)
            return
        if isinstance(x, type):
            self.text(f"class:{x.__module__}.{x.__qualname__}")
            return
        if isinstance(x, (set, frozenset)):
            self.text(f"set:{sorted(map(repr, x))}")
            return
        if isinstance(x, types.CodeType):
            self._code(x, depth, seen)
            return
        if id(x) in seen:
            self.text(f"cycle:{type(x).__qualname__}")
            return
        seen = seen | {id(x)}
        if isinstance(x, functools.partial):
            self.text("partial")
            for part in (x.func, x.args, x.keywords):
                self.obj(part, depth + 1, seen)
            return
        if inspect.ismethod(x):
            self.text("method")
            self.obj(x.__func__, depth + 1, seen)
            self.obj(x.__self__, depth + 1, seen)
            return
        if isinstance(x, types.FunctionType):
            self._function(x, depth, seen)
            return
        leaves, treedef = jax.tree_util.tree_flatten(x)
        if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # not a container
            self.text(f"object:{type(x).__module__}.{type(x).__qualname__}")
            return
        self.text(f"tree:{treedef}")
        for leaf in leaves:
            self.obj(leaf, depth + 1, seen)

    def _code(self, code, depth, seen):
        self.text(f"code:{code.co_name}:{code.co_names}")
        self._h.update(code.co_code)
        for const in code.co_consts:
            self.obj(const, depth + 1, seen)

    def _function(self, f, depth, seen):
        self.text(f"function:{f.__module__}.{f.__qualname__}")
        self._code(f.__code__, depth, seen)
        self.obj(f.__defaults__, depth + 1, seen)
        self.obj(f.__kwdefaults__, depth + 1, seen)
        for cell in f.__closure__ or ():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                content = "<empty cell>"
            self.obj(content, depth + 1, seen)
        # module-level data the function reads (a task, an array, a rate)
        for name in sorted(_global_names(f.__code__)):
            value = f.__globals__.get(name)
            if isinstance(
                value, (bool, int, float, complex, str, jax.Array, np.ndarray, eqx.Module)
            ):
                self.text(f"global:{name}")
                self.obj(value, depth + 1, seen)

    def hexdigest(self, n: int = 16) -> str:
        return self._h.hexdigest()[:n]


def _global_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _digest(*objs) -> str:
    h = _Hasher()
    for x in objs:
        h.obj(x)
    return h.hexdigest()


def _model_parts(model) -> tuple[str, str]:
    """(structure and configuration, all leaf values) of a model."""
    leaves, treedef = jax.tree_util.tree_flatten(model)
    structure, values = _Hasher(), _Hasher()
    structure.text(f"tree:{treedef}")
    for leaf in leaves:
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            small = np.size(leaf) <= _SMALL and not _is_key(leaf)
            structure.array(leaf, values=small)
            values.array(leaf)
        else:
            structure.obj(leaf)
            values.obj(leaf)
    return structure.hexdigest(), values.hexdigest()


def _probe_tree(params, fn):
    """Fixed values on the tree structure of `params`, every axis of length at
    most 2 (so that a deeper or wider model does not read as another optimizer)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out = []
    for i, leaf in enumerate(leaves):
        shape = tuple(min(int(n), 2) for n in np.shape(leaf))
        t = np.arange(int(np.prod(shape)), dtype=np.float64) + 1.0 + 0.37 * i
        out.append(jnp.asarray(fn(t).reshape(shape), dtype=jnp.result_type(leaf)))
    return jax.tree_util.tree_unflatten(treedef, out)


def _optimizer_part(optimizer, params) -> str:
    """What `optimizer` does: its (init, update) functions with what their
    closures hold, its state's structure, and the updates it makes in two
    steps from its init state on fixed parameters and gradients with the tree
    structure of `params` (which catches a learning rate hidden where the
    closures do not show it)."""
    h = _Hasher()
    h.obj(tuple(optimizer))
    p = _probe_tree(params, lambda t: 0.5 * np.cos(t))
    g = _probe_tree(params, lambda t: 0.1 * np.sin(t))
    try:
        opt_state = optimizer.init(p)
        leaves, treedef = jax.tree_util.tree_flatten(opt_state)
        h.text(f"state:{treedef}")
        for leaf in leaves:
            if hasattr(leaf, "shape"):
                h.array(leaf, values=False)
            else:
                h.obj(leaf)
        for _ in range(2):
            updates, opt_state = optimizer.update(g, opt_state, p)
            for leaf in jax.tree_util.tree_leaves(updates):
                h.array(leaf)
            p = jax.tree.map(lambda a, u: a + u, p, updates)
    except Exception as e:
        if hasattr(e, "add_note"):
            e.add_note("mfattn.train: raised while fingerprinting `optimizer` for the checkpoints")
        raise
    return h.hexdigest()


def run_fingerprint(
    model, optimizer, sampler, key, *, batch_size: int, steps_per_call: int, state=None
) -> dict:
    """The fingerprint of a training run: a dict of hashes of what makes the
    run (the model's structure and configuration, its initial parameters, the
    optimizer, the sampler, the key, the starting state) and its `batch_size`
    and `steps_per_call`. `num_steps` is not part of it: a run continued to
    more steps is the same run.

    **Arguments:**

    - `model`, `optimizer`, `sampler`, `key`, `batch_size`, `steps_per_call`:
      as given to [`mfattn.train`][].
    - `state`: the `state=` given to `train`, or `None` (a fresh start).

    **Returns:** a dict with the keys of `PARTS`.
    """
    structure, values = _model_parts(model)
    if state is None:
        initial = "fresh"
    else:
        initial = _digest(state.step, state.opt_state)
    return {
        "model": structure,
        "model_parameters": values,
        "optimizer": _optimizer_part(optimizer, model.params),
        "sampler": _digest(sampler),
        "key": _digest(key),
        "initial_state": initial,
        "batch_size": int(batch_size),
        "steps_per_call": int(steps_per_call),
    }


def run_id(fingerprint: dict) -> str:
    """A 12-digit hex name of the run with this fingerprint."""
    text = json.dumps(fingerprint, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def differences(here: dict, there: dict) -> dict[str, str]:
    """What differs between this run's fingerprint and another's: the parts
    that differ, each with a description in words."""
    out = {}
    for part in PARTS:
        a, b = here.get(part), there.get(part)
        if a == b:
            continue
        if part == "model_parameters" and "model" in out:
            continue  # another structure has other values: say it once
        if part in ("batch_size", "steps_per_call"):
            out[part] = f"`{part}` ({a} here, {b} there)"
        else:
            out[part] = _LABELS[part]
    for part in sorted(set(there) - set(PARTS)):
        out[part] = f"an unknown part {part!r}"
    return out
