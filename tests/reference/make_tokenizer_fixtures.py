#!/usr/bin/env python3
"""Reference ids for the CLIP tokenizer test (tests/core/test-clip-tokenizer.c).

Oracle: the installed transformers' CLIPTokenizer (transformers 5: a `tokenizers`
pipeline; ftfy is never used by it), loaded from tests/fixtures/clip-tokenizer
(made by make_clip_vocab.py) and from variants of its two config files.

For every prompt of a corpus (> 500: SD-style prompts, punctuation, numbers,
emoji, accented / CJK / other scripts, prompts longer than 77 tokens, white
space oddities, apostrophes, mixed case, the empty string, literal special
tokens, invalid UTF-8 given as bytes) it records, as diffusers'
StableDiffusionPipeline.encode_prompt calls the tokenizer:
  ids      tokenizer(text).input_ids                      (untruncated)
  padded   tokenizer(text, padding="max_length", max_length=M, truncation=True)
           stored losslessly as head + a run of pad ids (pad_run, on the
           padding side)
  mask_ones that call's attention_mask: its number of ones (the generator
           checks they are contiguous, on the side away from the padding)
  decoded  tokenizer.decode(ids)
  removed  tokenizer.batch_decode(ids[:, M - 1 : -1])[0] when diffusers would
           warn about truncation (len(ids) > M), else null
Variants ("configs") reuse vocab.json/merges.txt with other config files:
SD 2.x (pad "!"), transformers-5 style, added_tokens_decoder with lstrip/rstrip
and left padding/truncation at model_max_length 12, no config at all, and so on.

It also writes unicode.json: the character classes \\s, \\p{L}, \\p{N} of the
`tokenizers` regex engine, its per-character Lowercase normalizer and NFC of
every single code point (where they change it), so the C test can compare its
Unicode helpers over all code points.

Run: python3 tests/reference/make_tokenizer_fixtures.py
"""
import json
import os
import random
import shutil
import sys
import tempfile

import tokenizers
import transformers
from tokenizers import Regex, normalizers
from transformers import CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures", "clip-tokenizer")
DEFAULT_MAX = 77  # our default when no (sane) model_max_length is configured


# --------------------------------------------------------------------------
# corpus

SUBJECTS = ["a cat", "a dog", "an astronaut", "a castle", "a red fox", "two robots", "an old man",
            "a girl with a pearl earring", "a bowl of ramen", "a cyberpunk city", "a lighthouse",
            "a steampunk airship", "mount Fuji", "a waterfall", "the Eiffel Tower", "a samurai",
            "a corgi wearing sunglasses", "a bonsai tree", "a dragon", "an owl"]
ACTIONS = ["riding a horse", "sitting on a bench", "in the rain", "at sunset", "on the moon",
           "under water", "in a forest", "playing chess", "reading a book", "flying over the sea"]
STYLES = ["highly detailed", "8k", "trending on artstation", "oil painting", "by Greg Rutkowski",
          "studio ghibli style", "photorealistic", "octane render", "unreal engine 5", "35mm film",
          "cinematic lighting", "watercolor", "masterpiece, best quality", "(masterpiece:1.2)",
          "[cat|dog]", "sharp focus", "bokeh", "HDR", "4K UHD", "volumetric fog"]

