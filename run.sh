#!/usr/bin/env bash
# scratchgpt's main job: every stage of the pipeline in order, each reading the previous stage's checkpoint,
# then a scripted chat and the report card.
#
#   bash run.sh              the tiny preset on the embedded corpus: CPU, offline, about a quarter of an hour
#   bash run.sh d12          one GPU (or a node): FineWeb-Edu is downloaded, its own 32K tokenizer trained
#   bash run.sh d20          (or d26) on a node: set TORCHRUN="torchrun --standalone --nproc_per_node=8"
#   bash run.sh rehearsal    the d12 flow at smoke size on a CPU (CI runs it against a local stand-in for the
#                            Hub: HF_ENDPOINT=http://127.0.0.1:PORT)
#   bash run.sh --fresh      redo every stage of the preset (downloads, tokenizer and shards are kept)
#
# Where things go: the tiny preset writes out/tokenizer, out/shards, out/base, out/sft, out/rl, out/rlhf and
# out/report.md; every other preset P writes the same under out/P/, so presets never skip, resume or overwrite
# each other's stages. A stage that finished (its metrics.json exists) is skipped; a training stage that was
# interrupted (base, sft, rl, rlhf) resumes from its last checkpoint. Extra flags per stage come from the
# environment (BASE_ARGS, SFT_ARGS, RL_ARGS, RLHF_ARGS, HACK_ARGS, EVALS_ARGS), e.g. a smoke run:
#   BASE_ARGS="--num-steps 20" SFT_ARGS="--num-steps 10" RL_ARGS="--num-steps 2" RLHF_ARGS="--num-steps 2" \
#   HACK_ARGS="--hack-steps 2" bash run.sh --fresh
# GPU presets also read VOCAB (tokenizer size, default 32768; 65536 is the other choice), VAL_TOKENS (size of
# the held-out validation split) and TORCHRUN (the launcher of every training stage, default plain python).
set -euo pipefail
cd "$(dirname "$0")"

preset=tiny
fresh=0
for arg in "$@"; do
    case "$arg" in
        --fresh) fresh=1 ;;
        -*) echo "run.sh: unknown option $arg (expected --fresh or a preset name)" >&2; exit 2 ;;
        tiny|d12|d20|d26|rehearsal) preset="$arg" ;;
        *) echo "run.sh: unknown preset $arg (expected tiny, d12, d20, d26 or rehearsal)" >&2; exit 2 ;;
    esac
done
root=out
[ "$preset" = tiny ] || root="out/$preset"
if [ "$fresh" = 1 ]; then
    rm -rf "$root/base" "$root/sft" "$root/rl" "$root/rlhf" "$root/evals" "$root/report.md" "$root/report.json"
fi
launch=${TORCHRUN:-python}

# stage NAME COMMAND...: run COMMAND unless stage NAME of this preset already finished
stage() {
    local name=$1; shift
    if [ -f "$root/$name/metrics.json" ]; then
        echo "=== $name: finished earlier ($root/$name/metrics.json); skipped"
        return
    fi
    echo "=== $name: $*"
    "$@"
}

if [ "$preset" = tiny ]; then
    echo "=== data: tokenizer and token shards of the embedded corpus"
    python data.py
    sft_preset=tiny rl_preset=tiny post_args=""
else
    # GPU presets learn from FineWeb-Edu (already filtered by its makers, so it goes straight to tokens).
    # File 000 is held out for validation and never trained on; the tokenizer learns from a slice of file 001;
    # then as many files as the preset's planned tokens need are downloaded and tokenized. Downloads resume.
    downloads="$root/downloads" tokenizer="$root/tokenizer/tokenizer.json" shards="$root/shards"
    if [ "$preset" = rehearsal ]; then vocab=${VOCAB:-1024} val_tokens=${VAL_TOKENS:-20000}
    else vocab=${VOCAB:-32768} val_tokens=${VAL_TOKENS:-10485760}; fi
    echo "=== data: FineWeb-Edu files 000 (validation) and 001 (the tokenizer's slice) -> $downloads"
    python data.py download --source fineweb-edu --shards 2 --out "$downloads"
    if [ ! -f "$tokenizer" ]; then
        python data.py train-tokenizer --input "$downloads/001_00000.parquet" --heldout "$downloads/000_00000.parquet" \
            --vocab-size "$vocab" --out "$tokenizer"
    fi
    per_file=$(python data.py tokens-per-file "$downloads/001_00000.parquet" --tokenizer "$tokenizer")
    # shellcheck disable=SC2086  # BASE_ARGS is a list of flags (it may change the planned tokens)
    files=$(python train_gpt.py shards-needed --preset "$preset" --tokens-per-file "$per_file" ${BASE_ARGS:-})
    echo "=== data: $files training file(s) of ~$per_file tokens for the plan, + 1 for validation"
    python data.py download --source fineweb-edu --shards $((files + 1)) --out "$downloads"
    if ! python -c "import data, sys; data.check_shard_set(sys.argv[1], sys.argv[2])" "$shards/fineweb" "$tokenizer" 2>/dev/null; then
        train_files=()
        for ((i = 1; i <= files; i++)); do train_files+=("$downloads/$(printf %03d "$i")_00000.parquet"); done
        python data.py tokenize --input "${train_files[@]}" --val-input "$downloads/000_00000.parquet" \
            --val-tokens "$val_tokens" --tokenizer "$tokenizer" --out "$shards" --name fineweb
    fi
    # shellcheck disable=SC2086
    python rlhf.py plan --preset "$preset" --plan-gpus "${NPROC:-8}" ${BASE_ARGS:-}  # the estimates, before the run
    sft_preset=d12 rl_preset=gsm8k post_args="--data-dir $downloads"
