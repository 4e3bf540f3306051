"""Layer recognition (optax_memopt._stacks), shared by BAdam, AdaRankGrad and the layer-wise step."""

import pickle

import jax.numpy as jnp
import pytest

import optax_memopt
from optax_memopt import _stacks


def _model(layers):
  return {"embed": jnp.zeros((10, 4)), "layers": layers, "lm_head": jnp.zeros((4, 10))}


def test_find_layers_lists_and_stacks():
  tree = {"decoder": {"layers": {"w": jnp.zeros((2, 4, 4))}},
          "encoder": {"layers": [{"w": jnp.zeros((4, 4))}] * 3}}
  layers = _stacks.find_layers(tree)
  assert layers.paths == ["decoder.layers.w"] + [f"encoder.layers.{i}.w" for i in range(3)]
  assert layers.listed == [None, ("encoder.layers", 0), ("encoder.layers", 1), ("encoder.layers", 2)]
  assert layers.stacked == [_stacks.StackKey("decoder.layers", 2, 0), None, None, None]
  assert layers.inside() == [True] * 4
  # Encoders come first in the block order although a dict flattens "decoder" first.
  assert optax_memopt.block_labels(tree)["decoder"]["layers"]["w"] == (3, 4)


def test_stack_on_axis_1_and_its_per_layer_scalars():
  tree = _model({"up": jnp.zeros((4, 3, 8)), "scale": jnp.zeros((4, 3)), "alpha": jnp.zeros((3,))})
  keys = dict(zip(_stacks.find_layers(tree).paths, _stacks.stack_keys(tree)))
  assert keys["layers.up"] == ("layers", 3, 1) and keys["layers.scale"] == ("layers", 3, 1)
  assert keys["layers.alpha"] == ("layers", 3, 0)  # a per-layer scalar has its layers on axis 0
  assert keys["embed"] is None and _stacks.stack_lengths(tree) == [None, 3, 3, 3, None]


def test_layer_leaves_one_layer_and_no_layers():
  # One layer under a container name (as the layer-wise step shows AdaRankGrad one layer of a stack).
  one = _model({"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))})
  assert _stacks.layer_leaves(one) == [False, True, True, False]
  # No layer structure at all: every leaf counts as inside.
  assert _stacks.layer_leaves({"a": jnp.zeros((3, 3)), "b": jnp.zeros((3,))}) == [True, True]
  assert _stacks.layer_leaves(_model({"w": jnp.zeros((2, 4, 4))}), stacks=()) == [False, True, False]


def test_declared_stacks_are_validated():
  tree = _model({"w": jnp.zeros((2, 4, 5)), "b": jnp.zeros((3, 6))})
  assert _stacks.stack_keys(tree) == [None, None, None, None]  # no shared axis: not a stack
  with pytest.raises(ValueError, match="do not share a layer axis 0"):
    _stacks.stack_keys(tree, stacks="layers")
  with pytest.raises(ValueError, match="names no subtree"):
    _stacks.stack_keys(tree, stacks={"decoder": 0})
  with pytest.raises(TypeError, match="stacks: expected a path"):
    _stacks.stacks_spec(3)
  with pytest.raises(ValueError, match="share axis 1"):
    _stacks.stack_keys(_model({"a": jnp.zeros((4, 3)), "b": jnp.zeros((5, 3))}))


def test_refuse_other_axes_names_the_leaf():
  _stacks.refuse_other_axes("step", ["a", "b"], [None, 0])
  with pytest.raises(ValueError, match=r"step: 'b' is in a layer stack on axis 1"):
    _stacks.refuse_other_axes("step", ["a", "b"], [0, 1])


def test_stack_labels_round_trip_and_public_name():
  labels = optax_memopt.StackLabels((0, 1, 2), axis=1)
  again = pickle.loads(pickle.dumps(labels))
  assert again == (0, 1, 2) and _stacks.label_axis(again) == 1 and _stacks.label_axis((0, 1)) == 0
  assert optax_memopt.StackLabels is _stacks.StackLabels

