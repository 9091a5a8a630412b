#!/usr/bin/env python3
"""Record what diffusers (the oracle) does when it loads each folder of
tests/fixtures/pipelines/ (made by make_pipeline_fixtures.py) under each option the
C loader supports, and write tests/fixtures/pipelines/expected_loading.json.

For every case: success, or the exception type + message (+ the component being
loaded when it was raised); for each component the weight file(s) actually read
(captured by wrapping diffusers' and transformers' state-dict readers), its class,
dtype and a checksum of its state_dict (float64 sum, abs sum, element and tensor
counts) so the C side can tell which file set it loaded; the pipeline class; the
pipeline config; every warning (logging records of diffusers/transformers at
WARNING and above, and Python warnings).

It also records, per weight file, the same checksum of the file's own contents
("files"), and the answers of diffusers' file-selection helpers on each folder's
file list ("file_selection": _identify_model_variants, variant_compatible_siblings,
is_safetensors_compatible, _check_legacy_sharding_variant_format), which is what
diffusers uses when it downloads from the Hub.

Absolute paths in messages are replaced by "<FIXTURES>" (the pipelines folder).
Run from anywhere:  python3 tests/reference/check_pipeline_loading.py
(re-executes itself with PYTHONHASHSEED=0: diffusers iterates a set of component
names, so without it the order of loading - and which error shows first - varies).
"""
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import traceback
import warnings

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.normpath(os.path.join(HERE, "..", "fixtures", "pipelines"))
OUT = os.path.join(FIX, "expected_loading.json")

import diffusers  # noqa: E402
import transformers  # noqa: E402
import safetensors  # noqa: E402
from diffusers.pipelines import pipeline_loading_utils as plu  # noqa: E402
from diffusers.pipelines import pipeline_utils as pu  # noqa: E402
from diffusers.models import modeling_utils as dmu  # noqa: E402
from diffusers.models import model_loading_utils as dmlu  # noqa: E402
from diffusers.utils import hub_utils as dhu  # noqa: E402
from transformers import modeling_utils as tmu  # noqa: E402

diffusers.utils.logging.disable_progress_bar()
diffusers.utils.logging.set_verbosity_warning()
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_warning()

WEIGHT_FOLDERS = ["tiny-sd", "tiny-sd-sharded", "tiny-sd-legacy-variant", "tiny-sd-binonly",
                  "tiny-sd-single-and-sharded"]
JSON_FOLDERS = ["tiny-sd-missing-folder", "tiny-sd-unknown-class", "tiny-sd-unknown-library",
                "tiny-sd-null-unet", "tiny-sd-missing-unet-key", "tiny-sd-unknown-pipeline-class",
                "tiny-sd-img2img-class", "tiny-sd-extra-keys", "tiny-sd-requires-safety-checker",
                "tiny-sd-no-model-index", "tiny-sd-old-scheduler-config", "tiny-sd-scheduler-class-mismatch"]
VARIANTS = [None, "fp16", "non_ema", "nonexistent", "fp"]
USE_SAFETENSORS = [None, True, False]
WEIGHT_EXTS = (".safetensors", ".bin")


def clean(text):
    text = str(text).replace(FIX + os.sep, "<FIXTURES>/").replace(FIX, "<FIXTURES>")
    return text.replace(HERE, "<REFERENCE>")


def dtype_name(dt):
    return None if dt is None else str(dt).replace("torch.", "")


def tensor_stats(tensors):
    """tensors: iterable of (name, tensor). Checksum used everywhere in this file."""
    n_t = n_el = 0
    s = a = 0.0
    dtypes = {}
    for _, t in tensors:
        n_t += 1
        n_el += t.numel()
        if t.is_floating_point():
            td = t.detach().to(torch.float64)
            s += float(td.sum())
            a += float(td.abs().sum())
        dtypes[dtype_name(t.dtype)] = dtypes.get(dtype_name(t.dtype), 0) + 1
    return {"tensors": n_t, "elements": n_el, "sum": s, "abs_sum": a, "dtypes": dtypes}


