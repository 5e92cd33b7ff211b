"""Cost model of lightning_dp's private step on a GPU: the engine's extra FLOPs and HBM bytes over the non-private
step, counted from the layer shapes, and the H100 throughput and peak-memory ratios they predict.

PREDICTED, NOT MEASURED. The model counts, per step, from the shapes ``(B, T, d, p)`` of every linear / convolution
layer (found by a forward pass on the ``meta`` device), the LayerNorms and the broadcast parameters:

- ghost norms ``2·B·T²·(d+p)`` FLOPs per layer (bf16 tensor cores with fp32 results under ``bf16-mixed``, fp32 CUDA
  cores otherwise: the engine turns TF32 off), or per-sample instantiation ``2·B·T·d·p`` where that is cheaper;
- the clipped sum ``Σ_i f_i G_iᵀ A_i``: it *replaces* autograd's weight-gradient GEMM (the engine switches the
  parameters' ``requires_grad`` off), so it adds no FLOPs in bf16; in fp32 it runs without TF32 (extra time);
- HBM bytes: reading ``A``/``G`` for the Gram matrices, writing and reading them, the clip-scaled rows, bias sums,
  LayerNorm and broadcast-parameter per-sample gradients, the noise and the running sum;
- one host synchronisation per micro-batch (flat), one per large parameter group (per-layer clipping in backward).

Time: ``t_extra = F_tc/(η_tc·P_bf16) + F_fp32/(η_fp32·P_fp32) + bytes/(η_bw·BW) + syncs·t_sync`` with the constants in
:data:`H100`. The same roofline applied to the non-private step gives ``t_roofline``; the measured non-private step
(``reference-figures.md``: ViT-B/16, 224 px, batch 128: 2313 samples/s bf16, 1142 fp32) is ``κ`` times slower
(kernel launches, attention, small kernels). The *calibrated* prediction charges the engine's extra work the same
``κ`` (``ratio = t_np / (t_np + κ·t_extra)``); the *roofline* one charges it at the roofline (``κ = 1``).

Memory: the backward pass frees each block's saved activations while the engine keeps its ``A`` (shared with
autograd's saved input: the engine casts it to bf16 before the layer does) and ``G``; so the peak is
``static + L·max(act_block, (A+G)_block) + extras`` against ``static + L·act_block`` non-private, with the saved
activations per block counted by a CPU forward of one block at batch 1 (``saved_tensors_hooks``) and the rest of the
measured non-private peak (9.5 GiB) taken as a constant workspace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: H100 SXM5 (80 GB HBM3) datasheet peaks (dense) and the efficiencies assumed for the engine's kernels.
H100 = {
    "bf16_tflops": 989.4,  # tensor cores, dense
    "tf32_tflops": 494.7,  # tensor cores, dense
    "fp32_tflops": 66.9,  # CUDA cores (what "highest" fp32 matmul precision runs on)
    "hbm_tbps": 3.35,
    "eta_tc": 0.6,  # achieved share of the tensor-core peak (large GEMMs ~0.7; batched Gram bmm less)
    "eta_fp32": 0.8,
    "eta_bw": 0.8,
    "sync_s": 20e-6,  # a host synchronisation: the GPU queue drains, then refills
    "launch_s": 4e-6,  # per kernel: small shapes are launch-bound, whatever the roofline says
}

#: Measured non-private references (one H100, ``/work/shared/reference-figures.md``): samples/s and peak GiB.
REFERENCE = {
    ("vit_base_patch16_224", 224, 128, "bf16-mixed"): (2313.0, 9.5),
    ("vit_base_patch16_224", 224, 128, "32"): (1142.0, 15.5),
    ("vit_base_patch16_224", 224, 64, "bf16-mixed"): (2074.0, 5.4),
    ("vit_base_patch16_224", 224, 64, "32"): (1063.0, 8.3),
}


@dataclass
class Matmul:
    name: str
    b: int
    t: int
    d: int
    p: int
    bias: bool


@dataclass
class Shapes:
    """The layer shapes of one model configuration at a batch size."""

    batch: int
    depth: int
    matmuls: list[Matmul] = field(default_factory=list)
    norms: list[tuple[int, int, int]] = field(default_factory=list)  #: LayerNorm (B, T, d)
    broadcast_numel: int = 0  #: per example, elements of the broadcast parameters (cls/pos/reg tokens)
    params: int = 0
    attention_flops: float = 0.0  #: forward FLOPs of the attention products (QKᵀ, AV)


def model_shapes(cfg: dict[str, Any]) -> Shapes:
    """Shapes of ``cfg``'s timm model (keys as in ``benchmarks/throughput.py``) from a forward on the meta device."""
    import timm
    import torch
    from torch import nn

    kw: dict[str, Any] = dict(pretrained=False, num_classes=cfg.get("num_classes", 100), img_size=cfg["img_size"])
    if cfg.get("patch_size"):
        kw["patch_size"] = cfg["patch_size"]
    if cfg.get("depth"):
        kw["depth"] = cfg["depth"]
    with torch.device("meta"):
        model = timm.create_model(cfg["model"], **kw)
    b = cfg["batch_size"]
    shapes = Shapes(batch=b, depth=len(getattr(model, "blocks", [])))
    shapes.params = sum(p.numel() for p in model.parameters())
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(mod, nn.Linear):
            t = output[0, ..., 0].numel()
            shapes.matmuls.append(Matmul(names[mod], b, t, mod.in_features, mod.out_features, mod.bias is not None))
        elif isinstance(mod, nn.Conv2d):
            t = output[0, 0].numel()
            d = mod.weight[0].numel()
            shapes.matmuls.append(Matmul(names[mod], b, t, d, mod.out_channels, mod.bias is not None))
        elif isinstance(mod, nn.LayerNorm):
            shapes.norms.append((b, output[0, ..., 0].numel(), output.shape[-1]))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.empty(b, 3, cfg["img_size"], cfg["img_size"], device="meta"))
    for h in handles:
        h.remove()
    for name in ("cls_token", "reg_token", "pos_embed", "dist_token"):
        p = getattr(model, name, None)
        if p is not None:
            shapes.broadcast_numel += p.numel()
    for blk in getattr(model, "blocks", []):
        attn = getattr(blk, "attn", None)
        if attn is not None:
            qkv = next(m for m in shapes.matmuls if m.name.endswith(f"{names[blk]}.attn.qkv"))
            shapes.attention_flops += 2 * 2 * b * qkv.t * qkv.t * qkv.d  # QKᵀ and AV over all heads
    return shapes


