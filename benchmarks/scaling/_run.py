"""The study's orchestration: which conditions a configuration runs, their
per-condition files (written atomically; an interrupted run resumes there), and
the study JSON with its fits and PNGs.

Started once per process under `jax.distributed`, the processes split the
conditions (`mfattn.process_share`, round-robin over their order); each
writes the files of its own, and after a barrier process 0 alone reads them
all and writes the study JSON and the PNGs. The per-condition files must be
on a file system every process sees."""

import contextlib
import json
import os
import pathlib
import tempfile
import time
import traceback
import warnings
from collections.abc import Mapping

import jax

import mfattn

from ._condition import Condition
from ._config import PRESETS, StudyConfig, condition_name, sweep_condition_name
from ._plots import plot
from ._records import ConditionResult, FailedCondition
from ._summary import report, summarize


def conditions(cfg: StudyConfig) -> dict:
    """`{name: (dim, tokens, opt, causal, grid)}`, in the order they run: the
    main grid, the `d` sweep, the `n` sweep."""
    grid = [(L, H) for L in cfg.L for H in cfg.H]
    sweep = [tuple(cfg.sweep_LH)]
    out = {}

    def add(dim, tokens, opt, causal, pts, main=False):
        if main:
            name = condition_name(dim, tokens, opt, causal)
        else:
            name = sweep_condition_name(cfg, dim, tokens, opt, causal)
        if name in out:
            have = out[name][4]
            out[name] = (dim, tokens, opt, causal, have + [p for p in pts if p not in have])
        else:
            out[name] = (dim, tokens, opt, causal, list(pts))

    add(cfg.dim, cfg.tokens, cfg.optimizers[0], False, grid, main=True)
    for d in cfg.d_sweep:  # every optimiser at one d before the next d
        for opt in cfg.optimizers:
            add(d, cfg.tokens, opt, False, sweep)
    for n in cfg.n_sweep:
        add(cfg.dim, n, cfg.optimizers[0], False, sweep)
        if cfg.causal_sweep:
            add(cfg.dim, n, cfg.optimizers[0], True, sweep)
    return out


def as_config(preset) -> StudyConfig:
    """A preset's name (`"quick"`, `"medium"`, `"full"`), a `StudyConfig`, or a
    mapping of its settings, as a `StudyConfig`.

    **Raises:** `ValueError` for an unknown preset name or settings.
    """
    if isinstance(preset, StudyConfig):
        return preset
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {preset!r}")
        return PRESETS[preset]
    if isinstance(preset, Mapping):
        return StudyConfig.from_json(preset)
    raise TypeError(f"`preset` must be a name, a StudyConfig or a mapping, got {preset!r}")


