"""Speculative decoding: speed-up and acceptance, plain vs speculative runs interleaved, medians.

    python benchmarks/bench_speculative.py                      # both parts, 1 thread, 5 runs
    python benchmarks/bench_speculative.py --threads 2 --runs 7 --draft-n 2,4,8
    python benchmarks/bench_speculative.py --part lookup        # prompt lookup only

Part 1, draft model (torch engine): the default model converted by llama.cpp's quantizer
(``llama_model_quantize``, requantized from the embedded Q4_1) to F16 as the target and to Q4_0 as
the draft -- the offline pair of issue 15 -- both llama.cpp's Q4_0 mix (the tied embedding/head
stays Q8_0) and ``--pure`` Q4_0 (the head Q4_0 too: a cheaper draft step). Greedy, a few chat prompts; every speculative text must
equal the plain one (printed), each ``--draft-n`` value is a row.

Part 2, prompt lookup (both backends, the default model Q4_1): a code-editing request whose answer
copies most of the prompt, plain vs ``--prompt-lookup``.

Figures: decode tok/s as ``edgeinfer run --stats`` reports it (tokens after the first / time after
the first; a speculative first step may yield several tokens, which this counts as decode), the
end-to-end rate (generated tokens / request time, prefill included), acceptance = accepted /
drafted tokens, tokens per verification pass. Runs alternate plain / speculative so background
load hits both alike; the speed-up is the median of the per-run ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = ["Write a short story about a robot learning to paint.", "Explain how a hash map works.",
           "List five fruits and their colours."]
CODE = '''def parse_config(path):
    with open(path) as f:
        lines = f.readlines()
    config = {}
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config


def save_config(config, path):
    with open(path, "w") as f:
        for key, value in config.items():
            f.write(f"{key} = {value}\\n")
'''
EDIT = f"Here is some code:\n```python\n{CODE}```\nRewrite it with type hints. Output only the code."


def build_pair(workdir: Path) -> tuple[Path, Path, Path]:
    """The default model requantized to F16 (target), Q4_0 (draft: llama.cpp's Q4_0 mix, a Q8_0
    embedding/head) and pure Q4_0 (every matrix Q4_0, ``--pure``), cached in ``workdir``."""
    import _llama_quant as lq
    from edgeinfer.resolve import default_model_path

    src = default_model_path()
    out = []
    for recipe, pure in (("F16", False), ("Q4_0", False), ("Q4_0", True)):
        dst = workdir / f"smollm2-135m-{recipe.lower()}{'-pure' if pure else ''}.gguf"
        if not dst.exists():
            lq.llama_quantize(src, dst, recipe, allow_requantize=True, pure=pure)
        out.append(dst)
    return out[0], out[1], out[2]


def one(backend, prompt, max_tokens: int):
    """Greedy generation: (tokens, timings)."""
    from edgeinfer.backend import DoneEvent, SamplingParams

    toks, done = [], None
    for ev in backend.generate([{"role": "user", "content": prompt}], SamplingParams(temperature=0,
                                                                                     max_tokens=max_tokens)):
        if isinstance(ev, DoneEvent):
            done = ev
        elif ev.token_id >= 0:
            toks.append(ev.token_id)
    return toks, done.timings


def compare(label: str, plain, specs: dict, prompts: list[str], runs: int, max_tokens: int) -> list[dict]:
    """Interleave plain and each speculative backend over ``prompts`` x ``runs``; print and return rows."""
    for b in (plain, *specs.values()):  # warm-up
        one(b, prompts[0], 8)
    rows = []
    per = {name: {"dec": [], "e2e": [], "acc": 0, "drafted": 0, "steps": 0, "tok": 0, "same": True} for name in specs}
    base = {"dec": [], "e2e": []}
    for r in range(runs):
        for p in prompts:
            ref, tp = one(plain, p, max_tokens)
            base["dec"].append(tp.decode_tok_s)
            base["e2e"].append(len(ref) / tp.total_s)
            for name, b in specs.items():
                got, ts = one(b, p, max_tokens)
                d = per[name]
                d["dec"].append(ts.decode_tok_s / tp.decode_tok_s)
                d["e2e"].append((len(got) / ts.total_s) / (len(ref) / tp.total_s))
                d["acc"] += ts.draft_accepted
                d["drafted"] += ts.draft_tokens
                d["steps"] += ts.verify_steps
                d["tok"] += len(got)
                d["same"] &= got == ref
        print(f"  run {r + 1}/{runs} done", flush=True)
    print(f"\n{label}: plain decode {statistics.median(base['dec']):.1f} tok/s "
          f"(end-to-end {statistics.median(base['e2e']):.1f} tok/s), {len(prompts)} prompts x {runs} runs, "
          f"{max_tokens} tokens")
    print("| mode | decode speed-up | end-to-end speed-up | acceptance | tok/verify pass | greedy identical |")
    print("|---|---:|---:|---:|---:|---|")
    for name, d in per.items():
        row = dict(mode=name, dec=statistics.median(d["dec"]), e2e=statistics.median(d["e2e"]),
                   acc=d["acc"] / max(1, d["drafted"]), per_step=d["tok"] / max(1, d["steps"]), same=d["same"])
        rows.append(row)
        print(f"| {name} | {row['dec']:.2f}x | {row['e2e']:.2f}x | {row['acc']:.1%} | {row['per_step']:.2f} | "
              f"{row['same']} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--draft-n", default="3,5", help="comma-separated draft lengths for the draft model")
    ap.add_argument("--lookup-n", default="8", help="comma-separated draft lengths for prompt lookup")
    ap.add_argument("--drafts", default="Q4_0,pure Q4_0",
                    help="draft files: 'Q4_0' (llama.cpp's mix, Q8_0 head) and/or 'pure Q4_0' (comma-separated)")
    ap.add_argument("--p-min", type=float, default=None, help="draft model: stop drafting below this probability")
    ap.add_argument("--part", choices=["all", "draft", "lookup"], default="all")
    ap.add_argument("--workdir", default=None, help="where the F16/Q4_0 pair is written (default: a temp dir)")
    a = ap.parse_args()

    from edgeinfer.backend import LoadOptions, SpeculativeOptions
    from edgeinfer.backends import load_backend
    from edgeinfer.resolve import default_model_path

    opts = dict(n_ctx=2048, n_threads=a.threads, device="cpu")
    tmp = None
    if a.workdir:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="edgeinfer-bench-spec-")
        work = Path(tmp.name)
    try:
        if a.part in ("all", "draft"):
            target, mix, pure = build_pair(work)
            plain = load_backend("torch", target, LoadOptions(**opts))
            extra = {} if a.p_min is None else {"p_min": a.p_min}
            drafts = {"Q4_0": mix, "pure Q4_0": pure}
            specs = {f"draft {name}, K={k}": load_backend("torch", target, LoadOptions(
                **opts, speculative=SpeculativeOptions(draft=str(path), n_draft=int(k), **extra)))
                for name, path in drafts.items() if name in a.drafts.split(",") for k in a.draft_n.split(",")}
            compare(f"torch engine, target {target.name}, {a.threads} thread(s)", plain, specs,
                    PROMPTS, a.runs, a.max_tokens)
            for b in (plain, *specs.values()):
                b.close()
        if a.part in ("all", "lookup"):
            path = default_model_path()
            for backend in ("torch", "llama.cpp"):
                plain = load_backend(backend, path, LoadOptions(**opts))
                specs = {f"prompt lookup, K={k}": load_backend(backend, path, LoadOptions(
                    **opts, speculative=SpeculativeOptions(prompt_lookup=True, n_draft=int(k))))
                    for k in a.lookup_n.split(",")}
                compare(f"{backend}, default model {path.name}, code-editing prompt, {a.threads} thread(s)", plain,
                        specs, [EDIT], a.runs, 2 * a.max_tokens)
                for b in (plain, *specs.values()):
                    b.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
