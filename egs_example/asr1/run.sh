#!/usr/bin/env bash
# Mini egs2-style ASR recipe: a synthetic "tone language" learnt end to end through the
# s3prl_flashcompat frontend (a tiny random wav2vec2, fine-tuned), driven by the stock espnet2.bin.* tools.
# Stages: 1 data, 2 token list, 3 collect stats, 4 train, 5 decode, 6 score, 7 hand-off (to-stock, stock decode).
set -euo pipefail
cd "$(dirname "$0")"

stage=1
stop_stage=7
nj=2                                     # parallel jobs for collect stats and decoding
ngpu=0
python=python
seed=0
asr_config=conf/train_asr_flashcompat.yaml
inference_config=conf/decode_asr.yaml

usage() { sed -n '2,4p' run.sh; echo "Options: --stage --stop_stage --nj --ngpu --python --seed --asr_config --inference_config (paths relative to this directory)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --stage|--stop_stage|--nj|--ngpu|--python|--seed|--asr_config|--inference_config)
            [ $# -ge 2 ] || { usage >&2; exit 1; }
            printf -v "${1#--}" '%s' "$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "Unknown option: $1" >&2; usage >&2; exit 1 ;;
    esac
done
[ -f "${asr_config}" ] || { echo "No such config: ${asr_config}" >&2; exit 1; }
. ./path.sh

tag=$(basename "${asr_config}" .yaml)
token_list=data/token_list/word/tokens.txt
stats_dir=exp/asr_stats_${tag}
asr_exp=exp/asr_${tag}
decode_dir=${asr_exp}/decode_test
stock_exp=${asr_exp}_stock               # stage 7: the to-stock copy, and stock ESPnet's decode of it
# what collect stats (stage 3) and training (stage 4) share, as in asr.sh
train_opts=(--config "${asr_config}" --use_preprocessor true --token_type word --token_list "${token_list}"
    --train_data_path_and_name_and_type data/train/wav.scp,speech,sound
    --train_data_path_and_name_and_type data/train/text,text,text
    --valid_data_path_and_name_and_type data/dev/wav.scp,speech,sound
    --valid_data_path_and_name_and_type data/dev/text,text,text
    --frontend_conf fs=16k)
SECONDS=0
trap 'exit 130' INT TERM
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT   # background jobs ignore Ctrl-C: stop them with us

banner() { echo -e "\n==== $(date '+%H:%M:%S') Stage $1 ====" ; }
runs() { [ "${stage}" -le "$1" ] && [ "${stop_stage}" -ge "$1" ]; }
# fail LOG: show why a job failed, and stop.
fail() {
    echo "FAILED, see $1:" >&2; tail -n 30 "$1" >&2
    if grep -q "frontend s3prl_flashcompat" "$1"; then  # ESPnet: "--frontend must be one of (...): --frontend s3prl_flashcompat"
        ${python} local/hook_hint.py >&2 || true       # the true cause: package, ESPNET_FLASHCOMPAT_DISABLE, .pth, ...
    fi
    exit 1
}
# run_logged LOG PATTERN CMD...: full output to LOG, lines matching PATTERN to the console.
run_logged() {
    local log=$1 pattern=$2; shift 2
    mkdir -p "$(dirname "${log}")"
    echo "  log: ${log}"
    "$@" > "${log}" 2>&1 &
    local pid=$!
    tail -n +1 -F --pid="${pid}" "${log}" 2>/dev/null | grep --line-buffered -E "${pattern}" | sed -u 's/^/  | /' || true
    wait "${pid}" || fail "${log}"
}
# decode CONFIG MODEL OUT: the test set through asr_inference, nj jobs; the sorted hypotheses in OUT/text
decode() {
    local logdir=$3/logdir
    rm -rf "$3"; mkdir -p "${logdir}"
    split_keys data/test/wav.scp "${logdir}/keys"
    run_parallel asr_inference "${logdir}" ${python} -m espnet2.bin.asr_inference \
        --config "${inference_config}" --ngpu 0 --seed "${seed}" --asr_train_config "$1" --asr_model_file "$2" \
        --data_path_and_name_and_type data/test/wav.scp,speech,sound \
        --key_file "${logdir}/keys.JOB.scp" --output_dir "${logdir}/output.JOB"
    cat "${logdir}"/output.*/1best_recog/text | sort > "$3/text"
    echo "  $(wc -l < "$3/text") hypotheses: $3/text"
}
# run_parallel NAME LOGDIR CMD...: runs CMD nj times with JOB replaced by 1..nj, logs in LOGDIR/NAME.JOB.log.
# The jobs share the cores (more threads than cores makes CPU torch crawl).
run_parallel() {
    local name=$1 logdir=$2 n pids=() threads=$(( OMP_NUM_THREADS / nj > 0 ? OMP_NUM_THREADS / nj : 1 )); shift 2
    for n in $(seq "${nj}"); do
        OMP_NUM_THREADS=${threads} "${@//JOB/${n}}" > "${logdir}/${name}.${n}.log" 2>&1 & pids+=($!)
    done
    for n in $(seq "${nj}"); do
        wait "${pids[n-1]}" || fail "${logdir}/${name}.${n}.log"
    done
}
# split_keys SCP PREFIX: round-robin split of SCP into PREFIX.1.scp .. PREFIX.nj.scp
split_keys() { awk -v n="${nj}" -v p="$2" '{ print > (p "." ((NR - 1) % n + 1) ".scp") }' "$1"; }

# Training resumes (--resume true, as asr.sh), so a finished one is kept; but not one of the other stack's ESPnet
# (the two venvs share this directory): say so before any stage runs.
if runs 4 && [ -f "${asr_exp}/config.yaml" ]; then
    trained=$(sed -n "s/^version: *'*\([^']*\)'*$/\1/p" "${asr_exp}/config.yaml")
    running=$(${python} -c "import espnet; print(espnet.__version__)")
    if [ -n "${trained}" ] && [ "${trained}" != "${running}" ]; then
        echo "${asr_exp} was trained with espnet ${trained}, but $(command -v "${python}") has espnet ${running}:" \
             "rm -rf $(pwd)/exp to train afresh with it (keep a copy to compare)." >&2
        exit 1
    fi
fi

if runs 1; then
    banner "1: data (synthetic tone language) and the tiny random wav2vec2 upstream"
    ${python} local/make_data.py --out data --seed "${seed}"
    ${python} local/make_upstream.py --config "${asr_config}"
fi

if runs 2; then
    banner "2: token list (word level) -> ${token_list}"
    mkdir -p "$(dirname "${token_list}")"
    ${python} -m espnet2.bin.tokenize_text --token_type word --field 2- \
        --input data/train/text --output "${token_list}" --write_vocabulary true \
        --add_symbol "<blank>:0" --add_symbol "<unk>:1" --add_symbol "<sos/eos>:-1" \
        > "$(dirname "${token_list}")/tokenize_text.log" 2>&1
    echo "  $(wc -l < "${token_list}") tokens: $(tr '\n' ' ' < "${token_list}")"
fi

if runs 3; then
    banner "3: collect stats -> ${stats_dir}"
    logdir=${stats_dir}/logdir
    rm -rf "${stats_dir}"; mkdir -p "${logdir}"
    split_keys data/train/wav.scp "${logdir}/train"
    split_keys data/dev/wav.scp "${logdir}/valid"
    run_parallel stats "${logdir}" ${python} -m espnet2.bin.asr_train --collect_stats true "${train_opts[@]}" \
        --train_shape_file "${logdir}/train.JOB.scp" --valid_shape_file "${logdir}/valid.JOB.scp" \
        --ngpu 0 --output_dir "${logdir}/stats.JOB"
    ${python} -m espnet2.bin.aggregate_stats_dirs --output_dir "${stats_dir}" \
        $(for n in $(seq "${nj}"); do echo "--input_dir ${logdir}/stats.${n}"; done) > "${logdir}/aggregate.log" 2>&1
    for split in train valid; do  # the number of tokens is appended for the batch-bins count, as asr.sh does
        awk -v N="$(wc -l < "${token_list}")" '{ print $0 "," N }' \
            "${stats_dir}/${split}/text_shape" > "${stats_dir}/${split}/text_shape.word"
    done
    echo "  $(wc -l < "${stats_dir}/train/speech_shape") train utterances, stats: ${stats_dir}/train/feats_stats.npz"
fi

if runs 4; then
    banner "4: train -> ${asr_exp} (ESPnet log lines below)"
    run_logged "${asr_exp}/train.log" \
        "s3prl_flashcompat|epoch results|best model|Averaging|Traceback|^[A-Za-z.]*Error" \
        ${python} -m espnet2.bin.asr_train "${train_opts[@]}" \
        --train_shape_file "${stats_dir}/train/speech_shape" --train_shape_file "${stats_dir}/train/text_shape.word" \
        --valid_shape_file "${stats_dir}/valid/speech_shape" --valid_shape_file "${stats_dir}/valid/text_shape.word" \
        --normalize global_mvn --normalize_conf stats_file="${stats_dir}/train/feats_stats.npz" \
        --fold_length 80000 --fold_length 150 \
        --seed "${seed}" --ngpu "${ngpu}" --resume true --output_dir "${asr_exp}"
fi

if runs 5; then
    banner "5: decode test -> ${decode_dir}"
    decode "${asr_exp}/config.yaml" "${asr_exp}/valid.loss.ave.pth" "${decode_dir}"
fi

if runs 6; then
    banner "6: score"
    ${python} local/score.py --ref data/test/text --hyp "${decode_dir}/text" --seed "${seed}" --show 3 \
        > "${decode_dir}/result.txt"
    sed '$d' "${decode_dir}/result.txt"
    # The frontend logs its attention decision at INFO (and a WARNING if it falls back): take the last one.
    backend=$(grep -oE "s3prl_flashcompat: [^(]*" "${asr_exp}/train.log" | grep -oE "attention [a-z0-9_:-]+" \
        | tail -n 1 | sed -E 's/^attention //' || true)
    echo "RESULT: test $(tail -n 1 "${decode_dir}/result.txt"), wall=${SECONDS}s, attention backend=${backend:-unknown (not logged)}"
fi

if runs 7; then
    # A receiver without this package: to-stock writes a frontend: s3prl copy (after proving, in a fresh
    # interpreter with the plugin off, that stock ESPnet loads it with strict keys and equal outputs); stock ESPnet
    # then decodes it with the startup hook off, and must give stage 5's hypotheses.
    banner "7: hand-off: to-stock -> ${stock_exp}, then decode with the plugin off"
    rm -rf "${stock_exp}" "${stock_exp}_log"
    mkdir -p "${stock_exp}_log"
    if ${python} -m espnet_flashcompat to-stock "${asr_exp}/config.yaml" "${stock_exp}" \
        --model "${asr_exp}/valid.loss.ave.pth" > "${stock_exp}_log/to_stock.log" 2>&1; then status=0; else status=$?; fi
    sed 's/^/  | /' "${stock_exp}_log/to_stock.log"
    if [ "${status}" = 1 ] && ! ${python} -c "import s3prl.nn" > /dev/null 2>&1; then
        # s3prl 0.4.18 with torchaudio >= 2.9 (the legacy stack): stock ESPnet cannot build any S3PRL frontend
        echo "HANDOFF: not possible on this stack: stock S3PRL does not import in this environment (to-stock said why, above)"
    elif [ "${status}" != 0 ]; then
        echo "HANDOFF: to-stock failed (exit ${status})" >&2; exit 1
    else
        ESPNET_FLASHCOMPAT_DISABLE=1 decode "${stock_exp}/config.yaml" "${stock_exp}/valid.loss.ave.pth" \
            "${stock_exp}_log/decode_test"
        if cmp -s "${decode_dir}/text" "${stock_exp}_log/decode_test/text"; then
            echo "HANDOFF: stock ESPnet, plugin off, decodes the to-stock copy to the same" \
                 "$(wc -l < "${decode_dir}/text") hypotheses as the plugin"
        else
            echo "HANDOFF: the hypotheses differ:" >&2
            diff "${decode_dir}/text" "${stock_exp}_log/decode_test/text" | head -n 10 >&2; exit 1
        fi
    fi
fi
