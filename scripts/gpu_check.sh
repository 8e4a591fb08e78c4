#!/usr/bin/env bash
# The GPU checks in one go: the similarity tests on the GPU (working float32 against the float64 CPU
# reference, TF32 off), then `make benchmark`'s script on the GPU with SD 1.5-shaped weights at 512 px.
#   scripts/gpu_check.sh OUTDIR            (the project's environment active; the embedded target built)
set -uo pipefail
out=${1:-outputs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' 2>&1 | tee "$out/versions.log"
import torch, diffusers, transformers, pandas
print("torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__, "| transformers", transformers.__version__, "| pandas", pandas.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
PY
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_similarity.py -k working 2>&1 | tee "$out/similarity.log" | tail -4
timeout "${BENCHMARK_TIMEOUT:-420}" python3 scripts/benchmark.py --device cuda --sd15-images "${SD15_IMAGES:-32}" --sd15-size "${SD15_SIZE:-512}" --out "$out/bench" 2>&1 | tee "$out/benchmark.log"
