"""Procedural 3D rooms: an offline stand-in for the 3D Room (OBJ3D) dataset.

Each image is ray cast in numpy: a pinhole camera looks into a room made of a
floor, a back wall and two side walls, with 1..N spheres, cubes (rotated about
the vertical axis) and cylinders resting on the floor. One point light gives
Lambertian shading and hard shadows (a shadow ray from every lit surface point
towards the light, tested against every object). Occlusion is exact: every
pixel takes the nearest hit of its ray, so the per-pixel object-id map is the
ground truth for the boxes.

Object size: ``min_size``/``max_size`` bound the *on-screen size* ``s`` of an
object, a fraction of the image side, drawn uniformly per object. ``s`` is
the larger side of the object's tight box when nothing hides it: the object's
largest world dimension (sphere diameter, cube edge, ``max(diameter,
height)`` of a cylinder) is set to ``s`` times the width of the view frustum
at the depth of the object's centre, divided by the shape's
``BOX_PER_EXTENT`` (how much larger than that dimension its box comes out,
measured: a cube shows a top face and turns corners to the camera). For
unoccluded objects the larger box side is then ``s * image_size`` pixels
within about -10%..+15% (5th to 95th percentile); occlusion and the image
border only shrink boxes. This is the quantity SPACE's ``z_scale`` prior is
about (SPEC 2: sigmoid(-2.0) = 0.119 of the image side for the 3D rooms).
``meta.json`` records the measured box sizes of the generated set.

Written layout (the OBJ3D layout of SPEC 10.1 and 9.3)::

    <out_root>/meta.json
    <out_root>/{train,val,test}/<i>-room.png
    <out_root>/{train,val,test}/bb/bb_<i>.txt

Each line of ``bb_<i>.txt`` is ``cx,cy,w,h`` of one visible object, in pixels
of the written image (``image_size``), with pixel ``j`` covering ``[j, j+1)``:
the box is tight around the object's visible pixels. A fully hidden object gets
no line. Dividing by ``image_size`` gives SPACE's normalised boxes.

Determinism: image ``i`` of split ``s`` uses its own ``numpy`` Generator seeded
with ``(seed, split number, i)``, so images can be produced in any order and in
parallel, and the same arguments give byte-identical files.
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from space.data.download import SPLITS, publish_directory
from space.io import remove_stale

__all__ = ["render_room", "generate_rooms", "image_seed"]

# --- Scene constants (world units are arbitrary "metres"; y is up). ---
#: Vertical field of view; 50 degrees is a typical "normal lens" look.
FIELD_OF_VIEW_DEG = 50.0
#: Camera height, pitch (downwards) and yaw ranges: a view from above-front
#: into the room like the original 3D Room images, jittered per image.
CAMERA_HEIGHT_RANGE = (2.6, 3.2)
CAMERA_PITCH_DEG_RANGE = (24.0, 32.0)
CAMERA_YAW_DEG_RANGE = (-6.0, 6.0)
#: Distance from the camera to the back wall, and half the room's width. Chosen
#: so the back wall fills the top ~quarter and the side walls show at the sides.
ROOM_DEPTH_RANGE = (7.5, 9.5)
ROOM_HALF_WIDTH_RANGE = (3.2, 4.0)
#: Point light above the middle of the room, off to one side (either side,
#: drawn per image), so shadows fall sideways and towards the camera where
#: they are visible, while the faces the camera sees stay mostly lit.
LIGHT_HEIGHT_RANGE = (3.8, 5.0)
LIGHT_SIDE_RANGE = (1.5, 3.5)
LIGHT_Z_RANGE = (-5.5, -3.0)
#: Share of light that reaches every point (ambient), so shadows are not black.
AMBIENT = 0.35
#: Light falloff: intensity / (1 + FALLOFF * distance^2), a mild gradient.
FALLOFF = 0.01
#: Offsets that keep a ray from hitting the surface it starts on.
RAY_EPSILON = 1e-4
SHADOW_OFFSET = 2e-3
#: Where object centres may be placed, in normalised screen coordinates of
#: their floor contact point (u: left..right, v: bottom..top, both in [-1, 1]).
PLACEMENT_U = 0.8
PLACEMENT_V = (-0.9, 0.35)
#: Minimum gap between object footprints and between objects and walls.
PLACEMENT_GAP = 0.08
PLACEMENT_TRIES = 60
#: The three shapes, drawn uniformly.
SHAPES = ("sphere", "cube", "cylinder")
#: Larger tight-box side per unit of largest world dimension, per shape: the
#: median over 400 unoccluded single-object scenes with these camera ranges
#: (a sphere's outline is its diameter; cubes show a top face and a corner,
#: cylinders their top ellipse).
BOX_PER_EXTENT = {"sphere": 1.0, "cube": 1.5, "cylinder": 1.2}
#: Colour ranges (saturation and value of HSV; hue is uniform) per palette: 'full' lets floor,
#: walls and objects overlap in colour (an object may nearly match the floor); 'muted' is the
#: CLEVR look, greyish floor and walls with saturated objects, so every object stands out from
#: the room by its colour; 'vivid' is 'full' with more saturated objects, so that no object
#: matches its floor (the default experiment's). All draw the same random numbers, so a scene's
#: layout, shapes, sizes and hues are the same under any palette.
PALETTES = {
    "full": {"floor": ((0.05, 0.45), (0.45, 0.8)), "back": ((0.05, 0.4), (0.6, 0.95)),
             "side": ((0.05, 0.4), (0.5, 0.9)), "object": ((0.45, 0.95), (0.55, 0.95))},
    "vivid": {"floor": ((0.05, 0.45), (0.45, 0.8)), "back": ((0.05, 0.4), (0.6, 0.95)),
              "side": ((0.05, 0.4), (0.5, 0.9)), "object": ((0.75, 1.0), (0.6, 0.95))},
    "muted": {"floor": ((0.0, 0.15), (0.45, 0.75)), "back": ((0.0, 0.12), (0.6, 0.9)),
              "side": ((0.0, 0.12), (0.5, 0.85)), "object": ((0.7, 1.0), (0.6, 0.95))},
}
#: Brightness of the walls when they are 'flat' (one colour, no shading): a backdrop.
FLAT_WALL_INTENSITY = 0.85
WALL_STYLES = ("shaded", "flat", "back")
#: With walls 'back' the side walls stand this many times further out, beyond the view.
WIDE_ROOM_FACTOR = 4.0
#: Cylinder height / diameter range, so cylinders range from discs to columns.
CYLINDER_ASPECT_RANGE = (0.6, 1.6)
#: Default number of images per split and object size range (fractions of the
#: image side; see the module docstring).
DEFAULT_COUNTS = (5000, 500, 500)
DEFAULT_MIN_SIZE = 0.10
DEFAULT_MAX_SIZE = 0.25
#: Rays per axis for pixels on an edge (2 -> 4 rays), for antialiasing; other
#: pixels take one ray, so this costs ~1.4x instead of 4x.
DEFAULT_SUPERSAMPLE = 2
#: Below this many images, starting worker processes costs more than it saves.
MIN_IMAGES_FOR_WORKERS = 200

_BACKGROUND_ID = -1


@dataclass(frozen=True)
class _Object:
    """One object resting on the floor (y = 0)."""

    shape: str
    x: float  # centre of the footprint
    z: float
    size: float  # sphere/cylinder radius, cube half edge
    height: float  # full height
    yaw: float  # rotation about the vertical axis (cubes)
    colour: tuple[float, float, float]

    @property
    def footprint_radius(self) -> float:
        if self.shape == "cube":
            return self.size * math.sqrt(2.0)
        return self.size


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(h % 1.0, s, v)


def _intersect(obj: _Object, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Distance along each ray to ``obj``, ``inf`` where it misses.

    Args:
        obj: The object.
        o: Ray origins, (3,) or (3, N) float32.
        d: Unit ray directions, (3, N) float32.

    Returns:
        (N,) float32 distances; only hits with t > RAY_EPSILON count.
    """
    ox, oy, oz = o[0], o[1], o[2]
    dx, dy, dz = d[0], d[1], d[2]
    if obj.shape == "sphere":
        r = obj.size
        px, py, pz = ox - obj.x, oy - r, oz - obj.z
        b = px * dx + py * dy + pz * dz
        c = px * px + py * py + pz * pz - r * r
        disc = b * b - c
        t = -b - np.sqrt(np.maximum(disc, 0.0))
        return np.where((disc >= 0.0) & (t > RAY_EPSILON), t, np.inf).astype(np.float32)
    if obj.shape == "cylinder":
        r, h = obj.size, obj.height
        px, pz = ox - obj.x, oz - obj.z
        a = dx * dx + dz * dz
        b = px * dx + pz * dz
        c = px * px + pz * pz - r * r
        disc = b * b - a * c
        with np.errstate(divide="ignore", invalid="ignore"):
            t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
            y = oy + t_side * dy
            side_ok = (disc >= 0.0) & (a > 0.0) & (t_side > RAY_EPSILON) & (y >= 0.0) & (y <= h)
            t_top = (h - oy) / dy
            qx, qz = px + t_top * dx, pz + t_top * dz
            top_ok = (t_top > RAY_EPSILON) & (qx * qx + qz * qz <= r * r)
        t_side = np.where(side_ok, t_side, np.inf)
        t_top = np.where(top_ok, t_top, np.inf)
        return np.minimum(t_side, t_top).astype(np.float32)
    # Cube: slab test in the cube's frame (rotated by -yaw about y).
    lo, ld = _to_cube_frame(obj, o, d)
    half = (obj.size, obj.height / 2.0, obj.size)
    t_near = np.full(d.shape[1], -np.inf, np.float32)
    t_far = np.full(d.shape[1], np.inf, np.float32)
    for axis in range(3):
        # A zero direction component would give 0 * inf = nan; nudge it.
        da = np.where(ld[axis] == 0.0, np.float32(1e-12), ld[axis])
        t1 = (-half[axis] - lo[axis]) / da
        t2 = (half[axis] - lo[axis]) / da
        t_near = np.maximum(t_near, np.minimum(t1, t2))
        t_far = np.minimum(t_far, np.maximum(t1, t2))
    hit = (t_near <= t_far) & (t_near > RAY_EPSILON)
    return np.where(hit, t_near, np.inf).astype(np.float32)


