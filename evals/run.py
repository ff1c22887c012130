"""Long-context accuracy harness: retrieval tasks at given lengths against headwise plans.

    .venv/bin/python evals/run.py --plan configs/smollm2-135m-instruct/profiled.json --plan dense \\
        --tasks passkey --lengths 1024,2048 --seeds 0-9
    .venv/bin/python evals/run.py --url http://localhost:8000/v1 --no-hf --tasks passkey

Targets: (a) the Hugging Face path (``headwise.server.plugin.hf``) with each ``--plan`` (a plan file, or
``dense`` for the model's all-dense plan through the same kernels), and (b) optionally an
OpenAI-compatible server (``--url``; headwise serve or stock vLLM). Every target answers the same
prompts (``headwise.server.commands.tasks``, chat-formatted, greedy). Prints a table of accuracy per
(target, task, length) and writes every reply, grade and figure to a JSON file under
``evals/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    """``"0-4,7"`` -> ``[0, 1, 2, 3, 4, 7]``; ``"1024,2048"`` -> ``[1024, 2048]``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers or ranges like 0-4, found {part!r}") from None
    return out


def make_items(tokenizer, tasks: list[str], lengths: list[int], seeds: list[int]) -> list[dict]:
    """Every (task, length, seed) prompt, as the chat message a client would send."""
    from headwise.server.commands.tasks import make_task

    items = []
    for name in tasks:
        for length in lengths:
            for seed in seeds:
                t = make_task(name, tokenizer, length, seed=seed)
                items.append({"task": name, "length": length, "seed": seed, "prompt": t.prompt,
                              "answer": t.answer, "prompt_tokens": t.n_tokens})
    return items


def _grade(item: dict, reply: str) -> bool:
    return item["answer"] in reply


# ------------------------------------------------------------------------ HF target
def load_hf(model_path: str, dtype: str = "bfloat16", device: str = "cpu"):
    from transformers import AutoTokenizer

    from headwise.server.plugin import hf

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"  # the headwise attention accepts left padding only
    return tokenizer, hf.load_model(model_path, dtype, device)


def resolve_plan(spec: str, model_path: str):
    """A plan file, or ``dense``: the all-dense plan of the model (dense_below 0, so the kernels run)."""
    from headwise.patterns.plan import ModelGeometry, Plan, Settings, load_plan
    from headwise.server.commands.model import read_geometry

    if spec != "dense":
        return load_plan(spec)
    geo = read_geometry(model_path)
    geometry = ModelGeometry(**{k: geo[k] for k in ("architecture", "num_layers", "num_heads", "num_kv_heads",
                                                    "head_dim")})
    return Plan(model=geometry, settings=Settings(dense_below=0), description="dense (evals/run.py)")


def run_hf(model, tokenizer, plan, items: list[dict], max_new_tokens: int, batch_size: int = 1,
           log=lambda m: None) -> dict:
    """Greedy answers of the HF model under ``plan`` (batches are left-padded)."""
    import torch

    from headwise.server.plugin import hf

    runtime = hf.attach_plan(model, plan)
    device = next(model.parameters()).device
    results = []
    started = time.monotonic()
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": it["prompt"]}],
                                               add_generation_prompt=True, tokenize=False) for it in batch]
        enc = tokenizer(texts, return_tensors="pt", add_special_tokens=False, padding=True).to(device)
        t0 = time.monotonic()
        runtime.reset_stats()  # density per batch, so each length gets its own figure
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        seconds = (time.monotonic() - t0) / len(batch)
        density = runtime.density()
        for j, it in enumerate(batch):
            reply = tokenizer.decode(out[j, enc.input_ids.shape[1]:], skip_special_tokens=True)
            results.append({**{k: it[k] for k in ("task", "length", "seed", "answer", "prompt_tokens")},
                            "reply": reply, "correct": _grade(it, reply), "seconds": round(seconds, 3),
                            "density": density})
        log(f"{min(i + batch_size, len(items))}/{len(items)} answered ({time.monotonic() - started:.0f}s)")
    hf.detach_plan(model)
    return {"results": results}


