"""Schedulers: timesteps, DDIM steps (eta 0 and 0.5), DDIM inversion and the DDPM training helpers against
diffusers' DDIMScheduler / DDIMInverseScheduler / DDPMScheduler and MONAI's DDIMScheduler; an exact-model
round trip (inversion then sampling returns the start); configs and bad input."""
import pytest
import torch

from conftest import cmp, need
from ldm.schedulers import DDIMScheduler, SchedulerConfig
from ldm.weights.configs import scheduler_config_from_diffusers

CONFIGS = {
    "sd15_leading_eps": SchedulerConfig.sd15(),
    "monai_linspace_v": SchedulerConfig.monai_cxr(),
    "trailing_v": SchedulerConfig(beta_start=0.0015, beta_end=0.0205, beta_schedule="scaled_linear",
                                  prediction_type="v_prediction", timestep_spacing="trailing",
                                  set_alpha_to_one=False),
    "trailing_eps_linear": SchedulerConfig(timestep_spacing="trailing"),      # diffusers defaults otherwise
    "leading_v_offset": SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        prediction_type="v_prediction", steps_offset=1),
}
STEP_COUNTS = (10, 30, 50, 100)   # 30 does not divide 1000: trailing/linspace gaps are uneven there
SHAPE = (2, 3, 8, 8)


def reference(config):
    return need("diffusers").DDIMScheduler(**config.to_dict())


@pytest.mark.parametrize("name", CONFIGS)
def test_timesteps_identical_to_diffusers(name):
    ours, ref = DDIMScheduler(CONFIGS[name]), reference(CONFIGS[name])
    for n in (1, 7, 10, 15, 27, 30, 50, 99, 100, 333, 1000):
        ours.set_timesteps(n), ref.set_timesteps(n)
        assert ours.timesteps.dtype == torch.long
        assert torch.equal(ours.timesteps, ref.timesteps), f"{name}, n={n}"
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_step_matches_diffusers(name, eta):
    ours, ref = DDIMScheduler(CONFIGS[name]), reference(CONFIGS[name])
    for n in STEP_COUNTS:
        ours.set_timesteps(n), ref.set_timesteps(n)
        got, expected = [], []
        for t in ours.timesteps.tolist():
            sample, out, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
            got.append(ours.step(out, t, sample, eta=eta, variance_noise=noise))
            expected.append(ref.step(out, t, sample, eta=eta, variance_noise=noise).prev_sample)
        assert cmp(f"{name} n={n} eta={eta} step", torch.stack(got), torch.stack(expected), atol=1e-6) <= 1e-6


@pytest.mark.parametrize("name", [k for k, c in CONFIGS.items() if c.timestep_spacing != "linspace"])
def test_invert_step_matches_diffusers_inverse_scheduler(name):
    config = CONFIGS[name]
    ours, ref = DDIMScheduler(config), need("diffusers").DDIMInverseScheduler(**config.to_dict())
    for n in STEP_COUNTS:
        ours.set_timesteps(n), ref.set_timesteps(n)
        assert torch.equal(ours.inversion_timesteps, ref.timesteps), f"{name}, n={n}"
        got, expected = [], []
        for t in ref.timesteps.tolist():   # ascending: the first step starts from the clean end
            sample, out = torch.randn(SHAPE), torch.randn(SHAPE)
            got.append(ours.invert_step(out, t, sample))
            expected.append(ref.step(out, t, sample).prev_sample)
        assert cmp(f"{name} n={n} invert_step", torch.stack(got), torch.stack(expected), atol=1e-6) <= 1e-6


