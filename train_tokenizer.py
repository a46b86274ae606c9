"""
Train TA-TiTok with the official one-stage recipe: L2 + perceptual (LPIPS + 0.1 ConvNeXt-S) + VQ or
KL terms, a blur-pool PatchGAN with hinge loss and LeCAM, AdamW, cosine schedule, EMA.

$ python train_tokenizer.py --preset shapes              # CPU quickstart: 32 px shapes, VQ
$ python train_tokenizer.py --preset shapes --tokens kl  # the same, KL tokens
$ python train_tokenizer.py --tokens vq128 --data 'shards/{00000..09999}.tar' --eval_data ...
$ torchrun --standalone --nproc_per_node=8 train_tokenizer.py --tokens vq128 --data ...
The global batch is fixed, so 1 GPU and 8 train the same model. A killed run continues with the
same command plus --resume. --out_dir gets ckpt.pt, metrics.jsonl and recon_STEP.png grids.

References:
1) the paper: https://arxiv.org/abs/2501.07730
2) the official code: https://github.com/bytedance/1d-tokenizer (scripts/train_tatitok.py,
   modeling/modules/{losses,perceptual_loss,lpips,discriminator,ema_model}.py)
3) LPIPS: https://arxiv.org/abs/1801.03924, weights as in CompVis/taming-transformers
4) LeCAM: https://arxiv.org/abs/2104.03310
5) nanoGPT's and DiT's train.py, this file's shape
"""
import argparse
import copy
import functools
import hashlib
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
from torch.nn import functional as F

from tatitok import (TATiTok, TATiTokConfig, TextEncoder, UserError, tatitok_config, load_official,
                     param_groups, reachable, at_least_fp32, clip_ids, code_stats)
from runtime import (get_lr, all_gather_objects, number, add_system_flags, to_device,
                     optimizer_step, update_ema, shard_optimizer, choose_plan, stop_if_nonfinite,
                     run_main, interrupted_at, start_run, open_run, restore, wrap, gpu_memory,
                     print_start, save_run, log_step, add_training_flags, check_tokens, take_recipe)
from data import make_loader, make_grid, expand_source, merge_states, save_png

# -----------------------------------------------------------------------------
# perceptual loss: LPIPS (VGG16) + 0.1 x MSE of ConvNeXt-S logits, the release's
# "lpips-convnext_s-1.0-0.1"; torchvision's module names, so its files load strictly

WEIGHTS = {  # name -> (url, md5); torchvision's names hold a sha256 prefix instead
    'vgg16-397923af.pth': ('https://download.pytorch.org/models/vgg16-397923af.pth', None),
    'convnext_small-0c510722.pth':
        ('https://download.pytorch.org/models/convnext_small-0c510722.pth', None),
    'vgg_lpips.pth': ('https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1',
                      'd507d7349b931f0638a25a48a722f98a'),
}

def hub_weights(name):
    url, md5 = WEIGHTS[name]
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
    sd, why = None, 'offline?'
    if os.path.exists(path) or reachable(url.split('/')[2]):
        try:  # torch.hub's cache, else a download
            sd = torch.hub.load_state_dict_from_url(url, file_name=name, map_location='cpu',
                                                    check_hash=md5 is None, weights_only=True,
                                                    progress=False)
        except Exception as e:  # a proxy, a truncated file: all the same to the user
            why = type(e).__name__
    if sd is None:
        raise UserError(f"cannot get the perceptual-loss weights {name} ({why}); download {url} "
                        f"to {path} on a machine with internet, or --perceptual none")
    if md5 and hashlib.md5(open(path, 'rb').read()).hexdigest() != md5:
        raise UserError(f"{path}: md5 mismatch, delete it and retry")
    return sd

class LayerNorm2d(nn.LayerNorm):

    def forward(self, x):  # (B, C, H, W), normalised over C
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

class Permute(nn.Module):

    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)

class CNBlock(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
                                   Permute(0, 2, 3, 1), nn.LayerNorm(dim, eps=1e-6),
                                   nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                   Permute(0, 3, 1, 2))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x):
        return x + self.layer_scale * self.block(x)  # no stochastic depth in eval

