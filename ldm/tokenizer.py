"""The CLIP byte-level BPE tokenizer, written to be read.

Mirrors OpenAI's CLIP `simple_tokenizer.py` (the same code is open_clip/tokenizer.py) and gives ids identical
to Hugging Face transformers' `CLIPTokenizer` on the same vocab.json + merges.txt. minGPT's bpe.py is the model
for how it reads. Every text-conditioned LDM here uses it: SD 1.x / RoentGen (CLIP ViT-L/14 vocabulary, pad with
<|endoftext|> 49407), SD 2.x and the MONAI CXR LDM (same vocabulary, pad with "!" = id 0), and the phantom world
(a tiny vocabulary trained with `train_bpe` below, saved in the same format).

The pipeline, text -> ids:
  1. clean      NFC, html.unescape twice, collapse whitespace, strip, lower()
  2. split      pre-tokenise into "words" (letter runs, single digits, punctuation runs, contractions)
  3. bytes      each word's UTF-8 bytes -> printable unicode characters (bytes_to_unicode)
  4. bpe        merge adjacent symbols, lowest merge rank first; the last symbol carries "</w>"
  5. ids        look every BPE string up in the vocabulary
  6. frame      [<|startoftext|>] + ids + [<|endoftext|>], truncated to 77, padded with the family's pad id

The ids match the references on every text the tests try; the edge cases where the references disagree with each
other or need a package we do not use (ftfy, html unescaping, a pad token inside the text, CJK spacing, Unicode
tables) are listed in tests/test_tokenizer.py's docstring.
"""
import gzip
import html
import json
import re
import unicodedata
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

BOS, EOS, EOW = "<|startoftext|>", "<|endoftext|>", "</w>"
CLIP_N_MERGES = 49152 - 256 - 2  # 48,894: OpenAI's vocab size 49,408 = 256 bytes + 256 bytes</w> + merges + 2


# -----------------------------------------------------------------------------------------------------------
# bytes <-> unicode characters

@lru_cache()
def bytes_to_unicode():
    """Map each of the 256 byte values to one printable unicode character.

    BPE works on strings, and we want every byte of any UTF-8 text to be a visible, non-space symbol, so that
    merges.txt can use a space as separator and nothing prints as a control character. The 188 bytes that are
    already printable keep their own character ('a' -> 'a', '!' -> '!', 'é' byte 0xE9 -> 'é'); the other 68
    (control bytes, space, 0x7F-0xA0, 0xAD) are moved, in order, to chr(256), chr(257), ...:
        byte 0x00 -> 'Ā' (256), byte 0x20 (space) -> 'Ġ' (288), byte 0x0A (newline) -> 'Ċ' (266).
    So "é" (UTF-8 bytes C3 A9) becomes the two symbols 'Ã' '©'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table  # printable bytes first, then the moved ones: the order of CLIP's first 256 vocab entries


# -----------------------------------------------------------------------------------------------------------
# cleaning and pre-tokenising

def clean(text):
    """Step 1: the normalisation OpenAI's tokenizer does (ftfy aside): NFC, unescape, whitespace, lower()."""
    text = unicodedata.normalize("NFC", text)  # "e" + combining acute -> "é", like ftfy / transformers
    text = html.unescape(html.unescape(text))  # twice: "&amp;amp;" -> "&amp;" -> "&"
    return re.sub(r"\s+", " ", text).strip().lower()


def _kind(ch):
    """'s' whitespace, 'L' unicode letter (\\p{L}), 'N' unicode number (\\p{N}), 'P' anything else."""
    if ch.isspace():
        return "s"
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "P"


