"""State dicts saved by the Kronecker layers before the issue-16 rewrite load unchanged."""

from pathlib import Path

import torch

from kron.layers import KronConv2d, KronLinear

DATA = Path(__file__).parent / "data" / "kron_layers_v1.pt"


def test_pre_rewrite_state_dicts_load_and_reproduce_outputs() -> None:
    saved = torch.load(DATA, weights_only=True)
    lin = KronLinear(12, 8, [(2, 3), (2, 3), (4, 2)], bias=True, dtype=torch.float64)
    conv = KronConv2d(6, 4, 3, [(2, 3, 1, 1), (2, 3, 1, 1), (1, 2, 3, 3)], padding=1,
                      dtype=torch.float64)
    lin.load_state_dict(saved["linear"])
    conv.load_state_dict(saved["conv"])
    with torch.no_grad():
        for impl in ("factored", "composed"):
            lin.implementation = conv.implementation = impl
            torch.testing.assert_close(lin(saved["x_linear"]), saved["y_linear"],
                                       rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(conv(saved["x_conv"]), saved["y_conv"],
                                       rtol=1e-12, atol=1e-12)
