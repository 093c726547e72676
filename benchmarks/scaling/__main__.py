"""The study's command line.

python -m benchmarks.scaling --quick       # the quick preset (minutes)
python -m benchmarks.scaling --medium      # about 25 min on 2 cores
python -m benchmarks.scaling               # the full preset (resumable)
python -m benchmarks.scaling --retry-failed         # resume, rerunning failed conditions
python -m benchmarks.scaling --medium --table       # the medium preset's table
python -m benchmarks.scaling --quick --summarize    # rebuild the JSON and PNGs
srun --ntasks=8 python -m benchmarks.scaling --distributed   # 8 processes share the conditions
"""

import argparse
import json
import pathlib

import jax

from benchmarks import _processes
from benchmarks.scaling import __doc__ as _study_doc
from benchmarks.scaling._run import run
from benchmarks.scaling._summary import table


def main(argv=None, prog="python -m benchmarks.scaling"):
    """Parse `argv` (default: `sys.argv[1:]`) and run the study, or print its
    table (`--table`); `prog` is the command's name in its usage.

    **Returns:** the study JSON's data, or `None` after `--table`.
    """
    ap = argparse.ArgumentParser(prog=prog, description=_study_doc.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick preset (minutes)")
    g.add_argument(
        "--medium", action="store_true", help="the medium preset (about 25 min on 2 cores)"
    )
    g.add_argument("--gpu", action="store_true", help="the gpu preset (for one GPU)")
    ap.add_argument(
        "--out", default=None, help="JSON output (PNGs and per-condition files next to it)"
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--retry-failed", action="store_true", help="run failed conditions again")
    ap.add_argument("--table", action="store_true", help="print the Markdown table and exit")
    ap.add_argument(
        "--summarize",
        action="store_true",
        help="rebuild the JSON and PNGs from the per-condition files",
    )
    _processes.add_arguments(ap)
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else "medium" if args.medium else "gpu" if args.gpu else "full"
    out = pathlib.Path(args.out or f"benchmarks/results/scaling_{preset}.json")
    if args.table:
        print(table(json.loads(out.read_text())))
        return None
    jax.config.update("jax_enable_x64", True)  # the command line's choice, not the library's
    _processes.initialize(args)
    data = run(
        preset,
        out,
        progress=not args.no_progress,
        retry_failed=args.retry_failed,
        summarize_only=args.summarize,
    )
    if jax.process_index() == 0:
        print(f"written to {out} and its PNGs ({data['wall_seconds_this_run']:.0f} s)")
    return data


if __name__ == "__main__":
    main()
