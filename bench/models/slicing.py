"""One neuron group of a width-grouped layer group as a module of its own (GN-DGL with each
neuron group on a rank: ``--placement neuron``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .cnn import BasicBlock, WideBasicBlock
from .paper import PreActBottleneck


class ChannelSlice(nn.Module):
    """Channel slice ``index`` of ``count`` equal slices (dim 1)."""

    def __init__(self, index: int, count: int):
        super().__init__()
        self.index, self.count = index, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(self.count, dim=1)[self.index]


def neuron_slice(module: nn.Module, index: int, groups: int) -> nn.Module:
    """Neuron group ``index`` of a width-grouped module (see the module docstring), as a
    module of its own with copies of that group's weights: grouped convs keep their
    ``index``-th group, mixing convs (``groups=1``, whose input is the full width) the
    ``index``-th slice of their output channels, BatchNorms that slice of their channels,
    and the identity shortcut of a mixing block picks that slice of its input. Then
    ``cat([neuron_slice(m, g, G)(x) for g in range(G)], 1) == m(x)``. A linear classifier
    mixes every channel and cannot be sliced."""
    module = copy.deepcopy(module)
    _slice_children(module, index, groups)
    return module


def _slice_children(parent: nn.Module, index: int, groups: int) -> None:
    if isinstance(parent, (PreActBottleneck, WideBasicBlock)):
        raise ValueError(
            "a pre-activation block normalises its whole input: it cannot be cut "
            "into neuron groups on ranks of their own"
        )
    if (
        isinstance(parent, BasicBlock)
        and parent.body[0].groups == 1
        and isinstance(parent.shortcut, nn.Identity)
    ):
        parent.shortcut = ChannelSlice(index, groups)
    for name, child in parent.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(parent, name, _slice_conv(child, index, groups))
        elif isinstance(child, nn.BatchNorm2d):
            setattr(parent, name, _slice_norm(child, index, groups))
        elif isinstance(child, nn.Linear):
            raise ValueError(
                "a linear layer mixes every channel: it cannot be cut into neuron groups"
            )
        elif list(child.parameters(recurse=False)):
            raise ValueError(
                f"{type(child).__name__} layers cannot be cut into neuron groups "
                f"on ranks of their own"
            )
        else:
            _slice_children(child, index, groups)


def _rows(t: torch.Tensor | None, index: int, groups: int) -> torch.Tensor | None:
    return None if t is None else t.detach().chunk(groups)[index].clone()


def _slice_conv(conv: nn.Conv2d, index: int, groups: int) -> nn.Conv2d:
    if conv.groups not in (1, groups):
        raise ValueError(f"a conv with {conv.groups} groups is not cut into {groups} neuron groups")
    cin = conv.in_channels // conv.groups  # a grouped conv sees its own slice; a mixing one all
    out = nn.Conv2d(
        cin,
        conv.out_channels // groups,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        out.weight.copy_(_rows(conv.weight, index, groups))
        if conv.bias is not None:
            out.bias.copy_(_rows(conv.bias, index, groups))
    return out.to(conv.weight.device)


def _slice_norm(norm: nn.BatchNorm2d, index: int, groups: int) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(
        norm.num_features // groups, norm.eps, norm.momentum, norm.affine, norm.track_running_stats
    ).to(norm.weight.device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(norm, name) is not None:
                getattr(out, name).copy_(_rows(getattr(norm, name), index, groups))
        if norm.num_batches_tracked is not None:
            out.num_batches_tracked.copy_(norm.num_batches_tracked)
    out.train(norm.training)
    return out
