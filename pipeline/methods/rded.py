"""RDED (Sun, Shi, Yu, Lin, CVPR 2024; https://github.com/LINs-lab/RDED, read at 3f6453d): no optimization.

Per class: `candidates` real training images, `crops` random square crops of each (RandomResizedCrop to
resolution / factor px, area 0.08-1 of the image, ratio 1), every crop scored by the teacher's cross-entropy on
the class (the crop zero-padded to the full resolution in normalized space, as the official `selector`; or resized
to it, the paper's figure), the best crop of each image kept, then the best IPC x factor^2 of those, stitched
factor x factor into IPC images at the data resolution: image j holds, in row-major cells, the patches ranked
j, IPC + j, 2 IPC + j, ... (the official `mix_images`). factor 2 at 224 px (the official ImageNet scripts),
1 on CIFAR and Tiny-ImageNet (their scripts): the patch is then a whole image, scored as it is.

Every random choice (which candidates, every crop window) comes from a generator keyed by (run seed, "rded", class),
so a class's images are the same bytes on CPU on every rerun, whatever the split into units. RDED stores no labels: the relabel stage gives the teacher's soft labels on
the stitched images (the official code labels each augmented, CutMix-ed image online; it has no per-patch labels).

Differences from the official code: the crop windows are drawn by the project's RandomResizedCrop sampler from a
torch generator (official: torchvision's, global RNG); the CE is log-softmax (official: log of softmax, the same up
to rounding); a class with fewer than IPC x factor^2 candidates takes the second-best crops of its images next,
then repeats (official: an error); the crop is cut from the stored image (ingest keeps folder images as they are,
the bundled digits at the data resolution).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from pipeline.methods.base import MethodOutput, Needs, doc_field, register

SCORES = ("pad", "resize")


@dataclass
class RdedConfig:
    """RDED's settings (`recover.rded.*`). Defaults: the official scripts (every one: --mipc 300, --num-crop 5)."""

    candidates: int = doc_field(300, "real images per class that are cropped and scored (official --mipc 300); a "
                                     "class with fewer gives all of its own")
    crops: int = doc_field(5, "random crops of each candidate image, the best one kept (official --num-crop 5; "
                              "its cr1 script 1)")
    factor: int = doc_field(0, "patches per side of a stitched image, each resolution / factor px (0 = auto: 2 at "
                               "128 px and above, as the official ImageNet scripts; 1 below, as its CIFAR and "
                               "Tiny-ImageNet scripts)")
    crop_scale_min: float = doc_field(0.08, "smallest area fraction of a crop (official: RandomResizedCrop's "
                                            "default 0.08)")
    crop_scale_max: float = doc_field(1.0, "largest area fraction of a crop (official 1)")
    score: str = doc_field("pad", "pad | resize: the teacher scores a patch zero-padded (normalized space) to the "
                                  "full resolution (official code) or resized to it (the paper's figure); the "
                                  "same with factor 1")

    def validate(self) -> None:
        for key in ("candidates", "crops"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.factor < 0:
            raise ValueError(f"factor must be >= 0 (0 = auto), got {self.factor}")
        if not 0.0 < self.crop_scale_min <= self.crop_scale_max <= 1.0:
            raise ValueError(f"crop_scale_min and crop_scale_max must satisfy 0 < min <= max <= 1, got "
                             f"{self.crop_scale_min} and {self.crop_scale_max}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")

    def validate_run(self, cfg: Any) -> None:
        """Checks against the rest of the run: the patch fits the resolution; the candidates are real images."""
        res = cfg.data.resolution
        if self.resolved_factor(res) > res:
            raise ValueError(f"config key 'recover.rded.factor': {self.factor} patches per side do not fit "
                             f"data.resolution={res} px")
        if cfg.recover.method == "rded" and cfg.recover.init not in ("auto", "real"):
            raise ValueError(f"config key 'recover.init': rded crops random real images (auto or real), got "
                             f"{cfg.recover.init!r}")

    def resolved_factor(self, resolution: int) -> int:
        """`factor`, with 0 replaced by the official choice for `resolution`."""
        return self.factor or (2 if resolution >= 128 else 1)


# ------------------------------------------------------------------------------------------ pure compute

def draw_boxes(gen: Any, height: int, width: int, crops: int, scale: tuple[float, float]) -> list[tuple[int, ...]]:
    """`crops` square RandomResizedCrop windows (top, left, h, w) of a height x width image, from `gen` (CPU)."""
    from pipeline.augment.crops import TorchDraws, random_resized_crop

    draws = TorchDraws(gen)
    return [tuple(int(v) for v in random_resized_crop(draws, height, width, scale, (1.0, 1.0), pixels=True))
            for _ in range(crops)]


def crop_patches(image: Any, boxes: list[tuple[int, ...]], size: int) -> Any:
    """Float patches [len(boxes), 3, size, size] in [0, 1]: each window of `image` (uint8 [3, H, W]) resized to
    size x size, bilinear with antialiasing (torchvision's RandomResizedCrop on a tensor, antialias=True)."""
    import torch
    import torch.nn.functional as F

    x = image.float().div_(255.0)
    out = [F.interpolate(x[None, :, t:t + h, le:le + w], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True) for t, le, h, w in boxes]
    return torch.cat(out).clamp_(0.0, 1.0)


def teacher_input(patches: Any, resolution: int, how: str) -> Any:
    """Normalized patches [n, 3, p, p] brought to the teacher's resolution: zero-padded around the centre (the
    official `pad`: the extra row / column goes to the bottom / right) or resized bilinearly."""
    import torch.nn.functional as F

    p_h, p_w = patches.shape[-2:]
    if (p_h, p_w) == (resolution, resolution):
        return patches
    if how == "resize":
        return F.interpolate(patches, size=(resolution, resolution), mode="bilinear", align_corners=False)
    dv, dh = resolution - p_h, resolution - p_w
    return F.pad(patches, (dh // 2, dh - dh // 2, dv // 2, dv - dv // 2))


def pick(ce: Any, n: int) -> tuple[list[tuple[int, int]], bool]:
    """Which (image, crop) patches to keep, best first, from the crops' CE [images, crops]: each image's best crop,
    ranked by CE (RDED's selection); when that gives fewer than `n`, each image's second-best crop next, and so on,
    then from the start again. Ties keep the lower index. Returns (the first n picks, whether it ran short)."""
    import torch

    images, crops = ce.shape
    by_crop = torch.sort(ce, dim=1, stable=True)  # each image's crops, best first
    picks: list[tuple[int, int]] = []
    for r in range(crops):
        order = torch.sort(by_crop.values[:, r], stable=True).indices.tolist()
        picks += [(i, int(by_crop.indices[i, r])) for i in order]
        if len(picks) >= n:
            return picks[:n], r > 0
    return [picks[k % len(picks)] for k in range(n)], True


def stitch(patches: Any, images: int, factor: int, resolution: int) -> Any:
    """`images` stitched images [images, 3, R, R] from patches [images x factor^2, 3, p, p] in rank order: image j
    holds patches j, images + j, 2 images + j, ... in row-major cells (the official `mix_images`). Cells are
    R // factor px, the first R % factor rows / columns one more, patches resized to them by nearest neighbour."""
    import torch
    import torch.nn.functional as F

    if patches.shape[0] != images * factor * factor:
        raise ValueError(f"stitch: {patches.shape[0]} patches for {images} images of {factor} x {factor}")
    side, extra = divmod(resolution, factor)
    sizes = [side + 1 if i < extra else side for i in range(factor)]
    starts = [sum(sizes[:i]) for i in range(factor)]
    out = torch.zeros((images, patches.shape[1], resolution, resolution), dtype=patches.dtype, device=patches.device)
    for k in range(factor * factor):
        row, col = divmod(k, factor)
        part = patches[k * images:(k + 1) * images]
        if tuple(part.shape[-2:]) != (sizes[row], sizes[col]):
            part = F.interpolate(part, size=(sizes[row], sizes[col]), mode="nearest")
        out[:, :, starts[row]:starts[row] + sizes[row], starts[col]:starts[col] + sizes[col]] = part
    return out


# ---------------------------------------------------------------------------------------------- worker

class RdedWorker:
    """Crops, scores, keeps and stitches the unit's classes one after the other (whole-class units)."""

    def __init__(self, env: Any, cfg: RdedConfig) -> None:
        self.env, self.cfg = env, cfg

    def run(self, classes: range, ipc: range, gen: Any, unit_key: str) -> MethodOutput:
        env, c = self.env, self.cfg
        factor = c.resolved_factor(env.resolution)
        out = MethodOutput(metrics={"image_iterations": 0})
        scored, short, kept_ce = 0, [], []
        times = {"decode_seconds": 0.0, "crop_seconds": 0.0, "score_seconds": 0.0}
        from pipeline.core.seeding import generator

        for cls in classes:  # each class from its own generator: any split into units picks the same patches
            images, ran_short, ce, n = self._class(cls, ipc.stop, factor, generator(env.seed, "rded", cls), times)
            out.add(images[ipc.start:ipc.stop], [cls] * len(ipc), list(ipc))
            scored += n
            kept_ce.append(ce)
            if ran_short:
                short.append(cls)
        made = max(1, len(out.images))
        out.metrics.update(candidates_scored=scored, teacher_forwards_per_image=round(scored / made, 3),
                           factor=factor, patch_px=env.resolution // factor, short_classes=short,
                           kept_ce_mean=round(sum(kept_ce) / max(1, len(kept_ce)), 6),
                           **{k: round(v, 3) for k, v in times.items()})
        return out

    def _class(self, cls: int, ipc: int, factor: int, gen: Any,
               times: dict[str, float]) -> tuple[Any, bool, float, int]:
        """The class's `ipc` stitched images [ipc, 3, R, R] in [0, 1] on the CPU, whether it had too few candidates
        for best crops only, the mean CE of the kept patches, and how many crops the teacher scored."""
        import torch

        from pipeline.core.imageops import normalize

        env, c = self.env, self.cfg
        pool = env.require_real()
        res, size = env.resolution, env.resolution // factor
        need = ipc * factor * factor
        rows = pool.rows(cls)
        rows = [rows[i] for i in torch.randperm(len(rows), generator=gen)[:c.candidates].tolist()]
        rounds = min(c.crops, math.ceil(need / len(rows)))  # crops kept per image: 1 unless the class is short
        step = max(1, env.feature_batch // c.crops)  # images per teacher pass
        kept_patches, kept_ce = [], []
        target = torch.tensor([cls], dtype=torch.long, device=env.device)
        for start in range(0, len(rows), step):
            t0 = time.perf_counter()
            arrays = pool.decoded(rows[start:start + step])
            t1 = time.perf_counter()
            patches = []
            for arr in arrays:
                boxes = draw_boxes(gen, arr.shape[0], arr.shape[1], c.crops, (c.crop_scale_min, c.crop_scale_max))
                image = torch.tensor(arr).permute(2, 0, 1).to(env.device)  # a copy: the decoded array is read-only
                patches.append(crop_patches(image, boxes, size))
            x = torch.stack(patches)  # [images, crops, 3, p, p] in [0, 1]
            t2 = time.perf_counter()
            flat = normalize(x.flatten(0, 1), env.mean, env.std)
            logits = env.teacher_logits(teacher_input(flat, res, c.score))
            ce = torch.nn.functional.cross_entropy(logits, target.expand(len(logits)), reduction="none")
            ce = ce.view(len(arrays), c.crops).cpu()
            best = torch.sort(ce, dim=1, stable=True)
            idx = best.indices[:, :rounds].to(x.device)
            kept_patches.append(torch.gather(x, 1, idx.view(*idx.shape, 1, 1, 1).expand(-1, -1, *x.shape[2:])))
            kept_ce.append(best.values[:, :rounds])
            times["decode_seconds"] += t1 - t0
            times["crop_seconds"] += t2 - t1
            times["score_seconds"] += time.perf_counter() - t2
        patches = torch.cat(kept_patches)  # [images, rounds, 3, p, p]: each image's best crops, best first
        ce = torch.cat(kept_ce)
        picks, ran_short = pick(ce, need)
        chosen = torch.stack([patches[i, r] for i, r in picks])
        mean_ce = float(torch.stack([ce[i, r] for i, r in picks]).mean())
        return stitch(chosen, ipc, factor, res).cpu(), ran_short, mean_ce, len(rows) * c.crops


@register("rded", description="RDED: per class, the teacher's most confident random crops of real images, "
                              "stitched factor x factor into each image (no optimization)",
          needs=Needs(teacher=True, real_images=True), config=RdedConfig, whole_class=True, default_init="real",
          synthesizes=False)
def open_rded(env: Any, cfg: RdedConfig) -> RdedWorker:
    return RdedWorker(env, cfg)
