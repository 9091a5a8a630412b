#!/usr/bin/env python3
"""Expected values for diffuse-core's schedulers (scheduler.h), from diffusers.

Writes tests/fixtures/schedulers/cases.json (the index: per case the config,
the class, steps, timesteps, sigmas, init_noise_sigma, ...) and
tests/fixtures/schedulers/samples.safetensors (per case the initial sample,
the model inputs after scale_model_input and the sample after each step).

Each case runs a denoising loop as a diffusers pipeline does, on a
2x4x4x4 sample, with a fixed stand-in for the UNet that C can recompute
exactly in float32:

    model(x_in, t) = EPS * 0.9 + x_in * 0.05 + float32(t) * 1e-4

Stochastic steps (EulerAncestral, DDPM, LCM, SDE-DPM, DDIM eta > 0) get a
torch.Generator("cpu").manual_seed(seed), which the C side reproduces with
DiffuseRng.  img2img cases follow StableDiffusionImg2ImgPipeline:
get_timesteps (strength), set_begin_index, noise from the generator,
add_noise (init_latents, noise, timesteps[:1]).

Run from the repository root:  python3 tests/reference/make_scheduler_fixtures.py
(needs torch, diffusers and scipy - LMSDiscreteScheduler integrates with it).
"""
import inspect
import json
import math
import os

import diffusers
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", "fixtures", "schedulers")
SHAPE = (2, 4, 4, 4)

EPS = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(7))
BASE = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1234))

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json (PNDM)
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    "_diffusers_version": "0.6.0", "some_unknown_key": [1, 2],
}
SDLIKE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def model(x_in, t):
    tf = t.to(torch.float32) if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float32)
    return EPS * 0.9 + x_in * 0.05 + tf * 1e-4


def f32list(t):
    return [float(v) for v in t.flatten().tolist()]


CASES = []


def case(cls, config, steps, seed=None, strength=None, eta=None, lcm=None, swap_from=None, note=""):
    CASES.append(dict(cls=cls, config=config, steps=steps, seed=seed, strength=strength, eta=eta, lcm=lcm,
                      swap_from=swap_from, note=note))


# ---- the grid ---------------------------------------------------------------
P = "PNDMScheduler"
case(P, SD15, 20, note="SD 1.5 config, skip_prk_steps, unknown keys")
case(P, SD15, 1)
case(P, SD15, 4)
case(P, {}, 4, note="PRK warm-up (defaults)")
case(P, {"timestep_spacing": "linspace", "beta_schedule": "squaredcos_cap_v2"}, 10, note="PRK, linspace, cosine")
case(P, {**SDLIKE, "skip_prk_steps": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
         "set_alpha_to_one": True}, 25)
case(P, SD15, 10, strength=0.6, seed=11, note="img2img")

