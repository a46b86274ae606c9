"""
All the tests, in one file, on CPU, offline. Run: python -m pytest test_all.py
The parity tests compare against the official numerics in the fixture folder named by PARITY_DIR
(default ../shared/parity); see that folder's README.md for the contract they follow.
"""
import glob
import io
import json
import math
import os
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tatitok import (TATiTok, TATiTokConfig, TextEncoder, CheckpointError, TATITOK_PRESETS, tatitok_config,
                     load_official)
import data

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

# -----------------------------------------------------------------------------
# data.py: shards, folders, the shapes set, filters, exact resume, the pretokenizer

def _jpg(w=48, h=40, rgb=(200, 30, 30), fmt='JPEG'):
    b = io.BytesIO()
    Image.new('RGB', (w, h), rgb).save(b, fmt)
    return b.getvalue()

def _meta(w=512, h=384, **kw):
    return dict(original_width=w, original_height=h, **kw)

def _bad_samples():
    """The five kinds the issue names: a corrupt JPEG, a missing caption, an image too small, an aspect ratio of 3."""
    return [('corrupt', {'jpg': _jpg()[:120], 'txt': 'x', 'json': _meta()}),
            ('nocap', {'jpg': _jpg(), 'json': _meta()}),
            ('small', {'jpg': _jpg(), 'txt': 'small', 'json': _meta(100, 80)}),
            ('wide', {'jpg': _jpg(), 'txt': 'wide', 'json': _meta(900, 300)})]

def _shards(tmp_path, n_shards=4, per_shard=6, bad=True):
    """n_shards shards of good samples (keys s{shard}_{i}), the bad ones appended to shard 0."""
    paths, good = [], []
    for s in range(n_shards):
        samples = [(f"s{s}_{i}", {'jpg': _jpg(40 + i, 36, (20 * i, 100, 50 * s)), 'txt': f"caption {s} {i}",
                                  'json': _meta(aesthetic_score=4.0 + i, pwatermark=0.1 * i)}) for i in range(per_shard)]
        good += [k for k, _ in samples]
        if s == 0 and bad: samples += _bad_samples()
        paths.append(str(tmp_path / f"{s:05d}.tar"))
        data.write_shard(paths[-1], samples)
    return paths, good

def _keys(loader):
    return [k for b in loader for k in b['key']]

def test_shapes_set():
    """shapes: exact palette on grey, deterministic, held-out split differs, single-object mode, 24 eval prompts."""
    assert len(data.SHAPES_EVAL_PROMPTS) == 24 and 'a red circle' in data.SHAPES_EVAL_PROMPTS
    img, cap = data.shapes_sample(3, size=64)
    img2, cap2 = data.shapes_sample(3, size=64)
    assert cap == cap2 and np.array_equal(np.asarray(img), np.asarray(img2)) and img.size == (64, 64)
    pack = lambda a: (np.asarray(a, np.int64) * [65536, 256, 1]).sum(-1)
    palette = pack(list(data.SHAPES_COLOURS.values()) + [data.SHAPES_BG])
    caps, singles = [], 0
    for i in range(200):
        img, cap = data.shapes_sample(i)
        caps.append(cap)
        assert np.isin(pack(np.asarray(img)), palette).all()  # no antialiasing, exact colours
        assert tuple(np.asarray(img)[0, 0]) == data.SHAPES_BG
        singles += not any(r in cap for r in ('left of', 'right of', 'above', 'below'))
    assert 70 < singles < 130  # about half the samples show one object
    assert caps != [data.shapes_sample(i, split='val')[1] for i in range(200)]
    assert not any(' of ' in c or 'above' in c or 'below' in c for c in (data.shapes_sample(i, max_objects=1)[1]
                                                                      for i in range(100)))

def test_classify_shapes_clean_and_noisy():
    """classify_shapes: 100% on clean single objects, >= 95% after blur and noise, the largest of two objects."""
    rng = np.random.default_rng(0)
    clean = noisy = two = 0
    for i in range(100):
        img, cap = data.shapes_sample(i, max_objects=1)
        words = cap.split()
        clean += set(data.classify_shapes(np.asarray(img))) <= set(words)
        x = np.asarray(img.filter(ImageFilter.GaussianBlur(1))).astype(np.float32) + rng.normal(0, 8, (64, 64, 3))
        noisy += set(data.classify_shapes(np.clip(x, 0, 255).astype(np.uint8))) <= set(words)
        img, cap = data.shapes_sample(i, split='val')
        two += set(data.classify_shapes(np.asarray(img))) <= set(cap.split())
    assert clean == 100 and noisy >= 95 and two >= 95, (clean, noisy, two)
    assert data.classify_shapes(np.full((64, 64, 3), 128, np.uint8)) == (None, None)

