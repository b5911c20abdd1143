"""Test setup: Triton kernels run interpreted on CPU; hypothesis sized for a 2-core CI."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton or reclora_kernels import

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    """Tests marked cuda_emulation run reclora's native ops through the emulated CUDA kernels."""
    if request.node.get_closest_marker("cuda_emulation") is None:
        yield
        return
    from tests.cuda_emulation import kernels

    if kernels.unavailable_reason():
        pytest.skip(kernels.unavailable_reason())
    with kernels.emulated_cuda_kernels():
        yield
