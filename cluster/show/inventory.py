"""What a storage root holds (`vaegen ls`): datasets, model versions (champion marked) and generation jobs with
their state, read from the records the jobs themselves leave:

- finished: `_SUCCESS` names the sha256 of `_manifest.json`'s bytes (then the manifest says everything);
- failed: no `_SUCCESS`, and the run record `_run.json` says the last run stopped on an error;
- partial: anything else (running now, interrupted, or killed): n of m shards done, from the receipts.

The run record is written by the generation driver around its Ray work (cluster/generate/commit.py,
`job_run_record`): `running` when the shards start, `shards-done` after them (the commit follows), `failed`
(with the error's first line) or `interrupted` when they stop early. Killed drivers leave `running`, which
reads as partial: the next run resumes either way. Where each record lives is cluster/store/layout.py's.

`read_committed_manifest` (cluster/generate/commit.py, beside the write it checks) is the one check of a
commit. A record a reader needs that is unreadable (not JSON, missing fields) or a `_SUCCESS` that does not
match its manifest makes the entry `corrupt`: `ls` marks it and lists the rest, `show` refuses it with one line
naming the file and the fix (`CorruptRecord`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.data.datasets import read_manifest
from cluster.generate.commit import RERUN_JOB, read_committed_manifest, uncommitted_reason
from cluster.store.layout import OUTPUTS, JobKeys, dataset_manifest_key, job_prefix
from cluster.store.name_binding import binding_of_config
from cluster.store.records import RECORD_ERRORS, CorruptRecord, fields, problem_of, read_record
from cluster.store.registry import ModelRef, Registry
from cluster.store.storage import Storage
from vae_core.errors import VaegenError

# -- jobs ---------------------------------------------------------------------------------------------------


@dataclass
class JobStatus:
    job_id: str
    state: str                        # finished | partial | failed | corrupt
    kind: str = "?"
    model: str = "?"
    format: str = "?"
    shards_done: int = 0
    shards_planned: int | None = None  # None: unknown (no run record and no manifest)
    rows_done: int = 0
    rows_planned: int | None = None
    error: str = ""                    # failed: the run's error; corrupt: which file and what is wrong
    when: float | None = None          # finished: created_at; else the run's start
    manifest: dict | None = None
    receipts: list[dict] = field(default_factory=list)
    corrupt: CorruptRecord | None = None

    @property
    def progress(self) -> str:
        planned = "?" if self.shards_planned is None else self.shards_planned
        return f"{self.shards_done}/{planned}"


def job_status(storage: Storage, job_id: str, *, with_receipts: bool = False) -> JobStatus:
    """The job's state from its records; never raises for an unreadable record: the state is then `corrupt`.
    A record that vanishes between being listed and being read (a driver withdrawing `_SUCCESS` to repair the
    job, another rewriting its receipts) is read again once; a storage that keeps failing is an error."""
    try:
        try:
            return _job_status(storage, job_id, with_receipts)
        except CorruptRecord:
            raise
        except VaegenError:
            return _job_status(storage, job_id, with_receipts)
    except CorruptRecord as e:
        short = e.uri.rsplit(f"/{job_prefix(job_id)}/", 1)[-1]
        return JobStatus(job_id, "corrupt", job_id.split("-")[0], error=f"{short} {e.problem}", corrupt=e)


def _finished(job_id: str, m: dict) -> JobStatus:
    t = m["totals"]
    return JobStatus(job_id, "finished", str(m["kind"]), str(m["model"]), str(m["format"]), int(t["shards"]),
                     int(t["shards"]), int(t["rows"]), int(t["rows"]), when=m["created_at"], manifest=m,
                     receipts=list(m["shards"]))


def _receipt(record) -> dict:
    """A shard receipt with the fields readers use (index, rows, name) of the right types."""
    return fields(record, {"index": "count", "rows": "count", "name": str})


def _run_record(record) -> dict:
    """A run record with the fields `ls` shows, of the kinds job_run_record writes them."""
    return fields(record, {"kind": str, "format": str, "model": str, "status": str, "planned_shards": "count",
                           "planned_rows": "count", "started_at": float}, {"error": str})


def _job_status(storage: Storage, job_id: str, with_receipts: bool) -> JobStatus:
    keys = JobKeys.of(job_id)
    for _ in range(2):                         # twice: a commit may land between the two checks below
        manifest = read_committed_manifest(storage, keys.prefix)
        if manifest is not None:
            try:
                return _finished(job_id, manifest)
            except RECORD_ERRORS as e:
                raise CorruptRecord(storage.uri_of(keys.manifest), problem_of(e), RERUN_JOB) from None
        if not storage.exists(keys.success):
            break
        reason = uncommitted_reason(storage, keys.prefix)
        if reason is not None:
            raise reason
    run_key = keys.run_record
    run = read_record(storage, run_key, RERUN_JOB, _run_record) if storage.exists(run_key) else {}
    receipt_keys = [e.key for e in storage.list(keys.receipts) if e.key.endswith(".json")]
    receipts = []
    if with_receipts:
        receipts = sorted((read_record(storage, k, RERUN_JOB, _receipt) for k in receipt_keys),
                          key=lambda r: int(r["index"]))
    try:
        return JobStatus(job_id, "failed" if run.get("status") == "failed" else "partial",
                         str(run.get("kind", job_id.split("-")[0])), str(run.get("model", "?")),
                         str(run.get("format", "?")), len(receipt_keys), run.get("planned_shards"),
                         sum(int(r["rows"]) for r in receipts), run.get("planned_rows"), str(run.get("error", "")),
                         run.get("started_at"), receipts=receipts)
    except RECORD_ERRORS as e:
        raise CorruptRecord(storage.uri_of(run_key), problem_of(e), RERUN_JOB) from None


def list_jobs(storage: Storage) -> list[JobStatus]:
    return [job_status(storage, job_id) for job_id in storage.list_dirs(OUTPUTS)]


# -- the root itself -----------------------------------------------------------------------------------------
def require_root(storage: Storage) -> Storage:
    """`ls` of a root that is not there is an error, not an empty listing."""
    return storage.check_readable()


def relative(storage: Storage, error: Exception) -> str:
    """An error's line with the root's URI left out of the file names (`ls` prints the root once, on top)."""
    return str(error).replace(f"{storage.uri}/", "")


# -- datasets and models ------------------------------------------------------------------------------------
@dataclass
class DatasetInfo:
    name: str
    image_shape: tuple[int, ...]
    classes: int
    splits: dict[str, int]            # split -> rows
    problem: str = ""                 # the one-line error when the manifest is unreadable (the rest is then empty)


def list_datasets(storage: Storage) -> list[DatasetInfo]:
    """Every ingested dataset; one whose manifest cannot be read is listed with its problem, not raised."""
    found = []
    for name in storage.list_dirs("datasets"):
        if not storage.exists(dataset_manifest_key(name)):
            continue                                # no manifest: an unfinished ingest, invisible to readers
        try:
            m = read_manifest(storage, name)
        except VaegenError as e:
            found.append(DatasetInfo(name, (), 0, {}, relative(storage, e)))
            continue
        found.append(DatasetInfo(name, tuple(m["image_shape"]), len(m["label_names"]),
                                 {s: v["rows"] for s, v in m["splits"].items()}))
    return found


@dataclass
class ModelVersionInfo:
    name: str
    version: str
    champion: bool
    test_loss: float | None           # from metrics.json, when the version has one
    problem: str = ""                 # the one-line error of an unreadable champion.json, config.json or metrics.json
    dataset: str | None = None        # config.json: what it was trained on (a name holds one dataset and shape)
    image_shape: tuple[int, ...] | None = None
    nll: float | None = None          # metrics.json's evaluation (`vaegen evaluate`), when the version has one


def champion_version(registry: Registry, name: str) -> str | None:
    """The champion's version; Registry.champion refuses an unreadable champion.json in one line."""
    champion = registry.champion(name)
    return None if champion is None else str(champion["version"])


