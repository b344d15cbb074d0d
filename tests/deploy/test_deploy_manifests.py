"""deploy/: every Kubernetes manifest validates (core kinds against the Kubernetes schemas shipped by
kubernetes-validate; KubeRay kinds against deploy/schemas/kuberay-v1.schema.json, extracted from KubeRay's own CRDs
by deploy/schemas/extract_kuberay.py with unknown fields made errors, their metadata against the core ObjectMeta and
their pod templates, with the autoscaler sidecar KubeRay adds, against the core PodTemplateSpec), follows the cluster rules (limits, /dev/shm, no public dashboard, keys only from Secrets),
is locked down (non-root, no capabilities, RuntimeDefault seccomp, read-only roots, no unneeded Kubernetes API
token, NetworkPolicies that admit only the intended peers, MinIO's root login kept from the app), and names only
real vaegen verbs and flags: the CLI and the deploy files cannot drift apart unnoticed."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from vae_core.errors import VaegenError

REPO = Path(__file__).resolve().parents[2]
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


def ray_job_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayJob":
        return [doc["spec"]]
    return [doc["spec"]["jobTemplate"]] if doc["kind"] == "RayCronJob" else []


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template in a manifest, whatever wraps it, as (role, template): role is head, worker/<group>,
    submitter or pod."""
    if doc["apiVersion"].startswith("ray.io/"):
        found = []
        for cluster in ray_cluster_specs(doc):
            found.append(("head", cluster["headGroupSpec"]["template"]))
            found += [(f"worker/{g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
        found += [("submitter", job["submitterPodTemplate"]) for job in ray_job_specs(doc)
                  if "submitterPodTemplate" in job]
        return found
    kind = doc["kind"]
    if kind in ("Deployment", "Job"):
        return [("pod", doc["spec"]["template"])]
    if kind == "CronJob":
        return [("pod", doc["spec"]["jobTemplate"]["spec"]["template"])]
    return []


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec in a manifest, whatever wraps it."""
    return [template["spec"] for _, template in pod_templates(doc)]


def ray_node_pod_specs(doc: dict) -> list[dict]:
    """The Ray heads' and workers' pod specs (not the RayJob submitters')."""
    return [template["spec"] for role, template in pod_templates(doc) if role != "submitter"]


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def containers(doc: dict) -> list[dict]:
    return [c for spec in pod_specs(doc) for c in all_containers(spec)]


def autoscaler_sidecar(cluster: dict) -> dict | None:
    """The container KubeRay adds to the head when in-tree autoscaling is on: the head's image, with the
    securityContext and volumeMounts given in autoscalerOptions (KubeRay adds its /tmp/ray log volume itself)."""
    if not cluster.get("enableInTreeAutoscaling"):
        return None
    options = cluster.get("autoscalerOptions", {})
    sidecar = {"name": "autoscaler", "image": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    sidecar.update({k: options[k] for k in ("securityContext", "volumeMounts", "resources") if k in options})
    return sidecar


# -- schemas ---------------------------------------------------------------------------------------------------
def test_the_deploy_folder_has_every_kind_the_cluster_needs():
    kinds = sorted({d["kind"] for _, d in MANIFESTS})
    assert kinds == ["ConfigMap", "CronJob", "Deployment", "Job", "Kustomization", "NetworkPolicy",
                     "PersistentVolumeClaim", "RayCluster", "RayCronJob", "RayJob", "Service"]
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
    # The CRD leaves metadata to the API server, which checks it as any object's: the core ObjectMeta
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, K8S_VERSION,
                                 strict=True)
    templates = [template for _, template in pod_templates(doc)]
    for cluster in ray_cluster_specs(doc):
        sidecar = autoscaler_sidecar(cluster)
        if sidecar:        # the head as KubeRay runs it: the autoscaler's securityContext and mounts are core types
            head = cluster["headGroupSpec"]["template"]
            templates.append({**head, "spec": {**head["spec"], "containers": [*head["spec"]["containers"], sidecar]}})
    for template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def test_the_kuberay_schema_is_extracted_from_kuberays_crds():
    source = KUBERAY_SCHEMA["source"]
    assert source["repository"] == "https://github.com/ray-project/kuberay" and re.fullmatch(r"v\d+\.\d+\.\d+",
                                                                                              source["ref"])
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]) and source["version"] == "v1"
    assert source["files"] == [f"ray-operator/config/crd/bases/ray.io_{k}.yaml"
                               for k in ("rayclusters", "rayjobs", "raycronjobs")]
    assert KUBERAY_SCHEMA["$comment"].startswith("Generated by deploy/schemas/extract_kuberay.py")
    defs = KUBERAY_SCHEMA["$defs"]
    # what only the full CRDs have, none of it used by vaegen's manifests: status, and fields deploy/ never sets
    assert {"RayCluster", "RayJob", "RayCronJob", "RayCluster.status"} <= set(defs)
    assert {"gcsFaultToleranceOptions", "upgradeStrategy", "headServiceAnnotations"} <= set(
        defs["RayCluster.spec"]["properties"])


def deep_set(doc: dict, path: str, value) -> dict:
    """A copy of doc with `value` at a dotted path (a number indexes a list)."""
    doc = json.loads(json.dumps(doc))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()
KIND = {d["kind"]: d for _, d in KUBERAY}
BAD_KUBERAY = [   # (kind, dotted path, value): each is a mistake the API server refuses or silently drops
    ("RayJob", "spec.shutdownAfterJobFinish", True),                                   # the field ends in -es
    ("RayJob", "spec.rayClusterSpec.workerGroupSpecs.0.minReplica", 0),
    ("RayJob", "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.imagePullPolicyy", "Always"),
    ("RayCluster", "spec.autoscalerOptions.upscalingMode", "Fast"),                   # not in the CRD's enum
    ("RayCluster", "spec.headGroupSpec", DELETE),                                      # required by the CRD
    ("RayCluster", "spec.workerGroupSpecs.0.maxReplicas", "2"),                        # int32, not a string
    ("RayCronJob", "spec.jobTemplate.ttlSecondsAfterFinish", 60),
    ("RayCronJob", "spec.schedule", DELETE),
]


@pytest.mark.parametrize("kind, path, value", BAD_KUBERAY, ids=[f"{k}:{p}" for k, p, _ in BAD_KUBERAY])
def test_the_kuberay_schema_catches_misspelt_missing_and_mistyped_fields(kind, path, value):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(deep_set(KIND[kind], path, value), KUBERAY_SCHEMA)


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
        for pod in ray_node_pod_specs(doc):
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]
                    if m["name"] == shm[0]["name"]] == ["/dev/shm"]


