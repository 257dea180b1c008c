"""Markdown tables and side-by-side ratios from benchmark JSON lines.

    python -m bench.report results.jsonl [more.jsonl ...]

Ratios pair records measured on the same device kind, with the same batch and the same
precision class: bf16 (ddpm_jax `model.dtype=bfloat16`, diffusers autocast bf16), tf32
(float32 on a GPU at the default matmul precision, which lets XLA and cuDNN use TF32
tensor cores; diffusers with TF32 on) and fp32 (CPU, or `--matmul_precision=highest`,
or diffusers with TF32 off). Training: ours / peer images per second. Sampling: peer
seconds / ours seconds. Both read "how many times faster ddpm_jax is".
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common

# The targets on one H100/H200 (checked only on GPU records).
TARGET_TRAIN_BF16 = 7500.0  # images/s, batch 128 (aim: 10,000)
TARGET_FP32_OVER_PEER_TF32 = 1.5
TARGET_DDPM_1000_S = 7.0  # 256 images
TARGET_DDIM_50_S = 0.5

TRAIN = ("train_step", "train", "peer_train")
SAMPLE = ("sample", "peer_sample")


def precision_class(r: dict) -> str:
    if r.get("impl") == "diffusers":
        p = r.get("precision", "fp32")
        return "fp32" if r["device"]["platform"] == "cpu" and p == "tf32" else p
    if r.get("dtype") == "bfloat16":
        return "bf16"
    if r["device"]["platform"] == "gpu" and r.get("matmul_precision", "default") in ("default", "tensorfloat32"):
        return "tf32"
    return "fp32"


def switches(r: dict) -> str:
    """The overrides of a ddpm_jax record other than the dtype, or the peer's options."""
    if r.get("impl") == "diffusers":
        return " ".join(s for s, on in (("compile", r.get("compile")), ("channels_last", r.get("channels_last")))
                        if on)
    skip = ("model.dtype=", "training.batch_size=")
    out = [o.split(".", 1)[-1] for o in r.get("overrides", []) if not o.startswith(skip)]
    if r.get("matmul_precision", "default") != "default":
        out.append(f"matmul_precision={r['matmul_precision']}")
    if r.get("prng_impl") not in (None, "threefry2x32"):
        out.append(f"prng_impl={r['prng_impl']}")
    return " ".join(out)


def label(r: dict) -> str:
    who = "ddpm_jax" if r.get("impl") == "ddpm_jax" else "diffusers"
    extra = switches(r)
    return f"{who} {precision_class(r)}" + (f" [{extra}]" if extra else "")


def _model(r: dict) -> str:
    m = r.get("model", {})
    if r.get("impl") == "diffusers":
        return m.get("name", "?").split(":")[-1]
    return os.path.basename(r.get("config", "?")).removesuffix(".py")


def _fmt(x, digits: int = 1, scale: float = 1.0) -> str:
    if x is None:
        return "–"
    return f"{x * scale:,.{digits}f}"