def _to_cube_frame(obj: _Object, o: np.ndarray, d: np.ndarray) -> tuple[list, list]:
    """Ray origins and directions in the cube's local frame (centre at 0)."""
    c, s = math.cos(obj.yaw), math.sin(obj.yaw)
    px, py, pz = o[0] - obj.x, o[1] - obj.height / 2.0, o[2] - obj.z
    lo = [c * px - s * pz, py, s * px + c * pz]
    ld = [c * d[0] - s * d[2], d[1], s * d[0] + c * d[2]]
    return lo, ld


def _normal(obj: _Object, p: np.ndarray) -> np.ndarray:
    """Outward unit normals (3, M) of ``obj`` at surface points ``p`` (3, M)."""
    if obj.shape == "sphere":
        n = np.stack([p[0] - obj.x, p[1] - obj.size, p[2] - obj.z])
        return n / obj.size
    if obj.shape == "cylinder":
        on_top = p[1] >= obj.height - 1e-3
        rx, rz = (p[0] - obj.x) / obj.size, (p[2] - obj.z) / obj.size
        return np.stack([
            np.where(on_top, 0.0, rx),
            np.where(on_top, 1.0, 0.0),
            np.where(on_top, 0.0, rz),
        ]).astype(np.float32)
    # Cube: the face is the local axis where the point sits furthest out,
    # relative to that axis' half extent.
    c, s = math.cos(obj.yaw), math.sin(obj.yaw)
    px, py, pz = p[0] - obj.x, p[1] - obj.height / 2.0, p[2] - obj.z
    local = np.stack([(c * px - s * pz) / obj.size, py / (obj.height / 2.0), (s * px + c * pz) / obj.size])
    axis = np.argmax(np.abs(local), axis=0)
    sign = np.sign(local[axis, np.arange(local.shape[1])])
    n_local = np.zeros_like(local)
    n_local[axis, np.arange(local.shape[1])] = sign
    # Back to world: inverse of the rotation in _to_cube_frame.
    return np.stack([
        c * n_local[0] + s * n_local[2],
        n_local[1],
        -s * n_local[0] + c * n_local[2],
    ]).astype(np.float32)


