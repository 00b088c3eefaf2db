"""The three example scripts, each run as written under ``torch.compile`` and under ``chronicals run``.

    python -m benchmarks.examples [--size qwen0.5b] [--scripts plain hf trl]
                                  [--modes compile chronicals] [--json out.json]
                                  [--logs dir] [--device cpu] [--timeout 240]

For each script in examples/ (``train_plain.py``, ``train_hf_trainer.py``, ``train_trl_sft.py``):

* ``compile``: ``python examples/X.py --compile`` — the script's own torch.compile switch
  (``torch.compile(model)``; ``TrainingArguments(torch_compile=True)``), i.e. Inductor alone;
* ``chronicals``: ``chronicals run examples/X.py`` — the script unmodified, without ``--compile``:
  the model is optimized when training starts (launch hook 2);
* ``eager`` (``--modes eager ...``): ``python examples/X.py``;
* ``chronicals_compile`` (``--modes ... chronicals_compile``): ``chronicals run examples/X.py
  --compile`` — the script's own torch.compile call, given the chronicals backend (hook 1).

Each is its own process with a timeout. The table gives real tokens/s over the steps after the
script's warmup, the speedup over the compile run, loss first→last, the largest per-step loss gap
to the compile run, the smallest grad norm, and what chronicals optimized (its ``CHRONICALS_RUN``
line). Without CUDA it exits 2 unless ``--device cpu`` is given (CPU numbers say nothing about
speed: the fused kernels are GPU kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"plain": "train_plain.py", "hf": "train_hf_trainer.py", "trl": "train_trl_sft.py"}
RUN_PREFIX = "CHRONICALS_RUN "


def command(script: str, mode: str, extra: list[str]) -> list[str]:
    path = str(ROOT / "examples" / SCRIPTS[script])
    if mode.startswith("chronicals"):
        flag = ["--compile"] if mode == "chronicals_compile" else []
        return [sys.executable, "-m", "chronicals_fx", "run", path, *flag, *extra]
    return [sys.executable, path, *(["--compile"] if mode == "compile" else []), *extra]


def run_one(script: str, mode: str, extra: list[str], timeout: float, env: dict,
            log_dir: Path | None) -> dict:
    from chronicals_fx.workload import parse_example_output

    cmd = command(script, mode, extra)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=ROOT)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")) + \
            f"\n[timed out after {timeout:.0f} s]"
        rc = "timeout"
    wall = time.perf_counter() - start
    if log_dir is not None:
        (log_dir / f"{script}.{mode}.log").write_text(
            f"$ {' '.join(cmd)}\n[rc {rc}, {wall:.1f} s]\n{out}\n--- stderr ---\n{err}")
    result = parse_example_output(out) or {}
    run_line = [line for line in err.splitlines() if line.startswith(RUN_PREFIX)]
    tail = "\n".join((err or out).strip().splitlines()[-3:])
    return {"script": script, "mode": mode, "cmd": cmd, "rc": rc, "wall_s": wall,
            "result": result, "error": None if result and rc == 0 else tail,
            "chronicals": json.loads(run_line[-1][len(RUN_PREFIX):]) if run_line else None}


def _optimized(run: dict) -> str:
    info = run["chronicals"]
    if not info:
        return "-"
    counts = ", ".join(f"{op} {n}" for op, n in info["counts"].items() if n)
    return f"{info['graphs']} graphs: {counts or 'nothing matched'}"


def table(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        r = run["result"]
        base = next((b["result"] for b in runs if b["script"] == run["script"]
                     and b["mode"] == "compile" and b["result"]), None)
        if not r:
            last = (run["error"] or "").strip().splitlines() or [""]
            rows.append((run["script"], run["mode"], "failed", "", "", "", "",
                         f"rc {run['rc']}: {last[-1][:80]}"))
            continue
        losses, tps = r["losses"], r["tokens_per_s"]
        speedup = f"{tps / base['tokens_per_s']:.2f}×" if base and base["tokens_per_s"] else "-"
        gap = (f"{max(abs(a - b) for a, b in zip(losses, base['losses'])):.2e}"
               if base and base["losses"] else "-")
        rows.append((run["script"], run["mode"], f"{tps:,.0f}" if tps else "-", speedup,
                     f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "-", gap,
                     f"{r['min_grad_norm']:.3f}" if r.get("min_grad_norm") else "-",
                     _optimized(run)))
    return tabulate(rows, headers=("script", "mode", "real tok/s", "vs compile",
                                   "loss first → last", "max |Δloss| vs compile",
                                   "min grad norm", "chronicals optimized"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default=None, help="tiny or qwen0.5b (default: qwen0.5b on CUDA, "
                                                "tiny on CPU)")
    p.add_argument("--scripts", nargs="*", choices=SCRIPTS, default=list(SCRIPTS))
    p.add_argument("--modes", nargs="*", default=["compile", "chronicals"],
                   choices=("eager", "compile", "chronicals", "chronicals_compile"))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--timeout", type=float, default=240, help="seconds per run")
    p.add_argument("--steps", type=int, help="passed to every script (default: the script's)")
    p.add_argument("--json", help="write every run's results here")
    p.add_argument("--logs", help="folder for each run's full output")
    args = p.parse_args(argv)

    import torch

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.examples: no CUDA device; pass --device cpu to run the scripts on the "
              "CPU (correctness only: the fused kernels are GPU kernels)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    size = args.size or ("qwen0.5b" if args.device == "cuda" else "tiny")
    extra = ["--size", size, *(["--steps", str(args.steps)] if args.steps else [])]
    log_dir = Path(args.logs) if args.logs else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    modes = args.modes
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"examples, size {size}, {device}, torch {torch.__version__}: "
          f"{' '.join(args.scripts)} × {' '.join(modes)}", flush=True)

    runs = []
    for script in args.scripts:
        for mode in modes:
            run = run_one(script, mode, extra, args.timeout, env, log_dir)
            runs.append(run)
            r = run["result"]
            status = (f"{r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s")
                      else f"FAILED ({run['rc']}): {run['error']}")
            print(f"  {script:6s} {mode:10s} {run['wall_s']:6.1f} s  {status}", flush=True)
    print()
    print(table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "device": device,
                                               "torch": torch.__version__, "runs": runs},
                                              indent=1))
    return 0 if all(run["result"] and run["rc"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
