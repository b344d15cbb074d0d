"""Bulk samples and reconstructions as sharded datasets under outputs/<job-id>/ (cluster/store/layout.py). One
concern per module:

    driver.py    run_job / run_generation / run_reconstruction: plan → lease → verify → workers → commit
    plan.py      the job's identity and plan (JobPlan, plan_job): resolved and checked before any work
    shards.py    building and publishing one shard, without Ray (ShardMaker)
    pool.py      the DecoderWorker actors: placement, start-up, the scheduler and its fault policy
    commit.py    the ledger, the trust check every reader uses, the run record, and the commit
    lease.py     the per-job lease: a second driver waits
    card.py      the job's Hugging Face dataset card
    settings.py  RunSettings: how a job runs (workers, resources, Ray address), never part of its identity
    drill.py     the fault-injection hook that tests and drills use to kill a worker at a known point
    writers/     one module per output format, its writer and its reader side by side"""
from cluster.generate.commit import STALE_TEMP_S, ShardLedger, commit, verified_shards
from cluster.generate.driver import run_generation, run_job, run_reconstruction
from cluster.generate.plan import OUTPUT_FORMAT_VERSION, JobPlan, ShardTask, plan_job, sha256_hex
from cluster.generate.pool import start_workers, stop_workers
from cluster.generate.settings import RunSettings
from cluster.generate.shards import ShardMaker

__all__ = ["OUTPUT_FORMAT_VERSION", "STALE_TEMP_S", "JobPlan", "RunSettings", "ShardLedger", "ShardMaker", "ShardTask",
           "commit", "plan_job", "run_generation", "run_job", "run_reconstruction", "sha256_hex", "start_workers",
           "stop_workers", "verified_shards"]
