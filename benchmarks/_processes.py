"""The command-line flags of a study run as several processes under
multi-controller JAX, shared by the studies' entry points."""

import argparse

import jax


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """`--distributed`, or `--coordinator --num-processes --process-id`."""
    d = ap.add_argument_group(
        "several processes (jax.distributed)",
        "start the command once per process, every one with the same arguments; "
        "the conditions are split over the processes, `--out` must be on a file "
        "system they all see",
    )
    d.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (SLURM, Open MPI and Cloud TPU "
        "are detected; elsewhere give the three options below)",
    )
    d.add_argument("--coordinator", default=None, help="host:port of process 0")
    d.add_argument("--num-processes", type=int, default=None)
    d.add_argument("--process-id", type=int, default=None)


def initialize(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` when the flags ask for several processes."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed or any(x is not None for x in explicit):
        jax.distributed.initialize(*explicit)
