"""Which execution is fastest on CPU for a ModernBERT reranker: padded or packed, and in what batches?

    python -m benchmarks.cpu_packing [--model ettin-17m] [--pairs 512] [--repeats 3] [--flex] [--out f.json]

Random-weight ModernBertModel with the real ettin shape, NQ-like pair lengths (benchmarks/workload.py), fp32,
torch threads = the machine's cores. Times the backbone + CLS gather (the head is a few [N, H] matmuls,
the same for all variants) and prints pairs/s medians for:
- padded_one_batch: every pair right-padded to the longest, one forward;
- padded_sorted_<B>: sorted by length, chunks whose padded size (count x longest) <= B tokens;
- padded_sorted_32: sorted by length, 32 pairs a chunk (what sentence-transformers does);
- packed_<B>: packed (no padding), chunks of <= B real tokens, per-sequence SDPA inside attention;
and, with --flex, the attention kernel alone: compiled FlexAttention with a document (+window) mask against
the per-sequence SDPA loop, on the q/k/v sizes of one packed chunk.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from models import attention, packing
from models.encoded import EncodedBatch

from .workload import ettin_config, pair_token_ids


def _chunks_padded(lengths: np.ndarray, budget: int | None, per_chunk: int | None) -> list[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    if per_chunk:
        return [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]
    chunks, start = [], 0
    for i in range(len(order)):
        if i > start and (i - start + 1) * lengths[order[i]] > budget:
            chunks.append(order[start:i])
            start = i
    chunks.append(order[start:])
    return chunks


def _chunks_packed(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    chunks, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > budget:
            chunks.append(np.arange(start, i))
            start, used = i, 0
        used += n
    chunks.append(np.arange(start, len(lengths)))
    return chunks


def run_padded(model, batch: EncodedBatch, chunks, pad_id: int) -> torch.Tensor:
    model.set_attn_implementation("sdpa")
    out = torch.empty(len(batch), model.config.hidden_size)
    for index in chunks:
        lengths = batch.lengths[index]
        ids = torch.full((len(index), int(lengths.max())), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(index):
            ids[row, :lengths[row]] = torch.from_numpy(batch.sequence(i).astype(np.int64))
            mask[row, :lengths[row]] = 1
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out[torch.from_numpy(index)] = hidden[:, 0]
    return out


def run_packed(model, batch: EncodedBatch, chunks) -> torch.Tensor:
    model.set_attn_implementation(attention.PACKED)
    out = torch.empty(len(batch), model.config.hidden_size)
    for index in chunks:
        p = packing.pack(batch, index)
        hidden = model(**p.model_kwargs()).last_hidden_state
        out[torch.from_numpy(index)] = packing.first_token(hidden, p.cu_seq_lens)
    return out


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    result = fn()  # warm-up (allocator, kernels, lazily built masks)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def flex_vs_segments(batch: EncodedBatch, heads: int, head_dim: int, window: int, repeats: int) -> dict:
    """Attention alone on one packed chunk: compiled FlexAttention (document mask + window) vs SDPA per sequence."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = packing.pack(batch)
    total, cu = p.num_tokens, p.cu_seq_lens
    seg = packing.segment_ids(cu, total)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, heads, head_dim, generator=g) for _ in range(3))

    def doc_window(b, h, qi, ki):
        return (seg[qi] == seg[ki]) & ((qi - ki).abs() < window)

    compiled = torch.compile(flex_attention, dynamic=False)
    start = time.perf_counter()
    block_mask = create_block_mask(doc_window, None, None, total, total, device="cpu")
    as_bhsd = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731
    flex_out = compiled(as_bhsd(q), as_bhsd(k), as_bhsd(v), block_mask=block_mask)
    first_call = time.perf_counter() - start
    flex_s, _ = _time(lambda: compiled(as_bhsd(q), as_bhsd(k), as_bhsd(v), block_mask=block_mask), repeats)
    mask_s, _ = _time(lambda: create_block_mask(doc_window, None, None, total, total, device="cpu"), repeats)
    seg_s, seg_out = _time(lambda: attention.varlen_attention(q, k, v, cu, p.max_length, sliding_window=window),
                           repeats)
    diff = (flex_out[0].transpose(0, 1) - seg_out).abs().max().item()
    return {"tokens": total, "flex_compile_and_first_call_s": first_call, "flex_block_mask_s": mask_s,
            "flex_attention_s": flex_s, "segments_attention_s": seg_s, "max_abs_diff": diff}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ettin-17m")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--padded-budgets", default="2048,4096,8192,16384,32768")
    ap.add_argument("--packed-budgets", default="4096,8192,16384,32768,1000000")
    ap.add_argument("--skip-one-batch", action="store_true", help="leave out padded_one_batch (slowest)")
    ap.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (compiles ~30 s)")
    ap.add_argument("--flex-only", action="store_true", help="only the attention-kernel comparison")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from transformers import ModernBertModel
    attention.register()
    torch.manual_seed(0)
    cfg = ettin_config(args.model)
    model = ModernBertModel(cfg).eval()
    batch = EncodedBatch.from_lists(pair_token_ids(args.pairs))
    lengths = batch.lengths
    print(f"{args.model}: {args.pairs} pairs, {batch.num_tokens} tokens (mean {lengths.mean():.0f}, "
          f"max {lengths.max()}), torch threads {torch.get_num_threads()}")

    variants = {} if args.flex_only else {
        "padded_sorted_32": lambda: run_padded(model, batch, _chunks_padded(lengths, None, 32), cfg.pad_token_id)}
    if args.flex_only:
        variants, args.flex = {}, True
    if not args.skip_one_batch and not args.flex_only:
        variants["padded_one_batch"] = lambda: run_padded(model, batch, [np.arange(len(batch))], cfg.pad_token_id)
    for b in [] if args.flex_only else map(int, args.padded_budgets.split(",")):
        chunks = _chunks_padded(lengths, b, None)
        variants[f"padded_sorted_{b}"] = lambda c=chunks: run_padded(model, batch, c, cfg.pad_token_id)
    for b in [] if args.flex_only else map(int, args.packed_budgets.split(",")):
        chunks = _chunks_packed(lengths, b)
        variants[f"packed_{b}"] = lambda c=chunks: run_packed(model, batch, c)

    # Rounds interleave the variants, so load from other processes on the machine hits all of them alike.
    # Besides wall time, the process CPU time of each run is kept: it measures the work a variant does and
    # is far less sensitive to other processes competing for the cores.
    results, reference = {}, None
    wall, cpu = {name: [] for name in variants}, {name: [] for name in variants}
    with torch.inference_mode():
        for name, fn in variants.items():  # warm-up, and the parity check against the first variant
            cls = fn()
            reference = cls if reference is None else reference
            results[name] = {"max_abs_diff_vs_first": (cls - reference).abs().max().item()}
        for r in range(args.repeats):
            for name, fn in variants.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            print(f"  round {r + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.1f}", flush=True)
        for name in variants:
            median, best, cpu_median = statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name])
            results[name].update(wall_s=wall[name], cpu_s=cpu[name], pairs_per_s_median=args.pairs / median,
                                 pairs_per_s_best=args.pairs / best, cpu_ms_per_pair=1000 * cpu_median / args.pairs)
            print(f"  {name:22s} {args.pairs / median:7.1f} pairs/s median {args.pairs / best:7.1f} best "
                  f"{1000 * cpu_median / args.pairs:7.2f} CPU-ms/pair  (|diff| "
                  f"{results[name]['max_abs_diff_vs_first']:.1e})", flush=True)
        report = {"model": args.model, "pairs": args.pairs, "tokens": batch.num_tokens,
                  "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "variants": results}
        if args.flex:
            sub = batch.select(np.arange(min(len(batch), 96)))
            report["flex_vs_segments"] = flex_vs_segments(sub, cfg.num_attention_heads,
                                                          cfg.hidden_size // cfg.num_attention_heads,
                                                          cfg.sliding_window + 1, args.repeats)
            print("  attention only:", json.dumps(report["flex_vs_segments"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
