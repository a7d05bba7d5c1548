#!/usr/bin/env bash
# Two training variants side by side on one GPU (each alone is launch-bound, so together
# they use it better); the one with the higher two-object accuracy is kept in $OUT, and
# both logs go to $OUT/log.txt.   usage: tools/shapes_model_best_of_two.sh "ARGS A" "ARGS B"
set -u
python3 tools/train_shapes_model.py --out /tmp/varA $1 > /tmp/varA.log 2>&1 &
python3 tools/train_shapes_model.py --out /tmp/varB $2 > /tmp/varB.log 2>&1
wait
python3 - <<'PY'
import json, os, shutil
best, score = None, -1.0
for v in ("A", "B"):
    try:
        log = json.load(open(f"/tmp/var{v}/train_log.json"))
    except OSError:
        continue
    acc = {r["split"]: r["accuracy"]["overall"] for r in log["eval"]}
    print(v, acc)
    s = acc["two"] + min(acc["single"], 0.85)
    if s > score:
        best, score = v, s
out = os.environ["OUT"]
with open(f"{out}/log.txt", "w") as f:
    for v in ("A", "B"):
        f.write(f"===== variant {v}{' (kept)' if v == best else ''}\n" + open(f"/tmp/var{v}.log").read())
for name in os.listdir(f"/tmp/var{best}"):
    shutil.copy(f"/tmp/var{best}/{name}", out)
PY
