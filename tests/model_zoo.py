"""Tiny random-weight configurations of real architectures that nobody here wrote (timm families, torch layers).

Shared by the per-family tests (``tests/test_model_zoo.py``) and the compatibility table
(``benchmarks/compatibility.py``). Each entry builds a model in its family's own classes (1–2 blocks, widths 8–32,
inputs of 16–32 px) and an input batch for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

NUM_CLASSES = 3


@dataclass(frozen=True)
class ZooEntry:
    """One family: how to build a tiny model and a batch of inputs for it.

    Attributes:
        name: the family.
        build: a fresh model with random weights (``num_classes=3``).
        img: image side in pixels (for image models).
        tokens: ``(vocab, length)`` for models taking token indices instead of images.
        batchnorm: the family uses BatchNorm; it trains under DP after ``lightning_dp.fix_model``.
        source: ``"timm"`` or ``"torch"``.
    """

    name: str
    build: Callable[[], nn.Module]
    img: int = 16
    tokens: tuple[int, int] | None = None
    features: tuple[int, ...] | None = None
    batchnorm: bool = False
    source: str = "timm"

    def inputs(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """A batch of ``b`` inputs."""
        if self.tokens is not None:
            vocab, length = self.tokens
            return torch.randint(0, vocab, (b, length), generator=generator)
        if self.features is not None:
            return torch.randn(b, *self.features, generator=generator)
        return torch.randn(b, 3, self.img, self.img, generator=generator)


# ---------------------------------------------------------------------------------------------------------- timm
def vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        num_classes=NUM_CLASSES,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        reg_tokens=1,
        init_values=0.1,
    )


def deit():
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(
        num_classes=NUM_CLASSES, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2
    )


def beit():
    from timm.models.beit import Beit

    return Beit(
        num_classes=NUM_CLASSES,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        use_rel_pos_bias=True,
        init_values=0.1,
    )


def eva():
    from timm.models.eva import Eva

    return Eva(
        num_classes=NUM_CLASSES,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        qkv_fused=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(2, 2),
        swiglu_mlp=True,
        scale_mlp=True,
        init_values=0.1,
    )


def cait():
    from timm.models.cait import Cait

    return Cait(
        num_classes=NUM_CLASSES, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, depth_token_only=1
    )


def xcit():
    from timm.models.xcit import Xcit

    return Xcit(
        num_classes=NUM_CLASSES, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, cls_attn_layers=1
    )


def coat():
    from timm.models.coat import CoaT

    return CoaT(
        num_classes=NUM_CLASSES,
        img_size=32,
        patch_size=4,
        embed_dims=(8, 8, 16, 16),
        serial_depths=(1, 1, 1, 1),
        num_heads=2,
        mlp_ratios=(2, 2, 2, 2),
        crpe_window={1: 1, 3: 1},
    )


def crossvit():
    from timm.models.crossvit import CrossVit

    return CrossVit(
        num_classes=NUM_CLASSES,
        img_size=(16, 16),
        img_scale=(1.0, 1.0),
        patch_size=(8, 4),
        embed_dim=(16, 16),
        depth=((1, 1, 0),),
        num_heads=(2, 2),
        mlp_ratio=(2, 2, 1),
    )


def convnext():
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(num_classes=NUM_CLASSES, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), ls_init_value=0.1)


def resmlp():
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    return MlpMixer(
        num_classes=NUM_CLASSES,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        num_blocks=1,
        mlp_ratio=2,
        block_layer=ResBlock,
        norm_layer=Affine,
    )


def mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=NUM_CLASSES, img_size=16, patch_size=8, embed_dim=16, num_blocks=1, mlp_ratio=(0.5, 2))


def gmlp():
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

    return MlpMixer(
        num_classes=NUM_CLASSES,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        num_blocks=1,
        mlp_ratio=2,
        block_layer=SpatialGatingBlock,
        mlp_layer=GatedMlp,
    )


def swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        num_classes=NUM_CLASSES,
        img_size=16,
        patch_size=2,
        window_size=4,
        embed_dim=8,
        depths=(1, 1),
        num_heads=(1, 2),
        drop_path_rate=0.0,
    )


def swinv2():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return SwinTransformerV2(
        num_classes=NUM_CLASSES,
        img_size=16,
        patch_size=2,
        window_size=4,
        embed_dim=8,
        depths=(1, 1),
        num_heads=(1, 2),
        drop_path_rate=0.0,
    )


def mobilevit():
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    cfg = ByoModelCfg(
        blocks=(
            ByoBlockCfg(
                type="bottle", d=1, c=8, s=2, gs=1, br=2.0, block_kwargs={"bottle_in": True, "linear_out": True}
            ),
            ByoBlockCfg(
                type="mobilevit",
                d=1,
                c=8,
                s=1,
                block_kwargs={"transformer_dim": 16, "transformer_depth": 1, "patch_size": 2},
            ),
        ),
        stem_chs=8,
        stem_type="3x3",
        stem_pool="",
        downsample="",
        num_features=16,
        act_layer="silu",
    )
    return ByobNet(cfg, num_classes=NUM_CLASSES)


def levit():
    from timm.models.levit import Levit

    return Levit(num_classes=NUM_CLASSES, img_size=16, embed_dim=(16, 24), key_dim=8, num_heads=(2, 2), depth=(1, 1))


def efficientnet():
    from timm.models.efficientnet import _gen_efficientnet

    return _gen_efficientnet("efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.25, num_classes=NUM_CLASSES)


def mobilenetv3():
    from timm.models.mobilenetv3 import _gen_mobilenet_v3

    return _gen_mobilenet_v3("mobilenetv3_small_050", 0.25, num_classes=NUM_CLASSES)


def resnet():
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=NUM_CLASSES, stem_width=8, channels=(8, 8, 8, 8))


def poolformer():
    from timm.models.metaformer import GroupNorm1, MetaFormer

    return MetaFormer(
        num_classes=NUM_CLASSES,
        depths=(1, 1),
        dims=(8, 16),
        downsample_norm=None,
        mlp_act=nn.GELU,
        mlp_bias=True,
        norm_layers=GroupNorm1,
        layer_scale_init_values=0.1,
        res_scale_init_values=None,
        use_mlp_head=False,
    )


def caformer():
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    return MetaFormer(
        num_classes=NUM_CLASSES,
        depths=(1, 1),
        dims=(8, 32),
        token_mixers=[SepConv, Attention],
        norm_layers=[LayerNorm2dNoBias, LayerNormNoBias],
        layer_scale_init_values=0.1,
        res_scale_init_values=(None, 1.0),
    )


def convmixer():
    from timm.models.convmixer import ConvMixer

    return ConvMixer(dim=16, depth=1, kernel_size=3, patch_size=4, num_classes=NUM_CLASSES)


def pit():
    from timm.models.pit import PoolingVisionTransformer

    return PoolingVisionTransformer(
        num_classes=NUM_CLASSES, img_size=16, patch_size=4, stride=2, base_dims=(8, 8), depth=(1, 1), heads=(2, 2)
    )


def tnt():
    from timm.models.tnt import TNT

    return TNT(
        num_classes=NUM_CLASSES,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        inner_dim=8,
        depth=1,
        num_heads_inner=2,
        num_heads_outer=2,
        first_stride=4,
    )


def twins():
    from timm.models.twins import Twins

    return Twins(
        num_classes=NUM_CLASSES,
        img_size=32,
        patch_size=4,
        embed_dims=(8, 16),
        num_heads=(1, 2),
        depths=(1, 1),
        wss=(2, 2),
        sr_ratios=(2, 1),
        mlp_ratios=(2, 2),
    )


def pvt_v2():
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    return PyramidVisionTransformerV2(
        num_classes=NUM_CLASSES,
        embed_dims=(8, 16),
        depths=(1, 1),
        num_heads=(1, 2),
        sr_ratios=(2, 1),
        mlp_ratios=(2, 2),
    )


def nest():
    from timm.models.nest import Nest

    return Nest(
        num_classes=NUM_CLASSES,
        img_size=16,
        patch_size=2,
        num_levels=2,
        embed_dims=(8, 16),
        num_heads=(1, 2),
        depths=(1, 1),
        drop_path_rate=0.0,
    )


def convit():
    from timm.models.convit import ConVit

    return ConVit(
        num_classes=NUM_CLASSES, img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, local_up_to_layer=1
    )


def edgenext():
    from timm.models.edgenext import EdgeNeXt

    return EdgeNeXt(
        num_classes=NUM_CLASSES,
        dims=(8, 8, 8, 8),
        depths=(1, 1, 1, 1),
        global_block_counts=(0, 1, 0, 0),
        kernel_sizes=(3, 3, 3, 3),
        heads=(2, 2, 2, 2),
        d2_scales=(2, 2, 2, 2),
        use_pos_emb=(False, True, False, False),
        ls_init_value=0.1,
    )


def sequencer():
    from timm.models.sequencer import Sequencer2d

    return Sequencer2d(
        num_classes=NUM_CLASSES,
        img_size=16,
        layers=(1, 1),
        patch_sizes=(4, 1),
        embed_dims=(8, 8),
        hidden_sizes=(4, 4),
        mlp_ratios=(2, 2),
    )


def davit():
    from timm.models.davit import DaVit

    return DaVit(num_classes=NUM_CLASSES, embed_dims=(8, 16), depths=(1, 1), num_heads=(1, 2), window_size=2)


def focalnet():
    from timm.models.focalnet import FocalNet

    return FocalNet(
        num_classes=NUM_CLASSES,
        embed_dim=8,
        depths=(1, 1),
        focal_levels=(2, 2),
        focal_windows=(3, 3),
        drop_path_rate=0.0,
    )


# ---------------------------------------------------------------------------------------------------------- torch
class MHANet(nn.Module):
    """Tokens → ``nn.MultiheadAttention`` (batch first) → mean → head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


