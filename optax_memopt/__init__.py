"""optax_memopt: memory-efficient full-parameter optimizers for JAX/Optax."""

from optax_memopt._badam import BlockCoordinateState as BlockCoordinateState
from optax_memopt._badam import active_block as active_block
from optax_memopt._badam import badam as badam
from optax_memopt._badam import block_coordinate as block_coordinate
from optax_memopt._badam_ratio import BAdamRatioState as BAdamRatioState
from optax_memopt._badam_ratio import badam_ratio as badam_ratio
from optax_memopt._block_step import make_block_step as make_block_step
from optax_memopt._blocks import block_labels as block_labels

__version__ = "0.1.0"
