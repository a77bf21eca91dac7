"""The embedded "shapes" dataset: synthetic scenes written in the PASCAL VOC layout and as COCO JSON.

Scenes hold 2-6 objects of 7 classes (plus background) with random sizes, rotations, colours and
textures (flat, gradient, stripes, clouds, pixel noise) on a textured background. By default each class
has its own hue band (``colours="class"``, see ``COLOUR_MODES``); ``colours="random"`` draws colours
independently of the class, so a model has to look at shape. Later objects occlude earlier ones. Rings,
bars (1-3 px lines) and thin-armed crosses are thin structures whose boundary pixels make up most of
their area, so region metrics (mIoU) and boundary metrics (BIoU, BF1) disagree and the loss matters.

Files written by :func:`generate_shapes` (``<id>`` = ``train_00000`` ... / ``val_00000`` ...)::

    JPEGImages/<id>.jpg            RGB image (JPEG quality 95, as in VOC; ``image_format="png"`` for lossless)
    SegmentationClass/<id>.png     palette PNG, VOC palette, value = class index, 255 = ignore
    SegmentationObject/<id>.png    palette PNG, value = visible instance index (1..n), 255 = ignore
    ImageSets/Segmentation/{train,val,trainval}.txt   ids, one per line
    classes.txt                    class names, one per line, index = label (background first)
    annotations/instances_{train,val}.json   COCO: boxes, RLE masks, keypoints (schema in categories)
    dataset.json                   generator parameters, seed, counts and a content hash

Coordinates in COCO follow COCO's convention (pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``); masks
are the *visible* (modal) instance masks, so rasterising all instances of an image gives back the VOC
class mask exactly (outside ignore pixels). Keypoint visibility: 2 visible, 1 inside the image but
occluded, 0 outside the image (x = y = 0). Everything is a pure function of the seed: image ``k`` of a
split depends only on ``(seed, split, k)``, and generating twice gives byte-identical files.

Optional VOC-style ignore band (``ignore_band=w`` > 0, default 0 = off): pixels within ``w`` px
(Chebyshev) of an object drawn later are set to 255, i.e. the band lies on the occluded side, so the
object in front (and thin structures) keep all their pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from components.errors import LossforgeError

SHAPES_CLASSES: tuple[str, ...] = (
    "background",
    "ellipse",
    "square",
    "triangle",
    "ring",
    "bar",
    "cross",
    "star",
)
"""Class names of the embedded dataset; the index is the label in the masks."""

IGNORE_LABEL = 255

COLOUR_MODES = ("class", "random")
"""``colours="class"`` (default): each class has its own hue band (jittered hue, saturation, value and
texture), on a low-saturation cluttered background, so a small network trained from scratch for a few
hundred steps can tell classes apart and losses differ on what remains hard: thin structures, small
objects, boundaries and class imbalance. ``"random"``: colours independent of the class (the network has
to recognise shapes; far slower to learn)."""

SHAPES_KEYPOINTS: dict[str, tuple[str, ...]] = {
    "ellipse": ("center", "top", "right", "bottom", "left"),
    "square": ("center", "corner_1", "corner_2", "corner_3", "corner_4"),
    "triangle": ("center", "vertex_1", "vertex_2", "vertex_3"),
    "ring": ("top", "right", "bottom", "left"),
    "bar": ("end_1", "end_2", "center"),
    "cross": ("center", "tip_1", "tip_2", "tip_3", "tip_4"),
    "star": ("center", "tip_1", "tip_2", "tip_3", "tip_4", "tip_5"),
}
"""Named keypoints per class (COCO ``categories[].keypoints``). ``top/right/bottom/left`` are the
extreme points of the outline; numbered corners/vertices/tips go clockwise on screen starting with
the top-most one (smallest y, ties: smallest x); ``end_1`` of a bar is its left-most end; ``center``
is the shape's centre (centroid for triangles)."""

