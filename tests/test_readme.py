"""The README's (and docs') Python code blocks run as written, each on its own (no names from
elsewhere); the README stays a short front door whose figures all come from generated results."""

import pathlib
import re

import jax
import numpy as np
import pytest

import optax_memopt

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCKS = [(path, block) for path in (README, *DOCS)
          for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S)]
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def _run(snippet: str, path: pathlib.Path = README) -> dict:
  scope: dict = {"__name__": "readme"}
  exec(compile(snippet, str(path), "exec"), scope)  # noqa: S102 - our own README
  return scope


def _hand_written(text: str) -> str:
  """The text outside the block that benchmarks/report.py generates."""
  head, rest = text.split(START, 1)
  return head + rest.split(END, 1)[1]


def test_the_readme_has_python_blocks():
  assert sum(path == README for path, _ in BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(BLOCKS)])
def test_python_block_runs_as_written(index):
  path, block = BLOCKS[index]
  scope = _run(block, path)
  for name in ("loss", "x"):
    if name in scope:
      assert np.all(np.isfinite(np.asarray(scope[name]))), name


def test_usage_snippet_trains_one_block():
  (snippet,) = re.findall(r"## Usage\n\n```python\n(.*?)```", README.read_text(), re.S)
  scope = _run(snippet)
  p, s, step = scope["params"], scope["opt_state"], scope["step"]
  before = jax.tree.map(np.asarray, p)  # the block step donates the params it is given
  for _ in range(3):  # a few more block steps: only the active block moves
    p, s, loss = step(p, s, scope["batch"])
  assert np.isfinite(float(loss))
  changed = [not np.array_equal(a["w"], b["w"]) for a, b in zip(p["layers"], before["layers"])]
  assert sum(changed) == 1
  assert optax_memopt.active_block(s) == changed.index(True)
  ranks = optax_memopt.effective_ranks(scope["tx"].init(before))
  assert sorted(ranks) == ["layers.0.w", "layers.1.w", "layers.2.w"]


def test_the_readme_is_a_front_door():
  """Short, with the generated block, the entry-point table, and links that resolve."""
  text = README.read_text()
  assert len(text.splitlines()) <= 220
  assert text.count(START) == 1 and text.count(END) == 1
  assert "## Which entry point" in text and "## API" in text
  for path in (README, *DOCS):
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
      assert (path.parent / link).exists(), (path.name, link)


def test_every_name_in_the_api_tables_is_exported():
  text = README.read_text()
  for section in ("## Which entry point", "## API"):
    table = text.split(section, 1)[1].split("\n## ", 1)[0]
    names = {m for row in table.splitlines() if row.startswith("| `")
             for m in re.findall(r"`([A-Za-z_]+)[(`]", row.split("|")[1])}
    assert names, section
    for name in names:
      assert hasattr(optax_memopt, name), name
  assert "make_layerwise_step" in optax_memopt.__doc__ and "make_block_step" in optax_memopt.__doc__


def test_no_measured_figures_in_hand_written_text():
  """Sizes, times and ratios belong to the generated results (benchmarks/RESULTS.md)."""
  figure = re.compile(r"\b\d+(\.\d+)? ?(GB|MB|GiB|MiB|ms)\b|\b\d+\.\d+x\b|\b0\.\d{3,}\b")
  for path in (README, *DOCS):
    text = path.read_text()
    text = _hand_written(text) if path == README else text
    assert not figure.search(text), (path.name, figure.search(text).group(0))
