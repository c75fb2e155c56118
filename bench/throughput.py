"""Training throughput of train_gpt.py on synthetic tokens: warmup, then timed steps.

Run from the repo root:
    python3 bench/throughput.py                          (GPU: the default model, compiled)
    RUN_PRESET=smoke python3 bench/throughput.py         (CPU: the tiny smoke model, seconds)
    python3 bench/throughput.py --warmup 20 --steps 50   (more steps)
Model, batch and optimizer settings are train_gpt.py's env knobs (unknown ones are refused).

Prints key:value lines as it goes: the device and settings first, then one line per step as soon
as that step is done (`warmup_step:i/N step_ms:...`: the first one includes torch.compile;
`timed_step:i/N step_ms:...`), so a run cut short still shows how far it got. Then ms_per_step and
tokens_per_s of the real step (train_gpt.train_step then the EMA update) over all timed steps, mfu
(model FLOPs per token from the config x tokens/s over the bf16 dense peak of the GPU found; n/a
on CPU or an unknown GPU), peak_mem_mib, and a breakdown (fwd_bwd_ms, optimizer_ms, ema_ms)
measured in extra steps with a device sync between the parts. Single process; the tokens are
random ids, so the loss says nothing.

Per-step times on GPU are CUDA event times between the ends of consecutive steps. To print step
i-1 the host waits for it while step i is already queued, so the GPU never idles for the printing;
the host can then run at most one step ahead, which a GPU-bound step does not notice.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

# bf16 dense tensor-core peaks (no sparsity) from NVIDIA's data sheets, in FLOP/s.
BF16_DENSE_PEAK = {
    "H100 80GB HBM3": 989e12,  # H100 SXM
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
}


def gpu_peak_flops() -> tuple[str, float | None]:
    """(device name, bf16 dense peak or None when unknown or no GPU)."""
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_DENSE_PEAK.items() if k in name), None)
    return name, peak


def flops_per_token(model: tg.GPT, hp: tg.Hyperparameters) -> float:
    """Training FLOPs per token: 6 x (weights multiplied per token) + causal attention
    (QK^T and AV: 2 x 2 x T x d per layer forward, half masked, x3 for forward + backward)."""
    order = model.layer_order(model.looping)
    per_block = [
        sum(m.weight.numel() for m in b.modules() if isinstance(m, tg.CastedLinear)) for b in model.blocks
    ]
    matmul = sum(per_block[i] for i in order)
    outside = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, tg.CastedLinear) and not name.startswith("blocks.")
    )
    head = hp.vocab_size * hp.model_dim  # tied: the embedding matrix as the output head
    attention = 6 * len(order) * hp.train_seq_len * hp.model_dim
    return 6 * (matmul + outside + (head if hp.tie_embeddings else 0)) + attention


class SyntheticLoader:
    """next_batch() like DistributedTokenLoader's, from one pre-made random batch on the device."""

    def __init__(self, hp: tg.Hyperparameters, rt: tg.Runtime):
        gen = torch.Generator().manual_seed(hp.seed)
        ids = torch.randint(0, hp.vocab_size, (hp.microbatch_tokens + 1,), generator=gen).to(rt.device)
        self.x, self.y = ids[:-1].view(-1, hp.train_seq_len), ids[1:].view(-1, hp.train_seq_len)

    def next_batch(self, micro_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class StepMarks:
    """Step-end marks: CUDA events on GPU (read one step late, never draining the queue), host
    clock readings on CPU (where every op is synchronous)."""

    def __init__(self, rt: tg.Runtime):
        self.cuda = rt.device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self, i: int) -> float:
        """Milliseconds of step i (1-based): from mark i-1 to mark i; waits for mark i on GPU."""
        a, b = self.marks[i - 1], self.marks[i]
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return 1000 * (b - a)