HANDWRITTEN = [
    "", " ", "   ", "\t", "\n", "a", "A", "a photo of a cat", "A Photo Of A Cat", "A PHOTO OF A CAT",
    "an astronaut riding a horse on mars", "hello world", "Hello, World!", "hello!!!", "what?!",
    "wait...", "a,b,c", "a.b.c", "#hashtag @mention", "e-mail: someone@example.com",
    "https://huggingface.co/openai/clip-vit-large-patch14", "C:\\path\\to\\file.png", "x=1; y=2",
    "<html><body>hi</body></html>", "&amp; &lt; &gt; &quot;", "100%", "$100", "€100", "£50", "¥1000",
    "3.14159", "1,000,000", "2nd place", "1st 2nd 3rd 4th", "12345678901234567890", "007",
    "1990s", "24/7", "10:30pm", "-5°C", "v1.5", "sd_xl_base_1.0", "1e-3",
    "it's", "It's", "IT'S", "don't", "DON'T", "you're", "we've", "I'm", "he'll", "she'd",
    "'s", "'", "''", "'''", "x's !'s ''s", "rock 'n' roll", "the cat's toy's owner's",
    "it’s a curly apostrophe", "‘quoted’ “double”", "\"quoted\"", "'single'", "o'clock",
    "tab\tseparated\twords", "new\nline", "windows\r\nline", "  leading spaces", "trailing spaces  ",
    "multiple     spaces", "nbsp\u00a0between", "ideographic\u3000space", "em\u2003space",
    "zero\u200bwidth", "line\u2028separator", "para\u2029sep", "nel\u0085char", "vt\u000bff\u000c",
    "mixed \t\n\r\u00a0\u3000 whitespace", "\u200b", "\ufeffbom at start",
    "café", "naïve", "résumé", "Crème Brûlée", "São Paulo", "Zürich", "ß", "STRASSE straße",
    "İstanbul", "ıi", "Σ ΣΣ ΌΣΟΣ", "Ελληνικά", "Москва", "Привет мир", "Ärger Öl Übel",
    "e\u0301", "cafe\u0301", "A\u030a", "\u212b", "\u1100\u1161\u11a8", "한국어 텍스트", "ﬁne ﬂow",
    "ＡＢＣ１２３", "ｈｅｌｌｏ", "Ⅻ Ⅳ ⅳ", "Ⓐ Ⓑ ⓒ", "½ ¾ ² ³", "٣ ٤ ٥", "१२३", "①②③",
    "你好世界", "一只猫在月球上", "東京タワー", "ひらがな カタカナ", "漢字かな交じり文",
    "中文,标点。符号!", "日本語の文章です。", "العربية", "مرحبا بالعالم", "עברית", "हिन्दी", "नमस्ते दुनिया",
    "ไทย", "tiếng Việt", "ქართული", "Հայերեն", "አማርኛ", "ᚠᛇᚻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐛𝐨𝐥𝐝",
    "😀", "a cat 🐱", "🐱🐶🦊", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "❤️", "✨sparkles✨", "🔥🔥🔥 fire",
    "emoji😀between😀words", "☕ coffee", "★☆", "♪♫", "→←↑↓", "∑∫√∞", "©®™", "°±×÷",
    "<|startoftext|>", "<|endoftext|>", "<|startoftext|>a cat<|endoftext|>", "a <|endoftext|> b",
    "a<|ENDOFTEXT|>b", "<|StartOfText|> mixed", "<|endoftext|><|endoftext|>", "<|endoftext",
    "<|notatoken|>", "< |endoftext| >", "!<|endoftext|>!", "x!!<|startoftext|>!!y",
    "!", "!!", "hello!", "! ! !", "wow! amazing! !!!", "a!b", "¡hola!",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile",
    "(best quality:1.4), (ultra highres:1.2), (photorealistic:1.4), (8k, RAW photo:1.2)",
    "portrait of a woman, [[detailed eyes]], {{intricate}}, BREAK, background",
    "a photo of an astronaut riding a horse on mars, highly detailed, 8k",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "The quick brown fox jumps over the lazy dog.", "THE QUICK BROWN FOX", "tHe QuIcK bRoWn FoX",
    "camelCaseWord", "snake_case_word", "kebab-case-word", "UPPER_CASE", "MiXeD123Numbers456",
    "abc123def", "a1b2c3", "R2-D2 and C-3PO", "x86_64", "H2O", "CO₂", "m²", "km/h",
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "ababababababababababab", "zzzzzzzzzzzz",
    "jekyll", "hyde", "...", "---", "___", "***", "~~~", "===", "|||", "<<<>>>", "[[[]]]", "{}",
    "\\", "/", "\\n", "a\\tb", "$$$", "%%%", "^^^", "```code```", "@@@@", "####",
]

