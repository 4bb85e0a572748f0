"""The scorer's model path on a lent GPU machine: ``make bench-scorer-gpu`` -> scorer_gpu.json.

Two halves, because the GPU machine reaches nothing (no Kafka, no Redis, no registry, no PyPI):

- ``prepare`` (here, on the CPU machine): packs what the model path needs into a bundle folder
  (``var/gpu-bundle``, ignored by git; ~50 MB, under the device tool's 64 MiB): the serving
  version's encoder weights in fp16, its ranking head, tokenizer, product embeddings and texts,
  and 256 Best Buy test searches with their 100 candidates and real served features (read from a
  memory feature store replayed with the training period), plus msgspec/structlog wheels for the
  device's Python 3.12.
- ``run`` (there, via ``bench/gpu.sh run``): measures per micro-batch of B queries x 100
  candidates, p50 over repeated runs:
  * stage 1 = query encoder + ranking head: CPU fp32 (onnxruntime, the scorer's own graphs,
    exported there) vs CUDA fp16 (PyTorch eager, and replayed as a CUDA graph);
  * stage 2 = cross-encoder re-rank of the top 100 (scorer/rerank.py's model, ``[CLS] query
    [SEP] product [SEP]``, 128 word pieces): CUDA fp16 vs CPU fp32 (batch 1 only: it is slow),
    and onnxruntime's CUDA provider with an fp16 graph and IO binding when the machine's
    onnxruntime has it (the serving path; the stock image's onnxruntime is CPU-only, and the
    onnxruntime-gpu wheel is larger than what the tool carries);
  * agreement: fp16 GPU vs fp32 CPU scores (max |diff|, top-10 overlap).

The cross-encoder's head is untrained (seeded): these are costs, not quality. No Kafka or Redis
there, so these are model-path figures; the end-to-end figures are ``make bench-scorer``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "var" / "gpu-bundle"
N_QUERIES = 256
CANDIDATES = 100
WHEELS = ("msgspec==0.23.0", "structlog==26.1.0")


# --- prepare (CPU machine) ---------------------------------------------------------------------


def prepare(bundle: Path, force_tiny: bool) -> None:
    """Write the bundle from the serving version (a tiny one when none serves)."""
    import shutil
    import subprocess

    import torch
    from safetensors.torch import save_file

    from bench.scorer import choose_model, query_specs, seed_features
    from core.registry import load_version
    from core.settings import Settings
    from core.text import product_text
    from evaluation.splits import bestbuy_split
    from features.memory import MemoryStore
    from features.read import Request, read_batch

    settings = Settings()
    choice = choose_model(force_tiny)
    version = load_version(choice.registry, choice.version)
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "wheels").mkdir(parents=True)
    state = torch.load(version.path / "weights.pt", map_location="cpu", weights_only=True)
    save_file({k[len("query.encoder."):]: v.half().contiguous() for k, v in state.items()
               if k.startswith("query.encoder.") and ".pooler." not in k},
              str(bundle / "encoder.safetensors"))
    save_file({k[len("head."):]: v.contiguous() for k, v in state.items() if k.startswith("head.")},
              str(bundle / "head.safetensors"))
    shutil.copy(version.path / "tokenizer.json", bundle / "tokenizer.json")
    emb = np.load(version.path / "product_emb.npy").astype(np.float16)
    np.save(bundle / "product_emb.npy", emb)
    ids: list[str] = json.loads((version.path / "product_ids.json").read_text())
    index = {p: i for i, p in enumerate(ids)}

    split = bestbuy_split(settings.data_dir)
    store = MemoryStore(settings.features)
    seed_features(store, split)  # type: ignore[arg-type]  # the same apply/apply_batch interface
    specs = query_specs(split)[:N_QUERIES]
    cfg = version.manifest["config"]
    feats = read_batch(store, [Request.for_text(s.user_id, s.text, list(s.candidates),
                                                positions=list(range(1, CANDIDATES + 1))) for s in specs],
                       now=max(s.timestamp.timestamp() for s in specs))
    hist_len = cfg["history_len"]
    hist_idx = np.full((len(specs), hist_len), len(ids), np.int64)
    hist_w = np.zeros((len(specs), hist_len), np.float32)
    for i, f in enumerate(feats):
        k = min(hist_len, len(f.recent_products))
        hist_idx[i, :k] = [index.get(p, len(ids)) for p in f.recent_products[:k]]
        hist_w[i, :k] = f.recent_weights[:k]
    np.savez_compressed(
        bundle / "inputs.npz",
        cand_idx=np.array([[index.get(p, len(ids)) for p in s.candidates] for s in specs], np.int64),
        dense=np.stack([f.features for f in feats]).astype(np.float32), hist_idx=hist_idx, hist_w=hist_w)
    (bundle / "bundle.json").write_text(json.dumps({
        "model_version": choice.version, "model": "tiny" if choice.tiny else "serving", "config": cfg,
        "queries": [s.text for s in specs], "product_texts": [product_text(split.catalog[p]) for p in ids],
    }))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(bundle / "wheels"), *WHEELS], check=True)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2**20
    print(f"bundle {bundle}: model {choice.version}{' (tiny)' if choice.tiny else ''}, {size:.1f} MiB")
    if choice.cleanup is not None:
        shutil.rmtree(choice.cleanup, ignore_errors=True)


# --- run (GPU machine) --------------------------------------------------------------------------


def timed(fn: Callable[[], Any], sync: Callable[[], None], reps: int, budget_s: float,
          warmup: int = 3) -> dict[str, float]:
    """p50/p90 milliseconds of ``fn`` (``sync`` waits for the device), within a time budget."""
    for _ in range(warmup):
        fn()
    sync()
    out: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(out) < reps and (len(out) < 3 or time.perf_counter() < deadline):
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(float(np.percentile(out, 50)), 3),
            "p90_ms": round(float(np.percentile(out, 90)), 3), "runs": len(out)}


def run(bundle: Path, out: Path, batches: list[int], budget_s: float, smoke: bool = False) -> dict[str, Any]:
    """Measure; ``smoke`` runs the GPU branch on the CPU in fp32 (a check of the code, not figures)."""
    import onnxruntime as ort
    import torch
    from safetensors.torch import load_file

    from scorer.rerank import (
        CROSS_INPUTS,
        CrossEncoderSession,
        build_cross_encoder,
        export_cross_encoder,
        pair_inputs,
        pair_tokenizer,
    )
    from trainer.export import export_onnx
    from trainer.model import PersonalRanker, RankerConfig, load_encoder

    started = time.perf_counter()
    meta = json.loads((bundle / "bundle.json").read_text())
    cfg = RankerConfig.from_dict(meta["config"])
    inputs = np.load(bundle / "inputs.npz")
    emb32 = np.load(bundle / "product_emb.npy").astype(np.float32)
    table = np.vstack([emb32, np.zeros((1, emb32.shape[1]), np.float32)])
    encoder_state = {k: v.float() for k, v in load_file(str(bundle / "encoder.safetensors")).items()}
    model = PersonalRanker(cfg, load_encoder(None, cfg.encoder))
    model.query.encoder.load_state_dict(encoder_state)
    model.head.load_state_dict(load_file(str(bundle / "head.safetensors")))
    model.eval()
    cuda = torch.cuda.is_available()
    gpu = cuda or smoke
    dev = torch.device("cuda" if cuda else "cpu")
    half = torch.float16 if cuda else torch.float32
    result: dict[str, Any] = {
        "model_version": meta["model_version"], "model": meta["model"], "candidates": CANDIDATES,
        "device": torch.cuda.get_device_name(0) if cuda else "no GPU", "cpu_cores": os.cpu_count(),
        "torch": torch.__version__, "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(), "python": platform.python_version(),
    }
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tmp = Path(tempfile.mkdtemp(prefix="shoprank-gpu-"))

    # Stage 1 on CPU: the scorer's two graphs in onnxruntime (fp32, all of this machine's cores).
    export_onnx(model, tmp)
    model.eval()  # the exporter restores its temporary wrapper's train mode onto the model: undo
    opts = ort.SessionOptions()
    cpu = ["CPUExecutionProvider"]
    enc_s = ort.InferenceSession(str(tmp / "query_encoder.onnx"), opts, providers=cpu)
    head_s = ort.InferenceSession(str(tmp / "ranker_head.onnx"), opts, providers=cpu)
    tok = pair_tokenizer(bundle / "tokenizer.json", cfg.max_query_len)
    queries: list[str] = meta["queries"]
    texts: list[str] = meta["product_texts"]

    def stage1_feeds(b: int) -> dict[str, np.ndarray]:
        rows = np.arange(b) % len(queries)
        enc = tok.encode_batch([queries[i] for i in rows])
        return {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                "cand_emb": table[inputs["cand_idx"][rows]], "hist_emb": table[inputs["hist_idx"][rows]],
                "hist_w": inputs["hist_w"][rows], "dense": inputs["dense"][rows]}

    def cpu_stage1(f: dict[str, np.ndarray]) -> np.ndarray:
        q = enc_s.run(None, {"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]})[0]
        return head_s.run(None, {"query_emb": q, "cand_emb": f["cand_emb"], "hist_emb": f["hist_emb"],
                                 "hist_w": f["hist_w"], "dense": f["dense"]})[0]

    # Stage 1 on GPU: fp16 torch, eager and as a replayed CUDA graph (static shapes per batch size).
    gmodel = model.to(dev, half)
    stage1: dict[str, Any] = {}
    agreement: dict[str, Any] = {}
    for b in batches:
        f = stage1_feeds(b)
        tf = {k: torch.from_numpy(v).to(dev) for k, v in f.items()}
        for k in ("cand_emb", "hist_emb", "hist_w", "dense"):
            tf[k] = tf[k].to(half)

        def eager(tf: dict[str, torch.Tensor] = tf) -> torch.Tensor:
            with torch.inference_mode():
                return gmodel(tf["input_ids"], tf["attention_mask"], tf["cand_emb"], tf["hist_emb"],
                              tf["hist_w"], tf["dense"])

        row: dict[str, Any] = {"cpu_fp32_ort": timed(lambda f=f: cpu_stage1(f), lambda: None, 30, budget_s)}
        if gpu:
            row["cuda_fp16_eager"] = timed(eager, sync, 100, budget_s)
            got = eager().float().cpu().numpy()
            if cuda:
                try:
                    replay = cuda_graph(torch, eager)
                    row["cuda_fp16_graph"] = timed(replay, sync, 200, budget_s)
                except Exception as exc:  # a capture failure costs the figure, not the run
                    row["cuda_fp16_graph"] = f"capture failed: {exc}"[:300]
            agreement[f"stage1_b{b}"] = _agree(cpu_stage1(f), got)
        stage1[f"b{b}"] = row
        print(f"stage1 b={b}: {json.dumps(row)}", flush=True)
    result["stage1"] = stage1

    # Stage 2: the cross-encoder over (query, product text) for the 100 candidates of each query.
    ce = build_cross_encoder(cfg.encoder, encoder_state)
    ptok = pair_tokenizer(bundle / "tokenizer.json")

    def pair_feeds(b: int) -> dict[str, np.ndarray]:
        pairs = [(queries[i % len(queries)], texts[j]) for i in range(b)
                 for j in inputs["cand_idx"][i % len(queries)] if j < len(texts)]
        return pair_inputs(ptok, pairs)

    export_cross_encoder(ce, tmp / "ce32.onnx")
    ce_cpu = CrossEncoderSession(tmp / "ce32.onnx", bundle / "tokenizer.json", cpu)
    rerank: dict[str, Any] = {}
    f1 = pair_feeds(1)
    rerank["cpu_fp32_ort_b1"] = timed(lambda: ce_cpu.run(f1), lambda: None, 10, budget_s, warmup=1)
    rerank["pairs_b1"] = int(f1["input_ids"].shape[0])
    rerank["tokens_b1"] = int(f1["attention_mask"].sum())
    print(f"rerank cpu b=1: {json.dumps(rerank['cpu_fp32_ort_b1'])}", flush=True)
    if gpu:
        gce = ce.to(dev, half)
        ort_cuda = None
        if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            export_cross_encoder(build_cross_encoder(cfg.encoder, encoder_state), tmp / "ce16.onnx",
                                 fp16=True, device="cuda")
            ort_cuda = CrossEncoderSession(tmp / "ce16.onnx", bundle / "tokenizer.json",
                                           ["CUDAExecutionProvider", "CPUExecutionProvider"])
        for b in batches:
            f = pair_feeds(b)
            tf = {k: torch.from_numpy(f[k]).to(dev) for k in CROSS_INPUTS}

            def ce_eager(tf: dict[str, torch.Tensor] = tf) -> torch.Tensor:
                with torch.inference_mode():
                    return gce(*(tf[k] for k in CROSS_INPUTS))

            row = {"pairs": int(f["input_ids"].shape[0]),
                   "cuda_fp16_eager": timed(ce_eager, sync, 50, budget_s)}
            if ort_cuda is not None:
                row["cuda_fp16_ort_iobinding"] = timed(lambda f=f: ort_cuda.run(f), sync, 50, budget_s)
            if b == 1:
                agreement["rerank_b1"] = _agree(ce_cpu.run(f)[None], ce_eager().float().cpu().numpy()[None])
            rerank[f"b{b}"] = row
            print(f"rerank b={b}: {json.dumps(row)}", flush=True)
        if ort_cuda is None:
            rerank["ort_cuda"] = "not measured: this machine's onnxruntime has no CUDA provider"
    result["rerank"] = rerank
    result["agreement"] = agreement
    result["summary"] = _summary(result, batches)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["command"] = "bash bench/gpu.sh run (device tool), bundle from make bench-scorer-gpu"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def cuda_graph(torch: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured as a CUDA graph (static shapes, warmed on a side stream); returns its replay."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _agree(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """fp16 vs fp32 scores per query: largest |diff| and the mean overlap of their top 10."""
    overlap = [len(set(np.argsort(-r)[:10]) & set(np.argsort(-g)[:10])) / 10
               for r, g in zip(ref, got, strict=True)]
    return {"max_abs_diff": round(float(np.max(np.abs(ref - got))), 5),
            "top10_overlap": round(float(np.mean(overlap)), 3)}


def _summary(r: dict[str, Any], batches: list[int]) -> dict[str, Any]:
    """Per-query figures at batch 1 and at the largest batch, read off the tables above."""
    s1, rr = r["stage1"], r["rerank"]
    big = f"b{max(batches)}"
    out: dict[str, Any] = {"stage1_cpu_b1_ms": s1["b1"]["cpu_fp32_ort"]["p50_ms"],
                           "rerank_cpu_b1_ms": rr["cpu_fp32_ort_b1"]["p50_ms"]}
    if "cuda_fp16_eager" in s1.get("b1", {}):
        def best(row: dict[str, Any]) -> float:  # the CUDA graph where it was captured, else eager
            graph = row.get("cuda_fp16_graph")
            return graph["p50_ms"] if isinstance(graph, dict) else row["cuda_fp16_eager"]["p50_ms"]

        out["stage1_cuda_b1_ms"] = best(s1["b1"])
        out["stage1_cuda_qps_at_" + big] = round(max(batches) / best(s1[big]) * 1000)
        out["rerank_cuda_b1_ms"] = rr["b1"]["cuda_fp16_eager"]["p50_ms"]
        out["rerank_cuda_qps_at_" + big] = round(max(batches) / rr[big]["cuda_fp16_eager"]["p50_ms"] * 1000)
        out["two_stage_cuda_b1_ms"] = round(out["stage1_cuda_b1_ms"] + out["rerank_cuda_b1_ms"], 3)
        out["rerank_speedup_b1"] = round(out["rerank_cpu_b1_ms"] / out["rerank_cuda_b1_ms"], 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["prepare", "run"])
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "results"))
                        / "scorer_gpu.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--budget-s", type=float, default=8.0, help="time cap per measured configuration")
    parser.add_argument("--tiny", action="store_true", help="prepare: a tiny model even when one is serving")
    parser.add_argument("--smoke", action="store_true", help="run: the GPU branch on the CPU (code check)")
    args = parser.parse_args()
    if args.what == "prepare":
        prepare(args.bundle, args.tiny)
        return 0
    result = run(args.bundle, args.out, args.batches, args.budget_s, args.smoke)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
