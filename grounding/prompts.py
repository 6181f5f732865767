"""LearnablePrompts: the codebook of token embeddings the prompts use, with only the ANATOMY rows trainable.

Mirrors Vilouras et al., MIDL 2026, Sec. 3.2 (docs/paper.md section 4): a codebook of the token
embeddings of the location sub-tokens, the pathology sub-tokens and the special tokens (BOS, EOS, pad,
"and"), initialised from the frozen text encoder's input embedding table. Only the location rows are
trained; everything else (pathology and special rows, text encoder, UNet, VAE) stays frozen. The tuned
vectors replace rows of the token lookup and go through the frozen text transformer:
    context = text_encoder(embeds=text_encoder.embed(token_embeds=...)).
As in CoOp / textual inversion: ONE trainable parameter holds the learned vectors (`anatomy`), and
`nearest_tokens` reports the closest real tokens of each.

The paper's codebook is not a tensor here: the frozen rows stay in the text encoder's own table, the learned ones
are `anatomy`, and `row_of_id` (vocabulary id -> row of `anatomy`, -1 = frozen) is what `token_embeds` uses to put
them together. `codebook` only lists the rows (token, role, trainable) for the printout at the start of training.

Paper gaps (docs/paper.md section 10), as options:
- shared_tokens: with the real CLIP vocabulary 6 sub-tokens (ple, ural</w>, cardi, ome, gal, y</w>) are both
  location and pathology sub-tokens ("pleural", "cardiomegaly").
  "positional" (default): location OCCURRENCES get their own trainable rows, substituted by position in the
  prompt, so "pleural" in "left pleural" and in "pleural effusion" are different vectors;
  "frozen": pathology wins, shared rows stay frozen (the paper's 46 rows minus the ambiguity). With the real
  vocabulary the prompt "cardiomegaly" (333 MS-CXR pairs) then has no trainable row at all;
  "trainable": shared rows are trainable wherever they occur, pathology words included.
- n_ctx: CoOp-style learnable context tokens inserted after BOS (0 = off, the paper's setting).
"""
import textwrap

import torch
import torch.nn.functional as F
from torch import nn

from grounding.anatomy import LOCATIONS, PATHOLOGY_WORDS

SHARED_MODES = ("frozen", "trainable", "positional")
# prompts say the pathology in lower case; "opacity" alone is how "lung opacity" is often written
PATHOLOGY_PHRASES = tuple(PATHOLOGY_WORDS.values()) + ("opacity",)
JOIN_WORDS = ("and",)   # several locations are joined with "and" (docs/paper.md section 3)


def prompt_positions(tokenizer, prompt, n_ctx=0):
    """Framed positions (0 = BOS) of every token of `prompt` between BOS and EOS, after n_ctx CoOp context tokens:
    [1 + n_ctx, ..., n_ctx + n] for a prompt of n tokens (the columns of its cross-attention maps)."""
    n = len(tokenizer.encode(prompt))
    if n == 0:
        raise ValueError(f"prompt {prompt!r} has no tokens")
    if 1 + n_ctx + n + 1 > tokenizer.max_length:
        raise ValueError(f"prompt {prompt!r} has {n} tokens: with BOS, EOS and n_ctx={n_ctx} it exceeds "
                         f"{tokenizer.max_length}")
    return [1 + n_ctx + k for k in range(n)]


