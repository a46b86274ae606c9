"""
Data for TA-TiTok and MaskGen, all of it in this single file: image-text tar shards in the img2dataset /
WebDataset layout, folders of images with .txt captions, the procedural `shapes` set for the CPU quickstart
(and the detector that reads its images back, for sample.py --eval shapes), metadata filters, exact resume,
and the text-to-image pretokenizer that the official repository lacks.

Usage (library):
    loader = make_loader('data/{00000..00123}.tar', batch_size=32, image_size=256, rank=rank,
                         world_size=world, num_workers=8)  # or a folder, a glob, a list, 'shapes',
                                                           # 'shapes:val', a token-shard folder
    for batch in loader: ...  # {'image' (B,3,H,W) in [0,1] | 'tokens', 'caption', 'aes', 'key'}
    ckpt['data'] = loader.state_dict()
    loader.load_state_dict(ckpt['data'])
    print(loader.counts)
Usage (CLI):
    python data.py stats 'data/{00000..00123}.tar'  # read / kept / filtered / corrupt, JSON last
    python data.py pretokenize --tokenizer vq128 --data 'data/*.tar' --out_dir tokens/
    torchrun --nproc_per_node=8 data.py pretokenize --tokenizer out/tok --data 'data/*.tar' --out_dir tokens/

References:
1) TA-TiTok / MaskGen paper: https://arxiv.org/abs/2501.07730
2) official reader: https://github.com/bytedance/1d-tokenizer (data/webdataset_reader.py)
3) img2dataset output layout: https://github.com/rom1504/img2dataset
4) WebDataset conventions (key.ext members): https://github.com/webdataset/webdataset
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import glob
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import sys
import tarfile
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from tatitok import UserError
from runtime import write_atomic, number, make_out_dir

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
AES_FIELDS = ('aesthetic_score', 'aesthetic', 'AESTHETIC_SCORE', 'aes_score')  # LAION / DataComp / ours
WATERMARK_FIELDS = ('pwatermark', 'watermark')  # LAION-5B metadata
STREAMS = 256  # virtual streams of a training source (see _Stream): 1, 2, 4, ... 256 processes
DEFAULT_AES = 6.0  # the official sample_aesthetic_score for stage 1, for a sample that carries none
# the phrases a recaption may start with; in this order, so 'showcases' is tried before 'shows'
RECAP_PREFIXES = tuple(f"The image {verb}"
                       for verb in ('depicts', 'displays', 'showcases', 'features', 'shows'))

# -----------------------------------------------------------------------------
# the procedural shapes set: coloured circles / squares / triangles on grey, captions that name them

SHAPES_BG = (128, 128, 128)
SHAPES_COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220),
                  'yellow': (240, 210, 40), 'purple': (150, 60, 190), 'orange': (245, 140, 30),
                  'white': (245, 245, 245), 'black': (20, 20, 20)}
SHAPES_KINDS = ('circle', 'square', 'triangle')
# the 24 prompts "a {colour} {shape}": train_maskgen.py's sample grid, the 'single' category of SHAPES_SUITE
SHAPES_EVAL_PROMPTS = [f"a {c} {s}" for c in SHAPES_COLOURS for s in SHAPES_KINDS]
# half-extent / image size, by the number of objects in the image. Two large ones must fit side by
# side; one alone is drawn larger, and a pair's small one not much smaller than its large one, as shape is the
# last thing a small tokenizer learns and its signal grows with the area (TUNING.md)
SHAPES_RADIUS = {1: {'small': 0.25, 'large': 0.35}, 2: {'small': 0.18, 'large': 0.22}}
SHAPES_PAIRS = 1 / 2  # the share of images with two objects
# where the second of two objects is, by (horizontal, first_low): the caption's relation
SHAPES_RELATION = {(True, True): 'to the left of', (True, False): 'to the right of',
                   (False, True): 'above', (False, False): 'below'}

SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges, as a camera would see them

def _draw(draw, kind, cx, cy, r, rgb):
    """One shape centred at (cx, cy) with half-extent r, in pixels of the final image."""
    cx, cy, r = cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == 'circle':
        draw.ellipse(box, fill=rgb)
    elif kind == 'square':
        draw.rectangle(box, fill=rgb)
    else:  # upright, fills half its box
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)

def _shape_name(obj, sized):
    """(colour, kind, scale) -> 'red circle', or 'large red circle' when sized."""
    colour, kind, scale = obj
    if sized:
        return f"{scale} {colour} {kind}"
    return f"{colour} {kind}"

def shapes_sample(index, size=64, split='train', seed=0, max_objects=2):
    """Sample `index` of the infinite shapes stream -> (PIL RGB image, caption).
    Deterministic; 'val' is held out."""
    rng = random.Random(f"shapes/{seed}/{split}/{index}")  # str seeds hash with sha512: same everywhere
    img = Image.new('RGB', (size * SUPERSAMPLE, size * SUPERSAMPLE), SHAPES_BG)
    draw = ImageDraw.Draw(img)
    m = 1 + size // 32  # margin in pixels (of the final image, as all lengths here)
    n_objects = 1
    if max_objects != 1 and rng.random() >= 1 - SHAPES_PAIRS:
        n_objects = 2
    objs = []  # (colour, kind, scale), scale 'small' or 'large'
    for _ in range(n_objects):
        while True:
            o = (rng.choice(list(SHAPES_COLOURS)), rng.choice(SHAPES_KINDS),
                 rng.choice(('small', 'large')))
            if not objs or o[:2] != objs[0][:2]:  # two must differ, or the caption is ambiguous
                break
        objs.append(o)

    if n_objects == 1:
        colour, kind, scale = objs[0]
        r = SHAPES_RADIUS[1][scale] * size
        side = ''
        if scale != 'large':  # a large one has no room to move
            side = rng.choice(['', '', 'left', 'right'])
        lo, hi = r + m, size - r - m
        if side == 'left':
            cx = rng.uniform(lo, min(hi, size * 0.4))
        elif side == 'right':
            cx = rng.uniform(max(lo, size * 0.6), hi)
        else:
            cx = rng.uniform(lo, hi)
        cy = rng.uniform(lo, hi)
        _draw(draw, kind, cx, cy, r, SHAPES_COLOURS[colour])
        caption = f"a {_shape_name(objs[0], rng.random() < 0.5)}"
        if side:
            caption += f" on the {side}"
        return img.resize((size, size), Image.BOX), caption

    # two objects: one per half along a random axis, never touching at >= 48 px; at 32 px the faint
    # anti-aliased edges of two large ones may touch (detect_shapes reads such pixels as grey). The
    # margin to the middle is 1 px here, as two large ones just fit side by side
    horizontal = rng.random() < 0.5  # side by side, else one above the other
    first_low = rng.random() < 0.5  # the first object left / on top
    for (colour, kind, scale), low in zip(objs, (first_low, not first_low)):
        r = SHAPES_RADIUS[2][scale] * size
        if low:  # a: along the axis, in the object's half
            a = rng.uniform(r + 1, size / 2 - r - 1)
        else:
            a = rng.uniform(size / 2 + r + 1, size - r - 1)
        b = rng.uniform(r + m, size - r - m)  # b: across the axis, anywhere
        cx, cy = (a, b) if horizontal else (b, a)
        _draw(draw, kind, cx, cy, r, SHAPES_COLOURS[colour])
    relation = SHAPES_RELATION[horizontal, first_low]
    sized = rng.random() < 0.5  # both objects say their size, or neither
    caption = f"a {_shape_name(objs[0], sized)} {relation} a {_shape_name(objs[1], sized)}"
    return img.resize((size, size), Image.BOX), caption

# -----------------------------------------------------------------------------
# reading shapes images back: the objects in an image, and how well they match a caption. The categories of
# sample.py --eval shapes follow GenEval's (Ghosh et al. 2023, https://arxiv.org/abs/2310.11513) on this grammar

def _two_object_prompts(n):
    """n prompts "a {c1} {s1} {relation} a {c2} {s2}": two different colours, so that each object is found by its
    colour; shapes at random, the four relations in turn. A str seed: the same list everywhere."""
    rng = random.Random('shapes/suite')
    relations = list(SHAPES_RELATION.values())
    prompts = []
    for i in range(n):
        c1, c2 = rng.sample(list(SHAPES_COLOURS), 2)
        prompts.append(f"a {c1} {rng.choice(SHAPES_KINDS)} {relations[i % 4]} a {c2} {rng.choice(SHAPES_KINDS)}")
    return prompts

_PAIRS = [(c, s) for c in SHAPES_COLOURS for s in SHAPES_KINDS]  # the 24 (colour, shape) pairs
# the suite's prompts by category, in the data's caption grammar. Size and side alternate along the 24 pairs, so
# that each colour and each shape is asked with both
SHAPES_SUITE = {
    'single': SHAPES_EVAL_PROMPTS,
    'size': [f"a {('small', 'large')[i % 2]} {c} {s}" for i, (c, s) in enumerate(_PAIRS)],
    'side': [f"a small {c} {s} on the {('left', 'right')[i % 2]}" for i, (c, s) in enumerate(_PAIRS)],
    'two': _two_object_prompts(48)}
# an object of the data covers ~150 px or more of a 64 px image (the smallest, a pair's small triangle: half of
# (2 * 0.18 * 64)^2 = 265 px, less what the opening trims); a region under 75 px is a fragment: blur, a blend
# between two colours
SHAPES_MIN_AREA = 75

def _components(mask):
    """4-connected components of a bool mask, by repeated dilation (no scipy needed at 64 px)."""
    comps = []
    left = mask.copy()  # pixels of components not found yet
    while left.any():
        comp = np.zeros_like(mask)
        comp[np.unravel_index(left.argmax(), mask.shape)] = True  # grown from its first pixel
        while True:
            grown = comp.copy()
            grown[1:] |= comp[:-1]
            grown[:-1] |= comp[1:]
            grown[:, 1:] |= comp[:, :-1]
            grown[:, :-1] |= comp[:, 1:]
            grown &= left
            if (grown == comp).all():
                break
            comp = grown
        left &= ~comp
        comps.append(comp)
    return comps

def detect_shapes(img):
    """uint8 (H, W, 3), a shapes image drawn or generated (32 or 64 px) -> its objects, largest first, each a dict:
    colour (the nearest palette entry), shape, size ('small' / 'large', as SHAPES_RADIUS draws them for an image of
    this many objects), x, y (the centre, in pixels of img).
    Each pixel is labelled with the nearest of the grey and the palette, so objects of two colours are told apart
    where they touch; an object is a 4-connected region of one colour. A median filter, an opening of each colour's
    mask (a blend between two colours, stray pixels that would stretch the box) and SHAPES_MIN_AREA make it survive
    the blur and noise of a generated image. Shape: an upright triangle has 1/4 of its area in the upper half of
    its bounding box (circle, square 1/2), and a square fills its box (a circle pi/4)."""
    img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    w, h = img.size
    if img.size != (64, 64):  # one scale for the filters and areas; 3x3 filters would erase a 32 px triangle's tip
        img = img.resize((64, 64), Image.BILINEAR)
    x = np.asarray(img.filter(ImageFilter.MedianFilter(3)), np.float32)  # (64, 64, 3)
    palette = np.array([SHAPES_BG, *SHAPES_COLOURS.values()], np.float32)  # (9, 3)
    label = np.linalg.norm(x[:, :, None] - palette, axis=-1).argmin(-1)  # (64, 64): 0 grey, k colour k - 1
    regions = []  # (colour, (64, 64) bool mask)
    for k in np.unique(label[label > 0]):
        mask = Image.fromarray((label == k).astype(np.uint8) * 255)
        opened = np.asarray(mask.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))) > 0
        colour = list(SHAPES_COLOURS)[k - 1]
        regions += [(colour, c) for c in _components(opened) if c.sum() >= SHAPES_MIN_AREA]
    regions.sort(key=lambda r: -r[1].sum())
    radii = SHAPES_RADIUS[min(max(len(regions), 1), 2)]  # the data draws one or two
    objects = []
    for colour, comp in regions:
        ys, xs = np.nonzero(comp)
        mid = (ys.min() + ys.max()) / 2
        top = (ys < mid).sum() / (ys > mid).sum()  # area of the upper half / the lower half
        fill = comp.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = 'circle'
        if top < 0.6:
            shape = 'triangle'
        elif fill > 0.89:
            shape = 'square'
        # half-extent / image side, as SHAPES_RADIUS, from the area (circle pi r^2, square 4 r^2, upright triangle
        # 2 r^2): the opening trims a triangle's acute corners off its box, hardly off its area
        half = math.sqrt(comp.sum() / {'circle': math.pi, 'square': 4.0, 'triangle': 2.0}[shape]) / 64
        size = 'small'
        if half > (radii['small'] + radii['large']) / 2:
            size = 'large'
        # pixel i covers [i, i + 1); x: the mean, as all three shapes are symmetric left-right; y: the box's middle,
        # as the data places a triangle by its box
        objects.append(dict(colour=colour, shape=shape, size=size, x=(xs.mean() + 0.5) * w / 64,
                            y=(ys.min() + ys.max() + 1) / 2 * h / 64))
    return objects

def classify_shapes(img):
    """uint8 (H, W, 3) -> (colour, shape) of the largest object, or (None, None) if nothing stands out from the
    grey."""
    objects = detect_shapes(img)
    if not objects:
        return None, None
    return objects[0]['colour'], objects[0]['shape']

_OBJECT = rf"a (?:(small|large) )?({'|'.join(SHAPES_COLOURS)}) ({'|'.join(SHAPES_KINDS)})"

def parse_shapes_caption(caption):
    """A caption of shapes_sample's grammar -> ([(colour, shape, size or None)] of its one or two objects, side or
    None, relation or None); ValueError for any other text."""
    m = re.fullmatch(rf"{_OBJECT}(?: on the (left|right))?", caption)
    if m:
        return [(m[2], m[3], m[1])], m[4], None
    m = re.fullmatch(rf"{_OBJECT} ({'|'.join(SHAPES_RELATION.values())}) {_OBJECT}", caption)
    if m is None:
        raise ValueError(f"not a caption of the shapes set: {caption!r}")
    return [(m[2], m[3], m[1]), (m[6], m[7], m[5])], None, m[4]

def shapes_category(caption):
    """The suite's category of a caption: 'two' objects, else 'side' if it says one, else 'size' if it says one,
    else 'single'."""
    objects, side, relation = parse_shapes_caption(caption)
    if relation:
        return 'two'
    if side:
        return 'side'
    if objects[0][2]:
        return 'size'
    return 'single'

def _find(objects, colour, shape, other=None):
    """The object that stands for "a {colour} {shape}": the largest of that colour and shape, else the largest of
    that colour, never `other`; None if there is none."""
    same = [o for o in objects if o['colour'] == colour and o is not other]
    exact = [o for o in same if o['shape'] == shape]
    return (exact + same + [None])[0]

def score_shapes(caption, objects, size):
    """An image's objects (detect_shapes; the image is size x size px) against its caption -> {check: bool, or None
    where it cannot be made}. One object: the largest one's colour, shape, and its size and side where the caption
    says them. Two: 'colours' (one object of each colour), 'objects' (each of them of its shape too), 'size' where
    said, 'relation' (None unless both colours are found). 'all': every check passed."""
    wanted, side, relation = parse_shapes_caption(caption)
    if len(wanted) == 1:
        colour, shape, scale = wanted[0]
        o = dict(colour=None, shape=None, size=None, x=np.nan)  # what an empty image shows
        if objects:
            o = objects[0]
        checks = dict(colour=o['colour'] == colour, shape=o['shape'] == shape)
        if scale:
            checks['size'] = o['size'] == scale
        # where the data draws a lone object said to be on the left: centre x <= 0.4 of the side (>= 0.6 on the
        # right), give or take detect_shapes' error in x, up to 1/128 of the side (2000 objects drawn at 32 and 64 px)
        if side == 'left':
            checks['side'] = bool(o['x'] <= (0.4 + 1 / 128) * size)
        if side == 'right':
            checks['side'] = bool(o['x'] >= (0.6 - 1 / 128) * size)
        checks['all'] = all(checks.values())
        return checks
    (c1, s1, z1), (c2, s2, z2) = wanted
    a = _find(objects, c1, s1)
    b = _find(objects, c2, s2, other=a)
    found = a is not None and b is not None
    checks = dict(colours=found, objects=found and (a['shape'], b['shape']) == (s1, s2))
    if z1:  # the data sizes both objects or neither
        checks['size'] = found and (a['size'], b['size']) == (z1, z2)
    checks['relation'] = None
    if found:  # as the data draws "A {relation} B": each centre in its own half of the image along the axis
        horizontal, first_low = {r: k for k, r in SHAPES_RELATION.items()}[relation]
        axis = 'x' if horizontal else 'y'
        low, high = (a, b) if first_low else (b, a)
        checks['relation'] = bool(low[axis] < size / 2 < high[axis])
    checks['all'] = checks['objects'] and checks.get('size', True) and bool(checks['relation'])
    return checks

def edit_caption(caption, word):
    """A caption of one object with its colour word (word='colour') or its shape word ('shape') changed to the next
    in SHAPES_COLOURS / SHAPES_KINDS: the edits sample.py --eval edits asks for."""
    [(colour, shape, scale)], side, _ = parse_shapes_caption(caption)
    if word == 'colour':
        names = list(SHAPES_COLOURS)
        colour = names[(names.index(colour) + 1) % len(names)]
    else:
        shape = SHAPES_KINDS[(SHAPES_KINDS.index(shape) + 1) % len(SHAPES_KINDS)]
    text = ' '.join(w for w in ('a', scale, colour, shape) if w)
    if side:
        text += f" on the {side}"
    return text

def score_edit(caption, before, objects, size):
    """An edited image's objects (detect_shapes) against the edited caption and the object it was edited from ->
    {'colour', 'shape': the caption's (the new word, or the kept one), 'size': kept, 'place': the centre kept
    within a tenth of the side, 'all'}."""
    [(colour, shape, _)], _, _ = parse_shapes_caption(caption)
    o = dict(colour=None, shape=None, size=None, x=np.inf, y=np.inf)  # what an empty image shows
    if objects:
        o = objects[0]
    near = abs(o['x'] - before['x']) <= size / 10 and abs(o['y'] - before['y']) <= size / 10
    checks = dict(colour=o['colour'] == colour, shape=o['shape'] == shape, size=o['size'] == before['size'],
                  place=bool(near))
    checks['all'] = all(checks.values())
    return checks

def shapes_scores(captions, detections, size):
    """Images (their captions, their objects) -> {category: {check: the share of its images that pass it, 'n': its
    images}}; 'relation' is the share among the images that have both objects' colours, 'relation_n' of them."""
    checks = {}  # category -> check -> [bool or None per image]
    for caption, objects in zip(captions, detections):
        category = checks.setdefault(shapes_category(caption), {})
        for name, ok in score_shapes(caption, objects, size).items():
            category.setdefault(name, []).append(ok)
    scores = {}
    for category, c in checks.items():
        scores[category] = {'n': len(c['all'])}
        for name, oks in c.items():
            made = [ok for ok in oks if ok is not None]
            scores[category][name] = float(np.mean(made)) if made else None
        if 'relation' in c:
            scores[category]['relation_n'] = sum(ok is not None for ok in c['relation'])
    return scores

