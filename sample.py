"""
Sample images from MaskGen, a release (downloaded once into the Hugging Face cache) or a
checkpoint trained here, through the samplers of maskgen.py; --eval scores the shapes quickstart.

$ python sample.py "a red fox"  # MaskGen-XL VQ, its bl128 VQ tokenizer, CLIP ViT-L-14-336
$ python sample.py --model kl-l "a red fox" "a blue car" --per_prompt 8 --seed 1
$ python sample.py --model out/shapes-maskgen "a red circle" "a blue square above a yellow triangle"
$ python sample.py --model out/shapes-maskgen --eval shapes
$ torchrun --standalone --nproc_per_node=8 sample.py --prompts people.txt --out_dir mjhq/people

Writes OUT_DIR/{prompt:05d}_{sample:02d}_s{seed}.png, each image from a generator seeded by (seed,
prompt, sample): --batch_size, --per_prompt and processes change it only by float rounding.
References: 1) https://arxiv.org/abs/2501.07730  2) https://github.com/bytedance/1d-tokenizer
3) DiT's sample.py and sample_ddp.py: https://github.com/facebookresearch/DiT
"""
import os
import re
import sys
import json
import dataclasses
import math
import argparse
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageFilter
from tqdm import tqdm

from tatitok import UserError, DownloadError, TATiTok, TextEncoder, TATITOK_PRESETS, RELEASE_CLIP
from tatitok import read_weights
from runtime import (DTYPES, init_distributed, pick_dtype, autocast, make_out_dir, number,
                     all_gather_objects, on_rank0, run_main)
from maskgen import MaskGen, MASKGEN_PRESETS, Sampling, image_generators, prompt_inputs
from data import (make_grid, save_png, open_image, resize_crop, ImageError, shapes_sample,
                  SHAPES_BG, SHAPES_COLOURS, SHAPES_KINDS, SHAPES_RADIUS, SHAPES_RELATION,
                  SHAPES_SUITE)

OFFICIAL = [n for n, p in MASKGEN_PRESETS.items() if 'repo' in p]  # vq-l, vq-xl, kl-l, kl-xl
OFFICIAL_TOKENIZER = {'vq': 'vq128', 'kl': 'kl32'}  # the releases' pairs
# feel free to change
DEFAULT_PROMPTS = ["a red fox in the snow", "a lighthouse on a cliff at sunset"]
ROUND_TRIP_IMAGES = 256  # --eval shapes: held-out images through the tokenizer alone
DEFAULT_STRENGTH = 0.9  # --image: TUNING.md has the edits it was chosen on
EDIT_IMAGES = 48  # --eval edits: held-out images, each edited twice

p = argparse.ArgumentParser(usage='python sample.py [PROMPT ...] [--model NAME_OR_CKPT] [options]',
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('prompt', nargs='*', help='prompts ("" is unconditional); default: two built in')
p.add_argument('--prompts', metavar='FILE', help='a UTF-8 file of prompts, one a line')
p.add_argument('--eval', choices=['shapes', 'edits'],
               help="score a shapes checkpoint: the suite's 120 prompts and the tokenizer's "
                    "round trip, or edits of held-out images")
p.add_argument('--model', default='vq-xl',
               help=f'a release {OFFICIAL}, its repo id or file, or a train_maskgen.py checkpoint '
                    f'(or its folder), which holds the rest')
p.add_argument('--tokenizer', help='another tokenizer: a name, repo id, file or checkpoint')
p.add_argument('--clip', help='another text encoder: open_clip MODEL:PRETRAINED, a ViT-L-14-336 '
                              'file (the releases offline), or tiny')
p.add_argument('--per_prompt', type=number(int, 1), default=4,
               help='images per prompt (%(default)s)')
p.add_argument('--seed', type=number(int, 0), default=0, help='base seed (see above)')
p.add_argument('--sample_steps', type=number(int, 1),
               help="decoding steps (default: 16 VQ, 32 KL, or the checkpoint's)")
p.add_argument('--guidance_scale', type=number(float, 0),
               help="1 = off (default: 12 VQ, 3 KL, or the checkpoint's)")
p.add_argument('--guidance_schedule', choices=['cosine', 'linear', 'constant'],
               help='its ramp over the steps (default: cosine VQ, linear KL)')
p.add_argument('--temperature', type=number(float, 0),
               help='VQ: Gumbel noise (default 2); KL: diffusion noise (default 1)')
p.add_argument('--sample_aes', type=number(float), help='aesthetic score to condition on (6.5)')
p.add_argument('--diffusion_steps', type=number(int, 1), help='KL: denoising steps (100)')
p.add_argument('--x0_clip', type=number(float, 0),
               help="KL: clamp the predicted x0 to +-this, 0: off as released (default: the "
                    "checkpoint's)")
p.add_argument('--negative', default='', help="negative prompt, guidance's unconditional branch")
p.add_argument('--batch_size', type=number(int, 1), default=16,
               help='images per forward pass, per process (%(default)s)')
p.add_argument('--device', default='auto',
               help="auto (this process's GPU, else the CPU), cpu, cuda, cuda:1, mps")
p.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
               help='autocast dtype (auto: bfloat16 on a GPU or with --weights_dtype bfloat16)')
