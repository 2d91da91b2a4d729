"""The PyTorch yardstick for `llmpy bench --compare torch` (never used for training).

A plain GPT-2 with the same shapes as llmpy's model: fused qkv,
F.scaled_dot_product_attention (flash attention on a GPU), tanh GELU, tied LM
head over the real vocabulary. Imported only by llmpy.bench when a comparison
is asked for.

How the reference trains (torch_step): fp32 parameters and AdamW state; with
dtype bf16 the forward and the loss run under torch.autocast (matmuls in
bf16, softmax/loss in fp32), as nanoGPT does; optionally torch.compile;
gradient clipping at 1.0; on CUDA the fused AdamW kernel.
"""
import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, C, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.block_size, C)
        self.h = nn.ModuleList(Block(C, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, ids, targets=None):
        """Logits (B, T, V); with targets, the mean cross-entropy instead (inside
        forward so that torch.compile can fuse the loss with the LM head)."""
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(T, device=ids.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        if targets is None:
            return logits
        # the loss in fp32 whatever the matmul precision (bf16 logits lose ~3 digits)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def torch_step(cfg, B, T, device="cpu", dtype="fp32", compile=False, lr=1e-4):
    """(step, model): step() runs one training step on a fixed random batch and
    returns the loss tensor (not .item(): that would wait for the GPU)."""
    torch.manual_seed(0)
    model = TorchGPT(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=True if device == "cuda" else None)  # one kernel for all params
    run = torch.compile(model) if compile else model
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)
    # autocast: parameters stay fp32, matmuls and attention run in bf16
    amp = (torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16"
           else contextlib.nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()
    return step, model
