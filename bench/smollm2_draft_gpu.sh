#!/usr/bin/env bash
# How the shipped SmolLM2-135M LongSpec draft (runtime/drafts/smollm2-135m/) was made, on one
# H100, in calls of at most 10 minutes (the lent GPU's limit). Run from the repository root:
#
#   bench/smollm2_draft_gpu.sh gen     # the target's own continuations of held-in trace turns
#   bench/smollm2_draft_gpu.sh short   # short stage: 2K windows, Anchor-Offset positions
#   bench/smollm2_draft_gpu.sh long    # long stage: 6K windows, plain positions
#   bench/smollm2_draft_gpu.sh eval    # acceptance vs suffix/self/auto (bench/gpu_e2e.py)
#
# Later rounds continue from the shipped draft with more self-generated data. Traces 13-15 of
# every file are a held-in evaluation block: their text is in the trace sources, but the
# target's continuations of their turns are never generated for training.
#
#   bench/smollm2_draft_gpu.sh gen2    # first 6 turns of every other held-in trace
#   bench/smollm2_draft_gpu.sh gen3    # the next 6
#   bench/smollm2_draft_gpu.sh more    # continue the shipped draft (RUN_NAME, GEN_FILES)
#   NAME=gen4 SKIP_TURNS=12 TURNS=12 bench/smollm2_draft_gpu.sh gen-turns
#                                      # any range of turns (DEVICE=cpu works: ~20 tok/s, 2 cores)
#   KL=1 GREEDY=1 RUN_NAME=greedy GEN_FILES=$WORK/gen24.pt@2 bench/smollm2_draft_gpu.sh more
#                                      # continue with a loss term toward the target's argmax
#                                      # (`--greedy`; KL and GREEDY set the loss weights)
#   WIDTH=3072 RUN_NAME=wide GEN_FILES=$WORK/gen23.pt@2 bench/smollm2_draft_gpu.sh more
#                                      # the same, grown to a WIDTH-unit MLP (`--mlp-width`;
#                                      # tried 2026-12-07, not better: docs/BENCHMARKS.md round 12)
#   FEATURE=1 RUN_NAME=feat GEN_FILES=$WORK/gen24.pt@2 bench/smollm2_draft_gpu.sh more
#                                      # the same, reading the target's final hidden state
#                                      # (`--feature`, EAGLE's feature; feat_w starts at zero).
#                                      # The shipped draft's fifth stage (round 15): this with
#                                      # STEPS=3000 MINUTES=4.82, then STEPS=6000 MINUTES=2.35
#   FEATURE=1 RUN_NAME=rA GEN_FILES=$WORK/gen24.pt@2 STEPS=5000 bench/smollm2_draft_gpu.sh more
#                                      # the shipped draft's sixth stage (round 16): a new run
#                                      # from the fifth, MINUTES=6.15, 6.8, 5.47 (4,400 steps)
#   FEATURE=1 LAYERS=2,15 RUN_NAME=rB GEN_FILES=$WORK/gen24.pt@2 STEPS=5000 bench/smollm2_draft_gpu.sh more
#                                      # the same, with target layers 2 and 15 appended to the
#                                      # feature (`--feature-layers`, EAGLE-3's low and middle
#                                      # layers; their feat_w blocks start at zero); round 16
#                                      # ran it beside rA: 2.56 against 2.53, not shipped
#
# The shipped draft's last two stages: `gen2`, then `MINUTES=4 more` and `MINUTES=7.3 more`
# (it resumes; 2600 steps); that draft copied into runtime/drafts/, then `gen3` and
# `MINUTES=5 RUN_NAME=long4 LR=7e-5 STEPS=2200 GEN_FILES=$WORK/gen.pt@2,$WORK/gen2.pt@3,$WORK/gen3.pt@3 more`.
#
# Every stage resumes: re-running `short` or `long` continues from its last checkpoint.
# Environment: MODEL (a .gguf or registry name; default smollm2-135m), TRACES_DIR (default
# traces_dir(): $LSRT_TRACES, else ../shared/data/agent-traces beside the checkout), WORK
# (default /tmp/lsrt), MINUTES (per training call), OUT
# (where the finished draft is copied in bf16; optional).
# A .gguf MODEL is converted on first use through transformers' GGUF reader, which needs the
# `gguf` package (a pyproject dependency): on a machine without it, put the package and its
# dist-info on PYTHONPATH.
set -euo pipefail

STAGE=${1:?usage: $0 gen|short|long|eval}
MODEL=${MODEL:-smollm2-135m}
WORK=${WORK:-/tmp/lsrt}
MINUTES=${MINUTES:-5}
PY=${PYTHON:-python}
TRACES_DIR=${TRACES_DIR:-$("$PY" -c 'from lsrt.runtime.training.data import traces_dir; print(traces_dir())')}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
TRACES=("$TRACES_DIR"/swe_agent_demos.jsonl "$TRACES_DIR"/mini_swe_agent_gemini3pro.jsonl
        "$TRACES_DIR"/tau_bench_gpt4o_airline.jsonl)