p.add_argument('--weights_dtype', default='float32', choices=['float32', 'bfloat16'],
               help='bfloat16: half the memory, fast on CPUs with bfloat16 units (TUNING.md)')
p.add_argument('--compile', default='off', choices=['on', 'off'],
               help='torch.compile the blocks, worth it for thousands of images')
p.add_argument('--out_dir', default='samples', help='a new or empty folder')
p.add_argument('--grid', metavar='FILE', help='also save the first 64 images, a row per prompt')
p.add_argument('--image', metavar='FILE', help="start from this image's tokens (centre crop)")
p.add_argument('--strength', type=number(float, 0, 1), default=DEFAULT_STRENGTH,
               help="with --image: the share of its tokens drawn anew, 0 (a reconstruction) "
                    "to 1 (the image ignored); default %(default)s")
p.add_argument('--remask', choices=['random', 'likelihood'],
               help="with --image: draw anew random tokens or (VQ) the least likely under the "
                    "prompt (default: likelihood VQ, random KL)")

# -----------------------------------------------------------------------------
# the shapes suite (--eval): the objects of an image, read back, scored against its caption

# px at 64x64: a drawn object covers ~150 or more (a pair's small triangle: half of
# (2 * 0.18 * 64)^2, less the opening's trim); less is blur, or a blend of two colours
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
    """uint8 (H, W, 3) -> its objects, largest first: dicts of colour, shape, size ('small' /
    'large'), centre x, y in pixels of img. An object: a 4-connected region of one colour (the
    nearest of grey and the palette), after a median filter and an opening."""
    img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    w, h = img.size
    if img.size != (64, 64):  # one scale for filters and areas (3x3 would erase a 32 px tip)
        img = img.resize((64, 64), Image.BILINEAR)
    x = np.asarray(img.filter(ImageFilter.MedianFilter(3)), np.float32)  # (64, 64, 3)
    palette = np.array([SHAPES_BG, *SHAPES_COLOURS.values()], np.float32)  # (9, 3)
    label = np.linalg.norm(x[:, :, None] - palette, axis=-1).argmin(-1)  # (64, 64), 0: grey
    regions = []  # (colour, (64, 64) bool mask)
    for k in np.unique(label[label > 0]):
        mask = Image.fromarray((label == k).astype(np.uint8) * 255)
        opened = mask.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))
        colour = list(SHAPES_COLOURS)[k - 1]
        comps = _components(np.asarray(opened) > 0)
        regions += [(colour, c) for c in comps if c.sum() >= SHAPES_MIN_AREA]
    regions.sort(key=lambda r: -r[1].sum())
    radii = SHAPES_RADIUS[min(max(len(regions), 1), 2)]  # the data draws one or two
    objects = []
    for colour, comp in regions:
        ys, xs = np.nonzero(comp)
        mid = (ys.min() + ys.max()) / 2
        # a triangle has 1/4 of its area in its box's upper half (circle, square 1/2);
        # a square fills its box (a circle pi/4)
        top = (ys < mid).sum() / (ys > mid).sum()
        fill = comp.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = 'circle'
        if top < 0.6:
            shape = 'triangle'
        elif fill > 0.89:
            shape = 'square'
        # half-extent / side from the area (pi r^2, 4 r^2, 2 r^2): the opening hardly trims it
        area = {'circle': math.pi, 'square': 4.0, 'triangle': 2.0}[shape]
        half = math.sqrt(comp.sum() / area) / 64
        size = 'small'
        if half > (radii['small'] + radii['large']) / 2:
            size = 'large'
        # pixel i covers [i, i + 1); x the mean (the shapes are symmetric), y the box's
        # middle, as the data places a triangle by its box
        cx = (xs.mean() + 0.5) * w / 64
        cy = (ys.min() + ys.max() + 1) / 2 * h / 64
        objects.append(dict(colour=colour, shape=shape, size=size, x=cx, y=cy))
    return objects

