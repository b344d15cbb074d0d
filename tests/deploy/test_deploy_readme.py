"""Every command in deploy/README.md's code blocks, checked against the manifests and the CLI without a cluster:
the files and folders it names exist, the image `kustomize edit set image` sets reaches every manifest a later
command applies, Helm charts come from a repository added before, the Kubernetes objects it names are the ones the
manifests make, and every vaegen command parses with the real parser (and what follows `submit --` with the
parser of the submitted verb)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser
from jobs.config_file import parse_args
from jobs.verbs import job_parser

REPO = Path(__file__).resolve().parents[2]
README = REPO / "deploy" / "README.md"
K8S = REPO / "deploy" / "k8s"
SEPARATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class Command:
    cwd: Path                 # where it runs: the repository root, or a folder a `(cd X && ...)` entered
    argv: tuple[str, ...]
    piped_from: tuple[str, ...] | None = None     # the command whose output it reads (`a | b`)
    line: str = ""


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(text: str) -> list[Command]:
    """The commands of every bash block, in order: continuation lines joined, comments dropped, `<placeholders>`
    kept as one word, split at && || ; | & and with the folder a `(cd X && ...)` group runs in."""
    found: list[Command] = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"<([A-Za-z0-9_.-]+)>", r"PLACEHOLDER_\1", line)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.commenters = "#"
            lexer.whitespace_split = True
            tokens = list(lexer)
            cwd, current, previous, pipe = REPO, [], None, False
            for token in [*tokens, ";"]:
                if token in SEPARATORS or token in ("(", ")"):
                    if current:
                        if current[0] == "cd":
                            cwd = (cwd / current[1]).resolve()
                        else:
                            found.append(Command(cwd, tuple(current), previous if pipe else None, line))
                        previous, current = tuple(current), []
                    pipe = token == "|"
                    if token == ")":
                        cwd = REPO
                else:
                    current.append(token)
    return found


README_COMMANDS = commands(README.read_text())


def manifests(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_manifests() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in manifests(p) if not d["apiVersion"].startswith("kustomize")]


def images_in(value) -> list[str]:
    if isinstance(value, dict):
        return [v for k, v in value.items() if k == "image" and isinstance(v, str)] + \
            [i for v in value.values() for i in images_in(v)]
    if isinstance(value, list):
        return [i for v in value for i in images_in(v)]
    return []


def repo_of(image: str) -> str:
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


def kustomization_files(folder: Path) -> set[Path]:
    """Every manifest file a kustomization folder builds from, through its resources and components."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files: set[Path] = set()
    for entry in [*spec.get("resources", []), *spec.get("components", [])]:
        target = (folder / entry).resolve()
        files |= kustomization_files(target) if target.is_dir() else {target}
    return files


