# Sourced by run_all.sh and run_tests.sh: pick (or create) the Python environment and install the package once.
# Uses the active conda env / virtualenv when there is one; otherwise creates .venv/ next to this repository.
# Sets PY to the interpreter to use. HW3_PYTHON=/path/to/python uses that interpreter as it is, installing nothing
# (a cluster's or a GPU machine's managed environment, offline: hw3lib importable from this folder, its
# dependencies already there).

if [[ -n "${HW3_PYTHON:-}" ]]; then
  PY="$HW3_PYTHON"
  if ! "$PY" -c "import hw3lib, papermill, transformers, timm, open_clip, loralib, pycocoevalcap" 2>/dev/null; then
    echo "[setup] HW3_PYTHON=$PY lacks hw3lib or one of its dependencies (pip install -e . there)" >&2
    exit 2
  fi
elif [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
  PY="$(command -v python)"
else
  if [[ ! -x .venv/bin/python ]]; then
    echo "[setup] creating .venv/ (first run)"
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip > .venv/pip-upgrade.log 2>&1 || true  # optional
  fi
  PY="$PWD/.venv/bin/python"
fi

_stamp="$("$PY" -c 'import sys; print(sys.prefix)')/.hw3lib-install-stamp"
_want="$(sha1sum pyproject.toml | cut -d' ' -f1) $PWD"
if [[ -z "${HW3_PYTHON:-}" ]] && { [[ ! -f "$_stamp" || "$(cat "$_stamp")" != "$_want" ]] \
     || ! "$PY" -c "import hw3lib" 2>/dev/null; }; then
  _prefix="$("$PY" -c 'import sys; print(sys.prefix)')"
  echo "[setup] installing hw3lib and its dependencies into $_prefix (minutes, once; log: $_prefix/hw3lib-install.log)"
  if ! "$PY" -m pip install --quiet -e ".[dev]" > "$_prefix/hw3lib-install.log" 2>&1; then
    tail -n 20 "$_prefix/hw3lib-install.log" >&2
    echo "[setup] pip install failed; the whole log is $_prefix/hw3lib-install.log" >&2
    exit 1
  fi
  # on a CUDA machine also the GPU extras: bitsandbytes + accelerate (LLaVA in 4 or 8 bits, configs/hw3-12gb.yaml)
  # and Liger's kernels; without them the rest works, and a 4-bit run says in one line what it lacks
  if command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi -L >/dev/null 2>&1; then  # bounded: a wedged driver
    echo "[setup] a CUDA GPU: installing the GPU extras (bitsandbytes, accelerate, liger-kernel)"
    "$PY" -m pip install --quiet -e ".[dev,gpu]" >> "$_prefix/hw3lib-install.log" 2>&1 \
      || echo "[setup] note: the GPU extras did not install (4-bit LLaVA needs them); see $_prefix/hw3lib-install.log" >&2
  fi
  # the notebooks' kernel, "hw3" (HW3 workbook), for this environment (--user adds one for a JupyterLab elsewhere)
  "$PY" -m hw3lib.kernel --install >> "$_prefix/hw3lib-install.log" 2>&1 \
    || echo "[setup] note: the Jupyter kernel 'hw3' was not registered; see $_prefix/hw3lib-install.log" >&2
  echo "$_want" > "$_stamp"
fi

if ! command -v java >/dev/null 2>&1; then
  echo "[setup] note: java not found; CIDEr will use hw3lib's Python port of the PTB tokenizer." \
       "Install a JRE (apt install default-jre, or conda's openjdk) to use pycocoevalcap's own." >&2
fi
export PYTHONUNBUFFERED=1
