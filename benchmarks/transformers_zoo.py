"""HuggingFace transformers models converted directly: a table over many families.

For each tiny model of ``hf_models.py`` (random weights, hidden size 32, two layers) this checks,
side by side in one run: that ``hatconvert.convert(model, ...)`` converts it; fidelity with
``mask_init="dense"`` (every task's eval output equals the original's within 1e-5 of its scale);
zero forgetting (three tasks trained with one AdamW optimizer with weight decay kept across
them, every earlier task's eval output bit-identical afterwards); and the parameter growth of
a 10-task network with the default policies. Tiny models have few weights per unit, so their
gates weigh more than in a real one: the growth of BERT-base (built from ``BertConfig()``,
random weights, 109M parameters) at 10 tasks is measured as well.

    python benchmarks/transformers_zoo.py [--filter 'bert*' ...] [--no-base] [--output F.json]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hatconvert  # noqa: E402
import hf_models  # noqa: E402
from hatconvert.huggingface import FIXED_WIDTH_TASKS  # noqa: E402


def fidelity(name: str, tasks: int = 3) -> float:
    """Largest difference of any task's output from the original's, over the output scale."""
    model = hf_models.build(name)
    inputs = hf_models.inputs_for(name)
    net = hatconvert.convert(model, tasks, mask_init="dense").eval()
    with torch.no_grad():
        ref = hf_models.first_tensor(model(**inputs))
        diff = max((hf_models.first_tensor(net(**inputs, task_id=t)) - ref).abs().max().item()
                   for t in range(tasks))
    return diff / max(ref.abs().max().item(), 1e-12)


def loss_of(out: Any, generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy on random labels for logits; the output's mean square for a backbone."""
    logits = getattr(out, "logits", None)
    if logits is None:
        return hf_models.first_tensor(out).pow(2).mean()
    flat = logits.reshape(-1, logits.shape[-1])
    labels = torch.randint(0, flat.shape[-1], (flat.shape[0],), generator=generator)
    return torch.nn.functional.cross_entropy(flat, labels)


def forgetting(name: str, tasks: int = 3, steps: int = 4) -> bool:
    """Whether every earlier task's eval output stays bit-identical over ``tasks`` tasks."""
    cls = hf_models.class_of(name)  # a backbone has no head, some heads have a fixed width
    task_model = "For" in cls and not any(k in cls for k in FIXED_WIDTH_TASKS)
    net = hatconvert.convert(hf_models.build(name), tasks,
                             num_classes=[3, 5, 4][:tasks] if task_model else None)
    probe = hf_models.inputs_for(name, seed=99)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    ended: dict[int, torch.Tensor] = {}
    for t in range(tasks):
        net.train()
        net.begin_task(t)
        for step in range(steps):
            s = hatconvert.mask_scale(step, steps)
            out = net(**hf_models.inputs_for(name, seed=t * steps + step), task_id=t,
                      mask_scale=s)
            loss = loss_of(out, generator) + net.regularization(t, s)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.end_task()
        net.eval()
        with torch.no_grad():
            ended[t] = hf_models.first_tensor(net(**probe, task_id=t)).clone()
    with torch.no_grad():
        return all(torch.equal(hf_models.first_tensor(net(**probe, task_id=u)), ended[u])
                   for u in range(tasks - 1))


def growth(model: torch.nn.Module, tasks: int = 10) -> float:
    """Parameters of a ``tasks``-task network over the original's, minus one, in percent."""
    return hatconvert.convert(model, tasks).report().overhead_percent


def check(name: str) -> dict[str, Any]:
    """One model's row."""
    row: dict[str, Any] = {"model": name, "class": hf_models.class_of(name)}
    start = time.perf_counter()
    try:
        row["growth_10_tasks_percent"] = round(growth(hf_models.build(name)), 1)
        row["converted"] = True
    except Exception as exc:  # the table records why
        row.update(converted=False, error=f"{type(exc).__name__}: {exc}"[:300])
        return row
    for key, fn in (("fidelity", fidelity), ("forgetting", forgetting)):
        try:
            row[key] = fn(name)
        except Exception as exc:
            row[key], row[f"{key}_error"] = None, f"{type(exc).__name__}: {exc}"[:300]
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def bert_base_growth(tasks: int = 10) -> dict[str, Any]:
    """BERT-base (random weights) for sequence classification, converted for ``tasks`` tasks."""
    import transformers
    model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2))
    report = hatconvert.convert(model, tasks).report()
    copied = hatconvert.convert(model, tasks, embeddings="loose").report()
    return {"model": "BertForSequenceClassification (bert-base config)", "tasks": tasks,
            "original_params": report.original_params,
            "converted_params": report.converted_params,
            "growth_percent": round(report.overhead_percent, 2),
            "growth_percent_embeddings_loose": round(copied.overhead_percent, 2)}


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| model | class | converted | fidelity (rel. diff) | zero forgetting | "
             "growth at 10 tasks |", "|---|---|---|---|---|---|"]
    for r in rows:
        fid = "-" if r.get("fidelity") is None else f"{r['fidelity']:.1e}"
        forg = {True: "yes", False: "NO", None: "-"}[r.get("forgetting")]
        grow = f"+{r['growth_10_tasks_percent']}%" if r.get("converted") else r.get("error", "")
        lines.append(f"| {r['model']} | {r['class']} | {'yes' if r['converted'] else 'no'} | "
                     f"{fid} | {forg} | {grow} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", nargs="+", default=["*"], help="fnmatch patterns of names")
    parser.add_argument("--no-base", action="store_true", help="skip the BERT-base growth")
    parser.add_argument("--output", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    transformers_logging()
    start = time.perf_counter()
    names = [n for n in hf_models.CATALOGUE if any(fnmatch.fnmatch(n, p) for p in args.filter)]
    rows = [check(n) for n in names]
    print(table(rows))
    fid_ok = sum(1 for r in rows if r.get("fidelity") is not None and r["fidelity"] <= 1e-5)
    print(f"\nconverted {sum(r['converted'] for r in rows)}/{len(rows)}, fidelity {fid_ok}/"
          f"{len(rows)}, zero forgetting {sum(r.get('forgetting') is True for r in rows)}/"
          f"{len(rows)}")
    base = None if args.no_base else bert_base_growth()
    if base:
        print(f"{base['model']}: {base['original_params']:,} -> {base['converted_params']:,} "
              f"parameters at {base['tasks']} tasks (+{base['growth_percent']}%; with "
              f"embeddings='loose' +{base['growth_percent_embeddings_loose']}%)")
    print(f"wall time {time.perf_counter() - start:.0f} s, transformers "
          f"{__import__('transformers').__version__}, torch {torch.__version__}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"rows": rows, "bert_base": base}, f, indent=1)
    ok = all(r["converted"] and r.get("forgetting") and r["fidelity"] <= 1e-5 for r in rows)
    return 0 if ok else 1


def transformers_logging() -> None:
    """Keep transformers' config warnings about tiny vocabularies out of the table."""
    import transformers
    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
