"""CASIA-HWDB: .gnt records, the .gnt -> HDF5 converter and the HWDB loader."""

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kron.data import HWDB, DatasetError
from kron.data.gnt import (
    GntError,
    char_to_code,
    code_to_char,
    encode_record,
    find_header,
    iter_gnt,
    level1_codes,
    level1_label,
)
from kron.data.hwdb import convert, main, normalise
from kron.data.synthetic import random_gnt_records, write_gnt

S = 16
CHARS = ["啊", "中", "国", "座", "字"]


def _square(seed, side=S):
    return np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)


def test_level1_table():
    codes = level1_codes()
    assert len(codes) == 3755 and codes[0] == 0xB0A1 and codes[-1] == 0xD7F9
    assert level1_label(0xB0A1) == 0 and level1_label(0xD7F9) == 3754
    assert code_to_char(int(codes[0])) == "啊" and code_to_char(int(codes[-1])) == "座"
    assert all(level1_label(int(c)) == i for i, c in enumerate(codes))
    assert level1_label(char_to_code("，")) is None  # full-width comma: a symbol
    assert level1_label(char_to_code("亍")) is None  # level 2 (0xD8A1)
    assert level1_label(0xD7FA) is None


def test_gnt_record_layout(tmp_path):
    bitmap = np.arange(6, dtype=np.uint8).reshape(2, 3)
    raw = encode_record(char_to_code("中"), bitmap)
    assert raw[:4] == (16).to_bytes(4, "little") and raw[4:6] == "中".encode("gb2312")
    assert raw[6:8] == (3).to_bytes(2, "little") and raw[8:10] == (2).to_bytes(2, "little")
    (tmp_path / "a.gnt").write_bytes(raw * 2)
    recs = list(iter_gnt(tmp_path / "a.gnt"))
    assert [r.char for r in recs] == ["中", "中"] and [r.offset for r in recs] == [0, 16]
    assert np.array_equal(recs[1].bitmap, bitmap)


def test_gnt_to_hdf5_to_hwdb_round_trip(tmp_path):
    recs = [(c, _square(i)) for i, c in enumerate(CHARS)]
    write_gnt(tmp_path / "gnt" / "001-f.gnt", recs[:3])
    write_gnt(tmp_path / "gnt" / "sub" / "002-f.gnt", recs[3:] + [("，", _square(9))])
    out = tmp_path / "hwdb.h5"
    stats = convert([tmp_path / "gnt"], out, "train", size=S, progress=False)
    assert (stats.written, stats.dropped_classes, stats.skipped_corrupt) == (5, 1, 0)
    ds = HWDB(out, "train")
    assert len(ds) == 5 and len(ds.classes) == 3755 and ds.label_set == "gb2312-level1"
    for i, (char, bitmap) in enumerate(recs):
        img, label = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (1, S, S)
        assert ds.classes[label] == char and label == level1_label(char_to_code(char))
        assert np.array_equal(img[0].numpy(), bitmap)
    with h5py.File(out) as f:
        assert f["train/x"].shape == (5, 1, S, S) and f["train/chars"][0].decode() == "啊"


def test_normalise_keeps_aspect_ratio():
    tall = np.zeros((40, 10), dtype=np.uint8)
    out = normalise(tall, 20)
    assert out.shape == (20, 20)
    assert (out[:, :6] == 255).all() and (out[:, -6:] == 255).all()  # white side bands
    assert (out[2:-2, 8:12] < 50).all()  # ink stays centred, full height


def test_add_or_replace_split_and_dataloader_workers(tmp_path):
    write_gnt(tmp_path / "a.gnt", random_gnt_records(12, seed=1, max_side=30))
    write_gnt(tmp_path / "b.gnt", random_gnt_records(5, seed=2, max_side=30))
    out = tmp_path / "h.h5"
    convert([tmp_path / "a.gnt"], out, "train", size=S, progress=False)
    convert([tmp_path / "b.gnt"], out, "test", size=S, progress=False)
    convert([tmp_path / "b.gnt", tmp_path / "b.gnt"], out, "test", size=S, progress=False)
    assert (len(HWDB(out, "train")), len(HWDB(out, "test"))) == (12, 10)
    ds = HWDB(out, "train")
    ds[0]  # opens a handle in this process; workers must open their own
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.targets)
    assert torch.equal(torch.cat([b[0] for b in batches])[3], ds[3][0])


