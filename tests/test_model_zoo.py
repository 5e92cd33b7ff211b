"""Every family of the compatibility table, in a tiny configuration: per-sample gradients against a per-example loop
in float64, for both engines (the checked micro-batch, then a plain one).
"""

import pytest
import torch
from model_zoo import ZOO
from zoo_check import compare

from lightning_dp import fix_model

TOLERANCE = 1e-5


def _inputs(family):
    entry = ZOO[family]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = entry.build().double()
    if entry.batchnorm:
        model = fix_model(model)
    x = entry.inputs(3, g)
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (3,), generator=g)
    return model, x, y


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("family", list(ZOO))
def test_family_matches_brute_force(family, engine_name):
    result = compare(engine_name, *_inputs(family))
    if engine_name == "hooks":
        assert result.per_sample < TOLERANCE
    assert result.norms < TOLERANCE
    assert result.clipped_sum < TOLERANCE


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("family", list(ZOO))
def test_family_per_layer_clipping_matches_brute_force(family, engine_name):
    """Per-layer clipping (groups clipped inside backward from the second micro-batch on, fallback units split per
    group) against the brute-force per-group clipped sum.
    """
    result = compare(engine_name, *_inputs(family), clipping="per_layer")
    assert result.norms < TOLERANCE
    assert result.clipped_sum < TOLERANCE
