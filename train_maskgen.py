"""
Train MaskGen, the text-to-image generator, on the tokens of a frozen TA-TiTok: masked token modeling over code ids
(VQ) or a per-token diffusion loss over continuous tokens (KL), the official recipe per token type. The loss is the
model's own forward (maskgen.py); this script feeds it, steps the optimizer, and keeps any number of processes
equal to one. CPU to many GPUs.

CPU quickstart (32 px shapes, the tokenizer of train_tokenizer.py --preset shapes, no downloads):
$ python train_maskgen.py --preset shapes                 # reads out/shapes-tokenizer, writes out/shapes-maskgen
$ python train_maskgen.py --preset shapes --tokens kl     # the KL variant, out/shapes-maskgen-kl
At scale: pretokenize the images once (data.py pretokenize --tokenizer kl32 --out_dir tokens/kl32), then one node
of 8 GPUs (the global batch stays fixed, so 1 GPU with gradient accumulation trains the same model):
$ torchrun --standalone --nproc_per_node=8 train_maskgen.py --size xl --tokens kl32             # stage 1
$ torchrun --standalone --nproc_per_node=8 train_maskgen.py --size xl --tokens kl32 --stage 2 \\
    --data tokens-hq/kl32 --init_from out/maskgen-kl32-xl     # stage 2, writes out/maskgen-kl32-xl-stage2
Several nodes (run on each, with its --node_rank):
$ torchrun --nnodes=4 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
    train_maskgen.py --size xl --tokens vq128
A run that was killed continues with the same command plus --resume.

Outputs in --out_dir: ckpt.pt (weights, EMA, optimizer, data position, the config, and all sample.py needs: the
tokenizer, the text encoder's spec, the sampling settings), metrics.jsonl, samples_STEP.png. The log goes to stdout.

References:
1) the paper: https://arxiv.org/abs/2501.07730
2) the official code: https://github.com/bytedance/1d-tokenizer (scripts/train_maskgen.py, modeling/maskgen.py,
   configs/training/MaskGen/*.yaml)
3) nanoGPT's train.py and DiT's train.py, whose shape this file follows
"""
import argparse
import copy
import functools
import json
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tatitok import (TATiTok, TextEncoder, UserError, tatitok_config, load_official, load_tokenizer,
                     load_state_dict_file, checkpoint_weights, clip_ids)
from runtime import (init_distributed, pick_device, pick_dtype, autocast, peak_flops, get_lr,
                     save_checkpoint, all_gather_objects, open_checkpoint, make_out_dir, number,
                     add_system_flags)
from maskgen import (MaskGen, MaskGenConfig, Sampling, maskgen_config, image_generators, prompt_inputs,
                     training_draws)
from data import (make_loader, make_grid, expand_source, UserError, SHAPES_EVAL_PROMPTS, token_shards_tokenizer,
                  tokenizer_fingerprint, merge_states, encode_images, save_png)
from runtime import (micro_batches, on_rank0, broadcast_state, optimizer_step, update_ema, shard_optimizer,
                     optimizer_state, choose_plan, plan_lines, to_device, stop_if_nonfinite, run_main,
                     interrupted_at)

# -----------------------------------------------------------------------------
# recipes and flags: every flag left unset takes its value from the recipe

