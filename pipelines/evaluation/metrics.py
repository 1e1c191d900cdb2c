"""The evaluate stage's metrics, each on plain arrays and strings so it can be checked by hand.

- retrieval: the rank of each query's own sample among all candidates -> recall@K, mean rank;
- captioning: BLEU-4 (sacrebleu's corpus BLEU) and CIDEr-D (pycocoevalcap's Cider), against
  the reference captions;
- VQA: exact match after the VQA normalisation (case, punctuation, articles, number words),
  and the VQA soft score min(1, matching references / 3) averaged over the leave-one-out
  subsets of the references (the VQA v2 definition). With a single reference answer the
  leave-one-out subsets are empty, so the soft score is exact match there (as in GQA).
"""

from __future__ import annotations

import re
from itertools import permutations

import numpy as np
import torch
import torch.nn.functional as F

KS = (1, 5, 10)


# -- retrieval -------------------------------------------------------------------------------
def retrieval_ranks(similarity: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's own candidate (column `own[q]`) in its row. Ties count
    against the query: a model whose embeddings collapsed (every score equal) ranks last, not
    first, and a candidate it cannot tell from the right one is not a hit."""
    own_score = similarity.gather(1, own[:, None])
    return (similarity >= own_score).sum(dim=1) - 1


def direction_ranks(queries, candidates, has_query, has_candidate) -> tuple[torch.Tensor, int]:
    """Ranks of the queries that have both modalities among every sample that has the target
    modality (the candidates), and the number of candidates."""
    sims, query_rows, candidate_rows = direction_similarity(queries, candidates, has_query, has_candidate)
    if sims is None:
        return torch.zeros(0, dtype=torch.long), len(candidate_rows)
    return retrieval_ranks(sims, torch.searchsorted(candidate_rows, query_rows)), len(candidate_rows)


def direction_similarity(queries, candidates, has_query, has_candidate):
    """(cosine similarity of each query to each candidate, query rows, candidate rows): queries
    are the samples with both modalities, candidates every sample with the target one; the
    similarity is None when there is nothing to rank (no query, or fewer than 2 candidates)."""
    candidate_rows = has_candidate.nonzero().squeeze(1)
    query_rows = (has_query & has_candidate).nonzero().squeeze(1)
    if len(query_rows) == 0 or len(candidate_rows) < 2:
        return None, query_rows, candidate_rows
    sims = F.normalize(queries[query_rows].float(), dim=-1) @ F.normalize(candidates[candidate_rows].float(), dim=-1).T
    return sims, query_rows, candidate_rows


def top1_hub(queries, candidates, has_query, has_candidate) -> tuple[float, int]:
    """Hubness of one direction: the share of queries whose top-1 result is the candidate that is
    top-1 most often (1/candidates for a spread-out ranking; near 1 when one candidate wins for
    every query), and that candidate's sample index."""
    sims, query_rows, candidate_rows = direction_similarity(queries, candidates, has_query, has_candidate)
    if sims is None:
        return 0.0, -1
    counts = torch.bincount(sims.argmax(dim=1), minlength=len(candidate_rows))
    return float(counts.max()) / len(query_rows), int(candidate_rows[counts.argmax()])


def recall_summary(ranks: torch.Tensor, candidates: int) -> dict[str, float]:
    out = {f"r{k}": float((ranks < k).float().mean()) for k in KS}
    return out | {"mean_rank": float(ranks.float().mean() + 1), "candidates": candidates, "queries": len(ranks)}


def recall_curve(ranks: torch.Tensor, max_k: int) -> np.ndarray:
    """recall@K for K = 1..max_k."""
    return np.array([float((ranks < k).float().mean()) for k in range(1, max_k + 1)])


def all_directions(
    embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, int]]:
    """'source_to_target' -> (ranks, candidates) for every ordered pair of modalities."""
    out = {}
    for source, target in permutations(embeddings, 2):
        ranks, candidates = direction_ranks(embeddings[source], embeddings[target], present[source], present[target])
        if len(ranks):
            out[f"{source}_to_{target}"] = (ranks, candidates)
    return out


# -- captioning ------------------------------------------------------------------------------
def caption_tokens(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: the usual preprocessing before CIDEr
    (the reference implementation runs the Java PTB tokenizer; this is its plain-Python stand-in)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] (sacrebleu, 13a tokenisation, lower-cased)."""
    import sacrebleu

    if not hypotheses:
        return 0.0
    # sacrebleu takes reference *streams*: stream j holds each hypothesis' j-th reference.
    width = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else refs[0] for refs in references] for j in range(width)]
    return sacrebleu.corpus_bleu(hypotheses, streams, lowercase=True).score / 100.0


def cider(hypotheses: list[str], references: list[list[str]]) -> float:
    """CIDEr-D (pycocoevalcap), x1 as the library reports it (10 = a perfect corpus)."""
    from pycocoevalcap.cider.cider import Cider

    if not hypotheses:
        return 0.0
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [caption_tokens(h)] for i, h in enumerate(hypotheses)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


# -- VQA -------------------------------------------------------------------------------------
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation (lower case, punctuation, articles, digits)."""
    words = re.sub(r"[^\w\s]", " ", answer.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def vqa_exact(prediction: str, references: list[str]) -> float:
    return float(normalize_answer(prediction) == normalize_answer(references[0]))


def vqa_soft(prediction: str, references: list[str]) -> float:
    """min(1, #matching references / 3), averaged over the leave-one-out subsets (VQA v2)."""
    if len(references) == 1:
        return vqa_exact(prediction, references)
    guess = normalize_answer(prediction)
    answers = [normalize_answer(r) for r in references]
    scores = [min(1.0, sum(a == guess for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))]
    return float(np.mean(scores))
