"""
MaskGen: text-to-image generation over TA-TiTok's 1D tokens, all of it in this single file.

One backbone, an MM-DiT that reads the caption's CLIP features as a second stream, and two heads:
MaskGenVQ predicts code ids and samples them with MaskGIT; MaskGenKL conditions a small diffusion
MLP per continuous token (MAR's diffusion loss) and samples MAR-style, in a random order per image.
forward() is the training loss train_maskgen.py optimises; generate() samples:

    gen = MaskGen.from_pretrained('vq-xl')
    ids = gen.generate(encode_prompts(clip, captions), seed=0)  # (B, 128) code ids

References:
1) the paper: https://arxiv.org/abs/2501.07730
2) the official code: https://github.com/bytedance/1d-tokenizer (modeling/maskgen.py,
   modeling/modules/blocks.py, modeling/modules/losses.py, modeling/diffusion/)
3) MM-DiT (SD3): https://arxiv.org/abs/2403.03206, as diffusers' JointTransformerBlock
4) MaskGIT: https://arxiv.org/abs/2202.04200, and MUSE-Pytorch (baaivision), the VQ sampler's model
5) MAR and its diffusion loss: https://arxiv.org/abs/2406.11838, https://github.com/LTH14/mar
6) IDDPM (cosine schedule, learned variance, hybrid loss, respacing): https://arxiv.org/abs/2102.09672
7) DiT (adaLN, TimestepEmbedder): https://github.com/facebookresearch/DiT
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from tatitok import (UserError, preset_config, read_weights, load_official, checkpoint_weights,
                     param_groups)

# -----------------------------------------------------------------------------
# the MM-DiT block (diffusers' JointTransformerBlock; module names = the official keys)

def modulate(x, shift, scale):
    return x * (1 + scale) + shift

def sinusoid(x, dim=256, max_period=10000, cos_first=False):
    # the diffusers / DiT sinusoid in fp32: [sin | cos] (or [cos | sin]), max_period^(-i / half)
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=x.device)
    freqs = torch.exp(-math.log(max_period) * i / half)  # (dim/2,)
    args = x[:, None].float() * freqs[None]  # (B, dim/2)
    if cos_first:
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim)

def aes_embedding_vq(aes, dim=256):
    # the official MaskGen_VQ.get_sinusoidal_encoding of 100 * score
    return sinusoid(aes * 100, dim, max_period=1000)

def aes_embedding_kl(aes, dim=256):
    # the official MaskGen_KL.get_sinusoidal_encoding of 100 * score: sin and cos *interleaved*
    i = torch.arange(0, dim, 2, dtype=torch.float32, device=aes.device)
    freqs = torch.pow(10000, -i / dim)  # (dim/2,)
    args = (aes * 100)[:, None] * freqs  # (B, dim/2), in the score's precision, as released
    emb = torch.stack([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim/2, 2)
    return emb.flatten(1).float()  # (B, dim): sin, cos, sin, ...

class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by c; one linear also gives the gates and the MLP's modulation."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, c):
        mod = self.linear(F.silu(c)).unsqueeze(1)  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = modulate(self.norm(x), shift_msa, scale_msa)
        return h, gate_msa, shift_mlp, scale_mlp, gate_mlp

class AdaLayerNormContinuous(nn.Module):
    """LayerNorm modulated by c, no gate: the final norm, and the last block's text norm."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, c):
        mod = self.linear(F.silu(c)).unsqueeze(1)  # (B, 1, 2D)
        scale, shift = mod.chunk(2, dim=-1)  # in this order
        return modulate(self.norm(x), shift, scale)

class FeedForward(nn.Module):
    """diffusers' FeedForward: keys net.0.proj and net.2 (net.1 was a dropout with p = 0)."""

    def __init__(self, dim):
        super().__init__()
        proj = nn.ModuleDict(dict(proj=nn.Linear(dim, 4 * dim)))
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        h = F.gelu(self.net[0].proj(x), approximate='tanh')  # diffusers' "gelu-approximate"
        return self.net[2](h)

class JointAttention(nn.Module):
    """One attention over [image tokens, text tokens], with q/k/v/out weights per stream. No
    QK-norm, no RoPE, no mask (the text padding is attended too), as released."""

    def __init__(self, dim, heads, last):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.add_q_proj = nn.Linear(dim, dim)
        self.add_k_proj = nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # key 'to_out.0'
        # the last block has no text output (its text query is computed and unused, as released)
        self.to_add_out = None if last else nn.Linear(dim, dim)

    def forward(self, x, ctx):
        B, L, D = x.shape
        q = torch.cat([self.to_q(x), self.add_q_proj(ctx)], dim=1)  # (B, L+77, D): image, text
        k = torch.cat([self.to_k(x), self.add_k_proj(ctx)], dim=1)
        v = torch.cat([self.to_v(x), self.add_v_proj(ctx)], dim=1)
        hs = D // self.heads
        q, k, v = (t.view(B, -1, self.heads, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L+77, hs)
        y = y.transpose(1, 2).reshape(B, -1, D)  # (B, L+77, D)
        x = self.to_out[0](y[:, :L])
        if self.to_add_out is None:
            return x, None
        return x, self.to_add_out(y[:, L:])

class JointBlock(nn.Module):
    """An MM-DiT block: image stream x (B, L, D) and text stream ctx (B, 77, D), each with its own
    adaLN-Zero and MLP, both modulated by the pooled condition c (B, D). The last block updates
    the image stream only."""

    def __init__(self, dim, heads, last=False):
        super().__init__()
        self.last = last
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim) if last else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, last)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        if not last:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim)

    def forward(self, x, ctx, c):
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, c)
        if self.last:
            attn, _ = self.attn(h, self.norm1_context(ctx, c))
        else:
            h_ctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(ctx, c)
            attn, attn_ctx = self.attn(h, h_ctx)
        x = x + gate_msa * attn  # (B, L, D)
        x = x + gate_mlp * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.last:
            return x, None
        ctx = ctx + c_gate_msa * attn_ctx  # (B, 77, D)
        h_ctx = modulate(self.norm2_context(ctx), c_shift_mlp, c_scale_mlp)
        return x, ctx + c_gate_mlp * self.ff_context(h_ctx)

# -----------------------------------------------------------------------------
# MaskGen-KL's diffusion loss: a small MLP denoiser per token (MAR) and a hand-written IDDPM

