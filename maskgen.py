"""
MaskGen: text-to-image over TA-TiTok's 1D tokens, all of it in this single file.
An MM-DiT reads the tokens and the caption's CLIP features; MaskGenVQ predicts
code ids (MaskGIT), MaskGenKL conditions a diffusion MLP per token (MAR).

    gen = MaskGen.from_pretrained('vq-xl')
    ids = gen.generate(encode_prompts(clip, captions), seed=0)  # (B, 128) code ids

References:
1) paper: https://arxiv.org/abs/2501.07730
2) official code: https://github.com/bytedance/1d-tokenizer (modeling/maskgen.py,
   modeling/modules/blocks.py, losses.py, modeling/diffusion/)
3) MM-DiT (SD3): https://arxiv.org/abs/2403.03206, as diffusers' JointTransformerBlock
4) MaskGIT: https://arxiv.org/abs/2202.04200, and MUSE-Pytorch (baaivision)
5) MAR: https://arxiv.org/abs/2406.11838, https://github.com/LTH14/mar
6) IDDPM: https://arxiv.org/abs/2102.09672
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

from tatitok import UserError, preset_config, read_model, load_official, param_groups

# -----------------------------------------------------------------------------
# the MM-DiT block: diffusers' JointTransformerBlock, its keys

def modulate(x, shift, scale):
    return x * (1 + scale) + shift

def sinusoid(x, dim=256, max_period=10000, cos_first=False):
    # the diffusers / DiT sinusoid, in fp32
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=x.device)
    freqs = torch.exp(-math.log(max_period) * i / half)  # (dim/2,)
    args = x[:, None].float() * freqs[None]  # (B, dim/2)
    if cos_first:
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim)

def aes_embedding_vq(aes, dim=256):
    # official MaskGen_VQ.get_sinusoidal_encoding of 100 * score
    return sinusoid(aes * 100, dim, max_period=1000)

def aes_embedding_kl(aes, dim=256):
    # MaskGen_KL's: sin and cos *interleaved*, in the score's own precision
    i = torch.arange(0, dim, 2, dtype=torch.float32, device=aes.device)
    args = (aes * 100)[:, None] * torch.pow(10000, -i / dim)  # (B, dim/2)
    emb = torch.stack([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim/2, 2)
    return emb.flatten(1).float()  # (B, dim)

class AdaLayerNormZero(nn.Module):

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
    # no gate: the final norm, and the last block's text norm

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, c):
        mod = self.linear(F.silu(c)).unsqueeze(1)  # (B, 1, 2D)
        scale, shift = mod.chunk(2, dim=-1)  # in this order
        return modulate(self.norm(x), shift, scale)

class FeedForward(nn.Module):
    # keys net.0.proj and net.2: net.1 was a dropout with p = 0

    def __init__(self, dim):
        super().__init__()
        proj = nn.ModuleDict(dict(proj=nn.Linear(dim, 4 * dim)))
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        h = F.gelu(self.net[0].proj(x), approximate='tanh')  # diffusers' "gelu-approximate"
        return self.net[2](h)

class JointAttention(nn.Module):
    # one attention over [image, text], weights per stream, no mask (as released)

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
        # the last block has no text output (its text query is computed, unused)
        self.to_add_out = None if last else nn.Linear(dim, dim)

    def forward(self, x, ctx):
        B, L, D = x.shape
        q = torch.cat([self.to_q(x), self.add_q_proj(ctx)], dim=1)  # (B, L+77, D)
        k = torch.cat([self.to_k(x), self.add_k_proj(ctx)], dim=1)
        v = torch.cat([self.to_v(x), self.add_v_proj(ctx)], dim=1)
        hs = D // self.heads
        q, k, v = (t.view(B, -1, self.heads, hs).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L+77, hs)
        y = y.transpose(1, 2).reshape(B, -1, D)  # (B, L+77, D)
        x = self.to_out[0](y[:, :L])
        if self.to_add_out is None:
            return x, None
        return x, self.to_add_out(y[:, L:])

class JointBlock(nn.Module):
    # image x (B, L, D) and text ctx (B, 77, D), modulated by c (B, D)

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
# MaskGen-KL's diffusion loss: an MLP denoiser per token (MAR), IDDPM by hand

class ResBlock(nn.Module):

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(y).chunk(3, dim=-1)  # (M, W)
        return x + gate_mlp * self.mlp(modulate(self.in_ln(x), shift_mlp, scale_mlp))

class FinalLayer(nn.Module):

    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)  # this order here
        return self.linear(modulate(self.norm_final(x), shift, scale))

class SimpleMLPAdaLN(nn.Module):
    # the denoiser: x_t (M, C), t (M,), condition z (M, D) -> eps, variance (M, 2C)

    def __init__(self, in_channels, width, z_channels, depth):
        super().__init__()
        time_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.time_embed = nn.ModuleDict(dict(mlp=time_mlp))  # DiT's TimestepEmbedder
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * in_channels)

    def forward(self, x, t, z):
        t_freq = sinusoid(t, cos_first=True).to(x.dtype)  # (M, 256)
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
    # IDDPM's respace.py, one section
    stride = (num_steps - 1) / (count - 1) if count > 1 else 1
    idx, steps = 0.0, []
    for _ in range(count):
        steps.append(round(idx))
        idx += stride  # accumulated, not i * stride: the rounding must match the release
    return sorted(set(steps))

def normal_kl(mean1, logvar1, mean2, logvar2):
    sq = (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + sq)

def discretized_gaussian_loglik(x, mean, log_scale):
    # IDDPM's, for 8-bit data in [-1, 1]; the release applies it to latents too
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1 / 255))
    cdf_min = cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    inner = torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    return torch.where(x < -0.999, log_cdf_plus, inner)

# the schedules training looks up per row, on the device
TABLES = ('sqrt_ac', 'sqrt_one_minus_ac', 'sqrt_recip_ac', 'sqrt_recipm1_ac', 'posterior_logvar',
          'posterior_coef1', 'posterior_coef2', 'log_betas')

class GaussianDiffusion(nn.Module):
    # IDDPM: cosine schedule, eps prediction, learned-range variance; sampling respaced to
    # sample_steps (the net still sees the original timesteps)

    def __init__(self, num_steps=1000, sample_steps=None):
        super().__init__()
        self.timestep_map = np.array(space_timesteps(num_steps, sample_steps or num_steps))
        ac = np.cumprod(1.0 - cosine_betas(num_steps))[self.timestep_map]
        b = 1.0 - ac / np.append(1.0, ac[:-1])  # alpha_bar kept at the kept steps
        self.betas = b
        ac = np.cumprod(1.0 - b)  # recomputed from the betas, as the release does
        ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_ac = np.sqrt(ac)
        self.sqrt_one_minus_ac = np.sqrt(1.0 - ac)
        self.sqrt_recip_ac = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / ac - 1)
        posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
        # 0 at t = 0: its log is clipped to the value at t = 1
        self.posterior_logvar = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)
        self.log_betas = np.log(b)
        table = np.stack([getattr(self, n) for n in TABLES]).astype(np.float32)
        # from_numpy: on the CPU even when the model is built on the meta device
        self.register_buffer('table', torch.from_numpy(table), persistent=False)

    def _at(self, name, t):
        # training's t (M,): fp32 rows of the buffer; sampling's int: a float64
        if isinstance(t, int):
            return float(getattr(self, name)[t])
        return self.table[TABLES.index(name)][t].unsqueeze(-1)  # (M, 1)

    def p_mean_logvar(self, x_t, t, eps, v, x0_clip=None):
        # p(x_{t-1} | x_t): the mean through the predicted x_0, the log-variance between the
        # posterior's and beta_t's
        frac = (v + 1) / 2  # v in [-1, 1]
        logvar = frac * self._at('log_betas', t) + (1 - frac) * self._at('posterior_logvar', t)
        x0 = self._at('sqrt_recip_ac', t) * x_t - self._at('sqrt_recipm1_ac', t) * eps
        if x0_clip is not None:  # IDDPM's clip_denoised; off as released
            x0 = x0.clamp(-x0_clip, x0_clip)
        return self._at('posterior_coef1', t) * x0 + self._at('posterior_coef2', t) * x_t, logvar

    def training_losses(self, net, x0, z, t, noise):
        # the hybrid loss (M,): eps's MSE, plus the bound in bits for the variance
        x_t = self._at('sqrt_ac', t) * x0 + self._at('sqrt_one_minus_ac', t) * noise  # (M, C)
        eps, v = net(x_t, t, z).float().chunk(2, dim=1)  # (M, C) each, fp32
        mean, logvar = self.p_mean_logvar(x_t, t, eps.detach(), v)
        true_mean = self._at('posterior_coef1', t) * x0 + self._at('posterior_coef2', t) * x_t
        kl = normal_kl(true_mean, self._at('posterior_logvar', t), mean, logvar).mean(1)
        nll = -discretized_gaussian_loglik(x0, mean, 0.5 * logvar).mean(1)  # at t = 0
        bound = torch.where(t == 0, nll, kl) / math.log(2.0)
        return (noise - eps).pow(2).mean(1) + bound

    @torch.no_grad()
    def sample(self, net, z, z_null=None, guidance=1.0, temperature=1.0, generator=None,
               x0_clip=None):
        # z (M, D) -> x_0 (M, C), guidance on eps (official forward_with_cfg); x0_clip: at
        # t = 999, x_0 is eps's error times 2e4
        M, C = z.shape[0], net.input_proj.in_features
        x = draw(torch.randn, (M, C), generator, z.device)  # (M, C)
        for i in reversed(range(len(self.betas))):
            t = torch.full((M,), int(self.timestep_map[i]), device=z.device)
            if z_null is None:
                eps, v = net(x, t, z).float().chunk(2, dim=1)  # (M, C) each
            else:  # both halves in one batch; the variance is the conditional half's
                out = net(x.repeat(2, 1), t.repeat(2), torch.cat([z, z_null])).float()
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
    quantize: str = 'vq'            # 'vq' (code ids) or 'kl' (continuous tokens)
    num_tokens: int = 128           # N, the tokenizer's
    codebook_size: int = 8192       # VQ; id codebook_size is the mask token
    token_size: int = 16            # KL: channels per token
    width: int = 1024               # D of the MM-DiT
    depth: int = 16
    heads: int = 16
    text_embed_dim: int = 768       # CLIP's text width
    aes_embed_dim: int = 256        # the aesthetic-score sinusoid ("micro condition")
    condition_num_classes: int = 1000  # VQ: unused rows of the table, as released
    diffloss_width: int = 1024      # KL: the denoiser MLP
    diffloss_depth: int = 8
    scale_factor: float = 0.7525    # KL: latents are multiplied by it
    diffusion_batch_mul: int = 4    # KL: noise draws per token in training
    mask_block: int = 32            # KL: samples per masking ratio (a release GPU batch)
    text_drop_prob: float = 0.1     # caption -> "", for classifier-free guidance
    label_smoothing: float = 0.1    # VQ loss
    unmasked_weight: float = 0.1    # VQ loss weight of the visible tokens

def training_draws(cfg, seed, g):
    """Global sample g's draws, from its own generator (the same for any number of processes):
    drop (caption -> ""), mask (N,) True = masked; KL: t (k, N), noise (k, N, C) for k draws
    per token, posterior (N, C) for the tokenizer's posterior sample."""
    N, C = cfg.num_tokens, cfg.token_size
    rng = np.random.default_rng([seed, g])
    drop = rng.random() < cfg.text_drop_prob
    if cfg.quantize == 'vq':
        u = rng.random()
    else:  # one per block, as the release draws one per GPU batch
        u = np.random.default_rng([seed, g // cfg.mask_block, 1]).random()
    ratio = min(max(math.acos(u) / (math.pi / 2), 1e-6), 1.0)
    if cfg.quantize == 'vq':
        n_masked = max(1, round(N * ratio))
    else:
        n_masked = math.ceil(N * ratio)
    mask = rng.random(N).argsort() < n_masked  # (N,)
    out = dict(drop=drop, mask=mask)
    if cfg.quantize == 'kl':
        k = cfg.diffusion_batch_mul
        out['t'] = rng.integers(0, 1000, (k, N))
        out['noise'] = rng.standard_normal((k, N, C), dtype=np.float32)
        out['posterior'] = rng.standard_normal((N, C), dtype=np.float32)
    return out

# -----------------------------------------------------------------------------
# the model: what both share, then MaskGen-VQ and MaskGen-KL with their losses

class MaskGen(nn.Module):
    # the base of MaskGenVQ and MaskGenKL (module names: their releases' keys)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.checkpointing = False  # recompute each block in the backward pass

    @staticmethod
    def from_config(config):
        if config.quantize == 'vq':
            return MaskGenVQ(config)
        return MaskGenKL(config)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied VQ lm_head counts once

    def blocks_forward(self, blocks, x, ctx, c):
        for block in blocks:
            if self.checkpointing:
                x, ctx = checkpoint(block, x, ctx, c, use_reentrant=False)
            else:
                x, ctx = block(x, ctx, c)
        return x

    def text_condition(self, text_tokens, text_pooled, aes):
        # -> the text stream ctx (B, 77, D), and c (B, D) of CLIP's pooled and aes
        aes = torch.as_tensor(aes, device=text_tokens.device).expand(text_tokens.shape[0])
        text_proj, pooled_proj, aes_embedding = self.text_condition_layers()
        aes_emb = aes_embedding(aes, self.config.aes_embed_dim).to(text_pooled.dtype)
        pooled = torch.cat([text_pooled, aes_emb], dim=-1)  # (B, T + 256)
        return text_proj(text_tokens), pooled_proj(pooled)

    def draw_batch(self, seed, indices):
        draws = [training_draws(self.config, seed, g) for g in indices]
        return {k: torch.as_tensor(np.stack([d[k] for d in draws])) for k in draws[0]}

    def drop_captions(self, text_tokens, text_pooled, null_tokens, null_pooled, drop):
        text_tokens = torch.where(drop[:, None, None], null_tokens, text_tokens)  # (B, 77, T)
        text_pooled = torch.where(drop[:, None], null_pooled, text_pooled)  # (B, T)
        return text_tokens, text_pooled

    def forward(self, x, text_tokens, text_pooled, aes, null_tokens, null_pooled, draws,
                normalizer=None):
        # the loss of tokens x, over the loss weights' sum or `normalizer` (a global batch's)
        text = self.drop_captions(text_tokens, text_pooled, null_tokens, null_pooled, draws['drop'])
        token_loss, stats = self.token_losses(x, *text, aes, draws)
        w = self.loss_weights(draws['mask'])
        if normalizer is None:
            normalizer = w.sum()  # VQ: the release adds 1e-8, but >= 1 token is masked
        return (token_loss * w).sum() / normalizer, stats

    @torch.no_grad()
    def generate(self, prompts, sampling=None, seed=None, start=None, callback=None,
                 progress=False):
        """-> VQ code ids (B, N) by maskgit(), KL latents (B, N, C) by mar(). prompts: as
        encode_prompts'; sampling: None for the release's; seed: an int, None (torch's RNG), a
        Generator or one per image; start: (tokens, keep), tokens kept where keep (B, N);
        callback(step, ids) for VQ, callback(step, tokens, mask) for KL."""
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
        # a preset, a release's repo id, an official file, or one of our runs
        path, config, sd = read_model(name_or_path, MASKGEN_PRESETS, MaskGenConfig,
                                      config_from_state_dict, dtype, overrides,
                                      "a tokenizer's checkpoint: pass it as --tokenizer")
        tied = 'lm_head.weight' in sd and 'embeddings.weight' in sd
        if tied and not torch.equal(sd['lm_head.weight'], sd['embeddings.weight']):
            raise UserError(f"{path}: lm_head.weight differs from its tied embeddings.weight")
        with torch.device('meta'):  # no weights drawn only to be replaced by the file's
            model = cls.from_config(config).to(dtype)
        print(f"loading MaskGen-{config.quantize.upper()} from {path} "
              f"({model.get_num_params() / 1e6:.2f}M parameters)")
        # the tied VQ head: .bin files hold it, safetensors drop the twin
        optional = ('lm_head.weight',) if config.quantize == 'vq' else ()
        return load_official(model, sd, path, optional=optional).eval()

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        # the release's no-decay rules (KL's text_emb, not "embed", decays)
        groups = param_groups(self.named_parameters(), weight_decay)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)

    def activation_bytes(self, text_len=77):
        """A training step's bytes under 16-bit autocast (runtime.memory_plan): per sample
        saved (checkpointed: with block checkpointing) and transient (the backward's largest
        temporary); casts (16-bit weights)."""
        cfg = self.config
        D, L, T, K = cfg.width, cfg.num_tokens, text_len, cfg.codebook_size
        lse = 4 * cfg.heads * (L + T)  # the attention's log-sum-exp, fp32
        # per token and width, the fp32 image stream saves 54 bytes: LayerNorm in and out
        # (4 + 4, twice), 16-bit inputs of q, k, v, out, mlp (2 each), MLP hidden and GELU
        # input (8 + 8), attention q, k, v, output (8); the 16-bit text stream 42.5
        block = (54 * L + 42.5 * T) * D + lse
        last = (54 * L + 14 * T) * D + lse
        head = 10 * L * D + 4 * L * K + 8 * L  # final norm, lm_head input, log-softmax, ids
        transient = 8 * L * K  # the logits' gradient
        if cfg.quantize == 'kl':  # the denoiser runs on k rows per token
            W = cfg.diffloss_width
            row = (22 * cfg.diffloss_depth + 16) * W + 11 * D + 33 * cfg.token_size
            head = cfg.diffusion_batch_mul * L * row + 12 * L * D
            transient = 0
        cond = 2 * T * cfg.text_embed_dim
        saved = (cfg.depth - 1) * block + last + head + cond
        inputs = cfg.depth * (4 * L + 2 * T) * D  # each block's, kept by checkpointing
        return dict(saved=saved, checkpointed=inputs + block + head + cond,
                    casts=2 * self.get_num_params(), transient=transient)

    def estimate_flops(self, text_len=77):
        # FLOPs per image: conditioning, backbone (a pass), denoiser (KL, a token), train (3x
        # forward, the denoiser k x every token)
        cfg = self.config
        D, L, N, T = cfg.width, cfg.depth, cfg.num_tokens, text_len
        cond = cfg.text_embed_dim * D * T + (cfg.text_embed_dim + cfg.aes_embed_dim) * D
        macs = L * 12 * D * D * N + ((L - 1) * 12 + 3) * D * D * T  # last text: q, k, v only
        macs += L * 2 * (N + T) ** 2 * D  # attention scores and weighted sum
        macs += ((L - 1) * 12 + 8 + 2) * D * D  # adaLN and final norm, once per image
        denoiser = 0
        if cfg.quantize == 'vq':
            macs += cfg.codebook_size * D * N  # the LM head
        else:
            W, C = cfg.diffloss_width, cfg.token_size
            macs += C * D * N  # z_proj
            denoiser = (256 * W + W * W + D * W + C * W + cfg.diffloss_depth * 5 * W * W
                        + 2 * W * W + 2 * C * W)
        train = 3 * 2 * (cond + macs + cfg.diffusion_batch_mul * N * denoiser)
        return dict(conditioning=2 * cond, backbone=2 * macs, denoiser=2 * denoiser, train=train)

class TiedLMHead(nn.Module):
    # the release's WeightTiedLMHead: logits = x @ embeddings[:K].T, no bias

    def __init__(self, embeddings, codebook_size):
        super().__init__()
        self.weight = embeddings.weight
        self.codebook_size = codebook_size

    def forward(self, x):
        return x @ self.weight[:self.codebook_size].t()  # (B, N, K): no mask, class rows

def tie_lm_head(model, incompatible_keys):
    # load_state_dict(assign=True) gives lm_head a Parameter of its own: tie again
    model.lm_head.weight = model.embeddings.weight

class MaskGenVQ(MaskGen):

    def __init__(self, config):
        super().__init__(config)
        D = config.width
        self.mask_id = config.codebook_size
        self.text_embed_proj = nn.Linear(config.text_embed_dim, D)
        self.cond_pooled_proj = nn.Linear(config.text_embed_dim + config.aes_embed_dim, D)
        blocks = [JointBlock(D, config.heads, d == config.depth - 1) for d in range(config.depth)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = AdaLayerNormContinuous(D)
        # the codes, the mask id, 1000 unused class ids, an unused "none" id
        num_ids = config.codebook_size + 1 + config.condition_num_classes + 1
        self.embeddings = nn.Embedding(num_ids, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, D))
        self.lm_head = TiedLMHead(self.embeddings, config.codebook_size)
        self.register_load_state_dict_post_hook(tie_lm_head)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """The official MaskGen_VQ._init_weights:
        | Linear weights, embedding table, pos_embed | trunc_normal(std 0.02), bias 0 |
        | the AdaLayerNormContinuous linears         | zeros                          |
        The blocks' adaLN-Zero linears are *not* zeroed in the release."""
        if self.pos_embed.device.type == 'meta':
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for m in self.modules():  # a second pass: a norm is visited before its linear
            if isinstance(m, AdaLayerNormContinuous):
                nn.init.zeros_(m.linear.weight)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def text_condition_layers(self):
        return self.text_embed_proj, self.cond_pooled_proj, aes_embedding_vq

    def backbone(self, ids, ctx, c):
        x = self.embeddings(ids) + self.pos_embed  # (B, N, D)
        x = self.blocks_forward(self.blocks, x, ctx, c)
        return self.lm_head(self.norm(x, c))  # (B, N, K)

    def logits(self, ids, text_tokens, text_pooled, aes):
        return self.backbone(ids, *self.text_condition(text_tokens, text_pooled, aes))

    def loss_weights(self, mask):
        # the release's MLMLoss: masked tokens weigh 1, visible ones 0.1
        return torch.where(mask, 1.0, self.config.unmasked_weight)  # (B, N)

    def token_losses(self, ids, text_tokens, text_pooled, aes, draws):
        # label-smoothed cross-entropy of every code id (B, N)
        x = ids.masked_fill(draws['mask'], self.mask_id)  # (B, N)
        logits = self.logits(x, text_tokens, text_pooled, aes).float()  # (B, N, K), fp32 loss
        ce = F.cross_entropy(logits.transpose(1, 2), ids,
                             label_smoothing=self.config.label_smoothing, reduction='none')
        correct = logits.detach().argmax(-1) == ids  # (B, N); the logits are not kept
        return ce, dict(correct=correct, mask=draws['mask'])

    @torch.no_grad()
    def least_likely(self, ids, text_tokens, text_pooled, aes, n):
        # keep (B, N): False for the n tokens the model finds least likely
        logits = self.logits(ids, text_tokens, text_pooled, aes).float()  # (B, N, K)
        logp = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)  # (B, N)
        worst = logp.topk(n, dim=-1, largest=False).indices  # (B, n)
        return torch.ones_like(ids, dtype=torch.bool).scatter(1, worst, False)