def run_steps(rt: tg.Runtime, step, n: int, label: str, eager: bool = False) -> float:
    """Runs n steps, printing `<label>:i/n step_ms:...` for each as soon as it is known; returns
    the mean ms per step over the whole loop (host clock, device synced at both ends). eager
    (warmup) prints each step when it ends; otherwise a step's line waits until the next step is
    queued, so the wait never leaves the GPU idle."""
    marks = StepMarks(rt)
    tg.sync(rt)
    t0 = time.perf_counter()
    marks.mark()

    def report(i: int) -> None:
        print(tg.kv(**{label: f"{i}/{n}"}, step_ms=round(marks.step_ms(i), 2)), flush=True)

    for i in range(1, n + 1):
        step()
        marks.mark()
        if eager or i >= 2:
            report(i if eager else i - 1)
    tg.sync(rt)
    elapsed_ms = 1000 * (time.perf_counter() - t0)
    if n and not eager:
        report(n)
    return elapsed_ms / max(n, 1)


def timed(rt: tg.Runtime, fn) -> float:
    tg.sync(rt)
    t0 = time.perf_counter()
    fn()
    tg.sync(rt)
    return 1000 * (time.perf_counter() - t0)


def breakdown(model, train_model, loader, optimizers, ema, hp, rt, steps: int) -> dict[str, float]:
    """Mean ms of forward+backward, optimizer (clip + steps + zero_grad) and EMA, synced apart."""
    totals = {"fwd_bwd_ms": 0.0, "optimizer_ms": 0.0, "ema_ms": 0.0}

    def fwd_bwd():
        for _ in range(rt.grad_accum_steps):
            x, y = loader.next_batch(hp.microbatch_tokens, hp.train_seq_len)
            with tg.autocast(rt):
                loss = train_model(x, y) / rt.grad_accum_steps
            loss.backward()

    def optimize():
        if hp.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(steps):
        totals["fwd_bwd_ms"] += timed(rt, fwd_bwd)
        totals["optimizer_ms"] += timed(rt, optimize)
        totals["ema_ms"] += timed(rt, lambda: ema.update(model, 1e9))
    return {k: round(v / steps, 2) for k, v in totals.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compile, allocator)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    args = parser.parse_args(argv)
    hp = tg.Hyperparameters()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    rt = tg.Runtime(0, 1, 0, device, hp.train_batch_tokens // hp.microbatch_tokens, "bench")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(hp.seed)
    attention_problem = tg.select_attention_backend(rt)
    if attention_problem:
        print(f"WARNING attention_backend:sdpa, not FlashAttention-3: {attention_problem}", flush=True)
    model, train_model, compiled = tg.build_model(hp, rt)
    optimizers = tg.build_optimizers(model, hp, rt)
    ema = tg.EMA(model, hp.ema_decay, hp.ema_window_frac)
    loader = SyntheticLoader(hp, rt)

    def step():
        tg.train_step(train_model, model, loader, optimizers, hp, rt)
        ema.update(model, 1e9)

    name, peak = gpu_peak_flops()
    print(tg.kv(device=name.replace(" ", "_"), compile=int(compiled), attention_backend=tg.ATTENTION_BACKEND))
    print(
        tg.kv(
            preset=hp.preset_name,
            batch_tokens=hp.train_batch_tokens,
            seq_len=hp.train_seq_len,
            grad_accum_steps=rt.grad_accum_steps,
        ),
        flush=True,
    )
    run_steps(rt, step, args.warmup, "warmup_step", eager=True)
    ms = run_steps(rt, step, args.steps, "timed_step")
    print(tg.kv(warmup_steps=args.warmup, timed_steps=args.steps, ms_per_step=round(ms, 2)), flush=True)
    tokens_per_s = hp.train_batch_tokens / (ms / 1000)
    flops = flops_per_token(model, hp)
    mfu = f"{100 * flops * tokens_per_s / peak:.1f}%" if peak else "n/a"
    print(
        tg.kv(tokens_per_s=int(tokens_per_s), model_gflops_per_token=round(flops / 1e9, 4), mfu=mfu),
        flush=True,
    )
    parts = breakdown(model, train_model, loader, optimizers, ema, hp, rt, max(1, args.steps // 2))
    print(tg.kv(peak_mem_mib=tg.peak_mem_mib(rt), **parts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
