#!/usr/bin/env bash
# The GPU fast paths on the hw3 profile's own path, from a rehearsal (random weights at the real sizes, COCO-like
# data, the Hugging Face cache layout, offline):
#   - CLIPScore's image batches, fast path against Pillow, bit for bit (bench/clip_paths_agree.py);
#   - `hw3 evaluate` on 2,000 p2 val captions (twice), then with a truncated JPEG (one line naming it, no traceback);
#   - `hw3 llava-caption` by hub id from the cache with --cache static+graphs --liger on 300 p1 images.
# Usage (GPU machine, hw3lib importable): bench/rehearse_fast_paths.sh OUT_DIR     (about 5 minutes, 16 GB of disk)
set -u
out=${1:?usage: bench/rehearse_fast_paths.sh OUT_DIR}
mkdir -p "$out"
R=$(mktemp -d)
L=$out/log.txt
t0=$(date +%s)
python -m hw3lib rehearse --out "$R" --only data clip --p1-images 300 --train-images 8 --val-images 2000 \
  > "$out/rehearse_data.log" 2>&1
echo "rehearse data+clip rc $? in $(( $(date +%s) - t0 ))s" | tee -a "$L"
export HF_HOME=$R/hf_home HF_HUB_OFFLINE=1
V=$R/hw3_data/p2_data
python bench/clip_paths_agree.py "$V/images/val" --json "$out/clip_paths.json" > "$out/clip_paths.log" 2>&1
echo "clip paths rc $?" | tee -a "$L"
python - "$V/val.json" "$R/pred.json" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))
names = {i["id"]: i["file_name"].rsplit(".", 1)[0] for i in a["images"]}
pred = {}
for c in a["annotations"]:
    pred.setdefault(names[c["image_id"]], c["caption"])
json.dump(pred, open(sys.argv[2], "w"))
PY
for i in 1 2; do
  /usr/bin/time -f "hw3 evaluate: %e s wall" python -m hw3lib evaluate --pred "$R/pred.json" \
    --annotation "$V/val.json" --images "$V/images/val" > "$out/evaluate_$i.log" 2>&1
  echo "evaluate rc $?" | tee -a "$L"; tail -4 "$out/evaluate_$i.log" | tee -a "$L"
done
f=$(ls "$V/images/val" | head -1)
cp "$V/images/val/$f" "$R/keep.jpg"
head -c 3000 "$R/keep.jpg" > "$V/images/val/$f"
python -m hw3lib evaluate --pred "$R/pred.json" --annotation "$V/val.json" --images "$V/images/val" \
  > "$out/evaluate_corrupt.log" 2>&1
echo "evaluate with a truncated JPEG rc $?" | tee -a "$L"; tail -3 "$out/evaluate_corrupt.log" | tee -a "$L"
cp "$R/keep.jpg" "$V/images/val/$f"
t0=$(date +%s)
python -m hw3lib rehearse --out "$R" --only llava > "$out/rehearse_llava.log" 2>&1
echo "rehearse llava rc $? in $(( $(date +%s) - t0 ))s" | tee -a "$L"
/usr/bin/time -f "llava-caption: %e s wall" python -m hw3lib llava-caption "$R/hw3_data/p1_data/images/val" \
  "$out/p1_graphs_liger.json" --batch-size 64 --cache static+graphs --liger --num-workers 8 \
  > "$out/llava_caption.log" 2>&1
echo "llava-caption rc $?" | tee -a "$L"; tail -3 "$out/llava_caption.log" | tee -a "$L"
rm -rf "$R"