SCRIPTS = [(0x41, 0x7a), (0xc0, 0x24f), (0x370, 0x3ff), (0x400, 0x4ff), (0x590, 0x5ff),
           (0x600, 0x6ff), (0x900, 0x97f), (0xe00, 0xe7f), (0x1100, 0x11ff), (0x2000, 0x206f),
           (0x2100, 0x218f), (0x2460, 0x24ff), (0x3040, 0x30ff), (0x4e00, 0x4fff), (0xac00, 0xad00),
           (0xff00, 0xffef), (0x1f300, 0x1f64f), (0x1d400, 0x1d4ff), (0x10d40, 0x10d8f),
           (0x16ea0, 0x16edf), (0x0300, 0x036f), (0x20, 0x7e)]

INVALID_UTF8 = ["ff", "616263c3", "e4bd78", "c0af", "eda080", "f4908080", "f09f98", "8080",
                "61ff62", "e282ac80", "ce", "f0", "fe", "c3a9ff", "e4bda0e5a5bd80e4b896"]


def make_corpus():
    rng = random.Random(1234)
    corpus = list(HANDWRITTEN)
    for _ in range(200):  # SD-style prompts
        parts = [rng.choice(SUBJECTS), rng.choice(ACTIONS)] + rng.sample(STYLES, rng.randint(0, 5))
        p = ", ".join(parts)
        r = rng.random()
        if r < 0.2:
            p = p.title()
        elif r < 0.3:
            p = p.upper()
        corpus.append(p)
    for k in range(30):  # long prompts (> 77 tokens)
        parts = [rng.choice(SUBJECTS), rng.choice(ACTIONS)] + [rng.choice(STYLES) for _ in range(10 + 3 * k)]
        corpus.append(", ".join(parts))
    corpus.append("word " * 80)
    corpus.append("a" * 500)
    corpus.append("🐱" * 40)
    corpus.append("你好" * 60)
    corpus.append(" ".join(str(i) for i in range(100)))
    corpus.append("!" * 200)
    for _ in range(100):  # random unicode mixes
        lo, hi = rng.choice(SCRIPTS)
        n = rng.randint(1, 12)
        s = "".join(chr(rng.randint(lo, hi)) for _ in range(n))
        if rng.random() < 0.5:
            s += rng.choice([" ", "  ", "\t", "'s ", "!", "1", "-"]) + "".join(
                chr(rng.randint(*rng.choice(SCRIPTS))) for _ in range(rng.randint(1, 8)))
        corpus.append(s)
    for _ in range(40):  # ascii noise
        corpus.append("".join(chr(rng.randint(0x20, 0x7e)) for _ in range(rng.randint(1, 40))))
    seen, out = set(), []
    for t in corpus:
        if "\x00" in t or any(0xD800 <= ord(c) <= 0xDFFF for c in t):
            continue
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


VARIANT_TEXTS = [
    "", "a photo of a cat", "hello! <|ENDOFTEXT|>x <|STARTOFTEXT|>", "a  <|endoftext|>  b",
    "<|startoftext|>a cat<|endoftext|>", "a<|endoftext|>b", "a <|endoftext|>", "<|endoftext|> b",
    "hello!", "!!", "wow! amazing! !!!", "¡hola!", "x!!<|startoftext|>!!y", "<|notatoken|>",
    "one two three four five six seven eight nine ten eleven twelve",
    "one two three four five six seven eight nine ten", "one two three four five six seven eight nine",
    "it's a dog's life", "İstanbul café 你好 😀",
]


TINY_TEXTS = ["ab", "AB", "xaby", "c C cc", "abab", "ABC abc cab", "a b c", "ab ab ab ab ab ab ab", ""]


