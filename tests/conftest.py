"""Shared test configuration.

Hypothesis profiles: ``ci`` (default, bounded for the 2-core CI machine) and ``dev`` (more examples).
Choose with ``LOWBIT_HYPOTHESIS_PROFILE=dev python -m pytest``.
"""
import os

# Kernel tuning (lowbit.kernels.tuning) off: the defaults, no timing runs, no cache file written.
os.environ.setdefault("LOWBIT_TUNING", "0")

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile(
    "dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("LOWBIT_HYPOTHESIS_PROFILE", "ci"))