def shapes_variety(detections, size):
    """Where the largest objects of images (those with one) lie -> {'small': their share drawn small, 'std_x',
    'std_y': the spread of their centres / the image side, 'n'}; None for each where no image has one."""
    largest = [objects[0] for objects in detections if objects]
    if not largest:
        return dict(small=None, std_x=None, std_y=None, n=0)
    return dict(small=float(np.mean([o['size'] == 'small' for o in largest])),
                std_x=float(np.std([o['x'] for o in largest]) / size),
                std_y=float(np.std([o['y'] for o in largest]) / size), n=len(largest))

def shapes_data_variety(size, n=5000):
    """shapes_variety of the data's own images captioned "a {colour} {shape}" (no size, no side: 3/8 of the lone
    objects) among the first n of the training stream, read by the same detector: what the suite's variety is
    measured against (~940 images: the share small to +-0.015, one standard error)."""
    detections = []
    for i in range(n):
        img, caption = shapes_sample(i, size)
        if shapes_category(caption) == 'single':
            detections.append(detect_shapes(np.asarray(img)))
    return shapes_variety(detections, size)

# -----------------------------------------------------------------------------
# finding files: brace patterns, globs, lists, folders

def _braceexpand(pattern):
    """'s{0..2}{a,b}' -> ['s0a', 's0b', 's1a', ...], as the shell and webdataset expand it."""
    m = re.search(r'\{([^{}]*)\}', pattern)
    if not m:
        return [pattern]
    r = re.fullmatch(r'(\d+)\.\.(\d+)', m[1])
    if r:  # {00000..00123} keeps the zero padding
        options = [str(i).zfill(len(r[1])) for i in range(int(r[1]), int(r[2]) + 1)]
    else:
        options = m[1].split(',')
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [p for o in options for p in _braceexpand(head + o + tail)]

