"""Checkpoints: Equinox serialisation, written atomically, verified on load,
named by the run that wrote them."""

import hashlib
import io
import json
import os
import pathlib
import re
import secrets
import warnings

import equinox as eqx
import jax
import numpy as np

from ._fingerprint import run_id

_PREFIX = "ckpt-"
# ckpt-STEP.json (written without a run), ckpt-STEP-RUN.json (by a run)
_NAME = re.compile(r"^ckpt-(\d+)(?:-([0-9a-f]{12}))?\.json$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = {"step": int, "state": str, "state_sha256": str, "history": str, "history_sha256": str}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or malformed."""


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


def check_count(value, name: str, minimum: int):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    if value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"`{name}` must be a {kind} int, got {value!r}")
    return int(value)


def _fsync_directory(directory: pathlib.Path):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: pathlib.Path, data: bytes):
    """Write `data` to a temporary name unique to this process and call
    (pid and a random suffix), flush it to disk and rename it to `path`; on
    failure the temporary file is removed."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def checkpoint_entries(directory) -> list[tuple[int, str | None, pathlib.Path]]:
    """`(step, run, manifest)` for the manifests in `directory`, in the order of
    their steps as numbers (then of their run ids)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for path in directory.glob(f"{_PREFIX}*.json"):
        match = _NAME.match(path.name)
        if match:
            out.append((int(match[1]), match[2], path))
    return sorted(out, key=lambda e: (e[0], e[1] or "", e[2].name))


def _remove(manifest: pathlib.Path):
    # the manifest first: a checkpoint half removed is absent, not corrupted
    for suffix in (".json", ".eqx", ".npz"):
        manifest.with_suffix(suffix).unlink(missing_ok=True)


def save_checkpoint(
    directory,
    step: int,
    state,
    history: dict | None = None,
    keep: int = 2,
    *,
    allow_nonfinite: bool = False,
    fingerprint: dict | None = None,
    metadata: dict | None = None,
):
    """Write `state` (any pytree, e.g. parameters, optimiser state, step and
    key) and a `history` of numpy arrays as checkpoint number `step`.

    Each file is written to a temporary name unique to this process (its pid
    and a random suffix), flushed to disk and renamed; the manifest (holding
    the SHA-256 of the other two files) is written last, so a checkpoint exists
    only once complete. If a write fails (a full disk), what was written of
    this checkpoint is removed and the error raised; older checkpoints are
    untouched.

    **Arguments:**

    - `directory`: where to write (created if missing).
    - `step`: the checkpoint's number, a non-negative int.
    - `state`, `history`: what to write.
    - `keep`: a positive int: of the checkpoints of the same run (the same
      `fingerprint`, or all written without one) numbered up to `step`, keep
      the newest `keep` and remove the rest, once the new one is complete.
      Checkpoints of other runs and newer ones are never removed.
    - `allow_nonfinite`: write a state that holds a NaN or an infinity.
    - `fingerprint`: the fingerprint of the run that writes it (a dict, as
      [`mfattn.train`][] makes), recorded in the manifest and named in the
      files' names (`ckpt-00000005-<run>.json`); `None` writes
      `ckpt-00000005.json`.
    - `metadata`: a JSON-serialisable dict kept in the manifest.

    **Returns:** the manifest path.

    **Raises:** `ValueError` naming the leaf if `state` holds a NaN or an
    infinity (nothing is written, nothing removed), unless `allow_nonfinite`;
    `TypeError`/`ValueError` naming `step` or `keep`; `OSError` if the disk
    refuses the write.
    """
    step = check_count(step, "step", 0)
    keep = check_count(keep, "keep", 1)
    if not allow_nonfinite:
        bad = nonfinite_leaves(state)
        if bad:
            raise ValueError(
                f"refusing to write checkpoint {step}: non-finite values in {', '.join(bad)}"
            )
    run = None if fingerprint is None else run_id(fingerprint)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / (f"{_PREFIX}{step:08d}" + ("" if run is None else f"-{run}"))
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, _unwrap_keys(state))
    state_bytes = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, **(history or {}))
    hist_bytes = buf.getvalue()
    manifest = {
        "format": 2,
        "step": step,
        "state": stem.with_suffix(".eqx").name,
        "state_sha256": _sha256(state_bytes),
        "history": stem.with_suffix(".npz").name,
        "history_sha256": _sha256(hist_bytes),
    }
    if run is not None:
        manifest.update(run=run, fingerprint=fingerprint)
    if metadata:
        manifest["metadata"] = metadata
    # rewriting a checkpoint: it is absent until complete again
    stem.with_suffix(".json").unlink(missing_ok=True)
    try:
        _atomic_write(stem.with_suffix(".eqx"), state_bytes)
        _atomic_write(stem.with_suffix(".npz"), hist_bytes)
        _atomic_write(stem.with_suffix(".json"), json.dumps(manifest, indent=1).encode())
    except BaseException:
        _remove(stem.with_suffix(".json"))
        raise
    _fsync_directory(directory)
    own = [path for s, r, path in checkpoint_entries(directory) if r == run and s <= step]
    for old in own[:-keep]:
        _remove(old)
    return stem.with_suffix(".json")


