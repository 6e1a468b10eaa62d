"""Sibling projections that read the same input, computed as one matrix product.

A decoder layer projects its normed input three times for attention (q_proj, k_proj, v_proj)
and twice for the MLP (gate_proj, up_proj). At one token per row each product is a
matrix-vector product that reads its weights once, and small ones run far below the GPU's
bandwidth: on an H200 (`bench/gemm_probe.py`, Qwen3-4B shapes, batch size 1) k_proj and v_proj
took 15.1 µs each for 5 MB of weights, q_proj 8.1 µs, the three fused 11.4 µs.

`fuse_projections(model)` concatenates each group's weights into one `ProjectionGroup` (the
originals are freed, so memory does not grow) and puts a `GroupMember` in each sibling's place.
The modeling code is left as it is: it still calls q_proj(x), k_proj(x), v_proj(x) in turn. A
member computes every member's output in one product and keeps them; the next sibling in order,
called on the same tensor right after, hands out its own, and the last one clears the group. Any
other call (another order, another tensor, a call skipped) computes the whole product again, so
results never depend on the order of calls. Code that needs one projection alone uses
`F.linear(x, member.weight)`, which keeps nothing. `member.weight` is a view of the group's weight:
reading or changing it in place reads or changes what the member computes. The state dict names
the groups (`qkv_proj.weight`), not the members.

The products go through `kernels.skinny_linear`: in a compiled batch-1 step on CUDA, o_proj and
down_proj as split-K partials that the next fused kernel sums (`kernels.split_k`); otherwise `F.linear`
unless LATENTMAS_SKINNY_LINEAR=1 asks for its few-row kernels on CUDA (off by default, see that
module). So that the switch covers every projection of a layer, the ones without siblings (`SINGLES`:
o_proj, down_proj) become `SkinnyLinear`s; their parameters and state dict stay those of an `nn.Linear`.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels.skinny_linear import skinny_linear

# group name: the siblings, in the order the modeling code calls them
GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SINGLES = ("o_proj", "down_proj")  # a layer's projections without siblings


class SkinnyLinear(nn.Linear):
    """An `nn.Linear` whose product goes through `skinny_linear` (same parameters, same result to
    the rounding of a different summation order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)


class ProjectionGroup(nn.Module):
    """The concatenated weight `[sum of out_features, in_features]` (and bias) of sibling linears."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        self.weight = nn.Parameter(torch.cat([linear.weight.detach() for linear in linears]), requires_grad=False)
        biased = linears[0].bias is not None
        self.bias = (nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False)
                     if biased else None)
        self.clear()

    def clear(self) -> None:
        """Forget the kept input and outputs (after a forward pass that stopped between siblings)."""
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._next = 0  # the member whose output may be handed out without a product

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s projection of `x` `[..., in_features]` -> `[..., sizes[index]]`."""
        if index != self._next or self._input is not x:
            self._input = x
            self._outputs = skinny_linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        output = self._outputs[index]
        self._next = index + 1
        if self._next == len(self.sizes):
            self.clear()
        return output

    def rows(self, index: int) -> slice:
        start = sum(self.sizes[:index])
        return slice(start, start + self.sizes[index])


class GroupMember(nn.Module):
    """Stands in for one of a group's linears: same call, same output, computed with its siblings."""

    def __init__(self, group: ProjectionGroup, index: int):
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule: its owner registers it once
        self.index = index
        self.in_features = group.weight.shape[1]
        self.out_features = group.sizes[index]

    @property
    def weight(self) -> torch.Tensor:
        return self.group.weight[self.group.rows(self.index)]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.group.bias is None else self.group.bias[self.group.rows(self.index)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused with its siblings"


def forget_kept_outputs(model: nn.Module) -> None:
    """Clear every group of `model` (e.g. after an error in the middle of a forward pass)."""
    for module in model.modules():
        if isinstance(module, ProjectionGroup):
            module.clear()


def _fusable(linears: list) -> bool:
    """Plain linears of one input size, dtype and device, all with or all without bias."""
    if not all(type(linear) is nn.Linear for linear in linears):
        return False
    first = linears[0]
    return all(linear.in_features == first.in_features and linear.weight.dtype == first.weight.dtype
               and linear.weight.device == first.weight.device
               and (linear.bias is None) == (first.bias is None) for linear in linears)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every module's sibling projections (`GROUPS`) in place and make its `SINGLES`
    `SkinnyLinear`s; returns how many groups were fused.

    The group is registered on the owner under its `GROUPS` name (`qkv_proj`, `gate_up_proj`).
    Modules that are already fused, or whose siblings differ in shape rules, are left alone.
    """
    fused = 0
    for owner in list(model.modules()):
        for name in SINGLES:
            if type(getattr(owner, name, None)) is nn.Linear:
                getattr(owner, name).__class__ = SkinnyLinear
        for group_name, names in GROUPS.items():
            linears = [getattr(owner, name, None) for name in names]
            if not _fusable(linears):
                continue
            group = ProjectionGroup(linears)
            owner.add_module(group_name, group)
            for index, name in enumerate(names):
                setattr(owner, name, GroupMember(group, index))
            fused += 1
    return fused
