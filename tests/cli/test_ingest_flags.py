"""`vaegen ingest`'s reading flags: each lands in its IngestOptions field, and a bad value is one line, exit 2,
before anything is read."""
import pytest

from jobs.cli import build_parser
from jobs.cli import main as vaegen
from jobs.config_file import parse_args
from jobs.flags import build
from vae_core.config import IngestOptions, parse_size
from vae_core.errors import VaegenError


def options_of(argv: list[str]) -> IngestOptions:
    return build(IngestOptions, parse_args(build_parser(), ["ingest", *argv]))


def test_every_reading_flag_lands_in_ingest_options():
    assert options_of(["fashion-mnist"]) == IngestOptions()
    got = options_of(["hf", "./hub", "--size", "64x48", "--mode", "RGB", "--image-column", "img",
                      "--label-column", "", "--skip-bad", "--split", "val"])
    assert got == IngestOptions(size=(64, 48), mode="RGB", image_column="img", label_column="", skip_bad=True,
                                split="val")
    got = options_of(["webdataset", "s.tar", "--image-key", "jpg;png", "--label-key", "json"])
    assert (got.image_key, got.label_key) == ("jpg;png", "json")


@pytest.mark.parametrize("argv, message", [
    (["--size", "64"], "argument --size: --size '64' is not HxW, e.g. 64x64"),
    (["--size", "64x"], "argument --size: --size '64x' is not HxW"),
    (["--size", "0x64"], "--size 0x64: height and width must be 1..65535"),
    (["--mode", "CMYK"], "argument --mode: invalid choice: 'CMYK'"),
    (["--split", "a/b"], "--split"),
])
def test_a_bad_reading_flag_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    code = vaegen(["ingest", "image-folder", str(tmp_path), "--root", str(tmp_path / "root"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "root" / "datasets").exists()


def test_size_parses_height_by_width():
    assert parse_size("28x28") == (28, 28) and parse_size(" 64X32 ") == (64, 32)
    with pytest.raises(VaegenError, match="not HxW"):
        parse_size("64x64x3")


def test_skip_bad_says_how_many_images_it_skipped_in_one_line(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    for name in ("3.png", "4.png"):
        (tmp_path / name).write_bytes(b"not an image")
    assert vaegen(["ingest", "image-folder", str(tmp_path), "--name", "ds", "--skip-bad", "--no-progress",
                   "--root", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "dataset ds (3, 4, 4): train: 3 rows in 1 shard"
    assert out[1].startswith("skipped 2 unreadable images (--skip-bad; named in the card), the first: ")
    assert "3.png: cannot identify image file" in out[1] and len(out) == 2
