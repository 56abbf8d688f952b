"""Quality of edgeinfer's quants vs llama.cpp's, on the default model (issue 6's table).

1. The embedded SmolLM2-135M-Instruct GGUF is exported as a Hugging Face checkpoint (transformers).
2. edgeinfer converts it to F32 (the reference), F16, and Q4_0, Q4_K_M, Q4_K_M + imatrix, Q5_K_M,
   Q6_K, Q8_0. The imatrix comes from `edgeinfer imatrix` on the F32 file over @stdlib-calib.
3. llama.cpp's own quantizer (`llama_model_quantize`) makes the same types from edgeinfer's F16
   GGUF (the Q4_K_M + imatrix row uses the same imatrix).
4. `edgeinfer eval` scores every file on @stdlib-eval (disjoint from the calibration text):
   size, bits per weight, perplexity, mean / p99 KL-divergence vs the F32 reference, top-1.
5. Same-input check: llama.cpp also quantizes edgeinfer's F32 GGUF (same imatrix), and every tensor
   is compared with edgeinfer's file. Identical bytes there mean any KL gap in the table comes from
   the inputs (llama.cpp's rows start from the F16 GGUF, edgeinfer's from the F32 checkpoint), not
   from the encoders.

    python benchmarks/bench_quality.py [--ctx 512] [--chunks 16] [--work DIR] [--skip-eval]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TYPES = ["Q4_0", "Q4_K_M", "Q4_K_M+imatrix", "Q5_K_M", "Q6_K", "Q8_0"]


def ei(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "edgeinfer", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"edgeinfer {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--imatrix-chunks", type=int, default=32)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--skip-eval", action="store_true", help="only the files and the same-input byte check")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ei-quality-"))
    work.mkdir(parents=True, exist_ok=True)

    import _hf_export
    import gguf
    from _llama_quant import llama_quantize, read_tensors

    from edgeinfer.quant.imatrix import load_imatrix

    ckpt = _hf_export.export_default_checkpoint(work / "hf")
    files: dict[str, tuple[Path, Path]] = {}
    f32, f16 = work / "ei-F32.gguf", work / "ei-F16.gguf"
    for q, p in (("F32", f32), ("F16", f16)):
        if not p.exists():
            ei("convert", str(ckpt), "--qtype", q, "-o", str(p))
    im_path = work / "imatrix.gguf"
    if not im_path.exists():
        ei("imatrix", str(f32), "--text", "@stdlib-calib", "-o", str(im_path), "--ctx", str(args.ctx),
           "--chunks", str(args.imatrix_chunks))
    im = load_imatrix(im_path)
    im_weights = {n: im.weights(n) for n in im.entries}
    for t in TYPES:
        q, use_im = t.split("+")[0], t.endswith("+imatrix")
        ours, theirs = work / f"ei-{t}.gguf", work / f"llama-{t}.gguf"
        if not ours.exists():
            ei("convert", str(ckpt), "--qtype", q, "-o", str(ours), *(["--imatrix", str(im_path)] if use_im else []))
        if not theirs.exists():
            llama_quantize(f16, theirs, q, imatrix=im_weights if use_im else None)
        files[t] = (ours, theirs)

    print("same input (edgeinfer's F32 GGUF) through llama_model_quantize vs edgeinfer convert:")
    for t in TYPES:
        q, use_im = t.split("+")[0], t.endswith("+imatrix")
        same = work / f"llama-from-F32-{t}.gguf"
        if not same.exists():
            llama_quantize(f32, same, q, imatrix=im_weights if use_im else None)
        a, b = read_tensors(files[t][0]), read_tensors(same)
        diff = [n for n in b if n not in a or a[n][0] != b[n][0] or not (a[n][1] == b[n][1]).all()]
        print(f"  {t:<16} {len(b)} tensors, {len(diff)} differ in type or bytes {diff[:5]}")
    print(flush=True)
    if args.skip_eval:
        return

    def score(p: Path) -> dict:
        out = json.loads(ei("eval", str(p), "--ref", str(work / "ref.npz"), "--ctx", str(args.ctx),
                            "--chunks", str(args.chunks), "--json"))
        r = gguf.GGUFReader(p)
        n = sum(int(t.n_elements) for t in r.tensors)
        b = sum(int(t.n_bytes) for t in r.tensors)
        out.update(size_mib=p.stat().st_size / 2**20, bpw=b * 8 / n)
        return out

    ref = json.loads(ei("eval", str(f32), "--ctx", str(args.ctx), "--chunks", str(args.chunks),
                        "--save-logits", str(work / "ref.npz"), "--json"))
    print(f"reference F32: perplexity {ref['perplexity']:.4f} over {ref['n_tokens']} tokens "
          f"({args.chunks} chunks of {args.ctx}, @stdlib-eval)\n")
    hdr = f"{'type':<16}{'who':<11}{'MiB':>7}{'bpw':>7}{'PPL':>9}{'mean KL':>10}{'p99 KL':>10}{'top-1':>8}"
    print(hdr)
    print("-" * len(hdr))
    rows = {}
    for t, (ours, theirs) in files.items():
        for who, p in (("edgeinfer", ours), ("llama.cpp", theirs)):
            s = score(p)
            rows[(t, who)] = s
            print(f"{t:<16}{who:<11}{s['size_mib']:>7.1f}{s['bpw']:>7.2f}{s['perplexity']:>9.4f}"
                  f"{s['mean_kl']:>10.5f}{s['p99_kl']:>10.5f}{s['top1_agreement'] * 100:>7.2f}%")
    print()
    for t in TYPES:
        a, b = rows[(t, "edgeinfer")]["mean_kl"], rows[(t, "llama.cpp")]["mean_kl"]
        print(f"{t:<16} KL ratio edgeinfer / llama.cpp = {a / b:.3f} ({'OK' if a <= b * 1.0001 else 'WORSE'})")
    a = rows[("Q4_K_M+imatrix", "edgeinfer")]["mean_kl"]
    b = rows[("Q4_K_M", "llama.cpp")]["mean_kl"]
    print(f"edgeinfer Q4_K_M+imatrix / llama.cpp Q4_K_M = {a / b:.3f} (target <= 0.9)")
    print(f"\nfiles in {work}")


if __name__ == "__main__":
    main()