def read_metrics(registry: Registry, name: str, version: str) -> dict | None:
    """A version's metrics.json, None when it has none; Registry.metrics refuses an unreadable one in one line."""
    if not registry.storage.exists(registry.key(name, version, "metrics.json")):
        return None
    return registry.metrics(ModelRef(name, version))


def list_models(storage: Storage) -> list[ModelVersionInfo]:
    """Every complete model version; an unreadable champion.json, config.json or metrics.json marks only its own
    rows."""
    registry, found = Registry(storage), []
    for name in registry.names():
        champion_problem = ""
        try:
            champion = champion_version(registry, name)
        except VaegenError as e:
            champion, champion_problem = None, relative(storage, e)
        for version in registry.versions(name):
            info = ModelVersionInfo(name, version, version == champion, None, champion_problem)
            try:
                bound = binding_of_config(registry.config(ModelRef(name, version)))   # a corrupt config is marked
                info.dataset, info.image_shape = bound.dataset, bound.image_shape
                metrics = read_metrics(registry, name, version) or {}
                info.test_loss = number(metrics.get("test_loss"))
                info.nll = number((metrics.get("evaluation") or {}).get("nll"))
            except VaegenError as e:
                info.problem = "; ".join(filter(None, (info.problem, relative(storage, e))))
            found.append(info)
    return found


def number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
