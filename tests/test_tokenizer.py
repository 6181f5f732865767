"""Tests for ldm/tokenizer.py: ids identical to transformers' CLIPTokenizer on the real CLIP vocabulary and on
a vocabulary trained here, the pre-tokeniser equal to the `regex`-package pattern, framing, padding,
truncation, decode and the positions of a phrase in a prompt.

transformers 5 has only the `tokenizers`-backed CLIPTokenizer (the old slow one is gone); it normalises with
NFC + whitespace collapse + lowercase and does not html-unescape, so "&amp;" is the one difference these tests meet.

Where ldm/tokenizer.py differs from the references, on purpose or by necessity:
- OpenAI runs `ftfy.fix_text` first (mojibake repair, NFC, ...). ftfy is not a dependency; we apply only its
  NFC normalisation (what transformers' tokenizer does too). Text that needs mojibake repair can differ.
- transformers' tokenizer (v5, `tokenizers`-backed) does NOT html-unescape: "&amp;" stays 4 characters there,
  and becomes "&" here and in OpenAI's tokenizer. Everything else matches (the tests below).
- transformers treats the pad token as a special token even inside the text: with SD2's pad token "!", a "!"
  in a prompt becomes id 0 there, and BPE ("!</w>" = 256) here and in OpenAI/OpenCLIP's tokenizer.
- transformers v4's *slow* CLIPTokenizer without ftfy used BERT's BasicTokenizer instead: it deletes control
  characters and puts spaces around every CJK ideograph (so "胸部" is two words there, one word here and in OpenAI's).
- The pre-tokenising regex needs \\p{L} / \\p{N} (the `regex` package); we scan characters with
  unicodedata.category instead. Python 3.11's Unicode tables (14.0) decide what is a letter or number.
"""
import json
import random
import warnings

import pytest
import torch

from conftest import cmp
from ldm.tokenizer import (BOS, EOS, CLIPTokenizer, bytes_to_unicode, clean, pretokenize, train_bpe)

PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

TEXTS = {
    "plain": ["left lower atelectasis", "no acute cardiopulmonary process", "small bilateral pleural effusions"],
    "punctuated": ["Big right-sided pleural effusion.", "It's   a TEST!! (really?)", "don't 've ''s x.'s",
                   "heart size: normal; lungs - clear..."],
    "numeric": ["year 2024: 3.5cm nodule", "T12 L1 1/2 50%", "Ⅻ ½ ² ١٢٣"],
    "unicode": ["café naïve résumé", "cafe\u0301 (decomposed)", "胸部X線 写真", "😀👍🏽 emoji ✔", "İstanbul ǅ ß ﬁ",
                "Ω ω µ", "\u00a0nbsp\u2003em tab\tnew\nline", "плевральный выпот"],
    "mixed_case": ["LEFT Lower LoBe", "MiXeD CaSe PNEUMOTHORAX"],
    "radiology": ["Moderate cardiomegaly with small left pleural effusion and bibasilar atelectasis.",
                  "Right upper lobe pneumonia", "Interval increase in the right apical pneumothorax"],
}
ALL_TEXTS = [t for group in TEXTS.values() for t in group]
LONG_TEXT = " ".join(["bilateral pleural effusions with compressive atelectasis"] * 12)  # ~70 words


def hf_ids(hf, texts):
    return torch.tensor(hf(texts, padding="max_length", max_length=77, truncation=True)["input_ids"])


def compare(name, ours, ref):
    cmp(name, ours, ref, atol=0)
    assert torch.equal(ours, ref), f"{name}: first differing rows\n{ours[(ours != ref).any(1)][:2]}\n" \
                                   f"{ref[(ours != ref).any(1)][:2]}"


# -----------------------------------------------------------------------------------------------------------
# pieces that need no vocabulary

def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and sorted(table) == list(range(256))
    assert table[ord("a")] == "a" and table[0x20] == "Ġ" and table[0x0A] == "Ċ" and table[0] == "Ā"
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())
    # vocabulary order: the 188 printable bytes first, then the 68 moved ones
    assert list(table.values())[:3] == ["!", '"', "#"] and list(table.values())[188] == "Ā"


def test_clean():
    assert clean("  A &amp;amp; B\t\n C  ") == "a & b c"  # unescaped twice, whitespace collapsed, lower
    assert clean("cafe\u0301") == "caf\u00e9"  # NFC


