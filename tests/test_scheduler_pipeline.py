"""End to end: a diffusers ``DDPMPipeline`` (a small randomly initialised ``UNet2DModel``, built offline) gives the
same images with deis_ode's scheduler as with diffusers' DEIS, for the same seed.

"Same" is to 5e-5 on images in [0, 1] (1/80 of an 8-bit level): the UNet's and both schedulers' float32 round-off.
Measured against the same sampling loop in float64, both are off by 1e-5 to 3e-5, diffusers the more."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from _subprocess import ROOT, run_python  # noqa: E402

from deis_ode import DEISMultistepScheduler  # noqa: E402


class _DiffusersDEIS(diffusers.DEISMultistepScheduler):
    """diffusers' DEIS, accepting the ``generator`` that ``DDPMPipeline`` passes to ``step`` (diffusers' own
    scheduler rejects it with a TypeError, so it cannot run in this pipeline unmodified)."""

    def step(self, model_output, timestep, sample, return_dict=True, generator=None):
        return super().step(model_output, timestep, sample, return_dict=return_dict)


def _pipeline() -> diffusers.DDPMPipeline:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    pipe = diffusers.DDPMPipeline(unet=unet.eval(), scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("order", "steps"), [(2, 10), (3, 20)])
def test_ddpm_pipeline_same_images(order, steps):
    pipe = _pipeline()
    images = {}
    for name, cls in [("deis_ode", DEISMultistepScheduler), ("diffusers", _DiffusersDEIS)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.scheduler = cls.from_config(pipe.scheduler.config, solver_order=order)
        with torch.no_grad():
            output = pipe(
                batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=steps, output_type="np"
            )
        images[name] = output.images
    assert images["deis_ode"].shape == (2, 16, 16, 3)
    assert np.isfinite(images["deis_ode"]).all()
    np.testing.assert_allclose(images["deis_ode"], images["diffusers"], rtol=0, atol=5e-5)
    assert isinstance(pipe.scheduler, _DiffusersDEIS)


def test_example_script_quick():
    """examples/diffusers_pipeline.py runs offline and shows the swap gives diffusers' images."""
    result = run_python(str(ROOT / "examples" / "diffusers_pipeline.py"), "--quick", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line[:36].strip(): line[36:].split() for line in result.stdout.splitlines() if line.startswith("deis_ode")}
    assert float(rows["deis_ode"][0]) < 5e-5
    assert float(rows["deis_ode order 3"][0]) > 0  # another sampler, other images


def test_saved_pipeline_reloads_this_scheduler(tmp_path):
    pipe = _pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.scheduler = DEISMultistepScheduler.from_config(pipe.scheduler.config, basis="rho", solver_order=3)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, DEISMultistepScheduler)
    assert loaded.scheduler.config.basis == "rho" and loaded.scheduler.config.solver_order == 3