def classify_shapes(img):
    """uint8 (H, W, 3) -> (colour, shape) of the largest object, or (None, None)."""
    objects = detect_shapes(img)
    if not objects:
        return None, None
    return objects[0]['colour'], objects[0]['shape']

_OBJECT = rf"a (?:(small|large) )?({'|'.join(SHAPES_COLOURS)}) ({'|'.join(SHAPES_KINDS)})"

def parse_shapes_caption(caption):
    """-> ([(colour, shape, size or None)] of its objects, side or None, relation or None);
    ValueError for text that shapes_sample does not write."""
    m = re.fullmatch(rf"{_OBJECT}(?: on the (left|right))?", caption)
    if m:
        return [(m[2], m[3], m[1])], m[4], None
    m = re.fullmatch(rf"{_OBJECT} ({'|'.join(SHAPES_RELATION.values())}) {_OBJECT}", caption)
    if m is None:
        raise ValueError(f"not a caption of the shapes set: {caption!r}")
    return [(m[2], m[3], m[1]), (m[6], m[7], m[5])], None, m[4]

def shapes_category(caption):
    objects, side, relation = parse_shapes_caption(caption)
    if relation:
        return 'two'
    if side:
        return 'side'
    if objects[0][2]:
        return 'size'
    return 'single'

def _find(objects, colour, shape, other=None):
    # the object for "a {colour} {shape}": the largest of both, else of that colour
    same = [o for o in objects if o['colour'] == colour and o is not other]
    exact = [o for o in same if o['shape'] == shape]
    return (exact + same + [None])[0]

# an empty image, scored
_EMPTY = dict(colour=None, shape=None, size=None, x=np.nan, y=np.nan)

def score_shapes(caption, objects, size):
    """An image's objects (size x size px) against its caption -> {check: bool or None (not
    made), 'all'}: the largest's colour, shape, size, side, or for two 'colours', 'objects'
    (their shapes too), 'size', 'relation'."""
    wanted, side, relation = parse_shapes_caption(caption)
    if len(wanted) == 1:
        colour, shape, scale = wanted[0]
        o = (objects + [_EMPTY])[0]
        checks = dict(colour=o['colour'] == colour, shape=o['shape'] == shape)
        if scale:
            checks['size'] = o['size'] == scale
        # the data draws "on the left" at centre x <= 0.4 of the side (right >= 0.6), give or
        # take the detector's error in x, 1/128 of the side (2000 objects at 32 and 64 px)
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
    if found:  # "A {relation} B": each centre in its own half along the axis, as drawn
        horizontal, first_low = {r: k for k, r in SHAPES_RELATION.items()}[relation]
        axis = 'x' if horizontal else 'y'
        low, high = (a, b) if first_low else (b, a)
        checks['relation'] = bool(low[axis] < size / 2 < high[axis])
    checks['all'] = checks['objects'] and checks.get('size', True) and bool(checks['relation'])
    return checks

