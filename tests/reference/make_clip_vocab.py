#!/usr/bin/env python3
"""Derive the CLIP tokenizer files (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json) from open_clip's bundled bpe_simple_vocab_16e6.txt.gz,
laid out like the openai/clip-vit-large-patch14 tokenizer on the Hub (which the
Stable Diffusion 1.x repos copy into their tokenizer/ folder).

Layout (same as OpenAI CLIP's SimpleTokenizer and transformers' CLIP files):
  vocab  = the 256 bytes_to_unicode() characters (in that order),
           then each of them + '</w>',
           then every merge joined (rank order),
           then '<|startoftext|>' (49406) and '<|endoftext|>' (49407)   -> 49408 entries
  merges = lines 1 .. 49152-256-2 of the gz file (the first line is a header),
           written after a '#version: 0.2' header line.
vocab.json is written as transformers' (v4) save_vocabulary wrote it for the Hub
(json, sorted keys, non-ASCII kept as is).

The result is verified by loading it with the installed transformers'
CLIPTokenizer and comparing a few known ids.

Run: python3 tests/reference/make_clip_vocab.py [outdir]
(default outdir: tests/fixtures/clip-tokenizer next to this script's tests/ folder)
"""
import gzip
import json
import os
import sys

import open_clip.tokenizer as oct


def bytes_to_unicode():
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "fixtures", "clip-tokenizer")
    os.makedirs(out, exist_ok=True)

    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    assert all(len(m) == 2 for m in merges)

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == len(vocab) == 49408, len(encoder)

    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(encoder, sort_keys=True, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")

    # The two small JSON files as the SD 1.x tokenizer folders have them
    # (openai/clip-vit-large-patch14 saved by transformers' save_pretrained).
    def added(content):
        return {"content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    special = {
        "bos_token": added("<|startoftext|>"),
        "eos_token": added("<|endoftext|>"),
        "pad_token": "<|endoftext|>",
        "unk_token": added("<|endoftext|>"),
    }
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(special, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def typed(content):
        d = {"__type": "AddedToken"}
        d.update(added(content))
        return d

    config = {
        "add_prefix_space": False,
        "bos_token": typed("<|startoftext|>"),
        "do_lower_case": True,
        "eos_token": typed("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": typed("<|endoftext|>"),
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    # Verify with transformers.
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(out)
    checks = {
        "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
        "an astronaut riding a horse": [49406, 550, 18376, 6765, 320, 4558, 49407],
    }
    for text, want in checks.items():
        got = tok(text).input_ids
        assert got == want, (text, got, want)
    assert tok.model_max_length == 77
    assert tok.pad_token_id == 49407 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert len(tok) == 49408
    print("wrote", out, "- vocab", len(encoder), "merges", len(merges), "- transformers check OK")


if __name__ == "__main__":
    main()
