"""Fine-tuning a ~100M-parameter Llama folder: ``stagewise train --model`` (pp=2) against plain
``transformers`` + torch in one process, tokens/s and weight-load time, in the same run.

    .venv/bin/python benchmarks/finetune_speed.py             # defaults: 10 to 15 minutes
    .venv/bin/python benchmarks/finetune_speed.py --json      # the same figures as JSON
    .venv/bin/python benchmarks/finetune_speed.py --seq-len 256 --steps 6    # about twice as long

Defaults: global batch 8 x 128 tokens, 5 steps (4 timed), 3 repeats of each side; the model
folder is made on the first run (about a minute). On a shared 2-core machine at load average 4
to 12 the defaults took 14.5 minutes (about 20 s a step on either side); a quiet one is faster.

The model folder is made once and cached under ``--work`` (default
``/tmp/stagewise-finetune-bench``): a Llama-shaped ``LlamaConfig`` (width 768, 12 blocks, 12
heads, 4 key/value heads, MLP 2048, 32,000-entry untied embedding and head: 124.7M
parameters, 75.5M of them in the blocks; printed) with random weights (seed 0), saved by
``save_pretrained`` as safetensors, and a byte-level BPE tokenizer trained with ``tokenizers``
on ``examples/finetune/data/train.txt`` (its vocabulary is smaller than the embedding, which
is allowed). The training data is that text repeated into one ``.txt`` file.

Measured, interleaved (stagewise, transformers, stagewise, transformers...) ``--repeats``
times, medians reported with each repeat's figure:

- **stagewise**: ``stagewise train --model FOLDER --data FILE -p 2 -m 4 --global-batch G
  --seq-len S --steps N --threads 1 --json --no-plots`` in a subprocess; its
  ``tokens_per_second`` (global tokens per step / median step, the first step left out, each
  step as long as its slowest rank saw it, the optimizer included). 2 ranks x 1 thread.
- **transformers**: in this process, ``AutoModelForCausalLM.from_pretrained(FOLDER)`` (float32,
  sdpa), AdamW with the same learning rate, G sequences of S tokens per step from the same
  data file (tokenised with the folder's tokenizer, cut into S-token rows, shuffled by seed 0:
  the same sizes, not the very rows stagewise draws) as one batch,
  ``model(input_ids=..., labels=...)``, ``backward()``, ``step()``, ``zero_grad()``; tokens/s =
  G x S / median step, the first step left out. ``torch.set_num_threads(2)``: the same total
  number of threads as stagewise's 2 ranks x 1 (``--threads`` changes both).
- **weight load**: per rank, ``folder_parts(FOLDER, seq_len=S, empty=True)`` (the model built
  on the meta device, the safetensors headers matched), ``partition`` into the run's 2 stages
  (``params``, as ``train`` cuts), ``stages_for_rank`` under the run's 1F1B schedule, and
  ``parts.materialize`` of that rank's layers, one by one, as ``train`` does; against
  ``AutoModelForCausalLM.from_pretrained(FOLDER)`` of the whole model. Both in this process
  (each rank in turn, with the rank's thread count), the files in the page cache after the
  first read (the repeats are warm reads on both sides).

The machine is shared and noisy: the load average is printed at the start and the end, and the
ratio of medians is the figure to read, not either side's absolute tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "examples" / "finetune" / "data" / "train.txt"
SPECIALS = ["<pad>", "<s>", "</s>"]
NUM_RANKS = 2
SCHEDULE = "1f1b"


@dataclass(frozen=True)
class Bench:
    """Sizes of one benchmark run."""

    work: Path
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    global_batch: int
    microbatches: int
    seq_len: int
    steps: int
    repeats: int
    threads: int
    lr: float
    text_repeats: int

    @property
    def folder(self) -> Path:
        return self.work / (f"llama-h{self.hidden}-i{self.intermediate}-l{self.layers}-"
                            f"a{self.heads}-kv{self.kv_heads}-v{self.vocab}")

    @property
    def data(self) -> Path:
        return self.work / f"train-x{self.text_repeats}.txt"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _make_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on the bundled text, saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train([str(TEXT)], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(folder)


def make_folder(bench: Bench) -> int:
    """The model folder and the data file (made once, then reused); the parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = bench.folder
    if not bench.data.exists():
        bench.data.parent.mkdir(parents=True, exist_ok=True)
        text = TEXT.read_text()
        bench.data.write_text("\n\n".join([text] * bench.text_repeats))
    config = LlamaConfig(
        hidden_size=bench.hidden, intermediate_size=bench.intermediate,
        num_hidden_layers=bench.layers, num_attention_heads=bench.heads,
        num_key_value_heads=bench.kv_heads, vocab_size=bench.vocab,
        max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        with torch.device("meta"):
            count = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
        return count
    _log(f"making {folder} (once)")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp, safe_serialization=True)
    _make_tokenizer(tmp)
    del model
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return count


