"""
Data for TA-TiTok and MaskGen, all of it in this single file: folders of images with .txt
captions, image-text tar shards (the img2dataset / WebDataset layout), the procedural `shapes`
set, filters, a loader that resumes exactly on any number of processes, and the pretokenizer.

    loader = make_loader('data/{00000..00123}.tar', 32, 256, rank=rank, world_size=world)
    for batch in loader: ...  # {'image' (B, 3, H, W) uint8 | 'tokens', 'caption', 'aes', 'key'}
    ckpt['data'] = loader.state_dict()  # to resume: loader.load_state_dict(ckpt['data'])

    python data.py stats 'data/{00000..00123}.tar'
    torchrun --nproc_per_node=8 data.py pretokenize --tokenizer kl32 --data 'data/*.tar' --out_dir tok

References:
1) TA-TiTok / MaskGen paper: https://arxiv.org/abs/2501.07730
2) official reader: https://github.com/bytedance/1d-tokenizer (data/webdataset_reader.py)
3) https://github.com/rom1504/img2dataset and https://github.com/webdataset/webdataset
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
from PIL import Image, ImageDraw, ImageOps

from tatitok import UserError, TATiTok
from runtime import (write_atomic, number, make_out_dir, use_device, pick_device, pick_dtype,
                     autocast, all_gather_objects, run_main)

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
AES_FIELDS = ('aesthetic_score', 'aesthetic', 'AESTHETIC_SCORE', 'aes_score')  # LAION, DataComp, ours
WATERMARK_FIELDS = ('pwatermark', 'watermark')  # LAION-5B metadata
STREAMS = 256  # virtual streams of a training source (see _Stream): 1, 2, 4, ... 256 processes
DEFAULT_AES = 6.0  # the official sample_aesthetic_score of stage 1, for a sample without one
RECAP_PREFIXES = tuple(f"The image {verb}"
                       for verb in ('depicts', 'displays', 'showcases', 'features', 'shows'))

# -----------------------------------------------------------------------------
# sources: folders, tar shards (brace patterns, globs, lists), the shapes set

def _braceexpand(pattern):
    """'s{0..2}{a,b}' -> ['s0a', 's0b', 's1a', ...], as the shell expands it."""
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
    """-> ('shapes', split, []) | ('folder', [(image, caption, key)], []) | ('tar', shards,
    the named ones that do not exist)."""
    if isinstance(source, str) and source.split(':')[0] == 'shapes':
        split = source.split(':')[1] if ':' in source else None
        return 'shapes', split, []
    if isinstance(source, str) and os.path.isdir(source):
        shards = sorted(glob.glob(os.path.join(source, '*.tar')))
        if shards:  # e.g. the pretokenizer's output folder
            return 'tar', shards, []
        items = []
        for d, _, files in sorted(os.walk(source)):
            for f in sorted(files):
                stem, ext = os.path.splitext(f)
                if ext[1:].lower() in IMAGE_EXTS:
                    key = os.path.relpath(os.path.join(d, stem), source)
                    items.append((os.path.join(d, f), os.path.join(d, stem + '.txt'), key))
        if not items:
            raise UserError(f"no images (.jpg/.png/.webp) or .tar shards in folder {source}")
        return 'folder', items, []
    found, missing = set(), set()
    for p in [source] if isinstance(source, str) else source:
        for path in _braceexpand(str(p)):
            files = [f for f in glob.glob(path) if os.path.isfile(f)]  # a plain name globs to itself
            found.update(files)
            if not files:
                missing.add(path)
    if not found:
        raise UserError(f"no files match {source!r}")
    return 'tar', sorted(found), sorted(missing)

def _tar_index(path, counts):
    """-> [(key, {ext: (offset, size)})], from the headers alone."""
    samples = {}
    broken = True
    try:
        with open(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as tf:
            while (m := tf.next()) is not None:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                stem, _, ext = base.partition('.')  # key.tokens.npy -> ext 'tokens.npy'
                samples.setdefault(os.path.join(d, stem), {})[ext.lower()] = (m.offset_data, m.size)
            # tarfile stops silently at a garbled header or a truncation; a whole shard ends in zeros
            f.seek(tf.offset)
            end = f.read(tarfile.BLOCKSIZE)
            broken = len(end) < tarfile.BLOCKSIZE or bool(end.strip(b'\0'))
    except (OSError, tarfile.TarError, EOFError):  # unreadable or not a tar: keep what was indexed
        pass
    if broken:  # the rest is lost, and the last sample may lack members
        counts['bad_shards'] += 1
        if samples:
            samples.popitem()
    return list(samples.items())

# the shapes set: coloured circles, squares and triangles on grey, captions that name them
SHAPES_BG = (128, 128, 128)
SHAPES_COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220),
                  'yellow': (240, 210, 40), 'purple': (150, 60, 190), 'orange': (245, 140, 30),
                  'white': (245, 245, 245), 'black': (20, 20, 20)}
SHAPES_KINDS = ('circle', 'square', 'triangle')
SHAPES_EVAL_PROMPTS = [f"a {c} {s}" for c in SHAPES_COLOURS for s in SHAPES_KINDS]
# half-extent / image side, by objects per image: two large ones fit side by side; big, as a
# small tokenizer learns shape last (TUNING.md)
SHAPES_RADIUS = {1: {'small': 0.25, 'large': 0.35}, 2: {'small': 0.18, 'large': 0.22}}
SHAPES_PAIRS = 1 / 2  # the share of images with two objects
SHAPES_RELATION = {(True, True): 'to the left of', (True, False): 'to the right of',
                   (False, True): 'above', (False, False): 'below'}
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges, as a camera sees them

def _draw(draw, kind, cx, cy, r, rgb):
    cx, cy, r = cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == 'circle':
        draw.ellipse(box, fill=rgb)
    elif kind == 'square':
        draw.rectangle(box, fill=rgb)
    else:  # upright, fills half its box
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)

def _shape_name(obj, sized):
    colour, kind, scale = obj
    if sized:
        return f"{scale} {colour} {kind}"
    return f"{colour} {kind}"

def shapes_sample(index, size=64, split='train', seed=0, max_objects=2):
    """-> (PIL RGB image, caption) of the endless stream; the 'val' split is held out."""
    rng = random.Random(f"shapes/{seed}/{split}/{index}")  # str seeds: the same on any machine
    img = Image.new('RGB', (size * SUPERSAMPLE, size * SUPERSAMPLE), SHAPES_BG)
    draw = ImageDraw.Draw(img)
    m = 1 + size // 32  # margin, in pixels
    n_objects = 1
    if max_objects != 1 and rng.random() >= 1 - SHAPES_PAIRS:
        n_objects = 2
    objs = []  # (colour, kind, 'small' or 'large')
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

    # two: one per half along a random axis, 1 px from the middle (two large ones just fit)
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

def _two_object_prompts(n):
    # two colours: the detector tells the two objects apart by colour
    rng = random.Random('shapes/suite')
    relations = list(SHAPES_RELATION.values())
    prompts = []
    for i in range(n):
        c1, c2 = rng.sample(list(SHAPES_COLOURS), 2)
        s1, s2 = rng.choice(SHAPES_KINDS), rng.choice(SHAPES_KINDS)
        prompts.append(f"a {c1} {s1} {relations[i % 4]} a {c2} {s2}")
    return prompts

_PAIRS = [(c, s) for c in SHAPES_COLOURS for s in SHAPES_KINDS]
# sample.py --eval shapes' categories (GenEval's, https://arxiv.org/abs/2310.11513); size and
# side alternate along the 24 pairs, so that each colour and shape gets both
SHAPES_SUITE = {
    'single': SHAPES_EVAL_PROMPTS,
    'size': [f"a {('small', 'large')[i % 2]} {c} {s}" for i, (c, s) in enumerate(_PAIRS)],
    'side': [f"a small {c} {s} on the {('left', 'right')[i % 2]}" for i, (c, s) in enumerate(_PAIRS)],
    'two': _two_object_prompts(48)}

# -----------------------------------------------------------------------------
# decoding: captions, images, crops

def _read_file(path):
    try:
        with open(path, 'rb') as fp:
            return fp.read()
    except OSError:  # a folder item without its caption
        return b''

def _read_member(f, span):
    offset, size = span
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:  # the file ends first
        raise EOFError
    return data

def _decode_caption(raw):
    """-> (text, not UTF-8?); else cp1252, the commonest legacy encoding of alt text."""
    try:
        return raw.decode('utf-8'), False
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode('cp1252'), True
    except UnicodeDecodeError:
        return None, True

def _first(d, fields):
    return next((d[k] for k in fields if d.get(k) is not None), None)

def _caption(txt, recap, rng, recap_prob):
    """The official process_recap_text: with probability recap_prob the recaption, less an
    exact leading 'The image depicts' (displays, ...), capitalised."""
    if not recap or rng.random() >= recap_prob:
        return txt
    c = recap.strip()
    for phrase in RECAP_PREFIXES:
        if c.startswith(phrase):
            c = c[len(phrase):].strip()
            c = c[:1].upper() + c[1:]
            break
    return c or txt  # nothing after the phrase: the original (the release would train on '')

class ImageError(UserError):
    """Not an image, or TooLarge."""

class TooLarge(ImageError):
    pass

def open_image(src, name=None):
    """-> 8-bit RGB as meant to be seen: EXIF turn, first frame, 16-bit and float scaled (not
    clipped), transparency on white."""
    name = name or src
    limit = int(os.environ.get('MAX_IMAGE_PIXELS', 89_478_485))
    Image.MAX_IMAGE_PIXELS = None  # checked below, read off the header, with a message
    try:
        img = Image.open(src)
        w, h = img.size
        if w * h > limit:
            raise TooLarge(f"{name}: {w}x{h} pixels, over MAX_IMAGE_PIXELS={limit} (an environment "
                           f"variable: raise it to read this image)")
        img.seek(0)
        img = ImageOps.exif_transpose(img)
        if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
            x = np.asarray(img, dtype=np.float64)
            top = 1.0  # float images in [0, 1] unless their values say [0, 255]
            if img.mode != 'F':
                top = 65535.0
            elif x.max() > 1:
                top = 255.0
            img = Image.fromarray(np.clip(np.round(x / top * 255), 0, 255).astype(np.uint8))
        if img.mode in ('P', 'PA') or 'transparency' in img.info:
            img = img.convert('RGBA')
        if img.mode in ('RGBA', 'LA', 'La', 'RGBa'):
            white = Image.new('RGBA', img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img.convert('RGBA'))
        return img.convert('RGB')
    except ImageError:
        raise
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, EOFError...
        raise ImageError(f"{name}: not an image PIL can read") from None

def resize_crop(img, size, rng=None, train=False, flip=False):
    """Shorter side to `size`, a random (train) or the centre crop, maybe flipped."""
    w, h = img.size
    if min(w, h) != size:  # int() truncates, as torchvision's Resize
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

# -----------------------------------------------------------------------------
# the stream and the loader: exact resume on any number of processes and workers

@dataclasses.dataclass(eq=False)
class _Stream(torch.utils.data.IterableDataset):
    """One rank's data. A source is `streams` virtual streams, each a fixed sequence of units (a
    shard drawn with replacement, an epoch of a folder, the shapes range); stream v's p-th kept
    sample is global sample p * streams + v. Rank r reads the streams v = r (mod world), worker w
    the rank's j-th for j = w (mod workers). The randomness is a function of (seed, v, t, j), unit
    t and sample j in it, so a position (t, j, p) per stream replays on any ranks and workers."""
    kind: str  # 'tar', 'folder' or 'shapes'
    items: list  # shard paths, or a folder's (image, caption, key)
    batch_size: int
    image_size: int = 256  # None: no pixels (data.py stats)
    train: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    streams: int = STREAMS
    flip: bool = False
    min_size: int = 256  # the filters: 0 or None is off
    max_aspect: float = 2.0
    min_aes: float = None
    max_watermark: float = None
    recap_prob: float = 0.95
    max_objects: int = 2
    num_samples: int = None  # shapes only, evaluating; 1000 unless set
    raw: bool = False
    prepare: object = None
    split: str = None  # shapes only: 'train' or 'val'
    start: dict = None  # {v: [t, j, p]}, set by Loader

    def my_streams(self):
        return list(range(self.rank, self.streams, self.world_size))

    def _unit(self, v, t, counts):
        """Stream v's unit t -> (sample refs, tar path or None, name), or None past the end."""
        if self.kind == 'shapes':
            n = 2 ** 62  # endless
            if not self.train:
                n = self.num_samples or 1000
            if t > 0:
                return None
            return range(v, n, self.streams), None, f"shapes-{v:05d}"
        order = list(range(len(self.items)))
        if self.kind == 'folder':
            if not self.train and t > 0:
                return None
            if self.train:
                random.Random(f"{self.seed}/epoch/{t}").shuffle(order)
            return [self.items[i] for i in order[v::self.streams]], None, f"folder-{v:05d}"
        i = v + t * self.streams  # evaluating: stream v reads shards v, v + streams, ... once
        if self.train:  # like webdataset's ResampledShards: with replacement, forever
            i = random.Random(f"{self.seed}/resample/{v}/{t}").randrange(len(order))
        elif i >= len(order):
            return None
        path = self.items[i]
        refs = _tar_index(path, counts)
        if self.train:  # whole-shard shuffle
            random.Random(f"{self.seed}/shard/{v}/{t}").shuffle(refs)
        return refs, path, os.path.basename(path).rsplit('.', 1)[0]

    def _read(self, v, t, j, p):
        """Stream v from (t, j), p kept so far -> (sample or None at the end, the position after
        it, the counts since the last), one by one."""
        counts, mark = Counter(), p
        passes = max(1, len(self.items))  # units per pass: one that keeps nothing must not spin
        while True:
            if self.train and t % passes == 0 and j == 0:
                if t > 0 and p == mark:
                    raise UserError(f"stream {v}: {passes} unit(s) in a row kept no sample (all "
                                    f"filtered or corrupt?)")
                mark = p
            unit = self._unit(v, t, counts if j == 0 else Counter())  # a bad shard counted once
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
                        s['index'] = p * self.streams + v
                        if self.prepare:
                            s.update(self.prepare(s, s['index']))
                    p += 1
                    yield s, (t, j, p), counts
                    counts = Counter()
            if self.raw:  # the pretokenizer writes one shard per unit: this one is complete
                yield dict(_end=name), (t + 1, 0, p), counts
                counts = Counter()
            t, j = t + 1, 0

    def _size_filter(self, w, h):  # -> the counts key, or None
        if self.min_size and max(w, h) < self.min_size:
            return 'filtered/size'
        if self.max_aspect and max(w, h) / min(w, h) > self.max_aspect:
            return 'filtered/aspect'
        return None

    def _load(self, ref, f, counts):
        """-> (key, meta, txt, recap, ext, data), or why it cannot be read (a counts key)."""
        if self.kind == 'folder':
            img_path, txt_path, key = ref
            meta, ext = {}, None
            texts = {'txt': _read_file(txt_path)}
            data = _read_file(img_path)
        else:
            key, members = ref
            texts = {}
            try:
                meta = {}
                if 'json' in members:
                    meta = json.loads(_read_member(f, members['json']))
                if not isinstance(meta, dict):  # valid json, but not an object
                    raise ValueError
                for name in ('txt', 'recap_txt'):
                    if name in members:
                        texts[name] = _read_member(f, members[name])
                ext = next((e for e in ('tokens.npy', *IMAGE_EXTS) if e in members), None)
                data = b''
                if ext:
                    data = _read_member(f, members[ext])
            except (OSError, EOFError, ValueError):
                return 'corrupt/member'
        legacy = False
        for name, raw in texts.items():
            text, fallback = _decode_caption(raw)
            if text is None:
                return 'corrupt/caption_not_utf8'
            legacy |= fallback
            texts[name] = text.strip()
        if legacy:  # read as cp1252: it may have come out wrong
            counts['recovered/caption_not_utf8'] += 1
        txt = texts.get('txt', '')
        if self.kind == 'folder':  # universal newlines
            txt = txt.replace('\r\n', '\n').replace('\r', '\n')
        # a key.recap_txt member (the official PretokenizedWebDataset), or a json field
        recap = texts.get('recap_txt', meta.get('recaption'))
        if not isinstance(recap, str):
            recap = None
        return key, meta, txt, recap, ext, data

    def _sample(self, ref, f, rng, counts):
        """-> a sample, or why it was skipped (a counts key)."""
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
        reason = None
        if w and h and ext != 'tokens.npy':  # token shards were filtered when made
            reason = self._size_filter(w, h)
        aes, wm = _first(meta, AES_FIELDS), _first(meta, WATERMARK_FIELDS)
        # a missing score fails a score filter, so that it shows in the counts
        if not reason and self.min_aes is not None and (aes is None or aes < self.min_aes):
            reason = 'filtered/aesthetic'
        if not reason and self.max_watermark is not None and (wm is None or wm >= self.max_watermark):
            reason = 'filtered/watermark'
        if reason:
            return reason
        if aes is None:
            aes = DEFAULT_AES
        s = dict(caption=_caption(txt, recap, rng, self.recap_prob), key=key, aes=np.float32(aes))
        if self.raw:
            s.update(txt=txt, recap=recap, meta=meta)
        if ext == 'tokens.npy':
            try:  # VQ (N,) uint16 | KL (2, N, C) fp16: the posterior's mean and logvar
                tok = np.load(io.BytesIO(data), allow_pickle=False)
            except (OSError, ValueError, EOFError):
                return 'corrupt/tokens'
            s['tokens'] = tok.astype(np.int64 if tok.dtype == np.uint16 else np.float32)
            return s
        try:  # decoded here: a corrupt file fails now, not in a batch
            img = open_image(io.BytesIO(data), key)
        except TooLarge:
            return 'filtered/too_large'
        except ImageError:
            return 'corrupt/image'
        if not (w and h):  # no sizes in the json: the file is the original
            reason = self._size_filter(*img.size)
            if reason:
                return reason
        if self.image_size:  # uint8 (3, H, W): a quarter of float32's bytes, normalised on the device
            crop = resize_crop(img, self.image_size, rng, self.train, self.flip)
            s['image'] = np.ascontiguousarray(crop.transpose(2, 0, 1))
        return s

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, streams = max(1, self.num_workers), self.my_streams()
        start = {v: self.start.get(v, (0, 0, 0)) for v in streams}
        # the rank's k-th sample is its (k mod streams)-th stream's, through worker k mod workers;
        # the DataLoader asks worker 0 first, so after a resume it plays the one with the next
        k = {v: start[v][2] * len(streams) + j for j, v in enumerate(streams)}  # next k of each
        w = (min(k.values()) + (info.id if info else 0)) % workers
        mine = sorted((v for j, v in enumerate(streams) if j % workers == w), key=k.get)
        readers = [self._read(v, *start[v]) for v in mine]
        chunk = []  # (stream, sample, position, counts)
        while readers:  # round robin over the worker's streams (one after another evaluating)
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
    """A worker's message, numpy (a pipe, not /dev/shm): its samples stacked, and each one's
    stream, position and counts."""
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
    """Raw counts ('read', 'kept', 'filtered/<why>', ...) -> what the log and stats print."""
    c = Counter(counts)

    def by(prefix):  # {why: n} of the keys 'prefix/why'
        return {k.split('/', 1)[1]: v for k, v in sorted(c.items()) if k.startswith(prefix + '/')}

    return dict(read=c['read'], kept=c['kept'], filtered=sum(by('filtered').values()),
                corrupt=sum(by('corrupt').values()), bad_shards=c['bad_shards'],
                missing_shards=missing_shards, filtered_by=by('filtered'), corrupt_by=by('corrupt'),
                recovered_by=by('recovered'))