# -------------------------------------------------------------------- server target
def run_server(url: str, items: list[dict], max_new_tokens: int, served_model: str | None = None,
               timeout: float = 600.0, log=lambda m: None) -> dict:
    """Greedy answers of an OpenAI-compatible server (``url`` ends in ``/v1``)."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="EMPTY", timeout=timeout)
    name = served_model or client.models.list().data[0].id
    results = []
    started = time.monotonic()
    for n, it in enumerate(items):
        t0 = time.monotonic()
        resp = client.chat.completions.create(model=name, messages=[{"role": "user", "content": it["prompt"]}],
                                              max_tokens=max_new_tokens, temperature=0.0)
        reply = resp.choices[0].message.content or ""
        results.append({**{k: it[k] for k in ("task", "length", "seed", "answer", "prompt_tokens")},
                        "reply": reply, "correct": _grade(it, reply),
                        "seconds": round(time.monotonic() - t0, 3)})
        log(f"{n + 1}/{len(items)} answered ({time.monotonic() - started:.0f}s)")
    return {"results": results, "served_model": name}


# ---------------------------------------------------------------------------- report
def summarise(results: list[dict]) -> dict[str, dict[str, dict]]:
    """``{task: {length: {"correct", "total", "accuracy", "prefill_density", "decode_density"}}}``
    (densities: mean over the cell's prompts, HF only; a batch's figure counts for each of its rows)."""
    table: dict[str, dict[str, dict]] = {}
    for r in results:
        cell = table.setdefault(r["task"], {}).setdefault(str(r["length"]), {"correct": 0, "total": 0, "_d": []})
        cell["correct"] += int(r["correct"])
        cell["total"] += 1
        if r.get("density"):
            cell["_d"].append(r["density"])
    for row in table.values():
        for cell in row.values():
            cell["accuracy"] = cell["correct"] / cell["total"]
            dens = cell.pop("_d")
            for phase in ("prefill", "decode"):
                values = [d[phase] for d in dens if d.get(phase) is not None]
                cell[f"{phase}_density"] = sum(values) / len(values) if values else None
    return table


def format_table(targets: list[dict]) -> str:
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    w = max([6] + [len(t["name"]) for t in targets])
    lines = [f"{'target':<{w}} {'task':<18} {'length':>6} {'accuracy':>9} {'n':>4} {'prefill dens.':>13} "
             f"{'decode dens.':>12}"]
    for t in targets:
        for task, row in t["summary"].items():
            for length, cell in row.items():
                lines.append(f"{t['name']:<{w}} {task:<18} {length:>6} {cell['accuracy']:>9.1%} "
                             f"{cell['total']:>4} {pct(cell['prefill_density']):>13} {pct(cell['decode_density']):>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint dir or hub id (default: the embedded SmolLM2)")
    p.add_argument("--plan", action="append", default=[], help="plan file or 'dense' (repeatable)")
    p.add_argument("--tasks", default="passkey", help="comma list: passkey,kv_retrieval,variable_tracking")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048], help="prompt lengths in tokens")
    p.add_argument("--seeds", type=_ints, default=list(range(5)), help="seeds, e.g. 0-9")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=1, help="HF generation batch (left-padded)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--url", default=None, help="also ask an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    p.add_argument("--served-model", default=None, help="model name on the server (default: its first model)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF target (server only)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: evals/results/eval-<time>.json)")
    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoTokenizer

    from headwise.server.commands.model import resolve_model
    from headwise.server.commands.tasks import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or any(t not in TASKS for t in tasks):
        p.error(f"--tasks {args.tasks!r}: expected names from {sorted(TASKS)}")
    if args.no_hf and not args.url:
        p.error("--no-hf leaves nothing to evaluate: give --url too")
    plans = args.plan or (["dense"] if not args.no_hf else [])
    log = lambda m: print(f"[evals] {m}", file=sys.stderr, flush=True)  # noqa: E731
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    items = make_items(tokenizer, tasks, args.lengths, args.seeds)
    targets = []
    if not args.no_hf:
        tokenizer, model = load_hf(model_path, args.dtype, args.device)
        for spec in plans:
            log(f"HF with plan {spec}: {len(items)} prompts")
            out = run_hf(model, tokenizer, resolve_plan(spec, model_path), items, args.max_new_tokens,
                         args.batch_size, log)
            targets.append({"name": f"hf:{spec}", "kind": "hf", "plan": spec, **out})
    if args.url:
        log(f"server {args.url}: {len(items)} prompts")
        out = run_server(args.url, items, args.max_new_tokens, args.served_model, log=log)
        targets.append({"name": f"server:{args.url}", "kind": "server", "plan": None, **out})
    for t in targets:
        t["summary"] = summarise(t["results"])
    print(format_table(targets))
    report = {
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(sys.argv if argv is None else ["evals/run.py", *argv]),
        "model": model_path, "tasks": tasks, "lengths": args.lengths, "seeds": args.seeds,
        "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "device": args.device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "machine": platform.machine()},
        "targets": targets,
    }
    out_path = args.out or RESULTS_DIR / f"eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
