"""Artifact size by packing and compressor: fresh-init model, heavy-tailed stand-in, or a real artifact.

    python3 bench/artifact_size.py                       # default model (env knobs apply), fresh init
    python3 bench/artifact_size.py --weights heavy-tail  # matrices redrawn from a Student-t (nu=3)
    python3 bench/artifact_size.py --weights channels    # the same, times log-normal column scales
    python3 bench/artifact_size.py --weights heavy-tail --quant gptq   # GPTQ, Hessian-chosen clips
    python3 bench/artifact_size.py --artifact final_model_<RUN_ID>.ptz   # a trained run's integers
    python3 bench/artifact_size.py --tradeoff   # error vs entropy per clip choice and width (GPTQ)
    COMPRESSOR=zstd python3 bench/artifact_size.py --fit-cut 1500000   # the fit ladder at full size
    COMPRESSOR=brotli python3 bench/artifact_size.py --fit-cut 1000000 --prior   # planned, as in a run
    COMPRESSOR=brotli python3 bench/artifact_size.py --weights heavy-tail --packing bytes --threads 1 0
    python3 bench/artifact_size.py --speed   # brotli-11 CPU throughput by weight distribution
    COMPRESSOR=brotli COMPRESS_ROW_TRANSFORMS=1 python3 bench/artifact_size.py --packing bytes --threads 0

Quantisation is round-to-nearest with each row's max |w| as its clip (no calibration data) unless
`--quant gptq`: then GPTQ runs with the script's clip choice (GPTQ_CLIP_FRACS, or GPTQ_SDCLIP_K)
under a synthetic Hessian per matrix (activations with log-normal channel scales, as trained
models have outlier channels). The clip decides how widely the integers spread, so it changes the
bytes; `--quant gptq` measures by how much. Prints one line per (packing, compressor) with bytes and
bits per parameter (format 1: the payload as one stream, each COMPRESSOR in turn; auto: every one).

`--threads T ...` then compresses the payload as format 2 (independent streams, each with its
smallest COMPRESSOR) with COMPRESS_THREADS=T (0: one per CPU core): bytes and wall seconds, and the
CPU seconds of each stream job (the longest is the wall time with a core per job). With
COMPRESS_ROW_TRANSFORMS=1 or COMPRESSOR=pergroup the integer streams also try R0427's row layouts
(format 3; `layouts` lists each stream's: 0 raw, 1 byte-shuffled, 2 column-major, 3 sorted rows).

`--tradeoff` prints, for one heavy-tailed matrix of each block shape of the default model under a
synthetic Hessian, the entropy (bits per weight: what the compressors track) and the relative
Hessian-weighted output error of GPTQ at int6 and int5 with each clip choice: the searched clip,
max |w|, and SDClip k=12. The fit ladder's order (clip search given up before int5) rests on it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def synthetic_hessian(d: int, gen: torch.Generator) -> torch.Tensor:
    """X^T X of 2d random activation rows whose channel scales are log-normal (sigma 1)."""
    scales = torch.exp(torch.randn(d, generator=gen))
    x = torch.randn(2 * d, d, generator=gen) * scales
    return x.T @ x


def stand_in(weights: str, quant: str) -> tg.Quantizer:
    hp = tg.Hyperparameters()
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    if weights in ("heavy-tail", "channels"):  # trained matrices are heavy-tailed; keep each one's std
        with torch.no_grad():
            for name in tg.quant_plan(model, hp):
                p = model.get_parameter(name)
                draw = torch.distributions.StudentT(3.0).sample(p.shape)
                if weights == "channels":  # log-normal input-channel scales (sigma 1): outlier channels
                    draw = draw * torch.exp(torch.randn(p.shape[1]))
                p.copy_(draw / draw.std() * max(float(p.std()), 0.02))
    hessians = {}
    if quant == "gptq":
        gen = torch.Generator().manual_seed(hp.seed)
        plan = tg.quant_plan(model, hp)
        hessians = {n: synthetic_hessian(model.get_parameter(n).size(1), gen) for n in sorted(plan)}
    return tg.Quantizer(model, hessians, hp)


def fit(cut: int, prior: bool) -> None:
    """The automatic fit on the heavy-tailed GPTQ stand-in, with the cap `cut` bytes below the size
    it compresses to with COMPRESSOR (set COMPRESSOR=zstd for speed): its log lines and timings.
    With `prior`, as in a training run: the ratio of a dry run on the fresh weights plans the moves."""
    ratio = None
    if prior:
        _, fresh = tg.fit_artifact(stand_in("fresh", "gptq"), 0, print, 1 << 62)
        ratio = fresh["size_per_entropy"]
    t0 = time.perf_counter()
    free, _ = tg.fit_artifact(stand_in("heavy-tail", "gptq"), 0, print, 1 << 62)
    print(tg.kv(free_bytes=len(free), free_s=round(time.perf_counter() - t0, 1)))
    t0 = time.perf_counter()
    blob, info = tg.fit_artifact(stand_in("heavy-tail", "gptq"), 0, print, len(free) - cut, ratio)
    print(tg.kv(fitted_bytes=len(blob), cap=len(free) - cut, fit_s=round(time.perf_counter() - t0, 1)))
    print(tg.kv(**{k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in info.items()}))


def tradeoff() -> None:
    hp = tg.Hyperparameters()
    gen = torch.Generator().manual_seed(hp.seed)
    torch.manual_seed(hp.seed)
    d, hidden = hp.model_dim, int(hp.model_dim * hp.mlp_mult)
    kv_dim = hp.num_kv_heads * hp.head_dim
    clips = {"search": {}, "max": {"GPTQ_CLIP_FRACS": "1.0"}, "sdclip12": {"GPTQ_SDCLIP_K": "12"}}
    for rows, cols in ((d, d), (kv_dim, d), (hidden, d), (d, hidden)):
        draw = torch.distributions.StudentT(3.0).sample((rows, cols))
        W, H = draw / draw.std() * 0.02, synthetic_hessian(cols, gen)
        base = float(tg.output_error(W, H).sum())
        for bits in (6, 5):
            for clip, knobs in clips.items():
                qt = tg.gptq_quantize(W, H, bits, tg.Hyperparameters(knobs))
                err = float(tg.output_error(W - qt.dequantize(), H).sum()) / base
                entropy = 8 * tg.entropy_bytes(qt.q) / qt.q.numel()
                print(
                    tg.kv(
                        shape=f"{rows}x{cols}",
                        bits=bits,
                        clip=clip,
                        entropy_bits=round(entropy, 3),
                        rel_output_error=f"{err:.5f}",
                    )
                )


def streams(payload: bytes, methods: list[str], threads: int, params: int, **options) -> None:
    """Format 2 at COMPRESS_THREADS=`threads`: the artifact's bytes, wall seconds, and each job's time.
    `options`: compress_streams' (COMPRESSOR=pergroup, COMPRESS_ROW_TRANSFORMS=1: format 3)."""
    jobs: list[float] = []
    real = tg.compress

    def timed(data: bytes, method: str) -> bytes:
        t0 = time.thread_time()  # this thread's CPU time: what the job costs, whatever else runs
        blob = real(data, method)
        jobs.append(time.thread_time() - t0)
        return blob

    sorts: list[float] = []
    real_sort = tg.similarity_order

    def timed_sort(q):
        t0 = time.thread_time()
        order = real_sort(q)
        sorts.append(time.thread_time() - t0)
        return order

    tg.compress, tg.similarity_order = timed, timed_sort
    try:
        t0 = time.perf_counter()
        codec, body, sizes = tg.compress_streams(payload, methods, threads, **options)
        seconds = time.perf_counter() - t0
    finally:
        tg.compress, tg.similarity_order = real, real_sort
    size = len(body)
    print(
        tg.kv(
            format=codec.version(),
            threads=threads or tg.cpu_cores(),
            streams=len(codec.choices),
            jobs=len(jobs),
            compressor=codec,
            layouts=",".join(str(layout) for _, layout in codec.choices),
            raw_bytes=len(payload),
            bytes=size,
            bits_per_param=round(8 * size / params, 3),
            compress_s=round(seconds, 2),
            job_cpu_s_sum=round(sum(jobs), 2),
            job_cpu_s_max=round(max(jobs), 2),
            sort_cpu_s=round(sum(sorts), 2),
        )
    )


