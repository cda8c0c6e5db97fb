# Shared by the bench scripts (source it): the evaluation heads of the real-checkpoint tables
# and the loop that writes and runs one pipeline per recipe.

# cut_heads OUT SHARED [KB]: the first KB thousand bytes (default 300) of wikitext2's and ptb's
# test files and of the c4_eval text (documents joined by blank lines), as
# OUT/{wiki,ptb,c4}-head${KB}k.txt.
cut_heads() {
  python3 - "$1" "$2" "${3:-300}" <<'PY'
import json, sys
out, S, kb = sys.argv[1], sys.argv[2], int(sys.argv[3])
n = kb * 1000
for name, path in [("wiki", "wikitext2/wiki.test.raw"), ("ptb", "ptb/ptb.test.txt")]:
    raw = open(f"{S}/data/eval/{path}", "rb").read()[:n]
    open(f"{out}/{name}-head{kb}k.txt", "wb").write(raw.decode("utf-8", "ignore").encode())
docs = [json.loads(l)["text"] for l in open(f"{S}/data/eval/c4/c4_eval.jsonl") if l.strip()]
t = "\n\n".join(docs).encode()[:n]
open(f"{out}/c4-head{kb}k.txt", "wb").write(t.decode("utf-8", "ignore").encode())
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

# print_table OUT NAME…: one Markdown row per finished run (report.json present): perplexity
# per evaluated set (wikitext2, ptb, c4 order) and their mean, each pass's own seconds summed
# over its records, compress seconds.
print_table() {
  python3 - "$@" <<'PY'
import json, sys, os
out, names = sys.argv[1], sys.argv[2:]
rows = []
for n in names:
    p = os.path.join(out, n, "report.json")
    if not os.path.exists(p):
        continue
    r = json.load(open(p))
    ev = r["eval"]
    order = sorted(ev, key=lambda k: 0 if "wiki" in k else 1 if "ptb" in k else 2)
    per = {}
    for rec in r.get("layers", []):
        per[rec["pass"]] = per.get(rec["pass"], 0.0) + rec["seconds"]
    ppl = [ev[k]["after"]["perplexity"] for k in order]
    rows.append((n, order, ppl, per, r["timing"]["compress_seconds"]))
if rows:
    print("| recipe | " + " | ".join(rows[0][1]) + " | mean | pass s (own records) | compress s |")
    print("|---|" + "---:|" * (len(rows[0][1]) + 3))
for n, _, ppl, per, c in rows:
    print(f"| {n} | " + " | ".join(f"{v:.2f}" for v in ppl) + f" | {sum(ppl)/len(ppl):.2f} | "
          + ", ".join(f"{k} {v:.1f}" for k, v in per.items()) + f" | {c:.1f} |")
PY
}
