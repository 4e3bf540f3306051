"""optax_memopt: memory-efficient full-parameter optimizers for JAX/Optax.

BAdam (block coordinate descent with Adam on one block of layers at a time) and AdaRankGrad (Adam on
gradients projected to an adaptive low rank) as Optax gradient transformations, and two training
steps that also save in the backward pass.

Which entry point:

====================================  ==============================================================
entry point                           what it saves; model form; what it takes; what it refuses
====================================  ==============================================================
:func:`badam` (drop-in)               In any loop (``optax.chain``, ``nnx.Optimizer``). Optimizer
                                      state: one block's Adam moments (and float32 master copy)
                                      instead of the whole model's. Any pytree: one block per layer
                                      of a list or of an ``[L, ...]`` stack. Any stage before it sees
                                      the whole gradient. Refuses a stack on axis 1.
:func:`make_block_step`               Also the backward pass below the active block and all but
                                      one block's gradient buffers. A list of layers (one compile
                                      per block) or a stack run by :func:`scan_layers` (one compile).
                                      Takes a ``tx`` with one ``badam`` / ``block_coordinate``
                                      stage; refuses ``badam_ratio``.
:func:`scan_layers`                   In the block step: one compiled step for every layer, the
                                      backward pass through the active layer only; needed by
                                      :func:`make_layerwise_step`. ``[L, ...]`` stacked params.
:func:`make_layerwise_step`           Gradient memory: no gradient larger than one layer's (``tx``
                                      runs inside the backward pass). A stack run by
                                      :func:`scan_layers`; per-leaf updates (``adamw``, ``lion``,
                                      ``sgd``, :func:`adarankgrad`). Refuses whole-gradient stages
                                      (``clip_by_global_norm``, ``MultiSteps``), BAdam, GaLore.
:func:`adarankgrad`                   Optimizer state: ``r(M + 2N)`` numbers per layer matrix
                                      instead of ``2MN``. Any pytree; any loop, or
                                      :func:`make_layerwise_step` for the gradient memory too.
:func:`badam_ratio`                   Optimizer state: moments for a moving fraction of each
                                      tensor's entries. Any pytree, any loop; not the block step.
====================================  ==============================================================

The README has runnable examples and a headline results table; ``docs/guide.md`` the details,
``docs/layout.md`` the modules and what each holds.
"""

from optax_memopt import linalg as linalg
from optax_memopt._accumulate import SlotAccumulator as SlotAccumulator
from optax_memopt._adarankgrad import AdaRankGradDimensionNumbers as AdaRankGradDimensionNumbers
from optax_memopt._adarankgrad import AdaRankGradState as AdaRankGradState
from optax_memopt._adarankgrad import adarankgrad as adarankgrad
from optax_memopt._adarankgrad import effective_ranks as effective_ranks
from optax_memopt._adarankgrad import scale_by_adarankgrad as scale_by_adarankgrad
from optax_memopt._badam import BlockCoordinateState as BlockCoordinateState
from optax_memopt._badam import active_block as active_block
from optax_memopt._badam import badam as badam
from optax_memopt._badam import block_coordinate as block_coordinate
from optax_memopt._badam_ratio import BAdamRatioState as BAdamRatioState
from optax_memopt._badam_ratio import badam_ratio as badam_ratio
from optax_memopt._badam_ratio import scale_by_badam_ratio as scale_by_badam_ratio
from optax_memopt._block_step import make_block_step as make_block_step
from optax_memopt._blocks import block_labels as block_labels
from optax_memopt._blocks import describe_blocks as describe_blocks
from optax_memopt._layerwise import make_layerwise_step as make_layerwise_step
from optax_memopt._scan import scan_layers as scan_layers
from optax_memopt._stacks import StackLabels as StackLabels
from optax_memopt.linalg import randomized_range_finder as randomized_range_finder
from optax_memopt.linalg import randomized_svd as randomized_svd

__version__ = "0.1.0"