SHAPES_SKELETONS: dict[str, tuple[tuple[int, int], ...]] = {
    "ellipse": ((1, 2), (1, 3), (1, 4), (1, 5)),
    "square": ((2, 3), (3, 4), (4, 5), (5, 2)),
    "triangle": ((2, 3), (3, 4), (4, 2)),
    "ring": ((1, 2), (2, 3), (3, 4), (4, 1)),
    "bar": ((1, 3), (3, 2)),
    "cross": ((1, 2), (1, 3), (1, 4), (1, 5)),
    "star": ((1, 2), (1, 3), (1, 4), (1, 5), (1, 6)),
}
"""COCO skeletons (1-based keypoint indices)."""

DATASET_FORMAT = "lossforge.dataset/1"
SPLIT_NAMES = ("train", "val")


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat list of 768 ints (index 255 = (224, 224, 192))."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


@dataclass(frozen=True)
class ShapesConfig:
    """Generator parameters (recorded in dataset.json)."""

    num_train: int = 400
    num_test: int = 100
    image_size: int = 128
    seed: int = 0
    min_objects: int = 2
    max_objects: int = 6
    image_format: str = "jpg"
    jpeg_quality: int = 95
    ignore_band: int = 0
    colours: str = "class"

    def validate(self) -> None:
        """Raise LossforgeError naming the first bad field."""
        if self.num_train < 1:
            raise LossforgeError(f"num_train must be >= 1, got {self.num_train}")
        if self.num_test < 0:
            raise LossforgeError(f"num_test must be >= 0, got {self.num_test}")
        if not 32 <= self.image_size <= 2048:
            raise LossforgeError(f"image_size must be in [32, 2048], got {self.image_size}")
        if self.seed < 0:
            raise LossforgeError(f"seed must be >= 0, got {self.seed}")
        if not 1 <= self.min_objects <= self.max_objects <= 50:
            raise LossforgeError(
                f"need 1 <= min_objects <= max_objects <= 50, got {self.min_objects}, {self.max_objects}"
            )
        if self.image_format not in ("jpg", "png"):
            raise LossforgeError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise LossforgeError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if not 0 <= self.ignore_band <= 10:
            raise LossforgeError(f"ignore_band must be in [0, 10], got {self.ignore_band}")
        if self.colours not in COLOUR_MODES:
            raise LossforgeError(f"colours must be one of {', '.join(COLOUR_MODES)}, got {self.colours!r}")


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: class name, full (amodal) mask, keypoints ``(x, y)`` in PIL pixel coordinates."""

    category: str
    mask: np.ndarray
    keypoints: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Scene:
    """A rendered scene: ``image`` uint8 (H, W, 3), ``labels`` uint8 (H, W) class map (255 = ignore),
    ``instances`` int32 (H, W) visible instance map (0 background, k = objects[k-1], -1 ignore)."""

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    objects: tuple[ShapeObject, ...]


# ----------------------------------------------------------------------------------- rendering


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _clouds(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1] (bilinear upsampling of a cells x cells grid)."""
    small = (rng.uniform(0, 255, size=(cells, cells))).astype(np.uint8)
    big = Image.fromarray(small, mode="L").resize((size, size), Image.BILINEAR)
    return np.asarray(big, dtype=np.float32) / 255.0


def _texture(rng: np.random.Generator, size: int, base: np.ndarray, kind: str,
             other: np.ndarray | None = None) -> np.ndarray:
    """A (size, size, 3) float texture around colour `base`, mixed with `other` (random by default)."""
    xs, ys = _grid(size)
    if other is None:
        other = _random_colour(rng)
    if kind == "flat":
        tex = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = (xs * np.cos(angle) + ys * np.sin(angle)) / size
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        mix = rng.uniform(0.3, 0.8)
        tex = base + (other - base) * (mix * t)[..., None]
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(3.0, 14.0)
        phase = rng.uniform(0, 2 * np.pi)
        s = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period + phase)
        contrast = rng.uniform(0.25, 0.7)
        tex = base + (other - base) * (contrast * (s > 0))[..., None]
    else:  # clouds
        cloud = _clouds(rng, size, int(rng.integers(3, 9)))
        contrast = rng.uniform(0.3, 0.8)
        tex = base + (other - base) * (contrast * cloud)[..., None]
    sigma = rng.uniform(0.0, 14.0)
    tex = tex + rng.normal(0.0, sigma, size=(size, size, 3)).astype(np.float32)
    return tex


