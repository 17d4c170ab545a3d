"""Writes are whole or absent, never replace without --overwrite, and fail in words -- before any work.

Reproductions from the reliability issue: label tables beside a labelmap replaced without
--overwrite, a preview written in place (a kill left a 0-byte PNG), two writers colliding on a
fixed temporary name, an output someone else created during the run being replaced, and
tracebacks after the whole model run for a read-only or full disk, a folder as the output
path, or ``--preview p.xyz``.
"""
from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from biomedseg.cli import main
from biomedseg.errors import InputError
from biomedseg.io.atomic import atomic_write, check_target
from biomedseg.io.writers import outputs_for, write_segmentation
from biomedseg.volume import Volume


def small() -> Volume:
    array = np.zeros((8, 9, 10), bool)
    array[2:5, 3:6, 4:8] = True
    return Volume(array, np.eye(4), name="small")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


def test_label_tables_are_checked_and_never_replaced_without_overwrite(tmp_path, colin_path, capsys):
    out = tmp_path / "brain.nii.gz"
    assert [p.name for p in outputs_for(out)] == ["brain.nii.gz", "brain.labels.json", "brain.labels.csv"]
    table = tmp_path / "brain.labels.json"
    table.write_text("someone's own table")
    rc = main(["segment", str(colin_path), "--prompt", "brain", "-o", str(out), "-q"])
    assert rc == 2 and "brain.labels.json' already exists" in capsys.readouterr().err
    assert table.read_text() == "someone's own table" and not out.exists()  # refused before the model ran
    vol = small()
    with pytest.raises(InputError, match="already exists"):
        write_segmentation(out, vol, {"box": vol.array})
    assert table.read_text() == "someone's own table" and leftovers(tmp_path) == []
    written = write_segmentation(out, vol, {"box": vol.array}, overwrite=True)
    assert [p.name for p in written] == ["brain.nii.gz", "brain.labels.json", "brain.labels.csv"]
    assert json.loads(table.read_text())["labels"][0]["name"] == "box"


