"""Scene-text characters: ICDAR 2003 char.xml crops and Chars74K folders."""

import numpy as np
import pytest
import torch

from kron.data import Chars74K, DatasetError, ICDAR03Chars
from kron.data.synthetic import write_chars74k, write_icdar03


def _img(seed, h=12, w=9):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_icdar03_round_trip_and_class_sets(tmp_path):
    tags = ["A", "b", "7", "!", "z", "&", "B"]
    samples = [(_img(i, 10 + i, 8), t) for i, t in enumerate(tags)]
    write_icdar03(tmp_path, samples, ext="png")
    ds = ICDAR03Chars(tmp_path)
    assert len(ds) == 5 and ds.dropped == 2 and len(ds.classes) == 62
    kept = [s for s in samples if s[1].isalnum()]
    for i, (image, tag) in enumerate(kept):
        img, label = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, *image.shape[:2])
        assert np.array_equal(img.permute(1, 2, 0).numpy(), image)
        assert ds.classes[label] == tag
    folded = ICDAR03Chars(tmp_path, case_sensitive=False)
    assert len(folded.classes) == 36
    assert [folded.classes[y] for y in folded.targets] == ["A", "B", "7", "Z", "B"]


def test_icdar03_reads_jpeg(tmp_path):
    flat = np.full((16, 16, 3), 120, dtype=np.uint8)
    write_icdar03(tmp_path, [(flat, "Q")])
    img, label = ICDAR03Chars(tmp_path)[0]
    assert (tmp_path / "char/1/1.jpg").is_file() and img.shape == (3, 16, 16)
    assert abs(img.float().mean().item() - 120) < 2 and label == 26  # 'Q'


def test_icdar03_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"expected .*char\.xml.*ICDAR 2003"):
        ICDAR03Chars(tmp_path)
    (tmp_path / "char.xml").write_text("<imagelist><image file='a.jpg' tag='A'>")
    with pytest.raises(DatasetError, match=r"cannot read .*char\.xml \(ParseError"):
        ICDAR03Chars(tmp_path)
    write_icdar03(tmp_path, [(_img(0), "A"), (_img(1), "B")], ext="png")
    (tmp_path / "char/1/2.png").unlink()
    with pytest.raises(DatasetError, match=r"expected .*char/1/2\.png.*1 images listed"):
        ICDAR03Chars(tmp_path)
    (tmp_path / "char/1/2.png").write_bytes(b"\x89PNG garbage")
    ds = ICDAR03Chars(tmp_path)
    with pytest.raises(DatasetError, match=r"cannot read .*2\.png.*Replace or delete"):
        ds[1]


def test_chars74k_round_trip_and_split(tmp_path):
    samples = {k: [_img(100 * k + j) for j in range(4)] for k in range(62)}
    write_chars74k(tmp_path, samples)
    full = Chars74K(tmp_path)
    assert len(full) == 248 and len(full.classes) == 62
    img, label = full[4 * 40 + 2]  # class 40 = 'e', third image
    assert full.classes[label] == "e"
    assert np.array_equal(img.permute(1, 2, 0).numpy(), samples[40][2])
    train, test = Chars74K(tmp_path, split="train"), Chars74K(tmp_path, split="test")
    assert (len(train), len(test)) == (186, 62)
    assert not {str(p) for p, _ in train.samples} & {str(p) for p, _ in test.samples}
    assert sorted(test.targets) == list(range(62))  # one of each class in test
    assert train.samples == Chars74K(tmp_path, split="train").samples  # seeded
    folded = Chars74K(tmp_path, case_sensitive=False)
    assert len(folded.classes) == 36 and folded.classes[folded.targets[4 * 40]] == "E"


def test_chars74k_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"expected .*English/Img/GoodImg/Bmp.*Chars74K"):
        Chars74K(tmp_path)
    write_chars74k(tmp_path, {0: [_img(0)]})
    (tmp_path / "English/Img/GoodImg/Bmp/Sample062").rmdir()
    with pytest.raises(DatasetError, match="Sample062"):
        Chars74K(tmp_path)
    with pytest.raises(DatasetError, match="unknown split"):
        Chars74K(tmp_path, split="val")


@pytest.mark.parametrize("entry", ["../../outside.png", "{abs}", "char/../../outside.png"])
def test_icdar03_refuses_paths_outside_root(tmp_path, entry):
    """A char.xml entry that resolves outside the dataset folder is refused, even when the
    file it names exists."""
    import xml.etree.ElementTree as ET

    from kron.data.errors import UnsafePathError
    from kron.data.synthetic import write_image

    outside = write_image(tmp_path / "outside.png", _img(0))
    root = tmp_path / "a" / "train"
    write_icdar03(root, [(_img(1), "A")], ext="png")
    entry = entry.format(abs=outside)
    top = ET.Element("imagelist")
    ET.SubElement(top, "image", file="char/1/1.png", tag="A")
    ET.SubElement(top, "image", file=entry, tag="B")
    ET.ElementTree(top).write(root / "char.xml", encoding="utf-8")
    with pytest.raises(UnsafePathError, match=rf"entry '{entry}' in .*char\.xml would lead "
                       "outside") as info:
        ICDAR03Chars(root)
    assert isinstance(info.value, DatasetError) and "\n" not in str(info.value)