# ------------------------------------------------------------------ capture of files read
class Capture:
    component = None
    failed_component = None
    reads = []  # (component, path)
    order = []  # component names in the order diffusers loaded them

    @classmethod
    def note(cls, path):
        cls.reads.append((cls.component, os.path.abspath(str(path))))


def wrap(mod, attr):
    orig = getattr(mod, attr)

    def wrapper(path, *a, **k):
        if not isinstance(path, dict):
            Capture.note(path)
        return orig(path, *a, **k)

    setattr(mod, attr, wrapper)


# diffusers reads every checkpoint (single or shard) through model_loading_utils.load_state_dict
wrap(dmlu, "load_state_dict")
wrap(dmu, "load_state_dict")
# transformers (v5) opens checkpoints with safe_open (and load_state_dict for .bin)
wrap(tmu, "safe_open")
wrap(tmu, "load_state_dict")

_orig_load_sub_model = pu.load_sub_model


def _load_sub_model(*a, **k):
    prev = Capture.component
    Capture.component = k.get("name")
    Capture.order.append(k.get("name"))
    try:
        return _orig_load_sub_model(*a, **k)
    except Exception:
        if Capture.failed_component is None:
            Capture.failed_component = k.get("name")
        raise
    finally:
        Capture.component = prev


pu.load_sub_model = _load_sub_model


