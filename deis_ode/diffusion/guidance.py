r"""Classifier-free guidance (Ho and Salimans 2022) as a model wrapper.

A conditional model ``model(x, t, cond)`` trained with the condition sometimes dropped (replaced by a null
condition) predicts both the conditional output ``out(x, t, c)`` and the unconditional one ``out(x, t, null)``.
Guidance with scale ``w`` extrapolates from the second towards the first:

    guided(x, t) = out(x, t, null) + w (out(x, t, c) - out(x, t, null)).

``w = 0`` is the unconditional model, ``w = 1`` the conditional one and ``w > 1`` strengthens the condition. The
combination is linear in the output, so it means the same for every prediction type (eps, x0, v, score, flow).
:class:`ClassifierFreeGuidance` turns the conditional model into a ``model(x, t)`` for a
:class:`~deis_ode.diffusion.DiffusionODE`, evaluating both branches in one batched call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["ClassifierFreeGuidance"]

ConditionalModel = Callable[[Tensor, Tensor, Tensor], Tensor]


class ClassifierFreeGuidance(nn.Module):
    r"""``model(x, t) = out(x, t, null) + scale (out(x, t, condition) - out(x, t, null))``.

    Args:
        model: the conditional model ``model(x, t, cond)``, returning a tensor with ``x``'s batch first. An
            ``nn.Module`` is registered as a submodule.
        scale: the guidance scale ``w`` (a number; the attribute may be changed between samplings).
        condition: the condition ``c``, a tensor whose first dimension is the batch: of ``x``'s batch size ``B``
            (one condition per sample) or 1 (one condition for all); a 0-dim tensor (e.g. one class label) is one
            condition for all.
        unconditional: the null condition (e.g. the label of the dropped class, or the embedding of the empty
            prompt), with the same rules; after broadcasting to the batch it must match ``condition``'s shape
            beyond the batch and its dtype.

    Each call makes exactly one call of ``model``, on the batch ``cat([x, x])`` with the condition
    ``cat([condition, unconditional])`` (both broadcast to ``B``), and splits the output in halves. A time ``t``
    with the batch as its first dimension is duplicated too; a 0-dim ``t`` (what a
    :class:`~deis_ode.diffusion.DiffusionODE` passes) is passed as it is. The conditions are buffers: ``.to()``
    moves them with the module.

    Example::

        guided = ClassifierFreeGuidance(net, 4.0, condition=torch.tensor(3), unconditional=torch.tensor(10))
        ode = VPODE(guided, VPSchedule.linear(), thresholding="dynamic")
    """

    def __init__(self, model: ConditionalModel, scale: float, *, condition: Tensor, unconditional: Tensor) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a callable (x, t, cond) -> output, got {type(model).__name__}")
        for name, value in (("condition", condition), ("unconditional", unconditional)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        if condition.dtype != unconditional.dtype:
            raise ValueError(
                f"condition and unconditional must have the same dtype, got {condition.dtype} and {unconditional.dtype}"
            )
        if _feature_shape(condition) != _feature_shape(unconditional):
            raise ValueError(
                "condition and unconditional must have the same shape beyond the batch dimension, got "
                f"{tuple(condition.shape)} and {tuple(unconditional.shape)}"
            )
        self.model = model  # registered as a submodule when it is an nn.Module
        self.scale = float(scale)
        self.register_buffer("condition", condition, persistent=False)
        self.register_buffer("unconditional", unconditional, persistent=False)

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}"

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The guided output at ``(x, t)``, from one call of the conditional model on the doubled batch."""
        if x.dim() < 1:
            raise ValueError("x must have a batch dimension first, got a 0-dim tensor")
        batch = x.shape[0]
        cond = torch.cat([_broadcast(self.condition, batch, "condition"), _broadcast(self.unconditional, batch)])
        t = torch.as_tensor(t)
        if t.dim() >= 1 and t.shape[0] == batch and t.numel() > 1:
            t = torch.cat([t, t])
        out = self.model(torch.cat([x, x]), t, cond)
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != 2 * batch:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"model(x, t, cond) returned {shape} for a batch of {2 * batch}; expected that batch first"
            )
        conditional, unconditional = out[:batch], out[batch:]
        return unconditional + self.scale * (conditional - unconditional)


def _feature_shape(condition: Tensor) -> tuple[int, ...]:
    return tuple(condition.shape[1:])


def _broadcast(condition: Tensor, batch: int, name: str = "unconditional") -> Tensor:
    """``condition`` with its first dimension ``batch``: a 0-dim tensor or a batch of 1 is expanded."""
    if condition.dim() == 0:
        return condition.expand(batch)
    if condition.shape[0] == batch:
        return condition
    if condition.shape[0] == 1:
        return condition.expand(batch, *condition.shape[1:])
    raise ValueError(f"{name} has batch size {condition.shape[0]}; expected 1 or the batch size of x, {batch}")