def test_pretokenize_matches_regex_pattern():
    """Our character scanner against the real \\p{L}/\\p{N} regex (the `regex` package) on fixed and random text."""
    regex = pytest.importorskip("regex")
    pat = regex.compile(PATTERN, regex.IGNORECASE)
    # letters, marks, numbers of several kinds, punctuation, symbols, emoji, spaces, apostrophes, specials
    alphabet = list("abcxyzAZ019'.,-!?()/:;&%$ \t\n") + ["'s", "'ll", "'re", "<|endoftext|>", "<|start"] + \
        list("éüßİǅµΩωжЖ胸部線写真한국ـ٣١½²Ⅻ⅓\u0301\u0308\u200b\u00a0\u2003😀👍🏽✔™©…–—«»")
    rng = random.Random(0)
    texts = [clean(t) for t in ALL_TEXTS] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
                                              for _ in range(400)]
    bad = [(t, pretokenize(t), pat.findall(t)) for t in texts if pretokenize(t) != pat.findall(t)]
    print(f"pretokenize vs regex: {len(texts) - len(bad)}/{len(texts)} texts identical")
    assert not bad, bad[:3]


# -----------------------------------------------------------------------------------------------------------
# the real CLIP vocabulary

@pytest.fixture(scope="module")
def real(clip_bpe_path):
    return CLIPTokenizer.from_openai_bpe(clip_bpe_path, pad_id=49407)


@pytest.fixture(scope="module")
def real_dir(real, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_tokenizer")
    real.save(path)
    return path


@pytest.fixture(scope="module")
def hf_real(real_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(real_dir))


def test_real_vocab_layout(real):
    assert real.vocab_size == 49408 and len(real.merges) == 48894
    assert (real.bos_id, real.eos_id) == (49406, 49407)
    assert real.encoder["!"] == 0 and real.encoder["!</w>"] == 256


def test_real_vocab_radiology_example(real):
    """The worked example in docs/formats.md (ids from the real tokenizer)."""
    assert real.encode("Big right-sided pleural effusion.") == [1205, 1155, 268, 21061, 926, 33948, 1490, 9364, 269]


def test_openai_gz_and_saved_folder_are_the_same_tokenizer(real, real_dir):
    again = CLIPTokenizer.from_dir(real_dir)  # pad id read back from tokenizer_config.json
    assert again.encoder == real.encoder and again.merges == real.merges and again.pad_id == 49407


@pytest.mark.parametrize("group", list(TEXTS))
def test_real_vocab_ids_match_transformers(real, hf_real, group):
    texts = TEXTS[group]
    compare(f"ids real vocab, {group}", real(texts), hf_ids(hf_real, texts))
    for t in texts:  # the BPE strings too, not only the ids
        assert real.tokenize(t) == hf_real.tokenize(t), t


@pytest.mark.parametrize("pad_id, pad_token", [(49407, "<|endoftext|>"), (0, "!")])
def test_pad_id_matches_transformers(real, real_dir, pad_id, pad_token):
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(real_dir), pad_token=pad_token)
    tok = CLIPTokenizer.from_dir(real_dir, pad_id=pad_id)
    texts = ["left lower atelectasis", "no pneumothorax?"]  # no "!": see test_hf_splits_out_a_pad_token_of_bang
    ids = tok(texts)
    compare(f"ids pad {pad_id}", ids, hf_ids(hf, texts))
    n = len(tok.encode(texts[0]))
    assert ids[0, n + 1] == 49407 and ids[0, n + 2:].eq(pad_id).all()  # BOS, n tokens, EOS, then padding


def test_hf_splits_out_a_pad_token_of_bang(real, real_dir):
    """transformers quirk: with pad_token "!" (SD2's tokenizer), "!" in the TEXT becomes a special token (id 0)
    instead of BPE ("!</w>" = 256). We keep OpenAI/OpenCLIP's BPE behaviour, which is what SD2's OpenCLIP text
    tower was trained with. If this test fails, transformers changed and the difference is gone."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(real_dir), pad_token="!")
    ours, ref = real.encode("effusion!"), hf("effusion!")["input_ids"][1:-1]
    assert ours == real.encode("effusion") + [256] and ref == real.encode("effusion") + [0]


def test_truncation_keeps_eos_and_warns(real, hf_real):
    n = len(real.encode(LONG_TEXT))
    assert n > 75
    with pytest.warns(UserWarning, match=f"cut {n - 75} of {n} tokens"):
        ids = real([LONG_TEXT, "short"])
    assert ids.shape == (2, 77) and ids[0, -1] == 49407 and ids[0, 0] == 49406
    compare("ids truncated", ids, hf_ids(hf_real, [LONG_TEXT, "short"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a text that fits must not warn
        real("short")


def test_html_entities_are_unescaped_like_openai(real, hf_real):
    """The one intended difference from transformers: we unescape HTML like OpenAI's tokenizer."""
    assert real.tokenize("a &amp; b") == ["a</w>", "&</w>", "b</w>"]
    compare("ids html", real(["a &amp; b"]), hf_ids(hf_real, ["a & b"]))
    assert hf_real.tokenize("a &amp; b") != real.tokenize("a &amp; b")


