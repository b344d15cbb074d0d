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
