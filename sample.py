"""
Sample images from MaskGen: the official releases (downloaded and cached on first use) or a checkpoint trained here.

$ python sample.py "a red fox"                           # MaskGen-XL VQ, its bl128 VQ tokenizer, CLIP ViT-L-14-336
$ python sample.py --model kl-l "a red fox" "a blue car" --n 8 --seed 1 --device cpu
$ python sample.py --ckpt out/shapes-maskgen "a red circle" "a blue square above a yellow triangle"
$ python sample.py --ckpt out/shapes-maskgen --eval shapes   # colour / shape accuracy on the 24 shapes prompts
$ torchrun --standalone --nproc_per_node=8 sample.py --prompts mjhq_people.txt -n 1 --out samples/mjhq/people

Writes OUT/{prompt index:05d}_{sample:02d}_s{seed}.png and OUT/grid.png. Randomness: every image draws from its own
generator, seeded by (seed, prompt index, sample index). So an image depends on those and the device only, not on
--batch-size, -n or the number of torchrun processes (which get whole batches round-robin), up to float rounding
that differs between batch shapes. The sampling algorithms live on the model, in maskgen.py; this file wires
CLI -> models -> PNGs.
References: 1) https://arxiv.org/abs/2501.07730  2) https://github.com/bytedance/1d-tokenizer (README sampling calls)
3) DiT's sample.py / sample_ddp.py: https://github.com/facebookresearch/DiT
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
from tatitok import CheckpointError, TATiTok, TextEncoder, load_state_dict_file, load_official, TATITOK_PRESETS
from maskgen import MaskGen, MaskGenConfig, MASKGEN_PRESETS, image_generators

OFFICIAL = [n for n, p in MASKGEN_PRESETS.items() if 'repo' in p]  # vq-l, vq-xl, kl-l, kl-xl
SAMPLING = {  # the official infer configs (official-implementation.md section 5); a checkpoint's 'sampling' wins
    'vq': dict(num_steps=16, guidance_scale=12.0, guidance_schedule='cosine', temperature=2.0, aes=6.5),
    'kl': dict(num_steps=32, guidance_scale=3.0, guidance_schedule='linear', temperature=1.0, aes=6.5, x0_clip=None)}
OFFICIAL_TOKENIZER = {'vq': 'vq128', 'kl': 'kl32'}  # for an official-layout generator file passed as --model
DEFAULT_PROMPTS = ["a red fox in the snow", "a lighthouse on a cliff at sunset"]  # feel free to change

p = argparse.ArgumentParser(usage='python sample.py [PROMPT ...] [--model NAME | --ckpt DIR] [options]',
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('prompt', nargs='*', help='prompts ("" = unconditional); default: a small built-in list')
p.add_argument('--prompts', '--prompts_file', metavar='FILE',
               help='a text file, one prompt per line (a blank line is unconditional)')
p.add_argument('--eval', choices=['shapes'], help='shapes: draw the 24 shapes prompts, print colour/shape accuracy')
p.add_argument('--model', '--init_from', default='vq-xl',
               help=f'official generator {OFFICIAL} (default vq-xl), its HF repo id, or a local file')
p.add_argument('--ckpt', help='a checkpoint (or its folder) written by train_maskgen.py; needs no other flag')
p.add_argument('--tokenizer', help='override the paired tokenizer: a TATiTok name, repo id or local file')
p.add_argument('--clip', metavar='FILE', help='local open_clip ViT-L-14-336 weights, instead of downloading them')
p.add_argument('-n', '--n', type=int, default=4,  # under torchrun write -n: its parser rejects --n as ambiguous
               help='images per prompt (default 4; MJHQ-30K FID: 1)')
p.add_argument('--seed', type=int, default=0, help='base seed (see the note on randomness above)')
p.add_argument('--steps', '--num_steps', type=int, help='decoding steps (default: 16 VQ, 32 KL, or the checkpoint\'s)')
p.add_argument('--cfg', type=float, help='guidance scale, 1 = off (default: 12 VQ, 3 KL, or the checkpoint\'s)')
p.add_argument('--cfg-schedule', '--cfg_schedule', choices=['cosine', 'linear', 'constant'],
               help='how guidance ramps up over the steps (default: cosine VQ, linear KL)')
p.add_argument('--temperature', type=float, help='VQ: Gumbel noise (default 2); KL: diffusion noise (default 1)')
p.add_argument('--aes', type=float, help='aesthetic score to condition on (default 6.5)')
p.add_argument('--x0-clip', '--x0_clip', type=float, help="KL: clamp the diffusion's predicted x0 to +-this "
               "(0: off; default off, as released, or the checkpoint's: 3.0 for the shapes quickstart)")
p.add_argument('--negative', default='', help='negative prompt, the unconditional branch of guidance (default "")')
p.add_argument('--batch-size', '--batch_size', type=int, default=16,
               help='images per forward pass, per process (default 16)')
p.add_argument('--device', default='auto', help='auto (cuda, then mps, then cpu), or e.g. cpu, cuda:1')
p.add_argument('--dtype', default='auto', choices=['auto', 'bf16', 'fp16', 'fp32'],
               help='autocast dtype (auto: bf16 on CUDA, fp32 on CPU and MPS)')
p.add_argument('--compile', action='store_true', help='torch.compile the transformer blocks (for many images)')
p.add_argument('--out', default='samples', help='output folder (default samples/)')

def make_grid(images, nrow):
    """uint8 (B, H, W, 3) -> one uint8 (rows*H + pad, nrow*W + pad, 3) image, 2 px white padding."""
    B, H, W, _ = images.shape
    rows, pad = math.ceil(B / nrow), 2
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        y, x = pad + (i // nrow) * (H + pad), pad + (i % nrow) * (W + pad)
        grid[y:y + H, x:x + W] = img
    return grid

def load_models(args, device):
    """-> generator, tokenizer, text encoder (eval mode, on device), sampling defaults"""
    if args.ckpt:  # one of ours: everything needed is inside (weights, tokenizer, text encoder spec, defaults)
        path = os.path.join(args.ckpt, 'ckpt.pt') if os.path.isdir(args.ckpt) else args.ckpt
        ck = load_state_dict_file(path)
        if not (isinstance(ck, dict) and 'text_encoder' in ck and 'num_tokens' in ck.get('model_args', {})):
            raise CheckpointError(f"{path} is not a MaskGen checkpoint written by train_maskgen.py (a tokenizer's? "
                                  f"an official file? pass that one with --model FILE)")
        config = MaskGenConfig(**ck['model_args'])
        gen = load_official(MaskGen.from_config(config), ck['ema'] if ck.get('ema') is not None else ck['model'], path,
                            optional=('lm_head.weight',) if config.quantize == 'vq' else ())  # the tied LM head
        tok, spec = args.tokenizer or ck['tokenizer'], ck['text_encoder']
        spec = {**spec, 'pretrained': args.clip} if args.clip and 'pretrained' in spec else spec
        sampling = {**SAMPLING[config.quantize], **ck.get('sampling', {})}
        del ck  # the optimizer state can be large
    else:
        name = args.model.removeprefix('maskgen-')
        if name not in OFFICIAL + [MASKGEN_PRESETS[o]['repo'] for o in OFFICIAL] and not os.path.isfile(name):
            raise CheckpointError(f"unknown model {args.model!r}: choose one of {', '.join(OFFICIAL)} (or its Hugging "
                                  f"Face repo id), a local file, or --ckpt DIR for a checkpoint trained here")
        gen = MaskGen.from_pretrained(name)
        config, spec = gen.config, dict(model='ViT-L-14-336', pretrained=args.clip or 'openai')  # as released
        tok = args.tokenizer or MASKGEN_PRESETS.get(name, {}).get('tokenizer') or OFFICIAL_TOKENIZER[config.quantize]
        sampling = dict(SAMPLING[config.quantize])
    tok, te = TATiTok.from_pretrained(tok), TextEncoder.from_spec(spec)
    t, g = tok.config, config
    if (t.num_latent_tokens, t.quantize, t.text_embed_dim, g.text_embed_dim) != (g.num_tokens, g.quantize, te.width,
                                                                                  te.width):
        raise CheckpointError(f"these do not fit together: a tokenizer of {t.num_latent_tokens} {t.quantize} tokens "
                              f"reading text of width {t.text_embed_dim}, a generator of {g.num_tokens} {g.quantize} "
                              f"tokens reading width {g.text_embed_dim}, a text encoder of width {te.width}")
    return gen.to(device), tok.to(device), te.to(device), sampling

def main(argv=None):
    args = p.parse_args(argv)
    for flag, value, low in [('--n', args.n, 1), ('--steps', args.steps, 1), ('--batch-size', args.batch_size, 1),
                             ('--cfg', args.cfg, 0), ('--temperature', args.temperature, 0), ('--seed', args.seed, 0),
                             ('--x0-clip', args.x0_clip, 0)]:
        if value is not None and value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))  # torchrun, or one process
    master = rank == 0
    if args.eval and world > 1:
        p.error("--eval runs on one process (96 small images), not under torchrun")
    if args.eval == 'shapes':
        from data import SHAPES_EVAL_PROMPTS, classify_shapes
        prompts = SHAPES_EVAL_PROMPTS
    elif args.prompts:
        try:
            with open(args.prompts, encoding='utf-8') as f:
                prompts = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"cannot read the prompts file: {e}")
        if not prompts:
            p.error(f"no prompts in {args.prompts}")
    else:
        prompts = args.prompt or DEFAULT_PROMPTS
    n = args.n
    device = args.device if args.device != 'auto' else 'cuda' if torch.cuda.is_available() else \
        'mps' if torch.backends.mps.is_available() else 'cpu'
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if device == 'cuda' and world > 1 else device)
    dtype = args.dtype if args.dtype != 'auto' else 'fp32' if device.type != 'cuda' else \
        'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    try:
        gen, tok, te, sampling = load_models(args, device)
    except CheckpointError as e:
        preset = MASKGEN_PRESETS.get(args.model.removeprefix('maskgen-'), {})  # a download failed: say all we need
        needs = [preset.get('repo', args.model), TATITOK_PRESETS[preset.get('tokenizer', 'vq128')]['repo']]
        hint = "Offline, pass local files: --tokenizer FILE, --clip FILE (open_clip ViT-L-14-336)." if args.ckpt else \
            f"sample.py --model {args.model} needs {needs[0]}, {needs[1]} and " \
            f"timm/vit_large_patch14_clip_336.openai (CLIP), downloaded once into the Hugging Face cache. Offline, " \
            f"pass local files (--model FILE --tokenizer FILE --clip FILE) or draw from a checkpoint trained here " \
            f"(--ckpt out/shapes-maskgen)."
        print(f"error: {e}" + (f"\n{hint}" if 'from the Hugging Face repo' in str(e) else ''), file=sys.stderr)
        sys.exit(2)
    for key, value in [('num_steps', args.steps), ('guidance_scale', args.cfg), ('temperature', args.temperature),
                       ('guidance_schedule', args.cfg_schedule), ('aes', args.aes), ('x0_clip', args.x0_clip)]:
        if value is not None:
            sampling[key] = (value or None) if key == 'x0_clip' else value  # --x0-clip 0: off
    sampling = {k: v for k, v in sampling.items() if k in inspect.signature(gen.generate).parameters}  # VQ or KL's
    if args.compile:  # the blocks only: generate() itself is a Python loop with changing shapes
        for m in list(gen.modules()) + list(tok.decoder.modules()):
            if type(m).__name__ in ('JointBlock', 'SimpleMLPAdaLN', 'Block'):
                m.compile()
    with warnings.catch_warnings(record=True) as caught:  # TextEncoder warns about prompts over 77 CLIP tokens
        warnings.simplefilter('always')
        ids = te.tokenize(prompts)  # (P, 77), once for all prompts
    for w in caught if master else []:
        print(f"warning: {w.message}", file=sys.stderr)
    if master:
        print(f"{len(prompts)} prompts x {n} on {world} process(es), {device} {dtype}, sampling {sampling}")
    # images g = prompt * n + sample, in batches of batch_size; batch b goes to rank b % world
    total, bs = len(prompts) * n, args.batch_size
    mine = list(range(rank, math.ceil(total / bs), world))
    ctx = torch.autocast(device.type, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}.get(dtype),
                         enabled=dtype != 'fp32')
    bar = tqdm(total=len(mine) * sampling['num_steps'], desc='decoding steps', disable=not master)
    os.makedirs(args.out, exist_ok=True)
    paths, grid, results = [], [], []
    with torch.no_grad(), ctx:
        null = te([args.negative])  # the unconditional branch, computed once
        for b in mine:
            g = list(range(b * bs, min(total, (b + 1) * bs)))
            feats = te(ids[[i // n for i in g]])  # CLIP features once per image, not per step
            tokens = gen.generate(feats['tokens'], feats['pooled'], null['tokens'], null['pooled'], **sampling,
                                  generator=image_generators(args.seed, [(i // n, i % n) for i in g], device),
                                  callback=lambda *a: bar.update())
            images = tok.decode_tokens(tokens, feats['guidance']).float().clamp(0, 1)  # (B, 3, H, W)
            images = (images * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # as the release: truncated
            for i, img in zip(g, images):
                paths.append(os.path.join(args.out, f"{i // n:05d}_{i % n:02d}_s{args.seed}.png"))
                Image.fromarray(img).save(paths[-1])
                grid += [img] if len(grid) < 64 else []
                if args.eval:
                    results.append((i // n, *classify_shapes(img)))
    bar.close()
    if world > 1:  # no grid: the images of one rank are a scattered subset
        print(f"rank {rank}: {len(paths)} images in {args.out}/")
        return
    print('\n'.join(paths if len(paths) <= 64 else paths[:2] + ['...'] + paths[-2:]))
    Image.fromarray(make_grid(np.stack(grid), nrow=min(n, 8))).save(os.path.join(args.out, 'grid.png'))
    print(f"{len(paths)} images in {args.out}/, grid of the first {len(grid)}: {os.path.join(args.out, 'grid.png')}")
    if args.eval:  # colour and shape of each image vs its prompt "a {colour} {shape}"
        k = np.array([r[0] for r in results])  # prompt index of each image
        hits = np.array([(c == prompts[j].split()[1], s == prompts[j].split()[2]) for j, c, s in results])  # (N, 2)
        for j, prompt in enumerate(prompts):
            got = ', '.join(f"{c} {s}" for i, c, s in results if i == j)
            print(f"{prompt:18s} colour {hits[k == j, 0].mean():.2f} shape {hits[k == j, 1].mean():.2f} | {got}")
        acc = dict(colour_acc=hits[:, 0].mean(), shape_acc=hits[:, 1].mean(), both_acc=hits.all(1).mean())
        print(json.dumps({**{key: round(float(v), 4) for key, v in acc.items()}, 'n': len(results)}))

if __name__ == '__main__':
    main()
