"""Shared pytest configuration: Hypothesis profiles and the suite's one thread setting.

``HYPOTHESIS_PROFILE=ci`` (set by ``.ci/run``) makes every property test derandomized and bounded so that
CI is reproducible and fast on 2 cores; ``dev`` (the default) explores more examples.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# The suite's tensors are tiny: one torch thread for every test (spawned workers call pin_threads themselves).
# (reference/ never imports torch; its own contract test checks that in a fresh subprocess.) Without torch
# (the base install: reference and oracle only, as CI's torch-free step runs tests/reference) there is none.
try:
    import torch  # noqa: E402, F401
except ImportError:
    pass
else:
    from verification.testkit import pin_threads  # noqa: E402

    pin_threads()
