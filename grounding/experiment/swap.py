"""The location-swap test: do the WORDS steer the heatmap, or does the image alone?

For every grounding pair whose prompt names exactly one side ("left ..." or "right ..."), the heatmap of the true
prompt and the heatmap of the same prompt with left and right swapped ("left lower atelectasis" ->
"right lower atelectasis") are both scored:
- true-side share: the share of pairs whose heatmap puts more mass on the side where the finding really is than on
  the other side. Computed for the true prompt AND for the swapped prompt, always against the TRUE side. A map that
  follows the words keeps a high share for the true prompt and a low one for the swapped prompt; a map that
  follows the image keeps both high.
- mIoU drop: mIoU(true prompt) - mIoU(swapped prompt) against the same boxes, in percentage points (mIoU is in
  percent wherever a row holds it: `miou_true_percent`, `miou_swap_percent`, `miou_drop_percent`); large when the
  words move the map.
Not in the paper (nor, as far as we know, in its peers); it reads the same heatmaps as the paper's metrics.

Conventions:
- Radiological convention: the patient's left is the IMAGE's right (the patient faces the viewer), so a "left"
  finding should put its mass on the image columns right of the midline.
- The true side is the side the pair's prompt names (the annotator's words about the boxes); `box_side` gives the
  side of the box centre, so a caller can count pairs where the two disagree.
- Midline: the vertical centre line x = W / 2 of the ORIGINAL image frame. The model's frame is a centre crop,
  so this is also the crop's centre line. On the phantom world the midpoint between the left and right lung
  centres of the anatomy LUT is x = 254.7 of 512, i.e. the centre line to within 0.3 px. A column whose centre
  lies exactly on the midline (odd widths) counts for neither side.
- NaN pixels (the padding of a non-square original) are ignored; equal masses score 0.5 (a tie is a coin flip).
- Excluded: prompts with no side word (cardiomegaly, "pulmonary edema", "lingular ..."), bilateral ones
  ("bilateral", "bibasilar", "both"), and prompts naming both sides ("left lower and right upper ..."): the swap
  of those either changes nothing or keeps both sides. Every exclusion is counted by reason.
"""
import re

import torch

from grounding.experiment.tables import models_markdown, summarise

SIDE_WORDS = ("left", "right")
BOTH_SIDES_WORDS = ("bilateral", "bibasilar", "bibasal", "both")
SWAP_METRICS = ("true_side", "swap_side", "miou_drop_percent")


# ---------------------------------------------------------------------------------------------------------
# words


def prompt_side(prompt):
    """("left" | "right" | None, reason): the one side a prompt names, or why it names none.

    reasons: "one side", "no side word", "bilateral", "both sides named".
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    if any(w in BOTH_SIDES_WORDS for w in words):
        return None, "bilateral"
    named = {w for w in words if w in SIDE_WORDS}
    if not named:
        return None, "no side word"
    if len(named) > 1:
        return None, "both sides named"
    return named.pop(), "one side"


def swap_sides(prompt):
    """The prompt with the whole words "left" and "right" exchanged (case kept: "Left" -> "Right")."""
    def repl(m):
        word = m.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.capitalize() if word[0].isupper() else other
    return re.sub(r"\b(left|right)\b", repl, prompt, flags=re.IGNORECASE)


def swap_pairs(pairs):
    """(eligible pairs, {reason: count}): the pairs that take part in the swap test, each with `side`
    (the patient side its prompt names) and `swapped_prompt`; every other pair is counted under its reason."""
    eligible, counts = [], {}
    for p in pairs:
        side, reason = prompt_side(p["prompt"])
        counts[reason] = counts.get(reason, 0) + 1
        if side is not None:
            eligible.append({**p, "side": side, "swapped_prompt": swap_sides(p["prompt"])})
    return eligible, counts


# ---------------------------------------------------------------------------------------------------------
# maps


def side_masses(heatmap, midline=None):
    """(mass on the image's left half, mass on the image's right half) of an (H, W) heatmap, NaN ignored.

    midline: x of the dividing vertical line in pixels (default W / 2); column j (centre j + 0.5) is on the left
    when j + 0.5 < midline, on the right when j + 0.5 > midline, on neither when exactly on it.
    """
    if not torch.is_tensor(heatmap) or heatmap.dim() != 2:
        raise ValueError(f"side_masses: expected an (H, W) tensor, got {tuple(getattr(heatmap, 'shape', ()))}")
    hm = torch.nan_to_num(heatmap.detach().double().cpu(), nan=0.0)
    W = hm.shape[1]
    mid = W / 2 if midline is None else float(midline)
    centres = torch.arange(W, dtype=torch.float64) + 0.5
    cols = hm.sum(0)
    return float(cols[centres < mid].sum()), float(cols[centres > mid].sum())


def true_side_hit(heatmap, side, midline=None):
    """1.0 if the heatmap puts more mass on the image side of the patient's `side` than on the other, 0.0 if
    less, 0.5 if equal (radiological convention: patient left = image right)."""
    if side not in SIDE_WORDS:
        raise ValueError(f"true_side_hit: side must be 'left' or 'right', got {side!r}")
    image_left, image_right = side_masses(heatmap, midline)
    true, other = (image_right, image_left) if side == "left" else (image_left, image_right)
    return 1.0 if true > other else 0.0 if true < other else 0.5


def box_side(boxes, width, midline=None):
    """The patient side ("left" | "right" | None when centred) of the union of boxes' centre, x only."""
    x0 = min(b[0] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    centre, mid = (x0 + x1) / 2, (width / 2 if midline is None else midline)
    return "left" if centre > mid else "right" if centre < mid else None


def swap_row(pair, true_map, swapped_map, miou_true, miou_swapped):
    """One pair's swap-test row from its two ORIGINAL-frame heatmaps and their mIoUs (in percent)."""
    return {"pair_id": pair["pair_id"], "category": pair["category"], "prompt": pair["prompt"],
            "swapped_prompt": pair["swapped_prompt"], "side": pair["side"],
            "box_side": box_side(pair["boxes"], pair["image_width"]),
            "true_side": true_side_hit(true_map, pair["side"]), "swap_side": true_side_hit(swapped_map, pair["side"]),
            "miou_true_percent": miou_true, "miou_swap_percent": miou_swapped,
            "miou_drop_percent": miou_true - miou_swapped}


# ---------------------------------------------------------------------------------------------------------
# tables


def swap_summary(rows, n_boot=10000, seed=0):
    """Per class and class-averaged means with 95% bootstrap CIs of true_side, swap_side and miou_drop_percent, over the
    rows that took part in the swap test (those holding its columns)."""
    return summarise([r for r in rows if "true_side" in r], list(SWAP_METRICS), n=n_boot, seed=seed)


def swap_caption(excluded):
    """How many pairs took part in the swap test and why the others did not ({reason: count} of swap_pairs)."""
    n = excluded.get("one side", 0)
    rest = ", ".join(f"{k} {v}" for k, v in sorted(excluded.items()) if k != "one side")
    return (f"{n} pairs whose prompt names one side; excluded: {rest or 'none'}. Side share = share of pairs "
            f"with more heatmap mass on the finding's true side (patient left = image right; midline x = W/2)")


def swap_markdown(summaries):
    """{model: swap_summary} -> one Markdown table: per model, true-side share (true prompt), true-side share
    (swapped prompt), mIoU drop under the swap (percentage points)."""
    labels = {"true_side": "side share true", "swap_side": "side share swapped", "miou_drop_percent": "mIoU drop"}
    return models_markdown(summaries, SWAP_METRICS, labels=labels)