class LearnablePrompts(nn.Module):
    def __init__(self, tokenizer, text_encoder, locations=LOCATIONS, pathologies=PATHOLOGY_PHRASES,
                 shared_tokens="positional", n_ctx=0, ctx_init_std=0.02):
        super().__init__()
        if shared_tokens not in SHARED_MODES:
            raise ValueError(f"shared_tokens={shared_tokens!r}: choose one of {SHARED_MODES}")
        self.tokenizer, self.shared_tokens, self.n_ctx = tokenizer, shared_tokens, int(n_ctx)
        # the frozen text encoder is used, not owned: keep it out of parameters() and state_dict()
        self.__dict__["text_encoder"] = text_encoder
        text_encoder.requires_grad_(False)
        table = text_encoder.token_embedding.weight.detach()                # (V, D) frozen input table

        # phrase -> sub-token ids (no BOS/EOS); order of first appearance defines the codebook order
        self.location_phrases = {p: tokenizer.encode(p) for p in locations}
        self.pathology_phrases = {p: tokenizer.encode(p) for p in pathologies}
        loc_ids = _unique(i for ids in self.location_phrases.values() for i in ids)
        path_ids = _unique(i for ids in self.pathology_phrases.values() for i in ids)
        shared = set(loc_ids) & set(path_ids)
        special = _unique([tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]
                          + [i for w in JOIN_WORDS for i in tokenizer.encode(w)])
        # the trainable (anatomy) rows: location sub-tokens, minus the shared ones unless they are trainable
        self.anatomy_ids = [i for i in loc_ids if i not in shared or shared_tokens != "frozen"]
        self.shared_ids = sorted(shared)
        if not self.anatomy_ids:
            raise ValueError(f"no trainable location sub-token with shared_tokens={shared_tokens!r}: every location "
                             "sub-token is also a pathology sub-token in this vocabulary; try 'positional'")
        # the codebook as a list, for the printout only: trainable anatomy rows, then the frozen rows. A shared id
        # has a frozen row too unless it is trainable everywhere ("positional": a frozen pathology row beside its
        # trainable location row).
        role = {i: "shared" if i in shared else "location" for i in loc_ids}
        role.update({i: "shared" if i in shared else "pathology" for i in path_ids})
        rows = [(i, role[i], True) for i in self.anatomy_ids]
        rows += [(i, role[i], False) for i in path_ids if not (i in shared and shared_tokens == "trainable")]
        rows += [(i, "special", False) for i in special if i not in role]
        self.codebook = rows

        # ONE trainable parameter: the anatomy rows, initialised from the frozen table
        self.anatomy = nn.Parameter(table[self.anatomy_ids].clone())        # (R, D), R anatomy sub-tokens
        # vocabulary id -> anatomy row (-1 = frozen): the lookup `token_embeds` substitutes the learned rows with
        row_of = torch.full((table.shape[0],), -1, dtype=torch.long)
        row_of[torch.tensor(self.anatomy_ids, dtype=torch.long)] = torch.arange(len(self.anatomy_ids))
        self.register_buffer("row_of_id", row_of, persistent=False)
        if self.n_ctx:   # CoOp extension: a second parameter, only when asked for
            self.ctx = nn.Parameter(torch.randn(self.n_ctx, table.shape[1]) * ctx_init_std)
        else:
            self.ctx = None
        # the layers, DDIM steps and window these rows are read with, when loaded from a file that records them
        # (grounding/experiment/rows.py load_rows): extract_heatmaps' default
        self.heatmap_settings = None

    # ---- token bookkeeping ----------------------------------------------------------------------

    def token_strings(self, ids):
        return [self.tokenizer.decoder[int(i)] for i in ids]

    def location_mask(self, prompt):
        """Bool list over the prompt's sub-tokens (no BOS/EOS): True inside a location phrase.

        Greedy left to right, longest location phrase first, whole words only. A word that the prompt
        standardiser wrote once for both roles ("left pleural" + "pleural effusion" -> "left pleural
        effusion"; "cardiomegaly" + "cardiomegaly" -> "cardiomegaly") counts as a location occurrence.
        """
        ids = self.tokenizer.encode(prompt)
        toks = self.token_strings(ids)
        word_start = [k == 0 or toks[k - 1].endswith("</w>") for k in range(len(ids))] + [True]
        phrases = sorted(self.location_phrases.values(), key=len, reverse=True)
        mask, k = [False] * len(ids), 0
        while k < len(ids):
            hit = next((p for p in phrases if word_start[k] and ids[k:k + len(p)] == p
                        and word_start[k + len(p)]), None)
            if hit:
                mask[k:k + len(hit)] = [True] * len(hit)
            k += len(hit) if hit else 1
        return mask

    def join_mask(self, prompt):
        """Bool list over the prompt's sub-tokens (no BOS/EOS): True for a whole word "and" joining locations."""
        ids = self.tokenizer.encode(prompt)
        toks = self.token_strings(ids)
        word_start = [k == 0 or toks[k - 1].endswith("</w>") for k in range(len(ids))] + [True]
        mask = [False] * len(ids)
        for join in (self.tokenizer.encode(w) for w in JOIN_WORDS):
            for k in range(len(ids) - len(join) + 1):
                if ids[k:k + len(join)] == join and word_start[k] and word_start[k + len(join)]:
                    mask[k:k + len(join)] = [True] * len(join)
        return mask

    def token_positions(self, prompt, include_join=False):
        """Framed positions (0 = BOS) of the prompt's non-special tokens, CoOp context tokens excluded.

        The "and" joining locations is a special token too (paper Sec. 3): it has no L_div pair and does not enter
        A_sp, so by default its positions are left out. include_join=True keeps every token between BOS and EOS,
        which is what the test-time heatmap averages (the predecessor's extraction, grounding/heatmap.py).
        """
        every = prompt_positions(self.tokenizer, prompt, self.n_ctx)
        join = [False] * len(every) if include_join else self.join_mask(prompt)
        positions = [p for p, j in zip(every, join) if not j]
        if not positions:
            raise ValueError(f"prompt {prompt!r} has no token other than the joining word(s) {JOIN_WORDS}")
        return positions

    # ---- prompts -> context ---------------------------------------------------------------------

    def token_embeds(self, texts):
        """(B, 77, D) token embeddings (no positions) with the anatomy rows (and CoOp context) substituted."""
        if isinstance(texts, str):
            texts = [texts]
        for p in texts:
            self.token_positions(p)                                           # length check, clear error
        te = self.text_encoder
        ids = self.tokenizer(list(texts)).to(self.anatomy.device)           # (B, 77)
        base = te.token_embedding(ids).detach()                               # frozen rows
        row = self.row_of_id[ids]                                             # (B, 77), -1 = frozen
        if self.shared_tokens == "positional":
            # shared ids are trainable only inside a location phrase (position in the prompt decides)
            for b, p in enumerate(texts):
                loc = torch.tensor([False] + self.location_mask(p), device=ids.device)   # [False]: BOS
                n = loc.numel()
                shared = torch.isin(ids[b, :n], torch.tensor(self.shared_ids, device=ids.device, dtype=ids.dtype))
                row[b, :n] = torch.where(shared & ~loc, torch.full_like(row[b, :n], -1), row[b, :n])
        use = (row >= 0)[..., None]                                           # (B, 77, 1)
        # grads reach `anatomy` only; the learned fp32 rows follow the text encoder's dtype (fp16/bf16 runs)
        x = torch.where(use, self.anatomy[row.clamp(min=0)].to(base.dtype), base)  # (B, 77, D)
        if self.n_ctx:
            # CoOp: [BOS, ctx_1..ctx_n, prompt..., EOS, pad...] cut back to 77 (only padding is dropped)
            ctx = self.ctx.to(x.dtype)[None].expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1:x.shape[1] - self.n_ctx]], dim=1)
        return x

    def encode(self, texts):
        """texts (str or list) -> UNet context (B, 77, D) through the frozen text encoder."""
        te = self.text_encoder
        return te(embeds=te.embed(token_embeds=self.token_embeds(texts)))

    # ---- reports ------------------------------------------------------------------------------

    def codebook_table(self):
        """[(token string, role, trainable)] for every codebook row (printed at the start of training)."""
        return [(self.tokenizer.decoder[i], role, trainable) for i, role, trainable in self.codebook]

    def format_codebook(self):
        rows = self.codebook_table()
        n_train = sum(t for _, _, t in rows)
        lines = [f"codebook: {len(rows)} rows, {n_train} trainable (shared_tokens={self.shared_tokens!r}, "
                 f"n_ctx={self.n_ctx})"]
        lines += [f"  {tok:<20s} {role:<10s} {'trainable' if t else 'frozen'}" for tok, role, t in rows]
        return "\n".join(lines + self.codebook_legend())

    def codebook_legend(self):
        """What the roles of format_codebook mean, and which tokens are special here (the pad token and "and" vary
        with the vocabulary: SD1 pads with EOS, SD2 / MONAI / phantom with "!"; a small vocabulary spells "and" in
        pieces), as lines of at most 118 characters."""
        tok = self.tokenizer
        pad = "EOS" if tok.pad_id == tok.eos_id else repr(tok.decoder[tok.pad_id])
        joins = []
        for w in JOIN_WORDS:
            pieces = self.token_strings(tok.encode(w))
            joins.append(f'"{w}"' + (f", here {' '.join(map(repr, pieces))} (this vocabulary has no single token "
                                     "for it)" if len(pieces) > 1 else ""))
        text = ("roles: location = a sub-token of an anatomy phrase: the learned rows (paper Sec. 3.2); pathology = a "
                "sub-token of a finding word, frozen;")
        if self.shared_ids:
            how = {"positional": "its location occurrences use the trainable row, its pathology occurrences the "
                                 "frozen one (so it is listed twice)",
                   "frozen": "frozen everywhere", "trainable": "trainable everywhere"}[self.shared_tokens]
            text += f" shared = both ({', '.join(map(repr, self.token_strings(self.shared_ids)))}): {how};"
        text += (f" special (frozen) = BOS, EOS, the pad token {pad} and the word joining several locations, "
                 f"{'; '.join(joins)}")
        return textwrap.wrap(text, 118, subsequent_indent="  ")

    @torch.no_grad()
    def nearest_tokens(self, k=5):
        """{anatomy token: [(nearest real token, cosine), ...]} against the frozen input table."""
        # only rows that have a token string (a text encoder may carry more rows than the vocabulary)
        table = self.text_encoder.token_embedding.weight[:self.tokenizer.vocab_size]
        table = F.normalize(table.float(), dim=-1)
        sims = F.normalize(self.anatomy.float(), dim=-1) @ table.T            # (R, V)
        top = sims.topk(k, dim=-1)
        out = {}
        for r, i in enumerate(self.anatomy_ids):
            out[self.tokenizer.decoder[i]] = [(self.tokenizer.decoder[int(j)], float(s))
                                              for s, j in zip(top.values[r], top.indices[r])]
        return out

    def drift(self):
        """Per anatomy row: ||learned - initial|| / ||initial|| (how far tuning moved each vector)."""
        init = self.text_encoder.token_embedding.weight[self.anatomy_ids].detach()
        return (self.anatomy.detach() - init).norm(dim=-1) / init.norm(dim=-1)


def _unique(ids):
    seen = {}
    for i in ids:
        seen.setdefault(int(i), None)
    return list(seen)