def test_shapes_loader_fast_and_never_flipped():
    """a 64px batch of 64 in well under 50 ms in-process; flip=True is ignored for shapes (captions say left/right)."""
    it = iter(data.make_loader('shapes', 64, 64, seed=1))
    b = next(it)
    assert b['image'].shape == (64, 3, 64, 64) and b['image'].dtype == torch.float32 and b['image'].is_contiguous()
    assert b['aes'].shape == (64,) and len(b['caption']) == 64
    best = min(_time(lambda: next(it)) for _ in range(5))
    assert best < 0.05, f"{best * 1e3:.1f} ms per batch"
    b2 = next(iter(data.make_loader('shapes', 64, 64, seed=1, flip=True)))
    assert torch.equal(b['image'], b2['image'])

def _time(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t

def test_tar_filters_and_counts(tmp_path):
    """shards: good samples kept; corrupt / no caption / too small / aspect 3 skipped and counted by reason."""
    paths, good = _shards(tmp_path, n_shards=2)
    ld = data.make_loader(str(tmp_path / '{00000..00001}.tar'), 4, 32, train=False)
    b = next(iter(ld))
    assert b['image'].shape == (4, 3, 32, 32) and 0 <= b['image'].min() and b['image'].max() <= 1
    assert sorted(_keys(ld)) == sorted(good)
    c = ld.counts
    assert (c['read'], c['kept'], c['filtered'], c['corrupt']) == (16, 12, 2, 2), c
    assert c['filtered_by'] == {'size': 1, 'aspect': 1} and c['corrupt_by'] == {'image': 1, 'no_caption': 1}
    # aesthetic >= 6 keeps i in {2..5}; watermark < 0.5 keeps i in {0..4}
    ld = data.make_loader(paths, 4, 32, train=False, min_aes=6.0, max_watermark=0.5)
    assert sorted(_keys(ld)) == sorted(f"s{s}_{i}" for s in range(2) for i in (2, 3, 4))
    # metadata filters run before decoding: the corrupt sample (no score) counts as filtered by aesthetic
    assert ld.counts['filtered_by'] == {'aesthetic': 5, 'watermark': 2, 'size': 1, 'aspect': 1}
    assert set(_keys(data.make_loader(paths[0], 4, 32, train=False, min_size=0, max_aspect=0))) >= {'small', 'wide'}

def test_broken_shards_are_skipped_and_counted(tmp_path):
    """a truncated shard keeps its complete head, a garbage file and a missing file count as bad shards."""
    paths, _ = _shards(tmp_path, n_shards=1, bad=False)
    raw = open(paths[0], 'rb').read()
    (tmp_path / 'trunc.tar').write_bytes(raw[:len(raw) // 2])
    (tmp_path / 'junk.tar').write_bytes(b'not a tar' * 200)
    ld = data.make_loader([str(tmp_path / 'trunc.tar'), str(tmp_path / 'junk.tar')], 4, 32, train=False)
    keys = _keys(ld)
    assert 0 < len(keys) < 6 and ld.counts['bad_shards'] == 2 and ld.counts['read'] == len(keys)
    with pytest.raises(data.DataError):
        data.make_loader(str(tmp_path / 'nothing_*.tar'), 4, 32)

def test_folder(tmp_path):
    """folder with subfolders: same-name .txt captions, and the same skips as for shards (sizes from the file)."""
    def put(rel, img, cap):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(img)
        if cap is not None: p.with_suffix('.txt').write_text(cap)
    put('a.jpg', _jpg(300, 260), 'a photo')
    put('sub/b.png', _jpg(260, 300, fmt='PNG'), 'another')
    put('sub/deeper/c.webp', _jpg(256, 256, fmt='WEBP'), 'third')
    put('corrupt.jpg', _jpg(300, 300)[:100], 'broken')
    put('nocap.jpg', _jpg(300, 300), None)
    put('small.jpg', _jpg(100, 100), 'small')
    put('wide.jpg', _jpg(768, 256), 'wide')
    ld = data.make_loader(str(tmp_path), 2, 32, train=False)
    assert sorted(_keys(ld)) == ['a', 'sub/b', 'sub/deeper/c']
    c = ld.counts
    assert (c['read'], c['kept'], c['filtered'], c['corrupt']) == (7, 3, 2, 2), c
    assert c['filtered_by'] == {'aspect': 1, 'size': 1} and c['corrupt_by'] == {'image': 1, 'no_caption': 1}

def test_captions_recaption_and_prefix(tmp_path):
    """recap_txt used with probability 0.95 (prefix stripped, capitalised); recap_prob=0 keeps the original."""
    samples = [(f"k{i}", {'jpg': _jpg(), 'txt': f"alt {i}", 'recap_txt': "The image depicts a red cat.",
                          'json': _meta()}) for i in range(200)]
    path = str(tmp_path / 'r.tar')
    data.write_shard(path, samples)
    caps = [c for b in data.make_loader(path, 50, 16, train=False) for c in b['caption']]
    assert 180 <= caps.count("A red cat.") < 200 and all(c == "A red cat." or c.startswith('alt') for c in caps)
    caps = [c for b in data.make_loader(path, 50, 16, train=False, recap_prob=0) for c in b['caption']]
    assert all(c.startswith('alt') for c in caps)

def test_transforms():
    """shorter side to the target, centre crop for eval (deterministic), random crop for training, flip on request."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    a = data._resize_crop(img, 32, random.Random(0), False, False)
    assert a.shape == (32, 32, 3) and np.array_equal(a, data._resize_crop(img, 32, random.Random(1), False, False))
    crops = {data._resize_crop(img, 32, random.Random(s), True, False).tobytes() for s in range(10)}
    assert len(crops) > 3
    flips = [data._resize_crop(img, 32, random.Random(s), False, True) for s in range(10)]
    assert any(np.array_equal(f, a[:, ::-1]) for f in flips) and any(np.array_equal(f, a) for f in flips)

def test_two_ranks_and_two_workers_are_disjoint(tmp_path):
    """rank 0/1 of 2 (and 2 dataloader workers) read disjoint samples whose union is the whole set."""
    _, good = _shards(tmp_path, n_shards=4)
    src = str(tmp_path / '*.tar')
    r0, r1 = (_keys(data.make_loader(src, 3, 16, train=False, rank=r, world_size=2)) for r in (0, 1))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(good)
    w = _keys(data.make_loader(src, 3, 16, train=False, num_workers=2))
    assert sorted(w) == sorted(good)
    s0, s1 = (_keys(data.make_loader('shapes:val', 8, 16, train=False, rank=r, world_size=2, num_samples=40))
              for r in (0, 1))
    assert not set(s0) & set(s1) and len(s0 + s1) == 40
    with pytest.raises(data.DataError):  # 4 shards < 2 ranks x 4 workers
        data.make_loader(src, 3, 16, rank=0, world_size=2, num_workers=4)
    ld = data.make_loader(src, 3, 16, rank=1, world_size=2, num_workers=4, resample=True)
    assert len(next(iter(ld))['key']) == 3

@pytest.mark.parametrize('num_workers', [0, 2])
def test_exact_resume(tmp_path, num_workers):
    """stop after k batches, restore the state into a fresh loader: exactly the uninterrupted sequence (over epochs)."""
    _shards(tmp_path, n_shards=4)
    src = str(tmp_path / '*.tar')
    make = lambda: data.make_loader(src, 5, 16, seed=3, num_workers=num_workers, flip=True)
    it = iter(make())
    ref = [next(it) for _ in range(12)]  # 24 good samples: 60 samples = 2.5 passes
    ld = make()
    it = iter(ld)
    head = [next(it) for _ in range(5)]
    sd = json.loads(json.dumps(ld.state_dict()))  # survives a checkpoint (json-able, so torch.save-able too)
    ld2 = make()
    ld2.load_state_dict([sd])  # the list of all ranks' states also works
    it2 = iter(ld2)
    got = head + [next(it2) for _ in range(7)]
    assert [b['key'] for b in got] == [b['key'] for b in ref]
    assert all(torch.equal(a['image'], b['image']) for a, b in zip(got, ref))
    assert len({k for b in ref for k in b['key']}) == 24  # every good sample seen, in a shuffled order
    assert ld2.counts['read'] > ld2.counts['kept'] > 0
    with pytest.raises(data.DataError):
        data.make_loader(src, 5, 16, seed=4, num_workers=num_workers).load_state_dict(sd)

def test_shapes_resume():
    """the shapes stream resumes exactly too."""
    ld = data.make_loader('shapes', 4, 16, seed=5)
    it = iter(ld)
    ref = [next(it)['key'] for _ in range(6)]
    ld = data.make_loader('shapes', 4, 16, seed=5)
    it = iter(ld)
    head = [next(it)['key'] for _ in range(2)]
    ld2 = data.make_loader('shapes', 4, 16, seed=5)
    ld2.load_state_dict(ld.state_dict())
    it2 = iter(ld2)
    assert head + [next(it2)['key'] for _ in range(4)] == ref

def test_token_shards(tmp_path):
    """token shards (pretokenizer layout) read through make_loader: VQ uint16 -> long ids, KL -> sample or mean."""
    vq = [(f"v{i}", {'tokens.npy': np.arange(8, dtype=np.uint16) + i, 'txt': f"t{i}", 'json': {'aesthetic_score': 5.5}})
          for i in range(6)]
    data.write_shard(str(tmp_path / 'vq.tar'), vq)
    b = next(iter(data.make_loader(str(tmp_path / 'vq.tar'), 6, 32, train=False)))
    assert b['tokens'].dtype == torch.int64 and b['tokens'].shape == (6, 8) and b['tokens'][2, 0] == 2
    assert torch.allclose(b['aes'], torch.full((6,), 5.5)) and 'image' not in b
    mean = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float16)
    kl = [(f"k{i}", {'tokens.npy': np.stack([mean, np.full_like(mean, -2)]), 'txt': 'x'}) for i in range(4)]
    os.makedirs(tmp_path / 'kl')
    data.write_shard(str(tmp_path / 'kl' / 'kl.tar'), kl)
    m = next(iter(data.make_loader(str(tmp_path / 'kl'), 4, 32, train=False, kl_sample=False)))['tokens']
    s = next(iter(data.make_loader(str(tmp_path / 'kl'), 4, 32, train=False)))['tokens']
    assert torch.allclose(m, torch.from_numpy(mean.astype(np.float32)).expand(4, 4, 3))
    assert m.shape == s.shape == (4, 4, 3) and 0 < (s - m).abs().mean() < 1

def test_cli_stats_and_errors(tmp_path, capsys):
    """stats: last line JSON with read/kept/filtered/corrupt; user errors exit 2 with a short message."""
    _shards(tmp_path, n_shards=1)
    data.main(['stats', str(tmp_path / '{00000..00000}.tar'), '--num_workers', '0'])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out['read'], out['kept'], out['filtered'], out['corrupt']) == (10, 6, 2, 2)
    for argv in (['stats', str(tmp_path / 'missing_*.tar')], ['frobnicate'], ['stats', 'x', '--min_size', 'big'],
                 ['pretokenize', '--input', 'x']):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 2
        assert 'Traceback' not in capsys.readouterr().err

def _tiny_ckpt(tmp_path, preset):
    tatitok = pytest.importorskip('tatitok')
    import dataclasses
    torch.manual_seed(0)
    model = tatitok.TATiTok(tatitok.tatitok_config(preset)).eval()
    path = str(tmp_path / f"{preset}.pt")
    torch.save({'model_args': dataclasses.asdict(model.config), 'model': model.state_dict(), 'ema': None}, path)
    return tatitok, model, path

@pytest.mark.parametrize('preset', ['tiny-vq', 'tiny-kl'])
def test_pretokenize_roundtrip(tmp_path, preset, capsys):
    """decoding the stored tokens gives the same images as encoding and decoding directly; a rerun resumes."""
    tatitok, model, ckpt = _tiny_ckpt(tmp_path, preset)
    src = tmp_path / 'src'
    src.mkdir()
    paths, _ = _shards(src, n_shards=2, per_shard=3)
    out = str(tmp_path / 'tok')
    argv = ['pretokenize', '--tokenizer', ckpt, '--input', str(src), '--output', out, '--batch_size', '4',
            '--num_workers', '0', '--device', 'cpu']
    data.main(argv)
    assert sorted(os.listdir(out)) == ['00000.tar', '00001.tar', 'tokenizer.json']
    tok = data.make_loader(out, 8, 32, train=False, kl_sample=False)
    tb = next(iter(tok))
    ib = next(iter(data.make_loader(str(src), 8, 32, train=False)))  # the same 6 good samples, same order
    assert tb['key'] == ib['key'] and tb['caption'] == ib['caption'] and len(tb['key']) == 6
    cfg = model.config  # any fixed text guidance will do (TextEncoder.tiny() would only add an open_clip import)
    g = torch.randn(6, cfg.text_context_length, cfg.text_embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = model.encode(ib['image'], sample=False) if preset == 'tiny-kl' else model.encode(ib['image'])
        a, b = model.decode_tokens(tb['tokens'], g), model.decode_tokens(direct, g)
    if preset == 'tiny-vq': assert torch.equal(a, b)
    else: assert (a - b).abs().max() < 1e-2  # mean stored in fp16
    mtime = os.path.getmtime(os.path.join(out, '00000.tar'))
    data.main(argv)  # resume: everything done, nothing rewritten
    assert os.path.getmtime(os.path.join(out, '00000.tar')) == mtime
    with pytest.raises(SystemExit) as e:
        data.main(argv[:2] + [str(tmp_path / 'nope.pt')] + argv[3:])
    assert e.value.code == 2
