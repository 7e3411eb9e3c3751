#!/bin/bash
# One device call's worth of GPU work: `bash bench/gpu_round.sh STEP...`, results and logs under $OUT.
# Steps: tests, cache-key, profile, inductor, fused, attention, packed-attention, e2e-dnabert, e2e-dnabert-large, e2e-dnabert-streams, e2e-esm, fp8, models, startup, weights (after startup: its 3B checkpoint), predict,
# service-scaling (N_SCALING proteins, default 60000: ~6 min on 2 H200s).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# "NVIDIA H200" -> h200, "NVIDIA H100 80GB HBM3" -> h100: the model's name, not the name's last word
gpu=$(python3 -c "import re, torch; n = torch.cuda.get_device_name(); m = re.search(r'\b[A-Z]+\d{2,4}[a-z]?\b', n); print((m.group(0) if m else n.split()[-1]).lower())")
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
tag="nvidia-${gpu}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# The bundle's packages come without bytecode and the image sets PYTHONDONTWRITEBYTECODE=1, so every
# process (driver, Ray's GCS/dashboard, each worker) would compile Ray from source: +3-5 s per start-up
# (bench/results/probe-startup-*.json). pip compiles it at install; so do we, once.
[ -d /tmp/site ] && [ ! -f /tmp/site/.compiled ] && python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1 && touch /tmp/site/.compiled
# The image's torch has no bytecode either (a pip-installed torch has): torch and torch._dynamo imported
# in 3.4 s and 4.0 s without it, 2.1 s and 3.5 s with it (bench/results/imports-nvidia-h200.txt).
if [ ! -f /tmp/.torch-compiled ]; then
  torch_dir=$(python3 -c "import os, torch; print(os.path.dirname(torch.__file__))")
  [ -w "$torch_dir" ] && python3 -m compileall -q -j 0 "$torch_dir" >/dev/null 2>&1 && touch /tmp/.torch-compiled
fi
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    tests) python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests-$tag.log" | tail -15 ;;
    profile) rm -rf /tmp/traces
             python3 bench/bench_profile.py --out "$OUT/profile-$tag${PROFILE_TAG:-}.json" --trace-dir /tmp/traces ${PROFILE_ARGS:-} 2>&1 | grep -v Warning
             (cd /tmp/traces && tar czf "$OUT/traces-$tag${PROFILE_TAG:-}.tgz" .) ;;
    e2e-dnabert) TORCH_LOGS=recompiles python3 bench/bench_e2e.py --model dnabert_s -n "${N_DNA:-60000}" --work /tmp/dna \
                   --out "$OUT/e2e-dnabert_s-1x-$tag.json" ${E2E_ARGS:-} 2>&1 | grep -v "Warning\|warn(" | tail -30 ;;
    e2e-dnabert-large) python3 bench/bench_e2e.py --model dnabert_s -n 300000 --work /tmp/dna-large \
                   --out "$OUT/e2e-dnabert_s-1x-$tag-300k${E2E_TAG:-}.json" ${E2E_ARGS:-} 2>&1 | grep -v "Warning\|warn(" | tail -4 ;;
    fused) python3 bench/probe_fused.py --out "$OUT/probe-fused-$tag.json" 2>&1 | grep -v "Warning\|warn(" ;;
    e2e-dnabert-streams) for s in ${STREAMS:-3}; do python3 bench/bench_e2e.py --model dnabert_s -n 300000 --work /tmp/dna-large \
                   --skip-bare --cuda-streams $s --out "$OUT/e2e-dnabert_s-1x-$tag-300k-streams$s.json" 2>&1 | grep "end to end"; done ;;
    e2e-esm) python3 bench/bench_e2e.py --model esm2_3B -n "${N_ESM:-20000}" --work /tmp/esm \
                   --out "$OUT/e2e-esm2_3B-${n}x-$tag.json" 2>&1 | grep -v "Warning\|warn(" | tail -8 ;;
    packed-attention) python3 bench/probe_packed_attention.py --out "$OUT/probe-packed-attention-$tag${PA_TAG:-}.json" ${PA_ARGS:-} 2>&1 | grep -v "Warning\|warn(" ;;
    cache-key) python3 -m pytest -q -p no:cacheprovider tests/test_models.py -k cache_key 2>&1 | tail -5 ;;
    attention) python3 bench/bench_attention.py --out "$OUT/attention-$tag.json" 2>&1 | grep -v "Warning\|warn(" ;;
    fp8) python3 bench/bench_fp8.py --out "$OUT/fp8-frontier-$tag.json" ${FP8_ARGS:-} 2>&1 | grep -v "Warning\|warn(" | tail -16 ;;
    startup) python3 bench/bench_startup.py --out "$OUT/startup-$tag${STARTUP_TAG:-}.json" --work /tmp/startup ${STARTUP_ARGS:-} 2>&1 \
               | grep -v "Warning\|warn(" ;;
    weights) python3 bench/probe_weights.py --ckpt /tmp/startup/esm2_3B/esm2_esm2_3B.pt --out "$OUT/probe-weights-$tag.json" 2>&1 \
               | grep -v "Warning\|warn(" | tail -40 ;;
    predict) python3 bench/bench_predict.py --out "$OUT/predict-$tag${PREDICT_TAG:-}.json" --work /tmp/predict \
               --mbp "${PREDICT_MBP:-10}" ${PREDICT_ARGS:-} 2>&1 | grep -v "Warning\|warn(" ;;
    service-scaling) python3 bench/bench_service.py --scaling -n "${N_SCALING:-60000}" --work /tmp/scaling \
               --out "$OUT/service-scaling-esm2_3B-${n}x-$tag.json" 2>&1 | grep -v "Warning\|warn(\| INFO \|(raylet)" | tail -8 ;;
    inductor) python3 bench/probe_inductor.py --out "$OUT/probe-inductor-$tag.json" ${INDUCTOR_ARGS:-} 2>&1 | grep "tok/s\|Error\|ceiling" ;;
    models) python3 bench/bench_models.py --out "$OUT/models-$tag${MODELS_TAG:-}.json" ${MODELS_ARGS:-} 2>&1 | tee "$OUT/models-$tag${MODELS_TAG:-}.txt" | grep -v Warn ;;
  esac
done
echo "=== done $(date +%T)"