OFFICIAL_TOKENS = ('vq32', 'vq64', 'vq128', 'kl32', 'kl64', 'kl128')
RECIPES = {
    # the release's configs/training/MaskGen/*.yaml; its global batch is not stated (the GPU batch x 8 assumed)
    ('official', 'vq'): dict(batch_size=1024, micro_batch_size=128, max_steps=500_000, lr=4e-4, end_lr=1e-5, warmup_steps=10_000,
                             schedule='cosine', weight_decay=0.03, beta2=0.96, log_every=100, sample_every=10_000,
                             ckpt_every=5_000, num_workers=8, pool=0, sample_aes=6.0, guidance_scale=12.0,
                             sample_steps=16, temperature=2.0, diffusion_steps=100, x0_clip=0.0),
    ('official', 'kl'): dict(batch_size=256, micro_batch_size=32, max_steps=1_000_000, lr=1e-4, end_lr=1e-4, warmup_steps=50_000,
                             schedule='constant', weight_decay=0.02, beta2=0.95, log_every=100, sample_every=10_000,
                             ckpt_every=5_000, num_workers=8, pool=0, sample_aes=6.0, guidance_scale=3.0,
                             sample_steps=32, temperature=1.0, diffusion_steps=100, x0_clip=0.0),
    # the CPU quickstart: 32 px shapes (every image has aesthetic score 6.0), sampled on the 24 "a {colour} {shape}"
    # prompts, sized for 8 minutes on 2 cores; TUNING.md has the measurements behind the numbers
    ('shapes', 'vq'): dict(batch_size=64, max_steps=2200, lr=2e-3, end_lr=2e-4, warmup_steps=50, schedule='cosine',
                           weight_decay=0.03, beta2=0.96, log_every=100, sample_every=2200, ckpt_every=1100,
                           num_workers=0, pool=32768, sample_aes=6.0, guidance_scale=2.0, sample_steps=16,
                           temperature=0.5, diffusion_steps=50, x0_clip=0.0),
    ('shapes', 'kl'): dict(batch_size=64, max_steps=700, lr=1e-3, end_lr=1e-4, warmup_steps=50, schedule='cosine',
                           weight_decay=0.02, beta2=0.95, log_every=100, sample_every=700, ckpt_every=350,
                           num_workers=0, pool=4096, sample_aes=6.0, guidance_scale=8.0, sample_steps=8,
                           temperature=0.3, diffusion_steps=50, x0_clip=3.0),
    # the tests: 32 px, a few steps
    ('tiny', 'vq'): dict(batch_size=8, max_steps=10, lr=1e-3, end_lr=1e-4, warmup_steps=2, schedule='cosine',
                         weight_decay=0.03, beta2=0.96, log_every=1, sample_every=1000, ckpt_every=5,
                         num_workers=0, pool=0, sample_aes=6.0, guidance_scale=3.0, sample_steps=4,
                         temperature=1.0, diffusion_steps=50, x0_clip=0.0),
}
RECIPES[('tiny', 'kl')] = dict(RECIPES[('tiny', 'vq')], beta2=0.95, schedule='constant', guidance_scale=2.0)
STAGE2 = {'vq': dict(lr=1e-4, max_steps=250_000, sample_aes=6.5), 'kl': dict(max_steps=500_000, sample_aes=6.5)}
SAMPLE_PROMPTS = [  # the prompts of the sample grids of official-size runs (feel free to change)
    "A photo of a red fox sitting in the snow, golden hour", "A bowl of ramen with a soft-boiled egg, studio lighting",
    "An astronaut riding a horse on the moon, digital art", "A watercolor painting of a lighthouse on a cliff",
    "A close-up portrait of an old fisherman with a white beard", "A cozy living room with a fireplace and a cat",
    "A futuristic city skyline at night with neon lights", "A bouquet of sunflowers in a blue vase on a wooden table"]