class LogCollector(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append({"logger": record.name, "level": record.levelname,
                             "message": clean(record.getMessage())})


@contextlib.contextmanager
def collect():
    h = LogCollector()
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for lg in loggers:
        lg.addHandler(h)
    Capture.reads = []
    Capture.order = []
    Capture.component = None
    Capture.failed_component = None
    out = {"logs": h.records, "warnings": []}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                yield out
            finally:
                for lg in loggers:
                    lg.removeHandler(h)
                out["warnings"] = [{"category": x.category.__name__, "message": clean(x.message)} for x in w]


def rel_to(folder, path):
    return os.path.relpath(path, os.path.join(FIX, folder))


def describe_pipeline(pipe, folder, reads):
    comps = {}
    for name, comp in pipe.components.items():
        if comp is None:
            comps[name] = None
            continue
        d = {"class": type(comp).__name__}
        if isinstance(comp, torch.nn.Module):
            d["dtype"] = dtype_name(comp.dtype)
            d["checksum"] = tensor_stats(comp.state_dict().items())
            files = []
            for c, p in reads:
                if c == name:
                    r = rel_to(folder, p)
                    if r not in files:
                        files.append(r)
            d["files"] = sorted(files)
        elif hasattr(comp, "config") and "Scheduler" in type(comp).__name__:
            d["config"] = json.loads(json.dumps(dict(comp.config), default=str))
        elif "Tokenizer" in type(comp).__name__:
            d["vocab_size"] = len(comp)
            d["model_max_length"] = comp.model_max_length
        comps[name] = d
    cfg = {k: v for k, v in dict(pipe.config).items()}
    cfg = json.loads(clean(json.dumps(cfg, default=str)))
    return {"pipeline_class": type(pipe).__name__, "components": comps, "config": cfg}


def run_case(case, fn):
    """fn() -> (pipeline, folder_for_paths)"""
    with collect() as logs:
        try:
            pipe, folder = fn()
            res = {"ok": True, "load_order": list(Capture.order)}
            res.update(describe_pipeline(pipe, folder, Capture.reads))
        except Exception as e:  # noqa: BLE001 - the oracle's exception is the expected result
            tb = traceback.extract_tb(e.__traceback__)
            res = {"ok": False,
                   "error": {"type": type(e).__name__, "message": clean(e),
                             "component": Capture.failed_component,
                             "raised_in": f"{os.path.basename(tb[-1].filename)}:{tb[-1].name}"},
                   "load_order": list(Capture.order)}
    res["logs"] = logs["logs"]
    res["warnings"] = logs["warnings"]
    case.update(res)
    return case


DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def to_dtype_arg(d):
    if d is None:
        return None
    if isinstance(d, dict):
        return {k: DTYPES[v] for k, v in d.items()}
    return DTYPES[d]


def load_case(folder, loader="DiffusionPipeline", variant=None, use_safetensors=None, dtype=None,
              dtype_kw="dtype", overrides=None, note=None):
    case = {"folder": folder, "loader": loader, "variant": variant, "use_safetensors": use_safetensors,
            "dtype": dtype}
    if dtype_kw != "dtype":
        case["dtype_kw"] = dtype_kw
    if overrides:
        case["overrides"] = {k: v[0] for k, v in overrides.items()}
    if note:
        case["note"] = note

    def fn():
        cls = getattr(diffusers, loader)
        kw = {}
        if variant is not None:
            kw["variant"] = variant
        if use_safetensors is not None:
            kw["use_safetensors"] = use_safetensors
        if dtype is not None:
            kw[dtype_kw] = to_dtype_arg(dtype)
        for k, (_, make) in (overrides or {}).items():
            kw[k] = make()
        return cls.from_pretrained(os.path.join(FIX, folder), **kw), folder

    return run_case(case, fn)


# ------------------------------------------------------------------ files and helper probes
def list_files(folder):
    """Relative file names under folder (following symlinked folders), like a Hub listing."""
    base = os.path.join(FIX, folder)
    out = []
    for dp, dn, fn in os.walk(base, followlinks=True):
        for f in fn:
            out.append(os.path.relpath(os.path.join(dp, f), base))
    return sorted(out)


def file_checksums():
    res = {}
    for folder in sorted(os.listdir(FIX)):
        if not os.path.isdir(os.path.join(FIX, folder)):
            continue
        for rel in list_files(folder):
            if not rel.endswith(WEIGHT_EXTS):
                continue
            p = os.path.join(FIX, folder, rel)
            key = f"{folder}/{rel}"
            if rel.endswith(".safetensors"):
                with safetensors.safe_open(p, framework="pt") as f:
                    stats = tensor_stats((k, f.get_tensor(k)) for k in f.keys())
                    meta = f.metadata()
            else:
                stats = tensor_stats(torch.load(p, map_location="cpu", weights_only=True).items())
                meta = None
            stats["metadata"] = meta
            real = os.path.relpath(os.path.realpath(p), FIX)
            if real != key:
                stats["symlink_to"] = real
            res[key] = stats
    return res


def file_selection():
    out = {}
    for folder in WEIGHT_FOLDERS:
        files = list_files(folder)
        mi = json.load(open(os.path.join(FIX, folder, "model_index.json")))
        comp_folders = [k for k, v in mi.items() if isinstance(v, list) and k != "_class_name"]
        entry = {"files": files, "by_variant": {}}
        for variant in VARIANTS:
            r = {}
            with collect() as logs:
                try:
                    r["identify_model_variants"] = plu._identify_model_variants(
                        os.path.join(FIX, folder), variant, mi)
                except Exception as e:  # noqa: BLE001
                    r["identify_model_variants"] = {"error": type(e).__name__, "message": clean(e)}
                try:
                    usable, var = plu.variant_compatible_siblings(files, variant=variant)
                    r["variant_compatible_siblings"] = {"usable": sorted(usable), "variant": sorted(var)}
                except Exception as e:  # noqa: BLE001
                    r["variant_compatible_siblings"] = {"error": type(e).__name__, "message": clean(e)}
                # what DiffusionPipeline.download() would fetch from a Hub repo with these files:
                # its use_safetensors/allow_pickle prelude, _get_ignore_patterns, then
                # variant_compatible_siblings(..., ignore_patterns)
                r["download"] = {}
                model_folder_names = {os.path.split(f)[0] for f in plu.filter_model_files(files)
                                      if os.path.split(f)[0] in comp_folders}
                for us in USE_SAFETENSORS:
                    allow_pickle = us is None or us is False
                    us_eff = us if us is not None else True
                    dl = {}
                    try:
                        ign = plu._get_ignore_patterns([], model_folder_names, files, us_eff, allow_pickle,
                                                       None, False, False, variant)
                        dl["ignore_patterns"] = ign
                        usable, var = plu.variant_compatible_siblings(files, variant=variant, ignore_patterns=ign)
                        dl["weight_files"] = sorted(usable)
                    except Exception as e:  # noqa: BLE001
                        dl["error"] = {"type": type(e).__name__, "message": clean(e)}
                    r["download"][str(us)] = dl
                r["is_safetensors_compatible"] = plu.is_safetensors_compatible(
                    files, folder_names=comp_folders, variant=variant)
                r["legacy_sharding_variant_format"] = (
                    dhu._check_legacy_sharding_variant_format(folder=os.path.join(FIX, folder), variant=variant)
                    if variant else False)
            r["logs"] = logs["logs"]
            entry["by_variant"][str(variant)] = r
        out[folder] = entry
    return out


def probes():
    """Small rules checked directly on diffusers helpers with throw-away folders."""
    res = {}
    # _identify_model_variants: matches `name.split(".")[1].startswith(variant)` on every file in
    # a component folder that model_index.json names
    with tempfile.TemporaryDirectory() as t:
        os.makedirs(os.path.join(t, "unet"))
        for f in ["config.json", "diffusion_pytorch_model.fp16.safetensors"]:
            open(os.path.join(t, "unet", f), "w").close()
        os.makedirs(os.path.join(t, "notlisted"))
        open(os.path.join(t, "notlisted", "x.fp16.safetensors"), "w").close()
        mi = {"unet": ["diffusers", "UNet2DConditionModel"]}
        res["identify_variant_prefix_fp"] = plu._identify_model_variants(t, "fp", mi)
        res["identify_variant_fp16"] = plu._identify_model_variants(t, "fp16", mi)
        res["identify_variant_json"] = plu._identify_model_variants(t, "json", mi)
        open(os.path.join(t, "unet", "README"), "w").close()
        try:
            plu._identify_model_variants(t, "fp16", mi)
            res["identify_file_without_dot"] = "ok"
        except Exception as e:  # noqa: BLE001
            res["identify_file_without_dot"] = {"error": type(e).__name__, "message": str(e)}
    # name helpers
    res["diffusers_add_variant"] = {
        n: dhu._add_variant(n, "fp16") for n in
        ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
         "diffusion_pytorch_model.safetensors.index.json"]}
    res["transformers_add_variant"] = {
        n: tmu._add_variant(n, "fp16") for n in ["model.safetensors", "model.safetensors.index.json",
                                                 "pytorch_model.bin"]}
    res["optional_components"] = {
        c: list(getattr(diffusers, c)._optional_components)
        for c in ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"]}
    res["signature_keys"] = {
        c: dict(zip(["expected_modules", "optional_kwargs"],
                    diffusers.DiffusionPipeline._get_signature_keys(getattr(diffusers, c))))
        for c in ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"]}
    return res


def tokenizer_check():
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(os.path.join(FIX, "tiny-sd", "tokenizer"))
    prompts = ["a photo of a cat", "An astronaut riding a horse!"]
    return {"class": type(tok).__name__, "len": len(tok), "bos": tok.bos_token_id, "eos": tok.eos_token_id,
            "pad": tok.pad_token_id, "model_max_length": tok.model_max_length,
            "input_ids": {p: tok(p).input_ids for p in prompts}}


def from_pipe_cases():
    """Component sharing: from_pipe reuses the very same objects (the component cache rule).
    Each step is recorded right after it runs, because from_pipe(dtype=...) casts the SHARED
    modules in place (the source pipeline changes too)."""
    out = []

    def mods(p):
        return {k: dtype_name(v.dtype) for k, v in p.components.items() if isinstance(v, torch.nn.Module)}

    with collect() as logs:
        base = diffusers.StableDiffusionPipeline.from_pretrained(os.path.join(FIX, "tiny-sd"))
        steps = [("StableDiffusionImg2ImgPipeline.from_pipe(base)",
                  lambda: diffusers.StableDiffusionImg2ImgPipeline.from_pipe(base)),
                 ("AutoPipelineForImage2Image.from_pipe(base)",
                  lambda: diffusers.AutoPipelineForImage2Image.from_pipe(base)),
                 ("StableDiffusionImg2ImgPipeline.from_pipe(base, scheduler=Euler)",
                  lambda: diffusers.StableDiffusionImg2ImgPipeline.from_pipe(
                      base, scheduler=diffusers.EulerDiscreteScheduler.from_config(base.scheduler.config))),
                 ("StableDiffusionImg2ImgPipeline.from_pipe(base, dtype=float16)",
                  lambda: diffusers.StableDiffusionImg2ImgPipeline.from_pipe(base, dtype=torch.float16))]
        for name, make in steps:
            p = make()
            out.append({"how": name, "pipeline_class": type(p).__name__,
                        "same_object": {k: (v is base.components.get(k)) for k, v in p.components.items()
                                        if v is not None},
                        "scheduler_class": type(p.scheduler).__name__,
                        "dtypes": mods(p), "base_dtypes_after": mods(base),
                        "config": json.loads(clean(json.dumps(dict(p.config), default=str)))})
    return {"cases": out, "logs": logs["logs"], "warnings": logs["warnings"]}


def main():
    cases = []
    # A. every weight folder x variant x use_safetensors (DiffusionPipeline, dtype None)
    for folder in WEIGHT_FOLDERS:
        for variant in VARIANTS:
            for us in USE_SAFETENSORS:
                cases.append(load_case(folder, variant=variant, use_safetensors=us))
    # B. dtype handling on tiny-sd
    for variant in [None, "fp16"]:
        for dt in ["float16", "float32", "bfloat16", {"unet": "float16"},
                   {"unet": "float16", "default": "bfloat16"}, {"default": "float16", "vae": "float32"}]:
            cases.append(load_case("tiny-sd", variant=variant, dtype=dt))
    cases.append(load_case("tiny-sd", dtype="float16", dtype_kw="torch_dtype",
                           note="deprecated keyword name torch_dtype"))
    # C. loader classes
    for loader in ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                   "AutoPipelineForText2Image", "AutoPipelineForImage2Image", "AutoPipelineForInpainting"]:
        cases.append(load_case("tiny-sd", loader=loader))
    for loader in ["DiffusionPipeline", "StableDiffusionPipeline", "AutoPipelineForText2Image",
                   "AutoPipelineForImage2Image"]:
        cases.append(load_case("tiny-sd-img2img-class", loader=loader))
    cases.append(load_case("tiny-sd", loader="StableDiffusionImg2ImgPipeline", variant="fp16", dtype="float16"))
    # D. component overrides
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler

    def euler():
        return EulerDiscreteScheduler.from_config(PNDMScheduler.load_config(os.path.join(FIX, "tiny-sd", "scheduler")))

    def vae_obj():
        return AutoencoderKL.from_pretrained(os.path.join(FIX, "tiny-sd", "vae"), variant="fp16")

    ov = {
        "safety_checker=None": {"safety_checker": ("None", lambda: None)},
        "scheduler=Euler": {"scheduler": ("EulerDiscreteScheduler.from_config(tiny-sd/scheduler)", euler)},
        "vae=object": {"vae": ("AutoencoderKL.from_pretrained(tiny-sd/vae, variant=fp16)", vae_obj)},
        "unet=None": {"unet": ("None", lambda: None)},
        "unet=AutoencoderKL": {"unet": ("AutoencoderKL.from_pretrained(tiny-sd/vae, variant=fp16)", vae_obj)},
        "requires_safety_checker=True": {"requires_safety_checker": ("True", lambda: True)},
        "not_a_component=1": {"not_a_component": ("1", lambda: 1)},
    }
    for label, o in ov.items():
        cases.append(load_case("tiny-sd", loader="StableDiffusionPipeline", overrides=o, note=label))
    cases.append(load_case("tiny-sd", loader="StableDiffusionPipeline", variant="fp16", dtype="float16",
                           overrides=ov["scheduler=Euler"], note="scheduler=Euler with variant fp16 + float16"))
    cases.append(load_case("tiny-sd-null-unet", loader="StableDiffusionPipeline",
                           overrides={"unet": ("UNet2DConditionModel.from_pretrained(tiny-sd/unet)", lambda:
                                               diffusers.UNet2DConditionModel.from_pretrained(
                                                   os.path.join(FIX, "tiny-sd", "unet")))},
                           note="[null, null] unet supplied by the caller"))
    # E. broken / unusual model_index.json
    for folder in JSON_FOLDERS:
        cases.append(load_case(folder))
    for folder in ["tiny-sd-null-unet", "tiny-sd-missing-unet-key", "tiny-sd-unknown-pipeline-class",
                   "tiny-sd-requires-safety-checker", "tiny-sd-old-scheduler-config"]:
        cases.append(load_case(folder, loader="StableDiffusionPipeline"))
    cases.append(load_case("tiny-sd-missing-folder", variant="fp16"))
    cases.append(load_case("tiny-sd-missing-folder", loader="StableDiffusionPipeline", overrides=ov["vae=object"],
                           note="missing vae folder, vae supplied by the caller"))
    cases.append(load_case("tiny-sd-unknown-pipeline-class", loader="AutoPipelineForImage2Image"))

    for i, c in enumerate(cases):
        c["id"] = i
    files = file_checksums()
    # self-check of the file capture: where no narrowing cast happened, the loaded component's
    # checksum must equal the sum of the checksums of the files recorded for it
    checked = 0
    for c in cases:
        if not c["ok"]:
            continue
        for name, comp in c["components"].items():
            if not comp or not comp.get("files"):
                continue
            fs = [files[f"{c['folder']}/{f}"] for f in comp["files"]]
            if any(comp["dtype"] != "float32" for _ in [0]) or any(set(f["dtypes"]) - {"float32", "float16"} for f in fs):
                continue
            want = sum(f["sum"] for f in fs)
            scale = sum(f["abs_sum"] for f in fs)
            assert abs(comp["checksum"]["sum"] - want) <= 1e-9 * scale, (c["id"], name, comp["checksum"], want)
            assert comp["checksum"]["elements"] == sum(f["elements"] for f in fs), (c["id"], name)
            checked += 1
    assert checked > 50, checked

    result = {
        "generator": "tests/reference/check_pipeline_loading.py",
        "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "safetensors": safetensors.__version__},
        "checksum": "per component: over state_dict() of the loaded module; per file: over all tensors in it. "
                    "sum and abs_sum are float64 sums of every element of floating tensors; "
                    "elements counts all elements; tensors counts entries",
        "files": files,
        "file_selection": file_selection(),
        "probes": probes(),
        "tokenizer": tokenizer_check(),
        "from_pipe": from_pipe_cases(),
        "cases": cases,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(json.dumps(result, indent=1, sort_keys=False, ensure_ascii=False) + "\n")
    ok = sum(1 for c in cases if c["ok"])
    print(f"wrote {OUT}: {len(cases)} cases ({ok} load, {len(cases) - ok} raise), "
          f"{os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
