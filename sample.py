"""
Sample images from MaskGen: an official release (downloaded and cached on first use) or a checkpoint trained here.

$ python sample.py "a red fox"                          # MaskGen-XL VQ, its bl128 VQ tokenizer, CLIP ViT-L-14-336
$ python sample.py --model kl-l "a red fox" "a blue car" --per_prompt 8 --seed 1
$ python sample.py --model out/shapes-maskgen "a red circle" "a blue square above a yellow triangle"
$ python sample.py --model out/shapes-maskgen --eval shapes  # the shapes suite: colour, shape, size, side, relation
$ torchrun --standalone --nproc_per_node=8 sample.py --prompts mjhq_people.txt --per_prompt 1 --out_dir mjhq/people

Writes OUT_DIR/{prompt index:05d}_{sample:02d}_s{seed}.png, into a new or empty folder (a second run never mixes
its images with the first's), and with --grid FILE one picture of them all. Every image draws its randomness from
its own generator, seeded by (seed, prompt index, sample index), so an image depends on those and the device only,
not on --batch_size, --per_prompt or the number of torchrun processes (which get whole batches round-robin), up to
the float rounding of batch shapes. The samplers live on the models, in maskgen.py; this file wires the command
line to the models and the PNGs.
References: 1) https://arxiv.org/abs/2501.07730  2) https://github.com/bytedance/1d-tokenizer (README sampling)
3) DiT's sample.py and sample_ddp.py: https://github.com/facebookresearch/DiT
"""
import os
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
from PIL import Image
from tqdm import tqdm

from tatitok import UserError, TATiTok, TextEncoder, TATITOK_PRESETS, RELEASE_CLIP, read_weights
from runtime import (DTYPES, init_distributed, pick_dtype, autocast, make_out_dir, number,
                     all_gather_objects)
from maskgen import MaskGen, MASKGEN_PRESETS, Sampling, image_generators, prompt_inputs
from runtime import on_rank0, run_main
from data import (make_grid, save_png, open_image, ImageError, UserError, shapes_sample, detect_shapes, score_shapes, shapes_category, shapes_scores,
                  shapes_variety, shapes_data_variety, edit_caption, score_edit, SHAPES_SUITE)

OFFICIAL = [n for n, p in MASKGEN_PRESETS.items() if 'repo' in p]  # vq-l, vq-xl, kl-l, kl-xl
OFFICIAL_TOKENIZER = {'vq': 'vq128', 'kl': 'kl32'}  # the releases' pairs, for a generator file passed as --model
DEFAULT_PROMPTS = ["a red fox in the snow", "a lighthouse on a cliff at sunset"]  # feel free to change
ROUND_TRIP_IMAGES = 256  # --eval shapes: held-out images through the tokenizer alone
DEFAULT_STRENGTH = 0.9  # --image: TUNING.md has the edits it was chosen on
EDIT_IMAGES = 48  # --eval edits: held-out images, each edited twice

