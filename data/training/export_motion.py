"""Write the trained motion adapter as a diffusers MotionAdapter folder (fp16 safetensors) and put the
run's direction-word embeddings (the rows of "moving", "leftward", ...: learnt with --train-words, or
set from the position words with --words-from-positions) into the image bundle's text encoder.

Only those rows of text_encoder's token_embedding change (checked: every other tensor and row of the
bundle stays bit-identical), so the image bundle's text-to-image output is unchanged for its
vocabulary.
"""
import argparse
import json
import os

import torch
from diffusers import MotionAdapter
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from common import clear_out_dir
from train_motion import new_word_ids

HERE = os.path.dirname(os.path.abspath(__file__))
EMB_KEYS = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/tinysd/motion_ckpt")
    ap.add_argument("--model", default=os.path.join(HERE, "..", "tiny-sd"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tiny-motion-adapter"))
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--rows-only", action="store_true",
                    help="copy the word rows even if the run's text encoder is not the bundle's (quick checks)")
    a = ap.parse_args()

    ad = MotionAdapter.from_pretrained(os.path.join(a.ckpt, "adapter" if a.no_ema else "adapter_ema"))
    ad.to(torch.float16)
    clear_out_dir(a.out)
    ad.save_pretrained(a.out, safe_serialization=True)
    cp = os.path.join(a.out, "config.json")
    cfg = json.load(open(cp))
    cfg.pop("_name_or_path", None)
    with open(cp, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    # the direction words' embeddings -> the bundle's text encoder (fp16, same keys and metadata)
    tok = CLIPTokenizer.from_pretrained(os.path.join(a.model, "tokenizer"))
    ids = new_word_ids(tok)
    words = tok.convert_ids_to_tokens(ids)
    te_file = os.path.join(a.model, "text_encoder", "model.safetensors")
    with safe_open(te_file, "pt") as f:
        meta = f.metadata()
    bundle = load_file(te_file)
    learnt = load_file(os.path.join(a.ckpt, "text_encoder", "model.safetensors"))
    key = next(k for k in EMB_KEYS if k in bundle)
    lkey = next(k for k in EMB_KEYS if k in learnt)
    new = bundle[key].clone()
    new[ids] = learnt[lkey][ids].to(new.dtype)
    changed = (new != bundle[key]).any(dim=1).nonzero().flatten().tolist()
    assert set(changed) <= set(ids), changed
    # everything else the motion run saw must be the bundle's own weights
    for k, v in bundle.items():
        lk = k if k in learnt else k.replace("text_model.", "", 1)
        if k != key and not a.rows_only:
            assert torch.equal(learnt[lk].to(v.dtype), v), f"text encoder tensor {k} differs from the bundle's"
    bundle[key] = new
    save_file(bundle, te_file, metadata=meta)
    total = 0
    for root, _, files in os.walk(a.out):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
            total += os.path.getsize(os.path.join(root, f))
    print(f"exported adapter to {os.path.abspath(a.out)}: {total/1e6:.2f} MB; text encoder rows {changed} "
          f"({', '.join(words)}) updated in {te_file}")


if __name__ == "__main__":
    main()
