"""The study's command line (`python -m benchmarks.theorem7 --help`)."""

import argparse
import dataclasses
import json
import pathlib

import jax

from benchmarks import _processes
from benchmarks.theorem7 import __doc__ as _doc
from benchmarks.theorem7._config import PRESETS
from benchmarks.theorem7._run import run
from benchmarks.theorem7._summary import table

GRIDS = {
    "--L": "L",
    "--H": "H",
    "--bias-L": "bias_L",
    "--trained-L": "trained_bias_L",
    "--n": "uniform_n",
    "--d": "lemma6_d",
    "--adjoint-H": "adjoint_H",
}
"""The flags that replace a preset's grid (the conditions' files are shared)."""


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv=None, prog="python -m benchmarks.theorem7"):
    """Parse `argv` and run the study (or print the table of a finished run).

    **Returns:** the study JSON's data."""
    ap = argparse.ArgumentParser(prog=prog, description=_doc.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick preset (about two minutes)")
    g.add_argument("--gpu", action="store_true", help="the gpu preset (one GPU)")
    ap.add_argument(
        "--out", default=None, help="JSON output (PNGs and the per-condition folder next to it)"
    )
    ap.add_argument("--no-progress", action="store_true")
    for flag, field in GRIDS.items():
        ap.add_argument(
            flag,
            default=None,
            metavar="N,N,...",
            help=f"replace the preset's `{field}` (comma-separated; empty: skip that part)",
        )
    ap.add_argument(
        "--budget", type=float, default=None, help="start no condition after this many seconds"
    )
    ap.add_argument(
        "--no-resume", action="store_true", help="discard the per-condition files first"
    )
    ap.add_argument(
        "--table", action="store_true", help="print the table of the finished run and exit"
    )
    _processes.add_arguments(ap)
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else "gpu" if args.gpu else "full"
    suffix = "" if preset == "full" else f"_{preset}"
    out = pathlib.Path(args.out or f"benchmarks/results/theorem7{suffix}.json")
    if args.table:
        data = json.loads(out.read_text())
    else:
        jax.config.update("jax_enable_x64", True)  # the command line's choice
        _processes.initialize(args)
        cfg = PRESETS[preset]
        grids = {}
        for flag, field in GRIDS.items():
            text = getattr(args, flag.lstrip("-").replace("-", "_"))
            if text is not None:
                grids[field] = _ints(text)
        if grids:
            cfg = dataclasses.replace(cfg, **grids)
        data = run(
            cfg,
            out,
            progress=not args.no_progress,
            resume=not args.no_resume,
            budget=args.budget,
        )
        print()
    if jax.process_index() == 0:
        print(table(data))
        if not args.table:
            print(f"\nwritten to {out} and its PNGs ({data['wall_seconds_this_run']:.0f} s)")
    return data


if __name__ == "__main__":
    main()
