"""Reproduce moe-viz's default model, `assets/moe-viz-mini`, with one command.

Steps: build the corpus if missing (moe_viz.training.corpus), train a byte-level BPE
tokenizer, train a small Mixtral (8 experts, top-2) with the router load-balancing
loss on CPU (main phase), then continue briefly with a per-layer load-balancing loss
at a larger coefficient and a small constant LR (balance phase), save it as bf16
safetensors with its tokenizer, then evaluate it on the held-out split and write the
model card (README.md) and DATA_LICENSES.md beside it.

The same arguments work with ``moe-viz train-default`` (this module's ``main``).

    python scripts/train_default_model.py                 # the shipped model (~70 min on 2 cores)
    python scripts/train_default_model.py --quick --out /tmp/m   # seconds, tiny config
    python scripts/train_default_model.py --eval-only     # re-measure and rewrite the card
    python scripts/train_default_model.py --init-from assets/moe-viz-mini --skip-main \
        --out /tmp/balanced                               # balance phase only, from a model

Why a balance phase: transformers' load_balancing_loss_func pools expert load and
router probability over all layers before combining them, so it balances each expert
summed across layers; one layer can overuse an expert another layer underuses. The
per-layer loss (per_layer_balance_loss) balances every layer on its own.

Training stops at --max-steps or after --max-minutes, whichever comes first; the
learning-rate schedule follows whichever budget is nearer to running out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import corpus as build_corpus
from . import default_model_out

# The shipped model's folder in a source checkout; None elsewhere (then --out is required).
DEFAULT_OUT: Path | None = default_model_out()
DEFAULT_PROG = "python scripts/train_default_model.py"  # recorded in the card as the command
EOS = "<|endoftext|>"
PAD = "<|pad|>"

# Prompts for the greedy samples in the model card, one per domain.
SAMPLE_PROMPTS: dict[str, str] = {
    "prose": "The tutorial explains how",
    "code": "def read_config(path):\n",
    "scripture": "1:1 In the beginning",
    "shakespeare": "Romeo.\nO, she doth",
    "fortunes": "A computer is",
    "chinese": "春眠不觉晓，",
    "numbers": "17 + 25 = ",
}


@dataclass
class ModelSpec:
    """Architecture of the Mixtral we train (sizes chosen for <= 20 MB of bf16 weights)."""

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 256  # per expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 4096  # RoPE; the app sends prompts up to 2,048 tokens
    router_aux_loss_coef: float = 0.02


@dataclass
class TrainSpec:
    """Optimisation and budget."""

    seq_len: int = 256
    batch_size: int = 16
    max_steps: int = 3000
    max_minutes: float = 60.0
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_windows: int = 24  # held-out windows of seq_len per domain
    log_every: int = 25
    threads: int = 2  # upper bound; see the probing in train_model
    aux_mode: str = "pooled"  # main phase: "pooled" (transformers) or "per-layer"
    # Balance phase: continue from the main phase's weights with the per-layer aux loss.
    balance_steps: int = 600  # 0 skips the phase
    balance_minutes: float = 8.0
    balance_lr: float = 2e-4  # constant after balance_warmup_steps
    balance_warmup_steps: int = 10
    balance_aux_coef: float = 0.1

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "max_steps", "eval_windows", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_minutes <= 0:
            raise ValueError(f"--max-minutes must be positive, got {self.max_minutes}")
        if not 0 < self.lr < 1:
            raise ValueError(f"--lr must be in (0, 1), got {self.lr}")
        if self.aux_mode not in ("pooled", "per-layer"):
            raise ValueError(f"--aux-mode must be 'pooled' or 'per-layer', got {self.aux_mode!r}")
        if self.balance_steps < 0:
            raise ValueError(f"--balance-steps must be >= 0, got {self.balance_steps}")
        if self.balance_minutes <= 0:
            raise ValueError(f"--balance-minutes must be positive, got {self.balance_minutes}")
        if not 0 < self.balance_lr < 1:
            raise ValueError(f"--balance-lr must be in (0, 1), got {self.balance_lr}")
        if self.balance_aux_coef < 0:
            raise ValueError(f"--balance-aux-coef must be >= 0, got {self.balance_aux_coef}")


@dataclass
class RunSpec:
    """Everything a run needs; --quick swaps in tiny values."""

    out: Path | None = DEFAULT_OUT
    corpus: Path = build_corpus.DEFAULT_CORPUS_DIR
    domains: tuple[str, ...] = build_corpus.ALL_DOMAINS
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    tokenizer_chars_per_domain: int = 1_000_000
    quick: bool = False
    command: str = ""
    init_from: Path | None = None  # start from this model folder instead of from scratch
    skip_main: bool = False  # with init_from: run only the balance phase


def quick_spec(out: Path, command: str) -> RunSpec:
    """A tiny run over the offline domains only (no downloads), same code path."""
    return RunSpec(
        out=out,
        corpus=build_corpus.DEFAULT_CORPUS_DIR / "quick",
        domains=build_corpus.OFFLINE_DOMAINS,
        model=ModelSpec(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
        ),
        train=TrainSpec(
            seq_len=64,
            batch_size=4,
            max_steps=6,
            max_minutes=2.0,
            warmup_steps=2,
            eval_windows=2,
            log_every=2,
            balance_steps=3,
            balance_minutes=1.0,
            balance_warmup_steps=1,
        ),
        tokenizer_chars_per_domain=100_000,
        quick=True,
        command=command,
    )


# --------------------------------------------------------------------------- corpus + tokenizer


def ensure_corpus(spec: RunSpec) -> None:
    if build_corpus.corpus_ready(spec.corpus, spec.domains):
        return
    cfg = build_corpus.CorpusConfig(
        out_dir=spec.corpus, domains=spec.domains, seed=spec.train.seed, local_stdlib=spec.quick
    )
    if spec.quick:
        cfg = replace(cfg, max_train_chars=150_000, max_valid_chars=20_000, numbers_chars=200_000)
    build_corpus.build_corpus(cfg)


def load_split(spec: RunSpec, split: str) -> dict[str, list[str]]:
    return {d: build_corpus.read_jsonl(spec.corpus / d / f"{split}.jsonl") for d in spec.domains}


def train_tokenizer(texts: dict[str, list[str]], spec: RunSpec):
    """Byte-level BPE with every digit its own pre-token (numbers stay compositional)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.model.vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def sample() -> list[str]:
        # The same number of characters from each domain, so no script starves the vocab.
        out: list[str] = []
        for chunks in texts.values():
            total = 0
            for c in chunks:
                if total >= spec.tokenizer_chars_per_domain:
                    break
                out.append(c)
                total += len(c)
        return out

    tok.train_from_iterator(sample(), trainer)
    # Byte-level BPE never needs an unknown token; bos and eos share the separator.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=spec.model.max_position_embeddings,
    )


