"""What the paper's Table 1 costs at the MONAI CXR LDM's full size: UNet passes, FLOPs and memory, COUNTED (not
timed), then turned into time from a measured CPU pass and into a projected GPU time.

    python benchmarks/table1_budget.py                         # the defaults below; about 10 s on a CPU
    python benchmarks/table1_budget.py --cpu-forward-s 2.231 --gpu-tflops 989 --util 0.5 0.25 --kernel-us 5 20

The pass counts come from the code's own schedules (grounding/heatmap.py: the 100-step trailing DDIM schedule, the
training window [400, 700) and the test window [400, 600)); FLOPs and the bytes autograd keeps for backward from
running the real modules on fake tensors (torch FakeTensorMode: shapes and dtypes, no data) under torch's
FlopCounterMode (a multiply-add = 2 FLOPs) and a saved-tensors hook. docs/real_data.md explains the protocol and
how to read the projection; the projection is NOT a measurement (benchmarks/device_check.sh measures on a GPU).
"""
import argparse
import math
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not benchmarks/ (no shadowing)

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ldm.schedulers import DDIMScheduler, SchedulerConfig  # noqa: E402
from ldm.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from ldm.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from ldm.vae import AutoencoderKL, VAEConfig  # noqa: E402
from grounding.attention_store import AttentionStore  # noqa: E402
from grounding.heatmap import (LAYER_PRESETS, TEST_WINDOW, TRAIN_WINDOW, HeatmapConfig,  # noqa: E402
                               inversion_scheduler, window_timesteps)

# the paper's protocol (docs/paper.md sections 5 and 8; configs/mimic_monai.yaml)
N_TUNE = 6480               # tuning samples, one pass, batch 1 (max_steps)
N_MSCXR, N_VINDR = 1043, 443  # Table 1's evaluation pairs
VAL_EVERY, VAL_PAIRS = 500, 24
CHUNK = 32                  # train.py's up-front inversion: images per call
STOP = max(max(LAYER_PRESETS[("monai_cxr", "tuning")]), max(LAYER_PRESETS[("monai_cxr", "baseline")]))  # 7: both presets


def schedule_counts():
    """(T training timesteps, inversion passes to reach the training window's end, recorded test steps, inversion
    passes to the test window's end): the inversion runs one UNet pass per step below the window's last step."""
    sched = inversion_scheduler(DDIMScheduler(SchedulerConfig.monai_cxr()), HeatmapConfig(num_steps=100))
    inv = sched.inversion_timesteps.tolist()
    train, test = window_timesteps(sched, *TRAIN_WINDOW), window_timesteps(sched, *TEST_WINDOW)
    below = lambda ts: sum(t < int(ts.max()) for t in inv)
    return len(train), below(train), len(test), below(test)


class Kernels(TorchDispatchMode):
    """Counts the aten ops that launch work (views and metadata queries do not): in eager mode each costs a fixed
    launch and dispatch overhead however small its tensors, which bounds a batch-1 pass from below."""
    FREE = {"device", "_unsafe_view", "detach", "alias", "lift_fresh", "size", "stride", "dim"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view and func.__name__.split(".")[0] not in self.FREE
        return func(*args, **(kwargs or {}))


def count(fn):
    """(FLOPs, kernels, bytes autograd saves for backward, parameters excluded) of fn() on fake tensors."""
    saved = []

    def pack(x):
        if not isinstance(x, torch.nn.Parameter) and not isinstance(x._base, torch.nn.Parameter):
            saved.append(x.numel() * x.element_size())
        return x
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x)
    with FlopCounterMode(display=False) as fc, Kernels() as k, hooks:
        fn()
    return fc.get_total_flops(), k.n, sum(saved)