class MaskGenKL(MaskGen):

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
        """The official MaskGen_KL.initialize_weights:
        | every Linear, the denoiser's too     | xavier_uniform, biases 0 |
        | mask_token, both position embeddings | normal(std 0.02)         |
        It runs after DiffLoss's init: the denoiser's adaLN layers are not zero."""
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
        # scaled latents (B, N, C), mask (B, N) -> the denoiser's condition z
        x = self.z_proj_ln(self.z_proj(x))  # (B, N, D)
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)  # not normed
        x = x + self.decoder_pos_embed_learned
        x = self.blocks_forward(self.decoder_blocks, x, ctx, c)
        return self.decoder_norm(x, c) + self.diffusion_pos_embed_learned  # (B, N, D)

    def denoiser_condition(self, x, mask, text_tokens, text_pooled, aes):
        # official forward_mae_decoder
        return self.backbone(x, mask.bool(), *self.text_condition(text_tokens, text_pooled, aes))

    def loss_weights(self, mask):
        # the masked tokens, each at k timesteps
        k = self.config.diffusion_batch_mul
        return mask[:, None].expand(-1, k, -1).float()  # (B, k, N)

    def token_losses(self, latents, text_tokens, text_pooled, aes, draws):
        # the diffusion loss of latents (B, N, C) at k timesteps each (B, k, N)
        B, N, C = latents.shape
        k = self.config.diffusion_batch_mul
        x = latents * self.config.scale_factor  # (B, N, C)
        z = self.denoiser_condition(x, draws['mask'], text_tokens, text_pooled, aes)  # (B, N, D)
        # every (token, draw) runs, the visible ones weighing 0, as released: one shape, one
        # compiled graph, no sync, for a third more work
        x0 = x[:, None].expand(B, k, N, C).reshape(-1, C)  # (B*k*N, C)
        zk = z[:, None].expand(B, k, N, z.shape[-1]).reshape(B * k * N, -1)  # (B*k*N, D)
        t, noise = draws['t'].reshape(-1), draws['noise'].reshape(-1, C)
        token_loss = self.train_diffusion.training_losses(self.diffloss.net, x0, zk, t, noise)
        token_loss = token_loss.view(B, k, N)
        return token_loss, dict(cond=z.detach(), token_loss=token_loss.detach(), t=draws['t'],
                                mask=draws['mask'])
