"""Named recipes: complete configurations for common experiments.

Hyperparameters follow ../shared/DESIGN.md section 2 (official SRe2L / DWA settings).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from pipeline.config import Config, ConfigError


def _demo() -> Config:
    """Bundled handwritten digits (scikit-learn), 32 px, ConvNet teacher and student, DWA IPC 10.

    Small enough to run end to end on a laptop CPU in a few minutes.
    """
    cfg = Config()
    cfg.data.dataset = "digits"
    cfg.data.resolution = 32
    cfg.data.shard_size = 256
    cfg.squeeze.arch = "convnet"
    cfg.squeeze.epochs = 8
    cfg.squeeze.batch_size = 64
    cfg.squeeze.lr = 0.02
    r = cfg.recover
    r.method, r.ipc, r.iterations, r.jitter = "dwa", 10, 300, 4
    r.r_var, r.dwa_steps, r.dwa_rho = 11.0, 12, 15e-3
    r.ipc_per_unit = 5
    cfg.relabel.mode = "stored"
    t = cfg.train
    t.arch, t.epochs, t.batch_size, t.temperature = "convnet", 100, 64, 20.0
    t.mix, t.mix_alpha = "cutmix", 1.0
    cfg.eval.every = 0
    return cfg


def _imagenet(method: str, ipc: int) -> Callable[[], Config]:
    def make() -> Config:
        cfg = Config()
        cfg.data.dataset = "imagenet-1k"
        cfg.data.resolution = 224
        cfg.data.shard_size = 1000
        cfg.data.num_workers = 8
        cfg.squeeze.arch = "resnet18"
        cfg.squeeze.weights = "ResNet18_Weights.IMAGENET1K_V1"
        r = cfg.recover
        r.method, r.ipc, r.jitter, r.lr = method, ipc, 32, 0.25
        r.iterations = 2000 if method == "dwa" else 4000
        r.r_var = 2.0 if method == "dwa" else 1.0
        r.dwa_steps, r.dwa_rho = 15, 15e-3
        r.classes_per_shard, r.ipc_per_unit = 100, 10
        cfg.relabel.mode, cfg.relabel.top_k = "stored", 100
        t = cfg.train
        t.arch, t.epochs, t.batch_size, t.temperature = "resnet18", 300, 128, 20.0
        t.mix, t.mix_alpha = "cutmix", 1.0
        cfg.eval.every = 50
        return cfg

    make.__doc__ = f"ImageNet-1K, ResNet-18 teacher (torchvision weights) and student, {method} IPC {ipc}, 224 px."
    return make


def _small_images(cfg: Config, method: str, dataset: str, resolution: int) -> None:
    """What Tiny-ImageNet and CIFAR share: a teacher trained on the real shards, the CIFAR/Tiny recover settings."""
    cfg.data.dataset, cfg.data.resolution, cfg.data.shard_size = dataset, resolution, 1000
    sq = cfg.squeeze
    sq.weights, sq.epochs, sq.batch_size, sq.lr = "", 50, 256, 0.2  # "": train the teacher on the real shards
    r = cfg.recover
    r.jitter, r.iterations, r.dwa_steps = 4, 1000, 12
    r.r_var = 11.0 if method == "dwa" else 1.0


def _tiny(method: str, ipc: int) -> Callable[[], Config]:
    def make() -> Config:
        cfg = _imagenet(method, ipc)()
        _small_images(cfg, method, "tiny-imagenet", 64)
        cfg.recover.lr = 0.1
        cfg.train.epochs = 200
        return cfg

    make.__doc__ = f"Tiny-ImageNet (200 classes, 64 px), ResNet-18 (small-image stem), {method} IPC {ipc}."
    return make


def _cifar10(method: str, ipc: int) -> Callable[[], Config]:
    def make() -> Config:
        cfg = _imagenet(method, ipc)()
        _small_images(cfg, method, "cifar-10", 32)
        cfg.recover.classes_per_shard = 10
        cfg.relabel.top_k = 10
        t = cfg.train
        t.mix, t.mix_alpha, t.temperature, t.epochs = "mixup", 0.8, 30.0, 400
        return cfg

    make.__doc__ = f"CIFAR-10 (32 px), ResNet-18 (small-image stem), {method} IPC {ipc}, Mixup 0.8, T 30."
    return make


RECIPES: dict[str, Callable[[], Config]] = {"demo": _demo}
for _m in ("dwa", "sre2l"):
    for _ipc in (10, 50, 100):
        RECIPES[f"imagenet1k-rn18-ipc{_ipc}-{_m}"] = _imagenet(_m, _ipc)
    for _ipc in (50, 100):
        RECIPES[f"tiny-imagenet-rn18-ipc{_ipc}-{_m}"] = _tiny(_m, _ipc)
    for _ipc in (10, 50):
        RECIPES[f"cifar10-rn18-ipc{_ipc}-{_m}"] = _cifar10(_m, _ipc)


def get_recipe(name: str) -> Config:
    """A fresh copy of the named recipe."""
    if name not in RECIPES:
        import difflib

        match = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise ConfigError(f"unknown recipe '{name}'{hint}; `distill recipes` lists them")
    return copy.deepcopy(RECIPES[name]())


def describe_recipes() -> list[tuple[str, str]]:
    return [(name, (fn.__doc__ or "").strip().splitlines()[0]) for name, fn in RECIPES.items()]
