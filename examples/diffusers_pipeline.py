"""Swap deis_ode's DEIS scheduler into a diffusers pipeline.

    python examples/diffusers_pipeline.py                      # a small random UNet, built offline
    python examples/diffusers_pipeline.py --model google/ddpm-cifar10-32 --steps 20 --out samples.png

The swap is one line:

    pipe.scheduler = deis_ode.DEISMultistepScheduler.from_config(pipe.scheduler.config)

With the default configuration the images equal those of diffusers' own ``DEISMultistepScheduler`` (to float32
round-off); the opt-in options change the sampler. The script samples the same seed with diffusers' DEIS and with
ours in a few configurations and prints how far each image is from diffusers' (max over pixels in [0, 1]) and the
time per sample. diffusers' DEIS cannot run in ``DDPMPipeline`` as it is (its ``step`` rejects the ``generator`` the
pipeline passes), so it is wrapped here.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def build_pipeline(model: str | None, size: int):
    import diffusers

    if model is not None:
        return diffusers.DDPMPipeline.from_pretrained(model)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    return diffusers.DDPMPipeline(unet=unet.eval(), scheduler=diffusers.DDPMScheduler())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a DDPMPipeline on the Hub (default: a random UNet, offline)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=16, help="image size of the random UNet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save the images of the default configuration here (PNG)")
    parser.add_argument("--quick", action="store_true", help="a fast run (for the tests)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import diffusers

    from deis_ode import DEISMultistepScheduler

    class DiffusersDEIS(diffusers.DEISMultistepScheduler):
        def step(self, model_output, timestep, sample, return_dict=True, generator=None):
            return super().step(model_output, timestep, sample, return_dict=return_dict)

    pipe = build_pipeline(args.model, args.size)
    pipe.set_progress_bar_config(disable=True)
    original = pipe.scheduler.config
    configurations = [
        ("diffusers DEIS", DiffusersDEIS, {}),
        ("deis_ode", DEISMultistepScheduler, {}),
        ("deis_ode order 3", DEISMultistepScheduler, {"solver_order": 3}),
        ("deis_ode to sigma = 0", DEISMultistepScheduler, {"final_sigmas_type": "zero"}),
        (
            "deis_ode karras, no 0-length step",
            DEISMultistepScheduler,
            {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
        ),
    ]
    if args.quick:
        configurations = configurations[:3]
    reference = None
    print(f"{args.steps} steps, batch {args.batch}, {args.model or 'random UNet2DModel'}")
    print(f"{'scheduler':<36} {'max |image - diffusers|':>24} {'s / sample':>11}")
    print("-" * 73)
    for name, cls, options in configurations:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # from_config names the DDPM options DEIS does not use
            pipe.scheduler = cls.from_config(original, **options)
        start = time.perf_counter()
        with torch.no_grad():
            images = pipe(
                batch_size=args.batch,
                generator=torch.Generator().manual_seed(args.seed),
                num_inference_steps=args.steps,
                output_type="np",
            ).images
        seconds = (time.perf_counter() - start) / args.batch
        if reference is None:
            reference = images
        difference = float(np.abs(images - reference).max())
        print(f"{name:<36} {difference:>24.2e} {seconds:>11.3f}")
        if args.out is not None and name == "deis_ode":
            from PIL import Image

            row = np.concatenate(list(images), axis=1)
            Image.fromarray((row * 255).round().astype(np.uint8)).save(args.out)
            print(f"saved {args.out}")


if __name__ == "__main__":
    main()
