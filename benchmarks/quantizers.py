"""Our quantizer plugins against vector-quantize-pytorch at the paper's shapes: time and peak memory.

Every case runs one of our quantizers (built through the catalog, ``xqgan_core.build``) and the closest
vector-quantize-pytorch module, configured to match it as far as that library allows (see ``CASES`` and the
"Quantizers" section of ``benchmarks/README.md`` for every mapping and every remaining difference).

One iteration = forward in training mode, then ``(sum of the returned losses + mean of the output).backward()``;
each starts by dropping the previous gradients (``grad = None``, free).

* **time**: both libraries in this process, iterations interleaved (ours, peer, peer, ours, ...), so that load from
  other processes on a shared machine hits both sides alike; ``--warmup`` untimed iterations (fewer, at least one,
  when they are slow next to ``--budget-s``), then the median of ``--iters`` timed ones (fewer, at least 3, once
  both sides together spent ``--budget-s``). Threads: torch's default (``--threads N`` to change it, e.g. 1 on a
  loaded machine, where every multi-threaded op can wait a scheduler slice for its second thread).
* **peak memory**: a fresh subprocess per (library, case), so peaks never mix. The child imports, builds the input,
  resets the kernel's high-water mark (``/proc/self/clear_refs``) and reads its RSS (``VmRSS``) as the baseline;
  then builds the module and runs 2 iterations (the second one sees any state the first one created). Peak = ``VmHWM - baseline``: the module (parameters,
  buffers such as a peer's all-codes table), activations, gradients and temporaries. (``VmHWM`` rather than
  ``ru_maxrss``: a child's ``ru_maxrss`` never drops below its parent's RSS at fork, so it would mix the two;
  where the reset is not allowed, ``ru_maxrss`` minus the baseline ``ru_maxrss`` is used instead.)
  The child's address space is capped (``RLIMIT_AS`` = its size after imports + ``--mem-cap-gib``), so a module
  that needs more fails its allocation and is reported as ``OOM (> cap)``; its timing is then skipped.

Usage::

    python benchmarks/quantizers.py                      # all cases, paper shapes (~5-8 min on 2 cores)
    python benchmarks/quantizers.py --cases vq-16384,lfq-14 --iters 20 --json out.json
    python benchmarks/quantizers.py --quick              # smoke run (~2 min): batch 2, 2 iterations, no 2^18 peer
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2
GIB = 1024**3

# Paper shapes: 16 images of 16x16 tokens of dimension 32; the multi-scale quantizer on 16 x 32 x 11x11.
BATCH = 16
TOKENS_SIDE = 16
DIM = 32
MSRQ_SIDE = 11
MSRQ_SCALES = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
RQ_LEVELS = 4
PQ_BRANCHES = 2

EMA_DECAY = 0.99
BETA = 0.25
ENTROPY_WEIGHT = 0.1
# the peer's LFQ scores codes with softmax(-distance * inv_temperature), inv_temperature = 100 by default;
# distance = -2 z.c, so its logits are 200 z.c = 2 z.c / T with T = 0.01 (our ``temperature``)
LFQ_TEMPERATURE = 0.01


# ---------------------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Target:
    """``kind = "speed"``: peer s/iter / ours s/iter >= value; ``"ours_peak"``: our peak memory < value bytes."""

    kind: str
    value: float

    def describe(self) -> str:
        if self.kind == "speed":
            return f">= {self.value:g}x faster"
        return f"ours < {self.value / GIB:g} GiB"


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, int, int, int]  # (B, C, H, W) at the paper's batch
    ours: dict[str, Any]
    peer_class: str
    peer_kwargs: dict[str, Any]
    note: str
    target: Target | None = None
    heavy_peer: bool = False  # the peer is expected to exceed the memory cap: never time it unless the child fit
    peer_tokens: bool = False  # the peer takes channel-last tokens (B, H*W, C) instead of (B, C, H, W)

    def with_batch(self, batch: int) -> "Case":
        return dataclasses.replace(self, shape=(batch, *self.shape[1:]))


def _our_vq(codebook_size: int, dim: int = DIM, l2_norm: bool = True) -> dict[str, Any]:
    # the peer only offers cosine similarity with an EMA-learned codebook, so ours learns by EMA here as well
    return {"use": "vq", "codebook_size": codebook_size, "dim": dim, "l2_norm": l2_norm, "beta": BETA,
            "ema_update": True, "ema_decay": EMA_DECAY}


def _peer_vq(codebook_size: int, cosine: bool = True) -> dict[str, Any]:
    # plain straight-through (rotation_trick is the peer's default for dim > 1), no k-means, no dead-code restarts
    return {"codebook_size": codebook_size, "use_cosine_sim": cosine, "commitment_weight": BETA, "decay": EMA_DECAY,
            "kmeans_init": False, "threshold_ema_dead_code": 0, "rotation_trick": False}


def _our_binary(use: str, bits: int) -> dict[str, Any]:
    return {"use": use, "bits": bits, "entropy_weight": ENTROPY_WEIGHT, "sample_entropy_weight": 1.0,
            "codebook_entropy_weight": 1.0, "commitment_weight": BETA, "temperature": LFQ_TEMPERATURE,
            "group_size": 1}


def _peer_binary(bits: int, spherical: bool) -> dict[str, Any]:
    return {"dim": bits, "codebook_size": 2**bits, "entropy_loss_weight": ENTROPY_WEIGHT, "diversity_gamma": 1.0,
            "commitment_loss_weight": BETA, "spherical": spherical}


def _msrq(codebook_size: int) -> dict[str, Any]:
    # the peer's HierarchicalVQ has euclidean EMA codebooks only, so the nested vq is euclidean + EMA
    return {"use": "msrq", "scales": list(MSRQ_SCALES), "beta": BETA, "phi_count": 4, "phi_gamma": 0.5,
            "code": _our_vq(codebook_size, l2_norm=False)}


def _build_cases() -> list[Case]:
    vq_shape = (BATCH, DIM, TOKENS_SIDE, TOKENS_SIDE)
    ms_shape = (BATCH, DIM, MSRQ_SIDE, MSRQ_SIDE)
    cases = [
        Case("vq-4096", vq_shape, _our_vq(4096), "VectorQuantize",
             {"dim": DIM, "accept_image_fmap": True, **_peer_vq(4096)}, "cosine, EMA codebook"),
        Case("vq-16384", vq_shape, _our_vq(16384), "VectorQuantize",
             {"dim": DIM, "accept_image_fmap": True, **_peer_vq(16384)}, "cosine, EMA codebook",
             Target("speed", 3.0)),
        Case(f"rq-{RQ_LEVELS}x4096", vq_shape,
             {"use": "rq", "levels": RQ_LEVELS, "code": _our_vq(4096)}, "ResidualVQ",
             {"dim": DIM, "num_quantizers": RQ_LEVELS, **_peer_vq(4096)},
             "separate codebooks, cosine, EMA; peer fed (B, H*W, C) tokens", peer_tokens=True),
        Case(f"pq-{PQ_BRANCHES}x4096", vq_shape,
             {"use": "pq", "branches": PQ_BRANCHES, "branch": _our_vq(4096, dim=DIM // PQ_BRANCHES)},
             "VectorQuantize",
             {"dim": DIM, "codebook_dim": DIM // PQ_BRANCHES, "heads": PQ_BRANCHES, "separate_codebook_per_head": True,
              "accept_image_fmap": True, **_peer_vq(4096)},
             "peer: heads + separate_codebook_per_head"),
    ]
    for k in (4096, 16384):
        cases.append(Case(
            f"msrq-{k}", ms_shape, _msrq(k), "HierarchicalVQ",
            {"dim": DIM, "codebook_size": k, "scales": list(MSRQ_SCALES), "shared_codebook": True,
             "accept_image_fmap": True, "commitment_weight": BETA, "decay": EMA_DECAY, "kmeans_init": False,
             "threshold_ema_dead_code": 0, "rotation_trick": False, "quant_resi": 0.5, "share_quant_resi": 4},
            "peer: HierarchicalVQ (VAR-style), euclidean EMA", Target("speed", 3.0)))
        cases.append(Case(
            f"msrq-{k}/rvq", ms_shape, _msrq(k), "ResidualVQ",
            {"dim": DIM, "num_quantizers": len(MSRQ_SCALES), "shared_codebook": True, **_peer_vq(k, cosine=False)},
            f"peer: ResidualVQ, {len(MSRQ_SCALES)} levels all at 11x11 (B, H*W, C) tokens", Target("speed", 3.0),
            peer_tokens=True))
    for bits in (14, 18):
        target = Target("speed", 10.0) if bits == 14 else Target("ours_peak", 1 * GIB)
        shape = (BATCH, bits, TOKENS_SIDE, TOKENS_SIDE)
        cases.append(Case(f"lfq-{bits}", shape, _our_binary("lfq", bits), "LFQ", _peer_binary(bits, False),
                          "entropy loss on, T = 0.01 (peer inv_temperature 100)", target, heavy_peer=bits > 16))
        cases.append(Case(f"bsq-{bits}", shape, _our_binary("bsq", bits), "LFQ", _peer_binary(bits, True),
                          "peer: LFQ(spherical=True)", target, heavy_peer=bits > 16))
    return cases


CASES = _build_cases()


# ---------------------------------------------------------------------------------------------------------------
# Building and running one side


def build_module(case: Case, lib: str) -> Any:
    import torch

    torch.manual_seed(0)
    if lib == "ours":
        from xqgan_core import build

        module = build("quantizer", case.ours)
    else:
        import vector_quantize_pytorch as vqp

        module = getattr(vqp, case.peer_class)(**case.peer_kwargs)
    return module.train()


def make_input(case: Case, lib: str) -> Any:
    """The latent batch ``(B, C, H, W)``; channel-last tokens ``(B, H*W, C)`` for a peer that takes those
    (made in that layout directly, so that no transpose is timed)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    b, c, h, w = case.shape
    if lib == "peer" and case.peer_tokens:
        return torch.randn((b, h * w, c), generator=gen).requires_grad_(True)
    return torch.randn(case.shape, generator=gen).requires_grad_(True)


