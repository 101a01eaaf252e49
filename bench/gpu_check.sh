#!/usr/bin/env bash
# The GPU checks and benchmarks for a lent H100/H200 (the device tool's `run`: one shell command in a
# copy of this working tree, Python 3.12 with torch 2.11 and torchvision 0.26, nvcc 13.0, 16 cores, and
# NO Ray, pycocotools or s3fs), in two calls of at most 6 minutes each, so that both fit the 15 minutes
# of device time with the machine's starts (it goes back 30 s after a call: the second call usually
# starts a fresh machine, which is why the first call hands back the extension it built):
#
#   bash bench/gpu_check.sh check [--dry-run]     # call 1: build, CUDA tests, compute-sanitizer, host syncs, bf16 accuracy
#   bash bench/gpu_check.sh bench [--dry-run]     # call 2: the benchmarks
#
# 0. Once, here, before call 1: the wheels the machine lacks, into .whl/ (gitignored):
#      .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl pycocotools==2.0.11
#    (pycocotools-2.0.11-cp312-abi3-manylinux...whl, 0.4 MB; it needs only numpy, which the machine has.
#    tests/test_rle.py, test_paste.py, test_predictor.py, test_infer_sized_decode.py, bench/sync_count.py
#    (the Predictor's RLE masks), bench/pipeline.py and bench/postprocess.py import it.) The machine's image
#    lists setuptools, which `setup.py build_ext` needs; only if the build step says "setuptools is
#    missing", add it the same way (pure Python: `... -d .whl setuptools==80.9.0`); it is installed only
#    when `import setuptools` fails. Keep one version of each package in .whl/.
# 1. run(command="bash bench/gpu_check.sh check", carry=[".whl"], timeout_s=360)
#    Step budgets (seconds): wheels 8, env 10, build 115 (16 cores; MAX_JOBS=$(nproc), TORCH_CUDA_ARCH_LIST=9.0),
#    tests-cuda-build 15, tests-ops 45, tests-model 55, exif-nvjpeg 10, sanitizer 30, sync-count 19,
#    bf16-check 20: 327 s in all. A step's time limit is its budget plus what the steps before it left
#    unused (a quick build leaves more to the tests and the sanitizer), never past the 340 s deadline
#    (GPU_CHECK_DEADLINE); a step with under 3 s left is skipped.
#    The bf16 check (bench/bf16.py --check) runs the well-conditioned seeded probe (--zero-init-residual
#    --logit-scale 100, see bench/bf16.py); the bench call's bf16-speed runs the default probe.
#    Comes back (7 files): env.txt, build.log, tests.log, sanitizer.log, device.txt (sync count + bf16
#    accuracy), summary.txt, and the extension it built, _C.cpython-312-x86_64-linux-gnu.so (gzipped,
#    .so.gz, only if over 15 MiB). The summary is also the last thing printed. Then, here:
#      cp <files_at>/_C.cpython-312-x86_64-linux-gnu.so mrcnn/     # gitignored; the local cp311 build stays
# 2. run(command="bash bench/gpu_check.sh bench", carry=[".whl", "mrcnn/_C.cpython-312-x86_64-linux-gnu.so"], timeout_s=360)
#    Step budgets: wheels 8, env 10, extension 75 (a few seconds when the extension is carried; without it
#    this call builds and the last benchmarks may be cut by the deadline), roi-align 30, model 40,
#    train-speed 35, pipeline-640 30, pipeline-12mp 40, postprocess 20, bf16-speed 35: 323 s in all.
#    Comes back (at most 8 files): env.txt, bench-ops.log (bench/roi_align.py and its table),
#    bench-model.log (bench/model.py, bench/train_speed.py), bench-pipeline.log (bench/pipeline.py --no-ray
#    at 640x480 and 4032x3024, bench/postprocess.py; skipped without pycocotools), bf16.log, bf16.md,
#    summary.txt, and build.log only if it had to build. Then give_back, unless you rerun at once.
#    With less device time left: GPU_CHECK_DEADLINE=200 bash bench/gpu_check.sh bench (later steps are cut).
#
# Every step runs (no set -e) under its own timeout; the summary lists each step's PASS/FAIL/SKIP and
# seconds; the exit status is 1 when a step failed. Files land in $OUT (./gpu-out when OUT is unset);
# at most 8 files come back from the device, and the script fails when it wrote more or a name it did not
# declare. MAX_SYNCS (default 40) is bench/sync_count.py's --max-syncs. PYTHON (default python3) is the
# interpreter.
#
# --dry-run (CI, no GPU; under a minute): the same argument parsing, env.txt, detection of an extension
# already built, step timeouts, file count and summary; the CUDA steps are SKIPs ("no CUDA device"), and
# what runs on a CPU cheaply runs: tests/test_cuda_build.py (it reads the PTX of the built extension),
# bench/sync_count.py without --require-cuda (it says "skipped"), bench/bf16.py --help, and the options the
# bench steps pass are checked against each script's add_argument calls. Nothing is built or installed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

