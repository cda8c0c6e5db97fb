# Shared by the bench scripts (source it): the evaluation heads of the real-checkpoint tables
# and the loop that writes and runs one pipeline per recipe.

# cut_heads OUT SHARED: the first 300,000 bytes of wikitext2's and ptb's test files and of the
# c4_eval text (documents joined by blank lines), as OUT/{wiki,ptb,c4}-head300k.txt.
cut_heads() {
  python3 - "$1" "$2" <<'PY'
import json, sys
out, S = sys.argv[1], sys.argv[2]
for name, path in [("wiki", "wikitext2/wiki.test.raw"), ("ptb", "ptb/ptb.test.txt")]:
    raw = open(f"{S}/data/eval/{path}", "rb").read()[:300000]
    open(f"{out}/{name}-head300k.txt", "wb").write(raw.decode("utf-8", "ignore").encode())
docs = [json.loads(l)["text"] for l in open(f"{S}/data/eval/c4/c4_eval.jsonl") if l.strip()]
t = "\n\n".join(docs).encode()[:300000]
open(f"{out}/c4-head300k.txt", "wb").write(t.decode("utf-8", "ignore").encode())
PY
}

# run_recipes [NAME…]: for each "name|pass" of the array `recipes` (all, or only the names
# given), write $out/NAME.yaml ($model, $calib, the pass, compressed-tensors, eval on $sets;
# `dense` has no passes) and run it with $bin under /usr/bin/time, skipping finished runs.
run_recipes() {
  local rec name pass
  for rec in "${recipes[@]}"; do
    name=${rec%%|*}; pass=${rec#*|}
    if [ $# -gt 0 ] && [[ ! " $* " =~ " $name " ]]; then continue; fi
    [ -f "$out/$name/report.json" ] && { echo "$name: done"; continue; }
    if [ "$name" = dense ]; then
      printf 'model: %s\noutput: %s\npasses: []\neval: {datasets: %s, seq_len: 512, baseline: false}\n' \
        "$model" "$out/dense" "$sets" > "$out/dense.yaml"
    else
      printf 'model: %s\noutput: %s\n%s\npasses:\n  - %b\nexport: {format: compressed-tensors}\neval: {datasets: %s, seq_len: 512, baseline: false}\n' \
        "$model" "$out/$name" "$calib" "$pass" "$sets" > "$out/$name.yaml"
    fi
    /usr/bin/time -f "%e s wall, %U s user, %S s sys, %M KB max RSS" -o "$out/$name.time" \
      $bin "$out/$name.yaml" --overwrite --quiet || { echo "$name: FAILED"; continue; }
    echo "$name: $(cat "$out/$name.time")"
  done
}