class ResBlock(nn.Module):

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(y).chunk(3, dim=-1)  # (M, W) each
        return x + gate_mlp * self.mlp(modulate(self.in_ln(x), shift_mlp, scale_mlp))

class FinalLayer(nn.Module):

    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)  # (shift, scale) order here
        return self.linear(modulate(self.norm_final(x), shift, scale))

class SimpleMLPAdaLN(nn.Module):
    """The denoiser: noisy tokens x_t (M, C), timesteps t (M,), conditions z (M, D) -> (M, 2C),
    eps and a variance value per channel."""

    def __init__(self, in_channels, width, z_channels, depth):
        super().__init__()
        time_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.time_embed = nn.ModuleDict(dict(mlp=time_mlp))  # DiT's TimestepEmbedder
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * in_channels)  # 2x: the learned variance

    def forward(self, x, t, z):
        t_freq = sinusoid(t, cos_first=True).to(x.dtype)  # (M, 256) of the original timestep
        y = self.time_embed.mlp(t_freq) + self.cond_embed(z)  # (M, W)
        x = self.input_proj(x)  # (M, W)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)  # (M, 2C)

def cosine_betas(num_steps, s=0.008, max_beta=0.999):
    # IDDPM eq. 17, in float64 like the original
    alpha_bar = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = [1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps)
             for i in range(num_steps)]
    return np.minimum(betas, max_beta)

def space_timesteps(num_steps, count):
    # IDDPM's respace.py, one section: `count` timesteps evenly strided over [0, num_steps - 1]
    stride = (num_steps - 1) / (count - 1) if count > 1 else 1
    idx, steps = 0.0, []
    for _ in range(count):
        steps.append(round(idx))
        idx += stride  # accumulated, not i * stride: the float rounding must match the release
    return sorted(set(steps))

def normal_kl(mean1, logvar1, mean2, logvar2):
    sq = (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + sq)

def discretized_gaussian_loglik(x, mean, log_scale):
    # IDDPM's decoder likelihood of 8-bit data in [-1, 1]; the release applies it to latents too
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1 / 255))
    cdf_min = cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    inner = torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    return torch.where(x < -0.999, log_cdf_plus, inner)

# the schedule tables a training step looks up per row, kept on the model's device
TABLES = ('sqrt_ac', 'sqrt_one_minus_ac', 'sqrt_recip_ac', 'sqrt_recipm1_ac', 'posterior_logvar',
          'posterior_coef1', 'posterior_coef2', 'log_betas')

class GaussianDiffusion(nn.Module):
    """IDDPM with the 1000-step cosine schedule, eps prediction and learned-range variance,
    respaced to `sample_steps` for sampling (the net still sees the original timesteps).
    Schedules in float64 (numpy, the sampler's scalars), used in fp32 (a buffer, for training's
    per-row lookups on the device)."""

    def __init__(self, num_steps=1000, sample_steps=None):
        super().__init__()
        self.timestep_map = np.array(space_timesteps(num_steps, sample_steps or num_steps))
        ac = np.cumprod(1.0 - cosine_betas(num_steps))[self.timestep_map]
        b = 1.0 - ac / np.append(1.0, ac[:-1])  # respacing keeps alpha_bar at the kept steps
        self.betas = b
        ac = np.cumprod(1.0 - b)  # recomputed from the betas, as the release does
        ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_ac = np.sqrt(ac)
        self.sqrt_one_minus_ac = np.sqrt(1.0 - ac)
        self.sqrt_recip_ac = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / ac - 1)
        posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
        # 0 at t = 0, so its log is clipped to the value at t = 1
        self.posterior_logvar = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)
        self.log_betas = np.log(b)
        # from_numpy: a CPU tensor even where the model is built on the meta device
        table = np.stack([getattr(self, n) for n in TABLES]).astype(np.float32)
        self.register_buffer('table', torch.from_numpy(table), persistent=False)  # (8, steps)

    def _at(self, name, t):
        # a value per row for a tensor of timesteps (training: the device buffer, no copy), a
        # float64 scalar for an int (sampling: numpy, no device sync)
        if isinstance(t, int):
            return float(getattr(self, name)[t])
        return self.table[TABLES.index(name)][t].unsqueeze(-1)  # (M, 1)

    def p_mean_logvar(self, x_t, t, eps, v, x0_clip=None):
        # the mean of p(x_{t-1} | x_t) through the predicted x_0; the log-variance between the
        # posterior's and beta_t's
        frac = (v + 1) / 2  # v in [-1, 1]
        logvar = frac * self._at('log_betas', t) + (1 - frac) * self._at('posterior_logvar', t)
        x0 = self._at('sqrt_recip_ac', t) * x_t - self._at('sqrt_recipm1_ac', t) * eps
        if x0_clip is not None:  # IDDPM's clip_denoised, our bound; off as released (MAR too)
            x0 = x0.clamp(-x0_clip, x0_clip)
        return self._at('posterior_coef1', t) * x0 + self._at('posterior_coef2', t) * x_t, logvar

    def training_losses(self, net, x0, z, t, noise):
        """IDDPM's hybrid loss per token, at timesteps t (M,) with noise (M, C): the MSE of eps
        plus the variational bound in bits, which trains the variance only (eps detached) -> (M,)."""
        x_t = self._at('sqrt_ac', t) * x0 + self._at('sqrt_one_minus_ac', t) * noise  # (M, C)
        eps, v = net(x_t, t, z).float().chunk(2, dim=1)  # (M, C) each, fp32 from here on
        mean, logvar = self.p_mean_logvar(x_t, t, eps.detach(), v)
        true_mean = self._at('posterior_coef1', t) * x0 + self._at('posterior_coef2', t) * x_t
        kl = normal_kl(true_mean, self._at('posterior_logvar', t), mean, logvar).mean(1)
        nll = -discretized_gaussian_loglik(x0, mean, 0.5 * logvar).mean(1)  # the bound at t = 0
        bound = torch.where(t == 0, nll, kl) / math.log(2.0)
        return (noise - eps).pow(2).mean(1) + bound

    @torch.no_grad()
    def sample(self, net, z, z_null=None, guidance=1.0, temperature=1.0, generator=None,
               x0_clip=None):
        """Ancestral sampling of M tokens conditioned on z (M, D). With z_null, guidance acts on
        eps only, the variance comes from the conditional half (official forward_with_cfg).
        Temperature scales the noise (MAR). x0_clip bounds each step's predicted x_0: at t = 999
        it is eps's error times 1 / sqrt(alpha_bar) = 2e4, and a young head's samples blow up.
        generator: one, or one per image of the image-major rows (see draw)."""
        M, C = z.shape[0], net.input_proj.in_features
        x = draw(torch.randn, (M, C), generator, z.device)  # (M, C), shared by both halves
        for i in reversed(range(len(self.betas))):
            t = torch.full((M,), int(self.timestep_map[i]), device=z.device)  # original index
            if z_null is None:
                eps, v = net(x, t, z).float().chunk(2, dim=1)  # (M, C) each
            else:  # both halves in one batch
                out = net(x.repeat(2, 1), t.repeat(2), torch.cat([z, z_null])).float()  # (2M, 2C)
                eps, v = out[:M].chunk(2, dim=1)
                eps_null = out[M:, :C]
                eps = eps_null + guidance * (eps - eps_null)
            mean, logvar = self.p_mean_logvar(x, i, eps, v, x0_clip)
            if i == 0:
                return mean  # (M, C)
            noise = draw(torch.randn, x.shape, generator, x.device)
            x = mean + torch.exp(0.5 * logvar) * temperature * noise

