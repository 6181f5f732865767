"""The paper's training step (docs/paper.md section 5; paper Sec. 3.2, Eqs. 2-4): one image's loss.

    noisy latents z_t (T, 1, C, h, w): the latent the UNet is fed at each of the T training timesteps t
      -> ONE batched UNet forward with the prompt's context, the AttentionStore keeping the prompt-token columns of
         the chosen cross-attention layers, with their graph to the learned anatomy rows
      -> maps (T, L, 1, N, S): T timesteps, L layers, 1 image, N = side * side pixels, S prompt tokens
      -> L_div (Eq. 2) on the maps, L_loc (Eqs. 3-4) between the token average A_sp and the anatomy Gaussian G

The noisy latents come from grounding/heatmap.py `training_latents`: forward noising q(z_t | z_0), or DDIM inversion
as at test time. With inversion the latent fed at t is the inversion state at the next SMALLER timestep (a DDIM
inversion step to t computes UNet(z_prev, t)), exactly what the test-time procedure feeds the UNet at t. The
jittered Gaussians come from grounding/anatomy.py. train.py calls `tuning_loss` once per image of a batch and
averages; benchmarks/tuning_step.py times `tuning_loss` against a naive full forward.
"""
import math

from grounding.anatomy import render_gaussians
from grounding.attention_store import AttentionStore
from grounding.losses import PAPER_ALPHA, PAPER_EPS, grounding_loss
from grounding.precision import autocast


def prompt_attention(pipe, prompts, prompt, z_t, timesteps, layers, autocast_mode="none"):
    """Cross-attention maps of one prompt, (T, L, 1, N, S), differentiable with respect to the learned rows.

    z_t: (T, 1, C, h, w) noisy latents of one image, z_t[k] fed at timesteps[k] (T,). All T timesteps go through the
    UNet in ONE batched call, which stops right after the last layer in `layers` (nothing later is needed for the loss).
    """
    device = z_t.device
    store = AttentionStore(layers, prompts.token_positions(prompt), keep_grad=True)
    with autocast(device, autocast_mode):                              # the recorded maps stay float32
        context = prompts.encode([prompt])                            # (1, 77, D), grad to the anatomy rows
        T = len(timesteps)                                            # the T timesteps form the UNet batch
        pipe.unet(z_t[:, 0], timesteps.to(device), context.expand(T, -1, -1), store=store, stop_after=max(layers))
    # one forward = one store step (0), its batch the T timesteps: (1, L, T, N, S) -> (T, L, 1, N, S)
    return store.maps().transpose(0, 2)


def tuning_loss(pipe, prompts, prompt, z_t, timesteps, layers, gaussians, merge="max", weights=(1.0, 1.0),
                alpha=PAPER_ALPHA, eps=PAPER_EPS, autocast_mode="none"):
    """L = w_div * L_div + w_loc * L_loc for one (image, prompt); returns (loss, parts) as `grounding_loss`.

    z_t (T, 1, C, h, w) -> maps (T, L, 1, N, S) -> G (1, side, side): the (already jittered) Gaussians of the
    prompt's locations, in LUT frame pixels, rendered at the maps' resolution side = sqrt(N) and merged.
    """
    maps = prompt_attention(pipe, prompts, prompt, z_t, timesteps, layers, autocast_mode)
    side = int(math.isqrt(maps.shape[-2]))
    G = render_gaussians(gaussians, side, merge=merge)[None].to(z_t.device)   # (1, side, side) target Gaussian
    return grounding_loss(maps, G, weights=weights, alpha=alpha, eps=eps)