def measure(T):
    """{pass: (FLOPs per image, kernels per call)}, the tuning step's saved bytes {fp32, bf16}, parameter counts."""
    stores = [AttentionStore(LAYER_PRESETS[("monai_cxr", "tuning")], None, keep_grad=True) for _ in range(2)]
    with FakeTensorMode(allow_non_fake_inputs=True):   # real modules, fake tensors: nothing is computed
        unet = UNet2DConditionModel(UNetConfig.monai_cxr()).requires_grad_(False)
        text = TextEncoder(TextEncoderConfig.sd21()).requires_grad_(False)
        vae = AutoencoderKL(VAEConfig.monai_cxr()).requires_grad_(False)
        params = {n: sum(p.numel() for p in m.parameters()) for n, m in (("unet", unet), ("text", text), ("vae", vae))}
        z, c, t = torch.empty(1, 3, 64, 64), torch.empty(1, 77, 1024), torch.tensor([500])
        with torch.autocast("cpu", dtype=torch.bfloat16):   # as configs/mimic_monai.yaml runs: its casts are kernels
            passes = {"full": count(lambda: unet(z, t, c))[:2],
                      "stop": count(lambda: unet(z, t, c, stop_after=STOP))[:2],
                      "vae": count(lambda: vae.encode(torch.empty(1, 1, 512, 512)))[:2]}
        saved = {}
        for amp, store in zip((False, True), stores):
            def step():  # grounding/tuning.py: the prompt's context with its graph, T timesteps in one UNet call
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    context = text(embeds=torch.empty(1, 77, 1024, requires_grad=True))
                    unet(torch.empty(T, 3, 64, 64), torch.full((T,), 500), context.expand(T, -1, -1), store=store,
                         stop_after=STOP)
                sum(m.float().sum() for m in store.records.values()).backward()
            flops, kernels, saved["bf16" if amp else "fp32"] = count(step)
            passes["step"] = (flops, kernels)   # one call, already at batch T
    return passes, saved, params


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-forward-s", type=float, default=2.231, help="measured seconds of one full MONAI-size UNet "
                   "forward, fp32, 1 thread (docs/benchmarks.md)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="GPU dense bf16 peak, TFLOP/s (H100 SXM: 989)")
    p.add_argument("--util", type=float, nargs=2, default=(0.5, 0.25), help="assumed share of that peak a pass "
                   "reaches when compute-bound: optimistic, pessimistic")
    p.add_argument("--kernel-us", type=float, nargs=2, default=(5.0, 20.0), help="assumed eager launch + dispatch "
                   "microseconds per kernel: optimistic, pessimistic")
    p.add_argument("--batch", type=int, default=16, help="images inverted together in evaluation (eval_batch, --batch)")
    args = p.parse_args()
    T, inv_train, n_cond, inv_test = schedule_counts()
    passes, saved, params = measure(T)
    G = 1e9
    print(f"parameters: UNet {params['unet']:,}, text encoder {params['text']:,}, VAE {params['vae']:,} "
          f"({sum(params.values()) * 4 / 2**30:.2f} GiB in fp32)")
    print(f"schedule: T = {T} training timesteps, {inv_train} inversion passes to reach them; {n_cond} recorded "
          f"test steps, {inv_test} inversion passes to reach them")
    for name, what in (("full", "UNet, whole"), ("stop", f"UNet to layer {STOP}"), ("vae", "VAE encode 512x512"),
                       ("step", f"tuning step: text encoder + UNet to layer {STOP} at batch {T}, forward + backward")):
        print(f"{what}: {passes[name][0] / G:,.1f} GFLOP and {passes[name][1]} kernels per call"
              + ("" if name == "step" else " at batch 1"))
    print(f"tuning step, saved for backward: {saved['fp32'] / 2**30:.2f} GiB fp32, {saved['bf16'] / 2**30:.2f} GiB "
          "under bf16 autocast")

    def seconds(name, batch, flop_rate, kernel_s):
        """One call: compute-bound or launch-bound, whichever is slower."""
        flops, kernels = passes[name]
        return max(flops * batch / flop_rate, kernels * kernel_s)

    def evaluation(pairs, models, rate, ks):   # one inversion per image batch serves every model's prompts
        batches = math.ceil(pairs / args.batch)
        return batches * (seconds("vae", args.batch, rate, ks) + inv_test * seconds("full", args.batch, rate, ks)
                          + n_cond * seconds("stop", args.batch * models, rate, ks))

    def pair_flops(models):   # one image of an evaluation: encode, invert to the window's end, each model's prompt
        return passes["vae"][0] + inv_test * passes["full"][0] + n_cond * models * passes["stop"][0]

    cache_mb = N_TUNE * T * 3 * 64 * 64 * 4 / 2**20    # train.py's latent cache: every sample's T latents, fp32
    parts = [  # (what, FLOPs, seconds(flop_rate, kernel_s)); the first two are alternatives (the total takes the first)
        (f"tuning: {N_TUNE:,} steps, batch 1 (each inverts its image: {inv_train} passes)",
         N_TUNE * (passes["vae"][0] + inv_train * passes["full"][0] + passes["step"][0]),
         lambda r, ks: N_TUNE * (seconds("vae", 1, r, ks) + inv_train * seconds("full", 1, r, ks)
                                 + seconds("step", 1, r, ks))),
        (f"... the same with latent_cache_mb >= {cache_mb:,.0f}: inverted up front, {CHUNK} images a call",
         N_TUNE * (passes["vae"][0] + inv_train * passes["full"][0] + passes["step"][0]),
         lambda r, ks: N_TUNE / CHUNK * (seconds("vae", CHUNK, r, ks) + inv_train * seconds("full", CHUNK, r, ks))
         + N_TUNE * seconds("step", 1, r, ks)),
        (f"validation while tuning: {N_TUNE // VAL_EVERY} x {VAL_PAIRS} pairs, tuned rows",
         N_TUNE // VAL_EVERY * VAL_PAIRS * pair_flops(1),
         lambda r, ks: N_TUNE // VAL_EVERY * evaluation(VAL_PAIRS, 1, r, ks)),
        (f"train.py's end table: {N_MSCXR:,} pairs, frozen + untuned + tuned and (at most) their swapped prompts",
         N_MSCXR * pair_flops(6),
         lambda r, ks: evaluation(N_MSCXR, 6, r, ks)),
        (f"evaluate.py: {N_MSCXR:,} MS-CXR-loc + {N_VINDR} VinDr-CXR pairs, frozen + tuned",
         (N_MSCXR + N_VINDR) * pair_flops(2),
         lambda r, ks: evaluation(N_MSCXR, 2, r, ks) + evaluation(N_VINDR, 2, r, ks))]
    cpu = passes["full"][0] / args.cpu_forward_s    # FLOP/s of the measured CPU pass
    fast = (args.gpu_tflops * 1e12 * args.util[0], args.kernel_us[0] * 1e-6)
    slow = (args.gpu_tflops * 1e12 * args.util[1], args.kernel_us[1] * 1e-6)
    print(f"\n| part | PFLOP | CPU, 1 thread fp32 ({cpu / G:.0f} GFLOP/s, measured) | GPU, projected |")
    print("|---|---|---|---|")
    total = [0.0, 0.0, 0.0, 0.0]
    for i, (what, flops, sec) in enumerate(parts):
        row = [flops, flops / cpu, sec(*fast), sec(*slow)]
        total = [a + b * (i != 1) for a, b in zip(total, row)]
        print(f"| {what} | {row[0] / 1e15:.1f} | {row[1] / 3600:,.0f} h | {row[2] / 60:,.1f}-{row[3] / 60:,.1f} min |")
    print(f"| all of Table 1 | {total[0] / 1e15:.1f} | {total[1] / 3600:,.0f} h ({total[1] / 86400:.0f} days) | "
          f"{total[2] / 3600:.1f}-{total[3] / 3600:.1f} h |")
    print(f"\nGPU projection (not a measurement): each call takes the longer of its FLOPs at {args.gpu_tflops:.0f} "
          f"TFLOP/s x {args.util[0]:.0%}-{args.util[1]:.0%} and its kernels x {args.kernel_us[0]:g}-"
          f"{args.kernel_us[1]:g} us")


if __name__ == "__main__":
    main()
