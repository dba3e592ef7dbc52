"""Streaming rate of training data: Deep Lake on S3 (a moto server on loopback) against a local path.

    python -m benchmarks.studies.stream_rate [--rows 20000] [--seq-length 512]

For each store and two row shapes (the demo task's short rows, ~20 tokens, and long rows, ~300 tokens), a fresh
process opens the dataset and measures, on the first pass (nothing cached):

* rows/s out of ``ShardedSource.iter_rows`` (block reads of ``read_batch`` rows, the order of a shuffled epoch);
* rows/s and tokens/s out of ``PackedDataset`` (read + format + tokenize + pack: what the trainer's DataLoader
  gets), with the embedded SmolLM2 tokenizer.

The S3 numbers are a loopback moto server (a Python process on the same 2 cores), not a real bucket: they show the
overhead of the S3 code path, and that a store whose latency is hidden by ``read_batch`` rows per request is far
from the training step rate. Needs ``moto[server]`` (the dev extra).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = r"""
import json, sys, time
from sft.config import ModelConfig
from sft.data.packing import PackedDataset
from sft.data.source import ShardedSource
from sft.models import load_tokenizer

path, creds, seq = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = load_tokenizer(ModelConfig(name="embedded:smollm2-135m-instruct"))
src = ShardedSource(path, shuffle=True, read_batch=256, creds=creds or None)
t = time.perf_counter(); n = sum(1 for _ in src.iter_rows(0)); read_s = time.perf_counter() - t
src = ShardedSource(path, shuffle=True, read_batch=256, creds=creds or None)  # a fresh handle: nothing cached
packed = PackedDataset(src.iter_rows, tok, "default", seq_length=seq)
t = time.perf_counter(); blocks = sum(1 for _ in packed); pack_s = time.perf_counter() - t
print(json.dumps({"rows": n, "read_rows_per_s": n / read_s, "packed_rows_per_s": n / pack_s,
                  "tokens_per_s": blocks * seq / pack_s, "blocks": blocks}))
"""


def _moto(tmp: Path) -> tuple[subprocess.Popen, dict]:
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        sys.exit("moto_server not found: pip install 'moto[server]'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    creds = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "aws_region": "us-east-1",
             "endpoint_url": f"http://127.0.0.1:{port}"}
    import boto3

    boto3.client("s3", endpoint_url=creds["endpoint_url"], aws_access_key_id="bench", aws_secret_access_key="bench",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    return proc, creds


def _rows(kind: str, n: int):
    from sft.demo import generate_examples

    if kind == "short":
        yield from generate_examples(n, seed=0, split="train")
        return
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    for i in range(n):
        yield {"question": f"Question {i}: " + " ".join(rng.choice(words) for _ in range(60)),
               "answer": " ".join(rng.choice(words) for _ in range(200)), "source": "bench"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--seq-length", type=int, default=512)
    args = ap.parse_args(argv)
    from sft.data.ingest import write_dataset

    tmp = Path(tempfile.mkdtemp(prefix="stream-rate-"))
    proc, creds = _moto(tmp)
    results = []
    try:
        for kind in ("short", "long"):
            n = args.rows if kind == "short" else args.rows // 4
            stores = (("local", str(tmp / kind), {}), ("s3 (moto, loopback)", f"s3://bench/{kind}", creds))
            for store, path, c in stores:
                write_dataset(path, _rows(kind, n), progress=False, creds=c or None)
                env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                           PYTHONPATH=str(Path(__file__).resolve().parents[2]))
                out = subprocess.run([sys.executable, "-c", MEASURE, path, json.dumps(c), str(args.seq_length)],
                                     env=env, capture_output=True, text=True, timeout=1800)
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.append({"shape": kind, "store": store, **r})
                print(json.dumps(results[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n| rows | store | rows read/s | rows packed/s | tokens/s to the packer (seq {args.seq_length}) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shape']} ({r['rows']:,}) | {r['store']} | "
              f"{r['read_rows_per_s']:,.0f} | {r['packed_rows_per_s']:,.0f} | {r['tokens_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
