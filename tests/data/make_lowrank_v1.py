"""How tests/data/lowrank_v1.pt was written: once, with the low-rank layers as they were before
the rewrite onto kron/layers/lowrank_base.py (commit e907d80). Do not rerun it on newer code: the
file's point is to hold what the old code produced (run from the repository root)."""
import torch

from kron.layers.lowrank import CPConv2d, LowRankLinear, SeparableConv2d, TuckerConv2d

torch.manual_seed(1234)
F64 = torch.float64
cases = {
    "linear": (dict(in_features=7, out_features=5, rank=3), LowRankLinear, (4, 7)),
    "separable": (dict(in_channels=3, out_channels=4, kernel_size=(3, 2), rank=3, stride=(2, 1),
                       padding=(1, 1), dilation=(1, 2)), SeparableConv2d, (2, 3, 9, 8)),
    "cp": (dict(in_channels=3, out_channels=4, kernel_size=3, rank=5, stride=1, padding=1),
           CPConv2d, (2, 3, 7, 6)),
    "tucker": (dict(in_channels=3, out_channels=4, kernel_size=(3, 3), ranks=(2, 3), stride=2,
                    padding=1, dilation=1), TuckerConv2d, (2, 3, 8, 7)),
}
out = {}
for name, (kwargs, cls, shape) in cases.items():
    layer = cls(**kwargs, bias=True, dtype=F64)
    x = torch.randn(shape, dtype=F64)
    with torch.no_grad():
        y = layer(x)
    out[name] = {"kwargs": kwargs, "state_dict": layer.state_dict(), "input": x, "output": y}
torch.save(out, "tests/data/lowrank_v1.pt")
print({k: {n: tuple(t.shape) for n, t in v["state_dict"].items()} for k, v in out.items()})
