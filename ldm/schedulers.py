"""DDPM noise schedule, DDIM sampling and DDIM inversion, epsilon- and v-prediction.

Mirrors diffusers' `schedulers/scheduling_ddim.py` (DDIMScheduler), `scheduling_ddim_inverse.py`
(DDIMInverseScheduler) and the training helpers of `scheduling_ddpm.py` (add_noise, get_velocity), with the
same config field names as a diffusers `scheduler/scheduler_config.json`, so timesteps are identical and
every step agrees with diffusers to float32 rounding.

Papers: DDPM (Ho et al. 2020) for the forward process q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I), where
a_t = alphas_cumprod[t] = prod_{s<=t} (1 - betas[s]); DDIM (Song et al. 2021) eqs. 12 and 16 for the
sampling step; v-prediction (Salimans & Ho 2022): v = sqrt(a_t) eps - sqrt(1 - a_t) x_0.

Two diffusers conventions that we keep on purpose (they decide which noise level a step lands on):
- The step from t goes to `t_prev = t - num_train_timesteps // n` (n = number of inference steps), whatever
  the spacing. That is the previous schedule entry for "leading" spacing, and for "trailing" when n divides
  num_train_timesteps; for "linspace" (and trailing otherwise) it can differ by a few timesteps from the
  next entry of `timesteps`. DDIM and MONAI do the same, so we match their numbers exactly.
- Below t = 0 is the clean end of the chain, with a_{-1} = 1 if `set_alpha_to_one` else alphas_cumprod[0]
  (SD sets it False: its last step lands on the t = 0 noise level, not on exactly clean).
"""
from dataclasses import dataclass

import numpy as np
import torch

from ldm.configs import ConfigDict

# ----------------------------------------------------------------------------------------------------------
# Configuration

_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear"),
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
}
@dataclass
class SchedulerConfig(ConfigDict):
    # Defaults are diffusers DDIMScheduler's (the DDPM paper's linear schedule), so a scheduler_config.json
    # that leaves a key out means what it means to diffusers. The presets below are the real checkpoints.
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"          # "scaled_linear": linear in sqrt(beta), the LDM / SD schedule
    prediction_type: str = "epsilon"       # what the UNet outputs: "epsilon" (noise) or "v_prediction"
    timestep_spacing: str = "leading"      # how n inference steps are picked from the training steps
    steps_offset: int = 0                  # added to "leading" timesteps (SD: 1, so the last step is t = 1)
    set_alpha_to_one: bool = True          # alpha_bar below t = 0: 1 (clean) or alphas_cumprod[0]
    clip_sample: bool = False              # clamping pred_x0 to [-1, 1] is not supported (latents are not in [-1, 1])

    def __post_init__(self):
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"scheduler config: {key}={getattr(self, key)!r} is not supported; "
                                 f"use one of {list(allowed)}")
        if self.clip_sample:
            raise ValueError("scheduler config: clip_sample=True is not supported (it clamps pred_x0 to [-1, 1], "
                             "wrong for latents and breaks exact DDIM inversion); set clip_sample: false")
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ValueError(f"scheduler config: steps_offset={self.steps_offset} must lie in "
                             f"[0, num_train_timesteps={self.num_train_timesteps})")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"scheduler config: need 0 < beta_start <= beta_end < 1, got "
                             f"{self.beta_start} -> {self.beta_end}")

    @classmethod
    def sd15(cls):
        """Stable Diffusion 1.x and RoentGen (their scheduler_config.json)."""
        return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                   timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)

    @classmethod
    def sd21_base(cls):
        """Stable Diffusion 2.1-base (512 px): the SD1 schedule, epsilon (the 768 px SD 2.1 is v_prediction)."""
        return cls.sd15()

    @classmethod
    def monai_cxr(cls):
        """The MONAI CXR LDM: scaled_linear 0.0015 -> 0.0205, v-prediction, no clipping.

        Its bundle builds MONAI's DDIMScheduler with the defaults steps_offset=0, set_alpha_to_one=True.
        MONAI core (>= 1.4) spaces steps as round(linspace(T - 1, 0, n)), i.e. diffusers "linspace", and
        steps to t - T // n like diffusers. (Its float32 linspace rounds a few .5 ties the other way, e.g.
        n = 15 gives 499 where diffusers gives 500; n = 1 gives 999, not 0. The older MONAI GenerativeModels
        package, which trained the model, used "leading" spacing.)
        """
        return cls(beta_start=0.0015, beta_end=0.0205, beta_schedule="scaled_linear",
                   prediction_type="v_prediction", timestep_spacing="linspace", steps_offset=0,
                   set_alpha_to_one=True)