def test_a_failed_write_leaves_nothing_and_says_why_even_if_cleaning_up_fails(tmp_path, monkeypatch):
    target = tmp_path / "preview.png"

    def full_disk(tmp: Path):
        tmp.write_bytes(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(InputError, match="the disk is full") as err:
        atomic_write(target, full_disk)
    assert "Free some space" in err.value.hint and not target.exists() and leftovers(tmp_path) == []

    def read_only(tmp: Path):
        raise OSError(errno.EROFS, "Read-only file system")

    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    with pytest.raises(InputError, match="the disk is read-only"):  # not hidden by the failing clean-up
        atomic_write(target, read_only)
    monkeypatch.setattr(Path, "unlink", real_unlink)


def test_an_output_someone_else_creates_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "result.json"

    def slow_write(tmp: Path):
        tmp.write_text("ours")
        target.write_text("theirs")  # another program, while we computed

    with pytest.raises(InputError, match="appeared while this ran"):
        atomic_write(target, slow_write)
    assert target.read_text() == "theirs" and leftovers(tmp_path) == []
    assert atomic_write(target, lambda tmp: tmp.write_text("ours"), overwrite=True).read_text() == "ours"


def test_thirty_writers_to_one_output_never_tear_it(tmp_path):
    """Each writer has its own temporary name; a reader only ever sees one whole file."""
    target = tmp_path / "shared.nii.gz"
    vol = small()
    errors, seen = [], []

    def writer(n):
        try:
            from biomedseg.io import write_volume

            write_volume(target, vol.with_array(np.full(vol.shape, n, np.int16)), overwrite=True)
        except Exception as exc:  # noqa: BLE001 -- collected: none may happen
            errors.append(exc)

    def reader():
        for _ in range(60):
            if target.exists():
                data = np.asanyarray(nib.load(str(target)).dataobj)
                seen.append(len(np.unique(data)))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(30)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and leftovers(tmp_path) == []
    assert all(n == 1 for n in seen)  # every read got one writer's whole file
    assert len(np.unique(np.asanyarray(nib.load(str(target)).dataobj))) == 1


@pytest.mark.parametrize("case", ["output is a folder", "preview not png", "folder is a file", "preview exists",
                                  "threshold nan", "threshold inf"])
def test_bad_targets_and_values_fail_in_words_before_anything_runs(tmp_path, colin_path, capsys, case):
    args = ["segment", str(colin_path), "--prompt", "brain", "-o", str(tmp_path / "out.seg.nrrd")]
    if case == "output is a folder":
        (tmp_path / "dir.seg.nrrd").mkdir()
        args[-1] = str(tmp_path / "dir.seg.nrrd")
        expected = "it is a folder"
    elif case == "preview not png":
        args += ["--preview", str(tmp_path / "p.xyz")]
        expected = "must end in .png"
    elif case == "folder is a file":
        (tmp_path / "file.txt").write_text("x")
        args[-1] = str(tmp_path / "file.txt" / "out.seg.nrrd")
        expected = "is a file, not a folder"
    elif case == "preview exists":
        (tmp_path / "p.png").write_bytes(b"keep me")
        args += ["--preview", str(tmp_path / "p.png")]
        expected = "p.png' already exists"
    else:
        args += ["--threshold", case.split()[1]]
        expected = "must lie strictly between 0 and 1"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out.seg.nrrd").exists()
    if case == "preview exists":
        assert (tmp_path / "p.png").read_bytes() == b"keep me"


def test_check_target_accepts_a_new_file_in_a_folder_to_be_made(tmp_path):
    assert check_target(tmp_path / "new" / "deeper" / "x.seg.nrrd") == tmp_path / "new" / "deeper" / "x.seg.nrrd"
    assert atomic_write(tmp_path / "new" / "x.json", lambda tmp: tmp.write_text("{}")).read_text() == "{}"


@pytest.mark.parametrize("edge,expected", [(1000, "truncated or damaged, or its header is wrong"),
                                           (1100, "truncated or damaged, or its header is wrong"),
                                           (30000, "truncated or damaged, or its header is wrong")])
def test_a_header_that_declares_more_than_the_file_holds_is_refused_before_allocating(tmp_path, capsys, edge,
                                                                                       expected):
    """An 85-byte .nii.gz declaring 1000^3 float32 drove the CLI to 4 GB; 30000^3 gave a MemoryError."""
    import gzip
    import resource

    header = nib.Nifti1Header()
    header.set_data_shape((edge, edge, edge))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
    assert bomb.stat().st_size < 200
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["segment", str(bomb), "--prompt", "brain", "-o", str(tmp_path / "x.seg.nrrd")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: nothing big was allocated


def test_an_image_too_big_for_this_memory_is_refused_before_reading(tmp_path, capsys):
    """A whole (sparse) 3000^3 float32 .nii: the file holds it, memory cannot: a sentence, not a MemoryError."""
    header = nib.Nifti1Header()
    header.set_data_shape((3000, 3000, 3000))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    big = tmp_path / "big.nii"
    with open(big, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
        f.truncate(352 + 3000 ** 3 * 4)  # sparse: no disk used
    assert main(["segment", str(big), "--prompt", "brain", "-o", str(tmp_path / "x.seg.nrrd")]) == 2
    err = capsys.readouterr().err
    assert "GB of memory available" in err and "Traceback" not in err


def test_running_out_of_memory_at_every_batch_is_exit_4_through_the_worker(tmp_path, colin_path, capsys):
    from conftest import worker_test_models

    with worker_test_models():
        rc = main(["segment", str(colin_path), "--model", "test-model", "--prompt", "t", "--option", "mode=oom",
                   "--option", "always_oom=true", "-o", str(tmp_path / "x.seg.nrrd"), "-q"])
    assert rc == 4 and "ran out of memory" in capsys.readouterr().err


def test_files_get_the_umasks_permissions_and_a_replaced_file_keeps_its_own(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        made = atomic_write(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
        assert stat.S_IMODE(made.stat().st_mode) == 0o644  # not mkstemp's 0600
        made.chmod(0o640)
        atomic_write(made, lambda tmp: tmp.write_text("[]"), overwrite=True)
        assert stat.S_IMODE(made.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_a_labelmap_and_its_tables_are_written_all_or_none(tmp_path, monkeypatch):
    """The disk filling up on the last table used to leave the labelmap without its tables."""
    from biomedseg.io import writers

    def full(path, segments):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers, "write_color_table_csv", full)
    vol = small()
    with pytest.raises(InputError, match="the disk is full"):
        write_segmentation(tmp_path / "x.nii.gz", vol, {"box": vol.array})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_dangling_link_and_a_table_of_another_labelmap_are_refused_before_writing(tmp_path):
    vol = small()
    (tmp_path / "out.seg.nrrd").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="already exists \\(a symbolic link\\)"):
        check_target(tmp_path / "out.seg.nrrd")
    write_segmentation(tmp_path / "a.nii.gz", vol, {"box": vol.array})
    with pytest.raises(InputError, match="is the label table of 'a.nii.gz'"):
        write_segmentation(tmp_path / "a.nrrd", vol, {"box": vol.array}, overwrite=True)
    assert json.loads((tmp_path / "a.labels.json").read_text())["labelmap"] == "a.nii.gz"
