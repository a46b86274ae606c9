"""
Train MaskGen, the text-to-image generator, on the tokens of a frozen TA-TiTok:
masked token modeling (VQ) or a per-token diffusion loss (KL), each with its
official recipe. The loss is the model's own forward (maskgen.py); this script
feeds it and steps the optimizer.

$ python train_maskgen.py --preset shapes  # CPU quickstart, on out/shapes-tokenizer
$ python train_maskgen.py --preset shapes --tokens kl  # the same, KL
At scale, pretokenize the images once (data.py pretokenize --tokenizer kl32 --out_dir
tokens/kl32), then:
$ torchrun --standalone --nproc_per_node=8 train_maskgen.py --size xl --tokens kl32  # stage 1
$ torchrun --standalone --nproc_per_node=8 train_maskgen.py --size xl --tokens kl32 --stage 2 \\
    --data tokens-hq/kl32 --init_from out/maskgen-kl32-xl
The global batch is fixed, so 1 GPU and 8 train the same model. A killed run
continues with the same command plus --resume. --out_dir gets ckpt.pt (all
sample.py needs), metrics.jsonl and samples_STEP.png.

References:
1) the paper: https://arxiv.org/abs/2501.07730
2) the official code: https://github.com/bytedance/1d-tokenizer (scripts/train_maskgen.py,
   modeling/maskgen.py, configs/training/MaskGen/*.yaml)
3) nanoGPT's and DiT's train.py, this file's shape
"""
import argparse
import copy
import functools
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from tatitok import (TATiTok, TextEncoder, UserError, tatitok_config, load_official,
                     load_tokenizer, checkpoint_weights, clip_ids)
from maskgen import (MaskGen, MaskGenConfig, Sampling, maskgen_config, image_generators,
                    prompt_inputs, training_draws)
from data import (make_loader, make_grid, expand_source, SHAPES_EVAL_PROMPTS, save_png,
                  token_shards_tokenizer, tokenizer_fingerprint, merge_states, encode_images)
from runtime import (get_lr, all_gather_objects, number, add_system_flags, to_device,
                     optimizer_step, update_ema, shard_optimizer, choose_plan, stop_if_nonfinite,
                     run_main, interrupted_at, start_run, open_run, restore, wrap, gpu_memory,
                     print_start, save_run, log_step, add_training_flags, check_tokens, take_recipe,
                     OFFICIAL_TOKENS)

# -----------------------------------------------------------------------------
# recipes: a flag left unset takes its recipe's value. official: the release's
# configs/training/MaskGen/*.yaml (its global batch unstated: x 8 GPUs assumed); shapes: the
# CPU quickstart (TUNING.md), sampled on the prompts "a {colour} {shape}"; tiny: the tests

NAMES = [(r, q) for r in ('official', 'shapes', 'tiny') for q in ('vq', 'kl')]
TABLE = dict(  #  official VQ, KL       shapes VQ, KL      tiny VQ, KL
    batch_size=      (1024,   256,       64,       64,      8,   8),
    micro_batch_size=(128,    32,        None,     None,    None, None),
    max_steps=       (500_000, 1_000_000, 2200,    700,     10,  10),
    lr=              (4e-4,   1e-4,      2e-3,     1e-3,    1e-3, 1e-3),
    end_lr=          (1e-5,   1e-4,      2e-4,     1e-4,    1e-4, 1e-4),
    warmup_steps=    (10_000, 50_000,    50,       50,      2,   2),
    schedule=        ('cosine', 'constant', 'cosine', 'cosine', 'cosine', 'constant'),
    weight_decay=    (0.03,   0.02,      0.03,     0.02,    0.03, 0.03),
    beta2=           (0.96,   0.95,      0.96,     0.95,    0.96, 0.95),
    log_every=       (100,    100,       100,      100,     1,   1),
    sample_every=    (10_000, 10_000,    2200,     700,     1000, 1000),
    ckpt_every=      (5_000,  5_000,     1100,     350,     5,   5),
    num_workers=     (8,      8,         0,        0,       0,   0),
    pool=            (0,      0,         32768,    4096,    0,   0),
    sample_aes=      (6.0,    6.0,       6.0,      6.0,     6.0, 6.0),
    guidance_scale=  (12.0,   3.0,       2.0,      8.0,     3.0, 2.0),
    sample_steps=    (16,     32,        16,       8,       4,   4),
    temperature=     (2.0,    1.0,       0.5,      0.3,     1.0, 1.0),
    diffusion_steps= (100,    100,       50,       50,      50,  50),
    x0_clip=         (0.0,    0.0,       0.0,      3.0,     0.0, 0.0),
)
RECIPES = {name: {k: v[i] for k, v in TABLE.items()} for i, name in enumerate(NAMES)}
STAGE2 = {'vq': dict(lr=1e-4, max_steps=250_000, sample_aes=6.5),
          'kl': dict(max_steps=500_000, sample_aes=6.5)}