def kustomization_folders(folder: Path) -> set[Path]:
    """The folder and every kustomization or component it includes."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    found = {folder.resolve()}
    for entry in [*spec.get("resources", []), *spec.get("components", [])]:
        target = (folder / entry).resolve()
        if target.is_dir():
            found |= kustomization_folders(target)
    return found


def of(name: str) -> list[Command]:
    return [c for c in README_COMMANDS if c.argv[0] == name]


def kustomize_target(c: Command) -> Path | None:
    """The folder a `kubectl apply -k DIR` or a `kubectl kustomize ... DIR` builds, else None."""
    if c.argv[:2] == ("kubectl", "kustomize"):
        return (c.cwd / [a for a in c.argv[2:] if not a.startswith("-") and a != "LoadRestrictionsNone"][0]).resolve()
    if c.argv[:2] == ("kubectl", "apply") and "-k" in c.argv:
        return (c.cwd / c.argv[c.argv.index("-k") + 1]).resolve()
    return None


def applied_files(c: Command) -> list[Path]:
    if c.argv[:2] == ("kubectl", "apply") and "-f" in c.argv and c.argv[c.argv.index("-f") + 1] != "-":
        return [(c.cwd / c.argv[c.argv.index("-f") + 1]).resolve()]
    return []


def test_the_readme_has_the_commands_this_test_reads():
    verbs = {c.argv[0] for c in README_COMMANDS}
    assert {"helm", "docker", "kustomize", "kubectl", "vaegen", "ray"} <= verbs
    assert len(of("vaegen")) >= 6


def test_every_file_and_folder_a_command_names_exists():
    for c in README_COMMANDS:
        for i, arg in enumerate(c.argv):
            value = arg.split("=", 1)[-1]
            file_flag = c.argv[:2] in (("kubectl", "apply"), ("docker", "build")) and c.argv[i - 1] in ("-f", "-k")
            if value.startswith(("deploy/", "./deploy/")) or (i and file_flag and value != "-"):
                assert (c.cwd / value).exists(), f"{c.line}: {value} does not exist"
        if (target := kustomize_target(c)) is not None:
            assert (target / "kustomization.yaml").is_file(), f"{c.line}: no kustomization in {target}"
        if c.argv[0] == "kustomize":
            assert (c.cwd / "kustomization.yaml").is_file(), f"{c.line}: runs where there is no kustomization"


def set_images() -> list[tuple[Path, str, str]]:
    """(folder, image name, new name) of each `kustomize edit set image NAME=NEWNAME`."""
    found = []
    for c in of("kustomize"):
        if c.argv[1:4] == ("edit", "set", "image"):
            name, new = c.argv[4].split("=", 1)
            found.append((c.cwd, name, new))
    return found


def test_the_image_kustomize_sets_reaches_every_manifest_applied():
    """`kustomize edit set image` lands in one folder; every manifest a later command applies must be built by a
    kustomization that includes that folder (a `kubectl apply -f file` of a vaegen manifest would keep the
    unqualified image), and the name it sets must be the image the manifests use."""
    (edited, name, new), = set_images()
    vaegen_repos = {repo_of(i) for d in all_manifests() for i in images_in(d) if not i.startswith("minio/")}
    assert vaegen_repos == {name}, f"manifests use {vaegen_repos}, the README sets {name}"
    built_tags = {a.split(":", 1)[1] for c in of("docker") for a in c.argv if a.startswith(f"{new}:")}
    used_tags = {i.split(":", 1)[1] for d in all_manifests() for i in images_in(d) if repo_of(i) == name}
    assert used_tags <= built_tags, f"the README builds {built_tags}, the manifests use {used_tags}"
    applied = []
    for c in of("kubectl"):
        if (target := kustomize_target(c)) is not None:
            assert edited in kustomization_folders(target), f"{c.line}: builds without {edited}"
            applied += kustomization_files(target)
        for path in applied_files(c):
            images = {repo_of(i) for d in manifests(path) for i in images_in(d)}
            assert name not in images, f"{c.line}: applies {path.name} without the image set in {edited}"
            applied.append(path)
    # Every vaegen manifest is applied by some command (the README covers each one).
    with_vaegen = {p.resolve() for p in K8S.glob("*.yaml") if any(
        repo_of(i) == name for d in manifests(p) for i in images_in(d))}
    assert with_vaegen <= set(applied), f"never applied: {sorted(p.name for p in with_vaegen - set(applied))}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_kustomize_renders_the_set_image_into_every_applied_manifest(tmp_path):
    """What kustomize itself builds, each command as the README runs it, after the README's image edit (written
    into a copy as `kustomize edit set image` writes it)."""
    (edited, name, new), = set_images()
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "deploy", copy / "deploy")
    spec_path = copy / edited.relative_to(REPO) / "kustomization.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["images"] = [{**i, "newName": new} if i["name"] == name else i for i in spec.get("images", [])]
    spec_path.write_text(yaml.safe_dump(spec))
    rendered = 0
    for c in of("kubectl"):
        if c.argv[1] not in ("kustomize", "apply") or kustomize_target(c) is None:
            continue
        argv = list(c.argv)
        if argv[1] == "apply":
            argv = ["kubectl", "kustomize", argv[argv.index("-k") + 1]]
        run = subprocess.run(argv, cwd=copy, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"{c.line}: {run.stderr[-1500:]}"
        images = [i for d in yaml.safe_load_all(run.stdout) if d for i in images_in(d)]
        vaegen_images = [i for i in images if not i.startswith("minio/")]
        assert vaegen_images and all(i.startswith(f"{new}:") for i in vaegen_images), (c.line, vaegen_images)
        rendered += 1
    assert rendered >= 3


def test_helm_charts_come_from_a_repository_added_before():
    added: set[str] = set()
    installs = 0
    for c in of("helm"):
        if c.argv[1:3] == ("repo", "add"):
            added.add(c.argv[3])
        elif c.argv[1] in ("install", "upgrade"):
            chart = [a for a in c.argv[2:] if not a.startswith("-")][1]
            if "/" in chart and not chart.startswith(("oci://", ".", "/")):
                assert chart.split("/")[0] in added, f"{c.line}: `helm repo add {chart.split('/')[0]} …` first"
            installs += 1
    assert installs


def names_of(kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in all_manifests() if d["kind"] == kind}


def test_the_kubernetes_objects_the_commands_name_are_the_manifests_own():
    """Services, Jobs, clusters and Secrets named in commands exist once the manifests are applied (KubeRay names
    a RayCluster's head Service <cluster>-head-svc and a RayJob's submitter Job after the RayJob)."""
    services = names_of("Service") | {f"{n}-head-svc" for n in names_of("RayCluster")}
    jobs = names_of("Job") | names_of("RayJob")
    referenced_secrets = {m.group(1) for p in K8S.glob("*.yaml")
                          for m in re.finditer(r"(?:secretName|name): (vaegen-[a-z0-9-]+)\b", p.read_text())
                          if "secretKeyRef" in p.read_text() or "secretRef" in p.read_text()} & {
        m.group(1) for p in K8S.glob("*.yaml")
        for m in re.finditer(r"secret(?:KeyRef|Ref|Name)[^\n]*?name: ([a-z0-9-]+)", p.read_text())}
    created = {c.argv[4] for c in of("kubectl") if c.argv[1:4] == ("create", "secret", "generic")}
    assert referenced_secrets and referenced_secrets <= created, (referenced_secrets, created)
    for c in of("kubectl"):
        for arg in c.argv[2:]:
            kind, _, name = arg.partition("/")
            if kind == "svc":
                assert name in services, c.line
            if kind == "job" and not name.startswith("PLACEHOLDER"):
                assert name in jobs, c.line
        if c.argv[1:3] == ("get", "raycluster"):
            assert c.argv[3] in names_of("RayCluster"), c.line
        if c.argv[1:3] == ("get", "cronjob"):
            assert c.argv[3] in names_of("CronJob"), c.line
        if c.argv[1:3] == ("get", "secret"):
            assert c.argv[3] in created, c.line


def test_every_vaegen_command_parses_with_the_real_cli():
    parser = build_parser()
    for c in of("vaegen"):
        argv = list(c.argv[1:])
        try:
            args = parse_args(parser, argv)
        except SystemExit:
            pytest.fail(f"`{c.line.strip()}` does not parse")
        if argv[0] == "submit":
            inner = args.command[1:] if args.command[:1] == ["--"] else args.command
            if inner:
                try:
                    parse_args(job_parser(), inner)
                except SystemExit:
                    pytest.fail(f"`{c.line.strip()}`: the submitted command does not parse")
