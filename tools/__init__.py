"""The command-line tools (each runs as ``python tools/<name>.py``). A package so that tests import
them by name (``from tools import plot_shaping``) with the repository root on ``sys.path``."""