WITH_PODS = [(n, d) for n, d in MANIFESTS if pod_specs(d)]


@pytest.mark.parametrize("name, doc", WITH_PODS, ids=[n for n, _ in WITH_PODS])
def test_every_container_has_requests_and_limits_and_runs_as_non_root(name, doc):
    for pod in pod_specs(doc):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for c in all_containers(pod):
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


# -- pod and container security ----------------------------------------------------------------------------------
def dockerfile_uid() -> int:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    (uid,) = re.findall(r"useradd .*--uid (\d+)", text)
    assert re.findall(r"^USER (\S+)", text, re.M)[-1].split(":")[0] == uid
    return int(uid)


IMAGE_UID = 1000           # vaegen's image user (Dockerfile), and the uid MinIO's and mc's charts run them as
# Containers whose root filesystem stays writable, and why (the manifest says so beside the setting).
WRITABLE_ROOT = {"minio/minio": "MinIO creates its certs directory under $HOME at start; not verified read-only"}
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# Pods that may hold a Kubernetes API token, and why. Only the listed container may mount it.
TOKEN_ALLOWED = {"raycluster.yaml:RayCluster/vaegen head":
                 ("autoscaler", "KubeRay's autoscaler sidecar lists and patches the RayCluster and its pods")}
PODS = [(f"{name} {role}", doc, template) for name, doc in MANIFESTS for role, template in pod_templates(doc)]


def pod_containers(doc: dict, role: str, spec: dict) -> list[dict]:
    """A pod's containers as they will run: with KubeRay's autoscaler sidecar in an autoscaled head."""
    found = all_containers(spec)
    if role == "head":
        found += [s for s in map(autoscaler_sidecar, ray_cluster_specs(doc)) if s]
    return found


def test_the_image_user_is_the_uid_the_pods_run_as():
    assert dockerfile_uid() == IMAGE_UID


