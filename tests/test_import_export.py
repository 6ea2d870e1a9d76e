"""`recover.method=import` and `distill export`: a folder of class folders in, the same bytes out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.commands.export import export_run
from pipeline.config import ConfigError
from pipeline.methods.import_set import check_folder
from pipeline.run.runner import run_pipeline
from tests.helpers import clone_run, fast_config

CLASSES = [str(d) for d in range(10)]  # the demo digits' class names
IMPORT = ["recover.method=import", "recover.ipc=2"]


def make_set(root: Path, per_class: int = 3, size: int = 32, seed: int = 0) -> Path:
    """Class folders of random PNGs (PIL's default encoder, as the recover stage's)."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recover_files(run_dir: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted((run_dir / "synthetic").rglob("*")) if p.is_file()}


def test_check_folder_names_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="needs recover.import_set.path"):
        check_folder("", CLASSES, 2)
    with pytest.raises(ConfigError, match="is not a folder"):
        check_folder(str(tmp_path / "nowhere"), CLASSES, 2)
    root = make_set(tmp_path / "set", per_class=2)
    check_folder(str(root), CLASSES, 2)
    (root / "7" / "img01.png").unlink()
    with pytest.raises(ConfigError, match=r"set/7 has 1 image\(s\).*fewer than recover.ipc = 2"):
        check_folder(str(root), CLASSES, 2)
    check_folder(str(root), CLASSES, 1)
    (root / "cat").mkdir()
    with pytest.raises(ConfigError, match="not classes of the data set: cat"):
        check_folder(str(root), CLASSES, 2)
    (root / "cat").rmdir()
    for f in (root / "4").iterdir():
        f.unlink()
    (root / "4").rmdir()
    with pytest.raises(ConfigError, match="no folder for class\\(es\\) 4"):
        check_folder(str(root), CLASSES, 2)


def test_import_round_trips_through_export_byte_for_byte(teacher_run, tmp_path):
    source = make_set(tmp_path / "published")
    run_dir = clone_run(teacher_run, tmp_path / "run")
    cfg = fast_config(*IMPORT, f"recover.import_set.path={source}")
    run_pipeline(cfg, run_dir, stages=["recover"], progress=False)
    out = export_run(run_dir, tmp_path / "export")
    for name in CLASSES:  # the first recover.ipc files of each class, in name order, exactly
        want = [(source / name / f"img{i:02d}.png").read_bytes() for i in range(2)]
        assert [p.read_bytes() for p in sorted((out / "images" / name).glob("*.png"))] == want
    sums = dict(reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines())
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    assert sorted(sums) == files and all(_sha(out / f) == h for f, h in sums.items())
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and 'method: "import"' in card and "ipc: 2" in card
    assert "No accuracies: the run has not been evaluated." in card
    # the export imported again gives the same shards
    again = clone_run(teacher_run, tmp_path / "again")
    run_pipeline(fast_config(*IMPORT, f"recover.import_set.path={out / 'images'}"), again, stages=["recover"],
                 progress=False)
    assert _recover_files(again) == _recover_files(run_dir)
    # export refuses to write over a folder that is not empty, unless told to
    with pytest.raises(ConfigError, match="holds a previous export; choose a new folder or pass --force"):
        export_run(run_dir, out)
    assert export_run(run_dir, out, force=True) == out and (out / "SHA256SUMS").is_file()


def test_import_resizes_other_sizes_and_refuses_a_changed_folder(teacher_run, tmp_path):
    source = make_set(tmp_path / "big", per_class=2, size=48)
    run_dir = clone_run(teacher_run, tmp_path / "run")
    cfg = fast_config(*IMPORT, f"recover.import_set.path={source}")
    run_pipeline(cfg, run_dir, stages=["recover"], progress=False)
    out = export_run(run_dir, tmp_path / "export")
    with Image.open(next((out / "images" / "3").glob("*.png"))) as im:
        assert im.size == (32, 32)  # shorter side to data.resolution, center crop
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(source / "3" / "img00.png")
    with pytest.raises(ConfigError, match="imported images of unit .* changed"):
        run_pipeline(cfg, run_dir, stages=["recover"], progress=False)
    run_pipeline(cfg, run_dir, stages=["recover"], fresh=True, progress=False)  # --fresh redoes it


def test_export_refuses_a_run_without_recover_or_with_a_damaged_shard(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match="recover stage has not completed"):
        export_run(teacher_run, tmp_path / "out")
    with pytest.raises(ConfigError, match="not a run directory"):
        export_run(tmp_path, tmp_path / "out")
    run_dir = clone_run(teacher_run, tmp_path / "run")
    run_pipeline(fast_config("recover.method=random-real"), run_dir, stages=["recover"], progress=False)
    shard = next((run_dir / "synthetic").rglob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=shard.name):
        export_run(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_export_never_deletes_the_run_its_siblings_or_a_folder_that_is_not_an_export(teacher_run, tmp_path, capsys):
    """`--out` = the run, a folder inside it, or its parent (which once deleted the run and every sibling run), and
    `--force` over a folder that is not a previous export: refused with exit 2 before anything is touched."""
    from pipeline.commands.cli import main

    par = tmp_path / "par"
    run_dir = clone_run(teacher_run, par / "run")
    clone_run(teacher_run, par / "sibling")
    run_pipeline(fast_config("recover.method=random-real"), run_dir, stages=["recover"], progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")

    def tree() -> dict[str, str]:
        return {p.relative_to(tmp_path).as_posix(): _sha(p) for p in tmp_path.rglob("*") if p.is_file()}

    before = tree()
    for out, why in ((run_dir, "is the run directory"), (run_dir / "export", "inside the run directory"),
                     (par, "holds the run directory"), (mine, "not a previous export")):
        with pytest.raises(ConfigError, match=why):
            export_run(run_dir, out, force=True)
        assert main(["export", str(run_dir), "--out", str(out), "--force"]) == 2
        assert why in capsys.readouterr().err
    assert tree() == before  # nothing deleted, nothing written
    # a previous export is what --force replaces
    out = export_run(run_dir, tmp_path / "exported")
    (out / "README.md").write_text("edited")
    assert export_run(run_dir, out, force=True) == out and (out / "README.md").read_text() != "edited"
