"""Trajectory matching's compute (`pipeline.methods.trajectory`), on small real tensors: the unrolled and TESLA
gradients, PAD's masks, DATM's start window and threshold, the resumable outer loop, the memory measurement, and
the experts' training and PAD schedule (`pipeline.train.experts`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from pipeline.data.trajectories import flat_parameters, layout
from pipeline.methods.trajectory import (
    FlatNet,
    InnerLoop,
    TrajectoryMatching,
    param_mask,
    start_window,
    tesla,
    trajectory_matching,
    unrolled,
)
from pipeline.models import ConvNet
from pipeline.train.experts import ExpertSpec, PadSchedule, scheduled_rows, train_expert

STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _net(classes: int = 3, res: int = 16) -> tuple[FlatNet, torch.Tensor]:
    torch.manual_seed(0)
    m = ConvNet(classes, res, width=8, norm="instance")
    return FlatNet(m, *layout(m)), flat_parameters(m)


class _Reader:
    """Expert trajectories trained here (`train_expert`) on random images, held in memory."""

    def __init__(self, experts: int = 2, epochs: int = 4) -> None:
        spec = ExpertSpec(arch="convnet-in", num_classes=3, resolution=16, epochs=epochs, batch_size=6, lr=0.05,
                          momentum=0.0, weight_decay=0.0, dsa_strategy="", seed=0)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(18, 3, 16, 16, generator=gen), torch.arange(3).repeat_interleave(6)
        rows = [torch.arange(6) + 6 * c for c in range(3)]
        self.params = [torch.stack(train_expert(spec, i, x, y, rows, torch.device("cpu"))["snapshots"])
                       for i in range(experts)]
        from pipeline.models import build_model

        module = build_model("convnet-in", 3, 16)
        self._layout = layout(module)
        self.num_experts, self.epochs = experts, epochs
        self.meta = {"arch": "convnet-in", "num_classes": 3, "resolution": 16}

    def snapshot(self, e: int, t: int) -> torch.Tensor:
        return self.params[e][t]

    def layout(self) -> Any:
        return self._layout


def test_tesla_gives_the_unrolled_gradient_at_one_step_and_approximates_it_over_several():
    net, start = _net()
    target = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(1))
    images, y = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 0, 1, 1, 2, 2])
    for steps in (1, 3):
        loop, got = InnerLoop(syn_steps=steps, batch_syn=3, strategy=STRATEGY), []
        for fn in (unrolled, tesla):
            x, lr = images.clone().requires_grad_(True), torch.tensor(0.01, requires_grad=True)
            loss = fn(net, x, y, lr, start, target, loop, torch.Generator().manual_seed(3))
            if loss.requires_grad:
                loss.backward()
            got.append((loss.detach(), x.grad.clone(), lr.grad.clone()))
        (l1, g1, a1), (l2, g2, a2) = got
        torch.testing.assert_close(l1, l2)  # the same draws, the same forward
        if steps == 1:  # nothing depends on the images through a later step: exact
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(a1, a2, rtol=1e-4, atol=1e-9)
        else:  # the Hessian terms TESLA drops are small here, not zero
            assert not torch.equal(g1, g2)
            assert torch.nn.functional.cosine_similarity(g1.flatten(), g2.flatten(), dim=0) > 0.9


def test_masks_leave_out_the_shallow_share_or_the_smallest_errors():
    start, target = torch.zeros(10), torch.ones(10)
    end = torch.tensor([0.0, 0.9, 0.5, 1.0, 0.95, 0.2, 0.99, 0.7, 0.8, 0.1])  # error |end - target|
    deep = param_mask("deep-layers", 0.3, start, target, end)
    assert deep.tolist() == [False] * 3 + [True] * 7
    ratio = param_mask("loss-ratio", 0.3, start, target, end)
    assert (~ratio).nonzero().flatten().tolist() == [3, 4, 6]  # errors 0, 0.05, 0.01: the three smallest
    assert param_mask("loss-ratio", 0.0, start, target, end) is None
    with pytest.raises(ValueError, match="mask must be one of"):
        param_mask("layers", 0.3, start, target, end)


def test_the_start_window_grows_as_datm_and_stays_fixed_as_mtt():
    inner = InnerLoop(syn_steps=1, batch_syn=0, strategy="")
    mtt = TrajectoryMatching(iterations=10, inner=inner, expert_epochs=2, max_start_epoch=20)
    assert start_window(mtt, 0) == start_window(mtt, 9) == (0, 20)
    datm = dataclasses.replace(mtt, min_start_epoch=0, start_upper=10, start_growth_iterations=1000)
    assert [start_window(datm, it)[1] for it in (0, 500, 1000, 5000)] == [10, 15, 20, 20]


class _MemoryCheckpoint:
    """A LoopCheckpoint in memory: every iteration is due; `states` keeps each saved state."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.states: list[dict[str, Any]] = []
        self.start = state

    def load(self) -> dict[str, Any] | None:
        return self.start

    def due(self) -> bool:
        return True

    def save(self, state: dict[str, Any]) -> None:
        import copy

        self.states.append(copy.deepcopy(state))  # the optimizers' buffers are live tensors: copy them now


