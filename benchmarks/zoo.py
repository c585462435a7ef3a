"""The whole zoo: convert every timm architecture and every torchvision classifier, and prove it.

For each model this records whether hatconvert converts it or refuses it (and why), that every
parameter and buffer is accounted for (gated, task-indexed or frozen: ``net.report().tensors``),
fidelity with ``mask_init="dense"`` (eval outputs of every task equal the original's within
``1e-5`` of the output scale) and, for a sample, zero forgetting with one AdamW optimizer (weight
decay) kept across three tasks.

Big models are slow to create on CPU, so every model is first created on the meta device, where
tracing, conversion and the accounting check run without memory or init cost. Models up to
``--real-max-params`` are then created for real, their parameters perturbed (randomly initialised
heads are often all zero and layer scales 1e-5, which would hide errors behind them) and run on
one input of the model's own size, original against converted. Larger models only get a meta
forward that checks the converted graph runs and gives the original's output shapes.

    python benchmarks/zoo.py [--shard I/N] [--limit N] [--filter 'resnet*' ...] [--output F.json]
    python benchmarks/zoo.py --merge /tmp/zoo/shard-*.json [--output merged.json]

Records are appended to ``OUTPUT.jsonl`` as they finish, so an interrupted run resumes where it
stopped; the JSON report and the totals are written at the end (or by ``--merge``).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import signal
import statistics
import sys
import time
import traceback
import warnings
import zlib
from collections import Counter
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hatconvert  # noqa: E402
from hatconvert import ConversionError  # noqa: E402

TOLERANCE = 1e-5       # fidelity: max abs diff relative to the output's max abs value
FIDELITY_TASKS = 2
FORGETTING_TASKS = 3
# torchvision classifiers whose default input differs from 224
TORCHVISION_SIZES = {"inception_v3": 299}
# the second table: torchvision's segmentation, detection and video models, timm backbones
DENSE_MODULES = ("segmentation", "detection", "video")
ZOO_SOURCES = ("timm", "torchvision", "torchvision-dense", "timm-features")
VIDEO_224 = ("s3d", "mvit", "swin3d")  # video models that need 224 px (the others: 112)


def sources_digest() -> str:
    """SHA-256 of hatconvert's sources as imported: which code produced a report."""
    package = os.path.dirname(os.path.abspath(hatconvert.__file__))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as fh:
                digest.update(name.encode() + fh.read())
    return digest.hexdigest()


SOURCES = sources_digest()


