"""EdgeTailor: tailor language models to edge devices.

Packages: ``edgetailor.engine`` (no Qt), ``edgetailor.exporters``, ``edgetailor.ui`` (PySide6),
``edgetailor.assets``; this package holds the entry points (``cli``, ``gui``).
"""
__version__ = "0.1.0"