# -----------------------------------------------------------------------------
# the config, and the random draws of a training step

@dataclass
class MaskGenConfig:
    quantize: str = 'vq'            # 'vq' (MaskGenVQ, code ids) or 'kl' (MaskGenKL, continuous)
    num_tokens: int = 128           # N, the tokenizer's: 128 (VQ releases), 32 (KL releases)
    codebook_size: int = 8192       # VQ: the tokenizer's codebook; id codebook_size is the mask
    token_size: int = 16            # KL: channels per token
    width: int = 1024               # D of the MM-DiT
    depth: int = 16
    heads: int = 16
    text_embed_dim: int = 768       # CLIP's text width, of the token and the pooled features
    aes_embed_dim: int = 256        # the aesthetic-score sinusoid ("micro condition")
    condition_num_classes: int = 1000  # VQ: unused ImageNet rows of the table, as released
    diffloss_width: int = 1024      # KL: the denoiser MLP
    diffloss_depth: int = 8
    scale_factor: float = 0.7525    # KL: latents are multiplied by it (no shift)
    diffusion_batch_mul: int = 4    # KL: each token's condition is trained on 4 noise draws
    mask_block: int = 32            # KL: one masking ratio per this many samples (a GPU batch)
    text_drop_prob: float = 0.1     # caption -> "" encoding, for classifier-free guidance
    label_smoothing: float = 0.1    # VQ loss
    unmasked_weight: float = 0.1    # VQ loss weight of the visible tokens (masked ones: 1)