usage() {
  echo "usage: bash bench/gpu_check.sh check|bench [--dry-run]   (see the header of bench/gpu_check.sh)"
}
MODE="" DRY=0
for arg in "$@"; do
  case "$arg" in
    check|bench) MODE=$arg ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; usage >&2; exit 2 ;;
  esac
done
if [ -z "$MODE" ]; then usage >&2; exit 2; fi

OUT=${OUT:-gpu-out}
mkdir -p "$OUT" || exit 2
PY=${PYTHON:-python3}
MAX_SYNCS=${MAX_SYNCS:-40}
DEADLINE=${GPU_CHECK_DEADLINE:-340}
MAX_FILES=8
TMPD=$(mktemp -d) || exit 2
trap 'rm -rf "$TMPD"' EXIT
export OUT PY MODE DRY TMPD MAX_SYNCS
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV); do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
  done
fi

# Files each mode may write (the device returns at most 8): checked at the end.
if [ "$MODE" = check ]; then
  DECLARED="env.txt build.log tests.log sanitizer.log device.txt summary.txt _C.*.so _C.*.so.gz"
  DECLARED_MAX=7  # the .so or its .gz, not both
else
  DECLARED="env.txt build.log bench-ops.log bench-model.log bench-pipeline.log bf16.log bf16.md summary.txt"
  DECLARED_MAX=8
fi

T0=$(date +%s%N)
elapsed_ms() { echo $(( ($(date +%s%N) - T0) / 1000000 )); }

read -r HAVE_CUDA GPU_NAME < <("$PY" -c "import torch; ok = torch.cuda.is_available(); print(int(ok), torch.cuda.get_device_name() if ok else 'none')" 2>/dev/null || echo "0 none")
if [ "${HAVE_CUDA:-0}" = 1 ] && [ "$DRY" = 0 ]; then CUDA_OK=1; CUDA_REASON=""
elif [ "${HAVE_CUDA:-0}" = 1 ]; then CUDA_OK=0; CUDA_REASON="dry run"
else CUDA_OK=0; CUDA_REASON="no CUDA device"; fi
export HAVE_CUDA GPU_NAME CUDA_OK CUDA_REASON

# ------------------------------------------------------------------ helpers (run inside the steps)
note() { printf '%s\n' "$*" >> "$TMPD/note"; }          # the step's note: first line, then details
skip() { note "$*"; exit 77; }                           # a step function ends as SKIP
have_module() { "$PY" -c "import $1" >/dev/null 2>&1; }
inner_budget() {  # a command's timeout inside its step: the step's budget less a reserve (at most a quarter)
  local reserve=${1:-12}
  [ "$reserve" -gt $(( STEP_BUDGET / 4 )) ] && reserve=$(( STEP_BUDGET / 4 ))
  local t=$(( STEP_BUDGET - reserve )); [ "$t" -lt 3 ] && t=3
  echo "$t"
}

# The options a command passes exist in the script (its add_argument("--x", ...) calls).
check_options() {
  local script=$1; shift
  [ -f "$script" ] || { note "$script is not in this tree"; return 1; }
  local opt bad=""
  for opt in "$@"; do
    case "$opt" in --*) grep -q -- "\"${opt%%=*}\"" "$script" || bad="$bad $opt" ;; esac
  done
  if [ -n "$bad" ]; then note "$script has no option(s):$bad"; return 1; fi
}

