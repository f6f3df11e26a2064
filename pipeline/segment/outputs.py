"""What ``lfss-segment`` writes: per query a mask PNG (0/255, the query's own size) and an overlay
PNG, ``summary.json``, ``index.html``, a self-contained gallery (every picture inlined as a data
URI: the file can be mailed or opened anywhere), and ``gallery.png``, the same tiles as one picture.

The folder is built beside its final place (``.<out>.partial``) and renamed into place when
complete (:func:`staged`, as the stages write theirs), so an interrupted run leaves no half
folder and a later run never mixes with an earlier one's files."""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.artifacts import Staging, remove_tree, write_atomic, write_json
from pipeline.core.errors import PipelineError
from pipeline.segment.segmenter import THRESHOLD, Prediction, Segmentation, Segmenter, read_rgb

QUERY_TINT, SUPPORT_TINT = (255, 40, 40), (40, 200, 80)
THUMBNAIL = 400  # px, the longest side of a gallery picture (shown 200 px wide)


def overlay(image_path: str, mask: np.ndarray, tint: tuple[int, int, int]) -> Image.Image:
    """The image with ``mask`` ``(H, W)`` tinted (half opacity) and its outline drawn in full."""
    rgb = np.asarray(read_rgb(image_path)).astype(np.float32)  # as it was segmented: upright RGB
    color = np.asarray(tint, np.float32)
    out = rgb.copy()
    out[mask] = 0.5 * rgb[mask] + 0.5 * color
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    out[mask & ~inner] = color
    return Image.fromarray(out.round().astype(np.uint8))


#: The files ``lfss-segment`` writes in its folder (and its temporary ones): a folder holding only
#: these is an earlier output, which a run into it replaces.
OUTPUT_FILES = re.compile(r"summary\.json|index\.html|gallery\.png|\.index\.html\.cards|\..+\.tmp"
                          r"|.+_(?:mask|overlay)\.png")


def check_replaceable(out: Path, inputs: Sequence[str | Path] = ()) -> None:
    """``out`` may be (re)placed: it does not exist, or is a folder holding only what
    ``lfss-segment`` writes (:data:`OUTPUT_FILES`: an earlier output, complete or not) and none
    of the ``inputs``. One line otherwise: a folder of the user's own files is never replaced."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise PipelineError(f"--out {out}: not a folder (give a new folder or an earlier output of "
                            "lfss-segment)")
    others = sorted(p.name for p in out.iterdir() if not (p.is_file() and OUTPUT_FILES.fullmatch(p.name)))
    if others:
        raise PipelineError(f"--out {out}: holds {others[0]!r}, which lfss-segment does not write (it "
                            "replaces the folder: give a new one, an empty one or an earlier output of "
                            "lfss-segment)")
    folder = out.resolve()
    for path in inputs:
        if folder in Path(path).resolve().parents:
            raise PipelineError(f"--out {out}: holds the input {path} (it replaces the folder: give another)")


@contextmanager
def staged(out: Path, inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """A fresh staging folder (``.<out>.partial`` beside ``out``) to write the outputs in, renamed
    onto ``out`` when the block ends (an earlier output there is replaced); removed instead when
    the block raises (Ctrl-C included). What a killed run left is removed first, never mixed in.
    A write that fails (a full disk) is one line naming ``out``."""
    check_replaceable(out, inputs)
    final = out.absolute()
    remove_tree(final.with_name(f".{final.name}.partial"))
    staging = Staging(final, "lfss-segment")
    try:
        yield staging.path
    except BaseException as exc:
        remove_tree(staging.path)
        if isinstance(exc, OSError):
            raise PipelineError(f"cannot write {out}: {exc.strerror or exc} "
                                f"({exc.filename or staging.path}); nothing was written") from None
        raise
    staging.commit()


def unique_names(paths: list[str], seen: dict[str, int] | None = None) -> list[str]:
    """A file-name stem per path, unique (``name``, ``name_2``, ...; ``seen`` carries the counts
    across calls)."""
    seen = {} if seen is None else seen
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def thumbnail(image: Image.Image, side: int = THUMBNAIL) -> Image.Image:
    """``image`` shrunk to at most ``side`` pixels a side (what the gallery shows: it stays small
    for any number or size of queries)."""
    if max(image.size) <= side:
        return image
    small = image.copy()
    small.thumbnail((side, side), Image.LANCZOS)
    return small


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def query_row(pred: Prediction, mask_file: str, overlay_file: str) -> dict[str, Any]:
    """One query's entry in ``summary.json``."""
    return {"image": pred.image, "mask": mask_file, "overlay": overlay_file,
            "height": int(pred.mask.shape[0]), "width": int(pred.mask.shape[1]),
            "foreground_fraction": round(pred.foreground_fraction, 4),
            "mean_probability": round(pred.mean_probability, 4)}


