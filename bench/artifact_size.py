"""Artifact size by packing and compressor: fresh-init model, heavy-tailed stand-in, or a real artifact.

    python bench/artifact_size.py                       # default model (env knobs apply), fresh init
    python bench/artifact_size.py --weights heavy-tail  # matrices redrawn from a Student-t (nu=3)
    python bench/artifact_size.py --artifact final_model_<RUN_ID>.ptz   # a trained run's integers

Quantisation here is round-to-nearest (no calibration data needed); GPTQ changes which integers are
stored, not their count. Prints one line per (packing, compressor) with bytes and bits per parameter.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def model_qstate(weights: str) -> dict:
    hp = tg.Hyperparameters()
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    if weights == "heavy-tail":  # trained matrices are heavy-tailed; keep each one's std
        with torch.no_grad():
            for name in tg.quant_plan(model, hp):
                p = model.get_parameter(name)
                draw = torch.distributions.StudentT(3.0).sample(p.shape)
                p.copy_(draw / draw.std() * max(float(p.std()), 0.02))
    return tg.Quantizer(model, {}, hp).qstate()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", choices=["fresh", "heavy-tail"], default="fresh")
    parser.add_argument("--artifact", help="re-encode the integers of this artifact instead")
    args = parser.parse_args()
    if args.artifact:
        _, qstate = tg.decode_artifact(Path(args.artifact).read_bytes(), args.artifact)
        source = args.artifact
    else:
        qstate = model_qstate(args.weights)
        source = f"default settings, {args.weights} weights"
    params = sum(t.q.numel() if isinstance(t, tg.QuantTensor) else t.numel() for t in qstate.values())
    print(tg.kv(source=source.replace(" ", "_"), params=params))
    for packing in ("bytes", "bits"):
        payload = tg.build_payload(qstate, {}, packing)
        for method in tg.available_compressors("auto"):
            t0 = time.perf_counter()
            size = len(tg.compress(payload, method))
            seconds = time.perf_counter() - t0
            print(
                tg.kv(
                    packing=packing,
                    compressor=method,
                    raw_bytes=len(payload),
                    bytes=size,
                    bits_per_param=round(8 * size / params, 3),
                    compress_s=round(seconds, 2),
                )
            )


if __name__ == "__main__":
    main()