# ------------------------------------------------------------------ steps
step_wheels() {
  local wheels=() w
  for w in .whl/*.whl; do [ -f "$w" ] && wheels+=("$w"); done
  local names; names=$(for w in "${wheels[@]}"; do basename "$w"; done | paste -sd ' ')
  if [ "$DRY" = 1 ]; then skip "dry run: nothing installed (.whl/: ${names:-none})"; fi
  if [ "${#wheels[@]}" = 0 ]; then
    have_module pycocotools && { note "no .whl/; pycocotools is importable already"; exit 0; }
    skip "no .whl/ carried: pycocotools is missing, the tests and benchmarks that import it fail or are skipped (header, step 0)"
  fi
  local install=()
  for w in "${wheels[@]}"; do
    case "$(basename "$w")" in
      setuptools-*) have_module setuptools || install+=("$w") ;;  # only when the machine has none
      *) install+=("$w") ;;
    esac
  done
  if [ "${#install[@]}" -gt 0 ]; then
    timeout -k 5 "$(inner_budget 3)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site "${install[@]}" || { note "pip install --target /tmp/site failed"; exit 1; }
  fi
  touch "$TMPD/site"
  PYTHONPATH="$PYTHONPATH:/tmp/site" "$PY" -c "import pycocotools" 2>/dev/null \
    || { note "installed ${names} but pycocotools does not import"; exit 1; }
  note "installed into /tmp/site: $names"
}

step_env() {
  {
    echo "# bash bench/gpu_check.sh $MODE$([ "$DRY" = 1 ] && echo ' --dry-run'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "## nvidia-smi"
    nvidia-smi 2>&1 || echo "(nvidia-smi: not available)"
    echo "## GPU"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "(none)"
    echo "## Python, torch"
    "$PY" -c "
import platform, sys, torch, torchvision
print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())
print('torchvision', torchvision.__version__)
print('GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none',
      torch.cuda.get_device_capability() if torch.cuda.is_available() else '')
print('threads', torch.get_num_threads(), 'machine', platform.machine())" 2>&1
    echo "## nvcc (CUDA_HOME=${CUDA_HOME:-unset})"
    if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then "$CUDA_HOME/bin/nvcc" --version 2>&1; else echo "(nvcc: not found)"; fi
    echo "## compute-sanitizer"
    find_sanitizer || echo "(not found)"
    echo "## modules"
    for m in pycocotools setuptools xdist ray s3fs; do
      if PYTHONPATH="$PYTHONPATH:/tmp/site" have_module "$m"; then echo "$m: yes"; else echo "$m: no"; fi
    done
    echo "## machine"
    echo "nproc $(nproc); $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null); kernel $(uname -r)"
  } > "$OUT/env.txt" 2>&1
  local drv nvcc_v py_v torch_v
  drv=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
  nvcc_v=$(grep -o 'release [0-9.]*' "$OUT/env.txt" | head -1)
  py_v=$(grep -m1 '^python ' "$OUT/env.txt" | cut -d' ' -f2)
  torch_v=$(grep -m1 '^torch ' "$OUT/env.txt" | cut -d' ' -f2-4)
  note "GPU ${GPU_NAME} (driver ${drv:-none}); torch ${torch_v}; $(grep -m1 '^torchvision ' "$OUT/env.txt"); nvcc ${nvcc_v:-none}; Python ${py_v}; $(nproc) cores"
  if [ "$DRY" = 0 ] && [ "$HAVE_CUDA" != 1 ]; then note "no CUDA device visible: this is not a GPU machine (--dry-run checks the script)"; exit 1; fi
}

find_sanitizer() {
  local c
  for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer \
           "$(command -v compute-sanitizer 2>/dev/null)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

# The extension as it imports now: "FILE WITH_CUDA TORCH_VERSION" (nothing when it does not import).
extension_state() {
  "$PY" -c "import torch, mrcnn._C as c, mrcnn.ops as m; print(c.__file__, int(m.WITH_CUDA), torch.__version__)" 2>/dev/null
}

copy_extension() {  # into $OUT, for the second call to carry (gzipped only when too big to come back)
  local so=$1 size
  size=$(stat -c %s "$so")
  if [ "$size" -gt $(( 15 * 1024 * 1024 )) ]; then
    gzip -1 -c "$so" > "$OUT/$(basename "$so").gz"
    note "copied to OUT as $(basename "$so").gz ($size bytes unzipped): gunzip it into mrcnn/"
  else
    cp "$so" "$OUT/"
    note "copied to OUT: $(basename "$so") ($size bytes): cp it into mrcnn/ here and carry it in call 2"
  fi
}

step_build() {  # build (check) or extension (bench): skipped when a CUDA build for this torch imports
  local state file cuda torch_v
  state=$(extension_state)
  read -r file cuda torch_v <<< "$state"
  if [ -n "$file" ] && [ "$cuda" = 1 ]; then
    note "extension $(basename "$file") imports with CUDA kernels for torch $torch_v: not rebuilt"
    [ "$MODE" = check ] && copy_extension "$file"
    exit 0
  fi
  local found; found=$(ls mrcnn/_C*.so 2>/dev/null | tr '\n' ' ')
  if [ "$CUDA_OK" != 1 ]; then
    skip "$CUDA_REASON: not building here (mrcnn/_C*.so: ${found:-none}${file:+, imports without CUDA kernels})"
  fi
  local extra=""
  if ! "$PY" -c "import setuptools" 2>/dev/null; then
    local w; w=$(ls .whl/setuptools-*.whl 2>/dev/null | head -1)
    if [ -z "$w" ]; then note "setuptools is missing: carry its wheel in .whl/ (header, step 0)"; exit 1; fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-setuptools "$w" \
      || { note "setuptools is missing and $w did not install"; exit 1; }
    extra=/tmp/site-setuptools
  fi
  echo "building with $(nproc) jobs, TORCH_CUDA_ARCH_LIST=9.0, CUDA_HOME=${CUDA_HOME:-unset} (found before: ${found:-none})"
  if ! PYTHONPATH="$PYTHONPATH${extra:+:$extra}" MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=9.0 MRCNN_WITH_CUDA=1 \
       timeout -k 10 "$(inner_budget 8)" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"
    note "the build failed or timed out: see build.log"
    exit 1
  fi
  state=$(extension_state)
  read -r file cuda torch_v <<< "$state"
  if [ -z "$file" ] || [ "$cuda" != 1 ]; then
    note "built, but mrcnn.ops.WITH_CUDA is not true (${file:-does not import})"
    exit 1
  fi
  note "built $(basename "$file") with CUDA kernels"
  [ "$MODE" = check ] && copy_extension "$file"
  exit 0
}

# Per-file results of one pytest run's -v output (with or without xdist), one line per file.
summarize_tests() {
  "$PY" - "$@" <<'EOF'
import collections, re, sys
chunk, files = sys.argv[1], sys.argv[2:]
text = open(chunk, errors="replace").read()
counts = {f: collections.Counter() for f in files}
errors, collecting = {}, None
status = re.compile(r"\b(PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)\b")
for line in text.splitlines():
    if line.startswith(("tests/", "[gw")):
        m, s = re.search(r"(tests/\S+?\.py)::", line), status.search(line)
        if m and s and m.group(1) in counts:
            counts[m.group(1)][s.group(1).lower()] += 1
    m = re.match(r"_+ ERROR collecting (tests/\S+?\.py) _+$", line)
    if m:
        collecting = m.group(1)
    elif collecting and line.startswith("E   "):
        errors.setdefault(collecting, line[4:].strip()[:150])
        collecting = None
    m = re.match(r"ERROR (tests/\S+?\.py)(?: - (.*))?$", line)
    if m and m.group(1) in counts:
        errors.setdefault(m.group(1), (m.group(2) or "collection error")[:150])
for f in files:
    c = counts[f]
    parts = [f"{c[k]} {k}" for k in ("passed", "failed", "error", "skipped", "xfail", "xpass") if c[k]]
    if f in errors:
        parts.insert(0, f"COLLECTION ERROR: {errors[f]}")
    print(f"{f}: {', '.join(parts) if parts else 'no results (not reached before the timeout?)'}")
EOF
}

# Tests that need Ray (deselected by name where Ray is absent; the device has none): they run the
# job's driver (jobs.infer.pipeline.run_job imports ray.exceptions), through tests/conftest.py's
# run_in_process fixture (execution.InProcess).
RAY_TESTS="tests/test_infer_sized_decode.py::test_the_decode_mode_is_an_output_setting
tests/test_infer_sized_decode.py::test_device_decode_through_the_job"
export RAY_TESTS

tests_group() {  # tests_group NEEDS_CUDA FILE...: one pytest call over whole files, into tests.log
  local needs_cuda=$1; shift
  local files=() absent=() f
  for f in "$@"; do
    if [ -f "$f" ]; then files+=("$f"); else absent+=("$f"); fi
  done
  if [ "$needs_cuda" = 1 ] && [ "$CUDA_OK" != 1 ]; then
    note "$CUDA_REASON: ${#files[@]} test files not run"
    for f in "${files[@]}"; do note "$f: not run"; done
    for f in "${absent[@]}"; do note "$f: not in this tree"; done
    exit 77
  fi
  [ "${#files[@]}" -gt 0 ] || skip "no test file present"
  local args=(-v -ra -p no:cacheprovider -o faulthandler_timeout=60 --continue-on-collection-errors)
  local details="$TMPD/details"
  : > "$details"
  if ! have_module ray; then
    local t
    for t in $RAY_TESTS; do
      case " ${files[*]} " in
        *" ${t%%::*} "*) args+=(--deselect "$t"); echo "deselected (needs Ray, absent here): $t" >> "$details" ;;
      esac
    done
  fi
  if [ "${#files[@]}" -gt 1 ] && have_module xdist; then
    local n=${#files[@]} cores; cores=$(nproc)
    [ "$n" -gt 6 ] && n=6
    [ "$n" -gt "$cores" ] && n=$cores
    args+=(-n "$n" --dist loadfile)
    local threads=$(( cores / n )); [ "$threads" -lt 1 ] && threads=1
    export OMP_NUM_THREADS=$threads  # n workers share the cores
  fi
  local log="$OUT/tests.log" start
  start=$(stat -c %s "$log" 2>/dev/null || echo 0)
  echo "=== pytest ${args[*]} ${files[*]}" >> "$log"
  local budget; budget=$(inner_budget 12)
  timeout -k 10 "$budget" "$PY" -m pytest "${args[@]}" "${files[@]}" >> "$log" 2>&1
  local rc=$?
  case $rc in 124|137) echo "=== TIMED OUT (pytest killed after $budget s)" >> "$log" ;; esac
  tail -c +$(( start + 1 )) "$log" > "$TMPD/chunk"
  local last
  last=$(grep -E '^=+ .*(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$TMPD/chunk" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
  case $rc in 124|137) last="pytest killed after $budget s${last:+; $last}" ;; esac
  note "${last:-no pytest summary line (see tests.log)}"
  summarize_tests "$TMPD/chunk" "${files[@]}" >> "$TMPD/note"
  for f in "${absent[@]}"; do note "$f: not in this tree (not run)"; done
  cat "$details" >> "$TMPD/note"
  grep -E '^SKIPPED \[' "$TMPD/chunk" | head -n 8 | sed 's/^/  /' >> "$TMPD/note"
  grep -E '^(FAILED|ERROR) ' "$TMPD/chunk" | head -n 8 | sed 's/^/  /' >> "$TMPD/note"
  cat "$TMPD/note"
  exit $rc
}

EXIF_TEST="tests/test_infer_sized_decode.py::test_nvjpeg_turns_every_exif_orientation"
export EXIF_TEST
step_exif() {  # EXIF orientations 1-8 (3 and 6 among them) through nvJPEG: its line in tests.log, or run it now
  [ "$CUDA_OK" = 1 ] || skip "$CUDA_REASON"
  local line
  line=$(grep -E "^(tests/|\[gw).*${EXIF_TEST#*::}" "$OUT/tests.log" 2>/dev/null | tail -n 1)
  if [ -z "$line" ]; then
    echo "not in tests.log (its group did not reach it): running it alone"
    echo "=== pytest $EXIF_TEST" >> "$OUT/tests.log"
    timeout -k 10 "$(inner_budget 3)" "$PY" -m pytest -v -rs -p no:cacheprovider "$EXIF_TEST" >> "$OUT/tests.log" 2>&1
    line=$(grep -E "^(tests/|\[gw).*${EXIF_TEST#*::}" "$OUT/tests.log" | tail -n 1)
  fi
  note "${line:-no result for $EXIF_TEST}"
  case "$line" in
    *PASSED*) exit 0 ;;
    *SKIPPED*) note "skipped on a CUDA machine"; exit 1 ;;
    *) exit 1 ;;
  esac
}

step_sanitizer() {
  [ "$CUDA_OK" = 1 ] || skip "$CUDA_REASON"
  local cs; cs=$(find_sanitizer) || { note "compute-sanitizer not found under \$CUDA_HOME/bin or /usr/local/cuda*/bin"; exit 1; }
  # no caching allocator: an access past a tensor then lands outside its allocation, where memcheck sees it
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$(inner_budget 5)" "$cs" --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest -q -rs -p no:cacheprovider -o faulthandler_timeout=60 tests/test_roi_align_cuda.py \
    -k "edge or raw or zero or multiscale_matches" > "$OUT/sanitizer.log" 2>&1
  local rc=$?
  note "$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -n 1) | pytest: $(grep -E '(passed|failed|error)' "$OUT/sanitizer.log" | tail -n 1)"
  tail -n 5 "$OUT/sanitizer.log"
  exit $rc
}

