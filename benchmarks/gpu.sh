#!/usr/bin/env bash
# The GPU measurements of issue #18 in one command, on one H100/H200 with no network, in under 9 minutes.
#
#   benchmarks/gpu.sh --prepare-wheels DIR      # beforehand, on a machine with network: the wheels the node lacks
#   benchmarks/gpu.sh [--wheels DIR] [--out DIR] [--only LABEL,...] [--limit SECONDS] [--tiny]
#
# The node is assumed to hold Python 3.12 with jax (CUDA), flax, optax, orbax-checkpoint, torch, transformers,
# absl-py, tqdm and safetensors (the CUDA images this project has been lent hold them). What it lacks is listed,
# pinned as in setup.py, in benchmarks/wheels.txt; `--prepare-wheels DIR` downloads those for CPython 3.12
# on manylinux x86_64 (`pip download --no-deps --only-binary=:all:`), whatever the machine it runs on. Carry DIR and
# this checkout to the node; `--wheels DIR` installs them there with `pip install --no-index --no-deps --target` into a
# scratch folder put on PYTHONPATH (the node's own packages are left as they are). The checkout runs in place
# (launch/benchmark.py is `uhd-benchmark`), so `pip install --no-deps -e .` is not needed; do it if you want the
# uhd-* commands.
#
# Each measurement is one `uhd-benchmark` process under its own time limit (the limits add up to 8 min 30 s;
# --limit caps each); a run that fails or runs out of time leaves a line saying so and the rest still run. Out
# (default ./gpu-results-UTCSTAMP): results.jsonl (one JSON line per measurement: label, result, UTC time, commit,
# package versions, device), table.md (printed at the end: each result beside its target), LABEL.log per measurement.
#
#   uhd_v1_1b_sft        UHD v1 1B-class SFT step, B=8, L=2048                       MFU (target >= 55%)
#   uhd_v2_7b_pretrain   UHD v2 7B pretrain step (frozen LLM), B=8, L=3072           MFU (target >= 45%)
#   llava15_1b_vs_torch  LLaVA-1.5 1B SFT step vs transformers (--compare torch)     ratio (target >= 1.5x)
#   jbu_b16_memory       the `jbu` step at batch 16: XLA's analysis, then run         peak memory (<= 40 GB)
#   decode_7b            Vicuna-7B decode at batch 1 and 32, bf16 weights            tokens/s vs the bandwidth bound
#                        (in LLaVA-1.5 7B: UHD v2 7B decodes with the same LLM       (target >= 70% at batch 1)
#                        and compiles a costlier prefill 4 times)
#
# --tiny runs the same measurements on the configs' tiny variants with a few steps (any machine, the CPU included:
# tests/test_gpu_script.py). PYTHON picks the interpreter (default python3); UHD_JAX_COMMIT names the commit when
# the checkout was copied without .git.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TINY=0
WHEELS=""
OUT=""
ONLY=""
CAP=""

usage() { sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu.sh: $*" >&2; exit 2; }

prepare_wheels() {
    local dir="$1"
    mkdir -p "$dir" || die "cannot create $dir"
    # the manylinux tags pip must accept by name; pure-Python wheels match any of them
    local tags=()
    for t in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        tags+=(--platform "$t")
    done
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${tags[@]}" -d "$dir" -r "$REPO/benchmarks/wheels.txt" || die "pip download failed (see above)"
    echo "gpu.sh: wheels for Python 3.12 / manylinux x86_64 in $dir; on the node: benchmarks/gpu.sh --wheels $dir"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prepare-wheels) [ $# -ge 2 ] || die "--prepare-wheels needs a folder"; prepare_wheels "$2"; exit 0 ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
        --only) [ $# -ge 2 ] || die "--only needs labels, e.g. decode_7b,jbu_b16_memory"; ONLY="$2"; shift 2 ;;
        --limit) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "--limit needs whole seconds, e.g. 60"; CAP="$2"
                 shift 2 ;;
        --tiny) TINY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (benchmarks/gpu.sh --help)" ;;
    esac
done

OUT="${OUT:-gpu-results-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT" || die "cannot create $OUT"
OUT="$(cd "$OUT" && pwd)"
RESULTS="$OUT/results.jsonl"

if [ -n "$WHEELS" ]; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || die "--wheels $WHEELS holds no .whl files (make them with --prepare-wheels)"
    SITE="$OUT/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || die "installing the wheels from $WHEELS failed (see above)"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${UHD_JAX_COMMIT:-}" ] && git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
    dirty=$(git -C "$REPO" status --porcelain --untracked-files=no)
    export UHD_JAX_COMMIT="$(git -C "$REPO" rev-parse --short=12 HEAD)${dirty:++dirty}"
fi

missing=$("$PYTHON" - <<'EOF'
import importlib.util
need = ["jax", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "tensorboardX", "tqdm", "absl",
        "safetensors", "PIL", "transformers", "torch"]
print(" ".join(n for n in need if importlib.util.find_spec(n.split(".")[0]) is None))
EOF
) || die "$PYTHON does not run"
[ -z "$missing" ] || die "$PYTHON lacks: $missing; on a networked machine run benchmarks/gpu.sh --prepare-wheels" \
    "DIR, carry DIR here and pass --wheels DIR"

