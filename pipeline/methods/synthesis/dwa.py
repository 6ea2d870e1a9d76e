"""DWA's directed weight adjustment: K normalized gradient-ascent steps on the teacher's parameters over one real
subset, and their exact undoing (the clean teacher is always restored)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.methods.synthesis.objective import DWAParams


def module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def restore_parameters(teacher: nn.Module, saved: Sequence[Tensor]) -> None:
    """Copy `saved` (from `dwa_perturb`) back into the teacher's parameters, bitwise exactly."""
    params = list(teacher.parameters())
    if len(params) != len(saved):
        raise ValueError(f"saved has {len(saved)} tensors but the teacher has {len(params)} parameters")
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)


def dwa_perturb(teacher: nn.Module, batch: tuple[Tensor, Tensor], params: DWAParams) -> list[Tensor]:
    """Perturb the teacher's parameters in place by K = `params.steps` normalized gradient-ascent steps on CE.

    Every step uses the same real subset `batch` = (normalized images, labels), as the official DWA code
    does with its batch of real init images: the K steps then keep pointing the same way and the total
    perturbation reaches (almost exactly) rho. Step k: e = grad * (rho / K) / (||grad||_2 + 1e-12), one
    global L2 norm over all parameter gradients, theta += e, with the gradient taken at the already
    perturbed parameters. The teacher runs in eval mode, so its BN running buffers never change; buffers
    are never perturbed. Gradients come from `torch.autograd.grad`, so no `.grad` is read or written.
    Returns clones of the original parameters for `restore_parameters` (and `perturbation_norm`); if an
    error occurs the parameters are restored before it propagates. Module modes and requires_grad flags
    are restored on return.
    """
    if not (isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[0], Tensor)):
        raise ValueError("DWA needs one real subset: a pair (normalized images [B, 3, H, W], labels [B])")
    images, labels = batch
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"DWA subset: images {tuple(images.shape)} and labels {tuple(labels.shape)} must be "
                         "[B, 3, H, W] and [B] with B >= 1")
    plist = list(teacher.parameters())
    if not plist:
        raise ValueError("the teacher has no parameters to perturb")
    saved = [p.detach().clone() for p in plist]
    flags = [p.requires_grad for p in plist]
    modes = module_modes(teacher)
    step_size = params.rho / params.steps
    teacher.eval()
    try:
        for p in plist:
            p.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(params.steps):
                loss = F.cross_entropy(teacher(images).float(), labels)
                grads = torch.autograd.grad(loss, plist, allow_unused=True)
                used = [(p, g) for p, g in zip(plist, grads, strict=True) if g is not None]
                if not used:
                    raise RuntimeError("the DWA loss does not depend on any teacher parameter")
                norms = torch.stack([torch.linalg.vector_norm(g.detach()).to(torch.float64) for _, g in used])
                scale = step_size / (torch.linalg.vector_norm(norms) + 1e-12)
                with torch.no_grad():
                    for p, g in used:
                        p.add_(g * scale.to(g.dtype))
    except BaseException:
        restore_parameters(teacher, saved)
        raise
    finally:
        for p, f in zip(plist, flags, strict=True):
            p.requires_grad_(f)
        restore_modes(modes)
    return saved


def perturbation_norm(teacher: nn.Module, saved: Sequence[Tensor]) -> Tensor:
    """||theta - saved||_2 over all parameters (float64, on the parameters' device, no host sync)."""
    with torch.no_grad():
        sq = [(p.detach().double() - s.double()).pow(2).sum() for p, s in zip(teacher.parameters(), saved, strict=True)]
    return torch.stack(sq).sum().sqrt()
