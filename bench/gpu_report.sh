#!/usr/bin/env bash
# The speed figures of the README and docs/performance.md, in parts that each fit one 10-minute
# device call on an H200 (each command runs under a time limit; a part's limits add up to at most 580 s):
#
#   bash bench/gpu_report.sh probe     # prefills eager and in graphed chunks, ms per prefill; the CUDA tests
#   bash bench/gpu_report.sh kernels   # projections (cuBLAS, skinny_linear and its tiles), sampling today and as
#                                      # in stop 21; the bench at 1 (step compiled) with skinny_linear on, then off
#   bash bench/gpu_report.sh order     # the step compiled as before stop 23 (reductions tuned by timing) at 16:
#                                      # in a process that compiled batch size 1 first, in one that did not,
#                                      # and again on the first one's inductor cache (kernel profiles; the
#                                      # source of the norm/RoPE kernels in each cache)
#   bash bench/gpu_report.sh autotune  # inductor's tuning of the norm/RoPE kernels in six cold processes (a
#                                      # 4-layer model): four tuned by timing, two as the step compiles now
#   bash bench/gpu_report.sh table     # the bench table, batch sizes 1/16/64/128, capture off and on
#   bash bench/gpu_report.sh modes     # capture overhead per similarity mode at batch sizes 1 and 16, seed at 64
#   bash bench/gpu_report.sh capture   # seed capture off and on with the step compiled at 16 and 64, three passes each,
#                                      # with each pass's garbage-collector time, CUDA graphs recorded and compiles
#   bash bench/gpu_report.sh profile   # time per phase and GPU time by kind of kernel, batch size 1, capture off and on
#   bash bench/gpu_report.sh profile64 # the same at batch size 64
#   bash bench/gpu_report.sh batches   # 256 problems batched in number order and by question length, side by
#                                      # side at 16 and 64 (step compiled; bench/batch_order.py)
#   bash bench/gpu_report.sh packed    # prompt prefills packed (real tokens only) and padded, side by side: ms per
#                                      # prefill eager and compiled at 16 and 64, then the bench at 16 and 64
#
# Several parts may be named at once. Each writes PART.txt into $OUT (default: runs/gpu_report).
# MODEL is a folder with the Qwen3-4B config and tokenizer (weights are seeded random), DATA the
# GSM8K jsonl; COMPILE_PREFILL=1 adds --compile_prefill to the table and the profiles, EAGER_PREFILL=1
# --eager_prefill, COMPILE_PREFILL_AT=16,64 (table and capture) also times those batch sizes with compiled
# prefills, side by side.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-.gpu_inputs/qwen3-4b-arch}
DATA=${DATA:-.gpu_inputs/gsm8k_test.jsonl}
OUT=${OUT:-runs/gpu_report}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# inductor's multi-line notes on online softmax and TF32, which the line filter below cannot catch
export PYTHONWARNINGS=ignore::UserWarning:torch._inductor.lowering,ignore::UserWarning:torch._inductor.compile_fx
M=(--model_name "$MODEL" --random_weights)
A=("${M[@]}" --data_file "$DATA")
PREFILL=()
[ "${COMPILE_PREFILL:-0}" = 1 ] && PREFILL=(--compile_prefill)
[ "${EAGER_PREFILL:-0}" = 1 ] && PREFILL+=(--eager_prefill)
[ -n "${COMPILE_PREFILL_AT:-}" ] && PREFILL+=(--compile_prefill_at "$COMPILE_PREFILL_AT")
PARTS=" probe kernels order autotune table capture modes profile profile64 batches packed "
for part in "$@"; do
    [[ $PARTS == *" $part "* ]] || { echo "unknown part '$part' (probe, kernels, order, autotune, table, capture, modes, profile, profile64, batches, packed)" >&2; exit 2; }
done
NOISE='^Warning|Online softmax|regex'  # lines of library chatter, nothing of ours

run() {  # run SECONDS COMMAND...: the command under a time limit, chatter left out
    local limit=$1
    shift
    echo "\$ $*"
    timeout "$limit" "$@" 2>&1 | grep -vE "$NOISE"
    echo "(exit ${PIPESTATUS[0]}, $(date +%T))"
}

