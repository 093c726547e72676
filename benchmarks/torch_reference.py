"""PyTorch references of what mfattn computes, for the speed benchmark
(`benchmarks/speed.py`). Optional: `pip install -e ".[bench]"`.

- `TorchStep`: one training step of the discrete transformer (docs/theory.md, sections 3-5) as a
  researcher would write it in eager PyTorch: `L` residual layers of `H`-head
  attention with `torch.nn.functional.scaled_dot_product_attention` (the fused
  CPU kernel), the denoising loss, `backward()`, and blockwise AdamW written
  with tensor ops (one second moment per `d x k` block).
- `TorchLimit`: the continuous limit's forward ODE with the parameter grid
  linearly interpolated in depth, and the gradient of the loss with respect to
  the grid by `torchdiffeq.odeint_adjoint` (the continuous adjoint method).
"""

import torch
import torch.nn.functional as F


def attention_layer(x, Q, K, V, O, beta):
    """`x (B, n, d)`, heads `(H, d, k)` -> the velocity `(B, n, d)`:
    `(1/H) sum_h O_h V_h^T sum_j softmax_j(beta <Q_h^T x_i, K_h^T x_j>) x_j`."""
    q = torch.einsum("bnd,hdk->bhnk", x, Q)
    k = torch.einsum("bnd,hdk->bhnk", x, K)
    v = torch.einsum("bnd,hdk->bhnk", x, V)
    o = F.scaled_dot_product_attention(q, k, v, scale=beta)
    return torch.einsum("bhnk,hdk->bnd", o, O) / Q.shape[0]


class TorchStep:
    """One training step: forward over all layers, backward, blockwise AdamW."""

    def __init__(self, params, beta, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=1e-4):
        self.params = [torch.tensor(a, requires_grad=True) for a in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros(p.shape[:2], dtype=p.dtype) for p in self.params]
        self.beta, self.lr, self.b1, self.b2, self.eps, self.wd = beta, lr, b1, b2, eps, wd
        self.count = 0

    def loss(self, x, y):
        Q, K, V, O = self.params
        L = Q.shape[0]
        for l in range(L):
            x = x + attention_layer(x, Q[l], K[l], V[l], O[l], self.beta) / L
        return 0.5 * ((x - y) ** 2).sum(-1).mean(-1).mean()

    def __call__(self, x, y):
        for p in self.params:
            p.grad = None
        value = self.loss(x, y)
        value.backward()
        self.count += 1
        c1, c2 = 1 - self.b1**self.count, 1 - self.b2**self.count
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                g = p.grad
                m.mul_(self.b1).add_(g, alpha=1 - self.b1)
                v.mul_(self.b2).add_((g * g).sum((-2, -1)), alpha=1 - self.b2)
                denom = (v / c2).sqrt_().add_(self.eps)[..., None, None]
                p.mul_(1 - self.lr * self.wd).addcdiv_(m, denom, value=-self.lr / c1)
        return value


class _Field(torch.nn.Module):
    def __init__(self, grid, beta):
        super().__init__()
        self.grid = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(a)) for a in grid])
        self.beta = beta
        self.J = grid[0].shape[0] - 1

    def forward(self, t, x):
        s = t * self.J
        j = torch.clamp(torch.floor(s), max=self.J - 1).long()
        a = s - j
        Q, K, V, O = ((1 - a) * g[j] + a * g[j + 1] for g in self.grid)
        return attention_layer(x[None], Q, K, V, O, self.beta)[0]


class TorchLimit:
    """The limit's loss and its gradient with respect to the grid, through
    `torchdiffeq.odeint_adjoint` (dopri5, same rtol/atol as mfattn's Tsit5)."""

    def __init__(self, grid, beta, rtol, atol):
        from torchdiffeq import odeint_adjoint

        self.field = _Field(grid, beta)
        self.odeint = odeint_adjoint
        self.rtol, self.atol = rtol, atol
        self.t = torch.tensor([0.0, 1.0], dtype=self.field.grid[0].dtype)
        J = self.field.J
        # the grid nodes are kinks of the interpolated parameters: step to them
        self.options = dict(jump_t=torch.linspace(0, 1, J + 1, dtype=self.t.dtype)[1:-1])

    def __call__(self, x, y):
        for p in self.field.parameters():
            p.grad = None
        xs = self.odeint(
            self.field,
            x,
            self.t,
            rtol=self.rtol,
            atol=self.atol,
            method="dopri5",
            options=self.options,
            adjoint_params=tuple(self.field.parameters()),
            adjoint_options=self.options,
        )
        value = 0.5 * ((xs[-1] - y) ** 2).sum(-1).mean()
        value.backward()
        return value, [p.grad for p in self.field.parameters()]