def edit_caption(caption, word):
    """A one-object caption with its 'colour' or 'shape' word changed to the next one."""
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
    """An edited image's objects: colour and shape the edited caption's, size and place (within
    a tenth of the side) those of the object `before`."""
    [(colour, shape, _)], _, _ = parse_shapes_caption(caption)
    o = (objects + [_EMPTY])[0]
    near = abs(o['x'] - before['x']) <= size / 10 and abs(o['y'] - before['y']) <= size / 10
    checks = dict(colour=o['colour'] == colour, shape=o['shape'] == shape,
                  size=o['size'] == before['size'], place=bool(near))
    checks['all'] = all(checks.values())
    return checks

def shapes_scores(captions, detections, size):
    """-> {category: {check: the share of its images that pass, 'n', 'relation_n': of those
    where the relation was judged}}."""
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
    # of the images' largest objects: the share small, the std of centres / side, their number
    largest = [objects[0] for objects in detections if objects]
    if not largest:
        return dict(small=None, std_x=None, std_y=None, n=0)
    return dict(small=float(np.mean([o['size'] == 'small' for o in largest])),
                std_x=float(np.std([o['x'] for o in largest]) / size),
                std_y=float(np.std([o['y'] for o in largest]) / size), n=len(largest))

def shapes_data_variety(size, n=5000):
    # the reference: the data's ~940 "a {colour} {shape}" among n (the share small to +-0.015)
    detections = []
    for i in range(n):
        img, caption = shapes_sample(i, size)
        if shapes_category(caption) == 'single':
            detections.append(detect_shapes(np.asarray(img)))
    return shapes_variety(detections, size)

# -----------------------------------------------------------------------------
# models, prompts, the output folder, --image

def load_models(args, device):
    # -> generator, tokenizer, text encoder (in eval mode, on device), sampling defaults
    dtype = DTYPES[args.weights_dtype]
    path, ck = read_weights(args.model, MASKGEN_PRESETS, dtype)
    gen = MaskGen.from_pretrained((path, ck), dtype)
    config = gen.config
    if 'model_args' in ck:  # one of ours: everything is inside
        tokenizer, spec = ck['tokenizer'], ck['text_encoder']
        sampling = Sampling.release(config.quantize, **ck['sampling'])
    else:  # an official release, by name, repo id or file
        tokenizer = MASKGEN_PRESETS.get(args.model, {}).get('tokenizer')
        tokenizer = tokenizer or OFFICIAL_TOKENIZER[config.quantize]
        spec, sampling = RELEASE_CLIP, Sampling.release(config.quantize)
    tok = TATiTok.from_pretrained(args.tokenizer or tokenizer, dtype)
    if args.clip:
        te = TextEncoder.from_name(args.clip, tok.config.text_context_length, dtype)
    else:
        te = TextEncoder.from_spec(spec, dtype)
    t, g = tok.config, config
    ours = (g.num_tokens, g.quantize, g.text_embed_dim, te.width, te.context_length)
    if ours != (t.num_latent_tokens, t.quantize, te.width, t.text_embed_dim, t.text_context_length):
        raise UserError(f"these do not fit together: tokenizer {t.num_latent_tokens} {t.quantize} "
                        f"tokens, text {t.text_context_length} x {t.text_embed_dim}; generator "
                        f"{g.num_tokens} {g.quantize} tokens, text width {g.text_embed_dim}; text "
                        f"encoder {te.context_length} x {te.width}")
    gen.eval()  # important!
    return gen.to(device), tok.to(device), te.to(device), sampling