# -----------------------------------------------------------------------------
# sampling: MaskGIT (VQ) and MAR (KL), beside their helpers

@dataclass
class Sampling:
    # generate()'s settings: MaskGen-VQ's release (Sampling.release for KL's)
    num_steps: int = 16
    guidance_scale: float = 12.0    # reached at the end; 1: the conditional model alone
    guidance_schedule: str = 'cosine'  # or 'linear', 'constant'
    guidance_power: float = 1.0     # of the cosine ramp
    temperature: float = 2.0        # VQ: Gumbel noise, annealed to 0; KL: diffusion noise
    aes: float = 6.5                # the aesthetic score to condition on
    diffusion_steps: int = 100      # KL
    x0_clip: float = None           # KL: bound of the predicted x_0; None, as released

    @staticmethod
    def release(quantize, **overrides):
        if quantize == 'vq':
            return Sampling(**overrides)
        kl = dict(num_steps=32, guidance_scale=3.0, guidance_schedule='linear', temperature=1.0)
        return Sampling(**{**kl, **overrides})

def mask_schedule(num_tokens, num_steps, kind):
    # the tokens still masked after each step: arccos (MaskGIT) or cosine (MAR); each step
    # commits at least one while more than one is left, the last all
    n = num_tokens
    out = []
    for step in range(1, num_steps):
        r = step / num_steps
        if kind == 'arccos':  # fp32 like the official torch code: floor() rounds the same
            n_float = num_tokens * (torch.acos(torch.tensor(r)) / (math.pi * 0.5))
        else:  # fp64 like the official numpy code
            n_float = num_tokens * np.cos(math.pi / 2.0 * r)
        n = max(1, min(n - 1, math.floor(n_float)))
        out.append(n)
    return out + [0]

