# %% [markdown]
# # The method in one sitting: anatomy-grounded prompt tuning, run on a tiny chest X-ray LDM
#
# Vilouras et al., *Anatomy-Grounded Weakly Supervised Prompt Tuning for Chest X-ray Latent Diffusion Models*
# (MIDL 2026) freeze a whole latent diffusion model and tune only the input embeddings of anatomy words, so that
# the cross-attention of "left lower atelectasis" lands where "left lower" says. This tour runs that method end to
# end, in the paper's order, on the committed tiny phantom LDM (`assets/phantom_ldm`) and a few **synthetic**
# phantom chest X-rays (64 x 64 pixels). Each cell names the paper's section or equation it shows (docs/paper.md
# restates them) and the function it calls as `file:function`, and prints the shapes it handles.
#
# `python tour.py` runs it and writes this page (docs/tour.md) with its figures (docs/tour/); the file also opens
# as a notebook (Jupyter, VS Code: `# %%` cells). `python tour.py --fast` is the short run the tests use.

# %%
import sys

if __name__ == "__main__" and "ipykernel" not in sys.modules:   # `python tour.py`: cell by cell, into docs/tour.md
    from scripts.cells import run_cells
    sys.exit(run_cells(__file__, sys.argv[1:]))

# %%
import numpy as np
import torch

from ldm.weights.folder import load_pipeline
from grounding.phantom.world import PhantomConfig, sample_case
from grounding.phantom.render import render_case
from grounding.data.images import preprocess
from grounding.geometry import box_to_model
from grounding.data.reports import standardise_prompt
from grounding.anatomy import LOCATIONS
from scripts.cells import figure

FAST, OUT = globals().get("FAST", False), globals().get("OUT", "docs")   # set by scripts/cells.py run_cells
torch.manual_seed(0)
torch.set_num_threads(1)
pipe = load_pipeline("assets/phantom_ldm")                  # the frozen LDM: tokenizer, text encoder, VAE, UNet, DDIM
size = pipe.image["size"]                                    # 64 x 64 grey images in [0, 1], 3 x 32 x 32 latents


def phantom_pairs(kind, n, one_side=False):
    """n phantom studies of `kind` with one located finding: (image (1, 64, 64), prompt, location, box), the image and
    box in the model frame (shortest side to 64, centre crop: grounding/geometry.py:box_to_model)."""
    out, i = [], 0
    while len(out) < n:
        case, i = sample_case(PhantomConfig(), kind, i), i + 1
        f = case["findings"][:1]
        if len(case["findings"]) != 1 or f[0]["location"] not in LOCATIONS or f[0]["pathology"] == "Cardiomegaly":
            continue
        img, info = render_case(case)
        box = box_to_model(info["boxes"][0][0], img.shape[1], img.shape[0], size)
        loc = f[0]["location"]
        if one_side and loc.split()[0] not in ("left", "right"):
            continue
        out.append((preprocess(img, pipe.image), standardise_prompt([loc], f[0]["pathology"]), loc, box))
    return out


train = phantom_pairs("train", 6 if FAST else 24)             # tuning images (their reports name the location)
test = phantom_pairs("test", 3 if FAST else 4, one_side=True)  # held-out images naming one side, for cell e
print("pipeline:", pipe.family, "image", tuple(train[0][0].shape), "| tuning prompts:", [t[1] for t in train])

# %% [markdown]
# ## a. A prompt, its tokens, and the rows that learn (paper Sec. 3.2; docs/paper.md section 4)
#
# The paper keeps a codebook of the token embeddings its prompts use and trains only the **anatomy (location)**
# rows. `grounding/prompts.py:LearnablePrompts` holds them as ONE parameter, `anatomy` (R, D), initialised from
# the frozen token table; `row_of_id` maps a vocabulary id to its row there (-1 = frozen).

# %%
from grounding.prompts import LearnablePrompts