def test_decode_matches_transformers_and_round_trips(real, hf_real):
    for text in ALL_TEXTS:
        ids = real(text)[0]
        assert real.decode(ids) == hf_real.decode(ids.tolist(), skip_special_tokens=True), text
        assert torch.equal(real(real.decode(ids)), real(text)), text  # decode -> encode gives the same ids
    assert real.decode(real("left lower atelectasis")[0]) == "left lower atelectasis"


def test_phrase_positions_real_vocab(real):
    prompt = "left lower atelectasis"
    assert phrase_positions(real, prompt, "lower") == [2]
    pos = phrase_positions(real, prompt, "atelectasis")
    assert len(pos) > 1 and pos == list(range(3, 3 + len(pos)))  # a multi-token word: consecutive positions
    ids = real(prompt)[0]
    assert real.decode(ids[pos]) == "atelectasis" and ids[pos[-1] + 1] == real.eos_id
    assert phrase_positions(real, "Big right-sided pleural effusion.", "Pleural Effusion") == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="not a word or phrase"):
        phrase_positions(real, prompt, "lowe")  # a piece of a word is not a word
    with pytest.raises(ValueError, match="not a word or phrase"):
        phrase_positions(real, prompt, "effusion")


# -----------------------------------------------------------------------------------------------------------
# a vocabulary trained here (no network needed for the non-HF parts)

CORPUS = TEXTS["radiology"] + TEXTS["plain"] + [
    "left pleural effusion", "right pleural effusion", "left lower lobe pneumonia", "right lower lobe atelectasis",
    "cardiomegaly", "left apical pneumothorax", "right upper lobe opacity", "bilateral lower lobe opacities"] * 3


@pytest.fixture(scope="module")
def small():
    return train_bpe(CORPUS, vocab_size=600, pad_id=0)


def test_train_bpe_layout_and_determinism(small):
    assert small.vocab_size == 600 and len(small.merges) == 600 - 514
    assert small.encoder[BOS] == 598 and small.encoder[EOS] == 599
    base = list(bytes_to_unicode().values())
    assert [small.decoder[i] for i in range(512)] == base + [b + "</w>" for b in base]
    again = train_bpe(list(reversed(CORPUS)), vocab_size=600, pad_id=0)  # order of texts must not matter
    assert again.encoder == small.encoder and again.merges == small.merges
    assert small.tokenize("pleural") == ["pleural</w>"]  # frequent words become single tokens


def test_train_bpe_merge_rule():
    """Hand-checkable: 'ab' occurs 3 times, 'b c</w>' twice; ties broken by the smaller pair."""
    tok = train_bpe(["ab ab abc", "xy"], vocab_size=514 + 2)
    assert tok.merges[0] == ("a", "b</w>")  # "ab</w>" x2 beats ("a","b") x1 inside "abc"
    assert tok.merges[1] == ("a", "b")  # then four pairs with count 1: ("a","b") is the smallest
    with pytest.raises(ValueError, match="below the 514"):
        train_bpe(["x"], vocab_size=100)


