"""answer_loss_curve in one batched forward pass against the per-prefix loop.

Tiny randomly initialised GPT-2 and Llama models (built locally, never loaded from a hub) over
the reasoning task's vocabulary; one question of S steps (6 tokens each), the answer digit
scored after ``A:``, at every cut point 0 ... 6S. Prints the median seconds per curve of both,
their ratio, and the largest difference between the two curves.

    PYTHONPATH=$PWD python bench/experiments/answer_loss_bench.py [--steps 4 8 16] [--repeats 10]
        [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
import transformers

from metakernels.analysis import answer_loss_curve, answer_loss_curve_loop
from metakernels.benchmarks.timing import time_interleaved
from metakernels.train.tasks import reasoning_data as rd


def build(kind: str, width: int, layers: int):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=rd.VOCAB_SIZE, n_positions=512, n_embd=width,
                                         n_layer=layers, n_head=4, bos_token_id=rd.BOS,
                                         eos_token_id=rd.EOS, attn_implementation="sdpa")
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=rd.VOCAB_SIZE, hidden_size=width,
                                      intermediate_size=2 * width, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=512, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"models: {args.layers} layers, width {args.width}, sdpa attention, float32")
    print(f"{'model':<6} {'S':>3} {'cuts':>5} {'tokens 1-pass':>13} {'loop ms':>9} "
          f"{'1-pass ms':>10} {'loop/1-pass':>12} {'max |diff|':>11}")
    for kind in ("gpt2", "llama"):
        model = build(kind, args.width, args.layers)
        for steps in args.steps:
            batch = rd.sample_questions(1, steps, generator=torch.Generator().manual_seed(steps))
            inputs = (batch.prompt_ids[0], batch.flat_trajectories()[0, 0], batch.answer_ids[0])
            prefix = torch.tensor([rd.ANSWER])
            with torch.no_grad():
                curve = answer_loss_curve(model, *inputs, answer_prefix_ids=prefix)
                loop = answer_loss_curve_loop(model, *inputs, answer_prefix_ids=prefix)
                samples = time_interleaved({
                    "loop": lambda: answer_loss_curve_loop(model, *inputs,
                                                           answer_prefix_ids=prefix),
                    "one_pass": lambda: answer_loss_curve(model, *inputs,
                                                          answer_prefix_ids=prefix),
                }, repeats=args.repeats)
            loop_s, one_s = (statistics.median(samples[k]) for k in ("loop", "one_pass"))
            tokens = inputs[0].numel() + inputs[1].numel() + curve.numel() * prefix.numel()
            print(f"{kind:<6} {steps:>3} {curve.numel():>5} {tokens:>13} {loop_s * 1e3:>9.2f} "
                  f"{one_s * 1e3:>10.2f} {loop_s / one_s:>11.1f}x "
                  f"{(curve - loop).abs().max().item():>11.1e}")


if __name__ == "__main__":
    main()
