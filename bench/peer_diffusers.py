"""The PyTorch peer: diffusers `UNet2DModel` (google/ddpm-cifar10-32's config), run as a user would.

    python -m bench.peer_diffusers --mode=train --precision=tf32 --batch=128
    python -m bench.peer_diffusers --mode=train --precision=bf16 [--compile]
    python -m bench.peer_diffusers --mode=sample --method=ddpm --batch=256 --precision=bf16
    python -m bench.peer_diffusers --mode=sample --method=ddpm,ddim --steps=50 --batch=256

Needs only torch and diffusers (no JAX, no ddpm_jax), so it runs in the same session,
on the same device, with the same settings as `bench.train_throughput` /
`bench.sample_speed`, and every result is a ratio measured side by side.

Training step (the paper's, as ddpm_jax's): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with
t ~ U{0..999}, MSE(eps_theta(x_t, t), eps), Adam(2e-4, linear warmup over 5000 steps),
global-norm clipping at 1.0, EMA 0.9999 (`torch._foreach_lerp_`, as torch's own
AveragedModel), dropout 0.1. Data: random batches already on the device (no input
pipeline: compare with ddpm_jax's `train_step` record, the same conditions).
Precisions: fp32 (no TF32), tf32 (TF32 matmuls and convolutions), bf16 (autocast bf16
with TF32 for what stays float32); `--compile` wraps the model in `torch.compile`.
Sampling: the DDPMPipeline loop (DDPMScheduler, fixed_large variance, clipping) or
DDIMScheduler with `--steps` (eta 0, leading spacing), under `torch.no_grad()`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common

# config.json of google/ddpm-cifar10-32 (the released DDPM CIFAR-10 port).
CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, act_fn="silu",
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, center_input_sample=False,
    time_embedding_type="positional", mid_block_scale_factor=1,
)
MODELS = {
    "cifar10": dict(CIFAR10, dropout=0.1),
    # google/ddpm-church-256 (celebahq / bedroom / cat likewise): 6 levels, attention at 16x16.
    "church256": dict(CIFAR10, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                      down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, dropout=0.0),
    # For tests: two levels at 8x8, attention at 4x4.
    "tiny": dict(CIFAR10, sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), dropout=0.0),
}
PRECISIONS = ("fp32", "tf32", "bf16")
T = 1000


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="train", choices=("train", "sample"))
    p.add_argument("--model", default="cifar10", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=0, help="0: 128 (train) or 256 (sample)")
    p.add_argument("--precision", default="tf32", choices=PRECISIONS)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps_per_window", type=int, default=20)
    p.add_argument("--method", default="ddpm", help="ddpm, ddim, or a comma list of them")
    p.add_argument("--steps", type=int, default=0, help="ddim steps (0: 50)")
    p.add_argument("--runs", type=int, default=3, help="timed sampling runs after a warm-up run")
    p.add_argument("--timesteps", type=int, default=T, help="T of the linear schedule (1000: the paper)")
    p.add_argument("--peak_flops", type=float, default=0.0)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    args.batch = args.batch or (128 if args.mode == "train" else 256)
    common.check_positive(windows=args.windows, steps_per_window=args.steps_per_window, runs=args.runs,
                          timesteps=args.timesteps)
    args.methods = common.sampling_methods(args.method, args.steps)
    return args


def setup(args):
    """(torch, device, model) with the precision switches set."""
    import torch
    import diffusers

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    tf32 = args.precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**MODELS[args.model]).to(device)
    with torch.no_grad():  # no all-zero layers (the same perturbation as bench.sample_speed)
        for p in model.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch, diffusers, device, model


def env(torch, diffusers, device) -> dict:
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(
        device=dict(platform="gpu" if device.type == "cuda" else "cpu", kind=kind, count=1),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      diffusers=diffusers.__version__, cuda=torch.version.cuda),
        host=common.host_info(), time=common.utc_now(), torch_threads=torch.get_num_threads(),
    )


def autocast(torch, device, precision):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure_train(args) -> dict:
    torch, diffusers, device, model = setup(args)
    import torch.nn.functional as F

    cfg = MODELS[args.model]
    size, ch = cfg["sample_size"], cfg["in_channels"]
    betas = torch.linspace(1e-4, 0.02, args.timesteps, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float().to(device)
    params = [p for p in model.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=2e-4)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(k / 5000, 1.0))
    net = torch.compile(model) if args.compile else model
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    data = [(torch.rand(args.batch, ch, size, size, generator=gen, device=device) * 2 - 1)
            .contiguous(memory_format=fmt) for _ in range(4)]
    model.train()
    state = {"loss": None}

    def step(i):
        x0 = data[i % len(data)]
        t = torch.randint(0, args.timesteps, (args.batch,), device=device)
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast(torch, device, args.precision):
            eps = net(x_t, t).sample
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warm.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.9999)
        state["loss"] = loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    step(0)  # the first step: cuDNN autotuning, torch.compile
    sync()
    first_s = time.perf_counter() - start
    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = common.run_windows(step, sync, windows=args.windows, steps_per_window=args.steps_per_window,
                               clock=time.perf_counter)
    steps_per_sec = args.steps_per_window / common.median(times)
    images_per_sec = steps_per_sec * args.batch
    paper = common.PAPER_TRAIN_FLOPS_PER_IMAGE if args.model == "cifar10" else None
    peak, peak_source = common.peak_flops(env(torch, diffusers, device)["device"]["kind"], args.peak_flops)
    return dict(
        impl="diffusers", bench="peer_train", **env(torch, diffusers, device), tag=args.tag,
        model=dict(name=f"UNet2DModel:{args.model}", num_params=sum(p.numel() for p in params),
                   **{k: v for k, v in MODELS[args.model].items() if k in ("block_out_channels", "dropout")}),
        data="device-resident random batches (no input pipeline)", batch=args.batch,
        image_shape=[size, size, ch], precision=args.precision, compile=args.compile,
        channels_last=args.channels_last, first_step_s=first_s,
        windows_s=[round(t, 4) for t in times], window_steps=args.steps_per_window, warmup_steps=args.warmup,
        steps_per_sec=steps_per_sec, images_per_sec=images_per_sec, step_ms=1e3 / steps_per_sec,
        window_spread=common.spread(times), paper_flops_per_image=paper, peak_flops_per_device=peak,
        peak_source=peak_source, mfu_paper=common.mfu(paper, images_per_sec, peak, 1),
        last_loss=float(state["loss"].detach()), all_finite=bool(torch.isfinite(state["loss"].detach())),
        memory=_cuda_memory(torch, device),
    )


def measure_sample(args) -> list[dict]:
    torch, diffusers, device, model = setup(args)
    model.eval()
    net = torch.compile(model) if args.compile else model
    return [_sample_one(args, torch, diffusers, device, net, method) for method in args.methods]


def _sample_one(args, torch, diffusers, device, net, method: str) -> dict:
    cfg = MODELS[args.model]
    size, ch = cfg["sample_size"], cfg["in_channels"]
    kw = dict(num_train_timesteps=args.timesteps, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=True)
    if method == "ddpm":
        scheduler = diffusers.DDPMScheduler(variance_type="fixed_large", **kw)
        steps = args.timesteps
    else:
        scheduler = diffusers.DDIMScheduler(**kw)
        steps = args.steps or 50
    scheduler.set_timesteps(steps)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def run():
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.batch, ch, size, size, generator=gen, device=device).contiguous(memory_format=fmt)
        for t in scheduler.timesteps:
            with autocast(torch, device, args.precision):
                eps = net(x, t).sample
            if method == "ddpm":
                x = scheduler.step(eps.float(), t, x, generator=gen).prev_sample
            else:
                x = scheduler.step(eps.float(), t, x, eta=0.0).prev_sample
        sync()
        return x

    start = time.perf_counter()
    run()
    first_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, x = [], None
    for _ in range(args.runs):
        start = time.perf_counter()
        x = run()
        times.append(time.perf_counter() - start)
    median_s = common.median(times)
    paper = common.PAPER_FORWARD_FLOPS_PER_IMAGE if args.model == "cifar10" else None
    e = env(torch, diffusers, device)
    peak, peak_source = common.peak_flops(e["device"]["kind"], args.peak_flops)
    images_per_sec = args.batch / median_s
    return dict(
        impl="diffusers", bench="peer_sample", **e, tag=args.tag,
        model=dict(name=f"UNet2DModel:{args.model}"), method=method, num_steps=steps,
        batch=args.batch, image_shape=[size, size, ch], precision=args.precision, compile=args.compile,
        channels_last=args.channels_last, first_call_s=first_s, compile_s=max(first_s - median_s, 0.0),
        runs_s=[round(s, 4) for s in times], median_s=median_s, images_per_sec=images_per_sec,
        ms_per_step=1e3 * median_s / steps, run_spread=common.spread(times),
        paper_forward_flops_per_image=paper, peak_flops_per_device=peak, peak_source=peak_source,
        mfu_paper=common.mfu(paper and paper * steps, images_per_sec, peak, 1),
        all_finite=bool(torch.isfinite(x).all()), sample_range=[float(x.min()), float(x.max())],
        memory=_cuda_memory(torch, device),
    )


def _cuda_memory(torch, device) -> dict | None:
    if device.type != "cuda":
        return None
    return dict(peak_bytes_in_use=int(torch.cuda.max_memory_allocated(device)),
                bytes_limit=int(torch.cuda.get_device_properties(device).total_memory))


def main(argv=None) -> list[dict]:
    return common.run_cli(lambda args: measure(parse_args(args)), argv)


def measure(args) -> list[dict]:
    records = [measure_train(args)] if args.mode == "train" else measure_sample(args)
    return [common.emit(r) for r in records]


if __name__ == "__main__":
    main()
