"""optax_memopt: memory-efficient full-parameter optimizers for JAX/Optax."""

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
from optax_memopt._block_step import make_block_step as make_block_step
from optax_memopt._blocks import StackLabels as StackLabels
from optax_memopt._blocks import block_labels as block_labels
from optax_memopt._blocks import describe_blocks as describe_blocks
from optax_memopt._layerwise import make_layerwise_step as make_layerwise_step
from optax_memopt._scan import scan_layers as scan_layers
from optax_memopt.linalg import randomized_range_finder as randomized_range_finder
from optax_memopt.linalg import randomized_svd as randomized_svd

__version__ = "0.1.0"
