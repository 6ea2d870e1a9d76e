"""Trajectory matching's memory and speed at the official settings, CIFAR-10 shaped (10 classes, 32 px, ConvNet-3
width 128 with instance norm, every synthetic image in every student step as the official configs do).

    python benchmarks/tm_memory.py --out runs/tm-memory                 # CPU: estimates, RSS where it fits
    python benchmarks/tm_memory.py --out runs/tm-memory --device cuda   # GPU: measured peaks and seconds

For each case (method, IPC) it records:
* `estimate`: the unrolled graph's size from `pipeline.methods.trajectory.memory.graph_bytes` (saved-tensor bytes
  of one and two steps, measured on the CPU, extrapolated to syn_steps: device-independent);
* CPU: the peak resident memory of one unrolled iteration in a fresh process, less that process's peak before the
  iteration (`--rss`; only where the estimate is below half the host's memory);
* CUDA: the peak allocated bytes and the seconds of one iteration, unrolled and TESLA (median of 3 after a
  warm-up); an iteration that runs out of memory is recorded as such.
Then one expert epoch's images/s (random CIFAR-shaped images, DSA, batch 256) and the projected device-hours of
the official schedules (100 experts x 50 epochs x 50,000 images; 5000 / 10,000 iterations). `tm_memory.json` is
rewritten after every case.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# (method, ipc) -> syn_steps, expert_epochs, learned labels (PAD's configs: syn_steps 80; MTT's rows)
CASES = {"mtt-1": (1, 50, 2, False), "mtt-10": (10, 30, 2, False), "mtt-50": (50, 30, 2, False),
         "pad-1": (1, 80, 2, True), "pad-10": (10, 80, 2, True), "pad-50": (50, 80, 3, True)}
ITERATIONS = {"mtt": 5000, "pad": 10000}


def _setup(case: str, device: torch.device, memory: str = "unrolled") -> tuple[Any, ...]:
    from pipeline.data.trajectories import flat_parameters, layout
    from pipeline.methods.trajectory import FlatNet, InnerLoop
    from pipeline.models import build_model

    ipc, steps, _, soft = CASES[case]
    torch.manual_seed(0)
    module = build_model("convnet-in", 10, 32).to(device)
    net = FlatNet(module, *layout(module))
    start = flat_parameters(module).to(device)
    target = start + 0.01 * torch.randn_like(start)
    n = 10 * ipc
    images = torch.randn(n, 3, 32, 32, device=device)
    labels = torch.randn(n, 10, device=device) if soft else torch.arange(10, device=device).repeat_interleave(ipc)
    loop = InnerLoop(syn_steps=steps, batch_syn=0, strategy="color_crop_cutout_flip_scale_rotate", memory=memory)
    return net, images, labels, start, target, loop


def one_iteration(case: str, device: torch.device, memory: str) -> float:
    """Seconds of one outer iteration's gradient (inner loop + backward), synchronized."""
    from pipeline.methods.trajectory import tesla, unrolled

    net, images, labels, start, target, loop = _setup(case, device, memory)
    x = images.clone().requires_grad_(True)
    y = labels.clone().requires_grad_(labels.is_floating_point())
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if memory == "tesla":
        tesla(net, x, y, lr, start, target, loop, gen)
    else:
        unrolled(net, x, y, lr, start, target, loop, gen).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _rss_child(case: str, q: Any) -> None:
    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one_iteration(case, torch.device("cpu"), "unrolled")
    q.put((before * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))  # Linux: KiB


def measure(case: str, device: torch.device, rss: bool) -> dict[str, Any]:
    from pipeline.methods.trajectory.memory import device_memory, graph_bytes

    net, images, labels, start, target, loop = _setup(case, torch.device("cpu"))
    est = graph_bytes(net, images, labels, loop, start, target, torch.Generator().manual_seed(0))
    row: dict[str, Any] = {"case": case, "ipc": CASES[case][0], "syn_steps": loop.syn_steps,
                           "batch_syn": len(images), "estimate_bytes": est["total"],
                           "estimate_per_step_bytes": est["per_step"]}
    if device.type == "cpu":
        if rss and est["total"] < 0.5 * device_memory(device):
            q = mp.get_context("spawn").Queue()
            p = mp.get_context("spawn").Process(target=_rss_child, args=(case, q))
            p.start()
            before, peak = q.get()
            p.join()
            row.update({"cpu_rss_before_bytes": before, "cpu_rss_peak_bytes": peak, "cpu_rss_bytes": peak - before})
        else:
            row["cpu_rss_bytes"] = None
        return row
    for memory in ("unrolled", "tesla"):
        try:
            one_iteration(case, device, memory)  # warm-up (cuDNN choices, allocator)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            secs = [one_iteration(case, device, memory) for _ in range(3)]
            row[f"{memory}_peak_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
            row[f"{memory}_s"] = round(statistics.median(secs), 4)
        except torch.cuda.OutOfMemoryError as exc:
            row[f"{memory}_peak_bytes"], row[f"{memory}_error"] = None, f"out of memory: {str(exc)[:120]}"
        torch.cuda.empty_cache()
    return row


def expert_rate(device: torch.device, n: int = 10000) -> float:
    """Images/s of one expert epoch (ConvNet-3, DSA, batch 256) on random CIFAR-shaped images."""
    from pipeline.train.experts import ExpertSpec, new_expert, train_expert_epoch

    spec = ExpertSpec(arch="convnet-in", num_classes=10, resolution=32, epochs=1, batch_size=256, lr=0.01,
                      momentum=0.0, weight_decay=0.0, dsa_strategy="color_crop_cutout_flip_scale_rotate", seed=0)
    model, opt = new_expert(spec, 0, device)
    x, y = torch.randn(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,))
    rows = torch.arange(n)
    train_expert_epoch(model, opt, x, y, rows[:1024], spec, 0, 0, device)  # warm-up
    t0 = time.perf_counter()
    train_expert_epoch(model, opt, x, y, rows, spec, 0, 1, device)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for tm_memory.json")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--rss", action="store_true", help="CPU: also measure the peak RSS of one iteration")
    p.add_argument("--expert-images", type=int, default=10000, help="images of the timed expert epoch")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor()
                              or platform.machine(), "torch": torch.__version__, "cases": []}

    def save() -> None:
        (out / "tm_memory.json").write_text(json.dumps(result, indent=1))

    for case in args.cases.split(","):
        if case not in CASES:
            p.error(f"unknown case {case!r}; cases: {', '.join(CASES)}")
        row = measure(case, device, args.rss)
        if device.type == "cuda" and row.get("unrolled_s"):
            row["projected_distill_hours"] = round(ITERATIONS[case.split("-")[0]] * row["unrolled_s"] / 3600, 3)
        result["cases"].append(row)
        print(json.dumps(row), flush=True)
        save()
    rate = expert_rate(device, args.expert_images)
    result["expert_images_per_s"] = round(rate, 1)
    result["projected_expert_hours"] = {f"100 x {e} epochs": round(100 * e * 50000 / rate / 3600, 2) for e in (50, 100)}
    save()
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