step_sync_count() {
  [ -f bench/sync_count.py ] || skip "bench/sync_count.py is not in this tree"
  if [ "$CUDA_OK" != 1 ]; then
    [ "$HAVE_CUDA" = 1 ] && skip "$CUDA_REASON"
    # without a GPU it only says so (exit 0): a check that it starts
    echo "=== python3 bench/sync_count.py (no CUDA device: no --require-cuda)" >> "$OUT/device.txt"
    timeout -k 5 "$(inner_budget 3)" "$PY" bench/sync_count.py >> "$OUT/device.txt" 2>&1 \
      || { note "bench/sync_count.py failed without a GPU"; exit 1; }
    skip "$CUDA_REASON (bench/sync_count.py: $(tail -n 1 "$OUT/device.txt"))"
  fi
  echo "=== python3 bench/sync_count.py --require-cuda --max-syncs $MAX_SYNCS" >> "$OUT/device.txt"
  timeout -k 10 "$(inner_budget 3)" "$PY" bench/sync_count.py --require-cuda --max-syncs "$MAX_SYNCS" > "$TMPD/sync.txt" 2>&1
  local rc=$?
  cat "$TMPD/sync.txt" >> "$OUT/device.txt"
  grep -v '^{' "$TMPD/sync.txt" | tail -n 16
  note "$(grep -m1 'host syncs in one' "$TMPD/sync.txt" || tail -n 1 "$TMPD/sync.txt") (--max-syncs $MAX_SYNCS)"
  exit $rc
}

