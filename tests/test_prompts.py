"""LearnablePrompts: only the anatomy rows learn; the codebook with the real CLIP vocabulary; save/load."""
import functools

import pytest
import torch
from test_heatmap import _inputs, tiny_pipe

from grounding.attention_store import AttentionStore
from grounding.experiment.rows import load_rows, save_rows
from grounding.losses import grounding_loss
from grounding.prompts import LearnablePrompts


@functools.lru_cache(maxsize=None)
def real_vocab_world():
    """The real CLIP BPE (SD2/MONAI framing, pad 0) with a tiny text encoder of the real vocabulary size."""
    from clip_vocab import clip_bpe_path
    from ldm.text_encoder import TextEncoder, TextEncoderConfig
    from ldm.tokenizer import CLIPTokenizer
    path = clip_bpe_path()
    if path is None:
        pytest.skip("the real CLIP BPE file is not available (no network, no CLIP_BPE_PATH)")
    tok = CLIPTokenizer.from_openai_bpe(path, pad_id=0)
    te = TextEncoder(TextEncoderConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2))
    return tok, te


def test_initial_prompts_equal_the_frozen_text_encoder():
    pipe = tiny_pipe()
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    texts = ["left lower atelectasis", "bibasilar atelectasis and right pneumothorax"]
    with torch.no_grad():
        ours = prompts.encode(texts)
        ref = pipe.text_encoder(pipe.tokenizer(texts))
    assert torch.equal(ours, ref)
    assert [n for n, _ in prompts.named_parameters()] == ["anatomy"]       # ONE trainable parameter
    assert list(prompts.state_dict()) == ["anatomy"]                       # the frozen models are not ours
    assert prompts.token_positions("left lower atelectasis") == [1, 2, 3]


def test_gradients_reach_the_anatomy_rows_and_nothing_else():
    pipe = tiny_pipe()
    _, z0, _, _, _ = _inputs(pipe)
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    prompt = "left lower atelectasis"
    store = AttentionStore([1, 2, 3], prompts.token_positions(prompt), keep_grad=True)
    for t in (399, 499):
        store.set_step(t)
        pipe.unet(z0, t, prompts.encode([prompt]), store=store, stop_after=3)
    G = torch.zeros(1, 8, 8)
    G[0, 5:, :3] = 1.0
    loss, _ = grounding_loss(store.maps(), G)
    loss.backward()
    grad = prompts.anatomy.grad
    used = {prompts.anatomy_ids.index(i) for i in pipe.tokenizer.encode(prompt) if i in prompts.anatomy_ids}
    assert len(used) == 2                                                  # "left", "lower"
    for r in range(len(prompts.anatomy_ids)):
        assert (grad[r].abs().sum() > 0) == (r in used), prompts.tokenizer.decoder[prompts.anatomy_ids[r]]
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_pathology_only_prompt_does_not_depend_on_the_anatomy_rows():
    pipe = tiny_pipe()
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    with torch.no_grad():
        a0, p0 = prompts.encode(["left lower atelectasis"]), prompts.encode(["atelectasis"])
        # a random change (a constant shift would vanish in the text encoder's first LayerNorm)
        prompts.anatomy.add_(torch.randn_like(prompts.anatomy))
        a1, p1 = prompts.encode(["left lower atelectasis"]), prompts.encode(["atelectasis"])
    assert torch.equal(p0, p1)
    assert (a0 - a1).abs().max() > 1e-3
    assert (prompts.drift() > 0).all()


def test_real_vocab_codebook_counts_and_shared_modes():
    tok, te = real_vocab_world()
    frozen = LearnablePrompts(tok, te, shared_tokens="frozen")
    table = frozen.codebook_table()
    print(frozen.format_codebook())
    # docs/paper.md section 10: 26 location + 23 pathology sub-tokens, 6 shared, + BOS, EOS, pad, "and" = 47
    assert len(table) == 47
    assert sorted(t for t, r, _ in table if r == "shared") == sorted(
        ["ple", "ural</w>", "cardi", "ome", "gal", "y</w>"])
    assert sum(tr for _, _, tr in table) == 20 and all(r in ("location", "shared") for _, r, tr in table if tr)
    assert not any(tr for _, r, tr in table if r == "shared")              # pathology wins
    trainable = LearnablePrompts(tok, te, shared_tokens="trainable")
    assert len(trainable.anatomy_ids) == 26 and len(trainable.codebook_table()) == 47
    positional = LearnablePrompts(tok, te, shared_tokens="positional")
    assert len(positional.anatomy_ids) == 26 and len(positional.codebook_table()) == 53  # + 6 frozen twins
    legend = " ".join(" ".join(frozen.codebook_legend()).split())   # the real vocabulary has "and" as one token
    assert "the pad token '!'" in legend and '"and"' in legend and "no single token" not in legend


