"""A prompt as words for ground.py: which token columns of the cross-attention maps belong to each word.

The heatmap of a phrase averages every token between BOS and EOS (grounding/heatmap.py). A reader asks for one map
per WORD, so here the prompt is cut into words (whitespace-separated, leading and trailing punctuation split off:
"effusion," -> the word "effusion" and the punctuation ","), each word into its BPE tokens (a word the tokenizer
splits into several tokens gets ONE map, the mean of its tokens' maps, and its tokens' own maps on request), and
every unit into its columns of the 77-token context:

    column 0          BOS (<|startoftext|>)
    1 .. n_ctx        CoOp context tokens of learned rows that have them (grounding/prompts.py; n_ctx = 0 otherwise)
    1 + n_ctx + k     the prompt's k-th token (k = 0 .. n - 1)
    1 + n_ctx + n     EOS (<|endoftext|>)
    after it          padding, up to 76 (the family's pad id: "!" for SD2 / MONAI / phantom, EOS for SD1)

A prompt longer than the context (77 - 2 - n_ctx tokens) is cut after its last whole word that fits, and the
dropped words are named (the tokenizer alone would cut mid-word, silently but for a warning). A word split oddly
(pieces of under 3 characters on average, e.g. "hemidiaphragm" -> h e m id i ap h ra g m in a small vocabulary)
is named too: the model may not know it.
"""
from dataclasses import dataclass, field

from ldm.tokenizer import EOS, clean, pretokenize
from grounding.experiment.swap import prompt_side, swap_sides

ODD_CHARS_PER_TOKEN = 3.0   # below this many characters per token, a multi-token word is reported as split oddly


@dataclass
class Unit:
    """One map of a prompt: the phrase, a word, one token of a word, or a special token group."""
    name: str                 # unique in its prompt: "phrase", "left", "left (2)" (a repeated word),
                              # "hemidiaphragm[3]:id", "<bos>", "<eos>", "<padding>", "<ctx>"
    kind: str                 # "phrase" | "word" | "token" | "special"
    offsets: list = None      # token offsets in the prompt (k = 0 .. n-1); None for a special group
    word: int = None          # index of the word a word or token unit belongs to
    text: str = None          # the word itself (word and token units)

    def columns(self, n, n_ctx=0, max_length=77):
        """Context columns of this unit in a prompt of n tokens framed with n_ctx CoOp tokens."""
        if self.offsets is not None:
            return [1 + n_ctx + k for k in self.offsets]
        start_pad = 2 + n_ctx + n
        return {"<bos>": [0], "<eos>": [1 + n_ctx + n], "<ctx>": list(range(1, 1 + n_ctx)),
                "<padding>": list(range(start_pad, max_length))}[self.name]


@dataclass
class PromptWords:
    given: str                # the prompt as the user wrote it
    text: str                 # the prompt as used (cleaned; cut to the context when too long)
    n_tokens: int             # tokens between BOS and EOS
    units: list               # [Unit]: the phrase, then the words (+ tokens, + specials on request)
    tokens: list              # the BPE strings of the used prompt
    dropped: str = ""         # words cut off at the context length
    punctuation: list = field(default_factory=list)   # pieces that are not part of a word (mapped in the phrase only)
    warnings: list = field(default_factory=list)
    side: str = None          # "left" | "right" | None: the one side the prompt names (grounding/experiment/swap.py)
    swapped: "PromptWords" = None   # the same prompt with left and right exchanged, when it names one side

    def words(self):
        return [u for u in self.units if u.kind == "word"]

    def unit(self, name):
        return next(u for u in self.units if u.name == name)