def encode_domains(tokenizer, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Concatenate each domain's chunks with EOS between them into one id stream."""
    eos = tokenizer.eos_token_id
    streams = {}
    for domain, chunks in texts.items():
        ids = tokenizer(chunks, add_special_tokens=False)["input_ids"]
        flat = np.fromiter((t for seq in ids for t in (*seq, eos)), dtype=np.int64)
        streams[domain] = torch.from_numpy(flat)  # (n_tokens,)
    return streams


# --------------------------------------------------------------------------- model + training


def build_model(spec: ModelSpec, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        num_local_experts=spec.num_local_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        max_position_embeddings=spec.max_position_embeddings,
        router_aux_loss_coef=spec.router_aux_loss_coef,
        router_jitter_noise=0.0,
        # Inference callers ask for router logits explicitly; don't pay for them by default.
        output_router_logits=False,
        tie_word_embeddings=True,  # saves vocab*hidden parameters, ~4 MB in bf16
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return MixtralForCausalLM(cfg)


def per_layer_balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Mean over layers of each layer's own Switch-style load-balancing loss.

    For one layer with N experts over T tokens: f_i = (tokens that send one of their
    top_k picks to expert i) / T, so sum_i f_i = top_k; P_i = mean router probability of
    expert i. The layer's loss is N * sum_i f_i * P_i, which is top_k for perfectly even
    routing (f_i = k/N, P_i = 1/N) and grows as load and probability pile onto the same
    experts. Only P carries a gradient (f comes from an argmax), as in Switch.
    Unlike transformers' load_balancing_loss_func, nothing is pooled across layers.
    router_logits: one (T, N) tensor per layer.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (T, N)
        n_exp = probs.shape[-1]
        picks = probs.topk(top_k, dim=-1).indices  # (T, k)
        mask = torch.zeros_like(probs).scatter_(1, picks, 1.0)  # (T, N), k ones a row
        f = mask.mean(0)  # (N,), sums to k
        p = probs.mean(0)  # (N,), sums to 1
        losses.append(n_exp * (f * p).sum())
    return torch.stack(losses).mean()


def lr_at(progress: float, step: int, t: TrainSpec) -> float:
    """Linear warmup, then cosine to min_lr_ratio over the budget's progress (0..1)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cos)


def sample_batch(
    streams: dict[str, torch.Tensor], domains: list[str], seq_len: int, batch_size: int, gen: torch.Generator
) -> torch.Tensor:
    """Single-domain windows, domains drawn uniformly (even sampling whatever their size)."""
    rows = []
    picks = torch.randint(len(domains), (batch_size,), generator=gen)
    for p in picks.tolist():
        stream = streams[domains[p]]
        start = int(torch.randint(len(stream) - seq_len, (1,), generator=gen))
        rows.append(stream[start : start + seq_len])
    return torch.stack(rows)  # (batch, seq_len)


def balance_spec(t: TrainSpec) -> TrainSpec:
    """The balance phase as a TrainSpec: its own budget, constant small LR, per-layer aux."""
    return replace(
        t,
        max_steps=t.balance_steps,
        max_minutes=t.balance_minutes,
        lr=t.balance_lr,
        min_lr_ratio=1.0,
        warmup_steps=t.balance_warmup_steps,
        aux_mode="per-layer",
    )


def train_model(
    model,
    streams: dict[str, torch.Tensor],
    t: TrainSpec,
    aux_coef: float | None = None,
    seed_offset: int = 0,
    name: str = "train",
) -> dict:
    """Train in place. aux_mode "pooled" uses the model's own aux loss (transformers'
    load_balancing_loss_func, pooled over layers) at router_aux_loss_coef; "per-layer"
    uses per_layer_balance_loss at aux_coef (default router_aux_loss_coef)."""
    gen = torch.Generator().manual_seed(t.seed + seed_offset)
    k = model.config.num_experts_per_tok
    coef = model.config.router_aux_loss_coef if aux_coef is None else aux_coef
    per_layer = t.aux_mode == "per-layer"
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(0.9, 0.95),
    )
    domains = list(streams)
    tokens_per_step = t.batch_size * t.seq_len
    budget_s = t.max_minutes * 60
    start = time.time()
    history: list[dict] = []
    ema_loss = ema_aux = None
    # The machine is shared: when another job holds a core, a 2-thread (niced) process
    # stalls at every OpenMP barrier waiting for its starved thread, and 1 thread is
    # faster. So every probe_every steps we time a few steps at each thread count and
    # keep the faster one until the next probe.
    thread_choices = sorted({1, t.threads})
    probe_len, probe_every = 3, 60
    probe_times: dict[int, list[float]] = {n: [] for n in thread_choices}
    threads = t.threads
    model.train()
    bar = tqdm(total=t.max_steps, desc=name, mininterval=5, dynamic_ncols=False, ncols=110)
    step = 0
    while step < t.max_steps:
        elapsed = time.time() - start
        if elapsed >= budget_s:
            print(f"\n[{name}] wall-clock budget of {t.max_minutes} min reached at step {step}", flush=True)
            break
        progress = max(step / t.max_steps, elapsed / budget_s)
        lr = lr_at(progress, step, t)
        for group in opt.param_groups:
            group["lr"] = lr
        phase = step % probe_every
        probing = len(thread_choices) > 1 and phase < probe_len * len(thread_choices)
        if probing:
            threads = thread_choices[phase // probe_len]
        elif phase == probe_len * len(thread_choices) and len(thread_choices) > 1:
            threads = min(thread_choices, key=lambda n: sorted(probe_times[n])[len(probe_times[n]) // 2])
            probe_times = {n: [] for n in thread_choices}
        torch.set_num_threads(threads)
        step_start = time.time()
        batch = sample_batch(streams, domains, t.seq_len, t.batch_size, gen)  # (B, T)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=batch, output_router_logits=True)
            # Same shift as transformers' causal-LM loss (labels = inputs).
            lm = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
            aux_t = per_layer_balance_loss(out.router_logits, k) if per_layer else out.aux_loss.float()
        opt.zero_grad(set_to_none=True)
        (lm + coef * aux_t).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if probing:
            probe_times[threads].append(time.time() - step_start)
        step += 1
        aux = aux_t.item()
        lm_loss = lm.item()
        ema_loss = lm_loss if ema_loss is None else 0.95 * ema_loss + 0.05 * lm_loss
        ema_aux = aux if ema_aux is None else 0.95 * ema_aux + 0.05 * aux
        tok_s = step * tokens_per_step / max(time.time() - start, 1e-9)
        bar.update(1)
        bar.set_postfix(
            loss=f"{ema_loss:.3f}", aux=f"{ema_aux:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}", thr=threads
        )
        if step % t.log_every == 0 or step == 1:
            history.append(
                {
                    "step": step,
                    "loss": round(ema_loss, 4),
                    "aux": round(ema_aux, 4),
                    "lr": lr,
                    "elapsed_s": round(time.time() - start, 1),
                }
            )
            print(
                f"\n[{name}] step {step} loss {ema_loss:.3f} aux {ema_aux:.3f} lr {lr:.2e} "
                f"tok/s {tok_s:,.0f} threads {threads} elapsed {time.time() - start:,.0f}s",
                flush=True,
            )
    bar.close()
    wall = time.time() - start
    model.eval()
    return {
        "steps": step,
        "wall_s": round(wall, 1),
        "tokens": step * tokens_per_step,
        "tokens_per_s": round(step * tokens_per_step / max(wall, 1e-9), 1),
        "final_loss_ema": round(ema_loss or float("nan"), 4),
        "final_aux_ema": round(ema_aux or float("nan"), 4),
        "history": history,
        "aux_mode": t.aux_mode,
        "aux_coef": coef,
        "budget_steps": t.max_steps,
        "budget_minutes": t.max_minutes,
        "lr": t.lr,
        "warmup_steps": t.warmup_steps,
        "min_lr_ratio": t.min_lr_ratio,
    }


def save(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------- evaluation


def eval_windows(stream: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    usable = min(n, len(stream) // seq_len)
    if usable == 0:
        raise RuntimeError(f"held-out stream of {len(stream)} tokens is shorter than {seq_len}")
    return stream[: usable * seq_len].view(usable, seq_len)  # (n_windows, seq_len)


@torch.no_grad()
def evaluate(model, tokenizer, valid: dict[str, torch.Tensor], t: TrainSpec) -> dict:
    """Held-out loss (plain and token-shuffled) and routing statistics per domain."""
    model.eval()
    gen = torch.Generator().manual_seed(t.seed + 1)
    cfg = model.config
    n_layers, n_exp, k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    domains = list(valid)
    top1 = np.zeros((n_layers, len(domains), n_exp), dtype=np.int64)  # top-1 counts
    topk = np.zeros((n_layers, len(domains), n_exp), dtype=np.int64)  # top-k assignments
    per_domain: dict[str, dict] = {}
    for di, domain in enumerate(tqdm(domains, desc="eval", mininterval=5)):
        windows = eval_windows(valid[domain], t.seq_len, t.eval_windows)  # (W, T)
        losses, shuffled_losses = [], []
        for w in windows.split(8):
            out = model(input_ids=w, labels=w, output_router_logits=True)
            losses.append(float(out.loss) * w.shape[0])
            for layer, logits in enumerate(out.router_logits):  # each (W*T, n_exp)
                idx = logits.float().topk(k, dim=-1).indices  # (W*T, k)
                top1[layer, di] += np.bincount(idx[:, 0].numpy(), minlength=n_exp)
                topk[layer, di] += np.bincount(idx.flatten().numpy(), minlength=n_exp)
            # Same tokens, random order within each window: what the model knows about
            # order (not just unigram frequency) is the gap between the two losses.
            perm = torch.argsort(torch.rand(w.shape, generator=gen), dim=1)  # (w, T)
            ws = torch.gather(w, 1, perm)  # (w, T)
            shuffled_losses.append(float(model(input_ids=ws, labels=ws).loss) * w.shape[0])
        loss = sum(losses) / len(windows)
        sloss = sum(shuffled_losses) / len(windows)
        per_domain[domain] = {
            "tokens": int(windows.numel()),
            "loss": loss,
            "ppl": math.exp(loss),
            "shuffled_loss": sloss,
            "shuffled_ppl": math.exp(sloss),
        }
    return {"per_domain": per_domain, **routing_stats(top1, topk, domains, k)}


def routing_stats(top1: np.ndarray, topk: np.ndarray, domains: list[str], k: int) -> dict:
    """MI(domain; top-1 expert) in bits and load balance, per layer."""
    n_layers, _, n_exp = top1.shape
    mi, busiest, busiest_top1, shares = [], [], [], []
    for layer in range(n_layers):
        joint = top1[layer] / top1[layer].sum()  # (domains, experts)
        pd = joint.sum(1, keepdims=True)  # (domains, 1)
        pe = joint.sum(0, keepdims=True)  # (1, experts)
        nz = joint > 0
        mi.append(float((joint[nz] * np.log2(joint[nz] / (pd @ pe)[nz])).sum()))
        load = topk[layer].sum(0) / topk[layer].sum()  # (experts,) sums to 1
        busiest.append(float(load.max() * n_exp))  # 1.0 = perfectly fair
        load1 = top1[layer].sum(0) / top1[layer].sum()
        busiest_top1.append(float(load1.max() * n_exp))
        shares.append((top1[layer] / top1[layer].sum(1, keepdims=True)).tolist())
    return {
        "domains": domains,
        "mi_bits": mi,
        "busiest_over_fair": busiest,
        "busiest_over_fair_top1": busiest_top1,
        "top1_share": shares,
        "mi_max_bits": math.log2(len(domains)),
    }


@torch.no_grad()
def greedy_samples(model, tokenizer, domains: tuple[str, ...], max_new_tokens: int) -> dict:
    samples = {}
    for domain in domains:
        prompt = SAMPLE_PROMPTS[domain]
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        samples[domain] = {
            "prompt": prompt,
            "completion": tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True),
        }
    return samples


def count_params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    cfg = model.config
    active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_local_experts
    return {"total": total, "experts": experts, "active_per_token": active}


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None, prog: str = DEFAULT_PROG) -> tuple[RunSpec, bool]:
    """Parse the command line into a RunSpec (ValueError on bad values). ``prog`` is the command
    recorded in the model card (two words, so fill_main_budget can strip it again)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"model folder to write (default {DEFAULT_OUT or 'none: required outside a source checkout'})",
    )
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny config, a few steps, offline")
    ap.add_argument("--eval-only", action="store_true", help="load --out, re-evaluate and rewrite the model card")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--aux-coef", type=float, default=None, help="router_aux_loss_coef")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--aux-mode",
        choices=("pooled", "per-layer"),
        default=None,
        help="main phase's load-balancing loss (default pooled, transformers')",
    )
    ap.add_argument("--balance-steps", type=int, default=None, help="balance phase step budget (0 skips the phase)")
    ap.add_argument("--balance-minutes", type=float, default=None)
    ap.add_argument("--balance-lr", type=float, default=None)
    ap.add_argument(
        "--balance-aux-coef",
        type=float,
        default=None,
        help="coefficient of the per-layer aux loss in the balance phase",
    )
    ap.add_argument(
        "--init-from", type=Path, default=None, help="start from this model folder (its tokenizer and weights)"
    )
    ap.add_argument("--skip-main", action="store_true", help="with --init-from: run only the balance phase")
    args = ap.parse_args(argv)
    if args.skip_main and args.init_from is None:
        raise ValueError("--skip-main needs --init-from")
    command = f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out if args.out is not None else DEFAULT_OUT  # None outside a checkout: run() refuses
    spec = quick_spec(out, command) if args.quick else RunSpec(out=out, command=command)
    if args.corpus is not None:
        spec.corpus = args.corpus
    overrides = {
        k: v
        for k, v in {
            "max_steps": args.max_steps,
            "max_minutes": args.max_minutes,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "seed": args.seed,
            "aux_mode": args.aux_mode,
            "balance_steps": args.balance_steps,
            "balance_minutes": args.balance_minutes,
            "balance_lr": args.balance_lr,
            "balance_aux_coef": args.balance_aux_coef,
        }.items()
        if v is not None
    }
    spec.train = replace(spec.train, **overrides)  # __post_init__ validates
    if args.aux_coef is not None:
        if args.aux_coef < 0:
            raise ValueError(f"--aux-coef must be >= 0, got {args.aux_coef}")
        spec.model = replace(spec.model, router_aux_loss_coef=args.aux_coef)
    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        spec.train = replace(spec.train, threads=args.threads)
    spec.init_from, spec.skip_main = args.init_from, args.skip_main
    if args.skip_main and spec.train.balance_steps == 0:
        raise ValueError("--skip-main with --balance-steps 0 would train nothing")
    return spec, args.eval_only


