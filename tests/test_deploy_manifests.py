"""deploy/: every Kubernetes manifest validates (core kinds against the Kubernetes schemas shipped by
kubernetes-validate, KubeRay kinds against deploy/schemas/kuberay-v1.schema.json, their pod templates against the
core PodTemplateSpec), follows the cluster rules (limits, /dev/shm, no public dashboard, keys only from Secrets),
and names only real vaegen verbs and flags: the CLI and the deploy files cannot drift apart unnoticed."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
PINS = dict(re.match(r"([a-zA-Z0-9_.-]+)(?:\[.*\])?==(.+)", d).groups()
            for d in PYPROJECT["project"]["dependencies"] if "==" in d)
KUBERAY_SCHEMA = json.loads((DEPLOY / "schemas" / "kuberay-v1.schema.json").read_text())
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.I)


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name'] if 'metadata' in doc else ''}",
                              doc))
    return found


MANIFESTS = manifests()
KUBERAY = [(n, d) for n, d in MANIFESTS if d["apiVersion"].startswith("ray.io/")]
CORE = [(n, d) for n, d in MANIFESTS if not d["apiVersion"].startswith(("ray.io/", "kustomize."))]


def ray_cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec]
    job = spec["jobTemplate"] if doc["kind"] == "RayCronJob" else spec
    return [job["rayClusterSpec"]] if "rayClusterSpec" in job else []


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec in a manifest, whatever wraps it."""
    if doc["apiVersion"].startswith("ray.io/"):
        groups = [g for c in ray_cluster_specs(doc) for g in [c["headGroupSpec"], *c.get("workerGroupSpecs", [])]]
        return [g["template"]["spec"] for g in groups]
    kind = doc["kind"]
    if kind in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for spec in pod_specs(doc) for c in spec["containers"]]


# -- schemas ---------------------------------------------------------------------------------------------------
def test_the_deploy_folder_has_every_kind_the_cluster_needs():
    kinds = sorted({d["kind"] for _, d in MANIFESTS})
    assert kinds == ["CronJob", "Deployment", "Job", "Kustomization", "PersistentVolumeClaim", "RayCluster",
                     "RayCronJob", "RayJob", "Service"]
    rayjobs = {d["metadata"]["name"] for _, d in KUBERAY if d["kind"] == "RayJob"}
    assert rayjobs == {"vaegen-train", "vaegen-generate"}


@pytest.mark.parametrize("name, doc", CORE, ids=[n for n, _ in CORE])
def test_core_manifests_validate_against_the_kubernetes_schemas(name, doc):
    import kubernetes_validate
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name, doc", KUBERAY, ids=[n for n, _ in KUBERAY])
def test_kuberay_manifests_validate_against_the_crd_fields_and_pod_schemas(name, doc):
    import kubernetes_validate
    jsonschema.validate(doc, KUBERAY_SCHEMA)
    for cluster in ray_cluster_specs(doc):
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                            "template": group["template"]}
            kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def test_the_kuberay_schema_catches_a_misspelt_field():
    doc = next(d for _, d in KUBERAY if d["kind"] == "RayJob")
    bad = {**doc, "spec": {**doc["spec"], "shutdownAfterJobFinish": True}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, KUBERAY_SCHEMA)


def test_kustomization_lists_existing_files_and_no_alpha_or_one_off_objects():
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file()
    assert "retrain-raycronjob.yaml" not in kustomization["resources"]        # needs an alpha feature gate


# -- cluster rules ---------------------------------------------------------------------------------------------
def test_ray_clusters_have_a_cpu_head_an_autoscaled_gpu_group_and_shm_in_memory():
    cluster = next(d for _, d in KUBERAY if d["kind"] == "RayCluster")["spec"]
    assert cluster["rayVersion"] == PINS["ray"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert 0 <= gpu["minReplicas"] < gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for _, doc in KUBERAY:
        for spec in ray_cluster_specs(doc):
            assert spec["rayVersion"] == PINS["ray"]
        for pod in pod_specs(doc):
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]
                    if m["name"] == shm[0]["name"]] == ["/dev/shm"]


WITH_PODS = [(n, d) for n, d in MANIFESTS if pod_specs(d)]


@pytest.mark.parametrize("name, doc", WITH_PODS, ids=[n for n, _ in WITH_PODS])
def test_every_container_has_requests_and_limits_and_runs_as_non_root(name, doc):
    for pod in pod_specs(doc):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            assert set(c["resources"]) == {"requests", "limits"}, c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]


def test_ray_jobs_clean_up_after_themselves_and_retraining_never_overlaps():
    for _, doc in KUBERAY:
        if doc["kind"] != "RayCluster":
            job = doc["spec"].get("jobTemplate", doc["spec"])
            assert job["shutdownAfterJobFinishes"] is True
            assert job["ttlSecondsAfterFinished"] > 0 and job["backoffLimit"] >= 1
    cron = next(d for _, d in CORE if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    raycron = next(d for _, d in KUBERAY if d["kind"] == "RayCronJob")
    assert "feature gate" in (DEPLOY / "k8s" / "retrain-raycronjob.yaml").read_text()
    assert raycron["spec"]["schedule"] == cron["spec"]["schedule"]


def test_nothing_is_exposed_outside_the_cluster():
    for _, doc in MANIFESTS:
        assert doc["kind"] not in ("Ingress", "Route")
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
    for _, doc in KUBERAY:
        for spec in ray_cluster_specs(doc):
            assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
            assert not spec["headGroupSpec"].get("enableIngress", False)
            assert spec["authOptions"]["mode"] == "token"


def test_keys_come_only_from_secrets_and_no_secret_is_committed():
    for name, doc in MANIFESTS:
        assert doc["kind"] != "Secret", name
        for c in containers(doc):
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} is not from a Secret"
            for source in c.get("envFrom", []):
                assert set(source) == {"secretRef"}


