"""The lrtt application: the ``lrtt`` command (train/eval/export/count on a YAML config), the
tasks and data it runs (BBC News on MiniLM and SmolLM2) and the loaders of those models.

It is built on the library's public API; the library (``lrtt`` minus this package) never imports
it. Install its requirements with ``pip install "lrtt[cli]"``.
"""

from lrtt.cli._main import main as main

__all__ = ["main"]
