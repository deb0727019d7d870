#!/usr/bin/env bash
# scratchgpt's main job: every stage of the pipeline in order, each reading the previous stage's checkpoint,
# then a scripted chat and the report card (out/report.md, out/report.json).
#
#   bash run.sh              the tiny preset on the embedded corpus: CPU, offline, about a quarter of an hour
#   bash run.sh d12          a GPU preset for pretraining (bring data first: see README, "Bring your own data")
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

resume=""
if [ -f out/base/model.pt ] && [ ! -f out/base/metrics.json ]; then resume="--resume"; fi
# shellcheck disable=SC2086  # the *_ARGS variables are lists of flags
stage base python train_gpt.py --preset "$preset" $resume ${BASE_ARGS:-}
# shellcheck disable=SC2086
stage sft python sft.py ${SFT_ARGS:-}
# shellcheck disable=SC2086
stage rl python rl.py ${RL_ARGS:-}
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