def _class_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    """A colour in class ``cls``'s hue band (hues evenly spaced over the classes, ±0.025 jitter)."""
    import colorsys

    hue = ((cls - 1) / (len(SHAPES_CLASSES) - 1) + rng.uniform(-0.025, 0.025)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    return (np.array(rgb) * 255).astype(np.float32)


def _grey_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour (the background of ``colours="class"`` scenes)."""
    grey = rng.uniform(30, 200)
    return (grey + rng.uniform(-15, 15, size=3)).astype(np.float32)


def _background(rng: np.random.Generator, size: int, colours: str = "random") -> np.ndarray:
    if colours == "class":
        tex = _texture(rng, size, _grey_colour(rng), str(rng.choice(["gradient", "stripes", "clouds", "clouds"])),
                       other=_grey_colour(rng))
        return tex
    base = _random_colour(rng)
    kind = rng.choice(["gradient", "stripes", "clouds", "clouds"])
    tex = _texture(rng, size, base, str(kind))
    if rng.uniform() < 0.5:  # a second layer of low-contrast clutter
        tex = 0.75 * tex + 0.25 * _texture(rng, size, _random_colour(rng), "clouds")
    return tex


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _ordered_clockwise(points: np.ndarray) -> np.ndarray:
    """Points sorted clockwise on screen around their mean, starting with the top-most."""
    centre = points.mean(axis=0)
    ang = np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0])  # y down => clockwise
    order = np.argsort(ang, kind="stable")
    pts = points[order]
    start = min(range(len(pts)), key=lambda i: (round(pts[i, 1], 6), round(pts[i, 0], 6)))
    return np.roll(pts, -start, axis=0)


def _extremes(outline: np.ndarray) -> list[tuple[float, float]]:
    """Top, right, bottom, left extreme points of a polygon outline."""
    return [
        tuple(outline[np.argmin(outline[:, 1])]),
        tuple(outline[np.argmax(outline[:, 0])]),
        tuple(outline[np.argmax(outline[:, 1])]),
        tuple(outline[np.argmin(outline[:, 0])]),
    ]


def _polygon_mask(size: int, points: np.ndarray) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in points], fill=255)
    return np.asarray(img) > 0


def _draw_object(rng: np.random.Generator, category: str, size: int) -> ShapeObject:
    """Sample geometry for one object of `category` and rasterise its mask."""
    cx, cy = rng.uniform(0.05 * size, 0.95 * size, size=2)
    centre = np.array([cx, cy])
    radius = float(np.exp(rng.uniform(np.log(0.07 * size), np.log(0.25 * size))))
    angle = rng.uniform(0, 2 * np.pi)
    if category == "ellipse":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        local = np.stack([radius * np.cos(t), radius * rng.uniform(0.55, 1.0) * np.sin(t)], axis=1)
        outline = _rotate(local, angle) + centre
        mask = _polygon_mask(size, outline)
        kps = [tuple(centre)] + _extremes(outline)
    elif category == "square":
        h = radius / np.sqrt(2)
        local = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
        corners = _rotate(local, angle) + centre
        mask = _polygon_mask(size, corners)
        kps = [tuple(centre)] + [tuple(p) for p in _ordered_clockwise(corners)]
    elif category == "triangle":
        ang = angle + np.radians([0.0, 120.0 + rng.uniform(-20, 20), 240.0 + rng.uniform(-20, 20)])
        rad = radius * rng.uniform(0.8, 1.1, size=3)
        verts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1) + centre
        mask = _polygon_mask(size, verts)
        kps = [tuple(verts.mean(axis=0))] + [tuple(p) for p in _ordered_clockwise(verts)]
    elif category == "ring":
        r = max(radius, 5.0)
        width = int(rng.integers(1, 4))
        img = Image.new("L", (size, size), 0)
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=width)
        mask = np.asarray(img) > 0
        kps = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    elif category == "bar":
        half = rng.uniform(0.15, 0.4) * size
        width = int(rng.integers(1, 4))
        d = np.array([np.cos(angle), np.sin(angle)]) * half
        ends = np.array([centre - d, centre + d])
        img = Image.new("L", (size, size), 0)
        ImageDraw.Draw(img).line([tuple(ends[0]), tuple(ends[1])], fill=255, width=width)
        mask = np.asarray(img) > 0
        ends = ends[np.lexsort((ends[:, 1], ends[:, 0]))]
        kps = [tuple(ends[0]), tuple(ends[1]), tuple(centre)]
    elif category == "cross":
        arm = radius
        hw = rng.uniform(1.0, max(1.5, 0.18 * radius))
        local = np.array(
            [[-hw, -arm], [hw, -arm], [hw, -hw], [arm, -hw], [arm, hw], [hw, hw],
             [hw, arm], [-hw, arm], [-hw, hw], [-arm, hw], [-arm, -hw], [-hw, -hw]]
        )
        outline = _rotate(local, angle) + centre
        mask = _polygon_mask(size, outline)
        tips = _rotate(np.array([[0, -arm], [arm, 0], [0, arm], [-arm, 0]]), angle) + centre
        kps = [tuple(centre)] + [tuple(p) for p in _ordered_clockwise(tips)]
    elif category == "star":
        inner = radius * rng.uniform(0.38, 0.5)
        k = np.arange(10)
        rad = np.where(k % 2 == 0, radius, inner)
        ang = angle + k * np.pi / 5
        outline = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1) + centre
        mask = _polygon_mask(size, outline)
        kps = [tuple(centre)] + [tuple(p) for p in _ordered_clockwise(outline[0::2])]
    else:  # pragma: no cover - categories come from SHAPES_CLASSES
        raise ValueError(category)
    kps_f = tuple((float(x), float(y)) for x, y in kps)
    assert len(kps_f) == len(SHAPES_KEYPOINTS[category])
    return ShapeObject(category=category, mask=mask, keypoints=kps_f)


def _ignore_band(instances: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` px of an instance drawn later than their own (background = 0)."""
    k = 2 * width + 1
    padded = np.pad(instances, width, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k))
    return windows.max(axis=(-2, -1)) > instances