def decoding_steps(num_tokens, num_steps, kind, keep):
    # -> [(step, tokens masked after it)]; with keep (B, N), the tail where fewer are masked
    # than are to draw, as if decoding had kept those by itself
    steps = list(enumerate(mask_schedule(num_tokens, num_steps, kind)))
    if keep is None:
        return steps
    todo = (~keep).sum(1)  # (B,)
    if (todo != todo[0]).any():
        raise ValueError("keep must leave the same number of tokens to draw in every image")
    return [(step, n) for step, n in steps if n < todo[0]]

def guidance_ramp(scale, r, schedule, power=1.0):
    # the weight at progress r in (0, 1]: cosine from MDT, linear from Muse
    if schedule == 'cosine':
        return (scale - 1) * (1 - math.cos(math.pi * r ** power)) / 2 + 1
    if schedule == 'linear':
        return (scale - 1) * r + 1
    assert schedule == 'constant', schedule
    return scale

def guidance_batch(prompts, guided):
    # one pass's text: the prompts (B), or with guidance [prompts; null] (2B)
    text_tokens, text_pooled = prompts['text_tokens'], prompts['text_pooled']
    if not guided:
        return text_tokens, text_pooled
    if prompts.get('null_tokens') is None:
        raise ValueError("guidance_scale != 1 needs null_tokens and null_pooled (encode_prompts)")
    text_tokens = torch.cat([text_tokens, prompts['null_tokens'].expand_as(text_tokens)])
    text_pooled = torch.cat([text_pooled, prompts['null_pooled'].expand_as(text_pooled)])
    return text_tokens, text_pooled  # (2B, 77, T), (2B, T)