def expand_source(source):
    """-> ('shapes', split) | ('folder', [(image, caption, key)]) | ('tar', [shard paths]);
    UserError if empty."""
    kind, items, _ = _expand(source)
    return kind, items

def _expand(source):
    """expand_source, and the list of the shards a pattern or list names that do not exist (a glob
    that matches no file, or a name that is not a file)."""
    if isinstance(source, str) and source.split(':')[0] == 'shapes':
        split = None
        if ':' in source:
            split = source.split(':')[1]
        return 'shapes', split, []
    if isinstance(source, str) and os.path.isdir(source):
        shards = sorted(glob.glob(os.path.join(source, '*.tar')))
        if shards:  # e.g. the pretokenizer's output folder
            return 'tar', shards, []
        items = []
        for d, _, files in sorted(os.walk(source)):
            for f in sorted(files):
                stem, ext = os.path.splitext(f)
                if ext[1:].lower() not in IMAGE_EXTS:
                    continue
                key = os.path.relpath(os.path.join(d, stem), source)
                items.append((os.path.join(d, f), os.path.join(d, stem + '.txt'), key))
        if not items:
            raise UserError(f"no images (.jpg/.png/.webp) or .tar shards in folder {source}")
        return 'folder', items, []
    patterns = [source] if isinstance(source, str) else source
    found, missing = set(), set()
    for p in patterns:
        for path in _braceexpand(str(p)):
            matches = [path]
            if glob.has_magic(path):
                matches = glob.glob(path)
            files = [f for f in matches if os.path.isfile(f)]
            found.update(files)
            if not files:
                missing.add(path)
    if not found:
        raise UserError(f"no files match {source!r}")
    return 'tar', sorted(found), sorted(missing)