p = argparse.ArgumentParser(usage='python sample.py [PROMPT ...] [--model NAME_OR_CKPT] [options]',
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('prompt', nargs='*', help='prompts ("" is unconditional); default: two built-in prompts')
p.add_argument('--prompts', metavar='FILE', help='a UTF-8 text file, one prompt per line (a blank line is '
               'unconditional), instead of prompts on the command line')
p.add_argument('--eval', choices=['shapes', 'edits'], help='for a checkpoint of the CPU quickstart: shapes, draw the '
               '120 prompts of the shapes suite and score each image (colour, shape, size, side, two objects and '
               'their relation, variety) and the tokenizer alone on held-out images; edits, edit held-out images '
               '(their colour word, their shape word) at --strength and score what changed and what was kept')
p.add_argument('--model', default='vq-xl', help=f'the generator: an official one {OFFICIAL} (default vq-xl), its '
               f'Hugging Face repo id or a local file of it, or a checkpoint (or its folder) of train_maskgen.py, '
               f'which holds all it needs')
p.add_argument('--tokenizer', help='another tokenizer for the tokens: a name, repo id, local file or checkpoint')
p.add_argument('--clip', help='another text encoder: MODEL:PRETRAINED of open_clip, a local file of ViT-L-14-336 '
               'weights (offline use of the releases), or tiny')
p.add_argument('--per_prompt', type=number(int, 1), default=4, help='images per prompt (default 4)')
p.add_argument('--seed', type=number(int, 0), default=0, help='base seed (see the note on randomness above)')
p.add_argument('--sample_steps', type=number(int, 1), help="decoding steps (default: 16 VQ, 32 KL, or the "
               "checkpoint's)")
p.add_argument('--guidance_scale', type=number(float, 0), help="guidance scale, 1 = off (default: 12 VQ, 3 KL, or "
               "the checkpoint's)")
p.add_argument('--guidance_schedule', choices=['cosine', 'linear', 'constant'], help='how guidance ramps up over '
               'the steps (default: cosine VQ, linear KL)')
p.add_argument('--temperature', type=number(float, 0), help='VQ: Gumbel noise (default 2); KL: diffusion noise '
               '(default 1)')
p.add_argument('--sample_aes', type=number(float), help='aesthetic score to condition on (default 6.5)')
p.add_argument('--diffusion_steps', type=number(int, 1), help='KL: denoising steps per token (default 100)')
p.add_argument('--x0_clip', type=number(float, 0), help="KL: clamp the diffusion's predicted x0 to +-this (0: off; "
               "default off, as released, or the checkpoint's: 3.0 for the shapes quickstart)")
p.add_argument('--negative', default='', help='negative prompt, the unconditional branch of guidance (default "")')
p.add_argument('--batch_size', type=number(int, 1), default=16, help='images per forward pass, per process '
               '(default 16)')
p.add_argument('--device', default='auto', help='auto (this process\'s GPU, else the CPU), cpu, cuda, cuda:1, mps')
p.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
               help='autocast dtype (auto: bfloat16 on a GPU or with --weights_dtype bfloat16, '
               'float32 elsewhere)')
p.add_argument('--weights_dtype', default='float32', choices=['float32', 'bfloat16'],
               help='dtype the weights are kept in: bfloat16 halves their memory and computes in '
               'bfloat16, which pays on a CPU with bfloat16 instructions, see TUNING.md (default '
               'float32, as released)')
p.add_argument('--compile', default='off', choices=['on', 'off'], help='torch.compile the transformer blocks, '
               'worth it for thousands of images (default off)')
p.add_argument('--out_dir', default='samples', help='output folder, new or empty (default samples/)')
p.add_argument('--grid', metavar='FILE', help='also save the first 64 images as one picture, a row per prompt')
p.add_argument('--image', metavar='FILE', help='start from this image (resized and centre-cropped to the '
               "tokenizer's resolution): its tokens, a share --strength of them drawn anew under each prompt")
p.add_argument('--strength', type=number(float, 0, 1), default=DEFAULT_STRENGTH, help='with --image: the share of '
               f'its tokens drawn anew, 0 (a reconstruction, with the prompt as the decoder\'s caption) to 1 (the '
               f'image ignored) (default {DEFAULT_STRENGTH})')
p.add_argument('--remask', choices=['random', 'likelihood'], help="with --image: which tokens to draw anew: at "
               "random, or (VQ) the ones the generator finds least likely under the prompt (default: likelihood VQ, "
               "random KL)")

def load_models(args, device):
    """-> generator, tokenizer, text encoder (eval mode, on device), the sampling defaults."""
    dtype = DTYPES[args.weights_dtype]
    path, ck = read_weights(args.model, MASKGEN_PRESETS, dtype)
    gen = MaskGen.from_pretrained((path, ck), dtype)
    config = gen.config
    if 'model_args' in ck:  # one of ours: everything is inside
        tokenizer, spec = ck['tokenizer'], ck['text_encoder']
        sampling = Sampling.release(config.quantize, **ck['sampling'])
    else:  # an official release, by name, repo id or file
        tokenizer = MASKGEN_PRESETS.get(args.model, {}).get('tokenizer') or OFFICIAL_TOKENIZER[config.quantize]
        spec, sampling = RELEASE_CLIP, Sampling.release(config.quantize)
    tok = TATiTok.from_pretrained(args.tokenizer or tokenizer, dtype)
    if args.clip:
        te = TextEncoder.from_name(args.clip, tok.config.text_context_length, dtype)
    else:
        te = TextEncoder.from_spec(spec, dtype)
    t = tok.config
    fits = (t.num_latent_tokens, t.quantize, t.text_embed_dim, te.context_length) == \
        (config.num_tokens, config.quantize, te.width, t.text_context_length)
    if not fits or config.text_embed_dim != te.width:
        raise UserError(f"these do not fit together: a tokenizer of {t.num_latent_tokens} {t.quantize} tokens "
                              f"reading {t.text_context_length} x {t.text_embed_dim} text features, a generator of "
                              f"{config.num_tokens} {config.quantize} tokens reading width {config.text_embed_dim}, "
                              f"a text encoder of {te.context_length} x {te.width}")
    gen.eval()  # important!
    return gen.to(device), tok.to(device), te.to(device), sampling

