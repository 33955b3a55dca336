#!/usr/bin/env bash
# The hw3 profile at the course's sizes on the card a student has, pretended on a larger GPU (docs/rehearsal.md).
#
#   bench/rehearse_cards.sh REH CARD [hw3 run options ...]
#
# REH   a folder for the rehearsal: `hw3 rehearse` writes its COCO-like data and random weights at the real sizes
#       there once (p1 500 images, p2 train 10,000 / val 2,000: the course's sizes; ~16 GB, about 1.5 minutes)
# CARD  80, 24 or 12: configs/hw3.yaml, hw3-24gb.yaml or hw3-12gb.yaml, with PyTorch's allocator capped at
#       78, 22 or 10.5 GiB in every notebook's kernel (hw3 run --gpu-cap)
# The options go to `hw3 run` (--only NB ..., -p NAME VALUE, or -f another config that extends the card's).
# HW3_PYTHON picks the interpreter (default python3); REHEARSAL_SIZES replaces the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { sed -n 2,11p "$0" >&2; exit 2; }
reh=$1 card=$2
shift 2
case $card in
  80) config=configs/hw3.yaml cap=78 ;;
  24) config=configs/hw3-24gb.yaml cap=22 ;;
  12) config=configs/hw3-12gb.yaml cap=10.5 ;;
  *) echo "rehearse_cards: CARD is 80, 24 or 12, got '$card'" >&2; exit 2 ;;
esac
py=${HW3_PYTHON:-python3}
if [[ ! -f $reh/hw3_data/p2_data/train.json ]]; then
  # shellcheck disable=SC2086
  "$py" -m hw3lib rehearse --out "$reh" ${REHEARSAL_SIZES:---p1-images 500 --train-images 10000 --val-images 2000}
fi
echo "[rehearse_cards] $card GB card: $config, --gpu-cap $cap, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
HF_HOME=$reh/hf_home HF_HUB_OFFLINE=1 "$py" -m hw3lib run -f "$config" --gpu-cap "$cap" \
  -p data_root "$reh/hw3_data" --no-html "$@"
