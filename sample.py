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
import math
import inspect
import argparse
import warnings

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tatitok import (CheckpointError, TATiTok, TextEncoder, TATITOK_PRESETS, load_state_dict_file, load_official,
                     checkpoint_weights, pick_device, pick_dtype, autocast, make_out_dir, number)
from maskgen import MaskGen, MaskGenConfig, MASKGEN_PRESETS, image_generators
from data import (make_grid, shapes_sample, detect_shapes, score_shapes, shapes_category, shapes_scores,
                  shapes_variety, shapes_data_variety, SHAPES_SUITE)

OFFICIAL = [n for n, p in MASKGEN_PRESETS.items() if 'repo' in p]  # vq-l, vq-xl, kl-l, kl-xl
SAMPLING = {  # the official infer configs; a checkpoint of ours carries its own
    'vq': dict(num_steps=16, guidance_scale=12.0, guidance_schedule='cosine', temperature=2.0, aes=6.5),
    'kl': dict(num_steps=32, guidance_scale=3.0, guidance_schedule='linear', temperature=1.0, aes=6.5,
               diffusion_steps=100, x0_clip=None)}
OFFICIAL_TOKENIZER = {'vq': 'vq128', 'kl': 'kl32'}  # the releases' pairs, for a generator file passed as --model
DEFAULT_PROMPTS = ["a red fox in the snow", "a lighthouse on a cliff at sunset"]  # feel free to change
ROUND_TRIP_IMAGES = 256  # --eval shapes: held-out images through the tokenizer alone

p = argparse.ArgumentParser(usage='python sample.py [PROMPT ...] [--model NAME_OR_CKPT] [options]',
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('prompt', nargs='*', help='prompts ("" is unconditional); default: two built-in prompts')
p.add_argument('--prompts', metavar='FILE', help='a UTF-8 text file, one prompt per line (a blank line is '
               'unconditional), instead of prompts on the command line')
p.add_argument('--eval', choices=['shapes'], help='shapes: draw the 120 prompts of the shapes suite and score each '
               'image (colour, shape, size, side, two objects and their relation, variety), and the tokenizer alone '
               'on held-out images; a checkpoint of the CPU quickstart')
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
               help='autocast dtype (auto: bfloat16 on a GPU, float32 elsewhere)')
p.add_argument('--compile', default='off', choices=['on', 'off'], help='torch.compile the transformer blocks, '
               'worth it for thousands of images (default off)')
p.add_argument('--out_dir', default='samples', help='output folder, new or empty (default samples/)')
p.add_argument('--grid', metavar='FILE', help='also save the first 64 images as one picture, a row per prompt')

