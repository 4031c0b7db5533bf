"""kron: Kronecker-factored layers and low-rank baselines for CNNs.

Reproduces and extends Zhou, Wu, Wu, Zhou, "Exploiting Local Structures with the Kronecker
Layer in Convolutional Networks" (arXiv 1512.09194).
"""

__version__ = "0.1.0"