for part in "$@"; do
    case $part in
        probe)
            { run 200 python bench/prefill_probe.py "${M[@]}" --batch_sizes 1,16,64 --repeats 4 --backend ours --graphed
              run 250 python -m pytest -q -p no:logging tests/test_cuda.py tests/test_graph_prefill.py; } ;;
        kernels)
            { run 150 python bench/gemm_probe.py --batch_sizes 1,4,16 --skinny
              run 80 python bench/sampling_probe.py --batch_sizes 1,16,64 --slices 128 --stop21
              for skinny in 1 0; do
                  export LATENTMAS_SKINNY_LINEAR=$skinny
                  echo "LATENTMAS_SKINNY_LINEAR=$skinny"
                  run 170 python bench/latentmas_speed.py "${A[@]}" --batch_sizes 1 \
                      --problems_bs1 3 --repeats 2 --compile_step "${PREFILL[@]}"
              done
              unset LATENTMAS_SKINNY_LINEAR; } ;;
        order)  # as before stop 23's fix (reductions tuned by timing), each process with its own inductor cache:
                # batch size 1 then 16 (cold), 16 alone (cold), 16 alone on the first one's cache
            { D="$OUT/order_cache"
              rm -rf "$D"
              P=("${A[@]}" --passes 0 --compile_step --tuned_reductions)
              run 230 env TORCHINDUCTOR_CACHE_DIR="$D/first1" python bench/decode_probe.py "${P[@]}" --batch_sizes 1,16
              run 150 env TORCHINDUCTOR_CACHE_DIR="$D/only16" python bench/decode_probe.py "${P[@]}" --batch_sizes 16
              run 100 env TORCHINDUCTOR_CACHE_DIR="$D/first1" python bench/decode_probe.py "${P[@]}" --batch_sizes 16
              for cache in first1 only16; do
                  run 30 python bench/kernel_source.py "$D/$cache" rsqrt_sin
              done
              rm -rf "$D"; } ;;
        autotune)  # a 4-layer copy of MODEL (same kernels, short compiles), each process with a cold cache
            { D="$OUT/autotune_cache" M4="$OUT/autotune_model"
              rm -rf "$D" "$M4"
              mkdir -p "$M4" && cp "$MODEL"/tokenizer* "$M4"/
              python -c "import json, sys; c = json.load(open(sys.argv[1])); c.pop('layer_types', None)
c.update(num_hidden_layers=4, max_window_layers=4); json.dump(c, open(sys.argv[2], 'w'))" "$MODEL/config.json" "$M4/config.json"
              P=(--model_name "$M4" --random_weights --data_file "$DATA" --passes 0 --compile_step --autotune_report rsqrt_sin)
              for i in 1 2; do
                  run 90 env TORCHINDUCTOR_CACHE_DIR="$D/only16_$i" python bench/decode_probe.py "${P[@]}" --batch_sizes 16 --tuned_reductions
              done
              for i in 1 2; do
                  run 90 env TORCHINDUCTOR_CACHE_DIR="$D/first1_$i" python bench/decode_probe.py "${P[@]}" --batch_sizes 1,16 --tuned_reductions
              done
              for i in 1 2; do  # the step as compiled now: inductor's deterministic mode, nothing timed for reductions
                  run 90 env TORCHINDUCTOR_CACHE_DIR="$D/deterministic_$i" python bench/decode_probe.py "${P[@]}" --batch_sizes 16
              done
              rm -rf "$D" "$M4"; } ;;
        table)
            run 585 python bench/latentmas_speed.py "${A[@]}" --batch_sizes 1,16,64,128 --problems_bs1 3 --repeats 2 \
                --compile_step "${PREFILL[@]}" ;;
        capture)
            run 400 python bench/latentmas_speed.py "${A[@]}" --batch_sizes 16,64 --repeats 3 --compile_step "${PREFILL[@]}" ;;
        modes)
            { run 220 python bench/capture_overhead.py "${A[@]}" --problems 3 --repeats 3 --similarity seed,query,attention
              run 100 python bench/capture_overhead.py "${A[@]}" --problems 16 --generate_bs 16 --repeats 2 \
                  --similarity seed,query,attention
              run 110 python bench/capture_overhead.py "${A[@]}" --problems 64 --generate_bs 64 --repeats 2 --similarity seed; } ;;
        profile)
            run 160 python bench/phase_profile.py "${A[@]}" --batch_size 1 --compile_step --capture "${PREFILL[@]}" ;;
        profile64)
            run 400 python bench/phase_profile.py "${A[@]}" --batch_size 64 --compile_step "${PREFILL[@]}" ;;
        batches)
            run 560 python bench/batch_order.py "${A[@]}" --problems 256 --batch_sizes 16,64 --compile_step ;;
        packed)
            { run 220 python bench/prefill_probe.py "${M[@]}" --batch_sizes 16,64 --repeats 4 --backend ours --compiled \
                  --prompts packed --prompts padded
              run 350 python bench/latentmas_speed.py "${A[@]}" --batch_sizes 16,64 --repeats 2 --compile_step \
                  --padded_prefill_at 16,64 "${PREFILL[@]}"; } ;;
    esac 2>&1 | tee "$OUT/$part.txt"
done
