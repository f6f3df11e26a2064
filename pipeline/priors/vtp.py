"""Visual-text prior (VTP): softmax-GradCAM of a class's foreground prompt (docs/method.md#priors).

Every class has a foreground prompt ("a photo of a {c}.") and a background prompt ("a photo
without {c}."). The prompt set of an (image, class) pair decides which classes compete in the
softmax:

* ``target``: the pair's class only — uses no label beyond the one the episode gives;
* ``image_labels``: every class present in the image (the PI-CLIP code; leaks ground truth);
* ``all``: every class of the dataset.

The softmax runs over the foreground and background prompts of the set's classes; the
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
    bank: PromptBank, classes: torch.Tensor, labels: torch.Tensor | None, mode: PromptSet
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompt set of each of P pairs, as the whole bank and a membership mask.

    Args:
        classes: ``(P,)`` the pair's class id (1..C).
        labels: ``(P, C)`` bool, the classes present in each pair's image (for ``image_labels``).

    Returns:
        prompts ``(P, 2C, E)`` (one shared, expanded ``[foreground; background]`` bank), target
        ``(P,)`` the index of the pair's foreground prompt, mask ``(P, 2C)`` True on members.
    """
    num, device = bank.foreground.shape[0], classes.device
    target = classes.long() - 1
    if mode == "all":
        members = torch.ones(len(classes), num, dtype=torch.bool, device=device)
    else:
        members = torch.zeros(len(classes), num, dtype=torch.bool, device=device)
        if mode == "image_labels":
            members |= labels.to(device)
        members[torch.arange(len(classes), device=device), target] = True
    prompts = torch.cat([bank.foreground, bank.background]).to(device)
    return prompts.expand(len(classes), -1, -1), target, torch.cat([members, members], dim=1)
