"""Pictures of an evaluation, drawn with OpenCV (no plotting library): cases, ROC and PRO curves.

``write_report`` writes ``OUT/CATEGORY.cases.png`` (the worst and best test images: image, ground
truth, anomaly map, predicted outline at the model's pixel threshold), ``CATEGORY.roc.png``
(image and pixel ROC) and ``CATEGORY.pro.png`` (the PRO curve up to its FPR limit), each atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np

from ..atomic import write_atomic
from ..decision import capped_pixel_threshold, defect_mask, is_anomalous
from ..metrics import PRO_FPR_LIMIT, f1_optimal_threshold
from .evaluate import CategoryResult

FONT = cv2.FONT_HERSHEY_SIMPLEX
# BGR
BLACK, WHITE, GREY, LIGHT = (0, 0, 0), (255, 255, 255), (140, 140, 140), (225, 225, 225)
BLUE, ORANGE, RED, GREEN = (180, 110, 30), (20, 130, 240), (40, 40, 230), (60, 200, 60)
COLORMAP = cv2.COLORMAP_JET


def write_report(result: CategoryResult, out_dir: str | os.PathLike, cases: int = 4) -> list[Path]:
    """Write the pictures of ``result`` into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    name = result.category
    written = [write_png(out / f"{name}.cases.png", case_grid(result, cases))]
    m = result.metrics
    curves = [(f"image AUROC {100 * m.image_auroc:.1f}", *m.image_roc, BLUE)]
    if m.pixel_roc is not None and m.pixel_auroc is not None:
        curves.append((f"pixel AUROC {100 * m.pixel_auroc:.1f}", *m.pixel_roc, ORANGE))
    written.append(
        write_png(
            out / f"{name}.roc.png",
            plot_curves(curves, f"ROC - {name}", "false positive rate", "true positive rate", diagonal=True),
        )
    )
    if m.pro_curve is not None and m.pro is not None:
        fpr, pro = m.pro_curve
        written.append(
            write_png(
                out / f"{name}.pro.png",
                plot_curves(
                    [(f"PRO {100 * m.pro:.1f} (area to FPR {PRO_FPR_LIMIT}, normalised)", fpr, pro, ORANGE)],
                    f"per-region overlap - {name}",
                    "false positive rate (defect-free pixels)",
                    "per-region overlap",
                    x_max=PRO_FPR_LIMIT,
                    fill=True,
                ),
            )
        )
    return written


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"cannot encode {path} as PNG")
    return write_atomic(path, lambda f: f.write(data.tobytes()))


# --- curves ----------------------------------------------------------------------------------

_W, _H = 640, 550
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 24, 76, 64


