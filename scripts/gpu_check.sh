#!/usr/bin/env bash
# The GPU checks in one go: the similarity tests on the GPU (working float32 against the float64 CPU
# reference, TF32 off), then `make benchmark`'s script on the GPU with SD 1.5-shaped weights at 512 px, then
# scripts/benchmark_sd.py with SD3.5-medium- and FLUX.1-dev-shaped random weights at 1024 px in bfloat16 (built
# on the GPU, saved as bf16 safetensors, loaded and fingerprinted, one cold `mialib score` of every attack the
# family takes: seconds per image, transformer evaluations per image, peak GPU memory per attack).
#   scripts/gpu_check.sh OUTDIR            (the project's environment active; the embedded target built)
#   CHECKS="sd3 flux" scripts/gpu_check.sh OUTDIR       (some parts only)
#
# Each part has its own limit (seconds, overridable) and the whole script a budget, GPU_CHECK_BUDGET (570 s: under
# a 10-minute command limit); a part gets what is left of the budget when that is less than its limit, and is
# skipped with a line in skipped.log when under a minute is left. Estimates on one H200 (not yet measured;
# the flow parts from their FLOPs and bytes): versions 5 s; similarity under 1 min (limit 120 s); benchmark
# up to its limit (420 s); sd3 about 1.5-2 min (build and save 16 GB, two loads with a sha256 fingerprint of
# 16 GB each, 53 transformer evaluations per image at 1024 px for 4 images; limit 180 s); flux about 3-4 min
# (34 GB: the 24 GB transformer and 9.5 GB T5-XXL, 50 evaluations per image; limit 300 s). All four do not fit
# one 570 s budget unless the benchmark ends early: run CHECKS="sd3 flux" (with or without similarity) for the
# flow families alone. Each flow model folder (16 and 34 GB) is deleted after its part; the disk holds 64 GB.
set -uo pipefail
out=${1:-outputs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
checks=" ${CHECKS:-similarity benchmark sd3 flux} "
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-570}))

# limit NAME SECONDS: the part's limit cut to the budget left, or nothing (and a note) when under 60 s are left
limit() {
    local left=$((deadline - SECONDS))
    if ((left < 60)); then
        echo "skipped $1: ${left} s left of GPU_CHECK_BUDGET" | tee -a "$out/skipped.log" >&2
        return 1
    fi
    echo $((left < $2 ? left : $2))
}

python3 - <<'PY' 2>&1 | tee "$out/versions.log"
import torch, diffusers, transformers, pandas
print("torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__, "| transformers", transformers.__version__, "| pandas", pandas.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
PY
if [[ $checks == *" similarity "* ]] && s=$(limit similarity "${SIMILARITY_TIMEOUT:-120}"); then
    timeout "$s" python3 -m pytest -q -p no:cacheprovider tests/test_similarity.py -k working 2>&1 | tee "$out/similarity.log" | tail -4
fi
if [[ $checks == *" benchmark "* ]] && s=$(limit benchmark "${BENCHMARK_TIMEOUT:-420}"); then
    timeout "$s" python3 scripts/benchmark.py --device cuda --sd15-images "${SD15_IMAGES:-32}" --sd15-size "${SD15_SIZE:-512}" --out "$out/bench" 2>&1 | tee "$out/benchmark.log"
fi
# the flow families: 4 images (mialib needs a member and a non-member in calibration and in test), cold caches
# only; FLOW_EXTRA adds arguments (a CPU dry run of this script: FLOW_EXTRA="--scale tiny --device cpu" FLOW_SIZE=64)
for family in sd3 flux; do
    upper=${family^^}
    timeout_var=${upper}_TIMEOUT images_var=${upper}_IMAGES
    default_limit=$([[ $family == sd3 ]] && echo 180 || echo 300)
    if [[ $checks == *" $family "* ]] && s=$(limit "$family" "${!timeout_var:-$default_limit}"); then
        began=$SECONDS
        # shellcheck disable=SC2086  # FLOW_EXTRA is split into arguments on purpose
        timeout "$s" python3 scripts/benchmark_sd.py --family "$family" --device cuda --sizes "${FLOW_SIZE:-1024}" \
            --images "${!images_var:-4}" --runs cold --out "$out/flow" ${FLOW_EXTRA:-} 2>&1 | tee "$out/$family.log"
        echo "$family: $((SECONDS - began)) s of a ${s} s limit" | tee -a "$out/$family.log"
        rm -rf "$out/flow/$family-random" "$out/flow/${family}_tiny-random"  # 16 GB (sd3) or 34 GB (flux): not kept
    fi
done
echo "gpu_check: ${SECONDS} s" | tee -a "$out/versions.log"