def render_scene(
    rng: np.random.Generator,
    image_size: int = 128,
    min_objects: int = 2,
    max_objects: int = 6,
    ignore_band: int = 0,
    required_class: int | None = None,
    colours: str = "random",
) -> Scene:
    """Render one scene from `rng`. `required_class` (1..7) forces one object of that class, drawn last
    (on top, so it is visible)."""
    size = image_size
    image = _background(rng, size, colours)
    labels = np.zeros((size, size), dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.int32)
    n = int(rng.integers(min_objects, max_objects + 1))
    classes = [int(c) for c in rng.integers(1, len(SHAPES_CLASSES), size=n)]
    if required_class is not None:
        classes[-1] = required_class
    bg_mean = image.mean(axis=(0, 1))
    objects: list[ShapeObject] = []
    for cls in classes:
        obj = _draw_object(rng, SHAPES_CLASSES[cls], size)
        if colours == "class":
            colour = _class_colour(rng, cls)
            other = colour * rng.uniform(0.55, 0.85)  # same hue, darker: texture without changing the class cue
        else:
            other = None
            colour = _random_colour(rng)
            for _ in range(8):  # keep some contrast with the background's mean colour
                if np.abs(colour - bg_mean).sum() > 90:
                    break
                colour = _random_colour(rng)
        kind = str(rng.choice(["flat", "gradient", "stripes", "clouds"], p=[0.3, 0.25, 0.25, 0.2]))
        tex = _texture(rng, size, colour, kind, other=other)
        image[obj.mask] = tex[obj.mask]
        labels[obj.mask] = cls
        instances[obj.mask] = len(objects) + 1
        objects.append(obj)
    if ignore_band > 0:
        band = _ignore_band(instances, ignore_band)
        labels[band] = IGNORE_LABEL
        instances = np.where(band, -1, instances)
    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Scene(image=image_u8, labels=labels, instances=instances, objects=tuple(objects))