MODEL_FLAGS = ('preset', 'tokens', 'size', 'tokenizer', 'clip')  # what a resumed run must keep

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train MaskGen (VQ or KL) on a frozen TA-TiTok, on a CPU or GPUs "
                                "(torchrun). A flag without a default shown takes it from the recipe: --size and "
                                "--tokens vq128 etc. (official) or --preset shapes|tiny; see RECIPES in this file.")
    pos, pos_int = number(float, 0), number(int, 1)
    g = p.add_argument_group('model')
    g.add_argument('--size', choices=['tiny', 'l', 'xl'], help="generator size: MaskGen-L (604M VQ, 641M KL), "
                   "-XL (1177M, 1237M), tiny (tests); default: the preset's")
    g.add_argument('--tokens', help="the frozen tokenizer's release vq32|vq64|vq128|kl32|kl64|kl128 (its official "
                   "weights unless --tokenizer); with --preset: vq or kl (default vq)")
    g.add_argument('--tokenizer', help="the frozen tokenizer: a train_tokenizer.py checkpoint (file or folder), an "
                   "official name or repo id; default: the --tokens release, or out/<preset>-tokenizer")
    g.add_argument('--preset', choices=['shapes', 'tiny'], help="a small recipe instead of the official one: "
                   "shapes (the CPU quickstart), tiny (the tests); reads the tokenizer of the same preset")
    g.add_argument('--clip', help="text encoder: tiny, MODEL:PRETRAINED of open_clip, or a local weights file; "
                   "default: the tokenizer's own (ViT-L-14-336:openai for the releases)")
    g.add_argument('--stage', type=int, default=1, choices=[1, 2], help="the official recipe's stage (2: lower VQ "
                   "lr, shorter, aesthetic 6.5 for samples); start stage 2 from stage 1 with --init_from")
    g.add_argument('--init_from', help="start from these generator weights: a train_maskgen.py checkpoint or "
                   "folder (EMA preferred), or an official release (vq-l, vq-xl, kl-l, kl-xl)")
    g = p.add_argument_group('data')
    g.add_argument('--data', help="token shards of data.py pretokenize (a folder or pattern), or images the "
                   "tokenizer encodes on the fly (tar shards, a folder, shapes); default: tokens/<tokens>, or shapes")
    g.add_argument('--num_workers', type=number(int, 0), help="data loader processes per GPU")
    g.add_argument('--pool', type=number(int, 0), help="images: encode this many (tokens and text features) once at "
                   "the start and draw every batch from them (0: encode on the fly)")
    g = p.add_argument_group('optimization')
    g.add_argument('--batch_size', type=pos_int, help="the GLOBAL batch: samples per optimizer step, all processes")
    g.add_argument('--micro_batch_size', type=pos_int, help="at most this many samples per process per forward "
                   "(the largest that divides batch_size / processes); the rest is gradient accumulation")

    g.add_argument('--max_steps', type=pos_int, help="optimizer steps (also the length of the cosine schedule)")
    g.add_argument('--lr', type=pos, help="peak learning rate")
    g.add_argument('--end_lr', type=pos, help="learning rate at the end of the cosine decay")
    g.add_argument('--warmup_steps', type=number(int, 0), help="linear warm-up steps")
    g.add_argument('--schedule', choices=['cosine', 'constant'], help="after the warm-up (release: VQ cosine, KL "
                   "constant)")
    g.add_argument('--weight_decay', type=pos, help="AdamW weight decay (not on norms, biases, embeddings)")
    g.add_argument('--beta1', type=number(float, 0, 0.9999), default=0.9, help="AdamW beta1 (default 0.9)")
    g.add_argument('--beta2', type=number(float, 0, 0.9999), help="AdamW beta2 (release: VQ 0.96, KL 0.95)")
    g.add_argument('--grad_clip', type=pos, default=1.0, help="max gradient norm (default 1.0)")
    g.add_argument('--ema_decay', type=number(float, 0, 1), default=0.999, help="EMA decay, after the release's "
                   "warm-up (default 0.999)")
    g = p.add_argument_group('output and samples')
    g.add_argument('--out_dir', help="where ckpt.pt, metrics.jsonl and the sample grids go")
    g.add_argument('--log_every', type=pos_int, help="steps between log lines")
    g.add_argument('--sample_every', type=pos_int, help="steps between sample grids of the fixed prompts (EMA)")
    g.add_argument('--ckpt_every', type=pos_int, help="steps between checkpoints (and one at the end)")
    g.add_argument('--sample_aes', type=pos, help="aesthetic score of the samples (kept for sample.py)")
    g.add_argument('--guidance_scale', type=pos, help="classifier-free guidance of the samples (1: off)")
    g.add_argument('--sample_steps', type=pos_int, help="decoding steps of the samples (MaskGIT / MAR)")
    g.add_argument('--temperature', type=pos, help="sampling temperature (VQ: Gumbel noise, KL: diffusion noise)")
    g.add_argument('--diffusion_steps', type=pos_int, help="KL samples: denoising steps per token")
    g.add_argument('--x0_clip', type=pos, help="KL samples: clamp the diffusion's predicted x0 to +-this (scaled "
                   "latents; 0: off, as released); a young diffusion head's samples blow up without it")
    add_system_flags(p, 'generator', 'the masks, caption dropout and diffusion noise')
    args = p.parse_args(argv)
    if args.preset is None and args.tokens not in OFFICIAL_TOKENS:
        p.error(f"pass --tokens {'|'.join(OFFICIAL_TOKENS)} (the official recipe) or --preset shapes (CPU quickstart)")
    if args.preset is None and args.size is None:
        p.error("pass --size l or --size xl")
    recipe = 'official'
    if args.preset is not None and args.size not in (None, args.preset):
        p.error(f"--preset {args.preset} trains its own small generator: --size l or xl go with an official "
                f"recipe (--tokens vq128, kl32, ...)")
    if args.preset is not None:
        args.tokens = args.tokens or 'vq'
        if args.tokens not in ('vq', 'kl'):
            p.error(f"--preset {args.preset} takes --tokens vq or kl, not {args.tokens!r}")
        recipe = args.preset
        args.size = args.size or args.preset
        suffix = '-kl' if args.tokens == 'kl' else ''
        args.tokenizer = args.tokenizer or f"out/{args.preset}-tokenizer{suffix}"
        args.out_dir = args.out_dir or f"out/{args.preset}-maskgen{suffix}"
        args.data = args.data or 'shapes'
    q = args.tokens[:2]  # the recipe's family, VQ or KL
    defaults = dict(RECIPES[(recipe, q)])
    if args.stage == 2:
        defaults.update(STAGE2[q])
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.tokenizer = args.tokenizer or args.tokens
    args.data = args.data or f"tokens/{args.tokens}"  # where the README's pretokenize command writes them
    if args.out_dir is None:
        args.out_dir = f"out/maskgen-{args.tokens}-{args.size}" + ('-stage2' if args.stage == 2 else '')
    try:
        pick_dtype(args.dtype, pick_device(args.device))
    except ValueError as e:
        p.error(str(e))
    return args

