"""The fine-tuning examples: scripts, and the modules they are made of (see docs/examples.md)."""

import os

# transformers without PyTorch prints "PyTorch was not found..." on import; the examples use only
# its configs and tokenizers, never its models.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