def read_prompts(args):
    if args.eval and (args.prompt or args.prompts):
        p.error("--eval draws its own prompts: give no prompts with it")
    if args.prompt and args.prompts:
        p.error("give prompts on the command line or --prompts FILE, not both")
    if args.eval:  # (edits does not read them)
        return [prompt for category in SHAPES_SUITE.values() for prompt in category]
    if not args.prompts:
        return args.prompt or DEFAULT_PROMPTS
    try:
        with open(args.prompts, encoding='utf-8') as f:
            prompts = f.read().splitlines()  # a blank line: unconditional
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"cannot read the prompts file: {e}")
    if not prompts:
        p.error(f"no prompts in {args.prompts}")
    return prompts

def check_out_dir(args):
    # before anything loads: never two runs' images in one folder, nor the grid among them
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        raise UserError(f"--out_dir {args.out_dir} is not empty: choose another folder")
    if args.grid:
        folder = os.path.dirname(args.grid) or '.'
        if os.path.abspath(folder) == os.path.abspath(args.out_dir):
            raise UserError("--grid goes outside --out_dir (fid.py reads every image there)")
        if os.path.exists(args.grid) or not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            raise UserError(f"--grid {args.grid}: a new file in a writable folder is wanted")
    make_out_dir(args.out_dir)

def crop(img, size):
    # -> (1, 3, size, size) in [0, 1], the centre crop of the shorter side resized to size
    if min(img.size) < size / 2:
        p.error(f"--image is {img.size[0]}x{img.size[1]}, under half the tokenizer's {size} px: "
                f"its tokens would describe blur")
    x = torch.from_numpy(resize_crop(img, size).copy())  # (size, size, 3) uint8
    return x.permute(2, 0, 1)[None].float() / 255

def keep_tokens(gen, init, feats, aes, strength, remask, generators):
    # -> bool (B, N): what each image keeps of init (B, N), all but round(strength N) tokens
    n = round(strength * gen.config.num_tokens)
    if remask == 'likelihood':
        return gen.least_likely(init, feats['tokens'], feats['pooled'], aes, n)
    # a generator of its own per image, so that the sampler's draws are those of text-to-image
    mine = [torch.Generator(init.device).manual_seed(g.initial_seed() + 1) for g in generators]
    keys = torch.stack([torch.rand(init.shape[1], generator=g, device=init.device)
                        for g in mine])  # (B, N)
    return keys.argsort(-1).argsort(-1) >= n  # the n smallest keys are drawn anew

def encode(tok, images):
    # the tokens an edit starts from: VQ ids (B, N), KL the posterior mean (B, N, C)
    if tok.config.quantize == 'vq':
        return tok.encode(images)
    return tok.encode(images, sample=False)

def to_uint8(x):
    x = (x.float().clamp(0, 1) * 255).to(torch.uint8)  # truncated, as the release
    return x.permute(0, 2, 3, 1).cpu().numpy()

def draw(gen, tok, feats, null, sampling, generators, args, init=None, callback=None):
    # -> uint8 (B, H, W, 3): the prompts' images, or init's tokens (B, N...) redrawn in part
    start = None
    if init is not None:
        keep = keep_tokens(gen, init, feats, sampling.aes, args.strength, args.remask,
                           generators)
        start = (init, keep)
    tokens = gen.generate(prompt_inputs(feats, null), sampling, seed=generators, start=start,
                          callback=callback)
    return to_uint8(tok.decode_tokens(tokens, feats['guidance']))