@dataclass(frozen=True)
class _Camera:
    position: np.ndarray  # (3,)
    forward: np.ndarray  # (3,) unit
    right: np.ndarray
    up: np.ndarray
    tan_half_fov: float

    def rays(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Unit directions (3, R) through normalised screen points (u right, v up, in [-1, 1])."""
        f, r, up = (a.astype(np.float32)[:, None] for a in (self.forward, self.right, self.up))
        k = np.float32(self.tan_half_fov)
        d = f + k * (u.astype(np.float32)[None] * r + v.astype(np.float32)[None] * up)
        return d / np.sqrt((d * d).sum(axis=0))

    def ray(self, u: float, v: float) -> np.ndarray:
        """Unit direction (3,) through normalised screen point (u, v)."""
        d = self.forward + self.tan_half_fov * (u * self.right + v * self.up)
        return d / np.linalg.norm(d)

    def depth(self, point: np.ndarray) -> float:
        return float(np.dot(point - self.position, self.forward))


def _make_camera(rng: np.random.Generator) -> _Camera:
    height = rng.uniform(*CAMERA_HEIGHT_RANGE)
    pitch = math.radians(rng.uniform(*CAMERA_PITCH_DEG_RANGE))
    yaw = math.radians(rng.uniform(*CAMERA_YAW_DEG_RANGE))
    forward = np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), -math.cos(yaw) * math.cos(pitch)])
    right = np.array([math.cos(yaw), 0.0, math.sin(yaw)])
    up = np.cross(right, forward)
    return _Camera(
        position=np.array([0.0, height, 0.0]),
        forward=forward,
        right=right,
        up=up,
        tan_half_fov=math.tan(math.radians(FIELD_OF_VIEW_DEG) / 2.0),
    )


def _place_objects(
    rng: np.random.Generator,
    camera: _Camera,
    room_depth: float,
    room_half_width: float,
    num_objects: int,
    min_size: float,
    max_size: float,
    palette: str = "full",
) -> list[_Object]:
    """Draws non-overlapping objects on the visible floor (rejection sampling)."""
    objects: list[_Object] = []
    for _ in range(num_objects):
        shape = SHAPES[rng.integers(len(SHAPES))]
        screen_size = rng.uniform(min_size, max_size)
        yaw = rng.uniform(0.0, math.pi / 2.0)
        aspect = rng.uniform(*CYLINDER_ASPECT_RANGE)
        sat, val = PALETTES[palette]["object"]
        colour = _hsv(rng.uniform(), rng.uniform(*sat), rng.uniform(*val))
        for _try in range(PLACEMENT_TRIES):
            u = rng.uniform(-PLACEMENT_U, PLACEMENT_U)
            v = rng.uniform(*PLACEMENT_V)
            d = camera.ray(u, v)
            if d[1] >= 0.0:
                continue
            t = -camera.position[1] / d[1]
            x, z = camera.position[0] + t * d[0], camera.position[2] + t * d[2]
            # Largest dimension from the wanted box side (see the module
            # docstring); one refinement since the centre height depends on it.
            extent = 0.0
            for _refine in range(2):
                centre = np.array([x, extent / 2.0, z])
                frustum_width = 2.0 * camera.tan_half_fov * camera.depth(centre)
                extent = screen_size * frustum_width / BOX_PER_EXTENT[shape]
            if shape == "sphere":
                size, height = extent / 2.0, extent
            elif shape == "cube":
                size, height = extent / 2.0, extent
            else:
                # max(diameter, height) = extent.
                if aspect >= 1.0:
                    height, size = extent, extent / aspect / 2.0
                else:
                    size, height = extent / 2.0, extent * aspect
            candidate = _Object(shape, float(x), float(z), float(size), float(height), float(yaw), colour)
            rad = candidate.footprint_radius
            if abs(x) + rad + PLACEMENT_GAP > room_half_width or z - rad - PLACEMENT_GAP < -room_depth:
                continue
            if all(
                math.hypot(x - other.x, z - other.z) > rad + other.footprint_radius + PLACEMENT_GAP
                for other in objects
            ):
                objects.append(candidate)
                break
    return objects


def _tight_boxes(id_map: np.ndarray, num_objects: int) -> np.ndarray:
    """``cx, cy, w, h`` pixel boxes (M, 4) of the visible objects, in id order."""
    boxes = []
    for k in range(num_objects):
        rows = np.flatnonzero((id_map == k).any(axis=1))
        if rows.size == 0:
            continue  # fully hidden (or off screen): no box
        cols = np.flatnonzero((id_map == k).any(axis=0))
        y0, y1 = rows[0], rows[-1] + 1
        x0, x1 = cols[0], cols[-1] + 1
        boxes.append(((x0 + x1) / 2.0, (y0 + y1) / 2.0, float(x1 - x0), float(y1 - y0)))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


@dataclass(frozen=True)
class _Scene:
    camera: _Camera
    room_depth: float
    room_half_width: float
    light: np.ndarray  # (3,) float32
    surface_colours: np.ndarray  # (4, 3): floor, back, left, right wall
    objects: list[_Object]
    shadows: bool = True  # cast shadows (a shadow ray per lit point)
    walls: str = "shaded"  # 'flat': the three walls one colour, unshaded


def check_style(palette: str, walls: str) -> None:
    """Raise ValueError unless ``palette`` is a key of PALETTES and ``walls`` one of WALL_STYLES."""
    if palette not in PALETTES:
        raise ValueError(f"palette must be one of {sorted(PALETTES)}, got {palette!r}")
    if walls not in WALL_STYLES:
        raise ValueError(f"walls must be one of {WALL_STYLES}, got {walls!r}")


def _make_scene(
    rng: np.random.Generator, min_objects: int, max_objects: int, min_size: float, max_size: float,
    shadows: bool = True, palette: str = "full", walls: str = "shaded",
) -> _Scene:
    camera = _make_camera(rng)
    room_depth = rng.uniform(*ROOM_DEPTH_RANGE)
    room_half_width = rng.uniform(*ROOM_HALF_WIDTH_RANGE) * (WIDE_ROOM_FACTOR if walls == "back" else 1.0)
    light_x = rng.uniform(*LIGHT_SIDE_RANGE) * rng.choice((-1.0, 1.0))
    light = np.array([light_x, rng.uniform(*LIGHT_HEIGHT_RANGE), rng.uniform(*LIGHT_Z_RANGE)], np.float32)
    wall_hue = rng.uniform()
    pal = PALETTES[palette]
    surface_colours = np.array([
        _hsv(rng.uniform(), rng.uniform(*pal["floor"][0]), rng.uniform(*pal["floor"][1])),  # floor
        _hsv(wall_hue, rng.uniform(*pal["back"][0]), rng.uniform(*pal["back"][1])),  # back wall
        _hsv(wall_hue + rng.uniform(-0.08, 0.08), rng.uniform(*pal["side"][0]), rng.uniform(*pal["side"][1])),  # left
        _hsv(wall_hue + rng.uniform(-0.08, 0.08), rng.uniform(*pal["side"][0]), rng.uniform(*pal["side"][1])),  # right
    ], dtype=np.float32)
    if walls == "flat":  # drawn above all the same, so the layout does not depend on the style
        surface_colours[2:] = surface_colours[1]
    num_objects = int(rng.integers(min_objects, max_objects + 1))
    objects = _place_objects(rng, camera, room_depth, room_half_width, num_objects, min_size, max_size, palette)
    return _Scene(camera, room_depth, room_half_width, light, surface_colours, objects, shadows, walls)


_PLANE_NORMALS = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0], [-1, 0, 0]], np.float32)


def _trace(scene: _Scene, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Casts camera rays ``d`` (3, R) into the scene.

    Returns:
        ``(colour, ids, label)``: linear RGB (3, R) in [0, 1]; object index per
        ray (-1 for floor and walls); and an int label that changes wherever
        the surface, the object or the shadow changes (used to find edges).
    """
    o = scene.camera.position.astype(np.float32)
    num_rays = d.shape[1]
    # 1. Nearest room surface (the camera is inside the room, so every ray hits one).
    with np.errstate(divide="ignore", invalid="ignore"):
        plane_t = np.stack([
            np.where(d[1] < 0, -o[1] / d[1], np.inf),  # floor y = 0
            np.where(d[2] < 0, (-scene.room_depth - o[2]) / d[2], np.inf),  # back wall
            np.where(d[0] < 0, (-scene.room_half_width - o[0]) / d[0], np.inf),  # left wall
            np.where(d[0] > 0, (scene.room_half_width - o[0]) / d[0], np.inf),  # right wall
        ]).astype(np.float32)
    surface = np.argmin(plane_t, axis=0)
    t = plane_t[surface, np.arange(num_rays)]
    # 2. Nearest object in front of it (z-buffer over objects).
    ids = np.full(num_rays, _BACKGROUND_ID, np.int32)
    for k, obj in enumerate(scene.objects):
        t_obj = _intersect(obj, o, d)
        nearer = t_obj < t
        t = np.where(nearer, t_obj, t)
        ids[nearer] = k
    # 3. Hit points, normals and albedo.
    p = o[:, None] + t[None] * d  # (3, R)
    normal = _PLANE_NORMALS[surface].T.copy()  # (3, R)
    albedo = scene.surface_colours[surface].T.copy()  # (3, R)
    for k, obj in enumerate(scene.objects):
        sel = np.flatnonzero(ids == k)
        if sel.size:
            normal[:, sel] = _normal(obj, p[:, sel])
            albedo[:, sel] = np.asarray(obj.colour, np.float32)[:, None]
    # 4. Lambertian shading; a shadow ray per lit point towards the light.
    to_light = scene.light[:, None] - p
    dist = np.sqrt((to_light * to_light).sum(axis=0))
    to_light /= dist
    lambert = np.maximum((normal * to_light).sum(axis=0), 0.0)
    lit = np.flatnonzero(lambert > 0.0)
    shadowed = np.zeros(num_rays, bool)
    if scene.shadows and scene.objects and lit.size:
        origin = p[:, lit] + SHADOW_OFFSET * normal[:, lit]
        direction = to_light[:, lit]
        blocked = np.zeros(lit.size, bool)
        for k, obj in enumerate(scene.objects):
            # Convex objects cannot shadow their own lit side.
            blocked |= (_intersect(obj, origin, direction) < dist[lit]) & (ids[lit] != k)
        shadowed[lit[blocked]] = True
        lambert[shadowed] = 0.0
    intensity = AMBIENT + (1.0 - AMBIENT) * lambert / (1.0 + FALLOFF * dist * dist)
    if scene.walls == "flat":
        intensity[(surface > 0) & (ids == _BACKGROUND_ID)] = FLAT_WALL_INTENSITY
    label = surface + len(_PLANE_NORMALS) * (ids + 1) + 1024 * shadowed
    return albedo * intensity[None], ids, label


def _edge_pixels(label: np.ndarray) -> np.ndarray:
    """Pixels (H, W) whose label differs from a 4-neighbour's."""
    edge = np.zeros(label.shape, bool)
    dx = label[:, 1:] != label[:, :-1]
    dy = label[1:] != label[:-1]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:] |= dy
    edge[:-1] |= dy
    return edge