def _tar_index(path, counts):
    """Scan a shard's headers (no data is read) -> [(key, {ext: (offset, size)})], grouped the
    WebDataset way: key.ext members of one key are one sample."""
    samples = {}
    broken = True
    try:
        with open(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as tf:
            while (m := tf.next()) is not None:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                stem, _, ext = base.partition('.')  # key.tokens.npy -> ext 'tokens.npy'
                key = os.path.join(d, stem)
                samples.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
            # tarfile stops silently at a garbled header or a truncation: a good shard ends in a
            # zero block
            f.seek(tf.offset)
            end = f.read(tarfile.BLOCKSIZE)
            broken = len(end) < tarfile.BLOCKSIZE or bool(end.strip(b'\0'))
    except (OSError, tarfile.TarError, EOFError):  # unreadable or not a tar: keep what was indexed
        pass
    if broken:  # the rest of the shard is lost, and its last sample may be missing members
        counts['bad_shards'] += 1
        if samples:
            samples.popitem()
    return list(samples.items())

# -----------------------------------------------------------------------------
# decoding, filtering, transforms

def _read_file(path):
    """A file's bytes, or b'' when it cannot be read (a folder item without its caption file)."""
    try:
        with open(path, 'rb') as fp:
            return fp.read()
    except OSError:
        return b''

def _decode_caption(raw):
    """Caption bytes -> (text, whether it needed the fallback), or (None, True). UTF-8 first, else
    cp1252, the commonest legacy encoding of web alt text: every byte but 5 decodes in it, so a
    caption in yet another encoding may come out as the wrong characters (hence the count of
    recovered captions); with one of those 5 bytes, the sample is dropped."""
    try:
        return raw.decode('utf-8'), False
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode('cp1252'), True
    except UnicodeDecodeError:
        return None, True

def _read_member(f, span):
    """The bytes of one shard member, span = (offset, size); EOFError if the file ends first."""
    offset, size = span
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:  # a truncated last member
        raise EOFError
    return data

def _first(d, fields):
    """The value of the first of `fields` that `d` has (and is not None), else None."""
    return next((d[k] for k in fields if d.get(k) is not None), None)

def _caption(txt, recap, rng, recap_prob):
    """The caption to train on, as the official process_recap_text picks it: the recaption with
    probability recap_prob (the release's use_recap_prob is 0.95), stripped, and only if it starts
    with the exact (case-sensitive) 'The image depicts' / displays / showcases / features / shows,
    that phrase removed, the rest stripped and its first letter capitalised. Else the original txt,
    as it is."""
    if not recap or rng.random() >= recap_prob:
        return txt
    c = recap.strip()
    for phrase in RECAP_PREFIXES:
        if c.startswith(phrase):
            c = c[len(phrase):].strip()
            c = c[:1].upper() + c[1:]
            break
    if not c:  # nothing after the phrase: the original caption (the release would train on '')
        return txt
    return c

class ImageError(UserError):
    """An image that cannot be used: not one, or too large (TooLarge), named."""


class TooLarge(ImageError):
    pass


def open_image(src, name=None):
    """Any image PIL reads (a path or a file object) as 8-bit RGB, as it was meant to be seen: its EXIF
    orientation applied (phone photos), the first frame of an animation, 16-bit and float images scaled to
    8 bits (not clipped), palette, grey and CMYK converted, transparency composited on white. ImageError
    (one line, naming it) for what is not an image, or one over MAX_IMAGE_PIXELS pixels (an environment
    variable; default PIL's 89.5M), whose header alone is read."""
    name = name or src
    limit = int(os.environ.get('MAX_IMAGE_PIXELS', 89_478_485))
    Image.MAX_IMAGE_PIXELS = None  # checked here, from the header, with a message that says what to do
    try:
        img = Image.open(src)
        w, h = img.size
        if w * h > limit:
            raise TooLarge(f"{name}: {w}x{h} is {w * h} pixels, over MAX_IMAGE_PIXELS={limit} (an "
                           f"environment variable: raise it to read this image)")
        img.seek(0)  # the first frame
        img = ImageOps.exif_transpose(img)
        if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):  # 16-bit (or 32-bit) grey, float grey
            x = np.asarray(img, dtype=np.float64)
            top = 1.0  # float images in [0, 1] unless their values say [0, 255]
            if img.mode != 'F':
                top = 65535.0
            elif x.max() > 1:
                top = 255.0
            img = Image.fromarray(np.clip(np.round(x / top * 255), 0, 255).astype(np.uint8))
        if img.mode in ('P', 'PA') or 'transparency' in img.info:  # a palette, or a transparent colour
            img = img.convert('RGBA')
        if img.mode in ('RGBA', 'LA', 'La', 'RGBa'):  # on white
            white = Image.new('RGBA', img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img.convert('RGBA'))
        return img.convert('RGB')
    except ImageError:
        raise
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, EOFError...)
        raise ImageError(f"{name}: not an image PIL can read") from None


def _resize_crop(img, size, rng, train, flip):
    """Shorter side to `size` (bicubic; PIL's resize is antialiased), random crop (train) or centre
    crop, maybe flip -> uint8 (size, size, 3)."""
    w, h = img.size
    if min(w, h) != size:  # int() truncation as torchvision's Resize does
        if w < h:
            new_size = (size, max(size, int(size * h / w)))
        else:
            new_size = (max(size, int(size * w / h)), size)
        img = img.resize(new_size, Image.BICUBIC)
    w, h = img.size
    if train:
        x, y = rng.randint(0, w - size), rng.randint(0, h - size)
    else:  # torchvision's CenterCrop rounding
        x, y = round((w - size) / 2), round((h - size) / 2)
    img = img.crop((x, y, x + size, y + size))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img)  # (H, W, 3) uint8