class ConvNeXtSmall(nn.Module):
    """torchvision's convnext_small."""

    def __init__(self):
        super().__init__()
        dims, depths = (96, 192, 384, 768), (3, 3, 27, 3)
        layers = [nn.Sequential(nn.Conv2d(3, 96, 4, stride=4), LayerNorm2d(96, eps=1e-6))]
        for i, (d, n) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(d) for _ in range(n)]))
            if i < 3:
                down = nn.Conv2d(d, dims[i + 1], 2, stride=2)
                layers.append(nn.Sequential(LayerNorm2d(d, eps=1e-6), down))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(LayerNorm2d(768, eps=1e-6), nn.Flatten(1),
                                        nn.Linear(768, 1000))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3), keepdim=True))  # (B, 1000)

def vgg16_features():
    """torchvision's vgg16().features[:30], up to relu5_3 (what LPIPS reads)."""
    layers, c = [], 3
    for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512):
        if v == 'M':
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)

class PerceptualLoss(nn.Module):
    TAPS = (3, 8, 15, 22, 29)  # relu1_2 .. relu5_3

    def __init__(self, kind, pretrained=True):
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512)])
        self.convnext = ConvNeXtSmall() if kind == 'lpips-convnext' else None
        view = lambda *v: torch.tensor(v).view(1, 3, 1, 1)
        self.register_buffer('shift', view(-.030, -.088, -.188))  # LPIPS's scaling
        self.register_buffer('scale', view(.458, .448, .450))
        self.register_buffer('mean', view(0.485, 0.456, 0.406))  # ImageNet's
        self.register_buffer('std', view(0.229, 0.224, 0.225))
        if pretrained:
            vgg = hub_weights('vgg16-397923af.pth')
            vgg = {k[9:]: v for k, v in vgg.items() if k.startswith('features.')}
            load_official(self.features, vgg, 'vgg16-397923af.pth')
            lin = hub_weights('vgg_lpips.pth')
            lin = {k: v for k, v in lin.items() if k.startswith('lin')}  # 'linI.model.1.weight'
            rename = [(f'lin{i}.model.1.', f'{i}.') for i in range(5)]
            load_official(self.lins, lin, 'vgg_lpips.pth', rename=rename)
            if self.convnext is not None:
                name = 'convnext_small-0c510722.pth'
                load_official(self.convnext, hub_weights(name), name)
        self.requires_grad_(False).eval()

    def vgg_taps(self, x):
        h = (x * 2 - 1 - self.shift) / self.scale  # to [-1, 1], then LPIPS's scaling
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:  # of unit length over channels
                taps.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return taps

    def convnext_logits(self, x):
        # 224 px as released (perceptual_loss.py); the antialias matters from 256 px
        x = F.interpolate(x, size=224, mode='bilinear', align_corners=False, antialias=True)
        return self.convnext((x - self.mean) / self.std)  # (B, 1000)

    def forward(self, x, y):
        """Targets x (no graph), reconstructions y -> dict(lpips (B,), convnext_mse)."""
        with torch.no_grad():
            fx = self.vgg_taps(x)
        lpips = 0
        for a, b, lin in zip(fx, self.vgg_taps(y), self.lins):  # 'lin' weights the channels
            d = ((a - b) ** 2 * lin.weight.view(1, -1, 1, 1)).sum(1)  # (B, H, W)
            lpips = lpips + d.mean((1, 2))  # (B,)
        parts = dict(lpips=lpips)
        if self.convnext is not None:
            with torch.no_grad():
                lx = self.convnext_logits(x)
            parts['convnext_mse'] = F.mse_loss(lx, self.convnext_logits(y))
        return parts

# -----------------------------------------------------------------------------
# the discriminator: the release's NLayerDiscriminator (MaskBit's blur-pool PatchGAN)

class BlurPool(nn.Module):
    """A [1,3,3,1] x [1,3,3,1] / 64 blur, stride 2 (the release's BlurBlock)."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1., 3., 3., 1.])
        self.register_buffer('kernel', (k[None, :] * k[:, None] / 64)[None, None])  # (1, 1, 4, 4)

    def forward(self, x):
        pad = max((math.ceil(x.shape[-1] / 2) - 1) * 2 + 4 - x.shape[-1], 0)  # TF 'same', k=4, s=2
        x = F.pad(x, [pad // 2, pad - pad // 2] * 2)
        C = x.shape[1]
        return F.conv2d(x, self.kernel.expand(C, -1, -1, -1), stride=2, groups=C)

class Discriminator(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, 1, 16, 16) logits; keys as the release's."""

    def __init__(self, width=128, stages=3):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.1)
        # the release's Conv2dSame: odd k, padding k // 2
        self.block_in = nn.Sequential(nn.Conv2d(3, width, 5, padding=2), act())
        chans = [width] + [width * 2 ** i for i in range(stages)]
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), BlurPool(), nn.GroupNorm(32, b), act())
            for a, b in zip(chans[:-1], chans[1:])])
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        C = chans[-1]
        self.to_logits = nn.Sequential(nn.Conv2d(C, C, 1), act(), nn.Conv2d(C, 1, 5, padding=2))

    def forward(self, x):
        x = self.block_in(x)
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.pool(x))