def test_the_printed_codebook_says_what_its_roles_and_special_tokens_are():
    """The phantom vocabulary marks '!', 'a', 'n', 'd</w>' as special: the legend under the codebook says why (the
    pad token, and "and" spelled in three pieces), and what location / pathology / shared mean."""
    from ldm.weights.folder import load_pipeline
    pipe = load_pipeline("assets/phantom_ldm")
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder, shared_tokens="positional")
    special = [t for t, role, _ in prompts.codebook_table() if role == "special"]
    assert special == ["<|startoftext|>", "<|endoftext|>", "!", "a", "n", "d</w>"]
    legend = prompts.codebook_legend()
    text = " ".join(" ".join(legend).split())                  # the wrapping aside
    assert "the pad token '!'" in text and "\"and\", here 'a' 'n' 'd</w>' (this vocabulary has no single token" in text
    assert "shared = both ('pleural</w>', 'cardiomegaly</w>'): its location occurrences use the trainable row" in text
    assert all(len(line) <= 118 for line in legend) and prompts.format_codebook().endswith(legend[-1])
    pipe.tokenizer.pad_id = pipe.tokenizer.eos_id               # SD1 pads with EOS: no extra pad row to explain
    legend = LearnablePrompts(pipe.tokenizer, pipe.text_encoder).codebook_legend()
    assert "the pad token EOS" in " ".join(" ".join(legend).split())


def test_positional_mode_substitutes_by_position():
    tok, te = real_vocab_world()
    pos = LearnablePrompts(tok, te, shared_tokens="positional")
    # left | ple ural | ef fusion: the standardiser wrote "left pleural" + "pleural effusion" once
    assert pos.location_mask("left pleural effusion") == [True, True, True, False, False]
    # right | lower | ple ural | ef fusion: "pleural" alone is no location phrase
    assert pos.location_mask("right lower pleural effusion") == [True, True, False, False, False, False]
    with torch.no_grad():
        pos.anatomy.add_(0.5)
        emb = pos.token_embeds(["left pleural effusion", "right lower pleural effusion"])
    table = te.token_embedding.weight
    ple = tok.encoder["ple"]
    r = pos.anatomy_ids.index(ple)
    assert torch.equal(emb[0, 2], pos.anatomy[r])                          # "pleural" of "left pleural"
    assert torch.equal(emb[1, 3], table[ple])                              # "pleural" of "pleural effusion"
    # "frozen" keeps every "pleural" frozen; "trainable" tunes both occurrences
    frozen = LearnablePrompts(tok, te, shared_tokens="frozen")
    with torch.no_grad():
        frozen.anatomy.add_(0.5)
        assert torch.equal(frozen.token_embeds(["left pleural effusion"])[0, 2], table[ple])


def test_coop_context_tokens():
    pipe = tiny_pipe()
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder, n_ctx=4)
    assert sorted(n for n, _ in prompts.named_parameters()) == ["anatomy", "ctx"]
    emb = prompts.token_embeds(["left lower atelectasis"])
    assert emb.shape[1] == 77
    assert torch.equal(emb[0, 1:5], prompts.ctx.detach())
    # the prompt tokens and EOS move 4 places right
    ids = pipe.tokenizer(["left lower atelectasis"])[0]
    table = pipe.text_encoder.token_embedding.weight
    assert torch.equal(emb[0, 7], table[ids[3]]) and torch.equal(emb[0, 8], table[ids[4]])
    assert prompts.token_positions("left lower atelectasis") == [5, 6, 7]
    with pytest.raises(ValueError, match="exceeds"):
        prompts.token_positions(" ".join(["left"] * 72))