def step_fn(module: Any, lib: str, z: Any) -> Callable[[], None]:
    """One forward + (sum of losses + mean of output).backward()."""

    def run() -> None:
        z.grad = None
        for p in module.parameters():
            p.grad = None
        if lib == "ours":
            out = module(z)
            loss = sum(out.losses.values()) + out.z_q.mean()
        else:
            # every peer module returns (output, indices, loss or per-level losses, ...)
            res = module(z)
            loss = res[2].sum() + res[0].mean()
        loss.backward()

    return run


# ---------------------------------------------------------------------------------------------------------------
# Memory: one fresh child per (library, case)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) * 1024 if match else 0


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the process's RSS high-water mark (VmHWM)
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_main(case_name: str, lib: str, cap_gib: float, batch: int, iters: int, threads: int | None) -> None:
    import torch  # (imports count in the baseline)

    if threads:
        torch.set_num_threads(threads)

    if lib == "ours":
        import xqgan_core  # noqa: F401
    else:
        import vector_quantize_pytorch  # noqa: F401
    case = _case(case_name).with_batch(batch)
    z = make_input(case, lib)
    cap = int(cap_gib * GIB)
    limit = _proc_status("VmSize") + cap
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    reset = _reset_high_water_mark()
    baseline = _proc_status("VmRSS") if reset else _peak_rss()
    result: dict[str, Any] = {"case": case_name, "lib": lib, "hwm_reset": reset}
    try:
        module = build_module(case, lib)
        run = step_fn(module, lib, z)
        for _ in range(iters):
            run()
        result["status"] = "ok"
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower() and "memory" not in str(exc).lower():
            raise
        result["status"] = "oom"
        result["error"] = str(exc).splitlines()[0][:200]
    result["peak_bytes"] = (_proc_status("VmHWM") if reset else _peak_rss()) - baseline
    print("RESULT " + json.dumps(result), flush=True)


