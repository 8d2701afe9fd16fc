"""Pixels of a demo scene (leaml/data/demo/build.py): a round endoscope view of mucosa with folds,
landmarks, findings, instruments, specular highlights, sensor noise and video overlays.

`render(scene, rng)` is a pure function of its arguments. Smooth shapes are drawn in numpy
(float RGB in 0..1, shape (H, W, 3)); lines and outlines with PIL at SS x the size, reduced
by block averaging for cheap anti-aliasing.
"""
from __future__ import annotations

import colorsys
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SS = 2  # supersampling factor of PIL layers
POLYP_RGB = {"pink": (0.96, 0.64, 0.72), "red": (0.64, 0.09, 0.12), "yellow": (0.92, 0.80, 0.48)}


def render(s, rng: np.random.Generator) -> Image.Image:
    """Draw scene `s`; `rng` supplies texture and noise only (the content is all in `s`)."""
    yy, xx = np.mgrid[0:s.height, 0:s.width].astype(np.float32) + 0.5
    img = _mucosa(s, rng, xx, yy)
    if s.landmark:
        img = _LANDMARKS[s.landmark](img, s, rng, xx, yy)
    for f in s.findings:
        img = _FINDINGS[f.kind](img, f, s, rng, xx, yy)
    if s.instruments:
        img = _instruments(img, s, rng)
    img = _optics(_specular(img, s, rng, xx, yy), s, rng, xx, yy)
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    _video_overlays(out, s)
    return out


# ---------------------------------------------------------------- helpers

def _smooth(rng, h, w, n) -> np.ndarray:
    """Low-frequency noise field (h, w), about unit amplitude, from an n x n grid."""
    grid = Image.fromarray(rng.standard_normal((n, n)).astype(np.float32), "F")
    return np.asarray(grid.resize((w, h), Image.BICUBIC))


def _layer(s) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    lay = Image.new("RGBA", (s.width * SS, s.height * SS), (0, 0, 0, 0))
    return lay, ImageDraw.Draw(lay)


def _paint(img, lay: Image.Image, shadow: float = 0.0) -> np.ndarray:
    """Composite an SS-sized RGBA layer onto img; `shadow` darkens a 1 px offset copy."""
    # premultiplied ("RGBa") before reducing, so edges keep the right colour
    a = np.asarray(lay.convert("RGBa").reduce(SS), dtype=np.float32) * np.float32(1 / 255)
    if shadow:
        img = img * (1 - shadow * np.roll(a[..., 3:], (1, 1), axis=(0, 1)))
    return img * (1 - a[..., 3:]) + a[..., :3]


def _window(x, y, m, s) -> tuple[slice, slice]:
    """Rows and columns within m px of (x, y): work on the pixels an object can touch."""
    return (slice(max(0, int(y) - m), min(s.height, int(y) + m + 1)),
            slice(max(0, int(x) - m), min(s.width, int(x) + m + 1)))


def _pt(x, y):
    return (x * SS, y * SS)


def _rgba(rgb, alpha=255):
    return tuple(int(round(c * 255)) for c in rgb) + (alpha,)


# ---------------------------------------------------------------- mucosa and optics

def _mucosa(s, rng, xx, yy) -> np.ndarray:
    h, w, side = s.height, s.width, min(s.width, s.height)
    base = np.array(colorsys.hsv_to_rgb(s.hue / 360, s.sat, s.val), np.float32)
    img = base * (1 + 0.10 * _smooth(rng, h, w, 4))[..., None]
    tint = 0.05 * _smooth(rng, h, w, 3)
    img[..., 0] += tint
    img[..., 2] -= 0.5 * tint
    lx, ly = s.lumen
    d = np.hypot(xx - lx, yy - ly) / side
    depth = {"cecum": 0.0, "pylorus": 0.35}.get(s.landmark, rng.uniform(0.55, 0.85))
    img *= (1 - depth * np.exp(-(d / rng.uniform(0.13, 0.2)) ** 2))[..., None]
    arg = _fold_phase(s, rng, xx, yy, d)
    img *= (1 - 0.3 * np.clip((np.sin(arg) - 0.45) / 0.55, 0, 1) ** 1.5)[..., None]
    img += 0.07 * np.clip((np.sin(arg + 1.0) - 0.8) / 0.2, 0, 1)[..., None]  # lit fold edge
    if s.category == "ulcerative colitis":  # granular, friable, no vessel pattern
        img *= 1 + np.float32(0.09) * rng.standard_normal((h, w, 1), np.float32)
    elif s.procedure == "colonoscopy":
        img = _vessels(img, s, rng, base)
    return img