class RNNNet(nn.Module):
    """Tokens → embedding → LSTM or GRU (batch first, two layers, bidirectional) → last state → head."""

    def __init__(self, kind: str = "lstm"):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn(8, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, NUM_CLASSES)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1])


class EmbeddingBagNet(nn.Module):
    """``nn.EmbeddingBag`` on 2-D token input (bags of fixed length) with per-sample weights from a second bag."""

    def __init__(self, mode: str = "sum"):
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 8, mode=mode)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.bag(x))


class Conv1dNet(nn.Module):
    """Conv1d: plain, grouped, depthwise, then a head (a (B, C, L) signal)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 8, 3, padding=1)
        self.b = nn.Conv1d(8, 8, 3, groups=2, padding="same")
        self.c = nn.Conv1d(8, 8, 5, groups=8, padding=2, padding_mode="reflect")
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.c(torch.relu(self.b(torch.relu(self.a(x))))).mean(-1))


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("vit", vit),
        ZooEntry("deit", deit),
        ZooEntry("beit", beit),
        ZooEntry("eva", eva),
        ZooEntry("cait", cait),
        ZooEntry("xcit", xcit, batchnorm=True),
        ZooEntry("coat", coat, img=32),
        ZooEntry("crossvit", crossvit),
        ZooEntry("convnext", convnext, img=32),
        ZooEntry("resmlp", resmlp),
        ZooEntry("mixer", mixer),
        ZooEntry("gmlp", gmlp),
        ZooEntry("swin", swin),
        ZooEntry("swinv2", swinv2),
        ZooEntry("mobilevit", mobilevit, batchnorm=True),
        ZooEntry("levit", levit, batchnorm=True),
        ZooEntry("efficientnet", efficientnet, batchnorm=True),
        ZooEntry("mobilenetv3", mobilenetv3, batchnorm=True),
        ZooEntry("resnet", resnet, batchnorm=True),
        ZooEntry("poolformer", poolformer, img=32),
        ZooEntry("caformer", caformer, img=32),
        ZooEntry("convmixer", convmixer, batchnorm=True),
        ZooEntry("pit", pit),
        ZooEntry("tnt", tnt),
        ZooEntry("twins", twins, img=32),
        ZooEntry("pvt_v2", pvt_v2, img=32),
        ZooEntry("nest", nest),
        ZooEntry("convit", convit),
        ZooEntry("edgenext", edgenext, img=32),
        ZooEntry("sequencer", sequencer),
        ZooEntry("davit", davit, img=32),
        ZooEntry("focalnet", focalnet, img=32),
        ZooEntry("torch_mha", MHANet, tokens=(12, 5), source="torch"),
        ZooEntry("torch_lstm", partial(RNNNet, "lstm"), tokens=(12, 5), source="torch"),
        ZooEntry("torch_gru", partial(RNNNet, "gru"), tokens=(12, 5), source="torch"),
        ZooEntry("torch_embeddingbag", EmbeddingBagNet, tokens=(12, 6), source="torch"),
        ZooEntry("torch_conv1d", Conv1dNet, features=(4, 10), source="torch"),
    ]
}

__all__ = ["NUM_CLASSES", "ZOO", "ZooEntry"]