prompts = LearnablePrompts(pipe.tokenizer, pipe.text_encoder)
prompt, location = train[0][1], train[0][2]
ids = pipe.tokenizer.encode(prompt)                          # ldm/tokenizer.py:CLIPTokenizer.encode, no BOS/EOS
print(f"prompt {prompt!r} -> ids {ids}")
for i in ids:
    row = int(prompts.row_of_id[i])
    print(f"  {pipe.tokenizer.decoder[i]:<16} id {i:<4} {'anatomy row ' + str(row) if row >= 0 else 'frozen'}")
print("trainable parameter `anatomy`:", tuple(prompts.anatomy.shape), "= (R anatomy sub-tokens, D text width)")

# %% [markdown]
# ## b. Text encoder from embeddings, one UNet forward, the recorded maps (paper Sec. 3.2, Eq. 1)
#
# The learned rows replace rows of the token lookup and go through the frozen text transformer
# (`grounding/prompts.py:LearnablePrompts.encode` -> `ldm/text_encoder.py:TextEncoder.embed`). The UNet then runs
# with an `grounding/attention_store.py:AttentionStore`: at the layers it wants, `ldm/attention.py:Attention.forward`
# computes Eq. 1, A = softmax(Q K^T / sqrt(d)), explicitly and hands A to the store, which keeps only the prompt's
# token columns. Training batches the T timesteps into one forward that stops after the last layer needed
# (`grounding/tuning.py:prompt_attention`); the latents here are forward-noised
# (`grounding/heatmap.py:training_latents`), as the quickstart does.

# %%
from grounding.attention_store import AttentionStore
from grounding.heatmap import HeatmapConfig, inversion_scheduler, training_latents, window_timesteps

layers = [4, 5]                                               # the quickstart's: the phantom UNet's last two layers
sched = inversion_scheduler(pipe.scheduler, HeatmapConfig(num_steps=25))
ts = window_timesteps(sched, 400, 700)                        # the training window t in [400, 700) (docs/paper.md 13)
x = train[0][0][None]                                         # (1, 1, 64, 64)
z0 = pipe.vae.encode(x) * pipe.scale_factor                   # ldm/vae.py:AutoencoderKL.encode -> (1, 3, 32, 32)
z_t = training_latents(pipe, z0, ts, mode="noise", generator=torch.Generator().manual_seed(0))   # (T, 1, 3, 32, 32)
with torch.no_grad():
    emb = pipe.text_encoder.embed(token_embeds=prompts.token_embeds([prompt]))    # (1, 77, D) tokens + positions
    context = pipe.text_encoder(embeds=emb)                                        # (1, 77, D) the UNet's context
    store = AttentionStore(layers, prompts.token_positions(prompt))
    pipe.unet(z_t[:, 0], ts, context.expand(len(ts), -1, -1), store=store, stop_after=max(layers))
maps = store.maps().transpose(0, 2)                           # (1, L, T, N, S) -> (T, L, 1, N, S)
print(f"z0 {tuple(z0.shape)}, z_t {tuple(z_t.shape)} at t = {ts.tolist()}")
print(f"embeddings {tuple(emb.shape)} -> context {tuple(context.shape)}")
print(f"maps {tuple(maps.shape)} = (T steps, L layers, batch, N = 16 x 16 pixels, S prompt tokens)")
words = prompts.token_strings(pipe.tokenizer.encode(prompt))


def up(m):
    """(N,) map of a 16 x 16 grid -> (64, 64) min-max normalised, for a picture."""
    m = m.reshape(16, 16).detach().float().numpy()
    return np.kron((m - m.min()) / (m.max() - m.min() + 1e-12), np.ones((4, 4)))


figure("token_maps", [[x[0, 0].numpy()] + [up(maps[..., s].mean((0, 1))[0]) for s in range(maps.shape[-1])]],
       f"'{prompt}': the image and each token's map (mean over T and L), before tuning", OUT,
       labels=["image"] + words)