def draw(fn, shape, generator, device):
    # with one generator per image, an image's rows depend on its generator, not its batch
    if not isinstance(generator, (list, tuple)):
        return fn(shape, generator=generator, device=device)
    rows = (shape[0] // len(generator), *shape[1:])  # (rows per image, ...)
    return torch.cat([fn(rows, generator=g, device=device) for g in generator])

def gumbel_noise(shape, generator, device):
    u = draw(torch.rand, shape, generator, device)  # fp32: bf16 noise would make ties
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))

def image_generators(seed, images, device):
    # a generator per image (prompt p, sample j), seeded by (seed, p, j) alone
    out = []
    for p, j in images:
        image_seed = int(np.random.SeedSequence([seed, p, j]).generate_state(1)[0])
        out.append(torch.Generator(device).manual_seed(image_seed))
    return out

@torch.no_grad()
def maskgit(model, prompts, s, generator, start, callback, progress):
    # the official MaskGen_VQ.generate -> code ids (B, N)
    if s.diffusion_steps != Sampling.diffusion_steps or s.x0_clip is not None:
        raise UserError("diffusion_steps and x0_clip are MaskGen-KL's")
    B, N = prompts['text_tokens'].shape[0], model.config.num_tokens
    device = prompts['text_tokens'].device
    guided = s.guidance_scale != 1.0
    ctx, c = model.text_condition(*guidance_batch(prompts, guided), s.aes)
    ids = torch.full((B, N), model.mask_id, device=device)
    keep = None
    if start is not None:
        init, keep = start
        ids = torch.where(keep, init, ids)
    for step, n_next in tqdm(decoding_steps(N, s.num_steps, 'arccos', keep), disable=not progress):
        r = (step + 1) / s.num_steps
        gumbel_temp = s.temperature * (1 - r)
        is_mask = ids == model.mask_id  # (B, N)
        if guided:
            cond, uncond = model.backbone(ids.repeat(2, 1), ctx, c).float().chunk(2)
            w = guidance_ramp(s.guidance_scale, r, s.guidance_schedule, s.guidance_power)
            logits = cond + w * (cond - uncond)  # (B, N, K), as released
        else:
            logits = model.backbone(ids, ctx, c).float()  # (B, N, K)
        logits = logits / (0.5 + 0.8 * (1 - r))  # softmax temperature annealed, 1.3 -> 0.5
        noise = gumbel_temp * gumbel_noise(logits.shape, generator, device)
        sampled = (logits + noise).argmax(-1)  # (B, N)
        # the sampled token's confidence + Gumbel noise (sampling without replacement);
        # committed tokens get +inf, never to be masked again
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
    # the official MaskGen_KL.sample_tokens -> latents (B, N, C); guidance acts on eps
    cfg = model.config
    B, N, C = prompts['text_tokens'].shape[0], cfg.num_tokens, cfg.token_size
    device = prompts['text_tokens'].device
    guided = s.guidance_scale != 1.0
    ctx, c = model.text_condition(*guidance_batch(prompts, guided), s.aes)
    diffusion = GaussianDiffusion(1000, s.diffusion_steps)
    reps = 2 if guided else 1
    tokens = torch.zeros(B, N, C, device=device)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    keys = draw(torch.rand, (B, N), generator, device)  # a random order per image
    keep = None
    if start is not None:
        init, keep = start
        tokens = torch.where(keep[..., None], init.float() * cfg.scale_factor, tokens)
        mask = ~keep
        keys = keys.masked_fill(keep, 2.0)  # sorted last: committed already
    order = keys.argsort(-1)  # committed from its end
    n_masked = int(mask[0].sum())
    for step, n_next in tqdm(decoding_steps(N, s.num_steps, 'cosine', keep), disable=not progress):
        idx = order[:, n_next:n_masked]  # (B, k) the positions committed at this step
        if idx.shape[1] > 0:
            z = model.backbone(tokens.repeat(reps, 1, 1), mask.repeat(reps, 1), ctx, c)
            z = z.gather(1, idx.repeat(reps, 1)[..., None].expand(-1, -1, z.shape[-1]))
            z_null = None
            if guided:
                z_null = z[B:].flatten(0, 1)  # (B*k, D)
            z = z[:B].flatten(0, 1)
            # as released: the next mask length clamped to >= 1, never the full scale
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

