#!/usr/bin/env python3
"""Cache compatibility with Python's huggingface_hub, both ways.

Starts the test Hub (the `hubserver` program built from tests/core/hubserver.c)
on 127.0.0.1 and, against it:

1. huggingface_hub / diffusers fill a cache: DiffusionPipeline.download of the
   tiny pipeline, hf_hub_download at a tag and at refs/pr/1, a missing file
   (-> .no_exist), a one-part repo id.  The tree is committed as
   tests/fixtures/hub-cache/ (lock files dropped) with
   tests/fixtures/hub/hf-cache.json (every cached file with its revision,
   commit and sha256, as huggingface_hub sees them).  test-hub loads it
   offline and checks it against that JSON.
2. Our client fills a cache (`test-hub --fetch`), then huggingface_hub reads
   it: try_to_load_from_cache for every file (content compared with the
   served file), snapshot_download(local_files_only=True),
   get_cached_repo_tree, and diffusers' DiffusionPipeline.download with
   local_files_only=True.  Result: tests/fixtures/hub/hf-reads-ours.json.
3. Which files diffusers' DiffusionPipeline.download fetches for a few
   settings (variant, use_safetensors): tests/fixtures/hub/diffusers-download.json
   (what the loader's file filter must reproduce).
4. Python fnmatch on the patterns diffusers uses: tests/fixtures/hub/fnmatch.json.

Only 127.0.0.1 / localhost are contacted.

    python3 tests/reference/make_hf_cache.py BUILD_DIR
(BUILD_DIR: a meson build folder with tests/core/hubserver and tests/core/test-hub)
"""
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.normpath(os.path.join(HERE, "..", "fixtures"))
HUBFIX = os.path.join(FIX, "hub")
REPO = "diffuse-test/tiny-pipe"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def start_server(hubserver):
    proc = subprocess.Popen([hubserver, os.path.join(HUBFIX, "repos.json")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    info = {}
    for _ in range(3):
        k, v = proc.stdout.readline().split()
        info[k] = v
    return proc, info


def served_path(repo, revision, path):
    """The fixture file the server serves for (repo, revision, path)."""
    manifest = json.load(open(os.path.join(HUBFIX, "repos.json")))
    for r in manifest["repos"]:
        if r["id"] == repo:
            return os.path.join(HUBFIX, r["revisions"][revision], path)
    raise KeyError(repo)


def cached_files(cache):
    """(repo, revision, path, commit, sha256) for every ref'd snapshot file."""
    out = []
    for folder in sorted(os.listdir(cache)):
        if not folder.startswith("models--"):
            continue
        repo = folder[len("models--"):].replace("--", "/")
        refs = os.path.join(cache, folder, "refs")
        for root, _, files in os.walk(refs):
            for name in files:
                ref_path = os.path.join(root, name)
                revision = os.path.relpath(ref_path, refs)
                commit = open(ref_path).read()
                snap = os.path.join(cache, folder, "snapshots", commit)
                for sroot, _, sfiles in os.walk(snap):
                    for f in sfiles:
                        p = os.path.join(sroot, f)
                        rel = os.path.relpath(p, snap)
                        out.append({"repo": repo, "revision": revision, "path": rel, "commit": commit,
                                    "sha256": sha256(p)})
    out.sort(key=lambda e: (e["repo"], e["revision"], e["path"]))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build = sys.argv[1]
    hubserver = os.path.join(build, "tests", "core", "hubserver")
    fetch = os.path.join(build, "tests", "core", "test-hub")
    proc, info = start_server(hubserver)
    os.environ["HF_ENDPOINT"] = info["endpoint"]
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HOME"):
        os.environ.pop(k, None)
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-")  # no token file, no user cache
    # imported only now: huggingface_hub reads HF_ENDPOINT at import
    import huggingface_hub
    from huggingface_hub import (hf_hub_download, snapshot_download, try_to_load_from_cache,
                                 get_cached_repo_tree)
    from huggingface_hub.errors import EntryNotFoundError
    import diffusers
    from diffusers import DiffusionPipeline

    try:
        # ---- 1. a cache made by huggingface_hub / diffusers ----
        cache = os.path.join(FIX, "hub-cache")
        shutil.rmtree(cache, ignore_errors=True)
        folder = DiffusionPipeline.download(REPO, cache_dir=cache)
        hf_hub_download(REPO, "model_index.json", revision="v1.0", cache_dir=cache)
        hf_hub_download(REPO, "unet/extra.txt", revision="refs/pr/1", cache_dir=cache)
        hf_hub_download("single-name-repo", "config.json", cache_dir=cache)
        try:
            hf_hub_download(REPO, "unet/missing.json", cache_dir=cache)
            raise SystemExit("missing file was found")
        except EntryNotFoundError:
            pass
        shutil.rmtree(os.path.join(cache, ".locks"), ignore_errors=True)
        main_commit = open(os.path.join(cache, "models--diffuse-test--tiny-pipe", "refs", "main")).read()
        trees = os.path.join(cache, "models--diffuse-test--tiny-pipe", "trees", main_commit + ".json")
        main_tree_files = len(json.load(open(trees))["files"])
        files = cached_files(cache)
        for e in files:  # what huggingface_hub cached is what the server serves
            assert e["sha256"] == sha256(served_path(e["repo"], e["revision"], e["path"])), e
        no_exist = [{"repo": REPO, "revision": "main", "path": "unet/missing.json"}]
        assert try_to_load_from_cache(REPO, "unet/missing.json", cache_dir=cache) is huggingface_hub._CACHED_NO_EXIST
        with open(os.path.join(HUBFIX, "hf-cache.json"), "w") as f:
            json.dump({"generated_by": "huggingface_hub %s, diffusers %s" % (huggingface_hub.__version__,
                                                                          diffusers.__version__),
                       "diffusers_download_folder": os.path.relpath(folder, cache),
                       "main_tree_files": main_tree_files, "files": files, "no_exist": no_exist},
                      f, indent=1, sort_keys=True)

        # ---- 2. huggingface_hub reads a cache made by our client ----
        ours = tempfile.mkdtemp(prefix="diffuse-ours-")
        try:
            def run_fetch(repo, rev, *paths):
                out = subprocess.run([fetch, "--fetch", info["endpoint"], ours, repo, rev, *paths],
                                     capture_output=True, text=True, timeout=120)
                if out.returncode != 0:
                    raise SystemExit("test-hub --fetch failed: " + out.stderr)
                return out.stdout.strip()
            our_folder = run_fetch(REPO, "main")
            run_fetch(REPO, "v1.0", "model_index.json", "unet/diffusion_pytorch_model.safetensors")
            run_fetch(REPO, "refs/pr/1", "unet/extra.txt")
            checks = []
            ok = True
            for e in cached_files(ours):
                got = try_to_load_from_cache(e["repo"], e["path"], cache_dir=ours, revision=e["revision"])
                good = isinstance(got, str) and sha256(got) == sha256(served_path(e["repo"], e["revision"], e["path"]))
                ok &= good
                checks.append({"repo": e["repo"], "revision": e["revision"], "path": e["path"], "ok": good})
            snap = snapshot_download(REPO, cache_dir=ours, local_files_only=True)
            snap_ok = os.path.realpath(snap) == os.path.realpath(our_folder)
            tree = sorted(f.path for f in get_cached_repo_tree(REPO, cache_dir=ours))
            served = sorted(os.path.relpath(os.path.join(r, n), served_path(REPO, "main", ""))
                            for r, _, ns in os.walk(served_path(REPO, "main", "")) for n in ns)
            tree_ok = tree == served
            dl = DiffusionPipeline.download(REPO, cache_dir=ours, local_files_only=True)
            dl_ok = os.path.realpath(dl) == os.path.realpath(our_folder)
            pr = hf_hub_download(REPO, "unet/extra.txt", revision="refs/pr/1", cache_dir=ours, local_files_only=True)
            pr_ok = open(pr).read() == "added in the pull request\n"
            ok = ok and snap_ok and tree_ok and dl_ok and pr_ok
            with open(os.path.join(HUBFIX, "hf-reads-ours.json"), "w") as f:
                json.dump({"generated_by": "huggingface_hub %s, diffusers %s" % (huggingface_hub.__version__,
                                                                              diffusers.__version__),
                           "all_ok": bool(ok), "checked_files": len(checks), "main_commit": main_commit,
                           "snapshot_download_local_files_only": snap_ok, "get_cached_repo_tree": tree_ok,
                           "diffusers_download_local_files_only": dl_ok, "pr_ref": pr_ok,
                           "try_to_load_from_cache": checks}, f, indent=1, sort_keys=True)
            if not ok:
                raise SystemExit("huggingface_hub could not read our cache: see hf-reads-ours.json")
        finally:
            shutil.rmtree(ours, ignore_errors=True)

        # ---- 3. what DiffusionPipeline.download fetches ----
        settings = [{}, {"variant": "fp16"}, {"use_safetensors": False}, {"safety_checker": None},
                    {"variant": "fp16", "use_safetensors": True}]
        downloads = []
        for kw in settings:
            tmp = tempfile.mkdtemp(prefix="diffusers-dl-")
            try:
                folder = DiffusionPipeline.download(REPO, cache_dir=tmp, **kw)
                got = sorted(os.path.relpath(os.path.join(r, n), folder) for r, _, ns in os.walk(folder) for n in ns)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            downloads.append({"kwargs": {k: v for k, v in kw.items()}, "files": got})
        with open(os.path.join(HUBFIX, "diffusers-download.json"), "w") as f:
            json.dump({"generated_by": "diffusers %s" % diffusers.__version__, "repo": REPO,
                       "repo_files": sorted(os.path.relpath(os.path.join(r, n), served_path(REPO, "main", ""))
                                            for r, _, ns in os.walk(served_path(REPO, "main", "")) for n in ns),
                       "downloads": downloads}, f, indent=1, sort_keys=True)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)

    # ---- 4. fnmatch ----
    patterns = ["*.bin", "*.safetensors", "unet/*", "*.fp16.*", "*/diffusion_pytorch_model.safetensors",
                "*.index.*json", "unet/diffusion_pytorch_model.bin.index.*json", "[abc]*", "[!a]*", "te?t",
                "a[", "[]]x", "*", "", "[a-c]x", "*.msgpack", "text_encoder/*", "*/*.onnx", "**/x", "?",
                "*[0-9]-of-*.safetensors", "unet/*.fp16.safetensors", "[^a]x", "a*b*c"]
    names = ["unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "model_index.json", "text_encoder/model.safetensors",
             "vae/sub/deep.safetensors", "unet/diffusion_pytorch_model.bin.index.json",
             "unet/diffusion_pytorch_model.bin.index.fp16.json", "abc", "bcd", "test", "tesst", "a[", "]x", "bx",
             "dx", "", "x", "a/x", "unet/model-00001-of-00002.safetensors", "^x", "aXbYc", "acb", "/x"]
    table = [[p, n, fnmatch.fnmatchcase(n, p)] for p in patterns for n in names]
    with open(os.path.join(HUBFIX, "fnmatch.json"), "w") as f:
        json.dump(table, f, indent=0)
    print("wrote", os.path.join(FIX, "hub-cache"), "and", HUBFIX)


if __name__ == "__main__":
    main()