def test_trained_vocab_matches_transformers(small, tmp_path):
    transformers = pytest.importorskip("transformers")
    small.save(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert hf.pad_token_id == 0 and hf.vocab_size == 600  # our tokenizer_config.json carries the pad token
    texts = [t for t in CORPUS[:12] + ALL_TEXTS + [LONG_TEXT] if "!" not in t]  # "!" is HF's pad token here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long text warns about truncation
        ours = small(texts)
    compare("ids trained vocab", ours, hf_ids(hf, texts))
    loaded = CLIPTokenizer.from_dir(tmp_path)
    assert loaded.pad_id == 0 and torch.equal(loaded(texts[:5]), ours[:5])


def test_phrase_positions_and_decode_trained(small):
    prompt = "left lower lobe atelectasis and small pleural effusion"
    assert phrase_positions(small, prompt, "lower") == [2]
    span = phrase_positions(small, prompt, "pleural effusion")
    assert small.decode(small(prompt)[0][span]) == "pleural effusion"
    n_lung, n_before = len(small.encode("lung")), len(small.encode("left lung and right"))
    assert n_lung > 1  # "lung" is not in the corpus: several tokens
    assert phrase_positions(small, "left lung and right lung", "lung", all_occurrences=True) == \
        phrase_positions(small, "left lung", "lung") + list(range(1 + n_before, 1 + n_before + n_lung))
    assert small.decode(small(prompt)[0]) == prompt


def test_bad_input_errors(small, tmp_path):
    with pytest.raises(TypeError, match="str or a list of str"):
        small(123)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_dir(tmp_path)
    small.save(tmp_path)
    with open(tmp_path / "merges.txt", "a", encoding="utf-8") as f:
        f.write("zq zq\nq z\n")  # merges past what vocab.json holds (like OpenAI's full 262k list)
    with pytest.warns(UserWarning, match=f"merge line {len(small.merges) + 2} 'zq zq'"):
        assert CLIPTokenizer.from_dir(tmp_path).merges == small.merges
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt:2"):
        CLIPTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"pad_token": "<pad>"}', encoding="utf-8")
    with pytest.raises(ValueError, match="pad_token '<pad>' is not in vocab.json"):
        CLIPTokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="pad_id=700"):
        CLIPTokenizer(small.encoder, small.merges, pad_id=700)
    with pytest.raises(ValueError, match="cut by truncation"):
        phrase_positions(small, LONG_TEXT + " cardiomegaly", "cardiomegaly")


# ---- helper: where a phrase sits in a prompt (was CLIPTokenizer.token_positions; only tests used it) ----


def phrase_positions(tok, prompt, phrase, all_occurrences=False):
    """Positions in the framed sequence of the tokens of `phrase` inside `prompt`.

    Matching is on whole pre-tokenised words, so "lower" does not match inside "lowered":
        phrase_positions("left lower atelectasis", "lower") -> [2]     (0 is <|startoftext|>)
        phrase_positions("left lower atelectasis", "atelectasis") -> [3, 4, 5, 6]  (a 4-token word)
    Returns the first occurrence, or every occurrence with all_occurrences=True.
    """
    words = tok._word_tokens(prompt)
    target = [w for w, _ in tok._word_tokens(phrase)]
    if not target:
        raise ValueError(f"phrase_positions: phrase {phrase!r} has no tokens")
    starts, pos = [], 1  # pos: framed position of each word's first token
    for k, (_, tokens) in enumerate(words):
        if [w for w, _ in words[k:k + len(target)]] == target:
            n = sum(len(t) for _, t in words[k:k + len(target)])
            starts.append(list(range(pos, pos + n)))
        pos += len(tokens)
    if not starts:
        raise ValueError(f"phrase_positions: {phrase!r} is not a word or phrase of prompt {prompt!r} "
                         f"(words: {[w for w, _ in words]})")
    positions = [p for span in (starts if all_occurrences else starts[:1]) for p in span]
    if positions[-1] >= tok.max_length - 1:
        raise ValueError(f"phrase_positions: {phrase!r} lies past position {tok.max_length - 2} of "
                         f"{prompt!r}, which is cut by truncation")
    return positions


@pytest.mark.parametrize("modern", [False, True])
def test_pad_token_precedence_matches_transformers(small, tmp_path, modern):
    """SD 2.x tokenizer folders of 2022 name <|endoftext|> in tokenizer_config.json and "!" in
    special_tokens_map.json; transformers pads with "!" (= 0). A folder saved since transformers 4.34 holds
    added_tokens_decoder, and then tokenizer_config.json alone decides."""
    transformers = pytest.importorskip("transformers")
    small.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["pad_token"] = EOS
    if modern:
        config["added_tokens_decoder"] = {str(small.encoder[t]): {"content": t, "special": True, "lstrip": False,
                                          "rstrip": False, "normalized": False, "single_word": False}
                                          for t in (BOS, EOS)}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": "!"}), encoding="utf-8")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    ours = CLIPTokenizer.from_dir(tmp_path)
    assert ours.pad_id == hf.pad_token_id == (small.encoder[EOS] if modern else 0)
    texts = ["left lower lobe atelectasis", "effusion", "right upper lobe opacity and small pleural effusion"]
    compare(f"ids, files disagreeing (modern={modern})", ours(texts), hf_ids(hf, texts))
