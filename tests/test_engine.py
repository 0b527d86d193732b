"""student.engine.LocalEngine: a non-finite gradient never reaches the weights."""

import torch
from torch import nn

from student.config import OptimConfig
from student.engine import LocalEngine


def test_nonfinite_gradient_skips_the_update_and_is_reported():
    torch.manual_seed(0)
    module = nn.Linear(3, 1)
    engine = LocalEngine(module, OptimConfig(lr=0.1), torch.device("cpu"))
    x = torch.randn(4, 3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    hook = module.weight.register_hook(lambda g: g * float("nan"))  # finite loss, NaN gradient
    norm = engine.backward_and_step(module(x).pow(2).mean())
    assert not torch.isfinite(norm)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # untouched
    assert all(p.grad is None for p in module.parameters())
    hook.remove()
    norm = engine.backward_and_step(module(x).pow(2).mean())
    assert torch.isfinite(norm) and not torch.equal(before["weight"], module.weight)  # a finite step moves