def training_draws(cfg, seed, g):
    """Every random draw of global sample g's training step, from its own generator (seed, g),
    so that any number of processes, workers and micro batches draws the same (official
    preprocess_condition, masking and DiffLoss) -> numpy arrays:
    drop       the caption becomes the "" encoding (probability text_drop_prob)
    mask       (N,) True = masked: the arccos schedule of a uniform time, at random positions
    t, noise   KL: (k, N) and (k, N, C), the k = diffusion_batch_mul draws per token
    posterior  KL: (N, C), the noise of the tokenizer's posterior sample"""
    N, C = cfg.num_tokens, cfg.token_size
    rng = np.random.default_rng([seed, g])
    drop = rng.random() < cfg.text_drop_prob
    if cfg.quantize == 'vq':
        u = rng.random()
    else:  # one time per block of samples, as the release draws one per GPU batch
        u = np.random.default_rng([seed, g // cfg.mask_block, 1]).random()
    ratio = min(max(math.acos(u) / (math.pi / 2), 1e-6), 1.0)
    if cfg.quantize == 'vq':
        n_masked = max(1, round(N * ratio))
    else:
        n_masked = math.ceil(N * ratio)
    mask = rng.random(N).argsort() < n_masked  # (N,) n_masked positions at random
    out = dict(drop=drop, mask=mask)
    if cfg.quantize == 'kl':
        k = cfg.diffusion_batch_mul
        out['t'] = rng.integers(0, 1000, (k, N))
        out['noise'] = rng.standard_normal((k, N, C), dtype=np.float32)
        out['posterior'] = rng.standard_normal((N, C), dtype=np.float32)
    return out

# -----------------------------------------------------------------------------
# the model: what the two generators share, then MaskGen-VQ and MaskGen-KL with their losses

class MaskGen(nn.Module):
    """Base of MaskGenVQ and MaskGenKL, whose modules carry the official key names, which differ
    between the two releases (blocks vs decoder_blocks, text_embed_proj vs text_emb, ...)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.checkpointing = False  # recompute each block in the backward pass: memory for compute

    @staticmethod
    def from_config(config):
        if config.quantize == 'vq':
            return MaskGenVQ(config)
        return MaskGenKL(config)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied VQ lm_head counts once

    def blocks_forward(self, blocks, x, ctx, c):
        # with checkpointing, one block's activations are kept instead of all, for a third more
        # compute
        for block in blocks:
            if self.checkpointing:
                x, ctx = checkpoint(block, x, ctx, c, use_reentrant=False)
            else:
                x, ctx = block(x, ctx, c)
        return x

    def text_condition(self, text_tokens, text_pooled, aes):
        """The prompts' conditioning -> the text stream ctx (B, 77, D) and the pooled condition c
        (B, D): CLIP's pooled features and the aesthetic score's sinusoid, concatenated, projected."""
        aes = torch.as_tensor(aes, device=text_tokens.device).expand(text_tokens.shape[0])  # (B,)
        text_proj, pooled_proj, aes_embedding = self.text_condition_layers()
        aes_emb = aes_embedding(aes, self.config.aes_embed_dim).to(text_pooled.dtype)  # (B, 256)
        pooled = torch.cat([text_pooled, aes_emb], dim=-1)  # (B, T + 256)
        return text_proj(text_tokens), pooled_proj(pooled)

    def draw_batch(self, seed, indices):
        """training_draws of these global samples, stacked into tensors (B, ...)."""
        draws = [training_draws(self.config, seed, g) for g in indices]
        return {k: torch.as_tensor(np.stack([d[k] for d in draws])) for k in draws[0]}

    def drop_captions(self, text_tokens, text_pooled, null_tokens, null_pooled, drop):
        # caption dropout for classifier-free guidance: both text streams become the "" encoding
        text_tokens = torch.where(drop[:, None, None], null_tokens, text_tokens)  # (B, 77, T)
        text_pooled = torch.where(drop[:, None], null_pooled, text_pooled)  # (B, T)
        return text_tokens, text_pooled

    @torch.no_grad()
    def generate(self, prompts, sampling=None, seed=None, start=None, callback=None,
                 progress=False):
        """Tokens for the prompts, for TATiTok.decode_tokens: VQ code ids (B, N) drawn by maskgit(),
        KL latents (B, N, C) by mar().
        prompts   encode_prompts' dict; the null entries may be absent with guidance_scale 1
        sampling  a Sampling; None: the release's
        seed      an int, None (torch's global RNG), a torch.Generator, or a list of one per image
                  (image_generators: each image then independent of the batch it is drawn in)
        start     (tokens, keep): keep (B, N) is True where the tokens are given; those stay, the
                  others are drawn, the schedule continuing from the ratio they leave
        callback  after each step: VQ callback(step, ids), KL callback(step, tokens, mask)"""
        B, device = prompts['text_tokens'].shape[0], prompts['text_tokens'].device
        generator = seed
        if isinstance(seed, int):
            generator = torch.Generator(device).manual_seed(seed)
        if isinstance(seed, (list, tuple)) and len(seed) != B:
            raise ValueError(f"{len(seed)} generators for {B} prompts: pass one per image")
        s = sampling or Sampling.release(self.config.quantize)
        if self.config.quantize == 'vq':
            return maskgit(self, prompts, s, generator, start, callback, progress)
        return mar(self, prompts, s, generator, start, callback, progress)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, **overrides):
        """A preset ('vq-l', 'vq-xl', 'kl-l', 'kl-xl'), a release's Hugging Face repo id, a local
        .bin / .safetensors file in the official layout, or a checkpoint (or its folder) of
        train_maskgen.py -> the model in eval mode, its weights in `dtype` (load_maskgen)."""
        return load_maskgen(name_or_path, dtype, **overrides)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type='cpu'):
        # the release's no-decay rules; KL's text_emb is "emb", not "embed": it decays, as released
        groups = param_groups(self.named_parameters(), weight_decay)
        # fused: the update stays on the device (runtime.py)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)

    def activation_bytes(self, text_len=77):
        """A training step's bytes under 16-bit autocast, for runtime.memory_plan, counted from the
        architecture (the tests check them against what autograd saves): `saved` per sample for
        the backward pass; `checkpointed`, the same with block checkpointing; `casts`, the 16-bit
        weight copies; `transient` per sample, the backward's largest temporary."""
        cfg = self.config
        D, L, T, K = cfg.width, cfg.num_tokens, text_len, cfg.codebook_size
        lse = 4 * cfg.heads * (L + T)  # the attention's log-sum-exp, fp32
        # per token and width unit, the image stream (fp32) keeps 54 bytes: LayerNorm inputs and
        # outputs (4 + 4, twice), 16-bit matmul inputs (2 each: q, k, v, out, mlp), the MLP's
        # hidden state and GELU's input (8 + 8), the attention's q, k, v, output (8); the text
        # stream, 16-bit from its projection on, 42.5 (the last block's, 14)
        block = (54 * L + 42.5 * T) * D + lse
        last = (54 * L + 14 * T) * D + lse
        head = 10 * L * D + 4 * L * K + 8 * L  # final norm, lm_head input, fp32 log-softmax, ids
        transient = 8 * L * K  # the logits' gradient
        if cfg.quantize == 'kl':  # the denoiser runs on k rows per token
            W = cfg.diffloss_width
            row = (22 * cfg.diffloss_depth + 16) * W + 11 * D + 33 * cfg.token_size
            head = cfg.diffusion_batch_mul * L * row + 12 * L * D
            transient = 0
        cond = 2 * T * cfg.text_embed_dim
        saved = (cfg.depth - 1) * block + last + head + cond
        inputs = cfg.depth * (4 * L + 2 * T) * D  # fp32 image stream, 16-bit text stream
        # with checkpointing: each block's inputs, and one block's tensors while it is recomputed
        checkpointed = inputs + block + head + cond
        return dict(saved=saved, checkpointed=checkpointed, casts=2 * self.get_num_params(),
                    transient=transient)

    def estimate_flops(self, text_len=77):
        """FLOPs per image (2 per multiply-add), checked against torch's FlopCounterMode in the
        tests: `conditioning`, the text and pooled projections; `backbone`, one MM-DiT pass over N
        image and text_len text tokens with its head; `denoiser`, the KL MLP on one token;
        `train`, a training step (3x forward), whose KL denoiser runs k times on every token."""
        cfg = self.config
        D, L, N, T = cfg.width, cfg.depth, cfg.num_tokens, text_len
        cond = cfg.text_embed_dim * D * T + (cfg.text_embed_dim + cfg.aes_embed_dim) * D
        # the last block's text stream: q, k, v only
        macs = L * 12 * D * D * N + ((L - 1) * 12 + 3) * D * D * T
        macs += L * 2 * (N + T) ** 2 * D  # joint attention: scores and the weighted sum
        macs += ((L - 1) * 12 + 8 + 2) * D * D  # adaLN modulations and the final norm, per image
        denoiser = 0
        if cfg.quantize == 'vq':
            macs += cfg.codebook_size * D * N  # the tied LM head
        else:
            W, C = cfg.diffloss_width, cfg.token_size
            macs += C * D * N  # z_proj
            denoiser = (256 * W + W * W + D * W + C * W + cfg.diffloss_depth * 5 * W * W
                        + 2 * W * W + 2 * C * W)
        train = 3 * 2 * (cond + macs + cfg.diffusion_batch_mul * N * denoiser)
        return dict(conditioning=2 * cond, backbone=2 * macs, denoiser=2 * denoiser, train=train)

class TiedLMHead(nn.Module):
    """logits = x @ embeddings[:K].T, no bias (the release's WeightTiedLMHead)."""

    def __init__(self, embeddings, codebook_size):
        super().__init__()
        self.weight = embeddings.weight  # *is* the embedding table
        self.codebook_size = codebook_size

    def forward(self, x):
        # (B, N, K): the mask and class rows are never predicted
        return x @ self.weight[:self.codebook_size].t()

def tie_lm_head(model, incompatible_keys):
    # after any load_state_dict: assign=True gave lm_head a Parameter of its own; tie it again
    model.lm_head.weight = model.embeddings.weight

class MaskGenVQ(MaskGen):
    """Masked token modeling over code ids."""

    def __init__(self, config):
        super().__init__(config)
        D = config.width
        self.mask_id = config.codebook_size
        self.text_embed_proj = nn.Linear(config.text_embed_dim, D)
        self.cond_pooled_proj = nn.Linear(config.text_embed_dim + config.aes_embed_dim, D)
        blocks = [JointBlock(D, config.heads, d == config.depth - 1) for d in range(config.depth)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = AdaLayerNormContinuous(D)
        # the codes, the mask id, 1000 unused class ids and an unused "none" id, as released
        num_ids = config.codebook_size + 1 + config.condition_num_classes + 1
        self.embeddings = nn.Embedding(num_ids, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, D))
        self.lm_head = TiedLMHead(self.embeddings, config.codebook_size)
        self.register_load_state_dict_post_hook(tie_lm_head)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Training init, as the official MaskGen_VQ._init_weights:
        | Linear weights, the embedding table, pos_embed    | trunc_normal(std 0.02), biases 0 |
        | AdaLayerNormContinuous linears (final, last text) | zeros                            |
        The blocks' adaLN-Zero linears are *not* zeroed in the release."""
        if self.pos_embed.device.type == 'meta':
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for m in self.modules():  # a second pass: modules() visits a norm before its linear
            if isinstance(m, AdaLayerNormContinuous):
                nn.init.zeros_(m.linear.weight)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def text_condition_layers(self):
        return self.text_embed_proj, self.cond_pooled_proj, aes_embedding_vq

    def backbone(self, ids, ctx, c):
        # ids (B, N), mask_id where masked -> logits (B, N, codebook_size)
        x = self.embeddings(ids) + self.pos_embed  # (B, N, D)
        x = self.blocks_forward(self.blocks, x, ctx, c)
        return self.lm_head(self.norm(x, c))  # (B, N, K)

    def logits(self, ids, text_tokens, text_pooled, aes):
        return self.backbone(ids, *self.text_condition(text_tokens, text_pooled, aes))

    def loss_weights(self, mask):
        # the release's MLMLoss: every token is predicted, masked ones weigh 1, visible ones 0.1
        return torch.where(mask, 1.0, self.config.unmasked_weight)  # (B, N)

    def forward(self, ids, text_tokens, text_pooled, aes, null_tokens, null_pooled, draws,
                normalizer=None):
        """The training loss of clean code ids (B, N): caption dropout to the "" encoding
        (null_tokens (1, 77, T), null_pooled (1, T)), masking, label-smoothed cross-entropy of
        every token weighted by loss_weights, over their sum (the release's MLMLoss) or over
        `normalizer`, that sum over a global batch. draws: draw_batch's. -> (loss, stats)."""
        text_tokens, text_pooled = self.drop_captions(text_tokens, text_pooled, null_tokens,
                                                      null_pooled, draws['drop'])
        mask = draws['mask']
        x = ids.masked_fill(mask, self.mask_id)  # (B, N)
        logits = self.logits(x, text_tokens, text_pooled, aes).float()  # (B, N, K), fp32 loss
        ce = F.cross_entropy(logits.transpose(1, 2), ids,
                             label_smoothing=self.config.label_smoothing, reduction='none')
        w = self.loss_weights(mask)  # (B, N)
        if normalizer is None:
            normalizer = w.sum()  # the release adds 1e-8; >= 1 token is masked, so the sum >= 1
        loss = (ce * w).sum() / normalizer
        correct = logits.detach().argmax(-1) == ids  # (B, N); the logits themselves are not kept
        return loss, dict(correct=correct, mask=mask)

    @torch.no_grad()
    def least_likely(self, ids, text_tokens, text_pooled, aes, n):
        """The n tokens of ids (B, N) the model finds least likely under the prompts, all tokens
        visible -> keep (B, N), False for those n (the ones to draw anew)."""
        logits = self.logits(ids, text_tokens, text_pooled, aes).float()  # (B, N, K)
        logp = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)  # (B, N)
        worst = logp.topk(n, dim=-1, largest=False).indices  # (B, n)
        return torch.ones_like(ids, dtype=torch.bool).scatter(1, worst, False)

class MaskGenKL(MaskGen):
    """Continuous tokens: the backbone conditions a diffusion MLP per token."""

    def __init__(self, config):
        super().__init__(config)
        D, N = config.width, config.num_tokens
        # registered in the release's order, which the init's random draws follow
        self.text_emb = nn.Linear(config.text_embed_dim, D)
        self.text_pooled_emb = nn.Linear(config.text_embed_dim + config.aes_embed_dim, D)
        blocks = [JointBlock(D, config.heads, d == config.depth - 1) for d in range(config.depth)]
        self.decoder_blocks = nn.ModuleList(blocks)
        self.decoder_norm = AdaLayerNormContinuous(D)
        self.z_proj = nn.Linear(config.token_size, D)
        self.z_proj_ln = nn.LayerNorm(D, eps=1e-6)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, N, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, N, D))
        net = SimpleMLPAdaLN(config.token_size, config.diffloss_width, D, config.diffloss_depth)
        self.diffloss = nn.ModuleDict(dict(net=net))  # keys diffloss.net.*
        self.train_diffusion = GaussianDiffusion(1000)  # no parameters
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Training init, as the official MaskGen_KL.initialize_weights:
        | every Linear, the denoiser's included | xavier_uniform, biases 0 |
        | mask_token, both position embeddings  | normal(std 0.02)         |
        The release runs it after DiffLoss's own init, so the denoiser's adaLN and final layers
        are xavier, not zero; we keep that."""
        if self.mask_token.device.type == 'meta':
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.mask_token, self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)

    def text_condition_layers(self):
        return self.text_emb, self.text_pooled_emb, aes_embedding_kl

    def backbone(self, x, mask, ctx, c):
        # scaled latents x (B, N, C), mask (B, N) True = masked -> the denoiser's z (B, N, D)
        x = self.z_proj_ln(self.z_proj(x))  # (B, N, D)
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)  # it skips z_proj_ln
        x = x + self.decoder_pos_embed_learned
        x = self.blocks_forward(self.decoder_blocks, x, ctx, c)
        return self.decoder_norm(x, c) + self.diffusion_pos_embed_learned  # (B, N, D)

    def denoiser_condition(self, x, mask, text_tokens, text_pooled, aes):
        # z (B, N, D) of scaled latents x (B, N, C) (official forward_mae_decoder)
        return self.backbone(x, mask.bool(), *self.text_condition(text_tokens, text_pooled, aes))

    def loss_weights(self, mask):
        # the diffusion loss is averaged over the masked tokens, each trained at k timesteps
        k = self.config.diffusion_batch_mul
        return mask[:, None].expand(-1, k, -1).float()  # (B, k, N)

    def forward(self, latents, text_tokens, text_pooled, aes, null_tokens, null_pooled, draws,
                normalizer=None):
        """The training loss of tokenizer latents (B, N, C), unscaled: caption dropout, masking,
        and the diffusion loss of every token at k = diffusion_batch_mul timesteps, weighted and
        normalised as MaskGenVQ.forward's. -> (loss, stats), with the token losses (B, k, N)."""
        B, N, C = latents.shape
        k = self.config.diffusion_batch_mul
        text_tokens, text_pooled = self.drop_captions(text_tokens, text_pooled, null_tokens,
                                                      null_pooled, draws['drop'])
        x = latents * self.config.scale_factor  # (B, N, C)
        z = self.denoiser_condition(x, draws['mask'], text_tokens, text_pooled, aes)  # (B, N, D)
        # the denoiser runs on every (token, draw), the visible ones weighing 0, as released: one
        # fixed shape, no host sync, one compiled graph, for a third more work (E[masked] = 2/pi)
        x0 = x[:, None].expand(B, k, N, C).reshape(-1, C)  # (B*k*N, C)
        zk = z[:, None].expand(B, k, N, z.shape[-1]).reshape(B * k * N, -1)  # (B*k*N, D)
        t, noise = draws['t'].reshape(-1), draws['noise'].reshape(-1, C)
        token_loss = self.train_diffusion.training_losses(self.diffloss.net, x0, zk, t, noise)
        token_loss = token_loss.view(B, k, N)
        w = self.loss_weights(draws['mask'])
        if normalizer is None:
            normalizer = w.sum()
        loss = (token_loss * w).sum() / normalizer
        return loss, dict(cond=z.detach(), token_loss=token_loss.detach(), t=draws['t'],
                          mask=draws['mask'])