SAMPLE_PROMPTS = [  # the official recipes' sample grid (feel free to change)
    "A photo of a red fox sitting in the snow, golden hour",
    "A bowl of ramen with a soft-boiled egg, studio lighting",
    "An astronaut riding a horse on the moon, digital art",
    "A watercolor painting of a lighthouse on a cliff",
    "A close-up portrait of an old fisherman with a white beard",
    "A cozy living room with a fireplace and a cat",
    "A futuristic city skyline at night with neon lights",
    "A bouquet of sunflowers in a blue vase on a wooden table"]
MODEL_FLAGS = ('preset', 'tokens', 'size', 'tokenizer', 'clip')  # kept by a resumed run

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train MaskGen on a frozen TA-TiTok.")
    pos, pos_int = number(float, 0), number(int, 1)
    g = add_training_flags(p, 'samples')
    m = g['model']
    m.add_argument('--size', choices=['tiny', 'l', 'xl'],
                   help="MaskGen-L, -XL, or tiny (the tests); default: the preset's")
    m.add_argument('--tokenizer',
                   help="a train_tokenizer.py checkpoint (file or folder), an official name or "
                        "repo id; default: the --tokens release, or out/<preset>-tokenizer")
    m.add_argument('--clip',
                   help="text encoder: tiny, MODEL:PRETRAINED of open_clip, or a weights "
                        "file; default: the tokenizer's")
    m.add_argument('--stage', type=int, default=1, choices=[1, 2],
                   help="the official recipe's stage (2: shorter, VQ lr lower, samples at "
                        "aesthetic 6.5; --init_from stage 1)")
    m.add_argument('--init_from',
                   help="a train_maskgen.py checkpoint or folder (its EMA), or a release "
                        "(vq-l, vq-xl, kl-l, kl-xl) to start from")
    d = g['data']
    d.add_argument('--data',
                   help="token shards of data.py pretokenize (a folder or pattern), or "
                        "images to encode on the fly; default: tokens/<tokens>, or shapes")
    d.add_argument('--pool', type=number(int, 0),
                   help="images: encode this many once and draw every batch from them "
                        "(0: encode on the fly)")
    o = g['optimization']
    o.add_argument('--schedule', choices=['cosine', 'constant'],
                   help="after the warm-up (release: VQ cosine, KL constant)")
    s = g['output']
    s.add_argument('--sample_every', type=pos_int, help="steps between sample grids (EMA)")
    s.add_argument('--sample_aes', type=pos,
                   help="aesthetic score of the samples (kept for sample.py)")
    s.add_argument('--guidance_scale', type=pos,
                   help="classifier-free guidance of the samples (1: off)")
    s.add_argument('--sample_steps', type=pos_int,
                   help="decoding steps of the samples (MaskGIT / MAR)")
    s.add_argument('--temperature', type=pos,
                   help="sampling temperature (VQ: Gumbel noise, KL: diffusion noise)")
    s.add_argument('--diffusion_steps', type=pos_int,
                   help="KL samples: denoising steps per token")
    s.add_argument('--x0_clip', type=pos,
                   help="KL samples: clamp the predicted x0 to +-this (0: off, as released)")
    add_system_flags(p, 'generator', 'the masks, caption dropout and diffusion noise')
    args = p.parse_args(argv)
    check_tokens(p, args)
    if args.preset is None and args.size is None:
        p.error("pass --size l or --size xl")
    if args.preset and args.size not in (None, args.preset):
        p.error(f"--preset {args.preset} trains its own small generator: --size l or xl go with "
                f"an official recipe (--tokens vq128, kl32, ...)")
    recipe = args.preset or 'official'
    if args.preset:
        args.size = args.size or args.preset
        kl = '-kl' if args.tokens == 'kl' else ''
        args.tokenizer = args.tokenizer or f"out/{args.preset}-tokenizer{kl}"
        args.out_dir = args.out_dir or f"out/{args.preset}-maskgen{kl}"
        args.data = args.data or 'shapes'
    q = args.tokens[:2]  # vq or kl
    defaults = dict(RECIPES[(recipe, q)])
    if args.stage == 2:
        defaults.update(STAGE2[q])
    args.tokenizer = args.tokenizer or args.tokens
    args.data = args.data or f"tokens/{args.tokens}"  # as the README pretokenizes
    stage2 = '-stage2' if args.stage == 2 else ''
    args.out_dir = args.out_dir or f"out/maskgen-{args.tokens}-{args.size}{stage2}"
    return take_recipe(p, args, defaults)