@dataclass
class Costs:
    """Per-step counts: tensor-core FLOPs, fp32 CUDA-core FLOPs, HBM bytes, host syncs; bytes the engine holds."""

    tc_flops: float = 0.0
    fp32_flops: float = 0.0
    tf32_flops: float = 0.0
    bytes: float = 0.0
    syncs: int = 0
    kernels: int = 0
    held_bytes: float = 0.0  #: what the engine keeps at the end of backward (A and G, per-sample small groups)
    parts: dict[str, tuple[float, float]] = field(default_factory=dict)

    def seconds(self, dev: dict[str, float] = H100) -> float:
        """The roofline time (compute and memory added, no overlap), or the kernels' launch time if longer."""
        roofline = (
            self.tc_flops / (dev["eta_tc"] * dev["bf16_tflops"] * 1e12)
            + self.tf32_flops / (dev["eta_tc"] * dev["tf32_tflops"] * 1e12)
            + self.fp32_flops / (dev["eta_fp32"] * dev["fp32_tflops"] * 1e12)
            + self.bytes / (dev["eta_bw"] * dev["hbm_tbps"] * 1e12)
        )
        return max(roofline, self.kernels * dev["launch_s"]) + self.syncs * dev["sync_s"]


def engine_costs(shapes: Shapes, precision: str, clipping: str = "flat") -> Costs:
    """The ghost engine's extra work over the non-private step (see the module docstring), with a breakdown by
    part in ``Costs.parts`` (name → (FLOPs, bytes)).
    """
    low = precision == "bf16-mixed"
    e = 2 if low else 4
    c = Costs()

    def add(part: str, flops: float = 0.0, nbytes: float = 0.0, tc: bool = low) -> None:
        if tc:
            c.tc_flops += flops
        else:
            c.fp32_flops += flops
        c.bytes += nbytes
        f0, b0 = c.parts.get(part, (0.0, 0.0))
        c.parts[part] = (f0 + flops, b0 + nbytes)

    large_groups = 0
    for m in shapes.matmuls:
        b, t, d, p = m.b, m.t, m.d, m.p
        if 2 * t * t <= d * p:  # ghost norm: read A and G, write and read the two Gram matrices
            add("ghost norms", 2 * b * t * t * (d + p), b * t * (d + p) * e + 2 * 2 * b * t * t * 4)
        else:  # instantiation: read A and G, write and read the per-sample gradients
            add("instantiated norms", 2 * b * t * d * p, b * t * (d + p) * e + 2 * b * d * p * 4)
        add("clip-scaled rows", nbytes=2 * b * t * min(d, p) * e)
        if not low:  # the clipped sum replaces autograd's TF32 weight gradient by an fp32 CUDA-core GEMM
            add("fp32 (not TF32) clipped sum", 2 * b * t * d * p, tc=False)
            c.tf32_flops -= 2 * b * t * d * p
        if m.bias:
            add("per-sample bias sums", nbytes=b * t * p * e)
        add("running sums", nbytes=2 * d * p * 4)
        c.held_bytes += b * t * (d + p) * e + b * p * 4
        c.kernels += 18  # Grams, their product and diagonals, bias sums; scaling, GEMM, running sum
        large_groups += 1
    for b, t, d in shapes.norms:
        # x (fp32) read, the normalised input written and read, G (fp32: the output gradient of a LayerNorm feeding
        # an autocast cast) read twice (weight and bias), the product written and read
        add("LayerNorm per-sample gradients", nbytes=b * t * d * (4 + 8 + 8 + 8))
        c.held_bytes += 2 * b * d * 4
        c.kernels += 10
    c.kernels += 40  # broadcast copies, clip factors, non-finite check, noise, flat buffer
    add("broadcast parameters", nbytes=4 * shapes.batch * shapes.broadcast_numel * 4)
    c.held_bytes += shapes.batch * shapes.broadcast_numel * 4
    add("noise and flat buffer", nbytes=6 * shapes.params * 4)
    c.syncs = 1
    if clipping == "per_layer":
        c.syncs += large_groups
        c.held_bytes = shapes.params * 4 + sum(2 * b * d * 4 for b, _, d in shapes.norms)
    return c