def _identity(x):
    return x  # the DataLoader's collate: chunks are batched already, and numpy stays numpy

def leave_signals_to_main(worker_id):
    """A worker_init_fn: Ctrl-C reaches the workers too, but the main process answers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

def _to_torch(chunk, pin):
    out = {}
    for k, v in chunk.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
            if pin:  # for an asynchronous copy to the GPU
                v = v.pin_memory()
        out[k] = v
    return out

def _interleave(chunks):
    """One chunk per worker, each its next samples k = w (mod workers) -> the rank's, in order."""
    out = {}
    for k in chunks[0]:
        if k.startswith('_'):
            continue
        parts = [c[k] for c in chunks]
        if isinstance(parts[0], np.ndarray):  # (rows, workers, ...) -> (rows * workers, ...)
            out[k] = np.stack(parts, 1).reshape(-1, *parts[0].shape[1:])
        else:
            out[k] = [x for row in zip(*parts) for x in row]
    out['_meta'] = [m for row in zip(*[c['_meta'] for c in chunks]) for m in row]
    return out

class Loader:
    """A _Stream's batches, resumable on any number of ranks and workers."""

    def __init__(self, stream, missing=()):
        self.stream = stream
        self.missing = list(missing)  # the shards the source names that do not exist
        self._rewind()

    def _rewind(self):
        self.positions = {}  # stream -> [t, j, p] after its last sample consumed
        self.stream_counts = {}  # stream -> its raw counts

    def _consume(self, meta):
        for v, pos, counts in meta:
            self.positions[v] = list(pos)
            self.stream_counts[v] = Counter(self.stream_counts.get(v, {})) + Counter(counts)

    def __iter__(self):
        s = self.stream
        if not s.train:  # evaluating: each iteration is a full pass
            self._rewind()
        ds = copy.copy(s)
        ds.start = copy.deepcopy(self.positions)
        nw = s.num_workers
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw, collate_fn=_identity,
                                         prefetch_factor=4 if nw else None,
                                         worker_init_fn=leave_signals_to_main)
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
    def counts(self):  # this rank's, for the training log
        return summarize_counts(self.raw_counts(), len(self.missing))

    def raw_counts(self):
        return sum(self.stream_counts.values(), Counter())

    def _layout(self):
        s = self.stream  # n: 0 for shapes, which has no items
        return dict(kind=s.kind, n=len(s.items), seed=s.seed, streams=s.streams)

    def state_dict(self):
        """This rank's streams; every rank's together are the run's, free of the world size."""
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

