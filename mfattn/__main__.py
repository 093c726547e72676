"""`python -m mfattn` (or `mfattn`): the main job on its built-in default, and
its other jobs as subcommands.

    mfattn                    # the seed theorem's study, --quick preset (about
                              # two minutes): a table of what its data support,
                              # results in results/theorem7_quick.json and PNGs
    mfattn theorem7 [--quick | --gpu] [--out FILE] ...   # that study (full preset
                              # without a flag; `mfattn theorem7 --help`)
    mfattn scaling [--quick | --medium] [--out FILE] ...   # the convergence study
                              # against the trained limit (`mfattn scaling --help`)
    mfattn train [options]    # train one transformer (`mfattn train --help`)
    mfattn kernel             # build the fused CPU kernel now (else on first use)
                              # and say where it is and how many threads it runs

The studies live in `benchmarks/theorem7/` and `benchmarks/scaling/` of the
repository (they are no part of the library): `mfattn`, `mfattn theorem7` and
`mfattn scaling` run them from a clone (`pip install -e . && python -m mfattn`
at the repository's root).

`mfattn train` trains a small discrete transformer (L=8 layers, H=8 heads,
d=4, k=4) with AdamW on the default in-context denoising task, prints the
held-out loss before and after, and writes the results (history JSON,
parameters, loss plot, checkpoints, and `summary.json` with every argument and
whether the run resumed from a checkpoint) to `--out` (default
`results/default`).
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import pathlib
import sys
import tempfile
import time

DEFAULT_STUDY = "theorem7"
DEFAULT_STUDY_ARGS = ("--quick", "--out", "results/theorem7_quick.json")
"""What `mfattn` without a command runs: `mfattn theorem7` with these flags."""
STUDIES = ("theorem7", "scaling")


def _study_main(name: str = "scaling"):
    """`benchmarks.<name>.main`, imported from the repository.

    **Raises:** `SystemExit` (status 1) with a message saying to run from a
    clone of the repository, if `benchmarks.<name>` cannot be imported.
    """
    module = f"benchmarks.{name}"
    try:
        study = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", module):
            raise  # something the study needs is missing: say what
        # the `mfattn` script does not put the working directory on sys.path
        # (`python -m` does): a clone's root holds benchmarks/<name>/
        cwd = pathlib.Path.cwd()
        if not (cwd / "benchmarks" / name / "__init__.py").is_file():
            sys.stderr.write(
                f"mfattn: the study is not part of the installed package: it lives in "
                f"benchmarks/{name}/ of the repository, which cannot be imported "
                f"here ({e}). Run this command from the root of a clone of the repository "
                "(pip install -e . && python -m mfattn).\n"
            )
            raise SystemExit(1) from None
        sys.modules.pop("benchmarks", None)  # a `benchmarks` found elsewhere
        sys.path.insert(0, str(cwd))
        study = importlib.import_module(module)
    return study.main


def _study(name, argv) -> int:
    _study_main(name)(list(argv), prog=f"mfattn {name}")
    return 0


def _scaling(argv) -> int:
    return _study("scaling", argv)


# --- `mfattn train`: arguments, checked before any work ------------------------
def _number(kind, low, strict, finite=True):
    """An argparse type: a `kind` (int or float) `>= low` (`> low` if
    `strict`), finite; its error names the bound (argparse adds the flag)."""
    bound = f"{'>' if strict else '>='} {low:g}"
    what = "an integer" if kind is int else "a finite number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}") from None
        if (finite and not math.isfinite(value)) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"
    return parse


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_number(int, 0, False), default=300, help="optimiser steps")
    p.add_argument("--depth", type=_number(int, 1, False), default=8, help="layers L")
    p.add_argument("--heads", type=_number(int, 1, False), default=8, help="heads H per layer")
    p.add_argument("--head-dim", type=_number(int, 1, False), default=4, help="head dimension k")
    p.add_argument("--beta", type=_number(float, 0, True), default=1.0, help="inverse temperature")
    p.add_argument("--lr", type=_number(float, 0, True), default=1e-2, help="learning rate")
    p.add_argument(
        "--weight-decay", type=_number(float, 0, False), default=1e-3, help="weight decay"
    )
    p.add_argument("--batch-size", type=_number(int, 1, False), default=16)
    p.add_argument("--optimizer", choices=["adamw", "blockwise"], default="adamw")
    p.add_argument("--seed", type=int, default=0, help="the PRNG seed of the run")
    p.add_argument(
        "--out", default="results/default", help="results directory (resumes its checkpoints)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh (beside any checkpoints of other runs in --out)",
    )


def _check_writable(parser: argparse.ArgumentParser, out: pathlib.Path) -> None:
    """Create `out` and write and remove a probe file there, or fail with a
    usage error naming `--out`."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".mfattn-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        parser.error(f"argument --out: cannot create or write {str(out)!r}: {e}")


