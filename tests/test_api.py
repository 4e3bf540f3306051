"""The public surface: every name the README documents is importable from ``optax_memopt``."""

import inspect

import optax

import optax_memopt

FACTORIES = ("badam", "block_coordinate", "badam_ratio", "adarankgrad", "scale_by_adarankgrad")


def test_documented_names_are_exported():
  for name in FACTORIES + ("block_labels", "describe_blocks", "active_block", "make_block_step",
                           "effective_ranks",
                           "randomized_svd", "randomized_range_finder"):
    assert inspect.isfunction(getattr(optax_memopt, name)), name
  for name in ("BlockCoordinateState", "BAdamRatioState", "AdaRankGradState",
               "AdaRankGradDimensionNumbers"):
    assert inspect.isclass(getattr(optax_memopt, name)), name


def test_factories_return_optax_transformations():
  for name in FACTORIES:
    factory = getattr(optax_memopt, name)
    if name == "scale_by_adarankgrad":
      tx = factory()
    elif name == "block_coordinate":
      tx = factory(optax.adam(1e-3))
    else:
      tx = factory(1e-3)
    assert isinstance(tx, optax.GradientTransformationExtraArgs), name