# -----------------------------------------------------------------------------

def frozen_models(args, resumed):
    """-> (the tokenizer, what the checkpoint keeps of it, the text encoder), checked against
    the data and each other."""
    if resumed:
        tok, ref = TATiTok.from_pretrained(resumed['tokenizer']), resumed['tokenizer']
        text_encoder = TextEncoder.from_spec(resumed['text_encoder'])
    else:
        if args.preset and not os.path.exists(args.tokenizer):
            kl = ' --tokens kl' if args.tokens == 'kl' else ''
            raise UserError(f"{args.tokenizer} not found: train the tokenizer first, "
                            f"`python train_tokenizer.py --preset {args.preset}{kl}`")
        tok, text_encoder, (path, ck) = load_tokenizer(args.tokenizer, args.clip)
        ref = args.tokenizer
        if os.path.exists(path):  # not a release's name
            ref = os.path.abspath(path)
        if 'model_args' in ck:  # ours, embedded when small: the checkpoint stands alone
            weights = checkpoint_weights(ck)
            if sum(v.nbytes for v in weights.values()) < 50 * 2 ** 20:
                ref = dict(model_args=ck['model_args'], model=weights)
    cfg = tok.config
    record = token_shards_tokenizer(args.data)  # which tokenizer made the shards
    if record is not None and record.get('fingerprint') != tokenizer_fingerprint(tok):
        raise UserError(f"{args.data} holds the tokens of {record.get('tokenizer')}, not of "
                        f"{args.tokenizer}: pretokenize with this one, or train with that one")
    if args.tokens in OFFICIAL_TOKENS and asdict(cfg) != asdict(tatitok_config(args.tokens)):
        raise UserError(f"--tokenizer {args.tokenizer} does not have the {args.tokens} "
                        f"architecture")
    if args.tokens in ('vq', 'kl') and cfg.quantize != args.tokens:
        raise UserError(f"--tokenizer {args.tokenizer} makes {cfg.quantize.upper()} tokens, not "
                        f"{args.tokens.upper()}")
    if text_encoder.width != text_encoder.embed_dim:
        raise UserError(f"MaskGen reads text tokens and pooled features of one width, not "
                        f"{text_encoder.width} and {text_encoder.embed_dim}")
    return tok, ref, text_encoder

def generator_config(size, tok_cfg, text_width):
    """The MaskGen preset of this size, for this tokenizer and text encoder."""
    q = tok_cfg.quantize
    over = dict(num_tokens=tok_cfg.num_latent_tokens, text_embed_dim=text_width)
    if q == 'vq':
        over['codebook_size'] = tok_cfg.codebook_size
    else:
        over['token_size'] = tok_cfg.token_size
    name = f"{q}-{size}" if size in ('l', 'xl') else f"{size}-{q}"
    return maskgen_config(name, **over)

