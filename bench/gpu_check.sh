#!/usr/bin/env bash
# Everything a lent GPU machine should check, in one device call (its budget is 30 minutes):
#   run(command="bash bench/gpu_check.sh", timeout_s=600)
# Builds the extension for the visible GPU, runs the CUDA and CPU operator tests, then the GPU
# benchmarks; logs and tables land in $OUT (the device tool's output folder; ./gpu-out elsewhere).
# That machine has torch and torchvision but no Ray or pycocotools: the pipeline benchmark needs a
# pycocotools wheel carried in .whl/ (see the device tool's README); it is skipped without one.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MRCNN_WITH_CUDA=1
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV); do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
  done
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"

echo "== build (CUDA_HOME=${CUDA_HOME:-unset})"
if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
python3 -c "import mrcnn.ops as m; assert m.WITH_CUDA, 'built without CUDA kernels'" || exit 1

echo "== tests"
python3 -m pytest -q -p no:cacheprovider tests/test_roi_align_cuda.py tests/test_roi_align.py tests/test_roi_pool.py \
    tests/test_multiscale_roi_align.py > "$OUT/tests.log" 2>&1
tail -25 "$OUT/tests.log"

echo "== bench/roi_align.py"
python3 bench/roi_align.py --device cuda --markdown "$OUT/roi_align_cuda.md" > "$OUT/roi_align.log" 2>&1
cat "$OUT/roi_align_cuda.md" 2>/dev/null || tail -20 "$OUT/roi_align.log"

echo "== bench/model.py"
python3 bench/model.py --device cuda --batch 8 --repeat 5 > "$OUT/model_cuda.txt" 2>&1
tail -12 "$OUT/model_cuda.txt"

echo "== bench/train_speed.py"
python3 bench/train_speed.py --device cuda --batch 4 --size 800x1066 > "$OUT/train_speed_cuda.txt" 2>&1
tail -10 "$OUT/train_speed_cuda.txt"

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if python3 -c "import pycocotools" 2>/dev/null; then
  echo "== bench/pipeline.py --no-ray"
  python3 bench/pipeline.py --no-ray --device cuda --size 640x480 --images 256 > "$OUT/pipeline_cuda.txt" 2>&1
  tail -6 "$OUT/pipeline_cuda.txt"
  python3 bench/pipeline.py --no-ray --device cuda --size 4032x3024 --images 64 > "$OUT/pipeline_cuda_12mp.txt" 2>&1
  tail -6 "$OUT/pipeline_cuda_12mp.txt"
  echo "== bench/postprocess.py --device cuda (box-local RLE vs the dense paste; includes test_rle on CUDA)"
  python3 -m pytest -q -p no:cacheprovider tests/test_rle.py > "$OUT/test_rle.log" 2>&1; tail -3 "$OUT/test_rle.log"
  echo "== nvJPEG decode on the actor, and the overlapped actor on CUDA"
  python3 -m pytest -q -p no:cacheprovider tests/test_infer_sized_decode.py -k "nvjpeg or predictor_maps" \
      tests/test_infer_stages.py > "$OUT/test_device_decode.log" 2>&1; tail -3 "$OUT/test_device_decode.log"
  python3 bench/postprocess.py --device cuda > "$OUT/postprocess_cuda.txt" 2>&1
  tail -9 "$OUT/postprocess_cuda.txt"
else
  echo "== bench/pipeline.py and bench/postprocess.py skipped: no pycocotools (carry its wheel in .whl/)"
fi
