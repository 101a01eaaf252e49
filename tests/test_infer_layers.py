"""The batch job's folders are its layers, and imports only go down them (DESIGN.md, "Layers"):

    schema, errors, tasks  ->  output  ->  commit/  ->  plan/ | execute/  ->  config, collect, execution, pipeline, summary  ->  __main__

A module imports modules of its own layer or of layers below; plan and execute do not import
each other; jobs/storage.py (every job's) imports nothing of the batch job. Imports inside
functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INFER = ROOT / "jobs" / "infer"

# module (or package prefix) -> (rank, group); a module may import a lower rank, or its own group
LAYERS = {
    "jobs.infer.schema": (0, "base"), "jobs.infer.errors": (0, "base"), "jobs.infer.tasks": (0, "base"),
    "jobs.infer.output": (1, "output"),
    "jobs.infer.commit": (2, "commit"),
    "jobs.infer.plan": (3, "plan"), "jobs.infer.execute": (3, "execute"),
    "jobs.infer.config": (4, "driver"), "jobs.infer.collect": (4, "driver"), "jobs.infer.execution": (4, "driver"),
    "jobs.infer.pipeline": (4, "driver"), "jobs.infer.summary": (4, "driver"),
    "jobs.infer.__main__": (5, "entry"),
}


def _layer(module: str):
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, relative imports resolved; ``from p import m``
    counts as importing the module p.m where m is one."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub) else base))
    return out


def _arrows():
    files = sorted(INFER.rglob("*.py"))
    assert len(files) >= 20  # every module of the job is read
    arrows = []
    for path in files:
        src = _module_name(path)
        assert _layer(src) is not None or src == "jobs.infer", f"{src} is in no layer: add it to LAYERS"
        for line, target in _imports(path):
            if target.startswith("jobs.infer"):
                arrows.append((f"{path.relative_to(ROOT)}:{line}", src, target))
    return arrows


def test_imports_only_go_down_the_layers():
    arrows = _arrows()
    assert len(arrows) >= 40  # the check sees the job's imports
    bad = []
    for where, src, target in arrows:
        (rank, group), (trank, tgroup) = _layer(src), _layer(target)
        if trank > rank or (trank == rank and tgroup != group):
            bad.append(f"{where}: {src} ({group}) imports {target} ({tgroup})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_storage_imports_nothing_of_the_batch_job():
    imports = [m for _, m in _imports(ROOT / "jobs" / "storage.py")]
    assert len(imports) >= 5 and not [m for m in imports if m.startswith("jobs")]
