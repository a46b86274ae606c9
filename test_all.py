"""
All the tests, in one file, on CPU, offline. Run: python -m pytest test_all.py
The parity tests compare against the official numerics in the fixture folder named by PARITY_DIR
(default ../shared/parity); see that folder's README.md for the contract they follow.
"""
import os
import glob
import math

import pytest
import torch

from tatitok import (TATiTok, TATiTokConfig, TextEncoder, CheckpointError, TATITOK_PRESETS, tatitok_config,
                     load_official)

HERE = os.path.dirname(os.path.abspath(__file__))
PARITY_DIR = os.environ.get('PARITY_DIR', os.path.join(HERE, '..', 'shared', 'parity'))
KEYS_DIR = os.path.join(PARITY_DIR, 'official_keys')
torch.set_num_threads(2)

# -----------------------------------------------------------------------------
# parity with the official implementation: one test per case file found in PARITY_DIR

def assert_parity(name, ours, ref):
    """The fixture contract: max |ours - ref| <= 1e-4 * max(1, max |ref|) in float32; integer outputs exactly."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    if not ref.is_floating_point():
        assert torch.equal(ours.cpu().long(), ref.long()), f"{name}: integer outputs differ"
        return
    err = (ours.double().cpu() - ref.double()).abs().max().item()
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{name}: max abs error {err:.3g} > tolerance {tol:.3g}"

def weight_files(case_path):
    """The case's state dicts: the .bin, and the .safetensors where present."""
    stem = case_path[:-len('.pt')]
    return [stem + ext for ext in ('.bin', '.safetensors') if os.path.exists(stem + ext)]

@torch.no_grad()
def run_tatitok_case(case, weights):
    tok = TATiTok.from_pretrained(weights, **case['config'])  # the public loading path of the official releases
    img, guidance = case['inputs']['images'].float(), case['inputs']['text_guidance'].float()
    out = dict(encoder_out=tok.encoder(img, tok.latent_tokens))
    if tok.config.quantize == 'vq':
        out['ids'] = tok.encode(img)
        out['decoded_from_ids'] = tok.decode_tokens(case['outputs']['ids'], guidance)
        out['rand_ids'] = case['outputs']['rand_ids']  # an input to the next line, recorded with the outputs
        out['decoded_from_rand_ids'] = tok.decode_tokens(case['outputs']['rand_ids'], guidance)
    else:
        out['posterior_mean'], out['posterior_logvar'] = tok.encode_posterior(img)
        out['decoded_from_mean'] = tok.decode_tokens(out['posterior_mean'], guidance)
    return out

@torch.no_grad()
def run_clip_case(case, weights):
    cfg = case['config']
    te = TextEncoder.from_text_cfg(cfg['text_cfg'], cfg['embed_dim'], weights=weights, tokenizer=cfg['tokenizer'])
    with pytest.warns(UserWarning, match='truncated'):  # one caption is longer than 77 tokens
        ids = te.tokenize(case['inputs']['captions'])
    assert torch.equal(ids, case['inputs']['token_ids'])
    views = te(ids)
    return dict(tokenizer_guidance=views['guidance'], generator_tokens=views['tokens'], generator_pooled=views['pooled'])

PARITY_RUNNERS = {'tatitok_vq': run_tatitok_case, 'tatitok_kl': run_tatitok_case, 'clip_text': run_clip_case}
PARITY_CASES = sorted(glob.glob(os.path.join(PARITY_DIR, '*.pt')))

@pytest.mark.parametrize('case_path', PARITY_CASES, ids=[os.path.basename(p)[:-3] for p in PARITY_CASES])
def test_parity(case_path):
    """Our modules, loaded through from_pretrained, reproduce the official outputs; and the check is sharp enough
    that a reference moved by 0.1% fails it."""
    case = torch.load(case_path, weights_only=True)
    assert case['kind'] in PARITY_RUNNERS, f"no parity runner for case kind {case['kind']!r}"
    files = weight_files(case_path)
    assert files, f"{case_path}: no .bin or .safetensors beside it"
    for weights in files:
        ours = PARITY_RUNNERS[case['kind']](case, weights)
        assert set(ours) >= set(case['outputs']), f"outputs not produced: {set(case['outputs']) - set(ours)}"
        for name, ref in case['outputs'].items():
            assert_parity(f"{os.path.basename(weights)}: {name}", ours[name], ref)
            if ref.is_floating_point():
                with pytest.raises(AssertionError):
                    assert_parity(name, ours[name], ref * 1.001)

