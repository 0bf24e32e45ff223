"""Fixtures shared by the training tests."""

import pytest

import k25jax
from k25jax.config import RunConfig, tiny
from k25jax.train.qat import quantize_experts


@pytest.fixture(scope="session")
def kimi_release(tmp_path_factory):
    """A release-format tiny model (vision included) whose routed experts are on the kimi grid."""
    from convert.to_release import export_model

    model = k25jax.build_model(tiny(), RunConfig(compute_dtype="float32"), seed=3)
    quantize_experts(model, "kimi")
    out = tmp_path_factory.mktemp("kimi") / "release"
    export_model(model, out, progress=False)
    return out