SPECIALS = (BOS, EOS)
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def pretokenize(text):
    """Step 2: split cleaned text into words, exactly like CLIP's regex (tried left to right at each position):

        <|startoftext|>|<|endoftext|>      a special token written in the text stays one word
        's|'t|'re|'ve|'m|'ll|'d            English contractions: "it's" -> "it", "'s"
        [\\p{L}]+                           a run of letters, any script: "effusion", "épanchement", "胸部"
        [\\p{N}]                            ONE number character: "2024" -> "2", "0", "2", "4"
        [^\\s\\p{L}\\p{N}]+                   a run of anything else (punctuation, symbols, emoji): "-", ".),"
    Whitespace matches none of them, so it only separates words and is dropped.
    """
    words, i, n = [], 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind == "s":
            i += 1
            continue
        match = next((w for w in SPECIALS + CONTRACTIONS if text.startswith(w, i)), None)
        if match is not None:
            j = i + len(match)
        elif kind == "N":
            j = i + 1
        else:  # a greedy run of letters, or of "anything else"
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


# -----------------------------------------------------------------------------------------------------------
# the tokenizer

class CLIPTokenizer:
    """Byte-level BPE with CLIP's cleaning, pre-tokenising and framing. `tok(texts)` -> LongTensor (B, 77)."""

    def __init__(self, vocab, merges, pad_id, max_length=77):
        """vocab: {bpe string: id}; merges: [(a, b), ...] in rank order; pad_id: 49407 (SD1) or 0 (SD2/MONAI)."""
        for special in SPECIALS:
            if special not in vocab:
                raise ValueError(f"vocabulary has no {special!r} entry; is this a CLIP vocabulary?")
        if not 0 <= pad_id < len(vocab):
            raise ValueError(f"pad_id={pad_id} is outside the vocabulary (size {len(vocab)})")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for <|startoftext|> and <|endoftext|>")
        self.encoder = dict(vocab)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], pad_id
        self.max_length = max_length
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {BOS: [BOS], EOS: [EOS]}  # a special written in the text maps to its own id, as in OpenAI's

    @property
    def vocab_size(self):
        return len(self.encoder)

    # --- constructors ------------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_json, merges_txt, pad_id, max_length=77):
        """Hugging Face format: vocab.json ({string: id}) and merges.txt ("#version: 0.2" then "a b" per line).

        Merges are used in file order while the vocabulary holds their result (transformers v5 refuses a merge
        whose result is missing; v4's slow tokenizer hard-coded lines 1..48,894). For the real CLIP files both
        rules give the same 48,894 merges, and ours also fits the small vocabularies `train_bpe` writes.
        """
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_json}: expected a JSON object {{token: id}}, got {type(vocab).__name__}")
        with open(merges_txt, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = []
        for lineno, line in enumerate(lines, 1):
            if (lineno == 1 and line.startswith("#version")) or not line.strip():
                continue
            pair = tuple(line.split())
            if len(pair) != 2:
                raise ValueError(f"{merges_txt}:{lineno}: expected 'a b', got {line!r}")
            if pair[0] + pair[1] not in vocab:  # past the end of what the vocabulary supports
                warnings.warn(f"{merges_txt}: vocab.json has no entry for merge line {lineno} {line!r}; using "
                              f"the {len(merges)} merges before it and ignoring the rest", stacklevel=2)
                break
            merges.append(pair)
        return cls(vocab, merges, pad_id=pad_id, max_length=max_length)

    @classmethod
    def from_openai_bpe(cls, path_gz, pad_id, max_length=77):
        """OpenAI's bpe_simple_vocab_16e6.txt.gz: a header line, then 262,144 merges of which CLIP uses 48,894."""
        with gzip.open(path_gz, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:1 + CLIP_N_MERGES]
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != CLIP_N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path_gz}: expected {CLIP_N_MERGES} 'a b' merge lines after the header")
        return cls(_vocab_from_merges(merges), merges, pad_id=pad_id, max_length=max_length)

    @classmethod
    def from_dir(cls, path, pad_id=None, max_length=77):
        """A folder with vocab.json + merges.txt (a diffusers tokenizer/ folder or one we saved).

        pad_id=None reads the pad token as transformers does (`read_pad_token`; SD2 pads with "!").
        """
        path = Path(path)
        for name in ("vocab.json", "merges.txt"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: a tokenizer folder needs vocab.json + merges.txt")
        if pad_id is None:
            pad = read_pad_token(path)
            if pad is None:
                raise ValueError(f"{path}: no pad_token in tokenizer_config.json or special_tokens_map.json; "
                                 "pass pad_id (49407 for SD1/RoentGen, 0 for SD2 and the MONAI CXR LDM)")
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            if pad not in vocab:
                raise ValueError(f"{path}: pad_token {pad!r} is not in vocab.json; pass pad_id explicitly")
            pad_id = vocab[pad]
        return cls.from_files(path / "vocab.json", path / "merges.txt", pad_id=pad_id, max_length=max_length)

    def save(self, path):
        """Write vocab.json + merges.txt (+ tokenizer_config.json naming the pad token) that transformers reads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(self.encoder, f, ensure_ascii=False, indent=1)
        with open(path / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "bos_token": BOS,
                  "eos_token": EOS, "unk_token": EOS, "pad_token": self.decoder[self.pad_id]}
        with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=1)

    # --- text -> BPE strings -> ids ----------------------------------------------------------------------

    def bpe(self, word):
        """Step 4: merge the byte symbols of one word, lowest rank first, until no known pair is left."""
        if word in self.cache:
            return self.cache[word]
        symbols = [*word[:-1], word[-1] + EOW]  # "</w>" marks the end of a word: "lower" != "lower" in "lowers"
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def _word_tokens(self, text):
        """Steps 1-4: a list of (word, [bpe strings]) for each pre-tokenised word of the cleaned text."""
        out = []
        for word in pretokenize(clean(text)):
            symbols = word if word in SPECIALS else "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            out.append((word, self.bpe(symbols)))
        return out

    def tokenize(self, text):
        """text -> BPE strings, e.g. "pleural effusion" -> ['ple', 'ural</w>', 'effusion</w>']."""
        return [t for _, tokens in self._word_tokens(text) for t in tokens]

    def encode(self, text):
        """text -> ids without <|startoftext|>/<|endoftext|> framing."""
        # a string outside the vocabulary cannot happen with all 512 byte symbols present; like transformers
        # we fall back to the unknown token (<|endoftext|>) rather than fail
        return [self.encoder.get(t, self.eos_id) for t in self.tokenize(text)]

    def frame(self, ids, text=""):
        """Step 6: [BOS] + ids + [EOS], cut to max_length keeping EOS, then padded with pad_id."""
        room = self.max_length - 2
        if len(ids) > room:
            warnings.warn(f"CLIPTokenizer: cut {len(ids) - room} of {len(ids)} tokens to fit max_length="
                          f"{self.max_length} for text {text[:80]!r}", stacklevel=3)
            ids = ids[:room]
        ids = [self.bos_id, *ids, self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def __call__(self, texts):
        """str or list of str -> LongTensor (B, max_length)."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"CLIPTokenizer expects a str or a list of str, got {type(texts).__name__}")
        return torch.tensor([self.frame(self.encode(t), t) for t in texts], dtype=torch.long)

    def decode(self, ids):
        """ids -> text. Skips <|startoftext|>, stops at the first <|endoftext|> (what follows is padding: with
        pad id 0 a trailing "!" is padding, a "!" before EOS is text); "</w>" becomes a space."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        text = "".join(self.decoder[i] for i in ids if i != self.bos_id)
        data = bytes(self.byte_decoder[c] for c in text)  # "</w>" is printable ASCII: it survives as itself
        return data.decode("utf-8", errors="replace").replace(EOW, " ").strip()


def _vocab_from_merges(merges):
    """OpenAI's vocabulary order: 256 byte symbols, the same + "</w>", one entry per merge, then the specials."""
    base = list(bytes_to_unicode().values())
    tokens = base + [s + EOW for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def read_pad_token(path):
    """The pad token string an HF tokenizer folder declares (a string, or an AddedToken dict with "content"),
    or None when neither tokenizer_config.json nor special_tokens_map.json names one.

    transformers' precedence (4.x and 5.x alike): special_tokens_map.json overrides tokenizer_config.json, unless
    tokenizer_config.json holds `added_tokens_decoder` (folders saved since transformers 4.34), which makes it the only
    source. SD 2.x folders of the older kind name <|endoftext|> in one file and "!" in the other: the pad is "!".
    """
    path = Path(path)
    config = _read_json(path / "tokenizer_config.json")
    sources = [config]
    if "added_tokens_decoder" not in config:
        sources.insert(0, _read_json(path / "special_tokens_map.json"))
    for d in sources:
        pad = d.get("pad_token")
        if pad is not None:
            return pad["content"] if isinstance(pad, dict) else pad
    return None


def _read_json(file):
    """A JSON object from `file`, {} when the file is absent."""
    if not file.is_file():
        return {}
    d = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(d, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


# -----------------------------------------------------------------------------------------------------------
# a tiny BPE trainer (the phantom world's vocabulary)

def train_bpe(texts, vocab_size, pad_id=0, max_length=77):
    """Learn a CLIP-format vocabulary of `vocab_size` entries from `texts`.

    Same layout as CLIP's: 256 byte symbols, the 256 "</w>" variants, one entry per learned merge, then
    <|startoftext|> and <|endoftext|>. Merges follow the standard rule: count adjacent symbol pairs over all
    words (weighted by word frequency), merge the most frequent pair, repeat. Ties go to the smallest pair in
    string order, so the result depends only on the texts. Stops early when no pair is left.
    """
    n_merges = vocab_size - 512 - 2
    if n_merges < 0:
        raise ValueError(f"train_bpe: vocab_size={vocab_size} is below the 514 entries every CLIP vocabulary has")
    byte_encoder = bytes_to_unicode()
    counts = Counter(w for t in texts for w in pretokenize(clean(t)) if w not in SPECIALS)
    # each distinct word as a list of symbols, "</w>" glued to the last one (exactly what bpe() starts from)
    words = []
    for word, count in sorted(counts.items()):
        chars = "".join(byte_encoder[b] for b in word.encode("utf-8"))
        words.append(([*chars[:-1], chars[-1] + EOW], count))
    merges, vocab = [], _vocab_from_merges([])
    del vocab[BOS], vocab[EOS]  # the specials go last, after the merges
    while len(vocab) < vocab_size - 2:
        pairs = Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))  # two pairs can spell one string: keep the first id
        for symbols, _ in words:  # apply the merge in place, left to right
            i = 0
            while i + 1 < len(symbols):
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [best[0] + best[1]]
                i += 1
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab, merges, pad_id=pad_id, max_length=max_length)


