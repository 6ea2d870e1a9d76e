"""The configuration's sections: one documented dataclass per stage section, plus the executor's.

Fields carry their documentation (`distill run --help` prints it). Fields whose metadata has `hash=False` are
operational (worker counts, loader choice): changing them does not change what a stage computes, so they are
left out of the stage config hashes. The `recover` section gets one nested section per registered method.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import ConfigError  # noqa: F401 - re-exported by pipeline.config
from pipeline.core.imageops import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


def _f(default: Any, doc: str) -> Any:
    """A field with its documentation: `distill run --help` and docs/configuration.md list it."""
    return field(default=default, metadata={"doc": doc})


def _since(default: Any, doc: str) -> Any:
    """A field added after run directories existed: hashed only when set to something other than its default, so
    a run made before it existed resumes under the new code (its default reproduces what that code computed)."""
    return field(default=default, metadata={"doc": doc, "hash_if_set": True})


def _named(default: Any, doc: str) -> Any:
    """A scalar field left out of its own section's hash and hashed, by its dotted name, by the stages that use it
    (the experts' difficulty keys: the difficulty stage hashes them, and the experts stage inherits that hash only
    when PAD's schedule reads its scores, so they never move the hash of experts that do not use them)."""
    return field(default=default, metadata={"hash": "by-name", "doc": doc})


def _op(default: Any, doc: str) -> Any:
    """An operational field: it never changes what a stage computes, so it is not part of any config hash."""
    return field(default=default, metadata={"hash": False, "doc": doc})


def _by_name(default: tuple[float, ...], doc: str) -> Any:
    """A field left out of its own section's hash and hashed, by its dotted name, by the stages that use it.

    Normalization is a property of the data that ingest does not use: changing it must re-run the teacher and
    everything after it, never re-ingest.
    """
    return field(default_factory=lambda: list(default), metadata={"hash": "by-name", "doc": doc})


@dataclass
class DataConfig:
    """Real data and ingest."""

    source: str = _f("demo", "'demo' (the bundled scikit-learn digits) or a data folder in one of the data.format "
                     "layouts")
    format: str = _since("auto", "layout of data.source: imagefolder (train/<class>/*, val/<class>/*) | ilsvrc "
                         "(ILSVRC/Data/CLS-LOC/ + LOC_val_solution.csv, Kaggle) | webdataset (*train*.tar / *val*.tar "
                         "with .cls) | parquet (Hugging Face *train*.parquet / *validation*.parquet) | auto (detected "
                         "from the folder; see docs/data.md 'Bringing ImageNet')")
    dataset: str = _f("demo", "name of the data set in results tables")
    resolution: int = _f(32, "side in pixels of the square images every model sees")
    shard_size: int = _f(256, "samples per WebDataset shard")
    max_bad_fraction: float = _f(0.01, "share of unreadable images tolerated before ingest stops (exit 2)")
    val_fraction: float = _f(0.2, "demo data only: share of each class held out as val")
    shuffle_seed: int = _f(0, "order of samples across shards (independent of the run seed)")
    mean: list[float] = _by_name(IMAGENET_MEAN, "per-channel mean every model's input is normalized with (RGB, "
                                 "[0, 1] scale); an imported teacher needs the values it was trained with")
    std: list[float] = _by_name(IMAGENET_STD, "per-channel std of the input normalization (RGB, [0, 1] scale)")
    loader: str = _op("auto", "real-image loader: auto (DALI when importable) | pil | dali")
    num_workers: int = _op(2, "DataLoader worker processes per rank (PIL path) or DALI threads")


@dataclass
class SqueezeConfig:
    """Teacher: train on the real shards, or import weights."""

    arch: str = _f("convnet", "teacher architecture: convnet, convnet-in, lenet, mlp or any torchvision "
                   "classification model name")
    weights: str = _f("", "'' = train the teacher here; else a state_dict file or a torchvision weights name "
                      "(e.g. ResNet18_Weights.IMAGENET1K_V1, from the local cache only)")
    epochs: int = _f(10, "teacher training epochs")
    batch_size: int = _f(64, "global batch (split over the DDP ranks)")
    optimizer: str = _f("sgd", "sgd (momentum 0.9, as the official scripts) | sgd-nesterov | adamw")
    lr: float = _f(0.05, "base learning rate (per-epoch cosine to 0)")
    weight_decay: float = _f(5e-4, "weight decay, on every parameter as the official teacher scripts")
    warmup_epochs: int = _f(0, "linear warm-up epochs from 0.01x before the cosine (official Tiny-ImageNet: 5)")
    amp: bool = _f(True, "bf16 autocast on GPU; ignored on CPU")
    workers: int = _op(0, "DDP workers: 0 = one per GPU (1 without GPUs); CPU workers use gloo")
    sample_stats: bool = _f(True, "after each epoch, score every training image (forgetting events, loss "
                            "buffers) for the forgetting and loss-score methods; costs ~1/3 of an epoch")
    stats_window: int = _f(5, "loss buffers: the per-sample losses are averaged over this many last epochs")


@dataclass
class RecoverCommon:
    """Synthesis (or selection) of IPC images per class: the settings every method shares."""

    method: str = _f("dwa", "recover method (see `distill methods`)")
    ipc: int = _f(10, "images per class")
    init: str = _f("auto", "initial images: auto (the method's default) | noise | real (seeded random real "
                   "images) | real-correct (real images the teacher classifies correctly, PAD's idea) | "
                   "real-<selection> (a selection method's picks, e.g. real-herding; `distill methods` names "
                   "each selection that can start other methods)")
    classes_per_shard: int = _f(0, "classes per unit and per synthesis batch (0 = min(100, classes))")
    ipc_per_unit: int = _f(10, "images per class in one unit of work (methods that make a class's images "
                           "together take all IPC in one unit)")
    amp: str = _f("bf16", "bf16 | none: autocast on GPU (CPU is always fp32)")
    channels_last: bool = _f(True, "channels_last memory format on GPU")
    compile: str = _f("auto", "auto | on | off: torch.compile SRe2L/DWA's teacher forward and losses (auto: on "
                      "for units of at least 1000 batch-iterations, where the 20-40 s compile is repaid; a "
                      "failed compile falls back to eager with a warning under auto, stops the unit under on)")
    checkpoint_every_s: float = _op(300.0, "DM, DataDAM, DC, DSA: seconds between checkpoints inside a unit "
                                    "(checkpoints/recover-units), from which a killed unit resumes to the same "
                                    "bytes (0 = after every iteration, -1 = never)")
    batches_per_forward: int = _since(0, "SRe2L: IPC batches of a unit optimized in one teacher forward, each "
                                      "batch with its own CE and BN statistics (0 = auto: 1 on CPU, where it "
                                      "does not pay; on GPU up to 1024 images per forward, halved if memory runs "
                                      "out; DWA: always 1, one weight perturbation per batch)")


def _recover_config() -> type:
    """`RecoverConfig`: the shared settings plus one nested section per registered method with a config.

    Built from the methods registry, so a new method file adds its `recover.<name>.*` keys, its choice of
    `recover.method` and its documentation without touching this module.
    """
    from pipeline.methods import registry

    extra = []
    for m in registry().values():
        if m.config_cls is not None:
            extra.append((m.config_key, m.config_cls,
                          field(default_factory=m.config_cls, metadata={"method": m.name, "doc": m.description})))
    cls = dataclasses.make_dataclass("RecoverConfig", extra, bases=(RecoverCommon,))
    cls.__module__, cls.__qualname__ = __name__, "RecoverConfig"  # picklable by name (Ray actors)
    cls.__doc__ = RecoverCommon.__doc__
    return cls


RecoverConfig = _recover_config()


@dataclass
class RelabelConfig:
    """Teacher soft labels for the student's views of the synthetic images."""

    mode: str = _f("stored", "stored (parquet of fp16 logits + log-partition per view) | online (the teacher "
                   "runs during training)")
    top_k: int = _f(0, "kept logits per view (+ the log-partition); 0 = all classes: the exact target")
    images_per_unit: int = _f(1000, "synthetic images per relabel unit (stored mode)")
    batch_size: int = _op(256, "teacher batch size while relabelling")


@dataclass
class TrainConfig:
    """Student trained from scratch on the synthetic set."""

    arch: str = _f("convnet", "student architecture (any name `squeeze.arch` accepts)")
    epochs: int = _f(300, "student epochs")
    batch_size: int = _f(128, "global batch (split over the DDP ranks)")
    optimizer: str = _f("adamw", "adamw | sgd (momentum 0.9) | sgd-nesterov")
    lr: float = _f(1e-3, "base learning rate (per-epoch cosine to 0)")
    weight_decay: float = _f(0.01, "weight decay")
    decay_1d: bool = _f(False, "weight decay on 1-D tensors too (official Tiny/CIFAR code); False = SRe2L ImageNet")
    warmup_epochs: int = _f(0, "linear warm-up epochs from 0.01x before the cosine (official Tiny-ImageNet: 5)")
    temperature: float = _f(20.0, "KD temperature T of teacher and student softmax")
    loss_t2: bool = _f(False, "multiply the KD loss by T^2 (official Tiny-ImageNet code)")
    mix: str = _f("cutmix", "cutmix | mixup | none, applied to every view")
    mix_alpha: float = _f(1.0, "lambda ~ Beta(alpha, alpha) of CutMix / Mixup")
    crop_scale_min: float = _f(0.08, "smallest area fraction of the student's random-resized crop")
    amp: bool = _f(True, "bf16 autocast on GPU; ignored on CPU")
    views_on_device: str = _since("auto", "auto | on | off: render each batch's views in one call on the training "
                                  "device from the synthetic set held there (relabel and student alike; auto: on "
                                  "GPU only: on CPU the per-view loop is kept, faster at 224 px); off: one view "
                                  "at a time on CPU workers. The two agree to 2 float32 ulps")
    workers: int = _op(0, "DDP workers: 0 = one per GPU (1 without GPUs); CPU workers use gloo")
    protocol: str = _f("kd", "kd: the SRe2L/DWA soft-label protocol (the keys above) | hard: DC/DSA/DM's "
                       "hard-label protocol (the hard_* keys below; relabel is skipped)")
    hard_arch: str = _f("convnet-in", "hard protocol: the student (ConvNet-3 with instance norm, as DC/DSA/DM)")
    hard_epochs: int = _f(0, "hard protocol: epochs; 0 = the official count: 1000 with DSA augmentation, "
                          "300 without")
    hard_batch_size: int = _f(256, "hard protocol: batch size (SGD momentum 0.9, lr x0.1 at half the epochs)")
    hard_lr: float = _f(0.01, "hard protocol: learning rate")
    hard_weight_decay: float = _f(5e-4, "hard protocol: weight decay")
    hard_augment: str = _f("auto", "hard protocol: auto (DSA augmentation for sets made by dsa, dm and "
                           "datadam, none otherwise, as their papers) | dsa | none")
    hard_lr_from_set: bool = _since(True, "hard and own protocols: train with the step size the set learned when "
                                    "it has one (mtt, pad: `syn_lr`, as their official evaluation), else hard_lr")
    own_batch_size: int = _since(128, "own protocol (the set's learned labels, DATM / PAD): batch size (official "
                                 "128); its other settings are the hard_* keys")
    hard_dsa_strategy: str = _f("auto", "hard protocol: DSA strategy of every set that is augmented; auto = the "
                                "recover method's strategy, else color_crop_cutout_flip_scale_rotate (the demo "
                                "recipe: the digits strategy, no flip)")


@dataclass
class ExpertsConfig:
    """Expert trajectories of trajectory matching (`recover.method = mtt | pad`): networks trained from scratch on
    the real training split (the holdout slice left out), their parameters kept at every epoch. Trained only
    when the recover method needs them; shared by every run on the same data with the same settings."""

    num: int = _f(100, "experts (MTT, DATM, PAD: 100); each is one unit, resumable per epoch")
    epochs: int = _f(50, "epochs per expert, each one a snapshot (MTT 50; DATM and PAD 100)")
    arch: str = _f("convnet-in", "the experts' (and the distilling student's) network: ConvNet-3 with instance norm")
    lr: float = _f(0.01, "SGD learning rate (MTT's lr_teacher of buffer.py)")
    momentum: float = _f(0.0, "SGD momentum (official 0)")
    weight_decay: float = _f(0.0, "SGD weight decay (official 0)")
    batch_size: int = _f(256, "images per SGD step (official 256)")
    dsa_strategy: str = _f("color_crop_cutout_flip_scale_rotate", "DSA augmentation of every batch (official: "
                           "on, the full strategy); 'none' = no augmentation")
    schedule: str = _f("auto", "none: all of the data every epoch (MTT, DATM) | pad: PAD's easy-first data "
                       "scheduler, each class ordered by experts.difficulty | auto: pad for "
                       "recover.method=pad, else none (resolved when the config is loaded)")
    difficulty: str = _named("el2n", "what orders the pad schedule: el2n (the difficulty stage: EL2N of el2n_networks "
                         "networks at el2n_epoch, Paul et al.'s stand-in for PAD's GraNd) | teacher-loss (the "
                         "squeeze teacher's mean loss over its last stats_window epochs: no extra training)")
    el2n_networks: int = _named(10, "difficulty = el2n: networks averaged (Paul et al.: 10)")
    el2n_epoch: int = _named(20, "difficulty = el2n: epochs each network trains before scoring (Paul et al.: 20)")
    pad_init_ratio: float = _f(0.75, "pad schedule: share of each class (easiest first) trained at epoch 0")
    pad_add_end_epoch: int = _f(20, "pad schedule: epoch by which all of the data is in")
    pad_remove_epochs: list[int] = field(default_factory=lambda: [40, 60], metadata={
        "doc": "pad schedule: epochs from which the easiest pad_remove_ratios[0], then [1] share is left out"})
    pad_remove_ratios: list[float] = field(default_factory=lambda: [0.1, 0.2], metadata={
        "doc": "pad schedule: shares of each class (easiest first) left out from pad_remove_epochs[0] / [1]"})
    seed: int = _f(0, "seed of the experts' inits, orders and augmentations (not the run seed, so runs with "
                   "other seeds share the experts)")
    dir: str = _op("", "where the experts live; '' = RUN_DIR/experts. A shared folder lets runs on the same "
                   "data share them (a sub-folder per key of everything they depend on)")
    cache: int = _op(4, "experts kept in host memory by a recover worker (least recently used dropped)")


@dataclass
class EvalConfig:
    """Evaluation of the student on the real val shards."""

    every: int = _f(0, "score the student on the holdout slice every N epochs during training (0 = only at the "
                    "end); never on val")
    batch_size: int = _op(256, "eval batch size")
    protocols: list[str] = field(default_factory=list, metadata={
        "doc": "student protocols of the evaluation matrix: kd, hard and/or own (the set's own learned labels, "
               "as DATM/PAD evaluate; one-hot for a set without them); [] = [train.protocol]"})
    students: list[str] = field(default_factory=list, metadata={
        "doc": "student architectures of the matrix (any model name); [] = each protocol's own (train.arch "
               "under kd, train.hard_arch under hard)"})
    seeds: int = _f(1, "student seeds per (protocol, student); seed 0 is the run seed's student")
    baselines: list[str] = field(default_factory=lambda: ["random-real", "full-real"], metadata={
        "doc": "baselines trained in the same run under the same matrix: random-real (random real images at "
               "the same IPC, relabelled by the same teacher) and full-real (all real training images, hard "
               "protocol); [] = none"})
    holdout_fraction: float = _f(0.05, "share of each class of the real train split held out (seeded by "
                                 "data.shuffle_seed): never in a distilled set or a student's training data; "
                                 "used for any epoch choice instead of val")
    select: str = _f("final", "final: report the last epoch's val accuracy | best-holdout: also report the val "
                     "accuracy of the epoch best on the holdout slice (needs eval.every)")
    full_real_epochs: int = _f(0, "full-real baseline: epochs; 0 = the hard protocol's")
    gpus_per_student: float = _op(1.0, "GPUs per student of the matrix on a Ray cluster with GPUs (e.g. 0.25: "
                                  "four small students share a GPU)")
    baseline_dir: str = _op("", "where the baselines live; '' = RUN_DIR/baselines. A shared folder lets runs "
                            "on the same data and teacher share them (keyed by their inputs)")


@dataclass
class ExecutorConfig:
    """Where and how the units of the distributed stages (ingest, recover, relabel) run. Never hashed."""

    kind: str = _op("auto", "auto (Ray inside a Ray job or when address is set) | local (in this process) | ray")
    address: str = _op("", "'' = start a private local Ray cluster (127.0.0.1); 'auto' or host:port = join one")
    num_cpus: int = _op(0, "CPUs of a private local Ray cluster (0 = all)")
    num_gpus: int = _op(-1, "GPUs of a private local Ray cluster (-1 = detect)")
    num_workers: int = _op(0, "actors; 0 = one per GPU, or CPUs // cpus_per_worker without GPUs")
    cpus_per_worker: int = _op(1, "CPU actors: cores (and torch threads) per actor")
    max_attempts: int = _op(3, "tries per unit before the stage fails")


# Keys of earlier versions, still read from old config.json files, YAML and --set (with a warning).
LEGACY_KEYS: dict[str, str] = {
    "ray.executor": "executor.kind", "ray.address": "executor.address", "ray.num_cpus": "executor.num_cpus",
    "ray.num_gpus": "executor.num_gpus", "recover.num_workers": "executor.num_workers",
    "recover.cpus_per_worker": "executor.cpus_per_worker", "recover.max_attempts": "executor.max_attempts",
}


LEGACY_RECOVER_KEYS: dict[str, str] = {
    **{k: k for k in ("iterations", "lr", "r_bn", "r_var", "first_bn_multiplier", "jitter", "crop", "flip",
                      "crop_scale_min")},
    "dwa_steps": "steps", "dwa_rho": "rho", "dwa_batch_size": "batch_size",
}


@dataclass
class Config:
    """The whole run configuration."""

    seed: int = _f(0, "run seed: every unit is seeded from (seed, stage, unit key)")
    data: DataConfig = field(default_factory=DataConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)  # type: ignore[valid-type]
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_for_hash(self, name: str) -> dict[str, Any]:
        """The hashed fields of one section ({'seed': ...} for 'seed'; {key: value} for a dotted 'section.key').

        A section's hash leaves out operational fields (`hash=False`) and fields hashed by name (`by-name`),
        which the stages that use them list as 'section.key'.
        """
        if name == "seed":
            return {"seed": self.seed}
        if "." in name:
            section, key = name.split(".", 1)
            return {key: getattr(getattr(self, section), key)}
        sec = getattr(self, name)
        out = {}
        for f in dataclasses.fields(sec):
            if f.metadata.get("hash", True) is not True:
                continue
            value = getattr(sec, f.name)
            if f.metadata.get("hash_if_set") and value == f.default:
                continue
            if "method" in f.metadata:  # a method's own section counts only when that method is chosen, or when
                # its selection is the init (recover.init = real-<method>, e.g. the loss-score settings)
                if f.metadata["method"] not in (sec.method, sec.init.removeprefix("real-")):
                    continue
                # its fields added later (`doc_field(hash_if_set=True)`) count only when set off their default
                unset = {mf.name for mf in dataclasses.fields(value)
                         if mf.metadata.get("hash_if_set") and getattr(value, mf.name) == mf.default}
                value = {k: v for k, v in dataclasses.asdict(value).items() if k not in unset}
            out[f.name] = value
        return out


_HINTS = typing.get_type_hints(Config)
SECTIONS: dict[str, type] = {f.name: _HINTS[f.name] for f in dataclasses.fields(Config) if f.name != "seed"}
