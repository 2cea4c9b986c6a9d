"""A reference for jina-reranker-v3, written for the tests from the model's published `modeling.py`
(`JinaForRanking.rerank`, `_truncate_texts`, `_compute_single_batch`, `format_docs_prompts_func`, `forward`), step
by step as it does them, on stock transformers pieces only:

- the model: `Qwen3ForCausalLM` with its `lm_head` replaced by the identity and a projector
  Linear(H, H/2, no bias) -> ReLU -> Linear(H/2, 512, no bias) loaded from the checkpoint; hidden states from
  `forward(output_hidden_states=True).hidden_states[-1]`, the query marker's and every document marker's rows
  projected, the block's scores `cosine_similarity(doc, query)`;
- the texts: `tokenizer(text, truncation=True, max_length=n)` and, when that reaches n tokens, `tokenizer.decode`
  of those ids; the markers removed from query and documents with one `str.replace` each (query marker first);
- the blocks: the capacity `model_max_length - 2 * query_length`, a block closing at 125 documents or when the
  capacity is at most the document cut; per block the weight `((1 + scores) / 2).max()`; the merged query vector
  `np.average(query_vectors, weights=block_weights)`; the final scores `q . D^T / (|q| |D|)` in numpy.

It shares no code with models/families/jina_v3.py: the prompt strings are typed out again here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

QUERY_TOKEN = "<|rerank_token|>"
DOC_TOKEN = "<|embed_token|>"


def _prompt(query: str, docs: list[str], instruction: str | None) -> str:
    for token in (QUERY_TOKEN, DOC_TOKEN):  # sanitize_input, in the order of the model's special_tokens dict
        query = query.replace(token, "")
    clean = []
    for doc in docs:
        for token in (QUERY_TOKEN, DOC_TOKEN):
            doc = doc.replace(token, "")
        clean.append(doc)
    prefix = ("<|im_start|>system\n"
              "You are a search relevance expert who can determine a ranking of the passages based on how relevant "
              "they are to the query. "
              "If the query is a question, how relevant a passage is depends on how well it answers the question. "
              "If not, try to analyze the intent of the query and assess how well each passage satisfies the intent. "
              "If an instruction is provided, you should follow the instruction when determining the ranking."
              "<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n" + "<think>\n\n</think>\n\n"
    prompt = (f"I will provide you with {len(clean)} passages, each indicated by a numerical identifier. "
              f"Rank the passages based on their relevance to query: {query}\n")
    if instruction:
        prompt += f"<instruct>\n{instruction}\n</instruct>\n"
    prompt += "\n".join(f'<passage id="{i}">\n{doc}{DOC_TOKEN}\n</passage>' for i, doc in enumerate(clean)) + "\n"
    prompt += f"<query>\n{query}{QUERY_TOKEN}\n</query>"
    return prefix + prompt + suffix


class JinaReference:
    def __init__(self, path: str | Path, *, model_max_length: int | None = None, truncation_side: str = "right"):
        from safetensors import safe_open
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if model_max_length is not None:
            self.tokenizer.model_max_length = model_max_length
        self.tokenizer.truncation_side = truncation_side
        model = Qwen3ForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        model.lm_head = torch.nn.Identity()
        with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
            w1, w2 = f.get_tensor("projector.0.weight"), f.get_tensor("projector.2.weight")
        projector = torch.nn.Sequential(torch.nn.Linear(w1.shape[1], w1.shape[0], bias=False), torch.nn.ReLU(),
                                        torch.nn.Linear(w2.shape[1], w2.shape[0], bias=False))
        with torch.no_grad():
            projector[0].weight.copy_(w1)
            projector[2].weight.copy_(w2)
        self.model, self.projector = model.eval(), projector.eval()
        self.doc_id = self.tokenizer.convert_tokens_to_ids(DOC_TOKEN)
        self.query_id = self.tokenizer.convert_tokens_to_ids(QUERY_TOKEN)
        self.prompts: list[str] = []  # every block prompt of the last `rerank`, in order
        self.prompt_tokens: list[int] = []

    def truncate_texts(self, query: str, documents: list[str], max_query_length: int, max_doc_length: int):
        docs, doc_lengths = [], []
        for doc in documents:
            ids = self.tokenizer(doc, truncation=True, max_length=max_doc_length)["input_ids"]
            if len(ids) >= max_doc_length:
                doc = self.tokenizer.decode(ids)
            doc_lengths.append(len(ids))
            docs.append(doc)
        q_ids = self.tokenizer(query, truncation=True, max_length=max_query_length)["input_ids"]
        if len(q_ids) >= max_query_length:
            query = self.tokenizer.decode(q_ids)
        return query, docs, doc_lengths, len(q_ids)

    @torch.no_grad()
    def block(self, query: str, docs: list[str], instruction: str | None):
        """(block scores [n], query vector [P], doc vectors [n, P]) of one block's prompt."""
        prompt = _prompt(query, docs, instruction)
        batch = self.tokenizer(text=[prompt], padding=True, padding_side="left", return_tensors="pt")
        self.prompts.append(prompt)
        self.prompt_tokens.append(int(batch["input_ids"].shape[1]))
        out = self.model(**batch, use_cache=False, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        ids = batch["input_ids"]
        doc = self.projector(hidden[ids == self.doc_id].view(1, -1, hidden.shape[-1]))
        query_vec = self.projector(hidden[ids == self.query_id].unsqueeze(1))
        scores = torch.nn.functional.cosine_similarity(doc, query_vec.expand_as(doc), dim=-1).squeeze(-1)
        return scores.view(-1).float().numpy(), query_vec[0].float().numpy(), doc[0].float().numpy()

    def rerank(self, query: str, documents: list[str], *, instruction: str | None = None,
               max_doc_length: int = 2048, max_query_length: int = 512) -> np.ndarray:
        """The relevance score of every document, in input order."""
        self.prompts, self.prompt_tokens = [], []
        max_length = self.tokenizer.model_max_length
        query, docs, doc_lengths, query_length = self.truncate_texts(query, documents, max_query_length,
                                                                     max_doc_length)
        capacity = max_length - 2 * query_length
        block_docs, doc_vectors, query_vectors, weights = [], [], [], []

        def run(block):
            scores, q, d = self.block(query, block, instruction)
            doc_vectors.extend(d)
            query_vectors.append(q)
            weights.append(((1.0 + scores) / 2.0).max())

        for length, doc in zip(doc_lengths, docs):
            block_docs.append(doc)
            capacity -= length
            if len(block_docs) >= 125 or capacity <= max_doc_length:
                run(block_docs)
                block_docs = []
                capacity = max_length - 2 * query_length
        if block_docs:
            run(block_docs)
        q = np.average(np.array(query_vectors), axis=0, weights=weights)
        d = np.array(doc_vectors)
        return (np.dot(q, d.T) / (np.linalg.norm(q) * np.linalg.norm(d, axis=1))).reshape(-1)
