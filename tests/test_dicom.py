"""DICOM reading (grounding/data/images.py load_dicom) and scripts/vindr_to_png.py, on files written by pydicom.

Expected values are worked out by hand from the standard's formulas (PS3.3 C.11.2): rescale, then the window or
the VOI LUT table, then the MONOCHROME1 inversion.
"""
import csv
import os
import sys

import numpy as np
import pytest
from PIL import Image

from grounding.data.images import load_dicom, load_image, preprocess

pydicom = pytest.importorskip("pydicom")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dicom_files import write_dicom  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import vindr_to_png  # noqa: E402


def test_monochrome1_rescale_and_window(tmp_path):
    # stored 0..3300 -> rescaled y = 2 * stored - 100 -> LINEAR window c=1500, w=2001: 0 below 500, 1 above 2500
    stored = np.array([[0, 300, 550, 800], [1050, 1300, 1600, 3300]])
    path = write_dicom(str(tmp_path / "m1.dcm"), stored, photometric="MONOCHROME1", RescaleSlope=2,
                       RescaleIntercept=-100, WindowCenter=[1500, 800], WindowWidth=[2001, 100])
    arr, info = load_dicom(path)
    y = 2.0 * stored - 100
    windowed = np.clip((y - 1499.5) / 2000 + 0.5, 0, 1)       # the first of the two windows
    assert np.allclose(arr, 1 - windowed, atol=1e-6)          # MONOCHROME1: high values display dark
    assert arr[0, 0] == 1.0 and arr[1, 3] == 0.0              # below the window -> white after inversion; above -> black
    assert info["voi"] == "window centre 1500, width 2001 (LINEAR)" and info["inverted"]
    assert info["rescale"] == [2.0, -100.0] and (info["columns"], info["rows"]) == (4, 2)
    # the old reading (min-max of the stored values, inverted) differs: the window and the rescale are applied
    old = 1 - (stored - stored.min()) / (stored.max() - stored.min())
    assert np.abs(arr - old).max() > 0.2


def test_window_functions_and_no_voi(tmp_path):
    stored = np.array([[100, 200, 300, 400]])
    exact = load_dicom(write_dicom(str(tmp_path / "e.dcm"), stored, WindowCenter=250, WindowWidth=200,
                                   VOILUTFunction="LINEAR_EXACT"))[0]
    assert np.allclose(exact, [[0.0, 0.25, 0.75, 1.0]])       # (x - c) / w + 0.5, clipped
    sig = load_dicom(write_dicom(str(tmp_path / "s.dcm"), stored, WindowCenter=250, WindowWidth=200,
                                 VOILUTFunction="SIGMOID"))[0]
    assert np.allclose(sig, 1 / (1 + np.exp(-4 * (stored - 250) / 200)))
    plain, info = load_dicom(write_dicom(str(tmp_path / "p.dcm"), stored))
    assert np.allclose(plain, [[0, 1 / 3, 2 / 3, 1]], atol=1e-6) and info["voi"].startswith("none")


@pytest.mark.parametrize("as_bytes", [True, False])
def test_voi_lut_table(tmp_path, as_bytes):
    # a 4-entry table starting at stored value 10: [0, 100, 400, 1000]; below 10 -> entry 0, above 13 -> entry 3
    item = pydicom.dataset.Dataset()
    item.LUTDescriptor = [4, 10, 12]
    table = [0, 100, 400, 1000]
    if as_bytes:
        item.LUTData = np.array(table, dtype="<u2").tobytes()      # OW
    else:
        item.add_new(0x00283006, "US", table)                     # US
    stored = np.array([[5, 10, 11, 12, 13, 99]])
    arr, info = load_dicom(write_dicom(str(tmp_path / "l.dcm"), stored, VOILUTSequence=[item], WindowCenter=0,
                                       WindowWidth=1))
    assert np.allclose(arr, [[0, 0, 0.1, 0.4, 1.0, 1.0]])           # the table wins over the window
    assert info["voi"] == "VOI LUT table 1 of 1"


