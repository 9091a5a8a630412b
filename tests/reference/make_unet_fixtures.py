#!/usr/bin/env python3
"""Reference outputs of diffusers' UNet2DConditionModel for tests/core/test-unet.c.

Each case is a tiny random-weight UNet2DConditionModel written as a diffusers
component folder tests/fixtures/unet/<case>/{config.json,
diffusion_pytorch_model.safetensors} plus io.safetensors holding the inputs and
what diffusers computes from them (forward in float32):

  sample                  [B, C, H, W]
  timestep                [B] or [1] (one value: broadcast over the batch)
  encoder_hidden_states   [B, L, D]
  timestep_cond           [B, time_cond_proj_dim]          (case "lcm" only)
  output                  [B, C_out, H, W]
  down_res_<i>, mid_res   ControlNet-style additional residuals (case "sd15")
  output_residuals        the output with those residuals added
  n_params                [1] diffusers' parameter count

To keep the fixtures small (< 1.5 MB in all) the weights are stored in three
dtypes: "sd15" in float16, "sd2" and "mid2d" in bfloat16, "lcm" in float32.  The
model that makes the reference runs in float32 with exactly the stored values (the
parameters are rounded to the storage dtype first), so the C side loads the
file with dtype F32 and must reproduce the output to float32 accuracy.

The cases between them differ in every option the C model reads:
  sd15: CrossAttnDownBlock2D/DownBlock2D, attention_head_dim int (4 heads),
        conv proj_in/proj_out, layers_per_block 2, norm groups 8,
        flip_sin_to_cos true / freq_shift 0, batch 2 with two timesteps,
        mid_block_only_cross_attention true (no effect on this mid block)
  sd2:  3 levels, attention_head_dim list, use_linear_projection, upcast_attention,
        norm groups 16, transformer_layers_per_block 2, cross_attention_dim list,
        resnet_time_scale_shift scale_shift, flip_sin_to_cos false / freq_shift 1,
        time_embedding_dim, time_embedding_act_fn, mid_block_scale_factor 1.5,
        resnet_skip_time_act / resnet_out_scale_factor (not used by these block
        types in diffusers), 10x14 latents (forward_upsample_size), batch 2 with
        a single broadcast timestep
  lcm:  time_cond_proj_dim (timestep_cond), timestep_post_act, only_cross_attention
        list, transformer_layers_per_block list, mid_block_type null, act_fn gelu,
        norm_eps 1e-6, conv_in_kernel 1, conv_out_kernel 5, downsample_padding 0,
        center_input_sample, 9x11 latents, batch 1, CrossAttnUpBlock2D at the top
  mid2d: mid_block_type UNetMidBlock2D (resnet only) with mid_block_scale_factor 0.5,
        layers_per_block list, transformer_layers_per_block per-layer lists with
        reverse_transformer_layers_per_block, DownBlock2D first / UpBlock2D last,
        act_fn "swish", batch 3 with three timesteps

Run: python3 tests/reference/make_unet_fixtures.py [outdir]
"""
import json
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "fixtures", "unet")


