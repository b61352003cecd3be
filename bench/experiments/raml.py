"""The RaML paper's central measurement on the ``walk`` task, graded against its closed-form
reference: the answer loss L̂ after every prefix of the trajectory, for the implicit inner loop (a
causal LM trained by SFT on question + trajectory + answer) and for the explicit one (the trainer's
fast-weight memory, one inner step of the fused op per trajectory entry), against
H_k = H(Binomial(S − k, 1/3)).

Runs, each trained then measured on the same held-out questions:

- ``lm``: GPT-2 (2 layers, width 64) on fresh questions with the canonical trajectory and
  early-exit copies (:mod:`metakernels.train.walk_lm`);
- ``lm-none``: the same model trained without the trajectory (question, ``A:``, answer);
- ``fwm``: ``metakernels train --task walk --algo maml`` (answer after every entry);
- ``lm-K{1,2,4,8}``: the LM on a fixed set of training questions, K distinct groupings each.

Writes ``OUT/raml.json`` (the fields of issue 19 and more), ``OUT/answer_loss.png`` (L̂ against
H_k, correct and corrupted, both learners), ``OUT/k_sweep.png`` and ``OUT/pass_at_k.png``. The
training runs go to ``--runs`` (default ``OUT/runs``) and are reused when their summary exists
(an interrupted run resumes from its checkpoint). From the repository root::

    PYTHONPATH=. python bench/experiments/raml.py --out build/raml --quick
    PYTHONPATH=. python bench/experiments/raml.py --out bench/results/raml
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Held-out questions come from their own stream, disjoint in practice from training's (S3 with
# S = 12 has 6^12 ≈ 2·10^9 questions).
EVAL_SEED = 2 ** 31 - 1
KS = (1, 2, 4, 8)

# steps of each run, per size
SIZES = {
    "smoke": dict(length=4, lm_steps=8, none_steps=4, fwm_steps=3, sweep_steps=4,
                  sweep_questions=8, sweep_batch=8, questions=6, samples=4, pass_ks=(1, 2),
                  ks=(1, 2), fwm_eval=8, batch=8),
    "quick": dict(length=12, lm_steps=800, none_steps=500, fwm_steps=1000, sweep_steps=400,
                  sweep_questions=1000, sweep_batch=32, questions=500, samples=16,
                  pass_ks=tuple(range(1, 9)), ks=KS, fwm_eval=1000, batch=64),
    "full": dict(length=12, lm_steps=1500, none_steps=800, fwm_steps=1500, sweep_steps=800,
                 sweep_questions=1000, sweep_batch=32, questions=1000, samples=16,
                 pass_ks=tuple(range(1, 9)), ks=KS, fwm_eval=1000, batch=64),
}


def lm_job(name: str, runs: str, settings: dict, measure: dict) -> dict:
    """Trains one causal LM (or resumes it) and measures it; runs in a worker process."""
    import torch
    from metakernels.train import walk_lm as lm
    from metakernels.train.tasks import walk_data as wd
    torch.set_num_threads(1)
    out = Path(runs) / name
    began = time.perf_counter()
    if not (out / lm.SUMMARY).exists():
        lm.train_lm(lm.WalkLMConfig(out=str(out), progress=False,
                                    resume=(out / lm.CHECKPOINT).exists(), **settings))
    trained = time.perf_counter() - began
    model, vocab, config = lm.load_lm(out)
    questions = lm.held_out(config, measure["questions"], EVAL_SEED)
    result = {"run": str(out), "train": json.loads((out / lm.SUMMARY).read_text())}
    if not config.trajectory:
        loss, correct = lm.final_answer(model, vocab, questions, trajectory=False)
        greedy = lm.generate_answers(model, vocab, questions)[:, 0] == questions.answer
        result.update(answer_loss=loss.mean().item(), accuracy=greedy.float().mean().item(),
                      accuracy_argmax=correct.float().mean().item())
    else:
        curves = lm.answer_loss_curves(model, vocab, questions)
        wrong, steps = wd.corrupt(questions, config.group,
                                  generator=torch.Generator().manual_seed(EVAL_SEED - 1))
        corrupted = lm.answer_loss_curves(model, vocab, questions, wrong)
        loss, correct = lm.final_answer(model, vocab, questions, trajectory=True)
        greedy = lm.generate_answers(model, vocab, questions)[:, 0] == questions.answer
        result.update(answer_loss=curves.mean(0).tolist(),
                      answer_loss_corrupted=corrupted.mean(0).tolist(),
                      accuracy=greedy.float().mean().item(),
                      accuracy_given_trajectory=correct.float().mean().item())
        if measure.get("samples"):
            sampled = lm.generate_answers(model, vocab, questions, samples=measure["samples"],
                                          sample=True, seed=EVAL_SEED % 10007)
            hits = sampled == questions.answer[:, None]
            passes, mg = lm.pass_curves(hits, measure["pass_ks"])
            result.update(pass_at_k=passes, mg_pass_at_k=mg,
                          sampled_accuracy=hits.float().mean().item(),
                          samples=measure["samples"])
    result["seconds"] = {"train_and_resume": trained, "total": time.perf_counter() - began}
    return result


def fwm_job(name: str, runs: str, settings: dict, measure: dict) -> dict:
    """Trains the fast-weight memory with the trainer (``--task walk``) and measures it."""
    import torch
    from metakernels.train import TrainConfig, train
    from metakernels.train.trajectory_loss import load_run, trajectory_loss_curves
    torch.set_num_threads(1)
    out = Path(runs) / name
    began = time.perf_counter()
    if not (out / "summary.json").exists():
        train(TrainConfig(task="walk", algo="maml", out=str(out), progress=False, threads=1,
                          resume=(out / "checkpoint.pt").exists(), log_every=10,
                          checkpoint_every=100, eval_tasks=measure["fwm_eval"], **settings))
    summary = json.loads((out / "summary.json").read_text())
    task, model, _ = load_run(out)
    curves = trajectory_loss_curves(task, model, measure["questions"], seed=EVAL_SEED)
    return {"run": str(out), "train": summary, "answer_loss": curves["correct"],
            "answer_loss_corrupted": curves["corrupted"],
            "accuracy": summary["eval"]["query_accuracy_after_adapt"],
            "seconds": {"total": time.perf_counter() - began}}


def plan(size: dict, group: str) -> dict:
    """name -> (job function, training settings)."""
    s, batch = size["length"], size["batch"]
    jobs = {
        "lm": (lm_job, dict(group=group, length=s, steps=size["lm_steps"], batch=batch)),
        "lm-none": (lm_job, dict(group=group, length=s, steps=size["none_steps"], batch=batch,
                                 trajectory=False)),
        "fwm": (fwm_job, dict(steps=size["fwm_steps"], trajectory_length=s,
                              meta_batch=min(32, batch))),
    }
    for k in size["ks"]:
        jobs[f"lm-K{k}"] = (lm_job, dict(group=group, length=s, steps=size["sweep_steps"],
                                         batch=size["sweep_batch"],
                                         questions=size["sweep_questions"],
                                         trajectories=k))
    return jobs


def criteria(reference: list[float], lm: dict, none: dict, fwm: dict) -> dict:
    """The issue's "Done when" thresholds, evaluated on the measured numbers (reported, never
    tuned)."""
    curve, memory = lm["answer_loss"], fwm["answer_loss"]
    falls = all(b <= a + 0.05 for a, b in zip(curve, curve[1:]))
    lm_bound = [max(1.15 * h, h + 0.1) for h in reference]
    fwm_bound = [max(1.25 * h, h + 0.2) for h in reference]
    return {
        "lm_falls_each_prefix_within_0.05": falls,
        "lm_below_max(1.15H,H+0.1)_every_k": all(v <= b for v, b in zip(curve, lm_bound)),
        "lm_ends_at_most_0.1": curve[-1] <= 0.1,
        "lm_accuracy_gap_at_least_0.3": lm["accuracy"] - none["accuracy"] >= 0.3,
        "fwm_below_max(1.25H,H+0.2)_every_k": all(v <= b for v, b in zip(memory, fwm_bound)),
        "fwm_ends_at_most_0.2": memory[-1] <= 0.2,
        "lm_excess_over_reference": [v - h for v, h in zip(curve, reference)],
        "fwm_excess_over_reference": [v - h for v, h in zip(memory, reference)],
    }


def plot(result: dict, out: Path) -> None:
    from matplotlib.figure import Figure
    reference = result["no_lookahead"]
    ks = range(len(reference))
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    axes.plot(ks, reference, "k--", lw=2, label="reference H_k = H(Bin(S−k, 1/3))")
    lm, fwm = result["causal_lm"]["trajectory"], result["fast_weight_memory"]["trajectory"]
    axes.plot(ks, lm["answer_loss"], "o-", color="C0", label="causal LM, correct")
    axes.plot(ks, lm["answer_loss_corrupted"], "o:", color="C0", alpha=0.6,
              label="causal LM, corrupted")
    axes.plot(ks, fwm["answer_loss"], "s-", color="C1", label="fast-weight memory, correct")
    axes.plot(ks, fwm["answer_loss_corrupted"], "s:", color="C1", alpha=0.6,
              label="fast-weight memory, corrupted")
    axes.axhline(result["causal_lm"]["no_trajectory"]["answer_loss"], color="C2", ls="-.",
                 label="causal LM without trajectory")
    task = result["task"]
    axes.set(xlabel="trajectory entries read (k)", ylabel="answer loss L̂ (nats)",
             title=f"walk over {task['group']}, S = {task['length']}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "answer_loss.png", dpi=110)

    figure = Figure(figsize=(9, 3.8))
    left, right = figure.subplots(1, 2)
    sweep = result["trajectories_per_question"]
    ks_sweep = [row["K"] for row in sweep]
    left.plot(ks_sweep, [row["accuracy"] for row in sweep], "o-", label="accuracy (greedy)")
    left.plot(ks_sweep, [row["accuracy_given_trajectory"] for row in sweep], "s--",
              label="accuracy given the true trajectory")
    left.set(xscale="log", xlabel="trajectories per question K", ylabel="accuracy",
             title=f"{sweep[0]['questions']} training questions" if sweep else "")
    left.set_xticks(ks_sweep, [str(k) for k in ks_sweep])
    left.set_xticks([], minor=True)
    left.legend(fontsize=8)
    for row in sweep:
        right.plot(ks, row["answer_loss_curve"], "o-", label=f"K = {row['K']}")
    right.plot(ks, reference, "k--", label="H_k")
    right.set(xlabel="entries read (k)", ylabel="L̂ (nats)", title="L̂ per K")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "k_sweep.png", dpi=110)

    figure = Figure(figsize=(5, 3.8))
    axes = figure.subplots()
    ks_pass = [int(k) for k in lm["pass_at_k"]]
    axes.plot(ks_pass, list(lm["pass_at_k"].values()), "o-", label="Pass@k")
    axes.plot(ks_pass, list(lm["mg_pass_at_k"].values()), "s-", label="mG-Pass@k")
    axes.set(xlabel="k", ylabel="score", ylim=(-0.02, 1.02),
             title=f"causal LM, {lm['samples']} samples at T = 1")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "pass_at_k.png", dpi=110)


def tables(result: dict) -> str:
    """The measured numbers as markdown tables (written to OUT/tables.md)."""
    reference = result["no_lookahead"]
    lm, fwm = result["causal_lm"]["trajectory"], result["fast_weight_memory"]["trajectory"]
    none = result["causal_lm"]["no_trajectory"]
    cell = lambda v: f"{v:.3f}"  # noqa: E731
    lines = [f"`{result['command']}` ({result['size']}, {result['held_out_questions']} held-out "
             f"questions)", "",
             "| k | " + " | ".join(str(k) for k in range(len(reference))) + " |",
             "|---|" + "---|" * len(reference)]
    rows = [("H_k (reference)", reference), ("causal LM, correct", lm["answer_loss"]),
            ("causal LM, corrupted", lm["answer_loss_corrupted"]),
            ("bound max(1.15 H, H + 0.1)", [max(1.15 * h, h + 0.1) for h in reference]),
            ("fast-weight memory, correct", fwm["answer_loss"]),
            ("fast-weight memory, corrupted", fwm["answer_loss_corrupted"]),
            ("bound max(1.25 H, H + 0.2)", [max(1.25 * h, h + 0.2) for h in reference])]
    lines += [f"| {name} | " + " | ".join(cell(v) for v in values) + " |" for name, values in rows]
    lines += ["", "| model | accuracy (greedy, own trajectory) | accuracy given the true "
              "trajectory | answer loss |", "|---|---|---|---|",
              f"| causal LM with trajectory | {cell(lm['accuracy'])} | "
              f"{cell(lm['accuracy_given_trajectory'])} | {cell(lm['answer_loss'][-1])} |",
              f"| causal LM without trajectory | {cell(none['accuracy'])} | - | "
              f"{cell(none['answer_loss'])} |",
              f"| fast-weight memory (after all S entries) | - | {cell(fwm['accuracy'])} | "
              f"{cell(fwm['answer_loss'][-1])} |", ""]
    ks = list(lm["pass_at_k"])
    lines += [f"| {lm['samples']} samples at T = 1 | " + " | ".join(ks) + " |",
              "|---|" + "---|" * len(ks),
              "| Pass@k | " + " | ".join(cell(lm["pass_at_k"][k]) for k in ks) + " |",
              "| mG-Pass@k | " + " | ".join(cell(lm["mg_pass_at_k"][k]) for k in ks) + " |", ""]
    lines += ["| K | training questions | steps × batch | accuracy (greedy) | accuracy given "
              "the true trajectory | L̂ after S | L̂ mean over prefixes |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {row['K']} | {row['questions']} | {row['steps']} × {row['batch']} | "
              f"{cell(row['accuracy'])} | {cell(row['accuracy_given_trajectory'])} | "
              f"{cell(row['answer_loss'])} | {cell(row['answer_loss_mean_over_prefixes'])} |"
              for row in result["trajectories_per_question"]]
    criteria = {k: v for k, v in result["criteria"].items() if not k.endswith("reference")}
    lines += ["", "Criteria of issue 19: " + ", ".join(f"`{k}`: {v}" for k, v in
                                                         criteria.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--quick", action="store_true", help="the ~15-minute run")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (a test of the pipeline, seconds; numbers meaningless)")
    parser.add_argument("--runs", type=Path, help="the training runs (default OUT/runs)")
    parser.add_argument("--group", default="S3", choices=("S3", "A5"),
                        help="the causal LMs' group (the fast-weight memory's task is S3)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plots from an existing OUT/raml.json")
    args = parser.parse_args(argv)
    if args.replot:
        result = json.loads((args.out / "raml.json").read_text())
        plot(result, args.out)
        (args.out / "tables.md").write_text(tables(result))
        return 0
    if args.quick and args.smoke:
        parser.error("--quick and --smoke exclude each other")
    size_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[size_name]
    from metakernels.train.tasks import walk_data as wd
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.runs or args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    jobs = plan(size, args.group)
    began = time.perf_counter()
    results = {}
    # The longest first, so the pool ends together.
    order = sorted(jobs, key=lambda n: -jobs[n][1]["steps"] * (1 + 3 * (n == "fwm")))
    if args.jobs > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = {name: pool.submit(jobs[name][0], name, str(runs), jobs[name][1], size)
                       for name in order}
            for name in order:
                results[name] = futures[name].result()
                print(f"{name}: done at {time.perf_counter() - began:.0f} s", flush=True)
    else:
        for name in order:
            results[name] = jobs[name][0](name, str(runs), jobs[name][1], size)
            print(f"{name}: done at {time.perf_counter() - began:.0f} s", flush=True)

    reference = wd.no_lookahead_entropy(size["length"])
    lm, none, fwm = results["lm"], results["lm-none"], results["fwm"]
    keep = ("answer_loss", "answer_loss_corrupted", "accuracy", "accuracy_given_trajectory",
            "pass_at_k", "mg_pass_at_k", "sampled_accuracy", "samples")
    result = {
        "task": {"name": "walk", "length": size["length"], "group": args.group,
                 "fast_weight_memory_group": "S3"},
        "size": size_name,
        "command": "python bench/experiments/raml.py " + " ".join(argv or sys.argv[1:]),
        "no_lookahead": reference,
        "causal_lm": {
            "trajectory": {k: lm[k] for k in keep if k in lm},
            "no_trajectory": {"answer_loss": none["answer_loss"], "accuracy": none["accuracy"],
                              "accuracy_argmax": none["accuracy_argmax"]},
        },
        "fast_weight_memory": {"trajectory": {
            "answer_loss": fwm["answer_loss"], "answer_loss_corrupted":
                fwm["answer_loss_corrupted"], "accuracy": fwm["accuracy"]}},
        "trajectories_per_question": [
            {"K": k, "questions": size["sweep_questions"], "steps": size["sweep_steps"],
             "batch": size["sweep_batch"],
             "accuracy": results[f"lm-K{k}"]["accuracy"],
             "accuracy_given_trajectory": results[f"lm-K{k}"]["accuracy_given_trajectory"],
             "answer_loss": results[f"lm-K{k}"]["answer_loss"][-1],
             "answer_loss_mean_over_prefixes": sum(results[f"lm-K{k}"]["answer_loss"])
             / len(reference),
             "answer_loss_curve": results[f"lm-K{k}"]["answer_loss"]}
            for k in size["ks"]],
        "held_out_questions": size["questions"],
        "criteria": criteria(reference, lm, none, fwm),
        "runs": {name: {"run": r["run"], "train": r["train"], "seconds": r["seconds"]}
                 for name, r in results.items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "load_average": _load(), "wall_seconds": time.perf_counter() - began},
    }
    (args.out / "raml.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out)
    (args.out / "tables.md").write_text(tables(result))
    print(json.dumps(result["criteria"], indent=2))
    print(f"wrote {args.out / 'raml.json'} in {time.perf_counter() - began:.0f} s")
    return 0


def _load() -> list[float] | None:
    try:
        import os
        return list(os.getloadavg())
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