# -----------------------------------------------------------------------------
# helpers

def frozen_models(args, resumed):
    """-> the frozen tokenizer, what the generator's checkpoint keeps of it, and its text encoder (--clip
    overrides it), checked against the data and each other. A tokenizer of ours is embedded (EMA weights)
    when small, so that the generator's checkpoint stands alone; a release is kept by name."""
    if resumed:
        tok, ref = TATiTok.from_pretrained(resumed['tokenizer']), resumed['tokenizer']
        text_encoder = TextEncoder.from_spec(resumed['text_encoder'])
    else:
        tok, text_encoder, (path, ck) = load_tokenizer(args.tokenizer, args.clip)
        ref = args.tokenizer
        if os.path.exists(path):  # a file: where it is, or its weights when they are small
            ref = os.path.abspath(path)
        if 'model_args' in ck and sum(v.nbytes for v in checkpoint_weights(ck).values()) < 50 * 2 ** 20:
            ref = dict(model_args=ck['model_args'], model=checkpoint_weights(ck))
    cfg = tok.config
    record = token_shards_tokenizer(args.data)  # token shards say which tokenizer made them
    if record is not None and record.get('fingerprint') != tokenizer_fingerprint(tok):
        raise UserError(f"{args.data} holds the tokens of another tokenizer ({record.get('tokenizer')}) "
                        f"than {args.tokenizer}: pretokenize with this one, or train with that one")
    if args.tokens in OFFICIAL_TOKENS and asdict(cfg) != asdict(tatitok_config(args.tokens)):
        raise UserError(f"--tokenizer {args.tokenizer} does not have the {args.tokens} architecture")
    if args.tokens in ('vq', 'kl') and cfg.quantize != args.tokens:
        raise UserError(f"--tokenizer {args.tokenizer} makes {cfg.quantize.upper()} tokens, not "
                        f"{args.tokens.upper()}")
    if text_encoder.width != text_encoder.embed_dim:
        raise UserError(f"MaskGen reads text tokens and pooled features of one width; this text encoder "
                        f"has {text_encoder.width} and {text_encoder.embed_dim}")
    return tok, ref, text_encoder

def generator_config(size, tok_cfg, text_width):
    """The MaskGen preset of this size, for this tokenizer's tokens and this text encoder's width."""
    q = tok_cfg.quantize
    over = dict(num_tokens=tok_cfg.num_latent_tokens, text_embed_dim=text_width)
    if q == 'vq':
        over['codebook_size'] = tok_cfg.codebook_size
    else:
        over['token_size'] = tok_cfg.token_size
    if size in ('l', 'xl'):
        return maskgen_config(f"{q}-{size}", **over)
    return maskgen_config(f"{size}-{q}", **over)

def plan_run(args, cfg, text_len, frozen, world, memory):
    """The micro batch, levers and memory plan of a run on GPUs of `memory` bytes (None: the CPU), for
    the generator of `cfg`, built on the meta device (nothing allocated) to count its parameters."""
    with torch.device('meta'):
        model = MaskGen.from_config(cfg)
    return choose_plan(model, model.activation_bytes(text_len), frozen, args.batch_size,
                       args.micro_batch_size, world, memory, args.checkpointing, args.zero)


