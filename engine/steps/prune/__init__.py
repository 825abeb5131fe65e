"""Pruning steps: ``prune.magnitude`` and ``prune.wanda`` (unstructured and N:M, ``unstructured.py``);
``prune.width`` and ``prune.depth`` (heads, MLP channels, hidden size and whole blocks, ``structured.py``)."""
from . import structured, unstructured  # noqa: F401  (each registers its steps)