def test_all_classes_share_one_table(tmp_path):
    write_gnt(tmp_path / "a.gnt", [("中", _square(0)), ("，", _square(1))])
    write_gnt(tmp_path / "b.gnt", [("亍", _square(2)), ("中", _square(3))])
    out = tmp_path / "h.h5"
    convert([tmp_path / "a.gnt"], out, "train", size=S, all_classes=True, progress=False)
    convert([tmp_path / "b.gnt"], out, "test", size=S, all_classes=True, progress=False)
    train, test = HWDB(out, "train"), HWDB(out, "test")
    assert train.label_set == "all" and train.classes == test.classes
    assert sorted(train.classes) == sorted(["中", "，", "亍"])
    assert [train.classes[int(y)] for y in train.targets] == ["中", "，"]
    assert [test.classes[int(y)] for y in test.targets] == ["亍", "中"]


def test_truncated_gnt_names_file_and_offset(tmp_path):
    good = encode_record(char_to_code("中"), _square(0))
    path = tmp_path / "bad.gnt"
    path.write_bytes(good + good[:-5])
    with pytest.raises(GntError, match=rf"{path.name} at byte offset {len(good)}: truncated"):
        list(iter_gnt(path))
    out = tmp_path / "h.h5"
    with pytest.raises(DatasetError, match="byte offset 266.*--skip-corrupt"):
        convert([path], out, "train", size=S, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == [path]  # nothing half-written
    stats = convert([path], out, "train", size=S, skip_corrupt=True, progress=False)
    assert (stats.written, stats.skipped_corrupt) == (1, 1)


def test_bad_size_field_skips_to_next_record(tmp_path):
    good = encode_record(char_to_code("中"), _square(0))
    bad = bytearray(encode_record(char_to_code("国"), _square(1)))
    bad[6:8] = (0xFFFF).to_bytes(2, "little")  # width 65535: disagrees with the size field
    path = tmp_path / "x.gnt"
    path.write_bytes(good + bytes(bad) + good)
    recs = list(iter_gnt(path, skip_corrupt=True))
    assert [type(r).__name__ for r in recs] == ["GntRecord", "GntError", "GntRecord"]
    assert recs[1].offset == len(good) and "size field" in recs[1].problem


def test_missing_and_corrupt_inputs(tmp_path, capsys):
    with pytest.raises(DatasetError, match=r"expected .*nope\.h5.*kron\.data\.hwdb convert"):
        HWDB(tmp_path / "nope.h5", "train")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(DatasetError, match=r"cannot read .*junk\.h5"):
        HWDB(tmp_path / "junk.h5", "train")
    write_gnt(tmp_path / "a.gnt", [("中", _square(0))])
    convert([tmp_path / "a.gnt"], tmp_path / "h.h5", "train", size=S, progress=False)
    with pytest.raises(DatasetError, match=r"no split 'test' \(it has \['train'\]\)"):
        HWDB(tmp_path / "h.h5", "test")
    with pytest.raises(DatasetError, match="expected .*missing_dir"):
        convert([tmp_path / "missing_dir"], tmp_path / "o.h5", "train", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*\*\.gnt"):
        convert([tmp_path / "empty"], tmp_path / "o.h5", "train", progress=False)
    with pytest.raises(DatasetError, match="cannot read .*junk.h5"):
        convert([tmp_path / "a.gnt"], tmp_path / "junk.h5", "train", progress=False)
    assert main(["convert", "--split", "t", "--out", str(tmp_path / "o.h5"),
                 str(tmp_path / "missing_dir")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CASIA-HWDB: expected") and err.count("\n") == 1


def test_cli_convert_and_info(tmp_path, capsys):
    write_gnt(tmp_path / "a.gnt", random_gnt_records(7, seed=3, max_side=40))
    out = tmp_path / "h.h5"
    assert main(["convert", "--split", "train", "--out", str(out), "--size", "24",
                 "--compression", "gzip", "--no-progress", str(tmp_path / "a.gnt")]) == 0
    assert "wrote 7 images" in capsys.readouterr().out
    with h5py.File(out) as f:
        assert f["train/x"].compression == "gzip"
    assert main(["info", str(out)]) == 0
    assert "train: 7 images 24x24, label set gb2312-level1, 3755 classes" in capsys.readouterr().out


def _records(n):
    """`n` records of 16x16 bitmaps: 266 bytes each (10-byte header + 256 pixels)."""
    return [encode_record(char_to_code(CHARS[i % len(CHARS)]), _square(100 + i)) for i in range(n)]


def test_skip_corrupt_resyncs_after_a_bad_size_field(tmp_path, capsys):
    """One wrong size field in 50 records loses that record only: the reader scans forward to
    the next valid header (record 8, at 8 * 266), so 49 are written and nothing is unread."""
    raw = [bytearray(r) for r in _records(50)]
    raw[7][0:4] = (266 + 7).to_bytes(4, "little")
    path = tmp_path / "x.gnt"
    path.write_bytes(b"".join(raw))
    out = tmp_path / "h.h5"
    assert main(["convert", "--split", "train", "--out", str(out), "--size", str(S),
                 "--skip-corrupt", "--no-progress", str(path)]) == 0
    line = capsys.readouterr().out
    assert "wrote 49 images" in line and "skipped 1 corrupt records (x.gnt bytes 1862-2128)" in line
    assert "left 0 bytes unread" in line
    ds = HWDB(out, "train")
    kept = [i for i in range(50) if i != 7]
    assert all(np.array_equal(ds[j][0][0].numpy(), _square(100 + i)) for j, i in enumerate(kept))
    with h5py.File(out) as f:
        assert (f["train"].attrs["skipped_corrupt"], f["train"].attrs["unread_bytes"]) == (1, 0)
        x = f["train/x"][:]
    small = convert([path], tmp_path / "b.h5", "train", size=S, skip_corrupt=True,
                    progress=False, block=4)  # 49 = 12 blocks of 4 + a tail of 1
    assert small.skipped == [(str(path), 1862, 2128)] and small.unread == []
    with h5py.File(tmp_path / "b.h5") as f:
        assert np.array_equal(f["train/x"][:], x)


def test_resync_needs_a_following_header(tmp_path):
    """A header-like pattern inside garbage is not taken unless a header (or EOF) follows it."""
    good = _records(1)[0]
    bad = bytearray(good)
    bad[0:4] = (9999).to_bytes(4, "little")
    decoy = encode_record(char_to_code("中"), np.zeros((1, 1), np.uint8)) + b"\x00" * 7
    path = tmp_path / "x.gnt"
    path.write_bytes(good + bad + decoy + good)
    recs = list(iter_gnt(path, skip_corrupt=True))
    assert [type(r).__name__ for r in recs] == ["GntRecord", "GntError", "GntRecord"]
    assert (recs[1].offset, recs[1].resume) == (266, 2 * 266 + len(decoy)) == (266, recs[2].offset)
    with open(path, "rb") as f:  # a tiny scan window finds the same header across windows
        assert find_header(f, 267, path.stat().st_size, chunk=3) == recs[1].resume


def test_skip_corrupt_reports_unread_tail_and_fails(tmp_path, capsys):
    """No valid header after a bad record: the rest is left unread, said with offsets, exit 3."""
    good = _records(1)[0]
    bad = bytearray(good)
    bad[0:4] = (1).to_bytes(4, "little")
    path = tmp_path / "x.gnt"
    path.write_bytes(good + bad + b"\xff" * 500)
    out = tmp_path / "h.h5"
    assert main(["convert", "--split", "train", "--out", str(out), "--size", str(S),
                 "--skip-corrupt", "--no-progress", str(path)]) == 3
    captured = capsys.readouterr()
    assert "wrote 1 images" in captured.out and "skipped 0 corrupt records" in captured.out
    assert "left 766 bytes unread (x.gnt bytes 266-1032)" in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: CASIA-HWDB: 766 bytes")
    assert len(HWDB(out, "train")) == 1


@pytest.mark.parametrize("bad", [-3, 3755])
def test_out_of_range_label_fails_at_open(tmp_path, bad):
    write_gnt(tmp_path / "a.gnt", [(c, _square(i)) for i, c in enumerate(CHARS)])
    out = tmp_path / "h.h5"
    convert([tmp_path / "a.gnt"], out, "train", size=S, progress=False)
    with h5py.File(out, "a") as f:
        f["train/y"][2] = bad
    with pytest.raises(DatasetError, match=rf"h\.h5 \(label {bad} of image 2 in /train/y is "
                       r"outside 0\.\.3754"):
        HWDB(out, "train")


@pytest.mark.parametrize("damage", ["x", "y", "codes", "truncate"])
def test_damaged_hdf5_is_one_line(tmp_path, damage):
    """A converted file with a dataset deleted or its tail cut fails at open, in one line."""
    write_gnt(tmp_path / "a.gnt", [(c, _square(i)) for i, c in enumerate(CHARS)])
    out = tmp_path / "h.h5"
    convert([tmp_path / "a.gnt"], out, "train", size=S, progress=False)
    if damage == "truncate":
        out.write_bytes(out.read_bytes()[:-1000])
    else:
        with h5py.File(out, "a") as f:
            del f[f"train/{damage}"]
    with pytest.raises(DatasetError, match=r"CASIA-HWDB: cannot read .*h\.h5 .*Re-run the "
                       "converter") as err:
        HWDB(out, "train")
    assert "\n" not in str(err.value)


def test_cli_unwritable_out_is_one_line(tmp_path, capsys):
    write_gnt(tmp_path / "a.gnt", [("中", _square(0))])
    assert main(["convert", "--split", "train", "--out", str(tmp_path / "a.gnt" / "h.h5"),
                 "--no-progress", str(tmp_path / "a.gnt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {tmp_path / 'a.gnt'}" in err