@pytest.mark.parametrize("name, doc, template", PODS, ids=[n for n, _, _ in PODS])
def test_every_pod_runs_as_a_non_root_uid_with_the_runtime_default_seccomp_profile(name, doc, template):
    pod = template["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == IMAGE_UID
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in all_containers(template["spec"]):               # nothing overrides the pod's choices
        own = c.get("securityContext", {})
        assert own.get("runAsUser", IMAGE_UID) != 0 and own.get("runAsNonRoot", True) is True, c["name"]
        assert own.get("seccompProfile", pod["seccompProfile"]) == {"type": "RuntimeDefault"}, c["name"]


@pytest.mark.parametrize("name, doc, template", PODS, ids=[n for n, _, _ in PODS])
def test_every_container_drops_all_capabilities_cannot_escalate_and_writes_only_to_its_volumes(name, doc, template):
    spec = template["spec"]
    role = name.rsplit(" ", 1)[1]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in pod_containers(doc, role, spec):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert not sc.get("privileged", False), c["name"]
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert set(mounts.values()) <= set(volumes), f"{c['name']} mounts a volume the pod lacks"
        image = c["image"].split(":")[0]
        if image in WRITABLE_ROOT:
            assert sc["readOnlyRootFilesystem"] is False, c["name"]
            continue
        assert sc["readOnlyRootFilesystem"] is True, f"{c['name']}: read-only root, or a reason in WRITABLE_ROOT"
        writable = ["/tmp", "/home/ray"] if image == "vaegen" else ["/tmp"]      # Ray's sessions; $HOME's caches
        for path in writable:
            assert "emptyDir" in volumes[mounts[path]], f"{c['name']}: {path} is no emptyDir"


def test_writable_root_filesystems_are_explained_in_the_manifest():
    for image in WRITABLE_ROOT:
        users = [path for path in (DEPLOY / "k8s").glob("*.yaml") if f"image: {image}:" in path.read_text()]
        for path in users:
            assert "readOnlyRootFilesystem stays off" in path.read_text(), path.name


@pytest.mark.parametrize("name, doc, template", PODS, ids=[n for n, _, _ in PODS])
def test_no_pod_gets_a_kubernetes_api_token_it_does_not_use(name, doc, template):
    spec = template["spec"]
    role = name.rsplit(" ", 1)[1]
    assert spec["automountServiceAccountToken"] is False
    token_volumes = {v["name"] for v in spec.get("volumes", [])
                     if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))}
    mounted_by = {c["name"] for c in pod_containers(doc, role, spec)
                  for m in c.get("volumeMounts", []) if m["name"] in token_volumes}
    if name not in TOKEN_ALLOWED:
        assert not token_volumes, f"{name} holds a Kubernetes API token"
        return
    allowed_container, _reason = TOKEN_ALLOWED[name]
    assert mounted_by == {allowed_container}
    (sidecar,) = [s for s in map(autoscaler_sidecar, ray_cluster_specs(doc)) if s]
    assert {m["mountPath"] for m in sidecar["volumeMounts"] if m["name"] in token_volumes} == {SA_TOKEN_PATH}


def test_every_autoscaled_head_gives_its_autoscaler_a_token():
    """The other side of the rule above: without a token KubeRay's autoscaler cannot scale anything."""
    for name, doc in KUBERAY:
        for cluster in ray_cluster_specs(doc):
            assert bool(autoscaler_sidecar(cluster)) == (f"{name} head" in TOKEN_ALLOWED), name


# -- credentials: the app never holds MinIO's root login ----------------------------------------------------------
def secret_refs(spec: dict) -> set[str]:
    refs = set()
    for c in all_containers(spec):
        refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                 if "secretKeyRef" in e.get("valueFrom", {})}
        refs |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
    for v in spec.get("volumes", []):
        refs |= {v["secret"]["secretName"]} if "secret" in v else set()
        refs |= {s["secret"]["name"] for s in v.get("projected", {}).get("sources", []) if "secret" in s}
    return refs


