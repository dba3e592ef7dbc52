"""The synthetic Deep Lake dataset the benchmark cells read.

Throughput does not depend on what the text says, only on how many tokens it makes, so the rows are random
sentences over a small English vocabulary (question 20-60 words, answer 40-200 words: documents of a few hundred
tokens, so a 512-token block holds one to three of them and packing boundaries occur as in real SFT data).
Generated once per (rows, seed) into the sft cache with the same atomic writer as ``sft ingest``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three model data train answer question value system number result "
    "method paper energy water light small large signal memory process network layer weight token batch stream "
    "compute matrix vector gradient loss rate step epoch sample block shard rank thread core socket cache"
).split()

VERSION = 1  # bump when the generator changes, so that cached datasets are not reused


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    text = " ".join(words)
    return text[0].upper() + text[1:]


def synthetic_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        q = _sentence(rng, rng.randint(20, 60)) + "?"
        a_parts = []
        left = rng.randint(40, 200)
        while left > 0:
            k = min(left, rng.randint(8, 25))
            a_parts.append(_sentence(rng, k) + ".")
            left -= k
        yield {"question": q, "answer": " ".join(a_parts), "source": f"synthetic-{i}"}


def dataset_path(rows: int, seed: int = 0) -> Path:
    from sft.models import cache_dir

    return cache_dir() / "bench" / f"synthetic-v{VERSION}-{rows}rows-seed{seed}"


def ensure_dataset(rows: int, seed: int = 0, path: str | os.PathLike | None = None) -> str:
    """Path of the synthetic dataset with ``rows`` rows, generated on first use: Deep Lake, or where deeplake is
    not installed (the GPU check's machine) the Arrow format training also reads (sft/data/arrow.py)."""
    try:
        import deeplake
    except ImportError:
        return _ensure_arrow(rows, seed, path)
    from sft.data.ingest import write_dataset

    out = Path(path) if path else dataset_path(rows, seed)
    if deeplake.exists(str(out)):
        return str(out)
    try:
        write_dataset(str(out), synthetic_rows(rows, seed), progress=False, total=rows)
    except Exception:
        if not deeplake.exists(str(out)):  # another bench run wrote it at the same time: theirs is identical
            raise
    return str(out)


def _ensure_arrow(rows: int, seed: int, path: str | os.PathLike | None) -> str:
    from sft.data.arrow import is_arrow_dataset, write_arrow_dataset

    out = Path(path) if path else dataset_path(rows, seed).with_name(dataset_path(rows, seed).name + "-arrow")
    if not is_arrow_dataset(str(out)):
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_arrow_dataset(str(out), synthetic_rows(rows, seed))
        except FileExistsError:  # another bench run wrote it at the same time: theirs is identical
            pass
    return str(out)