# ----------------------------------------------------------------------------------------------------------
# DDIM scheduler


class DDIMScheduler:
    def __init__(self, config=None):
        self.config = c = config or SchedulerConfig()
        T = c.num_train_timesteps
        if c.beta_schedule == "linear":
            self.betas = torch.linspace(c.beta_start, c.beta_end, T, dtype=torch.float32)
        else:  # "scaled_linear": linear in sqrt(beta), squared (LDM)
            self.betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, T, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)                    # a_t, (T,)
        # a_t "below t = 0": where the last sampling step lands and where inversion starts from.
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self.timesteps = torch.arange(T - 1, -1, -1)   # all training steps until set_timesteps is called

    # --- the inference schedule ---------------------------------------------------------------------------

    def set_timesteps(self, n):
        """Pick n of the training timesteps; `self.timesteps` is a LongTensor, descending (noisy first)."""
        c, T = self.config, self.config.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"set_timesteps: n={n} must lie in [1, num_train_timesteps={T}]")
        # numpy float64, exactly as diffusers computes them, so rounding ties fall the same way
        if c.timestep_spacing == "linspace":     # evenly spread over [0, T - 1], both ends included
            ts = np.linspace(0, T - 1, n).round()[::-1]
        elif c.timestep_spacing == "leading":    # multiples of T // n from 0, then offset (SD: 981, ..., 1)
            ts = np.arange(n)[::-1] * (T // n) + c.steps_offset
        else:                                    # "trailing": from T - 1 down by T / n (..., 19 for n = 50)
            ts = np.round(np.arange(T, 0, -T / n)) - 1
        self.timesteps = torch.from_numpy(ts.astype(np.int64))
        self.num_inference_steps = n

    @property
    def inversion_timesteps(self):
        """The same timesteps in inversion order (ascending), as diffusers' DDIMInverseScheduler gives them."""
        return self.timesteps.flip(0)

    def prev_timestep(self, t):
        """The less noisy timestep one sampling step below t (negative = the clean end); see the file notes."""
        if self.num_inference_steps is None:
            raise RuntimeError("DDIMScheduler: call set_timesteps(n) before stepping")
        return t - self.config.num_train_timesteps // self.num_inference_steps

    # --- sampling and inversion ---------------------------------------------------------------------------

    def step(self, model_output, t, sample, eta=0.0, generator=None, variance_noise=None):
        """One DDIM step from `sample` at timestep t to the previous (less noisy) timestep, DDIM eq. 12.

        eta = 0 is deterministic DDIM; eta = 1 is DDPM-like ancestral sampling. With eta > 0 the fresh noise
        is `variance_noise` if given, else drawn from `generator`.
        """
        t_prev = self.prev_timestep(t)
        a_t, a_prev = self._alpha_bar(t, sample), self._alpha_bar(t_prev, sample)
        x, out = self._upcast(sample), self._upcast(model_output)
        pred_x0, eps = self._pred_x0_eps(out, x, a_t)
        # sigma_t(eta), DDIM eq. 16: the std of the fresh noise added at this step
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("DDIMScheduler.step: pass generator or variance_noise, not both")
            if variance_noise is None:
                device = generator.device if generator is not None else model_output.device
                variance_noise = torch.randn(model_output.shape, generator=generator, device=device,
                                             dtype=model_output.dtype)
            x_prev = x_prev + sigma * self._upcast(variance_noise.to(sample.device))
        return x_prev.to(sample.dtype)

    def invert_step(self, model_output, t, sample):
        """One DDIM inversion step (clean -> noisy): `sample` sits one step below t (at prev_timestep(t), or
        the clean end for the smallest t) and model_output = unet(sample, t); returns the sample at t.

        The eta = 0 step read backwards: recover pred_x0 and eps at the lower level, re-noise them to level t.
        Equal to diffusers' DDIMInverseScheduler.step (its "initial_alpha_cumprod" is our clean-end alpha).
        """
        a_from, a_t = self._alpha_bar(self.prev_timestep(t), sample), self._alpha_bar(t, sample)
        x, out = self._upcast(sample), self._upcast(model_output)
        pred_x0, eps = self._pred_x0_eps(out, x, a_from)
        x_t = a_t ** 0.5 * pred_x0 + (1 - a_t) ** 0.5 * eps
        return x_t.to(sample.dtype)

    # --- forward process and training targets -------------------------------------------------------------

    def add_noise(self, x0, noise, t):
        """Sample q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise. t: int, or LongTensor (B,) per sample."""
        a = self._alpha_bar(t, x0)
        return (a ** 0.5 * self._upcast(x0) + (1 - a) ** 0.5 * self._upcast(noise)).to(x0.dtype)

    def get_velocity(self, x0, noise, t):
        """The v-prediction target v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
        a = self._alpha_bar(t, x0)
        return (a ** 0.5 * self._upcast(noise) - (1 - a) ** 0.5 * self._upcast(x0)).to(x0.dtype)

    def training_target(self, x0, noise, t):
        """What the UNet is trained to output for x_t = add_noise(x0, noise, t): eps or v."""
        if self.config.prediction_type == "epsilon":
            return noise
        return self.get_velocity(x0, noise, t)

    def pred_x0(self, model_output, t, sample):
        """The model's estimate of the clean sample from `sample` at timestep t."""
        x0, _ = self._pred_x0_eps(self._upcast(model_output), self._upcast(sample), self._alpha_bar(t, sample))
        return x0.to(sample.dtype)

    def pred_eps(self, model_output, t, sample):
        """The model's estimate of the noise in `sample` at timestep t."""
        _, eps = self._pred_x0_eps(self._upcast(model_output), self._upcast(sample), self._alpha_bar(t, sample))
        return eps.to(sample.dtype)

    # --- helpers --------------------------------------------------------------------------------------------

    def _pred_x0_eps(self, out, x, a):
        """(pred_x0, eps) from the model output at a sample x whose alpha_bar is a."""
        if self.config.prediction_type == "epsilon":
            return (x - (1 - a) ** 0.5 * out) / a ** 0.5, out
        # v = sqrt(a) eps - sqrt(1 - a) x0 and x = sqrt(a) x0 + sqrt(1 - a) eps, solved for x0 and eps
        return a ** 0.5 * x - (1 - a) ** 0.5 * out, a ** 0.5 * out + (1 - a) ** 0.5 * x

    def _alpha_bar(self, t, like):
        """a_t in float32 (or like's float64) at timestep(s) t (t < 0: the clean end), shaped to broadcast
        against `like` (B, ...): a 0-d tensor for a scalar t, (B, 1, ..., 1) for t of shape (B,)."""
        T = self.config.num_train_timesteps
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.dim() > 1 or (t.dim() == 1 and len(t) not in (1, len(like))):
            raise ValueError(f"scheduler: t must be an int or an integer tensor (B,), got {t.dtype} "
                             f"{tuple(t.shape)} for a batch of {len(like)}")
        t = t.to("cpu", torch.long)
        if (t >= T).any():
            raise ValueError(f"scheduler: timestep {t.max().item()} >= num_train_timesteps={T}")
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], self.final_alpha_cumprod)
        if t.dim() == 1:
            a = a.view(-1, *[1] * (like.dim() - 1))
        return a.to(like.device, self._compute_dtype(like))

    @staticmethod
    def _compute_dtype(x):
        return torch.promote_types(x.dtype, torch.float32)   # fp16/bf16 -> float32; float64 stays

    def _upcast(self, x):
        return x.to(self._compute_dtype(x))