@torch.no_grad()
def encode_pool(loader, n, tok, text_encoder, device, ctx):
    """--pool: n samples encoded once -> [tokens (VQ ids (n, N); KL the posterior's mean and logvar
    (n, 2, N, C)), CLIP tokens, CLIP pooled, aesthetic scores], on the device."""
    parts, count = [], 0
    for batch in loader:
        if 'tokens' in batch:
            raise UserError("the data holds tokens: --pool is for images (token shards are read as they "
                            "come)")
        x = encode_images(tok, batch['image'].to(device), ctx)
        text = text_encoder(batch['caption'])
        parts.append((x, text['tokens'], text['pooled'], batch['aes'].to(device)))
        count += len(x)
        if count >= n:
            return [torch.cat(part)[:n] for part in zip(*parts)]


def prepare_sample(sample, index, tokenizer, context_length, cfg, seed):
    """A data worker's part of global sample `index`: its caption's CLIP token ids and every random
    draw of its training step (maskgen.training_draws)."""
    return dict(ids=clip_ids(tokenizer, sample['caption'], context_length),
                **training_draws(cfg, seed, index))


@torch.no_grad()
def model_inputs(batch, pool, tok, text_encoder, ctx):
    """A micro batch on the device -> (tokens: VQ ids (B, N) or KL latents (B, N, C), CLIP features,
    aesthetic scores). KL latents are a posterior sample with the sample's own noise (its 'posterior')."""
    if pool is not None:
        x, tokens, pooled, aes = (part[batch['pool_index']] for part in pool)
        text = dict(tokens=tokens, pooled=pooled)
    else:
        text, aes = text_encoder(batch['ids']), batch['aes']  # frozen CLIP in fp32, as released
        x = batch.get('tokens')
        if x is None:  # images, encoded on the fly
            x = encode_images(tok, batch['image'], ctx)
    if tok.config.quantize == 'vq':
        return x, text, aes
    mean, logvar = x.float().unbind(1)  # (B, N, C) each
    return mean + torch.exp(0.5 * logvar) * batch['posterior'], text, aes