class _Stream(torch.utils.data.IterableDataset):
    """The data of one rank. A source is read as `streams` virtual streams, each a fixed sequence of
    units (a shard drawn with replacement, an epoch of a folder, the shapes range): stream v's p-th kept
    sample is global sample g = p * streams + v. Rank r reads the streams v = r (mod world), so its
    samples are g = r, r + world, ... in order, and its worker w reads the rank's j-th stream for
    j = w (mod workers). Everything random is a function of (seed, v, t, j), v's unit t and sample j in
    it, so a position (t, j, p) per stream replays exactly on any number of ranks and workers."""

    def __init__(self, kind, items, split, batch_size, image_size, train, seed, rank, world_size,
                 num_workers, streams, flip, filters, recap_prob, max_objects, num_samples, raw,
                 prepare):
        self.kind, self.items, self.split = kind, items, split
        self.batch_size, self.image_size, self.train = batch_size, image_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.streams, self.flip = num_workers, streams, flip
        self.filters, self.recap_prob = filters, recap_prob
        self.max_objects, self.num_samples = max_objects, num_samples
        self.raw, self.prepare = raw, prepare
        self.start = None  # {v: [t, j, p]}, set by Loader before each iteration

    def my_streams(self):
        return list(range(self.rank, self.streams, self.world_size))

    def _unit(self, v, t, counts):
        """Stream v's unit t -> (sample refs, tar path or None, unit name), or None past its end."""
        V = self.streams
        if self.kind == 'shapes':
            n = 2 ** 62  # endless
            if not self.train:
                n = self.num_samples or 1000  # one evaluation pass
            if t > 0:
                return None
            return range(v, n, V), None, f"shapes-{v:05d}"
        order = list(range(len(self.items)))
        if self.kind == 'folder':
            if not self.train and t > 0:
                return None
            if self.train:
                random.Random(f"{self.seed}/epoch/{t}").shuffle(order)
            return [self.items[i] for i in order[v::V]], None, f"folder-{v:05d}"
        if self.train:  # like webdataset's ResampledShards: with replacement, forever
            path = self.items[random.Random(f"{self.seed}/resample/{v}/{t}").randrange(len(order))]
        elif v + t * V < len(order):  # one pass: stream v reads shards v, v + V, ...
            path = self.items[v + t * V]
        else:
            return None
        refs = _tar_index(path, counts)
        if self.train:  # whole-shard shuffle
            random.Random(f"{self.seed}/shard/{v}/{t}").shuffle(refs)
        return refs, path, os.path.basename(path).rsplit('.', 1)[0]

    def _read(self, v, t, j, p):
        """Stream v's samples from position (t, j), p kept so far -> yields (sample or None at a
        unit's end, position after it, the counts since the last yield)."""
        counts, mark = Counter(), p
        passes = max(1, len(self.items))  # units per pass: a pass that keeps nothing must not spin
        while True:
            if self.train and t % passes == 0 and j == 0:
                if t > 0 and p == mark:
                    raise UserError(f"stream {v}: {passes} unit(s) in a row kept no sample (all "
                                    f"filtered or corrupt?)")
                mark = p
            unit = self._unit(v, t, counts if j == 0 else Counter())  # a bad shard counts once
            if unit is None:
                yield None, (t, j, p), counts
                return
            refs, path, name = unit
            with open(path, 'rb') if path else contextlib.nullcontext() as f:
                while j < len(refs):
                    rng = random.Random(f"{self.seed}/{v}/{t}/{j}")
                    s = self._sample(refs[j], f, rng, counts)
                    j += 1
                    counts['read'] += 1
                    if isinstance(s, str):
                        counts[s] += 1
                        continue
                    counts['kept'] += 1
                    if self.raw:
                        s['unit'] = name
                    if self.train:
                        s['index'] = p * self.streams + v  # the global sample index
                        if self.prepare:
                            s.update(self.prepare(s, s['index']))
                    p += 1
                    yield s, (t, j, p), counts
                    counts = Counter()
            if self.raw:  # the pretokenizer writes one shard per unit: this one is complete
                yield dict(_end=name), (t + 1, 0, p), counts
                counts = Counter()
            t, j = t + 1, 0

    def _size_filter(self, w, h):
        """The counts key of the size filter that drops a w x h image, or None."""
        f = self.filters
        if f.get('min_size') and max(w, h) < f['min_size']:
            return 'filtered/size'
        if f.get('max_aspect') and max(w, h) / min(w, h) > f['max_aspect']:
            return 'filtered/aspect'
        return None

    def _meta_filter(self, meta):
        """The counts key of the metadata filter that drops a sample, or None. A missing score fails
        too, so a set without the field shows up in the counts."""
        f = self.filters
        aes, wm = _first(meta, AES_FIELDS), _first(meta, WATERMARK_FIELDS)
        if f.get('min_aes') is not None and (aes is None or aes < f['min_aes']):
            return 'filtered/aesthetic'
        if f.get('max_watermark') is not None and (wm is None or wm >= f['max_watermark']):
            return 'filtered/watermark'
        return None

    def _load(self, ref, f, counts):
        """The raw parts of a folder item or a shard's sample -> (key, meta, txt, recap, ext, data),
        or the reason (a counts key) it cannot be read. ext: 'tokens.npy', an image's, or None."""
        if self.kind == 'folder':
            img_path, txt_path, key = ref
            meta, ext = {}, None
            texts = {'txt': _read_file(txt_path)}  # b'' when there is none: counted as no caption
            data = _read_file(img_path)  # b'' when unreadable: counted as a corrupt image
        else:
            key, members = ref
            texts = {}  # the captions' bytes, by member
            try:
                meta = {}
                if 'json' in members:
                    meta = json.loads(_read_member(f, members['json']))
                if not isinstance(meta, dict):  # valid json, but not the object of a sample's fields
                    raise ValueError
                for name in ('txt', 'recap_txt'):
                    if name in members:
                        texts[name] = _read_member(f, members[name])
                ext = next((e for e in ('tokens.npy', *IMAGE_EXTS) if e in members), None)
                data = b''
                if ext:
                    data = _read_member(f, members[ext])
            except (OSError, EOFError, ValueError):  # ValueError: bad json, or json but no object
                return 'corrupt/member'
        legacy = False
        for name, raw in texts.items():
            text, fallback = _decode_caption(raw)
            if text is None:
                return 'corrupt/caption_not_utf8'
            legacy |= fallback
            texts[name] = text.strip()
        if legacy:  # a caption read as cp1252: counted, as it may have come out wrong
            counts['recovered/caption_not_utf8'] += 1
        txt = texts.get('txt', '')
        if self.kind == 'folder':  # as the text-mode read before: universal newlines
            txt = txt.replace('\r\n', '\n').replace('\r', '\n')
        # the recaption: a key.recap_txt member (official PretokenizedWebDataset), or a json field
        recap = texts.get('recap_txt', meta.get('recaption'))
        if not isinstance(recap, str):  # absent, or not text
            recap = None
        return key, meta, txt, recap, ext, data

    def _sample(self, ref, f, rng, counts):
        """-> a sample dict, or the reason (a counts key) it was skipped."""
        if self.kind == 'shapes':
            size = self.image_size or 64
            img, cap = shapes_sample(ref, size, self.split, self.seed, self.max_objects)
            s = dict(image=np.asarray(img).transpose(2, 0, 1).copy(), caption=cap,
                     aes=np.float32(DEFAULT_AES), key=f"shapes-{self.split}-{ref}")
            if self.raw:
                s.update(txt=cap, recap=None, meta={})
            return s
        loaded = self._load(ref, f, counts)
        if isinstance(loaded, str):
            return loaded
        key, meta, txt, recap, ext, data = loaded
        if not txt:
            return 'corrupt/no_caption'
        w = meta.get('original_width') or meta.get('width')
        h = meta.get('original_height') or meta.get('height')
        if w and h and ext != 'tokens.npy':  # token shards were size-filtered when pretokenized
            reason = self._size_filter(w, h)
            if reason:
                return reason
        reason = self._meta_filter(meta)
        if reason:
            return reason
        aes = _first(meta, AES_FIELDS)
        if aes is None:
            aes = DEFAULT_AES
        s = dict(caption=_caption(txt, recap, rng, self.recap_prob), key=key, aes=np.float32(aes))
        if self.raw:
            s.update(txt=txt, recap=recap, meta=meta)
        if ext == 'tokens.npy':
            try:
                # VQ (N,) uint16 | KL (2, N, C) fp16: the posterior's mean and logvar
                tok = np.load(io.BytesIO(data), allow_pickle=False)
            except (OSError, ValueError, EOFError):
                return 'corrupt/tokens'
            s['tokens'] = tok.astype(np.int64 if tok.dtype == np.uint16 else np.float32)
            return s
        try:
            img = open_image(io.BytesIO(data), key)  # decoded now: a corrupt file fails here, not in a batch
        except TooLarge:
            return 'filtered/too_large'
        except ImageError:
            return 'corrupt/image'
        if not (w and h):  # no json sizes: the file is the original
            reason = self._size_filter(*img.size)
            if reason:
                return reason
        if self.image_size:  # uint8 (3, H, W): a quarter of float32's bytes; normalised on the device
            crop = _resize_crop(img, self.image_size, rng, self.train, self.flip)
            s['image'] = np.ascontiguousarray(crop.transpose(2, 0, 1))
        return s

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        nw, streams = max(1, self.num_workers), self.my_streams()
        start = {v: self.start.get(v, (0, 0, 0)) for v in streams}
        # the rank reads its samples in global order: k-th sample from the rank's (k mod streams)-th
        # stream, served by worker k mod nw. The DataLoader asks its workers in turn from worker 0, so
        # worker 0 takes the role of the one that holds the next sample (k0) after a resume
        k = {v: start[v][2] * len(streams) + j for j, v in enumerate(streams)}  # next k of each stream
        w = (min(k.values()) + (info.id if info else 0)) % nw
        mine = sorted((v for j, v in enumerate(streams) if j % nw == w), key=k.get)
        readers = [self._read(v, *start[v]) for v in mine]
        chunk = []  # (stream, sample or None, position, counts)
        while readers:  # round robin over this worker's streams (one at a time when evaluating)
            for v, reader in zip(list(mine), list(readers)):
                s, pos, counts = next(reader)
                chunk.append((v, s, pos, counts))
                if s is None:
                    mine.remove(v)
                    readers.remove(reader)
                if len(chunk) == self.batch_size or s is None or '_end' in s:
                    yield _chunk(chunk)
                    chunk = []
                if not self.train:
                    break
        if chunk:
            yield _chunk(chunk)


def _chunk(rows):
    """A worker's message: its kept samples stacked (numpy arrays cross the process boundary through a
    pipe, not shared memory), with each one's stream, position and counts."""
    samples = [s for _, s, _, _ in rows if s is not None and '_end' not in s]
    ends = [s['_end'] for _, s, _, _ in rows if s and '_end' in s]
    out = dict(_meta=[(v, pos, dict(counts)) for v, _, pos, counts in rows], _end=ends)
    for k in (samples[0] if samples else {}):
        values = [s[k] for s in samples]
        if isinstance(values[0], (np.ndarray, np.generic, bool, int, float)):
            values = np.stack(values)
        out[k] = values
    return out


def summarize_counts(counts, missing_shards=0):
    """Raw counts ('read', 'kept', 'filtered/<why>', 'corrupt/<why>', 'recovered/<what>',
    'bad_shards') -> the summary that the training log and `data.py stats` print. Each sample read
    is kept, filtered or corrupt; recovered counts the samples read despite a flaw (a caption in
    cp1252). missing_shards: the shards the source names that do not exist (a property of the
    source, the same on every rank, so not summed over ranks)."""
    c = Counter(counts)

    def by(prefix):  # {why: n} of the keys 'prefix/why'
        return {k.split('/', 1)[1]: v for k, v in sorted(c.items()) if k.startswith(prefix + '/')}

    return dict(read=c['read'], kept=c['kept'], filtered=sum(by('filtered').values()),
                corrupt=sum(by('corrupt').values()), bad_shards=c['bad_shards'],
                missing_shards=missing_shards, filtered_by=by('filtered'), corrupt_by=by('corrupt'),
                recovered_by=by('recovered'))

def _identity(x):
    return x  # the DataLoader's collate: chunks are batched already, and numpy stays numpy


def _worker_init(worker_id):
    # Ctrl-C reaches the workers too: the main process alone answers it; SIGTERM ends them quietly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _to_torch(chunk, pin):
    """A chunk's arrays as tensors (pinned for an asynchronous copy to the GPU)."""
    out = {}
    for k, v in chunk.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
            if pin:
                v = v.pin_memory()
        out[k] = v
    return out


def _interleave(chunks):
    """One chunk per worker, each its next samples k = w (mod workers) -> the rank's samples in order."""
    out = {}
    for k in chunks[0]:
        if k.startswith('_'):
            continue
        parts = [c[k] for c in chunks]
        if isinstance(parts[0], np.ndarray):
            out[k] = np.stack(parts, 1).reshape(-1, *parts[0].shape[1:])  # (s, W, ...) -> (s*W, ...)
        else:
            out[k] = [x for row in zip(*parts) for x in row]
    out['_meta'] = [m for row in zip(*[c['_meta'] for c in chunks]) for m in row]
    return out


