"""``stagewise train`` with LoRA, clipping, LR schedules, accumulation and metrics, end to end
on local ranks (the modules' own tests compare each piece with one process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from stagewise.cli import cli

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "finetune" / "model"
TEXT = ROOT / "examples" / "finetune" / "data" / "train.txt"
SMALL = ["--layers", "2", "--dim", "32", "--seq-len", "16", "--global-batch", "8", "-m", "4"]


def _train(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code = cli(["train", "--json", "--no-plots", "-p", "2", "--timeout", "60", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    report: dict[str, Any] = json.loads(captured.out[captured.out.index("{"):])
    return report


@pytest.mark.multiproc
@pytest.mark.slow
def test_lora_trains_adapters_only_and_exports_a_peft_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from safetensors import safe_open

    out, ckpt = tmp_path / "adapter", tmp_path / "ckpt"
    report = _train(capsys, "--model", str(MODEL), "--data", str(TEXT), "--seq-len", "32",
                    "--global-batch", "8", "-m", "4", "--steps", "4", "--lr", "1e-2",
                    "--lora", "r=4,alpha=8,targets=q_proj,v_proj", "--checkpoint-dir",
                    str(ckpt), "--save-every", "4", "--export-hf", str(out))
    assert report["losses"][-1] < report["losses"][0]
    # Model states counted on each rank's tensors, against the sizes by hand: r=4 adapters on
    # q_proj (64 -> 64) and v_proj (64 -> 2 kv heads x 16 = 32) in 4 blocks, fp32.
    adapters = 4 * 4 * ((64 + 64) + (64 + 32))
    base = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(
        MODEL).parameters())
    states = report["state_bytes"]
    assert sum(s["weights"] for s in states) == 4 * (base + adapters)
    assert sum(s["trainable"] for s in states) == sum(s["gradients"] for s in states) \
        == 4 * adapters
    moments = 2 * 4 * adapters  # AdamW's two moments; its step counters are a few bytes more
    assert moments <= sum(s["optimizer"] for s in states) <= moments + 8 * 4 * 4
    with safe_open(out / "adapter_model.safetensors", framework="pt") as adapter:
        names = list(adapter.keys())
    assert names
    assert all("lora_A" in name or "lora_B" in name for name in names)
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL)
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = peft.PeftModel.from_pretrained(base, out)(input_ids=ids).logits
    assert not torch.allclose(before, tuned)  # the trained adapters change the output


@pytest.mark.multiproc
@pytest.mark.slow
def test_lora_in_bf16_holds_the_frozen_base_in_bf16_and_the_adapters_in_fp32(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = _train(capsys, "--model", str(MODEL), "--data", str(TEXT), "--seq-len", "32",
                    "--global-batch", "8", "-m", "4", "--steps", "4", "--lr", "1e-2",
                    "--dtype", "bf16", "--lora", "r=4,alpha=8,targets=q_proj,v_proj")
    assert report["losses"][-1] < report["losses"][0]
    adapters = 4 * 4 * ((64 + 64) + (64 + 32))
    base = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(
        MODEL).parameters())
    states = report["state_bytes"]
    # 2 bytes per frozen base parameter (no fp32 master needed), 4 per adapter parameter.
    assert sum(s["weights"] for s in states) == 2 * base + 4 * adapters
    assert sum(s["trainable"] for s in states) == 4 * adapters


@pytest.mark.multiproc
@pytest.mark.slow
def test_schedule_clipping_accumulation_and_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from stagewise.train.optim import lr_at

    metrics = tmp_path / "metrics.jsonl"
    report = _train(capsys, *SMALL, "--steps", "5", "--lr", "0.01", "--lr-schedule", "linear",
                    "--warmup-steps", "2", "--clip-grad", "0.1", "--grad-accum", "2",
                    "--metrics", str(metrics))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["loss"] for row in rows] == report["losses"]
    expected = [lr_at(s, lr=0.01, schedule="linear", warmup_steps=2, total_steps=5)
                for s in range(5)]
    assert [row["lr"] for row in rows] == pytest.approx(expected)
    assert all(row["grad_norm"] > 0 for row in rows)
    assert len(report["peak_memory_bytes"]) == 2
    assert all(b > 0 for b in report["peak_memory_bytes"])
    # two batches of 8 x 16 tokens per optimizer step
    assert report["tokens_per_step"] == 2 * 8 * 16


def test_bad_training_options_are_refused_before_launch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refused(*argv: str) -> str:
        sizes = [] if "--model" in argv else SMALL
        assert cli(["train", "--no-plots", *sizes, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "--clip-grad must be a norm > 0" in refused("--clip-grad", "0")
    assert "does not fit a run of 30 steps" in refused("--warmup-steps", "30")
    assert "dtype = 'fp8': choose one of 'fp32', 'bf16'" in refused("--dtype", "fp8")
    assert "lr_schedule = 'step'" in refused("--lr-schedule", "step")
    assert "adapts a Hugging Face model folder" in refused("--lora", "r=4")
    err = refused("--model", str(MODEL), "--lora", "targets=qkv", "--global-batch", "8")
    assert "q_proj" in err  # names the modules the model has
    assert "not supported" in refused("--model", str(MODEL), "--lora", "r=4", "--mesh",
                                      "pp=1,tp=2")