# -----------------------------------------------------------------------------
# the losses, in fp32 as released (autocast off, on float inputs)

def gan_on(step, disc_start):
    """The release's should_discriminator_be_trained; disc_start -1: never."""
    return 0 <= disc_start <= step

def generator_loss(img, recon, aux, args, perceptual, disc=None):
    """The release's ReconstructionLoss_Single_Stage, generator side -> (loss, terms). recon is
    unclamped, as released; disc's weights are detached: only the image gets its gradient."""
    with torch.autocast(img.device.type, enabled=False):
        recon = at_least_fp32(recon)
        terms = dict(recon=F.mse_loss(recon, img))
        loss = terms['recon']
        if perceptual is not None:
            terms.update(perceptual(img, recon))
            convnext = terms.get('convnext_mse', 0.0)  # the release's (a + 0.1 b) / 1.1, x 1.1
            terms['perceptual'] = terms['lpips'].mean() + args.convnext_weight * convnext
            loss = loss + args.perceptual_weight * terms['perceptual']
        if 'quantizer_loss' in aux:
            terms.update(quantizer=aux['quantizer_loss'], commitment=aux['commitment_loss'],
                         codebook=aux['codebook_loss'], usage=aux['usage'],
                         perplexity=aux['perplexity'])
            loss = loss + args.quantizer_weight * terms['quantizer']
        else:
            terms['kl'] = aux['kl_loss']
            loss = loss + args.kl_weight * terms['kl']
        if disc is not None and args.disc_weight > 0:
            params = {k: v.detach() for k, v in [*disc.named_parameters(), *disc.named_buffers()]}
            logits_fake = torch.func.functional_call(disc, params, (recon,))  # (B, 1, 16, 16)
            terms['g_adv'] = -logits_fake.mean()  # hinge; the release has no adaptive weight
            loss = loss + args.disc_weight * terms['g_adv']
    terms['loss'] = loss
    return loss, terms

def discriminator_backward(disc, pairs, lecam_ema, lecam_weight, scaler, world):
    """D's gradients for the release's hinge + LeCAM over the global batch. pairs: this process's
    (images, detached reconstructions). -> (terms, the next EMAs)"""
    n = len(pairs)
    with torch.autocast(lecam_ema.device.type, enabled=False):
        # 1. the global batch's mean logits, one all-reduce
        sums = lecam_ema.new_zeros(3)  # real logits' sum, fake ones', their count
        with torch.no_grad():
            for img, recon in pairs:
                real, fake = disc(torch.cat([img, at_least_fp32(recon)])).chunk(2)  # (B, 1, 16, 16)
                sums += torch.stack([real.sum(), fake.sum(), real.new_tensor(real.numel())])
        if world > 1:
            dist.all_reduce(sums)
        mean_real, mean_fake = sums[:2] / sums[2]
        ema_real, ema_fake = lecam_ema
        lecam = F.relu(mean_real - ema_fake) ** 2 + F.relu(ema_real - mean_fake) ** 2
        # d LeCAM / d logit is the same c / count for every real (fake) logit, so c x mean(logits)
        # per micro batch, averaged as the hinge is, has LeCAM's exact gradient
        c_real = 2 * F.relu(mean_real - ema_fake)
        c_fake = -2 * F.relu(ema_real - mean_fake)
        # 2. per micro batch: the hinge loss and that stand-in for LeCAM, backward
        hinge, logits = 0.0, []
        for i, (img, recon) in enumerate(pairs):
            if world > 1:  # all-reduce on the last micro step only
                disc.require_backward_grad_sync = i == n - 1
            real, fake = disc(torch.cat([img, at_least_fp32(recon)])).chunk(2)  # (B, 1, 16, 16)
            h = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
            lecam_part = c_real * real.mean() + c_fake * fake.mean()
            scaler.scale((h + lecam_weight * lecam_part) / n).backward()
            hinge = hinge + h.detach() / n
            logits.append((real.detach(), fake.detach()))
    real, fake = (torch.cat(x) for x in zip(*logits))  # (B_process, 1, 16, 16) each
    terms = dict(d_loss=hinge + lecam_weight * lecam, d_hinge=hinge, lecam=lecam,
                 logits_real=real, logits_fake=fake)
    ema = lecam_ema * 0.999 + torch.stack([mean_real, mean_fake]) * (1 - 0.999)
    return terms, ema