def load_models(args, device):
    """-> generator, tokenizer, text encoder (eval mode, on device), the sampling defaults."""
    path = args.model
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if os.path.isfile(path) and not path.endswith(('.bin', '.safetensors')):  # one of ours: everything is inside
        ck = load_state_dict_file(path)
        if not isinstance(ck, dict) or ck.get('script') != 'train_maskgen':
            raise CheckpointError(f"{path} is not a checkpoint of train_maskgen.py (a tokenizer's? pass it with "
                                  f"--tokenizer)")
        config = MaskGenConfig(**ck['model_args'])
        optional = ('lm_head.weight',) if config.quantize == 'vq' else ()  # the tied LM head
        gen = load_official(MaskGen.from_config(config), checkpoint_weights(ck), path, optional=optional)
        tokenizer, spec = ck['tokenizer'], ck['text_encoder']
        sampling = {**SAMPLING[config.quantize], **ck['sampling']}
        del ck  # the optimizer state can be large
    else:  # an official release, by name, repo id or file
        gen = MaskGen.from_pretrained(args.model)
        config = gen.config
        tokenizer = MASKGEN_PRESETS.get(args.model, {}).get('tokenizer') or OFFICIAL_TOKENIZER[config.quantize]
        spec = dict(model='ViT-L-14-336', pretrained='openai')  # as released
        sampling = dict(SAMPLING[config.quantize])
    tok = TATiTok.from_pretrained(args.tokenizer or tokenizer)
    if args.clip:
        te = TextEncoder.from_name(args.clip, tok.config.text_context_length)
    else:
        te = TextEncoder.from_spec(spec)
    t = tok.config
    fits = (t.num_latent_tokens, t.quantize, t.text_embed_dim, te.context_length) == \
        (config.num_tokens, config.quantize, te.width, t.text_context_length)
    if not fits or config.text_embed_dim != te.width:
        raise CheckpointError(f"these do not fit together: a tokenizer of {t.num_latent_tokens} {t.quantize} tokens "
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
        return [prompt for category in SHAPES_SUITE.values() for prompt in category]
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

def check_out_dir(args, world):
    """Refuse a folder that holds files, or that cannot be made, before anything is loaded or drawn."""
    if world == 1 and os.path.isdir(args.out_dir) and os.listdir(args.out_dir):  # torchrun: the ranks share it
        p.error(f"--out_dir {args.out_dir} is not empty (an earlier run's images?): choose another folder")
    if args.grid:
        folder = os.path.dirname(args.grid) or '.'
        if os.path.abspath(folder) == os.path.abspath(args.out_dir):
            p.error("--grid goes outside --out_dir, which holds the samples only (fid.py reads every image there)")
        if os.path.exists(args.grid) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            p.error(f"--grid {args.grid}: a new file in an existing, writable folder is wanted")
    try:
        make_out_dir(args.out_dir)
    except CheckpointError as e:
        p.error(str(e))

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
    args = p.parse_args(argv)
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))  # torchrun, or one process
    master = rank == 0
    if args.eval and world > 1:
        p.error("--eval runs on one process (480 small images at 4 per prompt), not under torchrun")
    prompts = read_prompts(args)
    try:
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
    except ValueError as e:
        p.error(str(e))
    check_out_dir(args, world)
    try:
        gen, tok, te, sampling = load_models(args, device)
    except CheckpointError as e:
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
    for key, value in flags.items():
        if value is not None:
            sampling[key] = value
    if sampling.get('x0_clip') == 0:  # --x0_clip 0: off
        sampling['x0_clip'] = None
    sampling = {k: v for k, v in sampling.items() if k in inspect.signature(gen.generate).parameters}  # VQ's or KL's
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
    bar = tqdm(total=len(mine) * sampling['num_steps'], desc='decoding steps', disable=not master)
    paths, grid, results = [], [], []
    with torch.no_grad(), autocast(device, dtype):
        null = te([args.negative])  # the unconditional branch, computed once
        for b in mine:
            images = list(range(b * bs, min(total, (b + 1) * bs)))
            feats = te(ids[[i // n for i in images]])  # CLIP once per image, not per step
            generators = image_generators(args.seed, [(i // n, i % n) for i in images], device)
            tokens = gen.generate(feats['tokens'], feats['pooled'], null['tokens'], null['pooled'], **sampling,
                                  generator=generators, callback=lambda *a: bar.update())
            x = tok.decode_tokens(tokens, feats['guidance']).float().clamp(0, 1)  # (B, 3, H, W)
            x = (x * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # truncated to 8 bits, as the release
            for i, img in zip(images, x):
                paths.append(os.path.join(args.out_dir, f"{i // n:05d}_{i % n:02d}_s{args.seed}.png"))
                Image.fromarray(img).save(paths[-1])
                if len(grid) < 64:
                    grid.append(img)
                if args.eval:
                    results.append(detect_shapes(img))
    bar.close()
    if world > 1:  # the images of one rank are a scattered subset: no grid, no report
        print(f"rank {rank}: {len(paths)} images in {args.out_dir}/")
        return
    if len(paths) <= 64:
        print('\n'.join(paths))
    print(f"{len(paths)} images in {args.out_dir}/")
    if args.grid:
        Image.fromarray(make_grid(np.stack(grid), ncol=min(n, 8))).save(args.grid)
        print(f"grid of the first {len(grid)}: {args.grid}")
    if args.eval:
        with torch.no_grad(), autocast(device, dtype):
            tokenizer = round_trip(tok, te, device)  # on the same process, after the samples
        captions = [prompts[i // n] for i in range(len(results))]
        print('\n'.join(shapes_report(captions, results, tok.config.image_size, tokenizer)))

if __name__ == '__main__':
    main()