# each measurement: label, time limit (s), environment (VAR=value, or ""), then uhd-benchmark's arguments
LABELS=() LIMITS=() ENVS=() ARGS=()
add() { LABELS+=("$1"); LIMITS+=("$2"); ENVS+=("$3"); shift 3; ARGS+=("$*"); }
if [ "$TINY" = 1 ]; then
    add uhd_v1_1b_sft 240 "" --config configs/uhd_v1.py:tiny --stage sft --mode train --batch-size 2 \
        --seq-len 640 --steps 2 --warmup 0 --images 112x112 --mesh 1,1,1
    add uhd_v2_7b_pretrain 240 "" --config configs/uhd_v2.py:7b_tiny --stage pretrain --mode train --batch-size 2 \
        --seq-len 640 --steps 2 --warmup 0 --images 112x112 --mesh 1,1,1
    add llava15_1b_vs_torch 240 "" --config configs/llava15.py:tiny --stage sft --mode train --batch-size 2 \
        --seq-len 192 --steps 2 --warmup 0 --images 56x56 --mesh 1,1,1 --compare torch
    add jbu_b16_memory 240 "" --config configs/uhd_v2.py:7b_tiny --stage jbu --mode memory --batch-size 16 \
        --execute --steps 1 --warmup 0
    add decode_7b 240 "" --config configs/llava15.py:tiny --mode generate --images 56x56 --prompt-words 8 \
        --max-new-tokens 3 --repeats 1 --config.model.param_dtype=bfloat16
else
    add uhd_v1_1b_sft 100 "" --config configs/uhd_v1.py:1b --stage sft --mode train --batch-size 8 \
        --seq-len 2048 --steps 10 --warmup 2 --images 672x1088,1920x1080,336x336 --mesh 1,1,1
    add uhd_v2_7b_pretrain 130 "" --config configs/uhd_v2.py:7b --stage pretrain --mode train --batch-size 8 \
        --steps 10 --warmup 2 --images 672x1088,1920x1080,336x336 --mesh 1,1,1
    # XLA's allocator takes 75% of the GPU by default; transformers' step, in the same process, needs room beside it
    add llava15_1b_vs_torch 110 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 --config configs/llava15.py:1b --stage sft \
        --mode train --batch-size 8 --seq-len 2048 --steps 10 --warmup 2 --images 336x336 --mesh 1,1,1 \
        --compare torch
    add jbu_b16_memory 60 "" --config configs/uhd_v2.py:7b --stage jbu --mode memory --batch-size 16 --execute \
        --steps 5 --warmup 1
    add decode_7b 110 "" --config configs/llava15.py:7b --mode generate --images 336x336 --max-new-tokens 32 \
        --repeats 2 --config.model.param_dtype=bfloat16
fi

labels=$(IFS=,; echo "${LABELS[*]}")
for want in ${ONLY//,/ }; do
    [[ ",$labels," == *",$want,"* ]] || die "--only $want: no such measurement; choose from $labels"
done

lines() { [ -f "$RESULTS" ] && wc -l <"$RESULTS" || echo 0; }

record_failure() {   # label status rc wall limit log args...
    "$PYTHON" - "$@" >>"$RESULTS" <<'EOF'
import json, sys
from uhd_jax.perf.report import provenance
label, status, rc, wall, limit, log, *args = sys.argv[1:]
get = lambda flag: args[args.index(flag) + 1] if flag in args else None
print(json.dumps({"label": label, "status": status, "rc": int(rc), "wall_s": int(wall), "limit_s": int(limit),
                  "log": log, "config": get("--config"), "stage": get("--stage"), "mode": get("--mode"),
                  **provenance()}))
EOF
}

start=$SECONDS
for i in "${!LABELS[@]}"; do
    label=${LABELS[$i]} limit=${LIMITS[$i]} envs=${ENVS[$i]} args=${ARGS[$i]}
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$label,"* ]]; then
        continue
    fi
    if [ -n "$CAP" ] && [ "$CAP" -lt "$limit" ]; then
        limit=$CAP
    fi
    log="$OUT/$label.log"
    echo "gpu.sh: $label (limit ${limit}s): uhd-benchmark $args" | tee "$log"
    before=$(lines)
    t0=$SECONDS
    # shellcheck disable=SC2086  # the argument string splits into words on purpose
    # each measurement writes its own workload (samples, tokenizer) under OUT: runs beside this one never share it
    env $envs timeout --kill-after=10 "$limit" "$PYTHON" "$REPO/launch/benchmark.py" $args --label "$label" \
        --workdir "$OUT/workload/$label" --out "$RESULTS" >>"$log" 2>&1
    rc=$?
    wall=$((SECONDS - t0))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status=timeout
    elif [ "$rc" != 0 ] || [ "$(lines)" = "$before" ]; then
        status=failed
    else
        status=ok
    fi
    if [ "$status" != ok ]; then
        tail -n 5 "$log" | sed 's/^/    /'
        # shellcheck disable=SC2086
        record_failure "$label" "$status" "$rc" "$wall" "$limit" "$log" $args
    fi
    echo "gpu.sh: $label $status in ${wall}s"
done

echo "gpu.sh: $((SECONDS - start))s for the measurements; $RESULTS"
[ -s "$RESULTS" ] || die "no results in $RESULTS"
"$PYTHON" -m uhd_jax.perf.report "$RESULTS" | tee "$OUT/table.md"
