"""The small model and data of the DeepSpeed equivalence and checkpoint workers."""
import torch
import torch.nn as nn

IN, OUT = 13, 3


class Block(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.lin = nn.Linear(i, o)
        self.norm_w = nn.Parameter(torch.ones(o))

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.norm_w


class Net(nn.Module):
    """280 parameters in 8 tensors of awkward sizes: with 2 or 4 ranks, tensors straddle ZeRO
    partition boundaries. ``hidden=(11, 5)`` gives 253 parameters, which no world size divides
    (DeepSpeed then pads the last partition); ``(11, 7, 7)`` adds a layer."""

    def __init__(self, hidden=(11, 7)):
        super().__init__()
        sizes = [IN, *hidden]
        self.layers = nn.ModuleList([Block(a, b) for a, b in zip(sizes, sizes[1:])])
        self.head = nn.Linear(sizes[-1], OUT)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def make_model(seed=0, hidden=(11, 7)):
    torch.manual_seed(seed)
    m = Net(tuple(hidden))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batch(step, n, spike=None):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, IN, generator=g)
    y = torch.randn(n, OUT, generator=g)
    if spike and step in spike:
        y = y * spike[step]       # a loss spike: gradients `spike` times larger
    return x, y