def test_images_are_the_vaegen_release_or_pinned_third_party_images():
    for name, doc in MANIFESTS:
        for c in containers(doc):
            image = c["image"]
            if image.startswith("vaegen:"):
                assert image in (f"vaegen:{VERSION}-cpu", f"vaegen:{VERSION}-cuda"), name
            else:
                assert ":" in image and not image.endswith(":latest"), f"{name}: {image} is not pinned"
        for pod in pod_specs(doc):
            gpus = [c for c in pod["containers"] if "nvidia.com/gpu" in c["resources"]["limits"]]
            assert all(c["image"].endswith("-cuda") for c in gpus), name


# -- no drift between the CLI and deploy/ -------------------------------------------------------------------------
def vaegen_commands() -> list[tuple[str, list[str]]]:
    """Every vaegen argv in the manifests (RayJob entrypoints, container commands), `submit`'s inner one too."""
    found = []
    for name, doc in KUBERAY:
        job = doc["spec"].get("jobTemplate", doc["spec"])
        if "entrypoint" in job:
            found.append((name, shlex.split(job["entrypoint"])))
    for name, doc in CORE:
        for c in containers(doc):
            argv = c.get("command", []) + c.get("args", [])
            if argv[:1] == ["vaegen"]:
                found.append((name, argv))
    found += readme_commands()
    commands = []
    for name, argv in found:
        assert argv[0] == "vaegen", f"{name}: {argv[:2]} does not run vaegen"
        commands.append((name, argv[1:]))
        if argv[1] == "submit":
            commands.append((f"{name} (after --)", argv[argv.index("--") + 1:]))
    return commands


def readme_commands() -> list[tuple[str, list[str]]]:
    """`vaegen ...` lines in the READMEs' shell blocks (continuations joined, `;`/`&&` chains split)."""
    found = []
    for readme in (DEPLOY / "README.md", DEPLOY.parent / "README.md"):
        text = readme.read_text().replace("\\\n", " ")
        blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in (ln for block in blocks for ln in block.splitlines()):
            for part in re.split(r";|&&", line.split("  #")[0]):
                if part.strip().startswith("vaegen "):
                    found.append((str(readme.relative_to(DEPLOY.parent)), shlex.split(part.strip())))
    return found


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


COMMANDS = vaegen_commands()


def test_the_manifests_run_train_generate_and_retrain():
    verbs = {argv[0] for _, argv in COMMANDS}
    assert {"train", "generate", "retrain", "submit"} <= verbs


@pytest.mark.parametrize("name, argv", COMMANDS, ids=[f"{n} {a[0]}" for n, a in COMMANDS])
def test_manifest_commands_parse_with_the_real_cli(name, argv):
    parser = build_parser()
    verbs = subparsers(parser)
    verb = argv[0]
    assert verb in verbs, f"{name}: `vaegen {verb}` is no vaegen verb"
    checked = argv
    if verb == "submit":
        checked = argv[:argv.index("--") + 1] + ["ingest", "fashion-mnist"]  # the inner command is its own case
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.suppress(SystemExit):
        parser.parse_args(checked)
        return
    pytest.fail(f"{name}: `vaegen {' '.join(checked)}` does not parse: {errors.getvalue().strip().splitlines()[-1]}")


# -- Dockerfile and launcher config ----------------------------------------------------------------------------------
DOCKERFILE = (DEPLOY / "docker" / "Dockerfile").read_text()


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=\"?([^\"\n]*)\"?$", DOCKERFILE, re.M))


def test_dockerfile_pins_what_pyproject_pins():
    args = dockerfile_args()
    assert args["TORCH_VERSION"] == PINS["torch"]
    assert args["TORCHVISION_VERSION"] == PINS["torchvision"]
    assert PYPROJECT["project"]["requires-python"].startswith(f">={args['PYTHON_VERSION']}")
    assert args["VARIANT"] == "cpu" and "cpu|cuda)" in DOCKERFILE
    assert "pip install /src" in DOCKERFILE                       # the rest of the pins come from pyproject.toml


def test_dockerfile_runs_as_a_non_root_user_and_bakes_in_no_secret():
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
    for name in re.findall(r"^(?:ARG|ENV)\s+(\w+)", DOCKERFILE, re.M) + re.findall(r"^\s+(\w+)=", DOCKERFILE, re.M):
        assert not SECRET_NAME.search(name), name
    sources = [s for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M) for s in line.split()[:-1]]
    assert set(sources) == {"pyproject.toml", "README.md", "vae_core", "cluster", "jobs"}
    for source in sources:
        assert (REPO / source).exists() or source == "README.md", source     # README is the lead's, on main
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("**") if "**" in ignore else 0] == "**"     # deny everything, then allow


def test_cluster_launcher_config_validates_against_rays_schema():
    import ray.autoscaler
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["docker"]["head_image"] == f"vaegen:{VERSION}-cpu"
    assert config["docker"]["worker_image"] == f"vaegen:{VERSION}-cuda"
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert config["available_node_types"]["gpu_worker"]["min_workers"] < config["max_workers"]