def read_prompts(args):
    if args.eval and (args.prompt or args.prompts):
        p.error("--eval shapes draws its own prompts: give no prompts with it")
    if args.prompt and args.prompts:
        p.error("give prompts on the command line or --prompts FILE, not both")
    if args.eval:
        return [prompt for category in SHAPES_SUITE.values() for prompt in category]  # (edits: its own images)
    if not args.prompts:
        return args.prompt or DEFAULT_PROMPTS
    try:
        with open(args.prompts, encoding='utf-8') as f:
            prompts = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"cannot read the prompts file: {e}")
    if not prompts:
        p.error(f"no prompts in {args.prompts}")
    return prompts

def check_out_dir(args):
    """Refuse a folder that holds files, or that cannot be made, before anything is loaded or drawn (rank 0
    checks, under torchrun, and every rank waits for it)."""
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        raise UserError(f"--out_dir {args.out_dir} is not empty (an earlier run's images?): choose another "
                              f"folder")
    if args.grid:
        folder = os.path.dirname(args.grid) or '.'
        if os.path.abspath(folder) == os.path.abspath(args.out_dir):
            raise UserError("--grid goes outside --out_dir, which holds the samples only (fid.py reads every "
                                  "image there)")
        if os.path.exists(args.grid) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"--grid {args.grid}: a new file in an existing, writable folder is wanted")
    make_out_dir(args.out_dir)

def crop(img, size):
    """(1, 3, size, size) in [0, 1]: the shorter side resized to `size` (bicubic), centre-cropped."""
    if min(img.size) < size / 2:
        p.error(f"--image is {img.size[0]}x{img.size[1]}, under half the tokenizer's {size} px: upscaled that much, "
                f"its tokens would describe blur")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255

def keep_tokens(gen, init, feats, aes, strength, remask, generators):
    """Which of the start tokens init (B, N) each image keeps: all but round(strength N), drawn anew either at random
    (each image's own generator) or where the generator finds them least likely under its prompt -> keep (B, N)."""
    n = round(strength * gen.config.num_tokens)
    if remask == 'likelihood':
        return gen.least_likely(init, feats['tokens'], feats['pooled'], aes, n)
    # a generator of its own per image, so that the sampler's draws are those of text-to-image
    mine = [torch.Generator(init.device).manual_seed(g.initial_seed() + 1) for g in generators]
    keys = torch.stack([torch.rand(init.shape[1], generator=g, device=init.device) for g in mine])  # (B, N)
    return keys.argsort(-1).argsort(-1) >= n  # the n with the smallest keys are drawn anew

def encode(tok, images):
    """The tokens an edit starts from: VQ ids (B, N), KL latents (B, N, C), the posterior mean."""
    if tok.config.quantize == 'vq':
        return tok.encode(images)
    return tok.encode(images, sample=False)