def prompt_words(tokenizer, prompt, n_ctx=0, tokens=False, specials=False, swap=True):
    """The prompt's words, tokens and units (see the file notes); raises ValueError for a prompt with no word."""
    room = tokenizer.max_length - 2 - n_ctx
    chunks = []                                   # [(chunk, [(piece, [bpe strings])])] per whitespace word
    for chunk in clean(prompt).split(" "):
        if chunk:
            chunks.append((chunk, [(p, tokenizer.tokenize(p)) for p in pretokenize(chunk)]))
    kept, used = [], 0
    for chunk, pieces in chunks:                  # whole words only, while they fit the context
        n = sum(len(t) for _, t in pieces)
        if used + n > room:
            break
        kept.append((chunk, pieces))
        used += n
    if not kept:
        raise ValueError(f"prompt {prompt!r} has no word that fits the {room}-token context" if chunks
                         else f"prompt {prompt!r} is empty")
    warnings, dropped = [], " ".join(c for c, _ in chunks[len(kept):])
    if dropped:
        total = used + sum(len(t) for _, p in chunks[len(kept):] for _, t in p)
        warnings.append(f"prompt cut to {used} of its {total} tokens (the context holds {room} between BOS and EOS"
                        f"{f' and {n_ctx} context tokens' if n_ctx else ''}): dropped {_short(dropped)!r}")
    units, punctuation, bpe, k, n_words, seen = [Unit("phrase", "phrase", [])], [], [], 0, 0, {}
    for chunk, pieces in kept:
        wordy = [any(ch.isalnum() for ch in p) for p, _ in pieces]
        lo = wordy.index(True) if any(wordy) else len(pieces)
        hi = len(pieces) - wordy[::-1].index(True) if any(wordy) else len(pieces)
        word_offsets = []
        for j, (piece, toks) in enumerate(pieces):
            offsets = list(range(k, k + len(toks)))
            k += len(toks)
            bpe += toks
            units[0].offsets += offsets
            if lo <= j < hi:
                word_offsets += offsets
            else:
                punctuation.append(piece)
        if word_offsets:
            text = "".join(p for p, _ in pieces[lo:hi])
            word_tokens = [bpe[o] for o in word_offsets]
            seen[text] = seen.get(text, 0) + 1
            name = text if seen[text] == 1 else f"{text} ({seen[text]})"     # "left ... left" -> "left", "left (2)"
            units.append(Unit(name, "word", word_offsets, n_words, text))
            unknown = [t for t in word_tokens if t not in tokenizer.encoder]
            if unknown or (len(word_tokens) > 1 and len(text) / len(word_tokens) < ODD_CHARS_PER_TOKEN):
                warnings.append(f"the word {text!r} is split into {len(word_tokens)} tokens {word_tokens}"
                                + (f" ({len(unknown)} unknown, read as {EOS})" if unknown else "")
                                + ": the model may not know it; its map is the mean of theirs (--tokens: one map "
                                "per token)")
            if tokens and len(word_offsets) > 1:
                units += [Unit(f"{name}[{i}]:{bpe[o]}", "token", [o], n_words, text) for i, o in enumerate(word_offsets)]
            n_words += 1
    if len(units) == 1:
        raise ValueError(f"prompt {prompt!r} has no word (letters or digits), only {punctuation}")
    if specials:
        units += [Unit(n, "special") for n in ("<bos>", "<eos>", "<padding>")] + ([Unit("<ctx>", "special")] if n_ctx else [])
    text = " ".join(c for c, _ in kept)
    side, _ = prompt_side(text)
    out = PromptWords(prompt, text, k, units, bpe, dropped, punctuation, warnings, side)
    if swap and side is not None:
        out.swapped = prompt_words(tokenizer, swap_sides(text), n_ctx, tokens, specials, swap=False)
    return out


def select_words(pw, wanted):
    """Keep only the words named in `wanted` (with the phrase, their tokens and the specials); a name that is not a
    word of the prompt is refused, naming the prompt's words. The swapped prompt keeps the same word positions."""
    if not wanted:
        return pw
    words, names = [u.text for u in pw.words()], {clean(w) for w in wanted}
    missing = [w for w in wanted if clean(w) not in words]
    if missing:
        raise ValueError(f"--word {missing} not in the prompt {_short(pw.text)!r}; its words are "
                         f"{list(dict.fromkeys(words))}")
    keep = {i for i, w in enumerate(words) if w in names}   # every occurrence of a repeated word
    for p in (pw, pw.swapped) if pw.swapped is not None else (pw,):
        p.units = [u for u in p.units if u.word is None or u.word in keep]
    return pw


def _short(text, n=80):
    return text if len(text) <= n else f"{text[:n]}... ({len(text.split())} words)"