class Timeout(Exception):
    """One model took longer than ``--timeout`` seconds."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise ``Timeout`` in the main thread after ``seconds`` (checked between Python bytecodes)."""
    def handler(signum, frame):
        raise Timeout(f"more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- the zoo -------------------------------------------------------------------------------------
def zoo_entries(sources: list[str]) -> list[str]:
    """Every model as ``timm/NAME`` or ``torchvision/NAME``, in a fixed order."""
    names = []
    if "timm" in sources:
        import timm
        names += [f"timm/{n}" for n in timm.list_models()]
    if "torchvision" in sources:
        import torchvision
        classifiers = torchvision.models.list_models(module=torchvision.models)
        names += [f"torchvision/{n}" for n in classifiers]
    if "torchvision-dense" in sources:
        import torchvision
        for kind in DENSE_MODULES:
            module = getattr(torchvision.models, kind)
            names += [f"torchvision-dense/{kind}.{n}"
                      for n in torchvision.models.list_models(module=module)]
    if "timm-features" in sources:
        import timm
        names += [f"timm-features/{n}" for n in timm.list_models()]
    return names


def is_detection(entry: str) -> bool:
    """torchvision's detection models train on images and targets, not on one tensor."""
    return entry.startswith("torchvision-dense/detection.")


def create(entry: str, device: str) -> nn.Module:
    """The model in eval mode, created on ``device`` (``meta``: no memory, no init cost)."""
    source, name = entry.split("/", 1)
    with torch.device(device):
        if source in ("timm", "timm-features"):
            import timm
            model = timm.create_model(name, features_only=source == "timm-features")
        elif source == "torchvision-dense":
            import torchvision
            kind, _, name = name.partition(".")
            extra = {} if kind == "video" else {"weights_backbone": None}
            model = torchvision.models.get_model(name, weights=None, **extra)
        else:
            import torchvision
            model = torchvision.models.get_model(name, weights=None)
    return model.eval()


def input_shape(entry: str, model: nn.Module, batch: int) -> tuple[int, ...]:
    """The model's own input size: timm's pretrained config, 224 (299) for torchvision."""
    source, name = entry.split("/", 1)
    if source == "torchvision-dense" and name.startswith("video."):
        side = 224 if name.split(".", 1)[1].startswith(VIDEO_224) else 112
        return (batch, 3, 16, side, side)
    if source in ("timm", "timm-features"):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, 224, 224)))
        return (batch, *size)
    side = TORCHVISION_SIZES.get(name, 224)
    return (batch, 3, side, side)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturb_(model: nn.Module, seed: int) -> None:
    """Add noise to every parameter (and running statistics) so that no branch is silent."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point():
                continue
            std = p.float().std().item() if p.numel() > 1 else 0.0
            scale = 0.1 * std if std > 0 and std == std else 0.02
            p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.mul_(1 + 0.1 * torch.rand(b.shape, generator=gen).to(b.dtype))
            elif name.endswith("running_mean"):
                b.add_(0.05 * torch.randn(b.shape, generator=gen).to(b.dtype))


def tensors_of(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, tuple, list, dict or namedtuple), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors_of(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in tensors_of(v)]
    return []


# -- the checks ----------------------------------------------------------------------------------
def accounting(net: hatconvert.HATNetwork) -> dict[str, Any]:
    """Every parameter and buffer of the converted model is in the report, by category."""
    report = net.report()
    names = {n for n, _ in net.model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in net.model.named_buffers(remove_duplicate=False)}
    lay = report.layout
    return {
        "all_accounted": set(report.tensors) == names,
        "tensors": {c: report.count(c)
                    for c in ("gated", "gate", "task-indexed", "frozen", "constant")},
        "gated_layers": len(lay.gated),
        "norms": len(lay.norms),
        "task_leaves": list(lay.task_leaves),
        "frozen_leaves": list(lay.frozen_leaves),
        "task_params": len(lay.task_params),
        "frozen_params": len(lay.frozen_params) + len(lay.frozen_in_gated),
        **{k: v for k, v in extra_layout(lay).items()},
        "overhead_percent": round(report.overhead_percent, 3),
    }


def extra_layout(lay: Any) -> dict[str, Any]:
    """Layout fields newer than the first version of this script, when the converter has them."""
    out = {}
    for key in ("converted_leaves", "auto_leaves", "dropped", "mode_dependent"):
        value = getattr(lay, key, None)
        if value:
            out[key] = value if isinstance(value, bool) else list(value)
    return out


def fidelity(model: nn.Module, net: hatconvert.HATNetwork, x: torch.Tensor) -> dict[str, Any]:
    """Eval outputs of every task with dense masks against the original's."""
    with torch.no_grad():
        expected = tensors_of(model(x))
        worst, scale = 0.0, 0.0
        for t in range(FIDELITY_TASKS):
            got = tensors_of(net(x, t))
            if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
                return {"mode": "real", "passed": False, "error": "output structure differs"}
            for g, e in zip(got, expected):
                finite = torch.isfinite(e)
                if not torch.equal(finite, torch.isfinite(g)):
                    return {"mode": "real", "passed": False, "error": "non-finite entries differ"}
                if finite.any():
                    worst = max(worst, (g[finite] - e[finite]).abs().max().item())
                    scale = max(scale, e[finite].abs().max().item())
    return {"mode": "real", "passed": worst <= TOLERANCE * scale, "max_abs_diff": worst,
            "output_scale": scale}


def meta_shapes(model: nn.Module, net: hatconvert.HATNetwork, x: torch.Tensor) -> dict[str, Any]:
    """On the meta device: the converted graph runs and gives the original's output shapes."""
    with torch.no_grad():
        try:
            expected = [t.shape for t in tensors_of(model(x))]
        except Exception as exc:  # the original itself cannot run on meta: nothing to compare
            return {"mode": "skipped", "passed": None, "error": f"original on meta: {short(exc)}"}
        got = [t.shape for t in tensors_of(net(x, 0))]
    return {"mode": "meta", "passed": got == expected}


