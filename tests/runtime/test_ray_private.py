"""cluster.runtime.ray_private: the one module that uses Ray's private API, for the Ray version pyproject.toml pins,
and the one module that patches a third-party class is cluster/runtime/console.py; with the hooks off (as on any
other Ray version) a local Ray still trains and publishes, through Ray's public API alone."""
from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from cluster.runtime.ray_private import (
    FOOTER_ACTORS_ENV,
    HOOKS_ENV,
    PINNED_RAY_VERSION,
    footer_readers_for,
    hooks_apply,
)

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("vae_core", "cluster", "jobs")
RAY_PRIVATE = "cluster/runtime/ray_private.py"
CONSOLE = "cluster/runtime/console.py"


def python_files() -> dict[str, ast.Module]:
    return {path.relative_to(REPO).as_posix(): ast.parse(path.read_text(), str(path))
            for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def dotted(node: ast.AST) -> str | None:
    """`a.b.c` for an attribute chain that starts at a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def private_ray_name(name: str) -> bool:
    """`ray._private.worker`, `ray.train.v2._internal.callbacks`, `ray._raylet`: a part of Ray's that is not its API."""
    parts = name.split(".")
    return parts[0] == "ray" and any(part.startswith("_") and not part.startswith("__") for part in parts[1:])


def ray_private_uses(tree: ast.Module) -> list[str]:
    """What a module reaches of Ray's private API: private modules imported or walked to, `_system_config`, and
    private methods of a Ray class overridden in a subclass."""
    from_ray = set()                        # names bound to Ray's classes by `from ray... import X`
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if private_ray_name(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ray":
            found += [f"{node.module}.{a.name}" for a in node.names if private_ray_name(f"{node.module}.{a.name}")]
            from_ray |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Attribute) and private_ray_name(dotted(node) or ""):
            found.append(dotted(node))
        elif "_system_config" in (getattr(node, "arg", None), getattr(node, "attr", None),
                                  getattr(node, "id", None), getattr(node, "value", None)):
            found.append("_system_config")
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        if any(name in from_ray or name.startswith("ray.") for name in (dotted(base) or "" for base in cls.bases)):
            found += [f"{cls.name}.{f.name}" for f in cls.body if isinstance(f, ast.FunctionDef)
                      and f.name.startswith("_") and not f.name.startswith("__")]
    return found


def third_party_patches(tree: ast.Module) -> set[str]:
    """Attributes of an imported third-party module or class that a module assigns to (a monkeypatch)."""
    own = set(PACKAGES) | set(sys.stdlib_module_names) | {"__future__"}
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] not in own}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] not in own:
            imported |= {alias.asname or alias.name for alias in node.names}
    targets = [t for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign))
               for t in (n.targets if isinstance(n, ast.Assign) else [n.target])]
    targets += [n.args[0] for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "setattr" and n.args]
    return {dotted(t) for t in targets if isinstance(t, ast.Attribute) and (dotted(t) or "").split(".")[0] in imported}


def test_only_ray_private_uses_rays_private_api():
    uses = {path: found for path, tree in python_files().items() if (found := ray_private_uses(tree))}
    assert RAY_PRIVATE in uses, "the scan sees none of ray_private.py's own hooks: it is blind"
    assert "_system_config" in uses[RAY_PRIVATE] and "LocalTrainer._create_default_callbacks" in uses[RAY_PRIVATE]
    del uses[RAY_PRIVATE]
    assert uses == {}, f"Ray's private API outside {RAY_PRIVATE}: {uses}"


def test_only_the_console_patches_a_third_party_class_and_only_tqdm():
    patches = {path: found for path, tree in python_files().items() if (found := third_party_patches(tree))}
    assert patches == {CONSOLE: {"tqdm.std.tqdm.__init__"}}


def test_the_hooks_are_written_for_the_ray_pyproject_pins():
    pin = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin and pin.group(1) == PINNED_RAY_VERSION


def test_the_hooks_run_on_the_pinned_ray_unless_switched_off_and_on_no_other():
    assert hooks_apply(PINNED_RAY_VERSION, None) and hooks_apply(PINNED_RAY_VERSION, "1")
    assert not hooks_apply(PINNED_RAY_VERSION, "0") and not hooks_apply(PINNED_RAY_VERSION, "false")
    assert not hooks_apply("2.61.0", None) and not hooks_apply("2.6.0", "1")


def test_a_parquet_read_of_a_few_shards_starts_a_footer_reader_per_batch_of_ten(monkeypatch):
    from ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer import FooterFileIndexer
    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    for files, actors in ((1, 1), (4, 1), (25, 3), (10_000, 32)):
        with footer_readers_for(files):
            # what read_parquet builds, inside the block: the pool it will start on each execution
            assert FooterFileIndexer(ignore_missing_paths=False)._num_actors == actors
        assert FOOTER_ACTORS_ENV not in os.environ
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "7")                       # the user's own setting stands
    with footer_readers_for(4):
        assert FooterFileIndexer(ignore_missing_paths=False)._num_actors == 7


TRAIN_WITHOUT_HOOKS = """
import sys
from cluster.data.datasets import ingest
from cluster.runtime import ray_private
from cluster.store.storage import open_storage
from cluster.train.driver import train_model
import numpy as np
from vae_core.config import ModelConfig, RayTrainConfig, StorageConfig, TrainConfig, TrainJobConfig
from vae_core.data import ArrayDataset, ArraySplit

# Off, each hook takes the path it takes on another Ray version.
assert not ray_private.hooks_enabled() and ray_private.local_ray_options() == {}
assert ray_private.trainer_class(local=True).__name__ == "DataParallelTrainer"
storage_config = StorageConfig(root=sys.argv[1])
rng = np.random.default_rng(0)
splits = {name: ArraySplit(rng.integers(0, 256, (rows, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, rows))
          for name, rows in (("train", 128), ("test", 32))}
ingest(open_storage(storage_config, for_writing=True), "tiny", ArrayDataset(splits, tuple("0123456789"), "noise"),
       progress=False)
job = TrainJobConfig(storage=storage_config, dataset="tiny", name="tiny-mlp",
                     model=ModelConfig(hidden_dim=16, latent_dim=2), train=TrainConfig(epochs=1, batch_size=32),
                     ray=RayTrainConfig(workers=1))
result = train_model(job, progress=False)
print("published", result.ref, result.summary["backend"])
"""


def kill_processes_carrying(variable: str) -> None:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if variable.encode() in f.read().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
        except OSError:                                  # gone already, or not ours
            continue


def test_with_the_hooks_off_a_local_ray_trains_and_publishes(tmp_path, starts_ray):
    """Ray's own system settings, all of Ray Train's controller helpers, ray.shutdown() alone: slower, still works."""
    run_id = uuid.uuid4().hex                       # in the environment of every process of that Ray
    env = {**os.environ, HOOKS_ENV: "0", "PYTHONPATH": str(REPO), "VAEGEN_HOOKS_OFF_RUN": run_id}
    try:
        run = subprocess.run([sys.executable, "-c", TRAIN_WITHOUT_HOOKS, str(tmp_path / "root")], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        # What ray.shutdown() alone may leave behind: a worker hung in its exit handlers.
        kill_processes_carrying(f"VAEGEN_HOOKS_OFF_RUN={run_id}")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert re.search(r"^published tiny-mlp\S* ray$", run.stdout, re.M), run.stdout[-2000:]
