"""Test setup: Triton kernels run interpreted on CPU; hypothesis sized for a 2-core CI."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton or reclora_kernels import

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("ci")