def list_checkpoints(directory, run: str | None = None) -> list[pathlib.Path]:
    """The manifests in `directory`, oldest first: in the order of their steps
    as numbers, at any number of digits.

    **Arguments:**

    - `directory`: where to look (a missing directory holds none).
    - `run`: only those of the run with this id (the `run` of a manifest,
      also in its file name); `None` lists all.

    **Returns:** a list of paths.
    """
    return [path for _, r, path in checkpoint_entries(directory) if run is None or r == run]


def _malformed(path, why):
    return CheckpointError(f"checkpoint manifest {path} is malformed: {why}")


def read_manifest(path) -> dict:
    """The manifest at `path`, checked: every key present with the right type,
    file names inside the manifest's directory, a step that matches the name,
    and a run id that matches the fingerprint.

    **Raises:** [`mfattn.CheckpointError`][] naming the file if it is
    unreadable or malformed.
    """
    path = pathlib.Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or incomplete: {e}") from e
    if not isinstance(manifest, dict):
        raise _malformed(path, f"a JSON {type(manifest).__name__}, not an object")
    for key, kind in _REQUIRED.items():
        if key not in manifest:
            raise _malformed(path, f"no {key!r}")
        value = manifest[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise _malformed(path, f"{key!r} is {value!r}, not a {kind.__name__}")
    if manifest["step"] < 0:
        raise _malformed(path, f"'step' is {manifest['step']}")
    for key in ("state", "history"):
        name = manifest[key]
        if name in ("", ".", "..") or pathlib.PurePath(name).name != name or "\\" in name:
            raise _malformed(path, f"{key!r} is {name!r}, not a file name")
    for key in ("state_sha256", "history_sha256"):
        if not _SHA256.match(manifest[key]):
            raise _malformed(path, f"{key!r} is {manifest[key]!r}, not a SHA-256")
    named = _NAME.match(path.name)
    if named and int(named[1]) != manifest["step"]:
        raise _malformed(path, f"'step' is {manifest['step']}, its name says {int(named[1])}")
    if "fingerprint" in manifest or "run" in manifest:
        fingerprint, run = manifest.get("fingerprint"), manifest.get("run")
        if not isinstance(fingerprint, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool)
            for k, v in fingerprint.items()
        ):
            raise _malformed(path, f"'fingerprint' is {fingerprint!r}")
        if not isinstance(run, str) or run != run_id(fingerprint):
            raise _malformed(path, f"'run' is {run!r}, not the id of its fingerprint")
        if named and named[2] != run:
            raise _malformed(path, f"'run' is {run!r}, its name says {named[2]!r}")
    elif named and named[2] is not None:
        raise _malformed(path, f"no 'fingerprint', but its name names run {named[2]!r}")
    if not isinstance(manifest.get("metadata", {}), dict):
        raise _malformed(path, f"'metadata' is {manifest['metadata']!r}")
    return manifest


def load_checkpoint(path, like, *, allow_nonfinite: bool = False):
    """Load the checkpoint whose manifest is `path` into the structure of `like`.

    **Returns:** `(step, state, history)`.

    **Raises:** [`mfattn.CheckpointError`][] naming the file if anything is
    missing, truncated, corrupted (checksum mismatch), malformed (a manifest
    with a missing key or a wrong type, an unreadable history), does not match
    `like`, or (unless `allow_nonfinite`) holds a NaN or an infinity.
    """
    path = pathlib.Path(path)
    manifest = read_manifest(path)
    state_path = path.with_name(manifest["state"])
    hist_path = path.with_name(manifest["history"])
    try:
        state_bytes = state_path.read_bytes()
        hist_bytes = hist_path.read_bytes()
    except OSError as e:
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
    try:
        with np.load(io.BytesIO(hist_bytes)) as data:
            history = {k: data[k] for k in data.files}
    except Exception as e:
        raise CheckpointError(f"checkpoint file {hist_path} is not a readable .npz: {e}") from e
    return manifest["step"], state, history


def load_latest(
    directory,
    like,
    *,
    allow_nonfinite: bool = False,
    run: str | None = None,
    max_step: int | None = None,
):
    """The newest valid checkpoint in `directory`, or `None` if there is none.
    A corrupted or malformed (or, unless `allow_nonfinite`, non-finite) newer
    checkpoint is skipped with a warning naming it.

    **Arguments:**

    - `directory`, `like`, `allow_nonfinite`: as for [`mfattn.load_checkpoint`][].
    - `run`: only checkpoints of the run with this id (see
      [`mfattn.list_checkpoints`][]); `None`: any.
    - `max_step`: only checkpoints numbered up to `max_step`.

    **Returns:** `(step, state, history)` or `None`.
    """
    for path in reversed(list_checkpoints(directory, run)):
        if max_step is not None and int(_NAME.match(path.name)[1]) > max_step:
            continue
        try:
            return load_checkpoint(path, like, allow_nonfinite=allow_nonfinite)
        except CheckpointError as e:
            warnings.warn(f"skipping bad checkpoint: {e}", stacklevel=2)
    return None