def make_loader(source, batch_size, image_size=256, **kw):
    """A Loader of tar shards (a pattern, list, or folder of them), a folder of images with .txt
    captions, or 'shapes' / 'shapes:val'; kw: _Stream's fields. Token shards give 'tokens': VQ
    (B, N) int64, KL (B, 2, N, C). train=True: endless, shards drawn with replacement, random
    crops, 'index' (B,) the global sample indices, and the fields of prepare(sample, index), made
    in the workers. raw=True: txt, recap, meta, and a batch ends with each unit."""
    kind, items, missing = expand_source(source)
    s = _Stream(kind, items, batch_size, image_size, **kw)
    if kind == 'shapes':  # no files; 'shapes:val' names a split, plain 'shapes' follows `train`
        s.split = items or ('train' if s.train else 'val')
        s.items = []
        s.flip = False  # never flip shapes: their captions say left and right
    if not s.train:  # one stream per worker, each its share of the units
        s.streams = s.world_size * max(1, s.num_workers)
    elif s.streams % s.world_size:
        raise UserError(f"{s.world_size} processes do not divide the data's {s.streams} streams")
    per_rank = s.streams // s.world_size  # workers: the most up to num_workers that divide these
    s.num_workers = max(w for w in range(min(s.num_workers, per_rank) + 1)
                        if w == 0 or per_rank % w == 0)
    return Loader(s, missing)