def prompt_inputs(text, null=None):
    # generate()'s prompts from TextEncoder outputs: the prompts', and "" (or negative's)
    out = dict(text_tokens=text['tokens'], text_pooled=text['pooled'])
    if null is not None:
        out.update(null_tokens=null['tokens'], null_pooled=null['pooled'])
    return out

@torch.no_grad()
def encode_prompts(text_encoder, captions, negative_prompt=''):
    return prompt_inputs(text_encoder(list(captions)), text_encoder([negative_prompt]))

# -----------------------------------------------------------------------------
# presets: the four official releases, small ones for CPU; loading

_L = dict(width=1024, depth=16, heads=16)
_XL = dict(width=1280, depth=20, heads=16)
_VQ = dict(quantize='vq', num_tokens=128, codebook_size=8192, tokenizer='vq128')
_KL = dict(quantize='kl', num_tokens=32, token_size=16, tokenizer='kl32')
_SMALL = dict(heads=4, text_embed_dim=64)  # TextEncoder.tiny()'s width
# tokenizer: the TATITOK_PRESETS entry whose tokens it models; shapes-*: TUNING.md
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

def config_from_state_dict(sd, path):
    # an official state dict's config, off its shapes (heads: 16, as released)
    count = lambda prefix: len({k[len(prefix):].split('.')[0] for k in sd if k.startswith(prefix)})
    try:
        if 'embeddings.weight' in sd:
            _, N, D = sd['pos_embed'].shape
            return dict(quantize='vq', num_tokens=N, width=D, depth=count('blocks.'),
                        codebook_size=sd['embeddings.weight'].shape[0] - 1002,  # see MaskGenVQ
                        text_embed_dim=sd['text_embed_proj.weight'].shape[1])
        _, N, D = sd['decoder_pos_embed_learned'].shape
        return dict(quantize='kl', num_tokens=N, width=D, depth=count('decoder_blocks.'),
                    token_size=sd['z_proj.weight'].shape[1],
                    text_embed_dim=sd['text_emb.weight'].shape[1],
                    diffloss_width=sd['diffloss.net.input_proj.weight'].shape[0],
                    diffloss_depth=count('diffloss.net.res_blocks.'))
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"{path}: not a MaskGen state dict") from None