def training_loss(net: hatconvert.HATNetwork, x: torch.Tensor, task: int, s: float,
                  gen: torch.Generator, detection: bool) -> torch.Tensor:
    """A task loss: cross-entropy on the first output, or a detection model's own losses on
    one drawn box per image."""
    if detection:
        side = min(x.shape[-2:])
        boxes = [torch.tensor([[0.1, 0.1, 0.6, 0.7]]) * side for _ in range(x.shape[0])]
        targets = [{"boxes": b, "labels": torch.randint(1, 3, (1,), generator=gen),
                    "masks": torch.ones(1, *x.shape[-2:], dtype=torch.uint8),
                    "keypoints": torch.cat([b[:, :2].expand(17, 2), torch.ones(17, 1)], 1)[None]}
                   for b in boxes]
        return sum(net(list(x), task, s, targets=targets).values())
    out = tensors_of(net(x, task, s))[0]
    logits = out.reshape(out.shape[0], -1).float()
    y = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=gen)
    return F.cross_entropy(logits, y)


def zero_forgetting(model: nn.Module, x: torch.Tensor, steps: int = 2,
                    auto_leaves: bool = True, detection: bool = False) -> dict[str, Any]:
    """Three tasks with one AdamW (weight decay) kept across them: earlier tasks stay bit-exact."""
    net = hatconvert.convert(model, num_tasks=FORGETTING_TASKS, auto_leaves=auto_leaves)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    expected: dict[int, list[torch.Tensor]] = {}
    identical = True
    for task in range(FORGETTING_TASKS):
        net.train()
        net.begin_task(task)
        for b in range(steps):
            s = hatconvert.mask_scale(b, steps)
            loss = training_loss(net, x, task, s, gen, detection) + net.regularization(task, s)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.end_task()
        net.eval()
        with torch.no_grad():
            for earlier, outs in expected.items():
                now = tensors_of(net(x, earlier))
                identical &= all(same(a, b) for a, b in zip(now, outs))
            expected[task] = [t.clone() for t in tensors_of(net(x, task))]
    with torch.no_grad():
        learned = not all(same(a, b) for a, b in zip(tensors_of(net(x, 0)),
                                                      expected[FORGETTING_TASKS - 1]))
    return {"passed": identical, "later_tasks_differ": learned, "tasks": FORGETTING_TASKS,
            "optimizer": "AdamW(weight_decay=0.05)"}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaNs in the same places counting as equal."""
    return a.shape == b.shape and bool(torch.all((a == b) | (torch.isnan(a) & torch.isnan(b))))


def short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:limit]


def reason_group(entry: str, reason: str) -> str:
    """A refusal reason with model-specific parts removed, so that alike reasons group."""
    name = entry.split("/", 1)[1]
    text = reason.replace(name, "<model>")
    text = re.sub(r"'[\w.]+'", "'<path>'", text)
    text = re.sub(r" at [^ ]+:\d+", "", text)
    text = re.sub(r"\d+", "N", text)
    return text[:200]


# -- one model -----------------------------------------------------------------------------------
def sampled_for_forgetting(entry: str, every: int) -> bool:
    """About one model in ``every``, by a hash of the name: the same in any shard layout."""
    return zlib.crc32(entry.encode()) % every == 0


def check_model(entry: str, index: int, args: argparse.Namespace) -> dict[str, Any]:
    """Create, convert and check one model; never raises."""
    record: dict[str, Any] = {"model": entry}
    t0 = time.perf_counter()
    try:
        with time_limit(args.timeout):
            check_into(record, entry, index, args)
    except Timeout as exc:
        record.setdefault("status", "timeout")
        record["timeout"] = str(exc)
    except Exception as exc:  # a check itself failed after conversion: keep what was recorded
        record.setdefault("status", "error")
        record["error"] = short(exc)
        record["traceback"] = traceback.format_exc(limit=-4)
    record["total_s"] = round(time.perf_counter() - t0, 3)
    return record


def check_into(record: dict[str, Any], entry: str, index: int, args: argparse.Namespace) -> None:
    try:
        meta_model = create(entry, "meta")
        params = count_params(meta_model)
    except Exception as exc:
        meta_model, params = None, None
        record["meta_create_error"] = short(exc)
    record["params"] = params
    real = params is not None and params <= args.real_max_params
    if meta_model is None:  # cannot create on meta: only small enough to try for real
        real = args.create_unknown
    model = None
    if real:
        torch.manual_seed(index)
        model = create(entry, "cpu")
        params = record["params"] = count_params(model)
        perturb_(model, seed=index)
    subject = model if model is not None else meta_model
    if subject is None:
        record["status"] = "not-created"
        return

    t0 = time.perf_counter()
    try:
        net = hatconvert.convert(subject, num_tasks=FIDELITY_TASKS, mask_init="dense",
                                 auto_leaves=args.auto_leaves)
    except ConversionError as exc:
        record.update(status="refused", reason=short(exc, 600),
                      reason_group=reason_group(entry, str(exc)),
                      convert_s=round(time.perf_counter() - t0, 3))
        return
    except Exception as exc:  # a converter bug: not a clear refusal
        record.update(status="failed", reason=short(exc, 600),
                      reason_group=reason_group(entry, short(exc)),
                      convert_s=round(time.perf_counter() - t0, 3),
                      traceback=traceback.format_exc(limit=-6))
        return
    record["convert_s"] = round(time.perf_counter() - t0, 3)
    record["status"] = "converted"
    record["accounting"] = accounting(net)
    net.eval()

    shape = input_shape(entry, subject, batch=2)
    record["input"] = list(shape)
    try:
        if model is not None:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(index))
            record["fidelity"] = fidelity(model, net, x)
        elif args.meta_forward:
            record["fidelity"] = meta_shapes(meta_model, net, torch.empty(*shape, device="meta"))
        else:
            record["fidelity"] = {"mode": "skipped", "passed": None}
    except Timeout:
        raise
    except Exception as exc:
        record["fidelity"] = {"mode": "real" if model is not None else "meta", "passed": False,
                              "error": short(exc), "traceback": traceback.format_exc(limit=-4)}
    del net

    sampled = args.forgetting_every > 0 and sampled_for_forgetting(entry, args.forgetting_every)
    if sampled and model is not None and params <= args.forgetting_max_params \
            and record["fidelity"].get("passed"):
        try:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(index + 1))
            record["forgetting"] = zero_forgetting(model, x, auto_leaves=args.auto_leaves,
                                                   detection=is_detection(entry))
        except Timeout:
            raise
        except Exception as exc:
            record["forgetting"] = {"passed": False, "error": short(exc),
                                    "traceback": traceback.format_exc(limit=-4)}


# -- totals --------------------------------------------------------------------------------------
def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over records: converted, accounted, fidelity, forgetting, refusals by reason."""
    status = Counter(r.get("status", "error") for r in records)
    converted = [r for r in records if r.get("status") == "converted"]
    fid = Counter()
    for r in converted:
        f = r.get("fidelity") or {}
        outcome = {True: "passed", None: "skipped"}.get(f.get("passed"), "failed")
        key = f"{f.get('mode', 'none')}:{outcome}"
        fid[key] += 1
    forgetting = [r["forgetting"] for r in records if "forgetting" in r]
    times = [r["convert_s"] for r in converted if "convert_s" in r]
    slowest = max(converted, key=lambda r: r.get("convert_s", 0), default=None)
    refusals = Counter(r.get("reason_group", "?") for r in records
                       if r.get("status") in ("refused", "failed"))
    by_source = {}
    for r in records:
        src = r["model"].split("/", 1)[0]
        c = by_source.setdefault(src, Counter())
        c["total"] += 1
        c[r.get("status", "error")] += 1
    return {
        "models": len(records),
        "by_source": {k: dict(v) for k, v in by_source.items()},
        "status": dict(status),
        "all_accounted": sum(1 for r in converted
                             if (r.get("accounting") or {}).get("all_accounted")),
        "fidelity": dict(fid),
        "forgetting": {"sampled": len(forgetting),
                       "passed": sum(1 for f in forgetting if f.get("passed")),
                       "later_tasks_differ": sum(1 for f in forgetting
                                                 if f.get("later_tasks_differ"))},
        "convert_s": {"median": statistics.median(times) if times else None,
                      "max": max(times) if times else None,
                      "slowest": slowest["model"] if slowest else None},
        "refused_or_failed_by_reason": dict(refusals.most_common()),
        "failures": sorted(r["model"] for r in records
                           if r.get("status") in ("failed", "error", "timeout", "not-created")
                           or (r.get("fidelity") or {}).get("passed") is False
                           or (r.get("forgetting") or {}).get("passed") is False),
    }


