"""Named recipes: complete configurations for common experiments.

Each recipe follows its official counterpart (SRe2L: https://github.com/VILA-Lab/SRe2L, its Tiny-ImageNet
trainer https://github.com/zeyuanyin/tiny-imagenet; DWA: https://github.com/AngusDujw/Diversity-Driven-Synthesis)
and its docstring names every setting where it does not, with the reason. `distill recipes` prints the first
line of each; docs/configuration.md's recipe table repeats the differences.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.config import Config, ConfigError, apply_dict, apply_overrides, load_yaml, validate

DIGITS_STRATEGY = "color_crop_cutout_scale_rotate"  # pipeline.augment.dsa.DIGITS_STRATEGY (that module imports torch)
TINY_MEAN, TINY_STD = [0.4802, 0.4481, 0.3975], [0.2302, 0.2265, 0.2262]
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
CIFAR100_MEAN, CIFAR100_STD = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]

# Differences every recipe shares with the official code, on purpose.
COMMON_DIFFERENCES = (
    "synthetic images are saved as lossless PNG (official: JPEG at PIL's default quality 75, pixels truncated)",
    "the student's final-epoch val accuracy is reported (official DWA prints the best over evaluated epochs, "
    "which selects on the test set)",
)
DWA_DIFFERENCES = (
    "DWA's weight perturbation starts from the clean teacher for every batch, on a real subset drawn class-"
    "balanced from the worker's own classes, the same subset for all K steps (official: the batch's own "
    "augmented real init images, and on ImageNet the perturbation and the teacher's .grad accumulate across "
    "the 10 batches of an IPC round)",
)


def _describe(make: Callable[[], Config], summary: str, method: str, specific: list[str]) -> None:
    """Attach the summary and the list of differences from the official code to a recipe builder."""
    diffs = [*COMMON_DIFFERENCES, *(DWA_DIFFERENCES if method == "dwa" else ()), *specific]
    make.summary = summary  # type: ignore[attr-defined]
    make.differences = diffs  # type: ignore[attr-defined]
    make.__doc__ = summary + "\n\nDifferences from the official code:\n" + "\n".join(f"- {d}" for d in diffs)


def _synthesis(cfg: Config, methods: tuple[str, ...] = (), **values: object) -> None:
    """Set SRe2L / DWA recover values on the sections of `methods` (default: the chosen method); keys a
    section does not have (DWA's for SRe2L) are skipped."""
    for name in methods or (cfg.recover.method,):
        section = getattr(cfg.recover, name.replace("-", "_"))
        for key, value in values.items():
            if hasattr(section, key):
                setattr(section, key, value)


def _demo() -> Config:
    """Bundled handwritten digits (scikit-learn), 32 px, ConvNet teacher and student, DWA IPC 10.

    Small enough to run end to end on a laptop CPU in a few minutes. Student: the SRe2L / DWA ImageNet KD
    protocol (AdamW 1e-3, cosine, 300 epochs, T 20, CutMix) at batch 64 for 100 images; recover: DWA's
    small-image settings (r_var 11, K 12, rho 15e-3, jitter 4, crop + flip) shortened from 1000 to 300
    iterations, and an 8-epoch teacher, so that `make demo` stays within minutes on 2 cores. The matching
    methods, when chosen, run shortened too: DM and DataDAM 100 iterations (official 20,000 / 8,000) with 32
    real images per class and step (official 256 / 64), DC and DSA 10 iterations (official 1000) with 64
    (official 256), the digits DSA strategy (no flip), which is also the hard protocol's augmentation of every set
    that gets one (`train.hard_dsa_strategy`: random real images trained with `train.hard_augment=dsa` as the
    fair reference for DSA / DM / DataDAM sets see the same transforms). Trajectory matching (mtt, pad): 3
    experts of 4 epochs (official 100 of 50 / 100; PAD's EL2N from 2 networks at epoch 2), 100 iterations
    (official 5000 / 10,000) of 10 student steps (official 50 / 30 / 80), targets 1 epoch after a start below 3.
    """
    cfg = Config()
    cfg.data.dataset = "digits"
    cfg.data.resolution = 32
    cfg.data.shard_size = 256
    sq = cfg.squeeze
    sq.arch, sq.epochs, sq.batch_size, sq.lr, sq.optimizer = "convnet", 8, 64, 0.02, "sgd-nesterov"
    cfg.recover.method, cfg.recover.ipc, cfg.recover.ipc_per_unit = "dwa", 10, 5
    # Both synthesis sections get the demo's short settings, so `--set recover.method=sre2l` stays a demo.
    _synthesis(cfg, ("sre2l", "dwa"), iterations=300, jitter=4, r_var=11.0, steps=12, rho=15e-3)
    # The matching methods' published schedules take GPU-hours (20,000 DM iterations; DC's 1000 with 10 x 50
    # inner loops at IPC 10), so the demo shortens them to about a minute each on 2 CPU cores at IPC 1, with
    # fewer real images per class and step; the DSA strategy is the official one for digits (no flip).
    _synthesis(cfg, ("dm", "datadam"), iterations=100, batch_real=32, strategy=DIGITS_STRATEGY)
    _synthesis(cfg, ("dc", "dsa"), iterations=10, batch_real=64, strategy=DIGITS_STRATEGY)
    # Trajectory matching (mtt, pad) trains 100 experts of 50-100 epochs and runs 5000-10,000 iterations of up to
    # 80 unrolled steps officially (GPU-hours); the demo trains 3 experts of 4 epochs (PAD's data schedule squeezed
    # into them) and runs 100 iterations of 10 steps, the target 1 epoch after a start in [0, 3).
    e = cfg.experts
    e.num, e.epochs, e.dsa_strategy, e.pad_add_end_epoch, e.pad_remove_epochs = 3, 4, DIGITS_STRATEGY, 1, [2, 3]
    e.el2n_networks, e.el2n_epoch = 2, 2  # PAD's EL2N difficulty from 2 networks at epoch 2 (Paul et al.: 10 at 20)
    _synthesis(cfg, ("mtt", "pad"), iterations=100, syn_steps=10, expert_epochs=1, max_start_epoch=3,
               strategy=DIGITS_STRATEGY)
    cfg.relabel.mode = "stored"
    t = cfg.train
    t.arch, t.epochs, t.batch_size, t.temperature = "convnet", 300, 64, 20.0
    t.mix, t.mix_alpha = "cutmix", 1.0
    t.hard_dsa_strategy = DIGITS_STRATEGY  # the official code drops flip for MNIST for its students too
    cfg.eval.every = 0
    # the matrix a user should see first: both protocols, against random real images and all real images
    cfg.eval.protocols = ["kd", "hard"]
    # the full-real reference: 20 epochs over the ~1370 training images is about the image-steps of the 300-epoch
    # students of 100 images (the hard protocol's 300 epochs over all of them would take ~20 min on 2 CPU cores)
    cfg.eval.full_real_epochs = 20
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
        r.method, r.ipc, r.classes_per_shard, r.ipc_per_unit = method, ipc, 100, 10
        _synthesis(cfg, jitter=32, lr=0.25, r_bn=0.01, iterations=2000 if method == "dwa" else 4000,
                   r_var=2.0 if method == "dwa" else 1.0, steps=15, rho=15e-3)
        # SRe2L relabels offline (FKD files, 300 epochs of views); DWA runs the teacher online (train_KD.py).
        cfg.relabel.mode = "stored" if method == "sre2l" else "online"
        cfg.relabel.top_k = 0
        t = cfg.train
        t.arch, t.epochs, t.temperature = "resnet18", 300, 20.0
        t.batch_size = 1024 if method == "sre2l" else 128
        t.optimizer, t.lr, t.weight_decay, t.decay_1d = "adamw", 1e-3, 0.01, False
        t.mix, t.mix_alpha = "cutmix", 1.0
        cfg.eval.every = 50
        # the full-real reference holds the train split in memory (pipeline.train.full_real): not at ImageNet scale
        cfg.eval.baselines = ["random-real"]
        return cfg

    _describe(make, f"ImageNet-1K, ResNet-18 teacher (torchvision weights) and student, {method} IPC {ipc}, 224 px.",
              method, [])
    return make


def _tiny(method: str, ipc: int) -> Callable[[], Config]:
    def make() -> Config:
        cfg = Config()
        d = cfg.data
        d.dataset, d.resolution, d.shard_size, d.num_workers = "tiny-imagenet", 64, 1000, 8
        d.mean, d.std = list(TINY_MEAN), list(TINY_STD)
        sq = cfg.squeeze  # zeyuanyin/tiny-imagenet train_rn18.sh; SRe2L used its 50-epoch teacher, DWA a 100-epoch one
        sq.arch, sq.weights, sq.batch_size, sq.optimizer, sq.lr = "resnet18", "", 256, "sgd", 0.2
        sq.weight_decay, sq.warmup_epochs = 1e-4, 5
        sq.epochs = 50 if method == "sre2l" else 100
        r = cfg.recover
        r.method, r.ipc, r.ipc_per_unit = method, ipc, 10
        r.classes_per_shard = 100 if method == "sre2l" else 200
        _synthesis(cfg, lr=0.1, jitter=4, crop=True, flip=True, steps=12, rho=15e-3)
        if method == "sre2l":
            _synthesis(cfg, iterations=4000, r_bn=1.0, r_var=1.0)
        else:
            _synthesis(cfg, iterations=2000, r_bn=0.01, r_var=11.0)
        cfg.relabel.mode = "online"
        t = cfg.train
        t.arch, t.optimizer, t.lr, t.weight_decay, t.decay_1d = "resnet18", "sgd", 0.2, 1e-4, True
        t.warmup_epochs, t.temperature, t.loss_t2 = 5, 20.0, True
        if method == "sre2l":
            t.epochs, t.batch_size, t.mix = 100, 256, "none"
        else:
            t.epochs, t.batch_size, t.mix, t.mix_alpha = 200, 64, "cutmix", 1.0
        cfg.eval.every = 10
        return cfg

    diffs = ["the teacher is trained here with pad-4 random crop + flip (the official trainer uses "
             "RandomResizedCrop(64) + flip)"]
    if method == "sre2l":
        diffs.append("the recover roll is one-sided randint(0, 4) like every other official script (SRe2L's "
                     "recover_tiny.py alone draws randint(-4, 4))")
    else:
        diffs.append("the teacher is trained for 100 epochs with the Tiny-ImageNet trainer's recipe (DWA loads an "
                     "E100 checkpoint whose training code is not published)")
    _describe(make, f"Tiny-ImageNet (200 classes, 64 px), ResNet-18 (small-image stem), {method} IPC {ipc}.",
              method, diffs)
    return make


def _cifar(classes: int, method: str, ipc: int) -> Callable[[], Config]:
    def make() -> Config:
        cfg = Config()
        d = cfg.data
        d.dataset, d.resolution, d.shard_size = f"cifar-{classes}", 32, 1000
        # SRe2L's CIFAR-100 code normalizes with the CIFAR-10 statistics throughout; DWA's with CIFAR-100's.
        if classes == 100 and method == "dwa":
            d.mean, d.std = list(CIFAR100_MEAN), list(CIFAR100_STD)
        else:
            d.mean, d.std = list(CIFAR10_MEAN), list(CIFAR10_STD)
        sq = cfg.squeeze  # squeeze_cifar*.py: 200 epochs, batch 128, SGD 0.1, wd 5e-4, cosine, pad-crop + flip
        sq.arch, sq.weights, sq.epochs, sq.batch_size, sq.optimizer = "resnet18", "", 200, 128, "sgd"
        sq.lr, sq.weight_decay, sq.warmup_epochs = 0.1, 5e-4, 0
        r = cfg.recover
        r.method, r.ipc, r.classes_per_shard, r.ipc_per_unit = method, ipc, min(100, classes), 10
        _synthesis(cfg, iterations=1000, lr=0.25, r_bn=0.01, jitter=4,
                   crop=False, flip=False,  # the official CIFAR recover only rolls
                   r_var=11.0 if method == "dwa" else 1.0, steps=12, rho=15e-3)
        cfg.relabel.mode = "online"
        t = cfg.train  # relabel_cifar.py / validation_cifar.py: AdamW 1e-3 / 0.01 on all params, T 30, Mixup 0.8
        t.arch, t.epochs, t.batch_size, t.optimizer = "resnet18", 400, 128, "adamw"
        t.lr, t.weight_decay, t.decay_1d, t.temperature = 1e-3, 0.01, True, 30.0
        t.mix, t.mix_alpha = "mixup", 0.8
        cfg.eval.every = 50
        return cfg

    diffs = ["the student's views are random-resized crops (scale 0.08-1) + flip, so relabel can key them by "
             "(seed, epoch, image) (official: RandomCrop(32, padding 4) + flip)",
             "the teacher runs in eval mode while it labels views (the official CIFAR relabel never calls eval(), "
             "so its BatchNorm uses and updates batch statistics)"]
    if classes == 10:
        diffs.append("neither repository ships a CIFAR-10 recipe (SRe2L has no CIFAR-10 code; DWA's has no "
                     "script and argparse defaults of K 1, rho 0.05): this applies the CIFAR-100 settings, with "
                     "the CIFAR-10 statistics of DWA's validation code")
    _describe(make, f"CIFAR-{classes} (32 px), ResNet-18 (small-image stem), {method} IPC {ipc}, Mixup 0.8, T 30.",
              method, diffs)
    return make


# RDED (https://github.com/LINs-lab/RDED at 3f6453d): scripts/*_cr5.sh, argument.py, validation/main.py.
RDED_DIFFERENCES = (
    "synthetic images are saved as lossless PNG (official: JPEG at PIL's default quality 75, pixels truncated)",
    "the student's final-epoch val accuracy is reported (official RDED reports the best of its evaluations every 10 "
    "epochs after 80 % of them, which selects on the test set)",
    "the student's lr cosine decays to 0 (official LambdaLR 0.5 (1 + cos(pi e / 2E)) ends at half the lr)",
    "the crop windows are drawn from the unit's torch generator (official: torchvision's RandomResizedCrop on the "
    "global RNG), and the candidates are a seeded permutation of the class (official: random.shuffle)",
)


def _describe_rded(make: Callable[[], Config], summary: str, specific: list[str]) -> None:
    """`_describe` for the RDED recipes, whose shared differences are RDED's (not SRe2L / DWA's)."""
    diffs = [*RDED_DIFFERENCES, *specific]
    make.summary = summary  # type: ignore[attr-defined]
    make.differences = diffs  # type: ignore[attr-defined]
    make.__doc__ = summary + "\n\nDifferences from the official code:\n" + "\n".join(f"- {d}" for d in diffs)


def _rded_student(cfg: Config, arch: str, batch_size: int, factor: int) -> None:
    """RDED's student (validation/main.py): the teacher labels every augmented, CutMix-ed batch online; KL at T 20
    without T^2, AdamW lr 1e-3 (resnet18 / resnet18_modified), wd 0.01 on weight matrices only, 300 epochs; views
    RandomResizedCrop(R, scale (1 / factor, 1)) + flip."""
    cfg.recover.method, cfg.recover.rded.candidates, cfg.recover.rded.crops = "rded", 300, 5
    cfg.recover.rded.factor = factor  # the scripts' --factor
    cfg.relabel.mode, cfg.relabel.top_k = "online", 0
    t = cfg.train
    t.arch, t.epochs, t.batch_size, t.temperature, t.loss_t2 = arch, 300, batch_size, 20.0, False
    t.optimizer, t.lr, t.weight_decay, t.decay_1d, t.warmup_epochs = "adamw", 1e-3, 0.01, False, 0
    t.mix, t.mix_alpha, t.crop_scale_min = "cutmix", 1.0, 1.0 / factor


def _imagenet_rded(ipc: int) -> Callable[[], Config]:
    def make() -> Config:
        cfg = Config()
        d = cfg.data
        d.dataset, d.resolution, d.shard_size, d.num_workers = "imagenet-1k", 224, 1000, 8
        cfg.squeeze.arch, cfg.squeeze.weights = "resnet18", "ResNet18_Weights.IMAGENET1K_V1"  # pretrained=True
        cfg.recover.ipc, cfg.recover.classes_per_shard, cfg.recover.ipc_per_unit = ipc, 100, ipc
        # argument.py: re_batch_size 50 at IPC 10, 100 at IPC 50, doubled for 1000 classes
        _rded_student(cfg, "resnet18", 100 if ipc == 10 else 200, factor=2)
        cfg.eval.every = 50
        cfg.eval.baselines = ["random-real"]  # the full-real reference holds the train split in memory
        return cfg

    diffs = ["the student's views do not shuffle the stitched image's patches (official ShufflePatches(factor) "
             "before the crop)"]
    if ipc == 50:
        diffs.append("RDED has no ImageNet-1K IPC 50 script: this keeps the IPC 10 script's 300 candidates x 5 "
                     "crops (argparse defaults would be --mipc 600 --num-crop 1) and argument.py's batch for IPC 50 "
                     "and 1000 classes (200)")
    _describe_rded(make, f"ImageNet-1K, ResNet-18 teacher (torchvision weights) and student, rded IPC {ipc}, 224 px "
                         "(2 x 2 patches of 112 px).", diffs)
    return make


def _small_rded(dataset: str, ipc: int) -> Callable[[], Config]:
    """RDED's Tiny-ImageNet and CIFAR scripts (resnet18_modified teacher and student, factor 1); ImageNet's mean
    and std throughout, as RDED normalizes every data set."""
    classes = {"tiny-imagenet": 200, "cifar-100": 100, "cifar-10": 10}[dataset]

    def make() -> Config:
        cfg = Config()
        d = cfg.data
        d.dataset, d.resolution, d.shard_size = dataset, 64 if dataset == "tiny-imagenet" else 32, 1000
        sq = cfg.squeeze  # RDED's README: its observer models are trained "following SRe2L" (code not published)
        if dataset == "tiny-imagenet":  # zeyuanyin/tiny-imagenet train_rn18.sh, SRe2L's Tiny teacher
            sq.arch, sq.weights, sq.epochs, sq.batch_size, sq.optimizer = "resnet18", "", 50, 256, "sgd"
            sq.lr, sq.weight_decay, sq.warmup_epochs = 0.2, 1e-4, 5
        else:  # SRe2L's squeeze_cifar*.py
            sq.arch, sq.weights, sq.epochs, sq.batch_size, sq.optimizer = "resnet18", "", 200, 128, "sgd"
            sq.lr, sq.weight_decay, sq.warmup_epochs = 0.1, 5e-4, 0
        r = cfg.recover
        r.ipc, r.classes_per_shard, r.ipc_per_unit = ipc, min(100, classes), ipc
        # argument.py: 50 at IPC 10 / 100 at IPC 50, doubled for 100 classes; Tiny-ImageNet always 100
        batch = 100 if dataset == "tiny-imagenet" else (50 if ipc == 10 else 100) * (2 if classes == 100 else 1)
        _rded_student(cfg, "resnet18", batch, factor=1)
        cfg.eval.every = 50
        return cfg

    diffs = ["the teacher is trained here (" + ("the Tiny-ImageNet trainer's recipe, 50 epochs, pad-4 crop + flip"
             if dataset == "tiny-imagenet" else "SRe2L's CIFAR squeeze settings, 200 epochs") + "): RDED loads its "
             "own checkpoint, whose training code is not published, and feeds it ImageNet-normalized images, as here"]
    if dataset == "tiny-imagenet":
        diffs.append("val images are evaluated at 64 px as they are (official: Resize(72) + CenterCrop(64))")
    name = {"tiny-imagenet": "Tiny-ImageNet (200 classes, 64 px)", "cifar-100": "CIFAR-100 (32 px)",
            "cifar-10": "CIFAR-10 (32 px)"}[dataset]
    _describe_rded(make, f"{name}, ResNet-18 (small-image stem), rded IPC {ipc}, one crop per image (factor 1).",
                   diffs)
    return make


# CDA (CDA/README.md and recover_cda_*.py of https://github.com/VILA-Lab/SRe2L at 8d00cba): SRe2L with the cosine
# crop curriculum, milestone 1; "We follow SRe2L relabeling".
def _cda(base: Callable[[], Config], **recover: object) -> Callable[[], Config]:
    def make() -> Config:
        cfg = base()
        s = cfg.recover.sre2l
        s.crop_schedule, s.cda_milestone, s.cda_mode, s.cda_scale_start = "cda", 1.0, "cosine", 1.0
        _synthesis(cfg, ("sre2l",), **recover)
        return cfg

    base_diffs = [d for d in base.differences if d not in COMMON_DIFFERENCES  # type: ignore[attr-defined]
                  and "recover_tiny.py" not in d]  # CDA's Tiny recover rolls one-sided, as here
    diffs = ["the crop schedule's area range is drawn from the unit's torch generator like every SRe2L crop "
             "(official: torchvision's RandomResizedCrop on the global RNG)", *base_diffs]
    summary = base.summary.replace("sre2l", "SRe2L + CDA (cosine crop curriculum, milestone 1)")  # type: ignore
    _describe(make, summary, "sre2l", diffs)
    return make


RECIPES: dict[str, Callable[[], Config]] = {"demo": _demo}
for _m in ("dwa", "sre2l"):
    for _ipc in (10, 50, 100):
        RECIPES[f"imagenet1k-rn18-ipc{_ipc}-{_m}"] = _imagenet(_m, _ipc)
    for _ipc in (50, 100):
        RECIPES[f"tiny-imagenet-rn18-ipc{_ipc}-{_m}"] = _tiny(_m, _ipc)
    for _ipc in (10, 50):
        RECIPES[f"cifar100-rn18-ipc{_ipc}-{_m}"] = _cifar(100, _m, _ipc)
        RECIPES[f"cifar10-rn18-ipc{_ipc}-{_m}"] = _cifar(10, _m, _ipc)
for _ipc in (10, 50):  # RDED's scripts: ImageNet-1K IPC 10 (IPC 50: see its differences), Tiny-ImageNet IPC 10 / 50
    RECIPES[f"imagenet1k-rn18-ipc{_ipc}-rded"] = _imagenet_rded(_ipc)
    RECIPES[f"tiny-imagenet-rn18-ipc{_ipc}-rded"] = _small_rded("tiny-imagenet", _ipc)
RECIPES["cifar100-rn18-ipc10-rded"] = _small_rded("cifar-100", 10)  # its CIFAR scripts are IPC 10 only
RECIPES["cifar10-rn18-ipc10-rded"] = _small_rded("cifar-10", 10)
# CDA's README commands: ImageNet-1K and Tiny-ImageNet, IPC 50
RECIPES["imagenet1k-rn18-ipc50-cda"] = _cda(RECIPES["imagenet1k-rn18-ipc50-sre2l"])
RECIPES["tiny-imagenet-rn18-ipc50-cda"] = _cda(RECIPES["tiny-imagenet-rn18-ipc50-sre2l"], lr=0.4, r_bn=0.05,
                                               iterations=4000, jitter=4)


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


def recipe_differences(name: str) -> list[str]:
    """What the recipe does differently from its official counterpart (empty for the demo)."""
    get_recipe(name)  # the same error for an unknown name
    return list(getattr(RECIPES[name], "differences", []))


def load_config(recipe: str | None = None, config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Recipe or YAML file, then overrides, then validation."""
    if recipe and config_file:
        raise ConfigError("give either --recipe or --config, not both")
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        base = data.pop("recipe", None) if isinstance(data, dict) else None
        cfg = get_recipe(base) if base else Config()
        named = isinstance(data, dict) and isinstance(data.get("data"), dict) and "dataset" in data["data"]
        apply_dict(cfg, data, source=str(path))
    else:
        cfg, named = get_recipe(recipe or "demo"), False
    apply_overrides(cfg, overrides or [])
    named = named or any(o.split("=", 1)[0].strip() == "data.dataset" for o in overrides or [])
    # a folder run under a name of the bundled digits (demo recipe) is named after the folder, unless set
    if not named and cfg.data.source != "demo" and cfg.data.dataset in (Config().data.dataset, "digits"):
        cfg.data.dataset = Path(cfg.data.source).resolve().name or cfg.data.dataset
    return validate(cfg)
