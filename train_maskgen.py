"""
Train MaskGen, the text-to-image generator, on the tokens of a frozen TA-TiTok: masked token modeling over code ids
(VQ) or a per-token diffusion loss over continuous tokens (KL), the official recipe per token type. CPU to many GPUs.

CPU quickstart (32 px shapes, the tokenizer trained by train_tokenizer.py --preset shapes, no downloads):
$ python train_maskgen.py --preset shapes                   # reads out/shapes-tokenizer, writes out/shapes-maskgen
$ python train_maskgen.py --preset shapes --tokens kl       # reads out/shapes-tokenizer-kl, writes out/shapes-maskgen-kl
$ python train_maskgen.py --preset shapes --max_steps 20    # CI smoke run
At scale: pretokenize the images once (data.py pretokenize --tokenizer kl32 --output tokens/kl32), then one node of
8 GPUs (the global batch stays fixed, so 1 GPU with accumulation trains the same model):
$ torchrun --standalone --nproc_per_node=8 train_maskgen.py --size xl --tokens kl32             # stage 1
$ torchrun --standalone --nproc_per_node=8 train_maskgen.py --size xl --tokens kl32 --stage 2 \
    --data tokens-hq/kl32 --init_from out/maskgen-kl32-xl     # stage 2, writes out/maskgen-kl32-xl-stage2
Several nodes (run on each, with its --node_rank):
$ torchrun --nnodes=4 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
    train_maskgen.py --size xl --tokens vq128
Continue a run that was killed, bitwise the same as never stopping (on CPU): the same command plus --resume.

References:
1) the paper: https://arxiv.org/abs/2501.07730
2) the official code: https://github.com/bytedance/1d-tokenizer (train_maskgen.py, modeling/maskgen.py,
   modeling/modules/losses.py MLMLoss, configs/training/MaskGen/*.yaml)
3) MAR's diffusion loss: https://github.com/LTH14/mar; IDDPM's hybrid loss: https://arxiv.org/abs/2102.09672
4) nanoGPT train.py, whose shape this file follows: https://github.com/karpathy/nanoGPT
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image

from tatitok import TATiTok, TextEncoder, CheckpointError, tatitok_config, load_official, \
    load_state_dict_file
from maskgen import MaskGen, MaskGenConfig, maskgen_config, image_generators
from data import make_loader, DataError, classify_shapes, SHAPES_EVAL_PROMPTS

# -----------------------------------------------------------------------------
# recipes: every flag left at None takes its value from here

OFFICIAL_TOKENS = ('vq32', 'vq64', 'vq128', 'kl32', 'kl64', 'kl128')
RECIPES = {
    # configs/training/MaskGen/*.yaml. Global batch UNCONFIRMED: the per-GPU batch (VQ 128, KL 32) x 8 GPUs assumed
    ('official', 'vq'): dict(batch_size=1024, max_steps=500_000, lr=4e-4, end_lr=1e-5, warmup_steps=10_000,
                             schedule='cosine', weight_decay=0.03, betas=[0.9, 0.96], log_every=100, sample_every=10_000,
                             ckpt_every=5_000, num_workers=8, pool=0, sample_aes=6.0, guidance_scale=12.0, sample_steps=16,
                             temperature=2.0),
    ('official', 'kl'): dict(batch_size=256, max_steps=1_000_000, lr=1e-4, end_lr=1e-4, warmup_steps=50_000,
                             schedule='constant', weight_decay=0.02, betas=[0.9, 0.95], log_every=100,
                             sample_every=10_000, ckpt_every=5_000, num_workers=8, pool=0, sample_aes=6.0, guidance_scale=3.0,
                             sample_steps=32, temperature=1.0),
    # CPU quickstart: 32 px shapes (every sample has aesthetic score 6.0), sampled on the 24 "a {colour} {shape}";
    # sized to fit 8 minutes on 2 cores (measured 133-183 s VQ / 326-453 s KL on the 64-wide tokenizers; 176 s / 410-452 s
    # on the 128-wide ones; VQ: 700 steps drew shapes better than 1400); accuracy in README's quickstart section
    ('shapes', 'vq'): dict(batch_size=64, max_steps=700, lr=1e-3, end_lr=1e-4, warmup_steps=50, schedule='cosine',
                           weight_decay=0.03, betas=[0.9, 0.96], log_every=100, sample_every=700, ckpt_every=700,
                           num_workers=0, pool=4096, sample_aes=6.0, guidance_scale=3.0, sample_steps=8, temperature=1.0),
    # KL: 800 steps, as the wider denoiser of the shapes-kl preset costs ~2x per step; temperature 0.3: less varied
    # lone objects (mostly the large size), more often the asked-for shape (measured in README "Quickstart")
    ('shapes', 'kl'): dict(batch_size=64, max_steps=800, lr=1e-3, end_lr=1e-4, warmup_steps=50, schedule='cosine',
                           weight_decay=0.02, betas=[0.9, 0.95], log_every=100, sample_every=500, ckpt_every=500,
                           num_workers=0, pool=4096, sample_aes=6.0, guidance_scale=8.0, sample_steps=8, temperature=0.3,
                           x0_clip=3.0),
    # tests: 32 px, a few steps
    ('tiny', 'vq'): dict(batch_size=8, max_steps=10, lr=1e-3, end_lr=1e-4, warmup_steps=2, schedule='cosine',
                         weight_decay=0.03, betas=[0.9, 0.96], log_every=1, sample_every=1000, ckpt_every=5,
                         num_workers=0, pool=0, sample_aes=6.0, guidance_scale=3.0, sample_steps=4, temperature=1.0),
}
RECIPES[('tiny', 'kl')] = dict(RECIPES[('tiny', 'vq')], betas=[0.9, 0.95], schedule='constant', guidance_scale=2.0)
STAGE2 = {'vq': dict(lr=1e-4, max_steps=250_000, sample_aes=6.5), 'kl': dict(max_steps=500_000, sample_aes=6.5)}
SAMPLE_PROMPTS = [  # the fixed prompts of the sample grids of official-size runs (feel free to change)
    "A photo of a red fox sitting in the snow, golden hour", "A bowl of ramen with a soft-boiled egg, studio lighting",
    "An astronaut riding a horse on the moon, digital art", "A watercolor painting of a lighthouse on a cliff",
    "A close-up portrait of an old fisherman with a white beard", "A cozy living room with a fireplace and a cat",
    "A futuristic city skyline at night with neon lights", "A bouquet of sunflowers in a blue vase on a wooden table"]

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train MaskGen (VQ or KL) on a frozen TA-TiTok, on CPU or GPUs (torchrun).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--size', default=None, choices=['tiny', 'l', 'xl'], help="generator size (MaskGen-L 604M/641M, "
                   "-XL 1177M/1237M for VQ/KL, tiny for tests); default: the preset's, else required")
    g.add_argument('--tokens', default=None, help="the frozen tokenizer's release vq32|vq64|vq128|kl32|kl64|kl128 "
                   "(its official weights unless --tokenizer); with --preset: vq or kl (default vq)")
    g.add_argument('--tokenizer', default=None, help="the frozen tokenizer: a checkpoint of train_tokenizer.py (file or "
                   "folder), an official name or repo id. Default: the --tokens release; presets: out/<preset>-tokenizer")
    g.add_argument('--preset', default=None, choices=['shapes', 'tiny'], help="small recipe instead of the official "
                   "one: shapes (CPU quickstart, 32 px), tiny (tests, 32 px); reads the tokenizer of the same preset")
    g.add_argument('--clip', default=None, help="text encoder: 'tiny' or MODEL:PRETRAINED of open_clip; default: the "
                   "tokenizer's own (its checkpoint's, ViT-L-14-336:openai for official releases)")
    g.add_argument('--stage', type=int, default=1, choices=[1, 2], help="official recipe stage (2: lower VQ lr, "
                   "shorter, aesthetic 6.5 for samples); start stage 2 from stage 1 with --init_from")
    g.add_argument('--init_from', default=None, help="start from these generator weights (a train_maskgen.py "
                   "checkpoint or folder, EMA preferred, or an official release: vq-l, vq-xl, kl-l, kl-xl)")
    g = p.add_argument_group('data')
    g.add_argument('--data', default=None, help="token shards of data.py pretokenize (folder or pattern), or images "
                   "encoded on the fly by the tokenizer (tar shards, an image folder, 'shapes'); default: "
                   "tokens/<tokens>, presets: shapes")
    g.add_argument('--num_workers', type=int, default=None, help="data loader workers per process")
    g.add_argument('--pool', type=int, default=None, help="images: encode this many (tokens and text features) once "
                   "at the start and draw every batch from them, instead of encoding on the fly (0: on the fly)")
    g = p.add_argument_group('optimization')
    g.add_argument('--batch_size', type=int, default=None, help="GLOBAL batch (samples per optimizer step, all processes)")
    g.add_argument('--micro_batch_size', type=int, default=None, help="samples per process per forward; gradient "
                   "accumulation = batch_size / (micro_batch_size x processes). Default: no accumulation")
    g.add_argument('--max_steps', type=int, default=None, help="optimizer steps (also the length of the cosine schedule)")
    g.add_argument('--lr', type=float, default=None, help="peak learning rate")
    g.add_argument('--end_lr', type=float, default=None, help="learning rate at the end of the cosine decay")
    g.add_argument('--warmup_steps', type=int, default=None, help="linear warmup steps")
    g.add_argument('--schedule', default=None, choices=['cosine', 'constant'], help="after warmup (release: VQ "
                   "cosine, KL constant)")
    g.add_argument('--weight_decay', type=float, default=None, help="AdamW weight decay (not on norms, biases, embeddings)")
    g.add_argument('--betas', type=float, nargs=2, default=None, help="AdamW betas (release: VQ 0.9 0.96, KL 0.9 0.95)")
    g.add_argument('--grad_clip', type=float, default=1.0, help="max gradient norm")
    g.add_argument('--ema_decay', type=float, default=0.999, help="EMA decay (after the release's warm-up)")
    g = p.add_argument_group('logging, samples, checkpoints')
    g.add_argument('--out_dir', default=None, help="where ckpt.pt, log.txt, config.json and sample grids go")
    g.add_argument('--log_every', type=int, default=None, help="steps between log lines (with the bucketed diagnostics)")
    g.add_argument('--sample_every', type=int, default=None, help="steps between sample grids of the fixed prompts (EMA)")
    g.add_argument('--ckpt_every', type=int, default=None, help="steps between checkpoints (and at the end)")
    g.add_argument('--eval_samples', type=int, default=4, help="shapes: samples per prompt of the final colour/shape "
                   "accuracy on the 24 prompts (0: skip)")
    g.add_argument('--sample_aes', type=float, default=None, help="aesthetic score of the samples (saved for sample.py)")
    g.add_argument('--guidance_scale', type=float, default=None, help="classifier-free guidance of the samples")
    g.add_argument('--sample_steps', type=int, default=None, help="decoding steps of the samples (MaskGIT / MAR)")
    g.add_argument('--temperature', type=float, default=None, help="sampling temperature (VQ Gumbel, KL noise)")
    g.add_argument('--x0_clip', type=float, default=None, help="KL samples: clamp the diffusion's predicted x0 to "
                   "+-this (scaled latents; 0: off, as released). The shapes recipe's 3.0 keeps a young diffusion head's "
                   "samples from blowing up; see GaussianDiffusion.sample")
    g = p.add_argument_group('system')
    g.add_argument('--resume', action='store_true', help="continue from OUT_DIR/ckpt.pt (starts fresh if there is none)")
    g.add_argument('--device', default='auto', help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, ...")
    g.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
                   help="autocast dtype on GPU (auto: bf16 if supported); losses stay fp32; CPU is fp32")
    g.add_argument('--compile', default='auto', choices=['auto', 'on', 'off'], help="torch.compile (auto: on for CUDA)")
    g.add_argument('--seed', type=int, default=42, help="seed of the init, the data order, masking and noise")
    g.add_argument('--max_nonfinite', type=int, default=20, help="stop after this many non-finite steps in a row")
    args = p.parse_args(argv)
    if args.preset is None:
        if args.tokens not in OFFICIAL_TOKENS:
            p.error(f"pass --tokens {'|'.join(OFFICIAL_TOKENS)} (official recipe) or --preset shapes (CPU quickstart)")
        if args.size is None:
            p.error("pass --size tiny|l|xl")
        recipe = 'official'
    else:
        args.tokens = args.tokens or 'vq'
        if args.tokens not in ('vq', 'kl'):
            p.error(f"--preset {args.preset} takes --tokens vq or kl, not {args.tokens!r}")
        recipe, args.size = args.preset, args.size or args.preset
        suffix = '-kl' if args.tokens == 'kl' else ''
        args.tokenizer = args.tokenizer or f"out/{args.preset}-tokenizer{suffix}"
        args.out_dir = args.out_dir or f"out/{args.preset}-maskgen{suffix}"
        args.data = args.data or 'shapes'
    args.recipe = recipe
    args.tokenizer, q = args.tokenizer or args.tokens, args.tokens[:2]  # q: VQ or KL, the recipe's family
    for k, v in {**RECIPES[(recipe, q)], **(STAGE2[q] if args.stage == 2 else {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.data = args.data or f"tokens/{args.tokens}"  # where data.py pretokenize --output puts them in the README
    args.out_dir = args.out_dir or f"out/maskgen-{args.tokens}-{args.size}" + ('-stage2' if args.stage == 2 else '')
    for k in ('batch_size', 'max_steps', 'log_every', 'sample_every', 'ckpt_every'):
        if getattr(args, k) <= 0:
            p.error(f"--{k} must be positive")
    return args

# -----------------------------------------------------------------------------
# helpers

def get_lr(it, base, warmup, total, end, schedule):
    """Linear warmup to `base`, then cosine down to `end` at `total`, or constant (official lr_schedulers.py)."""
    if it < warmup:
        return base * (it + 1) / warmup
    if schedule == 'constant':
        return base
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    return end + 0.5 * (base - end) * (1 + math.cos(math.pi * progress))

@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):  # parameters only: MaskGen has no buffers
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)

def make_grid(x, ncol=8):
    """(B, 3, H, W) in [0, 1] -> one uint8 image, ncol per row, 2 px grey gaps."""
    B, _, H, W = x.shape
    nrow = -(-B // ncol)
    out = np.full((nrow * (H + 2), ncol * (W + 2), 3), 200, np.uint8)
    x = (x.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for b in range(B):
        r, c = divmod(b, ncol)
        out[r * (H + 2):r * (H + 2) + H, c * (W + 2):c * (W + 2) + W] = x[b]
    return out

def generator_config(size, tok_cfg, text_width):
    """The MaskGen preset of this size for this tokenizer's tokens and this text encoder's width."""
    q = tok_cfg.quantize
    over = dict(num_tokens=tok_cfg.num_latent_tokens, text_embed_dim=text_width)
    over.update(codebook_size=tok_cfg.codebook_size) if q == 'vq' else over.update(token_size=tok_cfg.token_size)
    return maskgen_config(f"{q}-{size}" if size in ('l', 'xl') else f"{size}-{q}", **over)

def load_tokenizer(name_or_path):
    """-> (frozen TATiTok, what a generator checkpoint stores for it, its text encoder spec or None). Checkpoints of
    ours are embedded (EMA weights) when small, so the generator's checkpoint is self-contained; official ones by name."""
    path = os.path.join(name_or_path, 'ckpt.pt') if os.path.isdir(name_or_path) else name_or_path
    if not os.path.isfile(path) or path.endswith(('.safetensors', '.bin')):
        ref = os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path
        return TATiTok.from_pretrained(name_or_path), ref, None  # an official release, by name or file
    ck = load_state_dict_file(path)  # a corrupt file: CheckpointError, exit 2
    if 'model_args' not in ck:
        raise CheckpointError(f"{path}: not a train_tokenizer.py checkpoint (no 'model_args')")
    sd = ck['ema'] if ck.get('ema') is not None else ck['model']
    small = sum(v.numel() * v.element_size() for v in sd.values()) < 50 * 2**20
    ref = dict(model_args=ck['model_args'], model=sd) if small else os.path.abspath(path)
    return TATiTok.from_pretrained(dict(model_args=ck['model_args'], model=sd)), ref, ck.get('text_encoder')

