"""Visual-text prior (VTP): softmax-GradCAM of a class's foreground prompt (DESIGN §5).

Every class has a foreground prompt ("a photo of a {c}.") and a background prompt ("a photo
without {c}."). The prompt set of an (image, class) pair decides which classes compete in the
softmax:

* ``target``: the pair's class only — uses no label beyond the one the episode gives;
* ``image_labels``: every class present in the image (the PI-CLIP code; leaks ground truth);
* ``all``: every class of the dataset.

The set holds the foreground prompts of its classes, then their background prompts; the
explained score is the foreground probability of the pair's class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.clip.prompts import text_embeddings

PromptSet = Literal["target", "image_labels", "all"]


@dataclass(frozen=True)
class PromptBank:
    """``(C, E)`` unit-norm foreground and background prompt embeddings; row c-1 is class c."""

    foreground: torch.Tensor
    background: torch.Tensor


def prompt_bank(model, tokenizer, names: Sequence[str], foreground: str, background: str) -> PromptBank:
    return PromptBank(text_embeddings(model, tokenizer, names, [foreground]),
                      text_embeddings(model, tokenizer, names, [background]))


def prompt_sets(
    bank: PromptBank, classes: Sequence[int], image_labels: Sequence[Sequence[int]], mode: PromptSet
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompt set of each of P pairs.

    Args:
        classes: the pair's class id (1..C) for each pair.
        image_labels: the class ids present in each pair's image (read by ``image_labels``).

    Returns:
        prompts ``(P, K, E)`` (padded with zeros), target ``(P,)`` index of the pair's
        foreground prompt, mask ``(P, K)`` False on padding.
    """
    num = bank.foreground.shape[0]
    sets = []
    for c, labels in zip(classes, image_labels, strict=True):
        if mode == "target":
            members = [c]
        elif mode == "image_labels":
            members = sorted({c, *labels})
        else:
            members = list(range(1, num + 1))
        sets.append(members)
    width = 2 * max(len(m) for m in sets)
    prompts = torch.zeros(len(sets), width, bank.foreground.shape[1])
    mask = torch.zeros(len(sets), width, dtype=torch.bool)
    target = torch.zeros(len(sets), dtype=torch.long)
    for p, members in enumerate(sets):
        rows = torch.tensor(members) - 1
        n = len(members)
        prompts[p, :n], prompts[p, n: 2 * n] = bank.foreground[rows], bank.background[rows]
        mask[p, : 2 * n] = True
        target[p] = members.index(classes[p])
    return prompts, target, mask