@pytest.mark.parametrize("name", CONFIGS)
def test_training_helpers_match_diffusers_ddpm(name):
    config = CONFIGS[name]
    ddpm_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                 "clip_sample", "timestep_spacing", "steps_offset")
    ddpm = need("diffusers").DDPMScheduler(**{k: v for k, v in config.to_dict().items() if k in ddpm_keys})
    ddim, ours = reference(config), DDIMScheduler(config)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 1, 500, 999])
    for ref in (ddpm, ddim):
        assert cmp(f"{name} add_noise", ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6) <= 1e-6
        v_ref = ref.get_velocity(x0, noise, t)
        assert cmp(f"{name} get_velocity", ours.get_velocity(x0, noise, t), v_ref, atol=1e-6) <= 1e-6
    target = ours.training_target(x0, noise, t)
    assert torch.equal(target, noise if config.prediction_type == "epsilon" else ours.get_velocity(x0, noise, t))
    # An int t means the same timestep for the whole batch.
    assert torch.equal(ours.add_noise(x0, noise, 500), ours.add_noise(x0, noise, torch.full((4,), 500)))


def test_monai_preset_matches_monai_ddim_scheduler():
    schedulers = need("monai.networks.schedulers")
    ref = schedulers.DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015,
                                   beta_end=0.0205, prediction_type="v_prediction", clip_sample=False)
    ours = DDIMScheduler(SchedulerConfig.monai_cxr())
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    for n in (10, 20, 50, 100, 200):
        ours.set_timesteps(n), ref.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps), f"n={n}"
        got, expected = [], []
        for t in ours.timesteps.tolist():
            sample, out = torch.randn(SHAPE), torch.randn(SHAPE)
            got.append(ours.step(out, t, sample))
            expected.append(ref.step(out, t, sample)[0])
        assert cmp(f"monai n={n} step", torch.stack(got), torch.stack(expected), atol=1e-6) <= 1e-6


def exact_model(sched, x0, fallback_eps):
    """The exact denoiser when the data is the single point x0: at a sample x of noise level a it outputs the
    true eps = (x - sqrt(a) x0) / sqrt(1 - a) (or the matching v). `level` is the timestep whose noise level
    x has (negative = the clean end, where eps is undefined if a = 1 and any value is exact)."""
    def model(x, level):
        a = sched.alphas_cumprod[level] if level >= 0 else sched.final_alpha_cumprod
        a = a.to(x.dtype)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt() if a < 1 else fallback_eps
        return eps if sched.config.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    return model


