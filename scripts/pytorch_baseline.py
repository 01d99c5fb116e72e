#!/usr/bin/python3
"""Plain-PyTorch RetNet decoder: a same-machine "PyTorch + torchscale" baseline.

Written from ../shared/RETNET_SPEC.md. It computes what torchscale's RetNetDecoder
(commit 4d1e0e8) computes, with torchscale's module layout, parameter names and op
sequence (materialised decay masks, theta_shift with rotate_every_two, detached
normalisers, per-chunk python loop over the cross-chunk state, one python-level decoder
call per recurrent token), so its speed stands for torchscale's on this machine.

Needs Debian's PyTorch and OpenBLAS: apt-get install python3-torch libopenblas0-pthread (run with
/usr/bin/python3); without OpenBLAS, torch calls the reference BLAS (see blas_gflops).

  pytorch_baseline.py parity DIR...     compare the three forms with torchscale fixtures
  pytorch_baseline.py train  --preset base|medium --mode parallel|chunkwise --batch B --seq T
                             [--chunk-size 128] [--optimizer] [--steps 2] [--threads 2]
  pytorch_baseline.py decode --preset base|medium --batch B --context C --steps N
                             [--chunk-size 128] [--threads 2]
"""

import os
import sys


def _threads_from_argv(argv):
    for i, a in enumerate(argv):
        if a == '--threads' and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith('--threads='):
            return a.split('=', 1)[1]
    return '2'


