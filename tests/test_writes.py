"""What a write may replace, and when it refuses: each case lost or corrupted a user's data before."""

from __future__ import annotations

import os
import threading

import numpy as np
import pandas as pd
import pytest

import probe
from probe import writes
from probe.cli import main
from probe.studies.common import ImageRows

PROMPT = "a cat and a dog"


def _record(pipe, out, seeds=(0, 1), **kwargs):
    return probe.record(pipe, PROMPT, seeds=list(seeds), steps=2, progress=False, out=out, **kwargs)


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_saving_a_lazy_recording_over_its_own_store_keeps_its_data(tmp_path, tiny, suffix):
    memory = _record(tiny, None)
    path = tmp_path / f"r{suffix}"
    probe.save(memory, path)
    lazy = probe.open_recording(path)
    probe.save(lazy, path)  # was: the store deleted before its lazy arrays were read (all NaN, black images)
    again = probe.open_recording(path, verify=True)
    for group in ("cross/res16", "self/res8", "images"):
        var = "image" if group == "images" else "attn"
        np.testing.assert_array_equal(again[group][var].values, memory[group][var].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_folder_that_is_not_a_recording_is_not_replaced(tmp_path, tiny):
    user = tmp_path / "userdata.zarr"
    user.mkdir()
    (user / "important.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"exists and is not a probe recording.*force=True \(command line: "
                                              r"--force\)"):
        _record(tiny, user)
    assert (user / "important.txt").read_text() == "x"
    with pytest.raises(FileExistsError, match="is not a probe recording"):
        probe.save(_record(tiny, None), user)
    nc = tmp_path / "theirs.nc"
    nc.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="is not a probe recording"):
        _record(tiny, nc)
    assert nc.read_bytes() == b"not ours"
    tree = _record(tiny, user, force=True)  # asked for: replaced
    assert not (user / "important.txt").exists() and tree["images"].sizes["sample"] == 2
    assert main(["record", "--model", "tiny", "--prompt", PROMPT, "--seed", "0", "--steps", "1",
                 "--out", str(nc)]) == 2
    assert nc.read_bytes() == b"not ours"


def test_a_bad_out_is_refused_before_anything_is_generated(tmp_path, tiny, monkeypatch):
    calls = []
    def no_generation(self, *a, num_inference_steps: int = 50, guidance_scale: float = 7.5, **k):  # its defaults kept
        calls.append(1)

    monkeypatch.setattr(type(tiny), "__call__", no_generation)
    (tmp_path / "file.zarr").write_text("a file")
    with pytest.raises(ValueError, match="is a file, and a .zarr recording is a folder"):
        _record(tiny, tmp_path / "file.zarr")
    (tmp_path / "folder.nc").mkdir()
    with pytest.raises(ValueError, match="is a folder, and a .nc recording is a file"):
        _record(tiny, tmp_path / "folder.nc")
    (tmp_path / "real.zarr").mkdir()
    (tmp_path / "link.zarr").symlink_to(tmp_path / "real.zarr")
    with pytest.raises(ValueError, match="is a symbolic link .* give the real path"):
        _record(tiny, tmp_path / "link.zarr")
    with pytest.raises(ValueError, match=r"must go to a path ending in .zarr or .nc.*e\.g\. "):
        _record(tiny, tmp_path / "rec.h5")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere
            with pytest.raises(PermissionError, match="is not writable"):
                _record(tiny, tmp_path / "ro" / "r.nc")
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["file.zarr", "folder.nc", "link.zarr",
                                                                         "real.zarr", "ro"]
    monkeypatch.undo()
    nested = _record_unpatched(tmp_path / "a" / "b" / "r.nc")  # a missing parent folder is made, for every suffix
    assert nested.exists()


def _record_unpatched(out):
    return probe.save(_record(probe.load("tiny"), None), out)


def test_a_second_writer_to_one_output_is_refused(tmp_path, tiny):
    out = tmp_path / "r.zarr"
    started, release = threading.Event(), threading.Event()
    errors = []

    def hold():
        try:
            with writes.replacing(out, suffixes=(".zarr",)) as tmp:
                tmp.mkdir()
                started.set()
                release.wait(30)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    holder = threading.Thread(target=hold)
    holder.start()
    assert started.wait(30)
    try:
        with pytest.raises(writes.OutputBusy, match=r"is being written by process \d+; wait for it"):
            _record(tiny, out)
    finally:
        release.set()
        holder.join()
    assert errors == []
    assert _record(tiny, out)["images"].sizes["sample"] == 2


def test_a_study_whose_settings_changed_keeps_the_old_rows(tmp_path):
    path = tmp_path / "guidance_images.csv"
    old = ImageRows(path, "steps2")
    for seed in range(3):
        old.add({"prompt": "p", "seed": seed, "method": "ae", "initno": False, "missing": seed % 2})
    old.save()
    with pytest.warns(UserWarning, match=r"3 of 3 stored rows were made with other settings.*kept in "
                                         r"guidance_images.settings-steps2.csv"):
        new = ImageRows(path, "steps3")
    assert new.rows == {}
    kept = pd.read_csv(tmp_path / "guidance_images.settings-steps2.csv")
    assert list(kept["seed"]) == [0, 1, 2] and set(kept["settings_id"]) == {"steps2"}
    new.add({"prompt": "p", "seed": 7, "method": "ae", "initno": False, "missing": 1})
    new.save()
    assert list(pd.read_csv(path)["seed"]) == [7]
    with pytest.warns(UserWarning, match="1 of 1 stored rows"):
        back = ImageRows(path, "steps2")  # going back: the new rows are set aside in turn, the old ones come back
    assert pd.read_csv(tmp_path / "guidance_images.settings-steps3.csv")["seed"].tolist() == [7]
    assert sorted(k[1] for k in back.rows) == [0, 1, 2]
    back.save()
    assert sorted(pd.read_csv(path)["seed"]) == [0, 1, 2]


def test_a_gz_table_is_compressed_the_same_bytes_each_time(tmp_path):
    import gzip

    import pandas as pd

    from probe.writes import write_csv

    table = pd.DataFrame({"prompt": ["a red circle"] * 50, "value": np.arange(50) / 7})
    first = write_csv(table, tmp_path / "t.csv.gz").read_bytes()
    assert first[:2] == b"\x1f\x8b"  # gzip
    assert gzip.decompress(first).decode() == table.to_csv(index=False)
    assert write_csv(table, tmp_path / "t.csv.gz").read_bytes() == first  # no time stamp inside
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv.gz"), table)