def fill_main_budget(train_info: dict) -> None:
    """Records from before the balance phase lack the main phase's budget: re-read it from
    the command that trained it."""
    if "command" in train_info and "budget_steps" not in train_info:
        main_t = parse_args(shlex.split(train_info["command"])[2:])[0].train
        train_info.update(
            budget_steps=main_t.max_steps,
            budget_minutes=main_t.max_minutes,
            lr=main_t.lr,
            warmup_steps=main_t.warmup_steps,
            min_lr_ratio=main_t.min_lr_ratio,
            aux_mode=main_t.aux_mode,
        )


def train_phases(spec: RunSpec, metrics_path: Path) -> dict:
    """Main phase (unless --skip-main) then balance phase; saves spec.out, returns metrics.

    The returned dict keeps the main phase's numbers at the top level (as before the
    balance phase existed) and the balance phase's under "balance"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    train_text = load_split(spec, "train")
    if spec.init_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(spec.init_from)
        model = AutoModelForCausalLM.from_pretrained(spec.init_from, dtype=torch.float32)
        print(f"[init] {spec.init_from}: {len(tokenizer)} tokens", flush=True)
    else:
        tokenizer = train_tokenizer(train_text, spec)
        print(f"[tokenizer] {len(tokenizer)} tokens in {time.time() - t0:.0f}s", flush=True)
    streams = encode_domains(tokenizer, train_text)
    for d, s in streams.items():
        print(f"[data] {d:12s} {len(s):>10,d} train tokens", flush=True)
    if spec.init_from is None:
        torch.manual_seed(spec.train.seed)
        model = build_model(spec.model, tokenizer)
    params = count_params(model)
    print(f"[model] {params['total']:,d} parameters ({params['active_per_token']:,d} active per token)", flush=True)

    if spec.skip_main:
        # The main phase happened in an earlier run: carry its record over.
        prev = spec.corpus / "train_metrics" / f"{spec.init_from.resolve().name}.json"
        train_info = json.loads(prev.read_text()) if prev.exists() else {}
        train_info.pop("balance", None)
        train_info["init_from"] = str(spec.init_from)
        fill_main_budget(train_info)
    else:
        train_info = train_model(model, streams, spec.train, name="main")
        train_info["command"] = spec.command  # --eval-only must still show how it was trained
    train_info["train_tokens_per_domain"] = {d: len(s) for d, s in streams.items()}
    if spec.train.balance_steps > 0:
        # Continue from the weights as saved (bf16), like a run started with --init-from.
        model = model.to(torch.bfloat16).to(torch.float32)
        bal = train_model(
            model,
            streams,
            balance_spec(spec.train),
            aux_coef=spec.train.balance_aux_coef,
            seed_offset=1000,
            name="balance",
        )
        bal["command"] = spec.command
        train_info["balance"] = bal
    save(model, tokenizer, spec.out)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(train_info, indent=1))
    print(f"[save] {spec.out}", flush=True)
    return train_info


def run(spec: RunSpec, eval_only: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.out is None:
        raise ValueError(
            "--out is required here: moe_viz is not running from a source checkout, so there is no "
            "shipped assets/moe-viz-mini folder to write; give --out DIR, then load the model with "
            "MOE_VIZ_DEFAULT_MODEL=DIR"
        )
    torch.set_num_threads(spec.train.threads)
    random.seed(spec.train.seed)
    np.random.seed(spec.train.seed)
    torch.manual_seed(spec.train.seed)
    ensure_corpus(spec)
    # Training numbers live outside the shipped folder so --eval-only can reuse them.
    metrics_path = spec.corpus / "train_metrics" / f"{spec.out.resolve().name}.json"
    if eval_only:
        train_info = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        fill_main_budget(train_info)
    else:
        train_info = train_phases(spec, metrics_path)

    # Evaluate exactly what users get: the saved folder, loaded the standard way.
    tokenizer = AutoTokenizer.from_pretrained(spec.out)
    model = AutoModelForCausalLM.from_pretrained(spec.out, dtype=torch.float32)
    valid = encode_domains(tokenizer, load_split(spec, "valid"))
    results = evaluate(model, tokenizer, valid, spec.train)
    results["samples"] = greedy_samples(model, tokenizer, spec.domains, max_new_tokens=16 if spec.quick else 48)
    results["params"] = count_params(model)
    results["vocab_size"] = len(tokenizer)
    results["weights_bytes"] = (spec.out / "model.safetensors").stat().st_size
    results["train"] = train_info
    results["spec"] = json.loads(json.dumps(asdict(spec), default=str))
    results["corpus"] = json.loads((spec.corpus / "corpus_info.json").read_text())
    results["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    # Imported late on purpose: the card template can be fixed while a long run trains.
    from .model_card import write_data_licenses, write_model_card

    write_model_card(spec.out, results)
    write_data_licenses(spec.out, results)
    for layer, (mi, b) in enumerate(zip(results["mi_bits"], results["busiest_over_fair"])):
        print(f"[eval] layer {layer}: MI {mi:.3f} bits, busiest/fair {b:.2f}", flush=True)
    for d, r in results["per_domain"].items():
        print(
            f"[eval] {d:12s} loss {r['loss']:.3f} ppl {r['ppl']:.1f} | shuffled "
            f"{r['shuffled_loss']:.3f} ppl {r['shuffled_ppl']:.1f}",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> None:
    spec, eval_only = parse_args(argv, prog=prog)
    run(spec, eval_only=eval_only)


if __name__ == "__main__":
    main()