# %% [markdown]
# ## c. The Gaussian target and the losses (paper Sec. 3.1-3.2, Eqs. 2-4; docs/paper.md sections 3, 5)
#
# The prompt's locations are looked up in the anatomy LUT (`grounding/anatomy.py:build_lut`: region boxes ->
# Gaussians, mu = centre, sigma = side / 6, averaged per region; here from 20 phantom images' own anatomy boxes, as
# Chest ImaGenome's gold boxes give them on real data) and rendered at the map's 16 x 16 with peak 1, each cell
# holding the Gaussian's mass over its 32 x 32-px footprint (`grounding/anatomy.py:render_gaussians`): G. Eq. 3's target keeps the model's own token-average map A_sp where G
# has support and adds alpha G (`grounding/losses.py:localisation_target`); L_loc (Eq. 4) is 1 - cos(A_sp, target)
# (`grounding/losses.py:localisation_loss`), L_div (Eq. 2) the mean squared cosine between the token maps
# (`grounding/losses.py:diversity_loss`). Training moves every mu and sigma by up to +-5% of the image side first
# (`grounding/anatomy.py:jitter`).

# %%
from grounding.anatomy import build_lut, gaussians_for, jitter, render_gaussians
from grounding.losses import diversity_loss, localisation_loss, localisation_target, token_average

graphs = []
for i in range(20):                                           # 20 phantom images' anatomy boxes, as ImaGenome gives
    case = sample_case(PhantomConfig(), "train", i)
    graphs.append({"boxes": render_case(case)[1]["anatomy"], "image_width": case["anat"]["W"],
                   "image_height": case["anat"]["H"]})
lut, counts = build_lut(graphs)                               # {location: [[mu_x, mu_y, sigma_x, sigma_y], ...]}
G = render_gaussians(gaussians_for(lut, [location]), 16)[None]   # (1, 16, 16), peak 1
A_sp = token_average(maps)                                    # (T, L, 1, N): mean over the prompt's tokens
target = localisation_target(A_sp, G.flatten(1), alpha=0.1)   # (T, L, 1, N)
print(f"LUT: {len(lut)} locations, boxes of {counts['left lung']} images; {location!r} -> "
      f"{[round(v) for v in lut[location][0]]} = (mu_x, mu_y, sigma_x, sigma_y) in the 512 frame")
print("one draw of the +-5% jitter:", [round(v) for v in jitter(gaussians_for(lut, [location]), 0.05)[0]])
print(f"G {tuple(G.shape)}, A_sp {tuple(A_sp.shape)}, target {tuple(target.shape)}")
print(f"L_div = {diversity_loss(maps).item():.3f}, L_loc = {localisation_loss(A_sp, G).item():.3f}")
figure("target", [[x[0, 0].numpy(), up(G[0].flatten()), up(A_sp.mean((0, 1))[0]), up(target.mean((0, 1))[0])]],
       "image | G (Gaussian of the location) | A_sp (mean token map) | Eq. 3 target (mean over T and L)", OUT,
       labels=["image", "G", "A_sp", "target"])

# %% [markdown]
# ## d. A few optimiser steps (paper Sec. 3.2; docs/paper.md section 5)
#
# One step = `grounding/tuning.py:tuning_loss` on one image (noisy latents -> maps -> w_div L_div + w_loc L_loc)
# and an AdamW step on `anatomy` alone; the UNet, VAE and text encoder never change. These are the quickstart's
# settings (w_div 0, lr 1e-2, forward noise: docs/results.md "The quickstart's settings"); configs/paper_phantom.yaml
# runs the paper's own. The jitter (of the image side, as large as the phantom's smallest sigmas) can shrink a sigma
# far below one 32-px map cell: G still holds that Gaussian's mass in its cell, so no step is left without a target.

# %%
from grounding.tuning import tuning_loss