def stagewise_exe() -> list[str]:
    """The ``stagewise`` command beside this Python (or its module when not installed)."""
    exe = Path(sys.executable).parent / "stagewise"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stagewise.cli.main"]


def _stagewise_command(bench: Bench) -> list[str]:
    return [*stagewise_exe(), "train", "--model", str(bench.folder), "--data", str(bench.data),
            "-s", SCHEDULE, "-p", str(NUM_RANKS), "-m", str(bench.microbatches),
            "--global-batch", str(bench.global_batch), "--seq-len", str(bench.seq_len),
            "--steps", str(bench.steps), "--lr", str(bench.lr),
            "--threads", str(max(1, bench.threads // NUM_RANKS)), "--timeout", "900",
            "--data-cache", str(bench.work / "cache"), "--json", "--no-plots"]


def run_stagewise(bench: Bench) -> dict[str, Any]:
    """One ``stagewise train`` run in a subprocess: its tokens/s, step times and losses."""
    start = time.perf_counter()
    done = subprocess.run(_stagewise_command(bench), capture_output=True, text=True,
                          check=False, cwd=bench.work)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"stagewise train failed ({done.returncode}):\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    return {"tokens_per_second": float(report["tokens_per_second"]),
            "step_seconds": [float(s) for s in report["step_seconds"]],
            "losses": [float(x) for x in report["losses"]], "wall_seconds": wall}


def token_rows(bench: Bench) -> torch.Tensor:
    """The data file tokenised with the folder's tokenizer, cut into ``seq_len``-token rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bench.folder)
    ids = tokenizer(bench.data.read_text())["input_ids"]
    rows = len(ids) // bench.seq_len
    needed = bench.global_batch * bench.steps
    if rows < needed:
        raise SystemExit(f"{bench.data} holds {rows} rows of {bench.seq_len} tokens, "
                         f"{needed} needed: raise --text-repeats")
    return torch.tensor(ids[: rows * bench.seq_len]).view(rows, bench.seq_len)


def _from_pretrained(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="sdpa")


def run_transformers(bench: Bench, rows: torch.Tensor) -> dict[str, Any]:
    """Plain transformers + torch in this process: tokens/s, step times and losses."""
    torch.set_num_threads(bench.threads)
    torch.manual_seed(0)
    model = _from_pretrained(bench.folder)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=bench.lr)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    seconds, losses = [], []
    for step in range(bench.steps):
        batch = rows[order[step * bench.global_batch:(step + 1) * bench.global_batch]]
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    del model, optimizer
    gc.collect()
    tokens = bench.global_batch * bench.seq_len
    return {"tokens_per_second": tokens / statistics.median(seconds[1:]),
            "step_seconds": seconds, "losses": losses}


def load_rank(bench: Bench, rank: int) -> float:
    """Seconds for one rank to build the model empty and read only its own layers."""
    from stagewise.runtime.engine.partition import partition, stages_for_rank
    from stagewise.runtime.models.hf_folder import folder_parts
    from stagewise.schedules import build

    torch.set_num_threads(max(1, bench.threads // NUM_RANKS))
    schedule = build(SCHEDULE, num_ranks=NUM_RANKS, num_microbatches=bench.microbatches)
    start = time.perf_counter()
    parts = folder_parts(bench.folder, seq_len=bench.seq_len, empty=True)
    stages = partition(list(parts.layers), schedule.num_stages, "params")
    mine = stages_for_rank(schedule, stages, rank)
    assert parts.materialize is not None
    for module in mine.values():
        for layer in module.children():
            parts.materialize([layer])
    elapsed = time.perf_counter() - start
    left = [n for m in mine.values() for n, p in m.named_parameters() if p.is_meta]
    if left:
        raise SystemExit(f"rank {rank}: parameters left on the meta device: {left[:3]}")
    del parts, stages, mine
    gc.collect()
    return elapsed


def load_whole(bench: Bench) -> float:
    """Seconds for ``from_pretrained`` of the whole model."""
    torch.set_num_threads(bench.threads)
    start = time.perf_counter()
    model = _from_pretrained(bench.folder)
    elapsed = time.perf_counter() - start
    del model
    gc.collect()
    return elapsed


def measure(bench: Bench) -> dict[str, Any]:
    """Every figure, the two sides interleaved repeat after repeat."""
    rows = token_rows(bench)
    runs: dict[str, list[Any]] = {"stagewise": [], "transformers": [], "load_rank": [],
                                  "load_whole": []}
    for repeat in range(bench.repeats):
        _log(f"repeat {repeat + 1}/{bench.repeats}: weight load")
        runs["load_rank"].append([load_rank(bench, r) for r in range(NUM_RANKS)])
        runs["load_whole"].append(load_whole(bench))
        _log(f"repeat {repeat + 1}/{bench.repeats}: stagewise train")
        runs["stagewise"].append(run_stagewise(bench))
        _log(f"  {runs['stagewise'][-1]['tokens_per_second']:,.0f} tokens/s")
        _log(f"repeat {repeat + 1}/{bench.repeats}: transformers")
        runs["transformers"].append(run_transformers(bench, rows))
        _log(f"  {runs['transformers'][-1]['tokens_per_second']:,.0f} tokens/s")
    ours = statistics.median(r["tokens_per_second"] for r in runs["stagewise"])
    theirs = statistics.median(r["tokens_per_second"] for r in runs["transformers"])
    return {
        "runs": runs,
        "stagewise_tokens_per_second": ours,
        "transformers_tokens_per_second": theirs,
        "ratio": ours / theirs,
        "ratios_per_repeat": [a["tokens_per_second"] / b["tokens_per_second"]
                              for a, b in zip(runs["stagewise"], runs["transformers"],
                                              strict=True)],
        "load_rank_seconds": [statistics.median(r[k] for r in runs["load_rank"])
                              for k in range(NUM_RANKS)],
        "load_whole_seconds": statistics.median(runs["load_whole"]),
    }


def _per(values: list[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def _print(bench: Bench, params: int, result: dict[str, Any]) -> None:
    runs = result["runs"]
    per_rank = max(1, bench.threads // NUM_RANKS)
    print(f"model: {bench.folder} ({params:,} parameters, float32)")
    print(f"run: global batch {bench.global_batch} x seq len {bench.seq_len} = "
          f"{bench.global_batch * bench.seq_len:,} tokens/step, {bench.steps} steps (first "
          f"left out), {bench.repeats} repeats interleaved; stagewise {SCHEDULE} "
          f"p={NUM_RANKS} m={bench.microbatches} ({NUM_RANKS} ranks x {per_rank} thread(s)), "
          f"transformers one process x {bench.threads} threads, one batch of "
          f"{bench.global_batch}; cores here: {len(os.sched_getaffinity(0))}")
    print("\n| | tokens/s (median) | per repeat |\n|---|---|---|")
    for side in ("stagewise", "transformers"):
        print(f"| {side} | {result[side + '_tokens_per_second']:,.0f} | "
              f"{_per([r['tokens_per_second'] for r in runs[side]], ',.0f')} |")
    print(f"| ratio stagewise / transformers | {result['ratio']:.2f} | "
          f"{_per(result['ratios_per_repeat'], '.2f')} |")
    print("\n| weight load | seconds (median) | per repeat |\n|---|---|---|")
    for rank in range(NUM_RANKS):
        print(f"| stagewise rank {rank} (its layers only) | "
              f"{result['load_rank_seconds'][rank]:.2f} | "
              f"{_per([r[rank] for r in runs['load_rank']], '.2f')} |")
    print(f"| from_pretrained (whole model) | {result['load_whole_seconds']:.2f} | "
          f"{_per(runs['load_whole'], '.2f')} |")
    start, end = result["loadavg_start"], result["loadavg_end"]
    print(f"\nload average (1, 5, 15 min): start {_per(list(start), '.2f')}; "
          f"end {_per(list(end), '.2f')}")
    print("The machine is shared and noisy: read the ratio of medians, not either side's "
          "absolute tokens/s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/stagewise-finetune-bench"),
                        help="where the model folder, data and token cache are kept")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000, help="embedding rows")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("-m", "--microbatches", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per run (first left out)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2,
                        help="total torch threads per side (stagewise: split over its ranks)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--text-repeats", type=int, default=300,
                        help="copies of the bundled text in the data file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    bench = Bench(
        work=args.work.resolve(), hidden=args.hidden, intermediate=args.intermediate,
        layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
        global_batch=args.global_batch, microbatches=args.microbatches,
        seq_len=args.seq_len, steps=args.steps, repeats=args.repeats, threads=args.threads,
        lr=args.lr, text_repeats=args.text_repeats,
    )
    loadavg_start = os.getloadavg()
    params = make_folder(bench)
    _log(f"{params:,} parameters; threads: stagewise {NUM_RANKS} ranks x "
         f"{max(1, bench.threads // NUM_RANKS)}, transformers 1 process x {bench.threads}")
    result = measure(bench)
    result["loadavg_start"], result["loadavg_end"] = loadavg_start, os.getloadavg()
    result["parameters"] = params
    if args.json:
        bench_fields = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(bench).items()}
        print(json.dumps({"bench": bench_fields, **result}, indent=1))
    else:
        _print(bench, params, result)


if __name__ == "__main__":
    main()