mkdir -p "$WORK/runs"

COMMON=(--target "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --kl "${KL:-1}" --ce 0
        --greedy "${GREEDY:-0}" --max-lag 6
        --sink 4 --window 512 --save-every 200 --resume)

export_bf16() {  # $1: run dir -> $OUT/draft (bf16 weights + config)
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT/draft"
    "$PY" -c 'import sys; from lsrt.runtime.spec.longspec_ckpt import export_draft
print("exported", export_draft(sys.argv[1], sys.argv[2]), "parameters (bf16) to", sys.argv[2])' \
        "$1" "$OUT/draft"
}

case "$STAGE" in
gen)
    "$PY" -m lsrt.runtime.training.selfgen --target "$MODEL" --device "$DEVICE" --traces "${TRACES[@]}" \
        --out "$WORK/gen.pt" --max-new 256 --keep-context 1024 --max-minutes "${GEN_MINUTES:-2.5}" \
        --no-progress
    ;;
short)
    "$PY" -m lsrt.runtime.training.longspec_train "${COMMON[@]}" --out "$WORK/runs/short" \
        --data "stdlib@2,${TRACES[0]}@1,${TRACES[1]}@1,${TRACES[2]}@1,$WORK/gen.pt@3" \
        --stage short --seq-len 2048 --batch 4 --lr 3e-4 --steps 4000 --max-tokens 8000000 \
        --max-minutes "$MINUTES"
    export_bf16 "$WORK/runs/short"
    ;;
gen2|gen3|gen-turns)
    if [ "$STAGE" != gen-turns ]; then  # gen2: turns 0-6, gen3: turns 6-12
        NAME=$STAGE; TURNS=6; SKIP_TURNS=0; [ "$STAGE" = gen3 ] && SKIP_TURNS=6
    fi
    "$PY" -m lsrt.runtime.training.selfgen --target "$MODEL" --device "$DEVICE" --traces "${TRACES[@]}" \
        --out "$WORK/${NAME:?NAME=genN}.pt" --holdout 3 --exclude-traces 13:16 \
        --skip-turns "${SKIP_TURNS:-0}" --turns-per-trace "${TURNS:-6}" --max-new 256 \
        --keep-context 1024 --max-minutes "${GEN_MINUTES:-2.5}" --no-progress
    ;;
more)
    RUN="$WORK/runs/${RUN_NAME:-more}"
    WIDEN=()
    [ -n "${WIDTH:-}" ] && WIDEN=(--mlp-width "$WIDTH")
    [ -n "${FEATURE:-}" ] && WIDEN+=(--feature)
    [ -n "${LAYERS:-}" ] && WIDEN+=(--feature-layers "$LAYERS")
    "$PY" -m lsrt.runtime.training.longspec_train "${COMMON[@]}" --init runtime/drafts/smollm2-135m "${WIDEN[@]}" \
        --out "$RUN" --data "stdlib@1,${TRACES[0]}@1,${TRACES[1]}@1,${TRACES[2]}@1,${GEN_FILES:-$WORK/gen.pt@2,$WORK/gen2.pt@4}" \
        --stage long --seq-len 4096 --batch 2 --lr "${LR:-1e-4}" --steps "${STEPS:-2600}" \
        --max-tokens 12000000 --max-minutes "$MINUTES"
    export_bf16 "$RUN"
    ;;
long)
    INIT=()
    [ -f "$WORK/runs/long/trainer_state.pt" ] || INIT=(--init "$WORK/runs/short")
    "$PY" -m lsrt.runtime.training.longspec_train "${COMMON[@]}" "${INIT[@]}" --out "$WORK/runs/long" \
        --data "stdlib@1,${TRACES[0]}@1,${TRACES[1]}@1,${TRACES[2]}@1,$WORK/gen.pt@3" \
        --stage long --seq-len 6144 --batch 1 --lr 1e-4 --steps 1500 --max-tokens 8000000 \
        --max-minutes "$MINUTES"
    export_bf16 "$WORK/runs/long"
    ;;
eval)
    RUN=${RUN:-$WORK/runs/long}
    for skip in 3 0; do  # held-in traces first, then the held-out ones
        "$PY" bench/gpu_e2e.py --device "$DEVICE" --model "$MODEL" --traces "${TRACES[0]}" --skip $skip \
            --prompts "${PROMPTS:-6}" --new 128 --no-hf \
            --drafts none suffix self auto "longspec:$RUN" "longspec:$RUN#1,1,1,1,1,1" \
                "longspec:$RUN#2,2,2,2,2,2" "longspec:$RUN#3,3,3,3,3" "auto:longspec:$RUN" \
                "auto:longspec:$RUN#2,2,2,2,2,2"
    done
    ;;
*)
    echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