opt = torch.optim.AdamW([prompts.anatomy], lr=1e-2, weight_decay=0.0)
n_steps = 4 if FAST else 150
for step in range(n_steps):
    img, p, loc, _ = train[step % len(train)]
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        z = training_latents(pipe, pipe.vae.encode(img[None]) * pipe.scale_factor, ts, mode="noise", generator=gen)
    gaussians = jitter(gaussians_for(lut, [loc]), 0.05, gen)
    loss, parts = tuning_loss(pipe, prompts, p, z, ts, layers, gaussians, weights=(0.0, 1.0))   # (w_div, w_loc)
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % max(1, n_steps // 5) == 0 or step == n_steps - 1:
        print(f"step {step:3d}  {p:<36} L_loc {parts['loc'].item():.3f}  mean row drift {prompts.drift().mean():.3f}")
drift = prompts.drift()
print("drift ||learned - original|| / ||original|| of this prompt's rows:",
      {w: round(float(drift[int(prompts.row_of_id[i])]), 3) for w, i in zip(words, ids) if prompts.row_of_id[i] >= 0})
with torch.no_grad():                                         # the same image and noise as cell b, the learned rows
    store = AttentionStore(layers, prompts.token_positions(prompt))
    pipe.unet(z_t[:, 0], ts, prompts.encode([prompt]).expand(len(ts), -1, -1), store=store, stop_after=max(layers))
after = store.maps().transpose(0, 2)                          # (T, L, 1, N, S)
print(f"L_loc of cell b's image and noise: {localisation_loss(A_sp, G).item():.3f} -> "
      f"{localisation_loss(token_average(after), G).item():.3f}")
rows = [torch.cat([m, token_average(m)[..., None]], -1).mean((0, 1))[0] for m in (maps, after)]   # (N, S + 1)
figure("before_after", [[up(G[0].flatten())] + [up(r[:, s]) for s in range(r.shape[-1])] for r in
                        (rows[0], rows[1], rows[1] - rows[0])],
       f"'{prompt}': each token's map and A_sp (mean over T and L) before {n_steps} steps (top), after (middle), "
       "and the change after - before (bottom, min-max: bright = gained)", OUT, labels=["G"] + words + ["A_sp"])

# %% [markdown]
# ## e. The test-time heatmap, its scores and the swap test (docs/paper.md sections 6-7)
#
# At test time the image is DDIM-inverted along the "" prompt while the prompt's maps are recorded at t in
# [400, 600), averaged, filtered and normalised (`grounding/heatmap.py:extract_heatmaps`, the plain procedure;
# `grounding/heatmap.py:record_straightforward` writes the recording out step by step, `record_fast` is the
# optimisation the call uses). CNR and mIoU score the heatmap against the finding's box (`grounding/metrics.py:cnr`,
# `grounding/metrics.py:miou`). The swap test exchanges "left" and "right" (`grounding/experiment/swap.py:swap_sides`):
# a map that follows the words moves its mass to the other side (patient left = image right).

# %%
from grounding.heatmap import extract_heatmaps
from grounding.metrics import cnr, miou
from grounding.experiment.swap import prompt_side, side_masses, swap_sides

images = torch.stack([t[0] for t in test])                    # (B, 1, 64, 64)
texts, boxes = [t[1] for t in test], [t[3] for t in test]
hcfg = HeatmapConfig(num_steps=10 if FAST else 25, family="phantom", layers=tuple(layers))
untuned = extract_heatmaps(pipe, images, texts, hcfg)                         # the original rows
tuned = extract_heatmaps(pipe, images, texts, hcfg, prompts)                  # the rows after cell d
swapped = extract_heatmaps(pipe, images, [swap_sides(t) for t in texts], hcfg, prompts)
print(f"images {tuple(images.shape)} -> heatmaps {tuple(tuned.shape)}; model-frame boxes (x, y, w, h)")


def named_side_share(h, text):
    """Share of the heatmap's mass on the side the prompt names (patient left = image right)."""
    image_left, image_right = side_masses(h)
    return (image_right if prompt_side(text)[0] == "left" else image_left) / (image_left + image_right)


print("prompt; each pair of numbers: original rows -> tuned rows")
for k, text in enumerate(texts):
    print(f"{text:<26} CNR {cnr(untuned[k], [boxes[k]]):5.2f} -> {cnr(tuned[k], [boxes[k]]):5.2f} | "
          f"mIoU {100 * miou(untuned[k], [boxes[k]]):4.1f} -> {100 * miou(tuned[k], [boxes[k]]):4.1f} % | mass on "
          f"the named side {named_side_share(untuned[k], text):.2f} -> {named_side_share(tuned[k], text):.2f}, "
          f"swapped prompt {named_side_share(swapped[k], text):.2f}")


def heat(img, h):
    """A grey image with a heatmap in red over it, (64, 64, 3) uint8."""
    g, h = img[0].numpy(), h.numpy()
    return (np.stack([g * 0.35 + h * 0.65, g * 0.35 + h * 0.15, g * 0.35], -1) * 255).clip(0, 255).astype(np.uint8)


def boxed(img, box):
    rgb = np.repeat(img[0].numpy()[..., None] * 255, 3, -1).astype(np.uint8)
    x0, y0, x1, y1 = (int(round(v)) for v in (box[0], box[1], box[0] + box[2] - 1, box[1] + box[3] - 1))
    rgb[[y0, y1], x0:x1 + 1], rgb[y0:y1 + 1, [x0, x1]] = (0, 255, 0), (0, 255, 0)
    return rgb


figure("heatmaps", [[boxed(i, b), heat(i, u), heat(i, t), heat(i, s)] for i, b, u, t, s in
                    zip(images, boxes, untuned, tuned, swapped)],
       "image + box | original rows | tuned rows | tuned rows, left and right swapped in the prompt", OUT,
       labels=["box", "untuned", "tuned", "swapped"])

# %% [markdown]
# ## f. The same at scale: train.py and evaluate.py (docs/paper.md sections 5-8)
#
# `train.py:tune` is cells b-d over the curated tuning set (grounding/experiment/sources.py reads the data, the
# LUT comes from Chest ImaGenome's gold boxes), with checkpoints, resuming and data parallelism around the loop;
# `train.py:final_evaluation` and `evaluate.py:main` are cell e over every held-out pair, with bootstrap CIs
# (`grounding/experiment/evaluation.py:compare_models`). Their settings are the config keys below (every one is a
# field of `grounding/experiment/config.py:TrainConfig`); the quickstart's tune.yaml, the paper's settings on the
# phantom world (configs/paper_phantom.yaml) and what each key changes:
#
#     python train.py --config tune.yaml                 # cells b-d over 300 samples, then cell e on 234 held-out pairs
#     python evaluate.py --split mscxr-loc --prompts runs/tune/learned_rows.safetensors --swap    # cell e alone

# %%
from grounding.experiment.config import TrainConfig, load_config

quick, paper = load_config(TrainConfig, "tune.yaml"), load_config(TrainConfig, "configs/paper_phantom.yaml")
for key, what in [("layers", "cross-attention layers whose maps enter the loss and the tuned heatmap (cell b)"),
                  ("num_inference_steps", "the DDIM schedule the windows are cut from (cells b, e)"),
                  ("noisy_latents", "z_t by forward noise or by DDIM inversion (cell b)"),
                  ("w_div", "weight of L_div, Eq. 2 (cell c)"), ("alpha", "weight of G in the Eq. 3 target"),
                  ("jitter", "the +-fraction moved on every mu and sigma (cell c)"),
                  ("lr", "AdamW learning rate (cell d)"), ("max_steps", "optimiser steps (cell d)")]:
    if key == "layers":
        print(f"{'key':<20} {'tune.yaml':<10} {'paper_phantom':<14} what it changes")
    print(f"{key:<20} {str(getattr(quick, key)):<10} {str(getattr(paper, key)):<14} {what}")
