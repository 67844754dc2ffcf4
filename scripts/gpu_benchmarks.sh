#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one go: each benchmark's JSON record is appended to OUT/bench.jsonl and
# its table/log to OUT/bench.log, so a failed or timed-out row does not lose the others.
#
#   bash scripts/gpu_benchmarks.sh [OUT] [ROW ...]      # OUT defaults to bench_gpu/; no ROW = every row
#
# Rows run in the order below (most wanted first); PER_ROW_S (default 240) bounds each one.
set -u
out=${1:-bench_gpu}
shift || true
mkdir -p "$out"
per_row=${PER_ROW_S:-240}
py=${PYTHON:-python3}
cache=${COMPILE_CACHE_DIR:-$(mktemp -d)/rf-compile-cache}
# BENCH_BASE replaces the shared flags, e.g. BENCH_BASE="--flavor tiny --repeats 1" for a CPU dry run
read -r -a base <<< "${BENCH_BASE:---flavor 1.3B --vae wan2.1 --dtype bf16 --device cuda --repeats 5}"

declare -A rows=(
  [plain]="${base[*]}"
  [text_offload]="${base[*]} --text_encoder umt5-xxl --offload_text_encoder"
  [rope32]="${base[*]} --rope_precision float32"
  [rope32_cudnn]="${base[*]} --rope_precision float32 --cudnn_benchmark"
  [compile_cold]="${base[*]} --rope_precision float32 --compile --compile_cache_dir $cache"
  [compile_warm]="${base[*]} --rope_precision float32 --compile --compile_cache_dir $cache"
  [compile_autotune]="${base[*]} --rope_precision float32 --compile --compile_mode max-autotune --compile_cache_dir $cache-at"
)
order=(plain text_offload rope32 rope32_cudnn compile_cold compile_warm compile_autotune)
[ $# -gt 0 ] && order=("$@")

for name in "${order[@]}"; do
  [ -n "${rows[$name]+x}" ] || { echo "unknown row '$name'; rows: ${!rows[*]}" >&2; exit 2; }
  echo "=== $name: scripts/benchmark.py ${rows[$name]}" | tee -a "$out/bench.log"
  start=$(date +%s)
  # shellcheck disable=SC2086  # the row is a list of flags
  timeout "$per_row" "$py" scripts/benchmark.py ${rows[$name]} --json "$out/$name.tmp.json" \
    >/dev/null 2>>"$out/bench.log"
  rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$out/bench.log"
  if [ -s "$out/$name.tmp.json" ]; then
    "$py" -c "import json,sys; r=json.load(open(sys.argv[1])); r['row']=sys.argv[2]; print(json.dumps(r))" \
      "$out/$name.tmp.json" "$name" >> "$out/bench.jsonl"
  fi
  rm -f "$out/$name.tmp.json"
done
"$py" - "$out/bench.jsonl" <<'EOF'
import json, sys
keys = ["ttff_s", "ttff_cold_s", "fps_dit", "fps_dit_vae", "fps_with_text", "fps_end_to_end", "denoise_ms",
        "context_ms", "vae_ms", "peak_mem_gb", "compile_s"]
try:
    lines = open(sys.argv[1]).read().splitlines()
except FileNotFoundError:
    lines = []
print("row".ljust(18) + " ".join(k[:12].rjust(12) for k in keys))
for line in lines:
    r = json.loads(line)
    cells = [r.get(k) for k in keys]
    print(r["row"].ljust(18) + " ".join(("-" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c)).rjust(12)
                                       for c in cells))
EOF