def _fold_phase(s, rng, xx, yy, d) -> np.ndarray:
    side = min(s.width, s.height)
    th = np.arctan2(yy - s.lumen[1], xx - s.lumen[0])
    if s.folds == "rings":  # haustral folds around the colon lumen
        k = rng.uniform(3.5, 5.5)
        wobble = sum(rng.uniform(0.3, 0.8) * np.sin(m * th + rng.uniform(0, 6.3)) for m in (2, 3))
        return 2 * np.pi * k * np.sqrt(d) + wobble
    if s.folds == "radial":  # longitudinal oesophageal folds
        n = int(rng.integers(5, 9))
        return n * th + 1.5 * np.sin(6 * d + rng.uniform(0, 6.3)) + rng.uniform(0, 6.3)
    a = rng.uniform(0, np.pi)  # gastric rugae: wavy parallel ridges
    u = (xx * math.cos(a) + yy * math.sin(a)) / side
    v = (-xx * math.sin(a) + yy * math.cos(a)) / side
    return 2 * np.pi * rng.uniform(2.2, 3.5) * u + 1.2 * np.sin(2 * np.pi * rng.uniform(1, 2) * v)


def _vessels(img, s, rng, base) -> np.ndarray:
    lay, dr = _layer(s)
    side = min(s.width, s.height)
    colour = _rgba(base * np.array([0.75, 0.35, 0.45]), 110)
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.uniform(0, s.width), rng.uniform(0, s.height)
        a, pts = rng.uniform(0, 2 * np.pi), []
        for _ in range(6):
            pts.append(_pt(x, y))
            a += rng.uniform(-0.7, 0.7)
            x, y = x + side * 0.08 * math.cos(a), y + side * 0.08 * math.sin(a)
        dr.line(pts, fill=colour, width=SS, joint="curve")
    return _paint(img, lay)


def _specular(img, s, rng, xx, yy) -> np.ndarray:
    """Glints of the light source on wet mucosa."""
    cx, cy, img = s.width / 2, s.height / 2, img.copy()
    for _ in range(int(rng.integers(2, 7))):
        r, a = s.fov_r * 0.8 * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        sx, sy = rng.uniform(0.5, 1.6), rng.uniform(0.5, 1.2)
        px, py = cx + r * math.cos(a), cy + r * math.sin(a)
        win = _window(px, py, 6, s)
        g = np.exp(-((xx[win] - px) / sx) ** 2 - ((yy[win] - py) / sy) ** 2)
        img[win] += rng.uniform(0.5, 0.9) * g[..., None]
    return img


def _optics(img, s, rng, xx, yy) -> np.ndarray:
    """Vignette, sensor noise and the black surround of the round field of view."""
    r = np.hypot(xx - s.width / 2, yy - s.height / 2) / s.fov_r
    img = img * (1 - rng.uniform(0.35, 0.6) * r ** 2.2)[..., None]
    img = img + np.float32(rng.uniform(0.012, 0.03)) * rng.standard_normal(img.shape, np.float32)
    inside = np.clip((1 - r) * s.fov_r + 0.5, 0, 1)[..., None]
    dark = 0.02 + np.float32(0.006) * rng.standard_normal(img.shape, np.float32)
    return img * inside + dark * (1 - inside)


# ---------------------------------------------------------------- landmarks

def _polar(xx, yy, x, y):
    return np.hypot(xx - x, yy - y), np.arctan2(yy - y, xx - x)


def _z_line(img, s, rng, xx, yy) -> np.ndarray:
    """Irregular border of pale squamous oesophagus and red-orange gastric mucosa."""
    d, th = _polar(xx, yy, *s.landmark_xy)
    r0 = min(s.width, s.height) * rng.uniform(0.16, 0.24)
    rb = r0 * (1 + sum(rng.uniform(0.03, 0.1) * np.sin(k * th + rng.uniform(0, 6.3))
                       for k in range(3, 7)))
    inner = np.clip(rb - d + 0.5, 0, 1)[..., None]
    pale = img * 0.5 + np.array([0.47, 0.36, 0.36], np.float32)  # pink-white squamous lining
    gastric = np.array([0.82, 0.30, 0.20], np.float32) * (img / img.mean(axis=2, keepdims=True))
    img = pale * (1 - inner) + np.clip(gastric, 0, 1) * inner
    return img * (1 - 0.75 * np.exp(-(d / (0.4 * r0)) ** 2))[..., None]


