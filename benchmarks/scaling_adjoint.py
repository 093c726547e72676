"""Why the limit's adjoint is not resolved in the scaling study: the Lions term
at test particles away from the tokens (docs/theory.md, sections 4 and 7).

The scaling study's main condition (`python -m benchmarks.scaling`) measures
the theorem's error, states and adjoints of test particles `z` drawn in the
ball that covers the data's support, against the limit with `J` depth nodes and
`M` particles per node; that limit's own adjoint error (against `2J` nodes, and
against `4M` particles) is above the discrete errors it should resolve. This
benchmark takes the same task, probe token sets, test particles and untrained
limits (`k = 0`, where the own error peaks) and measures:

- the limit's own error of the state and of the adjoint, max over `z` and
  the study's depths `t = l / L_max`, for the study's test particles in the ball and for test
  particles placed at the tokens (with the tokens' labels);
- at the worst test particle in the ball, on the depth node where its adjoint
  grows most in the `2J` limit, the two terms of the backward equation
  `dp/dt = -(grad_x Gamma(z)^T p(z) + sum_j w_j d_mu Gamma(x_j)(z)^T p_j)`, head
  by head (`mfattn.AttentionField.grad_x`, `.lions_derivative`): the size of
  each mean, the relative Monte-Carlo standard error of the Lions term over
  the node's `M` heads, and the share of the largest head; the same at a token
  for contrast.

    python -m benchmarks.scaling_adjoint [--quick]

Writes `benchmarks/results/scaling_adjoint.json` (a few minutes on 2 cores;
`--quick`: the first probe token set only, `scaling_adjoint_quick.json`).
"""

import argparse
import json
import pathlib
import platform
import time

import diffrax
import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mfattn  # noqa: E402
from benchmarks import scaling  # noqa: E402


def _solve(model, measure, loss, z, zl, T):
    sol = mfattn.solve_limit(
        model.params,
        measure,
        loss,
        model.beta,
        z,
        test_labels=zl,
        saveat=diffrax.SaveAt(ts=jnp.arange(T + 1) / T),
        interpolation=mfattn.PiecewiseConstant(),
    )
    return [np.asarray(a) for a in (sol.xs, sol.ps, sol.test_xs, sol.test_ps)]


def _terms(field, node, x, p, z, pz):
    """Per head of one node: `grad_x G_h(z)^T p(z)` and the Lions term
    `sum_j w_j d_mu G_h(x_j)(z)^T p_j`, `(M, d)` each."""
    n = x.shape[0]
    measure = mfattn.EmpiricalMeasure(jnp.asarray(x))

    def one(Q, K, V, O):
        head = mfattn.AttentionParams(Q[None], K[None], V[None], O[None])
        g = field.grad_x(jnp.asarray(z), measure, head)
        lions = field.lions_derivative(jnp.asarray(x), measure, head, jnp.asarray(z)[None])
        lions = lions.reshape(n, *lions.shape[-2:])  # (n, d, d): d_mu G(x_j)(z)
        return g.T @ pz, jnp.einsum("jab,ja->b", lions, jnp.asarray(p)) / n

    return [np.asarray(a) for a in jax.vmap(one)(node.Q, node.K, node.V, node.O)]