class Loader:
    """Batches of a _Stream through a DataLoader, with exact resume on any number of ranks and workers."""

    def __init__(self, stream, missing=()):
        self.stream = stream
        self.missing = list(missing)  # the shards the source names that do not exist
        self._rewind()

    def _rewind(self):
        self.positions = {}  # stream -> [t, j, p] after its last sample consumed
        self.stream_counts = {}  # stream -> raw counts up to there

    def _consume(self, meta):
        for v, pos, counts in meta:
            self.positions[v] = list(pos)
            self.stream_counts[v] = Counter(self.stream_counts.get(v, {})) + Counter(counts)

    def __iter__(self):
        s = self.stream
        if not s.train:  # evaluation: every iteration is a fresh full pass
            self._rewind()
        ds = copy.copy(s)
        ds.start = copy.deepcopy(self.positions)
        nw = s.num_workers
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw, collate_fn=_identity,
                                         prefetch_factor=4 if nw else None, worker_init_fn=_worker_init)
        pin = torch.cuda.is_available()
        if not s.train:
            for c in dl:
                self._consume(c['_meta'])
                if 'key' in c or c['_end']:
                    yield _to_torch(c, pin)
            return
        it, B = iter(dl), s.batch_size
        while True:  # a round: the next chunk of each worker, in the rank's order
            merged = _interleave([next(it) for _ in range(max(1, nw))])
            meta = merged.pop('_meta')
            for i in range(0, len(meta), B):
                self._consume(meta[i:i + B])
                yield _to_torch({k: v[i:i + B] for k, v in merged.items()}, pin)

    @property
    def counts(self):
        """read / kept / filtered / corrupt (with reasons) so far on this rank, and the shards the
        source names that do not exist, for the training log."""
        return summarize_counts(self.raw_counts(), len(self.missing))

    def raw_counts(self):
        """This rank's raw counts so far (summarize_counts' input), summed over its streams."""
        return sum(self.stream_counts.values(), Counter())

    def _layout(self):
        s = self.stream  # n: 0 for shapes, which has no items
        return dict(kind=s.kind, n=len(s.items), seed=s.seed, streams=s.streams)

    def state_dict(self):
        """This rank's streams; the union of every rank's is the run's, world-size free."""
        return dict(**self._layout(), positions=copy.deepcopy(self.positions),
                    counts={v: dict(c) for v, c in self.stream_counts.items()})

    def load_state_dict(self, sd):
        if isinstance(sd, (list, tuple)):  # every rank's state, gathered into one checkpoint
            sd = merge_states(sd)
        diff = {k: (sd.get(k), v) for k, v in self._layout().items() if sd.get(k) != v}
        if diff:
            raise UserError(f"data state was saved with another layout (saved, now): {diff}")
        mine = set(self.stream.my_streams())
        self.positions = {int(v): list(p) for v, p in sd['positions'].items() if int(v) in mine}
        self.stream_counts = {int(v): Counter(c) for v, c in sd['counts'].items() if int(v) in mine}


def merge_states(states):
    """Every rank's Loader.state_dict -> one, holding every stream."""
    out = dict(states[0], positions={}, counts={})
    for sd in states:
        out['positions'].update(sd['positions'])
        out['counts'].update(sd['counts'])
    return out


def make_loader(source, batch_size, image_size=256, *, train=True, seed=0, rank=0, world_size=1,
                num_workers=0, streams=STREAMS, flip=False, min_size=256, max_aspect=2.0, min_aes=None,
                max_watermark=None, recap_prob=0.95, max_objects=2, num_samples=None, raw=False,
                prepare=None):
    """Batches {'image' (B, 3, H, W) uint8 | 'tokens', 'caption', 'aes' (B,), 'key'} from `source`:
    tar shards (brace pattern, glob, list, or a folder of .tar, e.g. token shards), a folder of
    images with .txt captions, or 'shapes' / 'shapes:val'. train=True: endless, shards drawn with
    replacement, shuffled, random crops, 'index' (B,) the global sample indices, and
    prepare(sample, index) -> {name: array} of more per-sample fields, made in the workers (token ids,
    random draws); the workers per process are the most up to num_workers that divide the streams
    evenly. train=False: one pass, centre crops. Token shards give 'tokens': VQ (B, N) int64, KL
    (B, 2, N, C) the posterior's mean and logvar. Filters (0/None disables): sizes from the json's
    original_width/height (else the decoded image; never token shards), aesthetic and watermark from
    the json; none for shapes. Captions: a recaption (key.recap_txt or the json's 'recaption') with
    probability recap_prob, else the txt as it is. raw=True also returns txt/recap/meta and ends a
    batch at each unit (the pretokenizer)."""
    kind, items, missing = _expand(source)  # missing: counted, see Loader.counts
    split = None
    filters = {}
    if kind == 'shapes':  # no files, a split: 'shapes:val' names it, plain 'shapes' follows `train`
        split = items
        if not split:
            split = 'train' if train else 'val'
        items = []
        flip = False  # never flip shapes: their captions say left and right
    else:
        filters = dict(min_size=min_size, max_aspect=max_aspect, min_aes=min_aes,
                       max_watermark=max_watermark)
    if not train:  # one stream per worker, each its share of the units
        streams = world_size * max(1, num_workers)
    elif streams % world_size:
        raise UserError(f"{world_size} processes do not divide the data's {streams} streams evenly")
    per_rank = streams // world_size
    num_workers = max(w for w in range(min(num_workers, per_rank) + 1) if w == 0 or per_rank % w == 0)
    stream = _Stream(kind, items, split, batch_size, image_size, train, seed, rank, world_size,
                     num_workers, streams, flip, filters, recap_prob, max_objects, num_samples, raw,
                     prepare)
    return Loader(stream, missing)

def save_png(img, path):
    """A uint8 (H, W, 3) image to `path`, whole or not at all (runtime.write_atomic)."""
    write_atomic(path, lambda tmp: Image.fromarray(img).save(tmp, format='PNG'))


def make_grid(images, ncol):
    """uint8 images (B, H, W, 3) -> one uint8 image, `ncol` per row, 2 px of white around each."""
    B, H, W, _ = images.shape
    nrow, pad = -(-B // ncol), 2
    grid = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        y = pad + (i // ncol) * (H + pad)
        x = pad + (i % ncol) * (W + pad)
        grid[y:y + H, x:x + W] = img
    return grid

# -----------------------------------------------------------------------------
# writing shards, the pretokenizer, and the CLI

def _to_bytes(v):
    """A member's value -> its bytes: bytes as they are, str as UTF-8, ndarray as .npy, else json."""
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode('utf-8')
    if isinstance(v, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, v, allow_pickle=False)
        return buf.getvalue()
    return json.dumps(v).encode('utf-8')

def _tar_add(tf, key, members):
    for ext, v in members.items():
        data = _to_bytes(v)
        ti = tarfile.TarInfo(f"{key}.{ext}")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))

def write_shard(path, samples):
    """samples: iterable of (key, {ext: bytes | str | dict (json) | ndarray (.npy)}) -> one tar,
    written atomically."""
    def write(tmp):
        with tarfile.open(tmp, 'w', format=tarfile.USTAR_FORMAT) as tf:
            for key, members in samples:
                _tar_add(tf, key, members)
    write_atomic(path, write)  # a killed run never leaves a half shard that resume would skip

@torch.no_grad()
def encode_images(tokenizer, images, ctx):
    """The generator's training tokens of uint8 images (B, 3, H, W), on the tokenizer's device and in
    the autocast ctx: what pretokenize stores and train_maskgen.py encodes on the fly, one function for
    both -> VQ code ids (B, N); KL the posterior's mean and logvar (B, 2, N, C)."""
    x = images.float() / 255
    with ctx:
        if tokenizer.config.quantize == 'vq':
            return tokenizer.encode(x)
        return torch.stack(tokenizer.encode_posterior(x), 1)

