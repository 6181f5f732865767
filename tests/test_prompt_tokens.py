"""Which prompt tokens the losses and the heatmap see: the joining "and", and the trainable rows of every shipped config.

- "and" joining locations is a special token (paper Sec. 3): it gets no L_div pair and does not enter A_sp; the
  test-time heatmap still averages it, as the predecessor's extraction averages every token between BOS and EOS.
- With the real CLIP vocabulary, every MS-CXR pathology's standard prompts ("{location} {pathology}" for each of the
  27 locations, as grounding/data/reports.py writes them) must have at least one trainable row under the shared_tokens
  setting of every shipped config; under "frozen" the 333-pair "cardiomegaly" prompt has none.
"""
from pathlib import Path

import pytest
import torch
from test_heatmap import _inputs, tiny_pipe
from test_prompts import real_vocab_world

from grounding.anatomy import LOCATIONS, PATHOLOGIES
from grounding.attention_store import AttentionStore
from grounding.experiment.config import load_config
from grounding.losses import diversity_loss, grounding_loss, token_average
from grounding.prompts import LearnablePrompts
from grounding.data.reports import standardise_prompt

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "left lower and right upper atelectasis"


# ----------------------------------------------------------------------------------------------------------------
# "and"

def test_and_is_left_out_of_the_loss_positions_but_not_the_heatmap():
    tok, te = real_vocab_world()
    prompts = LearnablePrompts(tok, te)
    # left | lower | and | right | upper | ate lec tas is: positions 1..9, "and" at 3
    assert prompts.join_mask(PROMPT) == [False, False, True] + [False] * 6
    assert prompts.token_positions(PROMPT) == [1, 2, 4, 5, 6, 7, 8, 9]
    assert prompts.token_positions(PROMPT, include_join=True) == list(range(1, 10))
    # only the whole word: "basiland" ends in the sub-token and</w> but is no joining word
    assert prompts.join_mask("basiland atelectasis")[:2] == [False, False]
    assert "and</w>" in prompts.token_strings(tok.encode("basiland"))
    with pytest.raises(ValueError, match="no token other than"):
        prompts.token_positions("and")
    # the heatmap (grounding/heatmap.py) asks for every token, "and" included
    from grounding.heatmap import prompt_contexts
    pipe = tiny_pipe()
    tiny = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    _, positions = prompt_contexts(pipe, [PROMPT], tiny)
    n = len(pipe.tokenizer.encode(PROMPT))
    assert positions == [list(range(1, n + 1))] and len(tiny.token_positions(PROMPT)) == n - 1


def test_and_has_no_div_pair_and_does_not_enter_A_sp():
    pipe = tiny_pipe()
    _, z0, _, _, _ = _inputs(pipe)
    prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
    words = pipe.tokenizer.encode(PROMPT)
    k_and = prompts.join_mask(PROMPT).index(True)           # column of "and" among the prompt's tokens
    layers = [1, 2, 3]

    def record(positions):
        store = AttentionStore(layers, positions, keep_grad=True)
        for t in (399, 499):
            store.set_step(t)
            pipe.unet(z0, t, prompts.encode([PROMPT]), store=store, stop_after=max(layers))
        return store.maps()                                 # (T, L, B, N, S)

    train = record(prompts.token_positions(PROMPT))         # what train.py records
    every = record(prompts.token_positions(PROMPT, include_join=True))
    assert train.shape[-1] == len(words) - 1 and every.shape[-1] == len(words)
    keep = [k for k in range(len(words)) if k != k_and]
    # the training maps are exactly the all-token maps without the "and" column ...
    assert torch.equal(train, every[..., keep])
    # ... so L_div has no pair (and, j) and A_sp does not average "and": both equal the hand-built versions
    a = torch.nn.functional.normalize(every, dim=-2)
    cos2 = (a.transpose(-1, -2) @ a).square()[..., keep, :][..., keep]   # pairs among the kept tokens only
    S = len(keep)
    by_hand = ((cos2.sum((-1, -2)) - cos2.diagonal(dim1=-2, dim2=-1).sum(-1)) / (S * (S - 1))).mean()
    assert torch.allclose(diversity_loss(train), by_hand, atol=1e-6)
    assert torch.allclose(token_average(train), every[..., keep].mean(-1), atol=1e-7)
    # and it matters: with "and" the numbers differ
    assert not torch.allclose(diversity_loss(every), diversity_loss(train), atol=1e-6)
    assert not torch.allclose(token_average(every), token_average(train), atol=1e-7)
    # the "and" map can be anything: the loss does not change (no gradient can reach the frozen "and" row's map)
    G = torch.zeros(1, 8, 8)
    G[0, 2:6, 1:4] = 1.0
    loss, _ = grounding_loss(train, G)
    changed = every.detach().clone()
    changed[..., k_and] = torch.rand_like(changed[..., k_and])
    loss2, _ = grounding_loss(changed[..., keep], G)
    assert torch.allclose(loss, loss2)


# ----------------------------------------------------------------------------------------------------------------
# shared_tokens: every shipped config gives every pathology's standard prompts a trainable row

def shipped_configs():
    return [ROOT / "tune.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


def untrainable_prompts(prompts, texts):
    """The prompts whose token embeddings do not depend on any trainable row (anatomy perturbed -> no change)."""
    with torch.no_grad():
        before = prompts.token_embeds(texts)
        saved = prompts.anatomy.clone()
        prompts.anatomy.add_(1.0)
        after = prompts.token_embeds(texts)
        prompts.anatomy.copy_(saved)
    moved = (after - before).abs().amax(dim=(1, 2)) > 0
    return [t for t, m in zip(texts, moved) if not m]


def standard_prompts():
    """{pathology: the standardised prompt of each of the 27 locations with it} (grounding/data/reports.py)."""
    return {p: [standardise_prompt([loc], p) for loc in LOCATIONS] for p in PATHOLOGIES}


def test_train_config_default_is_positional():
    from grounding.experiment.config import TrainConfig
    assert TrainConfig().shared_tokens == "positional"
    assert LearnablePrompts.__init__.__defaults__[2] == "positional"   # the class agrees with the config


@pytest.mark.parametrize("config", shipped_configs(), ids=lambda p: p.name)
def test_every_pathology_prompt_has_a_trainable_row_in_every_shipped_config(config):
    from grounding.experiment.config import TrainConfig
    tok, te = real_vocab_world()   # the real CLIP vocabulary (SD2 / MONAI framing)
    cfg = load_config(TrainConfig, config)
    assert cfg.shared_tokens == "positional", f"{config.name}: shared_tokens={cfg.shared_tokens!r}"
    prompts = LearnablePrompts(tok, te, shared_tokens=cfg.shared_tokens)
    table = standard_prompts()
    assert "cardiomegaly" in table["Cardiomegaly"] and "left pleural effusion" in table["Pleural Effusion"]
    bad = {p: untrainable_prompts(prompts, texts) for p, texts in table.items()}
    assert not any(bad.values()), f"{config.name}: prompts with no trainable row: {bad}"
    print(f"{config.name}: {sum(map(len, table.values()))} prompts of {len(table)} pathologies, all trainable")


def test_frozen_shared_rows_leave_cardiomegaly_untrainable():
    """Why the default is positional: under "frozen" the prompt "cardiomegaly" has no trainable row at all."""
    tok, te = real_vocab_world()
    frozen = LearnablePrompts(tok, te, shared_tokens="frozen")
    bad = untrainable_prompts(frozen, standard_prompts()["Cardiomegaly"])
    assert bad == ["cardiomegaly"]