def env_secret(container: dict, var: str) -> tuple[str, str]:
    (env,) = [e for e in container["env"] if e["name"] == var]
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def one(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in MANIFESTS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


MINIO = one("Deployment", "vaegen-minio")
BUCKET_JOB = one("Job", "vaegen-minio-bucket")
ROOT_SECRET = env_secret(MINIO["spec"]["template"]["spec"]["containers"][0], "MINIO_ROOT_PASSWORD")[0]
ROOT_HOLDERS = [MINIO["spec"]["template"]["spec"], BUCKET_JOB["spec"]["template"]["spec"]]


def mc_steps() -> list[tuple[dict, list[str]]]:
    """The bucket Job's `mc` commands in the order they run, without mc's global --config-dir flag."""
    steps = []
    for c in all_containers(BUCKET_JOB["spec"]["template"]["spec"]):
        argv = c.get("command", []) + c.get("args", [])
        assert argv[:1] == ["mc"], c["name"]
        if argv[1] == "--config-dir":
            argv = argv[:1] + argv[3:]
        steps.append((c, argv[1:]))
    return steps


def app_secret() -> str:
    (add,) = [(c, argv) for c, argv in mc_steps() if argv[:3] == ["admin", "user", "add"]]
    container, argv = add
    access, secret = (env_secret(container, re.fullmatch(r"\$\((\w+)\)", a).group(1)) for a in argv[4:6])
    assert access[0] == secret[0] and (access[1], secret[1]) == ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    return access[0]


def test_ray_pods_use_the_app_users_keys_and_only_minio_and_its_job_see_the_root_login():
    app = app_secret()
    assert app != ROOT_SECRET
    for name, doc in MANIFESTS:
        for spec in pod_specs(doc):
            if not any(spec is holder for holder in ROOT_HOLDERS):
                assert ROOT_SECRET not in secret_refs(spec), f"{name} can read MinIO's root login"
    for name, doc in KUBERAY:
        for spec in ray_node_pod_specs(doc):
            (c,) = spec["containers"]
            assert [s["secretRef"]["name"] for s in c["envFrom"]] == [app], name
    holders = [s for _, d in CORE for s in pod_specs(d) if ROOT_SECRET in secret_refs(s)]
    assert len(holders) == 2


def test_the_bucket_job_creates_an_app_user_confined_to_the_bucket():
    steps = mc_steps()
    verbs = [tuple(argv[:3]) if argv[0] == "admin" else (argv[0],) for _, argv in steps]
    assert verbs == [("mb",), ("admin", "policy", "create"), ("admin", "user", "add"), ("admin", "policy", "attach")]
    for container, argv in steps:           # every step logs in as root, through the alias MC_HOST_<alias>
        alias = argv[argv.index("--ignore-existing") + 1].split("/")[0] if argv[0] == "mb" else argv[3]
        (host,) = [e["value"] for e in container["env"] if e["name"] == f"MC_HOST_{alias}"]
        user, password = re.fullmatch(r"http://\$\((\w+)\):\$\((\w+)\)@vaegen-minio:9000", host).groups()
        assert env_secret(container, user) == (ROOT_SECRET, "MINIO_ROOT_USER")
        assert env_secret(container, password) == (ROOT_SECRET, "MINIO_ROOT_PASSWORD")
    bucket = steps[0][1][-1].split("/", 1)[1]
    (create_c, create), (add_c, add), (attach_c, attach) = steps[1:]
    policy_name = create[4]
    assert attach[4:] == [policy_name, "--user", add[4]]
    assert env_secret(attach_c, add[4][2:-1]) == env_secret(add_c, add[4][2:-1])
    # the policy file comes from the ConfigMap mounted where `mc admin policy create` reads it
    mount_dir, file_name = create[5].rsplit("/", 1)
    (mount,) = [m for m in create_c["volumeMounts"] if m["mountPath"] == mount_dir]
    (volume,) = [v for v in BUCKET_JOB["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    policy = json.loads(one("ConfigMap", volume["configMap"]["name"])["data"][file_name])
    granted = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and set(statement) == {"Effect", "Action", "Resource"}
        for action in statement["Action"]:
            for resource in statement["Resource"]:
                granted.add((action, resource))
    bucket_arn = f"arn:aws:s3:::{bucket}"
    assert granted == {("s3:ListBucket", bucket_arn), ("s3:GetBucketLocation", bucket_arn),
                       ("s3:GetObject", f"{bucket_arn}/*"), ("s3:PutObject", f"{bucket_arn}/*"),
                       ("s3:DeleteObject", f"{bucket_arn}/*")}
    roots = [a.split("=", 1)[1] if "=" in a else argv[i + 1] for name, argv in COMMANDS if ".yaml:" in name
             for i, a in enumerate(argv) if a.split("=")[0] == "--root" and argv[0] != "submit"]
    assert roots and {r.split("/")[2] for r in roots} == {bucket}        # the workloads use that bucket only


# -- network policies --------------------------------------------------------------------------------------------
NAMESPACE = "vaegen"
OPERATOR_NAMESPACE = "kuberay-system"
POLICIES = [d for _, d in CORE if d["kind"] == "NetworkPolicy"]


@dataclasses.dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    cluster: str = ""             # the Ray cluster it belongs to, for Ray heads and workers
    role: str = ""

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def kuberay_pod_labels(node_type: str, cluster: str, group: str, template_labels: dict) -> dict[str, str]:
    """What KubeRay's labelPod (ray-operator/controllers/ray/common/pod.go) puts on a Ray pod: its own labels,
    then the template's, except that ray.io/node-type, ray.io/group and ray.io/cluster cannot be overridden."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
              "ray.io/group": group, "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels.update({k: v for k, v in template_labels.items()
                   if k not in ("ray.io/node-type", "ray.io/group", "ray.io/cluster")})
    return labels


def cluster_pods() -> list[Pod]:
    """Every pod the manifests make, labelled as Kubernetes and KubeRay label them; RayJob clusters get the
    generated names KubeRay gives them (<rayjob>-<5 random characters>)."""
    pods = []
    for name, doc in MANIFESTS:
        meta = doc.get("metadata", {}).get("name", "")
        if doc["kind"] in ("RayCluster", "RayJob", "RayCronJob"):
            rayjob = {"RayJob": meta, "RayCronJob": f"{meta}-29384756"}.get(doc["kind"], "")
            cluster = f"{rayjob}-x7k2p" if rayjob else meta
            for role, template in pod_templates(doc):
                labels = template.get("metadata", {}).get("labels", {})
                if role == "submitter":
                    labels = {**labels, "ray.io/originated-from-cr-name": rayjob, "ray.io/originated-from-crd":
                              "RayJob", "app.kubernetes.io/created-by": "kuberay-operator",
                              "batch.kubernetes.io/job-name": rayjob}
                    pods.append(Pod(f"{name} submitter", NAMESPACE, tuple(sorted(labels.items())), role=role))
                    continue
                node_type, group = ("head", "headgroup") if role == "head" else ("worker", role.split("/")[1])
                labels = kuberay_pod_labels(node_type, cluster, group, labels)
                pods.append(Pod(f"{name} {role}", NAMESPACE, tuple(sorted(labels.items())), cluster, node_type))
        for role, template in pod_templates(doc) if doc["kind"] in ("Deployment", "Job", "CronJob") else []:
            labels = dict(template.get("metadata", {}).get("labels", {}))
            if doc["kind"] != "Deployment":
                labels["batch.kubernetes.io/job-name"] = meta
            pods.append(Pod(f"{name} pod", NAMESPACE, tuple(sorted(labels.items())), role=doc["kind"]))
    return pods


OUR_PODS = cluster_pods()
OPERATOR = Pod("kuberay-operator", OPERATOR_NAMESPACE, (("app.kubernetes.io/component", "kuberay-operator"),
               ("app.kubernetes.io/instance", "kuberay-operator"), ("app.kubernetes.io/name", "kuberay-operator")))
STRANGER = Pod("a debug pod in the namespace", NAMESPACE, (("run", "debug"),))
# Pods elsewhere that copy our labels: a policy's podSelector alone must not admit them.
IMPOSTORS = [dataclasses.replace(p, name=f"{p.name} (copy in another namespace)", namespace="elsewhere")
             for p in OUR_PODS]
IMPOSTORS.append(dataclasses.replace(OPERATOR, name="a kuberay-operator lookalike", namespace=NAMESPACE))
EVERYONE = [*OUR_PODS, OPERATOR, STRANGER, *IMPOSTORS]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the test reads matchLabels only, not {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def peer_admits(peer: dict, source: Pod) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"the test does not read {peer}"
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace})
    else:
        ns_ok = source.namespace == NAMESPACE
    return ns_ok and selects(peer.get("podSelector", {}), source.label_map)


def admits(target: Pod, source: Pod, port: int) -> bool:
    """Whether the namespace's NetworkPolicies let `source` open TCP `port` on `target` (all policies selecting
    a pod add up; a pod no policy selects accepts everything)."""
    selecting = [p["spec"] for p in POLICIES if selects(p["spec"]["podSelector"], target.label_map)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for spec in selecting:
        for rule in spec.get("ingress", []):
            ports = rule.get("ports")
            if ports is not None:
                assert all(isinstance(p["port"], int) and p.get("protocol", "TCP") == "TCP" for p in ports)
            if (ports is None or port in {p["port"] for p in ports}) and \
                    ("from" not in rule or any(peer_admits(peer, source) for peer in rule["from"])):
                return True
    return False


def admitted(target: Pod, port: int) -> set[str]:
    return {s.name for s in EVERYONE if s != target and admits(target, s, port)}


def names(pods) -> set[str]:
    return {p.name for p in pods}


RAY_PODS = [p for p in OUR_PODS if p.cluster]
SUBMITTERS = [p for p in OUR_PODS if p.role == "submitter" or p.role == "CronJob"]
(MINIO_POD,) = [p for p in OUR_PODS if p.name == "minio.yaml:Deployment/vaegen-minio pod"]
(BUCKET_JOB_POD,) = [p for p in OUR_PODS if p.name == "minio.yaml:Job/vaegen-minio-bucket pod"]
ANY_PORT = (6379, 8265, 9000, 9001, 10001, 20002, 52365)


def test_the_simulated_pods_cover_every_workload():
    assert {p.cluster for p in RAY_PODS} == {"vaegen", "vaegen-train-x7k2p", "vaegen-generate-x7k2p",
                                             "vaegen-retrain-29384756-x7k2p"}
    assert len(SUBMITTERS) == 4 and all(p.role != "head" for p in SUBMITTERS)


def test_ingress_is_denied_by_default_in_the_namespace():
    deny = [p for p in POLICIES if p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
            and not p["spec"].get("ingress")]
    assert deny
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    policy_files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml") if "kind: NetworkPolicy" in p.read_text()}
    assert policy_files and policy_files <= set(kustomization["resources"])
    for target in OUR_PODS:
        for port in ANY_PORT:
            assert not admits(target, STRANGER, port), f"{target.name}:{port} is open to any pod"


def test_minio_accepts_s3_only_from_vaegens_ray_pods_and_the_bucket_job():
    assert admitted(MINIO_POD, 9000) == names(RAY_PODS) | {BUCKET_JOB_POD.name}
    for port in ANY_PORT:
        if port != 9000:
            assert admitted(MINIO_POD, port) == set(), port


@pytest.mark.parametrize("head", [p for p in RAY_PODS if p.role == "head"], ids=lambda p: p.cluster)
def test_a_ray_head_accepts_the_job_api_from_submitters_and_the_operator_and_the_rest_from_its_cluster(head):
    own = names(p for p in RAY_PODS if p.cluster == head.cluster) - {head.name}
    assert admitted(head, 8265) == own | names(SUBMITTERS) | {OPERATOR.name}
    for port in (6379, 10001, 20002, 52365):           # GCS, Ray client, a worker port, the dashboard agent
        assert admitted(head, port) == own, port


@pytest.mark.parametrize("worker", [p for p in RAY_PODS if p.role == "worker"], ids=lambda p: p.cluster)
def test_ray_workers_accept_connections_only_from_their_own_cluster(worker):
    own = names(p for p in RAY_PODS if p.cluster == worker.cluster) - {worker.name}
    assert own
    for port in ANY_PORT:
        assert admitted(worker, port) == own, port


def test_submitters_and_the_bucket_job_accept_no_connections():
    for pod in [*SUBMITTERS, BUCKET_JOB_POD]:
        for port in ANY_PORT:
            assert admitted(pod, port) == set(), (pod.name, port)


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
    try:
        with contextlib.redirect_stderr(errors):
            parser.parse_args(checked)
        return
    except VaegenError as e:                      # a value the config refuses (a bad name, a bound)
        problem = str(e)
    except SystemExit:
        problem = errors.getvalue().strip().splitlines()[-1]
    pytest.fail(f"{name}: `vaegen {' '.join(checked)}` does not parse: {problem}")


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


def test_every_package_ships_in_the_wheel():
    """The image installs vaegen as a wheel (pip install /src): a subpackage left out of the packaging config
    would work in the editable dev install and be missing in the cluster's pods."""
    from setuptools import find_packages
    shipped = set(find_packages(str(REPO), include=PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]))
    on_disk = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in REPO.glob("*/**/__init__.py")
               if p.parts[len(REPO.parts)] in ("vae_core", "cluster", "jobs")}
    assert on_disk and on_disk <= shipped, on_disk - shipped
