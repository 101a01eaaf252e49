#!/usr/bin/env bash
# Renders a run report (jobs.report's HTML) in headless Chromium, as a reader sees it at a
# laptop's width, and writes a PNG of the whole page.
#   bash scripts/screenshot_report.sh [REPORT_HTML] [OUT_PNG] [WIDTH]
# Defaults: the demo's report (out/demo/results/_runs/<first run>/report.html), the same name
# with .png, 1366 px wide. The page is drawn in a tall window and the blank bottom cut off.
# Needs Debian's chromium package (apt-get install -y chromium) or chromium/google-chrome on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
report=${1:-}
if [ -z "$report" ]; then
  report=$(ls -1 out/demo/results/_runs/*/report.html 2>/dev/null | head -n 1 || true)
  [ -n "$report" ] || { echo "screenshot_report: no report given and none under out/demo/results/_runs/ (run bash scripts/demo.sh first)" >&2; exit 2; }
fi
[ -f "$report" ] || { echo "screenshot_report: no such file: $report" >&2; exit 2; }
out=${2:-${report%.html}.png}
width=${3:-1366}
browser=""
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null 2>&1; then browser=$b; break; fi
done
[ -n "$browser" ] || { echo "screenshot_report: no chromium on PATH (apt-get install -y chromium)" >&2; exit 3; }
python=${MRCNN_VENV:-.venv}/bin/python
[ -x "$python" ] || python=python3

url="file://$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
  --window-size="$width,6000" --virtual-time-budget=5000 --screenshot="$out" "$url" >/dev/null 2>&1 || true
[ -s "$out" ] || { echo "screenshot_report: $browser wrote no screenshot" >&2; exit 1; }
# cut the window's blank bottom (rows equal to the last one), keeping a small margin
"$python" - "$out" <<'PY'
import sys
import numpy as np
from PIL import Image
path = sys.argv[1]
a = np.asarray(Image.open(path).convert("RGB"))
blank = (a == a[-1]).all(axis=(1, 2))
content = np.nonzero(~blank)[0]
bottom = min(len(a), (content[-1] + 1 if len(content) else 1) + 24)
Image.fromarray(a[:bottom]).save(path)
print(f"{path} ({a.shape[1]}x{bottom})")
PY
