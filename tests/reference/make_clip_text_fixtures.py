#!/usr/bin/env python3
"""Reference outputs of transformers' CLIPTextModel / CLIPTextModelWithProjection
for tests/core/test-clip-text.c.

Each case is a tiny random-weight model saved with save_pretrained (config.json +
model.safetensors, f32) under tests/fixtures/clip_text/<case>/, plus io.safetensors
holding the inputs and what transformers / diffusers compute from them:

  input_ids                 [B, L]  (stored as F32; small integers, exact)
  attention_mask            [B, L]  (only for the case that uses one)
  last_hidden_state         [B, L, D]   (after final_layer_norm)
  pooled                    [B, D]      (pooler_output: transformers' EOS rule)
  text_embeds               [B, P]      (CLIPTextModelWithProjection only)
  hidden_state_<i>          [B, L, D]   i = 0..num_layers (hidden_states tuple:
                                        embeddings, then each layer's output)
  clip_skip_<n>             [B, L, D]   diffusers' StableDiffusionPipeline.encode_prompt
                                        with clip_skip=n: final_layer_norm(hidden_states[-(n + 1)])

Cases differ in every option the C model reads: hidden_act (quick_gelu / gelu),
1, 2 and 3 layers, heads, hidden / intermediate sizes, layer_norm_eps,
eos_token_id == 2 (legacy argmax pooling) versus a real EOS id (first position,
with pad == eos), sequence shorter than max_position_embeddings, a stale
`text_model.embeddings.position_ids` buffer in the file, the projection head,
an unexpected key, and an attention_mask (config use_attention_mask).

Run: python3 tests/reference/make_clip_text_fixtures.py [outdir]
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "fixtures", "clip_text")


def randomize(model, seed):
    """Replace the (tiny-std) default init with weights large enough that every
    op visibly matters: N(0, 1/sqrt(fan_in)) matrices, LN gammas around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or \
                    name.endswith("final_layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[1] ** 0.5))


CASES = [
    # legacy eos_token_id == 2: pooled at argmax(input_ids); quick_gelu like SD 1.x
    dict(name="quick2l", cls=CLIPTextModel, seed=1,
         config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1),
         ids=[[60, 5, 9, 33, 12, 63, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1],
              [60, 41, 63, 17, 17, 17, 17, 17, 17, 17, 17, 17, 17, 17, 17, 17]],
         clip_skips=[1, 2]),
    # real EOS id (first position of eos, pad == eos, ids above eos), gelu, 1 layer, 2 heads,
    # sequence 10 < max_position_embeddings 12, a stale position_ids buffer
    dict(name="gelu1l", cls=CLIPTextModel, seed=2,
         config=dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=12, hidden_act="gelu",
                     layer_norm_eps=1e-5, bos_token_id=48, eos_token_id=40, pad_token_id=40),
         # ids above the EOS id: the legacy argmax rule would pick position 0 here
         ids=[[48, 3, 4, 45, 40, 40, 40, 40, 40, 40],
              [48, 7, 30, 31, 8, 2, 47, 40, 40, 40],
              [48, 40, 40, 40, 40, 40, 40, 40, 40, 40]],
         clip_skips=[1], position_ids_buffer=True, hub_prefix=True),
    # SDXL text_encoder_2 style: projection head, gelu, 3 layers, head dim 16,
    # layer_norm_eps 1e-6, use_attention_mask (right padding), an unexpected key
    dict(name="proj3l", cls=CLIPTextModelWithProjection, seed=3,
         config=dict(vocab_size=40, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=3, max_position_embeddings=8, hidden_act="gelu",
                     layer_norm_eps=1e-6, projection_dim=20, bos_token_id=38, eos_token_id=39,
                     pad_token_id=0),
         ids=[[38, 5, 6, 39, 0, 0, 0, 0],
              [38, 11, 12, 13, 14, 15, 16, 39]],
         mask=[[1, 1, 1, 1, 0, 0, 0, 0],
               [1, 1, 1, 1, 1, 1, 1, 1]],
         clip_skips=[1, 2], extra_key=True, use_attention_mask=True),
]


def main():
    torch.manual_seed(0)
    for case in CASES:
        d = os.path.join(OUT, case["name"])
        os.makedirs(d, exist_ok=True)
        cfg = CLIPTextConfig(**case["config"])
        cfg._attn_implementation = "eager"
        model = case["cls"](cfg).eval()
        randomize(model, case["seed"])
        model.save_pretrained(d, safe_serialization=True)
        # tidy the config: keep it small but as transformers wrote it
        cfg_path = os.path.join(d, "config.json")
        with open(cfg_path) as f:
            cj = json.load(f)
        if case.get("use_attention_mask"):
            cj["use_attention_mask"] = True
        with open(cfg_path, "w") as f:
            json.dump(cj, f, indent=2, sort_keys=True)
            f.write("\n")
        st_path = os.path.join(d, "model.safetensors")
        sd = load_file(st_path)
        changed = False
        if case.get("hub_prefix"):
            # the Hub's CLIPTextModel files (SD 1.x/2.x text_encoder/) name every
            # tensor text_model.*; transformers 5 writes them without the prefix
            # and accepts both on load
            sd = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in sd.items()}
            changed = True
        if case.get("position_ids_buffer"):
            sd["text_model.embeddings.position_ids"] = torch.arange(
                cfg.max_position_embeddings, dtype=torch.int64).unsqueeze(0)
            changed = True
        if case.get("extra_key"):
            sd["text_model.some_unused.weight"] = torch.zeros(3)
            changed = True
        if changed:
            save_file(sd, st_path, metadata={"format": "pt"})

        ids = torch.tensor(case["ids"], dtype=torch.long)
        mask = torch.tensor(case["mask"], dtype=torch.long) if "mask" in case else None
        io = {"input_ids": ids.float()}
        if mask is not None:
            io["attention_mask"] = mask.float()
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == cfg.num_hidden_layers + 1
        io["last_hidden_state"] = out.last_hidden_state
        if case["cls"] is CLIPTextModelWithProjection:
            io["text_embeds"] = out.text_embeds
            # pooled output: recompute the rule transformers uses inside
            with torch.no_grad():
                inner = model.text_model(ids, attention_mask=mask)
            io["pooled"] = inner.pooler_output
            final_ln = model.text_model.final_layer_norm
        else:
            io["pooled"] = out.pooler_output
            final_ln = model.final_layer_norm
        for i, h in enumerate(hs):
            io[f"hidden_state_{i}"] = h
        for n in case["clip_skips"]:
            # diffusers encode_prompt: prompt_embeds[-1][-(clip_skip + 1)] then final_layer_norm
            with torch.no_grad():
                io[f"clip_skip_{n}"] = final_ln(hs[-(n + 1)])
        # the files as written must load back into transformers and give the same outputs
        with torch.no_grad():
            again = case["cls"].from_pretrained(d, attn_implementation="eager").eval()
            out2 = again(ids, attention_mask=mask, output_hidden_states=True)
        assert torch.equal(out2.last_hidden_state, out.last_hidden_state), case["name"]
        io = {k: v.contiguous().float() for k, v in io.items()}
        save_file(io, os.path.join(d, "io.safetensors"), metadata={"format": "pt"})
        for fn in ("io.safetensors", "model.safetensors"):
            os.chmod(os.path.join(d, fn), 0o644)
        print(case["name"], {k: tuple(v.shape) for k, v in io.items()})


if __name__ == "__main__":
    main()