step_bf16_check() {
  [ -f bench/bf16.py ] || { note "bench/bf16.py is not in this tree"; exit 1; }
  if [ "$CUDA_OK" != 1 ]; then
    "$PY" bench/bf16.py --help > /dev/null || { note "bench/bf16.py --help failed"; exit 1; }
    check_options bench/bf16.py --device --check --no-speed --zero-init-residual --logit-scale || exit 1
    skip "$CUDA_REASON (bench/bf16.py --help ran)"
  fi
  # the well-conditioned seeded probe: with the default one (class logits x20 on activations that grow
  # through the random ResNet) scores tie at 1.0 and boxes are slivers at the regression clamp, and
  # fp32 NCHW against fp32 channels-last alone already loses a fifth of the matches (the "floor")
  local args=(--device cuda --check --no-speed --zero-init-residual --logit-scale 100)
  echo "=== python3 bench/bf16.py ${args[*]}" >> "$OUT/device.txt"
  timeout -k 10 "$(inner_budget 3)" "$PY" bench/bf16.py "${args[@]}" > "$TMPD/bf16.txt" 2>&1
  local rc=$?
  cat "$TMPD/bf16.txt" >> "$OUT/device.txt"
  grep -v '^{' "$TMPD/bf16.txt" | tail -n 14
  note "$(grep -m1 -E '^  fp32 detections [0-9]' "$TMPD/bf16.txt" | cut -c3-80) | $(grep -m1 -E '^  box IoU mean' "$TMPD/bf16.txt" | cut -c3-) | $(grep -m1 -E '^CHECK' "$TMPD/bf16.txt" || tail -n 1 "$TMPD/bf16.txt")"
  grep -m1 -E '^  floor' "$TMPD/bf16.txt" | cut -c3- >> "$TMPD/note"
  exit $rc
}