def nonprivate_costs(shapes: Shapes, precision: str, act_bytes_per_example: float) -> Costs:
    """The non-private step at the roofline: 3× the forward's matmul FLOPs, activations written, read and their
    gradients formed once each, AdamW over the parameters.
    """
    low = precision == "bf16-mixed"
    c = Costs()
    flops = 3 * (sum(2 * m.b * m.t * m.d * m.p for m in shapes.matmuls) + shapes.attention_flops)
    if low:
        c.tc_flops = flops
    else:
        c.tf32_flops = flops
    c.bytes = 3 * act_bytes_per_example * shapes.batch + 28 * shapes.params
    c.kernels = 60 * max(shapes.depth, 1) + 50  # forward, backward and AdamW (foreach) kernels
    return c


def saved_activation_bytes(cfg: dict[str, Any]) -> tuple[float, float]:
    """Bytes autograd saves per example: ``(per transformer block, outside the blocks)``, counted on CPU with
    ``saved_tensors_hooks`` for batch 1 and 2 (the difference is per example), under the configuration's precision.
    """
    import timm
    import torch

    kw: dict[str, Any] = dict(pretrained=False, num_classes=cfg.get("num_classes", 100), img_size=cfg["img_size"])
    if cfg.get("patch_size"):
        kw["patch_size"] = cfg["patch_size"]

    def count(depth: int, batch: int) -> float:
        model = timm.create_model(cfg["model"], depth=depth, **kw).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"])
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16-mixed")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            model(x).sum()
        return float(sum(seen.values()))

    torch.manual_seed(0)
    per_block = (count(2, 2) - count(2, 1)) - (count(1, 2) - count(1, 1))
    outside = (count(1, 2) - count(1, 1)) - per_block
    return per_block, outside


@dataclass
class Prediction:
    model: str
    batch: int
    precision: str
    clipping: str
    extra_tflop: float
    extra_gb: float
    extra_ms_roofline: float
    kappa: float
    ratio_calibrated: float
    ratio_roofline: float
    peak_ratio: float | None
    peak_gib: float | None


def _calibration(precision: str) -> tuple[dict[str, Any], float, float]:
    """The ViT-B/16 batch-128 reference of ``precision``: its configuration, step seconds and peak GiB."""
    key = ("vit_base_patch16_224", 224, 128, precision)
    samples, peak = REFERENCE[key]
    cfg = dict(model=key[0], img_size=224, batch_size=128, precision=precision, num_classes=100)
    return cfg, 128 / samples, peak


_ACT_CACHE: dict[tuple, tuple[float, float]] = {}


def _activations(cfg: dict[str, Any]) -> tuple[float, float]:
    key = (cfg["model"], cfg["img_size"], cfg.get("patch_size"), cfg["precision"])
    if key not in _ACT_CACHE:
        _ACT_CACHE[key] = saved_activation_bytes(cfg)
    return _ACT_CACHE[key]


