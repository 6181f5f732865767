"""Run every benchmark (each in a fresh process) and write one Markdown table with the ratios and the goals.

  python benchmarks/run_all.py                          # quick CPU plan: MONAI-size UNet, small heatmap/tuning
  python benchmarks/run_all.py --plan full --device cuda --dtypes fp32,bf16 --out benchmarks/device_check.md
Plans:
  quick: unet_forward --size monai; heatmap and tuning_step --size small; ground --size phantom; tokenizer.
         (CPU, minutes)
  full:  unet_forward --size both; heatmap and tuning_step at monai and sd15 size (512x512 images), against the
         straightforward / naive procedures in fp32, throughput only (batch 1 and --batch) in the other dtypes;
         ground (ground.py's work per image against its UNet-pass floor) at monai size, batch 1 and --batch, fp32.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plan(args):
    """[(name, script, flags)] for the chosen plan; every flag list gets --device/--dtype/--json added."""
    q = args.plan == "quick"
    jobs = []
    for dtype in args.dtypes:
        first = dtype == args.dtypes[0]
        common = ["--device", args.device, "--dtype", dtype] + (["--threads", str(args.threads)] if args.threads else [])
        if args.compile:
            common.append("--compile")
        if not args.skip_unet:
            size = "monai" if q else "both"
            runs = ["--runs", "3", "--warmup", "1"] if q else ["--runs", "10", "--warmup", "2"]
            jobs.append((f"unet_{dtype}", "unet_forward.py", ["--size", size] + runs + common))
        for size in (["small"] if q else ["monai", "sd15"]):
            if first:   # against the straightforward / naive procedures
                jobs.append((f"heatmap_{size}_{dtype}", "heatmap.py", ["--size", size, "--runs", "3" if q else "2"] + common))
                jobs.append((f"tuning_{size}_{dtype}", "tuning_step.py", ["--size", size, "--runs", "3"] + common))
            if not q:   # throughput of the fast path alone
                jobs.append((f"heatmap_{size}_{dtype}_b{args.batch}", "heatmap.py",
                             ["--size", size, "--runs", "3", "--batch", str(args.batch), "--skip-straightforward"] + common))
                if not first:
                    jobs.append((f"tuning_{size}_{dtype}_only", "tuning_step.py",
                                 ["--size", size, "--runs", "5", "--skip-naive"] + common))
    fp32 = ["--device", args.device, "--dtype", "fp32"] + (["--threads", str(args.threads)] if args.threads else [])
    if q:   # ground.py: seconds per image and the ratio to its UNet-pass floor (fp32 only)
        jobs.append(("ground_phantom", "ground.py", ["--size", "phantom", "--runs", "3"] + fp32))
    else:
        jobs += [(f"ground_monai_b{b}", "ground.py", ["--size", "monai", "--runs", "3", "--batch", str(b)] + fp32)
                 for b in sorted({1, args.batch})]
    if not args.skip_tokenizer:
        jobs.append(("tokenizer", "tokenizer.py", ["--runs", "3"] + (["--threads", str(args.threads)] if args.threads else [])))
    return jobs


def run_jobs(jobs, tmp, timeout):
    results, logs = [], []
    for name, script, flags in jobs:
        path = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / script), *flags, "--json", str(path)]
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            out, ok = res.stdout + res.stderr, res.returncode == 0
        except subprocess.TimeoutExpired as e:
            out, ok = f"{(e.stdout or b'')!r}\nTIMEOUT after {timeout} s", False
        print(out.strip(), flush=True)
        logs.append((" ".join(["python", f"benchmarks/{script}", *flags]), out.strip(), time.time() - t0))
        if ok and path.exists():
            results += json.loads(path.read_text())["rows"]
        else:
            results.append({"benchmark": name, "error": out.strip().splitlines()[-1] if out.strip() else "failed"})
    return results, logs


def table(rows):
    """Markdown table: one line per measured comparison."""
    lines = ["| benchmark | setting | ours | reference / baseline | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r.get("benchmark", "unet_forward")
        if "error" in r:
            lines.append(f"| {b} | FAILED: {r['error'][:120]} | | | | | |")
        elif "mode" in r:                                           # unet_forward rows
            mem = (f"; peak mem {r['ours_mem'] / 2**20:.0f} vs {r['ref_mem'] / 2**20:.0f} MiB "
                   f"(ratio {r['mem_ratio']:.2f})") if "ours_mem" in r else ""
            ref = "diffusers" if r["size"] == "sd15" else "MONAI"
            goal = "<= 1.0" if r["size"] == "sd15" and r["mode"] == "fwd" else "(none)"
            met = ("yes" if r["time_ratio"] <= 1.0 else "NO") if goal != "(none)" else ""
            lines.append(f"| UNet {r['mode']} | {r['size']}, {r['dtype']}, {r['runs']} runs{mem} | {r['ours_s']:.3f} s | "
                         f"{ref} {r['ref_s']:.3f} s | {r['time_ratio']:.2f} (time) | {goal} | {met} |")
        elif b == "heatmap":
            s = f"{r['size']}, {r['dtype']}, {r['steps']} steps, batch {r['batch']}"
            if "speedup" in r:
                met = "yes" if r["speedup"] >= 2.5 and r["max_abs_diff"] <= 1e-5 else "NO"
                lines.append(f"| heatmap per image | {s}; max abs diff {r['max_abs_diff']:.1e}; recorded numbers "
                             f"{r['fast_store_numel']:,} vs {r['slow_store_numel']:,} ({r['memory_ratio']:.0f}x less) | "
                             f"{r['fast_s_per_image']:.3f} s | straightforward {r['slow_s_per_image']:.3f} s | "
                             f"{r['speedup']:.2f}x faster | >= 2.5x, diff <= 1e-5 | {met} |")
            else:
                lines.append(f"| heatmap throughput | {s} | {r['images_per_s']:.2f} images/s | | | | |")
        elif b == "tuning_step":
            s = f"{r['size']}, {r['dtype']}, {r['timesteps']} timesteps"
            if "speedup" in r:
                met = "yes" if r["speedup"] >= 1.5 and r["grad_rel_diff"] <= 1e-4 else "NO"
                lines.append(f"| prompt-tuning step | {s}; grad rel diff {r['grad_rel_diff']:.1e} | {r['ours_s']:.3f} s "
                             f"({r['steps_per_s']:.2f} steps/s) | naive {r['naive_s']:.3f} s | {r['speedup']:.2f}x faster | "
                             f">= 1.5x | {met} |")
            else:
                lines.append(f"| tuning throughput | {s} | {r['steps_per_s']:.2f} steps/s | | | | |")
        elif b == "ground":
            met = "yes" if r["ratio"] <= 1.15 else "NO"
            top = max((k for k in r["profile_s_per_image"] if not k.startswith("unet")),
                      key=lambda k: r["profile_s_per_image"][k])
            lines.append(f"| ground.py per image | {r['size']}, {r['device']}, {r['steps']} steps, batch {r['batch']}; "
                         f"floor = {r['n_uncond']} unconditional + {r['n_cond']} conditional passes (x{r['V']}); "
                         f"largest non-UNet part: {top} {r['profile_s_per_image'][top]:.3f} s | "
                         f"{r['s_per_image']:.3f} s | UNet floor {r['floor_s_per_image']:.3f} s | {r['ratio']:.2f} "
                         f"(time) | <= 1.15 | {met} |")
        elif b == "tokenizer":
            lines.append(f"| tokenizer | {r['prompts']} prompts, {r['vocab']}; ids equal: {r['ids_equal']} | "
                         f"{r['ours_cold_prompts_per_s']:,.0f} prompts/s cold, {r['ours_warm_prompts_per_s']:,.0f} warm | "
                         f"transformers {r['transformers_prompts_per_s']:,.0f} prompts/s | {r['cold_ratio']:.2f} cold, "
                         f"{r['warm_ratio']:.2f} warm (time) | (none) | |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", choices=("quick", "full"), default="quick")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtypes", default="fp32", help="comma list; the first one is also compared with the baselines")
    p.add_argument("--batch", type=int, default=8, help="images per call for the full plan's throughput rows")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets")
    p.add_argument("--skip-unet", action="store_true")
    p.add_argument("--skip-tokenizer", action="store_true")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark process")
    p.add_argument("--out", default=None, help="Markdown file to write (default: print only)")
    args = p.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    with tempfile.TemporaryDirectory() as tmp:
        rows, logs = run_jobs(plan(args), tmp, args.timeout)
    md = [f"# Benchmarks ({args.plan} plan, {args.device}, dtypes {', '.join(args.dtypes)})", "",
          "Ratios are ours / reference for times (< 1 = faster) and baseline / ours for speed-ups.", "",
          table(rows), "", "## Commands and output", ""]
    for cmd, out, secs in logs:
        md += [f"`{cmd}` ({secs:.0f} s)", "", "```", out, "```", ""]
    text = "\n".join(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(table(rows))
    return rows


if __name__ == "__main__":
    main()