if __name__ == "__main__":
    # python -m ldm.tokenizer [bpe_simple_vocab_16e6.txt.gz | tokenizer_dir] ["some text"]: print every stage
    import sys
    text = sys.argv[2] if len(sys.argv) > 2 else "Big right-sided pleural effusion &amp; 2 nodules, état stable."
    if len(sys.argv) > 1:
        src = Path(sys.argv[1])
        tok = CLIPTokenizer.from_dir(src, pad_id=0) if src.is_dir() else CLIPTokenizer.from_openai_bpe(src, 0)
    else:
        corpus = ["left lower lobe atelectasis", "small right pleural effusion", "no pneumothorax",
                  "bilateral pleural effusions", "right upper lobe pneumonia", "cardiomegaly"] * 3
        tok = train_bpe(corpus, vocab_size=600)
        print(f"(no vocabulary given: trained a {tok.vocab_size}-entry one on a toy corpus)")
    print("text        ", repr(text))
    print("1 clean     ", repr(clean(text)))
    words = pretokenize(clean(text))
    print("2 split     ", words)
    print("3 bytes     ", ["".join(bytes_to_unicode()[b] for b in w.encode("utf-8")) for w in words])
    print("4 bpe       ", tok.tokenize(text))
    print("5 ids       ", tok.encode(text))
    print("6 framed    ", tok(text)[0].tolist())
    print("decoded     ", repr(tok.decode(tok(text)[0])))
