"""The low-rank baselines that Kronecker layers are compared with (docs/design.md, section 1
baselines: the four models, their fits, and the modes they are tested in).

- ``LowRankLinear``: ``W = U V`` (SVD fit).
- ``SeparableConv2d``: Jaderberg et al. 2014, scheme 2 (SVD fit).
- ``CPConv2d``: Lebedev et al. 2015 (CP-ALS fit).
- ``TuckerConv2d``: Kim et al. 2016, Tucker-2 (HOSVD fit).

All four are drop-in torch layers: the conv layers take every argument of ``nn.Conv2d``
(groups, the four padding modes, 'same' incl. asymmetric, unbatched input), the linear layer
any leading dims. Their shared base and the contract the layer factory relies on
(``max_rank``, meta construction, ``analytic_macs``, ``from_conv``/``from_linear``,
``dense_weight``) are in ``kron.layers.lowrank_base``.
"""

from kron.layers.cp import CPConv2d
from kron.layers.lowrank_linear import LowRankLinear
from kron.layers.separable import SeparableConv2d
from kron.layers.tucker import TuckerConv2d

__all__ = ["CPConv2d", "LowRankLinear", "SeparableConv2d", "TuckerConv2d"]
