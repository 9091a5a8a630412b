#!/bin/sh
# The `diffuse` command line: generate (one prompt, a prompts file), animate,
# and its errors.  $1: the diffuse executable, $2: the tests/fixtures folder.
set -u
DIFFUSE=$1
FIX=$2
MODEL="$FIX/pipelines/tiny-sd"
ADAPTER="$FIX/animatediff/a"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0
png_ok () {  # file width height
  sig=$(od -An -tx1 -N8 "$1" 2>/dev/null | tr -d ' \n')
  [ "$sig" = "89504e470d0a1a0a" ] || { echo "FAIL: $1 is not a PNG ($sig)"; fail=1; return; }
  dims=$(od -An -tu1 -j16 -N8 "$1" | tr -s ' ' | sed 's/^ //;s/ $//')
  [ "$dims" = "0 0 0 $2 0 0 0 $3" ] || { echo "FAIL: $1 IHDR size bytes '$dims', want $2x$3"; fail=1; }
}

# 1. one prompt
"$DIFFUSE" generate "$MODEL" --prompt "a red circle" --steps 2 --seed 4 --output "$TMP/one.png" >/dev/null ||
  { echo "FAIL: generate"; fail=1; }
png_ok "$TMP/one.png" 16 16

# 2. a prompts file: NNN.png with seed --seed + index; the second equals a single run with its seed
printf '["a red circle", "a blue square", "a green triangle"]' > "$TMP/p.json"
"$DIFFUSE" generate "$MODEL" --prompts-file "$TMP/p.json" --output-dir "$TMP/batch" --steps 2 --seed 3 >/dev/null ||
  { echo "FAIL: generate --prompts-file"; fail=1; }
for i in 000 001 002; do png_ok "$TMP/batch/$i.png" 16 16; done
"$DIFFUSE" generate "$MODEL" --prompt "a blue square" --steps 2 --seed 4 --output "$TMP/blue.png" >/dev/null
cmp -s "$TMP/batch/001.png" "$TMP/blue.png" || { echo "FAIL: prompt 1 of the file (seed 3+1) differs from a single run with seed 4"; fail=1; }
cmp -s "$TMP/batch/001.png" "$TMP/one.png" && { echo "FAIL: another prompt, same seed, gave the same image"; fail=1; }

# 3. errors: not an array, a non-string element, --prompts-file without --output-dir
printf '{"a": 1}' > "$TMP/bad.json"
err=$("$DIFFUSE" generate "$MODEL" --prompts-file "$TMP/bad.json" --output-dir "$TMP/x" 2>&1)
[ $? -eq 1 ] && echo "$err" | grep -q "bad.json: expected a JSON array" || { echo "FAIL: object as prompts file: $err"; fail=1; }
printf '["ok", 3]' > "$TMP/bad2.json"
err=$("$DIFFUSE" generate "$MODEL" --prompts-file "$TMP/bad2.json" --output-dir "$TMP/x" 2>&1)
[ $? -eq 1 ] && echo "$err" | grep -q "element 1 is not a string" || { echo "FAIL: number in prompts file: $err"; fail=1; }
err=$("$DIFFUSE" generate "$MODEL" --prompts-file "$TMP/p.json" 2>&1)
[ $? -eq 2 ] && echo "$err" | grep -q "needs --output-dir" || { echo "FAIL: --prompts-file without --output-dir: $err"; fail=1; }

# 4. animate: 8 frames FF.png; with a prompts file NNN_FF.png; errors
"$DIFFUSE" animate "$MODEL" --motion-adapter "$ADAPTER" --prompt "a red circle" --frames 8 --steps 2 \
  --output-dir "$TMP/clip" >/dev/null || { echo "FAIL: animate"; fail=1; }
n=$(ls "$TMP/clip" 2>/dev/null | grep -c '^0[0-7]\.png$')
[ "$n" = 8 ] || { echo "FAIL: animate wrote $n of 8 frames"; fail=1; }
png_ok "$TMP/clip/07.png" 16 16
printf '["a red circle", "a blue square"]' > "$TMP/p2.json"
"$DIFFUSE" animate "$MODEL" --motion-adapter "$ADAPTER" --prompts-file "$TMP/p2.json" --frames 8 --steps 2 \
  --seed 0 --output-dir "$TMP/clips" >/dev/null || { echo "FAIL: animate --prompts-file"; fail=1; }
[ -f "$TMP/clips/001_07.png" ] || { echo "FAIL: animate --prompts-file: no 001_07.png"; fail=1; }
cmp -s "$TMP/clips/000_03.png" "$TMP/clip/03.png" || { echo "FAIL: clip 0 of the file differs from the single run"; fail=1; }
err=$("$DIFFUSE" animate "$MODEL" --prompt x 2>&1)
[ $? -eq 2 ] && echo "$err" | grep -q "needs --motion-adapter" || { echo "FAIL: animate without adapter: $err"; fail=1; }
err=$("$DIFFUSE" animate "$MODEL" --motion-adapter "$TMP/nonexistent" --prompt x --output-dir "$TMP/y" 2>&1)
[ $? -eq 1 ] && echo "$err" | grep -q "nonexistent" || { echo "FAIL: missing adapter: $err"; fail=1; }

# an AnimateDiff pipeline folder saved by diffusers: no --motion-adapter needed
"$DIFFUSE" animate "$FIX/animatediff/saved-pipeline" --prompt "a red circle" --frames 8 --steps 2 \
  --output-dir "$TMP/saved" >/dev/null || { echo "FAIL: animate on an AnimateDiff folder"; fail=1; }
[ -f "$TMP/saved/07.png" ] || { echo "FAIL: animate on an AnimateDiff folder: no 07.png"; fail=1; }

[ $fail = 0 ] && echo "PASS: cli"
exit $fail
