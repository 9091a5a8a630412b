"""How much of a motion adapter's direction comes from the seed rather than the prompt.

Reads evaluate_motion.py --json outputs made on the same prompts and seeds (e.g. --every 5 for
several adapters) and prints, for every pair of runs, how often the direction found in a clip is the
same, next to how often each run matches its prompts. Runs that agree with each other far more than
with the prompts follow the initial noise (session 4: 40-70% between adapters trained from the
shipped one, 15-40% with the prompts).

    python3 agreement.py run1.json run2.json ...
"""
import argparse
import itertools
import json
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="evaluate_motion.py --json files (same prompts, same order)")
    a = ap.parse_args()
    runs = {}
    for path in a.runs:
        d = json.load(open(path))
        runs[os.path.basename(path)] = d["per_clip"]
    names = list(runs)
    prompts = [c["prompt"] for c in runs[names[0]]]
    for n in names:
        if [c["prompt"] for c in runs[n]] != prompts:
            raise SystemExit(f"{n}: not the same prompts as {names[0]}")
    found = {n: [c["found"]["direction"] for c in runs[n]] for n in names}
    w = max(len(n) for n in names)
    print(f"{'':{w}}  prompt  " + "  ".join(f"{i:>5}" for i in range(len(names))))
    for i, n in enumerate(names):
        own = sum(c["direction"] for c in runs[n]) / len(prompts)
        row = [sum(x == y for x, y in zip(found[n], found[m])) / len(prompts) for m in names]
        print(f"{n:{w}}  {own:6.2f}  " + "  ".join(f"{v:5.2f}" for v in row) + f"   ({i})")
    pairs = [sum(x == y for x, y in zip(found[p], found[q])) / len(prompts) for p, q in itertools.combinations(names, 2)]
    if pairs:
        print(f"between runs: mean {sum(pairs) / len(pairs):.2f}, min {min(pairs):.2f}, max {max(pairs):.2f}")


if __name__ == "__main__":
    main()