# A benchmark: the options checked against the script, then (on a GPU) run into LOG.
bench_cmd() {  # bench_cmd LOG MODULE_NEEDED|- SCRIPT ARGS...
  local log=$1 module=$2 script=$3; shift 3
  check_options "$script" "$@" || exit 1
  [ "$CUDA_OK" = 1 ] || skip "$CUDA_REASON (the options of $script were checked)"
  if [ "$module" != - ] && ! have_module "$module"; then skip "no $module: carry its wheel in .whl/ (header, step 0)"; fi
  local start; start=$(stat -c %s "$OUT/$log" 2>/dev/null || echo 0)
  echo "=== python3 $script $*" >> "$OUT/$log"
  timeout -k 10 "$(inner_budget 3)" "$PY" "$script" "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  case $rc in 124|137) echo "=== TIMED OUT" >> "$OUT/$log" ;; esac
  tail -c +$(( start + 1 )) "$OUT/$log" | grep -v '^{' | tail -n 14
  exit $rc
}

step_roi_align() {
  ( bench_cmd bench-ops.log - bench/roi_align.py --device cuda --repeat 20 --markdown "$TMPD/roi_align.md" )
  local rc=$?
  [ -f "$TMPD/roi_align.md" ] && cat "$TMPD/roi_align.md" >> "$OUT/bench-ops.log"
  exit $rc
}

