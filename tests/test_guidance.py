"""Classifier-free guidance: the combination, the batching and one model call per evaluation."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from torch import nn

import deis_ode
from deis_ode.diffusion import VPODE, ClassifierFreeGuidance, VPSchedule

torch.set_num_threads(1)

NULL = 10  # the label of the dropped class


class LabelModel(nn.Module):
    """A conditional model ``out(x, t, label)``, nonlinear in ``x``, with a call counter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 3, dtype=torch.float64)
        self.calls = 0
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.batches.append(x.shape[0])
        return torch.tanh(x) * (1 + t) + self.embed(label)


def separately(model: LabelModel, x: torch.Tensor, t: torch.Tensor, label: int) -> torch.Tensor:
    return model(x, t, torch.full((x.shape[0],), label, dtype=torch.long))


@pytest.fixture
def model() -> LabelModel:
    torch.manual_seed(0)
    return LabelModel()


def test_scale_zero_is_unconditional_and_one_is_conditional(model):
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    with torch.no_grad():
        cond, uncond = separately(model, x, t, 4), separately(model, x, t, NULL)
        for scale, expected in ((0.0, uncond), (1.0, cond)):
            guided = ClassifierFreeGuidance(model, scale, condition=torch.tensor(4), unconditional=torch.tensor(NULL))
            torch.testing.assert_close(guided(x, t), expected, rtol=1e-15, atol=1e-15)


def test_linear_in_the_scale(model):
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    guided = ClassifierFreeGuidance(model, 0.0, condition=torch.tensor([2]), unconditional=torch.tensor([NULL]))
    outputs = {}
    with torch.no_grad():
        for scale in (-1.0, 0.0, 1.0, 2.5, 5.0):
            guided.scale = scale
            outputs[scale] = guided(x, t)
        cond, uncond = separately(model, x, t, 2), separately(model, x, t, NULL)
    for scale, out in outputs.items():
        torch.testing.assert_close(out, uncond + scale * (cond - uncond), rtol=1e-13, atol=1e-13)
    # affine in the scale: the midpoint of two scales is the output at the mean scale
    torch.testing.assert_close(outputs[2.5], 0.5 * (outputs[0.0] + outputs[5.0]), rtol=1e-13, atol=1e-13)


def test_one_batched_call_per_evaluation(model):
    guided = ClassifierFreeGuidance(model, 3.0, condition=torch.tensor(1), unconditional=torch.tensor(NULL))
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        guided(x, torch.tensor(0.5, dtype=torch.float64))
    assert model.calls == 1 and model.batches == [12]
    # inside a sampler: as many model calls as deis3 evaluations, each on the doubled batch
    model.calls, model.batches = 0, []
    ode = VPODE(guided, VPSchedule.linear())
    grid = torch.linspace(1.0, 1e-3, 9, dtype=torch.float64)
    with torch.no_grad(), deis_ode.verify.count_evaluations(ode) as evaluations:
        torchdiffeq.odeint(ode, x, grid, method="deis3")
    assert evaluations.count == 8 and model.calls == 8 and set(model.batches) == {12}


def test_per_sample_conditions_and_batched_time(model):
    x = torch.randn(3, 3, dtype=torch.float64)
    labels = torch.tensor([0, 5, 9])
    t = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    guided = ClassifierFreeGuidance(model, 2.0, condition=labels, unconditional=torch.tensor(NULL))
    with torch.no_grad():
        out = guided(x, t[:, None])
        cond = model(x, t[:, None], labels)
        uncond = model(x, t[:, None], torch.full((3,), NULL))
    torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond), rtol=1e-13, atol=1e-13)


def test_embedding_conditions_and_device_moves():
    calls = []

    def net(x, t, emb):  # emb: (batch, tokens, features)
        calls.append(emb.shape)
        return x * emb.mean(dim=(1, 2))[:, None]

    cond, null = torch.ones(1, 4, 2), torch.zeros(1, 4, 2)
    guided = ClassifierFreeGuidance(net, 5.0, condition=cond, unconditional=null)
    assert dict(guided.named_buffers()).keys() == {"condition", "unconditional"}
    assert guided.state_dict() == {}  # conditions are not saved with a checkpoint
    x = torch.randn(2, 3)
    torch.testing.assert_close(guided(x, torch.tensor(0.5)), 5.0 * x)
    assert calls == [(4, 4, 2)]
    guided.to(torch.float64)
    assert guided.condition.dtype == torch.float64


def test_exported_from_the_package():
    assert deis_ode.ClassifierFreeGuidance is ClassifierFreeGuidance
    assert "ClassifierFreeGuidance" in deis_ode.__all__ and "ClassifierFreeGuidance" in deis_ode.diffusion.__all__


def test_errors(model):
    with pytest.raises(TypeError, match="callable"):
        ClassifierFreeGuidance(3, 1.0, condition=torch.tensor(1), unconditional=torch.tensor(0))
    with pytest.raises(TypeError, match="unconditional must be a tensor"):
        ClassifierFreeGuidance(model, 1.0, condition=torch.tensor(1), unconditional=None)
    with pytest.raises(ValueError, match="same shape"):
        ClassifierFreeGuidance(model, 1.0, condition=torch.ones(1, 4), unconditional=torch.ones(1, 5))
    with pytest.raises(ValueError, match="same dtype"):
        ClassifierFreeGuidance(model, 1.0, condition=torch.tensor(1), unconditional=torch.tensor(0.0))
    guided = ClassifierFreeGuidance(model, 1.0, condition=torch.tensor([1, 2]), unconditional=torch.tensor(NULL))
    with pytest.raises(ValueError, match="condition has batch size 2"):
        guided(torch.randn(3, 3, dtype=torch.float64), torch.tensor(0.5))
    bad = ClassifierFreeGuidance(lambda x, t, c: x[:1], 1.0, condition=torch.tensor(1), unconditional=torch.tensor(0))
    with pytest.raises(ValueError, match="expected that batch first"):
        bad(torch.randn(3, 3), torch.tensor(0.5))