def _pylorus(img, s, rng, xx, yy) -> np.ndarray:
    """Small round opening with converging folds in orange gastric mucosa."""
    d, th = _polar(xx, yy, *s.landmark_xy)
    ro = min(s.width, s.height) * rng.uniform(0.05, 0.075)
    ring = np.exp(-((d - 2.0 * ro) / (1.3 * ro)) ** 2)
    rad = 0.5 + 0.5 * np.sin(int(rng.integers(6, 10)) * th + rng.uniform(0, 6.3))
    img = img * (1 - 0.45 * ring * rad)[..., None] + (0.12 * ring * (1 - rad))[..., None]
    hole = np.clip(ro * (1 + 0.15 * np.sin(3 * th)) - d + 0.5, 0, 1)[..., None]
    return img * (1 - hole) + np.array([0.13, 0.03, 0.03], np.float32) * hole


def _cecum(img, s, rng, xx, yy) -> np.ndarray:
    """Triradiate fold and the crescent of the appendiceal orifice."""
    x, y = s.landmark_xy
    side = min(s.width, s.height)
    lay, dr = _layer(s)
    a0 = rng.uniform(0, 2 * np.pi)
    for k in range(3):
        a = a0 + k * 2 * np.pi / 3
        end = (x + side * 0.24 * math.cos(a), y + side * 0.24 * math.sin(a))
        dr.line([_pt(x, y), _pt(*end)], fill=(255, 225, 220, 120), width=int(side * 0.05 * SS))
    ro = side * rng.uniform(0.045, 0.065)
    start = math.degrees(a0 + np.pi / 3)
    dr.arc([_pt(x - ro, y - ro), _pt(x + ro, y + ro)], start, start + 200,
           fill=(70, 15, 20, 255), width=max(2, int(side * 0.022 * SS)))
    return _paint(img, lay.filter(ImageFilter.BoxBlur(SS // 2)))


_LANDMARKS = {"z-line": _z_line, "pylorus": _pylorus, "cecum": _cecum}


# ---------------------------------------------------------------- findings

def _polyp(img, f, s, rng, xx, yy) -> np.ndarray:
    """A lit dome with a shadowed rim and a glint, lit from the upper left."""
    rot, ecc = rng.uniform(0, np.pi), rng.uniform(0.8, 1.0)
    rgb = np.array(POLYP_RGB[f.colours[0]], np.float32) * rng.uniform(0.93, 1.05, 3)
    win = _window(f.x, f.y, int(f.r * 1.5) + 2, s)  # the polyp and its shadow
    xx, yy, sub = xx[win], yy[win], img[win]
    dx, dy = xx - f.x, yy - f.y
    u = (dx * math.cos(rot) + dy * math.sin(rot)) / f.r
    v = (-dx * math.sin(rot) + dy * math.cos(rot)) / (f.r * ecc)
    d = np.sqrt(u * u + v * v)
    sub = sub * (1 - 0.35 * np.exp(-((d - 1.05) / 0.22) ** 2))[..., None]
    cover = np.clip((1 - d) * f.r + 0.5, 0, 1)[..., None]
    z = np.sqrt(np.clip(1 - d * d, 0, 1))
    light = 0.62 + 0.38 * z - 0.18 * (dx + dy) / (f.r * 1.41)
    body = (0.8 * rgb + 0.2 * sub) * light[..., None]  # a little of the mucosa shows through
    sub = sub * (1 - cover) + body * cover
    sig = max(0.7, 0.12 * f.r)
    glint = np.exp(-((xx - f.x + 0.35 * f.r) ** 2 + (yy - f.y + 0.35 * f.r) ** 2) / (2 * sig ** 2))
    img = img.copy()
    img[win] = sub + 0.5 * glint[..., None] * cover
    return img


def _streak(dr, x, y, a, length, width, fill):
    c, sn = math.cos(a) * length / 2, math.sin(a) * length / 2
    dr.line([_pt(x - c, y - sn), _pt(x + c, y + sn)], fill=fill, width=int(width * SS))
    for ex, ey in ((x - c, y - sn), (x + c, y + sn)):
        dr.ellipse([_pt(ex - width / 2, ey - width / 2), _pt(ex + width / 2, ey + width / 2)], fill)


def _esophagitis(img, f, s, rng, xx, yy) -> np.ndarray:
    """Red linear erosions running away from the lumen, sometimes with white exudate."""
    side = min(s.width, s.height)
    lay, dr = _layer(s)
    ang = math.atan2(f.y - s.lumen[1], f.x - s.lumen[0])
    for _ in range(int(rng.integers(3, 7))):
        a = ang + rng.uniform(-0.35, 0.35)
        off, along = rng.uniform(-0.6, 0.6) * f.r, rng.uniform(-0.3, 0.3) * f.r
        x = f.x - off * math.sin(a) + along * math.cos(a)
        y = f.y + off * math.cos(a) + along * math.sin(a)
        _streak(dr, x, y, a, f.r * rng.uniform(0.9, 1.6), max(1.5, side * rng.uniform(0.025, 0.04)),
                (175, 18, 26, 235))
    if "white" in f.colours:
        for _ in range(int(rng.integers(2, 5))):
            x, y = f.x + rng.uniform(-0.6, 0.6) * f.r, f.y + rng.uniform(-0.6, 0.6) * f.r
            _streak(dr, x, y, ang, side * 0.04, max(1.5, side * 0.025), (245, 240, 222, 245))
    return _paint(img, lay.filter(ImageFilter.BoxBlur(SS // 2)))


def _colitis(img, f, s, rng, xx, yy) -> np.ndarray:
    """A blotchy, granular patch of deep red inflamed mucosa, sometimes with white ulcers."""
    m = np.exp(-((xx - f.x) ** 2 + (yy - f.y) ** 2) / (2 * (0.7 * f.r) ** 2))
    m = np.clip(m * (1.5 + 0.5 * _smooth(rng, s.height, s.width, 6)), 0, 1)[..., None] * 0.92
    grain = 1 + np.float32(0.15) * rng.standard_normal((s.height, s.width, 1), np.float32)
    img = img * (1 - m) + np.array([0.58, 0.05, 0.07], np.float32) * grain * m
    if "white" not in f.colours:
        return img
    lay, dr = _layer(s)
    side = min(s.width, s.height)
    for _ in range(int(rng.integers(3, 7))):
        x, y = f.x + rng.uniform(-0.55, 0.55) * f.r, f.y + rng.uniform(-0.55, 0.55) * f.r
        rx, ry = side * rng.uniform(0.018, 0.035), side * rng.uniform(0.015, 0.03)
        dr.ellipse([_pt(x - rx, y - ry), _pt(x + rx, y + ry)], fill=(245, 242, 225, 245))
    return _paint(img, lay)


_FINDINGS = {"polyp": _polyp, "esophagitis": _esophagitis, "ulcerative colitis": _colitis}


# ---------------------------------------------------------------- instruments

def _forceps(dr, ins, u, side, rng):
    tip = (ins.x - u[0] * side * 0.03, ins.y - u[1] * side * 0.03)
    w = side * 0.055
    dr.line([_pt(ins.entry_x, ins.entry_y), _pt(*tip)], fill=(135, 136, 145, 255),
            width=int(w * SS))
    n = (-u[1], u[0])
    dr.line([_pt(ins.entry_x + n[0] * w * 0.2, ins.entry_y + n[1] * w * 0.2),
             _pt(tip[0] + n[0] * w * 0.2, tip[1] + n[1] * w * 0.2)],
            fill=(210, 210, 218, 255), width=max(1, int(w * 0.3 * SS)))
    for sgn in (1, -1):
        a = math.atan2(u[1], u[0]) + sgn * 0.5
        end = (tip[0] + side * 0.075 * math.cos(a), tip[1] + side * 0.075 * math.sin(a))
        dr.line([_pt(*tip), _pt(*end)], fill=(180, 182, 190, 255), width=int(side * 0.03 * SS))
        cr = side * 0.025
        dr.ellipse([_pt(end[0] - cr, end[1] - cr), _pt(end[0] + cr, end[1] + cr)],
                   fill=(165, 167, 176, 255), outline=(80, 80, 88, 255), width=SS)


def _snare(dr, ins, u, side, rng):
    lr = side * rng.uniform(0.08, 0.11)
    end = (ins.x - u[0] * lr, ins.y - u[1] * lr)
    dr.line([_pt(ins.entry_x, ins.entry_y), _pt(*end)], fill=(205, 220, 240, 240),
            width=int(side * 0.04 * SS))
    a0 = math.atan2(u[1], u[0])
    pts = [(lr * math.cos(t), 0.65 * lr * math.sin(t)) for t in np.linspace(0, 2 * np.pi, 33)]
    pts = [_pt(ins.x + px * math.cos(a0) - py * math.sin(a0), ins.y + px * math.sin(a0)
               + py * math.cos(a0)) for px, py in pts]
    dr.line(pts, fill=(245, 245, 250, 255), width=max(2, int(side * 0.016 * SS)), joint="curve")


def _clip(dr, ins, u, side, rng):
    a = rng.uniform(0, 2 * np.pi)
    c, sn = math.cos(a), math.sin(a)
    back, front = (ins.x - c * side * 0.06, ins.y - sn * side * 0.06), (ins.x + c * side * 0.03,
                                                                         ins.y + sn * side * 0.03)
    dr.line([_pt(*back), _pt(*front)], fill=(80, 82, 95, 255), width=int(side * 0.065 * SS))
    dr.line([_pt(*back), _pt(*front)], fill=(200, 203, 214, 255), width=int(side * 0.045 * SS))
    for sgn in (1, -1):
        b = a + sgn * 0.35
        end = (front[0] + side * 0.07 * math.cos(b), front[1] + side * 0.07 * math.sin(b))
        dr.line([_pt(*front), _pt(*end)], fill=(220, 222, 230, 255), width=int(side * 0.022 * SS))


def _needle(dr, ins, u, side, rng):
    dr.line([_pt(ins.entry_x, ins.entry_y), _pt(ins.x, ins.y)], fill=(45, 95, 205, 240),
            width=int(side * 0.035 * SS))
    end = (ins.x + u[0] * side * 0.06, ins.y + u[1] * side * 0.06)
    dr.line([_pt(ins.x, ins.y), _pt(*end)], fill=(230, 230, 236, 255),
            width=max(2, int(side * 0.012 * SS)))


_INSTRUMENTS = {"biopsy forceps": _forceps, "polyp snare": _snare, "metal clip": _clip,
                "injection needle": _needle}


def _instruments(img, s, rng) -> np.ndarray:
    lay, dr = _layer(s)
    side = min(s.width, s.height)
    for ins in s.instruments:
        dx, dy = ins.x - ins.entry_x, ins.y - ins.entry_y
        n = math.hypot(dx, dy) or 1.0
        _INSTRUMENTS[ins.kind](dr, ins, (dx / n, dy / n), side, rng)
    return _paint(img, lay, shadow=0.45)


# ---------------------------------------------------------------- video overlays

@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def _video_overlays(im: Image.Image, s) -> None:
    """The scope-guide box and the text burnt in by the video processor, drawn last."""
    dr = ImageDraw.Draw(im)
    if s.box_rect:
        x0, y0, x1, y1 = s.box_rect
        fill, edge, line = (((20, 125, 48), (80, 215, 100), (8, 50, 18)) if s.box_colour == "green"
                            else ((6, 6, 6), (70, 70, 70), (45, 45, 45)))
        dr.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill, outline=edge)
        bw, bh = x1 - x0, y1 - y0
        dr.line([(x0 + bw * 0.2, y0 + bh * 0.8), (x0 + bw * 0.35, y0 + bh * 0.3),
                 (x0 + bw * 0.65, y0 + bh * 0.7), (x0 + bw * 0.8, y0 + bh * 0.2)],
                fill=line, width=2)
    if s.text_rect:
        x0, y0, x1, y1 = s.text_rect
        font = _font(max(7, int(min(s.width, s.height) * 0.1)))
        step = (y1 - y0 - 2) / len(s.text_lines)
        for k, line in enumerate(s.text_lines):
            tw = dr.textlength(line, font=font)
            x = x0 + 1 if s.text.endswith("left") else x1 - 1 - tw
            dr.text((x, y0 + 1 + k * step), line, fill=(236, 236, 236), font=font)
