"""What the engines hold between backward and clipping: only what the clipped sum needs, freed early, no fp32 copies.

Counted on CPU as the bytes of every tensor storage alive (found through the garbage collector) after a captured
forward and backward, minus those alive before (parameters, inputs): autograd's graph is gone by then, so what is
left is what the engine keeps.
"""

import gc

import pytest
import torch
from helpers import make_vit
from torch import nn

from lightning_dp.engine import ENGINES


def _live_storages() -> dict[int, tuple[int, torch.dtype]]:
    out = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            out[storage.data_ptr()] = (storage.nbytes(), obj.dtype)
    return out


def _held_after_backward(engine, model, x, y, precision):
    """Bytes of tensor storages alive after the captured forward + backward that were not alive before, by dtype."""
    gc.collect()
    before = _live_storages()
    with engine.capture(x.shape[0]):
        if precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
        else:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        del loss
    gc.collect()
    held: dict[torch.dtype, int] = {}
    for ptr, (nbytes, dtype) in _live_storages().items():
        if ptr not in before and ptr != 0:
            held[dtype] = held.get(dtype, 0) + nbytes
    return held


def _needs(model, b, precision):
    """What the flat clipped sum needs: ``A`` and ``G`` of each matrix-product layer (in the compute dtype), and
    fp32 per-sample gradients of the vector parameters and broadcast parameters (and a few ``(b,)`` vectors).
    """
    elem = 2 if precision == "bf16" else 4
    big = small = 0
    tokens = {}

    def record(mod, inputs, output):  # tokens: the middle dimensions of a Linear, the positions of a Conv2d
        tokens[mod] = output[0, ..., 0].numel() if isinstance(mod, nn.Linear) else output[0, 0].numel()

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(torch.randn(b, 3, 16, 16))
    for h in handles:
        h.remove()
    for mod, t in tokens.items():
        d = mod.weight[0].numel()
        p = mod.weight.shape[0]
        big += b * t * (d + p) * elem
        small += b * p * 4 + b * 4 * 4  # per-sample bias gradients, squared norms, rounding basis
    for name, prm in model.named_parameters():
        if prm.dim() <= 1 or "." not in name:  # norm scales and biases (per-sample, fp32), broadcast parameters
            small += b * prm.numel() * 4 + b * 4 * 2
    return big, small


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ghost_engine_holds_what_the_clipped_sum_needs_at_any_depth(precision):
    torch.manual_seed(0)
    b = 8
    held, needs = {}, {}
    for depth in (2, 4):
        model = make_vit(depth=depth, embed_dim=48, num_heads=2, patch_size=4).eval()
        x, y = torch.randn(b, 3, 16, 16), torch.randint(0, 3, (b,))
        engine = ENGINES["ghost"](model)
        engine.check_against_autograd = False  # no p.grad: what is left is the engine's
        engine.attach()
        held[depth] = _held_after_backward(engine, model, x, y, precision)
        needs[depth] = _needs(model, b, precision)
        assert engine._records == {}, "every record was turned into its layer's group and freed"
        total = sum(held[depth].values())
        big, small = needs[depth]
        assert total <= (big + small) * 1.05 + 65536, (depth, held[depth], needs[depth])
        assert total >= 0.9 * big, "A and G are held for the clipped sum (else this count misses them)"
        if precision == "bf16":  # no fp32 copies: the fp32 held is the small per-sample work only
            assert held[depth].get(torch.float32, 0) <= small * 1.05 + 65536
        engine.clip_and_accumulate(1.0)
        engine.pop_summed()
    growth = sum(held[4].values()) - sum(held[2].values())
    need_growth = sum(needs[4]) - sum(needs[2])
    assert growth <= need_growth * 1.05 + 65536


@pytest.mark.parametrize("engine_name", ["ghost", "hooks"])
def test_per_layer_clipping_holds_nothing_of_the_layers_after_backward(engine_name):
    torch.manual_seed(1)
    b = 8
    held = {}
    for depth in (2, 4):
        model = make_vit(depth=depth, embed_dim=48, num_heads=2, patch_size=4).eval()
        x, y = torch.randn(b, 3, 16, 16), torch.randint(0, 3, (b,))
        engine = ENGINES[engine_name](model)
        engine.attach()
        with engine.capture(b):  # the first micro-batch (cross-check) tells the engine the mode
            nn.functional.cross_entropy(model(x), y).backward()
        engine.clip_and_accumulate(1.0, "per_layer")
        engine.pop_summed()
        held[depth] = sum(_held_after_backward(engine, model, x, y, "fp32").values())
        # the pending clipped sum of this micro-batch (parameter-sized, fp32) and the small deferred groups
        params = sum(p.numel() * 4 for p in engine.params)
        _, small = _needs(model, b, "fp32")
        assert held[depth] <= params + small + 65536, (depth, held[depth], params, small)
        engine.clip_and_accumulate(1.0, "per_layer")
    model2 = make_vit(depth=2, embed_dim=48, num_heads=2, patch_size=4)
    model4 = make_vit(depth=4, embed_dim=48, num_heads=2, patch_size=4)
    block = sum(p.numel() for p in model4.parameters()) - sum(p.numel() for p in model2.parameters())
    assert held[4] - held[2] <= block * 4 + 2 * b * 48 * 4 * 8 + 65536, "growth: two blocks' parameters only"
