"""A seeded, synthetic mixed-length corpus: the same texts on every run and machine."""

from __future__ import annotations

import random

WORDS = (
    "the of and to in is was that for on with as by at from this be are have it not or "
    "which an were but been has their more one all its also new can other would first "
    "time two may after into over these some when there years only than most made such "
    "between used system data model queue worker request batch token vector search "
    "result cluster device memory server network latency throughput engine python redis "
    "celery embedding rerank language document query answer question river mountain city "
    "history science music market energy water health policy research student teacher "
    "computer software hardware process library function variable algorithm structure "
    "analysis report summer winter morning evening weather forest ocean island village "
    "station railway airport bridge garden museum theatre festival government economy "
    "industry company product customer service quality price value growth change level "
    "problem solution example feature benefit risk factor effect impact role support"
).split()


def mixed_corpus(size: int, seed: int = 1234) -> list[str]:
    """20% short (~10 words), 60% medium (~40 words), 20% long (~200 words), shuffled."""
    rng = random.Random(seed)
    texts = []
    for i in range(size):
        roll = i % 10
        if roll < 2:
            n = rng.randint(6, 14)
        elif roll < 8:
            n = rng.randint(30, 50)
        else:
            n = rng.randint(170, 230)
        words = [rng.choice(WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        texts.append(f"{i}: " + " ".join(words) + ".")
    rng.shuffle(texts)
    return texts