def summary_of(result: Segmentation, segmenter: Segmenter, queries: list[dict[str, Any]],
               support_files: list[str | None]) -> dict[str, Any]:
    """``summary.json``: the class, the supports, per query (``queries``: :func:`query_row`) the
    foreground fraction and mean probability, the model, the params that made the masks, and the
    weights' sha256."""
    target, params = result.target, segmenter.params
    return {
        "class": target.name,
        "class_id": target.class_id,
        "in_vocabulary": target.in_vocabulary,
        "maskclip_vocabulary": list(target.vocabulary),
        "support_masks": result.mask_source,
        "supports": [{"image": s, "mask": m, "foreground_fraction": round(float(mask.mean()), 4)}
                     for s, m, mask in zip(result.supports, support_files, result.support_masks,
                                           strict=True)],
        "threshold": THRESHOLD,
        "queries": queries,
        "model": {"path": str(segmenter.model_path), "sha256": segmenter.model_sha256,
                  "fold": segmenter.saved.get("fold"), "circle_inference": bool(segmenter.saved["circle"]),
                  "best_val_miou": segmenter.saved.get("best_val_miou"), "params": segmenter.saved["model"]},
        "clip": {"path": str(segmenter.run.clip_dir), "sha256": segmenter.clip_sha256},
        "run": str(segmenter.run.root),
        "params": {"dataset": params.dataset.name, "backbone": params.backbone.model_dump(),
                   "priors": params.priors.model_dump(), "pseudo_masks": params.pseudo_masks.model_dump()},
        "device": segmenter.device.type,
    }


def card(image: Image.Image, title: str, caption: str) -> str:
    """One picture of the gallery page, inlined, with its title and caption."""
    esc = html.escape
    return (f'<figure><img src="{data_uri(image)}" alt="{esc(title)}" width="{image.width}" '
            f'height="{image.height}"><figcaption><b>{esc(title)}</b><br>{esc(caption)}</figcaption></figure>')


def query_card(image: Image.Image, row: dict[str, Any]) -> str:
    return card(image, Path(row["image"]).name,
                f"{100 * row['foreground_fraction']:.1f}% foreground, mean p {row['mean_probability']:.3f}")