def plot_curves(
    curves: list[tuple[str, np.ndarray, np.ndarray, tuple[int, int, int]]],
    title: str,
    xlabel: str,
    ylabel: str,
    x_max: float = 1.0,
    diagonal: bool = False,
    fill: bool = False,
) -> np.ndarray:
    """Line plot of ``(label, x, y, colour)`` curves on [0, x_max] x [0, 1]; BGR uint8."""
    img = np.full((_H, _W, 3), 255, np.uint8)
    x0, y0, x1, y1 = _LEFT, _H - _BOTTOM, _W - _RIGHT, _TOP  # plot area corners (y grows downwards)

    def px(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.stack([x0 + np.asarray(x) / x_max * (x1 - x0), y0 - np.asarray(y) * (y0 - y1)], axis=1)

    x_step = _tick_step(x_max)
    for v in np.arange(0, x_max + 1e-9, x_step):
        ((x, _),) = px(np.array([v]), np.array([0.0]))
        cv2.line(img, (round(x), y0), (round(x), y1), LIGHT, 1)
        _text(img, f"{v:.2f}".rstrip("0").rstrip(".") if v else "0", (round(x), y0 + 18), center=True)
    for v in np.arange(0, 1.0 + 1e-9, 0.1):
        ((_, y),) = px(np.array([0.0]), np.array([v]))
        cv2.line(img, (x0, round(y)), (x1, round(y)), LIGHT, 1)
        if round(v * 10) % 2 == 0:
            _text(img, f"{v:.1f}", (x0 - 30, round(y) + 5))
    cv2.rectangle(img, (x0, y1), (x1, y0), GREY, 1)
    if diagonal:
        for a in np.arange(0, 1, 0.04):
            p = px(np.array([a, a + 0.02]) * x_max, np.array([a, a + 0.02]))
            cv2.line(img, tuple(np.round(p[0]).astype(int)), tuple(np.round(p[1]).astype(int)), GREY, 1, cv2.LINE_AA)
    for _label, x, y, colour in curves:
        x, y = _clip_curve(np.asarray(x, np.float64), np.asarray(y, np.float64), x_max)
        pts = _thin(px(x, y))
        if fill:
            poly = np.vstack([pts, [[pts[-1, 0], y0], [pts[0, 0], y0]]])
            overlay = img.copy()
            cv2.fillPoly(overlay, [np.round(poly * 16).astype(np.int32)], _tint(colour), cv2.LINE_AA, shift=4)
            img = cv2.addWeighted(overlay, 0.35, img, 0.65, 0)
        cv2.polylines(img, [np.round(pts * 16).astype(np.int32)], False, colour, 2, cv2.LINE_AA, shift=4)
    # The legend sits between the title and the plot, in one row, where no curve can hide it.
    widths = [cv2.getTextSize(c[0], FONT, 0.5, 1)[0][0] + 40 for c in curves]
    lx = (x0 + x1 - sum(widths) - 24 * (len(curves) - 1)) // 2
    for (label, *_rest, colour), w in zip(curves, widths):
        cv2.line(img, (lx, 56), (lx + 28, 56), colour, 3, cv2.LINE_AA)
        _text(img, label, (lx + 36, 61))
        lx += w + 24
    _text(img, title, (_W // 2, 28), scale=0.65, center=True)
    _text(img, xlabel, ((x0 + x1) // 2, _H - 20), center=True)
    label_img = np.full((24, y0 - y1, 3), 255, np.uint8)
    _text(label_img, ylabel, ((y0 - y1) // 2, 17), center=True)
    img[y1:y0, 8:32] = cv2.rotate(label_img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return img


def _tick_step(x_max: float) -> float:
    return 0.05 if x_max <= 0.3 else 0.1 if x_max <= 0.5 else 0.2


def _clip_curve(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve on [0, x_max], ending exactly at x_max (interpolated) - the part a partial area counts."""
    keep = int(np.searchsorted(x, x_max, side="right"))
    if keep < x.size and x[keep - 1] < x_max:
        y_cut = y[keep - 1] + (y[keep] - y[keep - 1]) * (x_max - x[keep - 1]) / (x[keep] - x[keep - 1])
        return np.r_[x[:keep], x_max], np.r_[y[:keep], y_cut]
    return x[:keep], y[:keep]


def _thin(points: np.ndarray) -> np.ndarray:
    """Drop points that land on the same 1/4 pixel as the previous one (a pixel ROC has millions)."""
    q = np.round(points * 4)
    keep = np.r_[True, np.any(np.diff(q, axis=0) != 0, axis=1)]
    keep[-1] = True
    return points[keep]


def _tint(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * 0.5) for c in colour)  # type: ignore[return-value]


def _text(
    img: np.ndarray,
    text: str,
    org: tuple[int, int],
    scale: float = 0.5,
    colour: tuple[int, int, int] = BLACK,
    center: bool = False,
    thickness: int = 1,
) -> None:
    if center:
        (w, _), _ = cv2.getTextSize(text, FONT, scale, thickness)
        org = (org[0] - w // 2, org[1])
    cv2.putText(img, text, org, FONT, scale, colour, thickness, cv2.LINE_AA)


# --- cases -----------------------------------------------------------------------------------

_COLUMNS = ("image", "ground truth", "anomaly map", "red: map > pixel thr, green: truth")


def pick_cases(result: CategoryResult, n: int) -> tuple[list[int], list[int], float]:
    """(worst, best, threshold): images ordered by how clearly the image threshold judges them.

    Margin = score - threshold for an anomalous image, threshold - score for a normal one, so the
    worst are the missed defects and false alarms (or the nearest calls), the best the clearest.
    The model's own image threshold is used; without one, the test set's F1-optimal threshold.
    """
    scores = result.scores
    threshold = result.info.image_threshold
    if not math.isfinite(threshold):
        threshold, _ = f1_optimal_threshold(result.test.labels, scores)
    margin = np.where(result.test.labels, scores - threshold, threshold - scores)
    order = np.argsort(margin, kind="stable")
    n = min(n, len(order) // 2)
    return order[:n].tolist(), order[::-1][:n].tolist(), float(threshold)


def case_grid(result: CategoryResult, n: int = 4) -> np.ndarray:
    """Rows of (image, ground truth, map, outline) for the ``n`` worst then ``n`` best test images; BGR."""
    worst, best, image_thr = pick_cases(result, n)
    maps = result.maps
    lo, hi = float(maps.min()), float(maps.max())
    pixel_thr = capped_pixel_threshold(result.info.pixel_threshold, image_thr)
    tile = max(maps.shape[1], 200)
    header, gap = 24, 4
    width = 4 * tile + 5 * gap
    rows = [_column_header(width, tile, gap)]
    for kind, indices in (("worst", worst), ("best", best)):
        for rank, i in enumerate(indices, 1):
            rows.append(_case_row(result, i, f"{kind} {rank}", image_thr, pixel_thr, lo, hi, tile, gap, header))
    rows.append(_colour_bar(width, lo, hi, pixel_thr, gap))
    return np.vstack(rows)


def _column_header(width: int, tile: int, gap: int) -> np.ndarray:
    img = np.full((30, width, 3), 255, np.uint8)
    for c, name in enumerate(_COLUMNS):
        _text(img, name, (gap + c * (tile + gap) + tile // 2, 21), center=True, scale=0.5 if len(name) < 20 else 0.42)
    return img


def _case_row(
    result: CategoryResult,
    i: int,
    title: str,
    image_thr: float,
    pixel_thr: float,
    lo: float,
    hi: float,
    tile: int,
    gap: int,
    header: int,
) -> np.ndarray:
    test = result.test
    sample = test.samples[i]
    score = float(result.scores[i])
    anomalous = bool(test.labels[i])
    flagged = bool(is_anomalous(score, image_thr))
    verdict = ("caught" if flagged else "MISSED") if anomalous else ("FALSE ALARM" if flagged else "passed")
    size = (tile, tile)
    rgb = cv2.resize(test.crops[i], size, interpolation=cv2.INTER_LINEAR)
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    mask = cv2.resize(test.masks[i].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    truth = np.zeros_like(image)
    truth[mask > 0] = WHITE
    if anomalous and not test.pixel_usable[i]:
        _text(truth, "no mask", (tile // 2, tile // 2), center=True, colour=WHITE)
    amap = cv2.resize(result.maps[i], size, interpolation=cv2.INTER_LINEAR)
    scaled = np.clip((amap - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(scaled, COLORMAP)
    outline = image.copy()
    if math.isfinite(pixel_thr):
        contours, _ = cv2.findContours(defect_mask(amap, pixel_thr), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outline, contours, -1, RED, 2, cv2.LINE_AA)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(outline, contours, -1, GREEN, 1, cv2.LINE_AA)
    width = 4 * tile + 5 * gap
    row = np.full((header + tile + gap, width, 3), 255, np.uint8)
    name = "/".join(sample.path.parts[-2:])
    colour = RED if verdict in ("MISSED", "FALSE ALARM") else BLACK
    _text(
        row,
        f"{title}: {name} ({'anomalous' if anomalous else 'normal'})  score {score:.4f} "
        f"{'>' if flagged else '<='} {image_thr:.4f}  {verdict}",
        (gap, header - 7),
        colour=colour,
        scale=0.45,
    )
    for c, part in enumerate((image, truth, heat, outline)):
        x = gap + c * (tile + gap)
        row[header : header + tile, x : x + tile] = part
    return row


def _colour_bar(width: int, lo: float, hi: float, pixel_thr: float, gap: int) -> np.ndarray:
    """The map colour scale (shared by every row), with the pixel threshold marked above it."""
    img = np.full((84, width, 3), 255, np.uint8)
    x0, x1, y0, y1 = gap + 30, width - gap - 30, 44, 60
    _text(img, "anomaly map colour scale (same for every row)", (width // 2, 16), center=True, scale=0.45)
    ramp = np.linspace(0, 255, x1 - x0).astype(np.uint8)[None, :]
    img[y0:y1, x0:x1] = cv2.applyColorMap(np.repeat(ramp, y1 - y0, axis=0), COLORMAP)
    _text(img, f"{lo:.4f}", (x0, y1 + 17), center=True, scale=0.42)
    _text(img, f"{hi:.4f}", (x1, y1 + 17), center=True, scale=0.42)
    if math.isfinite(pixel_thr) and lo <= pixel_thr <= hi and hi > lo:
        x = round(x0 + (pixel_thr - lo) / (hi - lo) * (x1 - x0))
        cv2.line(img, (x, y0 - 6), (x, y1 + 2), BLACK, 2)
        label = f"pixel threshold {pixel_thr:.4f}"
        (w, _), _ = cv2.getTextSize(label, FONT, 0.42, 1)
        _text(img, label, (min(max(x - w // 2, gap), width - gap - w), y0 - 10), scale=0.42)
    return img