def measure_memory(case: Case, lib: str, cap_gib: float, batch: int, iters: int, threads: int | None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case.name, "--lib", lib,
           "--mem-cap-gib", str(cap_gib), "--batch", str(batch), "--child-iters", str(iters)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    # killed, or failed outside the guarded region (e.g. a thread could not start under the cap)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    oom = proc.returncode < 0 or "memory" in tail.lower() or "alloc" in tail.lower()
    return {"case": case.name, "lib": lib, "status": "oom" if oom else "error", "error": tail[:200],
            "peak_bytes": None}


# ---------------------------------------------------------------------------------------------------------------
# Time: both sides in this process, interleaved


def measure_time(case: Case, sides: list[str], warmup: int, iters: int, budget_s: float) -> dict[str, list[float]]:
    z = {lib: make_input(case, lib) for lib in sides}
    runs = {lib: step_fn(build_module(case, lib), lib, z[lib]) for lib in sides}
    times: dict[str, list[float]] = {lib: [] for lib in sides}
    # warm-up: at least one iteration per side; more only while they stay cheap next to the budget
    t_warm = time.perf_counter()
    for _ in range(max(warmup, 1)):
        for lib in sides:
            runs[lib]()
        if time.perf_counter() - t_warm > budget_s / 4:
            break
    spent = 0.0
    for i in range(iters):
        order = sides if i % 2 == 0 else sides[::-1]
        for lib in order:
            t0 = time.perf_counter()
            runs[lib]()
            dt = time.perf_counter() - t0
            times[lib].append(dt)
            spent += dt
        # slow cases stop early, but never with fewer than 3 timed iterations per side
        if i >= 2 and spent > budget_s:
            break
    del runs, z
    return times


# ---------------------------------------------------------------------------------------------------------------
# Report


def _case(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise SystemExit(f"unknown case {name!r}; known: {', '.join(c.name for c in CASES)}")


def _fmt_time(t: float | None) -> str:
    return "-" if t is None else f"{t:.4f}"


def _fmt_mem(mem: dict[str, Any], cap_gib: float) -> str:
    if mem.get("status") == "oom":
        return f"OOM (> {cap_gib:g} GiB)"
    if mem.get("status") == "skipped":
        return "-"
    if mem.get("status") != "ok":
        return "error"
    return f"{mem['peak_bytes'] / MIB:.0f}"


def judge(row: dict[str, Any], quick: bool) -> str:
    target = row["target"]
    if target is None:
        return ""
    if quick:
        return "n/a (quick)"
    if target["kind"] == "speed":
        ratio = row["speed_ratio"]
        if ratio is None:
            return "n/a"
        return "yes" if ratio >= target["value"] else "NO"
    peak = row["ours_peak_bytes"]
    if peak is None:
        return "n/a" if row["ours_memory"].get("status") == "skipped" else "NO"
    return "yes" if peak < target["value"] else "NO"


def render_table(rows: list[dict[str, Any]], cap_gib: float) -> str:
    header = ["case", "ours s/iter", "peer s/iter", "speed ratio", "ours peak MiB", "peer peak MiB", "memory ratio",
              "target", "met?"]
    lines = []
    for r in rows:
        speed = "-" if r["speed_ratio"] is None else f"{r['speed_ratio']:.2f}x"
        if r["memory_ratio"] is not None:
            mem_ratio = f"{r['memory_ratio']:.2f}x"
        elif r["peer_memory"].get("status") == "oom":
            mem_ratio = f"> {cap_gib * GIB / max(r['ours_peak_bytes'] or 1, 1):.0f}x"
        else:
            mem_ratio = "-"
        lines.append([r["case"], _fmt_time(r["ours_s"]), _fmt_time(r["peer_s"]), speed,
                      _fmt_mem(r["ours_memory"], cap_gib), _fmt_mem(r["peer_memory"], cap_gib), mem_ratio,
                      r["target_text"], r["met"]])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the cases and their configurations, then exit")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per side before timing")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per side (median reported)")
    parser.add_argument("--budget-s", type=float, default=25.0,
                        help="stop timing a case once both sides together spent this long (>= 3 iterations kept)")
    parser.add_argument("--mem-cap-gib", type=float, default=10.0,
                        help="address-space cap of each memory child above its size after imports (default 10: "
                             "leaves room for others on a shared 24 GiB machine)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 2, 1 warm-up + 2 timed iterations, 4 GiB cap, the peer's 2^18-code "
                             "cases skipped; targets not judged")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size (default: paper's 16)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lib", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--child-iters", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child_main(args.child, args.lib, args.mem_cap_gib, args.batch or BATCH, args.child_iters, args.threads)
        return

    if args.list:
        for c in CASES:
            print(f"{c.name}: input {c.shape}; ours {c.ours}\n    peer {c.peer_class}({c.peer_kwargs}); {c.note}")
        return

    if args.quick:
        args.warmup, args.iters, args.budget_s, args.mem_cap_gib = 1, 2, 5.0, min(args.mem_cap_gib, 4.0)
        args.batch = args.batch or 2
    batch = args.batch or BATCH
    cases = [_case(n.strip()) for n in args.cases.split(",") if n.strip()] or CASES
    cases = [c.with_batch(batch) for c in cases]

    import torch
    from importlib.metadata import version

    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        raise SystemExit("vector-quantize-pytorch is missing: pip install -r requirements/bench.txt") from None

    if args.threads:
        torch.set_num_threads(args.threads)

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "vector_quantize_pytorch": version("vector-quantize-pytorch"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "batch": batch,
        "warmup": args.warmup,
        "iters": args.iters,
        "mem_cap_gib": args.mem_cap_gib,
        "quick": args.quick,
    }
    print(f"# {meta['date']}  torch {meta['torch']}  vector-quantize-pytorch {meta['vector_quantize_pytorch']}  "
          f"threads {meta['torch_threads']}  load {' '.join(f'{x:.2f}' for x in meta['loadavg_start'])}", flush=True)

    busy = meta["loadavg_start"][0] >= 0.75 * (os.cpu_count() or 1)
    if busy and torch.get_num_threads() > 1:
        print(f"WARNING: load average {meta['loadavg_start'][0]:.1f} on {os.cpu_count()} CPUs. Other processes hold the "
              "cores, so each multi-threaded op may wait a scheduler slice for its second thread: timings then "
              "count ops more than work. Rerun when idle, or compare with --threads 1.", flush=True)

    rows = []
    for case in cases:
        t_case = time.perf_counter()
        libs = ["ours"] if case.heavy_peer and args.quick else ["ours", "peer"]
        mem = {lib: {"status": "skipped", "peak_bytes": None} for lib in ("ours", "peer")}
        if not args.no_memory:
            for lib in libs:
                mem[lib] = measure_memory(case, lib, args.mem_cap_gib, batch, 2, args.threads)
                if mem[lib]["status"] not in ("ok", "oom"):
                    print(f"  {case.name} {lib}: memory child failed: {mem[lib].get('error')}", flush=True)
        sides = ["ours"]
        if "peer" in libs and mem["peer"]["status"] in ("ok", "skipped") and not (case.heavy_peer and args.no_memory):
            sides.append("peer")
        times = measure_time(case, sides, args.warmup, args.iters, args.budget_s)
        ours_s = statistics.median(times["ours"])
        peer_s = statistics.median(times["peer"]) if "peer" in times else None
        ours_peak = mem["ours"].get("peak_bytes") if mem["ours"].get("status") == "ok" else None
        peer_peak = mem["peer"].get("peak_bytes") if mem["peer"].get("status") == "ok" else None
        row = {
            "case": case.name,
            "shape": list(case.shape),
            "ours_config": case.ours,
            "peer": f"{case.peer_class}({', '.join(f'{k}={v!r}' for k, v in case.peer_kwargs.items())})",
            "note": case.note,
            "ours_s": ours_s,
            "peer_s": peer_s,
            "ours_times": times["ours"],
            "peer_times": times.get("peer", []),
            "speed_ratio": None if peer_s is None else peer_s / ours_s,
            "ours_memory": mem["ours"],
            "peer_memory": mem["peer"],
            "ours_peak_bytes": ours_peak,
            "peer_peak_bytes": peer_peak,
            "memory_ratio": None if not (ours_peak and peer_peak) else peer_peak / ours_peak,
            "target": None if case.target is None else {"kind": case.target.kind, "value": case.target.value},
            "target_text": "" if case.target is None else case.target.describe(),
        }
        row["met"] = judge(row, args.quick)
        rows.append(row)
        print(f"{case.name}: ours {_fmt_time(ours_s)} s, peer {_fmt_time(peer_s)} s, memory ours "
              f"{_fmt_mem(mem['ours'], args.mem_cap_gib)} / peer {_fmt_mem(mem['peer'], args.mem_cap_gib)} MiB "
              f"({time.perf_counter() - t_case:.0f} s)", flush=True)

    meta["loadavg_end"] = os.getloadavg()
    print()
    print(render_table(rows, args.mem_cap_gib))
    print(f"\nload average at start {meta['loadavg_start']}, at end {meta['loadavg_end']} "
          f"({meta['cpu_count']} CPUs); speed ratio = peer s / ours s, memory ratio = peer peak / ours peak")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