def predict(cfg: dict[str, Any], clipping: str = "flat") -> Prediction:
    """Predicted H100 ratios of the ghost engine's private step to the non-private step for ``cfg``."""
    precision = cfg["precision"]
    ref_cfg, ref_step, ref_peak = _calibration(precision)
    ref_shapes = model_shapes(ref_cfg)
    ref_block, ref_out = _activations(ref_cfg)
    ref_act = ref_block * ref_shapes.depth + ref_out
    kappa = ref_step / nonprivate_costs(ref_shapes, precision, ref_act).seconds()

    shapes = model_shapes(cfg)
    block, out = _activations(cfg)
    act = block * max(shapes.depth, 1) + out
    extra = engine_costs(shapes, precision, clipping)
    reference = REFERENCE.get((cfg["model"], cfg["img_size"], cfg["batch_size"], precision))
    if reference is not None:
        t_np = cfg["batch_size"] / reference[0]
    else:
        t_np = kappa * nonprivate_costs(shapes, precision, act).seconds()
    t_extra = extra.seconds()
    peak_ratio = peak_gib = None
    if reference is not None:
        static = 16 * shapes.params  # fp32 weights, gradients, AdamW moments
        np_model = static + act * shapes.batch
        workspace = reference[1] * 2**30 - np_model
        depth = max(shapes.depth, 1)
        held_block = extra.held_bytes / depth
        private = static + depth * max(block * shapes.batch, held_block) + out * shapes.batch
        private += shapes.batch * shapes.broadcast_numel * 4 + 4 * shapes.params  # per-sample copies, running sum
        peak_gib = (private + workspace) / 2**30
        peak_ratio = peak_gib / reference[1]
    return Prediction(
        model=cfg["model"],
        batch=cfg["batch_size"],
        precision=precision,
        clipping=clipping,
        extra_tflop=(extra.tc_flops + extra.fp32_flops) / 1e12,
        extra_gb=extra.bytes / 1e9,
        extra_ms_roofline=t_extra * 1e3,
        kappa=kappa,
        ratio_calibrated=t_np / (t_np + kappa * t_extra),
        ratio_roofline=t_np / (t_np + t_extra),
        peak_ratio=peak_ratio,
        peak_gib=peak_gib,
    )


def describe(pred: Prediction) -> str:
    mem = f", peak {pred.peak_gib:.1f} GiB = {pred.peak_ratio:.2f}× non-private" if pred.peak_gib else ""
    return (
        f"PREDICTED, NOT MEASURED (H100 cost model): {pred.model} batch {pred.batch} {pred.precision}"
        f" clipping={pred.clipping}: engine extra {pred.extra_tflop:.2f} TFLOP + {pred.extra_gb:.1f} GB per step"
        f" ({pred.extra_ms_roofline:.1f} ms at the roofline, κ = {pred.kappa:.2f}); throughput"
        f" {pred.ratio_calibrated:.2f}× non-private (calibrated), {pred.ratio_roofline:.2f}× (roofline){mem}"
    )


def breakdown(cfg: dict[str, Any], clipping: str = "flat") -> str:
    """The engine's extra work by part: TFLOP, GB and roofline milliseconds."""
    costs = engine_costs(model_shapes(cfg), cfg["precision"], clipping)
    lines = ["| part | TFLOP | GB | ms at the roofline |", "|---|---|---|---|"]
    for part, (flops, nbytes) in costs.parts.items():
        one = Costs(bytes=nbytes)
        if cfg["precision"] == "bf16-mixed" or part != "fp32 (not TF32) clipped sum" and "norms" not in part:
            one.tc_flops = flops
        else:
            one.fp32_flops = flops
        if part == "fp32 (not TF32) clipped sum":
            one.tf32_flops = -flops
        lines.append(f"| {part} | {flops / 1e12:.2f} | {nbytes / 1e9:.2f} | {one.seconds() * 1e3:.2f} |")
    lines.append(f"| host synchronisations | | | {costs.syncs * H100['sync_s'] * 1e3:.2f} |")
    return "\n".join(lines)


def main() -> None:
    for precision in ("bf16-mixed", "32"):
        for clipping in ("flat", "per_layer"):
            cfg = dict(model="vit_base_patch16_224", img_size=224, batch_size=128, precision=precision, num_classes=100)
            print(describe(predict(cfg, clipping)))
    cfg = dict(model="vit_base_patch16_224", img_size=224, batch_size=128, precision="bf16-mixed", num_classes=100)
    print()
    print("ViT-B/16, 224 px, batch 128, bf16-mixed, flat clipping: the engine's extra work by part (predicted)")
    print(breakdown(cfg))
    print("constants:", H100)


if __name__ == "__main__":
    main()
