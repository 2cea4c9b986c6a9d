"""In-process micro-benchmark of the HTTP layer: request parsing, response building and serialisation.

The routes of serve_app over a stand-in encoder (one token per text, no tokenizer) and a stand-in model (scores
drawn once), driven through the ASGI app in this process (httpx's ASGITransport): what remains is the work the
ingress does per request around encoding and scoring. Prints the median milliseconds per request over
`--repeats` rounds of `--requests` requests for each case.

    python -m benchmarks.routes [--texts 256] [--requests 200] [--repeats 5]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from models.encoded import EncodedBatch
from models.encoding import check_items


class _Encoder:
    family, model_id, max_length, id2label = "seq_cls", "bench/encoder", 512, {0: "LABEL_0"}
    accepts_single, accepts_instruction, default_instruction, supports_windows = True, False, None, False

    def encode(self, items, *, truncate=True, direction="right", instruction=None, max_tokens_per_doc=None):
        check_items(self, items, instruction)
        return EncodedBatch.from_lists([[1, 2, 3]] * len(items))

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


class _Backend:
    def __init__(self, n: int):
        self.scores = np.random.default_rng(0).normal(size=n).astype(np.float32)

    async def score(self, batch):
        return self.scores[:len(batch)]


def _app(texts: int):
    from serve_app.routes import create_http_app
    from serve_app.service import RerankService
    from serve_app.settings import AppSettings

    settings = AppSettings(models=[{"name": "m", "model_id": "bench/m"}], max_candidates=max(1000, texts))
    return create_http_app(RerankService(settings, {"m": _Encoder()}, {"m": _Backend(texts)}),
                           request_id=lambda: "bench")


async def _run(args) -> dict[str, float]:
    import httpx

    docs = [f"document number {i} about something" for i in range(args.texts)]
    cases = {
        "/rerank": ("/rerank", {"query": "q", "texts": docs}),
        "/rerank return_text": ("/rerank", {"query": "q", "texts": docs, "return_text": True}),
        "/v2/rerank return_documents": ("/v2/rerank", {"query": "q", "documents": docs, "return_documents": True}),
        "/predict batch": ("/predict", {"inputs": [["q", d] for d in docs]}),
        "/tokenize": ("/tokenize", {"inputs": [["q", d] for d in docs[:32]]}),
    }
    transport = httpx.ASGITransport(app=_app(args.texts))
    out = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for name, (path, body) in cases.items():
            assert (await client.post(path, json=body)).status_code == 200
            rounds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(args.requests):
                    await client.post(path, json=body)
                rounds.append((time.perf_counter() - start) / args.requests * 1e3)
            out[name] = statistics.median(rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name, ms in asyncio.run(_run(args)).items():
        print(f"{name:30s} {ms:8.3f} ms/request  ({args.texts} texts)")


if __name__ == "__main__":
    main()
