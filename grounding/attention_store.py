"""AttentionStore: keeps the cross-attention probabilities of chosen layers and steps, and nothing else.

In the spirit of prompt-to-prompt / Attend-and-Excite's AttentionStore, but passed explicitly to the UNet
(no monkey-patching): `ldm/attention.py` asks `store.wants(layer)` and, if so, computes the float32
probabilities (B, heads, N, 77) and calls `store.record(layer, probs)` right after the softmax.

What is kept (paper Sec. 3.2, A = T x L x D x S): for each (step, layer) one tensor (B, N, S) holding
only the prompt's token columns (S = the columns the caller names: training drops the joining "and",
the heatmaps keep every token between BOS and EOS), averaged over heads. Memory is therefore
selected steps x selected layers x pixels x prompt tokens, not x 77 x all steps x all layers.
Detached unless keep_grad=True (prompt tuning puts the loss on them).

The store records whatever forward it is given: pass it to the CONDITIONAL pass only (the unconditional
pass of a guided or inverted trajectory gets store=None).
"""
import torch


class AttentionStore:
    def __init__(self, layers=None, columns=None, keep_grad=False, average_heads=True):
        """layers: cross_index values to record (None = every cross-attention layer).
        columns: the prompt's token columns to keep (grounding/prompts.py `token_positions`): one list for the
            whole batch, a list of lists (one per batch item; shorter ones are padded and masked, see
            `token_mask`), or None = all 77 columns (what a loss over every token, special ones included, would
            need).
        The caller chooses the steps: set_step(key) before each forward it wants recorded (its maps are kept under
        that key) and store=None for the others. Without set_step everything is kept under step 0: prompt tuning
        runs its T timesteps as the batch of ONE forward (grounding/tuning.py), so its maps are (1, L, T, N, S).
        """
        self.layers = None if layers is None else sorted({int(i) for i in layers})
        self.keep_grad = keep_grad
        self.average_heads = average_heads
        self.step = 0
        self._set_columns(columns)
        self.reset()

    # ---- configuration ----------------------------------------------------------------------------

    def _set_columns(self, columns):
        self.columns = columns
        self._index = self._mask = None
        if columns is None:
            return
        per_item = columns if len(columns) and isinstance(columns[0], (list, tuple)) else [columns]
        if any(len(p) == 0 for p in per_item):
            raise ValueError(f"AttentionStore: a prompt has no token columns: {columns!r}")
        S = max(len(p) for p in per_item)
        # (B', S) gather index, padded with column 0 and masked out; B' = 1 broadcasts over the batch
        self._index = torch.tensor([list(p) + [0] * (S - len(p)) for p in per_item], dtype=torch.long)
        self._mask = torch.tensor([[True] * len(p) + [False] * (S - len(p)) for p in per_item])

    def select_columns(self, m):
        """(B, ..., 77) maps of every column -> (B, ..., S) this store's token columns (padded per item as `record`)."""
        if self._index is None:
            return m
        idx = self._index.to(m.device).expand(m.shape[0], -1)                   # (B, S)
        idx = idx.view(idx.shape[0], *[1] * (m.dim() - 2), idx.shape[1])
        return m.gather(-1, idx.expand(*m.shape[:-1], idx.shape[-1]))

    def set_step(self, step):
        """The caller's step key (a step index or the timestep value); maps are stored under it."""
        self.step = int(step)

    def reset(self):
        """Drop every stored map (call between images / optimisation steps)."""
        self.records = {}

    # ---- the protocol ldm/attention.py calls ------------------------------------------------------

    def wants(self, layer):
        """True for a chosen cross-attention layer."""
        if not layer.is_cross:
            return False
        return self.layers is None or layer.cross_index in self.layers

    def record(self, layer, probs):
        """probs (B, heads, N, K) post-softmax, float32 (K = 77 keys) -> keep (B, N, S) (or (B, heads, N, S))."""
        if probs.dim() != 4:
            raise ValueError(f"AttentionStore.record: probs must be (B, heads, N, K), got {tuple(probs.shape)}")
        B, K = probs.shape[0], probs.shape[-1]
        if self._index is not None:
            if self._index.shape[0] not in (1, B):
                raise ValueError(f"AttentionStore: columns has {self._index.shape[0]} lists but the "
                                 f"batch has {B} items")
            if int(self._index.max()) >= K:
                raise ValueError(f"AttentionStore: token column {int(self._index.max())} >= context length {K}")
            # select the columns BEFORE any other work, so only the prompt's columns survive
            idx = self._index.to(probs.device).expand(B, -1)[:, None, None, :]      # (B, 1, 1, S)
            probs = probs.gather(-1, idx.expand(-1, probs.shape[1], probs.shape[2], -1))
        if self.average_heads:
            probs = probs.mean(dim=1)                                               # (B, N, S)
        if not self.keep_grad:
            probs = probs.detach()
        key = (self.step, layer.cross_index)
        if key in self.records:
            raise RuntimeError(f"AttentionStore: step {self.step} layer {layer.cross_index} recorded twice; "
                               "call set_step() before each forward or reset()")
        self.records[key] = probs

    # ---- reading ----------------------------------------------------------------------------------

    def keys(self):
        """Sorted (step, layer) pairs that hold a map."""
        return sorted(self.records)

    def token_mask(self):
        """(B, S) bool, True = a real prompt token (False = padding of a shorter prompt); (1, S) when one list of
        columns serves the whole batch."""
        if self._mask is None:
            raise ValueError("AttentionStore: recorded all columns, there is no token mask")
        return self._mask

    def maps(self, steps=None, layers=None):
        """Stack to (T, L, B, N, S) (or (T, L, B, heads, N, S)), steps and layers in ascending order.

        All chosen layers must share one resolution (N); every (step, layer) must have been recorded.
        """
        if not self.records:
            raise ValueError("AttentionStore.maps: nothing recorded (wrong layers, or no set_step/forward?)")
        steps = sorted({s for s, _ in self.records}) if steps is None else list(steps)
        layers = sorted({l for _, l in self.records}) if layers is None else list(layers)
        missing = [(s, l) for s in steps for l in layers if (s, l) not in self.records]
        if missing:
            raise ValueError(f"AttentionStore.maps: {len(missing)} (step, layer) maps missing, e.g. {missing[:4]}")
        sizes = {self.records[(steps[0], l)].shape[-2] for l in layers}
        if len(sizes) > 1:
            raise ValueError(f"AttentionStore.maps: layers {layers} have different resolutions N={sorted(sizes)}; "
                             "choose layers of one resolution or read them one by one with keys()")
        return torch.stack([torch.stack([self.records[(s, l)] for l in layers]) for s in steps])

    def numel(self):
        """How many numbers are held (memory check)."""
        return sum(t.numel() for t in self.records.values())