def speed() -> None:
    """Brotli-11 CPU MB/s on one 1536x512 int6 matrix (round-to-nearest, max-|w| rows) per stand-in:
    the reserve's dry run must compress as slowly as a trained model does."""
    gen = torch.Generator().manual_seed(0)
    shape = torch.Size([1536, 512])
    draws = {
        "init_like_43pct_zero": torch.cat([torch.randn(875, 512, generator=gen), torch.zeros(661, 512)]),
        "gaussian": torch.randn(shape, generator=gen),
        "student_t5": tg.student_t(shape, 5, gen),
        "student_t3": tg.student_t(shape, 3, gen),
    }
    for name, W in draws.items():
        q = tg.rtn_quantize(W, 6).q
        data = q.numpy().tobytes()
        t0 = time.thread_time()
        size = len(tg.compress(data, "brotli"))
        cpu = time.thread_time() - t0
        print(
            tg.kv(
                weights=name,
                zero_frac=round(float((q == 0).float().mean()), 3),
                entropy_bits=round(8 * tg.entropy_bytes(q) / q.numel(), 3),
                brotli_bits_per_value=round(8 * size / len(data), 3),
                brotli_cpu_mb_per_s=round(len(data) / cpu / 1e6, 3),
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", choices=["fresh", "heavy-tail", "channels"], default="fresh")
    parser.add_argument("--quant", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--packing", choices=["bytes", "bits", "both"], default="both")
    parser.add_argument("--artifact", help="re-encode the integers of this artifact instead")
    parser.add_argument("--tradeoff", action="store_true", help="error vs entropy per clip and width")
    parser.add_argument("--fit-cut", type=int, help="run the automatic fit with the cap this far below")
    parser.add_argument("--entropy-only", action="store_true", help="the entropy estimate, no compression")
    parser.add_argument("--prior", action="store_true", help="--fit-cut planned with a fresh dry run's ratio")
    parser.add_argument("--threads", type=int, nargs="+", help="also format 2 at these COMPRESS_THREADS")
    parser.add_argument("--speed", action="store_true", help="brotli-11 CPU throughput per weight stand-in")
    parser.add_argument("--streams-only", action="store_true", help="with --threads: no format 1 lines")
    args = parser.parse_args()
    if args.speed:
        return speed()
    if args.tradeoff:
        return tradeoff()
    if args.fit_cut:
        return fit(args.fit_cut, args.prior)
    if args.artifact:
        _, qstate = tg.decode_artifact(Path(args.artifact).read_bytes(), args.artifact)
        source = args.artifact
    else:
        t0 = time.perf_counter()
        qstate = stand_in(args.weights, args.quant).qstate()
        source = f"default settings, {args.weights} weights, {args.quant}"
        print(tg.kv(quantize_s=round(time.perf_counter() - t0, 1)))
    params = sum(t.q.numel() if isinstance(t, tg.QuantTensor) else t.numel() for t in qstate.values())
    entropy = tg.SizeEstimate(qstate, None).raw(qstate)  # what the fit ladder's estimate scales
    print(tg.kv(source=source.replace(" ", "_"), params=params, entropy_raw_bytes=int(entropy)))
    if args.entropy_only:
        return
    methods, options = tg.compressor_plan(tg.Hyperparameters())
    for packing in ("bytes", "bits") if args.packing == "both" else (args.packing,):
        payload = tg.build_payload(qstate, {}, packing)
        for threads in args.threads or []:
            streams(payload, methods, threads, params, **options)
        for method in [] if args.streams_only else methods:
            t0, cpu0 = time.perf_counter(), time.thread_time()
            size = len(tg.compress(payload, method))
            seconds, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
            print(
                tg.kv(
                    format=1,
                    packing=packing,
                    compressor=method,
                    raw_bytes=len(payload),
                    bytes=size,
                    bits_per_param=round(8 * size / params, 3),
                    compress_s=round(seconds, 2),
                    cpu_s=round(cpu, 2),
                )
            )


if __name__ == "__main__":
    main()