@pytest.mark.parametrize("name", ["sd15_leading_eps", "monai_linspace_v", "trailing_v"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_inversion_then_sampling_round_trip_with_exact_model(name, dtype, tol):
    sched = DDIMScheduler(CONFIGS[name])
    sched.set_timesteps(50)
    x0, eps = torch.randn(SHAPE, dtype=dtype), torch.randn(SHAPE, dtype=dtype)
    a_clean = sched.final_alpha_cumprod.to(dtype)
    start = a_clean.sqrt() * x0 + (1 - a_clean).sqrt() * eps   # = x0 when set_alpha_to_one
    model = exact_model(sched, x0, eps)

    z = start
    for t in sched.inversion_timesteps.tolist():   # the model sees the sample at its own noise level
        z = sched.invert_step(model(z, sched.prev_timestep(t)), t, z)
    assert z.dtype == dtype
    # Inversion with the exact model is forward noising of x0 with the start's noise, when every step starts
    # where the previous one landed. With uneven gaps (linspace over 1000 in 50 steps: 20 or 21) diffusers
    # steps to t - 1000 // 50 anyway; we mirror that, so the inverted end then drifts off the forward path.
    ts = sched.timesteps.tolist()
    contiguous = all(sched.prev_timestep(t) == s for t, s in zip(ts, ts[1:]))
    diff = cmp(f"{name} {dtype} inverted vs add_noise", z, sched.add_noise(x0, eps, ts[0]), atol=tol)
    assert (diff <= tol) == contiguous

    for t in sched.timesteps.tolist():
        z = sched.step(model(z, t), t, z)
    assert cmp(f"{name} {dtype} round trip", z, start, atol=tol) <= tol


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pred_x0_and_pred_eps_invert_the_forward_process(prediction_type):
    sched = DDIMScheduler(SchedulerConfig(prediction_type=prediction_type, beta_schedule="scaled_linear",
                                          beta_start=0.0015, beta_end=0.0205))
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([3, 300, 900])
    x_t, target = sched.add_noise(x0, noise, t), sched.training_target(x0, noise, t)
    assert cmp(f"{prediction_type} pred_x0", sched.pred_x0(target, t, x_t), x0, atol=1e-5) <= 1e-5
    assert cmp(f"{prediction_type} pred_eps", sched.pred_eps(target, t, x_t), noise, atol=1e-5) <= 1e-5


def test_per_sample_timesteps_and_dtypes():
    sched = DDIMScheduler(SchedulerConfig.sd15())
    sched.set_timesteps(50)
    sample, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([981, 501, 1])
    batched = sched.step(out, t, sample)
    one_by_one = torch.cat([sched.step(out[i:i + 1], int(t[i]), sample[i:i + 1]) for i in range(3)])
    assert torch.equal(batched, one_by_one)
    batched_inv = sched.invert_step(out, t, sample)
    one_by_one_inv = torch.cat([sched.invert_step(out[i:i + 1], int(t[i]), sample[i:i + 1]) for i in range(3)])
    assert torch.equal(batched_inv, one_by_one_inv)
    # A 0-d LongTensor (what iterating over `timesteps` yields) is the same as the int.
    t0 = sched.timesteps[3]
    assert torch.equal(sched.step(out, t0, sample), sched.step(out, int(t0), sample))
    # Half-precision samples are computed in float32 and returned in their own dtype.
    for dtype in (torch.float16, torch.bfloat16):
        half = sched.step(out.to(dtype), 501, sample.to(dtype))
        assert half.dtype == dtype
        full = sched.step(out.to(dtype).float(), 501, sample.to(dtype).float())
        assert torch.equal(half, full.to(dtype))


def test_eta_noise_from_generator_is_reproducible_and_matches_diffusers():
    config = CONFIGS["trailing_v"]
    ours, ref = DDIMScheduler(config), reference(config)
    ours.set_timesteps(20), ref.set_timesteps(20)
    sample, out = torch.randn(SHAPE), torch.randn(SHAPE)
    got = ours.step(out, 499, sample, eta=1.0, generator=torch.Generator().manual_seed(3))
    expected = ref.step(out, 499, sample, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    assert cmp("eta=1 with generator", got, expected, atol=1e-6) <= 1e-6
    assert not torch.allclose(got, ours.step(out, 499, sample, eta=0.0))


def test_config_presets_round_trip_and_bad_values_are_rejected():
    # SD 1.5's scheduler/scheduler_config.json as shipped (a PNDMScheduler config).
    sd15_json = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                 "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                 "clip_sample": False}
    assert scheduler_config_from_diffusers(sd15_json) == SchedulerConfig.sd15()
    for preset in (SchedulerConfig.sd15(), SchedulerConfig.sd21_base(), SchedulerConfig.monai_cxr()):
        assert SchedulerConfig.from_dict(preset.to_dict()) == preset
    bad = [({"trained_betas": [0.1, 0.2]}, "trained_betas"), ({"thresholding": True}, "thresholding"),
           ({"clip_sample": True}, "clip_sample"), ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
           ({"prediction_type": "sample"}, "prediction_type"), ({"timestep_spacing": "karras"}, "timestep_spacing"),
           ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"), ({"steps_offset": 1000}, "steps_offset")]
    for d, key in bad:
        with pytest.raises(ValueError, match=key):
            scheduler_config_from_diffusers(d)
    with pytest.raises(ValueError, match="unknown keys.*'skip_prk_steps'"):   # our own model.yaml: strict
        SchedulerConfig.from_dict(sd15_json)
    sched = DDIMScheduler(SchedulerConfig.sd15())
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(torch.zeros(1), 1, torch.zeros(1))
    with pytest.raises(ValueError, match="must lie in"):
        sched.set_timesteps(1001)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        sched.add_noise(torch.zeros(1, 1), torch.zeros(1, 1), 1000)
    with pytest.raises(ValueError, match="integer tensor"):
        sched.add_noise(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0.5, 1.0]))
