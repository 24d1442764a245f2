"""Synthetic scenes: coloured shapes drawn with Pillow, and captions that describe them.

The demo web shows these images, and the score stage trains a tiny CLIP on
(render_scene, describe_scene) pairs, so a caption must depend on the shape, the colour,
the count and the background, and the picture must show exactly that.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Iterable

from PIL import Image, ImageChops, ImageDraw

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "stripes",
)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 38),
    "green": (34, 150, 58),
    "blue": (36, 76, 206),
    "yellow": (242, 206, 30),
    "orange": (244, 128, 22),
    "purple": (124, 52, 168),
    "black": (22, 22, 22),
    "pink": (238, 120, 178),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 244),
    "grey": (140, 140, 140),
    "black": (18, 18, 20),
    "beige": (230, 214, 180),
}
MAX_COUNT = 5
LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "ja", "es")


@dataclass(frozen=True)
class Scene:
    """What one picture shows: `count` shapes of one kind and colour on a plain background."""

    shape: str
    color: str
    background: str
    count: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {tuple(COLORS)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {tuple(BACKGROUNDS)}")
        if self.color == self.background:
            raise ValueError(f"a {self.color} shape on a {self.background} background is invisible")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be in 1..{MAX_COUNT}, got {self.count}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "Scene":
        return cls(str(data["shape"]), str(data["color"]), str(data["background"]), int(data["count"]))  # type: ignore[arg-type]


def random_scene(rng: random.Random, max_count: int = 4) -> Scene:
    """Draw a scene uniformly over shapes, colours, visible backgrounds and counts 1..max_count."""
    shape = rng.choice(SHAPES)
    color = rng.choice(tuple(COLORS))
    background = rng.choice(tuple(b for b in BACKGROUNDS if b != color))
    return Scene(shape, color, background, rng.randint(1, max_count))


def different_scene(scene: Scene, rng: random.Random) -> Scene:
    """A scene that differs from `scene` in one or two of shape, colour and count.

    Used for alt texts that look like captions but describe another picture (hard negatives).
    """
    fields = rng.sample(("shape", "color", "count"), k=rng.choice((1, 1, 2)))
    shape, color, background, count = scene.shape, scene.color, scene.background, scene.count
    if "shape" in fields:
        shape = rng.choice([s for s in SHAPES if s != shape])
    if "color" in fields:
        color = rng.choice([c for c in COLORS if c not in (color, background)])
    if "count" in fields:
        count = rng.choice([n for n in range(1, 5) if n != count])
    return Scene(shape, color, background, count)


# --------------------------------------------------------------------------------------
# Rendering


def _default_rng(scene: Scene, size: tuple[int, int]) -> random.Random:
    # str seeds are hashed with SHA-512, so this is stable across runs and Python versions.
    return random.Random(f"render:{scene.shape}:{scene.color}:{scene.background}:{scene.count}:{size}")


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _rotate(points: Iterable[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return [(cx + x * cos_a - y * sin_a, cy + x * sin_a + y * cos_a) for x, y in points]


def _regular_polygon(n: int, radius: float, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


def shape_primitives(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[str, object]]:
    """Geometry of one shape as drawing primitives: ("polygon", points), ("ellipse", bbox) or
    ("ring", (bbox, width)). Shared by the raster and the SVG renderer so both show the same thing."""
    if shape == "circle":
        return [("ellipse", (cx - r, cy - r, cx + r, cy + r))]
    if shape == "ring":
        return [("ring", ((cx - r, cy - r, cx + r, cy + r), max(2.0, r * 0.32)))]
    if shape == "square":
        s = r * 0.82
        return [("polygon", _rotate([(-s, -s), (s, -s), (s, s), (-s, s)], cx, cy, angle))]
    if shape == "triangle":
        return [("polygon", _rotate(_regular_polygon(3, r * 1.05), cx, cy + r * 0.15, angle))]
    if shape == "star":
        pts = [((r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + math.pi * i / 5),
                (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + math.pi * i / 5)) for i in range(10)]
        return [("polygon", _rotate(pts, cx, cy, angle))]
    if shape == "cross":
        a, w = r, r * 0.32
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
        return [("polygon", _rotate(pts, cx, cy, angle))]
    if shape == "diamond":
        return [("polygon", _rotate([(0, -r), (r * 0.62, 0), (0, r), (-r * 0.62, 0)], cx, cy, angle))]
    if shape == "hexagon":
        return [("polygon", _rotate(_regular_polygon(6, r, 0.0), cx, cy, angle))]
    raise ValueError(f"no single-shape geometry for {shape!r}")


def scene_layout(scene: Scene, size: tuple[int, int], rng: random.Random) -> list[tuple[str, object]]:
    """Place the scene's shapes on a width x height canvas: one grid cell per shape (so the count
    is readable), with jitter in position, size and rotation."""
    width, height = size
    if scene.shape == "stripes":
        return _stripe_primitives(scene.count, width, height, rng)
    cols, rows = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2), 5: (3, 2)}[scene.count]
    if height > width and cols > rows:
        cols, rows = rows, cols
    cell_w, cell_h = width / cols, height / rows
    cells = [(c, r) for r in range(rows) for c in range(cols)][: scene.count]
    primitives: list[tuple[str, object]] = []
    for col, row in cells:
        radius = min(cell_w, cell_h) * rng.uniform(0.28, 0.38)
        cx = (col + 0.5) * cell_w + rng.uniform(-0.08, 0.08) * cell_w
        cy = (row + 0.5) * cell_h + rng.uniform(-0.08, 0.08) * cell_h
        angle = math.radians(rng.uniform(-14, 14))
        primitives.extend(shape_primitives(scene.shape, cx, cy, radius, angle))
    return primitives


def _stripe_primitives(count: int, width: int, height: int, rng: random.Random) -> list[tuple[str, object]]:
    """`count` parallel bands across the whole canvas, horizontal, vertical or diagonal."""
    angle = math.radians(rng.choice((0, 90, 30, -30)) + rng.uniform(-5, 5))
    span = height if abs(math.cos(angle)) > 0.5 else width
    band = span / (2 * count + 1) * rng.uniform(0.7, 0.9)
    length = 2 * (width + height)
    cx, cy = width / 2, height / 2
    primitives: list[tuple[str, object]] = []
    for i in range(count):
        offset = (i - (count - 1) / 2) * span / (count + 0.5)
        pts = [(-length, offset - band / 2), (length, offset - band / 2), (length, offset + band / 2), (-length, offset + band / 2)]
        primitives.append(("polygon", _rotate(pts, cx, cy, angle)))
    return primitives


def render_scene(scene: Scene, size: tuple[int, int] = (320, 240), rng: random.Random | None = None,
                 noise: int = 10) -> Image.Image:
    """Draw the scene as an RGB image.

    A soft gradient and per-pixel grain make it look less synthetic and keep a
    quality-90 JPEG of 320x240 well above LAION's 5 KB minimum; noise=0 gives a flat drawing
    (used for the deliberately tiny thumbnails)."""
    rng = rng or _default_rng(scene, size)
    width, height = size
    base = _jitter(BACKGROUNDS[scene.background], rng, 6)
    light = tuple(min(255, c + 14) for c in base)
    dark = tuple(max(0, c - 14) for c in base)
    # Rotate the 256x256 gradient, keep the square inside its inscribed circle (no fill colour in
    # the corners), stretch that to the canvas.
    gradient = (Image.linear_gradient("L").rotate(rng.uniform(0, 360)).crop((38, 38, 218, 218))
                .resize(size, Image.Resampling.BILINEAR))
    image = Image.composite(Image.new("RGB", size, light), Image.new("RGB", size, dark), gradient)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    fill = _jitter(COLORS[scene.color], rng, 14)
    for kind, geometry in scene_layout(scene, size, rng):
        if kind == "polygon":
            draw.polygon(geometry, fill=fill)  # type: ignore[arg-type]
        elif kind == "ellipse":
            draw.ellipse(geometry, fill=fill)  # type: ignore[arg-type]
        else:
            bbox, ring_width = geometry  # type: ignore[misc]
            draw.ellipse(bbox, outline=fill, width=int(ring_width))
    if noise <= 0:
        return image
    grain = Image.frombytes("L", size, rng.randbytes(width * height)).point(lambda v: v * 2 * noise // 255)
    return ImageChops.add(image, Image.merge("RGB", (grain, grain, grain)), scale=1.0, offset=-noise)


def scene_svg(scene: Scene, size: tuple[int, int] = (320, 240), rng: random.Random | None = None) -> str:
    """The same scene as an SVG document (the demo web serves a few SVGs, which LAION skips)."""
    rng = rng or _default_rng(scene, size)
    width, height = size
    fill = "#%02x%02x%02x" % COLORS[scene.color]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             '<rect width="100%%" height="100%%" fill="#%02x%02x%02x"/>' % BACKGROUNDS[scene.background]]
    for kind, geometry in scene_layout(scene, size, rng):
        if kind == "polygon":
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in geometry)  # type: ignore[union-attr]
            parts.append(f'<polygon points="{points}" fill="{fill}"/>')
        else:
            bbox = geometry if kind == "ellipse" else geometry[0]  # type: ignore[index]
            x0, y0, x1, y1 = bbox  # type: ignore[misc]
            r = (x1 - x0) / 2
            if kind == "ellipse":
                parts.append(f'<circle cx="{x0 + r:.1f}" cy="{y0 + r:.1f}" r="{r:.1f}" fill="{fill}"/>')
            else:
                w = geometry[1]  # type: ignore[index]
                parts.append(f'<circle cx="{x0 + r:.1f}" cy="{y0 + r:.1f}" r="{r - w / 2:.1f}" fill="none" '
                             f'stroke="{fill}" stroke-width="{w:.1f}"/>')
    parts.append("</svg>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# Captions

_EN_SHAPES = {"circle": ("circle", "circles"), "square": ("square", "squares"), "triangle": ("triangle", "triangles"),
              "star": ("star", "stars"), "cross": ("cross", "crosses"), "ring": ("ring", "rings"),
              "diamond": ("diamond", "diamonds"), "hexagon": ("hexagon", "hexagons"), "stripes": ("stripe", "stripes")}
_EN_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}
_EN_BG = {"white": "white", "grey": "grey", "black": "black", "beige": "beige"}

# German: (gender, singular, nominative plural, dative plural)
_DE_SHAPES = {"circle": ("m", "Kreis", "Kreise", "Kreisen"), "square": ("n", "Quadrat", "Quadrate", "Quadraten"),
              "triangle": ("n", "Dreieck", "Dreiecke", "Dreiecken"), "star": ("m", "Stern", "Sterne", "Sternen"),
              "cross": ("n", "Kreuz", "Kreuze", "Kreuzen"), "ring": ("m", "Ring", "Ringe", "Ringen"),
              "diamond": ("f", "Raute", "Rauten", "Rauten"), "hexagon": ("n", "Sechseck", "Sechsecke", "Sechsecken"),
              "stripes": ("m", "Streifen", "Streifen", "Streifen")}
_DE_COLORS = {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "orange": "orangefarben",
              "purple": "violett", "black": "schwarz", "pink": "rosafarben"}
_DE_BG = {"white": "weiß", "grey": "grau", "black": "schwarz", "beige": "beig"}
_DE_NUMBERS = {2: "zwei", 3: "drei", 4: "vier", 5: "fünf"}

# French: (gender, singular, plural)
_FR_SHAPES = {"circle": ("m", "cercle", "cercles"), "square": ("m", "carré", "carrés"), "triangle": ("m", "triangle", "triangles"),
              "star": ("f", "étoile", "étoiles"), "cross": ("f", "croix", "croix"), "ring": ("m", "anneau", "anneaux"),
              "diamond": ("m", "losange", "losanges"), "hexagon": ("m", "hexagone", "hexagones"),
              "stripes": ("f", "bande", "bandes")}
# (m sg, f sg, m pl, f pl)
_FR_COLORS = {"red": ("rouge", "rouge", "rouges", "rouges"), "green": ("vert", "verte", "verts", "vertes"),
              "blue": ("bleu", "bleue", "bleus", "bleues"), "yellow": ("jaune", "jaune", "jaunes", "jaunes"),
              "orange": ("orange", "orange", "orange", "orange"), "purple": ("violet", "violette", "violets", "violettes"),
              "black": ("noir", "noire", "noirs", "noires"), "pink": ("rose", "rose", "roses", "roses")}
_FR_BG = {"white": "blanc", "grey": "gris", "black": "noir", "beige": "beige"}
_FR_NUMBERS = {2: "deux", 3: "trois", 4: "quatre", 5: "cinq"}

_ES_SHAPES = {"circle": ("m", "círculo", "círculos"), "square": ("m", "cuadrado", "cuadrados"),
              "triangle": ("m", "triángulo", "triángulos"), "star": ("f", "estrella", "estrellas"),
              "cross": ("f", "cruz", "cruces"), "ring": ("m", "anillo", "anillos"), "diamond": ("m", "rombo", "rombos"),
              "hexagon": ("m", "hexágono", "hexágonos"), "stripes": ("f", "franja", "franjas")}
_ES_COLORS = {"red": ("rojo", "roja", "rojos", "rojas"), "green": ("verde", "verde", "verdes", "verdes"),
              "blue": ("azul", "azul", "azules", "azules"), "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
              "orange": ("naranja", "naranja", "naranja", "naranja"), "purple": ("morado", "morada", "morados", "moradas"),
              "black": ("negro", "negra", "negros", "negras"), "pink": ("rosa", "rosa", "rosa", "rosa")}
_ES_BG = {"white": "blanco", "grey": "gris", "black": "negro", "beige": "beige"}
_ES_NUMBERS = {2: "dos", 3: "tres", 4: "cuatro", 5: "cinco"}

_JA_SHAPES = {"circle": "円", "square": "正方形", "triangle": "三角形", "star": "星", "cross": "十字",
              "ring": "リング", "diamond": "ひし形", "hexagon": "六角形", "stripes": "ストライプ"}
_JA_COLORS = {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "orange": "オレンジ色の",
              "purple": "紫の", "black": "黒い", "pink": "ピンクの"}
_JA_BG = {"white": "白い背景", "grey": "灰色の背景", "black": "黒い背景", "beige": "ベージュの背景"}
_JA_COUNTERS = {1: "一つ", 2: "二つ", 3: "三つ", 4: "四つ", 5: "五つ"}
_JA_STRIPE_COUNTERS = {1: "一本", 2: "二本", 3: "三本", 4: "四本", 5: "五本"}


def _en(scene: Scene, template: int) -> str:
    singular, plural = _EN_SHAPES[scene.shape]
    color, bg = scene.color, _EN_BG[scene.background]
    if scene.count == 1:
        article = "an" if color[0] in "aeiou" else "a"
        phrase = f"{article} {color} {singular}" if template % 2 == 0 else f"one {color} {singular}"
    else:
        phrase = f"{_EN_NUMBERS[scene.count]} {color} {plural}"
    return [
        f"{phrase} on a {bg} background",
        f"{phrase[0].upper()}{phrase[1:]} against a {bg} backdrop",
        f"illustration of {phrase} on {bg}",
        f"{phrase}, {bg} background",
    ][template]


def _de_noun_phrase(scene: Scene, case: str) -> str:
    gender, singular, plural_nom, plural_dat = _DE_SHAPES[scene.shape]
    stem = _DE_COLORS[scene.color]
    if scene.count > 1:
        number = _DE_NUMBERS[scene.count]
        return f"{number} {stem}e {plural_nom}" if case == "nom" else f"{number} {stem}en {plural_dat}"
    if case == "nom":
        return {"m": f"ein {stem}er", "f": f"eine {stem}e", "n": f"ein {stem}es"}[gender] + f" {singular}"
    return {"m": f"einem {stem}en", "f": f"einer {stem}en", "n": f"einem {stem}en"}[gender] + f" {singular}"


def _de(scene: Scene, template: int) -> str:
    bg = _DE_BG[scene.background]
    nom = _de_noun_phrase(scene, "nom")
    return [
        f"{nom} auf {bg}em Hintergrund",
        f"Grafik mit {_de_noun_phrase(scene, 'dat')} vor {bg}em Hintergrund",
        f"{nom[0].upper()}{nom[1:]}, {bg}er Hintergrund",
        f"Illustration: {nom} auf {bg}em Grund",
    ][template]


def _romance_noun_phrase(scene: Scene, shapes: dict, colors: dict, numbers: dict, one: tuple[str, str]) -> str:
    gender, singular, plural = shapes[scene.shape]
    m_sg, f_sg, m_pl, f_pl = colors[scene.color]
    if scene.count == 1:
        return f"{one[0] if gender == 'm' else one[1]} {singular} {m_sg if gender == 'm' else f_sg}"
    return f"{numbers[scene.count]} {plural} {m_pl if gender == 'm' else f_pl}"


def _fr(scene: Scene, template: int) -> str:
    phrase = _romance_noun_phrase(scene, _FR_SHAPES, _FR_COLORS, _FR_NUMBERS, ("un", "une"))
    bg = _FR_BG[scene.background]
    of_phrase = "d'" + phrase if phrase.startswith("un") else "de " + phrase
    return [
        f"{phrase} sur fond {bg}",
        f"Illustration : {phrase} sur un fond {bg}",
        f"dessin {of_phrase} sur fond {bg}",
        f"{phrase[0].upper()}{phrase[1:]} - fond {bg}",
    ][template]


def _es(scene: Scene, template: int) -> str:
    phrase = _romance_noun_phrase(scene, _ES_SHAPES, _ES_COLORS, _ES_NUMBERS, ("un", "una"))
    bg = _ES_BG[scene.background]
    return [
        f"{phrase} sobre fondo {bg}",
        f"Ilustración: {phrase} sobre un fondo {bg}",
        f"dibujo de {phrase} sobre fondo {bg}",
        f"{phrase[0].upper()}{phrase[1:]} en un fondo {bg}",
    ][template]


def _ja(scene: Scene, template: int) -> str:
    shape, color, bg = _JA_SHAPES[scene.shape], _JA_COLORS[scene.color], _JA_BG[scene.background]
    count = (_JA_STRIPE_COUNTERS if scene.shape == "stripes" else _JA_COUNTERS)[scene.count]
    return [
        f"{bg}に{color}{shape}が{count}",
        f"{count}の{color}{shape}（{bg}）",
        f"{color}{shape}{count}のイラスト、{bg}",
        f"{bg}に描かれた{color}{shape}が{count}",
    ][template]


_CAPTIONERS = {"en": _en, "de": _de, "fr": _fr, "es": _es, "ja": _ja}
N_TEMPLATES = 4


def describe_scene(scene: Scene, lang: str, rng: random.Random | None = None) -> str:
    """A natural caption of the scene in `lang` (en, de, fr, ja, es); `rng` picks one of a few
    templates, without it the first template is used."""
    try:
        captioner = _CAPTIONERS[lang]
    except KeyError:
        raise ValueError(f"no captions for language {lang!r}; expected one of {LANGUAGES}") from None
    template = rng.randrange(N_TEMPLATES) if rng is not None else 0
    return captioner(scene, template)
