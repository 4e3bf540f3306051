"""Run directories, orbax checkpoints, and the export of a trained model as a Hugging Face checkpoint.

A checkpoint holds the trainable params, the optimizer state (with BAdam's block order and RNG)
and the step, which is also the data position (``data.batch_indices``): resuming is exact.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

from examples.config import TrainConfig
from examples.errors import UsageError, defer_ctrl_c
from examples.rundir import export_dir, output_dir


def latest_step(directory: pathlib.Path) -> int | None:
  """The last step saved in an orbax checkpoint directory (None if there is none)."""
  if not directory.is_dir():
    return None
  steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
  return max(steps, default=None)


# What a run writes into its run directory (with --compare, also one subdirectory per optimizer):
# --overwrite removes these, and nothing else, so that an --out holding other files is safe.
RUN_FILES = ("config.json", "checkpoints", "metrics.jsonl", "summary.json", "loss.png",
             "tokenizer.json", "tokenizer.provenance.json", "hf", "pretrain", "compare.png",
             "compare.md")


def check_run_dirs(cfg: TrainConfig, run_dirs: dict[str, pathlib.Path]) -> list[dict] | None:
  """Checks the run directories before any slow work, and clears them for ``--overwrite``.

  Refuses a run directory or export that is a file, starting over an earlier run's checkpoints
  (unless ``--overwrite``, which removes everything the earlier run wrote) and ``--resume`` with
  nothing to resume. A resumed run that is finished already is not touched.

  Returns:
    With ``--resume`` of finished runs, their summaries (there is nothing to do); else None.
  """
  out = output_dir(cfg)
  for path, what in [(out, "--out"), *((d, "run directory") for d in run_dirs.values()),
                     *((export_dir(cfg, name), "--export") for name in run_dirs)]:
    if path is not None and (path.is_file() or any(p.is_file() for p in path.parents)):
      raise UsageError(f"{what} {path}: {path if path.is_file() else 'a parent'} is a file; give "
                       "a directory")
  found = {name: latest_step(d / "checkpoints") for name, d in run_dirs.items()}
  if cfg.resume:
    if all(step is None for step in found.values()):
      where = ", ".join(str(d / "checkpoints") for d in run_dirs.values())
      raise UsageError(f"--resume: nothing to resume, no checkpoint in {where}; run without "
                       "--resume to start")
    if all(step is not None and step >= cfg.steps and (d / "summary.json").is_file()
           for step, d in zip(found.values(), run_dirs.values())):
      for name, d in run_dirs.items():
        print(f"{d} is finished ({name}, step {found[name]} of {cfg.steps}): nothing to do "
              f"(to train it further, --resume --steps N with N > {found[name]})")
      return [json.loads((d / "summary.json").read_text()) for d in run_dirs.values()]
    return None
  if cfg.overwrite:
    for d in {out, *run_dirs.values()}:
      remove_run(d)
    return None
  for name, step in found.items():
    if step is not None:
      raise UsageError(f"{run_dirs[name]} holds the checkpoints of an earlier run (up to step "
                       f"{step}); continue it with --resume, replace it with --overwrite, or "
                       "choose another --out")
  return None


def remove_run(directory: pathlib.Path) -> None:
  """Removes what a run wrote into ``directory`` (:data:`RUN_FILES`, compared runs' folders)."""
  from examples.optimizers import OPTIMIZERS

  for name in (*RUN_FILES, *OPTIMIZERS):
    path = directory / name
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
      path.unlink()


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
    for tmp in directory.glob("*.orbax-checkpoint-tmp*"):  # a save the process died in
      shutil.rmtree(tmp, ignore_errors=True)
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(
        directory.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts writing the checkpoint of ``step`` (orbax writes in the background; a checkpoint
    appears under its step's name only once it is whole). Ctrl-C cannot cut the call short."""
    ocp = self._ocp
    with defer_ctrl_c():
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_pack(state)),
                                                       meta=ocp.args.JsonSave(meta)))

  def meta(self, step: int) -> dict:
    """The metadata saved with ``step`` (optimizer, seed), read without the arrays."""
    ocp = self._ocp
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, template: Any) -> tuple[Any, dict]:
    """The state saved at ``step``, shaped (and sharded) like ``template``, and its metadata.

    Raises:
      UsageError: the checkpoint does not fit ``template`` (a run with other options).
    """
    import jax

    ocp = self._ocp
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _pack(template))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises several kinds for a tree that does not fit
      first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
      raise UsageError(f"--resume: the checkpoint of step {step} in {self.directory} does not fit "
                       f"the model and optimizer these options build ({first}); resume with the "
                       "options of the run that wrote it") from None
    return _unpack(restored["state"], template), restored["meta"]

  def close(self) -> None:
    """Waits for the last save to be written (Ctrl-C meanwhile is answered, not obeyed)."""
    with defer_ctrl_c():
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
  from examples.lora import merge_lora

  merge_lora(model)
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.partial")  # written whole, then put in place
  if tmp.exists():
    shutil.rmtree(tmp)
  model.save_pretrained(tmp)
  if labels is not None:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(tmp), local_files_only=True)
    hf_config.id2label = {i: str(label) for i, label in enumerate(labels)}
    hf_config.label2id = {str(label): i for i, label in enumerate(labels)}
    hf_config.save_pretrained(str(tmp))
  if tokenizer is not None:
    tokenizer.save_pretrained(tmp)
  umask = os.umask(0)
  os.umask(umask)
  for f in tmp.iterdir():  # safetensors writes through a private temporary file (mode 0600)
    if f.is_file():
      f.chmod(0o666 & ~umask)
  path.mkdir(parents=True, exist_ok=True)
  for f in tmp.iterdir():  # files of an earlier export that this one also writes are replaced
    f.replace(path / f.name)
  tmp.rmdir()
