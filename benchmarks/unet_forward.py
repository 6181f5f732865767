"""UNet forward (and forward + backward): ours vs diffusers (SD1.5 size) and vs MONAI (CXR LDM size).

Same weights in both (the reference's state dict loaded into ours; MONAI's through ldm/weights/monai.py
monai_unet_to_ours), same inputs, timed in alternation; prints the median time and the peak memory of one call,
and the ratio ours / reference (< 1 = we are faster / smaller).

  SD1.5:  latent 4x64x64, batch 1, context 77x768,  diffusers UNet2DConditionModel (AttnProcessor2_0 = SDPA)
  MONAI:  latent 3x64x64, batch 1, context 77x1024, monai DiffusionModelUNet (CXR bundle layout;
          use_flash_attention only on CUDA, where MONAI allows it)

  python benchmarks/unet_forward.py --size both --runs 3            # CPU fp32 (default)
  python benchmarks/unet_forward.py --device cuda --dtype bf16 --runs 20
A full SD1.5 forward takes ~15-20 s on a 2-core CPU; keep --runs small there.
"""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not benchmarks/ (no shadowing)
from benchmarks.common import (alternate, autocast, base_parser, env_line, fmt_mb, fmt_s, median,  # noqa: E402
                               memory_in_subprocess, setup, write_json)

import torch  # noqa: E402

SIZES = ("sd15", "monai")


# ---------------------------------------------------------------------------------------------------------
# models and inputs


def build_reference(size, device="cpu"):
    """The reference UNet at full size with its own random initialisation (eval mode)."""
    torch.manual_seed(0)
    if size == "sd15":
        from diffusers import UNet2DConditionModel as Ref
        ref = Ref(sample_size=64, cross_attention_dim=768)          # every other default is SD1.5's
    else:
        from monai.networks.nets import DiffusionModelUNet
        ref = DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, num_res_blocks=2,
                                 channels=(256, 512, 768), attention_levels=(False, True, True),
                                 num_head_channels=(256, 512, 768), norm_num_groups=32, with_conditioning=True,
                                 cross_attention_dim=1024, use_flash_attention=torch.device(device).type == "cuda")
    with torch.no_grad():           # MONAI zero-initialises its output convs: perturb so outputs are not all 0
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ref.to(device).eval()


def build_ours(size, ref_state=None, device="cpu"):
    """Our UNet; with ref_state, loaded (strict) from the reference's weights."""
    from ldm.unet import UNet2DConditionModel, UNetConfig
    cfg = UNetConfig.sd15() if size == "sd15" else UNetConfig.monai_cxr()
    if ref_state is None:
        torch.manual_seed(0)
        return UNet2DConditionModel(cfg).to(device).eval()
    with torch.device("meta"):                                       # no init work: the weights come next
        ours = UNet2DConditionModel(cfg)
    if size == "monai":
        from ldm.weights.monai import monai_unet_to_ours
        ref_state = monai_unet_to_ours(ref_state)
    ours.load_state_dict(ref_state, strict=True, assign=True)       # shares the reference's tensors
    return ours.to(device).eval()


def inputs(size, device="cpu"):
    g = torch.Generator().manual_seed(1)
    c, d = (4, 768) if size == "sd15" else (3, 1024)
    sample = torch.randn(1, c, 64, 64, generator=g)
    ctx = torch.randn(1, 77, d, generator=g)
    return sample.to(device), torch.tensor([500], device=device), ctx.to(device)


def caller(which, size, model):
    """A uniform call(sample, t, ctx) -> tensor for each implementation."""
    if which == "ours":
        return lambda s, t, c: model(s, t, c)
    if size == "sd15":
        return lambda s, t, c: model(s, t, c, return_dict=False)[0]
    return lambda s, t, c: model(x=s, timesteps=t, context=c)