def edits_report(gen, tok, te, sampling, args, device):
    """--eval edits: held-out images of one object on a side, each drawn with its colour word
    changed and, apart, its shape word -> lines, JSON last."""
    size = tok.config.image_size
    pairs = [shapes_sample(i, size, 'val', max_objects=1) for i in range(4 * EDIT_IMAGES)]
    pairs = [(img, cap) for img, cap in pairs if ' on the ' in cap][:EDIT_IMAGES]
    images, captions = zip(*pairs)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255  # (n, 3, H, W)
    start = encode(tok, x.to(device))  # (n, N) or (n, N, C)
    recon = tok.decode_tokens(start, te(list(captions))['guidance']).float().clamp(0, 1).cpu()
    mse = ((recon * 255).round() / 255 - x).pow(2).mean((1, 2, 3))
    psnr = -10 * torch.log10(mse).mean().item()
    truth = [detect_shapes(np.asarray(img))[0] for img in images]
    null = te([''])
    rows = [(k, j) for k in range(len(pairs)) for j in range(args.per_prompt)]
    results = {}
    for edit in ('colour', 'shape'):
        edited = [edit_caption(cap, edit) for cap in captions]
        checks = []
        for b in range(0, len(rows), args.batch_size):
            batch = rows[b:b + args.batch_size]
            feats = te([edited[k] for k, _ in batch])
            generators = image_generators(args.seed, batch, device)
            drawn = draw(gen, tok, feats, null, sampling, generators, args,
                         start[[k for k, _ in batch]])
            for (k, _), img in zip(batch, drawn):
                checks.append(score_edit(edited[k], truth[k], detect_shapes(img), size))
        results[edit] = {key: float(np.mean([c[key] for c in checks])) for key in checks[0]}
    lines = [f"reconstruction {len(pairs)} held-out images | psnr {psnr:.2f} dB"]
    for edit, r in results.items():
        shares = ' | '.join(f"{k} {v:.3f}" for k, v in r.items())
        lines.append(f"{edit} edit at strength {args.strength} ({args.remask}) | {shares}")
    rounded = {e: {k: round(v, 4) for k, v in r.items()} for e, r in results.items()}
    lines.append(json.dumps(dict(psnr=round(psnr, 3), strength=args.strength, remask=args.remask,
                                 **rounded)))
    return lines

def round_trip(tok, te, device):
    """The tokenizer alone on held-out images (KL: the posterior mean), the generator's ceiling
    -> 8-bit 'psnr', the share of pairs keeping both objects, of lone objects their shape."""
    size = tok.config.image_size
    held_out = [shapes_sample(i, size, 'val') for i in range(ROUND_TRIP_IMAGES)]
    images, captions = zip(*held_out)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255  # (n, 3, H, W)
    recon = []
    for i in range(0, len(x), 64):
        guidance = te(list(captions[i:i + 64]))['guidance']  # (b, 77, W)
        y = tok(x[i:i + 64].to(device), guidance, sample=False)[0]
        recon.append(y.float().clamp(0, 1).cpu())
    levels = (torch.cat(recon) * 255).round()  # (n, 3, H, W), the 8-bit values
    mse = (levels / 255 - x).pow(2).mean((1, 2, 3))  # (n,)
    psnr = -10 * torch.log10(mse.clamp_min(1e-10))
    pairs, lone = [], []
    for caption, img in zip(captions, levels.byte().permute(0, 2, 3, 1).numpy()):
        checks = score_shapes(caption, detect_shapes(img), size)
        if shapes_category(caption) == 'two':
            pairs.append(checks['objects'])
        else:
            lone.append(checks['shape'])
    return dict(psnr=psnr.mean().item(), pairs_objects=float(np.mean(pairs)), pairs_n=len(pairs),
                lone_shape=float(np.mean(lone)), lone_n=len(lone), n=len(captions))

def _num(share):  # '-' where no image could be judged
    return '-' if share is None else f"{share:.3f}"

