"""Every command in README.md's usage block runs, in the block's order, as a user would right after `./dev.sh
pipeline` (whose model, fashion-mnist-mlp, is trained here at a tiny size through the same publish): real CLI
entry point, a temp working folder (so the default root ./vaegen-data is its own), real Fashion-MNIST bytes and
the test session's Ray. Each command gets only flags that shrink the work (appended: the last value of a flag
wins) and the temp root, so the README cannot drift from what vaegen accepts and does. `vaegen submit` needs a Ray job server: here
it runs up to the network (parsed, its --model pinned against the root) and must fail only at the connection;
tests/runtime/test_submit.py runs submit against a real head."""
from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main

REPO = Path(__file__).resolve().parents[2]

# Flags appended to each verb: tiny work, one worker, no GPU, no progress bars.
TINY_TRAIN = ["--epochs", "1", "--max-images", "256", "--prior-components", "1", "--no-progress"]
SHRINK = {
    "ingest": ["--no-progress"],
    "train": TINY_TRAIN,
    "generate": ["--count", "20", "--shard-size", "10", "--workers", "1", "--no-progress"],
    "reconstruct": ["--workers", "1", "--no-progress"],
    "evaluate": ["--k", "2", "--limit", "32", "--samples", "64", "--classifier-epochs", "1",
                 "--classifier-max-images", "512", "--no-progress"],
    "retrain": [*TINY_TRAIN, "--eval-max-images", "64"],
}


def usage_block() -> list[list[str]]:
    """The commands of the ```bash block under '## Usage', comments dropped."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Usage"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def shrunk(argv: list[str], root: Path) -> list[str]:
    """The command with the flags that shrink its work, and the temp root named absolutely: the test session's
    Ray started in another folder, and its workers would resolve ./vaegen-data there."""
    verb = argv[1]
    if verb == "show":
        return [a.replace("./vaegen-data", str(root)) for a in argv[1:]]
    extra = [*SHRINK.get(verb, []), "--root", str(root)]
    if verb == "train" and "--workers" in argv:
        extra += ["--workers", "1", "--gpus-per-worker", "0"]     # one CPU worker on the test's Ray
    return argv[1:] + extra


def make_image_folder(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (folder / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / label / f"{i}.png")


def make_sources(folder: Path) -> None:
    """The other inputs the usage block ingests, each written by its own library: a Hugging Face Hub layout
    (datasets), WebDataset tars (webdataset.ShardWriter) and a Parquet file of PNG bytes (pyarrow)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(8)]
    hub = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(8)]}).cast_column(
        "image", datasets.Image()).cast_column("label", datasets.ClassLabel(names=["even", "odd"]))
    hub.to_parquet(str(folder / "my-hf-dataset" / "data" / "train-00000-of-00001.parquet"))
    hub.select(range(2)).to_parquet(str(folder / "my-hf-dataset" / "data" / "test-00000-of-00001.parquet"))
    (folder / "my-shards").mkdir()
    with wds.ShardWriter(str(folder / "my-shards" / "shard-%04d.tar"), maxcount=4, verbose=0) as sink:
        for i, image in enumerate(images):
            sink.write({"__key__": f"s{i:03d}", "png": np.asarray(image), "cls": i % 2})
    pngs = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        pngs.append(buf.getvalue())
    pq.write_table(pa.table({"image": pngs}), folder / "my-table.parquet")


@pytest.mark.slow              # thirteen commands: all of Fashion-MNIST ingested, Ray Train, the test split reconstructed
def test_every_command_in_the_readme_usage_block_runs(tmp_path, monkeypatch, capsys, ray_local):
    commands = usage_block()
    assert commands and all(argv[0] == "vaegen" for argv in commands)
    monkeypatch.chdir(tmp_path)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BROWSER", "true")                  # `show --open` must not start a real browser here
    make_image_folder(tmp_path / "my-images")
    make_sources(tmp_path)
    root = tmp_path / "vaegen-data"

    ran_pipeline_model = False
    for argv in commands:
        if argv[1] == "generate" and not ran_pipeline_model:
            # What `./dev.sh pipeline` leaves: fashion-mnist-mlp published by a training run (its first version).
            assert main(["train", "--name", "fashion-mnist-mlp", *TINY_TRAIN, "--root", str(root)]) == 0, \
                capsys.readouterr()
            ran_pipeline_model = True
        args = shrunk(argv, root)
        if args[0] == "show":
            jobs = sorted(p.name for p in (root / "outputs").iterdir())
            args = [a.replace("<job-id>", jobs[0]) for a in args]
        if args[0] == "submit":
            # No job server here: the command must get as far as connecting to the address, and no further.
            args = [a.replace("http://HEAD:8265", "http://127.0.0.1:9") for a in args]
            code = main(args)
            err = capsys.readouterr().err
            assert code == 2 and "cannot reach the Ray job server at http://127.0.0.1:9" in err, err
            continue
        code = main(args)
        out, err = capsys.readouterr()
        assert code == 0, f"`{shlex.join(argv)}` (run as `vaegen {shlex.join(args)}`) failed: {err[-2000:]}"
    assert (tmp_path / "grid.png").is_file()                                   # the last line's output