def render_room(
    rng: np.random.Generator,
    image_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 5,
    min_size: float = DEFAULT_MIN_SIZE,
    max_size: float = DEFAULT_MAX_SIZE,
    supersample: int = DEFAULT_SUPERSAMPLE,
    shadows: bool = True,
    palette: str = "full",
    walls: str = "shaded",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders one random room.

    Antialiasing is adaptive: one ray per pixel centre, then the pixels on an
    edge (surface, object or shadow changes next to them) are re-cast with a
    ``supersample x supersample`` grid of rays and averaged.

    Args:
        rng: Source of all randomness of this image.
        image_size: Side of the square output image in pixels.
        min_objects: Fewest objects to place (inclusive).
        max_objects: Most objects to place (inclusive). Placement is rejection
            sampled; in a crowded room an object that finds no free spot is
            left out, so fewer may appear.
        min_size: Smallest on-screen object size, fraction of the image side.
        max_size: Largest on-screen object size, fraction of the image side.
        supersample: Rays per edge pixel along each axis (1 turns
            antialiasing off).
        shadows: Cast shadows. Without them objects are still shaded
            (Lambertian, ambient), and the scene's random draws are the same,
            so an image differs from its shadowed twin only in the shadows.
        palette: Colour ranges, a key of :data:`PALETTES` ('full', 'vivid' or 'muted');
            the scene's random draws are the same under any.
        walls: 'shaded' (lit like the floor) or 'flat': the back and side walls
            take the back wall's colour, unshaded and unshadowed, like a studio
            backdrop; or 'back': shaded, with the side walls moved out of view
            (a room WIDE_ROOM_FACTOR times wider), so only the floor and the
            back wall show. The scene's random draws are the same in all three
            (with 'back', an object placed against a side wall may move).

    Returns:
        ``(image, id_map, boxes)``: the ``(H, W, 3)`` uint8 RGB image; an
        ``(H, W)`` int32 map of the object index seen in each pixel (-1 for
        floor and walls; an edge pixel takes the index most of its rays hit,
        ties going to the lower index, background first); and the ``(M, 4)``
        float64 boxes ``cx, cy, w, h`` in pixels (pixel ``j`` spans
        ``[j, j+1)``), tight around each visible object's pixels in
        ``id_map``, one row per visible object in increasing object index.
    """
    check_style(palette, walls)
    scene = _make_scene(rng, min_objects, max_objects, min_size, max_size, shadows, palette, walls)
    size = image_size
    # 1. One ray through each pixel centre (row-major; v points up).
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    u, v = np.tile(centres, size), -np.repeat(centres, size)
    colour, ids, label = _trace(scene, scene.camera.rays(u, v))
    # 2. Re-cast edge pixels with s x s sub-pixel rays.
    s = supersample
    edge = np.flatnonzero(_edge_pixels(label.reshape(size, size)))
    if s > 1 and edge.size:
        offsets = ((np.arange(s, dtype=np.float32) + 0.5) / s - 0.5) * (2.0 / size)
        du, dv = np.tile(offsets, s), -np.repeat(offsets, s)  # (s*s,)
        sub_u = (u[edge][None] + du[:, None]).ravel()  # (s*s * E,)
        sub_v = (v[edge][None] + dv[:, None]).ravel()
        sub_colour, sub_ids, _ = _trace(scene, scene.camera.rays(sub_u, sub_v))
        colour[:, edge] = sub_colour.reshape(3, s * s, edge.size).mean(axis=1)
        sub_ids = sub_ids.reshape(s * s, edge.size)
        votes = np.stack([(sub_ids == k).sum(axis=0) for k in range(-1, len(scene.objects))])
        ids[edge] = np.argmax(votes, axis=0) - 1
    image = np.clip(colour.T.reshape(size, size, 3) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    id_map = ids.reshape(size, size)
    return image, id_map, _tight_boxes(id_map, len(scene.objects))


def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of image ``index`` of ``split``: independent of every other image."""
    return np.random.SeedSequence([seed, SPLITS.index(split), index])


@dataclass(frozen=True)
class _Job:
    out_dir: str
    split: str
    index: int
    seed: int
    render_kwargs: dict


def _render_and_write(job: _Job) -> np.ndarray:
    """Renders one image and writes its PNG and box file; returns its boxes."""
    rng = np.random.Generator(np.random.PCG64(image_seed(job.seed, job.split, job.index)))
    image, _, boxes = render_room(rng, **job.render_kwargs)
    split_dir = Path(job.out_dir) / job.split
    Image.fromarray(image).save(split_dir / f"{job.index}-room.png")
    lines = "".join(f"{cx!r},{cy!r},{w!r},{h!r}\n" for cx, cy, w, h in boxes.tolist())
    (split_dir / "bb" / f"bb_{job.index}.txt").write_text(lines)
    return boxes


def _run_jobs(jobs: Sequence[_Job], num_workers: int) -> Iterator[np.ndarray]:
    if num_workers <= 1:
        yield from map(_render_and_write, jobs)
        return
    # fork where available: a spawned worker would re-import the whole package
    # (torch included, ~2 s each). The workers only use numpy and PIL, so the
    # caller's threads (torch, tqdm) are no deadlock risk for them.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_workers) as pool:
        yield from pool.imap(_render_and_write, jobs, chunksize=16)


def generate_rooms(
    out_root: str | os.PathLike,
    image_size: int = 128,
    num_train: int = DEFAULT_COUNTS[0],
    num_val: int = DEFAULT_COUNTS[1],
    num_test: int = DEFAULT_COUNTS[2],
    min_objects: int = 1,
    max_objects: int = 5,
    min_size: float = DEFAULT_MIN_SIZE,
    max_size: float = DEFAULT_MAX_SIZE,
    seed: int = 0,
    supersample: int = DEFAULT_SUPERSAMPLE,
    shadows: bool = True,
    palette: str = "full",
    walls: str = "shaded",
    num_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generates a procedural 3D-room dataset in the OBJ3D layout.

    The dataset is built in a temporary sibling folder and moved into place
    only when complete, replacing any previous ``out_root``; an interruption
    leaves the old state (or nothing) behind.

    Args:
        out_root: Dataset folder to create, e.g. ``data/ROOMS``.
        image_size: Side of the square images in pixels; box files are in
            pixels of this size (recorded in ``meta.json``).
        num_train: Images in ``train``.
        num_val: Images in ``val`` (SPACE's evaluation uses the first 500).
        num_test: Images in ``test``.
        min_objects: Fewest objects per image (at least 1).
        max_objects: Most objects per image.
        min_size: Smallest on-screen object size, fraction of the image side.
        max_size: Largest on-screen object size, fraction of the image side.
        seed: Dataset seed; the same arguments give byte-identical files.
        supersample: Rays per axis for pixels on an edge (adaptive
            antialiasing); 1 turns antialiasing off.
        shadows: Cast shadows (see :func:`render_room`).
        palette: Colour ranges (see :data:`PALETTES`).
        walls: one of :data:`WALL_STYLES` (see :func:`render_room`).
        num_workers: Processes to render with; ``None`` picks up to 2 (one per
            core), and small datasets are rendered in this process.
        progress: Show a tqdm progress bar.

    Returns:
        The path of the finished dataset.

    Raises:
        ValueError: On an invalid argument.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if min(num_train, num_val, num_test) < 0:
        raise ValueError(f"image counts must be >= 0, got {num_train}, {num_val}, {num_test}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0.0 < min_size <= max_size < 1.0:
        raise ValueError(f"need 0 < min_size <= max_size < 1 (fractions of the image side), got {min_size}, {max_size}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    check_style(palette, walls)
    out_root = Path(out_root)
    counts = dict(zip(SPLITS, (num_train, num_val, num_test)))
    total = sum(counts.values())
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1) if total >= MIN_IMAGES_FOR_WORKERS else 1
    render_kwargs = dict(
        image_size=image_size, min_objects=min_objects, max_objects=max_objects,
        min_size=min_size, max_size=max_size, supersample=supersample, shadows=shadows, palette=palette,
        walls=walls,
    )

    try:
        out_root.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out_root.parent, f".{out_root.name}.tmp-", r"-[a-z0-9_]{8}")  # left by a killed generation
        stage = Path(tempfile.mkdtemp(prefix=f".{out_root.name}.tmp-{os.getpid()}-", dir=out_root.parent))
    except OSError as error:  # else named by the temporary folder beside it
        raise OSError(error.errno, f"cannot make the dataset folder {out_root}: {error.strerror}") from None
    try:
        for split in SPLITS:
            (stage / split / "bb").mkdir(parents=True)
        jobs = [_Job(str(stage), split, i, seed, render_kwargs) for split in SPLITS for i in range(counts[split])]
        sizes = []
        for boxes in tqdm(_run_jobs(jobs, num_workers), total=total, desc=f"rooms -> {out_root.name}",
                          unit="img", disable=not progress):
            sizes.extend(boxes[:, 2:].ravel() / image_size)
        sizes = np.asarray(sizes)
        meta = {
            "generator": "space.data.rooms.generate_rooms",
            "image_size": image_size,
            "counts": counts,
            "params": dict(render_kwargs, seed=seed),
            "box_format": "cx,cy,w,h in pixels of image_size; pixel j spans [j, j+1)",
            "box_side_fraction": {
                "mean": round(float(sizes.mean()), 4) if sizes.size else None,
                "min": round(float(sizes.min()), 4) if sizes.size else None,
                "max": round(float(sizes.max()), 4) if sizes.size else None,
            },
        }
        (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        publish_directory(stage, out_root)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_root