def test_parity_folder_found():
    """The parity tests above must not pass vacuously because PARITY_DIR points nowhere."""
    assert PARITY_CASES, f"no parity cases (*.pt) in PARITY_DIR={PARITY_DIR}"

# -----------------------------------------------------------------------------
# the official key lists: every released tokenizer maps exactly onto its preset

def official_keys(name):
    keys = {}
    with open(os.path.join(KEYS_DIR, name + '.txt')) as f:
        for line in f:
            key, shape, _ = line.rstrip('\n').split('\t')
            keys[key] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
    return keys

TOKENIZER_RELEASES = {'vq32': 'tatitok_bl32_vq', 'vq64': 'tatitok_bl64_vq', 'vq128': 'tatitok_bl128_vq',
                      'kl32': 'tatitok_bl32_vae', 'kl64': 'tatitok_bl64_vae', 'kl128': 'tatitok_sl128_vae'}

@pytest.mark.parametrize('preset', sorted(TOKENIZER_RELEASES))
def test_official_keys_tatitok(preset):
    """The preset's state dict has exactly the keys and shapes of the official release (built on the meta device)."""
    with torch.device('meta'):
        model = TATiTok(tatitok_config(preset))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = official_keys(TOKENIZER_RELEASES[preset])
    assert ours == theirs, f"differ: {sorted(set(ours.items()) ^ set(theirs.items()))[:5]}"

def test_official_keys_embed_prob_ignored():
    """A release saved with the clustering VQ carries quantize.embed_prob; loading ignores it."""
    theirs = official_keys('tatitok_bl128_vq_with_embed_prob')
    with torch.device('meta'):
        model = TATiTok(tatitok_config('vq128'))
    assert set(theirs) - set(model.state_dict()) == {'quantize.embed_prob'}
    cfg = TATiTokConfig(**{**TATITOK_PRESETS['tiny-vq']})
    model = TATiTok(cfg)
    sd = {**model.state_dict(), 'quantize.embed_prob': torch.zeros(cfg.codebook_size)}
    load_official(TATiTok(cfg), sd, 'test', ignore=('quantize.embed_prob',))

# -----------------------------------------------------------------------------
# loading errors: short, naming the file and the first mismatching keys, never a traceback from a library

def test_load_errors(tmp_path):
    model = TATiTok(tatitok_config('tiny-vq'))
    path = str(tmp_path / 'tok.bin')
    torch.save(model.state_dict(), path)
    cfg = {k: v for k, v in TATITOK_PRESETS['tiny-vq'].items()}
    TATiTok.from_pretrained(path, **cfg)  # the good file loads
    with open(path, 'rb') as f:
        data = f.read()
    with open(tmp_path / 'cut.bin', 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='cut.bin'):
        TATiTok.from_pretrained(str(tmp_path / 'cut.bin'), **cfg)
    sd = model.state_dict()
    sd['encoder.extra'] = sd.pop('encoder.ln_pre.weight')
    torch.save(sd, tmp_path / 'renamed.bin')
    with pytest.raises(CheckpointError, match=r"renamed.bin.*encoder.ln_pre.weight.*encoder.extra"):
        TATiTok.from_pretrained(str(tmp_path / 'renamed.bin'), **cfg)
    with pytest.raises(CheckpointError, match='wrong shape'):
        TATiTok.from_pretrained(path, **{**cfg, 'text_embed_dim': 32})
    with pytest.raises(CheckpointError, match='unknown tokenizer'):
        TATiTok.from_pretrained('no-such-model')