def tokenizer_fingerprint(model):
    """sha256 (hex) over a tokenizer's weights: each state-dict tensor's name, dtype, shape and bytes,
    in sorted key order. The same weights give the same fingerprint on any device."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k} {v.dtype} {tuple(v.shape)}\n".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return h.hexdigest()

def _read_record(folder):
    """The tokenizer.json that data.py pretokenize keeps in a token-shard folder, or None."""
    path = os.path.join(folder, 'tokenizer.json')
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fp:
            record = json.load(fp)
    except (OSError, ValueError):
        raise UserError(f"{path}: not a readable tokenizer record (json)") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a tokenizer record (a json object)")
    return record

def token_shards_tokenizer(source):
    """The record of the tokenizer that made the token shards of `source` (a folder, or a pattern or
    list of shards; read from their folder's tokenizer.json): {'tokenizer': the name it was given,
    'model_args': its config, 'fingerprint': tokenizer_fingerprint of its weights}. None for images,
    a folder of images, 'shapes', or shards without a record. UserError if the shards' folders hold
    different records (or some none), or a record cannot be read."""
    kind, items = expand_source(source)
    if kind != 'tar':
        return None
    records = {}  # folder -> its record (or None)
    for path in items:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in records:
            records[folder] = _read_record(folder)
    fingerprints = {None if r is None else r.get('fingerprint') for r in records.values()}
    if len(fingerprints) > 1:
        raise UserError(f"the shards of {source!r} were made by different tokenizers (or some have "
                        f"no tokenizer.json): folders {sorted(records)}")
    return next(iter(records.values()))

def _first_members(path, n=8):
    """The names of a tar's first n members ([] if it is empty or no tar)."""
    names = []
    try:
        with tarfile.open(path, mode='r:') as tf:
            while len(names) < n and (m := tf.next()) is not None:
                names.append(m.name)
    except (OSError, tarfile.TarError, EOFError):
        pass
    return names

def _check_input(source, kind, items):
    """pretokenize's --data: image shards, a folder of images or 'shapes', not another artifact."""
    if kind == 'folder' and os.path.exists(os.path.join(source, 'ckpt.pt')):
        raise UserError(f"--data {source}: a training run's folder (it holds ckpt.pt), not a folder "
                        f"of images")
    if kind != 'tar':
        return
    for path in items:
        if not path.endswith('.tar'):
            raise UserError(f"--data {source}: {path} is not a .tar shard of images")
    if any(name.endswith('.tokens.npy') for name in _first_members(items[0])):
        raise UserError(f"--data {source}: token shards (data.py pretokenize made them), not images")
    stems = [os.path.basename(p)[:-len('.tar')] for p in items]
    if len(set(stems)) < len(stems):
        raise UserError(f"--data {source}: shards in different folders share file names, so their "
                        f"token shards would too")

def _check_out_dir(out_dir, items):
    """pretokenize's --out_dir: a new or empty folder, or one that pretokenize wrote (to resume), and
    one it can write to. Created here, before the tokenizer loads."""
    if os.path.isdir(out_dir):
        names = sorted(os.listdir(out_dir))
        ours = ('tokenizer.json', 'tokenizer.json.tmp')  # and the shards, .tar.tmp while written
        others = [f for f in names if f not in ours and not f.endswith(('.tar', '.tar.tmp'))]
        if others:
            raise UserError(f"--out_dir {out_dir} holds files that are not token shards (e.g. "
                            f"{others[0]}): give a new or empty folder")
        shards = [f for f in names if f.endswith('.tar')]
        if shards and 'tokenizer.json' not in names:
            raise UserError(f"--out_dir {out_dir} holds .tar shards that pretokenize did not write (no "
                            f"tokenizer.json): give a new or empty folder")
        for path in items:  # image shards
            if os.path.samefile(os.path.dirname(os.path.abspath(path)), out_dir):
                raise UserError(f"--out_dir {out_dir} is the folder of the --data shards")
    make_out_dir(out_dir)

def _load_tokenizer(name):
    """TATiTok.from_pretrained(name), with a one-line UserError naming the flag for what is not a
    tokenizer: a generator's checkpoint, a token-shard folder, a folder without a checkpoint, a file
    that is no checkpoint."""
    from tatitok import TATiTok
    if os.path.isdir(name) and _read_record(name) is not None:
        raise UserError(f"--tokenizer {name} is a folder of token shards, not a tokenizer")
    try:
        return TATiTok.from_pretrained(name)
    except UserError as e:  # a wrong name or path, or offline: a user error like any other
        raise UserError(f"--tokenizer: {e}") from None

def pretokenize(args, state):
    """Encode each image once with the frozen TA-TiTok into token shards: one output shard per input
    unit, existing outputs skipped (resume), input shards split over torchrun processes. The folder's
    tokenizer.json says which tokenizer made them (token_shards_tokenizer reads it)."""
    from tqdm import tqdm
    from runtime import use_device, pick_dtype, autocast
    rank = int(os.environ.get('RANK', 0))
    world = int(os.environ.get('WORLD_SIZE', 1))
    device = use_device(args.device)  # main() parsed it: this rank's GPU under torchrun
    ctx = autocast(device, pick_dtype(args.dtype, device))  # bf16 on a GPU, as train_maskgen.py encodes
    own_group = world > 1 and not dist.is_initialized()
    if own_group:  # ranks end at different times: the first to end waits for the last at the gather
        dist.init_process_group('gloo', timeout=datetime.timedelta(days=7))
    # what the user may have got wrong is checked before the tokenizer loads
    try:
        kind, items, missing = _expand(args.data)
    except UserError as e:
        raise UserError(f"--data: {e}") from None
    if missing and rank == 0:
        _warn_missing(missing, items)
    _check_input(args.data, kind, items)
    _check_out_dir(args.out_dir, items if kind == 'tar' else [])
    model = _load_tokenizer(args.tokenizer).requires_grad_(False).to(device)
    cfg = model.config
    if cfg.quantize == 'vq' and cfg.codebook_size > 2 ** 16:
        raise UserError(f"--tokenizer {args.tokenizer}: {cfg.codebook_size} codes do not fit the "
                        f"uint16 ids that token shards store")
    record = dict(tokenizer=args.tokenizer, model_args=dataclasses.asdict(cfg),
                  fingerprint=tokenizer_fingerprint(model))
    old = _read_record(args.out_dir)
    done_any = any(f.endswith('.tar') for f in os.listdir(args.out_dir))
    if done_any and old is not None and old.get('fingerprint') != record['fingerprint']:
        raise UserError(f"--out_dir {args.out_dir} holds token shards of another tokenizer "
                        f"({old.get('tokenizer')}): give a new folder, or that tokenizer")
    if world > 1:
        dist.barrier()  # every rank has checked the folder before any rank writes to it
    if rank == 0:
        write_atomic(os.path.join(args.out_dir, 'tokenizer.json'),
                     lambda tmp: open(tmp, 'w').write(json.dumps(record, indent=1)))
    if world > 1:
        dist.barrier()  # no shard without the record of its tokenizer beside it

    def done(name):  # this unit's output shard exists: written in an earlier run
        return os.path.exists(os.path.join(args.out_dir, name + '.tar'))

    common = dict(train=False, seed=args.seed, min_size=args.min_size, max_aspect=args.max_aspect,
                  min_aes=args.min_aes, max_watermark=args.max_watermark, raw=True)
    loader = None  # stays None when this rank's share is done
    if kind == 'tar':  # split shards over processes here, then over this process's workers
        mine = items[rank::world]
        todo = [p for p in mine if not done(os.path.basename(p)[:-len('.tar')])]
        if todo:
            loader = make_loader(todo, args.batch_size, cfg.image_size,
                                 num_workers=min(args.num_workers, len(todo)), **common)
        else:
            print(f"rank {rank}: all {len(mine)} shards already done")
    elif done(f"{kind}-{rank:05d}"):
        print(f"rank {rank}: already done")
    else:
        source = args.data
        if source == 'shapes':  # the train split, not the held-out one that train=False reads
            source = 'shapes:train'
        loader = make_loader(source, args.batch_size, cfg.image_size, rank=rank, world_size=world,
                             num_samples=args.num_samples, max_objects=args.max_objects, **common)
    counts, empty = Counter(), {}  # raw counts of this rank, its units that kept nothing
    state['interrupted'] = lambda: (f"interrupted: {sum(f.endswith('.tar') for f in os.listdir(args.out_dir))} "
                                    f"token shards complete in {args.out_dir} (a rerun goes on from there)")
    if loader is not None:
        pbar = tqdm(unit='img', disable=rank != 0, desc=f"pretokenize x{world}")
        empty = _write_token_shards(loader, model, args.out_dir, device, ctx, pbar)
        pbar.close()
        counts = loader.raw_counts()
    line = dict(**summarize_counts(counts, len(missing)), empty_shards=sorted(empty))
    if world > 1:  # under torchrun every rank prints its own line, then rank 0 the total, last
        print(json.dumps(dict(rank=rank, **line)), flush=True)
        every = [None] * world
        dist.all_gather_object(every, (counts, empty))
        counts = sum((c for c, _ in every), Counter())
        empty = {name: why for _, e in every for name, why in e.items()}
        line = dict(ranks=world, **summarize_counts(counts, len(missing)), empty_shards=sorted(empty))
    if rank == 0:
        print(json.dumps(line), flush=True)
    if own_group:
        dist.destroy_process_group()
    if empty and args.strict:
        raise UserError(f"--strict: {len(empty)} unit(s) kept no sample: {', '.join(sorted(empty)[:5])} (the rest "
                        f"is written)")

