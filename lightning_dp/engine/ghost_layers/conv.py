"""Convolutions in the ghost engine: after unfolding, a convolution is a linear map on the sequence of patches.

``F.unfold`` turns the input into ``(B, C·k…, L)`` columns in the weight's flattening order; the output gradient
``(B, out, L…)`` is the matching ``(B, L, out)`` sequence. Handled natively: ``groups=1`` and zero padding given as
numbers (``padding="same"`` / ``"valid"``, grouped or depthwise convolutions and other padding modes fall back to
per-sample instantiation with Opacus's grad samplers).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.engine.ghost_layers.base import GhostRecord, register_ghost_layer
from lightning_dp.engine.ghost_layers.matmul import MatmulCaptured, MatmulGhostLayer, cat


def _plain(module: nn.Module) -> bool:
    return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _patches(x: Tensor, kernel: tuple, dilation: tuple, padding: tuple, stride: tuple) -> Tensor:
    """``(B, C, H, W)`` → ``(B, L, C·kh·kw)`` patches (``F.unfold`` transposed)."""
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)


def _grad_sequence(grad: Tensor) -> Tensor:
    """``(B, out, L…)`` → ``(B, L, out)``."""
    return grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2)


@register_ghost_layer(nn.Conv2d)
class Conv2dGhostLayer(MatmulGhostLayer):
    """``nn.Conv2d`` with ``groups=1`` and numeric zero padding (e.g. a ViT patch embedding)."""

    autocast_input: ClassVar[bool] = True

    @classmethod
    @override
    def supports(cls, module: nn.Module) -> bool:
        return _plain(module)

    @override
    def collect(self, records: list[GhostRecord]) -> MatmulCaptured:
        m = self.module
        a = cat([_patches(r.inputs[0], m.kernel_size, m.dilation, m.padding, m.stride) for r in records], 1)
        g = cat([_grad_sequence(r.grad) for r in records if r.grad is not None], 1)
        return self.pair(a, g)


@register_ghost_layer(nn.Conv1d)
class Conv1dGhostLayer(MatmulGhostLayer):
    """``nn.Conv1d`` with ``groups=1`` and numeric zero padding: a ``1 × k`` convolution of a height-1 image."""

    autocast_input: ClassVar[bool] = True

    @classmethod
    @override
    def supports(cls, module: nn.Module) -> bool:
        return _plain(module)

    @override
    def collect(self, records: list[GhostRecord]) -> MatmulCaptured:
        m = self.module
        kernel, dilation = (1, m.kernel_size[0]), (1, m.dilation[0])
        padding, stride = (0, m.padding[0]), (1, m.stride[0])
        a = cat([_patches(r.inputs[0].unsqueeze(2), kernel, dilation, padding, stride) for r in records], 1)
        g = cat([_grad_sequence(r.grad) for r in records if r.grad is not None], 1)
        return self.pair(a, g)


__all__ = ["Conv1dGhostLayer", "Conv2dGhostLayer"]