def write_json(path, obj) -> None:
    """Write `obj` as JSON to `path` atomically: a unique temporary file in the
    same directory, flushed and synced, then renamed over `path` (a reader sees
    the old file or the new one, never a part)."""
    path = pathlib.Path(path)
    text = json.dumps(obj, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # what `open` would give a new file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, on file systems that allow it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_condition(path, then: str):
    """The record in a per-condition file, or `None` where there is none; a
    truncated or corrupt file gives `None` with a warning naming it and what
    happens `then`."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(res, dict) or res.get("status") not in ("done", "failed"):
            raise ValueError("not a condition's record")
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"{path} is truncated or corrupt ({e}); {then}", RuntimeWarning, stacklevel=2)
        return None
    return res


def _paths(preset, out):
    cfg = as_config(preset)
    name = preset if isinstance(preset, str) else "custom"
    out = pathlib.Path(out or f"benchmarks/results/scaling_{name}.json")
    return cfg, out, out.with_name(out.stem + "_points")


def run(preset="quick", out=None, *, progress=True, retry_failed=False, summarize_only=False):
    """Run (or resume) the study; write the per-condition results, `out` (JSON)
    and its PNGs, and return the JSON data.

    **Arguments:**

    - `preset`: a preset's name, a `StudyConfig`, or a mapping of its settings.
    - `out`: the study JSON (default `benchmarks/results/scaling_<preset>.json`);
      the per-condition files go to `<out>_points/`, the PNGs next to `out`.
    - `progress`: print progress lines and the report.
    - `retry_failed`: run the conditions recorded as failed again.
    - `summarize_only`: only rebuild `out` and the PNGs from the per-condition
      files already there.

    Under `jax.distributed` (every process calls this with the same
    arguments): each process runs its share of the conditions and writes their
    files, progress lines start with its index (`[p1]`), and process 0 alone
    writes `out` and the PNGs and prints the report.

    **Returns:** the study JSON's data (a dict; on the other processes under
    `jax.distributed`, as read back from `out`).

    **Raises:** `ValueError` if the results directory holds another
    configuration, or its `config.json` cannot be read.
    """
    cfg, out, pdir = _paths(preset, out)
    pdir.mkdir(parents=True, exist_ok=True)
    cfg_file = pdir / "config.json"
    if cfg_file.exists():
        try:
            have = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{cfg_file} cannot be read ({e}); remove it if the results in {pdir} are "
                "of this configuration, or pass another `out`"
            ) from e
        if have != cfg.to_json():
            raise ValueError(f"{pdir} holds results of another configuration; pass another `out`")
    main = mfattn.is_main_process()
    if main:
        write_json(cfg_file, cfg.to_json())
    # every process shows the lines of its own share, marked with its index
    rank = f"[p{jax.process_index()}] " if jax.process_count() > 1 else ""

    def log(line):
        if progress:
            print(rank + line, flush=True)

    t0 = time.perf_counter()
    conds = conditions(cfg)
    share = [] if summarize_only else mfattn.process_share(enumerate(conds.items()))
    for i, (cname, (dim, tokens, opt, causal, grid)) in share:
        f = pdir / f"{cname}.json"
        old = read_condition(f, f"condition {cname} is computed again")
        if old is not None and (old["status"] != "failed" or not retry_failed):
            log(f"[{i + 1}/{len(conds)}] {cname}: {old['status']} (skipped)")
            continue
        log(f"[{i + 1}/{len(conds)}] {cname}: grid {grid}")
        try:
            if cname == cfg.main_condition:
                M, J, steps = cfg.particles, cfg.nodes, None
            else:  # the sweeps' own reference and training length, where given
                M, J = cfg.sweep("particles"), cfg.sweep("nodes")
                steps = (cfg.sweep("steps"), cfg.sweep("record_every"))
            res = Condition(cfg, dim, tokens, opt, causal, grid, M, nodes=J, steps=steps).run(log)
            if not isinstance(res, ConditionResult):
                raise TypeError(f"Condition.run returned {type(res).__name__}")
        except Exception as e:  # a failed point is recorded and skipped
            res = FailedCondition(repr(e), traceback.format_exc())
            log(f"  FAILED: {e!r}")
        write_json(f, res.to_json())
    mfattn.barrier("benchmarks.scaling: every process's conditions")
    if not main:  # process 0 summarises; the others return what it wrote
        mfattn.barrier("benchmarks.scaling: the study JSON")
        return json.loads(out.read_text(encoding="utf-8"))
    # the JSON: the configuration (with its short names), every condition's raw
    # results, the fits
    data = {"config": cfg.study_json(), "points": {}, "failed": {}}
    for cname in conds:
        res = read_condition(
            pdir / f"{cname}.json", f"condition {cname} is left out of the summary"
        )
        if res is not None:
            (data["failed"] if res["status"] == "failed" else data["points"])[cname] = res
    data["not_run"] = [c for c in conds if c not in data["points"] and c not in data["failed"]]
    data["wall_seconds_this_run"] = time.perf_counter() - t0
    data["wall_seconds"] = sum(p.get("wall_seconds", 0.0) for p in data["points"].values())
    data.update(summarize(data))
    write_json(out, data)
    plot(data, out)
    if progress:
        print(report(data))
    mfattn.barrier("benchmarks.scaling: the study JSON")
    return data