def make_fn(call, model, args_, mode, amp):
    """Zero-argument callable running one forward (no_grad) or one forward + backward."""
    s, t, c = args_

    def fwd():
        with torch.no_grad(), amp():
            return call(s, t, c)

    def fwd_bwd():
        with amp():
            out = call(s, t, c)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)                          # no gradient memory carried to the next run

    return fwd if mode == "fwd" else fwd_bwd


def build_for_memory(which, size, mode, device="cpu", dtype="fp32", compile=False):
    """For common.memory_in_subprocess: ONE model (random weights) and its call."""
    from benchmarks.common import DTYPES
    model = build_reference(size, device) if which == "ref" else build_ours(size, device=device)
    model = torch.compile(model) if compile else model
    amp = (lambda: torch.autocast(device, dtype=DTYPES[dtype])) if dtype != "fp32" else _null
    return make_fn(caller(which, size, model), model, inputs(size, device), mode, amp)


def _null():
    import contextlib
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------
# the benchmark


def bench_size(size, args, device):
    ref = build_reference(size, device)
    ours = build_ours(size, ref.state_dict(), device)
    x = inputs(size, device)
    models = {"ours": ours, "ref": ref}
    if args.compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    calls = {k: caller(k, size, m) for k, m in models.items()}
    amp = lambda: autocast(args)                                       # noqa: E731
    with torch.no_grad(), amp():                                       # same weights -> same output
        diff = (calls["ours"](*x).float() - calls["ref"](*x).float()).abs().max().item()
    print(f"[{size}] identical weights: max |ours - reference| = {diff:.2e}")
    rows = []
    for mode in args.modes:
        fns = {k: make_fn(calls[k], models[k], x, mode, amp) for k in calls}
        times = alternate(fns, args.runs, args.warmup, device) if args.runs else {k: [] for k in fns}
        row = {"size": size, "mode": mode, "dtype": args.dtype, "ours_s": median(times["ours"]),
               "ref_s": median(times["ref"]), "runs": args.runs, "max_abs_diff": diff}
        row["time_ratio"] = row["ours_s"] / row["ref_s"]
        if args.memory:
            kw = {"size": size, "mode": mode, "device": args.device, "dtype": args.dtype, "compile": args.compile}
            if args.device == "cuda":                                   # in-process peak allocator stats
                from benchmarks.common import measure_call_memory
                mem = {k: measure_call_memory(fns[k], device) for k in fns}
            else:
                mem = {k: memory_in_subprocess("unet_forward", "build_for_memory", {"which": k, **kw})
                       for k in fns}
            row.update(ours_mem=mem["ours"][0], ref_mem=mem["ref"][0],
                       mem_exact=mem["ours"][1] and mem["ref"][1], mem_ratio=mem["ours"][0] / max(mem["ref"][0], 1))
        rows.append(row)
        mem_txt = (f" | peak mem ours {fmt_mb(row['ours_mem'], row['mem_exact'])} ref "
                   f"{fmt_mb(row['ref_mem'], row['mem_exact'])} (ratio {row['mem_ratio']:.2f})") if args.memory else ""
        print(f"[{size}] {mode:6s} ours {fmt_s(row['ours_s'])}  reference {fmt_s(row['ref_s'])}  "
              f"ratio {row['time_ratio']:.2f}{mem_txt}")
    del ref, ours, models, calls
    return rows


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES + ("both",), default="both")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    p.epilog = "--runs 0 measures memory only"
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - {"fwd", "fwdbwd"}:
        p.error(f"--modes: unknown {sorted(set(args.modes) - {'fwd', 'fwdbwd'})}")
    device = setup(args)
    print(env_line(device), f"| dtype {args.dtype} | runs {args.runs} (+{args.warmup} warm-up), alternating")
    rows = []
    for size in (SIZES if args.size == "both" else (args.size,)):
        rows += bench_size(size, args, device)
    write_json(args.json, {"benchmark": "unet_forward", "env": env_line(device), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