# -----------------------------------------------------------------------------
# sampling: MaskGIT (VQ) and MAR (KL) decoding, each beside its helpers

@dataclass
class Sampling:
    """generate()'s settings. The defaults are MaskGen-VQ's release, Sampling.release('kl') is
    KL's. train_maskgen.py keeps them in its checkpoints as a dict d: Sampling(**d)."""
    num_steps: int = 16             # decoding steps
    guidance_scale: float = 12.0    # classifier-free guidance, reached at the end; 1: off
    guidance_schedule: str = 'cosine'  # the ramp up to it: 'cosine', 'linear' or 'constant'
    guidance_power: float = 1.0     # the cosine ramp runs on progress ** power
    temperature: float = 2.0        # VQ: of the Gumbel noise (annealed to 0); KL: diffusion noise
    aes: float = 6.5                # the aesthetic score to condition on
    diffusion_steps: int = 100      # KL: denoising steps per token, respaced from 1000
    x0_clip: float = None           # KL: bound of the predicted x_0 (GaussianDiffusion.sample)

    @staticmethod
    def release(quantize, **overrides):
        """The official infer configs, any field overridden."""
        if quantize == 'vq':
            return Sampling(**overrides)
        kl = dict(num_steps=32, guidance_scale=3.0, guidance_schedule='linear', temperature=1.0)
        return Sampling(**{**kl, **overrides})

