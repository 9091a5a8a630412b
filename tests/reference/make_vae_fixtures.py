#!/usr/bin/env python3
"""Reference outputs of diffusers' AutoencoderKL for tests/core/test-vae.c.

Each case is a tiny random-weight AutoencoderKL saved with save_pretrained
(config.json + diffusion_pytorch_model.safetensors, f32) under
tests/fixtures/vae/<case>/, plus io.safetensors with inputs and outputs:

  image            [B, 3, H, W]     encoder input
  mean, logvar     [B, C, h, w]     DiagonalGaussianDistribution of encode(image)
                                    (logvar clamped to [-30, 20] as diffusers does)
  noise            [B, C, h, w]     the standard-normal draw `sample` uses
  sample           [B, C, h, w]     mean + exp(0.5 * logvar) * noise
  latents          [B, C, h', w']   decoder input
  decoded          [B, 3, 8h', 8w'] decode(latents) (no tiling)
  tiled_decoded                     decode(latents) with enable_tiling() (case "tiled")
  tiled_image, tiled_mean, tiled_logvar
                                    encode() with enable_tiling() on a bigger image

Cases differ in every config option the C model reads:
  base    : 2 blocks, 1 layer/block, 4 groups, latent 4, silu, mid attention,
            quant convs, current attention key names (to_q/to_k/to_v/to_out.0)
  old3    : 3 blocks, 2 layers/block, 2 groups, latent 8, gelu resnets,
            use_quant_conv/use_post_quant_conv false, scaling/shift factors,
            force_upcast false, OLD attention key names (query/key/value/proj_attn)
            stored 1x1-conv shaped [C, C, 1, 1] as very old checkpoints have them
  noattn  : 1 block (no resampling), 2 layers/block, 8 groups, latent 4,
            mid_block_add_attention false, old key names irrelevant, non-square input
  tiled   : 2 blocks, sample_size 16 (tile_latent_min_size 8): tiled decode of a
            20x14 latent (4x3 tiles, the last ones cut short) and tiled encode of a
            40x28 image; old attention key names in their linear [C, C] shape

Run: python3 tests/reference/make_vae_fixtures.py [outdir]
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from diffusers import AutoencoderKL

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "fixtures", "vae")


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / (fan_in ** 0.5))


CASES = [
    dict(name="base", seed=11,
         config=dict(in_channels=3, out_channels=3,
                     down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                     block_out_channels=[8, 16], layers_per_block=1, act_fn="silu", latent_channels=4,
                     norm_num_groups=4, sample_size=32),
         image=(2, 3, 16, 16), latents=(2, 4, 6, 5)),
    dict(name="old3", seed=12,
         config=dict(in_channels=3, out_channels=3,
                     down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                     block_out_channels=[4, 8, 8], layers_per_block=2, act_fn="gelu", latent_channels=8,
                     norm_num_groups=2, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
                     force_upcast=False, use_quant_conv=False, use_post_quant_conv=False),
         image=(1, 3, 24, 16), latents=(1, 8, 3, 4), old_names="conv"),
    dict(name="noattn", seed=13,
         config=dict(in_channels=3, out_channels=3,
                     down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
                     block_out_channels=[16], layers_per_block=2, act_fn="silu", latent_channels=4,
                     norm_num_groups=8, sample_size=32, mid_block_add_attention=False),
         image=(1, 3, 10, 12), latents=(2, 4, 7, 5)),
    dict(name="tiled", seed=14,
         config=dict(in_channels=3, out_channels=3,
                     down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                     block_out_channels=[8, 8], layers_per_block=1, act_fn="silu", latent_channels=4,
                     norm_num_groups=4, sample_size=16),
         image=(1, 3, 16, 16), latents=(1, 4, 20, 14), old_names="linear",
         tiled_latents=True, tiled_image=(1, 3, 40, 28)),
]

OLD = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def rename_old(sd, shape):
    out = {}
    for k, v in sd.items():
        nk = k
        for new, old in OLD.items():
            tag = ".attentions.0." + new + "."
            if tag in k:
                nk = k.replace(tag, ".attentions.0." + old + ".")
                if shape == "conv" and k.endswith(".weight"):
                    v = v.reshape(v.shape[0], v.shape[1], 1, 1)
        out[nk] = v.contiguous()
    return out


def main():
    for case in CASES:
        d = os.path.join(OUT, case["name"])
        os.makedirs(d, exist_ok=True)
        model = AutoencoderKL(**case["config"]).eval()
        randomize(model, case["seed"])
        model.save_pretrained(d, safe_serialization=True)
        st_path = os.path.join(d, "diffusion_pytorch_model.safetensors")
        if case.get("old_names"):
            sd = load_file(st_path)
            save_file(rename_old(sd, case["old_names"]), st_path, metadata={"format": "pt"})
            if case["old_names"] == "linear":
                # diffusers itself must accept the renamed file and give the same model
                again = AutoencoderKL.from_pretrained(d).eval()
                for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
                    assert n1 == n2 and torch.equal(p1, p2), n1
        os.chmod(st_path, 0o644)

        g = torch.Generator().manual_seed(case["seed"] + 100)
        image = torch.rand(case["image"], generator=g) * 2 - 1
        latents = torch.randn(case["latents"], generator=g)
        io = {"image": image, "latents": latents}
        with torch.no_grad():
            post = model.encode(image).latent_dist
            io["mean"] = post.mean
            io["logvar"] = post.logvar
            noise = torch.randn(post.mean.shape, generator=g)
            io["noise"] = noise
            # DiagonalGaussianDistribution.sample with the noise randn_tensor would draw
            io["sample"] = post.mean + post.std * noise
            io["decoded"] = model.decode(latents).sample
            if case.get("tiled_latents"):
                model.enable_tiling()
                assert latents.shape[-1] > model.tile_latent_min_size
                io["tiled_decoded"] = model.decode(latents).sample
                timg = torch.rand(case["tiled_image"], generator=g) * 2 - 1
                io["tiled_image"] = timg
                tpost = model.encode(timg).latent_dist
                io["tiled_mean"] = tpost.mean
                io["tiled_logvar"] = tpost.logvar
                model.disable_tiling()
                # tiling really changes the result (the test would catch a non-tiled decode)
                plain = model.decode(latents).sample
                assert (plain - io["tiled_decoded"]).abs().max() > 1e-3
        io = {k: v.contiguous().float() for k, v in io.items()}
        io_path = os.path.join(d, "io.safetensors")
        save_file(io, io_path, metadata={"format": "pt"})
        os.chmod(io_path, 0o644)
        print(case["name"], {k: tuple(v.shape) for k, v in io.items()})


if __name__ == "__main__":
    main()