def _stats(c1, c2):
    M = c1.shape[0]
    m1, m2 = c1.mean(0), c2.mean(0)
    se = np.sqrt(np.sum(c2.var(0)) / M)
    norms = np.linalg.norm(c2, axis=-1)
    return {
        "grad_x_term": float(np.linalg.norm(m1)),
        "lions_term": float(np.linalg.norm(m2)),
        "lions_standard_error": float(se),
        "lions_relative_standard_error": float(se / np.linalg.norm(m2)),
        # the largest head's norm over the sum of the heads' norms
        "largest_head_share": float(norms.max() / norms.sum()),
        "heads": int(M),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the first probe token set only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or f"benchmarks/results/scaling_adjoint{'_quick' if args.quick else ''}.json"
    t0 = time.perf_counter()
    cfg = scaling.PRESETS["full"]
    c = scaling.Condition(cfg, cfg.dim, cfg.tokens, cfg.optimizers[0], False, [(1, 4)])
    J, M, T = cfg.nodes, cfg.particles, 4 * cfg.nodes
    every = T // max(cfg.L)  # the study's depths t = l / L_max on the fine grid
    # the study's three untrained limits (same keys as its references)
    lims = {
        "J,M": c.limit_model(J, M, c.limit_key),
        "2J,M": c.limit_model(2 * J, M, jax.random.fold_in(c.limit_key, 2)),
        "J,4M": c.limit_model(J, 4 * M, jax.random.fold_in(c.limit_key, 4)),
    }
    field = mfattn.AttentionField(cfg.beta)
    rows, worst = [], None
    probes = c.probes()[:1] if args.quick else c.probes()
    for pi, (measure, loss, z, zl) in enumerate(probes):
        for where, (zz, ll) in {
            "ball": (z, zl),
            "tokens": (measure.points, loss.targets),
        }.items():
            sols = {k: _solve(m, measure, loss, zz, ll, T) for k, m in lims.items()}
            a = sols["J,M"]
            row = {"probe": pi, "test_points": where, "m": int(zz.shape[0])}
            row["adjoint_max"] = float(np.linalg.norm(a[3], axis=-1)[::every].max())
            for other in ("2J,M", "J,4M"):
                b = sols[other]
                ex = np.linalg.norm(a[2] - b[2], axis=-1)[::every]
                ep = np.linalg.norm(a[3] - b[3], axis=-1)[::every]
                row[f"state_error_vs_{other}"] = float(ex.max())
                row[f"adjoint_error_vs_{other}"] = float(ep.max())
                if where == "ball" and other == "2J,M":
                    i = int(np.unravel_index(ep.argmax(), ep.shape)[1])
                    if worst is None or ep.max() > worst[0]:
                        worst = (float(ep.max()), pi, i, b, measure)
            rows.append(row)
    # the worst test particle in the ball, in the 2J limit: the node where its
    # adjoint grows most, and the two terms there, at the node's end (where the
    # backward equation enters it)
    _, pi, i, (xs, ps, txs, tps), measure = worst
    fine = lims["2J,M"]
    per_node = T // (2 * J)
    norms = np.linalg.norm(tps[:, i], axis=-1)
    growth = norms[::per_node][:-1] / norms[::per_node][1:]  # |p(t_j)| / |p(t_{j+1})|
    j = int(growth.argmax())
    s = (j + 1) * per_node  # the node's end: the backward equation starts there
    node = jax.tree.map(lambda a: a[j], fine.params)
    at_z = _stats(*_terms(field, node, xs[s], ps[s], txs[s, i], tps[s, i]))
    # contrast: a token of the same measure, its own adjoint
    tok = int(np.linalg.norm(ps[s], axis=-1).argmax())
    at_token = _stats(*_terms(field, node, xs[s], ps[s], xs[s, tok], ps[s, tok]))
    data = {
        "command": "python -m benchmarks.scaling_adjoint" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {jax.devices()[0].platform}",
        "config": {"J": J, "M": M, "beta": cfg.beta, "dim": cfg.dim, "tokens": cfg.tokens},
        "own_error_k0": rows,
        "worst_point": {
            "probe": pi,
            "z": np.asarray(probes[pi][2][i]).tolist(),
            "norm_z": float(np.linalg.norm(probes[pi][2][i])),
            "max_token_norm": float(np.linalg.norm(measure.points, axis=-1).max()),
            "node": j,
            "nodes": 2 * J,
            "adjoint_growth_on_node": float(growth[j]),
            "median_growth_per_node": float(np.median(growth)),
            "terms_at_z": at_z,
            "terms_at_token": at_token,
        },
        "wall_seconds": time.perf_counter() - t0,
    }
    out = pathlib.Path(out)
    out.write_text(json.dumps(data, indent=1))
    for r in rows:
        print(r)
    print(json.dumps(data["worst_point"], indent=1))
    print(f"written to {out} ({data['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