def bucket_stats(stats, nb=4):
    """A training diagnostic, (sum, count) in nb buckets, without a host sync: VQ, masked-token accuracy
    by mask ratio (low ratios should learn first); KL, the diffusion loss by timestep (every bucket
    should fall)."""
    mask = stats['mask']
    if 'correct' in stats:
        values = (stats['correct'] & mask).sum(1) / mask.sum(1)  # (B,)
        bucket = (mask.float().mean(1) * nb).long().clamp(max=nb - 1)
        weight = torch.ones_like(values)
    else:
        values = stats['token_loss'].flatten()  # (B*k*N,)
        bucket = (stats['t'] * nb // 1000).flatten()
        weight = mask[:, None].expand_as(stats['token_loss']).flatten().float()  # the masked ones
    zeros = torch.zeros(nb, device=mask.device)
    sums = zeros.index_add(0, bucket, values.float() * weight)
    return torch.stack([sums, zeros.index_add(0, bucket, weight)])  # (2, nb)


@torch.no_grad()
def sample_grid(ema, tok, text_encoder, null, prompts, sampling, device, ctx, path, data_rms):
    """One sample of each prompt from the EMA weights, with the sampler and settings sample.py will use, as a grid
    -> a log line. KL: the RMS of the drawn tokens against the training tokens' (a diffusion head that blows up
    its samples shows here first)."""
    text = text_encoder(prompts)
    gens = image_generators(0, [(i, 0) for i in range(len(prompts))], device)  # sample.py --seed 0's draws
    with ctx:
        tokens = ema.generate(prompt_inputs(text, null), Sampling(**sampling), seed=gens)
        images = tok.decode_tokens(tokens, text['guidance']).float().clamp(0, 1)
    u8 = (images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (P, H, W, 3)
    save_png(make_grid(u8, ncol=6), path)
    msg = f"samples | {path}"
    if tok.config.quantize == 'kl':
        rms = tokens.float().pow(2).mean().sqrt().item()
        msg += f" | token rms {rms:.3g} (training tokens {data_rms:.3g})"
        if not 0.2 < rms / data_rms < 5:
            msg += ": far off, try --x0_clip"
    return msg

# -----------------------------------------------------------------------------

def main(args, state):
    rank, world, device = init_distributed(args.device)
    master = rank == 0
    dtype = pick_dtype(args.dtype, device)
    ctx = autocast(device, dtype)
    micro_batches(args.batch_size, args.micro_batch_size, world)  # a batch no split serves stops here
    expand_source(args.data)  # a missing or empty source stops here, before any model is loaded

    # rank 0 decides whether to resume, from its own --out_dir, and tells every rank what it found:
    # rank 0 alone reads the checkpoint (memory-mapped) and writes; the others get the state from it
    keep = {}

    def decide():
        make_out_dir(args.out_dir)
        ckpt, changed = open_checkpoint(args.out_dir, args.resume, 'train_maskgen', vars(args), MODEL_FLAGS)
        if not ckpt and args.preset and not os.path.exists(args.tokenizer):
            suffix = ' --tokens kl' if args.tokens == 'kl' else ''
            raise UserError(f"{args.tokenizer} not found: train the tokenizer first, "
                                  f"`python train_tokenizer.py --preset {args.preset}{suffix}`")
        keep['ckpt'] = ckpt
        keys = ('model_args', 'tokenizer', 'text_encoder', 'step', 'nonfinite', 'data')
        return changed, ckpt and {k: ckpt[k] for k in keys}
    changed, resumed = on_rank0(decide, world, UserError)
    ckpt = keep.get('ckpt')

    # the frozen tokenizer (encodes images, decodes samples) and text encoder
    tok, tok_ref, text_encoder = frozen_models(args, resumed)
    tok_cfg = tok.config
    tok.requires_grad_(False)
    text_encoder.to(device)
    vq = tok_cfg.quantize == 'vq'
    null = text_encoder([''])  # the "" encoding: caption dropout in training, the unconditional branch in sampling

    # the generator's config, and the micro batch and levers its memory plan chooses for this GPU
    if resumed:
        cfg = MaskGenConfig(**resumed['model_args'])
    else:
        cfg = generator_config(args.size, tok_cfg, text_encoder.width)
    on_the_fly = not args.pool and token_shards_tokenizer(args.data) is None
    frozen = 4 * sum(p.numel() for p in text_encoder.parameters())
    if on_the_fly:  # the frozen tokenizer on the GPU only when it encodes every step
        frozen += 4 * tok.get_num_params()
    memory = None
    if device.type == 'cuda':
        memory = torch.cuda.get_device_properties(device).total_memory
    choice = plan_run(args, cfg, text_encoder.context_length, frozen, world, memory)
    mb, grad_accum = choice['micro_batch'], choice['grad_accum']

    # the generator (the same init on every rank), its EMA, the optimizer; rank 0 loads a checkpoint
    torch.manual_seed(args.seed)
    raw_model = MaskGen.from_config(cfg)
    raw_model.checkpointing = choice['checkpointing']
    if args.init_from and not resumed and master:  # stage 2 from stage 1 (the release loads strict=False)
        load_official(raw_model, MaskGen.from_pretrained(args.init_from).state_dict(), args.init_from)
    raw_model = raw_model.to(device)  # after loading: it puts the file's CPU tensors in the model
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    opt = raw_model.configure_optimizers(args.weight_decay, args.lr, (args.beta1, args.beta2))
    if choice['zero']:
        opt = shard_optimizer(opt)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_step, nonfinite = 0, torch.zeros((), dtype=torch.long, device=device)
    if ckpt:
        raw_model.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        scaler.load_state_dict(ckpt['scaler'])
        if world == 1:
            opt.load_state_dict(ckpt['optimizer'])
    if resumed:
        start_step = resumed['step']
        nonfinite.fill_(resumed['nonfinite'])
    if world > 1:  # rank 0's weights, EMA and optimizer state on every rank
        for t in ema.state_dict().values():
            dist.broadcast(t, 0)
        if resumed:
            opt.load_state_dict(broadcast_state(ckpt and ckpt['optimizer'], device, world))
            scaler.load_state_dict(on_rank0(lambda: scaler.state_dict(), world, UserError))
    ckpt = None  # free the memory

    # data: token shards, or images the tokenizer encodes; the global sample g = step * batch_size + i
    # is the same sample, with the same draws, on any number of processes. With --pool, every rank
    # encodes the same pool and each step draws its global batch from it
    prepare = functools.partial(prepare_sample, tokenizer=text_encoder.tokenizer,
                                context_length=text_encoder.context_length, cfg=cfg, seed=args.seed)
    train_loader = make_loader(args.data, mb, tok_cfg.image_size, seed=args.seed, rank=rank,
                               world_size=world, num_workers=args.num_workers, prepare=prepare)
    if args.pool:
        pool_loader = make_loader(args.data, 256, tok_cfg.image_size, seed=args.seed)
    elif resumed:
        train_loader.load_state_dict(resumed['data'])
    if on_the_fly:
        tok.to(device)

    model = raw_model
    if args.compile == 'on' or (args.compile == 'auto' and device.type == 'cuda'):
        model = torch.compile(raw_model)
    if world > 1:  # rank 0's weights are broadcast here; no buffer changes in training
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None,
                    gradient_as_bucket_view=True, broadcast_buffers=False)

    # the resolved configuration, printed and kept in every checkpoint with the sampling settings
    sampling = dict(aes=args.sample_aes, guidance_scale=args.guidance_scale, num_steps=args.sample_steps,
                    temperature=args.temperature)
    if vq:
        sampling['guidance_schedule'] = 'cosine'
    else:
        sampling.update(guidance_schedule='linear', diffusion_steps=args.diffusion_steps,
                        x0_clip=args.x0_clip or None)
    if master:
        print(json.dumps(dict(**vars(args), model_args=asdict(cfg), tokenizer_args=asdict(tok_cfg),
                              world_size=world, grad_accum=grad_accum, device_used=str(device),
                              params=raw_model.get_num_params(), sampling=sampling), indent=1))
        print(f"global batch {args.batch_size} = {mb} per forward x {world} processes x {grad_accum} "
              f"accumulation; data: {train_loader.stream.streams} streams, "
              f"{train_loader.stream.num_workers} workers per process")
        if memory:
            print(plan_lines(choice, memory))
        if changed:
            print(f"resuming at step {start_step} with changed flags (saved, now): {changed}")

    pool = None
    if args.pool:
        pool = encode_pool(pool_loader, args.pool, tok.to(device), text_encoder, device, ctx)
        tok.cpu()
    batches = iter(train_loader)
    prompts = SHAPES_EVAL_PROMPTS if args.preset else SAMPLE_PROMPTS
    flops = raw_model.estimate_flops(text_encoder.context_length)['train'] * args.batch_size
    G = args.batch_size
    # what the log reads, accumulated on the device and read every --log_every steps only
    acc = dict(loss=torch.zeros((), device=device), buckets=torch.zeros(2, 4, device=device),
               bad_run=torch.zeros((), dtype=torch.long, device=device), x_sq=torch.ones((), device=device))
    smooth, gnorm, t_log, step_log = torch.zeros((), device=device), None, time.time(), start_step
    step, saved = start_step, resumed and start_step
    state['interrupted'] = lambda: interrupted_at(step, saved, args.out_dir)
    for step in range(start_step, args.max_steps + 1):
        last = step == args.max_steps
        # once in a while: a sample grid of the fixed prompts (rank 0, EMA weights)
        if master and step > start_step and (last or step % args.sample_every == 0):
            path = os.path.join(args.out_dir, f"samples_{step:07d}.png")
            tok.to(device)
            msg = sample_grid(ema, tok, text_encoder, null, prompts, sampling, device, ctx, path,
                              acc['x_sq'].sqrt().item())
            if not on_the_fly:
                tok.cpu()
            print(msg, flush=True)
        # once in a while: a checkpoint (never at the start step: nothing new to save)
        if step > start_step and (last or step % args.ckpt_every == 0):
            data_states = None
            if not args.pool:
                data_states = merge_states(all_gather_objects(train_loader.state_dict(), world))
            opt_state = optimizer_state(opt)
            if master:
                ckpt = dict(model=raw_model.state_dict(), ema=ema.state_dict(), optimizer=opt_state,
                            scaler=scaler.state_dict(), script='train_maskgen', model_args=asdict(cfg),
                            tokenizer=tok_ref, sampling=sampling, text_encoder=text_encoder.spec,
                            config=vars(args), step=step, nonfinite=nonfinite.item(), data=data_states)
                save_checkpoint(ckpt, os.path.join(args.out_dir, 'ckpt.pt'))
                ckpt = opt_state = None
                print(f"saved {args.out_dir}/ckpt.pt (step {step})", flush=True)
            saved = step
            if world > 1:  # within the process group's timeout, which init_distributed sized for it
                dist.barrier()
        if last:
            break

        # one optimizer step over the global batch, in micro batches; nothing here waits on the GPU
        lr = get_lr(step, args.lr, args.warmup_steps, args.max_steps, args.end_lr, args.schedule)
        for group in opt.param_groups:
            group['lr'] = lr
        if pool is None:
            micro = [next(batches) for _ in range(grad_accum)]  # host tensors, pinned
        else:  # the global batch's samples, drawn from the pool with replacement
            pick = torch.randint(0, args.pool, (G,), generator=torch.Generator().manual_seed(
                args.seed * 1_000_003 + step))
            micro = []
            for i in range(grad_accum):
                index = [(i * mb + j) * world + rank for j in range(mb)]  # this rank's, in the batch
                draws = raw_model.draw_batch(args.seed, [step * G + j for j in index])
                micro.append(dict(draws, pool_index=pick[index]))
        # the loss is normalised by the global batch's weights: known on the host, summed over ranks
        normalizer = to_device(sum(raw_model.loss_weights(b['mask']).sum() for b in micro), device)
        if world > 1:
            dist.all_reduce(normalizer)
        loss_sum = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            if world > 1:  # all-reduce the gradients on the last micro step only (nanoGPT's flag)
                model.require_backward_grad_sync = i == grad_accum - 1
            b = to_device(b, device)
            x, text, aes = model_inputs(b, pool, tok, text_encoder, ctx)
            with ctx:
                loss, stats = model(x, text['tokens'], text['pooled'], aes, null['tokens'], null['pooled'],
                                    draws=b, normalizer=normalizer)
            scaler.scale(loss * world).backward()  # x world: DDP averages the gradients over the ranks
            loss_sum += loss.detach()
            acc['buckets'] += bucket_stats(stats)
            acc['x_sq'] = 0.9 * acc['x_sq'] + 0.1 * x.detach().float().pow(2).mean()
        gnorm, finite = optimizer_step(opt, scaler, raw_model.parameters(), args.grad_clip)
        update_ema(ema, raw_model, step, args.ema_decay, finite)
        opt.zero_grad(set_to_none=True)
        bad = (~finite).long()
        nonfinite += bad
        acc['bad_run'] = (acc['bad_run'] + 1) * bad
        smooth = 0.9 * smooth + 0.1 * loss_sum
        acc['loss'] = loss_sum

        # logging, every --log_every steps: the one place the host reads what the GPU computed
        if step % args.log_every == 0 or step == args.max_steps - 1:
            if world > 1:
                dist.all_reduce(acc['loss'])
                dist.all_reduce(acc['buckets'])
            if device.type == 'cuda':
                torch.cuda.synchronize()
            dt = (time.time() - t_log) / (step + 1 - step_log)  # per step, since the last log line
            t_log, step_log = time.time(), step + 1
            bad_run, total_bad = acc['bad_run'].item(), nonfinite.item()
            if master:
                by = (acc['buckets'][0] / acc['buckets'][1].clamp(min=1)).tolist()
                name = 'masked acc by mask ratio 0-25-50-75-100%'
                if not vq:
                    name = 'loss by timestep 0-250-500-750-1000'
                mfu = flops / dt / (peak_flops(device) * world)
                debiased = smooth.item() / (1 - 0.9 ** (step + 1 - start_step))
                print(f"step {step}/{args.max_steps} | loss {debiased:.4f} | {name} "
                      f"{' '.join(f'{v:.3f}' for v in by)} | gnorm {gnorm.item():.3g} | lr {lr:.2e} | "
                      f"dt {dt * 1000:.0f}ms | img/s {G / dt:.1f} | mfu {100 * mfu:.1f}% | "
                      f"nonfinite {total_bad}", flush=True)
                row = dict(step=step, lr=lr, gnorm=gnorm.item(), loss=acc['loss'].item(), buckets=by)
                with open(os.path.join(args.out_dir, 'metrics.jsonl'), 'a') as f:
                    f.write(json.dumps(row) + '\n')
            acc['buckets'].zero_()
            stop_if_nonfinite(bad_run, args.max_nonfinite, args.out_dir, master)
    if world > 1:
        dist.destroy_process_group()

if __name__ == '__main__':
    run_main(main, get_args(), UserError)