# ------------------------------------------------------------------ the runner
RESULTS=()   # "name<TAB>status<TAB>seconds<TAB>budget<TAB>note (first line)"
DETAILS=()   # indented detail lines, in order, each "name<TAB>text"
BUDGETS=0
SLACK=0
export -f $(compgen -A function)

run_step() {  # run_step NAME BUDGET COMMAND (a step function, or a bench_cmd line)
  local name=$1 budget=$2 cmd=$3
  BUDGETS=$(( BUDGETS + budget ))
  local left=$(( DEADLINE - $(elapsed_ms) / 1000 ))
  local t=$(( budget + SLACK ))  # its own budget and what the steps before it left unused
  [ "$t" -gt "$left" ] && t=$left
  : > "$TMPD/note"
  if [ "$t" -lt 3 ]; then
    RESULTS+=("$name	SKIP	0.0	$budget	no time left before the ${DEADLINE} s deadline")
    echo "== $name: SKIP (no time left)"
    return
  fi
  echo
  echo "== $name (budget $budget s, limit $t s)"
  local t0; t0=$(elapsed_ms)
  STEP_BUDGET=$t timeout -k 10 "$t" bash -c "$cmd"
  local rc=$?
  local ms=$(( $(elapsed_ms) - t0 ))
  SLACK=$(( SLACK + budget - (ms + 999) / 1000 )); [ "$SLACK" -lt 0 ] && SLACK=0
  local secs; secs=$(printf '%d.%d' $(( ms / 1000 )) $(( ms % 1000 / 100 )))
  local first rest status
  first=$(head -n 1 "$TMPD/note")
  case $rc in
    0) status=PASS ;;
    77) status=SKIP ;;
    124|137) status=FAIL; first="timed out after ${t} s${first:+; $first}" ;;
    *) status=FAIL; first="exit $rc${first:+; $first}" ;;
  esac
  RESULTS+=("$name	$status	$secs	$budget	$first")
  while IFS= read -r rest; do DETAILS+=("$name	$rest"); done < <(tail -n +2 "$TMPD/note")
  echo "-- $name: $status in ${secs} s${first:+: $first}"
}