def randomize(model, seed, dtype):
    """Weights large enough that every op visibly matters (norm gammas around 1,
    biases non-zero), rounded to the storage dtype."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):      # GroupNorm / LayerNorm gamma
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif p.ndim == 1:                                  # biases, norm betas
                v = 0.1 * torch.randn(p.shape, generator=g)
            else:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=g) / (fan_in ** 0.5)
            p.copy_(v.to(dtype).to(torch.float32))


CASES = [
    dict(name="sd15", seed=1, dtype=torch.float16,
         config=dict(sample_size=8, in_channels=4, out_channels=4,
                     block_out_channels=[16, 24],
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                     layers_per_block=2, attention_head_dim=4, cross_attention_dim=20,
                     norm_num_groups=8, mid_block_only_cross_attention=True),
         batch=2, hw=(8, 8), seq=7, timestep=[999.0, 17.5], residuals=True),
    dict(name="sd2", seed=2, dtype=torch.bfloat16,
         config=dict(sample_size=8, in_channels=4, out_channels=3,
                     block_out_channels=[16, 16, 16],
                     down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                     layers_per_block=1, attention_head_dim=[2, 4, 4], cross_attention_dim=[12, 12, 12],
                     norm_num_groups=16, use_linear_projection=True, upcast_attention=True,
                     transformer_layers_per_block=2, resnet_time_scale_shift="scale_shift",
                     flip_sin_to_cos=False, freq_shift=1, time_embedding_dim=40,
                     time_embedding_act_fn="silu", mid_block_scale_factor=1.5,
                     resnet_skip_time_act=True, resnet_out_scale_factor=2.0),
         batch=2, hw=(10, 14), seq=5, timestep=[500.0]),
    dict(name="lcm", seed=3, dtype=torch.float32,
         config=dict(sample_size=8, in_channels=4, out_channels=4,
                     block_out_channels=[8, 16],
                     down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                     layers_per_block=1, attention_head_dim=2, cross_attention_dim=16,
                     norm_num_groups=4, norm_eps=1e-6, time_cond_proj_dim=8,
                     only_cross_attention=[True, False], mid_block_type=None,
                     time_embedding_dim=24, timestep_post_act="silu",
                     transformer_layers_per_block=[1, 2], act_fn="gelu",
                     conv_in_kernel=1, conv_out_kernel=5, downsample_padding=0,
                     center_input_sample=True),
         batch=1, hw=(9, 11), seq=6, timestep=[261.0], cond=True),
    dict(name="mid2d", seed=4, dtype=torch.bfloat16,
         config=dict(sample_size=8, in_channels=4, out_channels=4,
                     block_out_channels=[8, 16],
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                     layers_per_block=[1, 2], attention_head_dim=[2, 4], cross_attention_dim=8,
                     norm_num_groups=4, transformer_layers_per_block=[[1], [1, 2]],
                     reverse_transformer_layers_per_block=[[2, 1, 1], [1, 1]],
                     mid_block_type="UNetMidBlock2D", mid_block_scale_factor=0.5, act_fn="swish"),
         batch=3, hw=(6, 6), seq=4, timestep=[10.0, 400.0, 900.0]),
]


def main():
    torch.manual_seed(0)
    for case in CASES:
        d = os.path.join(OUT, case["name"])
        os.makedirs(d, exist_ok=True)
        model = UNet2DConditionModel(**case["config"]).eval()
        randomize(model, case["seed"], case["dtype"])
        model.save_config(d)
        sd = {k: v.detach().to(case["dtype"]).contiguous() for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(d, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

        g = torch.Generator().manual_seed(100 + case["seed"])
        cfg = model.config
        b = case["batch"]
        h, w = case["hw"]
        io = {}
        io["sample"] = torch.randn(b, cfg.in_channels, h, w, generator=g)
        io["timestep"] = torch.tensor(case["timestep"], dtype=torch.float32)
        cad = cfg.cross_attention_dim
        cad = cad[0] if isinstance(cad, (list, tuple)) else cad
        io["encoder_hidden_states"] = torch.randn(b, case["seq"], cad, generator=g)
        kw = {}
        if case.get("cond"):
            io["timestep_cond"] = torch.randn(b, cfg.time_cond_proj_dim, generator=g)
            kw["timestep_cond"] = io["timestep_cond"]
        t = io["timestep"] if len(case["timestep"]) > 1 else io["timestep"][0]
        with torch.no_grad():
            io["output"] = model(io["sample"], t, io["encoder_hidden_states"], **kw).sample
            if case.get("residuals"):
                # shapes of down_block_res_samples: run the down path once
                shapes = []
                x = model.conv_in(io["sample"])
                shapes.append(x.shape)
                emb = model.time_embedding(model.get_time_embed(io["sample"], t))
                for blk in model.down_blocks:
                    if getattr(blk, "has_cross_attention", False):
                        x, res = blk(x, emb, encoder_hidden_states=io["encoder_hidden_states"])
                    else:
                        x, res = blk(x, emb)
                    shapes += [r.shape for r in res]
                downs = [0.5 * torch.randn(s, generator=g) for s in shapes]
                mid = 0.5 * torch.randn(x.shape, generator=g)
                for i, r in enumerate(downs):
                    io["down_res_%d" % i] = r
                io["mid_res"] = mid
                io["output_residuals"] = model(io["sample"], t, io["encoder_hidden_states"],
                                               down_block_additional_residuals=tuple(downs),
                                               mid_block_additional_residual=mid).sample
        n = sum(p.numel() for p in model.parameters())
        io["n_params"] = torch.tensor([float(n)])
        save_file({k: v.contiguous().float() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
        print("%s: %d parameters, output max|.| %.4f" % (case["name"], n, io["output"].abs().max().item()))


if __name__ == "__main__":
    main()