def test_the_outer_loop_learns_labels_and_step_size_and_resumes_to_the_same_bytes():
    import copy

    reader = _Reader()
    from pipeline.models import build_model

    net = FlatNet(build_model("convnet-in", 3, 16), *reader.layout())
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    labels = torch.randn(6, 3, generator=torch.Generator().manual_seed(6))
    s = TrajectoryMatching(iterations=4, inner=InnerLoop(syn_steps=2, batch_syn=3, strategy=STRATEGY),
                           expert_epochs=2, max_start_epoch=2, lr_img=10.0, lr_lr=1e-4, lr_label=1.0)
    ckpt = _MemoryCheckpoint()
    x, y, lr, hist = trajectory_matching(images, labels, 0.01, reader, net, torch.Generator().manual_seed(7), s, ckpt)
    assert not torch.equal(x, images) and not torch.equal(y, labels) and lr != 0.01
    assert hist["applied"].tolist() == [1.0] * 4 and set(hist["start_epoch"].tolist()) <= {0.0, 1.0}
    saved = copy.deepcopy(ckpt.states[1])  # after iteration 2 of 4
    x2, y2, lr2, hist2 = trajectory_matching(images, labels, 0.01, reader, net, torch.Generator().manual_seed(99), s,
                                             _MemoryCheckpoint(saved))
    assert torch.equal(x, x2) and torch.equal(y, y2) and lr == lr2 and torch.equal(hist["total"], hist2["total"])
    # a threshold below every loss: nothing moves (DATM's rule), the losses are still recorded
    frozen = dataclasses.replace(s, loss_threshold=1e-6)
    x3, y3, lr3, hist3 = trajectory_matching(images, labels, 0.01, reader, net, torch.Generator().manual_seed(7),
                                             frozen)
    assert torch.equal(x3, images) and torch.equal(y3, labels) and lr3 == pytest.approx(0.01)
    assert hist3["applied"].sum() == 0 and (hist3["total"] > 0).all()


def test_the_graph_measurement_grows_linearly_with_the_steps():
    from pipeline.methods.trajectory.memory import graph_bytes

    net, start = _net()
    images, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    small = graph_bytes(net, images, y, InnerLoop(syn_steps=10, batch_syn=3, strategy=""), start, start + 1,
                        torch.Generator().manual_seed(0))
    big = graph_bytes(net, images, y, InnerLoop(syn_steps=10, batch_syn=6, strategy=""), start, start + 1,
                      torch.Generator().manual_seed(0))
    assert small["per_step"] > 0 and small["graph"] == small["first_step"] + 9 * small["per_step"]
    assert 1.5 < big["per_step"] / small["per_step"] < 2.5  # activations scale with the batch


def test_pad_schedule_grows_from_the_easy_share_and_drops_the_easiest_later():
    pad = PadSchedule(init_ratio=0.75, add_end_epoch=20, remove_start_epoch=40, remove_ratio_1=0.1,
                      remove_second_epoch=60, remove_ratio_2=0.2)
    easy_first = [torch.arange(100), torch.arange(100, 200)]  # each class's rows, easiest first
    sizes = {e: len(scheduled_rows(easy_first, e, pad)) // 2 for e in (0, 10, 20, 39, 40, 59, 60, 99)}
    assert sizes == {0: 75, 10: 88, 20: 100, 39: 100, 40: 90, 59: 90, 60: 80, 99: 80}
    assert scheduled_rows(easy_first, 0, pad)[:75].tolist() == list(range(75))  # the easiest 75 of class 0
    assert scheduled_rows(easy_first, 60, pad)[:80].tolist() == list(range(20, 100))  # the easiest 20 dropped
    assert len(scheduled_rows(easy_first, 0, None)) == 200


def test_an_expert_resumed_from_its_epoch_state_gives_the_same_snapshots():
    spec = ExpertSpec(arch="convnet-in", num_classes=3, resolution=16, epochs=3, batch_size=4, lr=0.05, momentum=0.9,
                      weight_decay=5e-4, dsa_strategy=STRATEGY, seed=1)
    x, y = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(3).repeat_interleave(4)
    rows = [torch.arange(4) + 4 * c for c in range(3)]
    states: list[dict[str, Any]] = []
    full = train_expert(spec, 0, x, y, rows, torch.device("cpu"), on_epoch=lambda s: states.append(
        {**s, "model": {k: v.clone() for k, v in s["model"].items()}, "opt": __import__("copy").deepcopy(s["opt"])}))
    resumed = train_expert(spec, 0, x, y, rows, torch.device("cpu"), state=states[0])
    assert len(full["snapshots"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(full["snapshots"], resumed["snapshots"], strict=True))
    from pipeline.data.trajectories import flat_parameters

    assert torch.equal(flat_parameters(resumed["network"]), full["snapshots"][-1])  # the trained module comes back
    other = train_expert(spec, 1, x, y, rows, torch.device("cpu"))
    assert not torch.equal(other["snapshots"][0], full["snapshots"][0])  # each expert its own init


def test_the_memory_benchmark_runs_on_the_cpu(tmp_path):
    """`benchmarks/tm_memory.py` (whose GPU figures docs/methods.md reports) stays runnable: one case, CPU."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/tm_memory.py", "--out", str(tmp_path), "--cases", "mtt-1",
                           "--expert-images", "256"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "tm_memory.json").read_text())
    (case,) = result["cases"]
    assert case["case"] == "mtt-1" and case["syn_steps"] == 50 and case["batch_syn"] == 10
    # ConvNet-3 at 32 px keeps ~31 MiB per step of 10 images (the GPU measured 1.64 GB for 50 steps)
    assert 25e6 < case["estimate_per_step_bytes"] < 40e6 and result["expert_images_per_s"] > 0