def test_offline_download_message(monkeypatch, tmp_path):
    """Offline, an official release that is not cached fails at once with one clear message."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)  # no test reaches for the network
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    with pytest.raises(CheckpointError, match=r'turkeyju/tokenizer_tatitok_bl32_vq.*local file'):
        TATiTok.from_pretrained('vq32')
    with pytest.raises(CheckpointError, match=r'local file'):
        TATiTok.from_pretrained('turkeyju/tokenizer_tatitok_sl128_vae')

# -----------------------------------------------------------------------------
# unit tests of the tokenizer

@pytest.mark.parametrize('preset', sorted(TOKENIZER_RELEASES))
def test_shapes_every_preset(preset):
    """Encode/decode shapes of every released layout (N, C, VQ/KL, 256 px), at a tiny width and depth."""
    cfg = tatitok_config(preset, enc_width=32, enc_layers=1, enc_heads=2, dec_width=32, dec_layers=1, dec_heads=2,
                         text_embed_dim=16, codebook_size=64)
    tok = TATiTok(cfg).eval()
    img, guidance = torch.rand(2, 3, 256, 256), torch.randn(2, 77, 16)
    tokens = tok.encode(img)
    N, C = cfg.num_latent_tokens, cfg.token_size
    assert tokens.shape == ((2, N) if cfg.quantize == 'vq' else (2, N, C))
    recon, aux = tok(img, guidance)
    assert recon.shape == img.shape and tok.decode_tokens(tokens, guidance).shape == img.shape
    assert ('quantizer_loss' if cfg.quantize == 'vq' else 'kl_loss') in aux

def test_straight_through_gradient():
    """The VQ bottleneck passes the reconstruction gradient through to the encoder; losses reach the codebook."""
    torch.manual_seed(0)
    tok = TATiTok(tatitok_config('tiny-vq'))
    recon, aux = tok(torch.rand(2, 3, 32, 32), torch.randn(2, 77, 64))
    recon.square().mean().backward(retain_graph=True)
    assert tok.encoder.patch_embed.weight.grad.abs().sum() > 0  # through the argmin, thanks to straight-through
    assert tok.quantize.embedding.weight.grad is None  # the reconstruction alone does not move the codebook
    aux['quantizer_loss'].backward()
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0
    assert 1 <= aux['perplexity'] <= 16 and 0 < aux['usage'] <= 1

def test_kl_posterior_statistics():
    """DiagonalGaussian samples have the posterior's mean and std; logvar is clamped; the KL is the closed form."""
    from tatitok import DiagonalGaussian
    mean, logvar = torch.full((1, 4, 3), 0.5), torch.full((1, 4, 3), math.log(0.25))
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=-1).expand(20000, 4, 6))
    s = post.sample(torch.Generator().manual_seed(0))
    assert abs(s.mean() - 0.5) < 0.01 and abs(s.std() - 0.5) < 0.01  # 240k samples: standard error ~1e-3
    kl = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25)) * 12
    assert torch.allclose(post.kl()[0], torch.tensor(kl))
    assert DiagonalGaussian(torch.tensor([[[0.0, 100.0]]])).logvar.item() == 20.0

def test_tiny_tokenizer_overfits_one_batch():
    """Training signal: a tiny VQ and a tiny KL tokenizer fit one batch of images (reconstruction MSE falls 3x)."""
    for preset in ('tiny-vq', 'tiny-kl'):
        torch.manual_seed(0)
        tok = TATiTok(tatitok_config(preset))
        img = torch.rand(2, 3, 32, 32) * 0.5 + (torch.arange(2) / 4).view(2, 1, 1, 1)
        guidance = torch.randn(2, 77, 64)
        opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)
        losses = []
        for _ in range(40):
            recon, aux = tok(img, guidance)
            mse = (recon - img).square().mean()
            loss = mse + (aux['quantizer_loss'] if preset == 'tiny-vq' else 1e-6 * aux['kl_loss'])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(mse.item())
        assert losses[-1] < losses[0] / 3, (preset, losses[0], losses[-1])

def test_text_encoder_views_and_truncation():
    """The three views have the right shapes, differ by caption, and an over-long caption is truncated, not an error."""
    te = TextEncoder.tiny()
    with pytest.warns(UserWarning, match='truncated'):
        out = te(['a red circle', 'a blue square', 'word ' * 200])
    assert out['guidance'].shape == (3, 77, 64) and out['tokens'].shape == (3, 77, 64) and out['pooled'].shape == (3, 64)
    assert not torch.allclose(out['pooled'][0], out['pooled'][1])
    again = TextEncoder.from_spec(te.spec)(['a red circle'])  # a checkpoint's spec rebuilds the same tower
    assert torch.allclose(again['pooled'][0], out['pooled'][0], atol=1e-5)  # batch size may change the fp order