def shapes_report(captions, detections, size, tokenizer):
    """--eval shapes: the scores by category, the variety of "a {colour} {shape}" against the
    data's, the round trip -> lines, every number as JSON last."""
    s = shapes_scores(captions, detections, size)
    singles = [d for c, d in zip(captions, detections) if shapes_category(c) == 'single']
    s['variety'] = {**shapes_variety(singles, size), 'data': shapes_data_variety(size)}
    s['tokenizer'] = tokenizer
    lines = []
    for category, names in [('single', 'colour shape all'), ('size', 'colour shape size all'),
                            ('side', 'colour shape size side all'),
                            ('two', 'colours objects relation all')]:
        shares = ' | '.join(f"{name} {_num(s[category][name])}" for name in names.split())
        lines.append(f"{category:9s} {s[category]['n']:3d} images | {shares}")
    lines[-1] += f" (relation: of the {s['two']['relation_n']} with both colours)"
    v, d, t = s['variety'], s['variety']['data'], s['tokenizer']
    lines.append(f"variety   {v['n']:3d} images | small {_num(v['small'])} (data "
                 f"{_num(d['small'])}) | centre std / side: x {_num(v['std_x'])} (data "
                 f"{_num(d['std_x'])}), y {_num(v['std_y'])} (data {_num(d['std_y'])})")
    lines.append(f"tokenizer {t['n']:3d} held-out images | psnr {t['psnr']:.2f} dB | both objects "
                 f"right {_num(t['pairs_objects'])} of {t['pairs_n']} pairs | shape right "
                 f"{_num(t['lone_shape'])} of {t['lone_n']} lone objects")
    rounded = json.loads(json.dumps(s), parse_float=lambda x: round(float(x), 4))
    return lines + [json.dumps(rounded)]

# -----------------------------------------------------------------------------

def main(argv=None):
    run_main(sample, p.parse_args(argv), UserError)