# --------------------------------------------------------------------------
# configs

def sd1_files():
    return {name: json.load(open(os.path.join(FIX, name), encoding="utf-8"))
            for name in ("tokenizer_config.json", "special_tokens_map.json")}


def variants():
    sd1 = sd1_files()
    cfg, stm = sd1["tokenizer_config.json"], sd1["special_tokens_map.json"]
    sd2_stm = dict(stm)
    sd2_stm["pad_token"] = "!"
    v5 = {"add_prefix_space": False, "bos_token": "<|startoftext|>", "do_lower_case": True,
          "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77,
          "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}
    atd = dict(v5)
    atd["added_tokens_decoder"] = {
        "49406": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False, "special": True},
        "49407": {"content": "<|endoftext|>", "lstrip": True, "normalized": True, "rstrip": True,
                  "single_word": False, "special": True}}
    atd["padding_side"] = "left"
    atd["truncation_side"] = "left"
    atd["model_max_length"] = 12
    mixed = {"model_max_length": 16}
    mixed_stm = {"bos_token": "<|startoftext|>",
                 "eos_token": {"content": "<|endoftext|>", "normalized": False},
                 "unk_token": {"content": "<|endoftext|>", "normalized": True},
                 "pad_token": {"content": "<|endoftext|>", "normalized": False}}
    huge = dict(cfg)
    huge["model_max_length"] = 1000000000000000019884624838656
    return {
        "sd2": {"tokenizer_config.json": cfg, "special_tokens_map.json": sd2_stm},
        "v5-saved": {"tokenizer_config.json": v5},
        "added-tokens-decoder": {"tokenizer_config.json": atd},
        "config-only": {"tokenizer_config.json": cfg},
        "special-map-only": {"special_tokens_map.json": sd2_stm},
        "no-config": {},
        "mixed-flags": {"tokenizer_config.json": mixed, "special_tokens_map.json": mixed_stm},
        "huge-max-length": {"tokenizer_config.json": huge, "special_tokens_map.json": stm},
        # a tiny vocabulary with added tokens outside the byte alphabet: "AB"
        # is normalized (so it matches "ab" after lower-casing), "C" is not;
        # bytes without a symbol become the unk token
        "tiny-added": {
            "vocab.json": {"a": 0, "b": 1, "c": 2, "a</w>": 3, "b</w>": 4, "c</w>": 5, "ab": 6, "ab</w>": 7,
                           "<|startoftext|>": 8, "<|endoftext|>": 9, "AB": 10, "C": 11},
            "merges.txt": "#version: 0.2\na b\na b</w>\n",
            "tokenizer_config.json": {
                "added_tokens_decoder": {"10": {"content": "AB", "normalized": True, "special": False},
                                         "11": {"content": "C", "normalized": False, "special": False}},
                "model_max_length": 8}},
    }


def load(files):
    d = tempfile.mkdtemp(prefix="clip-tok-")
    for f in ("vocab.json", "merges.txt"):
        if f not in files:
            shutil.copy(os.path.join(FIX, f), d)
    for name, obj in files.items():
        with open(os.path.join(d, name), "w", encoding="utf-8") as fh:
            if isinstance(obj, str):
                fh.write(obj)
            else:
                json.dump(obj, fh)
    tok = CLIPTokenizer.from_pretrained(d)
    shutil.rmtree(d)
    return tok


# --------------------------------------------------------------------------

