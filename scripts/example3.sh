#!/usr/bin/env bash
# The ESPnet3 example end to end (data -> tokenizer -> stats -> train -> infer -> measure), offline, on CPU:
# egs_example/egs3_asr, run by ESPnet3's stock run.py with `frontend: s3prl_flashcompat`.
# CURRENT STACK ONLY (espnet 202611, the first ESPnet with the espnet3 package); on the legacy stack it stops.
# Sets up or reuses the project venv (scripts/venv.sh). Arguments are the stages to run (default: all six):
#   bash scripts/example3.sh                       # create_dataset train_tokenizer collect_stats train infer measure
#   bash scripts/example3.sh infer measure         # decode and score again
# Ends with a RESULT line. Rerunning keeps the data, tokenizer and a finished training (fit resumes from
# exp/training/last.ckpt); `rm -rf egs_example/egs3_asr/{exp,data}` trains afresh, `.../downloads` too to start
# from nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stack="${ESPNET_FLASHCOMPAT_STACK:-current}"
if [ "${stack}" != current ]; then
    echo "example3.sh: the ESPnet3 example needs the current stack (espnet 202611, which ships espnet3 and egs3);" \
         "ESPNET_FLASHCOMPAT_STACK=${stack} has espnet 202511, which has no ESPnet3. Run it on the current stack:" \
         "'ESPNET_FLASHCOMPAT_STACK=current bash scripts/example3.sh'; on the legacy stack run the ESPnet2 example:" \
         "'ESPNET_FLASHCOMPAT_STACK=legacy bash scripts/example.sh'." >&2
    exit 2
fi
. scripts/venv.sh
cd egs_example/egs3_asr
. ./path.sh
python -c "import espnet3" 2>/dev/null || {
    echo "example3.sh: $(command -v python) cannot import espnet3: ESPnet3 needs espnet>=202611 (the current stack)." >&2
    exit 2
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(create_dataset train_tokenizer collect_stats train infer measure)
training_config=conf/training.yaml
inference_config=conf/inference.yaml
metrics_config=conf/metrics.yaml
exp_dir=exp/$(basename "${training_config}" .yaml)        # exp_tag: ${self_name:} = the training config's stem
infer_dir=${exp_dir}/$(basename "${inference_config}" .yaml)
log=${exp_dir}/run.log
mkdir -p "${exp_dir}"
# infer keeps a lock per output shard and refuses a locked one: decode afresh, as asr1's stage 5 does
case " ${stages[*]} " in *" infer "*) rm -rf "${infer_dir}" ;; esac

SECONDS=0
echo "==== $(date '+%H:%M:%S') ESPnet3 run.py --stages ${stages[*]} (full log: egs_example/egs3_asr/${log}) ===="
stock=$(python -c "import importlib.util as u; print(u.find_spec('egs3.mini_an4.esp2_asr').submodule_search_locations[0])" \
    2>/dev/null)/run.py
if cmp -s run.py "${stock}"; then echo "  run.py: byte for byte ESPnet's ${stock#"${VIRTUAL_ENV}/"}"
else echo "  WARNING: run.py differs from ESPnet's stock ${stock}" >&2; fi

# The console gets the stage banners, the frontend's attention decision, the per-epoch summaries, the metrics
# (Lightning's progress bars, which share lines with them in the log, are cut off).
python run.py --stages "${stages[@]}" --training_config "${training_config}" \
    --inference_config "${inference_config}" --metrics_config "${metrics_config}" > "${log}" 2>&1 &
pid=$!
trap 'kill ${pid} 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
tail -n +1 -F --pid="${pid}" "${log}" 2>/dev/null \
    | grep --line-buffered -aE "=== \[(START|DONE)\]|s3prl_flashcompat: |epoch_summary|results: |Traceback|^[A-Za-z_.]*(Error|Exception)" \
    | sed -u -E 's/^.*(\r|\x1b\[A)//; s/^.*(INFO|WARNING|ERROR):[A-Za-z0-9_.]*://; s/^/  | /' || true
if ! wait "${pid}"; then
    echo "FAILED, see egs_example/egs3_asr/${log}:" >&2; tail -n 30 "${log}" >&2
    if grep -q "frontend s3prl_flashcompat" "${log}"; then  # ESPnet: "--frontend must be one of (...): --frontend s3prl_flashcompat"
        python ../asr1/local/hook_hint.py >&2 || true
    fi
    exit 1
fi
trap - EXIT

case " ${stages[*]} " in *" measure "*) ;; *) echo "(no measure stage: no RESULT line)"; exit 0 ;; esac
# asr1's scorer on the same hypotheses: a few examples, the chance level and its TER (= WER: a word is a token).
python ../asr1/local/score.py --ref downloads/synth/test/text --hyp "${infer_dir}/test/text.scp" --seed 0 --show 3 \
    > "${infer_dir}/score.txt"
sed '$d' "${infer_dir}/score.txt"
summary=$(python - "${infer_dir}/metrics.json" "${infer_dir}/score.txt" <<'EOF'
import json, re, sys
metrics = json.load(open(sys.argv[1]))
rates = {name: value for per_set in metrics.values() for name, value in per_set["test"].items()}
chance = open(sys.argv[2]).read().splitlines()[-1]  # TER=...% (chance ~..%, N words, M utts)
inside = re.search(r"\((.*)\)", chance).group(1)
print(f"test WER={rates['WER']:.1f}% CER={rates['CER']:.1f}% ({inside}; asr1 scorer: {chance.split()[0]})")
EOF
)
backend=$(grep -aoE "s3prl_flashcompat: [^(]*" "${log}" | grep -oE "attention [a-z0-9_-]+" \
    | tail -n 1 | sed -E 's/^attention //' || true)
echo "RESULT: ${summary}, wall=${SECONDS}s, attention backend=${backend:-unknown (not logged)}"
