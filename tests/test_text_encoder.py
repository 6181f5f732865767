"""Text encoder: parity with transformers' CLIPTextModel (random weights, two tiny configs), the prompt-tuning
entry points (embed / forward(embeds=...)), fused vs math attention, configs and exact full-size parameter counts."""
import pytest
import torch

from conftest import cmp, need
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.weights.configs import text_config_from_hf

# Two tiny configs that differ in everything the code branches on: activation, width, heads, depth, eps.
TINY_QUICK = TextEncoderConfig.tiny()   # quick_gelu, 64 wide, 4 heads, 2 layers
TINY_GELU = TextEncoderConfig(vocab_size=500, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                              num_attention_heads=6, hidden_act="gelu", layer_norm_eps=1e-6)


def hf_pair(config):
    """Random transformers CLIPTextModel and our TextEncoder carrying the same weights (strict load)."""
    transformers = need("transformers")
    hf_cfg = transformers.CLIPTextConfig(**config.to_dict(), bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                         attn_implementation="eager")
    ref = transformers.CLIPTextModel(hf_cfg).eval()
    # Random non-trivial LayerNorm affine params too (HF initialises them to 1 / 0).
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    # transformers >= 5 drops the on-disk "text_model." prefix in memory; files (and we) keep it.
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    ours = TextEncoder(config).eval()
    ours.load_state_dict(sd, strict=True)
    return ours, ref


@pytest.mark.parametrize("config", [TINY_QUICK, TINY_GELU], ids=["quick_gelu", "gelu"])
def test_parity_with_transformers(config):
    ours, ref = hf_pair(config)
    ids = torch.randint(0, config.vocab_size, (3, 77))
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
        got_from_embeds = ours(embeds=ours.embed(ids))
    assert cmp(f"last_hidden_state ({config.hidden_act})", got, expected, atol=1e-5) <= 1e-5
    # The prompt-tuning route (embed, then forward from embeddings) is the same computation.
    assert torch.equal(got_from_embeds, got)


def test_shorter_sequences_and_embed_matches_reference_embeddings():
    ours, ref = hf_pair(TINY_QUICK)
    ids = torch.randint(0, TINY_QUICK.vocab_size, (2, 10))
    with torch.no_grad():
        assert cmp("embeddings (L=10)", ours.embed(ids), ref.embeddings(input_ids=ids), atol=0) == 0
        assert cmp("last_hidden_state (L=10)", ours(ids), ref(input_ids=ids).last_hidden_state, atol=1e-5) <= 1e-5


def test_fused_attention_equals_math_path():
    model = TextEncoder(TINY_GELU).eval()
    ids = torch.randint(0, TINY_GELU.vocab_size, (2, 77))
    with torch.no_grad():
        fused = model(ids)
        model.set_fused_attention(False)
        math = model(ids)
    assert not model.text_model.encoder.layers[0].self_attn.fused
    assert cmp("fused vs math attention", fused, math, atol=1e-5) <= 1e-5


def test_causal_mask_future_tokens_do_not_change_the_past():
    model = TextEncoder(TINY_QUICK).eval()
    ids = torch.randint(0, TINY_QUICK.vocab_size, (1, 77))
    changed = ids.clone()
    changed[0, 40:] = (changed[0, 40:] + 1) % TINY_QUICK.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


def test_gradients_flow_to_given_token_embeddings_only():
    model = TextEncoder(TINY_QUICK)
    model.requires_grad_(False)
    ids = torch.randint(0, TINY_QUICK.vocab_size, (2, 77))
    table_rows = model.token_embedding(ids)
    learned = torch.randn(2, TINY_QUICK.hidden_size, requires_grad=True)   # e.g. two tuned anatomy rows
    token_embeds = torch.cat([table_rows[:, :3], learned[:, None], table_rows[:, 4:]], dim=1)
    out = model(embeds=model.embed(token_embeds=token_embeds))
    out.square().mean().backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("preset, expected", [("clip_vit_l14", 123_060_480), ("sd21", 340_387_840)])
def test_full_size_parameter_counts_on_meta_device(preset, expected):
    config = getattr(TextEncoderConfig, preset)()
    with torch.device("meta"):
        model = TextEncoder(config)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_keys_match_the_on_disk_clip_list():
    """Our state-dict names and shapes equal the recorded transformers 4.x ViT-L/14 text keys."""
    import pathlib
    path = pathlib.Path(__file__).resolve().parent / "data" / "keys" / "clip_text_vitl14.txt"
    listed = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            listed[name] = [int(s) for s in shape.strip("[]").split(",")]
    with torch.device("meta"):
        model = TextEncoder(TextEncoderConfig.clip_vit_l14())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == listed


def test_config_round_trips_and_bad_input_is_rejected():
    for cfg in (TextEncoderConfig.clip_vit_l14(), TextEncoderConfig.sd21(), TINY_GELU):
        assert TextEncoderConfig.from_dict(cfg.to_dict()) == cfg
    # A real SD 2.1-base text_encoder/config.json (abridged: extra keys are ignored).
    hf = {"architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024,
          "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
          "num_attention_heads": 16, "num_hidden_layers": 23, "vocab_size": 49408, "projection_dim": 512,
          "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    assert text_config_from_hf(hf) == TextEncoderConfig.sd21()
    with pytest.raises(ValueError, match="hidden_act"):
        TextEncoderConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="unknown keys"):
        TextEncoderConfig.from_dict({"hidden_size": 64, "width": 64})
    with pytest.raises(ValueError, match="lacks"):
        text_config_from_hf({"hidden_size": 64})
    model = TextEncoder(TINY_QUICK)
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[0, TINY_QUICK.vocab_size]]))
    with pytest.raises(ValueError, match="exceed max_position_embeddings"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        model()
