"""`python -m mfattn` (or `mfattn`): the main job on its built-in default.

    mfattn                    # the convergence study's --quick preset (minutes),
                              # results in results/scaling_quick.json and PNGs
    mfattn scaling [--quick | --medium] [--out FILE]   # the study (full preset
                              # without a flag; see mfattn/studies/scaling.py)
    mfattn train [options]    # train one transformer (below)

`mfattn train` trains a small discrete transformer (L=8 layers, H=8 heads, d=4, k=4) with
AdamW on the default in-context denoising task, prints the held-out loss
before and after, and writes the results (history JSON, parameters, loss
plot, checkpoints) to `--out` (default `results/default`).
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import optax

import mfattn


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    if argv and argv[0] == "scaling":
        argv = argv[1:]
    elif not argv or argv[0].startswith("-"):  # the default: the quick study
        argv = ["--quick", "--out", "results/scaling_quick.json"] + argv
    from .studies.scaling import main as scaling_main

    scaling_main(argv)
    return 0


def train_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="mfattn train", description="Train one discrete transformer."
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=4)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--optimizer", choices=["adamw", "blockwise"], default="adamw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/default")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

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
    out = pathlib.Path(args.out)
    before = float(mfattn.evaluate(model, task, test_key, 512))
    print(f"held-out loss before training: {before:.5f}")
    t0 = time.perf_counter()
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
        progress=not args.no_progress,
    )
    wall = time.perf_counter() - t0
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
            "args": vars(args),
            "wall_seconds": wall,
        },
    )
    print(f"results written to {out}/ (history.json, params.eqx, loss.png, checkpoints/)")
    (out / "summary.json").write_text(
        json.dumps(
            {"heldout_before": before, "heldout_after": after, "steps": args.steps}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