fi

# The exam after every stage (evals.py): HellaSwag/ARC for the base model, MMLU/ARC/GSM8K for the chat models,
# with the overlap of each test set with the pretraining shards. GPU presets take the real test sets from the
# Hub; the tiny preset stays offline with small stand-in files in the same schemas (its scores say so), or the
# real ones with EVAL_DATA=hub; the rehearsal's stand-in Hub serves them. Small models take a seeded sample.
evals_args=(--data-dir "$root/evals/data")
evals_env=()
if [ "$preset" = tiny ]; then
    evals_args+=(--limit 200 --train-shards "out/shards/embedded/embedded_train_*.bin")
    if [ "${EVAL_DATA:-fixtures}" = fixtures ]; then
        python evals.py write-fixtures out/evals/hub 400 >/dev/null
        port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        python -m http.server "$port" --bind 127.0.0.1 --directory out/evals/hub >/dev/null 2>&1 &
        fixtures_pid=$!
        trap 'kill "$fixtures_pid" 2>/dev/null || true' EXIT
        evals_env=(HF_ENDPOINT="http://127.0.0.1:$port")
    fi
else
    evals_args+=(--train-shards "$shards/fineweb/fineweb_train_*.bin")
    [ "$preset" = rehearsal ] && evals_args+=(--limit 200)
fi
# exam STAGE: the benchmarks on that stage's checkpoint (skipped once done, like a stage)
exam() {
    # shellcheck disable=SC2086
    stage "evals/$1" env "${evals_env[@]}" $launch evals.py --checkpoint "$root/$1" --out-dir "$root/evals/$1" \
        "${evals_args[@]}" ${EVALS_ARGS:-}
}

# a stage with a checkpoint but no metrics.json was interrupted: it resumes from its last checkpoint
resume_if_killed() { if [ -f "$root/$1/model.pt" ] && [ ! -f "$root/$1/metrics.json" ]; then echo --resume; fi; }
# shellcheck disable=SC2086  # the *_ARGS variables are lists of flags
stage base $launch train_gpt.py --preset "$preset" $(resume_if_killed base) ${BASE_ARGS:-}
exam base
# shellcheck disable=SC2086
stage sft $launch sft.py --preset "$sft_preset" --base "$root/base/model.pt" --out-dir "$root/sft" $post_args \
    $(resume_if_killed sft) ${SFT_ARGS:-}
exam sft
# shellcheck disable=SC2086
stage rl $launch rl.py --preset "$rl_preset" --checkpoint "$root/sft" --out-dir "$root/rl" $post_args \
    $(resume_if_killed rl) ${RL_ARGS:-}
exam rl
# shellcheck disable=SC2086
stage rlhf $launch rlhf.py --checkpoint "$root/rl" --out-dir "$root/rlhf" $(resume_if_killed rlhf) ${RLHF_ARGS:-}
if ! grep -q '"hack_true_final"' "$root/rlhf/metrics.json"; then  # the demonstration adds its figures to the stage's
    echo "=== rlhf --hack: the same reward model, no KL penalty, no early stopping"
    # shellcheck disable=SC2086
    $launch rlhf.py --hack --checkpoint "$root/rl" --out-dir "$root/rlhf" ${RLHF_ARGS:-} ${HACK_ARGS:-}
fi
exam rlhf

echo "=== chat: a few questions to the finished assistant (greedy)"
for question in "What is your name?" \
                "Emily buys 3 apples and 2 oranges. Each orange costs \$2. The total cost is \$13. What is the cost of each apple?" \
                "What is 12345 * 6789?" \
                "How many dots are here? ......." \
                "Who is Orson Kovacs?"; do
    echo "you> $question"
    python chat.py --checkpoint "$root/rlhf" -p "$question" --temperature 0 --max-tokens 120
done

python train_gpt.py report "$root"
