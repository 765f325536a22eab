"""GPU check: generation and LoRA-learner throughput of a random-init model of Qwen2-0.5B's shape.

Self-contained on purpose: it imports only torch, transformers, peft and the standard library, so it
runs on a lent GPU machine that has those and nothing of openrft's (no vLLM, no hub, no download).

    python bench/gpu.py             # bf16 on cuda; finishes well within 5 minutes on an H100
    python bench/gpu.py --smoke     # a tiny model on CPU in seconds (what the test suite runs)

Measures (i) batched generation with the KV cache, new tokens per second; (ii) the learner: LoRA
forward+backward+AdamW on full-length micro-batches, tokens per second, and its model FLOP
utilization against the card's dense bf16 peak. Model FLOPs count what a frozen-base LoRA step
must do: the forward (2 x matmul params + causal attention) and the backward to the activations
(the same again for the matmuls, 2x for attention); no weight gradients of the frozen base, no
recomputation.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

# Dense bf16 peaks (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H200", 989.0),
    ("A100", 312.0),
)

QWEN2_0_5B = dict(
    hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
    max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
)
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    shape: dict
    gen_batch: int
    prompt_len: int
    new_tokens: int
    learn_batch: int
    seq_len: int
    lora_rank: int
    learn_steps: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def build_model(setup: Setup) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**setup.shape, attn_implementation="sdpa", use_cache=True)
    with setup.device:
        model = Qwen2ForCausalLM(config)
    return model.to(setup.dtype).eval()


def matmul_params(model: torch.nn.Module) -> int:
    """Weights that take part in a matmul per token (every Linear, the tied lm_head included once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def learner_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    matmul = 2.0 * matmul_params(model)
    # causal attention forward: QK^T and AV, 2 FLOPs per MAC, over seq_len/2 keys on average
    attention = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * (seq_len / 2)
    return (matmul + attention) + (matmul + 2 * attention)  # forward + backward to the activations


def bench_generation(model: torch.nn.Module, setup: Setup) -> dict[str, float]:
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (setup.gen_batch, setup.prompt_len), generator=gen)
    prompt = prompt.to(setup.device)
    mask = torch.ones_like(prompt)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
    with torch.inference_mode():
        model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        sync(setup.device)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=setup.new_tokens,
            min_new_tokens=setup.new_tokens, **kwargs,
        )
        sync(setup.device)
        seconds = time.perf_counter() - t0
    new = (out.shape[1] - setup.prompt_len) * setup.gen_batch
    return {"seconds": seconds, "new_tokens": new, "tokens_per_s": new / seconds}


def bench_learner(model: torch.nn.Module, setup: Setup, budget_s: float) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=setup.lora_rank, lora_alpha=2 * setup.lora_rank, target_modules=LORA_TARGETS)
    )
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator(device="cpu").manual_seed(2)
    batch = torch.randint(0, model.config.vocab_size, (setup.learn_batch, setup.seq_len), generator=gen)
    batch = batch.to(setup.device)

    def step() -> float:
        out = peft_model(input_ids=batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    step()  # warm-up (kernel selection, allocator)
    sync(setup.device)
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    times = []
    deadline = time.perf_counter() + budget_s
    for _ in range(setup.learn_steps):
        t0 = time.perf_counter()
        step()  # float(loss) synchronizes
        sync(setup.device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    seconds = sorted(times)[len(times) // 2]  # median step
    tokens = setup.learn_batch * setup.seq_len
    flops = learner_flops_per_token(model, setup.seq_len) * tokens / seconds
    peak_mem = torch.cuda.max_memory_allocated(setup.device) / 2**30 if setup.device.type == "cuda" else float("nan")
    trainable = sum(p.numel() for p in params)
    return {"steps": len(times), "step_s": seconds, "tokens_per_s": tokens / seconds, "tflops": flops / 1e12,
            "peak_mem_gib": peak_mem, "trainable": trainable}


def make_setup(args: argparse.Namespace) -> Setup:
    if args.smoke:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads; on a busy CPU they thrash
        return Setup(torch.device("cpu"), torch.float32, TINY, gen_batch=2, prompt_len=8, new_tokens=4,
                     learn_batch=2, seq_len=32, lora_rank=4, learn_steps=2)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        print("warning: no CUDA device; the full size on CPU takes very long (use --smoke)", file=sys.stderr)
    return Setup(device, torch.bfloat16, QWEN2_0_5B, gen_batch=args.gen_batch, prompt_len=args.prompt_len,
                 new_tokens=args.new_tokens, learn_batch=args.micro_batch, seq_len=args.seq_len,
                 lora_rank=args.lora_rank, learn_steps=args.learn_steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--learn-steps", type=int, default=10)
    parser.add_argument("--learn-budget-s", type=float, default=120.0, help="stop timing learner steps after this")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense bf16 peak")
    args = parser.parse_args(argv)

    setup = make_setup(args)
    card, peak = peak_tflops(setup.device)
    peak = args.peak_tflops or peak
    t_start = time.perf_counter()
    model = build_model(setup)
    n_params = sum(p.numel() for p in model.parameters())
    gen = bench_generation(model, setup)
    learn = bench_learner(model, setup, args.learn_budget_s)
    mfu = learn["tflops"] / peak if peak else None

    print(f"device: {card} | torch {torch.__version__} | dtype {str(setup.dtype).removeprefix('torch.')} | "
          f"model: {'tiny' if args.smoke else 'Qwen2-0.5B shape'}, random init, {n_params / 1e6:.1f} M params")
    rows = [
        ("generation", f"batch {setup.gen_batch} x {setup.new_tokens} new (prompt {setup.prompt_len}), KV cache",
         f"{gen['tokens_per_s']:,.0f} tok/s", f"{gen['seconds']:.2f} s"),
        ("learner", f"LoRA r{setup.lora_rank} ({learn['trainable'] / 1e6:.2f} M trainable), "
                    f"micro-batch {setup.learn_batch} x {setup.seq_len}, fwd+bwd+AdamW",
         f"{learn['tokens_per_s']:,.0f} tok/s", f"{learn['step_s']:.3f} s/step (median of {learn['steps']})"),
        ("learner MFU", f"{learn['tflops']:.1f} TFLOPS model / {f'{peak:.0f}' if peak else '?'} peak bf16",
         f"{mfu:.1%}" if mfu is not None else "n/a", f"peak mem {learn['peak_mem_gib']:.1f} GiB"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"RESULT gen_tok_s={gen['tokens_per_s']:.0f} learn_tok_s={learn['tokens_per_s']:.0f} "
          f"mfu={f'{mfu:.3f}' if mfu is not None else 'n/a'} total_s={time.perf_counter() - t_start:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