def plan_run(args, cfg, text_len, frozen, world, memory):
    """choose_plan for the generator beside `frozen` bytes."""
    with torch.device('meta'):
        model = MaskGen.from_config(cfg)
    return choose_plan(model, model.activation_bytes(text_len), frozen, args.batch_size,
                       args.micro_batch_size, world, memory, args.checkpointing, args.zero)

@torch.no_grad()
def encode_pool(loader, n, tok, text_encoder, device, ctx):
    """--pool: n samples encoded once -> [tokens (VQ (n, N); KL mean and logvar (n, 2, N, C)),
    CLIP tokens, CLIP pooled, aesthetic scores]."""
    parts, count = [], 0
    for batch in loader:
        if 'tokens' in batch:
            raise UserError("the data holds tokens: --pool is for images")
        x = encode_images(tok, batch['image'].to(device), ctx)
        text = text_encoder(batch['caption'])
        parts.append((x, text['tokens'], text['pooled'], batch['aes'].to(device)))
        count += len(x)
        if count >= n:
            return [torch.cat(part)[:n] for part in zip(*parts)]

def prepare_sample(sample, index, tokenizer, context_length, cfg, seed):
    """In a data worker: the caption's ids and all the sample's random draws."""
    return dict(ids=clip_ids(tokenizer, sample['caption'], context_length),
                **training_draws(cfg, seed, index))

@torch.no_grad()
def model_inputs(batch, pool, tok, text_encoder, ctx):
    """A micro batch -> (VQ ids (B, N) or KL latents (B, N, C), CLIP features, aes). KL:
    a posterior sample with the sample's own noise."""
    if pool is not None:
        x, tokens, pooled, aes = (part[batch['pool_index']] for part in pool)
        text = dict(tokens=tokens, pooled=pooled)
    else:
        text, aes = text_encoder(batch['ids']), batch['aes']  # fp32, as released
        x = batch.get('tokens')
        if x is None:  # images, encoded on the fly
            x = encode_images(tok, batch['image'], ctx)
    if tok.config.quantize == 'vq':
        return x, text, aes
    mean, logvar = x.float().unbind(1)  # (B, N, C) each
    return mean + torch.exp(0.5 * logvar) * batch['posterior'], text, aes