@torch.no_grad()
def sample(args, state):
    if args.eval and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        p.error("--eval runs on one process, not under torchrun")
    prompts = read_prompts(args)
    if args.image and args.eval:
        p.error("--eval draws its own images: give no --image with it")
    picture = None
    if args.image:
        try:
            picture = open_image(args.image, f"--image {args.image}")
        except ImageError as e:
            p.error(str(e))
    try:
        rank, world, device = init_distributed(args.device)  # each rank its GPU
        dtype = pick_dtype(args.dtype, device)
    except ValueError as e:
        p.error(str(e))
    if args.weights_dtype == 'bfloat16' and args.dtype not in ('auto', 'bfloat16'):
        p.error(f"--weights_dtype bfloat16 computes in bfloat16, not --dtype {args.dtype}")
    if args.weights_dtype == 'bfloat16':
        dtype = torch.bfloat16
    on_rank0(lambda: check_out_dir(args), world, (UserError,))  # rank 0 decides for all
    try:
        gen, tok, te, sampling = load_models(args, device)
    except DownloadError as e:  # what a release needs, and the way round offline
        preset = MASKGEN_PRESETS.get(args.model, MASKGEN_PRESETS['vq-xl'])
        tok_repo = TATITOK_PRESETS[preset['tokenizer']]['repo']
        raise UserError(f"{e} --model {args.model} needs {preset['repo']}, {tok_repo} and "
                        f"timm/vit_large_patch14_clip_336.openai (CLIP) in the Hugging Face "
                        f"cache. Offline: --model FILE --tokenizer FILE --clip FILE, or a "
                        f"checkpoint trained here (--model out/shapes-maskgen).") from None
    flags = dict(num_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                 temperature=args.temperature, guidance_schedule=args.guidance_schedule,
                 aes=args.sample_aes, diffusion_steps=args.diffusion_steps, x0_clip=args.x0_clip)
    sampling = dataclasses.replace(sampling, **{k: v for k, v in flags.items() if v is not None})
    if sampling.x0_clip == 0:  # --x0_clip 0: off
        sampling.x0_clip = None
    kl = gen.config.quantize == 'kl'
    if args.remask == 'likelihood' and kl and (args.image or args.eval == 'edits'):
        p.error("--remask likelihood needs a VQ generator (KL tokens have no likelihood)")
    if args.remask is None:
        args.remask = 'random' if kl else 'likelihood'
    if args.eval == 'edits':
        with autocast(device, dtype):
            print('\n'.join(edits_report(gen, tok, te, sampling, args, device)))
        return
    start = None  # --image: the tokens every image starts from
    if picture is not None:
        start = encode(tok, crop(picture, tok.config.image_size).to(device))
    if args.compile == 'on':  # the blocks only: generate() is a loop of changing shapes
        for m in list(gen.modules()) + list(tok.decoder.modules()):
            if type(m).__name__ in ('JointBlock', 'SimpleMLPAdaLN', 'Block'):
                m.compile()
    with warnings.catch_warnings(record=True) as caught:  # prompts over 77 CLIP tokens
        warnings.simplefilter('always')
        ids = te.tokenize(prompts)  # (P, 77), once for all prompts
    master = rank == 0
    for w in caught if master else []:
        print(f"warning: {w.message}", file=sys.stderr)
    n = args.per_prompt
    if master:
        print(f"{len(prompts)} prompts x {n} on {world} process(es), {device} {dtype}, "
              f"sampling {sampling}")
    # image i is (prompt i // n, sample i % n); batches of batch_size, batch b to rank b % world
    total, bs = len(prompts) * n, args.batch_size
    mine = list(range(rank, math.ceil(total / bs), world))
    bar = tqdm(total=len(mine) * sampling.num_steps, desc='decoding steps', disable=not master)
    paths, shown, results = [], {}, []  # shown: the grid's and strips' images, by index
    writer, written = ThreadPoolExecutor(1), []  # PNGs written while the next batch samples
    state['interrupted'] = lambda: (
        f"interrupted: {sum(f.endswith('.png') for f in os.listdir(args.out_dir))} images "
        f"written to {args.out_dir}/")
    try:
        null = te([args.negative])  # once; CLIP in fp32, as trained
        for b in mine:
            images = list(range(b * bs, min(total, (b + 1) * bs)))
            feats = te(ids[[i // n for i in images]])  # CLIP once per image, not per step
            generators = image_generators(args.seed, [(i // n, i % n) for i in images], device)
            init = None if start is None else start.expand(len(images), *start.shape[1:])
            with autocast(device, dtype):
                decoded = draw(gen, tok, feats, null, sampling, generators, args, init,
                               callback=lambda *a: bar.update())
            for i, img in zip(images, decoded):
                name = f"{i // n:05d}_{i % n:02d}_s{args.seed}.png"
                paths.append(os.path.join(args.out_dir, name))
                written.append(writer.submit(save_png, img, paths[-1]))
                if i < 64 or (start is not None and i % n < 8):
                    shown[i] = img
                if args.eval:
                    results.append(detect_shapes(img))
        for f in written:  # every image written (an error in the writer surfaces here)
            f.result()
    except BaseException:  # an interrupt: the PNG being written is finished, the rest dropped
        writer.shutdown(cancel_futures=True)
        bar.close()
        raise
    bar.close()
    if world > 1:  # rank 0 gathers the grid's and strips' images, the others are done
        print(f"rank {rank}: {len(paths)} images in {args.out_dir}/")
        shown = {i: img for part in all_gather_objects(shown, world) for i, img in part.items()}
        dist.destroy_process_group()
        if not master:
            return
    grid = [shown[i] for i in sorted(shown) if i < 64]
    strips = {}
    for i in sorted(shown):
        if start is not None and i % n < 8:
            strips.setdefault(i // n, []).append(shown[i])
    if len(paths) <= 64:
        print('\n'.join(paths))
    print(f"{len(paths)} images in {args.out_dir}/")
    if args.grid:
        save_png(make_grid(np.stack(grid), ncol=min(n, 8)), args.grid)
        print(f"grid of the first {len(grid)}: {args.grid}")
    for k, samples in strips.items():  # --image: the input, its reconstruction, the samples
        with autocast(device, dtype):
            recon = to_uint8(tok.decode_tokens(start, te([prompts[k]])['guidance']))[0]
        row = [to_uint8(crop(picture, tok.config.image_size))[0], recon, *samples]
        path = os.path.join(args.out_dir, f"strip_{k:05d}.png")
        save_png(make_grid(np.stack(row), ncol=len(row)), path)
        print(f"input, reconstruction, samples: {path}")
    if args.eval:
        with autocast(device, dtype):
            tokenizer = round_trip(tok, te, device)
        captions = [prompts[i // n] for i in range(len(results))]
        print('\n'.join(shapes_report(captions, results, tok.config.image_size, tokenizer)))

if __name__ == '__main__':
    main()