def _write_token_shards(loader, model, out_dir, device, ctx, pbar):
    """The pretokenizer's loop: encode each batch of images, and write an output shard per unit (an
    input shard, or this rank's share of a folder or of 'shapes'), renamed into place when complete.
    A unit that keeps no sample (an empty or broken shard, images without captions) writes nothing, so a
    rerun tries it again -> {unit: its summarized counts} of those; an interrupt leaves no partial shard."""
    cfg = model.config
    writers, counts, empty = {}, {}, {}  # unit -> its open output shard, its counts so far
    try:
        for b in loader:
            name = (b.get('unit') or b['_end'])[0]
            counts[name] = counts.get(name, Counter()) + sum((Counter(c) for _, _, c in b['_meta']), Counter())
            if 'key' in b:
                if name not in writers:  # opened with the unit's first sample
                    writers[name] = tarfile.open(os.path.join(out_dir, name + '.tar.tmp'), 'w',
                                                 format=tarfile.USTAR_FORMAT)
                tok = encode_images(model, b['image'].to(device), ctx).cpu().numpy()
                if cfg.quantize == 'kl':
                    tok = tok.astype(np.float16)  # (B, 2, N, C): the posterior's mean and logvar
                else:
                    tok = tok.astype(np.uint16)  # (B, N)
                for i, key in enumerate(b['key']):
                    members = {'tokens.npy': tok[i], 'txt': b['txt'][i], 'json': {**b['meta'][i], 'key': key}}
                    if b['recap'][i]:
                        members['recap_txt'] = b['recap'][i]
                    _tar_add(writers[name], key, members)
                pbar.update(len(b['key']))
            if b['_end'] and name in writers:
                writers.pop(name).close()
                os.replace(os.path.join(out_dir, name + '.tar.tmp'), os.path.join(out_dir, name + '.tar'))
            elif b['_end']:
                empty[name] = summarize_counts(counts[name])
                print(f"warning: {name}: no sample kept ({_reasons(empty[name])}); nothing written, a rerun "
                      f"tries it again", file=sys.stderr)
            c = loader.counts
            pbar.set_postfix(kept=c['kept'], filtered=c['filtered'], corrupt=c['corrupt'])
    finally:  # an interrupt or an error: the shards being written are dropped
        for name, writer in writers.items():
            writer.close()
            os.remove(os.path.join(out_dir, name + '.tar.tmp'))
    return empty

def _reasons(summary):
    """'3 corrupt/no_caption, 1 bad shard' from a summarize_counts dict."""
    parts = [f"{n} {kind}/{why}" for kind in ('filtered', 'corrupt') for why, n in summary[kind + '_by'].items()]
    if summary['bad_shards']:
        parts.append(f"{summary['bad_shards']} unreadable shard")
    return ', '.join(parts) or 'nothing in it'

def _warn_missing(missing, items):
    print(f"warning: {len(missing)} of the {len(items) + len(missing)} shards named do not exist "
          f"(first: {missing[0]}); counted as missing_shards", file=sys.stderr)

def stats(args, state):
    from tqdm import tqdm
    kind, items, missing = _expand(args.data)
    if missing:
        _warn_missing(missing, items)
    nw = min(args.num_workers, os.cpu_count() or 1)  # never more workers than cores, or shards
    if kind == 'tar':
        nw = min(nw, len(items))
    loader = make_loader(args.data, 256, None, train=False, num_workers=nw,
                         min_size=args.min_size, max_aspect=args.max_aspect, min_aes=args.min_aes,
                         max_watermark=args.max_watermark, num_samples=args.num_samples)
    with tqdm(unit='img', desc='stats') as pbar:
        for b in loader:
            pbar.update(len(b['key']))
    c = loader.counts
    for k, v in c.items():
        print(f"{k:>14}: {v}")
    print(json.dumps(c))

def main(argv=None):
    p = argparse.ArgumentParser(description="Data tools for TA-TiTok / MaskGen (stats, pretokenize).")
    # the flags both commands take: filters (as make_loader's), workers, the shapes set's size
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--min_size', default=256,
                        type=number(int, 0, 65535),
                        help="drop a sample whose original longer side is below this; 0: off")
    common.add_argument('--max_aspect', default=2.0,
                        type=number(float, 1, 100, off=0),
                        help="drop a sample whose long/short side ratio is above this; 0: off")
    common.add_argument('--min_aes',
                        type=number(float, 0, 10),
                        help="drop a sample whose aesthetic score is below this, or missing; "
                             "off unless set")
    common.add_argument('--max_watermark',
                        type=number(float, high=1, above=0),
                        help="drop a sample whose pwatermark is this or above (e.g. 0.5); "
                             "off unless set")
    workers = min(4, os.cpu_count() or 1)  # 4 would oversubscribe a 2-core machine
    common.add_argument('--num_workers', default=workers,
                        type=number(int, 0, 64),
                        help=f"dataloader workers per process; {workers}: min(4, CPU cores)")
    common.add_argument('--num_samples',
                        type=number(int, 1, 2 ** 62),
                        help="'shapes' only: how many samples to read; 1000 unless set")
    sub = p.add_subparsers(dest='cmd', required=True, metavar='{stats,pretokenize}')
    s = sub.add_parser('stats', parents=[common], help="count read / kept / filtered / corrupt samples")
    s.add_argument('data', metavar='DATA',
                   help="tar shards ('data/{00000..00123}.tar', a glob), a folder, or 'shapes'")
    t = sub.add_parser('pretokenize', parents=[common],
                       help="encode images once into token shards for MaskGen")
    t.add_argument('--tokenizer', required=True,
                   help="an official release (vq128, kl32, ...), its HF repo id, a .bin/.safetensors "
                        "file, or a train_tokenizer.py checkpoint (file or folder)")
    t.add_argument('--data', required=True,
                   help="image shards (brace pattern, glob, list), a folder of images, or 'shapes'")
    t.add_argument('--out_dir', required=True,
                   help="folder for the token shards; a rerun resumes into it")
    t.add_argument('--batch_size', type=number(int, 1, 65536),
                   default=64, help="images per encoder forward pass")
    t.add_argument('--device', default='auto',
                   help="auto (cuda:LOCAL_RANK if there is a GPU, else cpu), cpu, cuda, cuda:1, mps")
    t.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
                   help="autocast dtype of the encoder (auto: bfloat16 on a GPU, float32 on the CPU), as "
                        "train_maskgen.py encodes on the fly")
    t.add_argument('--seed', type=number(int, 0, 2 ** 63 - 1),
                   default=0, help="'shapes' only: the seed of the stream")
    t.add_argument('--max_objects', type=int, default=2, choices=[1, 2],
                   help="'shapes' only: at most this many objects per image")
    t.add_argument('--strict', action='store_true',
                   help="an input unit (shard) that keeps no sample is an error (exit 2), not a warning")
    args = p.parse_args(argv)
    if args.num_samples and args.data.split(':')[0] != 'shapes':
        p.error("--num_samples reads part of 'shapes' only: shards and folders are read whole")
    if args.cmd == 'pretokenize':
        from runtime import pick_device, pick_dtype
        try:
            args.device = pick_device(args.device)
            pick_dtype(args.dtype, args.device)
        except ValueError as e:
            p.error(str(e))
    from runtime import run_main
    run_main(dict(stats=stats, pretokenize=pretokenize)[args.cmd], args, (UserError,))

if __name__ == '__main__':
    main()