def bucket_stats(stats, nb=4):
    """(sum, count) in nb buckets, no host sync. VQ: masked accuracy by mask ratio (low ratios
    learn first); KL: the diffusion loss by timestep (each should fall)."""
    mask = stats['mask']
    if 'correct' in stats:
        values = (stats['correct'] & mask).sum(1) / mask.sum(1)  # (B,)
        bucket = (mask.float().mean(1) * nb).long().clamp(max=nb - 1)
        weight = torch.ones_like(values)
    else:
        values = stats['token_loss'].flatten()  # (B*k*N,)
        bucket = (stats['t'] * nb // 1000).flatten()
        weight = mask[:, None].expand_as(stats['token_loss']).flatten().float()
    zeros = torch.zeros(nb, device=mask.device)
    sums = zeros.index_add(0, bucket, values.float() * weight)
    return torch.stack([sums, zeros.index_add(0, bucket, weight)])  # (2, nb)

@torch.no_grad()
def sample_grid(ema, tok, text_encoder, null, prompts, sampling, device, ctx, path, data_rms):
    """A grid of one EMA sample per prompt, as sample.py --seed 0 draws it -> a log line. KL:
    the tokens' RMS against the training tokens' (a diffusion head that blows up shows here)."""
    text = text_encoder(prompts)
    gens = image_generators(0, [(i, 0) for i in range(len(prompts))], device)
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
    rank, world, device, dtype, ctx = start_run(args)
    master = rank == 0
    expand_source(args.data)  # a missing or empty source stops here
    ckpt, changed, resumed = open_run(args, 'train_maskgen', MODEL_FLAGS, world)

    # the frozen tokenizer (encodes images, decodes samples) and text encoder
    tok, tok_ref, text_encoder = frozen_models(args, resumed)
    tok_cfg = tok.config
    tok.requires_grad_(False)
    text_encoder.to(device)
    vq = tok_cfg.quantize == 'vq'
    null = text_encoder([''])  # caption dropout's and CFG's unconditional input

    # the generator's config and memory plan
    if resumed:
        cfg = MaskGenConfig(**resumed['model_args'])
    else:
        cfg = generator_config(args.size, tok_cfg, text_encoder.width)
    on_the_fly = not args.pool and token_shards_tokenizer(args.data) is None
    frozen = 4 * sum(p.numel() for p in text_encoder.parameters())
    if on_the_fly:  # the tokenizer is on the GPU only when it encodes every batch
        frozen += 4 * tok.get_num_params()
    memory = gpu_memory(device)
    choice = plan_run(args, cfg, text_encoder.context_length, frozen, world, memory)
    mb, grad_accum = choice['micro_batch'], choice['grad_accum']
    G = args.batch_size  # the global batch

    torch.manual_seed(args.seed)  # the same init on every rank
    raw_model = MaskGen.from_config(cfg)
    raw_model.checkpointing = choice['checkpointing']
    if args.init_from and not resumed and master:  # stage 2 (released: strict=False)
        weights = MaskGen.from_pretrained(args.init_from).state_dict()
        load_official(raw_model, weights, args.init_from)
    raw_model = raw_model.to(device)  # after loading: it puts the file's tensors in
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    opt = raw_model.configure_optimizers(args.weight_decay, args.lr, (args.beta1, args.beta2))
    if choice['zero']:
        opt = shard_optimizer(opt)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    parts = dict(model=raw_model, ema=ema, optimizer=opt, scaler=scaler)
    start_step, nonfinite = restore(parts, ckpt, resumed, world, device)
    ckpt = None  # free the memory

    # data: token shards, or images the tokenizer encodes. Global sample step * G + i is the
    # same sample with the same draws on any number of processes; --pool: every rank encodes
    # the same pool, and each step draws its global batch from it
    prepare = functools.partial(prepare_sample, tokenizer=text_encoder.tokenizer, cfg=cfg,
                                context_length=text_encoder.context_length, seed=args.seed)
    train_loader = make_loader(args.data, mb, tok_cfg.image_size, seed=args.seed, rank=rank,
                               world_size=world, num_workers=args.num_workers, prepare=prepare)
    if args.pool:
        pool_loader = make_loader(args.data, 256, tok_cfg.image_size, seed=args.seed)
    elif resumed:
        train_loader.load_state_dict(resumed['data'])
    if on_the_fly:
        tok.to(device)
    model = wrap(raw_model, device, world, args.compile)

    # the sampling settings, kept in every checkpoint for sample.py
    sampling = dict(aes=args.sample_aes, guidance_scale=args.guidance_scale,
                    num_steps=args.sample_steps, temperature=args.temperature)
    if vq:
        sampling['guidance_schedule'] = 'cosine'
    else:
        sampling.update(guidance_schedule='linear', diffusion_steps=args.diffusion_steps,
                        x0_clip=args.x0_clip or None)
    if master:
        config = dict(vars(args), model_args=asdict(cfg), tokenizer_args=asdict(tok_cfg),
                      world_size=world, grad_accum=grad_accum, device_used=str(device),
                      params=raw_model.get_num_params(), sampling=sampling)
        print_start(config, choice, train_loader, memory, changed, start_step)

    pool = None
    if args.pool:
        pool = encode_pool(pool_loader, args.pool, tok.to(device), text_encoder, device, ctx)
        tok.cpu()
    batches = iter(train_loader)
    prompts = SHAPES_EVAL_PROMPTS if args.preset else SAMPLE_PROMPTS
    flops = raw_model.estimate_flops(text_encoder.context_length)['train'] * G
    # what the log reads stays on the device until --log_every
    buckets, smooth = torch.zeros(2, 4, device=device), torch.zeros((), device=device)
    bad_run = torch.zeros((), dtype=torch.long, device=device)
    x_sq = torch.ones((), device=device)  # an EMA of the tokens' mean square
    clock = [time.time(), start_step]
    step, saved = start_step, resumed and start_step
    state['interrupted'] = lambda: interrupted_at(step, saved, args.out_dir)
    for step in range(start_step, args.max_steps + 1):
        last = step == args.max_steps
        # once in a while: a sample grid of the fixed prompts (rank 0, EMA)
        if master and step > start_step and (last or step % args.sample_every == 0):
            path = os.path.join(args.out_dir, f"samples_{step:07d}.png")
            tok.to(device)
            msg = sample_grid(ema, tok, text_encoder, null, prompts, sampling, device, ctx, path,
                              x_sq.sqrt().item())
            if not on_the_fly:
                tok.cpu()
            print(msg, flush=True)
        # once in a while: a checkpoint (not at the start step: nothing new)
        if step > start_step and (last or step % args.ckpt_every == 0):
            data_state = None
            if not args.pool:
                data_state = merge_states(all_gather_objects(train_loader.state_dict(), world))
            save_run(args, step, world, parts, script='train_maskgen', model_args=asdict(cfg),
                     text_encoder=text_encoder.spec, nonfinite=nonfinite.item(), data=data_state,
                     tokenizer=tok_ref, sampling=sampling)
            saved = step
        if last:
            break

        # one step over the global batch in micro batches; nothing here waits on the GPU
        lr = get_lr(step, args.lr, args.warmup_steps, args.max_steps, args.end_lr, args.schedule)
        for group in opt.param_groups:
            group['lr'] = lr
        if pool is None:
            micro = [next(batches) for _ in range(grad_accum)]  # host tensors, pinned
        else:  # the global batch, drawn from the pool with replacement
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            pick = torch.randint(0, args.pool, (G,), generator=gen)
            micro = []
            for i in range(grad_accum):
                index = [(i * mb + j) * world + rank for j in range(mb)]  # this rank's
                draws = raw_model.draw_batch(args.seed, [step * G + j for j in index])
                micro.append(dict(draws, pool_index=pick[index]))
        # the loss is normalised by the global batch's weights, known on the host
        normalizer = to_device(sum(raw_model.loss_weights(b['mask']).sum() for b in micro), device)
        if world > 1:
            dist.all_reduce(normalizer)
        loss_sum = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            if world > 1:  # all-reduce on the last micro step only (nanoGPT's flag)
                model.require_backward_grad_sync = i == grad_accum - 1
            b = to_device(b, device)
            x, text, aes = model_inputs(b, pool, tok, text_encoder, ctx)
            with ctx:
                loss, stats = model(x, text['tokens'], text['pooled'], aes, null['tokens'],
                                    null['pooled'], draws=b, normalizer=normalizer)
            scaler.scale(loss * world).backward()  # x world: DDP averages over ranks
            loss_sum += loss.detach()
            buckets += bucket_stats(stats)
            x_sq = 0.9 * x_sq + 0.1 * x.detach().float().pow(2).mean()
        gnorm, finite = optimizer_step(opt, scaler, raw_model.parameters(), args.grad_clip)
        update_ema(ema, raw_model, step, args.ema_decay, finite)
        opt.zero_grad(set_to_none=True)
        bad = (~finite).long()
        nonfinite += bad
        bad_run = (bad_run + 1) * bad
        smooth = 0.9 * smooth + 0.1 * loss_sum  # debiased when read

        # logging: the one place the host waits on the GPU
        if step % args.log_every == 0 or step == args.max_steps - 1:
            losses = torch.stack([smooth, loss_sum])  # each rank holds its share of the loss
            if world > 1:
                dist.all_reduce(losses)
                dist.all_reduce(buckets)
            if master:
                by = (buckets[0] / buckets[1].clamp(min=1)).tolist()
                name = 'masked acc by mask ratio 0-25-50-75-100%'
                if not vq:
                    name = 'loss by timestep 0-250-500-750-1000'
                smoothed, loss = losses.tolist()
                debiased = smoothed / (1 - 0.9 ** (step + 1 - start_step))
                head = f"loss {debiased:.4f} | {name} {' '.join(f'{v:.3f}' for v in by)}"
                row = dict(step=step, lr=lr, gnorm=gnorm.item(), loss=loss, buckets=by)
                log_step(args, row, head, f"nonfinite {nonfinite.item()}", clock, flops, device,
                         world)
            buckets.zero_()
            stop_if_nonfinite(bad_run.item(), args.max_nonfinite, args.out_dir, master)

if __name__ == '__main__':
    run_main(main, get_args(), UserError)
