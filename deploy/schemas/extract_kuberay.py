"""Regenerates kuberay-v1.schema.json from KubeRay's own CRDs: the ray.io/v1 openAPIV3Schema of RayCluster, RayJob
and RayCronJob, as the API server applies them, turned into one JSON Schema (draft 2020-12) that the deploy tests
validate every KubeRay manifest against.

    python deploy/schemas/extract_kuberay.py /path/to/kuberay v1.7.0      # a git clone of ray-project/kuberay

Run it when the operator version deploy/ targets changes; the tests never download anything.

What changes on the way, and why:
- Unknown fields are errors: every object schema that lists its properties gets additionalProperties: false
  (none of these CRDs preserves unknown fields). The API server drops unknown fields of a custom resource, or
  refuses them under strict field validation (kubectl's default); either way a misspelt field must fail here.
- `nullable: true` becomes a "null" type; int-or-string keeps the CRD's own anyOf.
- Kept out: CEL rules (x-kubernetes-validations; a JSON Schema validator cannot evaluate them), defaults,
  list and map hints (x-kubernetes-list-type, -list-map-keys, -map-type) and descriptions. formats stay but are not
  checked.
- Subschemas that occur more than once (the pod template in every group, RayJob's cluster spec inside RayCronJob)
  are stored once under $defs: the same schema, a fraction of the size."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
         "RayCronJob": "ray.io_raycronjobs.yaml"}
CRD_DIR = "ray-operator/config/crd/bases"
VERSION = "v1"
DROPPED = {"description", "default", "x-kubernetes-validations", "x-kubernetes-list-type",
           "x-kubernetes-list-map-keys", "x-kubernetes-map-type"}
SHARED_MIN_CHARS = 400        # a repeated subschema shorter than this stays inline: a $ref would not pay
OUT = Path(__file__).resolve().parent / "kuberay-v1.schema.json"


def to_json_schema(node):
    """One CRD schema node as JSON Schema, with the changes listed at the top."""
    if isinstance(node, list):
        return [to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    assert not node.get("x-kubernetes-preserve-unknown-fields"), "handle preserved fields before closing objects"
    out = {}
    for key, value in node.items():
        if key in DROPPED:
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        else:
            out[key] = to_json_schema(value)
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def canonical(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def share_repeats(root: dict) -> dict:
    """Moves every subschema that occurs more than once (and is big enough) into $defs, largest first."""
    counts: Counter[str] = Counter()

    def count(node):
        if isinstance(node, dict):
            counts[canonical(node)] += 1
            for v in node.values():
                count(v)
        elif isinstance(node, list):
            for v in node:
                count(v)
    count(root)
    defs: dict[str, dict] = {}
    names: dict[str, str] = {}

    def rewrite(node, path: str, top: bool = False):
        """`path`: where the node first occurs (RayCluster.spec.headGroupSpec), the name its shared copy gets."""
        if isinstance(node, list):
            return [rewrite(v, path) for v in node]
        if not isinstance(node, dict):
            return node
        key = canonical(node)
        if not top and counts[key] > 1 and len(key) >= SHARED_MIN_CHARS:
            if key not in names:
                names[key] = path
                defs[path] = rewrite(node, path, top=True)
            return {"$ref": f"#/$defs/{names[key]}"}
        out = {}
        for k, v in node.items():
            if k == "properties":
                out[k] = {name: rewrite(sub, f"{path}.{name}") for name, sub in v.items()}
            elif k in ("items", "additionalProperties"):
                out[k] = rewrite(v, f"{path}.{k}")
            else:
                out[k] = rewrite(v, path)
        return out
    kinds = {kind: rewrite(schema, kind, top=True) for kind, schema in root.items()}
    return inline_small_and_single_use({**kinds, **dict(sorted(defs.items()))}, keep=set(kinds))


def inline_small_and_single_use(defs: dict, keep: set[str]) -> dict:
    """Puts back, in place of its $ref, a shared schema that is small once its own repeats are shared (a wrapper
    around another $ref) or is used once."""
    def refs(node) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else []
            return own + [r for v in node.values() for r in refs(v)]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []

    def substitute(node, name: str, body: dict):
        if isinstance(node, dict):
            if node.get("$ref") == f"#/$defs/{name}":
                return body
            return {k: substitute(v, name, body) for k, v in node.items()}
        return [substitute(v, name, body) for v in node] if isinstance(node, list) else node
    while True:
        uses = Counter(r for body in defs.values() for r in refs(body))
        small = [n for n, body in defs.items()
                 if n not in keep and (uses[n] == 1 or len(canonical(body)) < SHARED_MIN_CHARS // 2)]
        if not small:
            return defs
        name = small[0]
        body = defs.pop(name)
        defs = {n: substitute(b, name, body) for n, b in defs.items()}


def crd_text(repo: Path, ref: str, name: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", f"{ref}:{CRD_DIR}/{name}"], check=True,
                           capture_output=True, text=True).stdout


def main(repo: Path, ref: str) -> None:
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", f"{ref}^{{commit}}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    kinds = {}
    for kind, name in KINDS.items():
        crd = yaml.safe_load(crd_text(repo, ref, name))
        assert crd["spec"]["names"]["kind"] == kind, name
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
        kinds[kind] = to_json_schema(version["schema"]["openAPIV3Schema"])
    defs = share_repeats(kinds)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (f"Generated by deploy/schemas/extract_kuberay.py from ray-project/kuberay {ref} (commit {commit}), "
                     f"{CRD_DIR}/{{{','.join(KINDS.values())}}}, version {VERSION}; do not edit. Unknown fields are "
                     "errors; CEL rules are not checked (see the script)."),
        "source": {"repository": "https://github.com/ray-project/kuberay", "ref": ref, "commit": commit,
                   "files": [f"{CRD_DIR}/{name}" for name in KINDS.values()], "version": VERSION},
        "type": "object",
        "required": ["apiVersion", "kind"],
        "properties": {"apiVersion": {"const": f"ray.io/{VERSION}"}, "kind": {"enum": list(KINDS)}},
        "allOf": [{"if": {"properties": {"kind": {"const": kind}}}, "then": {"$ref": f"#/$defs/{kind}"}}
                  for kind in KINDS],
        "$defs": defs,
    }
    OUT.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes) from {ref} ({commit})")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(Path(sys.argv[1]), sys.argv[2])