# Debian's torch calls the system BLAS (OpenBLAS, pthread build) through the generic BLAS
# interface, so torch.set_num_threads does not reach it: pin it before torch loads it.
_THREADS = _threads_from_argv(sys.argv)
os.environ.setdefault('OPENBLAS_NUM_THREADS', _THREADS)
os.environ.setdefault('OMP_NUM_THREADS', _THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ---------------------------------------------------------------------------------------
# Configuration (torchscale RetNetConfig field names; defaults as lib/config.ts)

CONFIG_DEFAULTS = {
    'decoder_embed_dim': 768,
    'decoder_value_embed_dim': 1280,
    'decoder_retention_heads': 3,
    'decoder_ffn_embed_dim': 1280,
    'decoder_layers': 12,
    'decoder_normalize_before': True,
    'activation_fn': 'gelu',
    'layernorm_embedding': False,
    'share_decoder_input_output_embed': False,
    'deepnorm': False,
    'layernorm_eps': 1e-6,
    'no_scale_embedding': True,
    'recurrent_chunk_size': 512,
    'chunkwise_recurrent': False,
    'dropout': 0.0,
    'activation_dropout': 0.0,
    'drop_path_rate': 0.0,
    'no_output_layer': False,
}

# scripts/bench.ts PRESETS
PRESETS = {
    'base': dict(vocab_size=32000, decoder_embed_dim=512, decoder_value_embed_dim=864, decoder_retention_heads=2,
                 decoder_ffn_embed_dim=864, decoder_layers=6, activation_fn='swish', no_scale_embedding=False),
    'medium': dict(vocab_size=32000, decoder_embed_dim=1024, decoder_value_embed_dim=1728, decoder_retention_heads=4,
                   decoder_ffn_embed_dim=1728, decoder_layers=16, activation_fn='swish', no_scale_embedding=False),
}


class Config:
    def __init__(self, raw):
        merged = dict(CONFIG_DEFAULTS)
        merged.update(raw)
        if 'vocab_size' not in merged:
            raise ValueError('config: vocab_size is required')
        if merged.get('multiway'):
            raise ValueError('config: multiway=True is not supported')
        if (merged.get('moe_freq') or 0) > 0:
            raise ValueError('config: moe_freq > 0 is not supported')
        if merged['no_output_layer']:
            raise ValueError('config: no_output_layer=True is not supported')
        if merged['activation_fn'] not in ('gelu', 'swish', 'relu'):
            raise ValueError('config: activation_fn must be gelu, swish or relu')
        self.__dict__.update(merged)
        D, Dv, H = self.decoder_embed_dim, self.decoder_value_embed_dim, self.decoder_retention_heads
        if D % H or Dv % H or (D // H) % 2:
            raise ValueError('config: D and Dv must divide by heads, and the key dim must be even')


# ---------------------------------------------------------------------------------------
# Modules (names match torchscale's state_dict, spec §2)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) [* weight]; normalised in float32 (spec §8.1)."""

    def __init__(self, dim, eps, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim))
        else:
            self.register_parameter('weight', None)

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y.type_as(x)
        if self.weight is not None:
            y = y * self.weight
        return y


def rotate_every_two(x):
    # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): interleaved pairs (spec §3.3)
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def theta_shift(x, sin, cos):
    return (x * cos) + (rotate_every_two(x) * sin)


class RetNetRelPos(nn.Module):
    """Rotation angles and decay constants for the three forms (spec §3, §5-§7)."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.decoder_retention_heads
        dk = cfg.decoder_embed_dim // H
        # float32 linspace exponent, float32 power (spec §3.2); checkpoints overwrite it.
        angle = 1.0 / (10000 ** torch.linspace(0, 1, dk // 2))
        angle = angle.unsqueeze(-1).repeat(1, 2).flatten()
        # decay = fl32(ln(fl32(1 - 2^(-5-h)))) (spec §3.1)
        decay = torch.log(1 - 2 ** (-5 - torch.arange(H, dtype=torch.float)))
        self.register_buffer('angle', angle)
        self.register_buffer('decay', decay)

    def forward(self, slen, mode, chunk_size=None):
        if mode == 'recurrent':
            # one token at absolute position slen - 1
            sin = torch.sin(self.angle * (slen - 1))
            cos = torch.cos(self.angle * (slen - 1))
            return (sin, cos), self.decay.exp()
        index = torch.arange(slen).to(self.decay)
        sin = torch.sin(index[:, None] * self.angle[None, :])
        cos = torch.cos(index[:, None] * self.angle[None, :])
        if mode == 'chunkwise':
            C = chunk_size
            block_index = torch.arange(C).to(self.decay)
            mask = torch.tril(torch.ones(C, C).to(self.decay))
            mask = torch.masked_fill(block_index[:, None] - block_index[None, :], ~mask.bool(), float('inf'))
            mask = torch.exp(mask * self.decay[:, None, None])
            mask = torch.nan_to_num(mask)
            last = mask[:, -1]  # [H, C]: gamma^(C-1-j)
            value_inner_decay = (last / last.sum(dim=-1, keepdim=True)).unsqueeze(-1)  # beta_j
            scale = mask.sum(dim=-1, keepdim=True).sqrt()  # sigma_i
            inner_mask = mask / scale
            cross_decay = torch.exp(self.decay * C)[:, None, None]  # Gamma
            query_inner_decay = torch.exp(self.decay[:, None] * (block_index + 1))
            query_inner_decay = query_inner_decay[:, :, None] / (scale / last.sum(dim=-1)[:, None, None])  # alpha_i
            return (sin, cos), (inner_mask, cross_decay, query_inner_decay, value_inner_decay)
        mask = torch.tril(torch.ones(slen, slen).to(self.decay))
        mask = torch.masked_fill(index[:, None] - index[None, :], ~mask.bool(), float('inf'))
        mask = torch.exp(mask * self.decay[:, None, None])
        mask = torch.nan_to_num(mask)
        mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()
        return (sin, cos), mask


class MultiScaleRetention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, Dv, H = cfg.decoder_embed_dim, cfg.decoder_value_embed_dim, cfg.decoder_retention_heads
        self.embed_dim = D
        self.value_dim = Dv
        self.num_heads = H
        self.key_dim = D // H
        self.head_dim = Dv // H
        self.scaling = self.key_dim ** -0.5
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, Dv, bias=False)
        self.g_proj = nn.Linear(D, Dv, bias=False)
        self.out_proj = nn.Linear(Dv, D, bias=False)
        self.group_norm = RMSNorm(self.head_dim, cfg.layernorm_eps, elementwise_affine=False)
        self.reset_parameters()

    def reset_parameters(self):
        # torchscale init (spec §9)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(lin.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.out_proj.weight, gain=2 ** -1)

    def parallel_forward(self, qr, kr, v, mask):
        bsz, tgt_len, _ = v.size()
        vr = v.view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
        qk_mat = qr @ kr.transpose(-1, -2)  # [B, H, T, T]
        qk_mat = qk_mat * mask
        qk_mat = qk_mat / qk_mat.detach().abs().sum(dim=-1, keepdim=True).clamp(min=1, max=5e4)
        output = torch.matmul(qk_mat, vr)  # [B, H, T, dv]
        return output.transpose(1, 2)  # [B, T, H, dv]

    def recurrent_forward(self, qr, kr, v, decay, incremental_state):
        bsz = v.size(0)
        v = v.view(bsz, self.num_heads, self.head_dim, 1)
        kv = kr * v  # [B, H, dv, dk]
        if 'prev_key_value' in incremental_state:
            prev_kv = incremental_state['prev_key_value']
            prev_scale = incremental_state['scale']
            scale = prev_scale * decay + 1
            kv = prev_kv * (prev_scale.sqrt() * decay / scale.sqrt()).view(self.num_heads, 1, 1) + kv / scale.sqrt().view(
                self.num_heads, 1, 1)
        else:
            scale = torch.ones_like(decay)
        incremental_state['prev_key_value'] = kv
        incremental_state['scale'] = scale
        return torch.sum(qr * kv, dim=3)  # [B, H, dv]

    def chunk_recurrent_forward(self, qr, kr, v, inner_mask):
        mask, cross_decay, query_inner_decay, value_inner_decay = inner_mask
        bsz, tgt_len, _ = v.size()
        chunk_len = mask.size(1)
        num_chunks = tgt_len // chunk_len
        assert tgt_len % chunk_len == 0
        H, dk, dv = self.num_heads, self.key_dim, self.head_dim
        qr = qr.view(bsz, H, num_chunks, chunk_len, dk).transpose(1, 2)  # [B, N, H, C, dk]
        kr = kr.view(bsz, H, num_chunks, chunk_len, dk).transpose(1, 2)
        v = v.view(bsz, num_chunks, chunk_len, H, dv).transpose(2, 3)  # [B, N, H, C, dv]
        kr_t = kr.transpose(-1, -2)

        qk_mat = qr @ kr_t  # [B, N, H, C, C]
        qk_mat = qk_mat * mask
        inner_scale = qk_mat.detach().abs().sum(dim=-1, keepdim=True).clamp(min=1)
        qk_mat = qk_mat / inner_scale
        inner_output = torch.matmul(qk_mat, v)  # [B, N, H, C, dv]

        kv = kr_t @ (v * value_inner_decay)  # per-chunk state contribution [B, N, H, dk, dv]
        kv_recurrent = []
        cross_scale = []
        kv_state = torch.zeros(bsz, H, dk, dv).to(v)
        kv_scale = torch.ones(bsz, H, 1, 1).to(v)
        for i in range(num_chunks):
            kv_recurrent.append(kv_state / kv_scale)
            cross_scale.append(kv_scale)
            kv_state = kv_state * cross_decay + kv[:, i]
            kv_scale = kv_state.detach().abs().sum(dim=-2, keepdim=True).max(dim=-1, keepdim=True).values.clamp(min=1)
        kv_recurrent = torch.stack(kv_recurrent, dim=1)
        cross_scale = torch.stack(cross_scale, dim=1)

        all_scale = torch.maximum(inner_scale, cross_scale)
        align_inner_scale = all_scale / inner_scale
        align_cross_scale = all_scale / cross_scale
        cross_output = (qr * query_inner_decay) @ kv_recurrent
        output = inner_output / align_inner_scale + cross_output / align_cross_scale
        return output.transpose(2, 3)  # [B, N, C, H, dv]

    def handoff_state(self, kr, v, decay, n_real, state_out):
        """Recurrent state after the first n_real positions of a full-sequence pass (spec §10.1).
        torchscale has no such hand-off; this only exists so `decode` can build a long context fast."""
        with torch.no_grad():
            bsz = v.size(0)
            H, dk, dv = self.num_heads, self.key_dim, self.head_dim
            kr = kr[:, :, :n_real]  # [B, H, N, dk]
            vr = v[:, :n_real].reshape(bsz, n_real, H, dv).transpose(1, 2)  # [B, H, N, dv]
            dist = (n_real - 1 - torch.arange(n_real)).to(decay)
            w = torch.exp(decay[:, None] * dist[None, :])  # [H, N]: gamma^(N-1-m)
            S = (vr * w[None, :, :, None]).transpose(-1, -2) @ kr  # [B, H, dv, dk]
            gamma = decay.exp()
            s = torch.ones_like(gamma)  # the fp32 recurrence s <- s*gamma + 1, as the recurrent form
            for _ in range(n_real - 1):
                s = s * gamma + 1
            state_out['prev_key_value'] = S / s.sqrt().view(H, 1, 1)
            state_out['scale'] = s

    def forward(self, x, rel_pos, mode, incremental_state=None, handoff=None):
        bsz, tgt_len, _ = x.size()
        (sin, cos), inner_mask = rel_pos
        q = self.q_proj(x)
        k = self.k_proj(x)
        v = self.v_proj(x)
        g = self.g_proj(x)
        k = k * self.scaling
        q = q.view(bsz, tgt_len, self.num_heads, self.key_dim).transpose(1, 2)
        k = k.view(bsz, tgt_len, self.num_heads, self.key_dim).transpose(1, 2)
        qr = theta_shift(q, sin, cos)
        kr = theta_shift(k, sin, cos)
        if mode == 'recurrent':
            output = self.recurrent_forward(qr, kr, v, inner_mask, incremental_state)
        elif mode == 'chunkwise':
            output = self.chunk_recurrent_forward(qr, kr, v, inner_mask)
        else:
            output = self.parallel_forward(qr, kr, v, inner_mask)
        if handoff is not None:
            decay, n_real, state_out = handoff
            self.handoff_state(kr, v, decay, n_real, state_out)
        output = self.group_norm(output).reshape(bsz, tgt_len, self.head_dim * self.num_heads)
        output = F.silu(g) * output  # the gate is always swish
        return self.out_proj(output)


ACTIVATIONS = {'gelu': F.gelu, 'swish': F.silu, 'relu': F.relu}


class GLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, Fd = cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim
        self.activation_fn = ACTIVATIONS[cfg.activation_fn]
        self.dropout_module = nn.Dropout(cfg.dropout)
        self.activation_dropout_module = nn.Dropout(cfg.activation_dropout)
        self.fc1 = nn.Linear(D, Fd, bias=False)
        self.fc2 = nn.Linear(Fd, D, bias=False)
        self.gate = nn.Linear(D, Fd, bias=False)

    def forward(self, x):
        x_shape = x.shape
        x = x.reshape(-1, x.size(-1))
        g = self.gate(x)
        x = self.fc1(x)
        x = self.activation_fn(x.float()).type_as(x) * g
        x = self.activation_dropout_module(x)
        x = self.fc2(x)
        x = x.view(x_shape)
        return self.dropout_module(x)


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class DecoderLayer(nn.Module):
    def __init__(self, cfg, depth):
        super().__init__()
        D = cfg.decoder_embed_dim
        self.dropout_module = nn.Dropout(cfg.dropout)
        rate = float(np.linspace(0, cfg.drop_path_rate, cfg.decoder_layers)[depth]) if cfg.drop_path_rate > 0 else 0.0
        self.drop_path = DropPath(rate) if rate > 0 else None
        self.retention = MultiScaleRetention(cfg)
        self.normalize_before = cfg.decoder_normalize_before
        self.retention_layer_norm = RMSNorm(D, cfg.layernorm_eps)
        self.ffn = GLU(cfg)
        self.final_layer_norm = RMSNorm(D, cfg.layernorm_eps)
        self.alpha = math.pow(2.0 * cfg.decoder_layers, 0.25) if cfg.deepnorm else 1.0

    def residual_connection(self, x, residual):
        return residual * self.alpha + x

    def residual_block(self, x, norm, branch):
        """x + branch(norm(x)) (pre-norm) or norm(x + branch(x)) (post-norm), with drop path."""
        residual = x
        if self.normalize_before:
            x = norm(x)
        x = branch(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = norm(x)
        return x

    def forward(self, x, rel_pos, mode, incremental_state=None, handoff=None):
        x = self.residual_block(x, self.retention_layer_norm, lambda h: self.dropout_module(
            self.retention(h, rel_pos, mode, incremental_state=incremental_state, handoff=handoff)))
        return self.residual_block(x, self.final_layer_norm, self.ffn)


class RetNetDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, V, L = cfg.decoder_embed_dim, cfg.vocab_size, cfg.decoder_layers
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(D)
        self.dropout_module = nn.Dropout(cfg.dropout)
        # fairseq-style embedding init N(0, D^-1/2) (the caller's embedding in torchscale)
        self.embed_tokens = nn.Embedding(V, D)
        nn.init.normal_(self.embed_tokens.weight, mean=0, std=D ** -0.5)
        self.output_projection = nn.Linear(D, V, bias=False)
        if cfg.share_decoder_input_output_embed:
            self.output_projection.weight = self.embed_tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0, std=D ** -0.5)
        self.layernorm_embedding = RMSNorm(D, cfg.layernorm_eps) if cfg.layernorm_embedding else None
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(L)])
        self.layer_norm = RMSNorm(D, cfg.layernorm_eps) if cfg.decoder_normalize_before else None
        self.retnet_rel_pos = RetNetRelPos(cfg)
        self.chunk_size = cfg.recurrent_chunk_size
        if cfg.deepnorm:
            init_scale = math.pow(8.0 * L, 0.25)
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if any(s in name for s in ('fc1', 'fc2', 'out_proj', 'v_proj')):
                        p.div_(init_scale)

    def forward_embedding(self, tokens):
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout_module(x)

    def forward(self, tokens, mode='parallel', chunk_size=None, incremental_state=None, slen=None, handoff_state=None):
        """mode 'parallel' | 'chunkwise': tokens [B, T], logits [B, T, V].
        mode 'recurrent': tokens [B, 1] is the token at position slen - 1; incremental_state is
        a dict filled per layer index (as torchscale's); logits [B, 1, V].
        handoff_state: a dict to fill with each layer's recurrent state after the last token."""
        x = self.forward_embedding(tokens)
        if mode == 'recurrent':
            rel_pos = self.retnet_rel_pos(slen, 'recurrent')
        else:
            slen = tokens.size(1)
        n_real = slen
        padding_len = 0
        if mode == 'chunkwise':
            C = chunk_size or self.chunk_size
            if slen % C != 0:
                padding_len = C - slen % C
                slen = slen + padding_len
                x = F.pad(x, (0, 0, 0, padding_len))
            rel_pos = self.retnet_rel_pos(slen, 'chunkwise', chunk_size=C)
        elif mode == 'parallel':
            rel_pos = self.retnet_rel_pos(slen, 'parallel')
        for idx, layer in enumerate(self.layers):
            if incremental_state is not None:
                if idx not in incremental_state:
                    incremental_state[idx] = {}
                layer_state = incremental_state[idx]
            else:
                layer_state = None
            handoff = None
            if handoff_state is not None:
                handoff_state[idx] = {}
                handoff = (self.retnet_rel_pos.decay, n_real, handoff_state[idx])
            x = layer(x, rel_pos, mode, incremental_state=layer_state, handoff=handoff)
        if padding_len > 0:
            x = x[:, :-padding_len]
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.output_projection(x)


def next_token_loss(logits, tokens):
    V = logits.size(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------
# safetensors (8-byte LE header length, JSON header, raw LE data)

_DTYPES = {'F32': np.float32, 'F64': np.float64, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32}


def read_safetensors(path):
    with open(path, 'rb') as f:
        data = f.read()
    (n,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + n].decode('utf-8'))
    base = 8 + n
    meta = header.pop('__metadata__', None) or {}
    tensors = {}
    for name, info in header.items():
        if info['dtype'] not in _DTYPES:
            raise ValueError(f'{path}: {name}: dtype {info["dtype"]} not supported')
        start, end = info['data_offsets']
        arr = np.frombuffer(data, dtype=np.dtype(_DTYPES[info['dtype']]).newbyteorder('<'), count=(end - start) // np.dtype(
            _DTYPES[info['dtype']]).itemsize, offset=base + start)
        tensors[name] = torch.from_numpy(arr.astype(np.float32).reshape(info['shape']))
    return tensors, meta


def load_model(fixture_dir):
    with open(os.path.join(fixture_dir, 'config.json')) as f:
        cfg = Config(json.load(f))
    model = RetNetDecoder(cfg)
    tensors, _ = read_safetensors(os.path.join(fixture_dir, 'model.safetensors'))
    expected = set(model.state_dict().keys())
    missing = expected - set(tensors)
    unexpected = set(tensors) - expected
    if missing or unexpected:
        raise ValueError(f'{fixture_dir}: missing {sorted(missing)}, unexpected {sorted(unexpected)}')
    with torch.no_grad():
        for name, p in model.state_dict(keep_vars=True).items():
            if cfg.share_decoder_input_output_embed and name == 'output_projection.weight':
                if not torch.equal(tensors[name], tensors['embed_tokens.weight']):
                    raise ValueError(f'{fixture_dir}: tied model with different embedding and output projection')
                continue
            p.copy_(tensors[name])
    return cfg, model


# ---------------------------------------------------------------------------------------
# parity


def read_f32(path, shape):
    arr = np.fromfile(path, dtype='<f4')
    return torch.from_numpy(arr.astype(np.float32)).reshape(shape)


def _err(got, ref):
    got = got.detach().float()
    ref = ref.float()
    abs_err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    return abs_err, abs_err / scale if scale > 0 else abs_err


def parity_one(d, tol):
    cfg, model = load_model(d)
    model.eval()
    with open(os.path.join(d, 'tokens.json')) as f:
        tokens = torch.tensor(json.load(f)['tokens'], dtype=torch.long)
    with open(os.path.join(d, 'meta.json')) as f:
        meta = json.load(f)
    B, T = tokens.shape
    V = cfg.vocab_size
    C = meta.get('chunk_size', cfg.recurrent_chunk_size)
    training = meta.get('training', {})
    ref_loss = {
        'parallel': training.get('loss_value'),
        'chunkwise': training.get('loss_chunkwise', training.get('loss_chunkwise_value')),
        'recurrent': training.get('loss_recurrent_value'),
    }
    name = os.path.basename(os.path.normpath(d))
    ok = True
    rows = []

    def check(what, abs_err, rel_err, limit=tol, gate=True, note=''):
        nonlocal ok
        bad = gate and not rel_err <= limit
        ok = ok and not bad
        rows.append(f'  {what:<36} max abs {abs_err:.3e}  rel {rel_err:.3e}{"  FAIL" if bad else ""}{note}')

    # parallel and chunkwise: forward + loss + backward, compare logits, loss and gradients
    for mode, gdir in (('parallel', 'grads'), ('chunkwise', 'grads_chunkwise')):
        model.zero_grad(set_to_none=True)
        logits = model(tokens, mode=mode, chunk_size=C)
        loss = next_token_loss(logits, tokens)
        loss.backward()
        ref = read_f32(os.path.join(d, f'logits_{mode}.f32'), (B, T, V))
        check(f'{mode} logits', *_err(logits, ref))
        if ref_loss[mode] is not None:
            a = abs(loss.item() - ref_loss[mode])
            check(f'{mode} loss', a, a / abs(ref_loss[mode]))
        gpath = os.path.join(d, gdir)
        if os.path.isdir(gpath):
            worst = (0.0, 0.0, '')
            params = dict(model.named_parameters())
            for fn in sorted(os.listdir(gpath)):
                pname = fn[:-len('.f32')]
                if pname not in params:
                    raise ValueError(f'{gpath}/{fn}: no such parameter')
                p = params[pname]
                a, r = _err(p.grad, read_f32(os.path.join(gpath, fn), tuple(p.shape)))
                if r >= worst[1]:
                    worst = (a, r, pname)
            check(f'{mode} grads (worst param)', worst[0], worst[1], note=f'  [{worst[2]}]')

    with torch.no_grad():
        # recurrent: the whole decoder one token at a time, as torchscale drives it
        state = {}
        outs = []
        for t in range(T):
            outs.append(model(tokens[:, t:t + 1], mode='recurrent', incremental_state=state, slen=t + 1))
        logits = torch.cat(outs, dim=1)
        ref = read_f32(os.path.join(d, 'logits_recurrent.f32'), (B, T, V))
        check('recurrent logits', *_err(logits, ref))
        if ref_loss['recurrent'] is not None:
            loss = next_token_loss(logits, tokens).item()
            a = abs(loss - ref_loss['recurrent'])
            check('recurrent loss', a, a / abs(ref_loss['recurrent']))
        H = cfg.decoder_retention_heads
        dk, dv = cfg.decoder_embed_dim // H, cfg.decoder_value_embed_dim // H
        worst_kv, worst_s = (0.0, 0.0), (0.0, 0.0)
        ref_states = []
        for l in range(cfg.decoder_layers):
            ref_kv = read_f32(os.path.join(d, f'state/layer{l}.prev_key_value.f32'), (B, H, dv, dk))
            ref_s = read_f32(os.path.join(d, f'state/layer{l}.scale.f32'), (H,))
            ref_states.append((ref_kv, ref_s))
            worst_kv = max(worst_kv, _err(state[l]['prev_key_value'], ref_kv), key=lambda e: e[1])
            worst_s = max(worst_s, _err(state[l]['scale'], ref_s), key=lambda e: e[1])
        check('recurrent state prev_key_value', *worst_kv)
        check('recurrent state scale', *worst_s)

        # prefill hand-off (ours, torchscale has none): informational, since the states come
        # from the prefill mode's hidden states, which differ from the recurrent ones by the
        # group-norm eps effect (spec §10)
        for mode in ('parallel', 'chunkwise'):
            hs = {}
            model(tokens, mode=mode, chunk_size=C, handoff_state=hs)
            wk, ws = (0.0, 0.0), (0.0, 0.0)
            for l, (ref_kv, ref_s) in enumerate(ref_states):
                wk = max(wk, _err(hs[l]['prev_key_value'], ref_kv), key=lambda e: e[1])
                ws = max(ws, _err(hs[l]['scale'], ref_s), key=lambda e: e[1])
            check(f'(info) {mode}-prefill state kv', *wk, gate=False)
            check(f'(info) {mode}-prefill state scale', *ws, gate=False)

    print(f'{name}: B={B} T={T} C={C} {"ok" if ok else "FAILED"}')
    for r in rows:
        print(r)
    return ok


def cmd_parity(args):
    torch.set_num_threads(args.threads)
    all_ok = True
    for d in args.dirs:
        all_ok = parity_one(d, args.tol) and all_ok
    print('parity:', 'all fixtures within' if all_ok else 'FAILED, limit', f'{args.tol:g} relative')
    return 0 if all_ok else 1


# ---------------------------------------------------------------------------------------
# timing


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def blas_gflops():
    """The BLAS's rate on one 1024^3 product: Debian's libblas3 alternative is the reference
    BLAS (about 2.4 GFLOP/s on the Zen 3 VM against 96-100 for OpenBLAS), which makes training
    ~20x slower, and batch-1 decode about 2x faster (no threads to wake per small product):
    the figures say which one ran."""
    a = torch.randn(1024, 1024)
    a @ a
    start = time.perf_counter()
    a @ a
    rate = 2 * 1024 ** 3 / (time.perf_counter() - start) / 1e9
    if rate < 20:
        print(f'pytorch_baseline: the BLAS runs {rate:.1f} GFLOP/s: torch is calling the reference BLAS '
              '(apt-get install libopenblas0-pthread for OpenBLAS)', file=sys.stderr)
    return rate


def preset_model(args, training):
    """The preset's model with seeded random weights, in train or eval mode, on args.threads threads."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    cfg = Config(PRESETS[args.preset])
    return cfg, RetNetDecoder(cfg).train(training)


def cmd_train(args):
    cfg, model = preset_model(args, training=True)
    V = cfg.vocab_size
    B, T = args.batch, args.seq
    tokens = (torch.arange(B * T, dtype=torch.long) * 7919 % V).view(B, T)
    opt = None
    if args.optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step():
        logits = model(tokens, mode=args.mode, chunk_size=args.chunk_size)
        loss = next_token_loss(logits, tokens)
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: allocations, page faults
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    per_step = (time.perf_counter() - start) / args.steps
    print(json.dumps({
        'impl': 'pytorch', 'torch': torch.__version__, 'preset': args.preset, 'mode': args.mode, 'batch': B,
        'seqLen': T, 'chunkSize': args.chunk_size if args.mode == 'chunkwise' else None, 'optimizer': bool(args.optimizer),
        'threads': args.threads, 'steps': args.steps, 'tokensPerSecond': B * T / per_step,
        'peakRssBytes': peak_rss_bytes(), 'blasGflops': blas_gflops(),
    }))
    return 0


def cmd_decode(args):
    cfg, model = preset_model(args, training=False)
    V = cfg.vocab_size
    B, Ctx = args.batch, args.context
    prompt = torch.tensor([[(t * 7 + b * 31) % V for t in range(Ctx)] for b in range(B)], dtype=torch.long)
    ids = torch.tensor([[(b * 13 + 1) % V] for b in range(B)], dtype=torch.long)
    with torch.no_grad():
        start = time.perf_counter()
        state = {}
        if args.prefill == 'chunkwise':
            # our hand-off (spec §10.1): torchscale itself can only go token by token
            handoff = {}
            model(prompt, mode='chunkwise', chunk_size=args.chunk_size, handoff_state=handoff)
            for idx, s in handoff.items():
                state[idx] = s
        else:
            for t in range(Ctx):
                model(prompt[:, t:t + 1], mode='recurrent', incremental_state=state, slen=t + 1)
        prefill_s = time.perf_counter() - start
        pos = Ctx
        for _ in range(4):  # warm-up, as scripts/bench.ts
            pos += 1
            model(ids, mode='recurrent', incremental_state=state, slen=pos)
        start = time.perf_counter()
        for _ in range(args.steps):
            pos += 1
            model(ids, mode='recurrent', incremental_state=state, slen=pos)
        per_step = (time.perf_counter() - start) / args.steps
    print(json.dumps({
        'impl': 'pytorch', 'torch': torch.__version__, 'preset': args.preset, 'batch': B, 'context': Ctx,
        'steps': args.steps, 'threads': args.threads, 'prefill': args.prefill,
        'prefillTokensPerSecond': B * Ctx / prefill_s, 'tokensPerSecond': B / per_step, 'msPerToken': per_step * 1000,
        'peakRssBytes': peak_rss_bytes(), 'blasGflops': blas_gflops(),
    }))
    return 0


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)

    p = sub.add_parser('parity', help='compare with torchscale fixtures')
    p.add_argument('dirs', nargs='+')
    p.add_argument('--tol', type=float, default=1e-4, help='max relative error (max abs / max |ref|)')
    p.add_argument('--threads', type=int, default=2)

    p = sub.add_parser('train', help='time forward + loss + backward (+ AdamW)')
    p.add_argument('--preset', choices=sorted(PRESETS), required=True)
    p.add_argument('--mode', choices=('parallel', 'chunkwise'), required=True)
    p.add_argument('--batch', type=int, required=True)
    p.add_argument('--seq', type=int, required=True)
    p.add_argument('--chunk-size', type=int, default=128)
    p.add_argument('--optimizer', action='store_true', help='clip_grad_norm_(1.0) + AdamW step, as our trainStep')
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--threads', type=int, default=2)

    p = sub.add_parser('decode', help='time recurrent decode steps after a context')
    p.add_argument('--preset', choices=sorted(PRESETS), required=True)
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--context', type=int, required=True)
    p.add_argument('--steps', type=int, required=True)
    p.add_argument('--chunk-size', type=int, default=128)
    p.add_argument('--prefill', choices=('chunkwise', 'recurrent'), default='chunkwise',
                   help='how to build the context state: our chunkwise hand-off (default) or token by token as torchscale')
    p.add_argument('--threads', type=int, default=2)

    args = ap.parse_args(argv)
    for k in ('batch', 'seq', 'steps', 'chunk_size', 'context', 'threads'):
        if getattr(args, k, 1) is not None and getattr(args, k, 1) < 1:
            ap.error(f'--{k.replace("_", "-")} must be >= 1')
    if args.cmd == 'train' and args.seq < 2:
        ap.error('--seq must be >= 2')
    return {'parity': cmd_parity, 'train': cmd_train, 'decode': cmd_decode}[args.cmd](args)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
