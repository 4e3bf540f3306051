"""How a script stops: bad input and Ctrl-C, each ending it with one line.

:class:`UsageError` is any problem with the user's input (an option, a data file, a run
directory); :class:`Interrupted` is a training run stopped by Ctrl-C after its checkpoint.
:func:`main_guard` turns them (and a Ctrl-C anywhere else) into one line and a non-zero exit,
:func:`run_script` is a script's ``__main__``, and :func:`defer_ctrl_c` is what the training loop
and checkpoint saves run inside, so that Ctrl-C never stops them half-way.

This module imports nothing from the examples, nor JAX.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any


class UsageError(Exception):
  """A problem with the user's input; the scripts print it as one line and exit."""


class Interrupted(Exception):
  """Training stopped on Ctrl-C after saving a checkpoint at ``step``."""

  def __init__(self, step: int):
    super().__init__(f"interrupted at step {step}; continue with --resume")
    self.step = step


class _CtrlC:
  """What SIGINT does while a script runs (the handler is :func:`main_guard`'s).

  Outside training it raises ``KeyboardInterrupt`` at once (one line, see :func:`main_guard`) and
  also sets ``requested``, which :func:`check_interrupted` checks between the phases of a run, so
  that a Ctrl-C swallowed by library code (JAX's import) still stops it. Inside
  :func:`defer_ctrl_c` (the training loop, checkpoint saves, JAX's import) it only sets
  ``requested``: the training loop stops after the current step and saves a checkpoint, and any
  further Ctrl-C is answered with one line while that finishes (a checkpoint is written whole or
  not at all).
  """

  requested = False
  deferred = False
  said = False

  def handle(self, signum, frame):
    if self.deferred and self.requested:
      if not self.said:
        self.said = True
        print("\nCtrl-C again: stopping at the next safe point (a checkpoint being written is "
              "finished first)", file=sys.stderr, flush=True)
      return
    self.requested = True
    if not self.deferred:
      raise KeyboardInterrupt


CTRL_C = _CtrlC()


def _in_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def check_interrupted() -> None:
  """Raises ``KeyboardInterrupt`` if Ctrl-C was pressed (and swallowed somewhere) since the start."""
  if CTRL_C.requested:
    raise KeyboardInterrupt


@contextlib.contextmanager
def defer_ctrl_c():
  """Within: Ctrl-C only sets ``CTRL_C.requested``, checked afterwards (by the training loop after
  each step, which then saves a checkpoint; by :func:`check_interrupted`).

  Raising ``KeyboardInterrupt`` in the middle of a step could leave donated buffers
  half-consumed (or crash inside XLA), and in the middle of an orbax save a half-written
  checkpoint; stopping between steps lets the loop save a consistent one.
  """
  if not _in_main_thread():
    yield CTRL_C
    return
  previous = signal.signal(signal.SIGINT, CTRL_C.handle)
  was_deferred, CTRL_C.deferred = CTRL_C.deferred, True
  try:
    yield CTRL_C
  finally:
    CTRL_C.deferred = was_deferred
    signal.signal(signal.SIGINT, previous)


def main_guard(main: Callable[[Sequence[str] | None], Any]):
  """Ends a script on bad input or Ctrl-C with one line and a non-zero status (no traceback)."""

  @functools.wraps(main)
  def wrapped(argv=None):
    CTRL_C.requested = CTRL_C.said = False
    previous = signal.signal(signal.SIGINT, CTRL_C.handle) if _in_main_thread() else None
    try:
      return main(argv)
    except UsageError as e:
      raise SystemExit(f"error: {e}") from None
    except Interrupted as e:
      raise SystemExit(str(e)) from None
    except KeyboardInterrupt:  # outside the training loop (data, generation, export)
      raise SystemExit("interrupted; nothing saved since the last checkpoint") from None
    except Exception:
      if CTRL_C.requested:  # the interrupt surfaced as another error (e.g. inside a C extension)
        raise SystemExit("interrupted; nothing saved since the last checkpoint") from None
      raise
    finally:
      CTRL_C.requested = False
      if previous is not None:
        signal.signal(signal.SIGINT, previous)

  return wrapped


def run_script(main: Callable[[], Any]) -> None:
  """A script's ``__main__``: runs ``main``; an interrupted run ends with its one line and exit
  status 130 without the interpreter's shutdown (tearing down JAX's threads in the middle of a
  compilation can crash the process after the line was printed)."""
  try:
    main()
  except SystemExit as e:
    if isinstance(e.code, str) and e.code.startswith("interrupted"):
      print(e.code, file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(130)
    raise
