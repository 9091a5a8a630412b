#!/usr/bin/env python3
"""CLIP tokenizers saved as tokenizer.json alone — what transformers >= 5
writes (save_pretrained of a CLIPTokenizer, e.g. a pipeline saved with
diffusers under transformers 5) — and transformers' input_ids for a set of
prompts (tests/core/test-clip-tokenizer.c "/clip-tokenizer/tokenizer-json").

tests/fixtures/clip-tokenizer-json/
  pairs/    tiny-sd's tokenizer saved by transformers 5 (merges as ["a", "b"])
  strings/  the same file with merges as "a b" strings (tokenizers < 0.20)
  pad/      pad_token "!" (SDXL's tokenizer_2)
  cases.json  {"prompts": [...], "<variant>": [[ids] per prompt]}: tokenizer (
            prompt, padding="max_length", truncation=True) from that folder

Run from the repository root:  python3 tests/reference/make_tokenizer_json_fixtures.py
"""
import json
import os
import shutil

import transformers
from transformers import CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
SRC = os.path.join(FIX, "pipelines", "tiny-sd", "tokenizer")
OUT = os.path.join(FIX, "clip-tokenizer-json")
PROMPTS = [
    "", "a red circle", "A photo of an astronaut riding a horse on Mars, 8k, detailed",
    "bear eats pizza", "  spaces   and\ttabs\n", "ÉLAN café naïve", "emoji 🐻🍕 and symbols #$%&",
    "<|startoftext|>a<|endoftext|>", "it's we're they'll I'd", "numbers 123 4.56",
    " ".join(["long"] * 90),
]


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    t = CLIPTokenizer.from_pretrained(SRC)
    t.save_pretrained(os.path.join(OUT, "pairs"))
    assert sorted(os.listdir(os.path.join(OUT, "pairs"))) == ["tokenizer.json", "tokenizer_config.json"], \
        os.listdir(os.path.join(OUT, "pairs"))
    shutil.copytree(os.path.join(OUT, "pairs"), os.path.join(OUT, "strings"))
    p = os.path.join(OUT, "strings", "tokenizer.json")
    j = json.load(open(p))
    j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
    json.dump(j, open(p, "w"), ensure_ascii=False)
    CLIPTokenizer.from_pretrained(SRC, pad_token="!").save_pretrained(os.path.join(OUT, "pad"))
    cases = {"generator": "tests/reference/make_tokenizer_json_fixtures.py", "transformers": transformers.__version__,
             "prompts": PROMPTS}
    for v in ("pairs", "strings", "pad"):
        tok = CLIPTokenizer.from_pretrained(os.path.join(OUT, v))
        cases[v] = [tok(s, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
                    for s in PROMPTS]
    assert cases["pairs"] == cases["strings"] and cases["pad"] != cases["pairs"]
    json.dump(cases, open(os.path.join(OUT, "cases.json"), "w"), indent=0)
    print("tokenizer.json fixtures:", len(PROMPTS), "prompts")


if __name__ == "__main__":
    main()
