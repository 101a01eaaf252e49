"""The CUDA kernels as compiled: exact IEEE arithmetic, like the CPU kernels and torchvision's.

CI compiles the CUDA kernels (no GPU needed), and the built extension embeds their PTX as
text, so this reads the instructions the GPU would run. ``--use_fast_math`` (or
``-prec-div=false``, ``-ftz=true``) turns ``a / b`` into ``div.approx.ftz.f32``: RoIPool's bin
edges (``floor/ceil(ph * roi / pooled)``, often exact integers), RoIWarp's corners and the
adaptive sampling count (``ceil(roi / pooled)``) then flip, so CUDA results would differ from
CPU and from torchvision by whole bins, not in the last bit.
"""

from __future__ import annotations

import re

import pytest

import mrcnn.ops
from mrcnn import _C

pytestmark = pytest.mark.skipif(not mrcnn.ops.WITH_CUDA, reason="the extension was built without CUDA kernels")

# Approximate or flush-to-zero float arithmetic in PTX: div.approx / div.full, rcp.approx,
# sqrt.approx, rsqrt.approx, and any .ftz modifier (denormals flushed to zero).
INEXACT = re.compile(r"\b(?:div\.(?:approx|full)|rcp\.approx|sqrt\.approx|rsqrt\.approx)\.[\w.]*|\b\w+(?:\.\w+)*\.ftz\b[\w.]*")
FUNCTION = re.compile(r"^\s*\.(?:visible\s+|weak\s+)?(?:entry|func)\s+(?:\([^)]*\)\s*)?(\w+)")
PRINTABLE = re.compile(rb"[\t\n\r\x20-\x7e]*")


def _ptx_functions() -> dict[str, str]:
    """{mangled name: body} of every function in the PTX embedded in the extension: all of it
    compiled from mrcnn/ops/csrc/*.cu with our flags (torch's own kernels live in its libraries).
    The fatbin keeps each PTX module as text, a line per NUL-terminated string."""
    blob = open(_C.__file__, "rb").read()
    functions: dict[str, str] = {}
    for start in (m.start() for m in re.finditer(rb"\.version \d+\.\d+\x00", blob)):
        name = None
        for line in blob[start:].split(b"\x00"):
            if not PRINTABLE.fullmatch(line):
                break  # the module's text ended
            text = line.decode("ascii")
            if text.startswith(".version") and name is not None:
                break
            found = FUNCTION.match(text)
            if found:
                name = found.group(1)
                functions[name] = ""
            if name is not None:
                functions[name] += text + "\n"
    return functions


def test_the_cuda_kernels_divide_exactly_and_keep_denormals():
    functions = _ptx_functions()
    assert functions, (f"no PTX of mrcnn's kernels in {_C.__file__}: build with a TORCH_CUDA_ARCH_LIST "
                       "that embeds PTX (CI: 9.0) and without fatbin compression")
    names = " ".join(functions)
    # Non-vacuous: RoIAlign (forward, backward) and RoIPool kernels were all read.
    for kernel in ("forward_kernel", "backward_kernel", "roi_pool"):
        assert kernel in names, f"no {kernel} among the {len(functions)} PTX functions read"
    exact = sum(len(re.findall(r"\bdiv\.rn\.f(?:32|64)\b", body)) for body in functions.values())
    assert exact > 0, "no IEEE division (div.rn) found: the PTX was not parsed as expected"
    inexact = {name: sorted(set(INEXACT.findall(body))) for name, body in functions.items()}
    inexact = {name: found for name, found in inexact.items() if found}
    assert not inexact, (f"{len(inexact)} of {len(functions)} kernels use approximate or flush-to-zero "
                         f"arithmetic (built with --use_fast_math?): {dict(list(inexact.items())[:3])}")
