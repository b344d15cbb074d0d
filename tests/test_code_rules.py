"""The house rules, checked on the tree itself: layers import one way, packages hold no code in __init__, no
module or function too long to read in one sitting, no import-time side effects, exact pins where a version
is part of the bytes vaegen writes."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import vaegen_in_a_fresh_process

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("vae_core", "cluster", "jobs")                 # each may import only the ones before it
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def sources() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))


def imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_layers_import_one_way():
    upward = []
    for path in sources():
        layer = path.relative_to(REPO).parts[0]
        above = LAYERS[LAYERS.index(layer) + 1:]
        upward += [(str(path.relative_to(REPO)), m) for m in imported(path) if m.split(".")[0] in above]
    assert upward == []


def test_a_package_init_only_re_exports():
    for path in sources():
        if path.name == "__init__.py":
            body = ast.parse(path.read_text()).body
            code = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign))]
            assert code == [], f"{path.relative_to(REPO)} defines {[type(n).__name__ for n in code]}"


def test_no_module_or_function_too_long_to_read_in_one_sitting():
    too_long = []
    for path in sources():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}: {node.name} is {lines} lines")
    assert too_long == []


def test_no_two_modules_of_a_package_differ_only_by_a_suffix():
    for package in {p.parent for p in sources()}:
        stems = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
        clashes = [(a, b) for a in stems for b in stems if a != b and b.startswith(f"{a}_")]
        assert clashes == [], package


# What the libraries themselves install on import (warning filters) is theirs: they are imported first.
LIBRARIES = ("numpy", "torch", "pyarrow.parquet", "pyarrow.fs", "ray", "ray.train", "ray.data", "boto3", "tqdm.auto",
             "huggingface_hub", "matplotlib", "safetensors.torch", "PIL.Image", "deflate")


def test_importing_every_module_changes_no_environment_variable_or_warning_filter():
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for p in sources()]
    code = (f"import os, sys, warnings, importlib; [importlib.import_module(m) for m in {LIBRARIES!r}]; "
            "env, filters = dict(os.environ), list(warnings.filters); "
            f"[importlib.import_module(m) for m in {modules!r}]; "
            "print(sorted(set(os.environ.items()) ^ set(env.items())), warnings.filters[:len(warnings.filters) - "
            "len(filters)] if len(warnings.filters) != len(filters) else [])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[] []"


@pytest.mark.parametrize("argv, unwanted", [
    (["--help"], ("torch", "ray", "pyarrow")),
    (["ls", "--help"], ("torch", "ray", "pyarrow")),
    (["generate", "--help"], ("torch", "ray", "pyarrow")),
    (["train", "--help"], ("torch", "ray", "pyarrow")),
    (["ls", "--root", "{tmp}"], ("torch", "ray")),                 # a listing reads storage, through pyarrow
])
def test_help_and_ls_import_no_torch_and_no_ray(argv, unwanted, tmp_path):
    _, imported, stderr = vaegen_in_a_fresh_process([a.format(tmp=tmp_path) for a in argv], unwanted)
    assert imported == [], stderr[-2000:]


def test_every_library_whose_version_is_in_the_bytes_is_pinned_exactly_and_installed():
    pins = dict(re.findall(r'"([a-z_]+)==([0-9.]+)"', (REPO / "pyproject.toml").read_text()))
    for library in ("pyarrow", "deflate", "torchvision"):   # Parquet's created_by, PNG deflate streams, JPEGs
        assert pins.get(library) == version(library), library
