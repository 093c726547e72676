"""Checkpoints: Equinox serialisation, written atomically, verified on load."""

import hashlib
import io
import json
import os
import pathlib
import warnings

import equinox as eqx
import jax
import numpy as np

_PREFIX = "ckpt-"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupted."""


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _unwrap_keys(tree):
    """Typed PRNG keys are stored as their raw `uint32` data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _rewrap_keys(tree, like):
    return jax.tree.map(
        lambda x, ref: (
            jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if _is_key(ref) else x
        ),
        tree,
        like,
    )


def nonfinite_leaves(tree, name: str = "state") -> list[str]:
    """The paths (e.g. `state.model.params.Q`) of the floating leaves of `tree`
    that hold a NaN or an infinity."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_key(leaf):
            continue
        a = np.asarray(leaf) if hasattr(leaf, "dtype") or isinstance(leaf, float) else None
        if a is not None and np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            bad.append(name + jax.tree_util.keystr(path))
    return bad


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: pathlib.Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    directory,
    step: int,
    state,
    history: dict | None = None,
    keep: int = 2,
    *,
    allow_nonfinite: bool = False,
):
    """Write `state` (any pytree, e.g. parameters, optimiser state, step and
    key) and a `history` of numpy arrays as checkpoint number `step`.

    Each file is written to a temporary name and renamed; the manifest
    (`ckpt-STEP.json`, holding the SHA-256 of the other two files) is written
    last, so a checkpoint exists only once complete. Older checkpoints beyond
    the last `keep` are removed only after the new one is complete.

    **Returns:** the manifest path.

    **Raises:** `ValueError` naming the leaf if `state` holds a NaN or an
    infinity (nothing is written, nothing removed), unless `allow_nonfinite`.
    """
    if not allow_nonfinite:
        bad = nonfinite_leaves(state)
        if bad:
            raise ValueError(
                f"refusing to write checkpoint {step}: non-finite values in {', '.join(bad)}"
            )
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{_PREFIX}{step:08d}"
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, _unwrap_keys(state))
    state_bytes = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, **(history or {}))
    hist_bytes = buf.getvalue()
    _atomic_write(stem.with_suffix(".eqx"), state_bytes)
    _atomic_write(stem.with_suffix(".npz"), hist_bytes)
    manifest = {
        "step": int(step),
        "state": stem.with_suffix(".eqx").name,
        "state_sha256": _sha256(state_bytes),
        "history": stem.with_suffix(".npz").name,
        "history_sha256": _sha256(hist_bytes),
    }
    _atomic_write(stem.with_suffix(".json"), json.dumps(manifest, indent=1).encode())
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        for suffix in (".json", ".eqx", ".npz"):
            old.with_suffix(suffix).unlink(missing_ok=True)
    return stem.with_suffix(".json")


def list_checkpoints(directory) -> list[pathlib.Path]:
    """Manifests in `directory`, oldest first."""
    directory = pathlib.Path(directory)
    if not directory.exists():
        return []
    return sorted(directory.glob(f"{_PREFIX}*.json"))


def load_checkpoint(path, like, *, allow_nonfinite: bool = False):
    """Load the checkpoint whose manifest is `path` into the structure of `like`.

    **Returns:** `(step, state, history)`.

    **Raises:** [`mfattn.CheckpointError`][] naming the file if anything is
    missing, truncated, corrupted (checksum mismatch), does not match `like`,
    or (unless `allow_nonfinite`) holds a NaN or an infinity.
    """
    path = pathlib.Path(path)
    try:
        manifest = json.loads(path.read_text())
        state_path = path.with_name(manifest["state"])
        hist_path = path.with_name(manifest["history"])
        state_bytes = state_path.read_bytes()
        hist_bytes = hist_path.read_bytes()
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or incomplete: {e}") from e
    if _sha256(state_bytes) != manifest["state_sha256"]:
        raise CheckpointError(
            f"checkpoint file {state_path} is truncated or corrupted (checksum mismatch)"
        )
    if _sha256(hist_bytes) != manifest["history_sha256"]:
        raise CheckpointError(
            f"checkpoint file {hist_path} is truncated or corrupted (checksum mismatch)"
        )
    try:
        raw = eqx.tree_deserialise_leaves(io.BytesIO(state_bytes), _unwrap_keys(like))
        state = _rewrap_keys(raw, like)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {state_path} does not match the model/optimiser structure: {e}"
        ) from e
    if not allow_nonfinite:
        bad = nonfinite_leaves(state)
        if bad:
            raise CheckpointError(
                f"checkpoint {state_path} holds non-finite values in {', '.join(bad)}"
            )
    with np.load(io.BytesIO(hist_bytes)) as data:
        history = {k: data[k] for k in data.files}
    return manifest["step"], state, history


def load_latest(directory, like, *, allow_nonfinite: bool = False):
    """The newest valid checkpoint in `directory`, or `None` if there is none.
    A corrupted (or, unless `allow_nonfinite`, non-finite) newer checkpoint is
    skipped with a warning naming it."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, like, allow_nonfinite=allow_nonfinite)
        except CheckpointError as e:
            warnings.warn(f"skipping bad checkpoint: {e}", stacklevel=2)
    return None