D = "DDIMScheduler"
case(D, {**SDLIKE, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, 20)
case(D, {**SDLIKE, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, 1)
case(D, {}, 4, note="defaults: clip_sample")
case(D, {**SDLIKE, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
         "set_alpha_to_one": True, "clip_sample": False}, 25)
case(D, {**SDLIKE, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
         "clip_sample": False}, 4)
case(D, {"timestep_spacing": "linspace", "beta_schedule": "squaredcos_cap_v2"}, 4, eta=0.5, seed=5, note="eta")
case(D, {**SDLIKE, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.8}, 4)
case(D, {**SDLIKE, "clip_sample": False, "steps_offset": 1}, 10, strength=0.75, seed=12, note="img2img")

DD = "DDPMScheduler"
case(DD, {}, 4, seed=3, note="defaults: clip_sample, fixed_small")
case(DD, {**SDLIKE, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
          "rescale_betas_zero_snr": True, "clip_sample": False}, 20, seed=4)
case(DD, {**SDLIKE, "variance_type": "fixed_small_log", "timestep_spacing": "linspace", "clip_sample": False}, 4,
     seed=6)
case(DD, {"variance_type": "fixed_large", "prediction_type": "sample", "clip_sample_range": 0.7,
          "beta_schedule": "squaredcos_cap_v2"}, 4, seed=8)
case(DD, {**SDLIKE, "steps_offset": 1}, 1, seed=9)
case(DD, {**SDLIKE, "clip_sample": False, "steps_offset": 1}, 10, strength=0.5, seed=13, note="img2img")

L = "LMSDiscreteScheduler"
case(L, {**SDLIKE, "steps_offset": 1}, 20)
case(L, {**SDLIKE, "steps_offset": 1}, 1)
case(L, {**SDLIKE, "use_karras_sigmas": True}, 4)
case(L, {**SDLIKE, "use_karras_sigmas": True, "sigma_min": 0.5}, 25, note="karras ignores config sigma_min")
case(L, {**SDLIKE, "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"}, 4)
case(L, {"timestep_spacing": "trailing", "prediction_type": "sample", "use_exponential_sigmas": True,
         "sigma_max": 10.0}, 4)
case(L, {**SDLIKE, "steps_offset": 1}, 10, strength=0.6, seed=14, note="img2img")

E = "EulerDiscreteScheduler"
case(E, {**SDLIKE, "steps_offset": 1, "timestep_spacing": "leading"}, 20)
case(E, {**SDLIKE, "steps_offset": 1, "timestep_spacing": "leading"}, 1)
case(E, {**SDLIKE}, 4)
case(E, {**SDLIKE, "use_karras_sigmas": True, "prediction_type": "v_prediction"}, 25)
case(E, {**SDLIKE, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
         "final_sigmas_type": "sigma_min"}, 4)
case(E, {**SDLIKE, "use_exponential_sigmas": True, "sigma_min": 0.1, "sigma_max": 12.0}, 4)
case(E, {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}, 4)
case(E, {**SDLIKE, "timestep_type": "continuous", "prediction_type": "v_prediction"}, 4)
case(E, {**SDLIKE, "interpolation_type": "log_linear"}, 4)
case(E, {**SDLIKE, "steps_offset": 1, "timestep_spacing": "leading"}, 10, strength=0.6, seed=15, note="img2img")

EA = "EulerAncestralDiscreteScheduler"
case(EA, {**SDLIKE, "steps_offset": 1, "timestep_spacing": "leading"}, 20, seed=21)
case(EA, {**SDLIKE, "steps_offset": 1, "timestep_spacing": "leading"}, 1, seed=22)
case(EA, {**SDLIKE}, 4, seed=2**32 + 5)
case(EA, {**SDLIKE, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
          "rescale_betas_zero_snr": True}, 4, seed=23)
case(EA, {"beta_schedule": "squaredcos_cap_v2"}, 25, seed=24)
case(EA, {**SDLIKE, "steps_offset": 1, "timestep_spacing": "leading"}, 10, strength=0.6, seed=16, note="img2img")

H = "HeunDiscreteScheduler"
case(H, {**SDLIKE}, 4)
case(H, {**SDLIKE}, 1)
case(H, {**SDLIKE, "use_karras_sigmas": True, "prediction_type": "v_prediction"}, 20)
case(H, {"beta_schedule": "exp", "use_exponential_sigmas": True, "prediction_type": "sample", "clip_sample": True,
         "clip_sample_range": 0.9}, 4)
case(H, {**SDLIKE, "timestep_spacing": "leading", "steps_offset": 1}, 4)
case(H, {**SDLIKE, "timestep_spacing": "trailing", "beta_schedule": "linear"}, 4)
case(H, {**SDLIKE}, 10, strength=0.6, seed=17, note="img2img")

DPM = "DPMSolverMultistepScheduler"
case(DPM, {**SDLIKE, "steps_offset": 1}, 20)
case(DPM, {**SDLIKE, "steps_offset": 1}, 25)
case(DPM, {**SDLIKE}, 1)
case(DPM, {**SDLIKE}, 4)
case(DPM, {**SDLIKE, "use_karras_sigmas": True, "solver_order": 3}, 20)
case(DPM, {**SDLIKE, "solver_order": 1}, 4)
case(DPM, {**SDLIKE, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, 4)
case(DPM, {**SDLIKE, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun",
           "solver_order": 3}, 20)
case(DPM, {**SDLIKE, "solver_type": "heun"}, 20)
case(DPM, {**SDLIKE, "algorithm_type": "sde-dpmsolver++"}, 4, seed=31)
case(DPM, {**SDLIKE, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True}, 20, seed=32)
case(DPM, {**SDLIKE, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, 4, seed=33)
case(DPM, {**SDLIKE, "algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, 4, seed=34)
case(DPM, {**SDLIKE, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
           "rescale_betas_zero_snr": True}, 4)
case(DPM, {**SDLIKE, "prediction_type": "sample", "timestep_spacing": "leading", "steps_offset": 1,
           "lower_order_final": False}, 20)
case(DPM, {**SDLIKE, "use_lu_lambdas": True}, 4)
case(DPM, {**SDLIKE, "use_exponential_sigmas": True}, 4)
case(DPM, {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "euler_at_final": True}, 4)
case(DPM, {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "leading"}, 4)
case(DPM, {**SDLIKE, "use_karras_sigmas": True, "sigma_min": 0.3, "sigma_max": 9.0}, 4,
     note="hidden sigma_min / sigma_max keys")
case(DPM, {**SDLIKE, "algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"}, 4,
     note="deis -> dpmsolver++")
case(DPM, {**SDLIKE, "steps_offset": 1}, 10, strength=0.6, seed=18, note="img2img")

U = "UniPCMultistepScheduler"
case(U, {**SDLIKE}, 20)
case(U, {**SDLIKE}, 25)
case(U, {**SDLIKE}, 1)
case(U, {**SDLIKE}, 4)
# bh1 or predict_x0=False with final_sigmas_type "zero" end in NaN in diffusers
# (B_h = -inf / expm1 (inf) at sigma 0), so these use sigma_min
case(U, {**SDLIKE, "solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}, 20)
case(U, {**SDLIKE, "use_karras_sigmas": True, "solver_order": 3}, 20)
case(U, {**SDLIKE, "predict_x0": False, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
         "final_sigmas_type": "sigma_min"}, 4)
case(U, {**SDLIKE, "disable_corrector": [0, 2], "final_sigmas_type": "sigma_min", "use_exponential_sigmas": True}, 4)
case(U, {**SDLIKE, "prediction_type": "sample", "rescale_betas_zero_snr": True, "timestep_spacing": "leading",
         "steps_offset": 1}, 4)
case(U, {**SDLIKE, "lower_order_final": False, "solver_order": 3, "final_sigmas_type": "sigma_min"}, 4)
case(U, {**SDLIKE, "steps_offset": 1}, 10, strength=0.6, seed=19, note="img2img")

LC = "LCMScheduler"
case(LC, {}, 4, seed=41)
case(LC, {}, 1, seed=42)
case(LC, {"original_inference_steps": 50}, 8, seed=43)
case(LC, {"prediction_type": "v_prediction", "clip_sample": True, "rescale_betas_zero_snr": True}, 4, seed=44)
case(LC, {"set_alpha_to_one": False, "beta_schedule": "linear", "prediction_type": "sample"}, 4, seed=45)
case(LC, {}, 4, seed=46, lcm={"original_inference_steps": 40, "strength": 0.5}, note="set_timesteps strength")
case(LC, {}, 6, strength=0.5, seed=20, note="img2img")

# the other beta schedules, once per class where not covered above
case(L, {"beta_schedule": "squaredcos_cap_v2"}, 4)
case(E, {"beta_schedule": "linear"}, 4)
case(EA, {"beta_schedule": "linear"}, 4, seed=25)
case(H, {"beta_schedule": "squaredcos_cap_v2"}, 4)
case(DPM, {"beta_schedule": "linear"}, 4)
case(U, {"beta_schedule": "linear"}, 4)
case(U, {"beta_schedule": "squaredcos_cap_v2", "final_sigmas_type": "sigma_min"}, 4)
case(LC, {"beta_schedule": "squaredcos_cap_v2"}, 4, seed=47)

# from_config swaps: B.from_config (A.config), the C side uses new_by_name
case(E, None, 20, swap_from=(P, SD15), note="swap PNDM -> Euler")
case(DPM, None, 20, swap_from=(P, SD15), note="swap PNDM -> DPM++")
case(H, None, 4, swap_from=(DPM, {}), note="swap default DPM -> Heun: Heun's own beta defaults")
case(DPM, None, 4, swap_from=(E, {**SDLIKE, "sigma_min": 0.2, "use_karras_sigmas": True}),
     note="swap Euler (sigma_min set) -> DPM: the key still reaches _convert_to_karras")
case(U, None, 4, swap_from=(D, {**SDLIKE, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                "timestep_spacing": "trailing"}), note="swap DDIM -> UniPC")
case(EA, None, 4, seed=51, swap_from=(LC, {}), note="swap LCM -> Euler a (leading spacing)")


def sanitize(cfg):
    out = {}
    for k, v in dict(cfg).items():
        if isinstance(v, float) and not math.isfinite(v):
            continue      # JSON has no -inf: only lambda_min_clipped's default
        if isinstance(v, tuple):
            v = list(v)
        if k == "_use_default_values":
            v = sorted(v)     # built from a set: sort for a stable file
        out[k] = v
    return out


def run_case(i, c):
    cls = getattr(diffusers, c["cls"])
    if c["swap_from"]:
        src_cls, src_cfg = c["swap_from"]
        src = getattr(diffusers, src_cls).from_config({**src_cfg, "_class_name": src_cls})
        cfg_json = sanitize(src.config)
        s = cls.from_config(src.config)
    else:
        cfg_json = {**c["config"], "_class_name": c["cls"]}
        s = cls.from_config(cfg_json)
    steps = c["steps"]
    g = torch.Generator("cpu").manual_seed(c["seed"]) if c["seed"] is not None else None
    if c["lcm"]:
        s.set_timesteps(steps, original_inference_steps=c["lcm"]["original_inference_steps"],
                        strength=c["lcm"]["strength"])
    else:
        s.set_timesteps(steps)
    rec = dict(name=f"c{i:03d}", cls=c["cls"], config=cfg_json, steps=steps, seed=c["seed"], note=c["note"],
               swap=c["swap_from"] is not None, order=s.order, num_inference_steps=s.num_inference_steps,
               timesteps=f32list(s.timesteps.to(torch.float64)),
               init_noise_sigma=float(s.init_noise_sigma),
               sigmas=f32list(s.sigmas) if hasattr(s, "sigmas") and torch.is_tensor(s.sigmas) and c["cls"] not in
               (P, D, DD, LC) else None)
    if c["lcm"]:
        rec["lcm"] = c["lcm"]
    if c["eta"] is not None:
        rec["eta"] = c["eta"]
    timesteps = s.timesteps
    if c["strength"] is not None:
        # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        init_timestep = min(int(steps * c["strength"]), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = s.timesteps[t_start * s.order:]
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(t_start * s.order)
        init_latents = BASE * 0.5
        noise = torch.randn(SHAPE, generator=g)
        x = s.add_noise(init_latents, noise, timesteps[:1].repeat(SHAPE[0]))
        rec["strength"] = c["strength"]
        rec["begin"] = t_start * s.order
        rec["img2img_steps"] = steps - t_start
    else:
        x = BASE * s.init_noise_sigma
    x0 = x.clone()
    params = inspect.signature(s.step).parameters
    xs_list, x_list = [], []
    scales = c["cls"] in (L, E, EA, H)
    for t in timesteps:
        xs = s.scale_model_input(x, t)
        mo = model(xs, t)
        kw = {}
        if "generator" in params and g is not None:
            kw["generator"] = g
        if c["eta"] is not None:
            kw["eta"] = c["eta"]
        x = s.step(mo, t, x, **kw).prev_sample
        if scales:
            xs_list.append(xs.flatten())
        x_list.append(x.flatten())
    tensors = {f"{rec['name']}_x0": x0.flatten().contiguous(),
               f"{rec['name']}_x": torch.stack(x_list).contiguous()}
    if scales:
        tensors[f"{rec['name']}_xs"] = torch.stack(xs_list).contiguous()
    rec["calls"] = len(x_list)
    assert all(torch.isfinite(v).all() for v in x_list), f"{rec['name']}: diffusers produced non-finite samples"
    return rec, tensors


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    records, tensors = [], {"eps": EPS.flatten().contiguous(), "base": BASE.flatten().contiguous()}
    for i, c in enumerate(CASES):
        rec, t = run_case(i, c)
        records.append(rec)
        tensors.update(t)
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability()}
    save_file(tensors, os.path.join(OUT_DIR, "samples.safetensors"), metadata=meta)
    with open(os.path.join(OUT_DIR, "cases.json"), "w") as f:
        json.dump({**meta, "shape": list(SHAPE),
                   "model": "EPS * 0.9 + x_in * 0.05 + float32(t) * 1e-4 (EPS = tensor 'eps')",
                   "cases": records}, f, indent=1)
    size = os.path.getsize(os.path.join(OUT_DIR, "samples.safetensors"))
    print(f"{len(records)} cases, samples.safetensors {size} bytes, diffusers {diffusers.__version__}")


if __name__ == "__main__":
    main()