def to_uint8(x):
    return (x.float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # truncated, as the release

def edits_report(gen, tok, te, sampling, args, device):
    """--eval edits: EDIT_IMAGES held-out images of one small object on the left or right, each drawn with its
    caption's colour word changed and, apart, its shape word, at --strength -> lines, JSON last: the reconstruction's
    PSNR (strength 0), and for each edit whether the new word was drawn and the rest kept (centre within a tenth of
    the side)."""
    size = tok.config.image_size
    pairs = [shapes_sample(i, size, 'val', max_objects=1) for i in range(4 * EDIT_IMAGES)]
    pairs = [(img, cap) for img, cap in pairs if ' on the ' in cap][:EDIT_IMAGES]
    images = torch.from_numpy(np.stack([np.asarray(img) for img, _ in pairs])).permute(0, 3, 1, 2).float() / 255
    captions = [cap for _, cap in pairs]
    start = encode(tok, images.to(device))  # (n, N) or (n, N, C)
    recon = tok.decode_tokens(start, te(captions)['guidance']).float().clamp(0, 1).cpu()
    psnr = -10 * torch.log10(((recon * 255).round() / 255 - images).pow(2).mean((1, 2, 3))).mean().item()
    truth = [detect_shapes(np.asarray(img))[0] for img, _ in pairs]
    null = te([''])
    results = {}
    for edit in ('colour', 'shape'):
        edited = [edit_caption(cap, edit) for cap in captions]
        rows = [(k, j) for k in range(len(pairs)) for j in range(args.per_prompt)]
        checks = []
        for b in range(0, len(rows), args.batch_size):
            batch = rows[b:b + args.batch_size]
            feats = te([edited[k] for k, _ in batch])
            generators = image_generators(args.seed, batch, device)
            init = start[[k for k, _ in batch]]
            keep = keep_tokens(gen, init, feats, sampling.aes, args.strength, args.remask, generators)
            tokens = gen.generate(prompt_inputs(feats, null), sampling, seed=generators, start=(init, keep))
            for (k, _), img in zip(batch, to_uint8(tok.decode_tokens(tokens, feats['guidance']))):
                checks.append(score_edit(edited[k], truth[k], detect_shapes(img), size))
        results[edit] = {key: float(np.mean([c[key] for c in checks])) for key in checks[0]}
    lines = [f"reconstruction {len(pairs)} held-out images | psnr {psnr:.2f} dB"]
    for edit, r in results.items():
        lines.append(f"{edit} edit at strength {args.strength} ({args.remask}) | " +
                     ' | '.join(f"{k} {v:.3f}" for k, v in r.items()))
    lines.append(json.dumps(dict(psnr=round(psnr, 3), strength=args.strength, remask=args.remask,
                                 **{e: {k: round(v, 4) for k, v in r.items()} for e, r in results.items()})))
    return lines

def round_trip(tok, te, device):
    """The tokenizer alone, the ceiling of what the generator can draw: ROUND_TRIP_IMAGES held-out shapes images
    encoded and decoded with their captions' guidance (KL: the posterior mean) -> {'psnr': of the 8-bit
    reconstructions, as train_tokenizer.py's; 'pairs_objects': the share of two-object images whose reconstruction
    keeps both objects (colour and shape); 'lone_shape': the share of lone objects that keep their shape; counts}."""
    size = tok.config.image_size
    images, captions = zip(*(shapes_sample(i, size, 'val') for i in range(ROUND_TRIP_IMAGES)))
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255  # (n, 3, H, W)
    recon = []
    for i in range(0, len(x), 64):
        guidance = te(list(captions[i:i + 64]))['guidance']  # (b, 77, W)
        recon.append(tok(x[i:i + 64].to(device), guidance, sample=False)[0].float().clamp(0, 1).cpu())
    levels = (torch.cat(recon) * 255).round()  # (n, 3, H, W), the 8-bit values
    psnr = -10 * torch.log10((levels / 255 - x).pow(2).mean((1, 2, 3)).clamp_min(1e-10))  # (n,)
    pairs, lone = [], []
    for caption, img in zip(captions, levels.byte().permute(0, 2, 3, 1).numpy()):
        checks = score_shapes(caption, detect_shapes(img), size)
        if shapes_category(caption) == 'two':
            pairs.append(checks['objects'])
        else:
            lone.append(checks['shape'])
    return dict(psnr=psnr.mean().item(), pairs_objects=float(np.mean(pairs)), pairs_n=len(pairs),
                lone_shape=float(np.mean(lone)), lone_n=len(lone), n=len(captions))

def _num(share):
    """A share in the report's lines: 3 decimals, or '-' where no image could be judged."""
    return '-' if share is None else f"{share:.3f}"

def shapes_report(captions, detections, size, tokenizer):
    """--eval shapes: each image's objects against its prompt, by category, the variety of the "a {colour} {shape}"
    images against the data's, and the tokenizer's round trip (a dict) -> lines, one per category, then every
    number as JSON."""
    s = shapes_scores(captions, detections, size)
    singles = [d for c, d in zip(captions, detections) if shapes_category(c) == 'single']
    s['variety'] = {**shapes_variety(singles, size), 'data': shapes_data_variety(size)}
    s['tokenizer'] = tokenizer
    lines = []
    for category, names in [('single', 'colour shape all'), ('size', 'colour shape size all'),
                            ('side', 'colour shape size side all'), ('two', 'colours objects relation all')]:
        shares = ' | '.join(f"{name} {_num(s[category][name])}" for name in names.split())
        lines.append(f"{category:9s} {s[category]['n']:3d} images | {shares}")
    lines[-1] += f" (relation: of the {s['two']['relation_n']} with both colours)"
    v, d, t = s['variety'], s['variety']['data'], s['tokenizer']
    lines.append(f"variety   {v['n']:3d} images | small {_num(v['small'])} (data {_num(d['small'])}) | centre std / "
                 f"side: x {_num(v['std_x'])} (data {_num(d['std_x'])}), y {_num(v['std_y'])} (data "
                 f"{_num(d['std_y'])})")
    lines.append(f"tokenizer {t['n']:3d} held-out images | psnr {t['psnr']:.2f} dB | both objects right "
                 f"{_num(t['pairs_objects'])} of {t['pairs_n']} pairs | shape right {_num(t['lone_shape'])} of "
                 f"{t['lone_n']} lone objects")
    rounded = json.loads(json.dumps(s), parse_float=lambda x: round(float(x), 4))  # every float to 4 decimals
    return lines + [json.dumps(rounded)]

def main(argv=None):
    run_main(sample, p.parse_args(argv), UserError)

def sample(args, state):
    master = os.environ.get('RANK', '0') == '0'  # torchrun, or one process
    if args.eval and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        p.error("--eval runs on one process (480 small images at 4 per prompt), not under torchrun")
    prompts = read_prompts(args)
    picture = None
    if args.image and args.eval:
        p.error("--eval draws its own images: give no --image with it")
    if args.image:
        try:
            picture = open_image(args.image, f"--image {args.image}")
        except ImageError as e:
            p.error(str(e))
    try:
        rank, world, device = init_distributed(args.device)  # under torchrun: each rank on its own GPU
        dtype = pick_dtype(args.dtype, device)
    except ValueError as e:
        p.error(str(e))
    if args.weights_dtype == 'bfloat16' and args.dtype not in ('auto', 'bfloat16'):
        p.error(f"--weights_dtype bfloat16 computes in bfloat16, not --dtype {args.dtype}")
    if args.weights_dtype == 'bfloat16':
        dtype = torch.bfloat16
    try:
        on_rank0(lambda: check_out_dir(args), world, (UserError,))
    except UserError as e:
        p.exit(2, f"error: {e}\n" if master else '')
    try:
        gen, tok, te, sampling = load_models(args, device)
    except UserError as e:
        msg = f"error: {e}"
        if 'from the Hugging Face repo' in str(e):  # a download failed: say all that is needed
            preset = MASKGEN_PRESETS.get(args.model, MASKGEN_PRESETS['vq-xl'])
            msg += (f"\nsample.py --model {args.model} needs {preset['repo']}, "
                    f"{TATITOK_PRESETS[preset['tokenizer']]['repo']} and timm/vit_large_patch14_clip_336.openai "
                    f"(CLIP), downloaded once into the Hugging Face cache. Offline, pass local files (--model FILE "
                    f"--tokenizer FILE --clip FILE) or a checkpoint trained here (--model out/shapes-maskgen).")
        print(msg, file=sys.stderr)
        sys.exit(2)
    flags = dict(num_steps=args.sample_steps, guidance_scale=args.guidance_scale, temperature=args.temperature,
                 guidance_schedule=args.guidance_schedule, aes=args.sample_aes, diffusion_steps=args.diffusion_steps,
                 x0_clip=args.x0_clip)
    sampling = dataclasses.replace(sampling, **{k: v for k, v in flags.items() if v is not None})
    if sampling.x0_clip == 0:  # --x0_clip 0: off
        sampling.x0_clip = None
    if args.remask == 'likelihood' and gen.config.quantize == 'kl' and (args.image or args.eval == 'edits'):
        p.error("--remask likelihood needs a VQ generator (KL tokens have no likelihood to rank): --remask random")
    if args.remask is None:
        args.remask = 'random'
        if gen.config.quantize == 'vq':
            args.remask = 'likelihood'
    if args.eval == 'edits':
        with torch.no_grad(), autocast(device, dtype):
            print('\n'.join(edits_report(gen, tok, te, sampling, args, device)))
        return
    start = None  # --image: the tokens every image starts from
    if picture is not None:
        with torch.no_grad():
            start = encode(tok, crop(picture, tok.config.image_size).to(device))
    if args.compile == 'on':  # the blocks only: generate() itself is a Python loop with changing shapes
        for m in list(gen.modules()) + list(tok.decoder.modules()):
            if type(m).__name__ in ('JointBlock', 'SimpleMLPAdaLN', 'Block'):
                m.compile()
    with warnings.catch_warnings(record=True) as caught:  # TextEncoder warns about prompts over 77 CLIP tokens
        warnings.simplefilter('always')
        ids = te.tokenize(prompts)  # (P, 77), once for all prompts
    for w in caught if master else []:
        print(f"warning: {w.message}", file=sys.stderr)
    n = args.per_prompt
    if master:
        print(f"{len(prompts)} prompts x {n} on {world} process(es), {device} {dtype}, sampling {sampling}")
    # image i is (prompt i // n, sample i % n); images go in batches of batch_size, batch b to rank b % world
    total, bs = len(prompts) * n, args.batch_size
    mine = list(range(rank, math.ceil(total / bs), world))
    bar = tqdm(total=len(mine) * sampling.num_steps, desc='decoding steps', disable=not master)
    paths, shown, results = [], {}, []  # shown: the images of the grid and the strips, by index
    writer, written = ThreadPoolExecutor(1), []  # PNGs are written while the next batch samples
    state['interrupted'] = lambda: (f"interrupted: {sum(f.endswith('.png') for f in os.listdir(args.out_dir))} "
                                    f"images written to {args.out_dir}/")
    try:
        with torch.no_grad():
            null = te([args.negative])  # the unconditional branch, once; CLIP in fp32, as in training
            for b in mine:
                images = list(range(b * bs, min(total, (b + 1) * bs)))
                feats = te(ids[[i // n for i in images]])  # CLIP once per image, not per step
                generators = image_generators(args.seed, [(i // n, i % n) for i in images], device)
                given = None
                with autocast(device, dtype):
                    if start is not None:  # the image's tokens, a share --strength of them drawn anew
                        init = start.expand(len(images), *start.shape[1:])
                        keep = keep_tokens(gen, init, feats, sampling.aes, args.strength, args.remask, generators)
                        given = (init, keep)
                    tokens = gen.generate(prompt_inputs(feats, null), sampling, seed=generators, start=given,
                                          callback=lambda *a: bar.update())
                    decoded = to_uint8(tok.decode_tokens(tokens, feats['guidance']))
                for i, img in zip(images, decoded):
                    paths.append(os.path.join(args.out_dir, f"{i // n:05d}_{i % n:02d}_s{args.seed}.png"))
                    written.append(writer.submit(save_png, img, paths[-1]))
                    if i < 64 or (start is not None and i % n < 8):
                        shown[i] = img
                    if args.eval:
                        results.append(detect_shapes(img))
        for f in written:  # every image written (an error in the writer surfaces here)
            f.result()
    except BaseException:  # an interrupt: the image being written is finished, those queued are dropped
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
    for k, samples in strips.items():  # --image: the input, its reconstruction under the prompt, the samples
        with torch.no_grad(), autocast(device, dtype):
            recon = to_uint8(tok.decode_tokens(start, te([prompts[k]])['guidance']))[0]
        row = [to_uint8(crop(picture, tok.config.image_size))[0], recon, *samples]
        path = os.path.join(args.out_dir, f"strip_{k:05d}.png")
        save_png(make_grid(np.stack(row), ncol=len(row)), path)
        print(f"input, reconstruction, samples: {path}")
    if args.eval:
        with torch.no_grad(), autocast(device, dtype):
            tokenizer = round_trip(tok, te, device)  # on the same process, after the samples
        captions = [prompts[i // n] for i in range(len(results))]
        print('\n'.join(shapes_report(captions, results, tok.config.image_size, tokenizer)))

if __name__ == '__main__':
    main()