def mask_schedule(num_tokens, num_steps, kind):
    """How many tokens are still masked after each step: arccos (MaskGIT, VQ) or cosine (MAR, KL).
    The last step leaves none; each step commits at least one while more than one is left."""
    n = num_tokens
    out = []
    for step in range(num_steps):
        r = (step + 1) / num_steps
        if kind == 'arccos':  # fp32 like the official torch code, so that floor() rounds the same
            n_float = num_tokens * (torch.acos(torch.tensor(r)) / (math.pi * 0.5))
        else:  # fp64 like the official numpy code
            n_float = num_tokens * np.cos(math.pi / 2.0 * r)
        n = max(1, min(n - 1, math.floor(n_float)))
        if step == num_steps - 1:
            n = 0
        out.append(n)
    return out

def decoding_steps(num_tokens, num_steps, kind, keep):
    """-> [(step, tokens masked after it)]: the schedule, or with keep (B, N) (True: given, as
    many in every image) its tail from the first step that leaves fewer masked than are to draw,
    as if decoding had got to the ratio the given tokens leave by itself."""
    steps = list(enumerate(mask_schedule(num_tokens, num_steps, kind)))
    if keep is None:
        return steps
    todo = (~keep).sum(1)  # (B,)
    if (todo != todo[0]).any():
        raise ValueError("keep must leave the same number of tokens to draw in every image")
    return [(step, n) for step, n in steps if n < todo[0]]

def guidance_ramp(scale, r, schedule, power=1.0):
    # the guidance weight at progress r in (0, 1], from ~1 up to `scale` (cosine: MDT; linear: Muse)
    if schedule == 'cosine':
        return (scale - 1) * (1 - math.cos(math.pi * r ** power)) / 2 + 1
    if schedule == 'linear':
        return (scale - 1) * r + 1
    assert schedule == 'constant', schedule
    return scale

def guidance_batch(prompts, guided):
    """One pass's text: the prompts (B), or with guidance [prompts; null] (2B)."""
    text_tokens, text_pooled = prompts['text_tokens'], prompts['text_pooled']
    if not guided:
        return text_tokens, text_pooled
    if prompts.get('null_tokens') is None:
        raise ValueError("guidance_scale != 1 needs null_tokens and null_pooled, the encoding of "
                         "'' or of a negative prompt (see encode_prompts)")
    text_tokens = torch.cat([text_tokens, prompts['null_tokens'].expand_as(text_tokens)])
    text_pooled = torch.cat([text_pooled, prompts['null_pooled'].expand_as(text_pooled)])
    return text_tokens, text_pooled  # (2B, 77, T), (2B, T)

