"""The one error type kron.layers raises when a layer cannot be factored as asked."""

from __future__ import annotations


class FactorizationError(ValueError):
    """A layer cannot be built or factored as asked: its one-line message names the layer, the
    blocker (groups, budget, shape, type) and the nearest setting that works.

    A ``ValueError`` subclass, so code that caught ``ValueError`` keeps working; kron's
    entrypoints catch it and print the message as one line.
    """