# -----------------------------------------------------------------------------
# writing: shards, PNGs, grids

def _tar_add(tf, key, members):
    for ext, v in members.items():  # bytes as they are, str as UTF-8, ndarray as .npy, else json
        if isinstance(v, str):
            v = v.encode('utf-8')
        elif isinstance(v, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, v, allow_pickle=False)
            v = buf.getvalue()
        elif not isinstance(v, bytes):
            v = json.dumps(v).encode('utf-8')
        ti = tarfile.TarInfo(f"{key}.{ext}")
        ti.size = len(v)
        tf.addfile(ti, io.BytesIO(v))

def write_shard(path, samples):
    """samples: (key, {ext: value}) -> one tar, whole or not at all."""
    def write(tmp):
        with tarfile.open(tmp, 'w', format=tarfile.USTAR_FORMAT) as tf:
            for key, members in samples:
                _tar_add(tf, key, members)
    write_atomic(path, write)

def save_png(img, path):  # uint8 (H, W, 3), whole or not at all
    write_atomic(path, lambda tmp: Image.fromarray(img).save(tmp, format='PNG'))

def make_grid(images, ncol):
    """uint8 (B, H, W, 3) -> one uint8 image, `ncol` per row, 2 px of white around each."""
    B, H, W, _ = images.shape
    nrow, pad = -(-B // ncol), 2
    grid = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        y = pad + (i // ncol) * (H + pad)
        x = pad + (i % ncol) * (W + pad)
        grid[y:y + H, x:x + W] = img
    return grid

# -----------------------------------------------------------------------------
# pretokenize: each image encoded once by the frozen tokenizer, into token shards

@torch.no_grad()
def encode_images(tokenizer, images, ctx):
    """uint8 (B, 3, H, W) -> VQ ids (B, N), or KL the posterior's mean and logvar (B, 2, N, C):
    what pretokenize stores and train_maskgen.py encodes on the fly."""
    x = images.float() / 255
    with ctx:
        if tokenizer.config.quantize == 'vq':
            return tokenizer.encode(x)
        return torch.stack(tokenizer.encode_posterior(x), 1)

def tokenizer_fingerprint(model):
    """sha256 (hex) of a tokenizer's weights: the same on any device."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k} {v.dtype} {tuple(v.shape)}\n".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return h.hexdigest()

def _read_record(folder):
    path = os.path.join(folder, 'tokenizer.json')
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fp:
            record = json.load(fp)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a readable tokenizer record (a json object)")
    return record

def token_shards_tokenizer(source):
    """The tokenizer.json beside `source`'s token shards, or None (no token shards)."""
    kind, items, _ = expand_source(source)
    if kind != 'tar':
        return None
    folders = dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in items)  # in order
    records = {d: _read_record(d) for d in folders}
    fingerprints = {None if r is None else r.get('fingerprint') for r in records.values()}
    if len(fingerprints) > 1:
        raise UserError(f"the shards of {source!r} were made by different tokenizers (or some "
                        f"have no tokenizer.json): folders {sorted(records)}")
    return next(iter(records.values()))

def _check_paths(args, kind, items):
    """--data holds images; --out_dir is new, empty or pretokenize's own, and writable."""
    src, out = args.data, args.out_dir
    if kind == 'folder' and os.path.exists(os.path.join(src, 'ckpt.pt')):
        raise UserError(f"--data {src}: a training run's folder (it holds ckpt.pt), not images")
    shards = items if kind == 'tar' else []
    for path in shards:
        if not path.endswith('.tar'):
            raise UserError(f"--data {src}: {path} is not a .tar shard")
    first = _tar_index(shards[0], Counter()) if shards else []  # its headers only
    if first and 'tokens.npy' in first[0][1]:
        raise UserError(f"--data {src}: token shards, not images")
    stems = [os.path.basename(p)[:-len('.tar')] for p in shards]
    if len(set(stems)) < len(stems):
        raise UserError(f"--data {src}: shards in two folders share a name, as their token "
                        f"shards would")
    if os.path.isdir(out):
        names = os.listdir(out)
        ours = ('tokenizer.json', 'tokenizer.json.tmp')  # and the shards, .tar.tmp while written
        others = sorted(f for f in names if f not in ours and not f.endswith(('.tar', '.tar.tmp')))
        if others:
            raise UserError(f"--out_dir {out} holds {others[0]}, not token shards: give a new "
                            f"or empty folder")
        if 'tokenizer.json' not in names and any(f.endswith('.tar') for f in names):
            raise UserError(f"--out_dir {out} holds .tar shards that pretokenize did not write "
                            f"(no tokenizer.json)")
        for path in shards:
            if os.path.samefile(os.path.dirname(os.path.abspath(path)), out):
                raise UserError(f"--out_dir {out} is the folder of the --data shards")
    make_out_dir(out)

def _filters(args):
    return dict(min_size=args.min_size, max_aspect=args.max_aspect, min_aes=args.min_aes,
                max_watermark=args.max_watermark)

def pretokenize(args, state):
    """A token shard per input unit (a shard, or a rank's share of a folder or 'shapes')."""
    from tqdm import tqdm
    rank = int(os.environ.get('RANK', 0))
    world = int(os.environ.get('WORLD_SIZE', 1))
    device = use_device(args.device)  # this rank's GPU under torchrun
    ctx = autocast(device, pick_dtype(args.dtype, device))  # as train_maskgen.py encodes
    if world > 1 and not dist.is_initialized():  # the first rank done waits for the last
        dist.init_process_group('gloo', timeout=datetime.timedelta(days=7))
    try:
        kind, items, missing = expand_source(args.data)
    except UserError as e:
        raise UserError(f"--data: {e}") from None
    if missing and rank == 0:
        _warn_missing(missing, items)
    _check_paths(args, kind, items)  # before the tokenizer loads
    if os.path.isdir(args.tokenizer) and _read_record(args.tokenizer) is not None:
        raise UserError(f"--tokenizer {args.tokenizer} is a folder of token shards, not a tokenizer")
    try:
        model = TATiTok.from_pretrained(args.tokenizer).requires_grad_(False).to(device)
    except UserError as e:  # a generator's checkpoint, no checkpoint, offline...
        raise UserError(f"--tokenizer: {e}") from None
    cfg = model.config
    if cfg.quantize == 'vq' and cfg.codebook_size > 2 ** 16:
        raise UserError(f"--tokenizer {args.tokenizer}: {cfg.codebook_size} codes do not fit the "
                        f"uint16 ids of token shards")
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

    def done(name):  # written by an earlier run
        return os.path.exists(os.path.join(args.out_dir, name + '.tar'))

    common = dict(train=False, seed=args.seed, raw=True, **_filters(args))
    loader = None  # stays None when this rank's share is done
    if kind == 'tar':  # shards split over processes here, then over this process's workers
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
        if source == 'shapes':  # the train split, not the held-out one of train=False
            source = 'shapes:train'
        loader = make_loader(source, args.batch_size, cfg.image_size, rank=rank, world_size=world,
                             num_samples=args.num_samples, max_objects=args.max_objects, **common)
    counts, empty = Counter(), {}  # this rank's raw counts, its units that kept nothing
    state['interrupted'] = lambda: (
        f"interrupted: {sum(f.endswith('.tar') for f in os.listdir(args.out_dir))} token shards "
        f"complete in {args.out_dir} (a rerun resumes)")
    if loader is not None:
        pbar = tqdm(unit='img', disable=rank != 0, desc=f"pretokenize x{world}")
        empty = _write_token_shards(loader, model, args.out_dir, device, ctx, pbar)
        pbar.close()
        counts = loader.raw_counts()

    def line(counts, empty):
        return dict(**summarize_counts(counts, len(missing)), empty_shards=sorted(empty))

    every = all_gather_objects((counts, empty), world)
    counts = sum((c for c, _ in every), Counter())
    empty = {name: why for _, e in every for name, why in e.items()}
    if rank == 0:  # one process prints: two ranks' lines can interleave on a shared stdout
        total = line(counts, empty)
        if world > 1:
            for r, (c, e) in enumerate(every):  # each rank's line, then the total, last
                print(json.dumps(dict(rank=r, **line(c, e))))
            total = dict(ranks=world, **total)
        print(json.dumps(total), flush=True)
    if empty and args.strict:
        raise UserError(f"--strict: {len(empty)} unit(s) kept no sample: "
                        f"{', '.join(sorted(empty)[:5])} (the rest is written)")

def _write_token_shards(loader, model, out_dir, device, ctx, pbar):
    """-> {unit: summarized counts} of the units that kept no sample and wrote nothing."""
    writers, counts, empty = {}, {}, {}  # unit -> its open output shard, its counts so far
    try:
        for b in loader:
            name = (b.get('unit') or b['_end'])[0]
            new = sum((Counter(c) for _, _, c in b['_meta']), Counter())
            counts[name] = counts.get(name, Counter()) + new
            if 'key' in b:
                if name not in writers:  # opened with the unit's first sample
                    writers[name] = tarfile.open(os.path.join(out_dir, name + '.tar.tmp'), 'w',
                                                 format=tarfile.USTAR_FORMAT)
                tok = encode_images(model, b['image'].to(device), ctx).cpu().numpy()
                if model.config.quantize == 'kl':
                    tok = tok.astype(np.float16)  # (B, 2, N, C): the posterior's mean and logvar
                else:
                    tok = tok.astype(np.uint16)  # (B, N)
                for i, key in enumerate(b['key']):
                    members = {'tokens.npy': tok[i], 'txt': b['txt'][i],
                               'json': {**b['meta'][i], 'key': key}}
                    if b['recap'][i]:
                        members['recap_txt'] = b['recap'][i]
                    _tar_add(writers[name], key, members)
                pbar.update(len(b['key']))
            path = os.path.join(out_dir, name + '.tar')
            if b['_end'] and name in writers:
                writers.pop(name).close()
                os.replace(path + '.tmp', path)
            elif b['_end']:
                empty[name] = summarize_counts(counts[name])
                print(f"warning: {name}: no sample kept ({_reasons(empty[name])}); nothing "
                      f"written, a rerun tries it again", file=sys.stderr)
            c = loader.counts
            pbar.set_postfix(kept=c['kept'], filtered=c['filtered'], corrupt=c['corrupt'])
    finally:  # an interrupt or an error: the shards being written are dropped
        for name, writer in writers.items():
            writer.close()
            os.remove(os.path.join(out_dir, name + '.tar.tmp'))
    return empty

def _reasons(summary):
    """'3 corrupt/no_caption, 1 unreadable shard' of a summarize_counts dict."""
    parts = [f"{n} {kind}/{why}" for kind in ('filtered', 'corrupt')
             for why, n in summary[kind + '_by'].items()]
    if summary['bad_shards']:
        parts.append(f"{summary['bad_shards']} unreadable shard")
    return ', '.join(parts) or 'nothing in it'

# -----------------------------------------------------------------------------
# the command line

def _warn_missing(missing, items):
    print(f"warning: {len(missing)} of the {len(items) + len(missing)} shards named do not exist "
          f"(first: {missing[0]}); counted as missing_shards", file=sys.stderr)

def stats(args, state):
    from tqdm import tqdm
    kind, items, missing = expand_source(args.data)
    if missing:
        _warn_missing(missing, items)
    nw = min(args.num_workers, os.cpu_count() or 1)  # never more workers than cores, or shards
    if kind == 'tar':
        nw = min(nw, len(items))
    loader = make_loader(args.data, 256, None, train=False, num_workers=nw,
                         num_samples=args.num_samples, **_filters(args))
    with tqdm(unit='img', desc='stats') as pbar:
        for b in loader:
            pbar.update(len(b['key']))
    c = loader.counts
    for k, v in c.items():
        print(f"{k:>14}: {v}")
    print(json.dumps(c))

def main(argv=None):
    p = argparse.ArgumentParser(description="Data tools for TA-TiTok / MaskGen.")
    common = argparse.ArgumentParser(add_help=False)  # the flags of both commands
    common.add_argument('--min_size', default=256, type=number(int, 0, 65535),
                        help="drop samples whose original longer side is smaller; 0: off")
    common.add_argument('--max_aspect', default=2.0, type=number(float, 1, 100, off=0),
                        help="drop samples of a larger long/short side ratio; 0: off")
    common.add_argument('--min_aes', type=number(float, 0, 10),
                        help="drop samples of a lower (or no) aesthetic score")
    common.add_argument('--max_watermark', type=number(float, high=1, above=0),
                        help="drop samples whose pwatermark is this or more (e.g. 0.5)")
    workers = min(4, os.cpu_count() or 1)  # 4 would oversubscribe a 2-core machine
    common.add_argument('--num_workers', default=workers, type=number(int, 0, 64),
                        help="dataloader workers per process; default min(4, CPU cores)")
    common.add_argument('--num_samples', type=number(int, 1, 2 ** 62),
                        help="'shapes' only: how many samples to read (1000)")
    sub = p.add_subparsers(dest='cmd', required=True, metavar='{stats,pretokenize}')
    s = sub.add_parser('stats', parents=[common], help="count read/kept/filtered/corrupt samples")
    s.add_argument('data', metavar='DATA', help="tar shards (a brace pattern, a glob), a folder, "
                   "or 'shapes'")
    t = sub.add_parser('pretokenize', parents=[common], help="images into token shards, once")
    t.add_argument('--tokenizer', required=True,
                   help="a release (vq128, kl32, ...), an HF repo id, a weights file, or a "
                        "train_tokenizer.py checkpoint (file or folder)")
    t.add_argument('--data', required=True, help="image shards, a folder of images, or 'shapes'")
    t.add_argument('--out_dir', required=True, help="token shards' folder; a rerun resumes into it")
    t.add_argument('--batch_size', type=number(int, 1, 65536), default=64,
                   help="images per encoder pass")
    t.add_argument('--device', default='auto', help="auto (a GPU if any), cpu, cuda, cuda:1, mps")
    t.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
                   help="the encoder's autocast; auto: bfloat16 on a GPU")
    t.add_argument('--seed', type=number(int, 0, 2 ** 63 - 1), default=0,
                   help="'shapes' only: the stream's seed")
    t.add_argument('--max_objects', type=int, default=2, choices=[1, 2],
                   help="'shapes' only: objects per image, at most")
    t.add_argument('--strict', action='store_true', help="a shard that keeps no sample: exit 2")
    args = p.parse_args(argv)
    if args.num_samples and args.data.split(':')[0] != 'shapes':
        p.error("--num_samples is for 'shapes' only: shards and folders are read whole")
    if args.cmd == 'pretokenize':
        try:
            args.device = pick_device(args.device)
            pick_dtype(args.dtype, args.device)
        except ValueError as e:
            p.error(str(e))
    run_main(dict(stats=stats, pretokenize=pretokenize)[args.cmd], args, (UserError,))

if __name__ == '__main__':
    main()