def gallery_head(summary: dict[str, Any], supports: list[Image.Image]) -> str:
    """The gallery page up to its query pictures: the run, the model and the supports (with the
    masks the model was given); the query cards (:func:`query_card`) and :data:`GALLERY_END`
    follow."""
    esc = html.escape
    support_cards = "".join(card(im, Path(s["image"]).name, f"{summary['support_masks']}, "
                                 f"{100 * s['foreground_fraction']:.1f}% foreground")
                            for im, s in zip(supports, summary["supports"], strict=True))
    vocab = "in the run's vocabulary" if summary["in_vocabulary"] else "added to the run's vocabulary"
    model = summary["model"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lfss-segment: {esc(summary['class'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
section {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 200px; }}
img {{ width: 200px; height: auto; image-rendering: pixelated; border: 1px solid #ccc; }}
figcaption {{ font-size: 12px; word-break: break-all; }}
.meta {{ font-size: 13px; color: #555; }}
</style></head><body>
<h1>{esc(summary['class'])}</h1>
<p class="meta">class {summary['class_id']} ({vocab}); {len(summary['queries'])} queries;
model {esc(model['path'])} (fold {model['fold']}, sha256 {model['sha256'][:12]}…);
CLIP sha256 {str(summary['clip']['sha256'])[:12]}…; foreground where p &ge; {summary['threshold']}</p>
<h2>Supports</h2><section>{support_cards}</section>
<h2>Queries</h2><section>"""


GALLERY_END = "</section>\n</body></html>\n"


def contact_sheet(summary: dict[str, Any], queries: list[Image.Image], supports: list[Image.Image],
                  tile: int = 160, columns: int = 5, most: int = 50) -> Image.Image:
    """The gallery as one picture (``gallery.png``: for places a page cannot go, e.g. a README):
    a row of supports (green: the mask the model was given), then the query overlays (red), each
    tile captioned with its name and foreground fraction; the first ``most`` queries only (the page
    has them all)."""
    from PIL import ImageDraw

    caption, total = 28, len(summary["queries"])
    queries = queries[:most]
    rows = 1 + -(-len(queries) // columns)
    sheet = Image.new("RGB", (columns * tile, 30 + rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    shown = f"{total} queries" if total == len(queries) else f"the first {len(queries)} of {total} queries"
    draw.text((6, 8), f"{summary['class']}: {len(supports)} support(s) ({summary['support_masks']}), {shown}",
              fill="black")
    tiles = [(im, s["image"], s["foreground_fraction"], (k, 0))
             for k, (im, s) in enumerate(zip(supports[:columns], summary["supports"], strict=False))]
    tiles += [(im, q["image"], q["foreground_fraction"], (j % columns, 1 + j // columns))
              for j, (im, q) in enumerate(zip(queries, summary["queries"], strict=False))]
    for image, name, fraction, (col, row) in tiles:
        x, y = col * tile, 30 + row * (tile + caption)
        sheet.paste(image.resize((tile - 8, tile - 8), Image.NEAREST), (x + 4, y + 4))
        draw.text((x + 4, y + tile - 2), Path(name).name[:22], fill="black")
        draw.text((x + 4, y + tile + 11), f"{100 * fraction:.1f}% foreground", fill="dimgray")
    return sheet


class OutputWriter:
    """Writes ``lfss-segment``'s outputs under ``out`` as batches of predictions arrive: each
    query's mask and overlay at once, its gallery card to a temporary file; only its summary row
    (and, for the first ``SHEET_QUERIES``, a thumbnail for ``gallery.png``) is kept, so memory
    does not grow with the queries. :meth:`finish` writes the summary and the gallery."""

    SHEET_QUERIES = 50

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[dict[str, Any]] = []
        self.sheet: list[Image.Image] = []
        self.seen: dict[str, int] = {}
        self.first: Segmentation | None = None
        out.mkdir(parents=True, exist_ok=True)
        self.cards = out / ".index.html.cards"
        self.cards.write_text("")

    def add(self, part: Segmentation) -> None:
        """Write the masks, overlays and gallery cards of one batch's predictions."""
        self.first = self.first or part
        names = unique_names([p.image for p in part.predictions], self.seen)
        with self.cards.open("a") as cards:
            for name, pred in zip(names, part.predictions, strict=True):
                mask_file, overlay_file = f"{name}_mask.png", f"{name}_overlay.png"
                Image.fromarray(pred.mask.astype(np.uint8) * 255).save(self.out / mask_file)
                shown = overlay(pred.image, pred.mask, QUERY_TINT)
                shown.save(self.out / overlay_file)
                row = query_row(pred, mask_file, overlay_file)
                small = thumbnail(shown)
                cards.write(query_card(small, row))
                if len(self.sheet) < self.SHEET_QUERIES:
                    self.sheet.append(small)
                self.rows.append(row)

    def finish(self, segmenter: Segmenter, support_mask_files: list[str] | None = None) -> dict[str, Any]:
        """Write ``summary.json``, ``index.html`` and ``gallery.png``; returns the summary."""
        head = self.first
        if head is None:
            raise PipelineError("lfss-segment: no predictions to write")
        supports = [thumbnail(overlay(s, m, SUPPORT_TINT))
                    for s, m in zip(head.supports, head.support_masks, strict=True)]
        summary = summary_of(head, segmenter, self.rows, support_mask_files or [None] * len(head.supports))
        write_json(self.out / "summary.json", summary)

        def page(tmp: Path) -> None:
            with tmp.open("w") as f, self.cards.open() as cards:
                f.write(gallery_head(summary, supports))
                shutil.copyfileobj(cards, f)
                f.write(GALLERY_END)

        write_atomic(self.out / "index.html", page)
        self.cards.unlink()
        contact_sheet(summary, self.sheet, supports, most=self.SHEET_QUERIES).save(self.out / "gallery.png")
        return summary