def _write_json(path: pathlib.Path, obj) -> None:
    """`obj` as JSON in `path`, atomically (a temporary file renamed over it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out = pathlib.Path(args.out)
    _check_writable(parser, out)  # before any work
    config = {k: v for k, v in vars(args).items() if k != "command"}

    import jax
    import optax

    import mfattn

    task = mfattn.DenoisingTask()
    key = jax.random.key(args.seed)
    init_key, train_key, test_key = jax.random.split(key, 3)
    params = mfattn.AttentionParams.xavier_uniform(
        init_key, args.depth, args.heads, task.dim, args.head_dim
    )
    model = mfattn.DiscreteTransformer(params, args.beta)
    if args.optimizer == "adamw":
        opt = optax.adamw(args.lr, weight_decay=args.weight_decay)
    else:
        opt = mfattn.blockwise_adamw(args.lr, weight_decay=args.weight_decay)
    before = float(mfattn.evaluate(model, task, test_key, 512))
    print(f"held-out loss before training: {before:.5f}")
    t0 = time.perf_counter()
    try:
        result = mfattn.train(
            model,
            task,
            opt,
            args.steps,
            train_key,
            batch_size=args.batch_size,
            steps_per_call=50,
            checkpoint_dir=out / "checkpoints",
            checkpoint_every=100,
            resume=not args.no_resume,
            progress=not args.no_progress,
        )
    except (ValueError, RuntimeError) as e:  # another run's checkpoints, a locked directory
        if isinstance(e, mfattn.DivergenceError):
            raise
        print(f"mfattn train: error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    start = int(result.history["start_step"])
    resumed_from = start if start > 0 else None
    if resumed_from is not None:
        print(f"resumed this run from its checkpoint of step {start} in {out / 'checkpoints'}")
    after = float(mfattn.evaluate(result.model, task, test_key, 512))
    print(
        f"held-out loss after {args.steps} steps:  {after:.5f} "
        f"({100 * (1 - after / before):.1f}% lower, {wall:.1f} s)"
    )
    mfattn.save_results(
        out,
        result,
        {
            "heldout_before": before,
            "heldout_after": after,
            "args": config,
            "wall_seconds": wall,
        },
    )
    summary = {
        "heldout_before": before,
        "heldout_after": after,
        "steps": args.steps,
        "config": config,
        "resumed": resumed_from is not None,
        "resumed_from_step": resumed_from,
        "wall_seconds": wall,
    }
    _write_json(out / "summary.json", summary)
    print(
        f"results written to {out}/ (summary.json, history.json, params.eqx, loss.png, "
        "checkpoints/)"
    )
    return 0


# --- the command line -------------------------------------------------------------
def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line's parser and its `train` parser."""
    parser = argparse.ArgumentParser(
        prog="mfattn",
        description="The mean-field theory of deep transformers: the main job and its "
        "subcommands. Without a command: the seed theorem's study, quick preset "
        "(`mfattn theorem7 --quick --out results/theorem7_quick.json`).",
    )
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    # every argument of a study is the study's own: `main` forwards them as
    # they are (these entries are for the list of commands)
    sub.add_parser(
        "theorem7",
        add_help=False,
        help="the seed theorem at scale: fluctuation, bias, token sets (benchmarks/theorem7/)",
    )
    sub.add_parser(
        "scaling",
        add_help=False,
        help="the convergence study against the trained limit (benchmarks/scaling/)",
    )
    sub.add_parser(
        "kernel",
        help="build the fused CPU attention kernel now and say where it is",
    )
    train = sub.add_parser(
        "train",
        help="train one small transformer and write its results",
        description="Train one discrete transformer on the in-context denoising task.",
    )
    _train_arguments(train)
    return parser, train


def _kernel() -> int:
    """Build the fused CPU kernel and report; exit status 1 where it cannot be built."""
    from ._kernels import _fused

    t0 = time.perf_counter()
    err = _fused.fused_cpu_error()
    if err is not None:
        print(f"the fused CPU kernel is not available: {err}", file=sys.stderr)
        print("mfattn.AutoKernel uses the pure-JAX kernels instead", file=sys.stderr)
        return 1
    lib = _fused._build()
    print(f"fused CPU kernel: {lib} ({time.perf_counter() - t0:.1f} s)")
    print(f"threads: {_fused.fused_cpu_threads()} (OpenMP; OMP_NUM_THREADS to change)")
    return 0


def main(argv=None) -> int:
    """The `mfattn` command line.

    **Arguments:**

    - `argv`: the arguments (default `sys.argv[1:]`).

    **Returns:** the exit status (0).

    **Raises:** `SystemExit` (status 2) for a usage error: an unknown command,
    a bad `train` argument, an `--out` that cannot be written.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # the main job
        return _study(DEFAULT_STUDY, DEFAULT_STUDY_ARGS)
    if argv[0] in STUDIES:
        return _study(argv[0], argv[1:])
    parser, train = _parsers()
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args, train)
    if args.command == "kernel":
        return _kernel()
    parser.error("a command is required")  # e.g. `mfattn --seed 1`: options without one


def train_main(argv=None) -> int:
    """`mfattn train` with `argv` (default `sys.argv[1:]`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return main(["train", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