def draw(fn, shape, generator, device):
    """fn (torch.rand or torch.randn) of `shape` from `generator`. A list of generators, one per
    image, splits the rows among them in order: an image's draws then depend on its own generator
    only, not on its batch."""
    if not isinstance(generator, (list, tuple)):
        return fn(shape, generator=generator, device=device)
    rows = (shape[0] // len(generator), *shape[1:])  # (rows per image, ...)
    return torch.cat([fn(rows, generator=g, device=device) for g in generator])

def gumbel_noise(shape, generator, device):
    u = draw(torch.rand, shape, generator, device)  # fp32: bf16 noise would make ties
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))

def image_generators(seed, images, device):
    """One generator per image for generate(): image (prompt p, sample j) seeded by (seed, p, j),
    so that it depends on those only, not on its batch or the number of samples per prompt."""
    out = []
    for p, j in images:
        image_seed = int(np.random.SeedSequence([seed, p, j]).generate_state(1)[0])
        out.append(torch.Generator(device).manual_seed(image_seed))
    return out

@torch.no_grad()
def maskgit(model, prompts, s, generator, start, callback, progress):
    """MaskGIT decoding (official MaskGen_VQ.generate) -> code ids (B, N); see MaskGen.generate.
    Guidance as released, logits = cond + w (cond - uncond), w ramping up to guidance_scale."""
    if s.diffusion_steps != Sampling.diffusion_steps or s.x0_clip is not None:
        raise UserError("diffusion_steps and x0_clip are MaskGen-KL's (VQ has no diffusion head)")
    B, N = prompts['text_tokens'].shape[0], model.config.num_tokens
    device = prompts['text_tokens'].device
    guided = s.guidance_scale != 1.0
    ctx, c = model.text_condition(*guidance_batch(prompts, guided), s.aes)  # same aes
    ids = torch.full((B, N), model.mask_id, device=device)
    keep = None
    if start is not None:
        init, keep = start
        ids = torch.where(keep, init, ids)  # the given ids are never changed
    for step, n_next in tqdm(decoding_steps(N, s.num_steps, 'arccos', keep), disable=not progress):
        r = (step + 1) / s.num_steps
        gumbel_temp = s.temperature * (1 - r)
        is_mask = ids == model.mask_id  # (B, N)
        if guided:  # [cond; uncond] in one batch
            cond, uncond = model.backbone(ids.repeat(2, 1), ctx, c).float().chunk(2)
            w = guidance_ramp(s.guidance_scale, r, s.guidance_schedule, s.guidance_power)
            logits = cond + w * (cond - uncond)  # (B, N, K)
        else:
            logits = model.backbone(ids, ctx, c).float()  # (B, N, K)
        logits = logits / (0.5 + 0.8 * (1 - r))  # softmax-temperature annealing, 1.3 -> 0.5
        noise = gumbel_temp * gumbel_noise(logits.shape, generator, device)
        sampled = (logits + noise).argmax(-1)  # (B, N)
        # confidence: the sampled token's logit + Gumbel noise (sampling without replacement);
        # committed tokens get +inf, so they are never masked again
        confidence = logits.gather(-1, sampled[..., None]).squeeze(-1)  # (B, N)
        confidence = confidence + gumbel_temp * gumbel_noise((B, N), generator, device)
        confidence = confidence.masked_fill(~is_mask, math.inf)
        remask = confidence.topk(n_next, dim=-1, largest=False).indices  # (B, n_next)
        ids = torch.where(is_mask, sampled, ids).scatter(1, remask, model.mask_id)
        if callback is not None:
            callback(step, ids)
    return ids

@torch.no_grad()
def mar(model, prompts, s, generator, start, callback, progress):
    """MAR decoding (official MaskGen_KL.sample_tokens) -> latents (B, N, C), divided by
    scale_factor; see MaskGen.generate. Each image commits its tokens in a random order, the
    diffusion head drawing them; guidance acts on its eps: eps_u + w (eps_c - eps_u)."""
    cfg = model.config
    B, N, C = prompts['text_tokens'].shape[0], cfg.num_tokens, cfg.token_size
    device = prompts['text_tokens'].device
    guided = s.guidance_scale != 1.0
    ctx, c = model.text_condition(*guidance_batch(prompts, guided), s.aes)  # same aes
    diffusion = GaussianDiffusion(1000, s.diffusion_steps)
    reps = 2 if guided else 1  # [cond; uncond] batches
    tokens = torch.zeros(B, N, C, device=device)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    keys = draw(torch.rand, (B, N), generator, device)  # a random order per image
    keep = None
    if start is not None:  # the given tokens are never changed
        init, keep = start
        tokens = torch.where(keep[..., None], init.float() * cfg.scale_factor, tokens)
        mask = ~keep
        keys = keys.masked_fill(keep, 2.0)  # the given tokens sort last: committed before step 0
    order = keys.argsort(-1)  # committed from its end
    n_masked = int(mask[0].sum())
    for step, n_next in tqdm(decoding_steps(N, s.num_steps, 'cosine', keep), disable=not progress):
        idx = order[:, n_next:n_masked]  # (B, k) the positions committed at this step
        if idx.shape[1] > 0:
            z = model.backbone(tokens.repeat(reps, 1, 1), mask.repeat(reps, 1), ctx, c)
            gather = idx.repeat(reps, 1)[..., None].expand(-1, -1, z.shape[-1])
            z = z.gather(1, gather)  # (reps*B, k, D)
            z_null = None
            if guided:
                z_null = z[B:].flatten(0, 1)  # (B*k, D)
            z = z[:B].flatten(0, 1)
            # the release ramps with the next mask length clamped to >= 1: the last step stays
            # below the scale
            r = (N - max(n_next, 1)) / N
            w = guidance_ramp(s.guidance_scale, r, s.guidance_schedule, s.guidance_power)
            x = diffusion.sample(model.diffloss.net, z, z_null, w, s.temperature, generator,
                                 s.x0_clip)  # (B*k, C)
            x = x.view(B, -1, C).to(tokens.dtype)
            tokens = tokens.scatter(1, idx[..., None].expand(-1, -1, C), x)
            mask = mask.scatter(1, idx, False)
        n_masked = n_next
        if callback is not None:
            callback(step, tokens, mask)
    return tokens / cfg.scale_factor

