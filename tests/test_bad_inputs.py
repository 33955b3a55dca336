"""Every mistake gets a clear answer: a corpus of bad (and odd but valid) inputs across the ``hw3`` commands and
the config file. Each case runs ``hw3`` as ``python -m hw3lib`` would, and must end with exit status 2 (or 0
and a warning, for odd but valid input), no traceback, and one line that names the flag or the file.

The cases run once per module, in two worker processes that share them (``tests/cli_batch.py``: torch and
transformers imported once per worker, not once per case); each test then checks one of them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hw3lib.demo.world import WorldConfig, build_world

ROOT = Path(__file__).resolve().parents[1]
UNWRITABLE = "/proc/hw3-cannot-write-here"  # refused even to root, unlike a chmod'ed folder
DEMO = ROOT / "data/demo/models"

# (name, arguments, expected exit status, words the message must contain); {placeholders} are sandbox paths
CASES = [
    # --------------------------------------------------------------------------------------------- evaluate
    ("eval-pred-missing", "evaluate --pred {s}/nope.json --annotation {ann} --images {val_images} {clip}", 2,
     ["nope.json", "not found"]),
    ("eval-pred-is-a-folder", "evaluate --pred {s} --annotation {ann} --images {val_images} {clip}", 2,
     ["is a folder"]),
    ("eval-pred-not-json", "evaluate --pred {s}/garbage.json --annotation {ann} --images {val_images} {clip}", 2,
     ["garbage.json", "not valid JSON"]),
    ("eval-pred-a-list", "evaluate --pred {s}/list.json --annotation {ann} --images {val_images} {clip}", 2,
     ["list.json", "JSON object"]),
    ("eval-pred-not-strings", "evaluate --pred {s}/numbers.json --annotation {ann} --images {val_images} {clip}", 2,
     ["numbers.json", "must be a string"]),
    ("eval-pred-wrong-keys", "evaluate --pred {s}/wrong_keys.json --annotation {ann} --images {val_images} {clip}",
     2, ["wrong_keys.json", "keys differ"]),
    ("eval-ann-missing", "evaluate --pred {pred} --annotation {s}/none.json --images {val_images} {clip}", 2,
     ["none.json", "not found"]),
    ("eval-ann-not-coco", "evaluate --pred {pred} --annotation {s}/list.json --images {val_images} {clip}", 2,
     ["list.json", "not a COCO captions file"]),
    ("eval-ann-list-ids", "evaluate --pred {pred} --annotation {s}/list_ids.json --images {val_images} {clip}", 2,
     ["list_ids.json", "images[0]", "'id'"]),
    ("eval-ann-empty", "evaluate --pred {s}/empty_pred.json --annotation {s}/empty_ann.json --images {val_images} "
     "{clip}", 2, ["empty_ann.json", "'images' is empty"]),
    ("eval-ann-caption-not-string", "evaluate --pred {pred} --annotation {s}/caption_int.json --images "
     "{val_images} {clip}", 2, ["caption_int.json", "annotations[0]", "'caption'"]),
    ("eval-ann-unknown-image", "evaluate --pred {pred} --annotation {s}/orphan.json --images {val_images} {clip}", 2,
     ["orphan.json", "not in 'images'"]),
    ("eval-images-missing", "evaluate --pred {pred} --annotation {ann} --images {s}/no_images {clip}", 2,
     ["no_images"]),
    ("eval-corrupt-image", "evaluate --pred {pred} --annotation {ann} --images {corrupt_val} {clip}", 2,
     ["corrupt or truncated image", ".jpg"]),
    ("eval-batch-size-0", "evaluate --pred {pred} --annotation {ann} --images {val_images} --batch-size 0", 2,
     ["--batch-size", "at least 1"]),
    ("eval-batch-size-text", "evaluate --pred {pred} --annotation {ann} --images {val_images} --batch-size x", 2,
     ["--batch-size", "whole number"]),
    ("eval-clip-folder-missing", "evaluate --pred {pred} --annotation {ann} --images {val_images} "
     "--clip-model ./no/such/clip", 2, ["no/such/clip", "CLIP folder not found"]),
    ("eval-clip-unknown-name", "evaluate --pred {pred} --annotation {ann} --images {val_images} "
     "--clip-model ViT-Z-99", 2, ["ViT-Z-99", "not an open_clip model name"]),
    ("eval-clip-unknown-tag", "evaluate --pred {pred} --annotation {ann} --images {val_images} "
     "--clip-model ViT-B-32-quickgelu --clip-pretrained bogus_tag", 2, ["bogus_tag", "pretrained tag"]),
    ("eval-empty-captions-warn", "evaluate --pred {s}/blank.json --annotation {ann} --images {val_images} {clip}", 0,
     ["warning", "blank.json", "captions are empty"]),
    # ------------------------------------------------------------------------------------------------ train
    ("train-epochs-0", "train --out {s}/r --epochs 0", 2, ["--epochs", "at least 1"]),
    ("train-epochs-negative", "train --out {s}/r --epochs -2", 2, ["--epochs", "at least 1"]),
    ("train-lora-r-0", "train --out {s}/r --lora-r 0", 2, ["--lora-r", "at least 1"]),
    ("train-lora-r-negative", "train --out {s}/r --lora-r -4", 2, ["--lora-r", "at least 1"]),
    ("train-lora-dropout-1", "train --out {s}/r --lora-dropout 1", 2, ["--lora-dropout", "[0, 1)"]),
    ("train-batch-size-0", "train --out {s}/r --batch-size 0", 2, ["--batch-size", "at least 1"]),
    ("train-num-beams-0", "train --out {s}/r --num-beams 0", 2, ["--num-beams", "at least 1"]),
    ("train-max-new-tokens-0", "train --out {s}/r --max-new-tokens 0", 2, ["--max-new-tokens", "at least 1"]),
    ("train-max-train-images-negative", "train --out {s}/r --max-train-images -1", 2,
     ["--max-train-images", "at least 1"]),
    ("train-max-train-images-0", "train --out {s}/r --max-train-images 0", 2, ["--max-train-images", "at least 1"]),
    ("train-eval-images-0", "train --out {s}/r --eval-images 0", 2, ["--eval-images", "at least 1"]),
    ("train-lr-0", "train --out {s}/r --lr 0", 2, ["--lr", "(0, inf)"]),
    ("train-lr-text", "train --out {s}/r --lr fast", 2, ["--lr", "number"]),
    ("train-pool-100", "train --data-root {root} --out {s}/r_pool {train_demo} --pool 100", 2,
     ["pool 100", "12 x 12", "[1, 2, 3, 4, 6, 12]"]),
    ("train-out-is-a-file", "train --data-root {root} --out {s}/garbage.json {train_demo}", 2,
     ["garbage.json", "is a file"]),
    ("train-out-unwritable", "train --data-root {root} --out " + UNWRITABLE + "/run {train_demo}", 2,
     ["hw3-cannot-write-here", "cannot create"]),
    ("train-encoder-folder-missing", "train --data-root {root} --out {s}/r_enc --encoder ./no/such/vit", 2,
     ["no/such/vit", "not found"]),
    ("train-encoder-unknown-offline", "train --data-root {root} --out {s}/r_enc2 --encoder vit_nonexistent_x", 2,
     ["vit_nonexistent_x", "hw3 download"]),
    ("train-encoder-llava-folder", "train --data-root {root} --out {s}/r_llava --encoder " + str(DEMO / "llava"), 2,
     ["not a timm encoder folder", "LlavaForConditionalGeneration"]),
    ("train-data-root-missing", "train --data-root {s}/no_root --out {s}/r_root {train_demo}", 2,
     ["no_root", "train.json", "not found"]),
    ("train-corrupt-image-workers", "train --data-root {corrupt_root} --out {s}/r_corrupt {train_demo} "
     "--num-workers 2", 2, ["images/train/", ".jpg: not an image file"]),
    ("train-other-run-refused", "train --data-root {root} --out {run} {train_demo} --lora-r 4", 2,
     ["holds a run of another configuration", "--overwrite"]),
    ("train-clip-folder-missing", "train --data-root {root} --out {s}/r_clip {train_demo} --clip-model ./nope_clip",
     2, ["nope_clip", "CLIP folder not found"]),
    # ---------------------------------------------------------------------------------------------- caption
    ("caption-adapter-missing", "caption {val_images} {s}/out.json {decoder} --adapter {s}/none.safetensors", 2,
     ["none.safetensors", "adapter file not found"]),
    ("caption-adapter-json-without-keys", "caption {val_images} {s}/out.json {decoder} --adapter "
     "{s}/nokeys/best.safetensors", 2, ["best.json", "not an adapter description"]),
    ("caption-adapter-json-unparsable", "caption {val_images} {s}/out.json {decoder} --adapter "
     "{s}/badjson/best.safetensors", 2, ["best.json", "not valid JSON"]),
    ("caption-adapter-truncated", "caption {val_images} {s}/out.json {decoder} --adapter "
     "{s}/truncated/best.safetensors", 2, ["best.safetensors", "not a readable safetensors"]),
    ("caption-adapter-empty", "caption {val_images} {s}/out.json {decoder} --adapter {s}/emptyst/best.safetensors",
     2, ["best.safetensors", "not a readable safetensors"]),
    ("caption-out-is-a-folder", "caption {val_images} {s} {decoder} --adapter {adapter}", 2, ["is a folder"]),
    ("caption-out-under-a-file", "caption {val_images} {s}/garbage.json/out.json {decoder} --adapter {adapter}", 2,
     ["garbage.json", "a file stands where"]),
    ("caption-out-unwritable", "caption {val_images} " + UNWRITABLE + "/out.json {decoder} --adapter {adapter}", 2,
     ["hw3-cannot-write-here"]),
    ("caption-images-missing", "caption {s}/no_images {s}/out.json {decoder} --adapter {adapter}", 2,
     ["no_images", "image folder not found"]),
    ("caption-images-empty", "caption {s}/empty_dir {s}/out.json {decoder} --adapter {adapter}", 2,
     ["empty_dir", "no images"]),
    ("caption-decoder-missing", "caption {val_images} {s}/out.json {s}/none.bin --adapter {adapter}", 2,
     ["none.bin", "not found"]),
    ("caption-batch-size-0", "caption {val_images} {s}/out.json {decoder} --adapter {adapter} --batch-size 0", 2,
     ["--batch-size", "at least 1"]),
    ("caption-nested-and-twins-warn", "caption {odd_images} {s}/odd.json {decoder} --adapter {adapter} "
     "--max-new-tokens 4", 0, ["warning", "subfolders are skipped", "sub/"]),
    # ---------------------------------------------------------------------------------------- llava-caption
    ("llava-num-beams-0", "llava-caption {val_images} {s}/o.json --num-beams 0", 2, ["--num-beams", "at least 1"]),
    ("llava-top-p-2", "llava-caption {val_images} {s}/o.json --top-p 2", 2, ["--top-p", "(0, 1]"]),
    ("llava-top-p-0", "llava-caption {val_images} {s}/o.json --top-p 0", 2, ["--top-p", "(0, 1]"]),
    ("llava-temperature-negative", "llava-caption {val_images} {s}/o.json --temperature -1", 2,
     ["--temperature", "[0, inf)"]),
    ("llava-max-new-tokens-0", "llava-caption {val_images} {s}/o.json --max-new-tokens 0", 2,
     ["--max-new-tokens", "at least 1"]),
    ("llava-batch-size-0", "llava-caption {val_images} {s}/o.json --batch-size 0", 2, ["--batch-size", "at least 1"]),
    ("llava-cache-bogus", "llava-caption {val_images} {s}/o.json --cache fast", 2, ["--cache", "invalid choice"]),
    ("llava-model-timm-folder", "llava-caption {val_images} {s}/o.json --model " + str(DEMO / "vit"), 2,
     ["vit", "not a LLaVA model", "timm"]),
    ("llava-model-truncated", "llava-caption {val_images} {s}/o.json --model {s}/llava_truncated --device cpu", 2,
     ["llava_truncated", "cannot load it"]),
    ("llava-model-missing", "llava-caption {val_images} {s}/o.json --model ./no/such/llava", 2,
     ["no/such/llava", "model folder not found"]),
    ("llava-out-is-a-folder", "llava-caption {val_images} {s} {llava}", 2, ["is a folder"]),
    ("llava-out-unwritable", "llava-caption {val_images} " + UNWRITABLE + "/o.json {llava}", 2,
     ["hw3-cannot-write-here"]),
    ("llava-corrupt-image-workers", "llava-caption {corrupt_val} {s}/o2.json {llava} --num-workers 2 --device cpu",
     2, ["corrupt or truncated image", ".jpg"]),
    ("llava-empty-image-workers", "llava-caption {empty_val} {s}/o3.json {llava} --num-workers 2 --device cpu",
     2, ["not an image file", ".jpg"]),
    # --------------------------------------------------------------------------------------------------- run
    ("report-output-dir-missing", "report --output-dir {s}/no_run --no-pdf", 2, ["--output-dir", "no_run",
                                                                                 "no such folder"]),
    ("report-before-any-run", "report --output-dir {s} --no-pdf", 2, ["metrics.json", "no metrics yet",
                                                                      "hw3 run -f CONFIG"]),
    ("report-config-missing", "report -f {s}/none.yaml --no-pdf", 2, ["none.yaml"]),
    ("run-config-missing", "run -f {s}/none.yaml", 2, ["none.yaml", "cannot read the config"]),
    ("run-only-misspelled", "run -f {s}/ok.yaml --only 00_shapes_wrold", 2, ["00_shapes_wrold", "--only"]),
    ("run-notebooks-empty", "run -f {s}/no_notebooks.yaml", 2, ["no_notebooks.yaml", "'notebooks'"]),
    ("run-notebooks-a-string", "run -f {s}/string_notebooks.yaml", 2, ["string_notebooks.yaml", "'notebooks'"]),
    ("run-output-unwritable", "run -f {s}/unwritable.yaml", 2, ["hw3-cannot-write-here", "output_dir"]),
    ("run-parameter-half", "run -f {s}/ok.yaml -p data_root", 2, ["-p", "expected 2 arguments"]),
    ("run-parameter-unknown", "run -f {s}/ok.yaml -p dat_root x", 2, ["dat_root", "declared by none"]),
    ("run-nested-parameters", "run -f {s}/nested.yaml", 2, ["nested.yaml", "flat"]),
    ("run-parameters-a-list", "run -f {s}/params_list.yaml", 2, ["params_list.yaml", "'parameters' must be a mapping"]),
    ("run-output-dir-null", "run -f {s}/output_null.yaml", 2, ["output_null.yaml", "'output_dir' must be a folder"]),
    ("run-profile-a-number", "run -f {s}/profile_3.yaml", 2, ["profile_3.yaml", "'profile' must be a name"]),
    ("llava-device-tpu", "llava-caption {val_images} {s}/o.json {llava} --device tpu", 2,
     ["--device tpu", "not a device name"]),
    ("llava-device-cuda-without-gpu", "llava-caption {val_images} {s}/o.json {llava} --device cuda", 2,
     ["--device cuda", "no CUDA GPU"]),  # skipped where there is a GPU
    ("llava-4bit-on-cpu", "llava-caption {val_images} {s}/o.json {llava} --load-in-4bit", 2, ["--load-in-4bit"]),
    ("llava-8bit-on-cpu", "llava-caption {val_images} {s}/o.json {llava} --load-in-8bit", 2, ["--load-in-8bit"]),
    ("llava-4bit-and-8bit", "llava-caption {val_images} {s}/o.json {llava} --load-in-4bit --load-in-8bit", 2,
     ["--load-in-4bit and --load-in-8bit: choose one"]),
    ("llava-random-weights-in-4bit", "llava-caption {val_images} {s}/o.json --random-weights --processor "
     + str(DEMO / "llava") + " --load-in-4bit --device cpu", 2, ["random weights are built in bf16", "load_in_4bit"]),
    ("llava-empty-prompt", "llava-caption {val_images} {s}/o.json {llava} --prompt ''", 2,
     ["--prompt", "instruction is empty"]),
    ("llava-min-above-max", "llava-caption {val_images} {s}/o.json {llava} --min-new-tokens 50 --max-new-tokens 5",
     2, ["min_new_tokens (50) is more than max_new_tokens (5)"]),
    ("llava-length-penalty-nan", "llava-caption {val_images} {s}/o.json {llava} --length-penalty nan", 2,
     ["length_penalty must be a finite number"]),
    ("lab-port-too-large", "lab --port 99999", 2, ["--port", "at most 65535"]),
    ("eval-annotation-duplicate-id", "evaluate --pred {pred} --annotation {s}/dup_id.json --images {val_images} "
     "{clip}", 2, ["dup_id.json", "appears twice", "an id of its own"]),
    ("eval-clip-pretrained-beside-a-folder", "evaluate --pred {pred} --annotation {ann} --images {val_images} "
     "--clip-model " + str(DEMO / "clip") + " --clip-pretrained openai", 0,
     ["warning", "pretrained='openai' is ignored"]),
    ("caption-decoder-garbage", "caption {val_images} {s}/out.json {s}/garbage.json --adapter {adapter}", 2,
     ["garbage.json", "cannot read the decoder checkpoint", "not a torch.save file of tensors"]),
    ("eval-pred-duplicate-key", "evaluate --pred {s}/duplicate.json --annotation {ann} --images {val_images} {clip}",
     2, ["duplicate.json", "appears twice"]),
    ("eval-pred-with-bom", "evaluate --pred {s}/bom.json --annotation {ann} --images {val_images} {clip}", 0, []),
    # the whole demo list: every parameter is checked before the first notebook starts
    ("run-lora-target-misspelt", "run -f {s}/all.yaml --only 02_train_lora_captioner -p lora_targets c_atn,c_fc", 2,
     ["'lora_targets'", "['c_atn'] match no layer", "c_attn"]),
    ("run-type-before-any-notebook", "run -f {s}/all.yaml -p llava_num_images abc", 2,
     ["'llava_num_images' must be int", "'abc'", "01_llava_prompts"]),
    ("run-misspelt-with-only", "run -f {s}/all.yaml --only 00_shapes_world -p attenton_layer mean", 2,
     ["attenton_layer", "declared by none"]),
    ("run-output-dir-parameter", "run -f {s}/all.yaml -p output_dir {s}/elsewhere", 2,
     ["-p output_dir", "config's output_dir"]),
    ("run-cell-timeout-text", "run -f {s}/all.yaml --cell-timeout soon", 2, ["--cell-timeout", "expected a number"]),
    ("run-gpu-cap-zero", "run -f {s}/all.yaml --gpu-cap 0", 2, ["--gpu-cap", "must lie in"]),
    ("run-num-show-negative", "run -f {s}/all.yaml --only 00_shapes_world -p num_show -5", 2,
     ["'num_show' must be at least 1", "-5", "00_shapes_world"]),
    ("run-num-show-0", "run -f {s}/all.yaml -p num_show 0", 2, ["'num_show' must be at least 1", "got 0"]),
    ("run-lr-0", "run -f {s}/all.yaml -p lr 0", 2, ["'lr' must be above 0", "02_train_lora_captioner"]),
    ("run-compile-scope", "run -f {s}/all.yaml -p compile_scope layers", 2,
     ["'compile_scope' must be one of step, blocks", "'layers'", "02_train_lora_captioner"]),
    # ---------------------------------------------------------------------------------------------- others
    ("demo-data-rebuild-bogus", "demo-data --rebuild bogus", 2, ["--rebuild", "bogus"]),
    ("download-config-missing", "download -f {s}/none.yaml", 2, ["none.yaml"]),
    ("rehearse-p1-images-0", "rehearse --out {s}/reh --p1-images 0", 2, ["--p1-images", "at least 1"]),
    ("no-command", "", 2, ["command"]),
    ("unknown-command", "trian", 2, ["invalid choice", "trian"]),
]


def _write(path: Path, payload) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


def _hw3(args: str, env: dict) -> subprocess.CompletedProcess:
    import shlex

    return subprocess.run([sys.executable, "-m", "hw3lib", *shlex.split(args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, world):
    """The inputs the cases refer to: a small hw3_data, a trained adapter, broken files of every kind."""
    s = tmp_path_factory.mktemp("bad_inputs")
    root = s / "hw3_data"
    build_world(root, WorldConfig(seed=5, num_train=8, num_val=4, num_p1=2))
    for f in ("decoder_model.bin", "encoder.json", "vocab.bpe"):
        shutil.copy(DEMO / "decoder" / f, root / "p2_data" / f)
    ann = root / "p2_data/val.json"
    val_images = root / "p2_data/images/val"
    names = [i["file_name"][:-4] for i in json.loads(ann.read_text())["images"]]
    p = {"s": str(s), "root": str(root), "ann": str(ann), "val_images": str(val_images),
         "decoder": str(root / "p2_data/decoder_model.bin"), "llava": f"--model {DEMO / 'llava'} --num-workers 0",
         "clip": f"--clip-model {DEMO / 'clip'} --clip-pretrained ''",
         "train_demo": f"--encoder {DEMO / 'vit'} --pool 2 --epochs 1 --batch-size 8 --num-workers 0 "
                       f"--max-new-tokens 5 --eval-images 2"}
    p["pred"] = _write(s / "pred.json", {n: "a red circle" for n in names})
    _write(s / "garbage.json", "{not json")
    coco = json.loads(ann.read_text())
    coco["images"][1]["id"] = coco["images"][0]["id"]
    _write(s / "dup_id.json", coco)
    (s / "duplicate.json").write_text("{" + ", ".join(f'"{n}": "a red circle"' for n in names + names[:1]) + "}")
    (s / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({n: "a red circle" for n in names}).encode())
    _write(s / "list.json", ["a", "b"])
    _write(s / "numbers.json", {n: 3 for n in names})
    _write(s / "wrong_keys.json", {"000000000001": "a red circle"})
    _write(s / "blank.json", {n: ("   " if i == 0 else "a red circle") for i, n in enumerate(names)})
    _write(s / "empty_pred.json", {})
    _write(s / "empty_ann.json", {"images": [], "annotations": []})
    _write(s / "list_ids.json", {"images": [{"id": [1], "file_name": "x.jpg"}], "annotations": []})
    _write(s / "caption_int.json", {"images": [{"id": 1, "file_name": f"{names[0]}.jpg"}],
                                    "annotations": [{"image_id": 1, "caption": 5, "id": 1}]})
    _write(s / "orphan.json", {"images": [{"id": 1, "file_name": f"{names[0]}.jpg"}],
                               "annotations": [{"image_id": 2, "caption": "x", "id": 1}]})
    (s / "empty_dir").mkdir()
    # a copy of the val images with one corrupt JPEG; a data root whose train split has one
    corrupt_val = s / "corrupt_val"
    shutil.copytree(val_images, corrupt_val)
    first = sorted(corrupt_val.glob("*.jpg"))[0]
    first.write_bytes(first.read_bytes()[:200])
    p["corrupt_val"] = str(corrupt_val)
    empty_val = s / "empty_val"  # a zero-byte JPEG
    shutil.copytree(val_images, empty_val)
    sorted(empty_val.glob("*.jpg"))[-1].write_bytes(b"")
    p["empty_val"] = str(empty_val)
    corrupt_root = s / "corrupt_root"
    shutil.copytree(root, corrupt_root)
    first = sorted((corrupt_root / "p2_data/images/train").glob("*.jpg"))[2]
    first.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    p["corrupt_root"] = str(corrupt_root)
    # odd but valid: an image in a subfolder and two images with the same name
    odd = s / "odd_images"
    (odd / "sub").mkdir(parents=True)
    jpgs = sorted(val_images.glob("*.jpg"))
    shutil.copy(jpgs[0], odd / jpgs[0].name)
    shutil.copy(jpgs[1], odd / "sub" / jpgs[1].name)
    shutil.copy(jpgs[0], odd / (jpgs[0].stem + ".png"))
    p["odd_images"] = str(odd)
    llava_truncated = s / "llava_truncated"
    shutil.copytree(DEMO / "llava", llava_truncated)
    weights = llava_truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    # configs for `hw3 run`
    ok = {"profile": "demo", "output_dir": str(s / "out"), "notebooks": ["00_shapes_world"],
          "parameters": {"data_root": str(root)}}
    import yaml

    for name, cfg in (("ok", ok), ("no_notebooks", {**ok, "notebooks": []}),
                      ("string_notebooks", {**ok, "notebooks": "00_shapes_world"}),
                      ("unwritable", {**ok, "output_dir": UNWRITABLE + "/out"}),
                      ("nested", {**ok, "parameters": {"a": {"b": 1}}}),
                      ("params_list", {**ok, "parameters": [1, 2]}), ("output_null", {**ok, "output_dir": None}),
                      ("profile_3", {**ok, "profile": 3}),
                      ("all", {**yaml.safe_load((ROOT / "configs/demo.yaml").read_text()), "demo_world": False,
                               "output_dir": str(s / "out_all")})):
        _write(s / f"{name}.yaml", yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HOME": str(s / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # a finished run (and its adapter) for the cases that need one
    run = s / "run"
    done = _hw3(f"train --data-root {root} --out {run} {p['train_demo']}", env)
    assert done.returncode == 0, done.stderr[-2000:]
    p["run"], p["adapter"] = str(run), str(run / "best.safetensors")
    # broken adapters: a description without its keys or unparsable; weights truncated or empty beside a good one
    good_meta = (run / "best.json").read_text()
    for folder, meta, weights in (("nokeys", {"hello": 1}, b""), ("badjson", "{", b""),
                                  ("truncated", good_meta, (run / "best.safetensors").read_bytes()[:300]),
                                  ("emptyst", good_meta, b"")):
        (s / folder).mkdir()
        (s / folder / "best.safetensors").write_bytes(weights)
        _write(s / folder / "best.json", meta)
    return p, env


@pytest.fixture(scope="module")
def results(sandbox, tmp_path_factory):
    """Every case, in two worker processes (tests/cli_batch.py) that share the corpus: each runs its cases one after
    another through ``cli.main`` with its output captured, as ``python -m hw3lib`` runs one."""
    import shlex

    p, env = sandbox
    folder = tmp_path_factory.mktemp("cli_batch")
    jobs = []
    for k in range(2):
        cases, out = folder / f"cases-{k}.json", folder / f"results-{k}.json"
        cases.write_text(json.dumps([[name, shlex.split(args.format(**p))] for name, args, _, _ in CASES[k::2]]))
        jobs.append((out, subprocess.Popen([sys.executable, str(ROOT / "tests/cli_batch.py"), str(cases), str(out)],
                                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    found = {}
    try:
        for out, job in jobs:
            said = job.communicate(timeout=1800)[0].decode(errors="replace")  # each case is bounded at 600 s
            assert job.returncode == 0, f"a worker stopped in its last case named here:\n{said[-3000:]}"
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            found.update({r["name"]: subprocess.CompletedProcess([], r["returncode"], r["stdout"], r["stderr"])
                          for r in rows})
    finally:  # whatever happened, no worker outlives the test
        for _, job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    return found


def test_the_corpus_reaches_every_command_that_reads_input():
    """Every command of the CLI that takes files, folders or models gets wrong input here; each case has its name."""
    from hw3lib.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    reads_input = set(sub.choices) - {"download", "lab"}  # download needs the network; lab opens a server
    tried = {args.split()[0] for _, args, _, _ in CASES if args}
    assert reads_input <= tried, sorted(reads_input - tried)
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, args, code, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(results, name, args, code, needles):
    if name == "llava-device-cuda-without-gpu" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = results[name]
    err = result.stderr
    assert result.returncode == code, (result.returncode, err[-1500:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "hw3 " in line and ": " in line]
    if code == 2:
        assert len(lines) == 1, err[-1500:]
    message = " ".join(lines)
    for needle in needles:
        assert needle in message, (needle, err[-1500:])


def test_no_temporary_files_are_left(sandbox, results):
    p, _ = sandbox
    leftovers = [str(f) for f in Path(p["s"]).rglob("*") if f.name.endswith((".tmp", ".partial.jsonl"))]
    assert not leftovers, leftovers
    from pycocoevalcap.tokenizer import ptbtokenizer

    assert not [f for f in Path(ptbtokenizer.__file__).parent.iterdir() if f.name.startswith("tmp")]
