"""Published MIL aggregators, registered as poolings (:func:`milcell.nn.pooling.create_pooling`).

Importing :mod:`milcell.nn.pooling` imports this package, so every aggregator
below is available by name as soon as any pooling is. Each module implements
one method from its paper and follows the :class:`~milcell.nn.pooling.MILPooling`
contract (exact masking, float32 softmax, batch independence); auxiliary
training losses go through :meth:`~milcell.nn.pooling.MILPooling.auxiliary_losses`.
See :doc:`/aggregators` for the table of methods and their guarantees.
"""

from __future__ import annotations

from milcell.nn.aggregators import (  # noqa: F401  (importing a module registers its aggregators)
    acmil,
    additive,
    clam,
    class_attention,
    dsmil,
    dtfd,
    transmil,
)
