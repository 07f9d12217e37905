"""An MoE layer inside your own model: a small regressor whose hidden layer is a sparse MoE.

    python examples/moe_layer_in_a_model.py [--steps 300] [--seed 0]

The MoE layer is a drop-in replacement for an FFN: it takes any leading shape and returns the same
shape, plus the auxiliary load-balancing loss to add to yours and how many tokens each expert got.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from moekit import MoE, MoEConfig


class Regressor(nn.Module):
    """in -> Linear -> MoE (8 SwiGLU experts, top-2, balancing loss) -> Linear -> out."""

    def __init__(self, d_in: int, d_model: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d_model)
        self.moe = MoE(MoEConfig(d_model=d_model, d_ff=64, num_experts=8, top_k=2, aux_loss_coef=0.01))
        self.out = nn.Linear(d_model, 1)

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.moe(torch.relu(self.inp(x_ND)))
        return self.out(h.hidden_states).squeeze(-1), h.aux_loss, h.expert_counts


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    # A piecewise target: which piece a row falls in is what the router can learn to pick experts by.
    x = torch.randn(4096, 4)
    y = torch.where(x[:, 0] > 0, 3 * x[:, 1], -2 * x[:, 2]) + 0.1 * torch.randn(4096)
    model = Regressor(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        idx = torch.randint(0, 4096, (256,))
        pred, aux, counts = model(x[idx])
        loss = nn.functional.mse_loss(pred, y[idx]) + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  mse {loss.item() - aux.item():.4f}  tokens per expert {counts.tolist()}")
    with torch.no_grad():
        mse = nn.functional.mse_loss(model(x)[0], y).item()
    print(f"final mse {mse:.4f} (the target's variance is {y.var().item():.2f})")
    return mse


if __name__ == "__main__":
    main()
