"""Loading a converted folder (ldm/weights/folder.py load_pipeline) refuses what would load the wrong model."""
import shutil

import pytest
import yaml

from tiny_world import REPO
from ldm.weights.folder import PipelineError, load_pipeline


@pytest.fixture
def folder(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(f"{REPO}/assets/phantom_ldm", dst)
    return dst


def _edit(folder, fn):
    cfg = yaml.safe_load((folder / "model.yaml").read_text())
    fn(cfg)
    (folder / "model.yaml").write_text(yaml.safe_dump(cfg))


def test_a_section_missing_keys_is_refused_not_filled_with_sd_defaults(folder):
    assert load_pipeline(folder).scheduler.config.prediction_type == "v_prediction"
    _edit(folder, lambda c: [c["scheduler"].pop(k) for k in ("prediction_type", "beta_end")])
    with pytest.raises(PipelineError, match=r"section 'scheduler' lacks keys \['beta_end', 'prediction_type'\]"):
        load_pipeline(folder)


def test_a_missing_unet_key_is_named_rather_than_blamed_on_the_weights(folder):
    _edit(folder, lambda c: c["unet"].pop("cross_attention_dim"))
    with pytest.raises(PipelineError, match=r"section 'unet' lacks keys \['cross_attention_dim'\]"):
        load_pipeline(folder)


def test_a_broken_tokenizer_file_is_named(folder):
    vocab = folder / "tokenizer" / "vocab.json"
    vocab.write_text(vocab.read_text()[:20])
    with pytest.raises(PipelineError, match=r"tokenizer \(vocab.json, merges.txt.*JSONDecodeError"):
        load_pipeline(folder)
