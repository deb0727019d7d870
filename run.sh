#!/usr/bin/env bash
# scratchgpt's main job: every stage of the pipeline in order, each reading the previous stage's checkpoint,
# then a scripted chat and the report card (out/report.md, out/report.json).
#
#   bash run.sh              the tiny preset on the embedded corpus: CPU, offline, about a quarter of an hour
#   bash run.sh d12          the same on one GPU: FineWeb-Edu is downloaded, GPT-2-small-class model
#   bash run.sh d20          (or d26) on a node: set TORCHRUN="torchrun --standalone --nproc_per_node=8"
#   bash run.sh --fresh      redo every stage, even those that already finished
#
# A stage that finished (its out/<stage>/metrics.json exists) is skipped; pretraining that was interrupted
# resumes from its last checkpoint. Extra flags per stage come from the environment, e.g. a smoke run:
#   BASE_ARGS="--num-steps 20" SFT_ARGS="--num-steps 10" RL_ARGS="--num-steps 2" RLHF_ARGS="--num-steps 2" \
#   HACK_ARGS="--hack-steps 2" bash run.sh --fresh
set -euo pipefail
cd "$(dirname "$0")"

preset=tiny
fresh=0
for arg in "$@"; do
    case "$arg" in
        --fresh) fresh=1 ;;
        -*) echo "run.sh: unknown option $arg (expected --fresh or a preset name)" >&2; exit 2 ;;
        *) preset="$arg" ;;
    esac
done
if [ "$fresh" = 1 ]; then
    rm -rf out/base out/sft out/rl out/rlhf out/report.md out/report.json
fi

# stage NAME COMMAND...: run COMMAND unless stage NAME already finished
stage() {
    local name=$1; shift
    if [ -f "out/$name/metrics.json" ]; then
        echo "=== $name: finished earlier (out/$name/metrics.json); skipped"
        return
    fi
    echo "=== $name: $*"
    "$@"
}

echo "=== data: tokenizer and token shards of the embedded corpus"
python data.py
data_args="" sft_preset="tiny" rl_preset="tiny"
if [ "$preset" != tiny ]; then
    # GPU presets learn from FineWeb-Edu (already filtered by its makers, so it goes straight to tokens):
    # ~0.7B tokens per shard; d12's 2.6B training tokens need 4 (SHARDS=N to change). Downloads resume.
    echo "=== data: ${SHARDS:-4} FineWeb-Edu shards -> out/shards/fineweb"
    python data.py download --source fineweb-edu --shards "${SHARDS:-4}" --out out/downloads
    if [ ! -f out/shards/fineweb/meta.json ]; then
        python data.py tokenize --input 'out/downloads/*.parquet' --name fineweb
    fi
    data_args="--shards fineweb" sft_preset="d12" rl_preset="gsm8k"
fi

resume=""
if [ -f out/base/model.pt ] && [ ! -f out/base/metrics.json ]; then resume="--resume"; fi
# shellcheck disable=SC2086  # the *_ARGS variables are lists of flags
stage base ${TORCHRUN:-python} train_gpt.py --preset "$preset" $data_args $resume ${BASE_ARGS:-}
# shellcheck disable=SC2086
stage sft python sft.py --preset "$sft_preset" ${SFT_ARGS:-}
# shellcheck disable=SC2086
stage rl python rl.py --preset "$rl_preset" ${RL_ARGS:-}
# shellcheck disable=SC2086
stage rlhf python rlhf.py ${RLHF_ARGS:-}
if ! grep -q '"hack_true_final"' out/rlhf/metrics.json; then  # the demonstration adds its figures to the stage's
    echo "=== rlhf --hack: the same reward model, no KL penalty, no early stopping"
    # shellcheck disable=SC2086
    python rlhf.py --hack ${RLHF_ARGS:-} ${HACK_ARGS:-}
fi

echo "=== chat: a few questions to the finished assistant (greedy)"
for question in "What is your name?" \
                "Emily buys 3 apples and 2 oranges. Each orange costs \$2. The total cost is \$13. What is the cost of each apple?" \
                "What is 12345 * 6789?" \
                "How many dots are here? ......." \
                "Who is Orson Kovacs?"; do
    echo "you> $question"
    python chat.py -p "$question" --temperature 0 --max-tokens 120
done

python train_gpt.py report