# -----------------------------------------------------------------------------
# the text inputs of generate()

def prompt_inputs(text, null=None):
    """generate()'s prompts from tatitok.TextEncoder outputs: `text` of the prompts, `null` of ""
    or of a negative prompt (the unconditional branch of guidance)."""
    out = dict(text_tokens=text['tokens'], text_pooled=text['pooled'])
    if null is not None:
        out.update(null_tokens=null['tokens'], null_pooled=null['pooled'])
    return out

@torch.no_grad()
def encode_prompts(text_encoder, captions, negative_prompt=''):
    """generate()'s prompts, encoded by a tatitok.TextEncoder. (The tokenizer's decoder wants
    text_encoder(captions)['guidance'] too.)"""
    return prompt_inputs(text_encoder(list(captions)), text_encoder([negative_prompt]))

# -----------------------------------------------------------------------------
# presets: the four official releases, plus small ones for CPU

_L = dict(width=1024, depth=16, heads=16)
_XL = dict(width=1280, depth=20, heads=16)
_VQ = dict(quantize='vq', num_tokens=128, codebook_size=8192, tokenizer='vq128')
_KL = dict(quantize='kl', num_tokens=32, token_size=16, tokenizer='kl32')
_SMALL = dict(heads=4, text_embed_dim=64)  # text_embed_dim 64: TextEncoder.tiny()
# tokenizer: the TATITOK_PRESETS entry whose tokens the generator models (the small ones: its
# namesake); TUNING.md says how the shapes sizes (train_maskgen.py --preset shapes) were chosen
MASKGEN_PRESETS = {
    'vq-l': dict(**_VQ, **_L, repo='turkeyju/generator_maskgen_vq_l'),  # 604.3M
    'vq-xl': dict(**_VQ, **_XL, repo='turkeyju/generator_maskgen_vq_xl'),  # 1176.6M
    'kl-l': dict(**_KL, **_L, diffloss_width=1024, repo='turkeyju/generator_maskgen_kl_l'),
    'kl-xl': dict(**_KL, **_XL, diffloss_width=1280, repo='turkeyju/generator_maskgen_kl_xl'),
    'tiny-vq': dict(quantize='vq', num_tokens=8, codebook_size=96, width=64, depth=2, **_SMALL,
                    tokenizer='tiny-vq'),
    'tiny-kl': dict(quantize='kl', num_tokens=8, token_size=5, width=64, depth=2, **_SMALL,
                    diffloss_width=64, diffloss_depth=2, mask_block=2, tokenizer='tiny-kl'),
    'shapes-vq': dict(quantize='vq', num_tokens=32, codebook_size=1024, width=128, depth=4,
                      **_SMALL, tokenizer='shapes-vq'),
    'shapes-kl': dict(quantize='kl', num_tokens=32, token_size=16, width=128, depth=4, **_SMALL,
                      diffloss_width=256, diffloss_depth=3, tokenizer='shapes-kl'),
}

def maskgen_config(name, **overrides):
    return preset_config(MASKGEN_PRESETS, MaskGenConfig, name, **overrides)

# -----------------------------------------------------------------------------
# loading the official releases and our checkpoints

def load_maskgen(name_or_path, dtype=torch.float32, **overrides):
    """MaskGen.from_pretrained: what read_weights finds, its config (ours: saved; official: read
    off the shapes), then every key and shape checked."""
    path, sd = read_weights(name_or_path, MASKGEN_PRESETS, dtype)
    ours = 'model_args' in sd
    if ours and 'num_tokens' not in sd['model_args']:
        raise UserError(f"{path}: a tokenizer's checkpoint, not a generator's (pass it as "
                        f"--tokenizer)")
    if ours:  # its EMA weights when it has them
        args, sd = sd['model_args'], checkpoint_weights(sd)
    else:
        args = config_from_state_dict(sd, path)
    config = MaskGenConfig(**{**args, **overrides})
    tied = 'lm_head.weight' in sd and 'embeddings.weight' in sd
    if tied and not torch.equal(sd['lm_head.weight'], sd['embeddings.weight']):
        raise UserError(f"{path}: lm_head.weight differs from embeddings.weight, but MaskGen "
                        f"ties them")
    with torch.device('meta'):  # no weights drawn only to be replaced by the file's
        model = MaskGen.from_config(config).to(dtype)
    print(f"loading MaskGen-{config.quantize.upper()} from {path} "
          f"({model.get_num_params() / 1e6:.2f}M parameters)")
    # the VQ head's weight, tied to the table: .bin files hold it, safetensors drop the twin
    optional = ('lm_head.weight',) if config.quantize == 'vq' else ()
    return load_official(model, sd, path, optional=optional).eval()

def config_from_state_dict(sd, path):
    """MaskGenConfig fields of an official state dict, read off its shapes (heads are not in
    them: 16, as released)."""
    count = lambda prefix: len({k[len(prefix):].split('.')[0] for k in sd if k.startswith(prefix)})
    try:
        if 'embeddings.weight' in sd:
            _, N, D = sd['pos_embed'].shape
            return dict(quantize='vq', num_tokens=N, width=D, depth=count('blocks.'),
                        # minus the mask, 1000 classes and "none"
                        codebook_size=sd['embeddings.weight'].shape[0] - 1002,
                        text_embed_dim=sd['text_embed_proj.weight'].shape[1])
        _, N, D = sd['decoder_pos_embed_learned'].shape
        return dict(quantize='kl', num_tokens=N, width=D, depth=count('decoder_blocks.'),
                    token_size=sd['z_proj.weight'].shape[1],
                    text_embed_dim=sd['text_emb.weight'].shape[1],
                    diffloss_width=sd['diffloss.net.input_proj.weight'].shape[0],
                    diffloss_depth=count('diffloss.net.res_blocks.'))
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"{path}: not a MaskGen state dict (expected 'embeddings.weight' and "
                        f"'pos_embed' for VQ, or 'decoder_pos_embed_learned' and 'z_proj.weight' "
                        f"for KL)") from None