def test_save_load_and_nearest_tokens(tmp_path):
    pipe = tiny_pipe()
    a = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    near = a.nearest_tokens(k=3)
    # untouched rows are their own nearest token, with cosine 1
    for token, hits in near.items():
        assert hits[0][0] == token and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        a.anatomy.mul_(-1.0)
    save_rows(a, tmp_path / "anatomy.safetensors")
    from ldm.weights.safetensors import load_file, read_header
    assert set(load_file(tmp_path / "anatomy.safetensors")) == {"anatomy"}
    meta = read_header(tmp_path / "anatomy.safetensors")["__metadata__"]
    assert "left</w>" in meta["tokens"]
    b = load_rows(LearnablePrompts(pipe.tokenizer, pipe.text_encoder), tmp_path / "anatomy.safetensors")
    assert torch.equal(a.anatomy, b.anatomy)
    # a file for another codebook is refused with the reason
    c = LearnablePrompts(pipe.tokenizer, pipe.text_encoder, locations=("left", "right"))
    with pytest.raises(ValueError, match="differ"):
        load_rows(c, tmp_path / "anatomy.safetensors")


def test_rows_file_records_its_heatmap_settings_and_they_are_the_default(tmp_path, capsys):
    """extract_heatmaps(prompts=rows) reads the layers, steps and window the rows were tuned and evaluated with
    (before: HeatmapConfig's 100 steps and preset layers); an explicit cfg wins; an older file still loads."""
    from grounding.experiment.config import TrainConfig
    from grounding.experiment.rows import apply_rows_settings, rows_settings
    from grounding.heatmap import HeatmapConfig, extract_heatmaps
    pipe = tiny_pipe()
    a = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    with torch.no_grad():
        a.anatomy.add_(0.5 * torch.randn_like(a.anatomy))
    own = HeatmapConfig(num_steps=10, family="phantom", layers=(5, 6), window=(400, 700))
    save_rows(a, tmp_path / "rows.safetensors", own, (400, 800))
    assert rows_settings(tmp_path / "rows.safetensors") == {"layers": (5, 6), "num_steps": 10, "window": (400, 700)}
    b = load_rows(LearnablePrompts(pipe.tokenizer, pipe.text_encoder), tmp_path / "rows.safetensors")
    assert b.heatmap_settings == {"layers": (5, 6), "num_steps": 10, "window": (400, 700)}
    image = _inputs(pipe)[0]
    texts = ["left lower atelectasis"]
    default = extract_heatmaps(pipe, image, texts, prompts=b)
    assert torch.equal(default, extract_heatmaps(pipe, image, texts, own, prompts=b))
    preset = extract_heatmaps(pipe, image, texts, HeatmapConfig(family="phantom"), prompts=b)   # explicit wins
    assert (default - preset).abs().max() > 1e-3

    # an older file (no settings) loads, and carries none
    save_rows(a, tmp_path / "old.safetensors")
    assert load_rows(LearnablePrompts(pipe.tokenizer, pipe.text_encoder), tmp_path / "old.safetensors").heatmap_settings is None

    # evaluate.py / classify.py: the rows' settings replace the config's unless given on the command line
    cfg = TrainConfig()
    window, said = apply_rows_settings(cfg, str(tmp_path / "rows.safetensors"))
    assert (cfg.layers, cfg.num_inference_steps, window) == ([5, 6], 10, (400, 700))
    assert "layers (5, 6), 10 DDIM steps, window [400, 700)" in said
    cfg = TrainConfig(num_inference_steps=50)
    window, said = apply_rows_settings(cfg, str(tmp_path / "rows.safetensors"), ["num_inference_steps=50"])
    assert (cfg.layers, cfg.num_inference_steps) == ([5, 6], 50)
    assert "num_inference_steps=50 from the command line instead of the rows' 10" in said
    cfg = TrainConfig()
    window, said = apply_rows_settings(cfg, str(tmp_path / "old.safetensors"))
    assert window is None and cfg.num_inference_steps == 100 and "records no heatmap settings" in said

    # a damaged record is named
    from ldm.weights.safetensors import load_file, read_header, save_file
    meta = dict(read_header(tmp_path / "rows.safetensors")["__metadata__"], heatmap='{"layers": [5]}')
    save_file(load_file(tmp_path / "rows.safetensors"), tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"bad.safetensors: __metadata__ 'heatmap'"):
        load_rows(LearnablePrompts(pipe.tokenizer, pipe.text_encoder), tmp_path / "bad.safetensors")
