"""Learned tokens broadcast along the batch: timm ViT's ``cls_token``, ``reg_token``, ``pos_embed`` and
``dist_token``, and the ``latent`` of timm's ``AttentionPoolLatent``.

Each is a raw ``nn.Parameter`` of shape ``(1, ...)`` that every example uses in its own row; its per-sample gradient
comes from a per-sample copy substituted during the forward pass (:mod:`lightning_dp.engine.layers`), for both
engines.
"""

from __future__ import annotations

from lightning_dp.engine.layer_rules.broadcast_registry import register_broadcast_parameters

try:
    import timm.layers as _timm_layers
    import timm.models.vision_transformer as _vision_transformer
except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine importable without it
    _timm_layers = _vision_transformer = None

if _vision_transformer is not None:
    register_broadcast_parameters(
        _vision_transformer.VisionTransformer, "cls_token", "reg_token", "pos_embed", "dist_token"
    )
    _pool = getattr(_timm_layers, "AttentionPoolLatent", None)
    if _pool is not None:
        register_broadcast_parameters(_pool, "latent")

__all__: list[str] = []
