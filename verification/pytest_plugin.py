"""Kept for installs made before the oracle moved to :mod:`verification.oracle`: their ``pytest11`` entry point
still names this module (``pip install -e .`` again registers ``verification.oracle.pytest_plugin``).

Without it every pytest run of such an environment would stop at start-up on the missing module.
"""
from .oracle.pytest_plugin import proma_check, pytest_addoption, pytest_generate_tests  # noqa: F401