# -----------------------------------------------------------------------------
# small runs and the codebook

@torch.no_grad()
def small_run_init(tok):
    """--init small: leaves the mean-image plateau within minutes at 1M parameters."""
    # torch's default init for the encoder, as the release's decoder has: at std 0.02 the image
    # is ~5% of the latent tokens' residual stream
    for m in tok.encoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.reset_parameters()
    # MAE's 2D sin-cos table as the grids' positions: where a patch sits is readable from step 0
    for pe in (tok.encoder.positional_embedding, tok.decoder.positional_embedding):
        grid, W = math.isqrt(pe.shape[0] - 1), pe.shape[1]  # row 0: the class token's
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
        freqs = 100.0 ** (-torch.arange(W // 4) / (W // 4))  # (W/4,) 1 to ~1/100
        x = xs.flatten()[:, None] * freqs  # (P, W/4)
        y = ys.flatten()[:, None] * freqs
        pe[1:] = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).to(pe)  # (P, W)

@torch.no_grad()
def cluster_codebook(codebook, embed_prob, features, ids, apply, l2):
    """The release's clustering_vq (CVQ-VAE, https://arxiv.org/abs/2307.15139): each code moves
    toward its closest feature (n, C), rare codes all the way. apply: False on a skipped step."""
    K, decay = codebook.shape[0], 0.99
    counts = features.new_zeros(K).index_add_(0, ids, features.new_ones(len(ids)))  # no sync
    prob = embed_prob * decay + counts / counts.sum() * (1 - decay)  # each code's share
    embed_prob.copy_(torch.where(apply, prob, embed_prob))
    best_d = torch.full((K,), float('inf'), device=codebook.device)
    anchor = torch.zeros_like(codebook)
    e = F.normalize(codebook, dim=-1) if l2 else codebook
    for f in features.split(8192):  # each code's closest feature, a chunk at a time
        fn = F.normalize(f, dim=-1) if l2 else f
        d = fn.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * fn @ e.t()  # (n, K)
        d_min, i = d.min(0)
        better = d_min < best_d
        best_d = torch.where(better, d_min, best_d)
        anchor = torch.where(better[:, None], f[i], anchor)  # (K, C)
    alpha = torch.exp(-embed_prob * K * 10 / (1 - decay) - 1e-3)[:, None] * apply  # (K, 1)
    codebook.mul_(1 - alpha).add_(anchor * alpha)

def cluster_global(quantizer, embed_prob, feats, world, apply):
    """cluster_codebook on all ranks' feats in global sample order: world-size invariant."""
    parts = [torch.cat(x) for x in zip(*feats)]  # features (n, N, C), ids (n, N), indices (n,)
    if world > 1:
        for j, x in enumerate(parts):
            gathered = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(gathered, x)
            parts[j] = torch.cat(gathered)
    f, i, index = parts
    order = index.argsort()
    cluster_codebook(quantizer.embedding.weight.data, embed_prob, f[order].flatten(0, 1),
                     i[order].flatten(), apply, quantizer.use_l2_norm)

def prepare_sample(sample, index, tokenizer, context_length, noise, seed):
    """In a data worker: the caption's ids and, KL, the posterior noise of (seed, index)."""
    out = dict(ids=clip_ids(tokenizer, sample['caption'], context_length))
    if noise:
        rng = np.random.default_rng([seed, index])
        out['noise'] = rng.standard_normal(noise, dtype=np.float32)
    return out

def loss_activation_bytes(args, image_size):
    """Per sample, the bytes the fp32 losses keep for backward (D's step needs less)."""
    pixels = image_size ** 2
    saved = 12 * 3 * pixels  # the reconstruction, through the L2 loss
    if args.perceptual != 'none':
        saved += 1951 * pixels
    if args.perceptual == 'lpips-convnext':
        saved += 90.2e6  # at 224 px whatever the image size
    if args.disc_start >= 0:  # its maps shrink by 2 per stage, then pool to 16 x 16
        saved += args.disc_width * (20.9 * pixels + 22664)
    return saved

def plan_run(args, cfg, clip_params, world, memory):
    """choose_plan for the tokenizer beside the frozen nets and D with its AdamW."""
    with torch.device('meta'):
        model = TATiTok(cfg)
        disc = Discriminator(args.disc_width)
        perceptual = nn.Module()  # none
        if args.perceptual != 'none':
            perceptual = PerceptualLoss(args.perceptual, pretrained=False)
    count = lambda m: sum(p.numel() for p in m.parameters())
    frozen = 4 * (clip_params + count(perceptual)) + 16 * count(disc)
    act = model.activation_bytes()
    losses = loss_activation_bytes(args, cfg.image_size)
    act = dict(act, saved=act['saved'] + losses, checkpointed=act['checkpointed'] + losses)
    return choose_plan(model, act, frozen, args.batch_size, args.micro_batch_size, world, memory,
                       args.checkpointing, args.zero)

def build(args, resumed):
    """-> (the frozen text encoder, the tokenizer): new, or the resumed run's."""
    if resumed:
        text_encoder = TextEncoder.from_spec(resumed['text_encoder'])
        return text_encoder, TATiTok(TATiTokConfig(**resumed['model_args']))
    length = tatitok_config(args.model).text_context_length
    text_encoder = TextEncoder.from_name(args.clip, length)
    # the decoder reads the text encoder's width and length
    cfg = tatitok_config(args.model, text_embed_dim=text_encoder.width,
                         text_context_length=text_encoder.context_length)
    model = TATiTok(cfg)
    if args.init == 'small':
        small_run_init(model)
    return text_encoder, model

@torch.no_grad()
def evaluate(ema, text_encoder, loader, args, device, ctx, step):
    """-> a log line: the EMA's PSNR on held-out images (8-bit, as saved; KL: the posterior
    mean), VQ code usage; and a recon grid."""
    psnr, ids, n, grid = [], [], 0, None
    for batch in loader:
        img = batch['image'][:args.eval_images - n].to(device).float() / 255
        guidance = text_encoder(batch['caption'][:len(img)])['guidance']
        with ctx:
            recon, aux = ema(img, guidance, sample=False)
        recon = (recon.float().clamp(0, 1) * 255).round() / 255
        mse = (recon - img).pow(2).mean((1, 2, 3)).clamp_min(1e-10)
        psnr.append(-10 * torch.log10(mse))  # (B,)
        if 'ids' in aux:
            ids.append(aux['ids'].flatten())
        if grid is None:  # held-out images above their reconstructions
            pair = (torch.cat([img[:8], recon[:8]]) * 255).round().byte()
            grid = make_grid(pair.permute(0, 2, 3, 1).cpu().numpy(), ncol=len(img[:8]))
        n += len(img)
        if n >= args.eval_images:
            break
    if n == 0:
        raise UserError(f"--eval_data {args.eval_data}: no usable image in it ({loader.counts}); "
                        f"--eval_data none trains without evaluations")
    path = os.path.join(args.out_dir, f"recon_{step:07d}.png")
    save_png(grid, path)
    msg = f"eval step {step} | psnr {torch.cat(psnr).mean().item():.2f} dB on {n} held-out images"
    msg += f" | grid {path}"
    if ids:
        counts = torch.bincount(torch.cat(ids), minlength=ema.config.codebook_size).float()
        perplexity, usage = code_stats(counts)
        msg += f" | codebook usage {usage.item():.1%} perplexity {perplexity.item():.1f}"
    return msg

# -----------------------------------------------------------------------------
# recipes: a flag left unset takes its recipe's value. official: the release's
# configs/training/TA-TiTok/*.yaml (its global batch unstated: 32 per GPU x 8 assumed);
# shapes: the CPU quickstart, the encoder at a third of the lr lest the high lr collapse
# the codebook (TUNING.md); tiny: the tests

NAMES = ('official', 'shapes', 'shapes-kl', 'tiny')
TABLE = dict(  #   official          shapes    shapes-kl  tiny
    batch_size=      (256,             32,       32,        8),
    micro_batch_size=(32,              None,     None,      None),
    max_steps=       (650_000,         2700,     2400,      10),
    lr=              (1e-4,            8.5e-3,   4.2e-3,    1e-3),
    encoder_lr_scale=(1.0,             1 / 3,    1 / 3,     1.0),
    end_lr=          (1e-5,            8.5e-4,   4.2e-4,    1e-4),
    warmup_steps=    (10_000,          500,      500,       2),
    weight_decay=    (1e-4,            1e-4,     1e-4,      1e-4),
    beta2=           (0.999,           0.99,     0.99,      0.999),
    disc_start=      (200_000,         -1,       -1,        4),
    disc_lr=         (1e-4,            1e-4,     1e-4,      1e-4),
    disc_width=      (128,             32,       32,        32),
    perceptual=      ('lpips-convnext', 'none',  'none',    'none'),
    clip=            ('ViT-L-14-336:openai', 'tiny', 'tiny', 'tiny'),
    data=            (None,            'shapes', 'shapes',  'shapes'),
    eval_data=       ('none',          'shapes:val', 'shapes:val', 'shapes:val'),
    eval_images=     (1000,            256,      256,       16),
    log_every=       (100,             100,      100,       1),
    eval_every=      (10_000,          675,      600,       1000),
    ckpt_every=      (5_000,           1350,     1200,      5),
    num_workers=     (8,               0,        0,         0),
    init=            ('release',       'small',  'small',   'release'),
)
RECIPES = {name: {k: v[i] for k, v in TABLE.items()} for i, name in enumerate(NAMES)}
MODEL_FLAGS = ('preset', 'tokens', 'clip')  # what a resumed run must keep

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train TA-TiTok.")
    pos, pos_int = number(float, 0), number(int, 1)
    g = add_training_flags(p, 'images')
    m = g['model']
    m.add_argument('--clip',
                   help="text encoder: tiny (random, no download), MODEL:PRETRAINED of "
                        "open_clip (the release's: ViT-L-14-336:openai), or a weights file")
    m.add_argument('--init', choices=['release', 'small'],
                   help="the release's init, or small_run_init's for small fast runs")
    d = g['data']
    d.add_argument('--data',
                   help="training images: tar shards ('d/{00000..00099}.tar'), a glob, a "
                        "folder of images with .txt captions, or shapes")
    d.add_argument('--eval_data', help="held-out images (the same forms, or shapes:val), or none")
    o = g['optimization']
    o.add_argument('--encoder_lr_scale', type=number(float, 1e-9),
                   help="the encoder's and latent tokens' lr over the rest's (release: 1)")
    out = g['output']
    out.add_argument('--eval_every', type=pos_int, help="steps between evaluations (EMA)")
    out.add_argument('--eval_images', type=pos_int, help="held-out images per evaluation")
    l = p.add_argument_group('losses')
    l.add_argument('--perceptual', choices=['lpips-convnext', 'lpips', 'none'],
                   help="LPIPS (VGG16) + ConvNeXt-S logit MSE (the release's), or less")
    l.add_argument('--perceptual_weight', type=pos, default=1.0, help="(default 1)")
    l.add_argument('--convnext_weight', type=pos, default=0.1,
                   help="of the perceptual loss's ConvNeXt-S term (default 0.1)")
    l.add_argument('--quantizer_weight', type=pos, default=1.0,
                   help="VQ: of commitment + codebook loss (default 1)")
    l.add_argument('--cluster_vq', choices=['on', 'off'], default='on',
                   help="VQ: the release's clustering_vq of rare codes (default on)")
    l.add_argument('--kl_weight', type=pos, default=1e-6, help="KL: (default 1e-6)")
    l.add_argument('--disc_start', type=number(int, -1),
                   help="the step D, the adversarial loss and LeCAM start at; -1: never")
    l.add_argument('--disc_weight', type=pos, default=0.1,
                   help="of the adversarial loss (default 0.1)")
    l.add_argument('--disc_lr', type=pos,
                   help="the discriminator's peak lr (warm-up and clipping as the tokenizer's)")
    l.add_argument('--disc_width', type=number(int, 32),
                   help="discriminator base channels (the release's: 128)")
    l.add_argument('--lecam_weight', type=pos, default=0.001,
                   help="LeCAM's, EMA decay 0.999 (default 0.001)")
    add_system_flags(p, 'tokenizer', 'the KL noise')
    args = p.parse_args(argv)
    check_tokens(p, args)
    recipe, args.model = 'official', args.tokens
    if args.preset:
        recipe, args.model = args.preset, f"{args.preset}-{args.tokens}"
        kl = '-kl' if args.tokens == 'kl' else ''
        args.out_dir = args.out_dir or f"out/{args.preset}-tokenizer{kl}"
    args.out_dir = args.out_dir or f"out/tatitok-{args.tokens}"
    take_recipe(p, args, RECIPES.get(f"{recipe}-{args.tokens}", RECIPES[recipe]))  # shapes-kl
    if args.data is None:
        p.error("--data is required with an official recipe")
    return args

# -----------------------------------------------------------------------------

def main(args, state):
    rank, world, device, dtype, ctx = start_run(args)
    master = rank == 0
    expand_source(args.data)  # a missing or empty source stops here
    if args.eval_data != 'none':
        expand_source(args.eval_data)
    ckpt, changed, resumed = open_run(args, 'train_tokenizer', MODEL_FLAGS, world)

    torch.manual_seed(args.seed)  # the same init on every rank
    text_encoder, raw_model = build(args, resumed)
    cfg = raw_model.config
    vq = cfg.quantize == 'vq'
    memory = gpu_memory(device)
    choice = plan_run(args, cfg, sum(p.numel() for p in text_encoder.parameters()), world, memory)
    mb, grad_accum = choice['micro_batch'], choice['grad_accum']
    raw_model.encoder.checkpointing = raw_model.decoder.checkpointing = choice['checkpointing']
    text_encoder.to(device)
    raw_model.to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    disc_raw = Discriminator(args.disc_width).to(device)
    perceptual = None if args.perceptual == 'none' else PerceptualLoss(args.perceptual).to(device)

    # data: sample g is the same image and KL noise on any number of processes; recap_prob=0:
    # the release's tokenizer reads the captions as they are
    noise = None if vq else (cfg.num_latent_tokens, cfg.token_size)
    prepare = functools.partial(prepare_sample, tokenizer=text_encoder.tokenizer,
                                context_length=text_encoder.context_length, noise=noise,
                                seed=args.seed)
    train_loader = make_loader(args.data, mb, cfg.image_size, seed=args.seed, rank=rank,
                               world_size=world, num_workers=args.num_workers, flip=True,
                               recap_prob=0, prepare=prepare)
    eval_loader = None
    if args.eval_data != 'none' and master:
        eval_loader = make_loader(args.eval_data, mb, cfg.image_size, train=False, seed=args.seed,
                                  recap_prob=0)

    betas = (args.beta1, args.beta2)
    opt = raw_model.configure_optimizers(args.weight_decay, args.lr, betas, device.type,
                                         args.encoder_lr_scale)
    opt_d = torch.optim.AdamW(param_groups(disc_raw.named_parameters(), args.weight_decay),
                              lr=args.disc_lr, betas=betas, fused=True)
    if choice['zero']:
        opt, opt_d = shard_optimizer(opt), shard_optimizer(opt_d)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    scaler_d = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    lecam_ema = torch.zeros(2, device=device)  # EMAs of the mean real and fake logits
    embed_prob = torch.zeros(cfg.codebook_size if vq else 0, device=device)  # EMA of code usage
    parts = dict(model=raw_model, ema=ema, disc=disc_raw, optimizer=opt, disc_optimizer=opt_d,
                 scaler=scaler, disc_scaler=scaler_d, lecam_ema=lecam_ema, embed_prob=embed_prob)
    start_step, nonfinite = restore(parts, ckpt, resumed, world, device)
    ckpt = None  # free the memory
    if resumed:
        train_loader.load_state_dict(resumed['data'])
    model = wrap(raw_model, device, world, args.compile)
    disc = wrap(disc_raw, device, world)
    if master:
        config = dict(vars(args), model_args=asdict(cfg), world_size=world, grad_accum=grad_accum,
                      device_used=str(device), params=raw_model.get_num_params())
        print_start(config, choice, train_loader, memory, changed, start_step)

    batches = iter(train_loader)
    flops = 3 * raw_model.estimate_flops() * args.batch_size  # per step, the tokenizer's
    # what the log reads stays on the device until --log_every
    smooth, bad_run = {}, torch.zeros((), dtype=torch.long, device=device)
    clock = [time.time(), start_step]
    step, saved = start_step, resumed and start_step
    state['interrupted'] = lambda: interrupted_at(step, saved, args.out_dir)
    for step in range(start_step, args.max_steps + 1):
        last = step == args.max_steps
        # once in a while: held-out PSNR and a recon grid (rank 0, EMA)
        if eval_loader is not None and (last or step % args.eval_every == 0):
            print(evaluate(ema, text_encoder, eval_loader, args, device, ctx, step), flush=True)
        # once in a while: a checkpoint (not at the start step: nothing new)
        if step > start_step and (last or step % args.ckpt_every == 0):
            data_state = merge_states(all_gather_objects(train_loader.state_dict(), world))
            save_run(args, step, world, parts, script='train_tokenizer', model_args=asdict(cfg),
                     text_encoder=text_encoder.spec, nonfinite=nonfinite.item(), data=data_state)
            saved = step
        if last:
            break

        # one step over the global batch in micro batches; nothing here waits on the GPU
        lr = get_lr(step, args.lr, args.warmup_steps, args.max_steps, args.end_lr)
        for group in opt.param_groups:
            group['lr'] = lr * group['lr_scale']
        gan = gan_on(step, args.disc_start)
        if gan:  # D's schedule starts at disc_start, as the release's on 1 GPU (README)
            lr_d = get_lr(step - args.disc_start, args.disc_lr, args.warmup_steps,
                          args.max_steps - args.disc_start, args.end_lr * args.disc_lr / args.lr)
            for group in opt_d.param_groups:
                group['lr'] = lr_d
        terms, feats, pairs = {}, [], []
        for micro in range(grad_accum):
            batch = to_device(next(batches), device)
            img = batch['image'].float() / 255  # (B, 3, H, W), uint8 until here
            if world > 1:  # all-reduce on the last micro step only (nanoGPT's flag)
                model.require_backward_grad_sync = micro == grad_accum - 1
            guidance = text_encoder(batch['ids'])['guidance']  # (B, 77, W), fp32
            with ctx:
                recon, aux = model(img, guidance, noise=batch.get('noise'))
            loss, t = generator_loss(img, recon, aux, args, perceptual, disc_raw if gan else None)
            scaler.scale(loss / grad_accum).backward()
            if vq:
                feats.append((aux['features'], aux['ids'], batch['index']))
            if gan:  # D needs the global batch's mean logits first
                pairs.append((img, recon.detach()))
            for k, v in t.items():
                terms[k] = terms.get(k, 0.0) + v.detach().float().mean() / grad_accum
        if gan:  # D on the same images and reconstructions, as released
            t, lecam_next = discriminator_backward(disc, pairs, lecam_ema, args.lecam_weight,
                                                   scaler_d, world)
            terms.update({k: v.float().mean() for k, v in t.items()})
        gnorm, finite = optimizer_step(opt, scaler, raw_model.parameters(), args.grad_clip)
        if gan:  # a non-finite D skips the EMA, clustering and LeCAM updates too
            _, d_finite = optimizer_step(opt_d, scaler_d, disc_raw.parameters(), args.grad_clip)
            finite = finite & d_finite
            lecam_ema.copy_(torch.where(finite, lecam_next, lecam_ema))
        # the release moves the codes in forward, after the loss: the same as here
        if vq and args.cluster_vq == 'on':
            cluster_global(raw_model.quantize, embed_prob, feats, world, finite)
        update_ema(ema, raw_model, step, args.ema_decay, finite)
        opt.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        bad = (~finite).long()
        nonfinite += bad
        bad_run = (bad_run + 1) * bad
        for k, v in terms.items():  # an EMA of each term, debiased when read
            smooth[k] = 0.9 * smooth.get(k, 0.0) + 0.1 * v

        # logging: the one place the host waits on the GPU
        if step % args.log_every == 0 or step == args.max_steps - 1:
            keys = sorted(terms)  # every term, averaged over micro steps and ranks
            vals = torch.stack([terms[k] for k in keys])
            if world > 1:
                dist.all_reduce(vals)
                vals /= world
            if master:
                debias = 1 - 0.9 ** (step + 1 - start_step)
                head = ' | '.join(f"{k} {v.item() / debias:.4g}" for k, v in smooth.items())
                c = train_loader.counts  # this rank's
                tail = (f"read {c['read']} skipped {c['filtered'] + c['corrupt']} | "
                        f"nonfinite {nonfinite.item()}")
                row = dict(step=step, lr=lr, gnorm=gnorm.item(), **dict(zip(keys, vals.tolist())))
                log_step(args, row, head, tail, clock, flops, device, world)
            stop_if_nonfinite(bad_run.item(), args.max_nonfinite, args.out_dir, master)

if __name__ == '__main__':
    run_main(main, get_args(), UserError)
