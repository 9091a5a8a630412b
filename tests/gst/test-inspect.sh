#!/bin/sh
# gst-inspect-1.0 documents the plugin and every property of both elements
# with its range (numbers) and default.  (Note: "gst-inspect-1.0 diffuse"
# names gst-plugins-bad's element "diffuse" when that is installed; the
# plugin is inspected with --plugin.)
set -u
command -v gst-inspect-1.0 >/dev/null 2>&1 || { echo "gst-inspect-1.0 not installed"; exit 77; }
fail=0
out=$(gst-inspect-1.0 --plugin diffuse 2>&1) || { echo "$out"; echo "FAIL: plugin diffuse not found"; exit 1; }
for el in diffusetext2img diffuseimg2img; do
  echo "$out" | grep -q "$el" || { echo "FAIL: plugin does not list $el"; fail=1; }
done

check_element () {
  el=$1; shift
  txt=$(gst-inspect-1.0 "$el" 2>&1) || { echo "$txt"; echo "FAIL: $el not found"; fail=1; return; }
  for p in "$@"; do
    # the property's block: its line up to the next property
    block=$(echo "$txt" | awk -v p="$p" '
      $0 ~ "^  "p" +:" {on=1; print; next}
      on && $0 ~ "^  [a-z][a-z0-9-]* +:" {exit}
      on {print}')
    if [ -z "$block" ]; then echo "FAIL: $el: property $p missing"; fail=1; continue; fi
    echo "$block" | grep -q "Default" || { echo "FAIL: $el: $p has no default"; fail=1; }
    if echo "$block" | grep -qE "(Integer|Double|Float|Unsigned)"; then
      echo "$block" | grep -q "Range" || { echo "FAIL: $el: $p has no range"; fail=1; }
    fi
    echo "$block" | sed -n '1p' | grep -qE ":  *[A-Z]" || { echo "FAIL: $el: $p has no description"; fail=1; }
  done
}

common="model revision variant dtype device scheduler prompt negative-prompt num-inference-steps guidance-scale seed seed-increment clip-skip resident-bytes load-count"
check_element diffusetext2img $common is-live num-buffers
check_element diffuseimg2img $common strength qos
# the enum lists its values
gst-inspect-1.0 diffusetext2img | grep -q '(1): float16' || { echo "FAIL: dtype values not listed"; fail=1; }
gst-inspect-1.0 diffuseimg2img | grep -A3 '^  strength' | grep -q 'Range: *0 - *1 Default: *0.8' || {
  echo "FAIL: strength range/default"; fail=1; }
[ $fail -eq 0 ] && echo "ok: every property documented"
exit $fail