def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)

# -----------------------------------------------------------------------------

def main(args):
    # distributed init: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; nccl on CUDA, gloo on CPU
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    device = args.device
    if device in ('auto', 'cuda'):
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else 'cpu'
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    if device_type == 'cuda':
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
    master = rank == 0
    print0 = lambda *a, **k: master and print(*a, **k, flush=True)
    if args.micro_batch_size is None:
        args.micro_batch_size = max(1, args.batch_size // world)
    mb = args.micro_batch_size
    if args.batch_size % (mb * world):
        die(f"--batch_size {args.batch_size} is not a multiple of micro_batch_size {mb} x {world} processes")
    grad_accum = args.batch_size // (mb * world)
    dtype = args.dtype if args.dtype != 'auto' else 'float32' if device_type == 'cpu' else \
        'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    ptdtype = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)[dtype]
    ctx = nullcontext() if device_type == 'cpu' or dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 parts (losses, the diffusion maths)
    torch.backends.cudnn.allow_tf32 = True
    compile_ = args.compile == 'on' or (args.compile == 'auto' and device_type == 'cuda')

    # a checkpoint to resume: architecture, tokenizer and text encoder come from it
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    ckpt = None
    if os.path.exists(ckpt_path):
        if not args.resume:
            die(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out_dir")
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        changed = {k: (v, getattr(args, k, None)) for k, v in ckpt['config'].items()
                   if k not in ('resume', 'micro_batch_size') and getattr(args, k, None) != v}
        print0(f"resuming from {ckpt_path} at step {ckpt['step']}" + (f"; flags changed (saved, now): {changed}" if changed else ''))
    elif args.resume:
        print0(f"--resume: no {ckpt_path} yet, starting from scratch")

    # the frozen tokenizer (encodes images on the fly, decodes the samples) and the frozen text encoder
    if ddp and local_rank != 0:
        dist.barrier()  # local rank 0 downloads the official weights first, then the others read its cache
    if ckpt:
        tok, tok_ref, te_spec = TATiTok.from_pretrained(ckpt['tokenizer']), ckpt['tokenizer'], ckpt['text_encoder']
    else:
        if args.preset and not os.path.exists(args.tokenizer):
            die(f"{args.tokenizer} not found: train the tokenizer first, "
                f"`python train_tokenizer.py --preset {args.preset}{' --tokens kl' if args.tokens == 'kl' else ''}`")
        tok, tok_ref, te_spec = load_tokenizer(args.tokenizer)
    tok_cfg = tok.config
    tok.requires_grad_(False).to(device)
    vq = tok_cfg.quantize == 'vq'
    if args.tokens in OFFICIAL_TOKENS and asdict(tok_cfg) != asdict(tatitok_config(args.tokens)):
        die(f"--tokenizer {args.tokenizer} does not have the {args.tokens} architecture")
    if args.tokens in ('vq', 'kl') and tok_cfg.quantize != args.tokens:
        die(f"--tokenizer {args.tokenizer} makes {tok_cfg.quantize.upper()} tokens, not {args.tokens.upper()}")
    if args.clip and not ckpt:  # the tokenizer's decoder was trained on its own encoder's features: change it knowingly
        name, _, tag = args.clip.partition(':')
        text_encoder = TextEncoder.tiny(context_length=tok_cfg.text_context_length) if args.clip == 'tiny' else \
            TextEncoder.from_open_clip(name, tag or 'openai')
    else:
        text_encoder = TextEncoder.from_spec(te_spec or dict(model='ViT-L-14-336', pretrained='openai'))
    text_encoder.to(device)
    if text_encoder.width != text_encoder.embed_dim:
        die(f"MaskGen reads text tokens and pooled features of one width; this text encoder has {text_encoder.width} "
            f"and {text_encoder.embed_dim}")
    if (text_encoder.width, text_encoder.context_length) != (tok_cfg.text_embed_dim, tok_cfg.text_context_length):
        die(f"the tokenizer's decoder reads {tok_cfg.text_context_length} x {tok_cfg.text_embed_dim} text features, "
            f"this text encoder gives {text_encoder.context_length} x {text_encoder.width}")
    if ddp and local_rank == 0:
        dist.barrier()
    null = text_encoder([''])  # the "" encoding: caption dropout in training, the unconditional branch in sampling

    # the generator, its EMA, the optimizer
    torch.manual_seed(args.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    cfg = MaskGenConfig(**ckpt['model_args']) if ckpt else generator_config(args.size, tok_cfg, text_encoder.width)
    raw_model = MaskGen.from_config(cfg).to(device)
    if args.init_from and not ckpt:  # stage 2 from stage 1 (the release loads strict=False; we check every key)
        load_official(raw_model, MaskGen.from_pretrained(args.init_from).state_dict(), args.init_from)
        print0(f"initialised from {args.init_from}")
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    opt = raw_model.configure_optimizers(args.weight_decay, args.lr, tuple(args.betas), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
    N, K = cfg.num_tokens, cfg.diffusion_batch_mul

    # data: token shards, or images the tokenizer encodes; rank r reads every world-th sample
    # (or, --pool: a fixed pool of samples encoded once, the same on every rank; a step draws its global batch from it)
    train_loader = make_loader(args.data, 256 if args.pool else mb, tok_cfg.image_size, train=True, seed=args.seed,
                               rank=0 if args.pool else rank, world_size=1 if args.pool else world,
                               num_workers=args.num_workers, resample=True)
    state = dict(model=raw_model, ema=ema, optimizer=opt, scaler=scaler, **({} if args.pool else dict(data=train_loader)))
    step, nonfinite_total = 0, 0
    if ckpt:
        for k, obj in state.items():
            obj.load_state_dict(ckpt[k])  # data: the list of every rank's position, the loader takes its own
        step, nonfinite_total = ckpt['step'], ckpt['nonfinite']
        ckpt = None  # free memory
    else:
        update_ema(ema, raw_model, 0.0)  # synced init
    start_step = step

    # compile, then DDP. What they wrap is the model's forward, its randomness passed in (drawn per global sample
    # from the step's seed, so 1, 2 or 8 processes and any micro batch train the same model) and reduction='none':
    # per-token losses, which the loop weighs and normalises over the global batch
    model = raw_model
    if compile_:
        print0("compiling the generator... (takes a minute)")
        model = torch.compile(raw_model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

    # the resolved config, printed and saved
    sampling = dict(aes=args.sample_aes, guidance_scale=args.guidance_scale, num_steps=args.sample_steps,
                    temperature=args.temperature, guidance_schedule='cosine' if vq else 'linear',
                    **({} if vq else dict(diffusion_steps=100 if args.recipe == 'official' else 50,
                                          x0_clip=args.x0_clip or None)))
    derived = dict(world_size=world, grad_accum=grad_accum, device_used=device, dtype_used=dtype, compile_used=compile_,
                   params=raw_model.get_num_params(), tokenizer_args=asdict(tok_cfg), sampling=sampling)
    print0(json.dumps(dict(**vars(args), model_args=asdict(cfg), **derived), indent=1))
    print0(f"global batch {args.batch_size} = {mb} micro x {world} processes x {grad_accum} accumulation steps")
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, 'config.json'), 'w') as f:
            json.dump(dict(**vars(args), model_args=asdict(cfg), **derived), f, indent=1)
    logf = open(os.path.join(args.out_dir, 'log.txt'), 'a') if master else None

    def log(msg):
        print0(msg)
        if logf:
            logf.write(msg + '\n')
            logf.flush()

    def gather(obj):  # every rank's picklable object, as a list (the data position of each rank)
        if not ddp:
            return [obj]
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    def save_checkpoint(step):
        data_states = None if args.pool else gather(train_loader.state_dict())
        if master:
            ckpt = {k: obj.state_dict() for k, obj in state.items() if k != 'data'}
            ckpt.update(model_args=asdict(cfg), tokenizer=tok_ref, text_encoder=text_encoder.spec, sampling=sampling,
                        step=step, config=vars(args), nonfinite=nonfinite_total, data=data_states)
            torch.save(ckpt, ckpt_path + '.tmp')
            os.replace(ckpt_path + '.tmp', ckpt_path)  # atomic: a kill leaves the old file or the new one, never half
            log(f"saved {ckpt_path} (step {step})")
        if ddp:
            dist.barrier()

    def draws(step):
        """Every random number of this step, for the whole global batch in global sample order (CPU generator, so
        the same on every rank and device): caption dropout, masks, KL timesteps and noise, posterior noise."""
        g, G = torch.Generator().manual_seed(args.seed * 1_000_003 + step), args.batch_size
        d = dict(drop=torch.rand(G, generator=g) < cfg.text_drop_prob)
        d['mask'] = raw_model.draw_mask(G, N, g)  # (G, N): VQ a ratio per sample, KL one per batch, as the release
        if vq:  # the loss weighs masked tokens 1 and visible ones 0.1, normalised by the weights' sum
            d['denom'] = torch.where(d['mask'], 1.0, cfg.unmasked_weight).sum()
        else:  # mean over the masked tokens, each drawn at K timesteps
            d['t'] = torch.randint(0, len(raw_model.train_diffusion.betas), (G, K, N), generator=g)
            d['noise'] = torch.randn(G, K, N, cfg.token_size, generator=g)
            d['posterior'] = torch.randn(G, N, cfg.token_size, generator=g)
            d['denom'] = K * d['mask'].sum().float()
        if args.pool:
            d['pool'] = torch.randint(0, args.pool, (G,), generator=g)  # with replacement
        return d

    @torch.no_grad()
    def build_pool():
        """--pool samples: tokens (VQ ids; KL the posterior's mean and logvar), text features, aesthetic scores."""
        parts, n, t0 = [], 0, time.time()
        for batch in train_loader:
            if 'tokens' in batch:
                raise DataError(f"{args.data} holds tokens: --pool is for images (token shards are read as they come)")
            with ctx:
                img = batch['image'].to(device)
                x = tok.encode(img) if vq else torch.cat(tok.encode_posterior(img), -1)  # (B, N) or (B, N, 2C)
                text = text_encoder(batch['caption'])
            parts.append((x, text['tokens'], text['pooled'], batch['aes'].to(device)))
            n += len(x)
            if n >= args.pool:
                break
        print0(f"pool of {args.pool} samples encoded in {time.time() - t0:.1f}s")
        return [torch.cat(p)[:args.pool] for p in zip(*parts)]

    def to_tokens(batch, d, idx):
        if 'posterior' in batch:  # KL pool: a fresh posterior sample each time
            mean, logvar = batch['posterior'].float().chunk(2, -1)
            return mean + torch.exp(0.5 * logvar) * d['posterior'][idx].to(device)
        if 'tokens' in batch:
            x = batch['tokens'].to(device)
            shape = (len(x), N) if vq else (len(x), N, cfg.token_size)
            if tuple(x.shape) != shape:
                raise DataError(f"{args.data}: tokens of shape {tuple(x.shape[1:])}, but the tokenizer makes {shape[1:]}")
            return x
        with torch.no_grad(), ctx:  # images: the frozen tokenizer encodes them now (KL: a posterior sample)
            img = batch['image'].to(device)
            if vq:
                return tok.encode(img)
            mean, logvar = tok.encode_posterior(img)
            return mean + torch.exp(0.5 * logvar) * d['posterior'][idx].to(device)  # (B, N, C) fp32

    @torch.no_grad()
    def sample_grid(step, prompts, per_prompt=1, data_rms=None):
        """Draws of the EMA model for the prompts with its own sampler -> images; for shapes, colour/shape accuracy.
        KL: the RMS of the drawn tokens against data_rms, the training tokens' (a diffusion head that blows up shows
        here first)."""
        images, sq = [], []
        for i in range(0, len(prompts) * per_prompt, 96):
            js = range(i, min(i + 96, len(prompts) * per_prompt))  # image j: prompt j % P, its (j // P)-th sample
            caps = [prompts[j % len(prompts)] for j in js]
            # seed 0 and (prompt, sample), as sample.py at its default --seed: the same draws as `sample.py --ckpt
            # OUT_DIR --eval shapes`, up to float rounding between batch shapes
            gens = image_generators(0, [(j % len(prompts), j // len(prompts)) for j in js], device)
            with ctx:
                feats = text_encoder(caps)  # one CLIP pass: the generator's views and the decoder's guidance
                tokens = ema.generate(feats['tokens'], feats['pooled'], null['tokens'], null['pooled'], **sampling,
                                      generator=gens)
                images.append(tok.decode_tokens(tokens, feats['guidance']).float().clamp(0, 1))
            if not vq:
                sq.append(tokens.float().pow(2).mean() * len(caps))  # sum of squares / C
        images, path = torch.cat(images), os.path.join(args.out_dir, f"samples_{step:07d}.png")
        Image.fromarray(make_grid(images[:len(prompts)], ncol=6 if args.preset else 4)).save(path)
        msg = f"samples step {step} | grid {path}"
        if not vq:
            rms = (sum(sq) / len(images)).sqrt().item()
            msg += f" | token rms {rms:.3g} (training tokens {data_rms:.3g})" + \
                   (" far off: try --x0_clip" if not 0.2 < rms / data_rms < 5 else '')
        if args.preset:  # prompts "a {colour} {shape}": classify what was drawn
            u8 = (images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            pred = [classify_shapes(x) for x in u8]
            truth = [prompts[j % len(prompts)].split()[1:] for j in range(len(u8))]
            acc = [np.mean([p[k] == t[k] for p, t in zip(pred, truth)]) for k in (0, 1)]
            msg += f" | colour accuracy {acc[0]:.1%} shape accuracy {acc[1]:.1%} on {len(u8)} samples"
        log(msg)

    # -------------------------------------------------------------------------
    # training loop
    pool = build_pool() if args.pool else None
    train_iter = None if args.pool else iter(train_loader)
    prompts = SHAPES_EVAL_PROMPTS if args.preset else SAMPLE_PROMPTS
    flops, peak = raw_model.estimate_flops_per_image() * args.batch_size, float('inf')
    if device_type == 'cuda':
        name = torch.cuda.get_device_name()
        peak = 989e12 if ('H100' in name or 'H200' in name) else 312e12 if 'A100' in name else float('inf')
    NB = 4  # diagnostic buckets: VQ by mask ratio (quarters), KL by diffusion timestep (quarters of 1000)
    diag = torch.zeros(2, NB, device=device)  # (sum, count) per bucket since the last log line
    consecutive_bad, smooth, t0, timed, timed_steps = 0, {}, time.time(), 0.0, 0
    for step in range(start_step, args.max_steps + 1):
        last = step == args.max_steps
        # once in a while: a sample grid of the fixed prompts (rank 0, EMA weights)
        # (shapes, at the end: eval_samples per prompt, the colour / shape accuracy of the quickstart's target)
        if master and step > start_step and (last or step % args.sample_every == 0):
            sample_grid(step, prompts, max(1, args.eval_samples) if last and args.preset == 'shapes' else 1,
                        None if vq else x.float().pow(2).mean().sqrt().item())  # KL: the last training batch's RMS
        if ddp:
            dist.barrier()
        # once in a while: checkpoint (never at the start step: nothing new to save)
        if step > start_step and (last or step % args.ckpt_every == 0):
            save_checkpoint(step)
        if last:
            break

        lr = get_lr(step, args.lr, args.warmup_steps, args.max_steps, args.end_lr, args.schedule)
        for group in opt.param_groups:
            group['lr'] = lr
        d = draws(step)
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            idx = (micro * mb + torch.arange(mb)) * world + rank  # this rank's global slots
            if pool:  # pooled text features too
                j = d['pool'][idx].to(device)
                batch = dict(caption=None, aes=pool[3][j], **{'tokens' if vq else 'posterior': pool[0][j]})
                text = dict(tokens=pool[1][j], pooled=pool[2][j])
            else:
                batch = next(train_iter)
            if ddp:  # all-reduce the gradients only on the last micro step (nanoGPT's flag; no_sync() does the same)
                model.require_backward_grad_sync = micro == grad_accum - 1
            x = to_tokens(batch, d, idx)
            if not pool:
                with torch.no_grad(), ctx:
                    text = text_encoder(batch['caption'])  # frozen CLIP, on the fly
            drop = d['drop'][idx].to(device)  # caption -> "" on both streams, for guidance; the aesthetic score stays
            text_tokens = torch.where(drop[:, None, None], null['tokens'], text['tokens'])
            text_pooled = torch.where(drop[:, None], null['pooled'], text['pooled'])
            aes, mask = batch['aes'].to(device), d['mask'][idx].to(device)
            with ctx:
                if vq:
                    ce, correct = model(x, text_tokens, text_pooled, aes, mask=mask, reduction='none')  # (mb, N) each
                    s = (ce * torch.where(mask, 1.0, cfg.unmasked_weight)).sum()
                else:
                    token_loss = model(x, text_tokens, text_pooled, aes, mask=mask, t=d['t'][idx].to(device),
                                       noise=d['noise'][idx].to(device), reduction='none')  # (mb, K, N)
                    s = (token_loss * mask[:, None]).sum()
            loss = s / d['denom'].to(device)  # this micro batch's share of the global batch's loss
            scaler.scale(loss * world).backward()  # x world: DDP averages the gradients over the ranks
            loss_sum += loss.detach()
            with torch.no_grad():  # diagnostics: VQ masked-token accuracy by mask ratio, KL loss by timestep
                if vq:
                    acc, ratio = (correct & mask).sum(1) / mask.sum(1), mask.float().mean(1)
                    b = (ratio * NB).long().clamp(max=NB - 1)
                    diag.index_put_((torch.zeros_like(b), b), acc.float(), accumulate=True)
                    diag.index_put_((torch.ones_like(b), b), torch.ones_like(acc.float()), accumulate=True)
                else:
                    tm = mask[:, None].expand_as(token_loss)
                    b = (d['t'][idx].to(device) * NB // 1000)[tm]
                    diag.index_put_((torch.zeros_like(b), b), token_loss.detach()[tm], accumulate=True)
                    diag.index_put_((torch.ones_like(b), b), torch.ones_like(token_loss[tm]), accumulate=True)
        if ddp:
            dist.all_reduce(loss_sum)
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        finite = torch.isfinite(loss_sum) & (torch.isfinite(gnorm) | scaler.is_enabled())
        if finite.item():  # a sync point, once per step: the skip decision must be the same on every rank
            consecutive_bad = 0
            scaler.step(opt)
            scaler.update()
            update_ema(ema, raw_model, min(args.ema_decay, (1 + step) / (10 + step)))  # the release's EMA warm-up
        else:  # a non-finite loss or gradient: skip the step, count it, stop if it keeps happening
            consecutive_bad += 1
            nonfinite_total += 1
            log(f"step {step}: non-finite loss or gradient, step skipped ({consecutive_bad} in a row, {nonfinite_total} in all)")
            if consecutive_bad >= args.max_nonfinite:
                log(f"stopping: {consecutive_bad} non-finite steps in a row (lower --lr, or try --dtype float32); "
                    f"the last good checkpoint is kept in {ckpt_path}")
                if ddp:
                    dist.destroy_process_group()
                sys.exit(1)
        opt.zero_grad(set_to_none=True)

        # logging
        if device_type == 'cuda':
            torch.cuda.synchronize()
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if step - start_step >= 5:  # skip the first steps (compile, warm-up) in the throughput average
            timed, timed_steps = timed + dt, timed_steps + 1
        v, n = smooth.get('loss', (0.0, 0))  # debiased EMA of the loss, for readability (.item(): synced above)
        smooth['loss'] = (0.9 * v + 0.1 * loss_sum.item(), n + 1)
        if step % args.log_every == 0 or step == args.max_steps - 1:
            c = torch.tensor([train_loader.counts[k] for k in ('read', 'filtered', 'corrupt')], device=device)
            if ddp and not args.pool:
                dist.all_reduce(c)
            if ddp:
                dist.all_reduce(diag)
            avg = timed / timed_steps if timed_steps else dt
            mfu = f" | mfu {100 * flops / avg / (peak * world):.1f}%" if device_type == 'cuda' else ''
            v, n = smooth['loss']
            buckets = (diag[0] / diag[1].clamp(min=1)).tolist()
            name = 'masked acc by mask ratio 0-25-50-75-100%' if vq else 'loss by timestep 0-250-500-750-1000'
            log(f"step {step}/{args.max_steps} | loss {v / (1 - 0.9 ** n):.4f} | {name} "
                + ' '.join(f"{x:.3f}" for x in buckets) + f" | gnorm {gnorm.item():.3g} | lr {lr:.2e} | "
                f"dt {dt * 1000:.0f}ms | img/s {args.batch_size / avg:.1f}{mfu} | data read {c[0]} skipped {c[1] + c[2]}"
                f" | nonfinite {nonfinite_total}")
            if master:  # the same, raw and machine-readable
                with open(os.path.join(args.out_dir, 'metrics.jsonl'), 'a') as f:
                    f.write(json.dumps(dict(step=step, lr=lr, gnorm=gnorm.item(), loss=loss_sum.item(),
                                            buckets=buckets)) + '\n')
            diag.zero_()
    if device_type == 'cuda':
        print0(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if ddp:
        dist.destroy_process_group()

if __name__ == '__main__':
    args = get_args()
    try:
        main(args)
    except (CheckpointError, DataError) as e:  # user errors: a short message, exit 2, no traceback
        die(e)