def print_totals(summary: dict[str, Any]) -> None:
    print(f"models: {summary['models']}  by source: {summary['by_source']}")
    print(f"status: {summary['status']}")
    print(f"every tensor accounted for: {summary['all_accounted']} of "
          f"{summary['status'].get('converted', 0)} converted")
    print(f"fidelity (dense masks, every task): {summary['fidelity']}")
    f = summary["forgetting"]
    print(f"zero forgetting (AdamW kept across {FORGETTING_TASKS} tasks): {f['passed']} of "
          f"{f['sampled']} sampled; later tasks learned something in {f['later_tasks_differ']}")
    c = summary["convert_s"]
    if c["median"] is not None:
        print(f"conversion time per model: median {c['median']:.3f} s, max {c['max']:.3f} s "
              f"({c['slowest']})")
    if summary["refused_or_failed_by_reason"]:
        print("refused or failed, by reason:")
        for reason, n in summary["refused_or_failed_by_reason"].items():
            print(f"  {n:4d}  {reason}")
    if summary["failures"]:
        print(f"models with a failed check ({len(summary['failures'])}): "
              + ", ".join(summary["failures"]))


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", nargs="+", default=["timm", "torchvision"], choices=ZOO_SOURCES,
                   help="torchvision-dense: segmentation, detection and video models; "
                        "timm-features: timm models with features_only=True")
    p.add_argument("--filter", nargs="+", default=None, help="fnmatch patterns on model names")
    p.add_argument("--limit", type=int, default=None, help="check at most this many models")
    p.add_argument("--shard", default="0/1", help="I/N: check every N-th model starting at I")
    p.add_argument("--output", default="zoo-report.json",
                   help="JSON report (records stream to .jsonl)")
    p.add_argument("--real-max-params", type=float, default=30e6,
                   help="models up to this many parameters get a real fidelity forward")
    p.add_argument("--forgetting-every", type=int, default=20,
                   help="zero-forgetting check on about one model in N, chosen by a hash of "
                        "its name (0: none)")
    p.add_argument("--forgetting-max-params", type=float, default=12e6)
    p.add_argument("--no-meta-forward", dest="meta_forward", action="store_false",
                   help="skip the meta-device forward of models above --real-max-params")
    p.add_argument("--no-auto-leaves", dest="auto_leaves", action="store_false",
                   help="refuse models that break tracing instead of keeping the failing "
                        "submodule whole (convert(auto_leaves=True))")
    p.add_argument("--no-create-unknown", dest="create_unknown", action="store_false",
                   help="skip models that cannot be created on meta, instead of creating them "
                        "on CPU (their size is unknown until then)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per model")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--merge", nargs="+", default=None, metavar="REPORT",
                   help="merge shard reports (JSON or JSONL) and print the totals")
    return p.parse_args(argv)