if [ "$MODE" = check ]; then
  run_step wheels 8 step_wheels
  [ -f "$TMPD/site" ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  run_step env 10 step_env
  run_step build 115 step_build
  run_step tests-cuda-build 15 "tests_group 0 tests/test_cuda_build.py"
  run_step tests-ops 45 "tests_group 1 tests/test_roi_align_cuda.py tests/test_roi_align.py tests/test_roi_pool.py tests/test_multiscale_roi_align.py"
  run_step tests-model 55 "tests_group 1 tests/test_rle.py tests/test_paste.py tests/test_predictor.py tests/test_infer_sized_decode.py tests/test_infer_stages.py tests/test_bf16_geometry.py"
  run_step exif-nvjpeg 10 step_exif
  run_step sanitizer 30 step_sanitizer
  run_step sync-count 19 step_sync_count
  run_step bf16-check 20 step_bf16_check
else
  run_step wheels 8 step_wheels
  [ -f "$TMPD/site" ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  run_step env 10 step_env
  run_step extension 75 step_build
  run_step roi-align 30 step_roi_align
  run_step model 40 "bench_cmd bench-model.log - bench/model.py --device cuda --batch 8 --repeat 5"
  run_step train-speed 35 "bench_cmd bench-model.log - bench/train_speed.py --device cuda --batch 4 --size 800x1066 --steps 10 --warmup 3 --rounds 2"
  run_step pipeline-640 30 "bench_cmd bench-pipeline.log pycocotools bench/pipeline.py --no-ray --device cuda --size 640x480 --images 256"
  run_step pipeline-12mp 40 "bench_cmd bench-pipeline.log pycocotools bench/pipeline.py --no-ray --device cuda --size 4032x3024 --images 32"
  run_step postprocess 20 "bench_cmd bench-pipeline.log pycocotools bench/postprocess.py --device cuda --repeat 3"
  run_step bf16-speed 35 "bench_cmd bf16.log - bench/bf16.py --device cuda --repeat 3 --markdown $OUT/bf16.md"
fi

# ------------------------------------------------------------------ files, summary
FILES=() UNDECLARED=()
while IFS= read -r f; do
  FILES+=("$f")
  ok=0
  for pat in $DECLARED; do
    # shellcheck disable=SC2053
    [[ "$f" == $pat ]] && ok=1
  done
  [ "$ok" = 1 ] || UNDECLARED+=("$f")
done < <(cd "$OUT" && find . -type f ! -name summary.txt | sed 's|^\./||' | sort)
NFILES=$(( ${#FILES[@]} + 1 ))  # and summary.txt
if [ "$NFILES" -le "$MAX_FILES" ] && [ "${#UNDECLARED[@]}" = 0 ] && [ "$DECLARED_MAX" -le "$MAX_FILES" ]; then
  RESULTS+=("files	PASS	0.0	0	$NFILES in OUT (at most $MAX_FILES come back; this mode writes at most $DECLARED_MAX): ${FILES[*]} summary.txt")
else
  RESULTS+=("files	FAIL	0.0	0	$NFILES in OUT, at most $MAX_FILES come back${UNDECLARED:+; not declared: ${UNDECLARED[*]}}: ${FILES[*]} summary.txt")
fi

{
  echo "== summary: bash bench/gpu_check.sh $MODE$([ "$DRY" = 1 ] && echo ' --dry-run') | GPU: $GPU_NAME | $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  printf '%-17s %-6s %8s %7s  %s\n' step status seconds budget note
  npass=0 nfail=0 nskip=0
  for r in "${RESULTS[@]}"; do
    IFS=$'\t' read -r name status secs budget first <<< "$r"
    printf '%-17s %-6s %8s %7s  %s\n' "$name" "$status" "$secs" "$budget" "$first"
    for d in "${DETAILS[@]}"; do
      [ "${d%%	*}" = "$name" ] && printf '%17s   %s\n' "" "${d#*	}"
    done
    case $status in PASS) npass=$((npass + 1)) ;; FAIL) nfail=$((nfail + 1)) ;; SKIP) nskip=$((nskip + 1)) ;; esac
  done
  echo "budgets sum to $BUDGETS s (deadline ${DEADLINE} s); took $(( $(elapsed_ms) / 1000 )) s"
  if [ "$nfail" = 0 ]; then echo "RESULT: PASS ($npass PASS, $nskip SKIP)"; else echo "RESULT: FAIL ($nfail FAIL, $npass PASS, $nskip SKIP)"; fi
} > "$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
grep -q '^RESULT: PASS' "$OUT/summary.txt"
