"""One configuration of Hugging Face transformers (torch) `generate`, in its own process.

Runs in the reference env (bench/.envs/ref: torch 2.13.0 CPU, transformers 5.23.0):

    bench/.envs/ref/bin/python bench/worker_hf.py --model 270m --dtype fp32 --out /tmp/hf.json

`Gemma3ForCausalLM` with a Gemma 3 text config (random init, eager attention as the library
picks it, its default dynamic KV cache), greedy, `min_new_tokens` = `max_new_tokens` so end
tokens cannot stop a run. Prompt ids from `common.prompt_ids` (the same ids our engine gets).
  first_call_s : the first generate(64) of the process (warm-up: allocations, oneDNN kernels)
  stream       : generate(64, streamer=...) with a streamer that timestamps each token
                 (HF's streaming path; the streamer's first put() is the prompt, skipped)
  ttft_*       : generate(max_new_tokens=1) for the 100- and 1000-token prompts
  loop_tok_s   : (64 - 1) / (generate(64) - generate(1))   (as the anchor figures)
With --serve-ttft the worker only serves ttft_100 to bench/run.py's duel (common.serve_ttft).
Eager torch has no compilation: compile fields are reported as 0 recompilations by design.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

args = common.worker_args(__doc__.splitlines()[0])

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

if os.environ.get("BENCH_HF_THREADS"):  # default: torch's own choice (all cores)
    torch.set_num_threads(int(os.environ["BENCH_HF_THREADS"]))
store, compute = common.DTYPES[args.dtype]
if store != compute:
    raise SystemExit(f"dtype {args.dtype}: HF runs one dtype for weights and compute")
TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}
dev = "cuda" if args.device == "gpu" else "cpu"
N, REPS = args.new_tokens, args.reps
med = common.median

rec = common.Recorder(
    args.out, engine="hf", model=args.model, dtype=args.dtype, torch=torch.__version__,
    transformers=transformers.__version__, threads=torch.get_num_threads(), device=dev,
    prompt_tokens=args.prompt_tokens, long_prompt_tokens=args.long_prompt_tokens, new_tokens=N,
    reps=REPS,
)  # fmt: skip


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


rec.phase("init")
a = common.ARCH[args.model]
cfg = Gemma3TextConfig(
    vocab_size=common.GEMMA3_VOCAB,
    hidden_size=a["d"],
    intermediate_size=a["f"],
    num_hidden_layers=a["layers"],
    num_attention_heads=a["heads"],
    num_key_value_heads=a["kv_heads"],
    head_dim=a["head_dim"],
    sliding_window=a["window"],
    query_pre_attn_scalar=a["head_dim"],
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    pad_token_id=common.PAD,
    bos_token_id=common.BOS,
    eos_token_id=[common.EOS, common.END_OF_TURN],
)  # fmt: skip  (4B's rope scaling of global layers is left out: it does not change the cost)
t = time.perf_counter()
torch.manual_seed(0)
with torch.device(dev):
    model = Gemma3ForCausalLM(cfg).to(TORCH[compute]).eval()
sync()
rec.set(
    init_s=round(time.perf_counter() - t, 2),
    n_params=sum(p.numel() for p in model.parameters()),
    param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
    attn_impl=getattr(model.config, "_attn_implementation", None),
    rss_after_init_mib=common.current_rss_mib(),
)


def as_input(ids):
    x = torch.tensor([ids], device=dev)
    return x, torch.ones_like(x)


class TimingStreamer(BaseStreamer):
    def __init__(self):
        self.timer = common.StreamTimer()
        self.seen_prompt = False
        self.count = 0

    def put(self, value):
        if not self.seen_prompt:  # generate() first hands the streamer the prompt ids
            self.seen_prompt = True
            return
        self.count += int(value.numel())
        self.timer.tick()

    def end(self):
        pass


def gen(ids, n, streamer=None):
    x, mask = as_input(ids)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            use_cache=True, pad_token_id=common.PAD, streamer=streamer,
        )  # fmt: skip
    sync()
    dt = time.perf_counter() - t
    assert out.shape[1] - x.shape[1] == n, out.shape
    return dt


ids = common.prompt_ids(args.prompt_tokens)
long_ids = common.prompt_ids(args.long_prompt_tokens, seed=1)

if args.serve_ttft:  # duel mode (bench/run.py --duel): the TTFT below only
    common.serve_ttft(lambda: gen(ids, 1))
    sys.exit(0)

rec.phase("first_call")
rec.set(first_call_s=round(gen(ids, N), 3), compile_s=0.0, compiles_turn2=0, compiles_turn3=0)

rec.phase("stream")
streams = []
for _ in range(REPS):
    s = TimingStreamer()
    gen(ids, N, s)
    assert s.count == N, s.count
    streams.append(s.timer)
rec.set(
    stream_tok_s=med(t.tok_s for t in streams),
    stream_tok_s_raw=[round(t.tok_s, 3) for t in streams],
    stream_ttft_s=med(t.ttft for t in streams),
)

rec.phase("loop")
ttft, full = [], []
for _ in range(REPS):
    ttft.append(gen(ids, 1))
    full.append(gen(ids, N))
rec.set(
    ttft_100_s=med(ttft), ttft_100_raw=[round(x, 4) for x in ttft], loop_s=med(full),
    loop_s_raw=[round(x, 4) for x in full],
    loop_tok_s=med((N - 1) / (f - med(ttft)) for f in full), loop_e2e_tok_s=N / med(full),
)  # fmt: skip

rec.phase("ttft_long")
gen(long_ids, 1)  # warm-up for the new shapes
ttft_long = [gen(long_ids, 1) for _ in range(REPS)]
rec.set(ttft_long_s=med(ttft_long), ttft_long_raw=[round(x, 4) for x in ttft_long])
if dev == "cuda":
    rec.set(device_peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1))
rec.done()
