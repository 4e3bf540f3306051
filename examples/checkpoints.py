"""Run directories, orbax checkpoints, and the export of a trained model as a Hugging Face checkpoint.

A checkpoint holds the trainable params, the optimizer state (with BAdam's block order and RNG)
and the step, which is also the data position (``data.batch_indices``): resuming is exact.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

from examples.config import TrainConfig, UsageError


def latest_step(directory: pathlib.Path) -> int | None:
  """The last step saved in an orbax checkpoint directory (None if there is none)."""
  if not directory.is_dir():
    return None
  steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
  return max(steps, default=None)


def check_run_dirs(cfg: TrainConfig, run_dirs: dict[str, pathlib.Path]) -> None:
  """Refuses to start over an earlier run's checkpoints (unless ``--overwrite``) and to
  ``--resume`` when there is nothing to resume."""
  found = {name: latest_step(out / "checkpoints") for name, out in run_dirs.items()}
  if cfg.resume:
    if all(step is None for step in found.values()):
      where = ", ".join(str(out / "checkpoints") for out in run_dirs.values())
      raise UsageError(f"--resume: nothing to resume, no checkpoint in {where}; run without "
                       "--resume to start")
    return
  if cfg.overwrite:
    return
  for name, step in found.items():
    if step is not None:
      raise UsageError(f"{run_dirs[name]} holds the checkpoints of an earlier run (up to step "
                       f"{step}); continue it with --resume, replace it with --overwrite, or "
                       "choose another --out")


class Checkpoints:
  """An orbax ``CheckpointManager`` for one run (the last two checkpoints are kept).

  Args:
    directory: where the checkpoints go.
    fresh: delete the checkpoints already there (a new run; callers decide whether that is
      allowed, see :func:`check_run_dirs`).
  """

  def __init__(self, directory: pathlib.Path, *, fresh: bool):
    import orbax.checkpoint as ocp

    self.directory = directory
    if fresh and directory.exists():
      shutil.rmtree(directory)
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(
        directory.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    ocp = self._ocp
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_pack(state)),
                                                     meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, template: Any) -> tuple[Any, dict]:
    """The state saved at ``step``, shaped (and sharded) like ``template``, and its metadata."""
    import jax

    ocp = self._ocp
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _pack(template))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return _unpack(restored["state"], template), restored["meta"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _pack(tree) -> dict:
  """The non-empty leaves by flat index: orbax cannot save zero-size arrays (badam_ratio has some)."""
  import jax

  return {str(i): x for i, x in enumerate(jax.tree.leaves(tree)) if x.size}


def _unpack(packed: dict, template):
  import jax

  leaves, treedef = jax.tree.flatten(template)
  return treedef.unflatten([packed.get(str(i), x) for i, x in enumerate(leaves)])


def export_hf(model, tokenizer, path: pathlib.Path, *, labels: Sequence[Any] | None = None) -> None:
  """Writes ``model`` as a Hugging Face checkpoint transformers loads: ``config.json``,
  ``model.safetensors`` and the tokenizer files.

  Args:
    model: an example model (``Llama`` or ``Roberta``); LoRA adapters are merged into it first
      (the model is changed in place).
    tokenizer: a :class:`examples.data.Tokenizer` (None: no tokenizer files).
    path: the directory (created; files in it are replaced).
    labels: the class names of a classifier, written as ``id2label`` / ``label2id``.
  """
  from examples.optimizers import merge_lora

  merge_lora(model)
  model.save_pretrained(path)
  if labels is not None:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    hf_config.id2label = {i: str(label) for i, label in enumerate(labels)}
    hf_config.label2id = {str(label): i for i, label in enumerate(labels)}
    hf_config.save_pretrained(str(path))
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
