"""The PyTorch baselines of the speed benchmark compute the same objects as
mfattn (skipped when PyTorch is not installed: `pip install -e ".[bench]"`)."""

import diffrax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import mfattn

torch = pytest.importorskip("torch")
pytest.importorskip("torchdiffeq")


def test_torch_step_and_limit_match_mfattn():
    from benchmarks.speed import _data
    from benchmarks.torch_reference import TorchLimit, TorchStep

    cfg = dict(B=2, n=8, d=4, k=2, L=3, H=5, chunk=None)
    params, x, y = _data(cfg)
    params = [p.astype(np.float64) for p in params]
    x, y = x.astype(np.float64), y.astype(np.float64)
    step = TorchStep(params, 1.3)
    value = step.loss(torch.tensor(x), torch.tensor(y))
    value.backward()
    P = mfattn.AttentionParams(*map(jnp.asarray, params))
    sols = [
        mfattn.solve_discrete(P, mfattn.EmpiricalMeasure(x[b]), mfattn.DenoisingLoss(y[b]), 1.3)
        for b in range(2)
    ]
    assert rel_err(np.mean([s.loss for s in sols]), value.item()) < 1e-12
    # the gradient map is the mean-field-normalised gradient: L * H * dLoss/dtheta
    for i, name in enumerate("QKVO"):
        g = np.mean([np.asarray(getattr(s.grads, name)) for s in sols], 0)
        assert rel_err(g / 15, step.params[i].grad.numpy()) < 1e-10, name

    grid = [p[:3, :4] for p in params]
    lim = TorchLimit(grid, 1.3, 1e-9, 1e-9)
    tv, tg = lim(torch.tensor(x[0]), torch.tensor(y[0]))
    G = mfattn.AttentionParams(*map(jnp.asarray, grid))
    lv, lg = mfattn.limit_gradient(
        G,
        mfattn.EmpiricalMeasure(x[0]),
        mfattn.DenoisingLoss(y[0]),
        1.3,
        adjoint=diffrax.RecursiveCheckpointAdjoint(),
        rtol=1e-9,
        atol=1e-9,
    )
    assert rel_err(lv, tv.item()) < 1e-6
    c = np.asarray(mfattn.ParamPath(G).basis_integrals())[:, None, None, None]
    for i, name in enumerate("QKVO"):
        assert rel_err(np.asarray(getattr(lg, name)) * c / 4, tg[i].numpy()) < 1e-5, name