# ------------------------------------------------------------------------------------- writing


def _palette_png(array: np.ndarray, palette: list[int]) -> bytes:
    img = Image.fromarray(array.astype(np.uint8), mode="L")
    img = img.convert("P")  # "L" -> "P" keeps the indices, then we replace the palette
    img.putpalette(palette)
    buf = BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image_bytes(image: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = BytesIO()
    if fmt == "jpg":
        Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _coco_annotations(scene: Scene, image_id: int, first_ann_id: int) -> list[dict]:
    """COCO annotations of the visible instances of `scene` (RLE masks, boxes, keypoints)."""
    from pycocotools import mask as mask_utils

    anns = []
    size = scene.labels.shape[0]
    for k, obj in enumerate(scene.objects, start=1):
        visible = scene.instances == k
        if not visible.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        keypoints: list[float] = []
        num_visible = 0
        for x, y in obj.keypoints:
            ix, iy = int(round(x)), int(round(y))
            if not (0 <= ix < size and 0 <= iy < size):
                keypoints += [0.0, 0.0, 0]
                continue
            near = visible[max(iy - 1, 0): iy + 2, max(ix - 1, 0): ix + 2]
            v = 2 if near.any() else 1
            keypoints += [round(x + 0.5, 2), round(y + 0.5, 2), v]
            num_visible += 1
        anns.append(
            {
                "id": first_ann_id + len(anns),
                "image_id": image_id,
                "category_id": SHAPES_CLASSES.index(obj.category),
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
                "keypoints": keypoints,
                "num_keypoints": num_visible,
            }
        )
    return anns


def coco_categories() -> list[dict]:
    """COCO categories of the shapes dataset, with their keypoint schema (id = VOC label)."""
    return [
        {
            "id": i,
            "name": name,
            "supercategory": "shape",
            "keypoints": list(SHAPES_KEYPOINTS[name]),
            "skeleton": [list(e) for e in SHAPES_SKELETONS[name]],
        }
        for i, name in enumerate(SHAPES_CLASSES)
        if i > 0
    ]


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _write_json(path: Path, obj: dict, indent: int | None = None) -> None:
    text = json.dumps(obj, indent=indent, separators=(",", ":") if indent is None else None)
    _write_bytes(path, (text + "\n").encode("utf-8"))


def content_hash(root: str | os.PathLike, exclude: tuple[str, ...] = ("dataset.json",)) -> str:
    """sha256 over every file's relative path and bytes under `root` (sorted), excluding `exclude`."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        h.update(rel.encode("utf-8") + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def split_ids(split: str, count: int) -> list[str]:
    """Ids of the generated images of `split` ("train" or "val")."""
    return [f"{split}_{k:05d}" for k in range(count)]


def _is_replaceable(out: Path) -> bool:
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    meta = out / "dataset.json"
    try:
        return json.loads(meta.read_text()).get("format") == DATASET_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def ensure_shapes(out_dir: str | os.PathLike, num_train: int = 400, num_test: int = 100, image_size: int = 128,
                  seed: int = 0, **options) -> Path:
    """Generate the embedded dataset into `out_dir` unless a dataset with the same parameters is already there.

    Every generator parameter counts, defaults included (a dataset written by an older generator with other
    defaults, e.g. random colours, is regenerated)."""
    root = Path(out_dir)
    meta = root / "dataset.json"
    known = {f for f in ShapesConfig.__dataclass_fields__}
    given = {"num_train": num_train, "num_test": num_test, "image_size": image_size, "seed": seed, **options}
    wanted = {**asdict(ShapesConfig()), **{k: v for k, v in given.items() if k in known}}
    if meta.exists():
        try:
            have = json.loads(meta.read_text(encoding="utf-8")).get("params", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            have = {}
        if isinstance(have, dict) and all(have.get(k) == v for k, v in wanted.items()):
            return root
    return generate_shapes(root, num_train, num_test, image_size, seed, **options)


def generate_shapes(
    out_dir: str | os.PathLike,
    num_train: int = 400,
    num_test: int = 100,
    image_size: int = 128,
    seed: int = 0,
    *,
    min_objects: int = 2,
    max_objects: int = 6,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    ignore_band: int = 0,
    colours: str = "class",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Generate the embedded dataset into `out_dir` (VOC layout + COCO JSON, see module doc); return it.

    The test images form the VOC ``val`` split. `out_dir` must be absent, empty or an earlier shapes
    dataset (it is replaced as a whole). `progress(done, total)` is called after each image.
    """
    cfg = ShapesConfig(
        num_train=num_train, num_test=num_test, image_size=image_size, seed=seed,
        min_objects=min_objects, max_objects=max_objects, image_format=image_format,
        jpeg_quality=jpeg_quality, ignore_band=ignore_band, colours=colours,
    )
    cfg.validate()
    out = Path(out_dir)
    if not _is_replaceable(out):
        raise LossforgeError(f"{out}: exists and is not an embedded shapes dataset; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _generate_into(tmp, cfg, progress)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _generate_into(root: Path, cfg: ShapesConfig, progress: Callable[[int, int], None] | None) -> None:
    palette = voc_palette()
    counts = {"train": cfg.num_train, "val": cfg.num_test}
    total = cfg.num_train + cfg.num_test
    done = 0
    image_id = 1
    ann_id = 1
    categories = coco_categories()
    ext = cfg.image_format
    for split_index, split in enumerate(SPLIT_NAMES):
        ids = split_ids(split, counts[split])
        images, annotations = [], []
        for k, sid in enumerate(ids):
            rng = np.random.default_rng([cfg.seed, split_index, k])
            scene = render_scene(
                rng, cfg.image_size, cfg.min_objects, cfg.max_objects, cfg.ignore_band,
                required_class=1 + k % (len(SHAPES_CLASSES) - 1), colours=cfg.colours,
            )
            _write_bytes(root / "JPEGImages" / f"{sid}.{ext}", _image_bytes(scene.image, ext, cfg.jpeg_quality))
            _write_bytes(root / "SegmentationClass" / f"{sid}.png", _palette_png(scene.labels, palette))
            objects = np.where(scene.instances < 0, IGNORE_LABEL, scene.instances).astype(np.uint8)
            _write_bytes(root / "SegmentationObject" / f"{sid}.png", _palette_png(objects, palette))
            images.append(
                {"id": image_id, "file_name": f"{sid}.{ext}", "width": cfg.image_size, "height": cfg.image_size}
            )
            anns = _coco_annotations(scene, image_id, ann_id)
            annotations += anns
            ann_id += len(anns)
            image_id += 1
            done += 1
            if progress is not None:
                progress(done, total)
        _write_bytes(root / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(i + "\n" for i in ids).encode())
        coco = {
            "info": {
                "description": f"Lossforge embedded shapes dataset ({split})",
                "version": "1",
                "contributor": "lossforge",
                "url": "",
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        _write_json(root / "annotations" / f"instances_{split}.json", coco)
    all_ids = split_ids("train", cfg.num_train) + split_ids("val", cfg.num_test)
    _write_bytes(root / "ImageSets" / "Segmentation" / "trainval.txt", "".join(i + "\n" for i in all_ids).encode())
    _write_bytes(root / "classes.txt", "".join(c + "\n" for c in SHAPES_CLASSES).encode())
    meta = {
        "format": DATASET_FORMAT,
        "name": "shapes",
        "generator": "components.tasks.segmentation.shapes.generate_shapes",
        "params": asdict(cfg),
        "classes": list(SHAPES_CLASSES),
        "ignore_label": IGNORE_LABEL,
        "splits": {"train": cfg.num_train, "val": cfg.num_test},
        "image_dir": "JPEGImages",
        "mask_dir": "SegmentationClass",
        "content_sha256": content_hash(root),
    }
    _write_json(root / "dataset.json", meta, indent=2)