def case(tok, text, hexbytes=None):
    M = tok.model_max_length if tok.model_max_length <= 1000000 else DEFAULT_MAX
    ids = tok(text).input_ids
    enc = tok(text, padding="max_length", max_length=M, truncation=True)
    padded, mask = enc.input_ids, enc.attention_mask
    assert len(padded) == M
    pad = tok.pad_token_id
    # lossless: head + run of pad ids on the padding side
    run = 0
    if tok.padding_side == "right":
        while run < M and padded[M - 1 - run] == pad:
            run += 1
        head = padded[:M - run]
        assert head + [pad] * run == padded
    else:
        while run < M and padded[run] == pad:
            run += 1
        head = padded[run:]
        assert [pad] * run + head == padded
    # the attention mask is 1 on the real tokens, 0 on the padding: stored as
    # the count of ones after checking it has exactly that shape
    ones = sum(mask)
    want_mask = [1] * ones + [0] * (M - ones) if tok.padding_side == "right" else [0] * (M - ones) + [1] * ones
    assert mask == want_mask, (text, mask)
    removed = None
    if len(ids) > M:  # diffusers: untruncated longer than and different from the padded ids
        removed = tok.batch_decode([ids[M - 1:-1]])[0]
    c = {"text": text} if hexbytes is None else {"hex": hexbytes}
    c.update({"ids": ids, "head": head, "pad_run": run, "mask_ones": ones,
              "decoded": tok.decode(ids), "removed": removed})
    return c


def unicode_tables():
    cps = [c for c in range(1, 0x110000) if not (0xD800 <= c <= 0xDFFF)]
    s = "".join(map(chr, cps))

    def ranges(pat):
        out = normalizers.Replace(Regex(pat), "\u0001").normalize_str(s)
        assert len(out) == len(s)
        r = []
        for i, ch in enumerate(out):
            c = cps[i]
            if ch == "\u0001" and c != 1:
                if r and r[-1][1] == c - 1:
                    r[-1][1] = c
                else:
                    r.append([c, c])
        return r

    def per_char(norm):
        res = norm.normalize_str("\x00".join(map(chr, cps))).split("\x00")
        assert len(res) == len(cps)
        return [[c, [ord(x) for x in o]] for c, o in zip(cps, res) if o != chr(c)]

    return {"space": ranges(r"\s"), "letter": ranges(r"[\p{L}]"), "number": ranges(r"[\p{N}]"),
            "lower": per_char(normalizers.Lowercase()), "nfc": per_char(normalizers.NFC())}


def main():
    versions = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    corpus = make_corpus()
    tok = load(sd1_files())
    cases = [case(tok, t) for t in corpus]
    for h in INVALID_UTF8:
        cases.append(case(tok, bytes.fromhex(h).decode("utf-8", "replace"), h))
    n_long = sum(1 for c in cases if c["removed"] is not None)
    out = {"versions": versions, "configs": {"sd1": None}, "cases": {"sd1": cases}}
    for name, files in variants().items():
        vt = load(files)
        out["configs"][name] = files
        texts = VARIANT_TEXTS if "vocab.json" not in files else TINY_TEXTS
        out["cases"][name] = [case(vt, t) for t in texts]
        # a few facts the test also checks
        out.setdefault("facts", {})[name] = {
            "bos": vt.bos_token_id, "eos": vt.eos_token_id, "pad": vt.pad_token_id,
            "max_length": vt.model_max_length if vt.model_max_length <= 1000000 else DEFAULT_MAX}
    out["facts"]["sd1"] = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
                           "max_length": tok.model_max_length, "vocab_size": tok.vocab_size}
    path = os.path.join(FIX, "cases.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"{path}: {len(cases)} sd1 prompts ({n_long} truncated), "
          f"{sum(len(v) for k, v in out['cases'].items() if k != 'sd1')} cases in {len(out['configs']) - 1} "
          f"config variants, {os.path.getsize(path)} bytes")

    uni = unicode_tables()
    upath = os.path.join(FIX, "unicode.json")
    with open(upath, "w", encoding="utf-8") as f:
        json.dump({"versions": versions, **uni}, f, separators=(",", ":"))
        f.write("\n")
    print(f"{upath}: {os.path.getsize(upath)} bytes")


if __name__ == "__main__":
    sys.exit(main())