def _mem_gib(r: dict):
    mem = r.get("memory") or {}
    peak = mem.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def train_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("bench") in TRAIN]
    if not rows:
        return []
    out = ["| setup | model | what | device | batch | images/s | steps/s | MFU (XLA) | MFU (37.3 GF) | "
           "peak mem GiB | compile / 1st step s | spread | load |",
           "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        what = {"train_step": "step only", "train": "step + pipeline", "peer_train": "step only"}[r["bench"]]
        first = r.get("compile_s", r.get("first_step_s"))
        load = (r.get("host") or {}).get("loadavg")
        out.append(
            f"| {label(r)} | {_model(r)} | {what} | {r['device']['kind']} | {r['batch']} | "
            f"{_fmt(r['images_per_sec'])} | {_fmt(r['steps_per_sec'], 2)} | {_fmt(r.get('mfu_xla'), 1, 100)}% | "
            f"{_fmt(r.get('mfu_paper'), 1, 100)}% | {_fmt(_mem_gib(r), 2)} | {_fmt(first)} | "
            f"{_fmt(r.get('window_spread'), 0, 100)}% | {load[0] if load else '–'} |")
    return out


def sample_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("bench") in SAMPLE]
    if not rows:
        return []
    out = ["| setup | model | method | steps | device | batch | median s | images/s | ms/step | MFU (XLA) | "
           "compile s | peak mem GiB | load |",
           "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        load = (r.get("host") or {}).get("loadavg")
        out.append(
            f"| {label(r)} | {_model(r)} | {r['method']} | {r['num_steps']} | {r['device']['kind']} | {r['batch']} | "
            f"{_fmt(r['median_s'], 3)} | {_fmt(r['images_per_sec'])} | {_fmt(r['ms_per_step'], 2)} | "
            f"{_fmt(r.get('mfu_xla'), 1, 100)}% | {_fmt(r.get('compile_s'))} | {_fmt(_mem_gib(r), 2)} | "
            f"{load[0] if load else '–'} |")
    return out


def ratios(records: list[dict]) -> list[dict]:
    """Side-by-side ratios (same device kind, batch, precision class; training or sampling)."""
    out = []
    for ours in records:
        if ours.get("impl") != "ddpm_jax":
            continue
        for peer in records:
            if peer.get("impl") != "diffusers" or peer["device"]["kind"] != ours["device"]["kind"]:
                continue
            if peer.get("batch") != ours.get("batch") or precision_class(peer) != precision_class(ours):
                continue
            if ours.get("bench") in ("train_step", "train") and peer.get("bench") == "peer_train" \
                    and ours.get("image_shape") == peer.get("image_shape"):
                out.append(dict(kind=f"train ({ours['bench']})", ours=label(ours), peer=label(peer),
                                ratio=ours["images_per_sec"] / peer["images_per_sec"],
                                device=ours["device"]["kind"], batch=ours["batch"]))
            if ours.get("bench") == "sample" and peer.get("bench") == "peer_sample" \
                    and (ours["method"], ours["num_steps"]) == (peer["method"], peer["num_steps"]) \
                    and ours.get("image_shape") == peer.get("image_shape"):
                out.append(dict(kind=f"sample {ours['method']}-{ours['num_steps']}", ours=label(ours),
                                peer=label(peer), ratio=peer["median_s"] / ours["median_s"],
                                device=ours["device"]["kind"], batch=ours["batch"]))
    return out


def ratio_table(records: list[dict]) -> list[str]:
    rows = ratios(records)
    if not rows:
        return []
    out = ["| measurement | ddpm_jax | diffusers | device | batch | ddpm_jax speed-up |",
           "| --- | --- | --- | --- | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['kind']} | {r['ours']} | {r['peer']} | {r['device']} | {r['batch']} | "
                   f"{r['ratio']:.2f}x |")
    return out


def targets(records: list[dict]) -> list[str]:
    """The issue's GPU targets against the measured GPU records (nothing when none)."""
    gpu = [r for r in records if r.get("device", {}).get("platform") == "gpu" and r.get("impl") == "ddpm_jax"]
    lines = []
    paper = [r for r in gpu if r.get("bench") in ("train", "train_step") and r.get("paper_flops_per_image")
             and r.get("batch") == 128]
    bf16 = [r for r in paper if precision_class(r) == "bf16"]
    if bf16:
        best = max(bf16, key=lambda r: r["images_per_sec"])
        lines.append(f"- training bf16, batch 128: {best['images_per_sec']:,.0f} images/s ({label(best)}, "
                     f"{best['bench']}) vs target >= {TARGET_TRAIN_BF16:,.0f}: "
                     f"{'met' if best['images_per_sec'] >= TARGET_TRAIN_BF16 else 'NOT met'}")
    for r in ratios(records):
        if r["kind"].startswith("train") and r["ours"].startswith("ddpm_jax tf32") and \
                r["peer"] == "diffusers tf32" and records and r["device"] != "cpu":
            lines.append(f"- float32 (TF32) vs the peer's TF32 ({r['kind']}): {r['ratio']:.2f}x vs target >= "
                         f"{TARGET_FP32_OVER_PEER_TF32}x: "
                         f"{'met' if r['ratio'] >= TARGET_FP32_OVER_PEER_TF32 else 'NOT met'}")
    for r in gpu:
        if r.get("bench") != "sample" or r.get("batch") != 256 or not r.get("paper_forward_flops_per_image"):
            continue
        goal = {("ddpm", 1000): TARGET_DDPM_1000_S, ("ddim", 50): TARGET_DDIM_50_S}.get(
            (r["method"], r["num_steps"]))
        if goal is not None:
            lines.append(f"- sampling {r['method']}-{r['num_steps']}, 256 images ({label(r)}): "
                         f"{r['median_s']:.3f} s vs target <= {goal} s: {'met' if r['median_s'] <= goal else 'NOT met'}")
    return lines


def markdown(records: list[dict]) -> str:
    parts = []
    for title, lines in (("Training", train_table(records)), ("Sampling", sample_table(records)),
                         ("Side by side", ratio_table(records)), ("Targets (GPU)", targets(records))):
        if lines:
            parts += [f"### {title}", "", *lines, ""]
    skipped = [r for r in records if r.get("bench") in ("skipped", "failed")]
    if skipped:
        parts += ["### Not measured", ""]
        parts += [f"- {r['name']}: {r['bench']} ({r.get('reason', '')})" for r in skipped]
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m bench.report results.jsonl [more.jsonl ...]")
    records = []
    for path in argv:
        with open(path) as f:
            records += common.read_records(f.read())
    text = markdown(records)
    print(text)
    return text


if __name__ == "__main__":
    main()
