"""Shared pieces of the model-level defenses: the victim's private split, proxy sets, saving students."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from translators.checkpoint import LoadedModel, ModelCard, load_model, read_card, save_checkpoint
from translators.errors import HeistError
from translators.files import unwritable_reason
from translators.zoo.membership import PRIVATE_IMAGE_SETS


class ModelDefenseError(HeistError):
    code = "bad_model_defense"


def private_split(card: ModelCard) -> dict[str, Any]:
    """The ``membership`` field of a memorising victim's card (members/non-members dirs and digests)."""
    split = (card.model_extra or {}).get("membership")
    if not split:
        raise ModelDefenseError(f"model {card.name!r} records no membership split (train it with a membership "
                                "recipe such as mia-edges)")
    return split


def load_teacher(path: str | Path) -> tuple[LoadedModel, dict[str, Any]]:
    teacher = load_model(path)
    if teacher.card.scale != 1:
        raise ModelDefenseError(f"{path}: the model-level defenses need a same-size translator")
    return teacher, private_split(read_card(path))




def refuse_private_images(images: str, role: str, suggestion: str) -> None:
    """Raise :class:`ModelDefenseError` if ``images`` holds the victim's private split (a proxy set, or a
    held-out utility set, must not)."""
    if images.strip() in PRIVATE_IMAGE_SETS:
        raise ModelDefenseError(f"{role} {images!r} overlap the victim's private split; use public images "
                                f"such as {suggestion}")


def proxy_inputs(images: str, side: int, n: int, private_digests: set[str], seed: int) -> list[torch.Tensor]:
    """``n`` proxy inputs (edge maps of ``side`` crops of ``images``), checked disjoint from the private set.

    The paper's proxy-set condition: no private pair may be in the proxy set. Raises
    :class:`ModelDefenseError` if the proxy images come from the victim split or a crop matches one.
    """
    from translators.corpus import image_digest, load_images
    from translators.zoo.membership import edge_pairs

    refuse_private_images(images, "proxy images", "corpus:attacker")
    # The same photos under another name (an exported corpus:victim folder) gave crops that overlap the
    # private crops without matching one: compare whole photos too (pixel-exact copies only).
    private_photos = {image_digest(im.image) for im in load_images(PRIVATE_IMAGE_SETS[0])}
    shared = [im.name for im in load_images(images) if image_digest(im.image) in private_photos]
    if shared:
        raise ModelDefenseError(f"proxy images {images!r} include {len(shared)} photo(s) of the victim's private "
                                f"split ({', '.join(shared[:3])}); use public images such as corpus:attacker")
    try:
        pairs = edge_pairs(images, side, n, seed=seed + 7919)
    except ValueError as exc:
        raise ModelDefenseError(str(exc)) from None
    leaked = [i for i, (_, y) in enumerate(pairs) if image_digest(y) in private_digests]
    if leaked:
        raise ModelDefenseError(f"{len(leaked)} proxy images are private training pairs; the proxy set must be "
                                "disjoint from the private set")
    return [x for x, _ in pairs]


def student_path(out: str | Path, teacher: LoadedModel) -> Path:
    """The ``.safetensors`` path a student written to ``out`` gets, checked before any training: it must not
    be the teacher's own checkpoint (the private victim would be overwritten), a folder or a path this process
    cannot write (:func:`translators.files.unwritable_reason`)."""
    p = Path(out)
    p = p if p.suffix == ".safetensors" else p.with_suffix(".safetensors")
    if Path(out).is_dir() or p.is_dir():
        raise ModelDefenseError(f"--out {out}: is a folder; name the student's checkpoint file (NAME.safetensors)")
    if p.resolve() == Path(teacher.source).with_suffix(".safetensors").resolve():
        raise ModelDefenseError(f"--out {out}: that is the victim's own checkpoint; write the student elsewhere")
    if Path(out).suffix not in ("", ".safetensors"):
        raise ModelDefenseError(f"--out {out}: a student is written as NAME.safetensors (+ NAME.json); name it so")
    if (why := unwritable_reason(p)) is not None:
        raise ModelDefenseError(f"--out {out}: {why}")
    return p


def save_student(module: torch.nn.Module, teacher: LoadedModel, out: Path, name: str, method: str,
                 training: dict[str, Any]) -> Path:
    """Save ``module`` with the teacher's architecture card (and its membership split, for evaluation)."""
    card = teacher.card.model_copy(update={
        "name": name, "description": f"{method} of {teacher.card.name}: {teacher.card.description}",
        "training": {"method": method, "teacher": teacher.card.name, **training}, "metrics": {}})
    return save_checkpoint(module.cpu().eval(), student_path(out, teacher), card)