def load_records(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    if path.endswith(".jsonl"):
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    with open(path) as fh:
        return json.load(fh)["records"]


def write_report(path: str, records: list[dict[str, Any]], summary: dict[str, Any],
                 meta: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump({"summary": summary, "meta": meta, "records": records}, fh, indent=1)


def environment() -> dict[str, Any]:
    import timm
    try:
        import torchvision
        tv = torchvision.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "timm": timm.__version__, "torchvision": tv,
            "hatconvert": hatconvert.__version__, "hatconvert_sources_sha256": SOURCES,
            "tolerance": TOLERANCE}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.merge:
        records: dict[str, dict[str, Any]] = {}
        for path in args.merge:
            for r in load_records(path):
                records[r["model"]] = r
        merged = sorted(records.values(), key=lambda r: r["model"])
        summary = summarize(merged)
        print_totals(summary)
        if args.output != "zoo-report.json" or not os.path.exists(args.output):
            write_report(args.output, merged, summary, environment())
        return 0

    torch.set_num_threads(args.threads)
    entries = zoo_entries(args.sources)
    indexed = list(enumerate(entries))
    if args.filter:
        indexed = [(i, e) for i, e in indexed
                   if any(fnmatch.fnmatchcase(e.split("/", 1)[1], p) or fnmatch.fnmatchcase(e, p)
                          for p in args.filter)]
    shard, shards = (int(v) for v in args.shard.split("/"))
    indexed = indexed[shard::shards]
    if args.limit is not None:
        indexed = indexed[:args.limit]

    stream = args.output + "l" if args.output.endswith(".json") else args.output + ".jsonl"
    done = {r["model"]: r for r in load_records(stream)}
    todo = [(i, e) for i, e in indexed if e not in done]
    from tqdm import tqdm
    bar = tqdm(todo, desc=f"zoo {args.shard}", disable=not args.progress, dynamic_ncols=True)
    with open(stream, "a") as fh:
        for index, entry in bar:
            bar.set_postfix_str(entry, refresh=True)
            record = check_model(entry, index, args)
            done[entry] = record
            fh.write(json.dumps(record) + "\n")
            fh.flush()
    records = [done[e] for _, e in indexed if e in done]
    summary = summarize(records)
    write_report(args.output, records, summary, environment())
    print_totals(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
