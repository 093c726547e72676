"""A training run's view of its checkpoint directory: the directory opened
and locked before any work, the run's own checkpoints told from other runs',
the one to resume from, and the writes."""

import pathlib
import warnings

from ._checkpoint import (
    CheckpointError,
    checkpoint_entries,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from ._fingerprint import differences, run_id
from ._lock import DirectoryLock, remove_stale_temporaries


def open_checkpoint_dir(checkpoint_dir):
    """Create `checkpoint_dir`, lock it (which tests that files can be written
    there) and remove what a killed run left of its writes."""
    try:
        path = pathlib.Path(checkpoint_dir)
    except TypeError:
        raise TypeError(
            f"`checkpoint_dir` must be a path or None, got {type(checkpoint_dir).__name__}"
        ) from None
    if path.exists() and not path.is_dir():
        raise ValueError(f"`checkpoint_dir` {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"`checkpoint_dir` {path} cannot be created: {e}") from e
    lock = DirectoryLock(path)
    try:
        lock.acquire()
    except OSError as e:
        raise ValueError(f"`checkpoint_dir` {path} is not writable: {e}") from e
    try:
        remove_stale_temporaries(path)
    except OSError:  # pragma: no cover
        pass
    return path, lock


class CheckpointRun:
    """A run's view of its checkpoint directory: which checkpoints are its
    own, which it may resume from, and which belong to other runs."""

    def __init__(self, directory, fingerprint, num_steps, allow_optimizer_change):
        self.directory = directory
        self.fingerprint = fingerprint
        self.id = run_id(fingerprint)
        self.num_steps = num_steps
        self.allow_optimizer_change = allow_optimizer_change

    def survey(self):
        """`(usable, has_own, foreign)`: the checkpoints this run may resume
        from (newest first, numbered up to `num_steps`, as `(path, adopted)`),
        whether it has any of its own, and the others' as
        `(path, step, differences)`. Malformed manifests of other runs are
        skipped with a warning."""
        usable, foreign, has_own = [], [], False
        for step, tag, path in checkpoint_entries(self.directory):
            if tag == self.id:
                has_own = True
                if step <= self.num_steps:
                    usable.append((step, 0, path, False))
                continue
            try:
                theirs = read_manifest(path).get("fingerprint")
            except CheckpointError as e:
                warnings.warn(f"skipping bad checkpoint: {e}", stacklevel=5)
                continue
            if theirs is None:
                diff = {
                    "fingerprint": "it was written without a run fingerprint (by "
                    "`mfattn.save_checkpoint` or an older mfattn), so it cannot be told to "
                    "be this run's"
                }
            else:
                diff = differences(self.fingerprint, theirs)
            if self.allow_optimizer_change and list(diff) == ["optimizer"]:
                has_own = True
                if step <= self.num_steps:
                    usable.append((step, 1, path, True))
                continue
            foreign.append((path, step, diff))
        usable.sort(key=lambda u: (-u[0], u[1]))
        return [(path, adopted) for _, _, path, adopted in usable], has_own, foreign

    def resume(self, like):
        """Load the checkpoint to resume from: `(path, state, history)` or `None`.

        **Raises:** `ValueError` before any work if the directory holds other
        runs' checkpoints and none of this run's."""
        usable, has_own, foreign = self.survey()
        for path, adopted in usable:
            try:
                manifest = read_manifest(path)
                if not adopted and manifest.get("fingerprint") != self.fingerprint:
                    raise CheckpointError(f"checkpoint {path} names this run but is another's")
                _, state, history = load_checkpoint(path, like)
            except CheckpointError as e:
                warnings.warn(f"skipping bad checkpoint: {e}", stacklevel=4)
                continue
            if adopted:
                warnings.warn(
                    f"resuming from {path.name}, written by a run with another optimizer "
                    "(allow_optimizer_change=True); it is kept, and this run writes its own "
                    "checkpoints",
                    stacklevel=4,
                )
            return path, state, history
        if not has_own and foreign:
            raise self._foreign_error(foreign)
        return None

    def _foreign_error(self, foreign):
        path, step, diff = min(foreign, key=lambda f: (len(f[2]), -f[1]))
        message = (
            f"`checkpoint_dir` {self.directory} holds checkpoints of other runs and none of "
            f"this one; the closest, {path.name} (step {step}), differs in: "
            f"{'; '.join(diff.values())}. Nothing was trained. Use another `checkpoint_dir`, "
            "or pass `resume=False` to start this run afresh beside them (they are kept)."
        )
        if list(diff) == ["optimizer"]:
            message += (
                " To continue that run with this optimizer (e.g. a smaller learning rate "
                "after a divergence), pass `allow_optimizer_change=True`."
            )
        return ValueError(message)

    def resumable(self, like):
        """The checkpoint a rerun would resume from (verified), or `None`;
        quietly."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            usable, _, _ = self.survey()
            for path, _ in usable:
                try:
                    load_checkpoint(path, like)
                except CheckpointError:
                    continue
                return path
        return None

    def save(self, step, state, history, keep):
        try:
            return save_checkpoint(
                self.directory,
                step,
                state,
                history,
                keep,
                fingerprint=self.fingerprint,
                metadata={"num_steps": self.num_steps},
            )
        except OSError as e:
            kept = self.resumable(state)
            _add_note(
                e,
                f"mfattn.train: writing the checkpoint of step {step} to {self.directory} "
                "failed; nothing of it was left, and the earlier checkpoints are kept"
                + ("" if kept is None else f" (a rerun resumes from {kept.name})"),
            )
            raise


def _add_note(error, note):
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(note)