def test_refusals_name_the_file_and_the_reason(tmp_path, monkeypatch):
    stored = np.zeros((2, 3, 4))
    multi = write_dicom(str(tmp_path / "multi.dcm"), stored)
    with pytest.raises(ValueError, match=r"multi.dcm holds 2 frames"):
        load_image(multi)
    one = write_dicom(str(tmp_path / "one.dcm"), stored[0])
    with open(one, "rb") as f:
        data = f.read()
    (tmp_path / "cut.dcm").write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"cannot decode the pixels of DICOM .*cut.dcm.*Truncated"):
        load_image(str(tmp_path / "cut.dcm"))
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom at all")
    with pytest.raises(ValueError, match=r"cannot read DICOM .*junk.dcm"):
        load_image(str(tmp_path / "junk.dcm"))
    monkeypatch.setitem(sys.modules, "pydicom", None)                   # pydicom missing
    with pytest.raises(ImportError, match=r"one.dcm is DICOM but pydicom is not installed"):
        load_image(one)


def test_dicom_and_its_png_give_the_same_model_input(tmp_path):
    rng = np.random.default_rng(0)
    stored = (rng.random((40, 56)) * 4000).astype(np.uint16)
    src = tmp_path / "dicom"
    src.mkdir()
    write_dicom(str(src / "abc.dicom"), stored, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=3000)
    assert vindr_to_png.main([str(src), str(tmp_path / "png")]) == 0
    png = str(tmp_path / "png" / "abc.png")
    assert Image.open(png).size == (56, 40) and Image.open(png).mode == "L"   # Columns x Rows: boxes unchanged
    assert np.abs(load_image(png) - load_image(str(src / "abc.dicom"))).max() <= 1 / 510 + 1e-6
    cfg = {"channels": 1, "size": 32, "range": [0, 1]}
    assert np.abs(preprocess(png, cfg) - preprocess(str(src / "abc.dicom"), cfg)).max().item() <= 1 / 255


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"])
        w.writerows(rows)
    return str(path)


def test_vindr_to_png_checks_the_csv_and_names_every_problem(tmp_path, capsys):
    src = tmp_path / "test"
    src.mkdir()
    write_dicom(str(src / "a.dicom"), np.full((30, 20), 7))
    write_dicom(str(src / "b.dicom"), np.zeros((2, 30, 20)))                 # multi-frame: refused, named
    good = _csv(tmp_path / "good.csv", [["a", "R1", "Nodule/Mass", 1, 2, 19, 29], ["a", "R2", "No finding", "", "", "", ""]])
    out = tmp_path / "png"
    assert vindr_to_png.main([str(src), str(out), "--csv", good]) == 1      # b fails, a is still converted
    err = capsys.readouterr().err
    assert "b.dicom holds 2 frames" in err and (out / "a.png").exists() and not (out / "b.png").exists()
    bad = _csv(tmp_path / "bad.csv", [["a", "R1", "Nodule/Mass", 1, 2, 21, 29], ["zz", "R1", "Nodule/Mass", 1, 1, 2, 2]])
    assert vindr_to_png.main([str(src), str(out), "--csv", bad]) == 1        # a is kept, b fails again
    err = capsys.readouterr().err
    assert "bad.csv row 2: box (1, 2, 21, 29) outside the 20x30 image a" in err
    assert f"bad.csv row 3: no {out / 'zz.png'}" in err
    os.remove(src / "b.dicom")
    assert vindr_to_png.main([str(src), str(out), "--csv", good]) == 0
    said = capsys.readouterr().out
    assert "1 already converted" in said and f"vindr_images: {out}" in said


def test_vindr_to_png_without_pydicom(tmp_path, monkeypatch, capsys):
    src = tmp_path / "test"
    src.mkdir()
    write_dicom(str(src / "a.dicom"), np.full((3, 3), 7))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(SystemExit) as e:
        vindr_to_png.main([str(src), str(tmp_path / "png")])
    assert e.value.code == 2 and "pydicom is not installed" in capsys.readouterr().err
    assert not (tmp_path / "png").exists()                                   # nothing created before the check
