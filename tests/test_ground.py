"""ground.py on the tiny phantom world: the same numbers as evaluate.py for the same pair, the words and their token
columns, the outputs (16-bit PNG, DICOM, non-square images), determinism, and every bad input named."""
import csv
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_world import REPO, make_tiny_setup, run  # noqa: E402

sys.path.insert(0, REPO)
import ground  # noqa: E402
from ldm import load_pipeline  # noqa: E402
from ldm.tokenizer import CLIPTokenizer  # noqa: E402
from grounding.heatmap import HeatmapConfig, extract_heatmaps  # noqa: E402
from grounding.prompts import LearnablePrompts, prompt_positions  # noqa: E402
from grounding.experiment import sources  # noqa: E402
from grounding.experiment.config import TrainConfig, load_config  # noqa: E402
from grounding.experiment.grounder import ground_batch, readings  # noqa: E402
from grounding.experiment.rows import save_rows  # noqa: E402
from grounding.experiment.swap import swap_sides  # noqa: E402
from grounding.experiment.words import prompt_words, select_words  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny world and model, learned rows for it (perturbed, recording layers 4,5 / 10 steps) and a few held-out
    pairs with one box each."""
    root = str(tmp_path_factory.mktemp("ground"))
    s = make_tiny_setup(root)
    pipe = load_pipeline(s["model"])
    rows = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    with torch.no_grad():
        rows.anatomy.add_(0.3 * torch.randn(rows.anatomy.shape, generator=torch.Generator().manual_seed(3)))
    s["rows"] = os.path.join(root, "rows.safetensors")
    save_rows(rows, s["rows"], HeatmapConfig(num_steps=10, family="phantom", layers=(4, 5)), (400, 700))
    cfg = load_config(TrainConfig, s["config"], [])
    s["pairs"] = [p for p in sources.load(cfg, need_samples=False, image_size=32).pairs("phantom")[:8]
                  if len(p["boxes"]) == 1]
    assert len(s["pairs"]) >= 2
    return s


def _ground(setup, *argv):
    ground.main([*argv, "--weights", setup["model"], "--threads", "1"])


def _result(folder):
    with open(os.path.join(folder, "result.json")) as f:
        return json.load(f)


def test_same_numbers_as_evaluate_for_the_same_pairs(setup, tmp_path):
    """ground.py on a CSV of held-out pairs (image, prompt, box) gives, per reading, the CNR and mIoU that evaluate.py
    writes for those pairs with the same rows: the same preprocessing, maps, frame and metrics."""
    pairs = setup["pairs"][:3]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "prompt", "box"])
        w.writerows([[p["image_path"], p["prompt"], ",".join(str(v) for v in p["boxes"][0])] for p in pairs])
    _ground(setup, str(tmp_path / "pairs.csv"), "--prompts", setup["rows"], "--out", str(tmp_path / "g"))
    log = run([sys.executable, os.path.join(REPO, "evaluate.py"), "--split", "phantom", "--config", setup["config"],
               "--baseline", "--untuned", "--prompts", setup["rows"], "--limit", "8", "--out", "ev",
               "--bootstrap", "10", "--report-pairs", "0", "threads=1"], cwd=str(tmp_path))
    assert "heatmap settings of the learned rows" in log and "layers (4, 5), 10 DDIM steps" in log
    names = {}
    for p in pairs:                                  # output folders: the image stem, -2, -3 for repeats
        stem = os.path.splitext(os.path.basename(p["image_path"]))[0]
        names[stem] = names.get(stem, 0) + 1
        folder = tmp_path / "g" / (stem if names[stem] == 1 else f"{stem}-{names[stem]}")
        res = _result(folder)
        assert res["settings"]["num_steps"] == 10 and res["settings"]["readings"]["tuned"]["layers"] == [4, 5]
        assert res["settings"]["from"]["layers"] == "the rows file"
        for model in ("frozen", "untuned", "tuned"):
            with open(tmp_path / "ev" / f"rows_{model}.jsonl") as f:
                row = next(r for r in map(json.loads, f) if r["pair_id"] == p["pair_id"])
            mine = res["maps"][model]["prompt"]["phrase"]
            assert mine["cnr"] == pytest.approx(row["cnr"], abs=1e-4), (model, p["pair_id"])
            assert mine["miou_percent"] == pytest.approx(row["miou_percent"], abs=1e-2), (model, p["pair_id"])


def test_phrase_maps_equal_extract_heatmaps(setup):
    """The per-word machinery reads the same maps as grounding/heatmap.py: the phrase map of every reading, for the
    prompt and the swapped prompt, equals extract_heatmaps' (which records only the prompt's columns)."""
    pipe = load_pipeline(setup["model"])
    rows = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    from grounding.experiment.rows import load_rows
    load_rows(rows, setup["rows"])
    from grounding.data.images import preprocess
    images = torch.stack([preprocess(p["image_path"], pipe.image) for p in setup["pairs"][:2]])
    batch = [prompt_words(pipe.tokenizer, p, swap=True) for p in ("left lower atelectasis", "cardiomegaly")]
    reads = readings("phantom", 10, (400, 600), (4, 5))
    out = ground_batch(pipe, images, batch, rows, reads)
    for r in reads:
        prompts = rows if r.model == "tuned" else None
        ref = extract_heatmaps(pipe, images, [pw.text for pw in batch], r.cfg, prompts)
        for i in range(2):
            assert torch.allclose(out[i]["maps"][(r.name, "prompt")]["phrase"], ref[i], atol=1e-6), r.name
        swapped = extract_heatmaps(pipe, images[:1], [swap_sides(batch[0].text)], r.cfg, prompts)[0]
        # the reference inverts this image alone, ground_batch inverts it beside the other: batched convolutions round
        # differently (seen up to 8e-6), a wrong column or reading differs by > 0.05
        assert torch.allclose(out[0]["maps"][(r.name, "swapped")]["phrase"], swapped, atol=5e-5)
        assert (r.name, "swapped") not in out[1]["maps"] or "phrase" not in out[1]["maps"][(r.name, "swapped")]
    # words differ from the phrase (the columns are really sliced), and the raw maps are (T, L, N)
    assert (out[0]["maps"][("tuned", "prompt")]["left"] - out[0]["maps"][("tuned", "prompt")]["phrase"]).abs().max() > 0.05
    T, L = len(out[0]["timesteps"]), len(out[0]["layers"])
    assert out[0]["raw"][("tuned", "prompt")]["left"].shape == (T, L, 64) and out[0]["layers"] == [1, 2, 4, 5]


def test_words_tokens_columns_and_warnings():
    tok = CLIPTokenizer.from_dir(os.path.join(REPO, "assets", "phantom_ldm", "tokenizer"))
    pw = prompt_words(tok, "Left lower lobe atelectasis, hemidiaphragm!", n_ctx=2, tokens=True, specials=True)
    assert [u.name for u in pw.words()] == ["left", "lower", "lobe", "atelectasis", "hemidiaphragm"]
    assert pw.punctuation == [",", "!"] and pw.side == "left" and pw.swapped.text.startswith("right lower")
    n = len(tok.encode(pw.text))
    # the phrase's columns are the heatmap's (every token between BOS and EOS, after the CoOp tokens)
    assert pw.unit("phrase").columns(n, 2) == prompt_positions(tok, pw.text, 2)
    word = pw.unit("hemidiaphragm")
    assert len(word.offsets) == 10 and [pw.tokens[o] for o in word.offsets][:3] == ["h", "e", "m"]
    assert sum(u.kind == "token" and u.word == word.word for u in pw.units) == 10
    assert pw.unit("<eos>").columns(n, 2) == [1 + 2 + n] and pw.unit("<padding>").columns(n, 2)[-1] == 76
    assert any("'hemidiaphragm' is split into 10 tokens" in w for w in pw.warnings)
    assert not any("'atelectasis'" in w for w in pw.warnings)
    long = prompt_words(tok, " ".join(["left lower"] * 40) + " tail")
    assert long.n_tokens == 75 and long.dropped.endswith("lower left lower tail")
    assert any("prompt cut to 75 of its 83 tokens" in w and "dropped" in w for w in long.warnings)
    assert select_words(prompt_words(tok, "left lower lobe atelectasis"), ["Lower"]).words()[0].name == "lower"
    repeated = prompt_words(tok, "left lower lobe and left pleural effusion", tokens=True)
    assert [u.name for u in repeated.words()] == ["left", "lower", "lobe", "and", "left (2)", "pleural", "effusion"]
    assert repeated.unit("left").offsets == [0] and repeated.unit("left (2)").offsets == [len(tok.encode("left lower lobe and"))]
    assert [u.name for u in select_words(repeated, ["left"]).words()] == ["left", "left (2)"]
    with pytest.raises(ValueError, match=r"--word \['upper'\] not in the prompt .*its words are \['left', 'lower'"):
        select_words(prompt_words(tok, "left lower lobe"), ["upper"])
    with pytest.raises(ValueError, match="no word"):
        prompt_words(tok, " , !")


def _write_inputs(tmp_path, setup):
    """A 16-bit PNG (wide) and a MONOCHROME1 DICOM with a VOI window (tall), from a phantom image."""
    grey = np.asarray(Image.open(setup["pairs"][0]["image_path"]).convert("L"), dtype=np.float64) / 255
    wide = np.pad(grey, ((0, 0), (8, 24)), mode="edge")                        # W > H
    Image.fromarray((wide * 4000 + 50).astype(np.uint16)).save(tmp_path / "wide16.png")
    pydicom = pytest.importorskip("pydicom")  # noqa: F841
    from dicom_files import write_dicom
    tall = np.pad(grey, ((20, 4), (0, 0)), mode="edge")                         # H > W
    stored = ((1 - tall) * 3000 + 500).astype(np.uint16)                       # MONOCHROME1: dense = low values
    write_dicom(str(tmp_path / "tall.dcm"), stored, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=3000,
                RescaleSlope=1, RescaleIntercept=0)
    Image.fromarray((np.stack([grey] * 3, -1) * 255).astype(np.uint8)).save(tmp_path / "rgb.png")       # RGB
    Image.fromarray((grey * 2.0 - 0.5).astype(np.float32)).save(tmp_path / "float.tif")                 # float TIFF
    return grey.shape, wide.shape, tall.shape


def test_outputs_for_a_16bit_png_and_a_dicom_and_determinism(setup, tmp_path, capsys):
    _, wide, tall = _write_inputs(tmp_path, setup)
    out = tmp_path / "g"
    _ground(setup, str(tmp_path / "wide16.png"), str(tmp_path / "tall.dcm"), "--prompt", "left lower lung opacity",
            "--prompts", setup["rows"], "--box", "40,40,20,20", "--out", str(out), "--special")
    said = capsys.readouterr().out
    assert "DDIM steps from the rows file" in said and "viewer.html" in said
    res = _result(out / "tall")
    assert res["image"]["read_as"]["format"] == "DICOM" and res["image"]["read_as"]["inverted"]
    assert res["image"]["read_as"]["voi"] == "window centre 2000, width 3000 (LINEAR)"
    assert (res["image"]["width"], res["image"]["height"]) == (tall[1], tall[0])
    s = res["settings"]
    assert s["window"] == [400, 600] and s["timesteps"] and all(400 <= t < 600 for t in s["timesteps"])
    assert s["weights_sha256"] and s["rows_sha256"] and s["readings"]["frozen"]["otsu"] is True
    phrase = res["maps"]["tuned"]["prompt"]["phrase"]
    assert {"peak", "mass_share", "cnr", "miou_percent", "npy", "png"} <= set(phrase)
    assert phrase["mass_share"]["named side"] == phrase["mass_share"]["image right (patient left)"]
    arr = np.load(out / "tall" / phrase["npy"])
    assert arr.shape == tall and np.isnan(arr).any() and np.nanmax(arr) == pytest.approx(1.0)   # NaN band: H > W
    ox, oy, m = s["model_frame"]["crop_window"]
    assert not np.isnan(arr[oy:oy + m, ox:ox + m]).any() and np.isnan(arr[:oy]).all()
    assert set(res["maps"]["tuned"]["prompt"]) >= {"phrase", "left", "lower", "lung", "opacity", "<bos>", "<eos>"}
    assert set(res["maps"]["frozen"]["swapped"]) >= {"phrase", "right"}
    assert res["ranked_at_phrase_peak"]["tuned"][0][0] in ("left", "lower", "lung", "opacity", "<bos>", "<eos>",
                                                           "<padding>")
    wide_res = _result(out / "wide16")
    assert wide_res["image"]["read_as"]["mode"] in ("I;16", "I") and wide_res["image"]["width"] == wide[1]
    assert os.path.exists(out / "wide16" / "grid.png") and os.path.exists(out / "viewer.html")
    # RGB PNG and float TIFF read as grey; the same picture gives the same maps as its 8-bit grey JPEG source
    _ground(setup, str(tmp_path / "rgb.png"), str(tmp_path / "float.tif"), setup["pairs"][0]["image_path"],
            "--prompt", "left lower lung opacity", "--prompts", setup["rows"], "--out", str(tmp_path / "formats"))
    assert _result(tmp_path / "formats" / "rgb")["image"]["read_as"]["mode"] == "RGB"
    assert _result(tmp_path / "formats" / "float")["image"]["read_as"] == {"format": "TIFF", "mode": "F"}
    src = os.path.splitext(os.path.basename(setup["pairs"][0]["image_path"]))[0]
    rgb_map = np.load(tmp_path / "formats" / "rgb" / "tuned" / "phrase.npy")
    assert np.allclose(rgb_map, np.load(tmp_path / "formats" / src / "tuned" / "phrase.npy"), atol=1e-3, equal_nan=True)
    # deterministic: the same command writes the same maps; alone in its batch, the image's maps move by float
    # rounding only (batched convolutions sum in another order)
    _ground(setup, str(tmp_path / "wide16.png"), str(tmp_path / "tall.dcm"), "--prompt", "left lower lung opacity",
            "--prompts", setup["rows"], "--box", "40,40,20,20", "--out", str(tmp_path / "again"), "--special")
    assert np.array_equal(np.load(tmp_path / "again" / "tall" / phrase["npy"]), arr, equal_nan=True)
    _ground(setup, str(tmp_path / "tall.dcm"), "--prompt", "left lower lung opacity", "--prompts", setup["rows"],
            "--out", str(tmp_path / "alone"))
    assert np.allclose(np.load(tmp_path / "alone" / "tall" / phrase["npy"]), arr, atol=1e-4, equal_nan=True)


def test_bad_inputs_are_named_and_nothing_is_written(setup, tmp_path, monkeypatch):
    _write_inputs(tmp_path, setup)
    img = setup["pairs"][0]["image_path"]
    W, H = Image.open(img).size
    out = tmp_path / "never"
    data = open(img, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        ([str(tmp_path / "cut.jpg"), "--prompt", "left"], r"cannot read image .*cut.jpg.*truncated"),
        ([str(tmp_path / "notes.png"), "--prompt", "left"], r"cannot read image .*notes.png"),
        ([str(tmp_path / "missing.png"), "--prompt", "left"], r"image .*missing.png not found"),
        ([img, "--prompt", "left", "--box", f"10,10,{W},5"], rf"box \(10.0, 10.0, {W}.0, 5.0\) lies outside the {W} x {H}"),
        ([img, "--prompt", "left lower lobe", "--word", "upper"], r"--word \['upper'\] not in the prompt"),
        ([img], r"no prompt for"),
        ([img, "--prompt", "left", "--prompts", os.path.join(REPO, "assets", "phantom_tuned_rows.safetensors")],
         r"was learned with another vocabulary size"),
        ([img, "--prompt", "left", "--layers", "4,9"], r"--layers \[4, 9\]: .* has 6 cross-attention layers"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            _ground(setup, *argv, "--out", str(out))
        assert not out.exists(), argv                       # checked before anything is written
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ValueError, match=r"tall.dcm is DICOM but pydicom is not installed"):
        _ground(setup, str(tmp_path / "tall.dcm"), "--prompt", "left", "--out", str(out))
    with pytest.raises(SystemExit):                        # a box that is not four numbers: argparse's message
        _ground(setup, img, "--prompt", "left", "--box", "1,2,3")


def test_the_command_line_warns_and_exits_with_a_message(setup, tmp_path):
    img = setup["pairs"][0]["image_path"]
    log = run([sys.executable, os.path.join(REPO, "ground.py"), img, "--prompt", "hemidiaphragm " * 40,
               "--weights", setup["model"], "--no-prompts", "--out", "g", "--threads", "1", "--npy", "model"],
              cwd=str(tmp_path))
    assert "warning:" in log and "prompt cut to" in log and "is split into" in log
    res = _result(tmp_path / "g" / os.path.splitext(os.path.basename(img))[0])
    assert np.load(tmp_path / "g" / os.path.splitext(os.path.basename(img))[0] / "frozen" / "phrase.npy").shape == (32, 32)
    assert res["settings"]["rows"] is None and set(res["maps"]) == {"frozen", "untuned"}
    assert res["settings"]["from"]["num_steps"] == "the default" and res["settings"]["num_steps"] == 100
    import subprocess
    bad = subprocess.run([sys.executable, os.path.join(REPO, "ground.py"), img, "--prompt", "left", "--box",
                          "0,0,99,99", "--weights", setup["model"]], cwd=str(tmp_path), capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert bad.returncode == 1 and bad.stderr.startswith("ground.py: error: bad input") and "Traceback" not in bad.stderr
